//! `rqemu-bench`: drives a vhost-user backend with no guest CPU in the way — it is the
//! frontend and the virtio driver at once — and prints throughput and latency.

mod blk;
mod check;
mod fs;
mod stats;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};

/// Benchmark vhost-user backends without a guest.
#[derive(Debug, Parser)]
#[command(name = "rqemu-bench", version)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// A vhost-user-blk backend (rqemu-blk, qemu-storage-daemon, ...).
    Blk(BlkArgs),
    /// A vhost-user virtio-fs backend (rqemu-fs, virtiofsd, ...): the bench is the FUSE client.
    Fs(FsArgs),
}

/// virtio-fs workload. One "op" is one FUSE request for `metadata` and the reads, one whole
/// file cycle (CREATE, WRITE of --bs bytes, RELEASE, UNLINK) for `create`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// LOOKUP and GETATTR (half each) of random files among --files empty files.
    Metadata,
    /// Sequential READs of --bs over a --size file.
    Seqread,
    /// Random --bs-aligned READs over a --size file.
    Randread,
    /// CREATE + WRITE --bs + RELEASE + UNLINK cycles (FORGETs batched on the hiprio queue).
    Create,
}

/// Options of `rqemu-bench fs`.
///
/// The working set is prepared through FUSE itself in a fresh directory
/// `rqemu-bench-PID-N` under the share's root (not timed) and removed afterwards, so every
/// backend serves the same files from the same host page cache.
#[derive(Debug, Parser)]
pub struct FsArgs {
    /// The backend's vhost-user socket.
    #[arg(long, required_unless_present = "host_dir")]
    pub socket: Option<PathBuf>,
    /// The backend's tag must be this one (checked when the backend exposes its config space).
    #[arg(long)]
    pub tag: Option<String>,
    /// Run the same workload with system calls on this host directory instead (the host's own
    /// figure: one thread per --queues, --iodepth ignored).
    #[arg(long, conflicts_with = "socket")]
    pub host_dir: Option<PathBuf>,
    /// Workload.
    #[arg(long, value_enum, default_value = "metadata")]
    pub workload: Workload,
    /// Request size of READ/WRITE (bytes; k/m suffixes).
    #[arg(long, default_value = "4k", value_parser = parse_size)]
    pub bs: u64,
    /// Requests (create: file cycles) kept in flight per request queue.
    #[arg(long, default_value_t = 8)]
    pub iodepth: usize,
    /// Request queues (one driver thread each).
    #[arg(long, default_value_t = 1)]
    pub queues: u16,
    /// Seconds to run.
    #[arg(long, default_value_t = 5.0)]
    pub runtime: f64,
    /// Size of the file of seqread/randread.
    #[arg(long, default_value = "64m", value_parser = parse_size)]
    pub size: u64,
    /// Number of files of the metadata workload.
    #[arg(long, default_value_t = 1000)]
    pub files: usize,
    /// Check every byte read (otherwise only the first 8 bytes of each READ are checked).
    #[arg(long)]
    pub verify: bool,
    /// Busy-poll the used rings instead of waiting for the call eventfd.
    #[arg(long)]
    pub poll: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Run the conformance checks instead of the benchmark (exit status 1 if any fails).
    #[arg(long)]
    pub check: bool,
}

/// Access pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Rw {
    /// Random reads.
    Randread,
    /// Random writes.
    Randwrite,
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Random, 70% reads.
    Mixed,
}

/// Options of `rqemu-bench blk`.
#[derive(Debug, Parser)]
pub struct BlkArgs {
    /// The backend's vhost-user socket.
    #[arg(long)]
    pub socket: PathBuf,
    /// Access pattern.
    #[arg(long, value_enum, default_value = "randread")]
    pub rw: Rw,
    /// Block size (bytes; k/m suffixes).
    #[arg(long, default_value = "4k", value_parser = parse_size)]
    pub bs: u64,
    /// Requests kept in flight per queue.
    #[arg(long, default_value_t = 32)]
    pub iodepth: usize,
    /// Queues (one driver thread each).
    #[arg(long, default_value_t = 1)]
    pub queues: u16,
    /// Seconds to run.
    #[arg(long, default_value_t = 5.0)]
    pub runtime: f64,
    /// Only use the first SIZE bytes of the disk (default: all of it).
    #[arg(long, value_parser = parse_size)]
    pub size: Option<u64>,
    /// Write a pattern over the region first, then check every read against it.
    #[arg(long)]
    pub verify: bool,
    /// Busy-poll the used rings instead of waiting for the call eventfd.
    #[arg(long)]
    pub poll: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Run the conformance checks instead of the benchmark (exit status 1 if any fails).
    #[arg(long)]
    pub check: bool,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim().to_ascii_lowercase();
    let (n, mul) = match s.chars().last() {
        Some('k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('m') => (&s[..s.len() - 1], 1 << 20),
        Some('g') => (&s[..s.len() - 1], 1 << 30),
        _ => (&s[..], 1),
    };
    n.parse::<u64>()
        .ok()
        .and_then(|v| v.checked_mul(mul))
        .ok_or_else(|| format!("bad size {s:?}"))
}

fn main() {
    let args = Args::parse();
    let r = match args.cmd {
        Cmd::Blk(a) if a.check => match check::run(&a.socket) {
            0 => Ok(()),
            n => Err(anyhow::anyhow!("{n} conformance check(s) failed")),
        },
        Cmd::Blk(a) => blk::run(&a),
        Cmd::Fs(a) if a.check => match &a.socket {
            Some(sock) => match fs::check::run(sock, a.tag.as_deref()) {
                0 => Ok(()),
                n => Err(anyhow::anyhow!("{n} conformance check(s) failed")),
            },
            None => Err(anyhow::anyhow!("--check needs --socket")),
        },
        Cmd::Fs(a) => fs::run(&a),
    };
    if let Err(e) = r {
        eprintln!("rqemu-bench: error: {e:#}");
        std::process::exit(1);
    }
}

/// How long to wait for one completion before declaring the backend stuck.
pub const STUCK: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("512"), Ok(512));
        assert!(parse_size("x").is_err());
        assert!(parse_size("99999999999999999g").is_err());
    }
}
