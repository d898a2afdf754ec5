//! The relay's cluster calls (see `cluster.rs`): what the driver reports from Redis, and
//! what the core asks of it.

use bytes::Bytes;
use log::{debug, info, warn};

use super::cluster::{split_message, Channel, Cluster, ClusterOp, PendingSend};
use super::{push_output, OutQueue, Relay};
use crate::proto::frame::write_ack;
use crate::proto::{ErrorCode, Header, Opcode, HEADER_LEN};
use crate::ConnId;

impl Relay {
    /// Turns cluster mode on, as node `node` (an id unique among the nodes: the driver
    /// draws it at random). The link starts down: call [`Relay::handle_cluster_up`] once
    /// it is connected.
    pub fn enable_cluster(&mut self, node: u64) {
        self.cluster = Some(Cluster::new(node));
    }

    /// `Some(up)` in cluster mode: whether the link to Redis is up.
    pub fn cluster_link_up(&self) -> Option<bool> {
        self.cluster.as_ref().map(|c| c.up)
    }

    /// Moves what this turn asks of Redis into `out`, in order.
    pub fn take_cluster_ops(&mut self, out: &mut Vec<ClusterOp>) {
        if let Some(c) = &mut self.cluster {
            out.append(&mut c.ops);
        }
    }

    /// The link to Redis is up (again): subscribes to broadcasts and to every user and
    /// room this node holds.
    pub fn handle_cluster_up(&mut self) {
        let Some(c) = &mut self.cluster else {
            return;
        };
        c.up = true;
        c.ops.push(ClusterOp::Subscribe(Channel::All));
        c.ops.extend(
            self.directory
                .user_ids()
                .map(|u| ClusterOp::Subscribe(Channel::User(u))),
        );
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
        c.up = false;
        c.ops.clear();
        let pending: Vec<PendingSend> = c.pending.drain(..).flatten().collect();
        if !pending.is_empty() {
            warn!(
                "cluster link down with {} waiting for Redis's answer",
                super::counted(pending.len(), "SEND", "SENDs")
            );
        }
        for p in pending {
            self.answer_pending(p, None);
        }
    }

    /// Redis answered the oldest PUBLISH not yet answered: `receivers` nodes got it.
    pub fn handle_cluster_published(&mut self, receivers: u64) {
        let Some(c) = &mut self.cluster else {
            return;
        };
        if let Some(Some(p)) = c.pending.pop_front() {
            let others = receivers.saturating_sub(u64::from(p.self_counted));
            self.answer_pending(p, Some(others));
        }
    }

    /// The answer to a SEND that waited for the cluster: `other_nodes` is how many other
    /// nodes hold the recipient (`None`: unknown, the link went down).
    fn answer_pending(&mut self, p: PendingSend, other_nodes: Option<u64>) {
        if self
            .sessions
            .get(p.conn.0)
            .is_none_or(|s| s.serial != p.serial)
        {
            return; // the sender is gone
        }
        let target = p.target;
        match other_nodes {
            None if p.local == 0 => {
                if let Some(sender) = p.dedup {
                    // Maybe delivered, maybe not: a resend is sent again.
                    self.dedup.forget(sender, p.msg_id);
                }
                let reason = "the cluster link went down before Redis answered";
                self.reply_error(
                    p.conn,
                    p.msg_id,
                    target,
                    ErrorCode::ClusterUnavailable,
                    reason,
                );
            }
            Some(0) if p.local == 0 => {
                if let Some(sender) = p.dedup {
                    let refused = super::dedup::refused(ErrorCode::RecipientOffline);
                    self.dedup.set_count(sender, p.msg_id, refused);
                }
                let reason = format!("{target} is not connected to any node");
                self.reply_error(
                    p.conn,
                    p.msg_id,
                    target,
                    ErrorCode::RecipientOffline,
                    &reason,
                );
            }
            other => {
                let others = u32::try_from(other.unwrap_or(0)).unwrap_or(u32::MAX);
                let count = p.local.saturating_add(others);
                if let Some(sender) = p.dedup {
                    self.dedup.set_count(sender, p.msg_id, count);
                }
                if p.ack {
                    write_ack(self.scratch(), p.msg_id, target, count);
                    self.queue_scratch(p.conn);
                }
            }
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
        let Some((from, frame)) = split_message(payload) else {
            self.cluster_message_refused("shorter than a node id");
            return;
        };
        if from == node {
            return; // our own, delivered here when it was sent
        }
        let expected = match channel {
            Channel::User(_) => Opcode::Deliver,
            Channel::Room(_) | Channel::All => Opcode::RoomDeliver,
        };
        if frame.len() < HEADER_LEN {
            self.cluster_message_refused("shorter than a frame header");
            return;
        }
        let h = Header::read(&frame);
        if h.len as usize != frame.len() || h.opcode != expected as u8 {
            self.cluster_message_refused("not a frame of its channel");
            return;
        }
        self.metrics.cluster_messages_in += 1;
        match channel {
            Channel::User(user) => self.deliver_from_cluster(user, frame),
            Channel::Room(room) => {
                let members: Vec<ConnId> = self.rooms.members(room).to_vec();
                let (queued, dropped) = self.fan_out_to(room, frame, &members, None);
                self.rooms.count_dropped(room, dropped);
                self.count_cluster_fanout(queued, dropped);
            }
            Channel::All => {
                let (queued, dropped) = self.fan_out_to_everyone(frame, None);
                self.count_cluster_fanout(queued, dropped);
            }
        }
    }

    fn deliver_from_cluster(&mut self, user: crate::proto::UserId, frame: Bytes) {
        let cap = self.config.out_cap;
        let cost = OutQueue::cost(frame.len());
        let devices = self.directory.devices(user).to_vec();
        for device in devices {
            let over_budget = self.over_budget(cost);
            let Some(s) = self.sessions.get_mut(device.0) else {
                continue;
            };
            if s.out.held() + cost > cap || over_budget {
                self.metrics.cluster_deliveries_dropped += 1;
                debug!("{}: dropped a DELIVER from the cluster (slow)", s.label());
                continue;
            }
            push_output(s, &mut self.flush_list, device, frame.clone());
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
