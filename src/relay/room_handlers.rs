//! Live rooms: JOIN, LEAVE, ROOM_INFO, ROOM_SEND fan-out, admin BROADCAST, and the
//! drop-and-count rule for slow members (protocol.md, "Rooms").
//!
//! Fan-out encodes the ROOM_DELIVER once (the ROOM_SEND rewritten in place) and pushes a
//! clone of that one `Bytes` onto each member's queue: per member, a capacity check and a
//! queue push. No per-member copy, no scan over connections that are not members (except
//! BROADCAST, which is addressed to everyone by definition).

use std::time::Instant;

use bytes::Bytes;
use log::debug;
use slab::Slab;

use super::auth_handlers::Permission;
use super::cluster::{self, Channel};
use super::out_queue::FlushList;
use super::session::{Session, State};
use super::{push_output, OutQueue, Relay};
use crate::proto::frame::{write_ack, write_frame};
use crate::proto::{
    ErrorCode, Flags, Header, MessageId, Opcode, RawFrame, RoomId, RoomState, UserId,
};
use crate::ConnId;

impl Relay {
    pub(super) fn on_join(&mut self, id: ConnId, h: &Header, payload_len: usize) {
        if self
            .check_bare_request(id, h, payload_len, "JOIN")
            .is_none()
        {
            return;
        }
        let room = RoomId(h.target.0);
        if !self.permits(id, Permission::Join(room.0)) {
            let reason = format!("the login token does not grant {room}");
            self.reply_error(id, h.msg_id, h.target, ErrorCode::Forbidden, &reason);
            return;
        }
        let Some(s) = self.sessions.get_mut(id.0) else {
            return;
        };
        if !s.rooms.contains(&room) {
            let limit = if s.rooms.len() >= self.config.max_rooms_per_connection {
                Some(format!(
                    "this connection is already in {} rooms (max rooms per connection)",
                    s.rooms.len()
                ))
            } else if self.rooms.count(room) >= self.config.max_members_per_room {
                Some(format!(
                    "{room} is full ({} members)",
                    self.config.max_members_per_room
                ))
            } else {
                None
            };
            if let Some(reason) = limit {
                self.reply_error(id, h.msg_id, h.target, ErrorCode::LimitReached, &reason);
                return;
            }
            s.rooms.push(room);
            self.rooms.join(room, id);
            if self.rooms.count(room) == 1 {
                cluster::subscribe(&mut self.cluster, Channel::Room(room));
            }
            cluster::room_count_changed(&mut self.cluster, room);
            debug!("{}: joined {room}", s.label());
        }
        self.reply_room_state(id, h.msg_id, room);
    }

    pub(super) fn on_leave(&mut self, id: ConnId, h: &Header, payload_len: usize) {
        if self
            .check_bare_request(id, h, payload_len, "LEAVE")
            .is_none()
        {
            return;
        }
        let room = RoomId(h.target.0);
        if let Some(s) = self.sessions.get_mut(id.0) {
            if let Some(at) = s.rooms.iter().position(|r| *r == room) {
                s.rooms.swap_remove(at);
                self.rooms.leave(room, id);
                if self.rooms.count(room) == 0 {
                    cluster::unsubscribe(&mut self.cluster, Channel::Room(room));
                }
                cluster::room_count_changed(&mut self.cluster, room);
                debug!("{}: left {room}", s.label());
            }
        }
        self.reply_room_state(id, h.msg_id, room);
    }

    pub(super) fn on_room_info(&mut self, id: ConnId, h: &Header, payload_len: usize) {
        if self
            .check_bare_request(id, h, payload_len, "ROOM_INFO")
            .is_none()
        {
            return;
        }
        self.reply_room_state(id, h.msg_id, RoomId(h.target.0));
    }

