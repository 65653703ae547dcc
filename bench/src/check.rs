//! `rqemu-bench blk --check`: conformance checks of a vhost-user-blk backend. Each check
//! prints PASS or FAIL with what the backend did; the exit status is non-zero if any failed.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Result};
use rqemu_vhost_driver::blk::{self, Slots};
use rqemu_vhost_driver::{Device, DriverOptions};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

const T: Duration = Duration::from_secs(10);

type Check = fn(&Path) -> Result<String>;

fn connect(sock: &Path, queues: u16) -> Result<Device> {
    let opts = DriverOptions {
        num_queues: queues,
        mem_size: 16 << 20,
        ..Default::default()
    };
    Ok(Device::connect(sock, &opts)?)
}

fn expect_status(what: &str, got: u8, want: &[u32]) -> Result<()> {
    if want.iter().any(|&w| w as u8 == got) {
        Ok(())
    } else {
        bail!("{what}: status {got}, expected one of {want:?}")
    }
}

fn negotiation(sock: &Path) -> Result<String> {
    let mut d = connect(sock, 1)?;
    if d.offered_features & (1 << VIRTIO_F_VERSION_1) == 0 {
        bail!("VIRTIO_F_VERSION_1 not offered");
    }
    let cfg = d.config(0, 24)?;
    let cap = u64::from_le_bytes(cfg[0..8].try_into()?);
    if cap == 0 {
        bail!("capacity 0");
    }
    if d.offered_features & (1 << VIRTIO_BLK_F_BLK_SIZE) != 0 {
        let bs = u32::from_le_bytes(cfg[20..24].try_into()?);
        if bs < 512 || !bs.is_power_of_two() {
            bail!("blk_size {bs} is not a power of two >= 512");
        }
    }
    Ok(format!(
        "features {:#x}, capacity {cap} sectors",
        d.offered_features
    ))
}

fn roundtrip(sock: &Path) -> Result<String> {
    let mut d = connect(sock, 1)?;
    let s = Slots::new(&mut d, 2, 65536)?;
    let mut data: Vec<u8> = (0..65536u32).map(|i| (i * 7 + 3) as u8).collect();
    let (st, _) = blk::request(
        &mut d,
        0,
        s.get(0),
        VIRTIO_BLK_T_OUT,
        8,
        &mut data.clone(),
        T,
    )?;
    expect_status("write", st, &[VIRTIO_BLK_S_OK])?;
    let mut back = vec![0u8; data.len()];
    let (st, used) = blk::request(&mut d, 0, s.get(1), VIRTIO_BLK_T_IN, 8, &mut back, T)?;
    expect_status("read", st, &[VIRTIO_BLK_S_OK])?;
    if back != data {
        bail!("read back differs from what was written");
    }
    if used as usize != data.len() + 1 {
        bail!(
            "used length {used} for a {}-byte read (expected data + status)",
            data.len()
        );
    }
    data.clear();
    if d.offered_features & (1 << VIRTIO_BLK_F_FLUSH) != 0 {
        let (st, _) = blk::request(&mut d, 0, s.get(0), VIRTIO_BLK_T_FLUSH, 0, &mut data, T)?;
        expect_status("flush", st, &[VIRTIO_BLK_S_OK])?;
    }
    Ok("64 KiB write/read/flush".into())
}

fn out_of_range(sock: &Path) -> Result<String> {
    let mut d = connect(sock, 1)?;
    let cfg = d.config(0, 8)?;
    let cap = u64::from_le_bytes(cfg[0..8].try_into()?);
    let s = Slots::new(&mut d, 1, 4096)?;
    let mut b = vec![0u8; 4096];
    let (st, _) = blk::request(&mut d, 0, s.get(0), VIRTIO_BLK_T_IN, cap - 1, &mut b, T)?;
    expect_status("read across the end", st, &[VIRTIO_BLK_S_IOERR])?;
    let (st, _) = blk::request(
        &mut d,
        0,
        s.get(0),
        VIRTIO_BLK_T_IN,
        u64::MAX / 4,
        &mut b,
        T,
    )?;
    expect_status("read far beyond the end", st, &[VIRTIO_BLK_S_IOERR])?;
    Ok("IOERR for reads past the end".into())
}

fn unknown_type(sock: &Path) -> Result<String> {
    let mut d = connect(sock, 1)?;
    let s = Slots::new(&mut d, 1, 512)?;
    let (st, _) = blk::request(&mut d, 0, s.get(0), 0x7777, 0, &mut [], T)?;
    expect_status("unknown request type", st, &[VIRTIO_BLK_S_UNSUPP])?;
    Ok("UNSUPP for an unknown type".into())
}

