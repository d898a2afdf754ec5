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
//! by one or more encoded DELIVERs or ROOM_DELIVERs, each encoded once by the sending node:
//! every frame a loop turn publishes on one channel goes in one PUBLISH (up to
//! [`MAX_BATCH`] bytes), since Redis's cost is per command.
//!
//! DEDUP across nodes: a DEDUP SEND first claims its key `imrelay:d:<sender>:<msg_id>`
//! (`SET key p NX GET PX ttl`). A new key means a first copy: it is delivered, and the
//! key then holds its answer (the ACK count, or `r<code>` for a refusal). A key that was
//! there means a resend, through this node or another: it is answered with what the key
//! holds (`CLUSTER_UNAVAILABLE`, retry later, while the first copy is still on its way).
//! While a connection has SENDs waiting for their claim, its later SENDs wait behind them
//! (a PING keeps their place among Redis's answers), so one connection's messages keep
//! their order.
//!
//! While the link is down nothing is published or subscribed: local delivery goes on, a
//! SEND to a user with no connection here is refused with `CLUSTER_UNAVAILABLE`, and
//! SENDs waiting for Redis's answer are answered from what this node knows. When the link
//! comes back the node subscribes again to everything it holds.

use std::collections::VecDeque;

use bytes::{BufMut, Bytes, BytesMut};

use super::cluster_inbox::{
    InboxOp, InboxWait, StoreRequest, StoredMessage, StoredWait, STORE_BATCH,
};
use super::hashing::{id_map, IdMap};

use crate::proto::{MessageId, RoomId, UserId};
use crate::ConnId;

/// PUBLISHes waiting for Redis's answer (or for the driver to send them), at most: past
/// this a SEND that needs the cluster is refused with `CLUSTER_UNAVAILABLE`.
pub const MAX_PENDING: usize = 65_536;

/// The most bytes of frames one PUBLISH carries; a turn's frames for one channel past
/// this go in another.
pub const MAX_BATCH: usize = 64 * 1024;

/// A pub/sub channel of the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Channel {
    /// A user's direct messages.
    User(UserId),
    /// A room's messages.
    Room(RoomId),
    /// Broadcasts.
    All,
}

impl Channel {
    /// The Redis channel name, written into `buf` (no allocation); returns its bytes.
    pub fn name_in(self, buf: &mut [u8; 40]) -> &[u8] {
        use std::io::Write;
        let mut cursor = std::io::Cursor::new(&mut buf[..]);
        // At most 11 + 20 digits: always fits.
        let _ = match self {
            Channel::User(u) => write!(cursor, "imrelay:u:{}", u.0),
            Channel::Room(r) => write!(cursor, "imrelay:r:{}", r.0),
            Channel::All => write!(cursor, "imrelay:all"),
        };
        let len = usize::try_from(cursor.position()).unwrap_or(0);
        &buf[..len]
    }

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

/// What the node asks of Redis, in order. Every op but SUBSCRIBE and UNSUBSCRIBE is a
/// command whose answer goes to
/// [`Relay::handle_cluster_reply`](super::Relay::handle_cluster_reply), in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClusterOp {
    /// SUBSCRIBE to the channel (on the subscriber connection).
    Subscribe(Channel),
    /// UNSUBSCRIBE from it.
    Unsubscribe(Channel),
    /// PUBLISH this payload (node id ‖ frame).
    Publish(Channel, Bytes),
    /// `SET key token NX GET PX ttl_ms`: claims a DEDUP key.
    Claim {
        /// The key ([`dedup_key`]).
        key: String,
        /// What the key holds while the first copy is on its way: `p<node>.<n>`, unique
        /// to this claim (any value that starts with `p` means "on its way").
        token: String,
        /// How long Redis keeps it (the DEDUP time to live).
        ttl_ms: u64,
    },
    /// `SET key value PX ttl_ms`: a DEDUP key's answer.
    Remember {
        /// The key ([`dedup_key`]).
        key: String,
        /// The ACK count, or `r<code>` for a refusal.
        value: String,
        /// How long Redis keeps it.
        ttl_ms: u64,
    },
    /// Deletes a DEDUP key if it still holds this node's claim `token` (a script): the
    /// first copy's fate is unknown, or it was never sent, so a resend is sent again.
    Forget {
        /// The key.
        key: String,
        /// The claim's token.
        token: String,
    },
    /// `PING`: holds a SEND's place behind its connection's claims.
    Ping,
    /// This node's member count of a room (0: none left), kept in Redis for
    /// [`ClusterOp::RoomCount`] (a script: the node's key with a time to live of
    /// [`ROOM_COUNT_TTL_MS`], and the room's set of nodes).
    SetRoomCount {
        /// The room.
        room: RoomId,
        /// This node's id.
        node: u64,
        /// Its members on this node.
        count: usize,
    },
    /// The members of a room on every other node (a script summing their keys); the
    /// answer is an integer.
    RoomCount {
        /// The room.
        room: RoomId,
        /// This node's id (its own count is added by the core, as it is now).
        node: u64,
    },
    /// Stored delivery: a function of the inbox library, or a fetch
    /// (`cluster_inbox.rs`).
    Inbox(InboxOp),
}

