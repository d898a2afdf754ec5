//! Stored delivery in the core: stored SENDs, INBOX_SYNC, INBOX_ACK, pushing inboxes to
//! connections, and the hand-off to the durable store (protocol.md, section 15).
//!
//! A stored SEND goes into the recipient's inbox ([`super::inbox`]) and is pushed at once
//! to each of the recipient's connections that has synced and has room in its output
//! queue; a connection that falls behind is topped up from the inbox as its queue drains,
//! so it always receives the inbox in sequence order. With a durable store every change
//! is also queued as a [`StoreOp`]; the sender's ACK is held until the driver reports that
//! the batch is on disk ([`Relay::handle_store_committed`]).
//!
//! Messages past their age limit are dropped by [`Relay::expire_inboxes`], which the
//! relay's timer calls at [`Relay::inbox_deadline`]; it does at most [`EXPIRE_BUDGET`]
//! messages per call, so one turn of the event loop stays short however much is due.

use std::time::{Duration, Instant};

use log::{debug, warn};

use super::handlers::source_and_flags;
use super::inbox::StoreOp;
use super::session::{Codec, State};
use super::ws::WsMode;
use super::{push_output, Relay};
use crate::proto::frame::{write_ack, write_frame};
use crate::proto::text;
use crate::proto::{
    ErrorCode, Flags, Header, InboxState, MessageId, Opcode, RawFrame, UserId, HEADER_LEN,
};
use crate::ConnId;

/// Messages [`Relay::expire_inboxes`] drops at most per call.
pub const EXPIRE_BUDGET: usize = 1024;

/// An ACK waiting for its stored message to reach the disk (or the ERROR refusing a
/// DEDUP stored SEND, waiting for the record that remembers the refusal).
#[derive(Clone, Debug)]
pub(super) struct HeldAck {
    conn: ConnId,
    serial: u64,
    msg_id: MessageId,
    target: UserId,
    /// The inbox sequence number it stored (None: a resend answered from memory, whose
    /// first copy is in this or an earlier commit); the ACK's count is computed at release.
    seq: Option<u64>,
    count: u32,
    /// The sender of a DEDUP SEND: at release the first copy's count is written to the
    /// de-duplication memory (it was recorded as 0 meanwhile), and a resend's is read from
    /// it, so a resend is ACKed with what the first copy's ACK said.
    dedup: Option<UserId>,
    /// False for NO_ACK: held only to set the remembered count.
    reply: bool,
    /// A refusal to send instead of the ACK: its code and reason.
    refusal: Option<(ErrorCode, Box<str>)>,
}

impl HeldAck {
    /// The answer to a resend (nothing stored by this frame): an ACK of `count`, to send.
    fn resend(conn: ConnId, msg_id: MessageId, target: UserId, count: u32) -> HeldAck {
        HeldAck {
            conn,
            serial: 0,
            msg_id,
            target,
            seq: None,
            count,
            dedup: None,
            reply: true,
            refusal: None,
        }
    }
}

/// The ops and held ACKs of one loop turn, handed to the driver as one commit.
#[derive(Debug)]
pub(super) struct Commit {
    id: u64,
    acks: Vec<HeldAck>,
    /// (recipient, seq) of every message the commit makes durable.
    appended: Vec<(UserId, u64)>,
}

