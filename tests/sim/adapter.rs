//! The ONLY file of the simulation that calls into `Relay` and `ClientCore` (and reads
//! their config, event and store types). Everything else talks to `SimRelay`,
//! `SimClient`, `AppEvent` and the plain tuning structs below, so an API change in either
//! core is absorbed here.
//!
//! Written against the API of the moment; the expected changes and where they land:
//! - `Relay::new(config, seed, wall_clock_ms_at)`: [`SimRelay::start`] (it already gets
//!   `seed` and `clock`); then set [`WALL_CLOCK_IS_SIMULATED`] to true so inboxes may use
//!   a short TTL (gaps become deterministic).
//! - `Relay::handle_input(id, &[u8], now)` keeping partial frames itself:
//!   [`SimRelay::input`] drops its `take_partial`/`stash_partial` and the `rbuf`.
//! - `Relay::handle_open(now, peer)`: [`SimRelay::open`].
//! - `ClientCore::new(config, now, seed)`: [`SimClient::new`].

use std::io::IoSlice;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use imrelay::client::{
    ClientConfig, ClientCore, DisconnectReason, Event, FailReason, LinkAction, Phase,
};
use imrelay::proto::{ErrorCode, UserId, HEADER_LEN};
use imrelay::relay::{Config, Relay, StoreOp};

pub use imrelay::ConnId;

/// False while `Relay::new` reads the real wall clock for stored messages' timestamps:
/// the inbox age limit then depends on real time, so the simulation keeps it far away
/// (no expiry, no `Gap` events). True once the relay takes the clock from the caller.
pub const WALL_CLOCK_IS_SIMULATED: bool = true;

/// The store's record type, opaque to the rest of the simulation.
pub type Op = StoreOp;

/// The first record of a fresh store (what `LogStore::open` writes).
pub fn epoch_op(epoch: u64) -> Op {
    StoreOp::Epoch(epoch)
}

/// What an `Append` or `SentCopy` record says, for the ledger.
#[derive(Clone, Copy, Debug)]
pub struct Appended {
    /// Whose inbox holds it.
    pub user: u64,
    pub seq: u64,
    /// The frame's `source` (the sender) and `target` (the recipient; for a copy, the
    /// peer it was sent to).
    pub source: u64,
    pub target: u64,
    pub msg_id: u64,
}

/// The records of the durable store the ledger follows.
#[derive(Clone, Copy, Debug)]
pub enum Record {
    /// A message stored in its recipient's inbox.
    Append(Appended),
    /// A copy of a message `a.user` sent stored, kept for the user's other devices;
    /// `origin` is the tag of the device it was sent from.
    Copy { a: Appended, origin: u64 },
    /// A device of `user` is tracked (its cursor recorded).
    Cursor { user: u64, device: u64 },
    /// A device of `user` is no longer tracked.
    ForgetDevice { user: u64, device: u64 },
    /// Every device of `user` is no longer tracked (an idle record forgotten).
    Forget { user: u64 },
}

/// What the ledger needs of a store record, if anything.
pub fn parse_record(op: &Op) -> Option<Record> {
    let appended = |user: &UserId, frame: &[u8]| {
        let u64_at = |at: usize| u64::from_be_bytes(frame[at..at + 8].try_into().unwrap());
        Appended {
            user: user.0,
            msg_id: u64_at(8),
            target: u64_at(16),
            source: u64_at(24),
            seq: u64_at(HEADER_LEN),
        }
    };
    Some(match op {
        StoreOp::Append { user, frame } => Record::Append(appended(user, frame)),
        StoreOp::SentCopy {
            user,
            frame,
            origin,
        } => Record::Copy {
            a: appended(user, frame),
            origin: *origin,
        },
        StoreOp::Cursor { user, cursor, .. } => Record::Cursor {
            user: user.0,
            device: cursor.device,
        },
        StoreOp::ForgetDevice { user, device } => Record::ForgetDevice {
            user: user.0,
            device: *device,
        },
        StoreOp::Forget { user } => Record::Forget { user: user.0 },
        _ => return None,
    })
}

/// The tag the relay records for a device id (`None`: the user's default device).
pub fn device_tag(device: Option<&str>) -> u64 {
    imrelay::proto::device_tag(device)
}

/// Relay limits the simulation chooses per seed.
#[derive(Clone, Debug)]
pub struct RelayTuning {
    pub max_frame: u32,
    pub max_connections: usize,
    pub out_cap: usize,
    pub login_timeout: Duration,
    pub ping_interval: Duration,
    pub idle_timeout: Duration,
    pub inbox_max_messages: usize,
    pub inbox_max_bytes: usize,
    pub inbox_ttl: Duration,
}

