//! Cluster mode in memory: several relay cores joined by a pub/sub that behaves as Redis's
//! does (a PUBLISH reaches every node subscribed at that moment and is answered with their
//! number), with the link taken down and brought back by hand.

use std::collections::{HashMap, HashSet};

use super::*;
use crate::proto::{ErrorCode, RoomId};
use crate::relay::cluster::{dedup_key, Channel};
use crate::relay::ClusterReply;

use super::inbox_model::InboxModel;

/// N nodes and the pub/sub (and key-value store) between them.
struct Cluster {
    nodes: Vec<Harness>,
    subscribed: HashMap<String, HashSet<usize>>,
    keys: HashMap<String, String>,
    /// (room, node id) -> that node's member count.
    room_counts: HashMap<(u64, u64), usize>,
    /// The inboxes of stored delivery.
    inbox: InboxModel,
    /// SUBSCRIBE confirmations held back (node, channel) while `hold_confirmations`.
    held_confirmations: Vec<(usize, String)>,
    hold_confirmations: bool,
    now: Instant,
}

impl Cluster {
    fn new(n: usize) -> Cluster {
        let config = Config {
            room_send_rate: 0,
            room_total_rate: 0,
            ..Config::default()
        };
        let mut nodes = Vec::new();
        for i in 0..n {
            let mut h = Harness::new(config.clone());
            h.relay.enable_cluster(100 + i as u64);
            h.relay.handle_cluster_up();
            nodes.push(h);
        }
        let mut cluster = Cluster {
            nodes,
            subscribed: HashMap::new(),
            keys: HashMap::new(),
            room_counts: HashMap::new(),
            inbox: InboxModel::default(),
            held_confirmations: Vec::new(),
            hold_confirmations: false,
            now: Instant::now(),
        };
        cluster.settle();
        cluster
    }

    /// Carries every node's ops through the pub/sub until nothing is left: subscriptions
    /// first, then publishes in order, each answered at once.
    fn settle(&mut self) {
        loop {
            let mut moved = false;
            for i in 0..self.nodes.len() {
                let mut ops = Vec::new();
                self.nodes[i].relay.take_cluster_ops(&mut ops);
                for op in ops {
                    moved = true;
                    match op {
                        ClusterOp::Subscribe(ch) => {
                            self.subscribed.entry(ch.name()).or_default().insert(i);
                            if self.hold_confirmations {
                                self.held_confirmations.push((i, ch.name()));
                            } else {
                                self.nodes[i]
                                    .relay
                                    .handle_cluster_subscribed(ch.name().as_bytes());
                            }
                        }
                        ClusterOp::Unsubscribe(ch) => {
                            self.subscribed.entry(ch.name()).or_default().remove(&i);
                        }
                        ClusterOp::Publish(ch, payload) => {
                            let name = ch.name();
                            let to: Vec<usize> = self
                                .subscribed
                                .get(&name)
                                .map(|s| s.iter().copied().collect())
                                .unwrap_or_default();
                            for &j in &to {
                                self.nodes[j]
                                    .relay
                                    .handle_cluster_message(name.as_bytes(), &payload);
                            }
                            let n = to.len() as i64;
                            self.nodes[i]
                                .relay
                                .handle_cluster_reply(ClusterReply::Integer(n), self.now);
                        }
                        ClusterOp::Claim { key, token, .. } => {
                            let old = self.keys.get(&key).cloned();
                            self.keys.entry(key).or_insert(token);
                            let reply = ClusterReply::Bulk(old.map(Bytes::from));
                            self.nodes[i].relay.handle_cluster_reply(reply, self.now);
                        }
                        ClusterOp::Remember { key, value, .. } => {
                            self.keys.insert(key, value);
                            self.nodes[i]
                                .relay
                                .handle_cluster_reply(ClusterReply::Simple, self.now);
                        }
                        ClusterOp::Forget { key, token } => {
                            let ours = self.keys.get(&key) == Some(&token);
                            if ours {
                                self.keys.remove(&key);
                            }
                            let n = i64::from(ours);
                            self.nodes[i]
                                .relay
                                .handle_cluster_reply(ClusterReply::Integer(n), self.now);
                        }
                        ClusterOp::Ping => {
                            self.nodes[i]
                                .relay
                                .handle_cluster_reply(ClusterReply::Simple, self.now);
                        }
                        ClusterOp::SetRoomCount { room, node, count } => {
                            if count == 0 {
                                self.room_counts.remove(&(room.0, node));
                            } else {
                                self.room_counts.insert((room.0, node), count);
                            }
                            let reply = ClusterReply::Integer(1);
                            self.nodes[i].relay.handle_cluster_reply(reply, self.now);
                        }
                        ClusterOp::Inbox(op) => {
                            let reply = self.inbox.handle(i, op, &mut self.subscribed);
                            for (j, channel, payload) in reply.notices {
                                self.nodes[j]
                                    .relay
                                    .handle_cluster_message(channel.as_bytes(), &payload);
                            }
                            self.nodes[i]
                                .relay
                                .handle_cluster_reply(reply.answer, self.now);
                        }
                        ClusterOp::RoomCount { room, node } => {
                            let others: usize = self
                                .room_counts
                                .iter()
                                .filter(|((r, n), _)| *r == room.0 && *n != node)
                                .map(|(_, c)| c)
                                .sum();
                            let reply = ClusterReply::Integer(others as i64);
                            self.nodes[i].relay.handle_cluster_reply(reply, self.now);
                        }
                    }
                }
            }
            if !moved {
                return;
            }
        }
    }

