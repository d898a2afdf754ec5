//! One connection's state inside the relay core.

use std::time::Instant;

use bytes::BytesMut;

use crate::proto::FrameReader;

use super::http::GET_PREFIX;
use super::out_queue::OutQueue;
use super::rate::TokenBucket;
use super::ws::WsSession;
use crate::proto::{text, RoomId, UserId};

/// Where a connection is in its life (protocol.md, "Connection states").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Connected, no successful LOGIN yet. PING, BYE and LOGIN are accepted.
    AwaitingLogin,
    /// Logged in as the user; everything is accepted.
    Active(UserId),
    /// Closing: input is ignored, pending output is flushed, then the socket is closed.
    Closing,
}

/// How a connection frames its bytes, decided by its first bytes (protocol.md, section 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    /// Nothing received yet (or only a prefix of `GET `).
    Undecided,
    /// Binary v1 frames.
    Binary,
    /// Text mode: one command per line, one rendered line per frame out.
    Text,
    /// `GET ` came first: reading an HTTP request head.
    Http,
    /// Upgraded to WebSocket: frames or lines inside messages ([`Session::ws`]).
    WebSocket,
}

impl Codec {
    /// Every codec, in the order of their discriminants.
    pub const ALL: [Codec; 5] = [
        Codec::Undecided,
        Codec::Binary,
        Codec::Text,
        Codec::Http,
        Codec::WebSocket,
    ];

    /// A lowercase name for logs and metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            Codec::Undecided => "undecided",
            Codec::Binary => "binary",
            Codec::Text => "text",
            Codec::Http => "http",
            Codec::WebSocket => "websocket",
        }
    }

    /// The codec the first bytes of a connection choose, or `None` while they are empty or
    /// a proper prefix of `GET ` and one more byte decides.
    pub fn choose(first: &[u8]) -> Option<Codec> {
        let &byte = first.first()?;
        if byte == 0 {
            return Some(Codec::Binary);
        }
        let n = first.len().min(GET_PREFIX.len());
        if first[..n] == GET_PREFIX[..n] {
            return (n == GET_PREFIX.len()).then_some(Codec::Http);
        }
        Some(if text::starts_text(byte) {
            Codec::Text
        } else {
            Codec::Binary
        })
    }
}

