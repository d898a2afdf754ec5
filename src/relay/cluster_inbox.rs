//! Stored delivery in cluster mode (protocol.md, section 18.1): every inbox lives in Redis,
//! so a user resumes from any node and no node's loss loses a stored message.
//!
//! The inbox logic runs in Redis as one library of functions (`server/cluster_inbox.lua`),
//! each atomic. One store call takes a loop turn's stored SENDs from one device to one
//! recipient (up to [`STORE_BATCH`]): it appends them to the recipient's stream (and the
//! sender's copies), checks the limits and DEDUP, and PUBLISHes their INBOX_DELIVERs on the
//! recipient's user channel as one *notice* (node id [`STORED_NOTICE`], the copies' origin
//! device, the frames). The senders' ACKs wait for that call's answer, so "stored" means
//! Redis has it. A connection's INBOX_ACKs go one at a time and only when they move; its
//! INBOX_SYNCs one at a time.
//!
//! This file is the node's side: it asks, and it keeps, per synced connection, how far it
//! has pushed (`Session::inbox_pushed`) and the highest number known to exist
//! ([`ClusterCursor::known`]). A notice that is the next number for a connection with room
//! is pushed at once; anything else (a gap, a full queue, a replay after INBOX_SYNC) is
//! fetched from the stream (`XRANGE`, [`FETCH_BATCH`] at a time) as the queue drains, so a
//! connection always receives its inbox in sequence order.
//!
//! **No missed notice.** An INBOX_SYNC waits until Redis has confirmed the node's
//! subscription to the user's channel: every notice published after the sync's function
//! ran reaches the node. When a subscription is confirmed again (after the link was down),
//! each synced connection of the user checks the stream for what it missed.

use std::time::Instant;

use bytes::Bytes;
use log::{info, warn};

use super::cluster::{ClusterOp, ClusterReply, Pending};
use super::push_output;
use super::session::State;
use super::Relay;
use crate::proto::frame::write_header;
use crate::proto::{
    ErrorCode, Flags, Header, InboxState, MessageId, Opcode, RawFrame, UserId, HEADER_LEN,
};
use crate::ConnId;

/// The node id of a stored-message notice (no node has it): every node, the sender's
/// included, pushes it to its connections of the user.
pub const STORED_NOTICE: u64 = u64::MAX;

/// Stored messages one fetch asks for.
pub const FETCH_BATCH: usize = 64;

/// The inbox limits, as the functions take them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InboxParams {
    /// Messages one inbox may hold.
    pub max_messages: usize,
    /// Bytes one inbox may hold (INBOX_DELIVER frame + 64 per message).
    pub max_bytes: usize,
    /// How long a message waits, in ms.
    pub ttl_ms: u64,
    /// How long a silent device stays tracked, in ms.
    pub retention_ms: u64,
    /// Devices tracked per user.
    pub max_devices: usize,
}

/// Stored SENDs for one `imrelay_store` call: a loop turn's from one device of one sender
/// to one recipient, in order (at most [`STORE_BATCH`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreRequest {
    /// The recipient.
    pub recipient: UserId,
    /// The sender.
    pub sender: UserId,
    /// The sender's device tag (its copies skip it).
    pub device: u64,
    /// The messages, in the order they were sent.
    pub messages: Vec<StoredMessage>,
    /// How long Redis remembers a DEDUP SEND's answer, in ms.
    pub dedup_ttl_ms: u64,
    /// The epoch a new store gets.
    pub candidate: u64,
    /// The limits.
    pub params: InboxParams,
}

/// One stored SEND of a [`StoreRequest`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredMessage {
    /// The INBOX_DELIVER header (length included; seq and time follow it).
    pub header: [u8; HEADER_LEN],
    /// The message.
    pub payload: Bytes,
    /// A DEDUP SEND: its key (`imrelay:d:<sender>:<msg_id>`) is remembered with its answer.
    pub dedup: bool,
}