impl Relay {
    /// A SEND with the STORED flag, from `sender` (checks done by `on_send`).
    pub(super) fn on_stored_send(
        &mut self,
        id: ConnId,
        frame: RawFrame,
        sender: UserId,
        now: Instant,
    ) {
        let h = *frame.header();
        // Its size was checked by `on_send` (payload size comes before de-duplication).
        if let Some(failure) = &self.store_failure {
            // Fail-stop: after a failed write the log's tail is unknown, so nothing more
            // is promised as stored until the relay restarts and reads it back.
            let reason = format!("the store failed earlier ({failure}); restart the relay");
            self.reply_error(id, h.msg_id, h.target, ErrorCode::StoreFailed, &reason);
            return;
        }
        self.expire_inbox(h.target, now);
        let now_ms = self.unix_ms(now);
        // The sender's other devices get a copy (protocol.md, section 15.1); it must fit
        // too, or nothing is stored.
        let device = self.sessions.get(id.0).map_or(0, |s| s.device);
        let copy = sender != h.target && self.inboxes.has_other_devices(sender, device, now_ms);
        let room = self
            .inboxes
            .check_room(h.target, frame.payload().len())
            .and_then(|()| match copy {
                true => self.inboxes.check_room(sender, frame.payload().len()),
                false => Ok(()),
            });
        if let Err(full) = room {
            if !h.flags.contains(Flags::DEDUP) {
                self.reply_error(id, h.msg_id, h.target, ErrorCode::InboxFull, &full.0);
                return;
            }
            // A resend (the ERROR may be lost with the link) gets INBOX_FULL again rather
            // than being stored after messages sent later; with a durable store the
            // refusal is recorded, and answered once on disk, so a restart remembers it.
            let refused = super::dedup::refused(ErrorCode::InboxFull);
            self.dedup.record(sender, h.msg_id, refused, now);
            if !self.durable {
                self.reply_error(id, h.msg_id, h.target, ErrorCode::InboxFull, &full.0);
                return;
            }
            self.store_ops.push(StoreOp::Sent {
                sender,
                msg_id: h.msg_id,
                count: refused,
            });
            self.hold_refusal(id, h.msg_id, h.target, ErrorCode::InboxFull, &full.0);
            return;
        }
        let (seq, deliver) =
            self.inboxes
                .append(h.target, sender, h.msg_id, frame.payload(), now_ms);
        self.metrics.messages_stored += 1;
        let copied = copy.then(|| {
            let (seq, frame) = self.inboxes.append_copy(
                sender,
                h.target,
                h.msg_id,
                frame.payload(),
                now_ms,
                device,
            );
            (seq, frame)
        });
        if self.durable {
            // Nothing leaves for the recipient or the sender until the commit: a client
            // must never hold a sequence number that a crash could hand out again.
            // The copy goes first: a torn write keeps a prefix of the commit, and a copy
            // without its message is resent and copied again (the SDK drops the second),
            // while a message without its copy would be ACKed from the DEDUP memory on the
            // resend and never copied.
            if let Some((copy_seq, copy_frame)) = copied {
                self.store_ops.push(StoreOp::SentCopy {
                    user: sender,
                    frame: copy_frame,
                    origin: device,
                });
                self.appended.push((sender, copy_seq));
            }
            self.store_ops.push(StoreOp::Append {
                user: h.target,
                frame: deliver,
            });
            self.appended.push((h.target, seq));
            let dedup = h.flags.contains(Flags::DEDUP);
            if dedup {
                // The count is known at the commit (set there); a resend before it finds
                // this entry and waits for the same commit.
                self.dedup.record(sender, h.msg_id, 0, now);
            }
            let reply = !h.flags.contains(Flags::NO_ACK);
            if reply || dedup {
                let held = HeldAck {
                    conn: id,
                    serial: 0,
                    msg_id: h.msg_id,
                    target: h.target,
                    seq: Some(seq),
                    count: 0,
                    dedup: dedup.then_some(sender),
                    reply,
                    refusal: None,
                };
                self.hold_ack(held);
            }
            return;
        }
        self.inboxes.mark_durable(h.target, seq);
        let count = self.push_to_devices(h.target, seq);
        if let Some((copy_seq, _)) = copied {
            self.inboxes.mark_durable(sender, copy_seq);
            self.push_to_devices(sender, copy_seq);
        }
        if h.flags.contains(Flags::DEDUP) {
            self.dedup.record(sender, h.msg_id, count, now);
        }
        if !h.flags.contains(Flags::NO_ACK) {
            self.queue_stored_ack(id, h.msg_id, h.target, count);
        }
    }

    /// Queues the ACK of a stored SEND: the ACK frame, or for a text-mode connection (or a
    /// WebSocket in text mode) the line `SAVED <id> <n>` (protocol.md, section 12), so a
    /// person does not read the `ACK <id> 0` of a message kept for an offline recipient as
    /// a failure.
    pub(super) fn queue_stored_ack(
        &mut self,
        id: ConnId,
        msg_id: MessageId,
        target: UserId,
        count: u32,
    ) {
        let lines = self.sessions.get(id.0).is_some_and(|s| match s.codec {
            Codec::Text => true,
            Codec::WebSocket => (s.extra.as_ref().and_then(|e| e.ws.as_ref()))
                .is_some_and(|ws| ws.mode == WsMode::Text),
            _ => false,
        });
        if lines {
            self.queue(id, text::render_saved(msg_id, count));
        } else {
            write_ack(self.scratch(), msg_id, target, count);
            self.queue_scratch(id);
        }
    }

