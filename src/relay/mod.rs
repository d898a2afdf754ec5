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
//! 2. When readable and [`Relay::wants_read`]: read into a buffer and hand it to
//!    [`Relay::handle_read`], which uses it up (a partial frame is kept in the session, in
//!    a buffer of its own); [`Relay::handle_eof`] on end of stream. [`Relay::take_work`]
//!    says how much work the reads caused, for fairness.
//! 3. Each loop turn: [`Relay::poll_transmit`] names connections with output; write from
//!    [`Relay::output`], report with [`Relay::handle_written`] or
//!    [`Relay::handle_write_blocked`]; when [`Relay::is_finished`], close the socket.
//! 4. [`Relay::handle_closed`] once the socket is gone, for whatever reason.
//! 5. [`Relay::handle_timeout`] whenever [`Relay::poll_timeout`] has passed;
//!    [`Relay::poll_resume`] names connections whose paused reads may go on (while
//!    [`Relay::has_resumes`], poll without sleeping).
//!
//! Memory: every byte held for a connection counts against it (its output queue against
//! the output cap, as [`OutQueue::held`]) and against the relay's memory budget
//! ([`Config::max_memory`]), together with its partial input. Frames are read in place
//! from the driver's read buffer and copied into the queues that keep them (a small frame
//! into each recipient's queue tail, a large or fan-out one into one shared allocation),
//! so nothing queued points into a read buffer or holds memory it is not charged for.

mod auth_handlers;
mod cluster;
mod cluster_handlers;
mod cluster_inbox;
mod config;
mod dedup;
mod demo;
mod devices;
mod directory;
mod handlers;
mod hashing;
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

pub use auth_handlers::MAX_AUTH_FAILURES;
pub use cluster::{Channel, ClusterOp, ClusterReply, ROOM_COUNT_REFRESH, ROOM_COUNT_TTL_MS};
pub use cluster_inbox::{
    store_answers, InboxOp, InboxParams, StoreRequest, StoredMessage, FETCH_BATCH, STORED_NOTICE,
    STORE_BATCH,
};
pub use config::{AuthConfig, Config, ConfigError, DEFAULT_TOKEN_NOTICE};
pub use devices::DeviceCursor;
pub use inbox::{InboxLimits, StoreOp, NO_ORIGIN};
pub use metrics::{Metrics, OpcodeCounts, RefusedCounts};
pub use out_queue::{OutQueue, SpareTails, COPY_MAX, FRAME_OVERHEAD};
pub use session::{Codec, ConnLabel, State};

use std::net::IpAddr;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use log::{debug, info};
use slab::Slab;

use crate::proto::frame::{write_error, write_frame};
use crate::proto::text;
use crate::proto::{decode_raw, ErrorCode, Flags, MessageId, Opcode, RawFrame, RoomId, UserId};
use crate::ConnId;
use dedup::Dedup;
use directory::Directory;
use hashing::{id_map, IdMap};
use inbox::Inboxes;
use out_queue::FlushList;
use rooms::Rooms;
use session::Session;
use timers::Timers;

/// How long a closing connection may take to drain its output before it is closed anyway.
pub const CLOSE_LINGER: Duration = Duration::from_secs(5);

/// Control frames (ACK, ERROR, LOGIN_OK) are encoded into a scratch buffer kept from frame
/// to frame, then copied into the queue that sends them ([`push_copied`]): no allocation of
/// their own. A scratch that grew past this size (a long reason) is given back.
const SCRATCH_KEEP: usize = 4 * 1024;

/// Each frame handled counts this much work; each delivery it queues counts one.
const FRAME_WORK: usize = 8;

/// A connection whose last this many frames (or text lines) were all refused with an error
/// is closed with LIMIT_REACHED: no working client does that, and answering a flood of
/// refused frames one by one would hold up everyone else.
pub const MAX_REFUSED_IN_A_ROW: u32 = 1024;

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
    flush_list: FlushList,
    resume_list: Vec<ConnId>,
    scratch: BytesMut,
    /// Heap bytes held for partial input over all sessions.
    input_held: usize,
    /// What the driver holds for connections ([`Relay::set_driver_held`]).
    driver_held: usize,
    /// Work done since the driver last asked ([`Relay::take_work`]).
    work: usize,
    /// Open connections per peer address (addresses the per-address limit applies to).
    per_ip: IdMap<IpAddr, u32>,
    /// The counted address of each connection, by slab key.
    conn_ip: Vec<Option<IpAddr>>,
    next_serial: u64,
    next_ping_id: u64,
    shutting_down: bool,
    /// Cluster mode (None: a single relay).
    cluster: Option<cluster::Cluster>,
    metrics: Metrics,
    /// Open sessions by codec (index: `Codec as usize`), kept as codecs change.
    by_codec: [usize; Codec::ALL.len()],
}

