//! Deterministic simulation of cluster mode (protocol.md, section 18): 2 to 4 relay cores
//! joined by an in-memory Redis, 3 to 6 users with one raw client each, and faults, all
//! drawn from one seed. No threads, no real time, no entropy: a seed replays exactly.
//!
//! **The model.**
//! - Redis: channels -> subscribed nodes; a key store with the semantics of
//!   `SET key p NX GET PX ttl` (Claim), `SET key value PX ttl` (Remember) and `DEL`
//!   (Forget); room counts are answered with 0. Each node has its own queue of commands
//!   taken from the core and not yet processed, and of answers processed and not yet
//!   delivered back: Redis processes a random number of a node's commands per step, in
//!   order, and a random number of answers reach the node per step. A PUBLISH reaches every
//!   node subscribed at the moment Redis processes it, at once and in order.
//! - Stored delivery: the inbox functions are `sim/inbox_model.rs` (the model the core
//!   tests use: store with DEDUP and the sender's copy, sync, ack, fetch of 64), run in
//!   order with the node's other commands; a store's notices reach the nodes subscribed
//!   when it runs, at once, like a PUBLISH. So a notice may reach a node before answers
//!   Redis produced earlier (they travel on the command connection, the notice on the
//!   subscriber connection).
//! - SUBSCRIBE confirmations (`handle_cluster_subscribed`) reach the node 0 to
//!   `confirm_delay` steps after Redis processed the SUBSCRIBE, in order; a message on the
//!   subscriber connection (PUBLISH or notice) first delivers the confirmations ahead of
//!   it, as Redis sends them in order.
//! - Link faults: a node's link goes down (`handle_cluster_down`; Redis forgets its
//!   subscriptions; its queued commands, undelivered answers and confirmations are lost)
//!   and comes back after some steps (`handle_cluster_up`).
//! - Client faults: a connection drops (`handle_closed`, its unread output lost); the
//!   client reconnects to a random node after some steps, logs in again and resends every
//!   DEDUP message it has no final answer for (same msg_id, as the SDK does).
//! - Workload: SENDs to random users (the sender included, online or not), most with
//!   DEDUP, some without, and STORED ones, always with DEDUP as the SDK sends them. A DEDUP
//!   SEND answered `CLUSTER_UNAVAILABLE` is sent again some steps later;
//!   `RECIPIENT_OFFLINE` is final. Each attempt's payload names its connection and its
//!   sequence number on that connection, so a DELIVER or INBOX_DELIVER says which attempt
//!   it came from. After each LOGIN_OK a client sends INBOX_SYNC with the store epoch and
//!   the highest stored seq it has received (0 and 0 at first); one answered
//!   `CLUSTER_UNAVAILABLE` is sent again some steps later; now and then it sends
//!   INBOX_ACK of everything it has. Each user has one device (LOGIN without DEVICE).
//!
//! **The invariants**, checked as events happen (every step) and at the end:
//! 1. `answer`: every attempt on a live connection gets exactly one answer (ACK or ERROR),
//!    never an answer to a msg_id with no attempt waiting on that connection; the only
//!    errors are RECIPIENT_OFFLINE, CLUSTER_UNAVAILABLE and RECIPIENT_SLOW; an ACK never
//!    counts 0 (no connection anywhere is RECIPIENT_OFFLINE). A STORED SEND is answered
//!    ACK, counting the nodes Redis's store counted (0 included), or CLUSTER_UNAVAILABLE
//!    (no INBOX_FULL: the model has no limits). `same-answer`: the final
//!    answers (ACK or refusal) of one DEDUP message agree ("a resend through any node is
//!    answered as its first copy was"), unless a duplicate was allowed (below).
//! 2. `duplicate`: a message is delivered at most once to each recipient connection,
//!    except a DEDUP message one of whose attempts was answered CLUSTER_UNAVAILABLE after
//!    Redis had processed that attempt's PUBLISH ("it may have reached other nodes
//!    already"; its resend may be delivered again).
//! 3. `acked-not-delivered`: an ACK with a count > 0 means some connection of the
//!    recipient gets the message, unless one of them closed after it was first sent, or
//!    some node counted by Redis had no connection of the recipient (a subscription on its
//!    way out). `offline-while-subscribed`: RECIPIENT_OFFLINE while some node's
//!    subscription to the recipient was in Redis from before the message was first sent
//!    until the answer.
//! 4. `order`: DELIVERs from one sender connection to one recipient connection come in
//!    the order the sender sent them.
//! 5. `liveness`: once every link is up and the faults stop, within `QUIET_STEPS` steps
//!    every client's outstanding messages are answered, every client is logged in and
//!    synced, and every connection has each message its user's inbox holds after the seq
//!    its replay started after.
//! 6. `sync-answer`: every INBOX_SYNC on a live connection gets exactly one answer
//!    (INBOX_STATE, or ERROR CLUSTER_UNAVAILABLE), and no INBOX_DELIVER comes before the
//!    connection's INBOX_STATE.
//! 7. `inbox-order`: after each INBOX_STATE, a connection's INBOX_DELIVER seqs are
//!    strictly increasing and above the last seq it synced with (0 when its epoch was not
//!    the store's). `inbox-gap`: an INBOX_DELIVER never skips a seq the inbox still holds
//!    (one device per user: only its own acknowledgements delete).
//! 8. `stored-lost`: at the end every client logs in again on a fresh connection and
//!    syncs with 0/0; every STORED message ever ACKed must then have reached its
//!    recipient, over the run or in that replay. `stored-twice`: Redis stored one message
//!    at most once, unless one of its attempts was answered CLUSTER_UNAVAILABLE after
//!    Redis had run its store (it may or may not be stored).
//!
//! Also `protocol`: frames the client does not expect, DELIVERs to the wrong user or of
//! messages nobody sent (or stored), a seq numbering two messages, a refused connection or
//! LOGIN, ops queued while the link is down.
//!
//! **Running it.** `cargo test --test sim_cluster` sweeps `DEFAULT_SEEDS` seeds;
//! `SIM_CLUSTER_SEEDS=n` sweeps n (`SIM_CLUSTER_FIRST_SEED` moves the window);
//! `SIM_CLUSTER_SEED=n` replays one seed and prints the end of its trace on failure
//! (`SIM_CLUSTER_TRACE=1`: the whole trace). See `Knobs` for the exploration switches.

#[path = "sim/inbox_model.rs"]
mod inbox_model;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use imrelay::proto::decode::decode_frame;
use imrelay::proto::{ErrorCode, Flags, Frame, MessageId, Opcode, UserId};
use imrelay::relay::{
    store_answers, Channel, ClusterOp, ClusterReply, Config, InboxOp, Relay, NO_ORIGIN,
};

use imrelay::ConnId;
use inbox_model::InboxModel;

const DEFAULT_SEEDS: u64 = 500;
/// Steps after the faults stop within which every outstanding message must be answered.
const QUIET_STEPS: u64 = 400;
/// One step of simulated time.
const STEP: Duration = Duration::from_millis(1);
const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// Trace lines printed for a failing replay.
const TRACE_TAIL: usize = 400;

// ---- randomness --------------------------------------------------------------------------

/// SplitMix64: the simulation's one random source.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed ^ 0xc105_7e20_5eed_0001)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }

    fn index(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    fn chance(&mut self, p: f64) -> bool {
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    }

    /// Uniform in `lo..hi`.
    fn float(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64)
    }
}

// ---- the world ---------------------------------------------------------------------------

/// What the seed decides about a run.
#[derive(Debug)]
struct Params {
    nodes: usize,
    users: usize,
    steps: u64,
    /// Per client and step: a new SEND.
    p_send: f64,
    /// Share of SENDs with DEDUP (of those not STORED).
    p_dedup: f64,
    /// Share of SENDs with STORED (always with DEDUP, as the SDK sends them).
    p_stored: f64,
    /// Per synced client and step: an INBOX_ACK of everything it has.
    p_inbox_ack: f64,
    /// Most steps a SUBSCRIBE's confirmation takes to reach the node after Redis
    /// processed it.
    confirm_delay: u64,
    /// Per client and step: reads its output.
    p_read: f64,
    /// Per step: one node's link goes down.
    p_link_down: f64,
    /// Per step: one client's connection drops.
    p_drop: f64,
    /// Most commands Redis processes per node and step (at least 1).
    redis_ops: u64,
    /// Most answers that reach a node per step (at least 1).
    redis_replies: u64,
    /// Per frame a client sends: the node's ops wait for the end of the step (so a
    /// step's frames share a loop turn: stored SENDs to one user go in one store).
    p_same_turn: f64,
}

