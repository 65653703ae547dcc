//! Fuzzes the virtio-net TX path's header and frame validation with guest-controlled bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    rqemu_net_backend::header::fuzz_tx_packet(data);
});
