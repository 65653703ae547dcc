//! The container's network interfaces on the guest's virtio-net NICs: each
//! [`NetInterface`] of the spec names the MAC of its NIC (rqemu-run gave the NIC the MAC of the
//! host-side interface); the NIC is renamed to the interface's name, gets its MTU and IPv4
//! addresses, comes up, and the interface's routes are added. Plain ioctls on an `AF_INET`
//! socket (`SIOCSIFNAME`, `SIOCSIFMTU`, `SIOCSIFADDR`, `SIOCSIFNETMASK`, `SIOCSIFFLAGS`,
//! `SIOCADDRT`): the agent is static and small, no netlink library. Loopback comes up too.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use rqemu_agent_protocol::{Ipv4Cidr, Ipv4Route, NetInterface};

use crate::alog;
use crate::sys;

/// How long a NIC may take to show up after its driver was loaded.
const NIC_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("no network interface has MAC {0} (is virtio_net loaded?)")]
    NoNic(String),
    #[error("{what} on {iface}: {source}")]
    Ioctl {
        what: &'static str,
        iface: String,
        source: io::Error,
    },
    #[error("interface name {0:?} is not a valid name")]
    BadName(String),
    #[error("socket: {0}")]
    Socket(io::Error),
}

fn mac_text(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The name of the interface whose MAC is `mac` (from `/sys/class/net`).
fn find_by_mac(mac: &[u8; 6]) -> Option<String> {
    let want = mac_text(mac);
    for e in std::fs::read_dir("/sys/class/net").ok()?.flatten() {
        let addr = std::fs::read_to_string(e.path().join("address")).unwrap_or_default();
        if addr.trim().eq_ignore_ascii_case(&want) {
            return Some(e.file_name().to_string_lossy().into_owned());
        }
    }
    None
}

/// `struct ifreq`: the name, then a 24-byte union.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: [u8; 24],
}

impl IfReq {
    fn new(name: &str) -> Result<Self, NetError> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['\0', '/']) {
            return Err(NetError::BadName(name.into()));
        }
        let mut r = IfReq {
            name: [0; libc::IFNAMSIZ],
            data: [0; 24],
        };
        r.name[..name.len()].copy_from_slice(name.as_bytes());
        Ok(r)
    }

    fn set_sockaddr(&mut self, a: Ipv4Addr) {
        self.data = [0; 24];
        self.data[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        self.data[4..8].copy_from_slice(&a.octets());
    }
}

/// `struct sockaddr_in` as a `struct sockaddr`.
fn sockaddr(a: Ipv4Addr) -> libc::sockaddr {
    // SAFETY: sockaddr is plain old data; all-zero is valid.
    let mut s: libc::sockaddr = unsafe { std::mem::zeroed() };
    s.sa_family = libc::AF_INET as libc::sa_family_t;
    for (d, b) in s.sa_data[2..6].iter_mut().zip(a.octets()) {
        *d = b as libc::c_char;
    }
    s
}

/// The kernel's `struct rtentry` (x86-64; glibc's libc crate does not have it).
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

const RTF_UP: libc::c_ushort = 0x0001;
const RTF_GATEWAY: libc::c_ushort = 0x0002;

fn netmask(prefix_len: u8) -> Ipv4Addr {
    let p = u32::from(prefix_len.min(32));
    Ipv4Addr::from(u32::MAX.checked_shl(32 - p).unwrap_or(0))
}

struct Sock(OwnedFd);

impl Sock {
    fn new() -> Result<Self, NetError> {
        // SAFETY: socket(2) with constant arguments.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        sys::owned(fd).map(Sock).map_err(NetError::Socket)
    }

    fn ioctl<T>(
        &self,
        req: libc::c_ulong,
        arg: &mut T,
        what: &'static str,
        iface: &str,
    ) -> Result<(), NetError> {
        // SAFETY: every caller passes the argument type the request expects (`IfReq` for the
        // SIOC*IF* requests, `RtEntry` for SIOCADDRT), alive for the call.
        let r = unsafe { libc::ioctl(self.0.as_raw_fd(), req as _, arg as *mut T) };
        sys::check(r).map(drop).map_err(|source| NetError::Ioctl {
            what,
            iface: iface.into(),
            source,
        })
    }

    fn set_up(&self, name: &str) -> Result<(), NetError> {
        let mut r = IfReq::new(name)?;
        self.ioctl(libc::SIOCGIFFLAGS, &mut r, "SIOCGIFFLAGS", name)?;
        let flags = i16::from_ne_bytes([r.data[0], r.data[1]]) | libc::IFF_UP as i16;
        r.data[..2].copy_from_slice(&flags.to_ne_bytes());
        self.ioctl(libc::SIOCSIFFLAGS, &mut r, "SIOCSIFFLAGS", name)
    }

