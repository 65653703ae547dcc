//! `rqemu-bench blk`: N requests in flight per queue, one driver thread per queue.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rqemu_vhost_driver::blk::{self, Slot, Slots};
use rqemu_vhost_driver::{Device, DriverMemory, DriverOptions, SplitQueue};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};

use crate::stats::Latencies;
use crate::{BlkArgs, Rw, STUCK};

const SECTOR: u64 = 512;

/// Per-queue result.
struct QueueResult {
    ops: u64,
    bytes: u64,
    errors: u64,
    verify_failures: u64,
    lat: Latencies,
}

/// Deterministic content of a sector: its number, repeated.
fn fill_pattern(buf: &mut [u8], first_sector: u64) {
    for (i, sector) in buf.chunks_mut(SECTOR as usize).enumerate() {
        let tag = (first_sector + i as u64) ^ 0x5251_454d_5f42_4e43;
        for w in sector.chunks_mut(8) {
            w.copy_from_slice(&tag.to_le_bytes()[..w.len()]);
        }
    }
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

/// Runs the benchmark and prints the result.
pub fn run(a: &BlkArgs) -> Result<()> {
    if a.bs == 0 || a.bs % SECTOR != 0 || a.bs > 4 << 20 {
        bail!("--bs must be a multiple of 512 up to 4 MiB");
    }
    if a.iodepth == 0 || a.iodepth > 512 {
        bail!("--iodepth must be 1..=512");
    }
    let queue_size = (a.iodepth * 3).next_power_of_two().clamp(8, 1024) as u16;
    let mem_needed = usize::from(a.queues) * a.iodepth * (a.bs as usize + 8192) + (8 << 20);
    let opts = DriverOptions {
        mem_size: mem_needed.next_multiple_of(1 << 20),
        num_queues: a.queues,
        queue_size,
        event_idx: !a.poll,
        ..Default::default()
    };
    let mut dev = Device::connect(&a.socket, &opts)
        .with_context(|| format!("connecting to {}", a.socket.display()))?;
    let cfg = dev.config(0, 8).context("reading the capacity")?;
    let capacity = u64::from_le_bytes(cfg[..8].try_into().unwrap_or([0; 8])) * SECTOR;
    let region = a.size.unwrap_or(capacity).min(capacity) / a.bs * a.bs;
    if region < a.bs {
        bail!("the disk ({capacity} bytes) is smaller than one block");
    }
    let slots: Vec<Slots> = (0..a.queues)
        .map(|_| Slots::new(&mut dev, a.iodepth, a.bs as usize))
        .collect::<Result<_, _>>()?;

    if a.verify {
        prefill(&mut dev, &slots[0], region, a.bs)?;
    }

    let runtime = Duration::from_secs_f64(a.runtime);
    let Device { mem, queues, .. } = &mut dev;
    let mem: &DriverMemory = mem;
    let results: Vec<Result<QueueResult>> = std::thread::scope(|s| {
        let handles: Vec<_> = queues
            .iter_mut()
            .zip(&slots)
            .enumerate()
            .map(|(qi, (q, sl))| s.spawn(move || drive(a, mem, q, sl, region, runtime, qi as u64)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("driver thread panicked")))
            })
            .collect()
    });
    let mut total = QueueResult {
        ops: 0,
        bytes: 0,
        errors: 0,
        verify_failures: 0,
        lat: Latencies::with_capacity(0),
    };
    for r in results {
        let r = r?;
        total.ops += r.ops;
        total.bytes += r.bytes;
        total.errors += r.errors;
        total.verify_failures += r.verify_failures;
        total.lat.extend(r.lat);
    }
    report(a, &mut total, runtime);
    if total.errors > 0 || total.verify_failures > 0 {
        bail!(
            "{} I/O errors, {} verify failures",
            total.errors,
            total.verify_failures
        );
    }
    Ok(())
}

fn prefill(dev: &mut Device, slots: &Slots, region: u64, bs: u64) -> Result<()> {
    let mut buf = vec![0u8; bs as usize];
    let mut off = 0;
    while off < region {
        fill_pattern(&mut buf, off / SECTOR);
        let (st, _) = blk::request(
            dev,
            0,
            slots.get(0),
            VIRTIO_BLK_T_OUT,
            off / SECTOR,
            &mut buf,
            STUCK,
        )?;
        if st != 0 {
            bail!("prefill write at {off} failed with status {st}");
        }
        off += bs;
    }
    Ok(())
}

/// What a request in flight was: slot, submission time, type, sector.
type InFlight = Option<(usize, Instant, u32, u64)>;

/// Chooses and posts requests.
struct Gen<'a> {
    a: &'a BlkArgs,
    mem: &'a DriverMemory,
    slots: &'a Slots,
    blocks: u64,
    seq: u64,
    rng: Rng,
}

