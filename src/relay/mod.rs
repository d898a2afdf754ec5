//! The relay core: sessions, the user directory, routing, timers and output queues.
//!
//! This module never performs I/O and never reads the clock. The driver feeds it events
//! (`handle_*`, each given `now`) and pulls its outputs (`poll_*`, [`Relay::output`]).
//! Everything here is deterministic and unit-tested in memory.
//!
//! A connection's first bytes choose its codec (protocol.md, section 2): binary frames, text
//! lines, or an HTTP head (`http.rs`) that becomes a WebSocket session (`ws.rs`, `web.rs`)
//! or a demo page (`demo.rs`). All of them end up in the same frame handlers; the driver
//! only ever sees bytes in and queued bytes out.
//!
//! Calling order for one connection:
//! 1. [`Relay::handle_open`] when a socket is accepted (it may be refused with a frame to
//!    write before dropping the socket).
//! 2. When readable and [`Relay::wants_read`]: [`Relay::take_partial`], read into the
//!    buffer, [`Relay::handle_input`] after each read, [`Relay::stash_partial`] when done;
//!    [`Relay::handle_eof`] on end of stream.
//! 3. Each loop turn: [`Relay::poll_transmit`] names connections with output; write from
//!    [`Relay::output`], report with [`Relay::handle_written`] or
//!    [`Relay::handle_write_blocked`]; when [`Relay::is_finished`], close the socket.
//! 4. [`Relay::handle_closed`] once the socket is gone, for whatever reason.
//! 5. [`Relay::handle_timeout`] whenever [`Relay::poll_timeout`] has passed;
//!    [`Relay::poll_resume`] names connections whose paused reads may go on.

mod config;
mod dedup;
mod demo;
mod directory;
mod handlers;
mod http;
mod inbox;
mod inbox_handlers;
mod metrics;
mod out_queue;
mod rate;
mod room_handlers;
mod rooms;
mod session;
mod timers;
mod web;
mod ws;

pub use config::{Config, ConfigError};
pub use inbox::{InboxLimits, StoreOp};
pub use metrics::Metrics;
pub use out_queue::OutQueue;
pub use session::State;

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use log::{debug, info};
use slab::Slab;

use crate::proto::frame::{write_error, write_frame};
use crate::proto::text;
use crate::proto::{decode_raw, ErrorCode, Flags, MessageId, Opcode, RoomId, UserId};
use crate::ConnId;
use dedup::Dedup;
use directory::Directory;
use inbox::Inboxes;
use rooms::Rooms;
use session::{Codec, Session};
use timers::Timers;

/// How long a closing connection may take to drain its output before it is closed anyway.
pub const CLOSE_LINGER: Duration = Duration::from_secs(5);

/// Control frames (ACK, ERROR, LOGIN_OK, PONG) are encoded into a shared scratch buffer
/// that is reserved in chunks of this size and split into `Bytes`, so encoding one costs
/// no allocation of its own.
const SCRATCH_CHUNK: usize = 16 * 1024;

/// A connection the relay will not take, and the ERROR frame to send it before closing.
#[derive(Debug)]
pub struct Refused {
    /// LIMIT_REACHED or SHUTTING_DOWN.
    pub code: ErrorCode,
    /// The encoded ERROR frame (best effort: the socket is closed right after).
    pub frame: Bytes,
}

/// The relay core. See the module docs for the calling order.
#[derive(Debug)]
pub struct Relay {
    config: Config,
    sessions: Slab<Session>,
    directory: Directory,
    rooms: Rooms,
    dedup: Dedup,
    inboxes: Inboxes,
    /// A durable store was restored: stored SENDs wait for their commit.
    durable: bool,
    store_ops: Vec<StoreOp>,
    /// Set when a commit failed: stored SENDs are refused from then on (fail-stop).
    store_failure: Option<String>,
    held_acks: Vec<inbox_handlers::HeldAck>,
    /// (recipient, seq) appended this turn, made sendable by their commit.
    appended: Vec<(UserId, u64)>,
    /// Commits handed to the driver and not yet reported back, oldest first.
    commits: std::collections::VecDeque<inbox_handlers::Commit>,
    next_commit: u64,
    /// Wall-clock time at `clock_base`, for stored messages' timestamps.
    clock_base: (Instant, u64),
    timers: Timers,
    flush_list: Vec<ConnId>,
    resume_list: Vec<ConnId>,
    scratch: BytesMut,
    next_serial: u64,
    next_ping_id: u64,
    shutting_down: bool,
    metrics: Metrics,
}

