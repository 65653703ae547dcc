//! rqemu-net killed under load, shared by the rqemu-vmm and the QEMU frontend tests: starting a
//! daemon again on the same socket path (on a held tap or its own), and the host end of TCP
//! transfers that reports when each direction crossed a kill point.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::daemon::Daemon;
use crate::net::{self, NetDaemonOptions, NetNs, DOWN_PORT, HOST_IP, TAP, UP_PORT};

/// Starts rqemu-net on `sock` (on the held `taps`, or its own tap once the previous one's is
/// gone: a daemon just killed keeps it a moment, its sandboxed child is still exiting).
pub fn start_net(ns: &NetNs, dir: &Path, sock: &Path, taps: Option<&[OwnedFd]>) -> Daemon {
    let start = Instant::now();
    loop {
        while taps.is_none() && ns.ip(&["link", "show", TAP]).is_ok() {
            assert!(start.elapsed() < Duration::from_secs(60), "old tap stays");
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = std::fs::remove_file(sock);
        let opts = NetDaemonOptions::default();
        let started = match taps {
            Some(t) => net::spawn_daemon_on_taps(ns, dir, sock, &opts, t),
            None => net::spawn_daemon(ns, dir, sock, &opts),
        };
        match started {
            Ok(d) => return d,
            Err(e) if start.elapsed() < Duration::from_secs(60) => {
                eprintln!("rqemu-net did not start, again: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("{e}"),
        }
    }
}

/// The host end of one upload (guest → host, port [`UP_PORT`]) and one download (host →
/// guest, [`DOWN_PORT`], the bytes `down`) of `transfer` bytes each, with a small send buffer so
/// that bytes written are close to bytes the guest took. Sends `"listening"` on `events`, then
/// a line each time a direction crosses one of `kills` evenly spread kill points. Returns the
/// bytes received.
pub fn serve(
    events: mpsc::Sender<String>,
    down: Vec<u8>,
    transfer: usize,
    kills: usize,
) -> std::io::Result<Vec<u8>> {
    // Kill point k of K (1..=K): k/(K+1) of the transfer.
    let point = |k: usize| k * transfer / (kills + 1);
    let up = TcpListener::bind((HOST_IP, UP_PORT))?;
    let dn = TcpListener::bind((HOST_IP, DOWN_PORT))?;
    let _ = events.send("listening".into());
    let (mut s, _) = up.accept()?;
    s.set_read_timeout(Some(Duration::from_secs(300)))?;
    let mut got = Vec::with_capacity(transfer);
    let mut buf = vec![0u8; 64 << 10];
    let mut k = 1;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        if k <= kills && got.len() >= point(k) {
            let _ = events.send(format!("upload at {} bytes", got.len()));
            k += 1;
        }
    }
    drop(s);
    eprintln!("host peer: upload of {} bytes done", got.len());
    let (mut s, _) = dn.accept()?;
    s.set_write_timeout(Some(Duration::from_secs(300)))?;
    let sock = small_send_buffer(&s);
    let (mut k, mut sent) = (1, 0);
    for chunk in down.chunks(16 << 10) {
        s.write_all(chunk)?;
        sent += chunk.len();
        if k <= kills && sent >= point(k) {
            let _ = events.send(format!("download at {sent} bytes (send buffer {sock})"));
            k += 1;
        }
    }
    s.shutdown(Shutdown::Write)?;
    eprintln!("host peer: download written");
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink);
    Ok(got)
}

/// Shrinks the socket's send buffer to 32 KiB and returns what the kernel made of it.
fn small_send_buffer(s: &TcpStream) -> i32 {
    let want: libc::c_int = 32 << 10;
    // SAFETY: setsockopt/getsockopt on a socket we own with pointers to live locals of the
    // sizes given.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&want as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        let mut got: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&mut got as *mut libc::c_int).cast(),
            &mut len,
        );
        got
    }
}