/// Stored SENDs one `imrelay_store` call carries, at most.
pub const STORE_BATCH: usize = 64;

/// What the node asks of Redis for stored delivery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InboxOp {
    /// Store messages (`imrelay_store`).
    Store(Box<StoreRequest>),
    /// INBOX_SYNC (`imrelay_sync`).
    Sync {
        /// The user.
        user: UserId,
        /// Its device tag.
        device: u64,
        /// The client's epoch and last sequence number.
        epoch: u64,
        /// The last sequence number it has.
        last: u64,
        /// The epoch a new store gets.
        candidate: u64,
        /// The limits.
        params: InboxParams,
    },
    /// INBOX_ACK (`imrelay_ack`); answered, but nothing waits for it.
    Ack {
        /// The user.
        user: UserId,
        /// Its device tag.
        device: u64,
        /// Everything up to this.
        upto: u64,
        /// The limits.
        params: InboxParams,
    },
    /// The messages of `user` after `after` (`XRANGE` from `after + 1`, [`FETCH_BATCH`] of them).
    Fetch {
        /// The user.
        user: UserId,
        /// The last one the connection has.
        after: u64,
    },
    /// The store's epoch (`imrelay_epoch`), asked when the link comes up.
    Epoch {
        /// The epoch a new store gets.
        candidate: u64,
    },
}

/// A stored SEND waiting for its answer.
#[derive(Debug)]
pub(super) struct StoredWait {
    conn: ConnId,
    serial: u64,
    msg_id: MessageId,
    target: UserId,
    ack: bool,
}

/// What waits for an inbox command's answer.
#[derive(Debug)]
pub(super) enum InboxWait {
    /// The ACKs of a store's messages, in order.
    Stored(Vec<StoredWait>),
    /// An INBOX_SYNC's INBOX_STATE.
    Synced {
        conn: ConnId,
        serial: u64,
        msg_id: MessageId,
    },
    /// A fetch for one connection; `known` is the highest number it knew of when the
    /// fetch was sent (Redis had every one up to it by then).
    Fetched {
        conn: ConnId,
        serial: u64,
        known: u64,
    },
    /// The epoch check at link up.
    Epoch,
    /// A connection's INBOX_ACK.
    Acked { conn: ConnId, serial: u64 },
}

/// A connection's place in its user's inbox in Redis (beside `Session::inbox_pushed`).
#[derive(Clone, Copy, Debug, Default)]
pub struct ClusterCursor {
    /// The highest sequence number known to be in the inbox.
    pub known: u64,
    /// A fetch is on its way.
    pub fetching: bool,
    /// An INBOX_SYNC is on its way to Redis, or waits for the subscription
    /// (`parked`).
    pub syncing: bool,
    /// An INBOX_SYNC waiting for the node's subscription to the user's channel: its
    /// msg_id, epoch and last_seq.
    pub parked: Option<(MessageId, u64, u64)>,
    /// The highest INBOX_ACK written to Redis (or on its way there).
    pub acked: u64,
    /// An INBOX_ACK is on its way to Redis: a later one waits for its answer.
    pub ack_waiting: bool,
    /// The INBOX_ACK to write once the one on its way is answered (0: none).
    pub ack_next: u64,
}

impl Relay {
    fn inbox_params(&self) -> InboxParams {
        let ms = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        InboxParams {
            max_messages: self.config.inbox_max_messages,
            max_bytes: self.config.inbox_max_bytes,
            ttl_ms: ms(self.config.inbox_ttl),
            retention_ms: ms(self.config.device_retention),
            max_devices: self.config.inbox_max_devices,
        }
    }