impl Gen<'_> {
    fn submit(&mut self, i: usize, q: &mut SplitQueue, in_flight: &mut [InFlight]) -> Result<()> {
        let a = self.a;
        let (write, block) = match a.rw {
            Rw::Randread => (false, self.rng.next() % self.blocks),
            Rw::Randwrite => (true, self.rng.next() % self.blocks),
            Rw::Read | Rw::Write => {
                self.seq = (self.seq + 1) % self.blocks;
                (a.rw == Rw::Write, self.seq)
            }
            Rw::Mixed => (self.rng.next() % 10 >= 7, self.rng.next() % self.blocks),
        };
        let slot: Slot = self.slots.get(i);
        let sector = block * a.bs / SECTOR;
        let kind = if write {
            VIRTIO_BLK_T_OUT
        } else {
            VIRTIO_BLK_T_IN
        };
        if write && a.verify {
            let mut b = vec![0u8; a.bs as usize];
            fill_pattern(&mut b, sector);
            self.mem.write(slot.data, &b)?;
        }
        let head = blk::post_on(self.mem, q, slot, kind, sector, a.bs as u32)?;
        in_flight[usize::from(head)] = Some((i, Instant::now(), kind, sector));
        Ok(())
    }
}

fn drive(
    a: &BlkArgs,
    mem: &DriverMemory,
    q: &mut SplitQueue,
    slots: &Slots,
    region: u64,
    runtime: Duration,
    seed: u64,
) -> Result<QueueResult> {
    let blocks = region / a.bs;
    let rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (seed + 1).wrapping_mul(0x2545_f491_4f6c_dd1d));
    let seq = seed * (blocks / u64::from(a.queues).max(1));
    let mut in_flight: Vec<InFlight> = vec![None; usize::from(u16::MAX) + 1];
    let mut res = QueueResult {
        ops: 0,
        bytes: 0,
        errors: 0,
        verify_failures: 0,
        lat: Latencies::with_capacity(1 << 20),
    };
    let mut scratch = vec![0u8; a.bs as usize];
    let mut expect = vec![0u8; a.bs as usize];
    let mut gen = Gen {
        a,
        mem,
        slots,
        blocks,
        seq,
        rng,
    };
    for i in 0..a.iodepth {
        gen.submit(i, q, &mut in_flight)?;
    }
    q.kick()?;
    let start = Instant::now();
    let mut last_progress = Instant::now();
    let mut draining = false;
    loop {
        let mut progressed = false;
        while let Some((head, _len)) = q.pop_used(mem)? {
            progressed = true;
            let Some((i, t0, kind, sector)) = in_flight[usize::from(head)].take() else {
                bail!("backend completed descriptor {head}, which is not in flight");
            };
            res.lat.push(t0.elapsed());
            res.ops += 1;
            res.bytes += a.bs;
            let slot = slots.get(i);
            if blk::status_in(mem, slot)? != 0 {
                res.errors += 1;
            } else if a.verify && kind == VIRTIO_BLK_T_IN {
                mem.read(slot.data, &mut scratch)?;
                fill_pattern(&mut expect, sector);
                if scratch != expect {
                    res.verify_failures += 1;
                }
            }
            if !draining {
                gen.submit(i, q, &mut in_flight)?;
            }
        }
        if progressed {
            last_progress = Instant::now();
            if !draining {
                q.kick()?;
            }
        } else if last_progress.elapsed() > STUCK {
            bail!(
                "no completion for {STUCK:?} with {} requests in flight",
                q.in_flight()
            );
        }
        if !draining && start.elapsed() >= runtime {
            draining = true;
        }
        if draining && q.in_flight() == 0 {
            break;
        }
        if !a.poll && !progressed {
            q.wait_call(Duration::from_millis(10))?;
        }
    }
    Ok(res)
}

fn report(a: &BlkArgs, t: &mut QueueResult, runtime: Duration) {
    let secs = runtime.as_secs_f64();
    let iops = t.ops as f64 / secs;
    let mbs = t.bytes as f64 / secs / 1e6;
    let (p50, p99, p999) = (
        t.lat.percentile_us(50.0),
        t.lat.percentile_us(99.0),
        t.lat.percentile_us(99.9),
    );
    let rw = format!("{:?}", a.rw).to_lowercase();
    if a.json {
        println!(
            "{{\"rw\":\"{rw}\",\"bs\":{},\"iodepth\":{},\"queues\":{},\"runtime_s\":{secs:.3},\
             \"ops\":{},\"iops\":{iops:.0},\"mb_s\":{mbs:.1},\"lat_us\":{{\"p50\":{p50:.1},\
             \"p99\":{p99:.1},\"p99_9\":{p999:.1}}},\"errors\":{},\"verify_failures\":{}}}",
            a.bs, a.iodepth, a.queues, t.ops, t.errors, t.verify_failures
        );
    } else {
        println!(
            "blk {rw} bs={} iodepth={} queues={}{}: {iops:.0} IOPS, {mbs:.1} MB/s, \
             latency p50 {p50:.1} us, p99 {p99:.1} us, p99.9 {p999:.1} us ({} ops, {} errors{})",
            a.bs,
            a.iodepth,
            a.queues,
            if a.poll { " poll" } else { "" },
            t.ops,
            t.errors,
            if a.verify {
                format!(", {} verify failures", t.verify_failures)
            } else {
                String::new()
            }
        );
    }
}
