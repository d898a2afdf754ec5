//! The sans-IO client: one user's session over a link that comes and goes.
//!
//! [`ClientCore`] never touches a socket or a clock. The driver (`conn.rs`, or an app's own
//! event loop) feeds it what happened (`handle_connected`, `handle_input`,
//! `handle_link_error`, `handle_timeout`, each with `now`) and does what it asks:
//! `poll_action` says when to open or drop the TCP link, `output`/`consume_output` hold
//! the bytes to write, `poll_timeout` says when to call back, and `poll_event` hands the
//! app its events.
//!
//! The link goes Waiting → Connecting → LoggingIn → Ready, and back to Waiting (with
//! exponential backoff and jitter) whenever it dies: connect failure, login refused or
//! timed out, EOF, I/O error, bad frames, or a heartbeat that got no answer. Messages sent
//! while the link is down wait in the outbox; after each LOGIN_OK every message not yet
//! answered is written (again) with the DEDUP flag and its original id, so neither the
//! relay (section 13 of protocol.md) nor the receiving SDK (`seen.rs`) shows it twice.
//!
//! Login tokens (protocol.md section 16): each LOGIN carries the `token_provider`'s answer
//! (asked again at every connect) or the static `credential`. A TOKEN_EXPIRING from the
//! relay is reported (`Event::TokenExpiring`) and, with a provider, answered with a
//! REFRESH carrying its new token; REFRESH_OK and a refusal become `TokenRefreshed` and
//! `RefreshFailed`. A LOGIN refused (AUTH_FAILED included) brings the link down into the
//! backoff like any failed attempt; a TOKEN_EXPIRED close is a link drop like any other,
//! and the next LOGIN asks the provider again. The transport (plain TCP or TLS) is the
//! driver's business: the core only hears `handle_connected` once the link carries frames.
//!
//! Heartbeats: after `heartbeat_interval` of silence from the relay the core sends a PING,
//! and declares the link dead when nothing arrives within `heartbeat_timeout`. Every LOGIN
//! carries the HEARTBEAT flag; a relay that answers with heartbeat bounds (protocol.md,
//! section 5.2) lets the interval adapt within them (`heartbeat.rs`: longer after answered
//! heartbeats, back to the last good one after a silent drop); without bounds it is fixed.
//!
//! App lifecycle: [`ClientCore::set_foreground`] tells the core whether the app is in the
//! foreground. In the background it heartbeats at the relay's upper bound; with
//! [`Background::DisconnectAfter`] it closes the link cleanly (BYE) after the grace period
//! and stays [`Phase::Suspended`] (no reconnects, messages wait in the outbox) until the app
//! is in the foreground again, which reconnects at once.
//!
//! The core is deterministic: it reads no clock (every `now` comes from the caller) and no
//! entropy (its randomness, reconnect jitter and the message-id tag, comes from the `seed`
//! given to [`ClientCore::new`]). The same config, seed and sequence of calls give the same
//! bytes, events and timeouts, which is what lets a simulation run many cores on one clock.
//!
//! Payloads handed to the app own exactly their bytes: they are copied out of the input
//! buffer, so an app that keeps a message does not keep the driver's read buffer alive.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use log::debug;

use super::backoff::Backoff;
use super::config::{Background, ClientConfig};
use super::event::{DisconnectReason, Event, FailReason, SendError};
use super::heartbeat::Heartbeat;
use super::outbox::Outbox;
use super::seen::Seen;
use crate::proto::decode::decode_frame;
use crate::proto::{
    ErrorCode, Flags, Frame, LoginOk, MessageId, Opcode, RoomId, UserId, DEFAULT_MAX_FRAME,
    HEADER_LEN, MAX_FRAME_CEILING,
};
use crate::rand::Rng;

/// What the driver must do with the TCP link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkAction {
    /// Open a TCP connection to the relay, then call `handle_connected` (or
    /// `handle_link_error` if it fails).
    Connect,
    /// Close the current TCP connection; the core has already moved on.
    Disconnect,
}

/// Where the link is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// No link; the next attempt starts at `at`.
    Waiting {
        /// When to connect.
        at: Instant,
    },
    /// A TCP connect is under way.
    Connecting {
        /// When to give up on it.
        deadline: Instant,
    },
    /// LOGIN was written; LOGIN_OK has not arrived.
    LoggingIn {
        /// When to give up on it.
        deadline: Instant,
    },
    /// Logged in: messages flow.
    Ready,
    /// BYE was written; waiting for the relay's BYE.
    Closing {
        /// When to stop waiting.
        deadline: Instant,
    },
    /// The app is in the background with [`Background::DisconnectAfter`] and the grace
    /// period is over: BYE was written, waiting for the relay's BYE.
    Suspending {
        /// When to stop waiting.
        deadline: Instant,
    },
    /// No link, and none until the app is in the foreground again
    /// ([`ClientCore::set_foreground`]). Messages sent meanwhile wait in the outbox.
    Suspended,
    /// Closed for good.
    Closed,
}