/// Per-connection state. Small on purpose: an idle session owns no heap memory.
#[derive(Debug)]
pub struct Session {
    /// Distinguishes this session from earlier ones on the same slab key.
    pub serial: u64,
    /// Life-cycle state.
    pub state: State,
    /// Binary, text, HTTP or WebSocket framing.
    pub codec: Codec,
    /// State only text-mode and WebSocket connections (and connections that named a device
    /// at LOGIN) have, allocated on first use: a binary session pays one null pointer for
    /// it.
    pub extra: Option<Box<Extra>>,
    /// Frames waiting to be written.
    pub out: OutQueue,
    /// Binary framing: the start of a frame whose rest has not arrived yet.
    pub reader: FrameReader,
    /// When the incomplete frame (line, HTTP head, WebSocket message) now buffered began
    /// to arrive; it must be whole by this plus the frame timeout.
    pub partial_since: Option<Instant>,
    /// What the relay's input total counts for this session (see `Relay::sync_input`).
    pub input_counted: usize,
    /// When the connection was accepted.
    pub opened_at: Instant,
    /// The one armed deadline that is live for this session; heap entries at other times
    /// are stale and skipped.
    pub deadline: Instant,
    /// When the last frame from the client was decoded.
    pub last_rx: Instant,
    /// A PING was sent for the current silence and not yet answered by anything.
    pub ping_sent: bool,
    /// Queued in the relay's flush list for this loop turn.
    pub in_flush_list: bool,
    /// The socket said WouldBlock on write; wait for the driver's writable event.
    pub write_blocked: bool,
    /// Reads are paused because this connection's own output queue is over the cap.
    pub read_paused: bool,
    /// Closing took longer than the linger time: close even with output pending.
    pub linger_over: bool,
    /// Rooms this connection is in (bounded by the rooms-per-connection limit).
    pub rooms: Vec<RoomId>,
    /// Room messages dropped for this connection while it was slow, per room (room 0 =
    /// broadcasts); reported with ROOM_MISSED once its output drains.
    pub missed: Vec<(RoomId, u64)>,
    /// ROOM_SEND / BROADCAST rate limit.
    pub room_rate: TokenBucket,
    /// INBOX_SYNC was received: stored messages are pushed to this connection.
    pub inbox_synced: bool,
    /// The highest inbox sequence number queued to this connection.
    pub inbox_pushed: u64,
    /// The tag of the device this connection logged in as (0: the user's default device;
    /// protocol.md, section 15.1).
    pub device: u64,
    /// The user this connection logged in as (`UserId::NONE` before LOGIN), kept while it
    /// closes, when [`Session::state`] no longer says: for log lines ([`ConnLabel`]).
    pub logged_in_as: UserId,
    /// ACKs of stored SENDs from this connection that wait for the store's commit. A
    /// closing connection is not closed before they are sent: a sender gets the answer to
    /// every frame it sent.
    pub acks_held: u32,
    /// Frames (or lines) in a row that were refused with an error; see
    /// [`super::MAX_REFUSED_IN_A_ROW`].
    pub refused_in_a_row: u32,
    /// Cluster mode: SENDs of this connection waiting for Redis before they are delivered
    /// (DEDUP claims, and the SENDs behind them): later SENDs wait too, to keep the order.
    pub cluster_deferred: u32,
    /// What the login token grants (only when the relay checks tokens); boxed, so a
    /// session without one pays a null pointer.
    pub grants: Option<Box<crate::auth::Grants>>,
    /// TOKEN_EXPIRING was sent for the current token.
    pub expiry_noticed: bool,
    /// LOGIN or REFRESH tokens refused in a row (see `super::MAX_AUTH_FAILURES`).
    pub auth_failures: u8,
}

/// The part of a session that binary connections do not need (unless they name a device).
#[derive(Debug, Default)]
pub struct Extra {
    /// Text mode (over TCP or WebSocket) numbers the frames its lines become.
    pub text_ids: u64,
    /// WebSocket state, set at the upgrade.
    pub ws: Option<WsSession>,
    /// The reply to a BYE that came while ACKs were held: sent after the last of them.
    pub deferred_bye: Option<bytes::Bytes>,
    /// Input of the codecs other than binary that waits for its end: a partial text line,
    /// an HTTP request head, or the first bytes while the codec is undecided.
    pub pending: BytesMut,
    /// The device id named at LOGIN, for log lines ([`ConnLabel`]); a binary session that
    /// names a device allocates its `Extra` for it.
    pub device_name: Option<Box<str>>,
    /// Cluster mode: this connection's place in its user's inbox in Redis.
    pub cluster_inbox: super::cluster_inbox::ClusterCursor,
}

impl Session {
    /// The WebSocket state of a [`Codec::WebSocket`] session.
    pub fn ws(&mut self) -> Option<&mut WsSession> {
        self.extra.as_deref_mut().and_then(|e| e.ws.as_mut())
    }

    /// Heap bytes held for this connection's input: the partial frame, line or head.
    pub fn input_held(&self) -> usize {
        self.reader.held() + self.extra.as_ref().map_or(0, |e| e.pending.capacity())
    }

    /// Drops the buffered partial input (the connection is closing).
    pub fn clear_input(&mut self) {
        self.reader.clear();
        if let Some(extra) = self.extra.as_mut() {
            extra.pending = BytesMut::new();
        }
        self.partial_since = None;
    }

    /// True while an incomplete frame, line or head is buffered.
    pub fn has_partial_input(&self) -> bool {
        self.reader.has_partial() || self.extra.as_ref().is_some_and(|e| !e.pending.is_empty())
    }

