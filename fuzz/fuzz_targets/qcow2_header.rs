//! Fuzzes the qcow2 header parser: any bytes in, a header or an error out, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = rqemu_block_backend::image::qcow2::parse_header(data);
});