    pub(super) fn on_room_send(&mut self, id: ConnId, frame: RawFrame<'_>, now: Instant) {
        let h = *frame.header();
        let Some(sender) = self.check_request(id, &h, Flags::NO_ACK, "ROOM_SEND") else {
            return;
        };
        let room = RoomId(h.target.0);
        let Some(s) = self.sessions.get_mut(id.0) else {
            return;
        };
        if !s.rooms.contains(&room) {
            let reason = format!("join {room} before sending to it");
            self.reply_error(id, h.msg_id, h.target, ErrorCode::NotInRoom, &reason);
            return;
        }
        if !self.permits(id, Permission::SendToRoom(room.0)) {
            let reason = format!("the login token does not grant sending to {room}");
            self.reply_error(id, h.msg_id, h.target, ErrorCode::Forbidden, &reason);
            return;
        }
        if !self.take_room_token(id, &h, now) {
            return;
        }
        let (rate, burst) = (self.config.room_total_rate, self.config.room_total_burst);
        if !self.rooms.take_send_token(room, now, rate, burst) {
            let reason = format!("{room} is over {rate} messages per second from all its members");
            self.reply_error(id, h.msg_id, h.target, ErrorCode::RateLimited, &reason);
            return;
        }
        // Encoded once, in an allocation of its own that every member's queue shares.
        let deliver = frame.rewritten(Opcode::RoomDeliver, h.target, sender);
        self.publish_room_traffic(Channel::Room(room), &deliver);
        let (queued, dropped) = self.fan_out(room, deliver, Some(id));
        self.finish_fanout(id, &h, queued, dropped);
    }

    pub(super) fn on_broadcast(&mut self, id: ConnId, frame: RawFrame<'_>, now: Instant) {
        let h = *frame.header();
        let Some(sender) = self.check_targetless_request(id, &h, Flags::NO_ACK, "BROADCAST") else {
            return;
        };
        if !self.permits(id, Permission::Broadcast) {
            let reason = format!("{sender} is not an admin");
            self.reply_error(id, h.msg_id, h.target, ErrorCode::Forbidden, &reason);
            return;
        }
        if !self.take_room_token(id, &h, now) {
            return;
        }
        let deliver = frame.rewritten(Opcode::RoomDeliver, UserId::NONE, sender);
        self.publish_room_traffic(Channel::All, &deliver);
        let (queued, dropped) = self.fan_out(RoomId::ALL, deliver, Some(id));
        self.finish_fanout(id, &h, queued, dropped);
    }

    /// Queues the ROOM_DELIVER `frame` to every member of `room` but `sender` (to every
    /// logged-in connection for [`RoomId::ALL`], a broadcast: a scan of the connections,
    /// by definition), under the slow-member rule; counts what was dropped. Returns
    /// (queued, dropped).
    pub(super) fn fan_out(
        &mut self,
        room: RoomId,
        frame: Bytes,
        sender: Option<ConnId>,
    ) -> (u64, u64) {
        let everyone: Vec<ConnId> = if room == RoomId::ALL {
            self.sessions
                .iter()
                .filter(|(_, s)| matches!(s.state, State::Active(_)))
                .map(|(key, _)| ConnId(key))
                .collect()
        } else {
            Vec::new()
        };
        let len = frame.len();
        let budget = self.room_budget();
        let fanout = Fanout {
            sessions: &mut self.sessions,
            flush_list: &mut self.flush_list,
            cap: self.config.room_cap(),
            budget,
            room,
            frame,
            sender: sender.unwrap_or(ConnId(usize::MAX)),
        };
        let (queued, dropped) = if room == RoomId::ALL {
            fanout.deliver(everyone.into_iter())
        } else {
            let (queued, dropped) = fanout.deliver(self.rooms.members(room).iter().copied());
            self.rooms.count_dropped(room, dropped);
            (queued, dropped)
        };
        self.metrics
            .count_frames_out(Opcode::RoomDeliver as u8, len, queued);
        (queued, dropped)
    }

    /// Cluster mode: room traffic (a ROOM_DELIVER or broadcast, encoded once) goes to the
    /// other nodes too. While the link is down it reaches this node's members only.
    fn publish_room_traffic(&mut self, channel: Channel, deliver: &Bytes) {
        if let Some(c) = self.cluster.as_mut().filter(|c| c.can_publish()) {
            c.publish(channel, deliver, None);
            self.metrics.cluster_messages_out += 1;
        }
    }

