//! podman driving `rqemu-run` (`--runtime`): each container a microVM (rqemu-vmm on the
//! software CPU, the rootfs and podman's directory binds served by rqemu-fs, the agent's
//! control channel through rqemu-vsock).
//!
//! * `podman run --rm -i -v DIR:/data --rootfs DIR`: output reaches podman, stdin reaches the
//!   process, `uname -r` is the guest kernel's, a write lands in the host rootfs and another in
//!   the bind-mounted directory, the exit code is podman's;
//! * `podman run -t --read-only`: the process has a terminal, the root is read-only;
//! * two containers at once (`run -d`), one ended by `podman kill` (137), the other by
//!   `podman stop` (SIGTERM forwarded to the guest process: 143);
//! * `--network bridge`: the guest takes over the veth's address and route and reaches a
//!   server on the host at the bridge's gateway; a server in the guest answers the host at the
//!   container's address and through a published port (`-p`);
//! * after each: no process mentions the container, rqemu-run's `--root` is empty.
//!
//! podman runs with a private root/runroot/tmpdir under a temporary directory (the machine's
//! podman state is not touched) and `--cgroup-manager=cgroupfs`; rqemu-run's own `--root` is
//! fixed by a wrapper script (podman's exit command does not pass `--runtime-flag`s), the
//! accelerator and guest-assets directory go as `--runtime-flag`s.
//!
//! Needs podman + conmon (scripts/install-deps.sh), scripts/guest-assets.sh (the agent
//! initramfs), `cargo build -p rqemu-run -p rqemu-vmm -p rqemu-fs -p rqemu-vsock -p rqemu-net`.
//! Root only.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use rqemu_e2e::oci::{
    agent_assets, assert_nothing_left, guest_kernel_release, host_kernel_release, make_rootfs,
    output_with_input, output_within, processes_with, require_tool, runtime_wrapper,
};

/// One container's boot on the software CPU takes 15-30 s; several may run at once.
const LIMIT: Duration = Duration::from_secs(600);

struct Podman {
    dir: tempfile::TempDir,
    runtime: PathBuf,
    rroot: PathBuf,
    guest_dir: PathBuf,
}

impl Podman {
    fn new() -> Self {
        let how = "run scripts/install-deps.sh (podman, conmon, runc, containerd)";
        require_tool("podman", how);
        require_tool("conmon", how);
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(euid, 0, "these tests drive podman as root");
        let assets = agent_assets();
        let dir = tempfile::tempdir().unwrap();
        let rroot = dir.path().join("rqemu-run");
        let runtime = runtime_wrapper(dir.path(), &rroot, &[]);
        Self {
            runtime,
            rroot,
            guest_dir: assets.dir.clone(),
            dir,
        }
    }

    fn podman(&self) -> Command {
        let d = self.dir.path();
        let mut c = Command::new("podman");
        c.arg("--root")
            .arg(d.join("storage"))
            .arg("--runroot")
            .arg(d.join("runroot"))
            .arg("--tmpdir")
            .arg(d.join("tmp"))
            .arg("--runtime")
            .arg(&self.runtime)
            .args(["--runtime-flag", "accel=tcg"])
            .arg("--runtime-flag")
            .arg(format!("guest-dir={}", self.guest_dir.display()))
            .args([
                "--cgroup-manager=cgroupfs",
                "--events-backend=file",
                "--storage-driver=vfs",
            ]);
        c
    }

    /// `podman run` with the flags of every run here, then `args`.
    fn run(&self, args: &[&str]) -> Output {
        self.run_with_input(args, None)
    }

    fn run_with_input(&self, args: &[&str], input: Option<&[u8]>) -> Output {
        let mut c = self.podman();
        c.args([
            "run",
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
            "--network",
            "none",
        ])
        .args(args);
        output_with_input(&mut c, input, LIMIT)
    }

    fn cmd(&self, args: &[&str]) -> Output {
        let mut c = self.podman();
        c.args(args);
        output_within(&mut c, LIMIT)
    }

    fn rootfs(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        make_rootfs(&p);
        p
    }

