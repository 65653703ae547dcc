//! `rqemu-run` with a network namespace in the spec, as an engine's network sets one up: the
//! test makes the container's namespace (a veth end `eth0` with an address, an MTU of 1400 and
//! a default route) and a peer namespace (the other end, plus an address on its loopback that
//! only the route reaches) with a busybox `httpd` in it. The container's process, in the
//! microVM, prints its `eth0`'s MTU and MAC (those of the namespace's `eth0`) and fetches a
//! token and a 768 KiB file from the peer through the default route (sizes, offloads and
//! checksums on the tap ↔ veth redirect), and the token again through a gateway reached by an
//! on-link route; the bytes are compared with the files'.
//!
//! While the container exists its namespace holds `tap0_rq` and an `ingress` qdisc on `eth0`,
//! and a second container in that namespace is refused (without touching the first's); once
//! it stopped only `eth0` is left, with its address (the monitor removed them at its end).
//! A second container's monitor is SIGKILLed: the qdisc is left behind until `delete` removes
//! it from the record in the state directory. A namespace with only `lo` gives the guest only
//! `lo` (as without a namespace: `--network none`).
//!
//! Networking happens only in namespaces the test creates (removed at its end). Needs root,
//! iproute2 (`ip`, `tc`), busybox-static, scripts/guest-assets.sh (the agent initramfs) and
//! `cargo build -p rqemu-run -p rqemu-vmm -p rqemu-fs -p rqemu-vsock -p rqemu-net`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rqemu_e2e::oci::{
    agent_assets, assert_nothing_left, json_field, make_rootfs, output_within, require_tool, RunCli,
};
use rqemu_e2e::paths::project_binary;

/// A container's boot on the software CPU takes 15-30 s (more on a loaded machine).
const LIMIT: Duration = Duration::from_secs(300);
const TOOLS: &str = "run scripts/install-deps.sh (iproute2)";

/// A network namespace of the test's, deleted on drop.
struct Netns(String);

