//! The VMM end of the handshake, step by step: receive the daemon's `HELLO`, decide and send
//! the `GRANT` (or a `REFUSE`), hand over the interrupt eventfds, then the access rings.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{
    control_on, io_err, Claims, ClientError, ForwardedDevice, GrantPolicy, GrantedIrq, Handle,
    Inner, RingClient, SockState,
};
use crate::handshake::{encode_refuse, Grant, Hello, Trigger, FEATURE_POSTED};
use crate::messages::{Control, IrqLine};
use crate::ring::{RingView, RING_BYTES};
use crate::sys::{EventFd, SeqSocket, SharedMem, MAX_MSG};

impl ForwardedDevice {
    /// Connects to the daemon listening at `path` and runs the handshake.
    pub fn connect(path: &Path, policy: &GrantPolicy) -> Result<(Claims, Handle), ClientError> {
        Self::attach(SeqSocket::connect(path)?, policy)
    }

    /// Runs the handshake on an already connected socket.
    pub fn attach(sock: SeqSocket, policy: &GrantPolicy) -> Result<(Claims, Handle), ClientError> {
        let mut buf = vec![0u8; MAX_MSG].into_boxed_slice();
        let hello = receive_hello(&sock, &mut buf, policy.timeout)?;
        let grant = send_grant(&sock, &hello, policy)?;
        let mut st = SockState { sock, seq: 0, buf };
        let irqs = set_irq_fds(&mut st, &hello, &grant, policy.timeout)?;
        let (rings, mem) = set_rings(&mut st, grant.vcpus, policy.timeout)?;
        let inner = Inner {
            name: hello.name.clone(),
            sock_fd: st.sock.as_fd().as_raw_fd(),
            sock: Mutex::new(st),
            posted_marks: rings.iter().map(|r| (r.view, AtomicU64::new(0))).collect(),
            rings: rings.into_iter().map(Mutex::new).collect(),
            windows: grant.windows.clone(),
            posted: grant.features & FEATURE_POSTED != 0,
            timeout: policy.timeout,
            dead: AtomicBool::new(false),
            _mem: mem,
        };
        let claims = Claims {
            class: hello.class,
            name: hello.name,
            windows: grant.windows,
            irqs,
            features: grant.features,
        };
        Ok((claims, Handle(Arc::new(inner))))
    }
}

/// Sends `REFUSE(why)` (best effort: the daemon may be gone) and returns `why`.
fn refuse(sock: &SeqSocket, why: String) -> String {
    let _ = sock.send(&encode_refuse(&why), &[]);
    why
}

/// Step 1: the daemon's `HELLO` (no fds may come with it). A malformed one is refused.
fn receive_hello(
    sock: &SeqSocket,
    buf: &mut [u8],
    timeout: Duration,
) -> Result<Hello, ClientError> {
    let mut fds = Vec::new();
    let n = sock.recv(buf, &mut fds, Some(timeout)).map_err(|e| {
        if e.kind() == io::ErrorKind::InvalidData {
            refuse(sock, e.to_string());
        }
        io_err(e)
    })?;
    if !fds.is_empty() {
        let why = format!("{} unexpected fds with HELLO", fds.len());
        return Err(ClientError::Refused(refuse(sock, why)));
    }
    Hello::decode(&buf[..n]).map_err(|e| {
        refuse(sock, e.to_string());
        e.into()
    })
}

/// Step 2: the policy's decision on the claims, sent as `GRANT` or `REFUSE`.
fn send_grant(sock: &SeqSocket, hello: &Hello, policy: &GrantPolicy) -> Result<Grant, ClientError> {
    let grant = policy
        .decide(hello)
        .map_err(|why| ClientError::Refused(refuse(sock, why)))?;
    sock.send(&grant.encode()?, &[]).map_err(io_err)?;
    Ok(grant)
}

/// Step 3: one eventfd per granted line (plus a resample eventfd for level lines), handed to
/// the daemon in `SET_IRQ_FDS`; the VMM registers the same eventfds as irqfds.
fn set_irq_fds(
    st: &mut SockState,
    hello: &Hello,
    grant: &Grant,
    timeout: Duration,
) -> Result<Vec<GrantedIrq>, ClientError> {
    let mut irqs = Vec::new();
    let mut lines = Vec::new();
    for (i, (q, &gsi)) in hello.irqs.iter().zip(&grant.gsis).enumerate() {
        let resample = match q.trigger {
            Trigger::Level => Some(EventFd::new()?),
            Trigger::Edge => None,
        };
        irqs.push(GrantedIrq {
            gsi,
            trigger: q.trigger,
            event: EventFd::new()?,
            resample,
        });
        lines.push(IrqLine {
            line: i as u8,
            gsi,
            trigger: q.trigger,
        });
    }
    if !lines.is_empty() {
        let fds: Vec<BorrowedFd<'_>> = irqs
            .iter()
            .flat_map(|g| {
                std::iter::once(g.event.as_fd()).chain(g.resample.as_ref().map(|r| r.as_fd()))
            })
            .collect();
        control_on(st, &Control::SetIrqFds { lines }, &fds, timeout)?;
    }
    Ok(irqs)
}

/// Step 4: with the ring feature granted, one shared-memory access ring per vCPU with its two
/// doorbells, handed to the daemon in `SET_RINGS` (the memory fd, then the doorbells).
fn set_rings(
    st: &mut SockState,
    vcpus: u16,
    timeout: Duration,
) -> Result<(Vec<RingClient>, Option<SharedMem>), ClientError> {
    if vcpus == 0 {
        return Ok((Vec::new(), None));
    }
    let mem = SharedMem::create("rqemu-rings", usize::from(vcpus) * RING_BYTES)?;
    let mut rings = Vec::new();
    for i in 0..usize::from(vcpus) {
        rings.push(RingClient {
            view: RingView::new(&mem, i)
                .ok_or(ClientError::Io(io::ErrorKind::InvalidInput.into()))?,
            head: 0,
            to_dev: EventFd::new()?,
            to_vmm: EventFd::new()?,
        });
    }
    let mut fds = vec![mem.as_fd()];
    for r in &rings {
        fds.push(r.to_dev.as_fd());
        fds.push(r.to_vmm.as_fd());
    }
    control_on(st, &Control::SetRings { vcpus }, &fds, timeout)?;
    Ok((rings, Some(mem)))
}