    fn send(&mut self, node: usize, from: ConnId, msg: u64, to: u64) {
        self.nodes[node].send_frame(from, send(msg, to, b"hi"));
        self.settle();
    }
}

fn ack_count(frame: &Frame) -> u32 {
    assert_eq!(frame.opcode, Opcode::Ack, "{frame:?}");
    u32::from_be_bytes(frame.payload[..4].try_into().unwrap())
}

#[test]
fn a_send_reaches_the_recipient_on_any_node_and_the_ack_counts_nodes() {
    let mut c = Cluster::new(3);
    let alice = c.nodes[0].login(1);
    let bob_b = c.nodes[1].login(2);
    c.settle();

    c.send(0, alice, 7, 2);
    let got = c.nodes[1].take_frames(bob_b);
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].opcode, got[0].msg_id, got[0].source),
        (Opcode::Deliver, MessageId(7), UserId(1))
    );
    assert_eq!(ack_count(&c.nodes[0].take_frames(alice)[0]), 1);

    // Bob also on node C and twice on A: 2 local connections + 2 other nodes.
    let bob_c = c.nodes[2].login(2);
    let bob_a1 = c.nodes[0].login(2);
    let bob_a2 = c.nodes[0].login(2);
    c.settle();
    c.send(0, alice, 8, 2);
    for (node, conn) in [(1, bob_b), (2, bob_c), (0, bob_a1), (0, bob_a2)] {
        let got = c.nodes[node].take_frames(conn);
        assert_eq!(got.len(), 1, "node {node}");
        assert_eq!(got[0].msg_id, MessageId(8));
    }
    assert_eq!(ack_count(&c.nodes[0].take_frames(alice)[0]), 4);
}

#[test]
fn recipient_offline_only_when_connected_on_no_node() {
    let mut c = Cluster::new(2);
    let alice = c.nodes[0].login(1);
    c.settle();
    c.send(0, alice, 1, 2);
    c.nodes[0].expect_error(alice, ErrorCode::RecipientOffline);

    let bob = c.nodes[1].login(2);
    c.settle();
    c.send(0, alice, 2, 2);
    assert_eq!(ack_count(&c.nodes[0].take_frames(alice)[0]), 1);

    c.nodes[1].relay.handle_closed(bob);
    c.settle();
    c.send(0, alice, 3, 2);
    c.nodes[0].expect_error(alice, ErrorCode::RecipientOffline);
}