impl Netns {
    fn new(name: String) -> Self {
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        sh(&["ip", "netns", "add", &name]);
        Netns(name)
    }
    fn path(&self) -> String {
        format!("/run/netns/{}", self.0)
    }
    /// `ip -n NS args...`, which must succeed; its stdout.
    fn ip(&self, args: &[&str]) -> String {
        let mut v = vec!["ip", "-n", &self.0];
        v.extend_from_slice(args);
        sh(&v)
    }
    fn tc(&self, args: &[&str]) -> String {
        let mut v = vec!["tc", "-n", &self.0];
        v.extend_from_slice(args);
        sh(&v)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// Runs a command that must succeed; its stdout.
fn sh(args: &[&str]) -> String {
    let out = output_within(
        Command::new(args[0]).args(&args[1..]),
        Duration::from_secs(30),
    );
    assert!(
        out.status.success(),
        "{args:?}: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A child killed on drop.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Cli {
    cli: RunCli,
    dir: PathBuf,
}

impl std::ops::Deref for Cli {
    type Target = RunCli;
    fn deref(&self) -> &RunCli {
        &self.cli
    }
}

impl Cli {
    /// rqemu-run `args`; its stdio (the container's, for `create`) goes to `<name>.stdout` /
    /// `.stderr` in the test's directory.
    fn run(&self, name: &str, args: &[&str]) -> Output {
        self.cli.run(&[], args, &self.dir.join(name), LIMIT)
    }

    fn ok(&self, name: &str, args: &[&str]) -> String {
        self.expect_ok(args, self.run(name, args))
    }

    fn status(&self, id: &str) -> String {
        json_field(&self.ok("state", &["state", id]), "status")
    }

    fn wait_stopped(&self, id: &str) {
        let deadline = Instant::now() + LIMIT;
        while self.status(id) != "stopped" {
            assert!(
                Instant::now() < deadline,
                "{id} still running after {LIMIT:?}; its state dir: {}",
                self.state_logs(id)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The logs of a container's state directory (for failure messages).
    fn state_logs(&self, id: &str) -> String {
        let mut s = String::new();
        for e in std::fs::read_dir(self.root.join(id))
            .into_iter()
            .flatten()
            .flatten()
        {
            if e.path().extension().is_some_and(|x| x == "log") {
                s += &format!(
                    "\n--- {}:\n{}",
                    e.path().display(),
                    std::fs::read_to_string(e.path()).unwrap_or_default()
                );
            }
        }
        s
    }
}

/// A bundle in `dir` running `script` with `sh -c`, in the network namespace `netns`.
fn bundle(dir: &Path, netns: &str, script: &str) -> PathBuf {
    let b = dir.join("bundle");
    if !b.join("rootfs").exists() {
        make_rootfs(&b.join("rootfs"));
    }
    let config = format!(
        r#"{{"ociVersion": "1.0.2",
        "process": {{"user": {{"uid": 0, "gid": 0}}, "args": ["/bin/sh", "-c", {script}],
                    "env": ["PATH=/bin"], "cwd": "/"}},
        "root": {{"path": "rootfs"}}, "hostname": "net",
        "mounts": [{{"destination": "/proc", "type": "proc", "source": "proc"}},
                   {{"destination": "/sys", "type": "sysfs", "source": "sysfs"}}],
        "linux": {{"namespaces": [{{"type": "mount"}}, {{"type": "pid"}},
                                 {{"type": "network", "path": {netns}}}]}}}}"#,
        script = json_str(script),
        netns = json_str(netns),
    );
    std::fs::write(b.join("config.json"), config).unwrap();
    b
}

fn json_str(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// The names of a namespace's links.
fn links(ns: &Netns) -> Vec<String> {
    ns.ip(&["-o", "link", "show"])
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .collect()
}

fn setup() -> (Cli, tempfile::TempDir) {
    require_tool("ip", TOOLS);
    require_tool("tc", TOOLS);
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "network namespaces and taps need root");
    project_binary("rqemu-net").unwrap_or_else(|e| panic!("{e}"));
    let assets = agent_assets();
    let dir = tempfile::tempdir().unwrap();
    let cli = Cli {
        cli: RunCli {
            root: dir.path().join("root"),
            log: dir.path().join("log.json"),
            guest_dir: assets.dir.clone(),
        },
        dir: dir.path().to_path_buf(),
    };
    (cli, dir)
}

#[test]
fn container_reaches_a_peer_through_its_namespace_interface() {
    let (cli, dir) = setup();
    let id = std::process::id();
    let cns = Netns::new(format!("rqnet{id}c"));
    let pns = Netns::new(format!("rqnet{id}p"));
    cns.ip(&[
        "link", "add", "name", "eth0", "mtu", "1400", "type", "veth", "peer", "name", "peer0",
        "mtu", "1400", "netns", &pns.0,
    ]);
    cns.ip(&["addr", "add", "10.77.0.2/24", "dev", "eth0"]);
    cns.ip(&["link", "set", "eth0", "up"]);
    cns.ip(&["route", "add", "default", "via", "10.77.0.1"]);
    // A gateway outside the subnet, reached through an on-link route (as Calico does it),
    // listed after the route that uses it.
    cns.ip(&[
        "route",
        "add",
        "169.254.1.1",
        "dev",
        "eth0",
        "scope",
        "link",
    ]);
    cns.ip(&["route", "add", "10.79.0.1", "via", "169.254.1.1"]);
    pns.ip(&["addr", "add", "10.77.0.1/24", "dev", "peer0"]);
    pns.ip(&["link", "set", "peer0", "up"]);
    pns.ip(&["link", "set", "lo", "up"]);
    // Reachable from the container only through its default route.
    pns.ip(&["addr", "add", "10.78.0.1/32", "dev", "lo"]);
    pns.ip(&["addr", "add", "10.79.0.1/32", "dev", "lo"]);
    pns.ip(&["addr", "add", "169.254.1.1/32", "dev", "peer0"]);
    let mac = cns
        .ip(&["-o", "link", "show", "eth0"])
        .split("link/ether ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("no MAC for eth0"))
        .to_string();

    // The files the guest fetches: a token and pseudo-random bytes, both new each run.
    let www = dir.path().join("www");
    std::fs::create_dir(&www).unwrap();
    let token = format!(
        "token-{id}-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    std::fs::write(www.join("token"), &token).unwrap();
    let mut x = u64::from(id) | 1;
    let blob: Vec<u8> = (0..768 * 1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(www.join("blob"), &blob).unwrap();
    let blob_md5 = sh(&["busybox", "md5sum", www.join("blob").to_str().unwrap()])
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let _httpd = Server(
        Command::new("ip")
            .args([
                "netns", "exec", &pns.0, "busybox", "httpd", "-f", "-p", "8080", "-h",
            ])
            .arg(&www)
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );

    let script = "cat /sys/class/net/eth0/mtu /sys/class/net/eth0/address; \
                  ls /sys/class/net | tr '\\n' ' '; echo; \
                  wget -q -O - http://10.78.0.1:8080/token; echo; \
                  wget -q -O - http://10.78.0.1:8080/blob | md5sum; \
                  wget -q -O - http://10.79.0.1:8080/token; echo";
    let b = bundle(dir.path(), &cns.path(), script);
    let b = b.to_str().unwrap();
    cli.ok("c1", &["create", "--bundle", b, "c1"]);
    // While it exists: the tap beside eth0, both redirected.
    assert_eq!(links(&cns), ["lo", "eth0", "tap0_rq"]);
    for dev in ["eth0", "tap0_rq"] {
        let q = cns.tc(&["qdisc", "show", "dev", dev, "ingress"]);
        assert!(q.contains("ingress"), "no ingress qdisc on {dev}: {q}");
        let f = cns.tc(&["filter", "show", "dev", dev, "ingress"]);
        assert!(f.contains("mirred"), "no redirect on {dev}: {f}");
    }
    // One VM per namespace: a second container there is refused, the first's tap and
    // redirects stay.
    let out = cli.run("c1b", &["create", "--bundle", b, "c1b"]);
    let log = std::fs::read_to_string(&cli.log).unwrap_or_default();
    assert!(
        !out.status.success() && log.contains("tap tap0_rq is in use"),
        "a second container in the namespace: {out:?}\nlog: {log}"
    );
    assert!(!cli.root.join("c1b").exists());
    assert_eq!(links(&cns), ["lo", "eth0", "tap0_rq"]);
    assert!(cns
        .tc(&["filter", "show", "dev", "eth0", "ingress"])
        .contains("mirred"));
    cli.ok("start", &["start", "c1"]);
    cli.wait_stopped("c1");
    let out = std::fs::read_to_string(dir.path().join("c1.stdout")).unwrap();
    let lines: Vec<&str> = out.lines().map(str::trim).collect();
    let want = [
        "1400",
        &mac,
        "eth0 lo",
        &token,
        &format!("{blob_md5}  -"),
        &token,
    ];
    assert_eq!(
        lines,
        want,
        "the container's output (stderr: {}){}",
        std::fs::read_to_string(dir.path().join("c1.stderr")).unwrap_or_default(),
        cli.state_logs("c1")
    );
    // The monitor removed its tap and redirects when the container stopped (not `delete`).
    assert_eq!(links(&cns), ["lo", "eth0"], "the tap outlived the VM");
    assert!(
        !cns.tc(&["qdisc", "show", "dev", "eth0"])
            .contains("ingress"),
        "the monitor left the ingress qdisc behind"
    );
    assert!(!cli.root.join("c1/network.json").exists());
    println!("the container printed:\n{out}");
    let net_log = std::fs::read_to_string(cli.root.join("c1/rqemu-net-0.log")).unwrap();
    println!("rqemu-net's log:\n{net_log}");
    assert!(
        net_log.contains("tap tap0_rq") && net_log.contains("mtu 1400"),
        "rqemu-net did not serve the namespace's tap with its MTU: {net_log}"
    );
    // Handed a tap fd, rqemu-net still confines itself (no capability left).
    assert!(
        net_log.contains("rqemu-net: sandbox") && net_log.contains("caps 0x0"),
        "{net_log}"
    );
    cli.ok("delete", &["delete", "c1"]);
    assert_eq!(
        links(&cns),
        ["lo", "eth0"],
        "the tap outlived the container"
    );
    assert!(
        !cns.tc(&["qdisc", "show", "dev", "eth0"])
            .contains("ingress"),
        "the ingress qdisc outlived the container"
    );
    assert!(cns
        .ip(&["-o", "-4", "addr", "show", "dev", "eth0"])
        .contains("10.77.0.2/24"));

    // A SIGKILLed monitor: `delete` removes what it left in the namespace.
    let pidfile = dir.path().join("c2.pid");
    cli.ok(
        "c2",
        &[
            "create",
            "--bundle",
            b,
            "--pid-file",
            pidfile.to_str().unwrap(),
            "c2",
        ],
    );
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: kill(2) on the monitor whose pid rqemu-run just reported.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    cli.wait_stopped("c2");
    assert!(
        cns.tc(&["qdisc", "show", "dev", "eth0"])
            .contains("ingress"),
        "the killed monitor removed the qdisc after all: this test no longer tests delete"
    );
    cli.ok("delete", &["delete", "c2"]);
    assert_eq!(links(&cns), ["lo", "eth0"]);
    assert!(!cns
        .tc(&["qdisc", "show", "dev", "eth0"])
        .contains("ingress"));
    let root = cli.root.display().to_string();
    assert_nothing_left(&cli.root, &[&root], Duration::from_secs(10));
}

#[test]
fn a_namespace_with_only_loopback_gives_the_guest_only_loopback() {
    let (cli, dir) = setup();
    let ns = Netns::new(format!("rqnet{}l", std::process::id()));
    let b = bundle(
        dir.path(),
        &ns.path(),
        "ls /sys/class/net | tr '\\n' ' '; echo; ping -c 1 -W 5 127.0.0.1 >/dev/null && echo lo-up",
    );
    cli.ok("c1", &["create", "--bundle", b.to_str().unwrap(), "c1"]);
    assert_eq!(links(&ns), ["lo"]);
    cli.ok("start", &["start", "c1"]);
    cli.wait_stopped("c1");
    let out = std::fs::read_to_string(dir.path().join("c1.stdout")).unwrap();
    let lines: Vec<&str> = out.lines().map(str::trim).collect();
    assert_eq!(
        lines,
        ["lo", "lo-up"],
        "stderr: {}{}",
        std::fs::read_to_string(dir.path().join("c1.stderr")).unwrap_or_default(),
        cli.state_logs("c1")
    );
    cli.ok("delete", &["delete", "c1"]);
    assert!(
        !cli.root.join("c1").exists(),
        "the state directory outlived delete"
    );
}
