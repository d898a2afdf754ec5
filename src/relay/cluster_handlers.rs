//! The relay's cluster calls (see `cluster.rs`): what the driver reports from Redis, and
//! what the core asks of it.

use bytes::Bytes;
use log::{debug, info, warn};

use std::time::Instant;

use bytes::BytesMut;

use super::cluster::{
    next_frame, split_message, Channel, Cluster, ClusterOp, ClusterReply, DedupClaim, DeferredSend,
    Pending, PendingSend,
};
use super::cluster_inbox::{InboxOp, InboxWait, STORED_NOTICE};
use super::dedup::refused;
use super::{push_output, OutQueue, Relay};
use crate::proto::frame::write_ack;
use crate::proto::{ErrorCode, Flags, Header, MessageId, Opcode, RawFrame, RoomId};
use crate::ConnId;

impl Relay {
    /// Turns cluster mode on, as node `node` (an id unique among the nodes: the driver
    /// draws it at random). The link starts down: call [`Relay::handle_cluster_up`] once
    /// it is connected.
    pub fn enable_cluster(&mut self, node: u64) {
        // Two ids are not a node's: STORED_NOTICE marks Redis's own notices, and 0 is not
        // a valid epoch (a node's id names the store's epoch when it is the first).
        let node = match node {
            0 | STORED_NOTICE => 1,
            node => node,
        };
        self.cluster = Some(Cluster::new(node));
    }

    /// `Some(up)` in cluster mode: whether the link to Redis is up.
    pub fn cluster_link_up(&self) -> Option<bool> {
        self.cluster.as_ref().map(|c| c.up)
    }

    /// Moves what this turn asks of Redis into `out`, in order: first this node's room
    /// counts that changed.
    pub fn take_cluster_ops(&mut self, out: &mut Vec<ClusterOp>) {
        let Some(c) = &mut self.cluster else {
            return;
        };
        if !c.dirty_rooms.is_empty() {
            let mut dirty = std::mem::take(&mut c.dirty_rooms);
            dirty.sort_unstable_by_key(|r| r.0);
            dirty.dedup();
            for room in dirty {
                let count = self.rooms.count(room);
                let node = c.node;
                c.command(
                    ClusterOp::SetRoomCount { room, node, count },
                    Pending::Nothing,
                );
            }
        }
        c.take_ops(out);
    }

    /// Writes this node's member count of every room it has members in to Redis again:
    /// each expires after [`ROOM_COUNT_TTL_MS`](super::cluster::ROOM_COUNT_TTL_MS) unless
    /// refreshed. The driver calls it every
    /// [`ROOM_COUNT_REFRESH`](super::cluster::ROOM_COUNT_REFRESH).
    pub fn refresh_cluster_rooms(&mut self) {
        if let Some(c) = self.cluster.as_mut().filter(|c| c.up) {
            c.dirty_rooms.extend(self.rooms.ids());
        }
    }

    /// Cluster mode with the link up: ROOM_STATE for `room` waits for the other nodes'
    /// count. False when it can be answered now (this node's count only).
    pub(super) fn defer_room_state(&mut self, id: ConnId, msg_id: MessageId, room: RoomId) -> bool {
        let Some(serial) = self.sessions.get(id.0).map(|s| s.serial) else {
            return false;
        };
        let Some(c) = self.cluster.as_mut().filter(|c| c.can_publish()) else {
            return false;
        };
        let node = c.node;
        c.command(
            ClusterOp::RoomCount { room, node },
            Pending::RoomState {
                conn: id,
                serial,
                msg_id,
                room,
            },
        );
        true
    }