/// Where this client stands in its user's inbox on the relay (stored delivery).
#[derive(Clone, Copy, Debug, Default)]
struct InboxCursor {
    /// The relay store's identity the numbers below belong to (0: none yet).
    epoch: u64,
    /// The highest sequence number received on the current link (replays on the same link
    /// are dropped by it). Reset to `app_seq` at each LOGIN_OK: receiving is not having.
    received: u64,
    /// The highest sequence number the app has taken (or that was a duplicate of a message
    /// it took). Only this is ever acknowledged to the relay.
    app_seq: u64,
    /// The highest sequence number acknowledged to the relay.
    acked: u64,
    /// When to send INBOX_ACK for `app_seq`.
    ack_due: Option<Instant>,
    /// The INBOX_SYNC of this link, until its INBOX_STATE.
    sync_id: Option<MessageId>,
    /// When to send INBOX_SYNC again: a cluster node refused it (`CLUSTER_UNAVAILABLE`:
    /// its link to Redis, where the inboxes are, is down).
    sync_retry: Option<Instant>,
}

/// One client's session state (see the module docs for the calling order).
#[derive(Debug)]
pub struct ClientCore {
    config: ClientConfig,
    phase: Phase,
    action: Option<LinkAction>,
    out: BytesMut,
    /// Events for the app, each with its inbox sequence number (0: not from the inbox).
    /// A message is checked against `seen` (and marked seen) only when the app takes it,
    /// and an inbox sequence number counts as the app's (`app_seq`) only then.
    events: VecDeque<(Event, u64)>,
    inbox: InboxCursor,
    last_now: Instant,
    outbox: Outbox,
    seen: Seen,
    backoff: Backoff,
    rng: Rng,
    id_tag: u64,
    next_seq: u32,
    login_id: MessageId,
    max_payload: usize,
    last_rx: Instant,
    ping_deadline: Option<Instant>,
    rooms: Vec<RoomId>,
    /// The REFRESH in flight on this link, if any.
    refresh_id: Option<MessageId>,
    /// The latest `exp` a TOKEN_EXPIRING announced on this link: a notice for a token no
    /// later than that one means the last REFRESH did not help (the provider gave the same
    /// token), and is not answered with another REFRESH, so the two cannot loop.
    noticed_exp: Option<u64>,
    /// The heartbeat interval and what was learned about it on this network.
    heartbeat: Heartbeat,
    /// The PING in flight (`ping_deadline`) was sent at the learning interval (in the
    /// foreground): its answer or silence teaches `heartbeat`.
    ping_learns: bool,
    /// The app is in the foreground (the default).
    foreground: bool,
    /// LOGIN carries the HEARTBEAT flag; false once a relay refused it with INVALID_FIELD
    /// (one older than the flag), until the network changes.
    ask_heartbeat_bounds: bool,
    /// In the background with [`Background::DisconnectAfter`]: when the link goes.
    suspend_at: Option<Instant>,
}

/// Bytes an INBOX_DELIVER adds before a stored message (its sequence number and time).
const STORED_PREFIX: usize = 16;

impl ClientCore {
    /// A client that will connect at `now` (when the driver first polls for an action).
    ///
    /// `seed` is all the randomness the core ever uses: reconnect jitter, the message-id
    /// tag, the key of its de-duplication set. Drivers draw it from
    /// [`Rng::from_entropy`](crate::rand::Rng::from_entropy); a simulation passes its own.
    /// Two clients of one user must get different seeds (equal seeds give equal message
    /// ids); neighbouring seeds such as 2 and 3 are as good as unrelated ones.
    pub fn new(config: ClientConfig, now: Instant, seed: u64) -> ClientCore {
        let mut rng = Rng::seeded(mix_seed(seed));
        let backoff = Backoff::new(config.backoff_initial, config.backoff_max);
        let seen = Seen::new(config.seen_window, rng.next_u64());
        // Message ids: a random 32-bit tag for this client instance, then a counter, so the
        // ids of a user's devices (and of an app restart) do not collide in the relay's
        // per-user de-duplication window.
        let id_tag = (rng.next_u64() >> 32).max(1) << 32;
        let heartbeat = Heartbeat::new(config.heartbeat_interval);
        let mut core = ClientCore {
            config,
            phase: Phase::Waiting { at: now },
            action: None,
            out: BytesMut::new(),
            events: VecDeque::new(),
            inbox: InboxCursor::default(),
            last_now: now,
            outbox: Outbox::default(),
            seen,
            backoff,
            rng,
            id_tag,
            next_seq: 0,
            login_id: MessageId(0),
            max_payload: DEFAULT_MAX_FRAME as usize - HEADER_LEN,
            last_rx: now,
            ping_deadline: None,
            rooms: Vec::new(),
            refresh_id: None,
            noticed_exp: None,
            heartbeat,
            ping_learns: false,
            foreground: true,
            ask_heartbeat_bounds: true,
            suspend_at: None,
        };
        if core.config.user.is_none() {
            core.phase = Phase::Closed;
            core.emit(Event::Closed);
        }
        core
    }

    /// Where the link is.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The configuration.
    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// Messages sent and not yet answered (delivered or failed).
    pub fn pending(&self) -> usize {
        self.outbox.len()
    }

    /// True once the client is closed for good.
    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    /// The silence from the relay after which the next heartbeat PING goes out, as things
    /// stand: the adaptive interval in the foreground, the relay's upper bound in the
    /// background (the adaptive one there too with a relay that sends no bounds).
    pub fn heartbeat_interval(&self) -> Duration {
        match self.heartbeat.max() {
            Some(max) if !self.foreground => max,
            _ => self.heartbeat.interval(),
        }
    }