impl Relay {
    /// A relay with the given limits. Call [`Config::validate`] first; an invalid config
    /// is not rejected here.
    pub fn new(config: Config) -> Relay {
        let limits = config.inbox_limits();
        let dedup = Dedup::new(
            config.dedup_window,
            config.dedup_ttl,
            config.dedup_max_entries,
        );
        Relay {
            config,
            sessions: Slab::new(),
            directory: Directory::default(),
            rooms: Rooms::default(),
            dedup,
            inboxes: Inboxes::new(limits, crate::rand::Rng::from_entropy().next_u64()),
            durable: false,
            store_ops: Vec::new(),
            store_failure: None,
            held_acks: Vec::new(),
            appended: Vec::new(),
            commits: std::collections::VecDeque::new(),
            next_commit: 0,
            clock_base: (Instant::now(), unix_ms_now()),
            timers: Timers::default(),
            flush_list: Vec::new(),
            resume_list: Vec::new(),
            scratch: BytesMut::new(),
            next_serial: 0,
            next_ping_id: 0,
            shutting_down: false,
            metrics: Metrics::default(),
        }
    }

    /// The limits in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Counters.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Open sessions, closing ones included.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Users with at least one logged-in connection.
    pub fn user_count(&self) -> usize {
        self.directory.users()
    }

    /// The state of a connection, if it exists.
    pub fn state(&self, id: ConnId) -> Option<State> {
        self.sessions.get(id.0).map(|s| s.state)
    }

    /// Rooms with at least one member.
    pub fn room_count(&self) -> usize {
        self.rooms.len()
    }

    /// Number of connections in `room`.
    pub fn room_members(&self, room: RoomId) -> usize {
        self.rooms.count(room)
    }

    /// Room messages dropped for slow members of `room` so far.
    pub fn room_dropped(&self, room: RoomId) -> u64 {
        self.rooms.dropped(room)
    }

    /// DEDUP SEND ids the relay remembers now (section 13 of protocol.md).
    pub fn dedup_entries(&self) -> usize {
        self.dedup.entries()
    }

    /// The connections `user` is logged in on.
    pub fn devices(&self, user: UserId) -> &[ConnId] {
        self.directory.devices(user)
    }

    // ---- connections -------------------------------------------------------------------

    /// A socket was accepted. Returns its id, or the refusal to write before dropping it.
    pub fn handle_open(&mut self, now: Instant) -> Result<ConnId, Refused> {
        let refusal = if self.shutting_down {
            Some((
                ErrorCode::ShuttingDown,
                "the relay is shutting down".to_string(),
            ))
        } else if self.sessions.len() >= self.config.max_connections {
            Some((
                ErrorCode::LimitReached,
                format!(
                    "connection limit reached ({} connections)",
                    self.config.max_connections
                ),
            ))
        } else {
            None
        };
        if let Some((code, reason)) = refusal {
            self.metrics.connections_refused += 1;
            self.metrics.count_error(code);
            let mut buf = BytesMut::new();
            write_error(&mut buf, MessageId(0), UserId::NONE, code, &reason);
            return Err(Refused {
                code,
                frame: buf.freeze(),
            });
        }
        self.next_serial += 1;
        let serial = self.next_serial;
        let mut session = Session::new(serial, now);
        let id = ConnId(self.sessions.vacant_key());
        arm(
            &mut self.timers,
            &mut session,
            id,
            now + self.config.login_timeout,
        );
        self.sessions.insert(session);
        self.metrics.connections_opened += 1;
        Ok(id)
    }

