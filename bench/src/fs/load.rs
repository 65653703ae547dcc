//! The timed part of `rqemu-bench fs`: one thread per request queue keeps --iodepth
//! operations in flight; `create` cycles are chains of dependent requests; their FORGETs go
//! in batches on the shared hiprio queue.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use rqemu_vhost_driver::fs::abi::{self, opcode as op};
use rqemu_vhost_driver::fs::{self, name_arg, FsError, FuseClient, Request, Slot, Slots};
use rqemu_vhost_driver::{Device, DriverMemory, SplitQueue};
use vm_memory::ByteValued;

use super::shared::{fill_pattern, pattern_word, Totals, WorkingSet};
use crate::{FsArgs, Workload, STUCK};

/// FORGETs collected before one BATCH_FORGET.
const FORGET_BATCH: usize = 64;

/// The step a request in flight is.
#[derive(Debug, Clone, Copy)]
enum Step {
    Lookup(usize),
    Getattr(usize),
    Read(u64),
    Create(u64),
    Write { n: u64, node: u64, fh: u64 },
    Release { n: u64, node: u64, fh: u64 },
    Unlink { n: u64, node: u64 },
}

#[derive(Debug, Clone, Copy)]
struct Flight {
    slot: usize,
    unique: u64,
    opcode: u32,
    step: Step,
    t0: Instant,
}

/// Runs the workload on every request queue of `c` and merges the threads' totals.
pub fn run_queues(
    c: &mut FuseClient,
    a: &FsArgs,
    ws: &WorkingSet,
    runtime: Duration,
) -> Result<Totals> {
    let n = usize::from(a.queues);
    let mut slots = Vec::with_capacity(n);
    let mut forget_slots = Vec::with_capacity(n);
    for _ in 0..n {
        slots.push(Slots::new(&mut c.dev.mem, a.iodepth, a.bs as usize)?);
        forget_slots.push(Slots::new(&mut c.dev.mem, 1, FORGET_BATCH * 16)?.get(0));
    }
    let Device { mem, queues, .. } = &mut c.dev;
    let mem: &DriverMemory = mem;
    let (hiprio, request_queues) = queues.split_at_mut(1);
    let hiprio = Mutex::new(&mut hiprio[0]);
    let hiprio = &hiprio;
    let results: Vec<Result<Totals>> = std::thread::scope(|s| {
        let handles: Vec<_> = request_queues
            .iter_mut()
            .zip(slots.iter().zip(&forget_slots))
            .enumerate()
            .map(|(qi, (q, (sl, &fslot)))| {
                s.spawn(move || {
                    let mut d = Driver::new(a, ws, mem, sl, qi);
                    d.drive(q, hiprio, fslot, runtime)?;
                    Ok(d.t)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("driver thread panicked")))
            })
            .collect()
    });
    let mut total = Totals::new(ws.files.len());
    for r in results {
        total.merge(r?);
    }
    Ok(total)
}

struct Driver<'a> {
    a: &'a FsArgs,
    ws: &'a WorkingSet,
    mem: &'a DriverMemory,
    slots: &'a Slots,
    qi: usize,
    unique: u64,
    rng: u64,
    seq: u64,
    created: u64,
    wbuf: Vec<u8>,
    rbuf: Vec<u8>,
    forgets: Vec<abi::ForgetOne>,
    t: Totals,
}

impl<'a> Driver<'a> {
    fn new(
        a: &'a FsArgs,
        ws: &'a WorkingSet,
        mem: &'a DriverMemory,
        slots: &'a Slots,
        qi: usize,
    ) -> Self {
        let blocks = ws.data.map_or(1, |(_, _, size)| size / a.bs);
        let mut wbuf = vec![0u8; a.bs as usize];
        fill_pattern(&mut wbuf, 0);
        Driver {
            a,
            ws,
            mem,
            slots,
            qi,
            unique: (qi as u64 + 1) << 40,
            rng: 0x9e37_79b9_7f4a_7c15 ^ (qi as u64 + 1).wrapping_mul(0x2545_f491_4f6c_dd1d),
            // Threads start at different places of the file.
            seq: qi as u64 * (blocks / u64::from(a.queues).max(1)),
            created: 0,
            wbuf,
            rbuf: vec![0u8; a.bs as usize],
            forgets: Vec::with_capacity(FORGET_BATCH),
            t: Totals::new(ws.files.len()),
        }
    }

