//! The relay's web transports (protocol.md, section 14): the HTTP request head a `GET `
//! connection starts with, the demo page, and WebSocket sessions after the upgrade.
//!
//! Binary WebSocket messages go through the same frame decoder and handlers as binary TCP,
//! text messages through the same line handler as text mode: a browser user is just a user.
//! Like the rest of the core this performs no I/O; the driver cannot tell these
//! connections from others.

use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use log::debug;

use super::http::{self, Request};
use super::session::{Codec, State};
use super::ws::{close_code, WsEvent, WsSession};
use super::{demo, push_raw, Relay};
use crate::proto::{decode_raw, ErrorCode, RawFrame};
use crate::ConnId;

impl Relay {
    /// A connection in its HTTP head: waits for the whole head (keeping it in `buf`), then
    /// upgrades to WebSocket, serves a demo file, or answers an HTTP error and closes.
    pub(super) fn handle_http(&mut self, id: ConnId, buf: &mut BytesMut, now: Instant) {
        let (len, request) = match http::parse(buf) {
            Ok(Some(parsed)) => parsed,
            Ok(None) => return,
            Err(e) => {
                debug!("{}: bad HTTP request: {e:?}", self.conn_label(id));
                self.metrics.http_refused += 1;
                self.http_answer(id, &[e.response()], now);
                buf.clear();
                return;
            }
        };
        buf.advance(len);
        match request {
            Request::Upgrade(switching) => {
                let max_frame = self.config.max_frame;
                let Some(s) = self.sessions.get_mut(id.0) else {
                    return;
                };
                push_raw(s, &mut self.flush_list, id, switching);
                super::set_codec(&mut self.by_codec, s, Codec::WebSocket);
                s.extra.get_or_insert_with(Box::default).ws = Some(WsSession::new(max_frame));
                self.metrics.websocket_sessions += 1;
                debug!("{}: WebSocket session", s.label());
                if !buf.is_empty() {
                    self.handle_ws(id, buf, now);
                }
                buf.clear();
            }
            Request::Get(path) => {
                buf.clear();
                match demo::asset(&path).filter(|_| self.config.demo) {
                    Some((content_type, body)) => {
                        self.metrics.http_served += 1;
                        self.http_answer(id, &http::ok(content_type, body), now);
                    }
                    None => {
                        self.metrics.http_refused += 1;
                        let body = if self.config.demo {
                            format!("no {path} here: try / for the demo page")
                        } else {
                            "this port speaks imrelay (protocol.md); start the relay with \
                             --demo to serve the H5 demo page"
                                .to_string()
                        };
                        self.http_answer(id, &[http::plain(404, "Not Found", &body)], now);
                    }
                }
            }
        }
    }

    /// Queues an HTTP response and closes after it is flushed.
    fn http_answer(&mut self, id: ConnId, parts: &[Bytes], now: Instant) {
        if let Some(s) = self.sessions.get_mut(id.0) {
            for part in parts {
                push_raw(s, &mut self.flush_list, id, part.clone());
            }
        }
        self.begin_close(id, now);
    }

    /// A WebSocket session's input: every complete message is handled in order; a partial
    /// one stays inside the session's WebSocket state, so `buf` is always used up.
    /// Returns true when at least one whole message (data or control) was read: the
    /// partial-input deadline starts again.
    pub(super) fn handle_ws(&mut self, id: ConnId, buf: &mut BytesMut, now: Instant) -> bool {
        let mut completed = false;
        loop {
            let Some(s) = self.sessions.get_mut(id.0) else {
                buf.clear();
                return completed;
            };
            if s.state == State::Closing {
                buf.clear();
                return completed;
            }
            let Some(ws) = s.ws() else {
                buf.clear();
                return completed;
            };
            let event = ws.read(buf, &mut self.scratch);
            if !self.scratch.is_empty() {
                // The pong or close echo tungstenite wrote, as raw socket bytes.
                let replies = Bytes::copy_from_slice(&self.scratch);
                self.scratch.clear();
                push_raw(s, &mut self.flush_list, id, replies);
            }
            if !matches!(event, Ok(WsEvent::Idle) | Err(_)) {
                completed = true;
            }
            match event {
                Ok(WsEvent::Binary(data)) => {
                    self.handle_ws_frames(id, BytesMut::from(data), now);
                }
                Ok(WsEvent::Text(text)) => {
                    let mut lines = BytesMut::with_capacity(text.len() + 1);
                    lines.extend_from_slice(&text);
                    lines.extend_from_slice(b"\n");
                    self.handle_lines(id, &lines, now);
                }
                Ok(WsEvent::Control) => {}
                Ok(WsEvent::Closed) => {
                    debug!("{}: WebSocket closed by the peer", self.conn_label(id));
                    self.begin_close(id, now);
                }
                Ok(WsEvent::Idle) => return completed,
                Err(failure) => {
                    let (code, reason) = (failure.code(), failure.reason().to_string());
                    self.fail(id, code, &reason, now);
                }
            }
        }
    }

    /// One binary message: whole frames, handled like binary TCP input. A frame cut off by
    /// the end of the message is MALFORMED (frames never span messages).
    fn handle_ws_frames(&mut self, id: ConnId, mut frames: BytesMut, now: Instant) {
        let max_frame = self.config.max_frame;
        loop {
            match decode_raw(&mut frames, max_frame) {
                Ok(Some(frame)) => {
                    self.handle_raw(id, RawFrame::new(&frame), now);
                    if self.state(id) == Some(State::Closing) {
                        return;
                    }
                }
                Ok(None) if frames.is_empty() => return,
                Ok(None) => {
                    let reason = format!(
                        "a WebSocket message ended inside a frame ({} bytes left over)",
                        frames.len()
                    );
                    let code = ErrorCode::Malformed;
                    self.fail(id, code, &reason, now);
                    return;
                }
                Err(e) => {
                    self.fail(id, e.code(), &e.to_string(), now);
                    return;
                }
            }
        }
    }

    /// Sends a WebSocket session's close frame: the code for `cause` (None: normal close)
    /// and its reason. Does nothing for other sessions, or if a close was already sent.
    pub(super) fn ws_close(&mut self, id: ConnId, cause: Option<(ErrorCode, &str)>) {
        let Some(s) = self.sessions.get_mut(id.0) else {
            return;
        };
        let Some(ws) = s.ws() else {
            return;
        };
        let reason = match cause {
            Some((code, reason)) => format!("{} {reason}", code.name()),
            None => "bye".to_string(),
        };
        ws.close(
            close_code(cause.map(|(code, _)| code)),
            &reason,
            &mut self.scratch,
        );
        if !self.scratch.is_empty() {
            let close = Bytes::copy_from_slice(&self.scratch);
            self.scratch.clear();
            push_raw(s, &mut self.flush_list, id, close);
        }
    }
}