    /// False while the connection must not be read: it is closing, or its own output queue
    /// is over the cap (its reads resume through [`Relay::poll_resume`]).
    pub fn wants_read(&mut self, id: ConnId) -> bool {
        let Some(s) = self.sessions.get_mut(id.0) else {
            return false;
        };
        if s.state == State::Closing || s.read_paused {
            return false;
        }
        if s.out.len_bytes() >= self.config.out_cap {
            s.read_paused = true;
            self.metrics.read_pauses += 1;
            return false;
        }
        true
    }

    /// Moves the connection's saved partial frame to the front of the (empty) read buffer.
    pub fn take_partial(&mut self, id: ConnId, buf: &mut BytesMut) {
        debug_assert!(buf.is_empty(), "read buffer must start empty");
        if let Some(s) = self.sessions.get_mut(id.0) {
            if !s.partial.is_empty() {
                buf.extend_from_slice(&s.partial);
                s.partial = BytesMut::new();
            }
        }
    }

    /// Saves what is left in the read buffer (the start of a frame) with the connection and
    /// empties the buffer for the next connection.
    pub fn stash_partial(&mut self, id: ConnId, buf: &mut BytesMut) {
        if !buf.is_empty() {
            if let Some(s) = self.sessions.get_mut(id.0) {
                if s.state != State::Closing {
                    s.partial.extend_from_slice(buf);
                }
            }
            buf.clear();
        }
    }

