//! The device daemons confine themselves by default (issue #12): each is started as a user
//! would start it, served by a real frontend, and then every thread of every process of it is
//! read from `/proc`: seccomp filter mode (2) on every thread, no_new_privs, no effective
//! capability, and a mount namespace of its own. The daemon must still serve afterwards
//! (an allow-list missing a syscall the serving path needs kills it: default action kill).
//! Socket permissions: the listening socket is 0600, and a peer of another uid is refused
//! (closed) while the daemon keeps serving.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rqemu_e2e::daemon::{process_tree, Daemon};
use rqemu_e2e::paths::project_binary;
use rqemu_protocol::{ForwardedDevice, GrantPolicy, Space};

const START: Duration = Duration::from_secs(20);

fn bin(name: &str) -> PathBuf {
    project_binary(name).unwrap_or_else(|e| panic!("{name} is not built: {e}"))
}

fn spawn(name: &str, dir: &Path, extra: &[&str]) -> Daemon {
    let sock = dir.join(format!("{name}.sock"));
    let log = dir.join(format!("{name}.log"));
    let mut cmd = Command::new(bin(name));
    cmd.arg("--socket").arg(&sock).args(extra);
    let d = Daemon::spawn(name, cmd, &sock, &log, START).expect("daemon starts");
    // The socket answers before `enter` is done: wait for the report it logs.
    let deadline = Instant::now() + START;
    while !d.log().contains(&format!("{name}: sandbox ")) {
        assert!(Instant::now() < deadline, "no sandbox report:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    d
}

fn field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {name} in\n{status}"))
}

/// Every thread of every process of `d` is confined; returns how many threads were checked.
fn assert_confined(d: &Daemon) -> usize {
    let own_mnt = std::fs::read_link("/proc/self/ns/mnt").expect("own mnt ns");
    let mut threads = 0;
    for pid in process_tree(d.pid()) {
        let mnt = std::fs::read_link(format!("/proc/{pid}/ns/mnt")).expect("mnt ns");
        assert_ne!(
            mnt,
            own_mnt,
            "pid {pid} of {} shares the test's mount namespace",
            d.name()
        );
        for t in std::fs::read_dir(format!("/proc/{pid}/task"))
            .expect("tasks")
            .flatten()
        {
            let status = std::fs::read_to_string(t.path().join("status")).expect("status");
            let who = format!(
                "{} pid {pid} thread {:?} ({})",
                d.name(),
                t.file_name(),
                field(&status, "Name")
            );
            assert_eq!(field(&status, "Seccomp"), "2", "{who}");
            assert_eq!(field(&status, "NoNewPrivs"), "1", "{who}");
            assert_eq!(field(&status, "CapEff"), "0000000000000000", "{who}");
            threads += 1;
        }
    }
    threads
}

fn attach(sock: &Path) -> rqemu_protocol::Handle {
    let (_, h) = ForwardedDevice::connect(sock, &GrantPolicy::isa_default(1)).expect("handshake");
    h
}

#[test]
fn rtc_and_serial_serve_confined() {
    let dir = tempfile::tempdir().unwrap();
    for (name, port) in [("rqemu-rtc", 0x71u64), ("rqemu-serial", 0x3fd)] {
        let mut d = spawn(name, dir.path(), &[]);
        let h = attach(d.socket());
        let mut b = [0u8; 1];
        for _ in 0..3 {
            h.read(0, Space::Pio, port, &mut b).expect("register read");
        }
        let threads = assert_confined(&d);
        assert!(
            threads >= 3,
            "{name}: {threads} threads (control, signal, ring)"
        );
        h.read(0, Space::Pio, port, &mut b).expect("still served");
        assert!(d.is_running(), "{name} died:\n{}", d.log());
        let log = d.log();
        assert!(
            log.contains("seccomp kill") && log.contains("caps 0x0"),
            "{log}"
        );
        d.kill().unwrap();
    }
}

#[test]
fn blk_serves_a_driver_confined() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.raw");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let mut d = spawn(
        "rqemu-blk",
        dir.path(),
        &["--image", img.to_str().unwrap(), "--format", "raw"],
    );
    let out = Command::new(bin("rqemu-bench"))
        .args(["blk", "--socket"])
        .arg(d.socket())
        .args(["--rw", "mixed", "--runtime", "1", "--verify"])
        .output()
        .expect("rqemu-bench runs");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.log()
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(" 0 errors, 0 verify failures"), "{text}");
    // Queue workers exist only while a frontend is attached: check during a second run.
    let mut bench = Command::new(bin("rqemu-bench"))
        .args(["blk", "--socket"])
        .arg(d.socket())
        .args(["--rw", "randread", "--runtime", "3"])
        .spawn()
        .expect("rqemu-bench runs");
    std::thread::sleep(Duration::from_secs(1));
    let threads = assert_confined(&d);
    assert!(
        threads >= 3,
        "{threads} threads (control, signal, vring worker)"
    );
    assert!(bench.wait().unwrap().success());
    assert!(d.is_running(), "rqemu-blk died:\n{}", d.log());
    d.kill().unwrap();
}