    /// The link to Redis is up (again): subscribes to broadcasts and to every user and
    /// room this node holds.
    pub fn handle_cluster_up(&mut self) {
        let Some(c) = &mut self.cluster else {
            return;
        };
        c.up = true;
        for op in std::mem::take(&mut c.backlog) {
            c.command(op.clone(), Pending::DedupWrite(op));
        }
        // Did Redis keep the inboxes? (A new epoch: it lost them.)
        let candidate = c.epoch_candidate();
        c.command(
            ClusterOp::Inbox(InboxOp::Epoch { candidate }),
            Pending::Inbox(InboxWait::Epoch),
        );
        c.dirty_rooms.extend(self.rooms.ids());
        c.ops.push(ClusterOp::Subscribe(Channel::All));
        for user in self.directory.user_ids() {
            c.subscribe(Channel::User(user));
        }
        c.ops.extend(
            self.rooms
                .ids()
                .map(|r| ClusterOp::Subscribe(Channel::Room(r))),
        );
        info!(
            "cluster link up: subscribed to {} and {}",
            super::counted(self.directory.users(), "user", "users"),
            super::counted(self.rooms.len(), "room", "rooms")
        );
    }

    /// The link to Redis is down: nothing more is published until it is up again. SENDs
    /// still waiting for Redis's answer are answered from what this node knows: an ACK
    /// counting the local connections, or `CLUSTER_UNAVAILABLE` (the message may have
    /// reached other nodes before the link went down).
    pub fn handle_cluster_down(&mut self) {
        let Some(c) = &mut self.cluster else {
            return;
        };
        let pending = c.drop_all();
        let subscribing: Vec<_> = c.subscribing.drain().map(|(user, _)| user).collect();
        let waiting: usize = pending
            .iter()
            .map(|p| match p {
                Pending::Publish(sends) => sends.len(),
                Pending::Deferred(_) => 1,
                _ => 0,
            })
            .sum();
        if waiting > 0 {
            warn!(
                "cluster link down with {} waiting for Redis's answer",
                super::counted(waiting, "SEND", "SENDs")
            );
        }
        for p in pending {
            match p {
                Pending::Publish(sends) => {
                    for p in sends {
                        self.answer_pending(p, None);
                    }
                }
                Pending::Deferred(d) => self.refuse_deferred(d),
                Pending::RoomState {
                    conn,
                    serial,
                    msg_id,
                    room,
                } => self.answer_room_state(conn, serial, msg_id, room, 0),
                Pending::DedupWrite(op) => {
                    if let Some(c) = self.cluster.as_mut() {
                        if c.backlog.len() < super::cluster::MAX_PENDING {
                            c.backlog.push(op);
                        }
                    }
                }
                Pending::Inbox(wait) => self.inbox_wait_lost(wait),
                Pending::Nothing => {}
            }
        }
        self.cluster_inbox_down(subscribing);
    }

    /// Redis confirmed a SUBSCRIBE on the subscriber connection.
    pub fn handle_cluster_subscribed(&mut self, channel: &[u8]) {
        if let Some(Channel::User(user)) = Channel::parse(channel) {
            self.cluster_user_subscribed(user);
        }
    }

    /// Redis answered the oldest command not yet answered.
    pub fn handle_cluster_reply(&mut self, reply: ClusterReply, now: Instant) {
        let Some(c) = &mut self.cluster else {
            return;
        };
        let Some(pending) = c.pop_pending() else {
            warn!("cluster: an answer from Redis to no command");
            return;
        };
        match (pending, reply) {
            (Pending::Publish(sends), ClusterReply::Integer(receivers)) => {
                let receivers = u64::try_from(receivers).unwrap_or(0);
                for p in sends {
                    let others = receivers.saturating_sub(u64::from(p.self_counted));
                    self.answer_pending(p, Some(others));
                }
            }
            (Pending::Publish(sends), _) => {
                for p in sends {
                    self.answer_pending(p, None);
                }
            }
            (Pending::Deferred(d), reply) => self.resume_deferred(d, reply, now),
            (Pending::Inbox(wait), reply) => self.handle_inbox_reply(wait, reply, now),
            (
                Pending::RoomState {
                    conn,
                    serial,
                    msg_id,
                    room,
                },
                reply,
            ) => {
                let elsewhere = match reply {
                    ClusterReply::Integer(n) => u64::try_from(n).unwrap_or(0),
                    _ => 0,
                };
                self.answer_room_state(conn, serial, msg_id, room, elsewhere);
            }
            (Pending::Nothing | Pending::DedupWrite(_), _) => {}
        }
    }