#[test]
fn rooms_and_broadcasts_reach_every_node_once() {
    let mut c = Cluster::new(3);
    let members: Vec<(usize, ConnId)> = (0..3)
        .flat_map(|node| [(node, 10 + node as u64), (node, 20 + node as u64)])
        .map(|(node, user)| {
            let id = c.nodes[node].login(user);
            c.nodes[node].send_frame(id, Frame::join(MessageId(2), RoomId(5)));
            c.settle();
            assert_eq!(c.nodes[node].take_frames(id)[0].opcode, Opcode::RoomState);
            (node, id)
        })
        .collect();
    c.settle();
    let (sender_node, sender) = members[0];
    c.nodes[sender_node].send_frame(
        sender,
        Frame::room_send(MessageId(9), RoomId(5), Bytes::from_static(b"gift")),
    );
    c.settle();
    let ack = c.nodes[sender_node].take_frames(sender);
    assert_eq!(ack_count(&ack[0]), 1, "this node's other member only");
    for &(node, id) in &members[1..] {
        let got = c.nodes[node].take_frames(id);
        assert_eq!(got.len(), 1, "node {node} {id:?}: {got:?}");
        assert_eq!(
            (got[0].opcode, got[0].target, got[0].source),
            (Opcode::RoomDeliver, UserId(5), UserId(10))
        );
    }

    // The last member on node C leaves: C no longer gets room 5.
    for &(node, id) in &members[4..] {
        c.nodes[node].send_frame(id, Frame::leave(MessageId(3), RoomId(5)));
        c.settle();
        c.nodes[node].take_frames(id);
    }
    assert!(!c.subscribed[&Channel::Room(RoomId(5)).name()].contains(&2));
}

#[test]
fn a_link_down_keeps_local_delivery_refuses_the_rest_and_resubscribes() {
    let mut c = Cluster::new(2);
    let alice = c.nodes[0].login(1);
    let carol = c.nodes[0].login(3);
    let bob = c.nodes[1].login(2);
    c.settle();

    // A SEND waiting for Redis's answer when the link drops: answered from what node A
    // knows (nothing for bob: CLUSTER_UNAVAILABLE).
    c.nodes[0].send_frame(alice, send(1, 2, b"in flight"));
    c.nodes[0].relay.handle_cluster_down();
    c.nodes[0].expect_error(alice, ErrorCode::ClusterUnavailable);
    let mut dropped = Vec::new();
    c.nodes[0].relay.take_cluster_ops(&mut dropped);
    assert!(dropped.is_empty(), "nothing is published while down");

    c.send(0, alice, 2, 2);
    c.nodes[0].expect_error(alice, ErrorCode::ClusterUnavailable);
    c.send(0, alice, 3, 3);
    assert_eq!(ack_count(&c.nodes[0].take_frames(alice)[0]), 1);
    assert_eq!(c.nodes[0].take_frames(carol).len(), 1);

    // Back up: Redis lost node A's subscriptions with its connection; A subscribes again.
    for subs in c.subscribed.values_mut() {
        subs.remove(&0);
    }
    c.nodes[0].relay.handle_cluster_up();
    c.settle();
    c.send(1, bob, 4, 3);
    assert_eq!(c.nodes[0].take_frames(carol).len(), 1);
    assert_eq!(ack_count(&c.nodes[1].take_frames(bob)[0]), 1);
}