impl Params {
    fn draw(rng: &mut Rng) -> Params {
        Params {
            nodes: rng.range(2, 4) as usize,
            users: rng.range(3, 6) as usize,
            steps: rng.range(200, 500),
            p_send: rng.float(0.03, 0.2),
            p_dedup: rng.float(0.6, 0.95),
            p_read: rng.float(0.2, 0.9),
            p_link_down: rng.float(0.0, 0.03),
            p_drop: rng.float(0.0, 0.04),
            redis_ops: rng.range(1, 4),
            redis_replies: rng.range(1, 4),
            p_stored: rng.float(0.2, 0.7),
            p_same_turn: rng.float(0.0, 0.9),
            p_inbox_ack: rng.float(0.0, 0.2),
            confirm_delay: rng.range(0, 10),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    Ack(u32),
    Err(u16),
}

impl Answer {
    fn is_final(self) -> bool {
        self != Answer::Err(ErrorCode::ClusterUnavailable as u16)
    }
}

/// A message: `(sender user, msg_id)`.
type Key = (u64, u64);

#[derive(Debug)]
struct Attempt {
    conn: u64,
    seq: u64,
    sent: u64,
    /// Redis processed this attempt's PUBLISH (a STORED one: ran its store function,
    /// whether it stored or answered from DEDUP).
    published: bool,
    answer: Option<Answer>,
}

#[derive(Debug)]
struct Msg {
    to: u64,
    dedup: bool,
    /// A STORED SEND (always with DEDUP).
    stored: bool,
    /// STORED: how many times Redis's store function stored it (not answering from
    /// DEDUP), and the nodes each store counted.
    stores: u32,
    store_nodes: Vec<u32>,
    /// STORED: recipient connection -> INBOX_DELIVERs it got.
    inbox_delivered: BTreeMap<u64, u32>,
    first_sent: u64,
    attempts: Vec<Attempt>,
    /// The first final answer.
    final_answer: Option<Answer>,
    /// An attempt was answered CLUSTER_UNAVAILABLE after Redis processed its PUBLISH.
    dup_allowed: bool,
    /// Redis counted a node that had no connection of the recipient.
    stale: bool,
    /// Recipient connection -> DELIVERs it got.
    delivered: BTreeMap<u64, u32>,
}

struct ConnInfo {
    user: u64,
    node: usize,
    id: ConnId,
    closed: Option<u64>,
    buf: BytesMut,
    /// msg_id -> index of its attempt waiting for an answer.
    outstanding: BTreeMap<u64, usize>,
    next_seq: u64,
    login_msg: u64,
    logged_in: bool,
    /// The INBOX_SYNC waiting for its answer: (msg_id, epoch, last_seq).
    sync: Option<(u64, u64, u64)>,
    /// Got an INBOX_STATE.
    synced: bool,
    /// The last INBOX_STATE's replay starts after this.
    floor: u64,
    /// The last INBOX_DELIVER's seq since the last INBOX_STATE (`floor` before any).
    last_inbox: u64,
    /// Seqs of the INBOX_DELIVERs since the last INBOX_STATE.
    got: BTreeSet<u64>,
    /// The connection of the end's check, which syncs with 0/0.
    final_replay: bool,
}

struct Client {
    user: u64,
    conn: Option<u64>,
    reconnect_at: u64,
    next_msg: u64,
    /// DEDUP messages without a final answer.
    unanswered: BTreeSet<u64>,
    /// DEDUP messages answered CLUSTER_UNAVAILABLE -> when to send them again.
    retry_at: BTreeMap<u64, u64>,
    /// The store epoch and the highest stored seq it received (what an INBOX_SYNC
    /// carries), and the last INBOX_ACK it sent.
    epoch: u64,
    last_seq: u64,
    acked: u64,
    /// An INBOX_SYNC answered CLUSTER_UNAVAILABLE: when to sync again.
    sync_retry_at: Option<u64>,
}

struct Node {
    relay: Relay,
    up: bool,
    down_until: u64,
    /// Commands taken from the core, not yet processed by Redis.
    ops: VecDeque<ClusterOp>,
    /// Answers Redis produced that have not reached the node yet.
    /// Each with, for the answer to a FETCH, (user, whether it is empty).
    replies: VecDeque<(ClusterReply, Option<(u64, bool)>)>,
    /// SUBSCRIBE confirmations on their way to the node: (due step, channel), in order.
    confirms: VecDeque<(u64, String)>,
}

#[derive(Default)]
struct Redis {
    /// Channel name -> node -> the step its subscription reached Redis.
    subs: BTreeMap<String, BTreeMap<usize, u64>>,
    /// Key -> (value, expiry in ms of simulated time).
    keys: BTreeMap<String, (String, u64)>,
    /// The inboxes of stored delivery (the functions of `cluster_inbox.lua`).
    inbox: InboxModel,
}

#[derive(Debug)]
struct Failure {
    invariant: &'static str,
    message: String,
}

#[derive(Default, Debug)]
struct Stats {
    sends: u64,
    attempts: u64,
    delivers: u64,
    acks: u64,
    offline: u64,
    unavailable: u64,
    slow: u64,
    link_downs: u64,
    drops: u64,
    allowed_duplicates: u64,
    stored_sends: u64,
    stored_acks: u64,
    stores: u64,
    syncs: u64,
    syncs_unavailable: u64,
    inbox_states: u64,
    inbox_delivers: u64,
    inbox_acks: u64,
    confirms: u64,
}

struct World {
    rng: Rng,
    p: Params,
    step: u64,
    base: Instant,
    nodes: Vec<Node>,
    redis: Redis,
    clients: Vec<Client>,
    conns: BTreeMap<u64, ConnInfo>,
    next_gid: u64,
    msgs: BTreeMap<Key, Msg>,
    /// (sender connection, recipient connection) -> last delivered (seq, message).
    order: BTreeMap<(u64, u64), (u64, Key)>,
    /// (user, stored seq) -> the message it numbered.
    user_seqs: BTreeMap<(u64, u64), Key>,
    /// The end's check: every client on a fresh connection syncing with 0/0.
    final_phase: bool,
    /// Stored notices that reached a node before an empty FETCH answer of the same user
    /// Redis had produced earlier: (node, user, seq, step).
    crossings: Vec<(usize, u64, u64, u64)>,
    failure: Option<Failure>,
    trace: Vec<String>,
    full_trace: bool,
    knobs: Knobs,
    stats: Stats,
}

/// Exploration switches that leave a class of faults out (the invariants stay as they
/// are): `SIM_CLUSTER_NO_LINK_FAULTS=1`, `SIM_CLUSTER_NO_DROPS=1`, and
/// `SIM_CLUSTER_DROP_IDLE_ONLY=1` (only connections with no SEND waiting for its answer
/// drop); and `SIM_CLUSTER_UNORDERED_CONFIRMS=1`, which lets a message on the subscriber
/// connection overtake an earlier SUBSCRIBE confirmation (Redis does not: by default a
/// message delivered to a node first delivers the confirmations ahead of it);
/// `SIM_CLUSTER_ORDERED_REPLIES=1`, which delivers the answers Redis produced for a node
/// before a message it then sent the node (as if commands and subscriptions shared one
/// connection; the real driver has two, which a message may cross).
#[derive(Clone, Copy, Default)]
struct Knobs {
    no_link_faults: bool,
    no_drops: bool,
    drop_idle_only: bool,
    unordered_confirms: bool,
    ordered_replies: bool,
}

impl Knobs {
    fn from_env() -> Knobs {
        let on = |name: &str| std::env::var(name).is_ok_and(|v| v == "1");
        Knobs {
            no_link_faults: on("SIM_CLUSTER_NO_LINK_FAULTS"),
            no_drops: on("SIM_CLUSTER_NO_DROPS"),
            drop_idle_only: on("SIM_CLUSTER_DROP_IDLE_ONLY"),
            unordered_confirms: on("SIM_CLUSTER_UNORDERED_CONFIRMS"),
            ordered_replies: on("SIM_CLUSTER_ORDERED_REPLIES"),
        }
    }
}

fn user_channel(user: u64) -> String {
    Channel::User(UserId(user)).name()
}

impl World {
    fn new(seed: u64, full_trace: bool) -> World {
        let mut rng = Rng::new(seed);
        let p = Params::draw(&mut rng);
        let base = Instant::now();
        let config = Config::default();
        let mut nodes = Vec::new();
        for i in 0..p.nodes {
            let mut relay = Relay::new(config.clone(), base, 1_700_000_000_000, seed + i as u64);
            relay.enable_cluster(100 + i as u64);
            nodes.push(Node {
                relay,
                up: false,
                down_until: 0,
                ops: VecDeque::new(),
                replies: VecDeque::new(),
                confirms: VecDeque::new(),
            });
        }
        let clients = (0..p.users)
            .map(|u| Client {
                user: u as u64 + 1,
                conn: None,
                reconnect_at: 0,
                next_msg: 1,
                unanswered: BTreeSet::new(),
                retry_at: BTreeMap::new(),
                epoch: 0,
                last_seq: 0,
                acked: 0,
                sync_retry_at: None,
            })
            .collect();
        let mut w = World {
            rng,
            p,
            step: 0,
            base,
            nodes,
            redis: Redis::default(),
            clients,
            conns: BTreeMap::new(),
            next_gid: 1,
            msgs: BTreeMap::new(),
            order: BTreeMap::new(),
            user_seqs: BTreeMap::new(),
            final_phase: false,
            crossings: Vec::new(),
            failure: None,
            trace: Vec::new(),
            full_trace,
            knobs: Knobs::from_env(),
            stats: Stats::default(),
        };
        w.log(format!("seed {seed}: {:?}", w.p));
        for i in 0..w.nodes.len() {
            w.link_up(i);
        }
        w
    }

    fn now(&self) -> Instant {
        self.base + STEP * self.step as u32
    }

    fn now_ms(&self) -> u64 {
        self.step * STEP.as_millis() as u64
    }

    fn log(&mut self, line: String) {
        let line = format!("[{}] {line}", self.step);
        if self.full_trace {
            println!("{line}");
        }
        self.trace.push(line);
    }

    fn fail(&mut self, invariant: &'static str, message: String) {
        self.log(format!("VIOLATION {invariant}: {message}"));
        if self.failure.is_none() {
            self.failure = Some(Failure { invariant, message });
        }
    }

    // ---- nodes and Redis -----------------------------------------------------------------

    /// The driver's end of a turn: moves what node `i` asks of Redis into its queue.
    fn pump(&mut self, i: usize) {
        let mut ops = Vec::new();
        self.nodes[i].relay.take_cluster_ops(&mut ops);
        if ops.is_empty() {
            return;
        }
        if !self.nodes[i].up {
            self.fail(
                "protocol",
                format!("node {i} queued {} ops while its link is down", ops.len()),
            );
            return;
        }
        for op in ops {
            self.log(format!("node {i} -> redis: {}", op_label(&op)));
            self.nodes[i].ops.push_back(op);
        }
    }

    fn link_down(&mut self, i: usize) {
        self.stats.link_downs += 1;
        let n = &mut self.nodes[i];
        n.up = false;
        let lost = (n.ops.len(), n.replies.len(), n.confirms.len());
        n.ops.clear();
        n.replies.clear();
        n.confirms.clear();
        for subs in self.redis.subs.values_mut() {
            subs.remove(&i);
        }
        self.log(format!(
            "node {i}: link DOWN ({} ops, {} answers, {} confirmations lost)",
            lost.0, lost.1, lost.2
        ));
        // A PUBLISH Redis processed whose answer the link lost: the node cannot know the
        // first copy went out, forgets its DEDUP key, and a resend may be delivered again
        // (protocol.md, section 18), whether or not its sender is still there to be told.
        let conns = &self.conns;
        let mut allowed = Vec::new();
        for (key, m) in self.msgs.iter_mut() {
            let lost_answer = m.attempts.iter().any(|a| {
                a.published && a.answer.is_none() && conns.get(&a.conn).is_some_and(|c| c.node == i)
            });
            if m.dedup && lost_answer && !m.dup_allowed {
                m.dup_allowed = true;
                allowed.push(*key);
            }
        }
        for key in allowed {
            self.log(format!(
                "{key:?}: may be delivered again (answer lost with the link)"
            ));
        }
        self.nodes[i].relay.handle_cluster_down();
        self.pump(i);
    }

    fn link_up(&mut self, i: usize) {
        self.nodes[i].up = true;
        self.log(format!("node {i}: link UP"));
        self.nodes[i].relay.handle_cluster_up();
        self.pump(i);
    }

    /// Redis processes node `i`'s oldest command.
    fn redis_process(&mut self, i: usize) {
        let Some(op) = self.nodes[i].ops.pop_front() else {
            return;
        };
        let now_ms = self.now_ms();
        let fetch_user = match &op {
            ClusterOp::Inbox(InboxOp::Fetch { user, .. }) => Some(user.0),
            _ => None,
        };
        let reply = match op {
            ClusterOp::Subscribe(ch) => {
                let step = self.step;
                self.redis
                    .subs
                    .entry(ch.name())
                    .or_default()
                    .entry(i)
                    .or_insert(step);
                // Confirmed on the subscriber connection some steps later, in order.
                let delay = self.rng.range(0, self.p.confirm_delay);
                let confirms = &mut self.nodes[i].confirms;
                let due = confirms
                    .back()
                    .map_or(step + delay, |&(d, _)| d.max(step + delay));
                confirms.push_back((due, ch.name()));
                None
            }
            ClusterOp::Unsubscribe(ch) => {
                if let Some(subs) = self.redis.subs.get_mut(&ch.name()) {
                    subs.remove(&i);
                }
                None
            }
            ClusterOp::Publish(ch, payload) => {
                let name = ch.name();
                let receivers: Vec<usize> = self
                    .redis
                    .subs
                    .get(&name)
                    .map(|s| s.keys().copied().collect())
                    .unwrap_or_default();
                self.note_publish(i, &payload, &receivers);
                for &j in &receivers {
                    self.deliver_message(j, &name, &payload);
                }
                Some(ClusterReply::Integer(receivers.len() as i64))
            }
            ClusterOp::Claim { key, token, ttl_ms } => {
                self.expire_key(&key, now_ms);
                let old = self.redis.keys.get(&key).map(|(v, _)| v.clone());
                if old.is_none() {
                    self.redis
                        .keys
                        .insert(key.clone(), (token, now_ms + ttl_ms));
                }
                self.log(format!("redis: claim {key}: was {old:?}"));
                Some(ClusterReply::Bulk(old.map(Bytes::from)))
            }
            ClusterOp::Remember { key, value, ttl_ms } => {
                self.log(format!("redis: {key} = {value}"));
                self.redis.keys.insert(key, (value, now_ms + ttl_ms));
                Some(ClusterReply::Simple)
            }
            ClusterOp::Forget { key, token } => {
                self.expire_key(&key, now_ms);
                let ours = self.redis.keys.get(&key).is_some_and(|(v, _)| *v == token);
                if ours {
                    self.redis.keys.remove(&key);
                }
                let n = i64::from(ours);
                self.log(format!("redis: DEL {key} if {token}: {n}"));
                Some(ClusterReply::Integer(n))
            }
            ClusterOp::Ping => Some(ClusterReply::Simple),
            ClusterOp::SetRoomCount { .. } => Some(ClusterReply::Integer(1)),
            ClusterOp::RoomCount { .. } => Some(ClusterReply::Integer(0)),
            ClusterOp::Inbox(op) => Some(self.redis_inbox(i, op)),
        };
        if let Some(reply) = reply {
            let tag =
                fetch_user.map(|u| (u, matches!(&reply, ClusterReply::Array(v) if v.is_empty())));
            self.nodes[i].replies.push_back((reply, tag));
        }
    }

    /// A message on node `j`'s subscriber connection (a PUBLISH or a stored notice): the
    /// SUBSCRIBE confirmations ahead of it first, as Redis sends them in order.
    fn deliver_message(&mut self, j: usize, channel: &str, payload: &Bytes) {
        if !self.knobs.unordered_confirms {
            self.deliver_confirms(j, u64::MAX);
        }
        if self.knobs.ordered_replies {
            while !self.nodes[j].replies.is_empty() {
                self.redis_reply(j);
            }
        }
        self.nodes[j]
            .relay
            .handle_cluster_message(channel.as_bytes(), payload);
        self.pump(j);
    }

    /// Node `i` gets the SUBSCRIBE confirmations due by step `upto`.
    fn deliver_confirms(&mut self, i: usize, upto: u64) {
        while let Some(&(due, _)) = self.nodes[i].confirms.front() {
            if due > upto {
                break;
            }
            let (_, name) = self.nodes[i].confirms.pop_front().expect("front");
            self.stats.confirms += 1;
            self.log(format!("redis -> node {i}: subscribe {name} confirmed"));
            self.nodes[i]
                .relay
                .handle_cluster_subscribed(name.as_bytes());
            self.pump(i);
        }
    }

    /// An inbox function run for node `i` by the model: its notices reach the nodes
    /// subscribed now; the ledger learns which attempt a store carried.
    fn redis_inbox(&mut self, i: usize, op: InboxOp) -> ClusterReply {
        // A store's messages, in order: (key, attempt) each.
        let store: Option<Vec<_>> = match &op {
            InboxOp::Store(r) => Some(
                r.messages
                    .iter()
                    .map(|m| {
                        let msg = u64::from_be_bytes(m.header[8..16].try_into().expect("8 bytes"));
                        ((r.sender.0, msg), parse_payload(&m.payload))
                    })
                    .collect(),
            ),
            _ => None,
        };
        let mut subscribed: HashMap<String, HashSet<usize>> = self
            .redis
            .subs
            .iter()
            .map(|(name, nodes)| (name.clone(), nodes.keys().copied().collect()))
            .collect();
        let label = op_label(&ClusterOp::Inbox(op.clone()));
        let reply = self.redis.inbox.handle(i, op, &mut subscribed);
        if let Some(messages) = store {
            let answers = match store_answers(reply.answer.clone(), messages.len()) {
                Ok(answers) => answers,
                Err(other) => {
                    self.fail(
                        "protocol",
                        format!("a store of {} answered {other:?}", messages.len()),
                    );
                    return reply.answer;
                }
            };
            for ((key, attempt), answer) in messages.into_iter().zip(answers) {
                self.note_store(i, key, attempt, &answer);
            }
        } else {
            let answer = match &reply.answer {
                ClusterReply::Array(items) if label.starts_with("FETCH") => {
                    let seqs: Vec<u64> = items
                        .iter()
                        .filter_map(|e| model_entry(e).map(|(seq, _)| seq))
                        .collect();
                    format!("seqs {seqs:?}")
                }
                other => format!("{other:?}"),
            };
            self.log(format!("redis: {label} for node {i}: {answer}"));
        }
        // The model's notices come in hash order across nodes; each node's stay in order.
        let mut notices = reply.notices;
        notices.sort_by_key(|n| n.0);
        for (j, channel, payload) in notices {
            self.log(format!("redis: notice on {channel} to node {j}"));
            let user = channel
                .strip_prefix("imrelay:u:")
                .and_then(|u| u.parse::<u64>().ok());
            let seq = payload
                .get(16 + 32..16 + 40)
                .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")));
            if let (Some(user), Some(seq)) = (user, seq) {
                let crossing = self.nodes[j]
                    .replies
                    .iter()
                    .any(|(_, tag)| *tag == Some((user, true)));
                if crossing {
                    self.crossings.push((j, user, seq, self.step));
                    self.log(format!(
                        "redis: the notice of user {user}'s seq {seq} overtakes an empty FETCH \
                         answer on its way to node {j}"
                    ));
                }
            }
            self.deliver_message(j, &channel, &payload);
        }
        reply.answer
    }

    /// Redis ran the store function for `key`'s attempt `attempt` (conn, seq).
    fn note_store(
        &mut self,
        from: usize,
        key: Key,
        attempt: Option<(u64, u64)>,
        answer: &ClusterReply,
    ) {
        let items = match answer {
            ClusterReply::Array(items) => items.as_slice(),
            _ => &[],
        };
        let text = |v: Option<&ClusterReply>| match v {
            Some(ClusterReply::Bulk(Some(b))) => String::from_utf8_lossy(b).into_owned(),
            _ => String::new(),
        };
        let int = |v: Option<&ClusterReply>| match v {
            Some(ClusterReply::Integer(n)) => *n,
            _ => -1,
        };
        let kind = text(items.first());
        let Some(m) = self.msgs.get_mut(&key).filter(|m| m.stored) else {
            self.fail("protocol", format!("node {from} stored unknown {key:?}"));
            return;
        };
        let Some((conn, seq)) = attempt else {
            self.fail(
                "protocol",
                format!("node {from} stored {key:?} with a bad payload"),
            );
            return;
        };
        if let Some(a) = m
            .attempts
            .iter_mut()
            .find(|a| a.conn == conn && a.seq == seq)
        {
            a.published = true;
        }
        let line = match kind.as_str() {
            "ok" => {
                let (stored_seq, nodes) = (int(items.get(2)), int(items.get(3)));
                m.stores += 1;
                m.store_nodes.push(nodes as u32);
                self.stats.stores += 1;
                format!(
                    "redis: store {key:?} (conn {conn} seq {seq}) from node {from}: seq \
                     {stored_seq}, {nodes} nodes (store {})",
                    m.stores
                )
            }
            _ => format!(
                "redis: store {key:?} (conn {conn} seq {seq}) from node {from}: {kind} {:?}",
                text(items.get(1))
            ),
        };
        self.log(line);
    }

    fn expire_key(&mut self, key: &str, now_ms: u64) {
        if self
            .redis
            .keys
            .get(key)
            .is_some_and(|(_, expiry)| *expiry <= now_ms)
        {
            self.redis.keys.remove(key);
        }
    }

    /// Node `i` gets Redis's oldest undelivered answer.
    fn redis_reply(&mut self, i: usize) {
        let Some((reply, _)) = self.nodes[i].replies.pop_front() else {
            return;
        };
        self.log(format!("redis -> node {i}: {reply:?}"));
        let now = self.now();
        self.nodes[i].relay.handle_cluster_reply(reply, now);
        self.pump(i);
    }

    /// The ledger's view of a PUBLISH Redis processes: which attempt it carries, and
    /// whether Redis counts a node without a connection of the recipient.
    fn note_publish(&mut self, from: usize, payload: &Bytes, receivers: &[usize]) {
        // A PUBLISH carries every frame one loop turn sent on its channel.
        let Some(frames) = published_frames(payload) else {
            self.fail("protocol", format!("node {from} published {payload:?}"));
            return;
        };
        for frame in frames {
            self.note_published_frame(from, &frame, receivers);
        }
    }

    /// One frame of a PUBLISH: which attempt it carries, and whether Redis counts a node
    /// without a connection of the recipient.
    fn note_published_frame(&mut self, from: usize, frame: &Frame, receivers: &[usize]) {
        let Some((conn, seq)) = parse_payload(&frame.payload) else {
            return; // not a SEND's (nothing else is sent)
        };
        let key = (frame.source.0, frame.msg_id.0);
        let user = frame.target.0;
        let stale = receivers
            .iter()
            .filter(|&&j| j != from)
            .all(|&j| self.nodes[j].relay.devices(UserId(user)).is_empty());
        self.log(format!(
            "redis: publish {key:?} (conn {conn} seq {seq}) from node {from} to nodes {receivers:?}"
        ));
        let Some(msg) = self.msgs.get_mut(&key) else {
            self.fail("protocol", format!("publish of unknown message {key:?}"));
            return;
        };
        msg.stale |= stale;
        if let Some(a) = msg
            .attempts
            .iter_mut()
            .find(|a| a.conn == conn && a.seq == seq)
        {
            a.published = true;
        }
    }

    // ---- clients -------------------------------------------------------------------------

    fn feed(&mut self, gid: u64, bytes: &[u8]) {
        let (node, id) = {
            let c = &self.conns[&gid];
            (c.node, c.id)
        };
        let now = self.now();
        self.nodes[node].relay.handle_input(id, bytes, now);
        if !self.rng.chance(self.p.p_same_turn) {
            self.pump(node);
        }
    }

    fn connect(&mut self, client: usize, node: usize) {
        let now = self.now();
        let id = match self.nodes[node].relay.handle_open(now, LOCAL) {
            Ok(id) => id,
            Err(_) => {
                self.fail("protocol", format!("node {node} refused a connection"));
                return;
            }
        };
        let gid = self.next_gid;
        self.next_gid += 1;
        let c = &mut self.clients[client];
        let user = c.user;
        let login_msg = c.next_msg;
        c.next_msg += 1;
        c.conn = Some(gid);
        self.conns.insert(
            gid,
            ConnInfo {
                user,
                node,
                id,
                closed: None,
                buf: BytesMut::new(),
                outstanding: BTreeMap::new(),
                next_seq: 1,
                login_msg,
                logged_in: false,
                sync: None,
                synced: false,
                floor: 0,
                last_inbox: 0,
                got: BTreeSet::new(),
                final_replay: self.final_phase,
            },
        );
        self.log(format!("user {user}: conn {gid} to node {node} ({id})"));
        let login = Frame::login(MessageId(login_msg), UserId(user), b"");
        self.feed(gid, &login.to_bytes());
        // Resend what has no final answer (the SDK does, with the same msg_id).
        let c = &mut self.clients[client];
        c.retry_at.clear();
        c.sync_retry_at = None;
        let resend: Vec<u64> = c.unanswered.iter().copied().collect();
        for msg in resend {
            self.attempt(client, msg);
        }
    }

    fn drop_conn(&mut self, client: usize) {
        let Some(gid) = self.clients[client].conn else {
            return;
        };
        if self.knobs.drop_idle_only && !self.conns[&gid].outstanding.is_empty() {
            return;
        }
        self.stats.drops += 1;
        let delay = self.rng.range(0, 30);
        self.clients[client].reconnect_at = self.step + delay;
        self.close_conn(client);
    }

    /// Closes `client`'s connection (its unread output is lost).
    fn close_conn(&mut self, client: usize) {
        let Some(gid) = self.clients[client].conn.take() else {
            return;
        };
        let step = self.step;
        let c = self.conns.get_mut(&gid).expect("live connection");
        c.closed = Some(step);
        let (node, id) = (c.node, c.id);
        let line = format!(
            "conn {gid} (user {}) DROPPED, {} unanswered on it",
            c.user,
            c.outstanding.len()
        );
        self.log(line);
        self.nodes[node].relay.handle_closed(id);
        self.pump(node);
    }

    /// A new SEND from `client`.
    fn new_send(&mut self, client: usize) {
        if self.clients[client].conn.is_none() {
            return;
        }
        let to = self.rng.range(1, self.p.users as u64);
        let stored = self.rng.chance(self.p.p_stored);
        let dedup = stored || self.rng.chance(self.p.dedup_share());
        let c = &mut self.clients[client];
        let msg = c.next_msg;
        c.next_msg += 1;
        if dedup {
            c.unanswered.insert(msg);
        }
        let key = (c.user, msg);
        self.stats.sends += 1;
        self.stats.stored_sends += u64::from(stored);
        self.msgs.insert(
            key,
            Msg {
                to,
                dedup,
                stored,
                stores: 0,
                store_nodes: Vec::new(),
                inbox_delivered: BTreeMap::new(),
                first_sent: self.step,
                attempts: Vec::new(),
                final_answer: None,
                dup_allowed: false,
                stale: false,
                delivered: BTreeMap::new(),
            },
        );
        self.attempt(client, msg);
    }

    /// Sends (or resends) message `msg` of `client` on its connection.
    fn attempt(&mut self, client: usize, msg: u64) {
        let c = &self.clients[client];
        let Some(gid) = c.conn else {
            return;
        };
        let key = (c.user, msg);
        let conn = self.conns.get_mut(&gid).expect("live connection");
        if conn.outstanding.contains_key(&msg) {
            return; // already waiting on this connection
        }
        let seq = conn.next_seq;
        conn.next_seq += 1;
        let m = self.msgs.get_mut(&key).expect("known message");
        conn.outstanding.insert(msg, m.attempts.len());
        m.attempts.push(Attempt {
            conn: gid,
            seq,
            sent: self.step,
            published: false,
            answer: None,
        });
        let mut payload = Vec::with_capacity(16);
        payload.extend_from_slice(&gid.to_be_bytes());
        payload.extend_from_slice(&seq.to_be_bytes());
        let mut frame = Frame::send(MessageId(msg), UserId(m.to), Bytes::from(payload));
        if m.stored {
            frame = frame.with_flags(Flags::STORED.union(Flags::DEDUP));
        } else if m.dedup {
            frame = frame.with_flags(Flags::DEDUP);
        }
        let line = format!(
            "conn {gid}: SEND {key:?} to user {}{}{} seq {seq} (attempt {})",
            m.to,
            if m.stored { " STORED" } else { "" },
            if m.dedup { " DEDUP" } else { "" },
            m.attempts.len()
        );
        self.stats.attempts += 1;
        self.log(line);
        self.feed(gid, &frame.to_bytes());
    }

    /// `client` reads everything its connection has been sent.
    fn read(&mut self, client: usize) {
        let Some(gid) = self.clients[client].conn else {
            return;
        };
        let (node, id) = (self.conns[&gid].node, self.conns[&gid].id);
        let mut bytes = Vec::new();
        loop {
            let relay = &mut self.nodes[node].relay;
            let n = {
                let Some(out) = relay.output(id) else { break };
                if out.is_empty() {
                    break;
                }
                let mut slices = [std::io::IoSlice::new(&[]); 64];
                let k = out.chunks(&mut slices);
                let before = bytes.len();
                for s in &slices[..k] {
                    bytes.extend_from_slice(s);
                }
                bytes.len() - before
            };
            if n == 0 {
                break;
            }
            relay.handle_written(id, n);
        }
        self.pump(node);
        if bytes.is_empty() {
            return;
        }
        let conn = self.conns.get_mut(&gid).expect("live connection");
        conn.buf.extend_from_slice(&bytes);
        let mut frames = Vec::new();
        loop {
            match decode_frame(&mut conn.buf, u32::MAX) {
                Ok(Some(Ok(frame))) => frames.push(frame),
                Ok(None) => break,
                other => {
                    let msg = format!("conn {gid}: undecodable output: {other:?}");
                    self.fail("protocol", msg);
                    return;
                }
            }
        }
        for frame in frames {
            self.on_frame(client, gid, frame);
        }
    }

    fn on_frame(&mut self, client: usize, gid: u64, frame: Frame) {
        match frame.opcode {
            Opcode::LoginOk => {
                let conn = self.conns.get_mut(&gid).expect("live connection");
                if frame.msg_id.0 == conn.login_msg && !conn.logged_in {
                    conn.logged_in = true;
                    self.send_sync(client, gid);
                } else {
                    self.fail("protocol", format!("conn {gid}: unexpected {frame:?}"));
                }
            }
            Opcode::Ack => {
                let count = frame.ack_count().unwrap_or(u32::MAX);
                self.on_answer(client, gid, frame.msg_id.0, Answer::Ack(count));
            }
            Opcode::Error => {
                let code = frame.error().map_or(0, |(code, _)| code);
                if frame.msg_id.0 == self.conns[&gid].login_msg {
                    self.fail("protocol", format!("conn {gid}: LOGIN refused: {frame:?}"));
                    return;
                }
                if self.conns[&gid]
                    .sync
                    .is_some_and(|(msg, _, _)| msg == frame.msg_id.0)
                {
                    self.on_sync_refused(client, gid, code);
                    return;
                }
                self.on_answer(client, gid, frame.msg_id.0, Answer::Err(code));
            }
            Opcode::Deliver => self.on_deliver(gid, frame),
            Opcode::InboxState => self.on_inbox_state(client, gid, frame),
            Opcode::InboxDeliver => self.on_inbox_deliver(client, gid, frame),
            _ => self.fail("protocol", format!("conn {gid}: unexpected {frame:?}")),
        }
    }

    fn on_answer(&mut self, client: usize, gid: u64, msg: u64, answer: Answer) {
        let user = self.clients[client].user;
        let key = (user, msg);
        let Some(index) = self
            .conns
            .get_mut(&gid)
            .and_then(|c| c.outstanding.remove(&msg))
        else {
            self.fail(
                "answer",
                format!("conn {gid}: {answer:?} for {key:?}, which has no attempt waiting here"),
            );
            return;
        };
        self.log(format!("conn {gid}: answer {answer:?} for {key:?}"));
        let step = self.step;
        let m = self.msgs.get_mut(&key).expect("known message");
        let attempt = &mut m.attempts[index];
        attempt.answer = Some(answer);
        let published = attempt.published;
        let (stored, store_nodes) = (m.stored, m.store_nodes.clone());
        let offline = ErrorCode::RecipientOffline as u16;
        let unavailable = ErrorCode::ClusterUnavailable as u16;
        let slow = ErrorCode::RecipientSlow as u16;
        match answer {
            // A stored message's ACK counts the nodes subscribed to the recipient when it
            // was stored (0 included); a resend's, its first store's.
            Answer::Ack(n) if stored => {
                self.stats.stored_acks += 1;
                if !store_nodes.contains(&n) {
                    let msg = format!(
                        "conn {gid}: stored {key:?} ACKed with count {n}, but Redis's store \
                         counted {store_nodes:?} nodes"
                    );
                    self.fail("answer", msg);
                }
            }
            Answer::Ack(0) => {
                let msg = format!("conn {gid}: ACK counting 0 connections for {key:?}");
                self.fail("answer", msg);
            }
            Answer::Ack(_) => self.stats.acks += 1,
            Answer::Err(c) if c == unavailable => self.stats.unavailable += 1,
            Answer::Err(c) if c == offline && !stored => self.stats.offline += 1,
            Answer::Err(c) if c == slow && !stored => self.stats.slow += 1,
            Answer::Err(c) => {
                self.fail("answer", format!("conn {gid}: error {c} for {key:?}"));
            }
        }
        let m = self.msgs.get_mut(&key).expect("known message");
        if !answer.is_final() {
            if m.dedup {
                if published && !m.dup_allowed {
                    m.dup_allowed = true;
                    self.log(format!(
                        "{key:?}: may be delivered again (CU after PUBLISH)"
                    ));
                }
                let delay = self.rng.range(3, 30);
                self.clients[client].retry_at.insert(msg, step + delay);
            }
            return;
        }
        let first_sent = m.first_sent;
        let to = m.to;
        match m.final_answer {
            None => m.final_answer = Some(answer),
            Some(prev) if prev != answer && m.dedup && !m.dup_allowed => {
                let msg = format!(
                    "{key:?}: answered {answer:?} on conn {gid}, but {prev:?} before \
                     (no duplicate was allowed)"
                );
                self.fail("same-answer", msg);
            }
            Some(_) => {}
        }
        let c = &mut self.clients[client];
        c.unanswered.remove(&msg);
        c.retry_at.remove(&msg);
        if answer == Answer::Err(offline) && !stored {
            let holders: Vec<(usize, u64)> = self
                .redis
                .subs
                .get(&user_channel(to))
                .map(|s| s.iter().map(|(&n, &since)| (n, since)).collect())
                .unwrap_or_default();
            if let Some((node, since)) = holders.into_iter().find(|&(_, s)| s <= first_sent) {
                let msg = format!(
                    "{key:?}: RECIPIENT_OFFLINE, but node {node} was subscribed to user {to} \
                     since step {since}, before the message was first sent (step {first_sent})"
                );
                self.fail("offline-while-subscribed", msg);
            }
        }
    }

    fn on_deliver(&mut self, gid: u64, frame: Frame) {
        self.stats.delivers += 1;
        let user = self.conns[&gid].user;
        let key = (frame.source.0, frame.msg_id.0);
        if frame.target.0 != user {
            let msg = format!("conn {gid} of user {user} got a DELIVER for {frame:?}");
            self.fail("protocol", msg);
            return;
        }
        let Some((sender_conn, seq)) = parse_payload(&frame.payload) else {
            self.fail("protocol", format!("conn {gid}: DELIVER {frame:?}"));
            return;
        };
        let Some(m) = self.msgs.get_mut(&key) else {
            self.fail(
                "protocol",
                format!("conn {gid}: DELIVER of unknown {key:?}"),
            );
            return;
        };
        if m.stored {
            self.fail("protocol", format!("conn {gid}: DELIVER of stored {key:?}"));
            return;
        }
        if m.to != user
            || !m
                .attempts
                .iter()
                .any(|a| a.conn == sender_conn && a.seq == seq)
        {
            let msg = format!(
                "conn {gid}: DELIVER {key:?} from no attempt (conn {sender_conn} seq {seq})"
            );
            self.fail("protocol", msg);
            return;
        }
        let n = m.delivered.entry(gid).or_insert(0);
        *n += 1;
        let n = *n;
        let dup_allowed = m.dedup && m.dup_allowed;
        let attempts = format!("{:?}", m.attempts);
        self.log(format!(
            "conn {gid}: DELIVER {key:?} (conn {sender_conn} seq {seq}), copy {n}"
        ));
        if n > 1 {
            if dup_allowed {
                self.stats.allowed_duplicates += 1;
            } else {
                let msg =
                    format!("conn {gid} (user {user}) got {key:?} {n} times; attempts: {attempts}");
                self.fail("duplicate", msg);
            }
        }
        let pair = (sender_conn, gid);
        match self.order.get(&pair).copied() {
            Some((last, last_key)) if seq <= last => {
                let exempt = self.msgs[&last_key].dup_allowed || dup_allowed;
                if !exempt {
                    let msg = format!(
                        "conn {gid} got {key:?} (seq {seq}) from conn {sender_conn} after \
                         {last_key:?} (seq {last})"
                    );
                    self.fail("order", msg);
                }
            }
            _ => {
                self.order.insert(pair, (seq, key));
            }
        }
    }

    // ---- stored delivery -----------------------------------------------------------------

    /// INBOX_SYNC on `client`'s connection `gid`, with the epoch and last seq it holds
    /// (0 and 0 on the end's check connections).
    fn send_sync(&mut self, client: usize, gid: u64) {
        let c = &mut self.clients[client];
        let conn = self.conns.get_mut(&gid).expect("live connection");
        let (epoch, last) = if conn.final_replay {
            (0, 0)
        } else {
            (c.epoch, c.last_seq)
        };
        let msg = c.next_msg;
        c.next_msg += 1;
        c.sync_retry_at = None;
        conn.sync = Some((msg, epoch, last));
        self.stats.syncs += 1;
        self.log(format!(
            "conn {gid}: INBOX_SYNC msg {msg} epoch {epoch:#x} last {last}"
        ));
        self.feed(
            gid,
            &Frame::inbox_sync(MessageId(msg), epoch, last).to_bytes(),
        );
    }

    fn on_sync_refused(&mut self, client: usize, gid: u64, code: u16) {
        let conn = self.conns.get_mut(&gid).expect("live connection");
        let (msg, _, _) = conn.sync.take().expect("a sync waits");
        self.log(format!(
            "conn {gid}: INBOX_SYNC msg {msg} refused with {code}"
        ));
        if code != ErrorCode::ClusterUnavailable as u16 {
            self.fail(
                "sync-answer",
                format!("conn {gid}: INBOX_SYNC refused with {code}"),
            );
            return;
        }
        self.stats.syncs_unavailable += 1;
        let delay = self.rng.range(3, 30);
        self.clients[client].sync_retry_at = Some(self.step + delay);
    }

    fn on_inbox_state(&mut self, client: usize, gid: u64, frame: Frame) {
        self.stats.inbox_states += 1;
        let user = self.clients[client].user;
        let conn = self.conns.get_mut(&gid).expect("live connection");
        let sync = conn.sync.take();
        let Some((_, epoch, last)) = sync.filter(|&(msg, _, _)| msg == frame.msg_id.0) else {
            let msg = format!("conn {gid}: {frame:?} answers no INBOX_SYNC (waiting: {sync:?})");
            self.fail("sync-answer", msg);
            return;
        };
        let Some(state) = frame.inbox_state().filter(|_| frame.target.0 == user) else {
            self.fail("protocol", format!("conn {gid}: bad INBOX_STATE {frame:?}"));
            return;
        };
        // The replay starts after the client's last seq when it named this store.
        let floor = if epoch == state.epoch {
            last.min(state.last_seq)
        } else {
            0
        };
        conn.synced = true;
        conn.floor = floor;
        conn.last_inbox = floor;
        conn.got.clear();
        let c = &mut self.clients[client];
        if c.epoch != state.epoch {
            c.epoch = state.epoch;
            c.last_seq = 0;
            c.acked = 0;
        }
        self.log(format!(
            "conn {gid}: INBOX_STATE epoch {:#x} first {} last {} expired {} flags {:?}; \
             replay after {floor}",
            state.epoch, state.first_seq, state.last_seq, state.expired_upto, frame.flags
        ));
    }

    fn on_inbox_deliver(&mut self, client: usize, gid: u64, frame: Frame) {
        self.stats.inbox_delivers += 1;
        let user = self.clients[client].user;
        let key = (frame.source.0, frame.msg_id.0);
        let Some((seq, _, payload)) = frame.inbox_deliver() else {
            self.fail(
                "protocol",
                format!("conn {gid}: bad INBOX_DELIVER {frame:?}"),
            );
            return;
        };
        let conn = self.conns.get_mut(&gid).expect("live connection");
        if !conn.synced {
            let msg = format!("conn {gid}: INBOX_DELIVER {key:?} seq {seq} before INBOX_STATE");
            self.fail("sync-answer", msg);
            return;
        }
        let (prev, floor) = (conn.last_inbox, conn.floor);
        conn.last_inbox = seq;
        conn.got.insert(seq);
        self.log(format!("conn {gid}: INBOX_DELIVER {key:?} seq {seq}"));
        if seq <= prev {
            let msg = format!(
                "conn {gid} (user {user}): INBOX_DELIVER {key:?} seq {seq} after seq {prev} \
                 (replay after {floor})"
            );
            self.fail("inbox-order", msg);
        }
        // Nothing the inbox still holds is skipped (one device per user: only this
        // client's own INBOX_ACKs delete, and it acknowledges what it got).
        let skipped: Vec<u64> = self
            .model_entries(user, prev)
            .into_iter()
            .filter(|&(s, origin)| s < seq && origin == NO_ORIGIN)
            .map(|(s, _)| s)
            .collect();
        if !skipped.is_empty() {
            let note = self.crossing_note(gid, &skipped);
            let msg = format!(
                "conn {gid} (user {user}): INBOX_DELIVER {key:?} seq {seq} after seq {prev}, \
                 but the inbox holds seqs {skipped:?} between{note}"
            );
            self.fail("inbox-gap", msg);
        }
        if frame.target.0 != user {
            self.fail("protocol", format!("conn {gid} of user {user}: {frame:?}"));
            return;
        }
        match self.user_seqs.get(&(user, seq)) {
            Some(&k) if k != key => {
                let msg = format!("user {user}: seq {seq} numbers {k:?} and {key:?}");
                self.fail("protocol", msg);
                return;
            }
            Some(_) => {}
            None => {
                self.user_seqs.insert((user, seq), key);
            }
        }
        let c = &mut self.clients[client];
        c.last_seq = c.last_seq.max(seq);
        let Some((sender_conn, attempt_seq)) = parse_payload(&payload) else {
            self.fail("protocol", format!("conn {gid}: INBOX_DELIVER {frame:?}"));
            return;
        };
        let known = self.msgs.get_mut(&key).filter(|m| {
            m.stored
                && m.to == user
                && m.attempts
                    .iter()
                    .any(|a| a.conn == sender_conn && a.seq == attempt_seq && a.published)
        });
        let Some(m) = known else {
            let msg = format!(
                "conn {gid}: INBOX_DELIVER {key:?} of no stored attempt (conn {sender_conn} \
                 seq {attempt_seq})"
            );
            self.fail("protocol", msg);
            return;
        };
        *m.inbox_delivered.entry(gid).or_insert(0) += 1;
    }

    /// INBOX_ACK of everything `client` has.
    fn send_inbox_ack(&mut self, client: usize, gid: u64) {
        let c = &mut self.clients[client];
        if c.last_seq <= c.acked {
            return;
        }
        let msg = c.next_msg;
        c.next_msg += 1;
        c.acked = c.last_seq;
        let upto = c.last_seq;
        self.stats.inbox_acks += 1;
        self.log(format!("conn {gid}: INBOX_ACK upto {upto}"));
        self.feed(gid, &Frame::inbox_ack(MessageId(msg), upto).to_bytes());
    }

    /// What the model's inbox of `user` holds after `after`: (seq, origin).
    fn model_entries(&mut self, user: u64, after: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut after = after;
        loop {
            let op = InboxOp::Fetch {
                user: UserId(user),
                after,
            };
            let reply = self.redis.inbox.handle(0, op, &mut HashMap::new());
            let ClusterReply::Array(entries) = reply.answer else {
                return out;
            };
            if entries.is_empty() {
                return out;
            }
            for entry in entries {
                let (seq, origin) = model_entry(&entry).expect("a model entry");
                out.push((seq, origin));
                after = seq;
            }
        }
    }

    /// Why connection `gid` is not caught up with its user's inbox, if it is not.
    fn behind(&mut self, gid: u64) -> Option<String> {
        let (user, floor) = {
            let c = &self.conns[&gid];
            if !c.synced {
                return Some(format!("conn {gid}: not synced (waiting {:?})", c.sync));
            }
            (c.user, c.floor)
        };
        let missing: Vec<u64> = self
            .model_entries(user, floor)
            .into_iter()
            .filter(|&(seq, origin)| origin == NO_ORIGIN && !self.conns[&gid].got.contains(&seq))
            .map(|(seq, _)| seq)
            .collect();
        (!missing.is_empty()).then(|| {
            format!(
                "conn {gid} (user {user}, replay after {floor}, got {:?}) is missing seqs \
                 {missing:?} the inbox holds{}",
                self.conns[&gid].got,
                self.crossing_note(gid, &missing)
            )
        })
    }

    /// For a connection missing `seqs`: the notices of them that overtook an empty FETCH
    /// answer to its node.
    fn crossing_note(&self, gid: u64, seqs: &[u64]) -> String {
        let (node, user) = (self.conns[&gid].node, self.conns[&gid].user);
        let hits: Vec<String> = self
            .crossings
            .iter()
            .filter(|&&(j, u, seq, _)| j == node && u == user && seqs.contains(&seq))
            .map(|(_, _, seq, step)| format!("seq {seq} at step {step}"))
            .collect();
        if hits.is_empty() {
            String::new()
        } else {
            format!(
                " (its notice overtook an empty FETCH answer to node {node}: {})",
                hits.join(", ")
            )
        }
    }

    // ---- the run -------------------------------------------------------------------------

    /// One step: timers, faults (unless quiet), Redis, clients.
    fn step(&mut self, quiet: bool) {
        self.step += 1;
        let now = self.now();
        for i in 0..self.nodes.len() {
            self.nodes[i].relay.handle_timeout(now);
            self.pump(i);
        }
        // Links.
        for i in 0..self.nodes.len() {
            if !self.nodes[i].up && (quiet || self.nodes[i].down_until <= self.step) {
                self.link_up(i);
            }
        }
        if !quiet && self.rng.chance(self.p.p_link_down) && !self.knobs.no_link_faults {
            let i = self.rng.index(self.nodes.len());
            if self.nodes[i].up {
                self.nodes[i].down_until = self.step + self.rng.range(2, 60);
                self.link_down(i);
            }
        }
        // Redis.
        for i in 0..self.nodes.len() {
            let ops = if quiet {
                u64::MAX
            } else {
                self.rng.range(0, self.p.redis_ops)
            };
            let mut k = 0;
            while k < ops && !self.nodes[i].ops.is_empty() {
                self.redis_process(i);
                k += 1;
            }
            let replies = if quiet {
                u64::MAX
            } else {
                self.rng.range(0, self.p.redis_replies)
            };
            let mut k = 0;
            while k < replies && !self.nodes[i].replies.is_empty() {
                self.redis_reply(i);
                k += 1;
            }
            let upto = if quiet { u64::MAX } else { self.step };
            self.deliver_confirms(i, upto);
        }
        // Clients.
        if !quiet && self.rng.chance(self.p.p_drop) && !self.knobs.no_drops {
            let c = self.rng.index(self.clients.len());
            self.drop_conn(c);
        }
        for c in 0..self.clients.len() {
            if self.clients[c].conn.is_none() {
                if quiet || self.clients[c].reconnect_at <= self.step {
                    let node = self.rng.index(self.nodes.len());
                    self.connect(c, node);
                }
                continue;
            }
            let due: Vec<u64> = self.clients[c]
                .retry_at
                .iter()
                .filter(|&(_, &at)| at <= self.step)
                .map(|(&m, _)| m)
                .collect();
            for msg in due {
                self.clients[c].retry_at.remove(&msg);
                self.attempt(c, msg);
            }
            let gid = self.clients[c].conn.expect("connected");
            let (logged_in, synced, syncing) = {
                let conn = &self.conns[&gid];
                (conn.logged_in, conn.synced, conn.sync.is_some())
            };
            let sync_due = self.clients[c]
                .sync_retry_at
                .is_some_and(|at| at <= self.step);
            if sync_due && logged_in && !synced && !syncing {
                self.send_sync(c, gid);
            }
            if !quiet && synced && self.rng.chance(self.p.p_inbox_ack) {
                self.send_inbox_ack(c, gid);
            }
            if !quiet && self.rng.chance(self.p.p_send) {
                self.new_send(c);
            }
            if quiet || self.rng.chance(self.p.p_read) {
                self.read(c);
            }
        }
        for i in 0..self.nodes.len() {
            self.pump(i); // the end of the loop turn
            while self.nodes[i].relay.poll_transmit().is_some() {}
        }
    }

    /// True when nothing is left to answer or carry, and every client is synced and has
    /// what its user's inbox holds.
    fn settled(&mut self) -> bool {
        let quiet = self.clients.iter().all(|c| {
            c.unanswered.is_empty()
                && c.conn.is_some_and(|gid| {
                    let conn = &self.conns[&gid];
                    conn.logged_in && conn.synced && conn.sync.is_none()
                })
        }) && self
            .conns
            .values()
            .all(|c| c.closed.is_some() || c.outstanding.is_empty())
            && self
                .nodes
                .iter()
                .all(|n| n.up && n.ops.is_empty() && n.replies.is_empty() && n.confirms.is_empty());
        if !quiet {
            return false;
        }
        let gids: Vec<u64> = self.clients.iter().filter_map(|c| c.conn).collect();
        gids.into_iter().all(|gid| self.behind(gid).is_none())
    }

    /// Runs quiet steps until everything settled (at most `QUIET_STEPS`), then one more
    /// so every answer is read; a `liveness` failure if it did not settle.
    fn quiet_period(&mut self, what: &str) {
        let quiet_from = self.step;
        while !self.settled() && self.step - quiet_from < QUIET_STEPS {
            self.step(true);
            if self.failure.is_some() {
                return;
            }
        }
        // A last turn so every answer and DELIVER is read.
        self.step(true);
        if self.failure.is_some() || self.settled() {
            return;
        }
        let mut lines = Vec::new();
        for c in &self.clients {
            for &msg in &c.unanswered {
                let key = (c.user, msg);
                let m = &self.msgs[&key];
                let first = m.attempts.first().map(|a| (a.conn, a.seq, a.sent));
                lines.push(format!(
                    "{key:?} to user {} ({} attempts, first (conn, seq, step) {first:?}, \
                     last answer {:?})",
                    m.to,
                    m.attempts.len(),
                    m.attempts.last().and_then(|a| a.answer)
                ));
            }
            match c.conn {
                None => lines.push(format!("user {}: not connected", c.user)),
                Some(gid) if !self.conns[&gid].logged_in => {
                    lines.push(format!("user {}: conn {gid} not logged in", c.user));
                }
                Some(_) => {}
            }
        }
        for (gid, c) in &self.conns {
            if c.closed.is_none() && !c.outstanding.is_empty() {
                lines.push(format!("conn {gid}: waiting {:?}", c.outstanding));
            }
        }
        for (i, n) in self.nodes.iter().enumerate() {
            if !n.confirms.is_empty() {
                lines.push(format!("node {i}: confirmations {:?}", n.confirms));
            }
        }
        let gids: Vec<u64> = self.clients.iter().filter_map(|c| c.conn).collect();
        for gid in gids {
            if self.conns[&gid].logged_in {
                if let Some(why) = self.behind(gid) {
                    lines.push(why);
                }
            }
        }
        let msg = format!(
            "not settled {QUIET_STEPS} steps after the faults stopped ({what}): {}",
            lines.join("; ")
        );
        self.fail("liveness", msg);
    }

    fn run(&mut self) {
        for _ in 0..self.p.steps {
            self.step(false);
            if self.failure.is_some() {
                return;
            }
        }
        self.log("faults stop".to_string());
        self.quiet_period("faults stopped");
        if self.failure.is_some() {
            return;
        }
        self.final_checks();
        if self.failure.is_some() {
            return;
        }
        // The end's check: every client on a fresh connection (to a random node) syncs
        // with 0/0 and gets what its inbox holds.
        self.log("final replay".to_string());
        self.final_phase = true;
        for c in 0..self.clients.len() {
            self.close_conn(c);
        }
        self.quiet_period("final replay");
        if self.failure.is_some() {
            return;
        }
        self.stored_checks();
    }

    /// `stored-lost` and `stored-twice`.
    fn stored_checks(&mut self) {
        let mut problems = Vec::new();
        for (key, m) in &self.msgs {
            if !m.stored {
                continue;
            }
            let acked = m
                .attempts
                .iter()
                .any(|a| matches!(a.answer, Some(Answer::Ack(_))));
            if acked && m.inbox_delivered.is_empty() {
                problems.push((
                    "stored-lost",
                    format!(
                        "{key:?} to user {} was ACKed as stored (stores {}, nodes {:?}) but \
                         no connection of its recipient got it, nor the final replay; \
                         attempts {:?}",
                        m.to, m.stores, m.store_nodes, m.attempts
                    ),
                ));
            }
            if m.stores > 1 && !m.dup_allowed {
                problems.push((
                    "stored-twice",
                    format!(
                        "{key:?} to user {} stored {} times, and no attempt was answered \
                         CLUSTER_UNAVAILABLE after Redis ran its store; attempts {:?}",
                        m.to, m.stores, m.attempts
                    ),
                ));
            }
        }
        if let Some((invariant, p)) = problems.into_iter().next() {
            self.fail(invariant, p);
        }
    }

    fn final_checks(&mut self) {
        let mut problems = Vec::new();
        for (key, m) in &self.msgs {
            let Some(Answer::Ack(n)) = m.final_answer else {
                continue;
            };
            if m.stored || n == 0 || !m.delivered.is_empty() || m.stale {
                continue;
            }
            let sent = m
                .attempts
                .iter()
                .map(|a| a.sent)
                .min()
                .unwrap_or(m.first_sent);
            let closed_since = self
                .conns
                .iter()
                .any(|(_, c)| c.user == m.to && c.closed.is_some_and(|at| at >= sent));
            if !closed_since {
                problems.push(format!(
                    "{key:?} ACKed with count {n} but no connection of user {} got it \
                     (none closed since step {}); attempts {:?}",
                    m.to, m.first_sent, m.attempts
                ));
            }
        }
        if let Some(p) = problems.into_iter().next() {
            self.fail("acked-not-delivered", p);
        }
    }
}

impl Params {
    fn dedup_share(&self) -> f64 {
        self.p_dedup
    }
}

fn parse_payload(payload: &[u8]) -> Option<(u64, u64)> {
    if payload.len() != 16 {
        return None;
    }
    let conn = u64::from_be_bytes(payload[..8].try_into().ok()?);
    let seq = u64::from_be_bytes(payload[8..].try_into().ok()?);
    Some((conn, seq))
}

/// (seq, origin) of one stream entry of the model (`[id, [f, frame, o, origin, ..]]`).
fn model_entry(entry: &ClusterReply) -> Option<(u64, u64)> {
    let ClusterReply::Array(parts) = entry else {
        return None;
    };
    let (Some(ClusterReply::Bulk(Some(id))), Some(ClusterReply::Array(fields))) =
        (parts.first(), parts.get(1))
    else {
        return None;
    };
    let seq = std::str::from_utf8(id)
        .ok()?
        .strip_suffix("-0")?
        .parse()
        .ok()?;
    let origin = match fields.get(3) {
        Some(ClusterReply::Bulk(Some(o))) => u64::from_be_bytes(o.as_ref().try_into().ok()?),
        _ => return None,
    };
    Some((seq, origin))
}

fn op_label(op: &ClusterOp) -> String {
    match op {
        ClusterOp::Publish(ch, payload) => {
            let detail: Vec<String> = published_frames(payload)
                .unwrap_or_default()
                .iter()
                .map(|f| format!("({}, {})", f.source.0, f.msg_id.0))
                .collect();
            format!("PUBLISH {} {}", ch.name(), detail.join(" "))
        }
        ClusterOp::Subscribe(ch) => format!("SUBSCRIBE {}", ch.name()),
        ClusterOp::Unsubscribe(ch) => format!("UNSUBSCRIBE {}", ch.name()),
        ClusterOp::Inbox(InboxOp::Store(r)) => {
            let messages: Vec<String> = r
                .messages
                .iter()
                .map(|m| {
                    let msg = u64::from_be_bytes(m.header[8..16].try_into().unwrap_or_default());
                    format!(
                        "({}, {msg}) {:?} dedup {}",
                        r.sender.0,
                        parse_payload(&m.payload),
                        m.dedup
                    )
                })
                .collect();
            format!("STORE to user {}: {}", r.recipient.0, messages.join(", "))
        }
        ClusterOp::Inbox(InboxOp::Sync {
            user, epoch, last, ..
        }) => format!("SYNC user {} epoch {epoch:#x} last {last}", user.0),
        ClusterOp::Inbox(InboxOp::Ack { user, upto, .. }) => {
            format!("ACK user {} upto {upto}", user.0)
        }
        ClusterOp::Inbox(InboxOp::Fetch { user, after }) => {
            format!("FETCH user {} after {after}", user.0)
        }
        other => format!("{other:?}"),
    }
}

// ---- the sweep ---------------------------------------------------------------------------

struct Outcome {
    failure: Option<Failure>,
    trace: Vec<String>,
    stats: Stats,
}

fn run_seed(seed: u64, full_trace: bool) -> Outcome {
    let mut w = World::new(seed, full_trace);
    w.run();
    Outcome {
        failure: w.failure,
        trace: w.trace,
        stats: w.stats,
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

#[test]
fn cluster_simulation() {
    let full_trace = std::env::var("SIM_CLUSTER_TRACE").is_ok_and(|v| v == "1");
    if let Some(seed) = env_u64("SIM_CLUSTER_SEED") {
        let out = run_seed(seed, full_trace);
        println!("seed {seed}: {:?}", out.stats);
        if let Some(f) = out.failure {
            if !full_trace {
                let from = out.trace.len().saturating_sub(TRACE_TAIL);
                for line in &out.trace[from..] {
                    println!("{line}");
                }
            }
            panic!("seed {seed}: {}: {}", f.invariant, f.message);
        }
        return;
    }
    let seeds = env_u64("SIM_CLUSTER_SEEDS").unwrap_or(DEFAULT_SEEDS);
    let first = env_u64("SIM_CLUSTER_FIRST_SEED").unwrap_or(0);
    // Invariant -> (failing seeds, first seed, its message).
    let mut failures: BTreeMap<&'static str, (u64, u64, String)> = BTreeMap::new();
    let mut total = Stats::default();
    for seed in first..first + seeds {
        let out = run_seed(seed, false);
        let s = out.stats;
        total.sends += s.sends;
        total.attempts += s.attempts;
        total.delivers += s.delivers;
        total.acks += s.acks;
        total.offline += s.offline;
        total.unavailable += s.unavailable;
        total.slow += s.slow;
        total.link_downs += s.link_downs;
        total.drops += s.drops;
        total.allowed_duplicates += s.allowed_duplicates;
        total.stored_sends += s.stored_sends;
        total.stored_acks += s.stored_acks;
        total.stores += s.stores;
        total.syncs += s.syncs;
        total.syncs_unavailable += s.syncs_unavailable;
        total.inbox_states += s.inbox_states;
        total.inbox_delivers += s.inbox_delivers;
        total.inbox_acks += s.inbox_acks;
        total.confirms += s.confirms;
        if let Some(f) = out.failure {
            let e = failures
                .entry(f.invariant)
                .or_insert((0, seed, f.message.clone()));
            e.0 += 1;
        }
    }
    let failed: u64 = failures.values().map(|e| e.0).sum();
    println!(
        "{} of {seeds} seeds passed (from {first}); totals: {total:?}",
        seeds - failed
    );
    if failures.is_empty() {
        return;
    }
    let mut report = String::new();
    for (invariant, (n, seed, message)) in &failures {
        let message: String = message.chars().take(700).collect();
        report.push_str(&format!(
            "\n  {invariant}: {n} seeds, first SIM_CLUSTER_SEED={seed}: {message}"
        ));
    }
    panic!("{failed} of {seeds} seeds failed:{report}");
}

/// The frames of a published message (after the node id), or `None` if it is not whole
/// frames.
fn published_frames(payload: &Bytes) -> Option<Vec<Frame>> {
    let mut buf = BytesMut::from(payload.get(8..)?);
    let mut frames = Vec::new();
    while !buf.is_empty() {
        frames.push(decode_frame(&mut buf, u32::MAX).ok()??.ok()?);
    }
    Some(frames)
}