    /// A SEND to hold until Redis answers, in cluster mode with the link up: a DEDUP SEND
    /// (its claim), or any SEND of a connection that has SENDs held already (a PING keeps
    /// its place). Returns false when the SEND may go on now; true when it is held, or
    /// refused because too much waits for Redis.
    pub(super) fn defer_for_cluster(&mut self, id: ConnId, frame: &RawFrame) -> bool {
        let h = *frame.header();
        let dedup = h.flags.contains(Flags::DEDUP);
        let Some(s) = self.sessions.get_mut(id.0) else {
            return true;
        };
        if !dedup && s.cluster_deferred == 0 {
            return false;
        }
        let serial = s.serial;
        let sender = s.user().unwrap_or(crate::proto::UserId::NONE);
        let ttl_ms = u64::try_from(self.config.dedup_ttl.as_millis()).unwrap_or(u64::MAX);
        let Some(c) = self.cluster.as_mut() else {
            return false;
        };
        if !c.can_publish() {
            let reason = c.unavailable_reason();
            self.refuse_cluster_unavailable(id, &h, reason);
            return true;
        }
        s.cluster_deferred += 1;
        let claim = dedup.then(|| c.new_claim(sender, h.msg_id));
        let op = match &claim {
            Some(claim) => ClusterOp::Claim {
                key: claim.key.clone(),
                token: claim.token.clone(),
                ttl_ms,
            },
            None => ClusterOp::Ping,
        };
        let held = DeferredSend {
            conn: id,
            serial,
            frame: BytesMut::from(frame.as_bytes()),
            claim,
        };
        c.command(op, Pending::Deferred(held));
        true
    }

    /// Redis answered a held SEND's claim (or PING): deliver it, or answer it as its first
    /// copy was answered.
    fn resume_deferred(&mut self, d: DeferredSend, reply: ClusterReply, now: Instant) {
        // A claim that made this node the first copy's sender: released if the SEND goes
        // no further (its sender gone, or refused), else handed on with the SEND.
        let claimed = match (&reply, &d.claim) {
            (ClusterReply::Bulk(None), Some(claim)) => Some(Box::new(claim.clone())),
            _ => None,
        };
        let sender = self
            .sessions
            .get_mut(d.conn.0)
            .filter(|s| s.serial == d.serial)
            .and_then(|s| {
                s.cluster_deferred = s.cluster_deferred.saturating_sub(1);
                s.user() // None while closing: its frames are no longer handled
            });
        let Some(sender) = sender else {
            self.release_claim(claimed);
            return;
        };
        let frame = RawFrame::new(&d.frame);
        let h = *frame.header();
        let first = match (&reply, &d.claim) {
            (ClusterReply::Simple, None) | (ClusterReply::Bulk(None), Some(_)) => true,
            (ClusterReply::Bulk(Some(_)), Some(_)) => false,
            _ => {
                let reason = format!("Redis refused the DEDUP claim: {reply:?}");
                self.refuse_cluster_unavailable(d.conn, &h, &reason);
                return;
            }
        };
        if first {
            self.route_send(d.conn, frame, sender, now, claimed);
            return;
        }
        // A resend: the key holds its first copy's answer.
        let ClusterReply::Bulk(Some(value)) = reply else {
            return;
        };
        let answer = std::str::from_utf8(&value)
            .ok()
            .and_then(|v| match v.strip_prefix('r') {
                Some(code) => code.parse::<u32>().ok().map(refused_code),
                None => v.parse::<u32>().ok(),
            });
        match answer {
            Some(count) => {
                self.dedup.record(sender, h.msg_id, count, now);
                self.answer_resend(d.conn, &h, count);
            }
            // "p…": the first copy is still on its way through some node.
            None => self.answer_resend(d.conn, &h, super::dedup::PENDING),
        }
    }

