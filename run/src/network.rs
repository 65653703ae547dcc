//! The container's network: when the spec names a network namespace (podman
//! `--network ns:PATH`, CNI/netavark networks, a CRI sandbox), each interface of that
//! namespace that is up with an IPv4 address (typically the engine's veth `eth0`) is carried
//! into the guest as Kata Containers does it ("tc-redirect"): a tap is created beside it in the
//! namespace, and two tc `u32` filters under `ingress` qdiscs redirect every frame arriving on
//! one to the other's egress. The tap's fd goes to an `rqemu-net --tap-fd` daemon; the guest's
//! virtio-net NIC gets the interface's MAC, addresses, MTU and routes (the agent sets them), so
//! the peer sees the very frames it would see from a process in the namespace.
//!
//! Everything done inside the namespace runs on a short-lived thread that entered it with
//! setns(2) (network namespaces are per thread): the monitor's main thread never leaves its
//! own. Reading the namespace and the tc set-up go through iproute2 (`ip -j`, `tc`) started
//! from that thread, so they run in the namespace too. iproute2 rather than hand-written
//! netlink: tc filter and mirred action attributes are deep nested netlink structures whose
//! encoding iproute2 owns, the JSON output of `ip -j` is stable, and every host that runs CNI or
//! netavark has iproute2. The tap itself is opened with `TUNSETIFF` on that thread.
//!
//! What was added is recorded (`network.json` in the state directory) so that the monitor's end
//! and `delete --force` (after a SIGKILLed monitor) both remove it: the taps and the ingress
//! qdiscs added on the engine's interfaces (with their filters); the interfaces are the
//! engine's and stay.

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;

use rqemu_agent_protocol::{Ipv4Cidr, Ipv4Route, NetInterface};
use serde::{Deserialize, Serialize};

/// Name of the state-directory file recording what was added to the namespace.
pub const RECORD: &str = "network.json";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("network namespace {path}: {source}")]
    Netns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{cmd}` in {netns}: {why}")]
    Command {
        cmd: String,
        netns: PathBuf,
        why: String,
    },
    #[error("`{cmd}` printed JSON this code cannot read: {source}")]
    Json {
        cmd: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("interface {iface}: {why}")]
    Interface { iface: String, why: String },
    #[error("tap {name}: {what}: {source}")]
    Tap {
        name: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "tap {tap} is in use in {netns}: another container's VM serves this network namespace \
         (one VM per namespace)"
    )]
    InUse { netns: PathBuf, tap: String },
    #[error("the thread working in the network namespace panicked")]
    Thread,
}

/// One interface carried into the guest: the engine's interface and the tap beside it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    pub iface: String,
    pub tap: String,
}

/// What was added to a namespace (`network.json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub netns: PathBuf,
    pub links: Vec<Link>,
}

/// One interface ready for the VM: the description for the agent and the tap's fd for
/// `rqemu-net --tap-fd`.
#[derive(Debug)]
pub struct Nic {
    pub interface: NetInterface,
    pub tap: OwnedFd,
}

/// Runs `f` on a thread that entered the network namespace at `netns`.
fn in_netns<T: Send>(
    netns: &Path,
    f: impl FnOnce() -> Result<T, Error> + Send,
) -> Result<T, Error> {
    let ns = File::open(netns).map_err(|source| Error::Netns {
        path: netns.to_path_buf(),
        source,
    })?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on an open namespace fd; it moves only this thread, which ends
            // when `f` returns.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(Error::Netns {
                    path: netns.to_path_buf(),
                    source: std::io::Error::last_os_error(),
                });
            }
            f()
        })
        .join()
        .map_err(|_| Error::Thread)?
    })
}

/// An iproute2 program: from `PATH`, else `/usr/sbin` or `/sbin` (an engine may start the
/// runtime with a `PATH` without the sbin directories).
fn tool(prog: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(prog))
}