    /// The heartbeat learning, for tests.
    #[cfg(test)]
    pub(super) fn heartbeat_state(&self) -> &Heartbeat {
        &self.heartbeat
    }

    /// True while the app is in the foreground (see [`set_foreground`](Self::set_foreground)).
    pub fn is_foreground(&self) -> bool {
        self.foreground
    }

    // ---- the app's calls -------------------------------------------------------------

    /// Queues a direct message to `to` and returns its id. It is written as soon as the
    /// link is up, and ends as exactly one `Delivered` or `Failed` event with this id.
    pub fn send(
        &mut self,
        to: UserId,
        payload: Bytes,
        now: Instant,
    ) -> Result<MessageId, SendError> {
        let id = self.enqueue(to, payload, now)?;
        self.pump(now);
        Ok(id)
    }

    fn enqueue(
        &mut self,
        to: UserId,
        payload: Bytes,
        now: Instant,
    ) -> Result<MessageId, SendError> {
        if matches!(self.phase, Phase::Closing { .. } | Phase::Closed) {
            return Err(SendError::Closed);
        }
        if to.is_none() {
            return Err(SendError::InvalidRecipient);
        }
        if payload.len() > self.max_payload {
            return Err(SendError::TooLarge);
        }
        if self.outbox.len() >= self.config.max_outbox {
            return Err(SendError::OutboxFull);
        }
        let id = self.next_id();
        self.outbox.push(to, id, payload, now);
        Ok(id)
    }

    /// Queues a stored message: the relay keeps it in the recipient's inbox until the
    /// recipient's app has it, across the recipient's disconnects and relay restarts
    /// (protocol.md, section 15). It ends as one `Stored` or `Failed` event.
    pub fn send_stored(
        &mut self,
        to: UserId,
        payload: Bytes,
        now: Instant,
    ) -> Result<MessageId, SendError> {
        // The INBOX_DELIVER the relay stores it as is 16 bytes longer than the SEND, and
        // must fit the max frame too (protocol.md, section 15).
        if payload.len() + STORED_PREFIX > self.max_payload {
            return Err(SendError::TooLarge);
        }
        let id = self.enqueue(to, payload, now)?;
        self.outbox.mark_stored(id);
        self.pump(now);
        Ok(id)
    }

    /// Joins a room now if the link is up, and again after every reconnect.
    pub fn join(&mut self, room: RoomId) -> Result<(), SendError> {
        self.check_open()?;
        if !self.rooms.contains(&room) {
            self.rooms.push(room);
        }
        if self.phase == Phase::Ready {
            let id = self.next_id();
            Frame::join(id, room).encode(&mut self.out);
        }
        Ok(())
    }

    /// Leaves a room (and stops re-joining it).
    pub fn leave(&mut self, room: RoomId) -> Result<(), SendError> {
        self.check_open()?;
        self.rooms.retain(|r| *r != room);
        if self.phase == Phase::Ready {
            let id = self.next_id();
            Frame::leave(id, room).encode(&mut self.out);
        }
        Ok(())
    }

    /// Sends a room message (danmaku, like…). Room traffic is live: it is not kept while the
    /// link is down, so this fails with `NotConnected` then.
    pub fn room_send(&mut self, room: RoomId, payload: Bytes) -> Result<(), SendError> {
        self.check_open()?;
        if self.phase != Phase::Ready {
            return Err(SendError::NotConnected);
        }
        if payload.len() > self.max_payload {
            return Err(SendError::TooLarge);
        }
        let id = self.next_id();
        Frame::room_send(id, room, payload)
            .with_flags(Flags::NO_ACK)
            .encode(&mut self.out);
        Ok(())
    }

    /// Asks for a room's online count (answered with a `RoomState` event).
    pub fn room_info(&mut self, room: RoomId) -> Result<(), SendError> {
        self.check_open()?;
        if self.phase != Phase::Ready {
            return Err(SendError::NotConnected);
        }
        let id = self.next_id();
        Frame::room_info(id, room).encode(&mut self.out);
        Ok(())
    }

    /// Ends the session: messages not in flight fail at once (`Closed` if never written,
    /// `Unconfirmed` if written on some link and not answered: held after a "try later",
    /// or waiting to be resent), those in flight get their answers (the relay answers in
    /// order before its BYE), then `Closed`.
    pub fn close(&mut self, now: Instant) {
        match self.phase {
            Phase::Closed | Phase::Closing { .. } => {}
            Phase::Ready => {
                for (id, reason) in self.outbox.take_unsent() {
                    self.fail(id, reason);
                }
                self.send_inbox_ack();
                let id = self.next_id();
                Frame::bye(id).encode(&mut self.out);
                self.phase = Phase::Closing {
                    deadline: now + self.config.login_timeout,
                };
            }
            _ => self.finish_close(),
        }
    }