    fn answer_room_state(
        &mut self,
        conn: ConnId,
        serial: u64,
        msg_id: MessageId,
        room: RoomId,
        elsewhere: u64,
    ) {
        if self
            .sessions
            .get(conn.0)
            .is_some_and(|s| s.serial == serial)
        {
            self.write_room_state(conn, msg_id, room, elsewhere);
        }
    }

    /// Answers the SEND `h` from `id` with CLUSTER_UNAVAILABLE.
    pub(super) fn refuse_cluster_unavailable(&mut self, id: ConnId, h: &Header, reason: &str) {
        let code = ErrorCode::ClusterUnavailable;
        self.reply_error(id, h.msg_id, h.target, code, reason);
    }

    /// A held SEND when the link went down: not delivered, refused.
    fn refuse_deferred(&mut self, d: DeferredSend) {
        // Redis may have taken the claim before the link went down: released (once the
        // link is up again) if it still holds this claim's token.
        self.release_claim(d.claim.map(Box::new));
        let Some(s) = self
            .sessions
            .get_mut(d.conn.0)
            .filter(|s| s.serial == d.serial)
        else {
            return;
        };
        s.cluster_deferred = s.cluster_deferred.saturating_sub(1);
        let h = Header::read(&d.frame);
        let reason = "the cluster link went down before the message could be sent";
        self.refuse_cluster_unavailable(d.conn, &h, reason);
    }

    /// The answer to a SEND that waited for the cluster: `other_nodes` is how many other
    /// nodes hold the recipient (`None`: unknown, the link went down).
    fn answer_pending(&mut self, p: PendingSend, other_nodes: Option<u64>) {
        let target = p.target;
        let others = u32::try_from(other_nodes.unwrap_or(0)).unwrap_or(u32::MAX);
        let count = p.local.saturating_add(others);
        let lost = other_nodes.is_none() && p.local == 0;
        let offline = other_nodes == Some(0) && p.local == 0;
        // The DEDUP memory (here and in Redis) first, even when the sender is gone: a
        // resend through any node must find the answer, or be sent again.
        if let Some((sender, claim)) = p.dedup.clone() {
            let key = claim.key.clone();
            let ttl_ms = self.dedup_ttl_ms();
            let op = if lost {
                // Maybe delivered, maybe not: a resend is sent again.
                self.dedup.forget(sender, p.msg_id);
                ClusterOp::Forget {
                    key,
                    token: claim.token,
                }
            } else if offline {
                let code = ErrorCode::RecipientOffline;
                self.dedup.set_count(sender, p.msg_id, refused(code));
                let value = format!("r{}", code as u16);
                ClusterOp::Remember { key, value, ttl_ms }
            } else {
                self.dedup.set_count(sender, p.msg_id, count);
                let value = count.to_string();
                ClusterOp::Remember { key, value, ttl_ms }
            };
            if let Some(c) = self.cluster.as_mut() {
                c.write_dedup(op);
            }
        }
        if self
            .sessions
            .get(p.conn.0)
            .is_none_or(|s| s.serial != p.serial)
        {
            return; // the sender is gone
        }
        if lost {
            let code = ErrorCode::ClusterUnavailable;
            let reason = "the cluster link went down before Redis answered";
            self.reply_error(p.conn, p.msg_id, target, code, reason);
        } else if offline {
            let reason = format!("{target} is not connected to any node");
            let code = ErrorCode::RecipientOffline;
            self.reply_error(p.conn, p.msg_id, target, code, &reason);
        } else if p.ack {
            write_ack(self.scratch(), p.msg_id, target, count);
            self.queue_scratch(p.conn);
        }
    }

    /// The DEDUP time to live, in milliseconds (the keys' in Redis).
    fn dedup_ttl_ms(&self) -> u64 {
        u64::try_from(self.config.dedup_ttl.as_millis()).unwrap_or(u64::MAX)
    }

    /// Gives up a DEDUP claim whose SEND was not sent (refused, or its sender gone): a
    /// resend through any node is sent again.
    pub(super) fn release_claim(&mut self, claim: Option<Box<DedupClaim>>) {
        if let (Some(claim), Some(c)) = (claim, self.cluster.as_mut()) {
            c.write_dedup(ClusterOp::Forget {
                key: claim.key.clone(),
                token: claim.token.clone(),
            });
        }
    }

