//! The container as the agent needs it: rqemu-run reduces the OCI `config.json` to this
//! (host paths become virtiofs tags, file bind mounts become copies), so the agent parses no
//! OCI and knows nothing of the host.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// The filesystem type to give [`Mount::fstype`] for a virtiofs share; `source` is its tag.
pub const VIRTIOFS: &str = "virtiofs";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerSpec {
    /// The container's root: a virtiofs share.
    pub rootfs: Rootfs,
    /// `hostname`, if the spec sets one.
    pub hostname: Option<String>,
    /// In the spec's order, destinations relative to the container root.
    pub mounts: Vec<Mount>,
    /// Small files to write after the mounts (bind mounts of single host files, such as the
    /// engine's `/etc/hosts` and `/etc/resolv.conf`: virtiofs shares directories).
    pub files: Vec<FileCopy>,
    /// `linux.sysctl`.
    pub sysctl: Vec<(String, String)>,
    pub process: Process,
    /// The network interfaces of the container's network namespace, each backed by a
    /// virtio-net NIC with the same MAC (empty: loopback only).
    pub network: Vec<NetInterface>,
}

/// One interface of the container's network namespace, as the guest should recreate it on
/// the virtio-net NIC whose MAC is `mac`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetInterface {
    /// The name in the namespace (`eth0`); the agent renames the NIC to it.
    pub name: String,
    pub mac: [u8; 6],
    pub mtu: u32,
    /// IPv4 addresses with their prefix lengths, the primary one first.
    pub addresses: Vec<Ipv4Cidr>,
    /// IPv4 routes through this interface, besides the subnets of its addresses.
    pub routes: Vec<Ipv4Route>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ipv4Cidr {
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
}

/// `destination/prefix_len` (`0.0.0.0/0`: the default route) via `gateway`, or on the link
/// when there is none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ipv4Route {
    pub destination: Ipv4Cidr,
    pub gateway: Option<Ipv4Addr>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rootfs {
    /// virtiofs tag of the share holding the bundle's root.
    pub tag: String,
    pub readonly: bool,
}

/// One mount(2), as the OCI spec writes it: `fstype` "proc", "sysfs", "tmpfs", "devpts",
/// "mqueue", "cgroup2", … or [`VIRTIOFS`] with the share's tag as `source`. `options` are the
/// OCI options (`ro`, `nosuid`, `mode=755`, `bind`, …): the agent turns the known flags into
/// mount flags and passes the rest as data.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    pub destination: String,
    pub fstype: String,
    pub source: String,
    pub options: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileCopy {
    /// Path inside the container.
    pub destination: String,
    pub contents: Vec<u8>,
    pub mode: u32,
    pub readonly: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Process {
    pub args: Vec<String>,
    /// `KEY=VALUE`.
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    /// Run under a pseudo-terminal (stdin/stdout/stderr all on it).
    pub terminal: bool,
    /// Initial size of that terminal.
    pub rows: u16,
    pub cols: u16,
    pub rlimits: Vec<Rlimit>,
    pub no_new_privileges: bool,
    pub umask: Option<u32>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimit {
    /// Linux resource number (`RLIMIT_NOFILE` = 7, …); rqemu-run translates the OCI names.
    pub resource: u32,
    pub soft: u64,
    pub hard: u64,
}
