//! HTTP/1.1 framing of the management API: one request read from a stream (parsed by
//! `httparse`, bounded in size), one response written, then the connection is closed.

use std::io::{Read, Write};

use super::ApiError;

/// Largest request (head + body) the API reads.
pub const MAX_REQUEST: usize = 64 * 1024;
/// Most headers a request may carry.
const MAX_HEADERS: usize = 32;

/// A parsed request: method, path (query string removed) and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `PUT`, ...
    pub method: String,
    /// `/api/v1/...`.
    pub path: String,
    /// The body (`Content-Length` bytes).
    pub body: Vec<u8>,
}

/// Reads one request from `stream`.
pub fn read_request(stream: &mut impl Read) -> Result<Request, ApiError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).map_err(ApiError::Io)?;
        if n == 0 {
            return Err(ApiError::BadRequest("connection closed mid-request".into()));
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_REQUEST {
            return Err(ApiError::TooLarge);
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        let head_len = match req.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => continue,
            Err(e) => return Err(ApiError::BadRequest(e.to_string())),
        };
        let method = req.method.unwrap_or_default().to_string();
        let path = req.path.unwrap_or_default();
        let path = path.split('?').next().unwrap_or_default().to_string();
        let mut body_len = 0usize;
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                body_len = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.trim().parse().ok())
                    .ok_or_else(|| ApiError::BadRequest("invalid Content-Length".into()))?;
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                return Err(ApiError::BadRequest(
                    "Transfer-Encoding is not supported: send a Content-Length".into(),
                ));
            }
        }
        if head_len.saturating_add(body_len) > MAX_REQUEST {
            return Err(ApiError::TooLarge);
        }
        while buf.len() < head_len + body_len {
            let n = stream.read(&mut chunk).map_err(ApiError::Io)?;
            if n == 0 {
                return Err(ApiError::BadRequest("connection closed mid-body".into()));
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let body = buf[head_len..head_len + body_len].to_vec();
        return Ok(Request { method, path, body });
    }
}

/// The reason phrase of the statuses the API uses.
fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Payload Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        _ => "Unknown",
    }
}

/// Writes a response; a `body` is sent as `application/json`.
pub fn write_response(
    stream: &mut impl Write,
    status: u16,
    body: Option<&[u8]>,
) -> std::io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nServer: rqemu-vmm\r\n",
        reason(status)
    );
    match body {
        Some(b) => out.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        )),
        None => out.push_str("Content-Length: 0\r\n"),
    }
    out.push_str("Connection: close\r\n\r\n");
    let mut bytes = out.into_bytes();
    if let Some(b) = body {
        bytes.extend_from_slice(b);
    }
    stream.write_all(&bytes)?;
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_request_with_body_split_across_reads() {
        struct Drip(Vec<u8>, usize);
        impl Read for Drip {
            fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
                let n = (self.0.len() - self.1).min(3).min(out.len());
                out[..n].copy_from_slice(&self.0[self.1..self.1 + n]);
                self.1 += n;
                Ok(n)
            }
        }
        let raw = b"PUT /api/v1/vm.pause?x=1 HTTP/1.1\r\nHost: l\r\nContent-Length: 2\r\n\r\n{}";
        let r = read_request(&mut Drip(raw.to_vec(), 0)).unwrap();
        assert_eq!(r.method, "PUT");
        assert_eq!(r.path, "/api/v1/vm.pause");
        assert_eq!(r.body, b"{}");
    }

    #[test]
    fn rejects_garbage_truncation_and_oversize() {
        let mut g: &[u8] = b"\x00\x01 nonsense\r\n\r\n";
        assert!(matches!(read_request(&mut g), Err(ApiError::BadRequest(_))));
        let mut t: &[u8] = b"GET /api/v1/vmm.ping HTTP/1.1\r\nContent-Length: 10\r\n\r\nab";
        assert!(matches!(read_request(&mut t), Err(ApiError::BadRequest(_))));
        let big = format!("GET / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", MAX_REQUEST);
        assert!(matches!(
            read_request(&mut big.as_bytes()),
            Err(ApiError::TooLarge)
        ));
        let mut bad_len: &[u8] = b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n";
        assert!(matches!(
            read_request(&mut bad_len),
            Err(ApiError::BadRequest(_))
        ));
    }

    #[test]
    fn response_has_status_length_and_body() {
        let mut out = Vec::new();
        write_response(&mut out, 409, Some(b"{\"error\":\"x\"}")).unwrap();
        let s = String::from_utf8(out).unwrap();
        assert!(s.starts_with("HTTP/1.1 409 Conflict\r\n"), "{s}");
        assert!(s.contains("Content-Length: 13\r\n"), "{s}");
        assert!(s.ends_with("\r\n\r\n{\"error\":\"x\"}"), "{s}");
    }
}