    /// Tops up every synced connection of `user`; returns how many have `seq` queued.
    fn push_to_devices(&mut self, user: UserId, seq: u64) -> u32 {
        let mut count = 0u32;
        for i in 0..self.directory.devices(user).len() {
            let device = self.directory.devices(user)[i];
            self.pump_inbox(device);
            if self
                .sessions
                .get(device.0)
                .is_some_and(|s| s.inbox_synced && s.inbox_pushed >= seq)
            {
                count += 1;
            }
        }
        count
    }

    /// Holds `held` (its serial taken from the connection) until the next commit.
    fn hold_ack(&mut self, mut held: HeldAck) {
        if let Some(s) = self.sessions.get_mut(held.conn.0) {
            held.serial = s.serial;
            if held.reply {
                s.acks_held += 1;
            }
            self.held_acks.push(held);
        }
    }

    /// One held ACK (or STORE_FAILED) of `id` was queued: after the last one, a deferred
    /// BYE reply follows, and a closing connection may close once flushed.
    fn release_ack(&mut self, id: ConnId) {
        let Some(s) = self.sessions.get_mut(id.0) else {
            return;
        };
        s.acks_held = s.acks_held.saturating_sub(1);
        if s.acks_held > 0 {
            return;
        }
        if let Some(bye) = s.extra.as_mut().and_then(|e| e.deferred_bye.take()) {
            self.queue(id, bye);
        } else if s.state == State::Closing && !s.in_flush_list {
            s.in_flush_list = true;
            self.flush_list.push(id);
        }
    }

    /// ACKs a stored SEND (a DEDUP resend: `count` is what the first copy's ACK said, if
    /// known): now with the memory store, after the next commit otherwise.
    pub(super) fn ack_stored(&mut self, id: ConnId, msg_id: MessageId, target: UserId, count: u32) {
        if self.durable {
            let sender = self.sessions.get(id.0).and_then(|s| s.user());
            self.hold_ack(HeldAck {
                dedup: sender,
                ..HeldAck::resend(id, msg_id, target, count)
            });
        } else {
            self.queue_stored_ack(id, msg_id, target, count);
        }
    }

    /// Holds the ERROR refusing a DEDUP stored SEND until the commit that records the
    /// refusal (or the refusal of its first copy) is on disk; with the memory store it is
    /// sent now.
    pub(super) fn hold_refusal(
        &mut self,
        id: ConnId,
        msg_id: MessageId,
        target: UserId,
        code: ErrorCode,
        reason: &str,
    ) {
        if !self.durable {
            self.reply_error(id, msg_id, target, code, reason);
            return;
        }
        self.hold_ack(HeldAck {
            refusal: Some((code, reason.into())),
            ..HeldAck::resend(id, msg_id, target, 0)
        });
    }

    /// INBOX_SYNC: the client has everything up to `last_seq` (of `epoch`); answer with
    /// INBOX_STATE and start pushing the rest.
    pub(super) fn on_inbox_sync(&mut self, id: ConnId, frame: &RawFrame, now: Instant) {
        let h = *frame.header();
        let Some(user) = self.check_inbox_request(id, &h, frame.payload().len(), 16, "INBOX_SYNC")
        else {
            return;
        };
        let payload = frame.payload();
        let epoch = u64::from_be_bytes(payload[..8].try_into().unwrap_or_default());
        let last = u64::from_be_bytes(payload[8..16].try_into().unwrap_or_default());
        if self.cluster.is_some() {
            self.cluster_inbox_sync(id, user, h.msg_id, epoch, last);
            return;
        }
        // Numbers from another store (or a fresh client) mean nothing here.
        let client_last = (epoch == self.inboxes.epoch()).then_some(last);
        let last = client_last.unwrap_or(0);
        let device = self.sessions.get(id.0).map_or(0, |s| s.device);
        self.expire_inbox(user, now);
        let now_ms = self.unix_ms(now);
        let mark = self.store_ops.len();
        let report = self
            .inboxes
            .sync(user, device, client_last, now_ms, &mut self.store_ops);
        if !self.durable {
            self.store_ops.truncate(mark);
        }
        let state = InboxState {
            epoch: self.inboxes.epoch(),
            first_seq: report.first_seq,
            last_seq: report.last_seq,
            expired_upto: report.expired_upto,
        };
        self.queue_inbox_state(id, h.msg_id, user, state, report.new_device);
        if let Some(s) = self.sessions.get_mut(id.0) {
            s.inbox_synced = true;
            s.inbox_pushed = last.min(state.last_seq);
        }
        self.pump_inbox(id);
    }