    fn random(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    /// The first step of a new operation.
    fn new_op(&mut self) -> Step {
        match self.a.workload {
            Workload::Metadata => {
                let r = self.random();
                let i = (r >> 1) as usize % self.ws.files.len();
                if r & 1 == 0 {
                    Step::Lookup(i)
                } else {
                    Step::Getattr(i)
                }
            }
            Workload::Seqread | Workload::Randread => {
                let blocks = self.ws.data.map_or(1, |(_, _, size)| size / self.a.bs);
                let b = if self.a.workload == Workload::Seqread {
                    self.seq = (self.seq + 1) % blocks;
                    self.seq
                } else {
                    self.random() % blocks
                };
                Step::Read(b * self.a.bs)
            }
            Workload::Create => {
                self.created += 1;
                Step::Create(self.created)
            }
        }
    }

    fn create_name(&self, n: u64) -> String {
        format!("c{}-{n}", self.qi)
    }

    /// Posts `step` in slot `i`.
    fn post(
        &mut self,
        q: &mut SplitQueue,
        i: usize,
        step: Step,
        t0: Instant,
    ) -> Result<(u16, Flight)> {
        self.unique += 1;
        let ws = self.ws;
        let bs = self.a.bs as u32;
        let (fh_data, node_data) = ws.data.map_or((0, 0), |(n, fh, _)| (fh, n));
        let name;
        let (opcode, nodeid, reply, a1, a2): (u32, u64, u32, Vec<u8>, &[u8]) = match step {
            Step::Lookup(f) => {
                name = name_arg(&ws.files[f].0);
                (op::LOOKUP, ws.dir, 128, Vec::new(), &name)
            }
            Step::Getattr(f) => {
                let g = abi::GetattrIn::default();
                (op::GETATTR, ws.files[f].1, 104, g.as_slice().to_vec(), &[])
            }
            Step::Read(off) => {
                let r = abi::ReadIn {
                    fh: fh_data,
                    offset: off,
                    size: bs,
                    ..Default::default()
                };
                (op::READ, node_data, bs, r.as_slice().to_vec(), &[])
            }
            Step::Create(n) => {
                let c = abi::CreateIn {
                    flags: (libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL) as u32,
                    mode: libc::S_IFREG | 0o644,
                    umask: 0o022,
                    open_flags: 0,
                };
                name = name_arg(&self.create_name(n));
                (op::CREATE, ws.dir, 144, c.as_slice().to_vec(), &name)
            }
            Step::Write { node, fh, .. } => {
                let w = abi::WriteIn {
                    fh,
                    offset: 0,
                    size: bs,
                    ..Default::default()
                };
                (op::WRITE, node, 8, w.as_slice().to_vec(), &self.wbuf)
            }
            Step::Release { node, fh, .. } => {
                let r = abi::ReleaseIn {
                    fh,
                    flags: libc::O_WRONLY as u32,
                    ..Default::default()
                };
                (op::RELEASE, node, 0, r.as_slice().to_vec(), &[])
            }
            Step::Unlink { n, .. } => {
                name = name_arg(&self.create_name(n));
                (op::UNLINK, ws.dir, 0, Vec::new(), &name)
            }
        };
        let req = Request {
            opcode,
            nodeid,
            unique: self.unique,
            args: &[&a1, a2],
            reply_len: Some(reply),
        };
        let head = fs::post(self.mem, q, self.slots.get(i), &req)?;
        let f = Flight {
            slot: i,
            unique: self.unique,
            opcode,
            step,
            t0,
        };
        Ok((head, f))
    }

    fn done(&mut self, t0: Instant, bytes: u64) {
        self.t.ops += 1;
        self.t.bytes += bytes;
        self.t.lat.push(t0.elapsed());
    }

    /// Handles a completion; returns the next step of the same operation, if any.
    fn complete(&mut self, f: Flight, used: u32) -> Result<Option<Step>> {
        let slot: Slot = self.slots.get(f.slot);
        let body = match fs::complete(self.mem, slot, f.opcode, f.unique, used) {
            Ok(n) => n,
            Err(e @ (FsError::Errno { .. } | FsError::BadReply { .. })) => {
                self.t.error(e);
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        let bs = self.a.bs;
        match f.step {
            Step::Lookup(i) => {
                let e: abi::EntryOut = fs::reply_obj(self.mem, slot, f.opcode, body)?;
                if e.nodeid != self.ws.files[i].1 {
                    self.t.verify_failures += 1;
                }
                self.t.lookups[i] += 1;
                self.done(f.t0, 0);
            }
            Step::Getattr(_) => {
                let _: abi::AttrOut = fs::reply_obj(self.mem, slot, f.opcode, body)?;
                self.done(f.t0, 0);
            }
            Step::Read(off) => {
                if u64::from(body) != bs {
                    self.t
                        .error(format!("READ at {off}: {body} bytes, expected {bs}"));
                    return Ok(None);
                }
                let good = if self.a.verify {
                    self.mem.read(slot.reply + 16, &mut self.rbuf)?;
                    let mut expect = vec![0u8; bs as usize];
                    fill_pattern(&mut expect, off);
                    expect == self.rbuf
                } else {
                    let mut w = [0u8; 8];
                    self.mem.read(slot.reply + 16, &mut w)?;
                    u64::from_le_bytes(w) == pattern_word(off)
                };
                if !good {
                    self.t.verify_failures += 1;
                }
                self.done(f.t0, bs);
            }
            Step::Create(n) => {
                let e: abi::EntryOut = fs::reply_obj(self.mem, slot, f.opcode, body)?;
                let mut o = abi::OpenOut::default();
                if body < 144 {
                    self.t
                        .error(format!("CREATE: {body}-byte reply, expected 144"));
                    return Ok(None);
                }
                self.mem.read(slot.reply + 16 + 128, o.as_mut_slice())?;
                return Ok(Some(Step::Write {
                    n,
                    node: e.nodeid,
                    fh: o.fh,
                }));
            }
            Step::Write { n, node, fh } => {
                let w: abi::WriteOut = fs::reply_obj(self.mem, slot, f.opcode, body)?;
                if u64::from(w.size) != bs {
                    self.t
                        .error(format!("WRITE: {} bytes written of {bs}", w.size));
                }
                return Ok(Some(Step::Release { n, node, fh }));
            }
            Step::Release { n, node, .. } => return Ok(Some(Step::Unlink { n, node })),
            Step::Unlink { node, .. } => {
                self.forgets.push(abi::ForgetOne {
                    nodeid: node,
                    nlookup: 1,
                });
                self.done(f.t0, bs);
            }
        }
        Ok(None)
    }

    /// Sends the collected FORGETs as one BATCH_FORGET on the hiprio queue and waits for the
    /// chain to come back (holding the queue meanwhile).
    fn flush_forgets(&mut self, hiprio: &Mutex<&mut SplitQueue>, slot: Slot) -> Result<()> {
        if self.forgets.is_empty() {
            return Ok(());
        }
        let b = abi::BatchForgetIn {
            count: self.forgets.len() as u32,
            dummy: 0,
        };
        let list: Vec<u8> = self
            .forgets
            .iter()
            .flat_map(|f| f.as_slice().to_vec())
            .collect();
        self.unique += 1;
        let req = Request {
            opcode: op::BATCH_FORGET,
            nodeid: 0,
            unique: self.unique,
            args: &[b.as_slice(), &list],
            reply_len: None,
        };
        let mut q = hiprio.lock().unwrap_or_else(|e| e.into_inner());
        let head = fs::post(self.mem, &mut q, slot, &req)?;
        q.kick()?;
        let start = Instant::now();
        loop {
            if let Some((id, _)) = q.pop_used(self.mem)? {
                if id != head {
                    bail!("hiprio queue returned descriptor {id}, not {head}");
                }
                break;
            }
            if start.elapsed() > STUCK {
                bail!("BATCH_FORGET not returned within {STUCK:?}");
            }
            if !self.a.poll {
                q.wait_call(Duration::from_millis(10))?;
            }
        }
        self.forgets.clear();
        Ok(())
    }

    /// The loop: fill the queue, then for each completion post the operation's next step or a
    /// new operation, until the runtime is over and everything in flight has completed.
    fn drive(
        &mut self,
        q: &mut SplitQueue,
        hiprio: &Mutex<&mut SplitQueue>,
        forget_slot: Slot,
        runtime: Duration,
    ) -> Result<()> {
        let mut in_flight: Vec<Option<Flight>> = vec![None; usize::from(u16::MAX) + 1];
        let start = Instant::now();
        for i in 0..self.a.iodepth {
            let step = self.new_op();
            let (head, f) = self.post(q, i, step, Instant::now())?;
            in_flight[usize::from(head)] = Some(f);
        }
        q.kick()?;
        let mut last_progress = Instant::now();
        let mut draining = false;
        loop {
            let mut progressed = false;
            while let Some((head, used)) = q.pop_used(self.mem)? {
                progressed = true;
                let Some(f) = in_flight[usize::from(head)].take() else {
                    bail!("backend completed descriptor {head}, which is not in flight");
                };
                let next = match self.complete(f, used)? {
                    Some(step) => Some((step, f.t0)),
                    None if !draining => Some((self.new_op(), Instant::now())),
                    None => None,
                };
                if let Some((step, t0)) = next {
                    let (head, nf) = self.post(q, f.slot, step, t0)?;
                    in_flight[usize::from(head)] = Some(nf);
                }
            }
            if self.forgets.len() >= FORGET_BATCH {
                self.flush_forgets(hiprio, forget_slot)?;
            }
            if progressed {
                last_progress = Instant::now();
                q.kick()?;
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
            if !self.a.poll && !progressed {
                q.wait_call(Duration::from_millis(10))?;
            }
        }
        self.flush_forgets(hiprio, forget_slot)
    }
}
