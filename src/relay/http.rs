//! The HTTP front door of the relay's one port (protocol.md, section 14): a connection whose
//! first bytes are `GET ` sends an HTTP request head. This module parses that head (bounded
//! by [`MAX_REQUEST_HEAD`]), decides what it asks for, and renders the few HTTP responses the
//! relay ever sends. The WebSocket `101` answer itself comes from tungstenite.
//!
//! Pure functions over bytes: no I/O, no session state, no clock.

use bytes::Bytes;
use tungstenite::handshake::server::{create_response, write_response};
use tungstenite::http;

use crate::proto::{ErrorCode, Header, HEADER_LEN};

/// Most bytes of request line and headers the relay reads before answering 431.
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;

/// Most header lines in a request head (more: 431).
const MAX_HEADERS: usize = 32;

/// The four bytes that make a connection HTTP (protocol.md, section 2).
pub const GET_PREFIX: &[u8] = b"GET ";

/// What a complete request head asks for.
#[derive(Debug)]
pub enum Request {
    /// A WebSocket upgrade, already accepted: the `101 Switching Protocols` head to send.
    Upgrade(Bytes),
    /// A plain GET of `path` (query string removed).
    Get(String),
}

/// A request the relay answers with an HTTP error status and then closes.
#[derive(Debug, PartialEq, Eq)]
pub enum HttpError {
    /// The head did not end within [`MAX_REQUEST_HEAD`] bytes, or has too many headers: 431.
    HeadTooLarge,
    /// Not parseable as HTTP/1.x: 400.
    Malformed(String),
    /// An upgrade request tungstenite refused (wrong version, no key, …): 400.
    BadUpgrade(String),
}

impl HttpError {
    /// The HTTP response for this error.
    pub fn response(&self) -> Bytes {
        match self {
            HttpError::HeadTooLarge => plain(
                431,
                "Request Header Fields Too Large",
                &format!("request head over {MAX_REQUEST_HEAD} bytes"),
            ),
            HttpError::Malformed(why) => plain(400, "Bad Request", why),
            HttpError::BadUpgrade(why) => plain(
                400,
                "Bad Request",
                &format!("WebSocket upgrade refused: {why}"),
            ),
        }
    }
}

/// Parses the request head at the front of `buf`. `Ok(None)`: not complete yet (the caller
/// checks the size limit). `Ok(Some((len, request)))`: the head is `buf[..len]`.
pub fn parse(buf: &[u8]) -> Result<Option<(usize, Request)>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > MAX_REQUEST_HEAD => {
            return Err(HttpError::HeadTooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HttpError::HeadTooLarge),
        Err(e) => return Err(HttpError::Malformed(format!("bad request head: {e}"))),
    };
    if len > MAX_REQUEST_HEAD {
        return Err(HttpError::HeadTooLarge);
    }
    let path = req.path.unwrap_or("/");
    let wants_upgrade = req.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("upgrade")
            && String::from_utf8_lossy(h.value)
                .to_ascii_lowercase()
                .contains("websocket")
    });
    if !wants_upgrade {
        let path = path.split('?').next().unwrap_or("/").to_string();
        return Ok(Some((len, Request::Get(path))));
    }
    let version = match req.version {
        Some(0) => http::Version::HTTP_10,
        _ => http::Version::HTTP_11,
    };
    let mut builder = http::Request::builder()
        .method(req.method.unwrap_or("GET"))
        .uri(path)
        .version(version);
    for h in req.headers.iter() {
        builder = builder.header(h.name, h.value);
    }
    let request = builder
        .body(())
        .map_err(|e| HttpError::Malformed(format!("bad request head: {e}")))?;
    let response = create_response(&request).map_err(|e| HttpError::BadUpgrade(e.to_string()))?;
    let mut head = Vec::with_capacity(160);
    write_response(&mut head, &response).map_err(|e| HttpError::BadUpgrade(e.to_string()))?;
    Ok(Some((len, Request::Upgrade(Bytes::from(head)))))
}

/// A `200 OK` with a static body (the demo page and its module). The body is not copied.
pub fn ok(content_type: &str, body: &'static str) -> [Bytes; 2] {
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Cache-Control: no-cache\r\nConnection: close\r\n\r\n",
        body.len()
    );
    [Bytes::from(head), Bytes::from_static(body.as_bytes())]
}

/// A response with a short plain-text body; the connection closes after it.
pub fn plain(status: u16, phrase: &str, body: &str) -> Bytes {
    Bytes::from(format!(
        "HTTP/1.1 {status} {phrase}\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}\n",
        body.len() + 1
    ))
}

/// An ERROR frame queued to a connection still in its HTTP head (a login timeout, shutdown,
/// or the stream ending mid-head), rendered as the matching HTTP error response.
pub fn render_error_frame(frame: &[u8]) -> Option<Bytes> {
    if frame.len() < HEADER_LEN + 2 {
        return None;
    }
    let header = Header::read(frame);
    if header.opcode != crate::proto::Opcode::Error as u8 {
        return None;
    }
    let payload = frame.get(HEADER_LEN..header.len as usize)?;
    let (code, reason) = (payload.get(..2)?, payload.get(2..)?);
    let code = ErrorCode::from_u16(u16::from_be_bytes([code[0], code[1]]));
    let reason = String::from_utf8_lossy(reason);
    Some(match code {
        Some(ErrorCode::LoginTimeout) => plain(408, "Request Timeout", &reason),
        Some(ErrorCode::ShuttingDown) => plain(503, "Service Unavailable", &reason),
        _ => plain(400, "Bad Request", &reason),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const UPGRADE: &[u8] = b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
        Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
        Sec-WebSocket-Version: 13\r\n\r\n";

    #[test]
    fn an_upgrade_is_answered_with_the_rfc_accept_key() {
        let (len, req) = parse(UPGRADE).unwrap().unwrap();
        assert_eq!(len, UPGRADE.len());
        let Request::Upgrade(head) = req else {
            panic!("not an upgrade: {req:?}")
        };
        let head = std::str::from_utf8(&head).unwrap();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        // The example from RFC 6455, section 1.3.
        assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{head}");
    }

    #[test]
    fn partial_heads_wait_and_plain_gets_name_their_path() {
        assert!(parse(&UPGRADE[..20]).unwrap().is_none());
        let get = b"GET /imrelay.js?v=1 HTTP/1.1\r\nHost: x\r\n\r\n";
        let (_, req) = parse(get).unwrap().unwrap();
        assert!(matches!(req, Request::Get(p) if p == "/imrelay.js"));
    }

    #[test]
    fn bad_heads_get_400_or_431() {
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\nBad Header\r\n\r\n"),
            Err(HttpError::Malformed(_))
        ));
        let no_key = b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
            Sec-WebSocket-Version: 13\r\n\r\n";
        let err = parse(no_key).unwrap_err();
        assert!(matches!(err, HttpError::BadUpgrade(_)), "{err:?}");
        assert!(err.response().starts_with(b"HTTP/1.1 400"));
        let mut huge = b"GET / HTTP/1.1\r\nX: ".to_vec();
        huge.resize(MAX_REQUEST_HEAD + 1, b'a');
        assert_eq!(parse(&huge).unwrap_err(), HttpError::HeadTooLarge);
        assert!(HttpError::HeadTooLarge
            .response()
            .starts_with(b"HTTP/1.1 431"));
    }
}