    /// Queues INBOX_STATE, the answer to INBOX_SYNC `msg_id` of `user`'s connection `id`.
    pub(super) fn queue_inbox_state(
        &mut self,
        id: ConnId,
        msg_id: MessageId,
        user: UserId,
        state: InboxState,
        new_device: bool,
    ) {
        let flags = if new_device {
            Flags::NEW_DEVICE
        } else {
            Flags::EMPTY
        };
        write_frame(
            self.scratch(),
            Opcode::InboxState,
            flags,
            msg_id,
            user,
            UserId::NONE,
            &state.to_bytes(),
        );
        self.queue_scratch(id);
    }

    /// INBOX_ACK: drop the user's stored messages up to the given sequence number.
    pub(super) fn on_inbox_ack(&mut self, id: ConnId, frame: &RawFrame, now: Instant) {
        let h = *frame.header();
        let Some(user) = self.check_inbox_request(id, &h, frame.payload().len(), 8, "INBOX_ACK")
        else {
            return;
        };
        let upto = u64::from_be_bytes(frame.payload()[..8].try_into().unwrap_or_default());
        if self.cluster.is_some() {
            self.cluster_inbox_ack(id, user, upto);
            return;
        }
        let device = self.sessions.get(id.0).map_or(0, |s| s.device);
        let now_ms = self.unix_ms(now);
        let mark = self.store_ops.len();
        self.inboxes
            .device_ack(user, device, upto, now_ms, &mut self.store_ops);
        if !self.durable {
            self.store_ops.truncate(mark);
        }
    }

    /// Logged in, source 0, no flags, target 0, payload of `want` bytes: the order of
    /// protocol.md section 6.1.
    fn check_inbox_request(
        &mut self,
        id: ConnId,
        h: &Header,
        len: usize,
        want: usize,
        what: &str,
    ) -> Option<UserId> {
        let user = self.sessions.get(id.0).and_then(|s| s.user());
        let problem = if user.is_none() {
            Some((ErrorCode::NotLoggedIn, format!("log in before {what}")))
        } else if let Some(reason) = source_and_flags(h, Flags::EMPTY, what) {
            Some((ErrorCode::InvalidField, reason))
        } else if !h.target.is_none() {
            Some((ErrorCode::InvalidField, format!("{what} takes target 0")))
        } else if len != want {
            Some((
                ErrorCode::InvalidField,
                format!("{what} payload must be {want} bytes, got {len}"),
            ))
        } else {
            None
        };
        if let Some((code, reason)) = problem {
            self.reply_error(id, h.msg_id, h.target, code, &reason);
            return None;
        }
        user
    }

    /// Queues to a synced connection the stored messages it has not been sent, in order,
    /// while its output queue is below half its cap.
    pub(super) fn pump_inbox(&mut self, id: ConnId) {
        if self.cluster.is_some() {
            self.fetch_inbox(id, false);
            return;
        }
        let Some(s) = self.sessions.get_mut(id.0) else {
            return;
        };
        let State::Active(user) = s.state else {
            return;
        };
        if !s.inbox_synced {
            return;
        }
        let Some(inbox) = self.inboxes.get(user) else {
            return;
        };
        let cap = self.config.room_cap();
        while s.out.held() < cap {
            let Some(next) = inbox.next_after(s.inbox_pushed) else {
                break;
            };
            if next.seq > inbox.durable_seq() {
                break; // the rest goes out when its commit is on disk
            }
            s.inbox_pushed = next.seq;
            if next.origin == s.device {
                continue; // this device's own message: it has it
            }
            self.metrics.count_out(&next.frame, 1);
            push_output(s, &mut self.flush_list, id, next.frame.clone());
        }
    }