    /// A stored SEND in cluster mode (checks done by `on_send`): stored by a function in
    /// Redis, which also answers DEDUP; the ACK waits for it.
    pub(super) fn cluster_stored_send(&mut self, id: ConnId, frame: &RawFrame, sender: UserId) {
        let h = *frame.header();
        let params = self.inbox_params();
        let dedup_ttl = u64::try_from(self.config.dedup_ttl.as_millis()).unwrap_or(u64::MAX);
        let Some(s) = self.sessions.get(id.0) else {
            return;
        };
        let (serial, device) = (s.serial, s.device);
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        if !c.can_publish() {
            let reason = if c.up {
                "the cluster link is backed up; not stored"
            } else {
                "the cluster link is down: stored messages live in Redis; not stored"
            };
            self.refuse_cluster_unavailable(id, &h, reason);
            return;
        }
        let mut fixed = [0u8; HEADER_LEN];
        let len = u32::try_from(h.len as usize + 16).unwrap_or(u32::MAX);
        write_header(
            &mut &mut fixed[..],
            len,
            Opcode::InboxDeliver,
            Flags::EMPTY,
            h.msg_id,
            h.target,
            sender,
        );
        let message = StoredMessage {
            header: fixed,
            // Copied: the frame is borrowed from the read buffer.
            payload: Bytes::copy_from_slice(frame.payload()),
            dedup: h.flags.contains(Flags::DEDUP),
        };
        let wait = StoredWait {
            conn: id,
            serial,
            msg_id: h.msg_id,
            target: h.target,
            ack: !h.flags.contains(Flags::NO_ACK),
        };
        let batch = (h.target.0, sender.0, device);
        c.store(batch, message, wait, |candidate| StoreRequest {
            recipient: h.target,
            sender,
            device,
            messages: Vec::new(),
            dedup_ttl_ms: dedup_ttl,
            candidate,
            params,
        });
        self.metrics.cluster_messages_out += 1;
    }

    /// INBOX_SYNC in cluster mode (checks done): asked of Redis once the node's
    /// subscription to the user's channel is confirmed.
    pub(super) fn cluster_inbox_sync(
        &mut self,
        id: ConnId,
        user: UserId,
        msg_id: MessageId,
        epoch: u64,
        last: u64,
    ) {
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        if !c.can_publish() {
            let reason = "the cluster link is down: stored messages live in Redis; sync again";
            self.reply_error(
                id,
                msg_id,
                UserId::NONE,
                ErrorCode::ClusterUnavailable,
                reason,
            );
            return;
        }
        let subscribing = c.subscribing.get(&user).copied().unwrap_or(0) > 0;
        let Some(s) = self.sessions.get_mut(id.0) else {
            return;
        };
        let cursor = &mut s.extra_mut().cluster_inbox;
        if cursor.syncing {
            // Each costs Redis a call: one at a time per connection.
            let reason = "an INBOX_SYNC of this connection is still on its way; send another \
                          after its INBOX_STATE";
            self.reply_error(id, msg_id, UserId::NONE, ErrorCode::RateLimited, reason);
            return;
        }
        cursor.syncing = true;
        if subscribing {
            cursor.parked = Some((msg_id, epoch, last));
            return;
        }
        self.send_cluster_sync(id, msg_id, epoch, last);
    }

    fn send_cluster_sync(&mut self, id: ConnId, msg_id: MessageId, epoch: u64, last: u64) {
        let params = self.inbox_params();
        let Some(s) = self.sessions.get(id.0) else {
            return;
        };
        let State::Active(user) = s.state else {
            return;
        };
        let (serial, device) = (s.serial, s.device);
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        let candidate = c.epoch_candidate();
        c.command(
            ClusterOp::Inbox(InboxOp::Sync {
                user,
                device,
                epoch,
                last,
                candidate,
                params,
            }),
            Pending::Inbox(InboxWait::Synced {
                conn: id,
                serial,
                msg_id,
            }),
        );
    }