fn relay_config(t: &RelayTuning) -> Config {
    let config = Config {
        max_frame: t.max_frame,
        max_connections: t.max_connections,
        out_cap: t.out_cap,
        login_timeout: t.login_timeout,
        ping_interval: t.ping_interval,
        idle_timeout: t.idle_timeout,
        inbox_max_messages: t.inbox_max_messages,
        inbox_max_bytes: t.inbox_max_bytes,
        inbox_ttl: t.inbox_ttl,
        ..Config::default()
    };
    config.validate().expect("simulation relay config is valid");
    config
}

/// Gauges of the relay's held memory.
#[derive(Clone, Copy, Debug)]
pub struct RelayGauges {
    pub sessions: usize,
    pub stored_messages: usize,
    pub stored_bytes: usize,
    pub inbox_users: usize,
    pub dedup_entries: usize,
    pub commits_in_flight: usize,
}

/// The relay core, as the simulation drives it (the part of `src/server/mod.rs` that
/// calls the core).
pub struct SimRelay {
    relay: Relay,
}

impl SimRelay {
    /// A relay process starting on the store's `committed` records: durable mode, as
    /// `Server::open_store` sets it up. `seed` and `clock` (an instant and the Unix ms at
    /// it) are for the coming `Relay::new(config, seed, clock)`; unused for now.
    pub fn start(t: &RelayTuning, seed: u64, clock: (Instant, u64), committed: &[Op]) -> SimRelay {
        let (now, unix_ms) = clock;
        let mut relay = Relay::new(relay_config(t), now, unix_ms, seed);
        relay.restore(committed.to_vec());
        SimRelay { relay }
    }

    /// A TCP connection was accepted; `Err` holds the refusal frame to write before closing.
    pub fn open(&mut self, now: Instant) -> Result<ConnId, Vec<u8>> {
        let peer = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
        self.relay
            .handle_open(now, peer)
            .map_err(|r| r.frame.to_vec())
    }

    pub fn wants_read(&mut self, id: ConnId) -> bool {
        self.relay.wants_read(id)
    }

    /// One read's worth of bytes from the connection.
    pub fn input(&mut self, id: ConnId, bytes: &[u8], now: Instant) {
        self.relay.handle_input(id, bytes, now);
    }

    /// End of stream from the client.
    pub fn eof(&mut self, id: ConnId, now: Instant) {
        self.relay.handle_eof(id, now);
    }

    /// The socket is gone.
    pub fn closed(&mut self, id: ConnId) {
        self.relay.handle_closed(id);
    }

    pub fn poll_transmit(&mut self) -> Option<ConnId> {
        self.relay.poll_transmit()
    }

    /// The connection's queued output as one `write_vectored` would see it (64 slices).
    pub fn peek_output(&self, id: ConnId) -> Vec<u8> {
        let Some(out) = self.relay.output(id) else {
            return Vec::new();
        };
        let mut slices = [IoSlice::new(&[]); 64];
        let n = out.chunks(&mut slices);
        let mut bytes = Vec::new();
        for s in &slices[..n] {
            bytes.extend_from_slice(s);
        }
        bytes
    }

    pub fn out_len(&self, id: ConnId) -> usize {
        self.relay.output(id).map_or(0, |o| o.len_bytes())
    }

    pub fn written(&mut self, id: ConnId, n: usize) {
        self.relay.handle_written(id, n);
    }

    pub fn write_blocked(&mut self, id: ConnId) {
        self.relay.handle_write_blocked(id);
    }

    pub fn writable(&mut self, id: ConnId) {
        self.relay.handle_writable(id);
    }

    pub fn is_finished(&self, id: ConnId) -> bool {
        self.relay.is_finished(id)
    }

    pub fn poll_resume(&mut self) -> Option<ConnId> {
        self.relay.poll_resume()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.relay.poll_timeout()
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.relay.handle_timeout(now);
    }

    /// This turn's commit, if the core has one.
    pub fn take_commit(&mut self) -> Option<(u64, Vec<Op>)> {
        if !self.relay.wants_commit() {
            return None;
        }
        let mut ops = Vec::new();
        self.relay.take_commit(&mut ops).map(|id| (id, ops))
    }

    pub fn store_committed(&mut self, id: u64, result: Result<(), String>) {
        self.relay.handle_store_committed(id, result);
    }

