//! `rqemu-bench fs --host-dir DIR`: the same workloads with system calls on a host directory,
//! the host's own figure (the limit a daemon serving that directory can approach). One thread
//! per --queues, one synchronous call at a time (--iodepth does not apply):
//! metadata = `fstatat` (LOOKUP) or `fstat` (GETATTR) of a random file; seqread/randread =
//! `pread` of --bs; create = `open(O_CREAT|O_EXCL)` + `write` --bs + `close` + `unlink`.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::shared::{fill_pattern, pattern_word, Totals};
use crate::{FsArgs, Workload};

struct HostSet {
    dir: PathBuf,
    files: Vec<(PathBuf, File)>,
    data: Option<(File, u64)>,
}

fn prepare(a: &FsArgs, root: &Path) -> Result<HostSet> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let dir = root.join(format!("rqemu-bench-host-{}-{nanos}", std::process::id()));
    std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut set = HostSet {
        dir,
        files: Vec::new(),
        data: None,
    };
    match a.workload {
        Workload::Metadata => {
            for i in 0..a.files {
                let p = set.dir.join(format!("f{i}"));
                let f = File::create(&p)?;
                set.files.push((p, f));
            }
        }
        Workload::Seqread | Workload::Randread => {
            let size = a.size / a.bs * a.bs;
            let p = set.dir.join("data");
            let mut f = File::create(&p)?;
            let mut buf = vec![0u8; 1 << 20];
            let mut off = 0;
            while off < size {
                let n = buf.len().min((size - off) as usize);
                fill_pattern(&mut buf[..n], off);
                f.write_all(&buf[..n])?;
                off += n as u64;
            }
            drop(f);
            set.data = Some((File::open(&p)?, size));
        }
        Workload::Create => {}
    }
    Ok(set)
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn one_thread(a: &FsArgs, set: &HostSet, qi: usize, runtime: Duration) -> Totals {
    let mut t = Totals::new(0);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (qi as u64 + 1).wrapping_mul(0x2545_f491_4f6c_dd1d));
    let blocks = set.data.as_ref().map_or(1, |(_, s)| s / a.bs);
    let mut seq = qi as u64 * (blocks / u64::from(a.queues).max(1));
    let mut buf = vec![0u8; a.bs as usize];
    let mut expect = vec![0u8; a.bs as usize];
    let mut wbuf = vec![0u8; a.bs as usize];
    fill_pattern(&mut wbuf, 0);
    let mut n = 0u64;
    let start = Instant::now();
    while start.elapsed() < runtime {
        let t0 = Instant::now();
        let (r, bytes): (std::io::Result<()>, u64) = match a.workload {
            Workload::Metadata => {
                let r = rng.next();
                let (p, f) = &set.files[(r >> 1) as usize % set.files.len()];
                let res = if r & 1 == 0 {
                    std::fs::symlink_metadata(p)
                } else {
                    f.metadata()
                };
                (res.map(drop), 0)
            }
            Workload::Seqread | Workload::Randread => {
                let Some((f, _)) = &set.data else { break };
                let b = if a.workload == Workload::Seqread {
                    seq = (seq + 1) % blocks;
                    seq
                } else {
                    rng.next() % blocks
                };
                let off = b * a.bs;
                let r = f.read_exact_at(&mut buf, off);
                if r.is_ok() {
                    let good = if a.verify {
                        fill_pattern(&mut expect, off);
                        expect == buf
                    } else {
                        buf[..8] == pattern_word(off).to_le_bytes()
                    };
                    if !good {
                        t.verify_failures += 1;
                    }
                }
                (r, a.bs)
            }
            Workload::Create => {
                n += 1;
                let p = set.dir.join(format!("c{qi}-{n}"));
                let r = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o644)
                    .open(&p)
                    .and_then(|mut f| f.write_all(&wbuf))
                    .and_then(|()| std::fs::remove_file(&p));
                (r, a.bs)
            }
        };
        match r {
            Ok(()) => {
                t.ops += 1;
                t.bytes += bytes;
                t.lat.push(t0.elapsed());
            }
            Err(e) => t.error(e),
        }
    }
    t
}

/// Runs the workload on `root` and removes what it created.
pub fn run(a: &FsArgs, root: &Path, runtime: Duration) -> Result<Totals> {
    if !root.is_dir() {
        bail!("{} is not a directory", root.display());
    }
    let set = prepare(a, root)?;
    let results: Vec<Totals> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..usize::from(a.queues))
            .map(|qi| {
                let set = &set;
                s.spawn(move || one_thread(a, set, qi, runtime))
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Totals::new(0)))
            .collect()
    });
    let mut total = Totals::new(0);
    for r in results {
        total.merge(r);
    }
    std::fs::remove_dir_all(&set.dir).with_context(|| format!("removing {}", set.dir.display()))?;
    Ok(total)
}