    /// INBOX_ACK in cluster mode (checks done): written to Redis when the link is up (an
    /// acknowledgement lost with the link is made again by the next INBOX_SYNC).
    ///
    /// One acknowledgement per connection is on its way to Redis at a time, and one that
    /// moves nothing is not written: a client that repeats or floods INBOX_ACK costs Redis
    /// at most one call per round trip, and only for numbers that go up.
    pub(super) fn cluster_inbox_ack(&mut self, id: ConnId, user: UserId, upto: u64) {
        let params = self.inbox_params();
        let Some(s) = self.sessions.get_mut(id.0) else {
            return;
        };
        let (serial, device) = (s.serial, s.device);
        let cursor = &mut s.extra_mut().cluster_inbox;
        if upto <= cursor.acked.max(cursor.ack_next) {
            return;
        }
        if cursor.ack_waiting {
            cursor.ack_next = upto;
            return;
        }
        let Some(c) = self.cluster.as_mut().filter(|c| c.can_publish()) else {
            return; // the next INBOX_SYNC acknowledges again
        };
        cursor.acked = upto;
        cursor.ack_waiting = true;
        c.command(
            ClusterOp::Inbox(InboxOp::Ack {
                user,
                device,
                upto,
                params,
            }),
            Pending::Inbox(InboxWait::Acked { conn: id, serial }),
        );
    }

    /// Redis answered a connection's INBOX_ACK (or the link went down first): the one
    /// that waited goes now.
    fn inbox_ack_answered(&mut self, id: ConnId, serial: u64) {
        let Some(s) = self.sessions.get_mut(id.0).filter(|s| s.serial == serial) else {
            return;
        };
        let State::Active(user) = s.state else {
            return;
        };
        let cursor = &mut s.extra_mut().cluster_inbox;
        cursor.ack_waiting = false;
        let next = std::mem::take(&mut cursor.ack_next);
        if next > 0 {
            self.cluster_inbox_ack(id, user, next);
        }
    }

    /// Redis confirmed the node's subscription to `user`'s channel: parked syncs go on,
    /// and synced connections check the stream for notices the node may have missed.
    pub(super) fn cluster_user_subscribed(&mut self, user: UserId) {
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        match c.subscribing.get_mut(&user) {
            Some(n) if *n > 1 => {
                *n -= 1;
                return;
            }
            Some(_) => {
                c.subscribing.remove(&user);
            }
            None => return,
        }
        for i in 0..self.directory.devices(user).len() {
            let id = self.directory.devices(user)[i];
            let Some(s) = self.sessions.get_mut(id.0) else {
                continue;
            };
            let synced = s.inbox_synced;
            let parked = s.extra.as_mut().and_then(|e| e.cluster_inbox.parked.take());
            if let Some((msg_id, epoch, last)) = parked {
                self.send_cluster_sync(id, msg_id, epoch, last);
            } else if synced {
                self.fetch_inbox(id, true);
            }
        }
    }

    /// The link went down: syncs parked for a subscription are refused (the SDK syncs
    /// again), and no fetch is on its way any more.
    pub(super) fn cluster_inbox_down(&mut self, users: Vec<UserId>) {
        for user in users {
            for i in 0..self.directory.devices(user).len() {
                let id = self.directory.devices(user)[i];
                let parked = self.sessions.get_mut(id.0).and_then(|s| {
                    let e = s.extra.as_mut()?;
                    e.cluster_inbox.syncing = false;
                    e.cluster_inbox.parked.take()
                });
                if let Some((msg_id, _, _)) = parked {
                    let reason = "the cluster link went down; sync again";
                    let code = ErrorCode::ClusterUnavailable;
                    self.reply_error(id, msg_id, UserId::NONE, code, reason);
                }
            }
        }
    }