/// How long a node's room count stays in Redis unless refreshed: a node that stops
/// counts in other nodes' ROOM_STATE for at most this long.
pub const ROOM_COUNT_TTL_MS: u64 = 15_000;
/// How often a node refreshes the counts of its rooms in Redis.
pub const ROOM_COUNT_REFRESH: std::time::Duration = std::time::Duration::from_secs(5);

/// An answer from Redis to a command, as the driver decoded it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClusterReply {
    /// `:n`
    Integer(i64),
    /// `$...`, or nil
    Bulk(Option<Bytes>),
    /// `+OK`, `+PONG`
    Simple,
    /// `-ERR ...`
    Error(String),
    /// `*...` (a nil array is empty)
    Array(Vec<ClusterReply>),
}

/// What waits for the answer to one command.
#[derive(Debug)]
pub(super) enum Pending {
    /// A PUBLISH; the SENDs whose answers wait for it (none for room traffic).
    Publish(Vec<PendingSend>),
    /// A DEDUP SEND's claim, or a SEND held behind one (`claim: false`, a PING).
    Deferred(DeferredSend),
    /// A ROOM_STATE (answer to JOIN, LEAVE or ROOM_INFO) waiting for the other nodes'
    /// member count.
    RoomState {
        conn: ConnId,
        serial: u64,
        msg_id: MessageId,
        room: RoomId,
    },
    /// Nothing (a room count).
    Nothing,
    /// A DEDUP key's answer or forget: written again when the link is up again if the
    /// link goes down before Redis answered (both are idempotent).
    DedupWrite(ClusterOp),
    /// Stored delivery (`cluster_inbox.rs`).
    Inbox(InboxWait),
}

/// A SEND held until Redis answers (a claim, or the PING that keeps its place).
#[derive(Debug)]
pub(super) struct DeferredSend {
    pub conn: ConnId,
    pub serial: u64,
    /// The SEND frame, copied out of the read buffer.
    pub frame: BytesMut,
    /// The claim (`SET NX GET`), or None for a PING.
    pub claim: Option<DedupClaim>,
}

/// A DEDUP key this node claimed, and the token it holds while the first copy is on its
/// way.
#[derive(Clone, Debug)]
pub(super) struct DedupClaim {
    pub key: String,
    pub token: String,
}

/// The key of a DEDUP SEND.
pub fn dedup_key(sender: UserId, msg_id: MessageId) -> String {
    format!("imrelay:d:{}:{}", sender.0, msg_id.0)
}

/// A SEND whose answer waits for its PUBLISH's.
#[derive(Clone, Debug)]
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
    /// The sender and its claim, when the SEND had DEDUP: its remembered answer (here and
    /// in Redis) is set to the final one.
    pub dedup: Option<(UserId, DedupClaim)>,
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
    /// One entry per command not yet answered, in order.
    pub(super) pending: VecDeque<Pending>,
    /// Entries taken off the front of `pending` so far (positions count from the first).
    popped: u64,
    /// This turn's PUBLISHes still open for more frames: channel -> (index in `ops`,
    /// index in `batches`, position in `pending`).
    open: IdMap<Channel, (usize, usize, u64)>,
    /// Their payloads, filled into `ops` when the turn's ops are taken.
    batches: Vec<BytesMut>,
    /// Bytes of the SENDs held in `pending` (counted in the relay's memory).
    pub held: usize,
    /// Rooms whose member count here changed since it was last written to Redis.
    pub dirty_rooms: Vec<RoomId>,
    /// DEDUP answers and forgets decided while the link was down: written first when it
    /// is up again (at most [`MAX_PENDING`]; past that the keys' time to live ends them).
    pub backlog: Vec<ClusterOp>,
    /// Claims made, for their tokens.
    pub claims: u64,
    /// User channels subscribed to and not yet confirmed by Redis (SUBSCRIBEs sent,
    /// minus confirmations): an INBOX_SYNC of such a user waits for the confirmation.
    pub subscribing: IdMap<UserId, u32>,
    /// The epoch of the inboxes in Redis, once known.
    pub epoch: Option<u64>,
    /// Epoch candidates drawn so far.
    candidates: u64,
    /// This turn's inbox stores still open for more messages: (recipient, sender, device)
    /// -> (index in `ops`, position in `pending`).
    open_stores: IdMap<(u64, u64, u64), (usize, u64)>,
}