    pub fn snapshot(&self) -> Vec<Op> {
        self.relay.store_snapshot()
    }

    pub fn gauges(&self) -> RelayGauges {
        RelayGauges {
            sessions: self.relay.session_count(),
            stored_messages: self.relay.stored_messages(),
            stored_bytes: self.relay.stored_bytes(),
            inbox_users: self.relay.inbox_users(),
            dedup_entries: self.relay.dedup_entries(),
            commits_in_flight: self.relay.commits_in_flight(),
        }
    }

    pub fn dedup_max_entries(&self) -> usize {
        self.relay.config().dedup_max_entries
    }
}

/// What the core asks of the link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Connect,
    Disconnect,
}

/// How a link failed, as the driver reports it.
#[derive(Clone, Copy, Debug)]
pub enum LinkFailure {
    ConnectFailed,
    Reset,
    ClosedByRelay,
}

/// The events the simulation's ledger cares about (the strings are for the trace).
#[derive(Clone, Debug)]
#[allow(dead_code)]
pub enum AppEvent {
    Connected,
    Disconnected(String),
    Message {
        from: u64,
        id: u64,
        payload: Bytes,
    },
    /// A copy of a stored message this client's user sent from another device.
    SentFromOtherDevice {
        to: u64,
        id: u64,
        payload: Bytes,
    },
    Delivered {
        id: u64,
    },
    Stored {
        id: u64,
    },
    Failed {
        id: u64,
        reason: String,
    },
    Gap {
        from: u64,
        to: u64,
    },
    /// An ERROR answering none of this client's messages.
    Error {
        code: u16,
        reason: String,
        protocol_violation: bool,
    },
    Other(String),
}

/// One SDK instance (the part of `src/client/conn.rs` that calls the core).
pub struct SimClient {
    core: ClientCore,
    /// The driver's read buffer (the core leaves a partial frame in it).
    rx: BytesMut,
}

impl SimClient {
    /// A client with the settings the simulation chose for it, with stored delivery on.
    pub fn new(mut c: ClientConfig, seed: u64, now: Instant) -> SimClient {
        c.stored_inbox = true;
        SimClient {
            core: ClientCore::new(c, now, seed),
            rx: BytesMut::new(),
        }
    }

    /// `send` or `send_stored`; the message id, or why it was refused at once.
    pub fn send(
        &mut self,
        to: u64,
        payload: Bytes,
        stored: bool,
        now: Instant,
    ) -> Result<u64, String> {
        let r = if stored {
            self.core.send_stored(UserId(to), payload, now)
        } else {
            self.core.send(UserId(to), payload, now)
        };
        r.map(|id| id.0).map_err(|e| e.to_string())
    }

    pub fn poll_action(&mut self, now: Instant) -> Option<Action> {
        self.core.poll_action(now).map(|a| match a {
            LinkAction::Connect => Action::Connect,
            LinkAction::Disconnect => Action::Disconnect,
        })
    }

    /// The TCP connect finished: a fresh link (and read buffer).
    pub fn connected(&mut self, now: Instant) {
        self.rx.clear();
        self.core.handle_connected(now);
    }

    /// One read's worth of bytes from the relay.
    pub fn input(&mut self, bytes: &[u8], now: Instant) {
        self.rx.extend_from_slice(bytes);
        self.core.handle_input(&mut self.rx, now);
        if matches!(self.core.phase(), Phase::Waiting { .. } | Phase::Closed) {
            self.rx.clear();
        }
    }

    pub fn link_failed(&mut self, why: LinkFailure, now: Instant) {
        self.rx.clear();
        let reason = match why {
            LinkFailure::ConnectFailed => DisconnectReason::ConnectFailed("simulated".into()),
            LinkFailure::Reset => DisconnectReason::Io("simulated reset".into()),
            LinkFailure::ClosedByRelay => DisconnectReason::ClosedByRelay,
        };
        self.core.handle_link_error(reason, now);
    }

    /// True while output may be written: a link is up (LOGIN or later).
    pub fn linked(&self) -> bool {
        matches!(
            self.core.phase(),
            Phase::LoggingIn { .. } | Phase::Ready | Phase::Closing { .. }
        )
    }

    pub fn output(&self) -> &[u8] {
        self.core.output()
    }

    pub fn consume_output(&mut self, n: usize) {
        self.core.consume_output(n);
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.core.poll_timeout()
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.core.handle_timeout(now);
    }

    pub fn pending(&self) -> usize {
        self.core.pending()
    }