#[test]
fn messages_from_the_cluster_are_checked() {
    let mut c = Cluster::new(1);
    let bob = c.nodes[0].login(2);
    c.settle();
    let name = Channel::User(UserId(2)).name();
    let bad = [
        Bytes::from_static(b"short"),
        // A ROOM_DELIVER on a user's channel.
        {
            let mut p = 5u64.to_be_bytes().to_vec();
            p.extend_from_slice(&as_opcode(room_frame(), Opcode::RoomDeliver));
            Bytes::from(p)
        },
        // A length field that does not match.
        {
            let mut p = 5u64.to_be_bytes().to_vec();
            let mut f = as_opcode(send(1, 2, b"x"), Opcode::Deliver).to_vec();
            f.push(0);
            p.extend_from_slice(&f);
            Bytes::from(p)
        },
    ];
    for payload in &bad {
        c.nodes[0]
            .relay
            .handle_cluster_message(name.as_bytes(), payload);
    }
    assert!(c.nodes[0].take_frames(bob).is_empty());
    assert_eq!(c.nodes[0].relay.metrics().cluster_messages_refused, 3);
    // The node's own messages are skipped: it delivered them when they were sent.
    let mut own = 100u64.to_be_bytes().to_vec();
    own.extend_from_slice(&as_opcode(send(1, 2, b"x"), Opcode::Deliver));
    c.nodes[0]
        .relay
        .handle_cluster_message(name.as_bytes(), &Bytes::from(own));
    assert!(c.nodes[0].take_frames(bob).is_empty());
}

fn room_frame() -> Frame {
    Frame::room_send(MessageId(1), RoomId(1), Bytes::new())
}

/// `frame` encoded with another opcode (as a relay rewrites what it forwards).
fn as_opcode(mut frame: Frame, opcode: Opcode) -> Bytes {
    frame.opcode = opcode;
    frame.to_bytes()
}

impl Cluster {
    /// Redis confirms the SUBSCRIBEs it held back.
    fn confirm_subscriptions(&mut self) {
        for (i, name) in std::mem::take(&mut self.held_confirmations) {
            self.nodes[i]
                .relay
                .handle_cluster_subscribed(name.as_bytes());
        }
        self.settle();
    }
}

fn stored(msg: u64, to: u64, payload: &'static [u8]) -> Frame {
    send(msg, to, payload).with_flags(Flags::STORED)
}

/// (seq, payload) of each INBOX_DELIVER in `frames`.
fn stored_payloads(frames: &[Frame]) -> Vec<(u64, Bytes)> {
    frames
        .iter()
        .filter_map(|f| f.inbox_deliver().map(|(seq, _, p)| (seq, p)))
        .collect()
}

#[test]
fn a_stored_message_reaches_a_synced_connection_on_another_node_and_its_ack_counts_nodes() {
    let mut c = Cluster::new(2);
    let alice = c.nodes[0].login(1);
    c.nodes[0].send_frame(alice, stored(1, 2, b"offline"));
    c.settle();
    assert_eq!(
        ack_count(&c.nodes[0].take_frames(alice)[0]),
        0,
        "bob is nowhere"
    );

    let bob = c.nodes[1].login(2);
    c.settle();
    c.nodes[1].send_frame(bob, Frame::inbox_sync(MessageId(5), 0, 0));
    c.settle();
    let got = c.nodes[1].take_frames(bob);
    assert_eq!(got[0].opcode, Opcode::InboxState, "{got:?}");
    assert!(got[0].flags.contains(Flags::NEW_DEVICE));
    assert_eq!(
        stored_payloads(&got[1..]),
        [(1, Bytes::from_static(b"offline"))]
    );

    c.nodes[0].send_frame(alice, stored(2, 2, b"online"));
    c.settle();
    assert_eq!(
        ack_count(&c.nodes[0].take_frames(alice)[0]),
        1,
        "one node holds bob"
    );
    let got = c.nodes[1].take_frames(bob);
    assert_eq!(stored_payloads(&got), [(2, Bytes::from_static(b"online"))]);
}

