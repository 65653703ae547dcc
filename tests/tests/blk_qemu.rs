//! `rqemu-blk` with QEMU TCG (`-M microvm`, modern virtio-mmio, memfd memory) as the vhost-user
//! frontend and the Linux virtio-blk driver in the guest: data written by the guest (direct,
//! buffered, fsync'ed; aligned and unaligned; discards and write-zeroes) must read back in the
//! guest and be exactly in the image on the host; every qcow2 must pass `qemu-img check`.
//!
//! Needs: `scripts/install-deps.sh`, `scripts/guest-assets.sh`, `cargo build --workspace --bins`.

use rqemu_e2e::blk::scenario::{self, Backing, Workloads};
use rqemu_e2e::blk::BlkBackend::Rqemu;
use rqemu_e2e::qemu_img::Format;

fn ok(r: Result<(), scenario::ScenarioError>) {
    r.unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn rqemu_blk_raw_workload_with_serial() {
    ok(Workloads {
        serial: Some("rqemu-raw-0001".into()),
        ..Workloads::new(Rqemu, Format::Raw)
    }
    .run());
}

/// The guest's workload (O_DIRECT and buffered writes, fsync, discards, write-zeroes, read
/// back and checked in the guest and on the host) with the image opened O_DIRECT and requests
/// in flight on io_uring; then on two queues, and with the synchronous engine.
#[test]
fn rqemu_blk_raw_cache_none_workloads() {
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    ok(Workloads {
        extra: args(&["--cache", "none", "--aio", "io-uring"]),
        ..Workloads::new(Rqemu, Format::Raw)
    }
    .run());
    ok(Workloads {
        queues: 2,
        seed: 5,
        extra: args(&["--cache", "none", "--aio", "io-uring"]),
        ..Workloads::new(Rqemu, Format::Raw)
    }
    .run());
    ok(Workloads {
        seed: 9,
        extra: args(&["--cache", "directsync", "--aio", "sync"]),
        ..Workloads::new(Rqemu, Format::Raw)
    }
    .run());
}

/// The same guest workload on qcow2 with guest data clusters O_DIRECT (fresh image, and over
/// a raw backing file: copy-on-write), then `qemu-img check`.
#[test]
fn rqemu_blk_qcow2_cache_none_workloads() {
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    ok(Workloads {
        extra: args(&["--cache", "none"]),
        ..Workloads::new(Rqemu, Format::Qcow2)
    }
    .run());
    ok(Workloads {
        backing: Backing::Raw,
        seed: 4,
        extra: args(&["--cache", "none"]),
        ..Workloads::new(Rqemu, Format::Qcow2)
    }
    .run());
}

#[test]
fn rqemu_blk_qcow2_fresh_workload() {
    ok(Workloads::new(Rqemu, Format::Qcow2).run());
}

#[test]
fn rqemu_blk_qcow2_on_raw_backing_workload() {
    ok(Workloads {
        backing: Backing::Raw,
        serial: Some("bk".into()),
        ..Workloads::new(Rqemu, Format::Qcow2)
    }
    .run());
}

#[test]
fn rqemu_blk_qcow2_on_compressed_qcow2_backing_workload() {
    ok(Workloads {
        backing: Backing::Qcow2Compressed,
        ..Workloads::new(Rqemu, Format::Qcow2)
    }
    .run());
}

#[test]
fn rqemu_blk_two_queues_concurrent_workloads() {
    ok(Workloads {
        queues: 2,
        ..Workloads::new(Rqemu, Format::Qcow2)
    }
    .run());
}

#[test]
fn rqemu_blk_readonly_rejects_writes() {
    ok(scenario::readonly(Rqemu));
}

#[test]
fn rqemu_blk_survives_frontend_disconnect() {
    ok(scenario::reconnect(Rqemu));
}

#[test]
fn rqemu_blk_qcow2_flushed_data_survives_sigkill() {
    ok(Workloads {
        kill: true,
        seed: 3,
        ..Workloads::new(Rqemu, Format::Qcow2)
    }
    .run());
}
