//! One WebSocket session's framing (protocol.md, section 14), on tungstenite's
//! [`WebSocketContext`] driven over an in-memory [`Pipe`]: reads pull from the bytes the core
//! was handed and say `WouldBlock` when they run out; writes append to a buffer the core
//! queues. So this never performs I/O, and a WebSocket session is unit-tested with no socket.
//!
//! Incoming: tungstenite unmasks, reassembles fragments, enforces the size limits before
//! buffering, and answers pings and the peer's close by itself. Outgoing data messages are
//! framed here with tungstenite's header encoder: a small header `Bytes` followed by the
//! relay's frame `Bytes`, so a room message fanned out to many browsers is still not copied.
//! What the messages mean (frames, lines) is the caller's business.

use std::io::{self, Read, Write};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tungstenite::protocol::frame::{CloseFrame, FrameHeader};
use tungstenite::protocol::{Role, WebSocketConfig, WebSocketContext};
use tungstenite::{Error, Message};

use crate::proto::ErrorCode;

/// Read buffer tungstenite allocates per session up front. Small, so an idle browser costs
/// little; a large message grows it to the message's size (at most the max frame).
const READ_BUFFER: usize = 4 * 1024;
/// Message headers are encoded into a reused buffer of this size, then copied out.
const HEADER_CHUNK: usize = 16;
/// A close frame's reason is at most 123 bytes (RFC 6455, section 5.5).
const MAX_CLOSE_REASON: usize = 123;

/// Which kind of data message the relay sends on a session: fixed by the first data
/// message the client sends; binary until then.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WsMode {
    /// No data message yet: the relay answers in binary.
    Undecided,
    /// Binary messages, each carrying protocol frames.
    Binary,
    /// Text messages, each carrying text-mode lines.
    Text,
}

/// What one read produced.
#[derive(Debug)]
pub enum WsEvent {
    /// A complete binary message: one or more whole protocol frames.
    Binary(Bytes),
    /// A complete text message: text-mode lines (the last `\n` may be missing).
    Text(Bytes),
    /// A ping or pong; tungstenite queued the pong a ping needs.
    Control,
    /// The peer closed the WebSocket; the close reply is queued. Close the connection.
    Closed,
    /// The input is used up.
    Idle,
}

/// A WebSocket-level fault. Like a framing error, it gets an ERROR and closes the session.
#[derive(Debug, PartialEq, Eq)]
pub enum WsFailure {
    /// A message or fragment over the max frame size (checked before it is buffered).
    TooLarge(String),
    /// Broken WebSocket framing: unmasked, reserved bits, bad opcode, bad UTF-8 text, …
    Protocol(String),
}

impl WsFailure {
    /// The protocol error code reported for it.
    pub fn code(&self) -> ErrorCode {
        match self {
            WsFailure::TooLarge(_) => ErrorCode::FrameTooLarge,
            WsFailure::Protocol(_) => ErrorCode::Malformed,
        }
    }

    /// Why, for the ERROR frame and the close reason.
    pub fn reason(&self) -> &str {
        match self {
            WsFailure::TooLarge(why) | WsFailure::Protocol(why) => why,
        }
    }
}

/// The WebSocket close code for a session closed because of `code` (None: a normal close:
/// BYE, end of stream, the peer's own close).
pub fn close_code(code: Option<ErrorCode>) -> CloseCode {
    match code {
        None => CloseCode::Normal,
        Some(ErrorCode::FrameTooLarge) => CloseCode::Size,
        Some(ErrorCode::Malformed | ErrorCode::UnsupportedVersion) => CloseCode::Protocol,
        Some(ErrorCode::ShuttingDown) => CloseCode::Away,
        Some(_) => CloseCode::Policy,
    }
}

/// The in-memory stream tungstenite reads from and writes to.
struct Pipe<'a> {
    input: &'a mut BytesMut,
    output: &'a mut BytesMut,
}

impl Read for Pipe<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.input.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(self.input.len());
        buf[..n].copy_from_slice(&self.input[..n]);
        self.input.advance(n);
        Ok(n)
    }
}

impl Write for Pipe<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A session's WebSocket state, boxed inside the relay's session so binary and text
/// sessions do not carry it.
#[derive(Debug)]
pub struct WsSession {
    ctx: WebSocketContext,
    /// The kind of message the relay sends.
    pub mode: WsMode,
    headers: BytesMut,
}

