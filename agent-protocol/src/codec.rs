//! Length-prefixed postcard frames over any byte stream.

use std::io::{self, Read, Write};

use serde::{de::DeserializeOwned, Serialize};

/// Largest frame accepted (a `Create` with copied files is the biggest message).
pub const MAX_FRAME: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("control channel I/O: {0}")]
    Io(#[from] io::Error),
    #[error("frame of {0} bytes is over the {MAX_FRAME}-byte limit")]
    TooBig(usize),
    #[error("malformed message: {0}")]
    Decode(postcard::Error),
    #[error("cannot encode message: {0}")]
    Encode(postcard::Error),
    #[error("the channel closed in the middle of a frame")]
    Truncated,
}

/// Writes one frame (length and body in one `write_all`, so frames from threads sharing a
/// writer behind a lock never interleave).
pub fn write_msg<W: Write, T: Serialize>(w: &mut W, msg: &T) -> Result<(), Error> {
    let body = postcard::to_stdvec(msg).map_err(Error::Encode)?;
    if body.len() > MAX_FRAME {
        return Err(Error::TooBig(body.len()));
    }
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    w.write_all(&frame)?;
    w.flush()?;
    Ok(())
}

/// Reads one frame; `Ok(None)` on a clean end of stream before a frame starts.
pub fn read_msg<R: Read, T: DeserializeOwned>(r: &mut R) -> Result<Option<T>, Error> {
    let mut len = [0u8; 4];
    match read_full(r, &mut len)? {
        0 => return Ok(None),
        4 => {}
        _ => return Err(Error::Truncated),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(Error::TooBig(len));
    }
    let mut body = vec![0u8; len];
    if read_full(r, &mut body)? != len {
        return Err(Error::Truncated);
    }
    postcard::from_bytes(&body).map(Some).map_err(Error::Decode)
}

/// Reads until `buf` is full or the stream ends; returns how much was read.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AgentMsg, ContainerSpec, ExitStatus, HostMsg, Process};

    #[test]
    fn round_trip_of_every_kind_in_one_stream() {
        let spec = ContainerSpec {
            hostname: Some("c1".into()),
            process: Process {
                args: vec!["/bin/echo".into(), "hi".into()],
                ..Default::default()
            },
            ..Default::default()
        };
        let host = [
            HostMsg::Create(Box::new(spec)),
            HostMsg::Start,
            HostMsg::Stdin(b"abc".to_vec()),
            HostMsg::CloseStdin,
            HostMsg::Signal(15),
            HostMsg::Resize { rows: 24, cols: 80 },
        ];
        let mut wire = Vec::new();
        for m in &host {
            write_msg(&mut wire, m).unwrap();
        }
        let mut r = &wire[..];
        for m in &host {
            assert_eq!(read_msg::<_, HostMsg>(&mut r).unwrap().as_ref(), Some(m));
        }
        assert!(read_msg::<_, HostMsg>(&mut r).unwrap().is_none());

        let mut wire = Vec::new();
        let agent = AgentMsg::Exited(ExitStatus::Signal(9));
        write_msg(&mut wire, &agent).unwrap();
        assert_eq!(
            read_msg::<_, AgentMsg>(&mut &wire[..]).unwrap(),
            Some(agent)
        );
    }

    #[test]
    fn network_interfaces_round_trip() {
        use crate::{Ipv4Cidr, Ipv4Route, NetInterface};
        let cidr = |a: [u8; 4], p| Ipv4Cidr {
            addr: a.into(),
            prefix_len: p,
        };
        let spec = ContainerSpec {
            network: vec![NetInterface {
                name: "eth0".into(),
                mac: [0x0a, 0x58, 10, 88, 0, 2],
                mtu: 1450,
                addresses: vec![cidr([10, 88, 0, 2], 16), cidr([192, 168, 7, 9], 24)],
                routes: vec![
                    Ipv4Route {
                        destination: cidr([0, 0, 0, 0], 0),
                        gateway: Some([10, 88, 0, 1].into()),
                    },
                    Ipv4Route {
                        destination: cidr([172, 16, 0, 0], 12),
                        gateway: None,
                    },
                ],
            }],
            ..Default::default()
        };
        let msg = HostMsg::Create(Box::new(spec));
        let mut wire = Vec::new();
        write_msg(&mut wire, &msg).unwrap();
        assert_eq!(read_msg::<_, HostMsg>(&mut &wire[..]).unwrap(), Some(msg));
    }

    #[test]
    fn bad_frames_are_errors_not_panics() {
        // Over the limit.
        let wire = (MAX_FRAME as u32 + 1).to_le_bytes();
        assert!(matches!(
            read_msg::<_, HostMsg>(&mut &wire[..]),
            Err(Error::TooBig(_))
        ));
        // Truncated length and truncated body.
        assert!(matches!(
            read_msg::<_, HostMsg>(&mut &[1u8, 0][..]),
            Err(Error::Truncated)
        ));
        assert!(matches!(
            read_msg::<_, HostMsg>(&mut &[5u8, 0, 0, 0, 1][..]),
            Err(Error::Truncated)
        ));
        // Garbage body.
        let wire = [2u8, 0, 0, 0, 0xff, 0xff];
        assert!(matches!(
            read_msg::<_, HostMsg>(&mut &wire[..]),
            Err(Error::Decode(_))
        ));
    }

    #[test]
    fn shell_codes() {
        assert_eq!(ExitStatus::Code(3).shell_code(), 3);
        assert_eq!(ExitStatus::Signal(9).shell_code(), 137);
    }
}