impl Relay {
    /// A relay with the given limits. Call [`Config::validate`] first; an invalid config
    /// is not rejected here.
    ///
    /// The core reads neither the clock nor entropy: `now` and `unix_ms` (the wall clock
    /// at `now`, for stored messages' timestamps) and `seed` (hash seeds, the store's
    /// epoch) come from the caller, so a simulation with a fixed seed and clock is
    /// deterministic.
    pub fn new(config: Config, now: Instant, unix_ms: u64, seed: u64) -> Relay {
        let limits = config.inbox_limits();
        let mut rng = crate::rand::Rng::seeded(seed);
        let dedup = Dedup::new(
            config.dedup_window,
            config.dedup_ttl,
            config.dedup_max_entries,
            rng.next_u64(),
        );
        Relay {
            config,
            sessions: Slab::new(),
            directory: Directory::new(rng.next_u64()),
            rooms: Rooms::new(rng.next_u64()),
            dedup,
            inboxes: Inboxes::new(limits, rng.next_u64(), rng.next_u64()),
            durable: false,
            store_ops: Vec::new(),
            store_failure: None,
            held_acks: Vec::new(),
            appended: Vec::new(),
            commits: std::collections::VecDeque::new(),
            next_commit: 0,
            clock_base: (now, unix_ms),
            timers: Timers::default(),
            flush_list: FlushList::default(),
            resume_list: Vec::new(),
            scratch: BytesMut::new(),
            input_held: 0,
            driver_held: 0,
            work: 0,
            per_ip: id_map(rng.next_u64()),
            conn_ip: Vec::new(),
            next_serial: 0,
            next_ping_id: 0,
            shutting_down: false,
            cluster: None,
            metrics: Metrics::default(),
            by_codec: [0; Codec::ALL.len()],
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

    /// How log lines name connection `id`: `conn#17`, `conn#17 user 1002@tablet` once it
    /// logged in ([`ConnLabel`]; never the slab key, which a later connection reuses). Use
    /// it in a log macro's arguments, which are evaluated only when the line is logged.
    pub fn conn_label(&self, id: ConnId) -> ConnLabel<'_> {
        self.sessions
            .get(id.0)
            .map_or_else(|| ConnLabel::unknown(id), Session::label)
    }

    /// Rooms with at least one member.
    pub fn room_count(&self) -> usize {
        self.rooms.len()
    }

    /// Room memberships over all rooms (a connection in two rooms counts twice).
    pub fn room_memberships(&self) -> usize {
        self.rooms.memberships()
    }

    /// Open sessions (closing ones included) by codec, in the order of [`Codec::ALL`].
    pub fn sessions_by_codec(&self) -> [usize; Codec::ALL.len()] {
        self.by_codec
    }

    /// Bytes all output queues hold, as the caps count them (part of
    /// [`Relay::memory_held`]).
    pub fn output_held(&self) -> usize {
        self.flush_list.held
    }

    /// Drained output buffers kept for reuse ([`SpareTails`]; part of
    /// [`Relay::memory_held`], bounded, held for no connection in particular).
    pub fn spare_held(&self) -> usize {
        self.flush_list.spare.held()
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

    /// Bytes all connections hold now (output queues and partial input), which
    /// [`Config::max_memory`] bounds.
    pub fn memory_held(&self) -> usize {
        self.flush_list.held
            + self.flush_list.spare.held()
            + self.input_held
            + self.driver_held
            + self.cluster.as_ref().map_or(0, |c| c.held)
    }

    /// What the driver holds for connections besides the core's buffers (TLS sessions'
    /// records), counted in [`Relay::memory_held`] from now on.
    pub fn set_driver_held(&mut self, bytes: usize) {
        self.driver_held = bytes;
    }

    /// True when `extra` more bytes would take the connections past the memory budget.
    fn over_budget(&self, extra: usize) -> bool {
        self.memory_held() + extra > self.config.max_memory
    }

    /// A socket was accepted from `peer`. Returns its id, or the refusal to write before
    /// dropping it.
    pub fn handle_open(&mut self, now: Instant, peer: IpAddr) -> Result<ConnId, Refused> {
        let per_ip = self.config.max_connections_per_ip;
        let counted = per_ip > 0 && (self.config.limit_loopback || !peer.is_loopback());
        let from_peer = if counted {
            self.per_ip.get(&peer).copied().unwrap_or(0) as usize
        } else {
            0
        };
        let refused = &mut self.metrics.refused;
        let refusal = if self.shutting_down {
            refused.shutting_down += 1;
            Some((
                ErrorCode::ShuttingDown,
                "the relay is shutting down".to_string(),
            ))
        } else if self.sessions.len() >= self.config.max_connections {
            refused.connection_limit += 1;
            Some((
                ErrorCode::LimitReached,
                format!(
                    "connection limit reached ({} connections)",
                    self.config.max_connections
                ),
            ))
        } else if counted && from_peer >= per_ip {
            refused.per_address_limit += 1;
            Some((
                ErrorCode::LimitReached,
                format!("{peer} has {per_ip} connections open (max connections per address)"),
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
        if self.conn_ip.len() <= id.0 {
            self.conn_ip.resize(id.0 + 1, None);
        }
        if counted {
            *self.per_ip.entry(peer).or_insert(0) += 1;
            self.conn_ip[id.0] = Some(peer);
        }
        self.metrics.connections_opened += 1;
        self.by_codec[Codec::Undecided as usize] += 1;
        Ok(id)
    }

    /// The LIMIT_REACHED frame for a connection the driver could only accept to refuse
    /// (the process is out of file descriptors). Counted as a refusal.
    pub fn refuse_for_descriptors(&mut self) -> Bytes {
        self.metrics.connections_refused += 1;
        self.metrics.refused.out_of_descriptors += 1;
        self.metrics.count_error(ErrorCode::LimitReached);
        let mut buf = BytesMut::new();
        let reason = "the relay is out of file descriptors";
        write_error(
            &mut buf,
            MessageId(0),
            UserId::NONE,
            ErrorCode::LimitReached,
            reason,
        );
        buf.freeze()
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
        if s.out.held() >= self.config.out_cap {
            s.read_paused = true;
            self.metrics.read_pauses += 1;
            return false;
        }
        true
    }

    /// [`Relay::handle_read`] for bytes in a slice (tests, tools): they are copied into a
    /// buffer of their own first.
    pub fn handle_input(&mut self, id: ConnId, data: &[u8], now: Instant) {
        self.handle_read(id, &mut BytesMut::from(data), now);
    }

    /// Bytes read from the connection's socket into `buf`, in any amount; all of them are
    /// used up (`buf` is empty on return, and nothing points into it: the driver reuses
    /// it for every connection). Every complete frame (line, message) is handled at once,
    /// read in place. The start of an incomplete frame is kept in the session, in a buffer
    /// sized once from its declared length, and must be complete within the frame timeout.
    /// A framing error queues an ERROR and starts closing.
    pub fn handle_read(&mut self, id: ConnId, buf: &mut BytesMut, now: Instant) {
        let Some(s) = self.sessions.get_mut(id.0) else {
            buf.clear();
            return;
        };
        if s.state == State::Closing || buf.is_empty() {
            buf.clear();
            return;
        }
        s.last_rx = now;
        s.ping_sent = false;
        match s.codec {
            Codec::Binary => self.binary_read(id, buf, now),
            Codec::Undecided => self.undecided_input(id, buf, now),
            Codec::Text => self.text_input(id, buf, now),
            Codec::Http => self.http_input(id, buf, now),
            Codec::WebSocket => {
                let mut input = std::mem::take(buf);
                let completed = self.handle_ws(id, &mut input, now);
                if let Some(s) = self.sessions.get_mut(id.0) {
                    if completed {
                        s.partial_since = None;
                    } else if s.partial_since.is_none() {
                        s.partial_since = Some(now);
                    }
                }
            }
        }
        buf.clear();
        self.after_input(id, now);
    }

    /// Brings the relay's input total up to date with what the session holds now.
    pub(super) fn sync_input(input_held: &mut usize, s: &mut Session) {
        let held = s.input_held();
        *input_held = *input_held - s.input_counted + held;
        s.input_counted = held;
    }

    /// Accounts for a change in the connection's input buffers, enforces the memory
    /// budget on them, and starts or ends the partial-input deadline.
    fn after_input(&mut self, id: ConnId, now: Instant) {
        let Some(s) = self.sessions.get_mut(id.0) else {
            return;
        };
        if s.state == State::Closing {
            // Input is ignored from now on: free what was buffered for it.
            s.clear_input();
            Self::sync_input(&mut self.input_held, s);
            return;
        }
        let grew = s.input_held() > s.input_counted;
        Self::sync_input(&mut self.input_held, s);
        if grew && self.memory_held() > self.config.max_memory {
            let reason = format!(
                "the relay's memory budget ({} bytes) has no room for this connection's input",
                self.config.max_memory
            );
            self.fail(id, ErrorCode::LimitReached, &reason, now);
            return;
        }
        let Some(s) = self.sessions.get_mut(id.0) else {
            return;
        };
        if s.codec == Codec::WebSocket {
            return;
        }
        if !s.has_partial_input() {
            s.partial_since = None;
        } else if s.partial_since.is_none() {
            s.partial_since = Some(now);
            let due = now + self.config.frame_timeout;
            if due < s.deadline {
                arm(&mut self.timers, s, id, due);
            }
        }
    }

    /// Binary input from a read buffer: whole frames are handled in place; a partial one
    /// goes into the session's reader.
    fn binary_read(&mut self, id: ConnId, buf: &mut BytesMut, now: Instant) {
        let max_frame = self.config.max_frame;
        let mut data: &[u8] = buf;
        // Whether the frame handled last was refused: counted at the next turn of the
        // loop, where the session is looked up anyway (one lookup per frame).
        let mut last_refused: Option<bool> = None;
        loop {
            let Some(s) = self.sessions.get_mut(id.0) else {
                return;
            };
            if let Some(refused) = last_refused {
                if !refused {
                    s.refused_in_a_row = 0;
                } else if Self::one_more_refusal(s) {
                    self.refuse_too_many(id, now);
                    continue;
                }
            }
            if s.state == State::Closing {
                s.reader.clear();
                return;
            }
            match s.reader.next_frame(&mut data, max_frame) {
                Ok(Some(frame)) => {
                    // A frame completed: the frame timeout starts again with the next one.
                    s.partial_since = None;
                    let errors = self.metrics.errors_total;
                    self.handle_counted(id, frame.raw(), now);
                    last_refused = Some(self.metrics.errors_total != errors);
                }
                Ok(None) => return,
                Err(e) => {
                    self.fail(id, e.code(), &e.to_string(), now);
                    return;
                }
            }
        }
    }

    /// One decoded frame from any codec: counted, then handled, then counted toward
    /// [`MAX_REFUSED_IN_A_ROW`].
    fn handle_raw(&mut self, id: ConnId, frame: RawFrame<'_>, now: Instant) {
        let errors = self.metrics.errors_total;
        self.handle_counted(id, frame, now);
        let refused = self.metrics.errors_total != errors;
        self.count_refusal(id, refused, now);
    }

    /// A decoded frame counted in the metrics and the work of this turn, then handled.
    #[inline]
    fn handle_counted(&mut self, id: ConnId, frame: RawFrame<'_>, now: Instant) {
        self.metrics.frames_in += 1;
        let (opcode, len) = (frame.header().opcode, frame.as_bytes().len() as u64);
        self.metrics.frames_in_by_opcode.count(opcode);
        self.metrics.bytes_in_by_opcode.add(opcode, len);
        self.metrics.bytes_in += len;
        self.work += FRAME_WORK;
        self.handle_frame(id, frame, now);
    }

    /// Adds a refusal to the session's run; true when the run reached the limit.
    fn one_more_refusal(s: &mut Session) -> bool {
        s.refused_in_a_row += 1;
        s.refused_in_a_row >= MAX_REFUSED_IN_A_ROW && s.state != State::Closing
    }

    #[cold]
    fn refuse_too_many(&mut self, id: ConnId, now: Instant) {
        let reason =
            format!("{MAX_REFUSED_IN_A_ROW} frames in a row were refused (max refused in a row)");
        self.fail(id, ErrorCode::LimitReached, &reason, now);
    }

    /// Counts a refused (or accepted) frame toward [`MAX_REFUSED_IN_A_ROW`].
    fn count_refusal(&mut self, id: ConnId, refused: bool, now: Instant) {
        let Some(s) = self.sessions.get_mut(id.0) else {
            return;
        };
        if !refused {
            s.refused_in_a_row = 0;
        } else if Self::one_more_refusal(s) {
            self.refuse_too_many(id, now);
        }
    }

    /// The first bytes: they choose the codec (a proper prefix of `GET ` waits for more).
    fn undecided_input(&mut self, id: ConnId, data: &[u8], now: Instant) {
        let Some(s) = self.sessions.get_mut(id.0) else {
            return;
        };
        let pending = s.extra.as_mut().map(|e| std::mem::take(&mut e.pending));
        let joined;
        let first: &[u8] = match pending {
            Some(mut pending) if !pending.is_empty() => {
                pending.extend_from_slice(data);
                joined = pending;
                &joined
            }
            _ => data,
        };
        match Codec::choose(first) {
            Some(codec) => {
                set_codec(&mut self.by_codec, s, codec);
                if codec == Codec::Text && s.state == State::AwaitingLogin {
                    // The login deadline was armed for a program; a person gets longer.
                    let login_due = s.opened_at + self.config.text_login_timeout;
                    let frame_due = s.partial_since.map(|at| at + self.config.frame_timeout);
                    let deadline = frame_due.map_or(login_due, |due| due.min(login_due));
                    arm(&mut self.timers, s, id, deadline);
                }
                self.handle_input_as(id, first, now);
            }
            None => s.extra_mut().pending.extend_from_slice(first),
        }
    }

    fn handle_input_as(&mut self, id: ConnId, data: &[u8], now: Instant) {
        let Some(s) = self.sessions.get(id.0) else {
            return;
        };
        match s.codec {
            Codec::Binary => self.binary_read(id, &mut BytesMut::from(data), now),
            Codec::Text => self.text_input(id, data, now),
            Codec::Http => self.http_input(id, data, now),
            Codec::WebSocket | Codec::Undecided => {}
        }
    }

    /// HTTP input: the request head is gathered in the session (at most
    /// [`http::MAX_REQUEST_HEAD`] bytes), then handled.
    fn http_input(&mut self, id: ConnId, data: &[u8], now: Instant) {
        let Some(s) = self.sessions.get_mut(id.0) else {
            return;
        };
        let mut buf = std::mem::take(&mut s.extra_mut().pending);
        buf.extend_from_slice(data);
        self.handle_http(id, &mut buf, now);
        if let Some(s) = self.sessions.get_mut(id.0) {
            if s.codec == Codec::Http && s.state != State::Closing && !buf.is_empty() {
                s.extra_mut().pending = buf;
            }
        }
    }

    /// Text input: complete lines are handled; a partial line waits in the session, and
    /// only the new bytes are searched for its end.
    fn text_input(&mut self, id: ConnId, data: &[u8], now: Instant) {
        let max_line = self.config.max_frame as usize;
        let Some(s) = self.sessions.get_mut(id.0) else {
            return;
        };
        let mut pending = std::mem::take(&mut s.extra_mut().pending);
        let (lines, rest) = match data.iter().rposition(|&b| b == b'\n') {
            Some(end) => data.split_at(end + 1),
            None => (&data[..0], data),
        };
        if !lines.is_empty() {
            // A line completed: the frame timeout starts again with the next one.
            s.partial_since = None;
            if pending.is_empty() {
                self.handle_lines(id, lines, now);
            } else {
                pending.extend_from_slice(lines);
                let lines = std::mem::take(&mut pending).freeze();
                self.handle_lines(id, &lines, now);
            }
        }
        let Some(s) = self.sessions.get_mut(id.0) else {
            return;
        };
        if s.state == State::Closing {
            return;
        }
        if pending.is_empty() {
            pending = BytesMut::from(rest);
        } else {
            pending.extend_from_slice(rest);
        }
        if pending.len() > max_line {
            return self.line_too_long(id, now);
        }
        s.extra_mut().pending = pending;
    }

    fn line_too_long(&mut self, id: ConnId, now: Instant) {
        let max_frame = self.config.max_frame;
        let reason = format!("line longer than the max frame ({max_frame} bytes)");
        let code = ErrorCode::FrameTooLarge;
        self.fail(id, code, &reason, now);
    }

    /// Text mode: each complete line in `lines` (which ends with a line end) becomes the
    /// frame a binary client would have sent and goes through the same handlers. A line,
    /// or the frame it becomes, longer than the max frame closes with FRAME_TOO_LARGE.
    fn handle_lines(&mut self, id: ConnId, lines: &[u8], now: Instant) {
        let max_frame = self.config.max_frame;
        for line in lines.split_inclusive(|&b| b == b'\n') {
            let Some(s) = self.sessions.get_mut(id.0) else {
                return;
            };
            if s.state == State::Closing {
                return;
            }
            let text = line.strip_suffix(b"\n").unwrap_or(line);
            if text.len() > max_frame as usize {
                return self.line_too_long(id, now);
            }
            match text::parse_line(text, s.text_ids()) {
                Ok(text::Line::Frame(frame)) => {
                    if frame.encoded_len() > max_frame as usize {
                        let reason = format!(
                            "the line becomes a {}-byte frame, over the max frame ({max_frame} bytes)",
                            frame.encoded_len()
                        );
                        let code = ErrorCode::FrameTooLarge;
                        self.fail(id, code, &reason, now);
                        return;
                    }
                    let mut encoded = BytesMut::with_capacity(frame.encoded_len());
                    frame.encode(&mut encoded);
                    if let Ok(Some(bytes)) = decode_raw(&mut encoded, max_frame) {
                        let raw = RawFrame::new(&bytes);
                        self.metrics.frames_in += 1;
                        let opcode = raw.header().opcode;
                        self.metrics.frames_in_by_opcode.count(opcode);
                        self.metrics
                            .bytes_in_by_opcode
                            .add(opcode, line.len() as u64);
                        self.metrics.bytes_in += line.len() as u64;
                        self.work += FRAME_WORK;
                        let errors = self.metrics.errors_total;
                        self.handle_frame(id, raw, now);
                        let refused = self.metrics.errors_total != errors;
                        self.count_refusal(id, refused, now);
                    }
                }
                Ok(text::Line::Help) => {
                    self.work += FRAME_WORK;
                    self.queue(id, Bytes::from_static(text::HELP.as_bytes()));
                }
                Ok(text::Line::Blank) => {}
                Err(usage) => {
                    self.work += FRAME_WORK;
                    self.queue(id, text::render_usage(&usage));
                    self.count_refusal(id, true, now);
                }
            }
        }
    }

    /// Work (frames handled, deliveries queued) done since the last call. The driver
    /// stops reading a connection for this turn once its reads caused enough of it, so one
    /// connection's fan-out cannot hold up everyone else's.
    pub fn take_work(&mut self) -> usize {
        std::mem::take(&mut self.work)
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
        if !s.has_partial_input() {
            debug!("{}: peer closed its stream", s.label());
            self.begin_close(id, now);
        } else {
            let len = s.reader.partial_len() + s.extra.as_ref().map_or(0, |e| e.pending.len());
            let reason =
                format!("connection closed in the middle of a frame ({len} bytes discarded)");
            self.fail(id, ErrorCode::Malformed, &reason, now);
        }
    }

    /// The socket is gone (closed after [`Relay::is_finished`], or failed). Frees the session.
    pub fn handle_closed(&mut self, id: ConnId) {
        let Some(mut s) = self.sessions.try_remove(id.0) else {
            return;
        };
        self.input_held -= s.input_counted;
        if let Some(peer) = self.conn_ip.get_mut(id.0).and_then(Option::take) {
            if let Some(n) = self.per_ip.get_mut(&peer) {
                *n -= 1;
                if *n == 0 {
                    self.per_ip.remove(&peer);
                }
            }
        }
        if let Some(user) = s.user() {
            self.directory.remove(user, id);
            if self.directory.devices(user).is_empty() {
                cluster::unsubscribe(&mut self.cluster, cluster::Channel::User(user));
            }
        }
        for room in s.rooms.drain(..) {
            self.rooms.leave(room, id);
            if self.rooms.count(room) == 0 {
                cluster::unsubscribe(&mut self.cluster, cluster::Channel::Room(room));
            }
            cluster::room_count_changed(&mut self.cluster, room);
        }
        let (lost, held) = s.out.clear();
        self.flush_list.held -= held;
        if lost > 0 {
            self.metrics.bytes_lost_on_reset += lost as u64;
            info!(
                "{}: closed with {} of output unsent",
                s.label(),
                counted(lost, "byte", "bytes")
            );
        }
        self.metrics.connections_closed += 1;
        self.by_codec[s.codec as usize] -= 1;
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
        self.flush_list.held -= s.out.advance(&mut self.flush_list.spare, n);
        self.metrics.bytes_out += n as u64;
        if s.read_paused && s.out.held() <= self.config.out_cap / 2 {
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

    /// True when the connection is closing and its output is flushed, with no ACK still
    /// waiting for the store (or its linger time ran out): the driver closes the socket
    /// and calls [`Relay::handle_closed`].
    pub fn is_finished(&self, id: ConnId) -> bool {
        self.sessions.get(id.0).is_some_and(|s| {
            s.state == State::Closing && ((s.out.is_empty() && s.acks_held == 0) || s.linger_over)
        })
    }

    /// The next connection whose reads were paused and may go on.
    pub fn poll_resume(&mut self) -> Option<ConnId> {
        self.resume_list.pop()
    }

    /// True while a connection's paused reads may go on: the driver must not sleep in
    /// its poll (the socket may hold data that will never raise a new readiness event).
    pub fn has_resumes(&self) -> bool {
        !self.resume_list.is_empty()
    }

    // ---- time --------------------------------------------------------------------------

    /// The earliest time [`Relay::handle_timeout`] has work to do: a connection's deadline
    /// or a stored message's age limit.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match (self.timers.next(), self.inbox_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Runs every deadline due at `now`: login timeouts, PINGs, idle timeouts, frame
    /// timeouts, linger ends, and a bounded step of stored-message expiry.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.inbox_deadline().is_some_and(|at| at <= now) {
            self.expire_inboxes(now);
        }
        while let Some(due) = self.timers.pop_due(now) {
            let id = due.conn;
            let Some(s) = self.sessions.get_mut(id.0) else {
                continue;
            };
            if s.serial != due.serial || s.deadline != due.at {
                continue; // stale: the session was replaced or re-armed since
            }
            let frame_timeout = self.config.frame_timeout;
            let frame_due = s.partial_since.map(|since| since + frame_timeout);
            if s.state != State::Closing && frame_due.is_some_and(|at| now >= at) {
                let reason = format!(
                    "a frame was started and not finished within {} ms",
                    frame_timeout.as_millis()
                );
                let code = ErrorCode::FrameTimeout;
                self.fail(id, code, &reason, now);
                continue;
            }
            let next = |at: Instant| frame_due.map_or(at, |due| due.min(at));
            match s.state {
                State::Closing => {
                    s.linger_over = true;
                    if !s.in_flush_list {
                        s.in_flush_list = true;
                        self.flush_list.push(id);
                    }
                }
                State::AwaitingLogin => {
                    // A person typing in text mode gets longer (protocol.md, section 9).
                    let login_timeout = match s.codec {
                        Codec::Text => self.config.text_login_timeout,
                        _ => self.config.login_timeout,
                    };
                    let deadline = s.opened_at + login_timeout;
                    if now >= deadline {
                        let reason = format!("no LOGIN within {} ms", login_timeout.as_millis());
                        self.fail(id, ErrorCode::LoginTimeout, &reason, now);
                    } else {
                        arm(&mut self.timers, s, id, next(deadline));
                    }
                }
                State::Active(_) => {
                    if self.token_timer(id, now) {
                        continue;
                    }
                    let token_due = self.sessions.get(id.0).and_then(|s| self.token_due(s));
                    let Some(s) = self.sessions.get_mut(id.0) else {
                        continue;
                    };
                    // The earliest of the frame deadline, the token's, and `at`.
                    let due = token_due.into_iter().chain(frame_due).min();
                    let next = |at: Instant| due.map_or(at, |due| due.min(at));
                    let silence = now.saturating_duration_since(s.last_rx);
                    if silence >= self.config.idle_timeout {
                        let reason = format!(
                            "nothing received for {} ms",
                            self.config.idle_timeout.as_millis()
                        );
                        self.fail(id, ErrorCode::IdleTimeout, &reason, now);
                    } else if silence >= self.config.ping_interval || s.ping_sent {
                        let idle_at = s.last_rx + self.config.idle_timeout;
                        arm(&mut self.timers, s, id, next(idle_at));
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
                        arm(&mut self.timers, s, id, next(ping_at));
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
pub(crate) fn push_output(s: &mut Session, flush_list: &mut FlushList, id: ConnId, frame: Bytes) {
    if s.codec != Codec::Binary {
        if s.codec == Codec::Text {
            match text::render(&frame) {
                Some(line) => flush_list.held += s.out.push(line),
                // Already text (HELP, usage errors) or nothing a text client shows.
                None if frame.first().is_some_and(|b| text::starts_text(*b)) => {
                    flush_list.held += s.out.push(frame)
                }
                None => return,
            }
        } else {
            let Some(added) = push_rendered(s, frame) else {
                return;
            };
            flush_list.held += added;
        }
    } else {
        flush_list.held += s.out.push(frame);
    }
    name_for_flush(s, flush_list, id);
}

/// Puts the connection on the flush list, unless it is there or its socket is blocked.
#[inline(always)]
fn name_for_flush(s: &mut Session, flush_list: &mut FlushList, id: ConnId) {
    if !s.in_flush_list && !s.write_blocked {
        s.in_flush_list = true;
        flush_list.push(id);
    }
}

/// Queues `frame` to one connection with its header rewritten (`opcode`, `target`,
/// `source`: a SEND's DELIVER, a PING's PONG), through [`push_small_or_shared`]: rewritten
/// on the way into the queue's tail, or as one shared allocation, made once in `shared` for
/// all the frame's recipients. Always inlined: the rewrite's fields are then constants or
/// registers.
#[inline(always)]
pub(crate) fn push_rewritten(
    s: &mut Session,
    flush_list: &mut FlushList,
    id: ConnId,
    frame: &RawFrame<'_>,
    (opcode, target, source): (Opcode, UserId, UserId),
    shared: &mut Option<Bytes>,
) {
    let len = frame.as_bytes().len();
    let write = |tail: &mut BytesMut| frame.rewrite_into(tail, opcode, target, source);
    let make_shared = || {
        let bytes = shared.get_or_insert_with(|| frame.rewritten(opcode, target, source));
        bytes.clone()
    };
    push_small_or_shared(s, flush_list, id, len, write, make_shared);
}

/// Queues a copy of `bytes` (one encoded frame) to one connection, through
/// [`push_small_or_shared`].
pub(crate) fn push_copied(s: &mut Session, flush_list: &mut FlushList, id: ConnId, bytes: &[u8]) {
    let write = |tail: &mut BytesMut| tail.extend_from_slice(bytes);
    let make_shared = || Bytes::copy_from_slice(bytes);
    push_small_or_shared(s, flush_list, id, bytes.len(), write, make_shared);
}

/// Queues a frame of `len` bytes to one connection: a frame of up to [`COPY_MAX`] bytes to
/// a binary connection is appended to its queue's tail by `write` (no allocation and no
/// reference count per frame: the hot path of every direct message); anything else is
/// queued as the `Bytes` that `make_shared` gives, which [`push_output`] renders for the
/// connection's codec.
#[inline(always)]
fn push_small_or_shared(
    s: &mut Session,
    flush_list: &mut FlushList,
    id: ConnId,
    len: usize,
    write: impl FnOnce(&mut BytesMut),
    make_shared: impl FnOnce() -> Bytes,
) {
    if s.codec == Codec::Binary && len <= COPY_MAX {
        flush_list.held += s.out.push_copy(&mut flush_list.spare, len, write);
        name_for_flush(s, flush_list, id);
    } else {
        push_output(s, flush_list, id, make_shared());
    }
}

/// [`push_output`] for HTTP and WebSocket connections: what was added to the queue's held
/// bytes, `None` when nothing was queued.
fn push_rendered(s: &mut Session, frame: Bytes) -> Option<usize> {
    Some(match s.codec {
        Codec::Binary | Codec::Undecided => s.out.push(frame),
        Codec::Text => s.out.push(text_line(frame)?),
        Codec::Http => s.out.push(http::render_error_frame(&frame)?),
        Codec::WebSocket => {
            let ws = s.extra.as_deref_mut().and_then(|e| e.ws.as_mut());
            let ws = ws.filter(|ws| ws.can_send())?;
            let body = if ws.mode == ws::WsMode::Text {
                // One line per text message, without its line end.
                let mut line = text_line(frame)?;
                if line.ends_with(b"\r\n") {
                    line.truncate(line.len() - 2);
                }
                line
            } else {
                frame
            };
            let header = ws.message_header(body.len(), ws.mode == ws::WsMode::Text);
            s.out.push(header) + s.out.push(body)
        }
    })
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
pub(crate) fn push_raw(s: &mut Session, flush_list: &mut FlushList, id: ConnId, bytes: Bytes) {
    flush_list.held += s.out.push(bytes);
    name_for_flush(s, flush_list, id);
}

/// Changes a session's codec, keeping the relay's count of sessions by codec.
pub(crate) fn set_codec(by_codec: &mut [usize; Codec::ALL.len()], s: &mut Session, codec: Codec) {
    by_codec[s.codec as usize] -= 1;
    by_codec[codec as usize] += 1;
    s.codec = codec;
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

pub(crate) fn millis_u32(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

/// `n` and the noun in the right number, for log lines: "1 room", "2 rooms".
pub(crate) fn counted(n: impl TryInto<u64>, one: &str, many: &str) -> String {
    let n = n.try_into().unwrap_or(u64::MAX);
    format!("{n} {}", if n == 1 { one } else { many })
}

#[cfg(test)]
mod tests;