    /// Seals this turn's store ops and held ACKs into one commit: the ops go to `out`
    /// for the driver to write and sync, and the returned id comes back through
    /// [`Relay::handle_store_committed`]. `None` when there is nothing to commit.
    pub fn take_commit(&mut self, out: &mut Vec<StoreOp>) -> Option<u64> {
        if self.store_ops.is_empty() && self.held_acks.is_empty() {
            return None;
        }
        self.next_commit += 1;
        out.append(&mut self.store_ops);
        self.commits.push_back(Commit {
            id: self.next_commit,
            acks: std::mem::take(&mut self.held_acks),
            appended: std::mem::take(&mut self.appended),
        });
        Some(self.next_commit)
    }

    /// True when this turn has stored messages to write or ACKs to hold.
    pub fn wants_commit(&self) -> bool {
        !self.store_ops.is_empty() || !self.held_acks.is_empty()
    }

    /// Commits in flight (handed to the driver, not yet reported back).
    pub fn commits_in_flight(&self) -> usize {
        self.commits.len()
    }

    /// Every commit up to `id` is on disk (`Ok`), or could not be written (`Err`). On
    /// success its messages become sendable (pushed to synced recipients now) and its
    /// ACKs go out; on failure the ACKs become STORE_FAILED and the relay stops promising
    /// (fail-stop).
    pub fn handle_store_committed(&mut self, id: u64, result: Result<(), String>) {
        while self.commits.front().is_some_and(|c| c.id <= id) {
            let Some(commit) = self.commits.pop_front() else {
                break;
            };
            if result.is_ok() {
                let mut users: Vec<UserId> = Vec::new();
                for &(user, seq) in &commit.appended {
                    self.inboxes.mark_durable(user, seq);
                    if !users.contains(&user) {
                        users.push(user);
                    }
                }
                for user in users {
                    let last = self.inboxes.get(user).map_or(0, |i| i.durable_seq());
                    self.push_to_devices(user, last);
                }
            }
            for held in commit.acks {
                let count = match (held.seq, held.dedup) {
                    (Some(seq), dedup) => {
                        let count = self.devices_holding(held.target, seq);
                        if let (Some(sender), true) = (dedup, result.is_ok()) {
                            self.dedup.set_count(sender, held.msg_id, count);
                        }
                        count
                    }
                    (None, Some(sender)) => self
                        .dedup
                        .count_of(sender, held.msg_id)
                        .unwrap_or(held.count),
                    (None, None) => held.count,
                };
                if !held.reply
                    || self.sessions.get(held.conn.0).map(|s| s.serial) != Some(held.serial)
                {
                    continue;
                }
                match (&result, &held.refusal) {
                    (Ok(()), Some((code, reason))) => {
                        self.reply_error(held.conn, held.msg_id, held.target, *code, reason);
                        self.release_ack(held.conn);
                    }
                    (Ok(()), None) => {
                        self.queue_stored_ack(held.conn, held.msg_id, held.target, count);
                        self.release_ack(held.conn);
                    }
                    (Err(e), _) => {
                        let reason = format!("not stored: {e}");
                        self.reply_error(
                            held.conn,
                            held.msg_id,
                            held.target,
                            ErrorCode::StoreFailed,
                            &reason,
                        );
                        self.release_ack(held.conn);
                    }
                }
            }
        }
        if let Err(e) = result {
            warn!("store write failed: {e}; stored SENDs are refused until a restart");
            self.store_failure = Some(e);
        }
    }

    /// How many synced connections of `user` have `seq` queued (or sent).
    fn devices_holding(&self, user: UserId, seq: u64) -> u32 {
        let held = self.directory.devices(user).iter().filter(|d| {
            self.sessions
                .get(d.0)
                .is_some_and(|s| s.inbox_synced && s.inbox_pushed >= seq)
        });
        held.count() as u32
    }

