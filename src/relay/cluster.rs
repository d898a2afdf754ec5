//! Cluster mode, the core's side (protocol.md, section 18): several relay processes that
//! share one Redis act as one relay.
//!
//! The core owns what a node says to the cluster and what it does with what the cluster
//! says; the driver (`server/cluster_link.rs`) only carries the bytes. Every channel is a
//! Redis pub/sub channel:
//!
//! - `imrelay:u:<user>`: a node is subscribed while the user has a connection on it. A
//!   SEND is delivered to the recipient's connections here and PUBLISHed to its channel;
//!   Redis answers how many nodes got it, so the sender's ACK (or RECIPIENT_OFFLINE) waits
//!   for that answer: RECIPIENT_OFFLINE means connected on no node.
//! - `imrelay:r:<room>`: subscribed while the room has a member here. A ROOM_SEND fans out
//!   here and is published once; each other node fans out to its own members.
//! - `imrelay:all`: BROADCAST, always subscribed.
//!
//! A published message is the node's id (u64, so a node skips its own messages) followed
//! by the encoded DELIVER or ROOM_DELIVER, encoded once by the sending node.
//!
//! While the link is down nothing is published or subscribed: local delivery goes on, a
//! SEND to a user with no connection here is refused with `CLUSTER_UNAVAILABLE`, and
//! SENDs waiting for Redis's answer are answered from what this node knows. When the link
//! comes back the node subscribes again to everything it holds.

use std::collections::VecDeque;

use bytes::{BufMut, Bytes, BytesMut};

use crate::proto::{MessageId, RoomId, UserId};
use crate::ConnId;

/// PUBLISHes waiting for Redis's answer (or for the driver to send them), at most: past
/// this a SEND that needs the cluster is refused with `CLUSTER_UNAVAILABLE`.
pub const MAX_PENDING: usize = 65_536;

/// A pub/sub channel of the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Channel {
    /// A user's direct messages.
    User(UserId),
    /// A room's messages.
    Room(RoomId),
    /// Broadcasts.
    All,
}

impl Channel {
    /// The Redis channel name.
    pub fn name(self) -> String {
        match self {
            Channel::User(u) => format!("imrelay:u:{}", u.0),
            Channel::Room(r) => format!("imrelay:r:{}", r.0),
            Channel::All => "imrelay:all".to_string(),
        }
    }

    /// The channel a Redis channel name stands for; `None` for any other name.
    pub fn parse(name: &[u8]) -> Option<Channel> {
        let name = std::str::from_utf8(name).ok()?;
        if name == "imrelay:all" {
            return Some(Channel::All);
        }
        if let Some(id) = name.strip_prefix("imrelay:u:") {
            return id.parse().ok().map(|id| Channel::User(UserId(id)));
        }
        let id = name.strip_prefix("imrelay:r:")?;
        id.parse().ok().map(|id| Channel::Room(RoomId(id)))
    }
}

/// What the node asks of Redis, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClusterOp {
    /// SUBSCRIBE to the channel (on the subscriber connection).
    Subscribe(Channel),
    /// UNSUBSCRIBE from it.
    Unsubscribe(Channel),
    /// PUBLISH this payload (node id ‖ frame); Redis's answer goes to
    /// [`Relay::handle_cluster_published`](super::Relay::handle_cluster_published), in order.
    Publish(Channel, Bytes),
}

/// A SEND whose answer waits for its PUBLISH's.
#[derive(Clone, Copy, Debug)]
pub(super) struct PendingSend {
    pub conn: ConnId,
    /// The session's serial: the connection may be gone (and its slot reused) by then.
    pub serial: u64,
    pub msg_id: MessageId,
    pub target: UserId,
    /// Connections of the recipient on this node the DELIVER was queued to.
    pub local: u32,
    /// This node was subscribed to the recipient's channel (it had connections), so
    /// Redis's count includes it.
    pub self_counted: bool,
    /// The sender wants an ACK (no NO_ACK flag); errors are sent either way.
    pub ack: bool,
    /// The sender, when the SEND had DEDUP: its remembered answer is set to the final one.
    pub dedup: Option<UserId>,
}