    pub fn is_ready(&self) -> bool {
        self.core.phase() == Phase::Ready
    }

    pub fn phase_name(&self) -> String {
        format!("{:?}", self.core.phase())
    }

    pub fn poll_event(&mut self) -> Option<AppEvent> {
        let event = self.core.poll_event()?;
        Some(match event {
            Event::Connected { .. } => AppEvent::Connected,
            Event::Disconnected { reason, .. } => AppEvent::Disconnected(reason.to_string()),
            Event::Message { from, id, payload } => AppEvent::Message {
                from: from.0,
                id: id.0,
                payload,
            },
            Event::SentFromOtherDevice { to, id, payload } => AppEvent::SentFromOtherDevice {
                to: to.0,
                id: id.0,
                payload,
            },
            Event::Delivered { id, .. } => AppEvent::Delivered { id: id.0 },
            Event::Stored { id, .. } => AppEvent::Stored { id: id.0 },
            Event::Failed { id, reason } => AppEvent::Failed {
                id: id.0,
                reason: fail_reason(&reason),
            },
            Event::Gap { from, to } => AppEvent::Gap { from, to },
            Event::Error { code, reason } => AppEvent::Error {
                code,
                protocol_violation: is_protocol_violation(code),
                reason,
            },
            other => AppEvent::Other(format!("{other:?}")),
        })
    }
}

fn fail_reason(r: &FailReason) -> String {
    match r {
        FailReason::Rejected { code, .. } => match ErrorCode::from_u16(*code) {
            Some(c) => format!("rejected {c:?}"),
            None => format!("rejected code {code}"),
        },
        FailReason::NotSent => "not sent".into(),
        FailReason::Unconfirmed => super::ledger::UNCONFIRMED.into(),
        FailReason::Closed => "closed".into(),
    }
}

/// Codes a well-behaved SDK should never provoke.
fn is_protocol_violation(code: u16) -> bool {
    matches!(
        ErrorCode::from_u16(code),
        Some(
            ErrorCode::Malformed
                | ErrorCode::UnknownOpcode
                | ErrorCode::FrameTooLarge
                | ErrorCode::NotLoggedIn
                | ErrorCode::AlreadyLoggedIn
                | ErrorCode::InvalidField
                | ErrorCode::UnsupportedVersion
        ) | None
    )
}

/// Decodes one direction of a link for the trace (only used when tracing).
#[derive(Default)]
pub struct Sniffer(BytesMut);

impl Sniffer {
    /// The frames completed by `bytes`, one short line each.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<String> {
        use imrelay::proto::decode::decode_frame;
        use imrelay::proto::Opcode;
        self.0.extend_from_slice(bytes);
        let mut lines = Vec::new();
        loop {
            match decode_frame(&mut self.0, u32::MAX) {
                Ok(Some(Ok(f))) => {
                    let mut line = format!(
                        "{} id {:#x} target {} source {}",
                        f.opcode.name(),
                        f.msg_id.0,
                        f.target.0,
                        f.source.0
                    );
                    match f.opcode {
                        Opcode::Send => line.push_str(&format!(" flags {:#x}", f.flags.0)),
                        Opcode::InboxDeliver => {
                            if let Some((seq, _, p)) = f.inbox_deliver() {
                                let no = p
                                    .get(..8)
                                    .map_or(0, |b| u64::from_be_bytes(b.try_into().unwrap()));
                                line.push_str(&format!(" seq {seq} #{no}"));
                            }
                        }
                        Opcode::Deliver => {
                            let no = f
                                .payload
                                .get(..8)
                                .map_or(0, |b| u64::from_be_bytes(b.try_into().unwrap()));
                            line.push_str(&format!(" #{no}"));
                        }
                        Opcode::InboxState => line.push_str(&format!(" {:?}", f.inbox_state())),
                        Opcode::InboxSync | Opcode::InboxAck => {
                            line.push_str(&format!(" payload {:02x?}", &f.payload[..]))
                        }
                        Opcode::Error => line.push_str(&format!(" {:?}", f.error())),
                        Opcode::Ack => line.push_str(&format!(" count {:?}", f.ack_count())),
                        _ => {}
                    }
                    lines.push(line);
                }
                Ok(Some(Err(op))) => lines.push(format!("unknown opcode {op:#x}")),
                Ok(None) => return lines,
                Err(e) => {
                    lines.push(format!("undecodable: {e}"));
                    self.0.clear();
                    return lines;
                }
            }
        }
    }
}
