/*
 * lktool: record locks, flock and copy_file_range from inside an rqemu e2e guest (busybox has
 * none of them). Built static by the e2e harness (tests/src/fs.rs) and put into the test
 * initramfs.
 *
 *   lktool FILE KEY=OP[:ARG...] ...
 *
 * FILE is opened read-write (created if missing; read-only if the share is). Each step runs
 * in order and prints "RQEMU-VAL KEY=RESULT" (nothing for KEY "-"):
 *
 *   setlk:T:START:LEN    fcntl(F_SETLK),  T = r|w|u         -> OK | errno name
 *   setlkw:T:START:LEN   fcntl(F_SETLKW)                    -> OK | errno name
 *   getlk:T:START:LEN    fcntl(F_GETLK)                     -> UNLCK | R|W:start:len:pid
 *   flock:ex|sh|un[:nb]  flock(2)                           -> OK | errno name
 *   cfr:DST:OFFIN:OFFOUT:LEN  copy_file_range FILE -> DST (looped until LEN or EOF)
 *                                                           -> bytes copied | errno name
 *   waitfor:PATH         wait (up to 300 s) until PATH exists -> OK | TIMEOUT
 *   touch:PATH           create PATH                        -> OK | errno name
 *   check:PATH           does PATH exist?                   -> yes | no
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

static const char *err_name(int e)
{
	static char buf[32];
	switch (e) {
	case EAGAIN: return "EAGAIN";
	case EACCES: return "EACCES";
	case EBADF: return "EBADF";
	case EINVAL: return "EINVAL";
	case EDEADLK: return "EDEADLK";
	case ENOLCK: return "ENOLCK";
	case EINTR: return "EINTR";
	case EROFS: return "EROFS";
	case EXDEV: return "EXDEV";
	case ENOSYS: return "ENOSYS";
	case EOPNOTSUPP: return "EOPNOTSUPP";
	case EIO: return "EIO";
	case ENOENT: return "ENOENT";
	}
	snprintf(buf, sizeof buf, "E%d", e);
	return buf;
}

static void say(const char *key, const char *val)
{
	if (strcmp(key, "-") != 0) {
		printf("RQEMU-VAL %s=%s\n", key, val);
		fflush(stdout);
	}
}

static int lock_type(const char *t)
{
	if (!strcmp(t, "r")) return F_RDLCK;
	if (!strcmp(t, "w")) return F_WRLCK;
	if (!strcmp(t, "u")) return F_UNLCK;
	fprintf(stderr, "lktool: bad lock type %s\n", t);
	exit(2);
}

/* Splits "a:b:c" in place into at most max fields; returns the count. */
static int fields(char *s, char **f, int max)
{
	int n = 0;
	while (n < max) {
		f[n++] = s;
		s = strchr(s, ':');
		if (!s)
			break;
		*s++ = 0;
	}
	return n;
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: lktool FILE KEY=OP[:ARG...] ...\n");
		return 2;
	}
	int fd = open(argv[1], O_RDWR | O_CREAT, 0644);
	if (fd < 0 && errno == EROFS)
		fd = open(argv[1], O_RDONLY);
	if (fd < 0) {
		printf("RQEMU-VAL lktool_open=%s\n", err_name(errno));
		return 1;
	}
	for (int i = 2; i < argc; i++) {
		char *key = argv[i], *op = strchr(key, '=');
		char out[128];
		char *f[6];
		if (!op) {
			fprintf(stderr, "lktool: step %s has no KEY=\n", key);
			return 2;
		}
		*op++ = 0;
		int n = fields(op, f, 6);
		if ((!strcmp(f[0], "setlk") || !strcmp(f[0], "setlkw") || !strcmp(f[0], "getlk")) && n == 4) {
			struct flock fl = {
				.l_type = lock_type(f[1]),
				.l_whence = SEEK_SET,
				.l_start = atoll(f[2]),
				.l_len = atoll(f[3]),
			};
			int cmd = !strcmp(f[0], "setlk") ? F_SETLK : !strcmp(f[0], "setlkw") ? F_SETLKW : F_GETLK;
			if (fcntl(fd, cmd, &fl) < 0)
				say(key, err_name(errno));
			else if (cmd != F_GETLK)
				say(key, "OK");
			else if (fl.l_type == F_UNLCK)
				say(key, "UNLCK");
			else {
				snprintf(out, sizeof out, "%s:%lld:%lld:%d", fl.l_type == F_RDLCK ? "R" : "W",
					 (long long)fl.l_start, (long long)fl.l_len, (int)fl.l_pid);
				say(key, out);
			}
		} else if (!strcmp(f[0], "flock") && (n == 2 || n == 3)) {
			int how = !strcmp(f[1], "ex") ? LOCK_EX : !strcmp(f[1], "sh") ? LOCK_SH : LOCK_UN;
			if (n == 3 && !strcmp(f[2], "nb"))
				how |= LOCK_NB;
			say(key, flock(fd, how) < 0 ? err_name(errno) : "OK");
		} else if (!strcmp(f[0], "cfr") && n == 5) {
			int dst = open(f[1], O_WRONLY | O_CREAT, 0644);
			if (dst < 0) {
				say(key, err_name(errno));
				continue;
			}
			loff_t in = atoll(f[2]), outoff = atoll(f[3]);
			long long left = atoll(f[4]), total = 0;
			int e = 0;
			while (left > 0) {
				ssize_t r = copy_file_range(fd, &in, dst, &outoff, left, 0);
				if (r < 0) {
					e = errno;
					break;
				}
				if (r == 0)
					break;
				total += r;
				left -= r;
			}
			close(dst);
			if (e)
				say(key, err_name(e));
			else {
				snprintf(out, sizeof out, "%lld", total);
				say(key, out);
			}
		} else if (!strcmp(f[0], "waitfor") && n == 2) {
			int ok = 0;
			for (int t = 0; t < 3000 && !ok; t++) {
				ok = access(f[1], F_OK) == 0;
				if (!ok)
					usleep(100000);
			}
			say(key, ok ? "OK" : "TIMEOUT");
			if (!ok)
				return 1;
		} else if (!strcmp(f[0], "touch") && n == 2) {
			int t = open(f[1], O_WRONLY | O_CREAT, 0644);
			say(key, t < 0 ? err_name(errno) : "OK");
			if (t >= 0)
				close(t);
		} else if (!strcmp(f[0], "check") && n == 2) {
			say(key, access(f[1], F_OK) == 0 ? "yes" : "no");
		} else {
			fprintf(stderr, "lktool: bad step %s\n", op);
			return 2;
		}
	}
	return 0;
}