    /// Decodes and handles every complete frame at the front of `buf`, leaving a partial
    /// frame there. A framing error queues an ERROR, starts closing and empties `buf`.
    pub fn handle_input(&mut self, id: ConnId, buf: &mut BytesMut, now: Instant) {
        let max_frame = self.config.max_frame;
        let Some(s) = self.sessions.get_mut(id.0) else {
            buf.clear();
            return;
        };
        if s.state == State::Closing {
            buf.clear();
            return;
        }
        if !buf.is_empty() {
            s.last_rx = now;
            s.ping_sent = false;
            if s.codec == Codec::Undecided {
                match Codec::choose(buf) {
                    Some(codec) => s.codec = codec,
                    None => return, // a prefix of `GET `: wait for the next byte
                }
            }
        }
        if s.codec != Codec::Binary {
            match s.codec {
                Codec::Text => self.handle_text(id, buf, now),
                Codec::Http => self.handle_http(id, buf, now),
                Codec::WebSocket => self.handle_ws(id, buf, now),
                Codec::Binary | Codec::Undecided => {}
            }
            return;
        }
        loop {
            match decode_raw(buf, max_frame) {
                Ok(Some(frame)) => {
                    self.metrics.frames_in += 1;
                    self.metrics.bytes_in += frame.as_bytes().len() as u64;
                    self.handle_frame(id, frame, now);
                    if self.state(id) == Some(State::Closing) {
                        buf.clear();
                        return;
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    self.fail(
                        id,
                        MessageId(0),
                        UserId::NONE,
                        e.code(),
                        &e.to_string(),
                        now,
                    );
                    buf.clear();
                    return;
                }
            }
        }
    }

    /// Text mode: each complete line becomes the frame a binary client would have sent and
    /// goes through the same handlers; a partial line stays in `buf`.
    fn handle_text(&mut self, id: ConnId, buf: &mut BytesMut, now: Instant) {
        let max_frame = self.config.max_frame;
        loop {
            let Some(end) = buf.iter().position(|&b| b == b'\n') else {
                if buf.len() > max_frame as usize {
                    let reason = format!("line longer than the max frame ({max_frame} bytes)");
                    self.fail(
                        id,
                        MessageId(0),
                        UserId::NONE,
                        ErrorCode::FrameTooLarge,
                        &reason,
                        now,
                    );
                    buf.clear();
                }
                return;
            };
            let line = buf.split_to(end + 1);
            let Some(s) = self.sessions.get_mut(id.0) else {
                return;
            };
            match text::parse_line(&line[..end], s.text_ids()) {
                Ok(text::Line::Frame(frame)) => {
                    let mut encoded = BytesMut::with_capacity(frame.encoded_len());
                    frame.encode(&mut encoded);
                    if let Ok(Some(raw)) = decode_raw(&mut encoded, u32::MAX) {
                        self.metrics.frames_in += 1;
                        self.metrics.bytes_in += line.len() as u64;
                        self.handle_frame(id, raw, now);
                    }
                }
                Ok(text::Line::Help) => self.queue(id, Bytes::from_static(text::HELP.as_bytes())),
                Ok(text::Line::Blank) => {}
                Err(usage) => self.queue(id, text::render_usage(&usage)),
            }
            if self.state(id) == Some(State::Closing) {
                buf.clear();
                return;
            }
        }
    }

    /// The peer ended its stream. A saved partial frame is answered with MALFORMED; either
    /// way pending output is flushed and the connection closes.
    pub fn handle_eof(&mut self, id: ConnId, now: Instant) {
        let Some(s) = self.sessions.get(id.0) else {
            return;
        };
        if s.state == State::Closing {
            return;
        }
        if s.partial.is_empty() {
            debug!("{id}: peer closed its stream");
            self.begin_close(id, now);
        } else {
            let reason = format!(
                "connection closed in the middle of a frame ({} bytes discarded)",
                s.partial.len()
            );
            self.fail(
                id,
                MessageId(0),
                UserId::NONE,
                ErrorCode::Malformed,
                &reason,
                now,
            );
        }
    }

    /// The socket is gone (closed after [`Relay::is_finished`], or failed). Frees the session.
    pub fn handle_closed(&mut self, id: ConnId) {
        let Some(mut s) = self.sessions.try_remove(id.0) else {
            return;
        };
        if let Some(user) = s.user() {
            self.directory.remove(user, id);
        }
        for room in s.rooms.drain(..) {
            self.rooms.leave(room, id);
        }
        let lost = s.out.clear();
        if lost > 0 {
            self.metrics.bytes_lost_on_reset += lost as u64;
            info!("{id}: closed with {lost} bytes of output unsent");
        }
        self.metrics.connections_closed += 1;
        if self.timers.len() > 2 * self.sessions.len() + 1024 {
            let sessions = &self.sessions;
            self.timers
                .retain(|d| sessions.get(d.conn.0).is_some_and(|s| s.serial == d.serial));
        }
    }

    /// Starts a clean shutdown: refuses new connections, queues SHUTTING_DOWN to every
    /// open one and closes each after its output is flushed.
    pub fn begin_shutdown(&mut self, now: Instant) {
        self.shutting_down = true;
        let open: Vec<ConnId> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.state != State::Closing)
            .map(|(key, _)| ConnId(key))
            .collect();
        for id in open {
            self.fail(
                id,
                MessageId(0),
                UserId::NONE,
                ErrorCode::ShuttingDown,
                "the relay is shutting down",
                now,
            );
        }
    }

    // ---- output ------------------------------------------------------------------------

    /// The next connection with output to write or a close to perform. Each connection is
    /// named at most once per round of new output.
    pub fn poll_transmit(&mut self) -> Option<ConnId> {
        while let Some(id) = self.flush_list.pop() {
            if let Some(s) = self.sessions.get_mut(id.0) {
                s.in_flush_list = false;
                return Some(id);
            }
        }
        None
    }

    /// The connection's output queue, to write from.
    pub fn output(&self, id: ConnId) -> Option<&OutQueue> {
        self.sessions.get(id.0).map(|s| &s.out)
    }