    /// The link went down before Redis answered an inbox command.
    pub(super) fn inbox_wait_lost(&mut self, wait: InboxWait) {
        match wait {
            InboxWait::Stored(waits) => {
                for w in waits {
                    if self
                        .sessions
                        .get(w.conn.0)
                        .is_some_and(|s| s.serial == w.serial)
                    {
                        let reason = "the cluster link went down before Redis answered: the \
                                      message may or may not be stored; send it again (with \
                                      DEDUP)";
                        let code = ErrorCode::ClusterUnavailable;
                        self.reply_error(w.conn, w.msg_id, w.target, code, reason);
                    }
                }
            }
            InboxWait::Synced {
                conn,
                serial,
                msg_id,
            } => self.answer_sync(conn, serial, msg_id, None),
            InboxWait::Fetched { conn, serial, .. } => self.take_fetched(conn, serial, 0, None),
            InboxWait::Acked { conn, serial } => self.inbox_ack_answered(conn, serial),
            InboxWait::Epoch => {}
        }
    }

    /// Redis's answer to an inbox command.
    pub(super) fn handle_inbox_reply(
        &mut self,
        wait: InboxWait,
        reply: ClusterReply,
        now: Instant,
    ) {
        match wait {
            InboxWait::Stored(waits) => {
                // One answer per message, in order; an error answers them all.
                let n = waits.len();
                let answers = match store_answers(reply, n) {
                    Ok(answers) => answers,
                    Err(other) => vec![other; n],
                };
                for (w, answer) in waits.into_iter().zip(answers) {
                    self.answer_stored(w, answer, now);
                }
            }
            InboxWait::Synced {
                conn,
                serial,
                msg_id,
            } => self.answer_sync(conn, serial, msg_id, Some(reply)),
            InboxWait::Fetched {
                conn,
                serial,
                known,
            } => self.take_fetched(conn, serial, known, Some(reply)),
            InboxWait::Epoch => self.check_epoch(reply, now),
            InboxWait::Acked { conn, serial } => {
                if let ClusterReply::Error(e) = reply {
                    warn!("cluster: Redis refused an INBOX_ACK: {e}");
                }
                self.inbox_ack_answered(conn, serial);
            }
        }
    }

    fn answer_stored(&mut self, w: StoredWait, reply: ClusterReply, now: Instant) {
        let StoredWait {
            conn,
            serial,
            msg_id,
            target,
            ack,
        } = w;
        let Some(sender) = self
            .sessions
            .get(conn.0)
            .filter(|s| s.serial == serial)
            .map(|s| s.logged_in_as)
        else {
            return; // the sender is gone; a resend is answered from Redis
        };
        let h = Header {
            len: 0,
            opcode: Opcode::Send as u8,
            flags: if ack {
                Flags::STORED
            } else {
                Flags::STORED.union(Flags::NO_ACK)
            },
            msg_id,
            target,
            source: UserId::NONE,
        };
        let code = ErrorCode::ClusterUnavailable;
        let items = match reply {
            ClusterReply::Array(items) => items,
            ClusterReply::Error(e) if e.starts_with("OOM") => {
                let reason = "the cluster's store (Redis) is out of memory; not stored";
                self.reply_error(conn, msg_id, target, ErrorCode::InboxFull, reason);
                return;
            }
            other => {
                let reason = format!("Redis did not store the message: {other:?}");
                self.reply_error(conn, msg_id, target, code, &reason);
                return;
            }
        };
        let text = |v: Option<&ClusterReply>| match v {
            Some(ClusterReply::Bulk(Some(b))) => String::from_utf8_lossy(b).into_owned(),
            _ => String::new(),
        };
        match text(items.first()).as_str() {
            "ok" => {
                self.metrics.messages_stored += 1;
                let nodes = match items.get(3) {
                    Some(ClusterReply::Integer(n)) => u32::try_from(*n).unwrap_or(0),
                    _ => 0,
                };
                if ack {
                    // The count: the nodes the recipient was connected to.
                    self.queue_stored_ack(conn, msg_id, target, nodes);
                }
            }
            "dup" => {
                let value = text(items.get(1));
                let answer = match value.strip_prefix('r') {
                    Some(code) => code
                        .parse::<u16>()
                        .ok()
                        .and_then(ErrorCode::from_u16)
                        .map(super::dedup::refused),
                    None => value.parse::<u32>().ok(),
                };
                match answer {
                    Some(count) => {
                        self.dedup.record(sender, msg_id, count, now);
                        self.answer_resend(conn, &h, count);
                    }
                    None => self.answer_resend(conn, &h, super::dedup::PENDING),
                }
            }
            "full" => {
                let reason = text(items.get(1));
                self.reply_error(conn, msg_id, target, ErrorCode::InboxFull, &reason);
            }
            other => {
                let reason = format!("Redis answered the store with {other:?}");
                self.reply_error(conn, msg_id, target, code, &reason);
            }
        }
    }