    /// Sends ROOM_MISSED for every room that dropped messages for `id`. Called when the
    /// connection's output has drained.
    pub(super) fn report_missed(&mut self, id: ConnId) {
        let Some(s) = self.sessions.get_mut(id.0) else {
            return;
        };
        let missed = std::mem::take(&mut s.missed);
        for (room, count) in missed {
            debug!(
                "{}: missed {} of {room}",
                self.conn_label(id),
                super::counted(count, "message", "messages")
            );
            write_frame(
                self.scratch(),
                Opcode::RoomMissed,
                Flags::EMPTY,
                MessageId(0),
                UserId(room.0),
                UserId::NONE,
                &count.to_be_bytes(),
            );
            self.queue_scratch(id);
        }
    }

    fn take_room_token(&mut self, id: ConnId, h: &Header, now: Instant) -> bool {
        let (rate, burst) = (self.config.room_send_rate, self.config.room_send_burst);
        let Some(s) = self.sessions.get_mut(id.0) else {
            return false;
        };
        if s.room_rate.try_take(now, rate, burst) {
            return true;
        }
        let reason = format!("over {rate} room messages per second");
        self.reply_error(id, h.msg_id, h.target, ErrorCode::RateLimited, &reason);
        false
    }

    /// What room traffic may still add to the relay's memory: it stops at half the memory
    /// budget, as it stops at half each member's output cap, so a room flood never makes a
    /// direct message fail.
    fn room_budget(&self) -> usize {
        (self.config.max_memory / 2).saturating_sub(self.memory_held())
    }

    fn finish_fanout(&mut self, id: ConnId, h: &Header, queued: u64, dropped: u64) {
        self.work += usize::try_from(queued + dropped).unwrap_or(usize::MAX);
        self.metrics.room_messages += 1;
        self.metrics.room_deliveries_queued += queued;
        self.metrics.room_deliveries_dropped += dropped;
        if !h.flags.contains(Flags::NO_ACK) {
            let count = u32::try_from(queued).unwrap_or(u32::MAX);
            write_ack(self.scratch(), h.msg_id, h.target, count);
            self.queue_scratch(id);
        }
    }

    fn reply_room_state(&mut self, id: ConnId, msg_id: MessageId, room: RoomId) {
        // Cluster mode: the count waits for the other nodes' (cluster_handlers.rs).
        if self.defer_room_state(id, msg_id, room) {
            return;
        }
        self.write_room_state(id, msg_id, room, 0);
    }

    /// Queues ROOM_STATE for `room` to `id`: this node's members plus `elsewhere`.
    pub(super) fn write_room_state(
        &mut self,
        id: ConnId,
        msg_id: MessageId,
        room: RoomId,
        elsewhere: u64,
    ) {
        let members = (self.rooms.count(room) as u64).saturating_add(elsewhere);
        let is_member = self
            .sessions
            .get(id.0)
            .is_some_and(|s| s.rooms.contains(&room));
        let state = RoomState {
            members: u32::try_from(members).unwrap_or(u32::MAX),
            is_member,
        };
        write_frame(
            self.scratch(),
            Opcode::RoomState,
            Flags::EMPTY,
            msg_id,
            UserId(room.0),
            UserId::NONE,
            &state.to_bytes(),
        );
        self.queue_scratch(id);
    }
}

/// One room message on its way to many connections.
struct Fanout<'a> {
    sessions: &'a mut Slab<Session>,
    flush_list: &'a mut FlushList,
    /// Room traffic is dropped for a member whose queue would pass this.
    cap: usize,
    /// What is left of the relay's memory budget: members past it are dropped too.
    budget: usize,
    room: RoomId,
    frame: Bytes,
    /// The sending connection, which gets an ACK instead of a copy.
    sender: ConnId,
}

impl Fanout<'_> {
    /// Queues the frame to each member but the sender; a member past the cap gets nothing
    /// and the miss is counted. Returns (queued, dropped).
    fn deliver(self, members: impl Iterator<Item = ConnId>) -> (u64, u64) {
        let (mut queued, mut dropped) = (0, 0);
        let cost = OutQueue::cost(self.frame.len());
        let mut budget = self.budget;
        for member in members {
            if member == self.sender {
                continue;
            }
            let Some(s) = self.sessions.get_mut(member.0) else {
                continue;
            };
            if s.out.held() + cost > self.cap || budget < cost {
                s.count_missed(self.room);
                dropped += 1;
            } else {
                push_output(s, self.flush_list, member, self.frame.clone());
                budget -= cost;
                queued += 1;
            }
        }
        (queued, dropped)
    }
}
