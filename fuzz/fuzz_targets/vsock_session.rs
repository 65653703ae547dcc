//! Fuzzes rqemu-vsock's connection logic: guest TX packets, RX buffers, host socket events,
//! host data and `CONNECT` handshakes in any order, against a real muxer over UNIX sockets
//! (input layout: `rqemu_vsock_backend::fuzz`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    rqemu_vsock_backend::fuzz::fuzz_session(data);
});
