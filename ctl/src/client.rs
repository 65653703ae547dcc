//! One API call: connect, send the request, read the whole answer (the server closes the
//! connection after it), parse it with `httparse`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long to wait for an answer (a pause waits for every vCPU to park: up to 10 s).
const TIMEOUT: Duration = Duration::from_secs(30);
/// Largest answer accepted.
const MAX_ANSWER: u64 = 1 << 20;

/// Errors of an API call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached.
    #[error("connecting to {0} (is rqemu-vmm running with --api-socket there?)")]
    Connect(PathBuf, #[source] std::io::Error),
    /// Sending or receiving failed.
    #[error("talking to {0}")]
    Io(PathBuf, #[source] std::io::Error),
    /// The answer is not HTTP.
    #[error("malformed answer from {0}: {1}")]
    Malformed(PathBuf, String),
}

/// A parsed answer.
#[derive(Debug)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// Body (maybe empty).
    pub body: Vec<u8>,
}

impl Answer {
    /// 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The body as JSON, if it is any.
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// The `error` field of an error answer (else the status and raw body).
    pub fn error_message(&self) -> String {
        match self.json().as_ref().and_then(|v| v["error"].as_str()) {
            Some(e) => format!("{e} (HTTP {})", self.status),
            None => format!(
                "HTTP {}: {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            ),
        }
    }
}

/// Sends `method path` to the API socket and returns the answer.
pub fn call(socket: &Path, method: &str, path: &str) -> Result<Answer, ClientError> {
    let io = |e| ClientError::Io(socket.to_path_buf(), e);
    let mut s = UnixStream::connect(socket).map_err(|e| ClientError::Connect(socket.into(), e))?;
    s.set_read_timeout(Some(TIMEOUT)).map_err(io)?;
    s.set_write_timeout(Some(TIMEOUT)).map_err(io)?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).map_err(io)?;
    let mut raw = Vec::new();
    s.take(MAX_ANSWER).read_to_end(&mut raw).map_err(io)?;
    parse(&raw).map_err(|m| ClientError::Malformed(socket.to_path_buf(), m))
}

/// Parses a complete answer (head + `Content-Length` body).
fn parse(raw: &[u8]) -> Result<Answer, String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let head = match resp.parse(raw) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err("truncated head".into()),
        Err(e) => return Err(e.to_string()),
    };
    let status = resp.code.ok_or("no status")?;
    let len = resp
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .map(|h| {
            std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or("invalid Content-Length")
        })
        .transpose()?
        .unwrap_or(raw.len() - head);
    let body = raw
        .get(head..head + len)
        .ok_or("body shorter than its Content-Length")?;
    Ok(Answer {
        status,
        body: body.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_answers_and_error_bodies() {
        let a = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\n{\"state\":\"x\"}").unwrap();
        assert!(a.is_success());
        assert_eq!(a.json().unwrap()["state"], "x");
        let e = parse(b"HTTP/1.1 409 Conflict\r\nContent-Length: 15\r\n\r\n{\"error\":\"no\"}\n")
            .unwrap();
        assert!(!e.is_success());
        assert_eq!(e.error_message(), "no (HTTP 409)");
        let n = parse(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n").unwrap();
        assert_eq!((n.status, n.body.len()), (204, 0));
        assert!(parse(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{}").is_err());
        assert!(parse(b"garbage\r\n\r\n").is_err());
        assert!(parse(b"HTTP/1.1 200 OK\r\n").is_err());
    }
}