    fn set_addr(&self, label: &str, a: Ipv4Cidr) -> Result<(), NetError> {
        let mut r = IfReq::new(label)?;
        r.set_sockaddr(a.addr);
        self.ioctl(libc::SIOCSIFADDR, &mut r, "SIOCSIFADDR", label)?;
        r.set_sockaddr(netmask(a.prefix_len));
        self.ioctl(libc::SIOCSIFNETMASK, &mut r, "SIOCSIFNETMASK", label)
    }

    fn add_route(&self, dev: &str, route: &Ipv4Route) -> Result<(), NetError> {
        let mut name = [0 as libc::c_char; libc::IFNAMSIZ];
        for (d, b) in name.iter_mut().zip(dev.bytes()) {
            *d = b as libc::c_char;
        }
        let mut rt = RtEntry {
            rt_pad1: 0,
            rt_dst: sockaddr(route.destination.addr),
            rt_gateway: sockaddr(route.gateway.unwrap_or(Ipv4Addr::UNSPECIFIED)),
            rt_genmask: sockaddr(netmask(route.destination.prefix_len)),
            rt_flags: RTF_UP
                | if route.gateway.is_some() {
                    RTF_GATEWAY
                } else {
                    0
                },
            rt_pad2: 0,
            rt_pad3: 0,
            rt_pad4: std::ptr::null_mut(),
            rt_metric: 0,
            rt_dev: name.as_mut_ptr(),
            rt_mtu: 0,
            rt_window: 0,
            rt_irtt: 0,
        };
        self.ioctl(libc::SIOCADDRT, &mut rt, "SIOCADDRT", dev)
    }
}

/// Brings loopback up and configures every interface of `ifaces`.
pub fn configure(ifaces: &[NetInterface]) -> Result<(), NetError> {
    let s = Sock::new()?;
    if let Err(e) = s.set_up("lo") {
        alog!("loopback: {e}");
    }
    for iface in ifaces {
        configure_one(&s, iface)?;
    }
    Ok(())
}

fn configure_one(s: &Sock, iface: &NetInterface) -> Result<(), NetError> {
    let deadline = Instant::now() + NIC_WAIT;
    let mut name = loop {
        if let Some(n) = find_by_mac(&iface.mac) {
            break n;
        }
        if Instant::now() > deadline {
            return Err(NetError::NoNic(mac_text(&iface.mac)));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    if name != iface.name {
        // The NIC is still down here (renaming needs that).
        let mut r = IfReq::new(&name)?;
        let new = IfReq::new(&iface.name)?;
        r.data[..libc::IFNAMSIZ].copy_from_slice(&new.name);
        match s.ioctl(libc::SIOCSIFNAME, &mut r, "SIOCSIFNAME", &name) {
            Ok(()) => name = iface.name.clone(),
            Err(e) => alog!("keeping the name {name}: {e}"),
        }
    }
    if iface.mtu > 0 {
        let mut r = IfReq::new(&name)?;
        r.data[..4].copy_from_slice(&(iface.mtu as libc::c_int).to_ne_bytes());
        if let Err(e) = s.ioctl(libc::SIOCSIFMTU, &mut r, "SIOCSIFMTU", &name) {
            // A NIC whose maximum is below the host's MTU still works, with smaller frames.
            alog!("MTU {}: {e}", iface.mtu);
        }
    }
    for (i, a) in iface.addresses.iter().enumerate() {
        // Further addresses as aliases (`eth0:1`): the ioctl interface's way.
        let label = if i == 0 {
            name.clone()
        } else {
            format!("{name}:{i}")
        };
        s.set_addr(&label, *a)?;
    }
    s.set_up(&name)?;
    // On-link routes first: a gateway may be reachable only through one of them (`default
    // via 169.254.1.1` after `169.254.1.1 dev eth0 scope link`, as Calico sets it up).
    let (link, via): (Vec<_>, Vec<_>) = iface.routes.iter().partition(|r| r.gateway.is_none());
    for r in link.into_iter().chain(via) {
        s.add_route(&name, r)?;
    }
    alog!(
        "network: {name} ({}) mtu {} addresses {} routes {}",
        mac_text(&iface.mac),
        iface.mtu,
        iface
            .addresses
            .iter()
            .map(|a| format!("{}/{}", a.addr, a.prefix_len))
            .collect::<Vec<_>>()
            .join(" "),
        iface
            .routes
            .iter()
            .map(|r| format!(
                "{}/{}{}",
                r.destination.addr,
                r.destination.prefix_len,
                r.gateway.map(|g| format!(" via {g}")).unwrap_or_default()
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netmasks_and_layouts() {
        assert_eq!(netmask(0), Ipv4Addr::UNSPECIFIED);
        assert_eq!(netmask(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(netmask(32), Ipv4Addr::BROADCAST);
        assert_eq!(netmask(40), Ipv4Addr::BROADCAST);
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
        // The kernel's struct rtentry on x86-64.
        assert_eq!(std::mem::size_of::<RtEntry>(), 120);
        assert_eq!(mac_text(&[0x0a, 0x58, 10, 88, 0, 2]), "0a:58:0a:58:00:02");
        assert!(IfReq::new("0123456789abcdef").is_err());
        assert!(IfReq::new("").is_err());
    }
}