    fn assert_clean(&self, ids: &[&str]) {
        let root = self.rroot.display().to_string();
        let mut needles: Vec<&str> = ids.to_vec();
        needles.push(&root);
        assert_nothing_left(&self.rroot, &needles, Duration::from_secs(30));
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn report(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    )
}

fn cid(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .to_string()
}

#[test]
fn podman_run_reaches_the_guest_and_returns_its_exit_code() {
    let p = Podman::new();
    let rootfs = p.rootfs("rootfs");
    let cidfile = p.dir.path().join("cid");
    let data = p.dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let volume = format!("{}:/data", data.display());
    let t = Instant::now();
    let out = p.run_with_input(
        &[
            "--rm",
            "-i",
            "--cidfile",
            cidfile.to_str().unwrap(),
            "-v",
            &volume,
            "--rootfs",
            rootfs.to_str().unwrap(),
            "/bin/sh",
            "-c",
            "echo out; echo err >&2; echo kernel=$(uname -r); echo from-guest > /written; \
             echo in=$(cat); echo bound > /data/file; exit 7",
        ],
        Some(b"from-host-stdin"),
    );
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(7), "{}", report(&out));
    assert!(stdout.contains("out\n"), "{}", report(&out));
    assert!(text(&out.stderr).contains("err"), "{}", report(&out));
    let guest = guest_kernel_release(&agent_assets());
    let host = host_kernel_release();
    assert_ne!(
        guest, host,
        "guest and host kernels must differ for this check"
    );
    assert!(
        stdout.contains(&format!("kernel={guest}\n")),
        "uname -r is not the guest's {guest} (host {host}): {}",
        report(&out)
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("written"))
            .ok()
            .as_deref(),
        Some("from-guest\n"),
        "{}",
        report(&out)
    );
    assert!(stdout.contains("in=from-host-stdin\n"), "{}", report(&out));
    assert_eq!(
        std::fs::read_to_string(data.join("file")).ok().as_deref(),
        Some("bound\n"),
        "a directory bind mount (-v) is another rqemu-fs share: {}",
        report(&out)
    );
    eprintln!(
        "podman run (boot + run + power-off): {:.1} s",
        t.elapsed().as_secs_f64()
    );
    p.assert_clean(&[&cid(&cidfile)]);
}

