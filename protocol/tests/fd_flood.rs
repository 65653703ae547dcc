//! Fds attached to rejected messages are closed, not leaked. Alone in its own test binary so
//! no other test opens or closes fds meanwhile.

use std::os::fd::AsFd;

use rqemu_protocol::handshake::{Hello, IrqRequest, FEATURE_RING};
use rqemu_protocol::sys::{EventFd, SeqSocket};
use rqemu_protocol::{
    ClientError, DeviceClass, ForwardedDevice, GrantPolicy, Space, Trigger, Window,
};

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count()
}

#[test]
fn flooded_fds_are_closed() {
    let hello = Hello {
        class: DeviceClass::Serial,
        name: "flood".into(),
        features: FEATURE_RING,
        windows: vec![Window {
            space: Space::Pio,
            base: 0x3f8,
            size: 8,
            flags: 0,
        }],
        irqs: vec![IrqRequest {
            trigger: Trigger::Edge,
            gsi_hint: None,
        }],
    }
    .encode()
    .unwrap();
    let evs: Vec<_> = (0..200).map(|_| EventFd::new().unwrap()).collect();
    let before = open_fds();
    for count in [10usize, 64, 65, 200] {
        let (a, b) = SeqSocket::pair().unwrap();
        let fds: Vec<_> = evs[..count].iter().map(|e| e.as_fd()).collect();
        b.send(&hello, &fds).unwrap();
        let r = ForwardedDevice::attach(a, &GrantPolicy::isa_default(1));
        assert!(
            matches!(r, Err(ClientError::Refused(_)) | Err(ClientError::Io(_))),
            "{count} fds: {r:?}"
        );
        drop(b);
        assert_eq!(
            open_fds(),
            before,
            "fds leaked after a HELLO with {count} fds"
        );
    }
}
