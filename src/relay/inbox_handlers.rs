//! Stored delivery in the core: stored SENDs, INBOX_SYNC, INBOX_ACK, pushing inboxes to
//! connections, and the hand-off to the durable store (protocol.md, section 15).
//!
//! A stored SEND goes into the recipient's inbox ([`super::inbox`]) and is pushed at once
//! to each of the recipient's connections that has synced and has room in its output
//! queue; a connection that falls behind is topped up from the inbox as its queue drains,
//! so it always receives the inbox in sequence order. With a durable store every change
//! is also queued as a [`StoreOp`]; the sender's ACK is held until the driver reports that
//! the batch is on disk ([`Relay::handle_store_committed`]).

use std::time::Instant;

use log::warn;

use super::inbox::StoreOp;
use super::session::State;
use super::{push_output, Relay};
use crate::proto::frame::{write_ack, write_frame};
use crate::proto::{ErrorCode, Flags, Header, InboxState, MessageId, Opcode, RawFrame, UserId};
use crate::ConnId;

/// An ACK waiting for its stored message to reach the disk.
#[derive(Clone, Copy, Debug)]
pub(super) struct HeldAck {
    conn: ConnId,
    serial: u64,
    msg_id: MessageId,
    target: UserId,
    /// The inbox sequence number it stored (None: a resend answered from memory, whose
    /// first copy is in this or an earlier commit); the ACK's count is computed at release.
    seq: Option<u64>,
    count: u32,
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
        if let Some(failure) = &self.store_failure {
            // Fail-stop: after a failed write the log's tail is unknown, so nothing more
            // is promised as stored until the relay restarts and reads it back.
            let reason = format!("the store failed earlier ({failure}); restart the relay");
            self.reply_error(id, h.msg_id, h.target, ErrorCode::StoreFailed, &reason);
            return;
        }
        let now_ms = self.unix_ms(now);
        self.inboxes.expire(h.target, now_ms);
        if let Err(full) = self.inboxes.check_room(h.target, frame.payload().len()) {
            self.reply_error(id, h.msg_id, h.target, ErrorCode::InboxFull, &full.0);
            return;
        }
        let (seq, deliver) =
            self.inboxes
                .append(h.target, sender, h.msg_id, frame.payload(), now_ms);
        self.metrics.messages_stored += 1;
        if self.durable {
            // Nothing leaves for the recipient or the sender until the commit: a client
            // must never hold a sequence number that a crash could hand out again.
            self.store_ops.push(StoreOp::Append {
                user: h.target,
                frame: deliver,
            });
            self.appended.push((h.target, seq));
            if h.flags.contains(Flags::DEDUP) {
                self.dedup.record(sender, h.msg_id, 0, now);
            }
            if !h.flags.contains(Flags::NO_ACK) {
                self.hold_ack(id, h.msg_id, h.target, Some(seq), 0);
            }
            return;
        }
        self.inboxes.mark_durable(h.target, seq);
        let count = self.push_to_devices(h.target, seq);
        if h.flags.contains(Flags::DEDUP) {
            self.dedup.record(sender, h.msg_id, count, now);
        }
        if !h.flags.contains(Flags::NO_ACK) {
            write_ack(self.scratch(), h.msg_id, h.target, count);
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

    fn hold_ack(
        &mut self,
        id: ConnId,
        msg_id: MessageId,
        target: UserId,
        seq: Option<u64>,
        count: u32,
    ) {
        if let Some(s) = self.sessions.get(id.0) {
            self.held_acks.push(HeldAck {
                conn: id,
                serial: s.serial,
                msg_id,
                target,
                seq,
                count,
            });
        }
    }

    /// ACKs a stored SEND: now with the memory store, after the next commit otherwise.
    pub(super) fn ack_stored(&mut self, id: ConnId, msg_id: MessageId, target: UserId, count: u32) {
        if self.durable {
            self.hold_ack(id, msg_id, target, None, count);
        } else {
            write_ack(self.scratch(), msg_id, target, count);
            self.queue_scratch(id);
        }
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
        let mut last = u64::from_be_bytes(payload[8..16].try_into().unwrap_or_default());
        if epoch != self.inboxes.epoch() {
            last = 0; // numbers from another store (or a fresh client) mean nothing here
        }
        let now_ms = self.unix_ms(now);
        self.inboxes.expire(user, now_ms);
        self.record_ack(user, last);
        let state = match self.inboxes.get(user) {
            Some(inbox) => InboxState {
                epoch: self.inboxes.epoch(),
                first_seq: inbox.first_seq(),
                last_seq: inbox.durable_seq(),
                expired_upto: inbox.expired_upto(),
            },
            None => InboxState {
                epoch: self.inboxes.epoch(),
                first_seq: 1,
                last_seq: 0,
                expired_upto: 0,
            },
        };
        write_frame(
            self.scratch(),
            Opcode::InboxState,
            Flags::EMPTY,
            h.msg_id,
            user,
            UserId::NONE,
            &state.to_bytes(),
        );
        self.queue_scratch(id);
        if let Some(s) = self.sessions.get_mut(id.0) {
            s.inbox_synced = true;
            s.inbox_pushed = last.min(state.last_seq);
        }
        self.pump_inbox(id);
    }

    /// INBOX_ACK: drop the user's stored messages up to the given sequence number.
    pub(super) fn on_inbox_ack(&mut self, id: ConnId, frame: &RawFrame) {
        let h = *frame.header();
        let Some(user) = self.check_inbox_request(id, &h, frame.payload().len(), 8, "INBOX_ACK")
        else {
            return;
        };
        let upto = u64::from_be_bytes(frame.payload()[..8].try_into().unwrap_or_default());
        self.record_ack(user, upto);
    }

    fn record_ack(&mut self, user: UserId, upto: u64) {
        // Only what may have been sent can be acknowledged.
        let upto = upto.min(self.inboxes.get(user).map_or(0, |i| i.durable_seq()));
        if upto > 0 && self.inboxes.ack(user, upto) && self.durable {
            self.store_ops.push(StoreOp::Ack { user, upto });
        }
    }

    /// Logged in, source 0, no flags, target 0, payload of `want` bytes.
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
        } else if !h.source.is_none() || !h.target.is_none() || h.flags != Flags::EMPTY {
            Some((
                ErrorCode::InvalidField,
                format!("{what} takes target 0, source 0 and no flags"),
            ))
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
        while s.out.len_bytes() < cap {
            let Some(next) = inbox.next_after(s.inbox_pushed) else {
                break;
            };
            if next.seq > inbox.durable_seq() {
                break; // the rest goes out when its commit is on disk
            }
            s.inbox_pushed = next.seq;
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
                if self.sessions.get(held.conn.0).map(|s| s.serial) != Some(held.serial) {
                    continue;
                }
                match &result {
                    Ok(()) => {
                        let count = match held.seq {
                            Some(seq) => self.devices_holding(held.target, seq),
                            None => held.count,
                        };
                        write_ack(self.scratch(), held.msg_id, held.target, count);
                        self.queue_scratch(held.conn);
                    }
                    Err(e) => {
                        let reason = format!("not stored: {e}");
                        self.reply_error(
                            held.conn,
                            held.msg_id,
                            held.target,
                            ErrorCode::StoreFailed,
                            &reason,
                        );
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
    pub fn restore(&mut self, ops: Vec<StoreOp>) {
        self.durable = true;
        for op in ops {
            self.inboxes.apply(op);
        }
        self.inboxes.mark_all_durable();
    }

    /// The live inbox state as ops, for compaction.
    pub fn store_snapshot(&self) -> Vec<StoreOp> {
        self.inboxes.snapshot()
    }

    /// Stored messages held, over all inboxes.
    pub fn stored_messages(&self) -> usize {
        self.inboxes.total_messages()
    }

    /// Users with an inbox.
    pub fn inbox_users(&self) -> usize {
        self.inboxes.users()
    }

    /// Payload bytes held in inboxes (compaction compares the log against it).
    pub fn stored_bytes(&self) -> usize {
        self.inboxes.total_bytes()
    }
}