    /// The socket accepted `n` bytes of the queue.
    pub fn handle_written(&mut self, id: ConnId, n: usize) {
        let Some(s) = self.sessions.get_mut(id.0) else {
            return;
        };
        s.out.advance(n);
        self.metrics.bytes_out += n as u64;
        if s.read_paused && s.out.len_bytes() <= self.config.out_cap / 2 {
            s.read_paused = false;
            self.resume_list.push(id);
        }
        let synced = s.inbox_synced;
        if s.out.is_empty() && !s.missed.is_empty() {
            self.report_missed(id);
        }
        if synced {
            self.pump_inbox(id);
        }
    }

    /// The socket would block; output waits for [`Relay::handle_writable`].
    pub fn handle_write_blocked(&mut self, id: ConnId) {
        if let Some(s) = self.sessions.get_mut(id.0) {
            s.write_blocked = true;
        }
    }

    /// The socket is writable again: the connection goes back on the flush list.
    pub fn handle_writable(&mut self, id: ConnId) {
        if let Some(s) = self.sessions.get_mut(id.0) {
            s.write_blocked = false;
            if !s.in_flush_list && (!s.out.is_empty() || s.state == State::Closing) {
                s.in_flush_list = true;
                self.flush_list.push(id);
            }
        }
    }

    /// True when the connection is closing and its output is flushed (or its linger time
    /// ran out): the driver closes the socket and calls [`Relay::handle_closed`].
    pub fn is_finished(&self, id: ConnId) -> bool {
        self.sessions
            .get(id.0)
            .is_some_and(|s| s.state == State::Closing && (s.out.is_empty() || s.linger_over))
    }

    /// The next connection whose reads were paused and may go on.
    pub fn poll_resume(&mut self) -> Option<ConnId> {
        self.resume_list.pop()
    }

    // ---- time --------------------------------------------------------------------------

    /// The earliest time [`Relay::handle_timeout`] has work to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next()
    }

    /// Runs every deadline due at `now`: login timeouts, PINGs, idle timeouts, linger ends.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(due) = self.timers.pop_due(now) {
            let id = due.conn;
            let Some(s) = self.sessions.get_mut(id.0) else {
                continue;
            };
            if s.serial != due.serial || s.deadline != due.at {
                continue; // stale: the session was replaced or re-armed since
            }
            match s.state {
                State::Closing => {
                    s.linger_over = true;
                    if !s.in_flush_list {
                        s.in_flush_list = true;
                        self.flush_list.push(id);
                    }
                }
                State::AwaitingLogin => {
                    let deadline = s.opened_at + self.config.login_timeout;
                    if now >= deadline {
                        let reason = format!(
                            "no LOGIN within {} ms",
                            self.config.login_timeout.as_millis()
                        );
                        self.fail(
                            id,
                            MessageId(0),
                            UserId::NONE,
                            ErrorCode::LoginTimeout,
                            &reason,
                            now,
                        );
                    } else {
                        arm(&mut self.timers, s, id, deadline);
                    }
                }
                State::Active(_) => {
                    let silence = now.saturating_duration_since(s.last_rx);
                    if silence >= self.config.idle_timeout {
                        let reason = format!(
                            "nothing received for {} ms",
                            self.config.idle_timeout.as_millis()
                        );
                        self.fail(
                            id,
                            MessageId(0),
                            UserId::NONE,
                            ErrorCode::IdleTimeout,
                            &reason,
                            now,
                        );
                    } else if silence >= self.config.ping_interval || s.ping_sent {
                        let idle_at = s.last_rx + self.config.idle_timeout;
                        arm(&mut self.timers, s, id, idle_at);
                        if !s.ping_sent {
                            s.ping_sent = true;
                            self.next_ping_id += 1;
                            let ping_id = MessageId(self.next_ping_id);
                            write_frame(
                                self.scratch(),
                                Opcode::Ping,
                                Flags::EMPTY,
                                ping_id,
                                UserId::NONE,
                                UserId::NONE,
                                &[],
                            );
                            self.queue_scratch(id);
                        }
                    } else {
                        let ping_at = s.last_rx + self.config.ping_interval;
                        arm(&mut self.timers, s, id, ping_at);
                    }
                }
            }
        }
    }
}