impl WsSession {
    /// A session that has just answered the upgrade; messages up to `max_frame` bytes.
    pub fn new(max_frame: u32) -> WsSession {
        let limit = max_frame as usize;
        let config = WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER)
            .write_buffer_size(0)
            .max_message_size(Some(limit))
            .max_frame_size(Some(limit));
        WsSession {
            ctx: WebSocketContext::new(Role::Server, Some(config)),
            mode: WsMode::Undecided,
            headers: BytesMut::new(),
        }
    }

    /// Reads the next event from `input` (consuming it); the first data message fixes
    /// [`WsSession::mode`]. Automatic replies (pong, the
    /// close echo) are appended to `out` as raw bytes for the socket.
    pub fn read(&mut self, input: &mut BytesMut, out: &mut BytesMut) -> Result<WsEvent, WsFailure> {
        let mut pipe = Pipe { input, output: out };
        let event = match self.ctx.read(&mut pipe) {
            Ok(Message::Binary(data)) => {
                self.decide(WsMode::Binary);
                WsEvent::Binary(data)
            }
            Ok(Message::Text(text)) => {
                self.decide(WsMode::Text);
                WsEvent::Text(Bytes::from(text))
            }
            Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => WsEvent::Control,
            Ok(Message::Close(_)) | Err(Error::ConnectionClosed | Error::AlreadyClosed) => {
                WsEvent::Closed
            }
            Err(Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => WsEvent::Idle,
            Err(Error::Capacity(e)) => {
                return Err(WsFailure::TooLarge(format!("WebSocket message: {e}")))
            }
            Err(e) => return Err(WsFailure::Protocol(format!("WebSocket: {e}"))),
        };
        // Writes to the pipe never block, so the pong or close echo is out now; a closed
        // context refusing to flush has nothing left to send.
        let _ = self.ctx.flush(&mut pipe);
        Ok(event)
    }

    fn decide(&mut self, mode: WsMode) {
        if self.mode == WsMode::Undecided {
            self.mode = mode;
        }
    }

    /// False once a close frame was sent or received: no data message may follow.
    pub fn can_send(&self) -> bool {
        self.ctx.can_write()
    }

    /// The header of a data message carrying `len` bytes (binary or text per `text`).
    pub fn message_header(&mut self, len: usize, text: bool) -> Bytes {
        let data = if text { Data::Text } else { Data::Binary };
        let header = FrameHeader {
            opcode: OpCode::Data(data),
            ..FrameHeader::default()
        };
        if self.headers.capacity() < 16 {
            self.headers.reserve(HEADER_CHUNK);
        }
        // Writing into a BytesMut cannot fail.
        let _ = header.format(len as u64, &mut (&mut self.headers).writer());
        // A copy of its own size: a header in a slow queue pins nothing else.
        let header = Bytes::copy_from_slice(&self.headers);
        self.headers.clear();
        header
    }

    /// Starts the close handshake with `code` and `reason` (cut to 123 bytes), appending
    /// the close frame to `out`. Does nothing if a close was already sent or received.
    pub fn close(&mut self, code: CloseCode, reason: &str, out: &mut BytesMut) {
        let mut cut = reason.len().min(MAX_CLOSE_REASON);
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        let frame = CloseFrame {
            code,
            reason: reason[..cut].into(),
        };
        let mut input = BytesMut::new();
        let mut pipe = Pipe {
            input: &mut input,
            output: out,
        };
        // Err only when the context is already closed, when there is nothing to send.
        let _ = self.ctx.close(&mut pipe, Some(frame));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame (RFC 6455, section 5.7's "Hello" example).
    const MASKED_HELLO: &[u8] = &[
        0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
    ];

    #[test]
    fn reads_masked_messages_piecewise_and_says_idle_when_empty() {
        let mut ws = WsSession::new(1024);
        let mut out = BytesMut::new();
        let mut input = BytesMut::from(&MASKED_HELLO[..4]);
        assert!(matches!(ws.read(&mut input, &mut out), Ok(WsEvent::Idle)));
        let mut input = BytesMut::from(&MASKED_HELLO[4..]);
        match ws.read(&mut input, &mut out) {
            Ok(WsEvent::Text(t)) => assert_eq!(&t[..], b"Hello"),
            other => panic!("{other:?}"),
        }
        assert!(out.is_empty());
    }

    #[test]
    fn unmasked_and_oversized_messages_fail() {
        let mut ws = WsSession::new(1024);
        let mut out = BytesMut::new();
        let mut unmasked = BytesMut::from(&[0x82, 0x01, 0x00][..]);
        assert!(matches!(
            ws.read(&mut unmasked, &mut out),
            Err(WsFailure::Protocol(_))
        ));
        let mut ws = WsSession::new(1024);
        // A 2000-byte binary frame: refused from its header alone.
        let mut big = BytesMut::from(&[0x82, 0xfe, 0x07, 0xd0, 1, 2, 3, 4][..]);
        let err = ws.read(&mut big, &mut out).unwrap_err();
        assert_eq!(err.code(), ErrorCode::FrameTooLarge);
    }

    #[test]
    fn headers_and_close_frames_use_the_rfc_layout() {
        let mut ws = WsSession::new(1024);
        assert_eq!(&ws.message_header(5, false)[..], &[0x82, 5]);
        assert_eq!(&ws.message_header(300, true)[..], &[0x81, 126, 1, 44]);
        let mut out = BytesMut::new();
        ws.close(CloseCode::Size, &"x".repeat(300), &mut out);
        assert_eq!(&out[..4], &[0x88, 125, 0x03, 0xf1]);
        assert!(!ws.can_send());
        let before = out.len();
        ws.close(CloseCode::Normal, "again", &mut out);
        assert_eq!(out.len(), before, "one close frame only");
    }
}
