//! The block scenarios of `blk_qemu.rs` against QEMU's own vhost-user-blk backend
//! (`qemu-storage-daemon --export type=vhost-user-blk`): a check of the tests themselves — a
//! scenario that fails here is wrong, not `rqemu-blk`. Not here: the serial test (QSD has no
//! such option) and the SIGKILL test — QSD's export reports a write-through cache, so the guest
//! never sends FLUSH, yet QSD keeps qcow2 metadata in memory: after SIGKILL, data written into
//! previously discarded clusters is lost (seen with QEMU 10.0.2).

use rqemu_e2e::blk::scenario::{self, Backing, Workloads};
use rqemu_e2e::blk::BlkBackend::Qsd;
use rqemu_e2e::qemu_img::Format;

fn ok(r: Result<(), scenario::ScenarioError>) {
    r.unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn qsd_raw_workload() {
    ok(Workloads::new(Qsd, Format::Raw).run());
}

#[test]
fn qsd_qcow2_compressed_backing_two_queues() {
    ok(Workloads {
        backing: Backing::Qcow2Compressed,
        queues: 2,
        ..Workloads::new(Qsd, Format::Qcow2)
    }
    .run());
}

#[test]
fn qsd_readonly() {
    ok(scenario::readonly(Qsd));
}

#[test]
fn qsd_survives_frontend_disconnect() {
    ok(scenario::reconnect(Qsd));
}