/// Queues an encoded frame: as it is for binary connections (the one check on the hot
/// path), rendered as a line for text mode, wrapped in a message for WebSocket.
///
/// The shape matters for speed: with the text branch inline (as before WebSocket came),
/// the compiler copies the frame into the queue with 8-byte moves; a version that sent
/// every non-binary codec out of line copied it with a 16-byte load over the 8-byte
/// stores of `Bytes::clone`, a store-forwarding stall per frame, +15% on benches/router.
pub(crate) fn push_output(s: &mut Session, flush_list: &mut Vec<ConnId>, id: ConnId, frame: Bytes) {
    if s.codec != Codec::Binary {
        if s.codec == Codec::Text {
            match text::render(&frame) {
                Some(line) => s.out.push(line),
                // Already text (HELP, usage errors) or nothing a text client shows.
                None if frame.first().is_some_and(|b| text::starts_text(*b)) => s.out.push(frame),
                None => return,
            }
        } else if !push_rendered(s, frame) {
            return;
        }
    } else {
        s.out.push(frame);
    }
    if !s.in_flush_list && !s.write_blocked {
        s.in_flush_list = true;
        flush_list.push(id);
    }
}

/// [`push_output`] for HTTP and WebSocket connections. False when nothing was queued.
fn push_rendered(s: &mut Session, frame: Bytes) -> bool {
    match s.codec {
        Codec::Binary | Codec::Undecided => s.out.push(frame),
        Codec::Text => match text_line(frame) {
            Some(line) => s.out.push(line),
            None => return false,
        },
        Codec::Http => match http::render_error_frame(&frame) {
            Some(response) => s.out.push(response),
            None => return false,
        },
        Codec::WebSocket => {
            let ws = s.extra.as_deref_mut().and_then(|e| e.ws.as_mut());
            let Some(ws) = ws.filter(|ws| ws.can_send()) else {
                return false;
            };
            let body = if ws.mode == ws::WsMode::Text {
                // One line per text message, without its line end.
                let Some(mut line) = text_line(frame) else {
                    return false;
                };
                if line.ends_with(b"\r\n") {
                    line.truncate(line.len() - 2);
                }
                line
            } else {
                frame
            };
            s.out
                .push(ws.message_header(body.len(), ws.mode == ws::WsMode::Text));
            s.out.push(body);
        }
    }
    true
}

/// A frame as a text-mode line; text the core wrote itself (HELP, usage errors) as it is;
/// `None` for what a text client does not see.
fn text_line(frame: Bytes) -> Option<Bytes> {
    match text::render(&frame) {
        Some(line) => Some(line),
        None if frame.first().is_some_and(|b| text::starts_text(*b)) => Some(frame),
        None => None,
    }
}

/// Queues bytes for the socket exactly as they are (HTTP responses, WebSocket control
/// frames), whatever the connection's codec.
pub(crate) fn push_raw(s: &mut Session, flush_list: &mut Vec<ConnId>, id: ConnId, bytes: Bytes) {
    s.out.push(bytes);
    if !s.in_flush_list && !s.write_blocked {
        s.in_flush_list = true;
        flush_list.push(id);
    }
}

/// Arms the session's one live deadline (replacing any earlier one, which goes stale).
pub(crate) fn arm(timers: &mut Timers, s: &mut Session, id: ConnId, at: Instant) {
    s.deadline = at;
    timers.arm(at, id, s.serial);
}

impl Relay {
    /// Wall-clock milliseconds at `now` (stored messages' timestamps and age limit).
    pub(crate) fn unix_ms(&self, now: Instant) -> u64 {
        let (base, base_ms) = self.clock_base;
        let elapsed = u64::try_from(now.saturating_duration_since(base).as_millis()).unwrap_or(0);
        base_ms + elapsed
    }
}

fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

pub(crate) fn millis_u32(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests;