impl Cluster {
    /// A node with id `node`, link down.
    pub fn new(node: u64) -> Cluster {
        Cluster {
            node,
            up: false,
            ops: Vec::new(),
            pending: VecDeque::new(),
            popped: 0,
            open: id_map(node ^ 0x9e37_79b9_7f4a_7c15),
            batches: Vec::new(),
            held: 0,
            dirty_rooms: Vec::new(),
            backlog: Vec::new(),
            claims: 0,
            subscribing: id_map(node ^ 0x6a09_e667_f3bc_c908),
            epoch: None,
            candidates: 0,
            open_stores: id_map(node ^ 0x3c6e_f372_fe94_f82b),
        }
    }

    /// A new claim of the DEDUP key of `(sender, msg_id)`.
    pub(super) fn new_claim(&mut self, sender: UserId, msg_id: MessageId) -> DedupClaim {
        self.claims += 1;
        DedupClaim {
            key: dedup_key(sender, msg_id),
            token: format!("p{}.{}", self.node, self.claims),
        }
    }

    /// Writes a DEDUP key's answer or forget now, or when the link is up again.
    pub(super) fn write_dedup(&mut self, op: ClusterOp) {
        if self.up {
            self.command(op.clone(), Pending::DedupWrite(op));
        } else if self.backlog.len() < MAX_PENDING {
            self.backlog.push(op);
        }
    }

    /// Queues a command and what waits for its answer.
    pub(super) fn command(&mut self, op: ClusterOp, waiting: Pending) {
        if let Pending::Deferred(d) = &waiting {
            self.held += d.frame.len();
        }
        self.ops.push(op);
        self.pending.push_back(waiting);
    }

    /// Publishes `frame` (encoded once) on `channel`, remembering who waits for the answer:
    /// in this turn's PUBLISH on that channel if it has room, else in a new one.
    pub(super) fn publish(&mut self, channel: Channel, frame: &[u8], waiting: Option<PendingSend>) {
        let write = |batch: &mut BytesMut| batch.extend_from_slice(frame);
        self.publish_with(channel, frame.len(), write, waiting);
    }

    /// [`Cluster::publish`] of a frame of `len` bytes that `write` appends to the PUBLISH's
    /// payload (a SEND's DELIVER, rewritten from the read buffer without a copy of its
    /// own).
    pub(super) fn publish_with(
        &mut self,
        channel: Channel,
        len: usize,
        write: impl FnOnce(&mut BytesMut),
        waiting: Option<PendingSend>,
    ) {
        if let Some(&(_, batch, at)) = self.open.get(&channel) {
            if self.batches[batch].len() + len <= MAX_BATCH {
                write(&mut self.batches[batch]);
                if let Some(waiting) = waiting {
                    let index = usize::try_from(at - self.popped).unwrap_or(usize::MAX);
                    if let Some(Pending::Publish(sends)) = self.pending.get_mut(index) {
                        sends.push(waiting);
                    }
                }
                return;
            }
        }
        let mut payload = BytesMut::with_capacity(8 + len);
        payload.put_u64(self.node);
        write(&mut payload);
        let at = self.popped + self.pending.len() as u64;
        self.open
            .insert(channel, (self.ops.len(), self.batches.len(), at));
        self.batches.push(payload);
        // The payload is filled in when the turn's ops are taken.
        self.command(
            ClusterOp::Publish(channel, Bytes::new()),
            Pending::Publish(waiting.into_iter().collect()),
        );
    }

    /// Queues a stored SEND: in this turn's store of the same `batch` (recipient, sender,
    /// device) if it has room, else in a new one (`request` makes it, given an epoch
    /// candidate), so one function call stores a turn's messages to one recipient.
    pub(super) fn store(
        &mut self,
        batch: (u64, u64, u64),
        message: StoredMessage,
        wait: StoredWait,
        request: impl FnOnce(u64) -> StoreRequest,
    ) {
        if let Some(&(op, at)) = self.open_stores.get(&batch) {
            let index = usize::try_from(at - self.popped).unwrap_or(usize::MAX);
            if let (
                Some(ClusterOp::Inbox(InboxOp::Store(r))),
                Some(Pending::Inbox(InboxWait::Stored(waits))),
            ) = (self.ops.get_mut(op), self.pending.get_mut(index))
            {
                if r.messages.len() < STORE_BATCH {
                    r.messages.push(message);
                    waits.push(wait);
                    return;
                }
            }
        }
        let candidate = self.epoch_candidate();
        let mut r = request(candidate);
        r.messages.push(message);
        let at = self.popped + self.pending.len() as u64;
        self.open_stores.insert(batch, (self.ops.len(), at));
        self.command(
            ClusterOp::Inbox(InboxOp::Store(Box::new(r))),
            Pending::Inbox(InboxWait::Stored(vec![wait])),
        );
    }