    fn answer_sync(
        &mut self,
        conn: ConnId,
        serial: u64,
        msg_id: MessageId,
        reply: Option<ClusterReply>,
    ) {
        let Some(s) = self.sessions.get_mut(conn.0).filter(|s| s.serial == serial) else {
            return;
        };
        let State::Active(user) = s.state else {
            return;
        };
        s.extra_mut().cluster_inbox.syncing = false;
        let numbers = match &reply {
            Some(ClusterReply::Array(items)) => items
                .iter()
                .map(|v| match v {
                    ClusterReply::Integer(n) => u64::try_from(*n).ok(),
                    ClusterReply::Bulk(Some(b)) => std::str::from_utf8(b).ok()?.parse().ok(),
                    _ => None,
                })
                .collect::<Option<Vec<u64>>>(),
            _ => None,
        };
        let Some(&[epoch, first_seq, last_seq, expired_upto, new_device, after]) =
            numbers.as_deref()
        else {
            let reason = match reply {
                None => "the cluster link went down before Redis answered; sync again".into(),
                Some(other) => format!("Redis did not sync the inbox: {other:?}"),
            };
            let code = ErrorCode::ClusterUnavailable;
            self.reply_error(conn, msg_id, UserId::NONE, code, &reason);
            return;
        };
        if let Some(c) = self.cluster.as_mut() {
            c.epoch.get_or_insert(epoch);
        }
        let state = InboxState {
            epoch,
            first_seq,
            last_seq,
            expired_upto,
        };
        self.queue_inbox_state(conn, msg_id, user, state, new_device == 1);
        if let Some(s) = self.sessions.get_mut(conn.0) {
            s.inbox_synced = true;
            s.inbox_pushed = after;
            let cursor = &mut s.extra_mut().cluster_inbox;
            cursor.known = cursor.known.max(last_seq);
        }
        self.fetch_inbox(conn, false);
    }

    /// Asks Redis for the next stored messages of a synced connection when it has room
    /// and is behind (or, `check`, to learn whether it missed any).
    pub(super) fn fetch_inbox(&mut self, id: ConnId, check: bool) {
        let cap = self.config.room_cap();
        let Some(s) = self.sessions.get_mut(id.0) else {
            return;
        };
        let State::Active(user) = s.state else {
            return;
        };
        if !s.inbox_synced || s.out.held() >= cap {
            return;
        }
        let (serial, after) = (s.serial, s.inbox_pushed);
        let cursor = &mut s.extra_mut().cluster_inbox;
        if cursor.fetching || (!check && cursor.known <= after) {
            return;
        }
        let Some(c) = self.cluster.as_mut().filter(|c| c.can_publish()) else {
            return; // fetched again once the subscription is confirmed
        };
        cursor.fetching = true;
        let known = cursor.known;
        c.command(
            ClusterOp::Inbox(InboxOp::Fetch { user, after }),
            Pending::Inbox(InboxWait::Fetched {
                conn: id,
                serial,
                known,
            }),
        );
    }