    /// Sends REFRESH with `token` now if the link is up (a `TokenRefreshed` or
    /// `RefreshFailed` event answers), and keeps it as the `credential` of later LOGINs
    /// (unless a `token_provider` is set: that is asked at each connect). For an app with
    /// static credentials that learned of a new token, e.g. after `TokenExpiring`.
    pub fn refresh_token(&mut self, token: Vec<u8>) -> Result<(), SendError> {
        self.check_open()?;
        if self.phase == Phase::Ready {
            self.send_refresh(&token);
        }
        self.config.credential = token;
        Ok(())
    }

    /// The app went to the background (`false`) or came back to the foreground (`true`).
    ///
    /// In the background the core heartbeats at the relay's upper bound. With
    /// [`Background::DisconnectAfter`]`(grace)`, once `grace` has passed in the background
    /// the link is closed cleanly (BYE; messages in flight get their answers first, the
    /// rest wait in the outbox), `Event::Disconnected` with
    /// [`DisconnectReason::Background`] is emitted, and the core stays
    /// [`Phase::Suspended`] without reconnecting. Coming back to the foreground connects
    /// at once, skipping any backoff wait (also when a link lost in the background was
    /// waiting for its retry). Calls that change nothing are ignored.
    pub fn set_foreground(&mut self, foreground: bool, now: Instant) {
        self.last_now = now;
        if foreground == self.foreground || self.phase == Phase::Closed {
            return;
        }
        self.foreground = foreground;
        if foreground {
            self.suspend_at = None;
            match self.phase {
                Phase::Suspended | Phase::Waiting { .. } => {
                    self.phase = Phase::Waiting { at: now };
                    self.backoff.reset();
                }
                Phase::Suspending { .. } => {
                    // The relay has our BYE: this link ends anyway; a new one starts now.
                    self.drop_link_quietly();
                    self.phase = Phase::Waiting { at: now };
                    self.backoff.reset();
                }
                _ => {}
            }
            return;
        }
        if let Background::DisconnectAfter(grace) = self.config.background {
            if !matches!(self.phase, Phase::Closing { .. } | Phase::Suspended) {
                self.suspend_at = Some(now + grace);
                self.suspend_if_due(now);
            }
        }
    }

    // ---- the driver's calls ----------------------------------------------------------

    /// What to do with the link now, if anything. Call until `None` after every other call.
    pub fn poll_action(&mut self, now: Instant) -> Option<LinkAction> {
        if let Some(action) = self.action.take() {
            return Some(action);
        }
        if let Phase::Waiting { at } = self.phase {
            if now >= at {
                self.phase = Phase::Connecting {
                    deadline: now + self.config.connect_timeout,
                };
                return Some(LinkAction::Connect);
            }
        }
        None
    }

    /// The TCP connection is up: LOGIN goes out.
    pub fn handle_connected(&mut self, now: Instant) {
        self.last_now = now;
        if !matches!(self.phase, Phase::Connecting { .. }) {
            return;
        }
        self.out.clear();
        self.refresh_id = None;
        self.noticed_exp = None;
        self.send_login(now);
    }

    /// Writes a LOGIN and waits for its answer.
    fn send_login(&mut self, now: Instant) {
        self.login_id = self.next_id();
        // A fresh token for every LOGIN: the one of the last link may have expired (that
        // may be why the relay closed it).
        let token = match &self.config.token_provider {
            Some(provider) => provider(self.config.user),
            None => self.config.credential.clone(),
        };
        let login = match &self.config.device {
            Some(device) => Frame::login_device(self.login_id, self.config.user, device, &token),
            None => Frame::login(self.login_id, self.config.user, &token),
        };
        // Ask for the heartbeat bounds (protocol.md, section 5.1), unless this relay
        // predates them.
        let login = if self.ask_heartbeat_bounds {
            let flags = login.flags.union(Flags::HEARTBEAT);
            login.with_flags(flags)
        } else {
            login
        };
        login.encode(&mut self.out);
        self.phase = Phase::LoggingIn {
            deadline: now + self.config.login_timeout,
        };
        self.last_rx = now;
        self.ping_deadline = None;
    }

    /// The link failed or closed (connect error, EOF, I/O error) as the driver saw it.
    pub fn handle_link_error(&mut self, reason: DisconnectReason, now: Instant) {
        self.link_down(reason, now);
    }

    /// The app knows the network changed (Wi-Fi to cellular, back online): the link is
    /// dropped and a new one starts at once, without the backoff wait, and the backoff
    /// starts over. Nothing is lost: unanswered messages are resent, stored ones replayed.
    pub fn network_changed(&mut self, now: Instant) {
        self.last_now = now;
        match self.phase {
            Phase::Closed | Phase::Closing { .. } => return,
            // No link wanted until the foreground: only the learning starts over.
            Phase::Suspended | Phase::Suspending { .. } => {
                self.heartbeat.reset();
                self.ask_heartbeat_bounds = true;
                self.backoff.reset();
                return;
            }
            Phase::Waiting { .. } => {} // no link to drop
            _ => {
                let reason = DisconnectReason::Io("the network changed (app)".to_string());
                self.link_down(reason, now);
            }
        }
        self.phase = Phase::Waiting { at: now };
        self.backoff.reset();
        // What was learned about the old network's heartbeats does not hold for this one,
        // and it may reach a newer relay.
        self.heartbeat.reset();
        self.ask_heartbeat_bounds = true;
    }