#[test]
fn podman_run_t_gives_a_terminal() {
    let p = Podman::new();
    let rootfs = p.rootfs("rootfs");
    let cidfile = p.dir.path().join("cid");
    let out = p.run(&[
        "--rm",
        "-t",
        "--read-only",
        "--cidfile",
        cidfile.to_str().unwrap(),
        "--rootfs",
        rootfs.to_str().unwrap(),
        "/bin/sh",
        "-c",
        "test -t 0 && test -t 1 && echo is-a-tty; echo tty=$(tty); \
         touch /ro-test 2>/dev/null || echo root-is-read-only",
    ]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", report(&out));
    assert!(stdout.contains("is-a-tty"), "{}", report(&out));
    assert!(stdout.contains("tty=/dev/pts/"), "{}", report(&out));
    // The terminal's line discipline (the guest's) turns \n into \r\n.
    assert!(stdout.contains("is-a-tty\r\n"), "{}", report(&out));
    // --read-only: root.readonly, served by `rqemu-fs --readonly`.
    assert!(stdout.contains("root-is-read-only"), "{}", report(&out));
    assert!(!rootfs.join("ro-test").exists());
    p.assert_clean(&[&cid(&cidfile)]);
}

#[test]
fn podman_two_containers_at_once_ended_by_kill_and_stop() {
    let p = Podman::new();
    let mut ids = Vec::new();
    let mut roots = Vec::new();
    for name in ["a", "b"] {
        let rootfs = p.rootfs(&format!("rootfs-{name}"));
        let out = p.run(&[
            "-d",
            "--name",
            name,
            "--rootfs",
            rootfs.to_str().unwrap(),
            "/bin/sh",
            "-c",
            "echo up > /up; exec sleep 1000",
        ]);
        assert_eq!(out.status.code(), Some(0), "{}", report(&out));
        ids.push(text(&out.stdout).trim().to_string());
        roots.push(rootfs);
    }
    // Both processes run (each wrote its file from its own VM) while two VMMs exist.
    let deadline = Instant::now() + LIMIT;
    while !roots.iter().all(|r| r.join("up").exists()) {
        assert!(
            Instant::now() < deadline,
            "the containers did not both start"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let vmms = processes_with(&p.rroot.display().to_string())
        .into_iter()
        .filter(|(_, c)| c.contains("rqemu-vmm"))
        .count();
    assert_eq!(vmms, 2, "two VMMs expected");
    for name in ["a", "b"] {
        let out = p.cmd(&["inspect", "-f", "{{.State.Status}}", name]);
        assert_eq!(text(&out.stdout).trim(), "running", "{}", report(&out));
    }

    // Where their sockets are (the state directory's path is too long for a socket address
    // here: a private directory under the temporary directory): gone after `rm` too.
    let sock_dirs: Vec<PathBuf> = ids
        .iter()
        .map(|id| {
            let state = std::fs::read_to_string(p.rroot.join(id).join("state.json")).unwrap();
            let line = state
                .lines()
                .find_map(|l| l.trim().strip_prefix("\"sock_dir\": \""))
                .unwrap_or_else(|| panic!("no sock_dir in {state}"));
            PathBuf::from(line.trim_end_matches(',').trim_end_matches('"'))
        })
        .collect();
    for d in &sock_dirs {
        assert!(d.join("start.sock").exists(), "{}", d.display());
    }

    let out = p.cmd(&["kill", "a"]);
    assert!(out.status.success(), "{}", report(&out));
    let out = p.cmd(&["wait", "a"]);
    assert_eq!(
        text(&out.stdout).trim(),
        "137",
        "podman kill: {}",
        report(&out)
    );

    let out = p.cmd(&["stop", "-t", "120", "b"]);
    assert!(out.status.success(), "{}", report(&out));
    let out = p.cmd(&["wait", "b"]);
    assert_eq!(
        text(&out.stdout).trim(),
        "143",
        "podman stop: SIGTERM should reach the guest process: {}",
        report(&out)
    );
    let out = p.cmd(&["rm", "a", "b"]);
    assert!(out.status.success(), "{}", report(&out));
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    p.assert_clean(&ids);
    for d in &sock_dirs {
        assert!(!d.exists(), "socket directory {} left behind", d.display());
    }
}

/// `podman run --network bridge` (the engine's default network: a veth into the host's
/// bridge, the network namespace named in the spec): the guest gets the interface's address
/// and default route and fetches a token from a server the test runs on the host, at the
/// bridge's gateway (the default route's `via`). The server answers once, on a port of the
/// kernel's choosing.
#[test]
fn podman_bridge_network_reaches_the_host() {
    use std::io::{Read, Write};
    let p = Podman::new();
    let rootfs = p.rootfs("rootfs");
    let cidfile = p.dir.path().join("cid");
    let listener = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let token = format!("bridge-token-{}-{port}", std::process::id());
    let server = {
        let token = token.clone();
        std::thread::spawn(move || -> std::io::Result<String> {
            let (mut s, peer) = listener.accept()?;
            let mut req = [0u8; 1024];
            let _ = s.read(&mut req)?;
            write!(
                s,
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{token}",
                token.len()
            )?;
            Ok(peer.to_string())
        })
    };
    let script = format!(
        "ip -4 -o addr show dev eth0; \
         gw=$(ip route | awk '/^default/ {{print $3}}'); echo gw=$gw; \
         wget -q -O - http://$gw:{port}/; echo"
    );
    let mut c = p.podman();
    c.args([
        "run",
        "--rm",
        "--network",
        "bridge",
        "--cidfile",
        cidfile.to_str().unwrap(),
        "--rootfs",
        rootfs.to_str().unwrap(),
        "/bin/sh",
        "-c",
        &script,
    ]);
    let out = output_within(&mut c, LIMIT);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", report(&out));
    assert!(
        stdout.lines().any(|l| l == token),
        "the token did not come back: {}",
        report(&out)
    );
    let peer = server.join().unwrap().unwrap();
    println!("{stdout}served the guest at {peer}");
    // The guest speaks with the address the engine gave the container (no NAT in between).
    let ip = peer.split(':').next().unwrap_or_default();
    assert!(
        stdout.contains(&format!("inet {ip}/")),
        "the server saw {peer}, not the container's address: {}",
        report(&out)
    );
    p.assert_clean(&[&cid(&cidfile)]);
}

/// The other way: a server in the guest (`podman run -d -p`) answers the host, at the
/// container's address on podman's bridge and through the published port (podman's DNAT to
/// that address) at the bridge's gateway address.
#[test]
fn podman_bridge_network_serves_the_host() {
    let p = Podman::new();
    let rootfs = p.rootfs("rootfs");
    // A port that was free a moment ago, for the published one.
    let port = std::net::TcpListener::bind("0.0.0.0:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let token = format!("guest-web-{}-{port}", std::process::id());
    let publish = format!("{port}:8080");
    let script = format!("mkdir /tmp/w; echo {token} > /tmp/w/t; exec httpd -f -p 8080 -h /tmp/w");
    let out = p.cmd(&[
        "run",
        "-d",
        "--name",
        "web",
        "--network",
        "bridge",
        "-p",
        &publish,
        "--rootfs",
        rootfs.to_str().unwrap(),
        "/bin/sh",
        "-c",
        &script,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", report(&out));
    let id = text(&out.stdout).trim().to_string();
    let out = p.cmd(&["inspect", "-f", "{{.NetworkSettings.IPAddress}}", "web"]);
    let ip = text(&out.stdout).trim().to_string();
    let out = p.cmd(&["inspect", "-f", "{{.NetworkSettings.Gateway}}", "web"]);
    let gateway = text(&out.stdout).trim().to_string();
    assert!(!ip.is_empty() && !gateway.is_empty(), "{}", report(&out));
    let fetch = |url: &str| {
        output_within(
            Command::new("busybox").args(["wget", "-q", "-O", "-", url]),
            Duration::from_secs(30),
        )
    };
    // The guest boots, then httpd listens.
    let direct = format!("http://{ip}:8080/t");
    let deadline = Instant::now() + LIMIT;
    let mut got = fetch(&direct);
    while !got.status.success() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        got = fetch(&direct);
    }
    assert_eq!(
        text(&got.stdout).trim(),
        token,
        "{direct}: {}",
        report(&got)
    );
    let published = format!("http://{gateway}:{port}/t");
    let got = fetch(&published);
    assert_eq!(
        text(&got.stdout).trim(),
        token,
        "{published}: {}",
        report(&got)
    );
    println!("served {token} at {direct} and {published}");
    let out = p.cmd(&["rm", "-f", "web"]);
    assert!(out.status.success(), "{}", report(&out));
    p.assert_clean(&[&id]);
}