    /// Rebuilds the inboxes from a durable store's ops (at start, before any connection)
    /// and makes the relay durable from then on: every change becomes a [`StoreOp`] for
    /// [`Relay::take_commit`], and stored SENDs are ACKed and delivered only once their
    /// commit is reported on disk. A relay never restored keeps stored messages in memory
    /// and ACKs them at once.
    ///
    /// DEDUP ids come back too: each stored message (an `Append`, its frame names sender
    /// and id) and each `Sent` record younger than the DEDUP memory time is remembered
    /// again, so a client's resend after a relay restart is not stored twice. A resend
    /// recognised this way is ACKed with the count its record holds (0 for an `Append`).
    pub fn restore(&mut self, ops: Vec<StoreOp>) {
        self.durable = true;
        let now = self.clock_base.0;
        let now_ms = self.clock_base.1;
        let memory_ms = u64::try_from(self.config.dedup_ttl.as_millis()).unwrap_or(u64::MAX);
        for op in ops {
            match &op {
                StoreOp::Append { frame, .. } if frame.len() >= HEADER_LEN + 16 => {
                    let header = Header::read(frame);
                    let stored_at = u64::from_be_bytes(
                        frame[HEADER_LEN + 8..HEADER_LEN + 16]
                            .try_into()
                            .unwrap_or_default(),
                    );
                    if now_ms.saturating_sub(stored_at) < memory_ms {
                        self.dedup.record(header.source, header.msg_id, 0, now);
                    }
                }
                &StoreOp::Sent {
                    sender,
                    msg_id,
                    count,
                } => self.dedup.record(sender, msg_id, count, now),
                _ => {}
            }
            self.inboxes.apply(op);
        }
        self.inboxes.mark_all_durable();
    }

    /// The live inbox state as ops, for compaction, and every DEDUP id the relay
    /// remembers (so a resend after a restart is still recognised).
    pub fn store_snapshot(&self) -> Vec<StoreOp> {
        let mut ops = self.inboxes.snapshot();
        ops.extend(
            self.dedup
                .remembered()
                .map(|(sender, msg_id, count)| StoreOp::Sent {
                    sender,
                    msg_id,
                    count,
                }),
        );
        ops
    }

    /// Stored messages held, over all inboxes.
    pub fn stored_messages(&self) -> usize {
        self.inboxes.total_messages()
    }

    /// Why the store failed, once a write failed: stored SENDs are refused with
    /// `STORE_FAILED` until the relay restarts and reads its log back.
    pub fn store_failure(&self) -> Option<&str> {
        self.store_failure.as_deref()
    }

    /// Users with an inbox.
    pub fn inbox_users(&self) -> usize {
        self.inboxes.users()
    }

    /// Bytes of the stored INBOX_DELIVER frames (compaction compares the log against it).
    /// The byte limits count more per message (protocol.md, section 15).
    pub fn stored_bytes(&self) -> usize {
        self.inboxes.frame_bytes()
    }

    /// Drops `user`'s messages that passed the age limit (before a request reads or adds
    /// to the inbox), queuing the store ops.
    fn expire_inbox(&mut self, user: UserId, now: Instant) {
        let now_ms = self.unix_ms(now);
        let mark = self.store_ops.len();
        self.inboxes.expire(user, now_ms, &mut self.store_ops);
        if !self.durable {
            self.store_ops.truncate(mark);
        }
    }

    /// Drops up to 1024 (`EXPIRE_BUDGET`) stored messages that passed the age limit by `now`,
    /// from the inboxes whose oldest message is oldest, queuing the store ops. Call it
    /// whenever [`Relay::inbox_deadline`] has passed; when more is due than the budget,
    /// the deadline stays in the past and the next turn goes on.
    pub fn expire_inboxes(&mut self, now: Instant) {
        let now_ms = self.unix_ms(now);
        let mark = self.store_ops.len();
        let expired = self
            .inboxes
            .expire_due(now_ms, EXPIRE_BUDGET, &mut self.store_ops);
        if !self.durable {
            self.store_ops.truncate(mark);
        }
        if expired > 0 {
            debug!(
                "{} expired",
                super::counted(expired, "stored message", "stored messages")
            );
        }
    }

    /// When [`Relay::expire_inboxes`] next has work: the oldest stored message's age limit
    /// (already past when the last call left some due). `None` when nothing is stored.
    pub fn inbox_deadline(&self) -> Option<Instant> {
        let due_ms = self.inboxes.next_expiry()?;
        let (base, base_ms) = self.clock_base;
        base.checked_add(Duration::from_millis(due_ms.saturating_sub(base_ms)))
    }
}
