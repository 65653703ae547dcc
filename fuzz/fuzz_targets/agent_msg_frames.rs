//! Fuzzes rqemu-run's decoding of the guest agent's control channel: the input is the byte
//! stream from the guest, read frame by frame as the monitor does (`read_msg::<AgentMsg>`)
//! until it ends or fails. Every decoded message must encode back to a frame that decodes to
//! itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rqemu_agent_protocol::{read_msg, write_msg, AgentMsg};

fuzz_target!(|data: &[u8]| {
    let mut r = data;
    while let Ok(Some(msg)) = read_msg::<_, AgentMsg>(&mut r) {
        let mut wire = Vec::new();
        write_msg(&mut wire, &msg).expect("a decoded message encodes");
        let again = read_msg::<_, AgentMsg>(&mut &wire[..]).expect("its frame decodes");
        assert_eq!(again, Some(msg));
    }
});