/// An INBOX_SYNC waits until Redis confirmed the node's subscription to the user's
/// channel, so a message stored meanwhile is not missed; it comes after INBOX_STATE.
#[test]
fn a_sync_waits_for_the_subscription_and_misses_nothing_stored_meanwhile() {
    let mut c = Cluster::new(2);
    let alice = c.nodes[0].login(1);
    c.settle();
    c.hold_confirmations = true;
    let bob = c.nodes[1].login(2);
    c.nodes[1].send_frame(bob, Frame::inbox_sync(MessageId(5), 0, 0));
    c.settle();
    assert!(c.nodes[1].take_frames(bob).is_empty(), "no INBOX_STATE yet");
    c.nodes[0].send_frame(alice, stored(1, 2, b"meanwhile"));
    c.settle();
    c.hold_confirmations = false;
    c.confirm_subscriptions();
    let got = c.nodes[1].take_frames(bob);
    assert_eq!(got[0].opcode, Opcode::InboxState, "{got:?}");
    assert_eq!(
        stored_payloads(&got[1..]),
        [(1, Bytes::from_static(b"meanwhile"))]
    );
}

/// While a node's link is down it misses notices; once it is up and subscribed again, each
/// synced connection fetches what it missed, in order. Stored SENDs and syncs on the node
/// are refused meanwhile.
#[test]
fn a_node_back_from_a_link_outage_fetches_what_its_connections_missed() {
    let mut c = Cluster::new(2);
    let alice = c.nodes[0].login(1);
    let bob = c.nodes[1].login(2);
    c.settle();
    c.nodes[1].send_frame(bob, Frame::inbox_sync(MessageId(5), 0, 0));
    c.settle();
    c.nodes[1].take_frames(bob);

    c.nodes[1].relay.handle_cluster_down();
    for set in c.subscribed.values_mut() {
        set.remove(&1); // Redis dropped the node's subscriptions with its connection
    }
    c.nodes[0].send_frame(alice, stored(1, 2, b"one"));
    c.nodes[0].send_frame(alice, stored(2, 2, b"two"));
    c.nodes[0].send_frame(alice, stored(3, 2, b"three"));
    c.settle();
    assert!(c.nodes[1].take_frames(bob).is_empty());
    c.nodes[1].send_frame(bob, stored(9, 1, b"down"));
    c.nodes[1].expect_error(bob, ErrorCode::ClusterUnavailable);
    c.nodes[1].send_frame(bob, Frame::inbox_sync(MessageId(10), 0, 0));
    c.nodes[1].expect_error(bob, ErrorCode::ClusterUnavailable);

    c.nodes[1].relay.handle_cluster_up();
    c.settle();
    let got = stored_payloads(&c.nodes[1].take_frames(bob));
    let seqs: Vec<u64> = got.iter().map(|g| g.0).collect();
    assert_eq!(seqs, [1, 2, 3], "{got:?}");
    assert_eq!(got[2].1, Bytes::from_static(b"three"));
}

/// DEDUP resends get the final answer: the full count, the same RECIPIENT_OFFLINE, and a
/// fresh delivery for one whose answer the link lost.
#[test]
fn dedup_remembers_the_cluster_answer() {
    let mut c = Cluster::new(2);
    let alice = c.nodes[0].login(1);
    let bob = c.nodes[1].login(2);
    c.settle();
    let dedup = |msg: u64, to: u64| send(msg, to, b"d").with_flags(Flags::DEDUP);

    c.nodes[0].send_frame(alice, dedup(1, 2));
    c.settle();
    assert_eq!(ack_count(&c.nodes[0].take_frames(alice)[0]), 1);
    c.nodes[0].send_frame(alice, dedup(1, 2));
    c.settle();
    assert_eq!(
        ack_count(&c.nodes[0].take_frames(alice)[0]),
        1,
        "same count"
    );
    assert_eq!(c.nodes[1].take_frames(bob).len(), 1, "delivered once");

    c.nodes[0].send_frame(alice, dedup(2, 9));
    c.settle();
    c.nodes[0].expect_error(alice, ErrorCode::RecipientOffline);
    c.nodes[0].send_frame(alice, dedup(2, 9));
    c.settle();
    c.nodes[0].expect_error(alice, ErrorCode::RecipientOffline);

    // The link drops before Redis answers: the resend is published again.
    c.nodes[0].send_frame(alice, dedup(3, 2));
    let mut lost = Vec::new();
    c.nodes[0].relay.take_cluster_ops(&mut lost);
    c.nodes[0].relay.handle_cluster_down();
    c.nodes[0].expect_error(alice, ErrorCode::ClusterUnavailable);
    c.nodes[0].relay.handle_cluster_up();
    c.settle();
    c.nodes[0].send_frame(alice, dedup(3, 2));
    c.settle();
    assert_eq!(ack_count(&c.nodes[0].take_frames(alice)[0]), 1);
    assert_eq!(c.nodes[1].take_frames(bob).len(), 1);
}