/// Runs an iproute2 command (in the calling thread's namespace) and returns its stdout.
fn run(netns: &Path, prog: &str, args: &[&str]) -> Result<String, Error> {
    let cmd = format!("{prog} {}", args.join(" "));
    let out = Command::new(tool(prog))
        .args(args)
        .output()
        .map_err(|e| Error::Command {
            cmd: cmd.clone(),
            netns: netns.to_path_buf(),
            why: format!("{e} (iproute2's `ip` and `tc` are needed for networking)"),
        })?;
    if !out.status.success() {
        return Err(Error::Command {
            cmd,
            netns: netns.to_path_buf(),
            why: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn json<T: for<'de> Deserialize<'de>>(netns: &Path, args: &[&str]) -> Result<T, Error> {
    let text = run(netns, "ip", args)?;
    serde_json::from_str(&text).map_err(|source| Error::Json {
        cmd: format!("ip {}", args.join(" ")),
        source,
    })
}

#[derive(Debug, Deserialize)]
struct IpLink {
    ifname: String,
    #[serde(default)]
    flags: Vec<String>,
    #[serde(default)]
    mtu: u32,
    #[serde(default)]
    link_type: String,
    #[serde(default)]
    address: String,
}

#[derive(Debug, Deserialize)]
struct IpAddrs {
    ifname: String,
    #[serde(default)]
    addr_info: Vec<IpAddrInfo>,
}

#[derive(Debug, Deserialize)]
struct IpAddrInfo {
    #[serde(default)]
    family: String,
    local: Option<String>,
    #[serde(default)]
    prefixlen: u8,
}

#[derive(Debug, Deserialize)]
struct IpRoute {
    dst: String,
    gateway: Option<String>,
    dev: Option<String>,
    #[serde(default)]
    protocol: String,
    #[serde(default)]
    scope: String,
}

/// Parses a MAC address `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A route's destination as `ip -j route` prints it (`default`, `10.0.0.0/24`, `10.0.0.7`).
fn parse_dst(s: &str) -> Option<Ipv4Cidr> {
    if s == "default" {
        return Some(Ipv4Cidr {
            addr: Ipv4Addr::UNSPECIFIED,
            prefix_len: 0,
        });
    }
    let (a, p) = s.split_once('/').unwrap_or((s, "32"));
    let prefix_len: u8 = p.parse().ok().filter(|p| *p <= 32)?;
    Some(Ipv4Cidr {
        addr: a.parse().ok()?,
        prefix_len,
    })
}

/// The interfaces of the namespace to carry into the guest (read on a thread inside it).
fn read_interfaces(netns: &Path) -> Result<Vec<NetInterface>, Error> {
    let links: Vec<IpLink> = json(netns, &["-j", "link", "show"])?;
    let addrs: Vec<IpAddrs> = json(netns, &["-j", "-4", "addr", "show"])?;
    let routes: Vec<IpRoute> = json(netns, &["-j", "-4", "route", "show", "table", "main"])?;
    let mut out = Vec::new();
    for l in links {
        if l.ifname == "lo" || l.link_type != "ether" || !l.flags.iter().any(|f| f == "UP") {
            continue;
        }
        let addresses: Vec<Ipv4Cidr> = addrs
            .iter()
            .filter(|a| a.ifname == l.ifname)
            .flat_map(|a| &a.addr_info)
            .filter(|i| i.family == "inet")
            .filter_map(|i| {
                let addr = i.local.as_deref()?.parse().ok()?;
                Some(Ipv4Cidr {
                    addr,
                    prefix_len: i.prefixlen,
                })
            })
            .collect();
        if addresses.is_empty() {
            continue;
        }
        let mac = parse_mac(&l.address).ok_or_else(|| Error::Interface {
            iface: l.ifname.clone(),
            why: format!("MAC address {:?} unreadable", l.address),
        })?;
        let routes = routes
            .iter()
            .filter(|r| r.dev.as_deref() == Some(l.ifname.as_str()))
            // The subnets of the addresses: the guest's kernel adds those itself.
            .filter(|r| !(r.protocol == "kernel" && r.scope == "link" && r.gateway.is_none()))
            .filter_map(|r| {
                let gateway = match &r.gateway {
                    Some(g) => Some(g.parse().ok()?),
                    None => None,
                };
                Some(Ipv4Route {
                    destination: parse_dst(&r.dst)?,
                    gateway,
                })
            })
            .collect();
        out.push(NetInterface {
            name: l.ifname,
            mac,
            mtu: l.mtu,
            addresses,
            routes,
        });
    }
    Ok(out)
}

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
/// `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

/// Creates tap `name` in the calling thread's namespace (not persistent: it goes with its
/// last fd) with the flags `rqemu-net --tap-fd` expects.
fn open_tap(name: &str) -> Result<OwnedFd, Error> {
    let err = |what, source| Error::Tap {
        name: name.into(),
        what,
        source,
    };
    // SAFETY: open(2) on a constant NUL-terminated path.
    let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(err("open /dev/net/tun", std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just opened and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // struct ifreq: the name, then a union whose first member here is `short ifr_flags`.
    let mut req = [0u8; 40];
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(err("name", std::io::Error::from_raw_os_error(libc::EINVAL)));
    }
    req[..name.len()].copy_from_slice(name.as_bytes());
    let flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    req[16..18].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq` (40 bytes on x86-64), which `req`
    // is, alive for the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF as _, req.as_mut_ptr()) } != 0 {
        return Err(err("TUNSETIFF", std::io::Error::last_os_error()));
    }
    Ok(fd)
}

/// The MTU to give `rqemu-net --mtu` for an interface's (rqemu-net takes 1280..=65535).
pub fn device_mtu(mtu: u32) -> Option<u16> {
    u16::try_from(mtu).ok().filter(|m| *m >= 1280)
}

/// The tc commands connecting `a` and `b` both ways (each after an `ingress` qdisc on it).
fn redirect(a: &str, b: &str) -> [Vec<String>; 2] {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    [
        s(&["qdisc", "add", "dev", a, "ingress"]),
        // u32 matching every packet (`match u8 0 0`), as Kata does: matchall is a module some
        // kernels lack.
        s(&[
            "filter", "add", "dev", a, "parent", "ffff:", "protocol", "all", "u32", "match", "u8",
            "0", "0", "action", "mirred", "egress", "redirect", "dev", b,
        ]),
    ]
}

/// Sets up every interface of `netns` for the guest. `record` is called with what was added
/// so far before each change to the namespace (once the tap is ours), so that a failure (or a
/// kill) midway can be undone by [`teardown`].
pub fn setup(netns: &Path, record: &mut (dyn FnMut(&Record) + Send)) -> Result<Vec<Nic>, Error> {
    in_netns(netns, || {
        let ifaces = read_interfaces(netns)?;
        let mut rec = Record {
            netns: netns.to_path_buf(),
            links: Vec::new(),
        };
        let mut nics = Vec::new();
        for (i, iface) in ifaces.into_iter().enumerate() {
            let tap = format!("tap{i}_rq");
            // Opened before it is recorded: a tap of that name that is another container's
            // (EBUSY) must not be torn down as ours.
            let fd = open_tap(&tap).map_err(|e| match e {
                Error::Tap { source, .. } if source.raw_os_error() == Some(libc::EBUSY) => {
                    Error::InUse {
                        netns: netns.to_path_buf(),
                        tap: tap.clone(),
                    }
                }
                e => e,
            })?;
            rec.links.push(Link {
                iface: iface.name.clone(),
                tap: tap.clone(),
            });
            record(&rec);
            let mtu = iface.mtu.to_string();
            run(netns, "ip", &["link", "set", &tap, "mtu", &mtu, "up"])?;
            for cmd in redirect(&iface.name, &tap)
                .into_iter()
                .chain(redirect(&tap, &iface.name))
            {
                let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
                run(netns, "tc", &args)?;
            }
            nics.push(Nic {
                interface: iface,
                tap: fd,
            });
        }
        Ok(nics)
    })
}

/// Removes what [`setup`] added: the ingress qdiscs (their filters with them) of the engine's
/// interfaces and the taps (already gone when their last fd closed). Things already gone are
/// fine; so is a namespace that can no longer be entered (everything in it went with it).
pub fn teardown(rec: &Record) -> Result<(), Error> {
    if rec.links.is_empty() {
        return Ok(());
    }
    let r = in_netns(&rec.netns, || {
        let mut first = None;
        for l in &rec.links {
            let steps: [(&str, Vec<&str>); 2] = [
                ("tc", vec!["qdisc", "del", "dev", &l.iface, "ingress"]),
                ("ip", vec!["link", "del", &l.tap]),
            ];
            for (prog, args) in steps {
                if let Err(e) = run(&rec.netns, prog, &args) {
                    let gone = matches!(&e, Error::Command { why, .. }
                        if why.contains("Cannot find device")
                            || why.contains("Invalid handle")
                            || why.contains("No such file or directory")
                            || why.contains("Cannot delete qdisc with handle of zero")
                            || why.contains("does not exist"));
                    if !gone && first.is_none() {
                        first = Some(e);
                    }
                }
            }
        }
        first.map_or(Ok(()), Err)
    });
    match r {
        // The engine removed the namespace (its file, or the bind mount on it) first.
        Err(Error::Netns { .. }) => Ok(()),
        r => r,
    }
}

/// Reads the record of a state directory (none: nothing was set up).
pub fn load_record(path: &Path) -> Option<Record> {
    let text = std::fs::read(path).ok()?;
    serde_json::from_slice(&text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_and_destinations_parse() {
        assert_eq!(
            parse_mac("0a:58:0A:58:00:02"),
            Some([0x0a, 0x58, 0x0a, 0x58, 0, 2])
        );
        assert_eq!(parse_mac("0a:58:0a:58:00"), None);
        assert_eq!(parse_mac("0a:58:0a:58:00:02:03"), None);
        assert_eq!(parse_mac("zz:58:0a:58:00:02"), None);
        assert_eq!(format_mac(&[0x0a, 0x58, 10, 88, 0, 2]), "0a:58:0a:58:00:02");
        assert_eq!(
            parse_dst("default"),
            Some(Ipv4Cidr {
                addr: Ipv4Addr::UNSPECIFIED,
                prefix_len: 0
            })
        );
        assert_eq!(
            parse_dst("10.1.0.0/16"),
            Some(Ipv4Cidr {
                addr: [10, 1, 0, 0].into(),
                prefix_len: 16
            })
        );
        assert_eq!(
            parse_dst("10.1.0.7"),
            Some(Ipv4Cidr {
                addr: [10, 1, 0, 7].into(),
                prefix_len: 32
            })
        );
        assert_eq!(parse_dst("10.1.0.0/33"), None);
        assert_eq!(parse_dst("fe80::/64"), None);
    }

    #[test]
    fn record_round_trips_and_a_missing_one_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(RECORD);
        assert_eq!(load_record(&path), None);
        let rec = Record {
            netns: "/run/netns/n1".into(),
            links: vec![Link {
                iface: "eth0".into(),
                tap: "tap0_rq".into(),
            }],
        };
        std::fs::write(&path, serde_json::to_vec(&rec).unwrap()).unwrap();
        assert_eq!(load_record(&path), Some(rec));
        std::fs::write(&path, b"{\"netns\": 3").unwrap();
        assert_eq!(load_record(&path), None);
    }

    #[test]
    fn redirects_go_both_ways_and_mtus_fit_rqemu_net() {
        let [qdisc, filter] = redirect("eth0", "tap0_rq");
        assert_eq!(qdisc.join(" "), "qdisc add dev eth0 ingress");
        assert_eq!(
            filter.join(" "),
            "filter add dev eth0 parent ffff: protocol all u32 match u8 0 0 \
             action mirred egress redirect dev tap0_rq"
        );
        assert_eq!(device_mtu(1500), Some(1500));
        assert_eq!(device_mtu(9000), Some(9000));
        assert_eq!(device_mtu(1279), None);
        assert_eq!(device_mtu(65536), None);
    }

    #[test]
    fn interfaces_of_a_namespace_without_one_fail_clearly() {
        let e = setup(Path::new("/nonexistent/netns"), &mut |_| {}).unwrap_err();
        assert!(
            matches!(&e, Error::Netns { path, .. } if path == Path::new("/nonexistent/netns")),
            "{e}"
        );
        // Nothing to remove from a namespace that is gone.
        let rec = Record {
            netns: "/nonexistent/netns".into(),
            links: vec![Link {
                iface: "eth0".into(),
                tap: "tap0_rq".into(),
            }],
        };
        teardown(&rec).unwrap();
    }

    #[test]
    fn ip_json_is_read() {
        let routes: Vec<IpRoute> = serde_json::from_str(
            r#"[{"dst":"default","gateway":"10.9.0.1","dev":"eth0","flags":[]},
                {"dst":"10.9.0.0/24","dev":"eth0","protocol":"kernel","scope":"link",
                 "prefsrc":"10.9.0.2","flags":[]}]"#,
        )
        .unwrap();
        assert_eq!(routes[0].gateway.as_deref(), Some("10.9.0.1"));
        assert_eq!(routes[1].protocol, "kernel");
        let addrs: Vec<IpAddrs> = serde_json::from_str(
            r#"[{"ifindex":2,"ifname":"eth0","addr_info":[{"family":"inet","local":"10.9.0.2",
                "prefixlen":24,"scope":"global","label":"eth0"}]}]"#,
        )
        .unwrap();
        assert_eq!(addrs[0].addr_info[0].local.as_deref(), Some("10.9.0.2"));
        assert_eq!(addrs[0].addr_info[0].prefixlen, 24);
    }
}