    /// A fetch's answer. A short answer (less than a batch) also says that every number
    /// up to `known_then` it did not hold is gone (acknowledged or expired): Redis had them
    /// all before it ran the fetch. Numbers learnt since (a notice that overtook this
    /// answer on the other connection) are fetched again, never assumed gone.
    fn take_fetched(
        &mut self,
        id: ConnId,
        serial: u64,
        known_then: u64,
        reply: Option<ClusterReply>,
    ) {
        let Some(s) = self.sessions.get_mut(id.0).filter(|s| s.serial == serial) else {
            return;
        };
        s.extra_mut().cluster_inbox.fetching = false;
        let entries = match reply {
            Some(ClusterReply::Array(entries)) => entries,
            None => return, // fetched again once the link is up and subscribed
            Some(other) => {
                warn!("cluster: Redis refused a fetch of stored messages: {other:?}");
                return;
            }
        };
        let short = entries.len() < super::FETCH_BATCH;
        for entry in entries {
            let Some((frame, origin)) = stream_entry(entry) else {
                warn!("cluster: a stored message in Redis that is not one");
                continue;
            };
            self.push_stored(id, frame, origin);
        }
        let Some(s) = self.sessions.get_mut(id.0) else {
            return;
        };
        if short && known_then > s.inbox_pushed {
            // Gone from the stream (acknowledged or expired) before this connection got
            // them: nothing more to send up to there.
            s.inbox_pushed = known_then;
        }
        let pushed = s.inbox_pushed;
        let cursor = &mut s.extra_mut().cluster_inbox;
        cursor.known = cursor.known.max(pushed);
        self.fetch_inbox(id, false);
    }

    /// Queues a stored message (the next after `inbox_pushed`) to a connection; a copy
    /// from its own device is skipped.
    fn push_stored(&mut self, id: ConnId, frame: Bytes, origin: u64) {
        let Some(seq) = stored_seq(&frame) else {
            return;
        };
        let Some(s) = self.sessions.get_mut(id.0) else {
            return;
        };
        if seq <= s.inbox_pushed {
            return;
        }
        s.inbox_pushed = seq;
        if origin == s.device {
            return;
        }
        self.metrics.count_out(&frame, 1);
        push_output(s, &mut self.flush_list, id, frame);
        self.work += 1;
    }

    /// A notice from Redis: message `seq` of `user`'s inbox (or a copy from `origin`).
    /// Pushed to each synced connection for which it is the next and that has room; the
    /// others fetch.
    pub(super) fn handle_stored_notice(&mut self, user: UserId, payload: Bytes) {
        if payload.len() < 8 {
            self.cluster_notice_refused();
            return;
        }
        let origin = u64::from_be_bytes(payload[..8].try_into().unwrap_or_default());
        let mut frames = payload.slice(8..);
        // Checked whole (one store's messages, in order) before any is pushed.
        let mut check = frames.clone();
        while !check.is_empty() {
            let frame = super::cluster::next_frame(&mut check);
            let ok = frame.is_some_and(|f| {
                f.len() >= HEADER_LEN + 16 && Header::read(&f).opcode == Opcode::InboxDeliver as u8
            });
            if !ok {
                self.cluster_notice_refused();
                return;
            }
        }
        while let Some(frame) = super::cluster::next_frame(&mut frames) {
            self.stored_notice_frame(user, origin, frame);
        }
    }

    /// One message of a notice: pushed where it is the next, fetched elsewhere.
    fn stored_notice_frame(&mut self, user: UserId, origin: u64, frame: Bytes) {
        let Some(seq) = stored_seq(&frame) else {
            return;
        };
        self.metrics.cluster_messages_in += 1;
        let cap = self.config.room_cap();
        for i in 0..self.directory.devices(user).len() {
            let id = self.directory.devices(user)[i];
            let Some(s) = self.sessions.get_mut(id.0) else {
                continue;
            };
            let synced = s.inbox_synced;
            let next = seq == s.inbox_pushed + 1;
            let room = s.out.held() < cap;
            let cursor = &mut s.extra_mut().cluster_inbox;
            cursor.known = cursor.known.max(seq);
            if !synced {
                continue; // its sync's answer, or a fetch after it, covers this
            }
            if next && room && !cursor.fetching {
                self.push_stored(id, frame.clone(), origin);
            } else {
                self.fetch_inbox(id, false);
            }
        }
    }