/// A DEDUP resend through another node (the client reconnected elsewhere) is answered as
/// the first copy was, and not delivered again; a refusal is remembered the same way.
#[test]
fn a_resend_through_another_node_is_not_delivered_twice() {
    let mut c = Cluster::new(3);
    let alice_a = c.nodes[0].login(1);
    let bob = c.nodes[2].login(2);
    c.settle();
    let dedup = |msg: u64, to: u64| send(msg, to, b"once").with_flags(Flags::DEDUP);
    c.nodes[0].send_frame(alice_a, dedup(41, 2));
    c.settle();
    assert_eq!(ack_count(&c.nodes[0].take_frames(alice_a)[0]), 1);
    assert_eq!(c.nodes[2].take_frames(bob).len(), 1);

    // Alice's app reconnects to node B and resends.
    let alice_b = c.nodes[1].login(1);
    c.settle();
    c.nodes[1].send_frame(alice_b, dedup(41, 2));
    c.settle();
    assert_eq!(
        ack_count(&c.nodes[1].take_frames(alice_b)[0]),
        1,
        "first count"
    );
    assert!(
        c.nodes[2].take_frames(bob).is_empty(),
        "not delivered twice"
    );

    c.nodes[0].send_frame(alice_a, dedup(42, 9));
    c.settle();
    c.nodes[0].expect_error(alice_a, ErrorCode::RecipientOffline);
    let _carol = c.nodes[2].login(9);
    c.settle();
    c.nodes[1].send_frame(alice_b, dedup(42, 9));
    c.settle();
    c.nodes[1].expect_error(alice_b, ErrorCode::RecipientOffline);
}

/// SENDs behind a DEDUP claim keep their order, DEDUP or not.
#[test]
fn sends_behind_a_claim_keep_their_order() {
    let mut c = Cluster::new(2);
    let alice = c.nodes[0].login(1);
    let bob = c.nodes[1].login(2);
    c.settle();
    let mut bytes = Vec::new();
    for msg in 1..=6u64 {
        let frame = if msg % 2 == 0 {
            send(msg, 2, b"plain")
        } else {
            send(msg, 2, b"dedup").with_flags(Flags::DEDUP)
        };
        bytes.extend_from_slice(&frame.to_bytes());
    }
    c.nodes[0].feed(alice, &bytes);
    c.settle();
    let got: Vec<u64> = c.nodes[1]
        .take_frames(bob)
        .iter()
        .map(|f| f.msg_id.0)
        .collect();
    assert_eq!(got, vec![1, 2, 3, 4, 5, 6]);
    let acks: Vec<u64> = c.nodes[0]
        .take_frames(alice)
        .iter()
        .map(|f| f.msg_id.0)
        .collect();
    assert_eq!(acks, vec![1, 2, 3, 4, 5, 6]);
}