/// The cluster state of a node.
#[derive(Debug)]
pub struct Cluster {
    /// This node's id, in every message it publishes.
    pub node: u64,
    /// The link to Redis is up: publish and subscribe.
    pub up: bool,
    /// What this turn asks of Redis.
    pub ops: Vec<ClusterOp>,
    /// One entry per PUBLISH not yet answered, in order: the SEND waiting for it, if any.
    pub pending: VecDeque<Option<PendingSend>>,
}

impl Cluster {
    /// A node with id `node`, link down.
    pub fn new(node: u64) -> Cluster {
        Cluster {
            node,
            up: false,
            ops: Vec::new(),
            pending: VecDeque::new(),
        }
    }

    /// Publishes `frame` (encoded once) on `channel`, remembering who waits for the answer.
    pub fn publish(&mut self, channel: Channel, frame: &[u8], waiting: Option<PendingSend>) {
        let mut payload = BytesMut::with_capacity(8 + frame.len());
        payload.put_u64(self.node);
        payload.extend_from_slice(frame);
        self.ops.push(ClusterOp::Publish(channel, payload.freeze()));
        self.pending.push_back(waiting);
    }

    /// True when a PUBLISH can be queued now.
    pub fn can_publish(&self) -> bool {
        self.up && self.pending.len() < MAX_PENDING
    }

    /// Why a SEND that needs the cluster cannot be published now.
    pub fn unavailable_reason(&self) -> &'static str {
        if self.up {
            "the cluster link is backed up (too many messages waiting for Redis)"
        } else {
            "the cluster link is down and the recipient has no connection on this node"
        }
    }
}

/// Subscribes to `channel` when the link is up (called when this node gets its first
/// connection of a user, or member of a room). A free function over the field, so callers
/// may hold a session borrowed meanwhile.
pub(super) fn subscribe(cluster: &mut Option<Cluster>, channel: Channel) {
    if let Some(c) = cluster.as_mut().filter(|c| c.up) {
        c.ops.push(ClusterOp::Subscribe(channel));
    }
}

/// Unsubscribes from `channel` when the link is up (the node's last connection of a user,
/// or member of a room, is gone).
pub(super) fn unsubscribe(cluster: &mut Option<Cluster>, channel: Channel) {
    if let Some(c) = cluster.as_mut().filter(|c| c.up) {
        c.ops.push(ClusterOp::Unsubscribe(channel));
    }
}

/// Splits a message from the cluster into the publishing node and the frame.
pub fn split_message(payload: &Bytes) -> Option<(u64, Bytes)> {
    let node = u64::from_be_bytes(payload.get(..8)?.try_into().ok()?);
    Some((node, payload.slice(8..)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names_round_trip_and_others_are_not_ours() {
        for channel in [
            Channel::User(UserId(1002)),
            Channel::Room(RoomId(42)),
            Channel::All,
        ] {
            assert_eq!(Channel::parse(channel.name().as_bytes()), Some(channel));
        }
        for other in [
            "imrelay:u:",
            "imrelay:u:x",
            "imrelay:r:-1",
            "other",
            "imrelay:al",
        ] {
            assert_eq!(Channel::parse(other.as_bytes()), None, "{other}");
        }
    }

    #[test]
    fn a_message_carries_the_node_before_the_frame() {
        let mut c = Cluster::new(7);
        c.up = true;
        c.publish(Channel::All, b"frame", None);
        let Some(ClusterOp::Publish(Channel::All, payload)) = c.ops.pop() else {
            panic!("no publish");
        };
        assert_eq!(
            split_message(&payload),
            Some((7, Bytes::from_static(b"frame")))
        );
        assert_eq!(split_message(&Bytes::from_static(b"short")), None);
        assert_eq!(c.pending.len(), 1);
    }
}