    fn cluster_notice_refused(&mut self) {
        self.metrics.cluster_messages_refused += 1;
        warn!("cluster: ignored a stored-message notice that is not one");
    }

    /// The store's epoch, asked at every link up: when Redis lost the inboxes (a restart
    /// without persistence), the epoch is new, and every synced connection is closed so
    /// its client syncs again from the start.
    fn check_epoch(&mut self, reply: ClusterReply, now: Instant) {
        let epoch = match reply {
            ClusterReply::Bulk(Some(b)) => std::str::from_utf8(&b)
                .ok()
                .and_then(|s| s.parse::<u64>().ok()),
            _ => None,
        };
        let Some(epoch) = epoch else {
            return;
        };
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        let old = c.epoch.replace(epoch);
        if old.is_none_or(|old| old == epoch) {
            return;
        }
        let synced: Vec<ConnId> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.inbox_synced && matches!(s.state, State::Active(_)))
            .map(|(i, _)| ConnId(i))
            .collect();
        info!(
            "cluster: the store's epoch changed (Redis lost the inboxes); closing {} so \
             their clients sync again",
            super::counted(synced.len(), "synced connection", "synced connections")
        );
        for id in synced {
            let reason = "the cluster's store was reset; log in and sync again";
            self.fail(id, ErrorCode::ClusterUnavailable, reason, now);
        }
    }
}

/// The answer of `imrelay_store` to `n` messages (`{epoch, nodes}`, then per message its
/// seq, `{'dup', value}` or `{'full', reason}`), as one answer per message: `{'ok', epoch,
/// seq, nodes}` for a stored one, the others as they are. `Err`: not such an answer (an
/// error, which answers every message).
pub fn store_answers(reply: ClusterReply, n: usize) -> Result<Vec<ClusterReply>, ClusterReply> {
    let ClusterReply::Array(mut items) = reply else {
        return Err(reply);
    };
    if items.len() != n + 2 {
        return Err(ClusterReply::Array(items));
    }
    let rest = items.split_off(2);
    let nodes = items.pop().unwrap_or(ClusterReply::Integer(0));
    let epoch = items.pop().unwrap_or(ClusterReply::Bulk(None));
    Ok(rest
        .into_iter()
        .map(|item| match item {
            ClusterReply::Integer(seq) => ClusterReply::Array(vec![
                ClusterReply::Bulk(Some(Bytes::from_static(b"ok"))),
                epoch.clone(),
                ClusterReply::Integer(seq),
                nodes.clone(),
            ]),
            other => other,
        })
        .collect())
}

/// The sequence number of an INBOX_DELIVER frame.
fn stored_seq(frame: &[u8]) -> Option<u64> {
    let bytes = frame.get(HEADER_LEN..HEADER_LEN + 8)?;
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

/// One stream entry of an inbox (`[id, [f, frame, o, origin, t, ms]]`): its frame and
/// origin device.
fn stream_entry(entry: ClusterReply) -> Option<(Bytes, u64)> {
    let ClusterReply::Array(mut parts) = entry else {
        return None;
    };
    let ClusterReply::Array(fields) = parts.pop()? else {
        return None;
    };
    let mut frame = None;
    let mut origin = None;
    let mut fields = fields.into_iter();
    while let (Some(ClusterReply::Bulk(Some(name))), Some(ClusterReply::Bulk(Some(value)))) =
        (fields.next(), fields.next())
    {
        match name.as_ref() {
            b"f" => frame = Some(value),
            b"o" => origin = value.as_ref().try_into().ok().map(u64::from_be_bytes),
            _ => {}
        }
    }
    let frame = frame?;
    let ok = frame.len() >= HEADER_LEN + 16
        && Header::read(&frame).opcode == Opcode::InboxDeliver as u8
        && Header::read(&frame).len as usize == frame.len();
    ok.then_some((frame, origin?))
}