    /// This turn's ops, with the PUBLISHes' payloads, moved into `out`; the next turn's
    /// frames go in new PUBLISHes.
    pub(super) fn take_ops(&mut self, out: &mut Vec<ClusterOp>) {
        self.open_stores.clear();
        for (_, (op, batch, _)) in self.open.drain() {
            if let Some(ClusterOp::Publish(_, payload)) = self.ops.get_mut(op) {
                *payload = std::mem::take(&mut self.batches[batch]).freeze();
            }
        }
        self.batches.clear();
        out.append(&mut self.ops);
    }

    /// The oldest command's answer came: what waited for it.
    pub(super) fn pop_pending(&mut self) -> Option<Pending> {
        let pending = self.pending.pop_front()?;
        self.popped += 1;
        if let Pending::Deferred(d) = &pending {
            self.held = self.held.saturating_sub(d.frame.len());
        }
        Some(pending)
    }

    /// The link is down: nothing more is sent; returns what waited for an answer.
    /// (`subscribing` is left for the caller, which answers the syncs waiting on it.)
    pub(super) fn drop_all(&mut self) -> Vec<Pending> {
        self.up = false;
        self.ops.clear();
        self.open.clear();
        self.open_stores.clear();
        self.batches.clear();
        self.dirty_rooms.clear();
        self.held = 0;
        self.popped += self.pending.len() as u64;
        self.pending.drain(..).collect()
    }

    /// The epoch Redis's inboxes get if they are new (never 0): a different one each
    /// time, so inboxes Redis lost and made again never share an epoch with the old ones.
    pub(super) fn epoch_candidate(&mut self) -> u64 {
        self.candidates += 1;
        let mixed =
            crate::rand::Rng::seeded(self.node ^ self.candidates.rotate_left(32)).next_u64();
        mixed.max(1)
    }

    /// Queues a SUBSCRIBE; a user channel counts as not yet confirmed until Redis says.
    pub(super) fn subscribe(&mut self, channel: Channel) {
        if let Channel::User(user) = channel {
            *self.subscribing.entry(user).or_insert(0) += 1;
        }
        self.ops.push(ClusterOp::Subscribe(channel));
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
        c.subscribe(channel);
    }
}

/// Notes that this node's member count of `room` changed: written to Redis at the end of
/// the turn.
pub(super) fn room_count_changed(cluster: &mut Option<Cluster>, room: RoomId) {
    if let Some(c) = cluster.as_mut().filter(|c| c.up) {
        c.dirty_rooms.push(room);
    }
}

/// Unsubscribes from `channel` when the link is up (the node's last connection of a user,
/// or member of a room, is gone).
pub(super) fn unsubscribe(cluster: &mut Option<Cluster>, channel: Channel) {
    if let Some(c) = cluster.as_mut().filter(|c| c.up) {
        c.ops.push(ClusterOp::Unsubscribe(channel));
    }
}

/// Splits a message from the cluster into the publishing node and its frames (checked
/// for their length only).
pub fn split_message(payload: &Bytes) -> Option<(u64, Bytes)> {
    let node = u64::from_be_bytes(payload.get(..8)?.try_into().ok()?);
    Some((node, payload.slice(8..)))
}

/// The next frame at the front of `frames` (a message's frames, after the node id): cut
/// off by its length field; `None` at the end or when what is left is not a whole frame.
pub fn next_frame(frames: &mut Bytes) -> Option<Bytes> {
    let len = u32::from_be_bytes(frames.get(..4)?.try_into().ok()?) as usize;
    if len < crate::proto::HEADER_LEN || len > frames.len() {
        return None;
    }
    Some(frames.split_to(len))
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
        c.publish(Channel::All, b"+more", None);
        c.publish(Channel::Room(RoomId(1)), b"other", None);
        let mut ops = Vec::new();
        c.take_ops(&mut ops);
        assert_eq!(ops.len(), 2, "one PUBLISH per channel and turn");
        let ClusterOp::Publish(Channel::All, payload) = &ops[0] else {
            panic!("{ops:?}");
        };
        assert_eq!(
            split_message(payload),
            Some((7, Bytes::from_static(b"frame+more")))
        );
        assert_eq!(split_message(&Bytes::from_static(b"short")), None);
        assert_eq!(c.pending.len(), 2);
        c.publish(Channel::All, b"next turn", None);
        c.take_ops(&mut ops);
        assert_eq!(ops.len(), 3, "a new turn, a new PUBLISH");
    }
}