fn room_members(frame: &Frame) -> u32 {
    assert_eq!(frame.opcode, Opcode::RoomState, "{frame:?}");
    u32::from_be_bytes(frame.payload[..4].try_into().unwrap())
}

/// JOIN, LEAVE and ROOM_INFO count the members on every node; a node whose link is down
/// answers with its own.
#[test]
fn room_state_counts_members_on_every_node() {
    let mut c = Cluster::new(3);
    let mut members = Vec::new();
    for (node, user) in [(0, 1), (1, 2), (1, 3), (2, 4)] {
        let id = c.nodes[node].login(user);
        c.nodes[node].send_frame(id, Frame::join(MessageId(2), RoomId(8)));
        c.settle();
        let state = c.nodes[node].take_frames(id);
        assert_eq!(room_members(&state[0]), members.len() as u32 + 1);
        members.push((node, id));
    }
    // A non-member on node 0 asks.
    let viewer = c.nodes[0].login(9);
    c.nodes[0].send_frame(viewer, Frame::room_info(MessageId(3), RoomId(8)));
    c.settle();
    assert_eq!(room_members(&c.nodes[0].take_frames(viewer)[0]), 4);

    let (node, id) = members[1];
    c.nodes[node].send_frame(id, Frame::leave(MessageId(4), RoomId(8)));
    c.settle();
    assert_eq!(room_members(&c.nodes[node].take_frames(id)[0]), 3);

    c.nodes[0].relay.handle_cluster_down();
    c.nodes[0].send_frame(viewer, Frame::room_info(MessageId(5), RoomId(8)));
    assert_eq!(
        room_members(&c.nodes[0].take_frames(viewer)[0]),
        1,
        "own count"
    );
}

/// Found by tests/sim_cluster.rs: a resend on the same node while the first copy waits
/// for Redis is told to wait (not ACKed from a guess), and with the link down a DEDUP
/// SEND is refused even to a user on this node (a resend through another node could not
/// know it was delivered).
#[test]
fn dedup_waits_for_redis_and_needs_the_link() {
    let mut c = Cluster::new(2);
    let alice = c.nodes[0].login(1);
    let carol = c.nodes[0].login(3);
    c.settle();
    let dedup = |msg: u64, to: u64| send(msg, to, b"d").with_flags(Flags::DEDUP);

    // Claim answered, PUBLISH not yet: a resend here waits.
    c.nodes[0].send_frame(alice, dedup(1, 3));
    let mut ops = Vec::new();
    c.nodes[0].relay.take_cluster_ops(&mut ops);
    let ClusterOp::Claim { key, token, .. } = &ops[0] else {
        panic!("{ops:?}");
    };
    c.keys.insert(key.clone(), token.clone());
    c.nodes[0]
        .relay
        .handle_cluster_reply(ClusterReply::Bulk(None), c.now);
    assert_eq!(c.nodes[0].take_frames(carol).len(), 1, "delivered here");
    c.nodes[0].send_frame(alice, dedup(1, 3));
    c.nodes[0].expect_error(alice, ErrorCode::ClusterUnavailable);

    // The link goes down before Redis answers the PUBLISH: answered from what this node
    // knows (carol got it here), and that answer is written to Redis once the link is up.
    c.nodes[0].relay.handle_cluster_down();
    assert_eq!(ack_count(&c.nodes[0].take_frames(alice)[0]), 1);
    c.nodes[0].send_frame(alice, dedup(2, 3));
    c.nodes[0].expect_error(alice, ErrorCode::ClusterUnavailable);
    c.nodes[0].send_frame(alice, send(3, 3, b"plain"));
    assert_eq!(ack_count(&c.nodes[0].take_frames(alice)[0]), 1);
    assert_eq!(c.nodes[0].take_frames(carol).len(), 1);

    c.nodes[0].relay.handle_cluster_up();
    c.settle();
    let key = dedup_key(UserId(1), MessageId(1));
    assert_eq!(c.keys.get(&key).map(String::as_str), Some("1"));
    let bob = c.nodes[1].login(1);
    c.settle();
    c.nodes[1].send_frame(bob, dedup(1, 3));
    c.settle();
    assert_eq!(ack_count(&c.nodes[1].take_frames(bob)[0]), 1);
    assert!(
        c.nodes[0].take_frames(carol).is_empty(),
        "not delivered twice"
    );
}

