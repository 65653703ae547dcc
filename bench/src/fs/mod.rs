//! `rqemu-bench fs`: the FUSE client over virtio-fs queues. Prepares a working set through
//! FUSE (untimed), runs the workload on every request queue (one thread each, --iodepth
//! requests in flight), cleans up and prints ops/s, MB/s and latency percentiles.
//!
//! Below this entry: [`load`] (the timed workloads over the queues), [`host`] (the same
//! workloads with system calls on a host directory), [`check`] (`--check`, conformance) and
//! [`shared`] (the data pattern, working set and totals they all use).

pub mod check;
mod host;
mod load;
mod shared;

use std::time::Duration;

use anyhow::{bail, Context, Result};
use rqemu_vhost_driver::fs::abi::FUSE_ROOT_ID;
use rqemu_vhost_driver::fs::{FsOptions, FuseClient};

use crate::{FsArgs, Workload};
use shared::{fill_pattern, Totals, WorkingSet};

/// Largest --bs.
pub const MAX_BS: u64 = 1 << 20;
/// Chunk size of the set-up writes.
const PREP_CHUNK: usize = 1 << 20;

fn validate(a: &FsArgs) -> Result<()> {
    if a.bs == 0 || a.bs % 8 != 0 || a.bs > MAX_BS {
        bail!("--bs must be a multiple of 8 up to 1 MiB");
    }
    if a.iodepth == 0 || a.iodepth > 256 {
        bail!("--iodepth must be 1..=256");
    }
    if a.queues == 0 || a.queues > 64 {
        bail!("--queues must be 1..=64");
    }
    if a.files == 0 {
        bail!("--files must be at least 1");
    }
    if matches!(a.workload, Workload::Seqread | Workload::Randread) && a.size < a.bs {
        bail!("--size must be at least --bs");
    }
    if !(a.runtime > 0.0 && a.runtime < 1e6) {
        bail!("--runtime must be positive");
    }
    Ok(())
}

/// Runs the benchmark and prints the result.
pub fn run(a: &FsArgs) -> Result<()> {
    validate(a)?;
    let runtime = Duration::from_secs_f64(a.runtime);
    let mut t = match (&a.host_dir, &a.socket) {
        (Some(dir), _) => host::run(a, dir, runtime)?,
        (None, Some(sock)) => run_socket(a, sock, runtime)?,
        (None, None) => bail!("--socket or --host-dir is required"),
    };
    report(a, &mut t, runtime);
    if t.errors > 0 || t.verify_failures > 0 {
        bail!(
            "{} failed operations, {} verify failures (first error: {})",
            t.errors,
            t.verify_failures,
            t.first_error.as_deref().unwrap_or("none")
        );
    }
    if t.ops == 0 {
        bail!("no operation completed");
    }
    Ok(())
}

fn run_socket(a: &FsArgs, sock: &std::path::Path, runtime: Duration) -> Result<Totals> {
    let slot = a.bs as usize + rqemu_vhost_driver::fs::SLOT_OVERHEAD;
    let per_queue = a.iodepth * 2 * slot + 2 * 4096;
    let mem = usize::from(a.queues) * per_queue + 2 * (PREP_CHUNK + 4096) + (8 << 20);
    let opts = FsOptions {
        request_queues: a.queues,
        queue_size: (a.iodepth * 2).next_power_of_two().clamp(16, 1024) as u16,
        mem_size: mem.next_multiple_of(1 << 20),
        max_payload: PREP_CHUNK,
        tag: a.tag.clone(),
        event_idx: !a.poll,
    };
    let mut c = FuseClient::connect(sock, &opts)
        .with_context(|| format!("connecting to {}", sock.display()))?;
    if c.config.is_none() && a.tag.is_some() {
        eprintln!(
            "rqemu-bench: note: the backend does not offer VHOST_USER_PROTOCOL_F_CONFIG; \
             its tag cannot be checked"
        );
    }
    c.fuse_init().context("FUSE_INIT")?;
    let ws = prepare(&mut c, a).context("preparing the working set")?;
    let r = load::run_queues(&mut c, a, &ws, runtime);
    let lookups = r.as_ref().map(|t| t.lookups.clone()).unwrap_or_default();
    let cl = cleanup(&mut c, &ws, &lookups).context("cleaning up the working set");
    let t = r?;
    cl?;
    Ok(t)
}