    /// A message another node published on `channel`: delivered to this node's
    /// connections of the user, members of the room, or everyone (a broadcast). Room
    /// traffic follows the slow-member rule of protocol.md section 7; a direct message to
    /// a connection past its output cap is dropped and counted (its sender was already
    /// answered by its own node).
    pub fn handle_cluster_message(&mut self, channel: &[u8], payload: &Bytes) {
        let Some(node) = self.cluster.as_ref().map(|c| c.node) else {
            return;
        };
        let Some(channel) = Channel::parse(channel) else {
            debug!("cluster: a message on a channel that is not ours");
            return;
        };
        let Some((from, mut frames)) = split_message(payload) else {
            self.cluster_message_refused("shorter than a node id");
            return;
        };
        if from == node {
            return; // our own, delivered here when it was sent
        }
        if from == STORED_NOTICE {
            match channel {
                Channel::User(user) => self.handle_stored_notice(user, frames),
                _ => self.cluster_message_refused("a stored-message notice off a user channel"),
            }
            return;
        }
        let expected = match channel {
            Channel::User(_) => Opcode::Deliver,
            Channel::Room(_) | Channel::All => Opcode::RoomDeliver,
        };
        // Checked whole (over a view of the same bytes) before any of it is delivered.
        let mut check = frames.clone();
        while !check.is_empty() {
            let Some(frame) = next_frame(&mut check) else {
                self.cluster_message_refused("not whole frames");
                return;
            };
            if Header::read(&frame).opcode != expected as u8 {
                self.cluster_message_refused("not a frame of its channel");
                return;
            }
        }
        while let Some(frame) = next_frame(&mut frames) {
            self.deliver_cluster_frame(channel, frame);
        }
    }

    /// One frame of a message from another node, to this node's recipients.
    fn deliver_cluster_frame(&mut self, channel: Channel, frame: Bytes) {
        self.metrics.cluster_messages_in += 1;
        match channel {
            Channel::User(user) => self.deliver_from_cluster(user, frame),
            Channel::Room(room) => {
                let (queued, dropped) = self.fan_out(room, frame, None);
                self.count_cluster_fanout(queued, dropped);
            }
            Channel::All => {
                let (queued, dropped) = self.fan_out(RoomId::ALL, frame, None);
                self.count_cluster_fanout(queued, dropped);
            }
        }
    }

    fn deliver_from_cluster(&mut self, user: crate::proto::UserId, frame: Bytes) {
        let cap = self.config.out_cap;
        let cost = OutQueue::cost(frame.len());
        let mut budget = self.config.max_memory.saturating_sub(self.memory_held());
        for &device in self.directory.devices(user) {
            let Some(s) = self.sessions.get_mut(device.0) else {
                continue;
            };
            if s.out.held() + cost > cap || cost > budget {
                self.metrics.cluster_deliveries_dropped += 1;
                debug!("{}: dropped a DELIVER from the cluster (slow)", s.label());
                continue;
            }
            push_output(s, &mut self.flush_list, device, frame.clone());
            self.metrics.count_out(&frame, 1);
            budget -= cost;
            self.metrics.deliveries_queued += 1;
            self.work += 1;
        }
    }

    fn count_cluster_fanout(&mut self, queued: u64, dropped: u64) {
        self.work += usize::try_from(queued + dropped).unwrap_or(usize::MAX);
        self.metrics.room_deliveries_queued += queued;
        self.metrics.room_deliveries_dropped += dropped;
    }

    fn cluster_message_refused(&mut self, why: &str) {
        self.metrics.cluster_messages_refused += 1;
        warn!("cluster: ignored a message {why}");
    }
}

/// The value the local DEDUP memory keeps for a refusal with error `code`.
fn refused_code(code: u32) -> u32 {
    u16::try_from(code)
        .ok()
        .and_then(ErrorCode::from_u16)
        .map_or(refused(ErrorCode::RecipientOffline), refused)
}