    /// The state only non-binary sessions have, allocated on first use.
    pub fn extra_mut(&mut self) -> &mut Extra {
        self.extra.get_or_insert_with(Box::default)
    }

    /// The text-mode frame counter, allocating [`Extra`] on first use.
    pub fn text_ids(&mut self) -> &mut u64 {
        &mut self.extra.get_or_insert_with(Box::default).text_ids
    }
}

impl Session {
    /// A fresh session awaiting LOGIN.
    pub fn new(serial: u64, now: Instant) -> Session {
        Session {
            serial,
            state: State::AwaitingLogin,
            codec: Codec::Undecided,
            extra: None,
            out: OutQueue::default(),
            reader: FrameReader::default(),
            partial_since: None,
            input_counted: 0,
            opened_at: now,
            deadline: now,
            last_rx: now,
            ping_sent: false,
            in_flush_list: false,
            write_blocked: false,
            read_paused: false,
            linger_over: false,
            rooms: Vec::new(),
            missed: Vec::new(),
            room_rate: TokenBucket::default(),
            inbox_synced: false,
            inbox_pushed: 0,
            device: 0,
            logged_in_as: UserId::NONE,
            acks_held: 0,
            refused_in_a_row: 0,
            cluster_deferred: 0,
            grants: None,
            expiry_noticed: false,
            auth_failures: 0,
        }
    }

    /// The logged-in user, if any.
    pub fn user(&self) -> Option<UserId> {
        match self.state {
            State::Active(user) => Some(user),
            _ => None,
        }
    }

    /// How log lines name this connection ([`ConnLabel`]).
    pub fn label(&self) -> ConnLabel<'_> {
        ConnLabel {
            conn: ConnOrSerial::Serial(self.serial),
            user: (self.logged_in_as != UserId::NONE).then_some(self.logged_in_as),
            device: self.extra.as_ref().and_then(|e| e.device_name.as_deref()),
        }
    }
}

/// How a log line names a connection: `conn#17`, by the serial the relay gave it when it
/// opened, which no later connection gets in the same run (unlike its slab key, the
/// `ConnId`, which the next connection takes once it is closed); once it has logged in,
/// with its user and the device it named: `conn#17 user 1002@tablet`. A connection the
/// relay does not know (already closed) is named by its slab key: `conn slot 3`.
///
/// Cheap to make and formatted only when the line is logged: put it in the arguments of a
/// `log` macro, which evaluates them only when its level is enabled.
#[derive(Clone, Copy, Debug)]
pub struct ConnLabel<'a> {
    conn: ConnOrSerial,
    user: Option<UserId>,
    device: Option<&'a str>,
}

#[derive(Clone, Copy, Debug)]
enum ConnOrSerial {
    Serial(u64),
    Slot(usize),
}

impl ConnLabel<'_> {
    /// The label of a connection the relay does not know: its slab key.
    pub fn unknown(id: crate::ConnId) -> ConnLabel<'static> {
        ConnLabel {
            conn: ConnOrSerial::Slot(id.0),
            user: None,
            device: None,
        }
    }
}

impl std::fmt::Display for ConnLabel<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.conn {
            ConnOrSerial::Serial(serial) => write!(f, "conn#{serial}")?,
            ConnOrSerial::Slot(slot) => write!(f, "conn slot {slot}")?,
        }
        if let Some(user) = self.user {
            write!(f, " {user}")?;
            if let Some(device) = self.device {
                // Device ids are free UTF-8 without control characters: quoted unless
                // plain, so a log line cannot be forged through one.
                let plain = device
                    .chars()
                    .all(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | '.'));
                if plain {
                    write!(f, "@{device}")?;
                } else {
                    write!(f, "@{device:?}")?;
                }
            }
        }
        Ok(())
    }
}

impl Session {
    /// Counts one room message dropped for this connection.
    pub fn count_missed(&mut self, room: RoomId) {
        match self.missed.iter_mut().find(|(r, _)| *r == room) {
            Some((_, n)) => *n += 1,
            None => self.missed.push((room, 1)),
        }
    }
}