/// The SENDs of one read to one user go out in one PUBLISH; each gets its own ACK with
/// the count Redis gave the batch, and the other node delivers them in order.
#[test]
fn a_turns_sends_to_one_user_share_one_publish() {
    let mut c = Cluster::new(2);
    let alice = c.nodes[0].login(1);
    let bob = c.nodes[1].login(2);
    c.settle();
    let mut bytes = Vec::new();
    for msg in 10..15u64 {
        bytes.extend_from_slice(&send(msg, 2, b"batched").to_bytes());
    }
    c.nodes[0].feed(alice, &bytes);
    let mut ops = Vec::new();
    c.nodes[0].relay.take_cluster_ops(&mut ops);
    assert_eq!(ops.len(), 1, "{ops:?}");
    let ClusterOp::Publish(channel, payload) = ops.pop().unwrap() else {
        panic!("not a PUBLISH");
    };
    let name = channel.name();
    c.nodes[1]
        .relay
        .handle_cluster_message(name.as_bytes(), &payload);
    c.nodes[0]
        .relay
        .handle_cluster_reply(ClusterReply::Integer(1), c.now);
    let got: Vec<u64> = c.nodes[1]
        .take_frames(bob)
        .iter()
        .map(|f| f.msg_id.0)
        .collect();
    assert_eq!(got, vec![10, 11, 12, 13, 14]);
    let acks = c.nodes[0].take_frames(alice);
    assert_eq!(acks.len(), 5);
    assert!(acks.iter().all(|a| ack_count(a) == 1));
}

/// A connection's INBOX_ACKs reach Redis one at a time and only when they move its place
/// (a flood of them costs Redis little); a second INBOX_SYNC while one is on its way is
/// refused with RATE_LIMITED, and the first is answered.
#[test]
fn inbox_acks_are_coalesced_and_syncs_go_one_at_a_time() {
    let mut c = Cluster::new(2);
    let alice = c.nodes[0].login(1);
    let bob = c.nodes[1].login(2);
    c.settle();
    c.nodes[1].send_frame(bob, Frame::inbox_sync(MessageId(5), 0, 0));
    c.nodes[1].send_frame(bob, Frame::inbox_sync(MessageId(6), 0, 0));
    let refused = c.nodes[1].expect_error(bob, ErrorCode::RateLimited);
    assert_eq!(refused.msg_id, MessageId(6));
    c.settle();
    let got = c.nodes[1].take_frames(bob);
    assert_eq!(
        (got[0].opcode, got[0].msg_id),
        (Opcode::InboxState, MessageId(5))
    );
    for msg in 1..=3 {
        c.nodes[0].send_frame(alice, stored(msg, 2, b"m"));
    }
    c.settle();
    let seqs: Vec<u64> = stored_payloads(&c.nodes[1].take_frames(bob))
        .iter()
        .map(|m| m.0)
        .collect();
    assert_eq!(seqs, [1, 2, 3]);
    for upto in [1, 1, 2, 3, 3, 2] {
        c.nodes[1].send_frame(bob, Frame::inbox_ack(MessageId(10 + upto), upto));
    }
    c.settle();
    assert_eq!(
        c.inbox.acks,
        [(2, 1), (2, 3)],
        "the first, then the highest waiting"
    );
    c.nodes[1].send_frame(bob, Frame::inbox_ack(MessageId(20), 3));
    c.settle();
    assert_eq!(c.inbox.acks.len(), 2, "nothing new to acknowledge");
}