#[test]
fn the_socket_is_owner_only_and_other_uids_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut d = spawn("rqemu-rtc", dir.path(), &[]);
    let mode = std::fs::metadata(d.socket()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");
    // Open it up on purpose to reach the peer check behind the mode.
    std::fs::set_permissions(d.socket(), std::fs::Permissions::from_mode(0o666)).unwrap();
    let sock = std::ffi::CString::new(d.socket().to_str().unwrap()).unwrap();
    // SAFETY: the child only calls async-signal-safe functions before _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: plain syscalls in the forked child.
        unsafe {
            if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                libc::_exit(10);
            }
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0);
            let mut sa: libc::sockaddr_un = std::mem::zeroed();
            sa.sun_family = libc::AF_UNIX as libc::sa_family_t;
            for (i, b) in sock.as_bytes().iter().enumerate() {
                sa.sun_path[i] = *b as libc::c_char;
            }
            let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
            if libc::connect(fd, std::ptr::addr_of!(sa).cast(), len) != 0 {
                libc::_exit(11);
            }
            // The daemon sends its hello to peers it serves; a refused one just sees EOF.
            let mut buf = [0u8; 4096];
            let n = libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0);
            libc::_exit(if n == 0 { 0 } else { 12 });
        }
    }
    let mut status = 0;
    // SAFETY: waiting for our child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(libc::WIFEXITED(status), "child status {status:#x}");
    assert_eq!(
        libc::WEXITSTATUS(status),
        0,
        "10: setuid, 11: connect, 12: served"
    );
    let deadline = Instant::now() + START;
    while !d.log().contains("refused a connection from uid 65534") {
        assert!(Instant::now() < deadline, "no refusal logged:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    // The daemon goes on serving its own uid.
    let h = attach(d.socket());
    let mut b = [0u8; 1];
    h.read(0, Space::Pio, 0x71, &mut b)
        .expect("served after a refusal");
    assert!(d.is_running());
    // Killing the daemon (the pid-namespace parent) outright takes the confined child along.
    let tree = process_tree(d.pid());
    assert!(tree.len() >= 2, "no pid-namespace child: {tree:?}");
    d.kill().unwrap();
    let deadline = Instant::now() + START;
    for pid in &tree[1..] {
        while std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|st| !st.contains(") Z "))
        {
            assert!(
                Instant::now() < deadline,
                "pid {pid} outlived the killed daemon"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn net_serves_a_frontend_confined() {
    use rqemu_e2e::net::{spawn_daemon, NetDaemonOptions, NetNs};
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("net.sock");
    for opts in [
        NetDaemonOptions::default(),
        NetDaemonOptions {
            queues: 2,
            inherit_tap: true,
            ..NetDaemonOptions::default()
        },
    ] {
        // A fresh namespace (and tap) each time: the killed daemon's tap goes with its fds.
        let ns = NetNs::create().expect("a network namespace for the tap (needs root)");
        let mut d = spawn_daemon(&ns, dir.path(), &sock, &opts).expect("rqemu-net starts");
        let deadline = Instant::now() + START;
        while !d.log().contains("rqemu-net: sandbox ") {
            assert!(Instant::now() < deadline, "no sandbox report:\n{}", d.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        // A vhost-user frontend's first request, through the relay to the vhost handler:
        // VHOST_USER_GET_FEATURES (1), version 1, no payload; the reply carries a u64.
        let mut front = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        front
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        for _ in 0..2 {
            let mut req = Vec::new();
            for w in [1u32, 1, 0] {
                req.extend_from_slice(&w.to_le_bytes());
            }
            front.write_all(&req).unwrap();
            let mut reply = [0u8; 20];
            front
                .read_exact(&mut reply)
                .unwrap_or_else(|e| panic!("no GET_FEATURES reply ({e}):\n{}", d.log()));
            assert_eq!(&reply[..4], &1u32.to_le_bytes(), "request echoed");
            let features = u64::from_le_bytes(reply[12..20].try_into().unwrap());
            assert_ne!(features & (1 << 32), 0, "VIRTIO_F_VERSION_1 offered");
        }
        let threads = assert_confined(&d);
        assert!(
            threads >= 4,
            "{threads} threads (control, signal, relay x2)"
        );
        assert!(d.is_running(), "rqemu-net died:\n{}", d.log());
        drop(front);
        d.kill().unwrap();
        let _ = std::fs::remove_file(&sock);
    }
}
