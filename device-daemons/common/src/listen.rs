//! The daemon's listening socket: the one routine of [`rqemu_protocol::listen`] (stale socket
//! replaced, regular file never removed, live socket refused, inherited fd checked), here as a
//! `UnixListener` for the vhost-user daemons; the forwarding daemons take it as a
//! [`SeqListener`](rqemu_protocol::sys::SeqListener).

use std::os::unix::net::UnixListener;

pub use rqemu_protocol::listen::{Endpoint, ListenError, SocketType};

/// Opens the `SOCK_STREAM` listening socket of a vhost-user daemon.
pub fn stream(endpoint: &Endpoint) -> Result<UnixListener, ListenError> {
    endpoint.listen(SocketType::Stream).map(UnixListener::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_listener_accepts_and_refuses_a_second_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let e = Endpoint::Path(dir.path().join("s.sock"));
        let l = stream(&e).unwrap();
        let _c = std::os::unix::net::UnixStream::connect(dir.path().join("s.sock")).unwrap();
        l.accept().unwrap();
        assert!(matches!(stream(&e), Err(ListenError::InUse(_))));
    }
}