    /// Bytes read from the link. Every complete frame is consumed; a partial one stays.
    pub fn handle_input(&mut self, buf: &mut BytesMut, now: Instant) {
        self.last_now = now;
        if !self.reads_link() {
            buf.clear();
            return;
        }
        loop {
            match decode_frame(buf, MAX_FRAME_CEILING) {
                Ok(Some(Ok(frame))) => {
                    self.alive(now);
                    self.handle_frame(frame, now);
                    if !self.reads_link() {
                        buf.clear();
                        return;
                    }
                }
                Ok(Some(Err(opcode))) => {
                    debug!("ignoring a frame with unknown opcode 0x{opcode:02x}");
                    self.alive(now);
                }
                Ok(None) => return,
                Err(e) => {
                    buf.clear();
                    self.link_down(DisconnectReason::Protocol(e.to_string()), now);
                    return;
                }
            }
        }
    }

    /// The bytes waiting to be written to the link.
    pub fn output(&self) -> &[u8] {
        &self.out
    }

    /// `n` bytes of [`output`](Self::output) were written.
    pub fn consume_output(&mut self, n: usize) {
        let _ = self.out.split_to(n.min(self.out.len()));
    }

    /// When to call `handle_timeout` next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let phase = match self.phase {
            Phase::Waiting { at } => Some(at),
            Phase::Connecting { deadline }
            | Phase::LoggingIn { deadline }
            | Phase::Closing { deadline }
            | Phase::Suspending { deadline } => Some(deadline),
            Phase::Ready => Some(
                self.ping_deadline
                    .unwrap_or(self.last_rx + self.heartbeat_interval()),
            ),
            Phase::Suspended => None,
            Phase::Closed => return None,
        };
        // A held message matters only when it could be written (otherwise an ACK wakes us).
        let release = match self.phase {
            Phase::Ready if self.outbox.in_flight() < self.config.max_in_flight => {
                self.outbox.next_release()
            }
            _ => None,
        };
        let (ack, sync) = match self.phase {
            Phase::Ready => (self.inbox.ack_due, self.inbox.sync_retry),
            _ => (None, None),
        };
        [
            phase,
            release,
            ack,
            sync,
            self.suspend_at,
            self.outbox.next_deadline(self.config.send_timeout),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Runs every deadline that has passed: heartbeats, dead links, connect and login
    /// timeouts, and send timeouts.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.last_now = now;
        if self.phase == Phase::Ready && self.inbox.ack_due.is_some_and(|t| t <= now) {
            self.send_inbox_ack();
        }
        if self.phase == Phase::Ready && self.inbox.sync_retry.is_some_and(|t| t <= now) {
            self.send_inbox_sync();
        }
        for (id, reason) in self.outbox.expire(now, self.config.send_timeout) {
            self.fail(id, reason);
        }
        match self.phase {
            Phase::Connecting { deadline } if now >= deadline => {
                self.link_down(
                    DisconnectReason::ConnectFailed("connect timed out".to_string()),
                    now,
                );
            }
            Phase::LoggingIn { deadline } if now >= deadline => {
                self.link_down(DisconnectReason::LoginTimeout, now);
            }
            Phase::Closing { deadline } if now >= deadline => self.finish_close(),
            Phase::Suspending { deadline } if now >= deadline => self.finish_suspend(),
            Phase::Ready => match self.ping_deadline {
                Some(dead) if now >= dead => {
                    if self.ping_learns {
                        self.heartbeat.silent_drop();
                    }
                    self.link_down(DisconnectReason::HeartbeatTimeout, now);
                }
                None if now >= self.last_rx + self.heartbeat_interval() => {
                    let id = self.next_id();
                    Frame::ping(id, Bytes::new()).encode(&mut self.out);
                    self.ping_deadline = Some(now + self.config.heartbeat_timeout);
                    self.ping_learns = self.foreground;
                }
                _ => {}
            },
            _ => {}
        }
        self.suspend_if_due(now);
        self.pump(now);
    }

    /// The next event for the app. Taking a stored message is what lets the client
    /// acknowledge it to the relay (in batches, see `inbox_ack_delay`), and taking a
    /// message is what makes a later copy of it a duplicate.
    pub fn poll_event(&mut self) -> Option<Event> {
        while let Some((event, seq)) = self.events.pop_front() {
            if seq > self.inbox.app_seq {
                self.inbox.app_seq = seq;
                let due = if seq - self.inbox.acked >= self.config.inbox_ack_batch {
                    self.last_now
                } else {
                    self.last_now + self.config.inbox_ack_delay
                };
                self.inbox.ack_due = Some(self.inbox.ack_due.map_or(due, |d| d.min(due)));
            }
            let sent = match &event {
                Event::Message { from, id, .. } => Some((*from, *id)),
                Event::SentFromOtherDevice { id, .. } => Some((self.config.user, *id)),
                _ => None,
            };
            if let Some((from, id)) = sent {
                // A copy of a message the app already took (a resend the relay did not
                // recognise, or the same message stored twice): its sequence number still
                // counts above, so it is acknowledged, but it is not shown again.
                if !self.seen.first_time(from, id) {
                    debug!("dropped a duplicate of {id} from {from}");
                    continue;
                }
            }
            return Some(event);
        }
        None
    }

    fn emit(&mut self, event: Event) {
        self.events.push_back((event, 0));
    }

    // ---- inside ----------------------------------------------------------------------

    fn handle_frame(&mut self, frame: Frame, now: Instant) {
        match frame.opcode {
            Opcode::LoginOk => self.on_login_ok(&frame, now),
            Opcode::Ack => {
                let devices = frame.ack_count().unwrap_or(0);
                if let Some(m) = self.outbox.answer(frame.msg_id) {
                    self.emit(if m.stored {
                        Event::Stored {
                            id: frame.msg_id,
                            devices,
                        }
                    } else {
                        Event::Delivered {
                            id: frame.msg_id,
                            devices,
                        }
                    });
                    self.pump(now);
                }
            }
            Opcode::Error => self.on_error(&frame, now),
            // Duplicates are dropped when the app takes the event (`poll_event`): a direct
            // message queued here is never discarded, not even by a link drop, so it is
            // shown once whichever copy comes first.
            Opcode::Deliver => self.emit(Event::Message {
                from: frame.source,
                id: frame.msg_id,
                payload: owned(&frame.payload),
            }),
            Opcode::RoomDeliver => self.emit(Event::RoomMessage {
                room: frame.room(),
                from: frame.source,
                payload: owned(&frame.payload),
            }),
            Opcode::RoomState => {
                if let Some(state) = frame.room_state() {
                    self.emit(Event::RoomState {
                        room: frame.room(),
                        members: state.members,
                        is_member: state.is_member,
                    });
                }
            }
            Opcode::RoomMissed => {
                if let Some(missed) = frame.room_missed() {
                    self.emit(Event::RoomMissed {
                        room: frame.room(),
                        missed,
                    });
                }
            }
            Opcode::InboxState => {
                if let Some(state) = frame.inbox_state() {
                    self.on_inbox_state(state);
                }
            }
            Opcode::InboxDeliver => {
                if let Some((seq, _stored_at, payload)) = frame.inbox_deliver() {
                    let (from, to) = (frame.source, frame.target);
                    self.on_inbox_deliver(from, to, frame.msg_id, seq, &payload);
                }
            }
            Opcode::Ping => Frame::pong(frame.msg_id, frame.payload).encode(&mut self.out),
            Opcode::TokenExpiring => {
                if let Some(exp) = frame.token_exp() {
                    self.on_token_expiring(exp);
                }
            }
            Opcode::RefreshOk => {
                if self.refresh_id == Some(frame.msg_id) {
                    self.refresh_id = None;
                    let exp = frame.token_exp().unwrap_or(0);
                    self.emit(Event::TokenRefreshed { exp });
                }
            }
            Opcode::Bye => match self.phase {
                Phase::Closing { .. } => self.finish_close(),
                Phase::Suspending { .. } => self.finish_suspend(),
                _ => {}
            },
            other => debug!("ignoring {} from the relay", other.name()),
        }
    }

    fn on_login_ok(&mut self, frame: &Frame, now: Instant) {
        if !matches!(self.phase, Phase::LoggingIn { .. }) || frame.msg_id != self.login_id {
            return;
        }
        let limits = frame.login_ok().unwrap_or(LoginOk {
            max_frame: DEFAULT_MAX_FRAME,
            ping_interval_ms: 0,
            idle_timeout_ms: 0,
            out_cap: 0,
            heartbeat: None,
        });
        self.max_payload = (limits.max_frame as usize).saturating_sub(HEADER_LEN);
        self.heartbeat.set_bounds(limits.heartbeat);
        self.phase = Phase::Ready;
        self.backoff.reset();
        self.emit(Event::Connected {
            user: self.config.user,
            limits,
        });
        if self.config.stored_inbox {
            // Stored messages reach the app exactly once, and only what the app took is
            // acknowledged:
            // - INBOX_SYNC says `app_seq`, the last message the app took (the relay takes
            //   it as an ack), never `received`: a message that arrived but waits in
            //   `events` is not the app's yet.
            // - The relay replays everything after `app_seq`, so the inbox events still
            //   queued (received on an older link, not taken) are dropped now, and the
            //   replay takes their place. Keeping them instead would show them twice, or
            //   ack numbers of another store if the epoch changed. Until this LOGIN_OK
            //   the app may still take them (while the link is down): then they are its,
            //   and the sync says so.
            // - Nothing was marked seen for them (that happens when the app takes a
            //   message), so the replayed copies are shown.
            // Gap events queued and not taken go too; the relay's INBOX_STATE reports the
            // expiry again, counted from `app_seq`.
            self.send_inbox_sync();
        }
        for i in 0..self.rooms.len() {
            let id = self.next_id();
            Frame::join(id, self.rooms[i]).encode(&mut self.out);
        }
        self.pump(now);
    }

    /// INBOX_SYNC from `app_seq` (at LOGIN_OK, and again when a cluster node could not
    /// answer it).
    fn send_inbox_sync(&mut self) {
        let id = self.next_id();
        self.inbox.received = self.inbox.app_seq;
        Frame::inbox_sync(id, self.inbox.epoch, self.inbox.app_seq).encode(&mut self.out);
        self.inbox.acked = self.inbox.app_seq;
        self.inbox.ack_due = None;
        self.inbox.sync_id = Some(id);
        self.inbox.sync_retry = None;
        self.events.retain(|(_, seq)| *seq == 0);
    }

    fn on_inbox_state(&mut self, state: crate::proto::InboxState) {
        self.inbox.sync_id = None;
        if state.epoch != self.inbox.epoch {
            // A store we have no numbers for (first sync, or the relay's store was
            // replaced): count from its start.
            self.inbox = InboxCursor {
                epoch: state.epoch,
                ..InboxCursor::default()
            };
        }
        if state.expired_upto > self.inbox.received {
            let from = self.inbox.received + 1;
            self.inbox.received = state.expired_upto;
            self.emit_inbox(
                Event::Gap {
                    from,
                    to: state.expired_upto,
                },
                state.expired_upto,
            );
        }
    }

    /// Queues a stored message. It becomes the app's (acked, and seen for de-duplication)
    /// only when the app takes it from `poll_event`.
    fn on_inbox_deliver(
        &mut self,
        from: UserId,
        to: UserId,
        id: MessageId,
        seq: u64,
        payload: &[u8],
    ) {
        if seq <= self.inbox.received {
            return; // already received on this link
        }
        self.inbox.received = seq;
        let payload = Bytes::copy_from_slice(payload);
        let event = if from == self.config.user && to != self.config.user {
            // A copy of what this user sent from another device (protocol.md, 15.1).
            Event::SentFromOtherDevice { to, id, payload }
        } else {
            Event::Message { from, id, payload }
        };
        self.emit_inbox(event, seq);
    }

    /// Acknowledges every stored message the app has taken.
    fn send_inbox_ack(&mut self) {
        self.inbox.ack_due = None;
        if self.inbox.app_seq > self.inbox.acked {
            let id = self.next_id();
            Frame::inbox_ack(id, self.inbox.app_seq).encode(&mut self.out);
            self.inbox.acked = self.inbox.app_seq;
        }
    }

    fn emit_inbox(&mut self, event: Event, seq: u64) {
        self.events.push_back((event, seq));
    }

    /// TOKEN_EXPIRING: tells the app, and sends REFRESH with the provider's token (once
    /// per notice, and not again for a token that is no newer than the last one noticed).
    fn on_token_expiring(&mut self, exp: u64) {
        self.emit(Event::TokenExpiring { exp });
        if self.phase != Phase::Ready || self.refresh_id.is_some() {
            return;
        }
        if self.noticed_exp.is_some_and(|seen| exp <= seen) {
            debug!("TOKEN_EXPIRING for exp {exp} again: the last REFRESH did not extend it");
            return;
        }
        self.noticed_exp = Some(exp);
        let Some(provider) = &self.config.token_provider else {
            return;
        };
        let token = provider(self.config.user);
        if token.is_empty() {
            debug!("the token provider has no token for a REFRESH");
            return;
        }
        self.send_refresh(&token);
    }

    fn send_refresh(&mut self, token: &[u8]) {
        let id = self.next_id();
        self.refresh_id = Some(id);
        Frame::refresh(id, token).encode(&mut self.out);
    }

    fn on_error(&mut self, frame: &Frame, now: Instant) {
        let (code, reason) = frame.error().unwrap_or((0, String::new()));
        if matches!(self.phase, Phase::LoggingIn { .. }) && frame.msg_id == self.login_id {
            if code == ErrorCode::InvalidField as u16 && self.ask_heartbeat_bounds {
                // A relay older than the HEARTBEAT flag refuses it as an unknown flag:
                // log in again without it, on the same link, and keep the fixed interval.
                debug!("LOGIN refused ({reason}); again without asking for heartbeat bounds");
                self.ask_heartbeat_bounds = false;
                self.send_login(now);
                return;
            }
            // AUTH_FAILED included: the link goes down and the next attempt waits for the
            // backoff (which grows with each refusal, and resets only at a LOGIN_OK), so
            // a bad token does not hammer the relay; that attempt asks the provider again.
            self.link_down(DisconnectReason::LoginRejected { code, reason }, now);
            return;
        }
        if self.inbox.sync_id == Some(frame.msg_id) && code == ErrorCode::ClusterUnavailable as u16
        {
            // The node cannot reach the inboxes now: sync again after the retry interval.
            debug!("INBOX_SYNC refused ({reason}); syncing again later");
            self.inbox.sync_id = None;
            self.inbox.sync_retry = Some(now + self.config.retry_interval);
            return;
        }
        if self.refresh_id.is_some() && self.refresh_id == Some(frame.msg_id) {
            self.refresh_id = None;
            self.emit(Event::RefreshFailed { code, reason });
            return;
        }
        if let Some(m) = self.outbox.get(frame.msg_id) {
            // "Try later" answers keep the message: RECIPIENT_SLOW and CLUSTER_UNAVAILABLE
            // (a cluster node lost its link to Redis) always, and RECIPIENT_OFFLINE for a
            // resend, whose first copy may have been delivered
            // before the link died (failing it could make the app send it twice).
            let resend = m.writes > 1;
            let try_later = code == ErrorCode::RecipientSlow as u16
                || code == ErrorCode::ClusterUnavailable as u16
                || (resend && code == ErrorCode::RecipientOffline as u16);
            if try_later {
                debug!("{}: {reason}; trying again later", frame.msg_id);
                self.outbox
                    .hold(frame.msg_id, now + self.config.retry_interval);
            } else {
                self.outbox.answer(frame.msg_id);
                self.fail(frame.msg_id, FailReason::Rejected { code, reason });
            }
            self.pump(now);
            return;
        }
        self.emit(Event::Error { code, reason });
    }

    /// Writes outbox messages while the link is up and the in-flight limit allows.
    fn pump(&mut self, now: Instant) {
        if self.phase != Phase::Ready {
            return;
        }
        while let Some(m) = self.outbox.next_to_send(self.config.max_in_flight, now) {
            let flags = if m.stored {
                Flags::DEDUP.union(Flags::STORED)
            } else {
                Flags::DEDUP
            };
            Frame::send(m.id, m.to, m.payload.clone())
                .with_flags(flags)
                .encode(&mut self.out);
        }
    }

    fn link_down(&mut self, reason: DisconnectReason, now: Instant) {
        match self.phase {
            Phase::Closed | Phase::Suspended => return,
            Phase::Closing { .. } => {
                self.action = Some(LinkAction::Disconnect);
                self.finish_close();
                return;
            }
            Phase::Suspending { .. } => {
                self.finish_suspend();
                return;
            }
            _ => {}
        }
        self.outbox.link_down();
        self.out.clear();
        self.ping_deadline = None;
        let retry_in = self.backoff.next_delay(&mut self.rng);
        debug!("link down ({reason}); retrying in {retry_in:?}");
        self.phase = Phase::Waiting { at: now + retry_in };
        self.action = Some(LinkAction::Disconnect);
        self.emit(Event::Disconnected { reason, retry_in });
    }

    /// True in the phases where frames from the link are read.
    fn reads_link(&self) -> bool {
        matches!(
            self.phase,
            Phase::LoggingIn { .. }
                | Phase::Ready
                | Phase::Closing { .. }
                | Phase::Suspending { .. }
        )
    }

    /// A frame arrived: the link is alive. A heartbeat PING it answers (any frame does)
    /// counts for the learning.
    fn alive(&mut self, now: Instant) {
        if self.ping_deadline.take().is_some() && self.ping_learns {
            self.heartbeat.answered();
        }
        self.ping_learns = false;
        self.last_rx = now;
    }

    /// The link goes without an event: messages in flight wait to be resent.
    fn drop_link_quietly(&mut self) {
        self.outbox.link_down();
        self.out.clear();
        self.ping_deadline = None;
        self.ping_learns = false;
        self.action = Some(LinkAction::Disconnect);
    }

    /// Ends the link for the background once the grace period is over (see
    /// [`set_foreground`](Self::set_foreground)).
    fn suspend_if_due(&mut self, now: Instant) {
        if self.foreground || self.suspend_at.is_none_or(|at| now < at) {
            return;
        }
        self.suspend_at = None;
        match self.phase {
            Phase::Ready => {
                self.send_inbox_ack();
                let id = self.next_id();
                Frame::bye(id).encode(&mut self.out);
                self.ping_deadline = None;
                self.phase = Phase::Suspending {
                    deadline: now + self.config.login_timeout,
                };
            }
            Phase::Connecting { .. } | Phase::LoggingIn { .. } => self.finish_suspend(),
            Phase::Waiting { .. } => self.phase = Phase::Suspended,
            _ => {}
        }
    }

    /// The background link is gone (the relay's BYE, its close, or the wait ran out).
    fn finish_suspend(&mut self) {
        self.drop_link_quietly();
        self.phase = Phase::Suspended;
        debug!("link closed for the background; reconnecting in the foreground");
        self.emit(Event::Disconnected {
            reason: DisconnectReason::Background,
            retry_in: Duration::ZERO,
        });
    }

    fn finish_close(&mut self) {
        for (id, reason) in self.outbox.drain() {
            self.fail(id, reason);
        }
        self.out.clear();
        self.phase = Phase::Closed;
        self.action = Some(LinkAction::Disconnect);
        self.emit(Event::Closed);
    }

    fn fail(&mut self, id: MessageId, reason: FailReason) {
        self.emit(Event::Failed { id, reason });
    }

    fn check_open(&self) -> Result<(), SendError> {
        match self.phase {
            Phase::Closing { .. } | Phase::Closed => Err(SendError::Closed),
            _ => Ok(()),
        }
    }

    fn next_id(&mut self) -> MessageId {
        self.next_seq = self.next_seq.wrapping_add(1).max(1);
        MessageId(self.id_tag | u64::from(self.next_seq))
    }
}

/// The bytes of a payload the app gets, in an allocation of their own. Frames are cut out
/// of the driver's read buffer, so `payload` is a view into it: handing it to the app as
/// is would keep that whole buffer (16 KiB or more) alive for as long as the app keeps the
/// message, and stop the driver from reusing it.
fn owned(payload: &Bytes) -> Bytes {
    Bytes::copy_from_slice(payload)
}

/// Spreads a caller's seed over all 64 bits (splitmix64), so that neighbouring seeds give
/// unrelated generators (`Rng::seeded` ignores the lowest bit of its seed).
fn mix_seed(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