/// Creates the working set in a fresh directory under the root.
fn prepare(c: &mut FuseClient, a: &FsArgs) -> Result<WorkingSet> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let dir_name = format!("rqemu-bench-{}-{nanos}", std::process::id());
    let dir = c.mkdir(FUSE_ROOT_ID, &dir_name, 0o755)?.nodeid;
    let mut ws = WorkingSet {
        dir_name,
        dir,
        files: Vec::new(),
        data: None,
    };
    match a.workload {
        Workload::Metadata => {
            for i in 0..a.files {
                let name = format!("f{i}");
                let (e, o) = c.create(dir, &name, libc::O_RDWR as u32, 0o644)?;
                c.release(e.nodeid, o.fh, false)?;
                ws.files.push((name, e.nodeid));
            }
        }
        Workload::Seqread | Workload::Randread => {
            let size = a.size / a.bs * a.bs;
            let (e, o) = c.create(dir, "data", libc::O_RDWR as u32, 0o644)?;
            let mut buf = vec![0u8; PREP_CHUNK.min(c.max_io())];
            let mut off = 0;
            while off < size {
                let n = buf.len().min((size - off) as usize);
                fill_pattern(&mut buf[..n], off);
                c.write_all(e.nodeid, o.fh, off, &buf[..n])?;
                off += n as u64;
            }
            c.flush(e.nodeid, o.fh)?;
            c.release(e.nodeid, o.fh, false)?;
            let got = c.getattr(e.nodeid)?.attr.size;
            if got != size {
                bail!("the data file is {got} bytes after writing {size}");
            }
            let fh = c.open(e.nodeid, libc::O_RDONLY as u32)?.fh;
            ws.data = Some((e.nodeid, fh, size));
        }
        Workload::Create => {}
    }
    Ok(ws)
}

/// Removes the working set and forgets every node id the run looked up.
fn cleanup(c: &mut FuseClient, ws: &WorkingSet, lookups: &[u64]) -> Result<()> {
    if let Some((node, fh, _)) = ws.data {
        c.release(node, fh, false)?;
        c.unlink(ws.dir, "data")?;
        c.forget(node, 1)?;
    }
    for (i, (name, node)) in ws.files.iter().enumerate() {
        c.unlink(ws.dir, name)?;
        c.forget(*node, 1 + lookups.get(i).copied().unwrap_or(0))?;
    }
    // Anything a failed create cycle left behind.
    for e in c.list_dir(ws.dir, false)? {
        if e.name != "." && e.name != ".." {
            c.unlink(ws.dir, &e.name)?;
        }
    }
    c.rmdir(FUSE_ROOT_ID, &ws.dir_name)?;
    c.forget(ws.dir, 1)?;
    Ok(())
}

fn report(a: &FsArgs, t: &mut Totals, runtime: Duration) {
    let secs = runtime.as_secs_f64();
    let ops_s = t.ops as f64 / secs;
    let mbs = t.bytes as f64 / secs / 1e6;
    let (p50, p99, p999) = (
        t.lat.percentile_us(50.0),
        t.lat.percentile_us(99.0),
        t.lat.percentile_us(99.9),
    );
    let w = format!("{:?}", a.workload).to_lowercase();
    let target = if a.host_dir.is_some() { "host" } else { "fs" };
    if a.json {
        println!(
            "{{\"target\":\"{target}\",\"workload\":\"{w}\",\"bs\":{},\"iodepth\":{},\
             \"queues\":{},\"runtime_s\":{secs:.3},\"ops\":{},\"ops_s\":{ops_s:.0},\
             \"mb_s\":{mbs:.1},\"lat_us\":{{\"p50\":{p50:.1},\"p99\":{p99:.1},\
             \"p99_9\":{p999:.1}}},\"errors\":{},\"verify_failures\":{}}}",
            a.bs, a.iodepth, a.queues, t.ops, t.errors, t.verify_failures
        );
    } else {
        println!(
            "{target} {w} bs={} {}{}: {ops_s:.0} ops/s, {mbs:.1} MB/s, \
             latency p50 {p50:.1} us, p99 {p99:.1} us, p99.9 {p999:.1} us \
             ({} ops, {} errors, {} verify failures)",
            a.bs,
            if a.host_dir.is_some() {
                format!("threads={} (synchronous calls)", a.queues)
            } else {
                format!("iodepth={} queues={}", a.iodepth, a.queues)
            },
            if a.poll { " poll" } else { "" },
            t.ops,
            t.errors,
            t.verify_failures
        );
    }
}