/// Sends a raw chain and waits for it; then checks the device still serves a good request.
fn survives(sock: &Path, chain: &[(u64, u32, bool)], what: &str) -> Result<String> {
    let mut d = connect(sock, 1)?;
    let s = Slots::new(&mut d, 1, 4096)?;
    let Device { mem, queues, .. } = &mut d;
    let q = &mut queues[0];
    // The header of slot 0 is a valid IN request for sector 0.
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    mem.write(s.get(0).header, &h)?;
    let chain: Vec<(u64, u32, bool)> = chain
        .iter()
        .map(|&(a, l, w)| match a {
            1 => (s.get(0).header, l, w),
            2 => (s.get(0).data, l, w),
            3 => (s.get(0).status, l, w),
            _ => (a, l, w),
        })
        .collect();
    q.add(mem, &chain)?;
    q.kick()?;
    let start = std::time::Instant::now();
    let mut completed = false;
    while start.elapsed() < Duration::from_secs(2) {
        if q.pop_used(mem)?.is_some() {
            completed = true;
            break;
        }
        q.wait_call(Duration::from_millis(20))?;
    }
    let mut b = vec![0u8; 512];
    let (st, _) = blk::request(&mut d, 0, s.get(0), VIRTIO_BLK_T_IN, 0, &mut b, T)
        .map_err(|e| anyhow::anyhow!("device dead after {what}: {e}"))?;
    expect_status("read after the bad request", st, &[VIRTIO_BLK_S_OK])?;
    Ok(format!(
        "{what}: {}; device still serves",
        if completed { "completed" } else { "dropped" }
    ))
}

fn short_header(sock: &Path) -> Result<String> {
    survives(sock, &[(1, 8, false), (3, 1, true)], "8-byte header")
}

fn data_outside_memory(sock: &Path) -> Result<String> {
    survives(
        sock,
        &[(1, 16, false), (0x7fff_0000_0000, 4096, true), (3, 1, true)],
        "buffer outside memory",
    )
}

fn no_status_byte(sock: &Path) -> Result<String> {
    survives(
        sock,
        &[(1, 16, false), (2, 512, false)],
        "no writable status byte",
    )
}

fn reconnect(sock: &Path) -> Result<String> {
    let mut d = connect(sock, 1)?;
    let s = Slots::new(&mut d, 1, 512)?;
    let mut data = vec![0xa5u8; 512];
    let (st, _) = blk::request(&mut d, 0, s.get(0), VIRTIO_BLK_T_OUT, 3, &mut data, T)?;
    expect_status("write", st, &[VIRTIO_BLK_S_OK])?;
    drop(d);
    let mut d = connect(sock, 1)?;
    let s = Slots::new(&mut d, 1, 512)?;
    let mut back = vec![0u8; 512];
    let (st, _) = blk::request(&mut d, 0, s.get(0), VIRTIO_BLK_T_IN, 3, &mut back, T)?;
    expect_status("read after reconnect", st, &[VIRTIO_BLK_S_OK])?;
    if back != data {
        bail!("data written before the reconnect is gone");
    }
    Ok("data survives a frontend reconnect".into())
}

fn queue_stop_restart(sock: &Path) -> Result<String> {
    let mut d = connect(sock, 1)?;
    let s = Slots::new(&mut d, 1, 512)?;
    for _ in 0..3 {
        let (st, _) = blk::request(&mut d, 0, s.get(0), VIRTIO_BLK_T_IN, 0, &mut [0u8; 512], T)?;
        expect_status("read", st, &[VIRTIO_BLK_S_OK])?;
    }
    let base = d.stop_queue(0)?;
    if base != 3 {
        bail!("GET_VRING_BASE returned {base} after 3 requests");
    }
    Ok("GET_VRING_BASE reports the processed requests".into())
}

fn multi_queue(sock: &Path) -> Result<String> {
    let d = connect(sock, 1)?;
    if !d.protocol_features.contains(vhost_mq()) {
        return Ok("MQ not offered (single queue)".into());
    }
    drop(d);
    let mut d = connect(sock, 2)?;
    let s = Slots::new(&mut d, 2, 512)?;
    for q in 0..2 {
        let (st, _) = blk::request(&mut d, q, s.get(q), VIRTIO_BLK_T_IN, 0, &mut [0u8; 512], T)?;
        expect_status("read", st, &[VIRTIO_BLK_S_OK])?;
    }
    Ok("2 queues serve requests".into())
}

fn vhost_mq() -> rqemu_vhost_driver::ProtocolFeatures {
    rqemu_vhost_driver::ProtocolFeatures::MQ
}

/// Runs every check; returns the number of failures.
pub fn run(sock: &Path) -> usize {
    let checks: [(&str, Check); 10] = [
        ("negotiation and config", negotiation),
        ("write/read/flush round trip", roundtrip),
        ("out-of-range requests", out_of_range),
        ("unknown request type", unknown_type),
        ("malformed: short header", short_header),
        (
            "malformed: buffer outside guest memory",
            data_outside_memory,
        ),
        ("malformed: no status byte", no_status_byte),
        ("queue stop (GET_VRING_BASE)", queue_stop_restart),
        ("reconnect", reconnect),
        ("multi-queue", multi_queue),
    ];
    report(&checks, |f| f(sock))
}

/// Runs named checks in order, printing a PASS/FAIL line each and a summary; returns the
/// number that failed (the blk and fs conformance modes share it).
pub fn report<C>(checks: &[(&str, C)], run: impl Fn(&C) -> Result<String>) -> usize {
    let mut failed = 0;
    for (name, c) in checks {
        match run(c) {
            Ok(msg) => println!("PASS  {name}: {msg}"),
            Err(e) => {
                failed += 1;
                println!("FAIL  {name}: {e:#}");
            }
        }
    }
    println!("check: {} passed, {failed} failed", checks.len() - failed);
    failed
}
