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
//! - Link faults: a node's link goes down (`handle_cluster_down`; Redis forgets its
//!   subscriptions; its queued commands and undelivered answers are lost) and comes back
//!   after some steps (`handle_cluster_up`).
//! - Client faults: a connection drops (`handle_closed`, its unread output lost); the
//!   client reconnects to a random node after some steps, logs in again and resends every
//!   DEDUP message it has no final answer for (same msg_id, as the SDK does).
//! - Workload: SENDs to random users (the sender included), most with DEDUP, some
//!   without. A DEDUP SEND answered `CLUSTER_UNAVAILABLE` is sent again some steps later;
//!   `RECIPIENT_OFFLINE` is final. Each attempt's payload names its connection and its
//!   sequence number on that connection, so a DELIVER says which attempt it came from.
//!
//! **The invariants**, checked as events happen (every step) and at the end:
//! 1. `answer`: every attempt on a live connection gets exactly one answer (ACK or ERROR),
//!    never an answer to a msg_id with no attempt waiting on that connection; the only
//!    errors are RECIPIENT_OFFLINE, CLUSTER_UNAVAILABLE and RECIPIENT_SLOW; an ACK never
//!    counts 0 (no connection anywhere is RECIPIENT_OFFLINE). `same-answer`: the final
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
//! 5. `liveness`: once every link is up and the faults stop, every client's outstanding
//!    messages are answered within `QUIET_STEPS` steps.
//!
//! Also `protocol`: frames the client does not expect, DELIVERs to the wrong user or of
//! messages nobody sent, a refused connection or LOGIN, ops queued while the link is down.
//!
//! **Running it.** `cargo test --test sim_cluster` sweeps `DEFAULT_SEEDS` seeds;
//! `SIM_CLUSTER_SEEDS=n` sweeps n (`SIM_CLUSTER_FIRST_SEED` moves the window);
//! `SIM_CLUSTER_SEED=n` replays one seed and prints the end of its trace on failure
//! (`SIM_CLUSTER_TRACE=1`: the whole trace).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use imrelay::proto::decode::decode_frame;
use imrelay::proto::{ErrorCode, Flags, Frame, MessageId, Opcode, UserId};
use imrelay::relay::{Channel, ClusterOp, ClusterReply, Config, InboxOp, Relay};
use imrelay::ConnId;

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
    /// Share of SENDs with DEDUP.
    p_dedup: f64,
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
    /// Redis processed this attempt's PUBLISH.
    published: bool,
    answer: Option<Answer>,
}

#[derive(Debug)]
struct Msg {
    to: u64,
    dedup: bool,
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
}

struct Node {
    relay: Relay,
    up: bool,
    down_until: u64,
    /// Commands taken from the core, not yet processed by Redis.
    ops: VecDeque<ClusterOp>,
    /// Answers Redis produced that have not reached the node yet.
    replies: VecDeque<ClusterReply>,
}

#[derive(Default)]
struct Redis {
    /// Channel name -> node -> the step its subscription reached Redis.
    subs: BTreeMap<String, BTreeMap<usize, u64>>,
    /// Key -> (value, expiry in ms of simulated time).
    keys: BTreeMap<String, (String, u64)>,
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
    failure: Option<Failure>,
    trace: Vec<String>,
    full_trace: bool,
    knobs: Knobs,
    stats: Stats,
}

/// Exploration switches that leave a class of faults out (the invariants stay as they
/// are): `SIM_CLUSTER_NO_LINK_FAULTS=1`, `SIM_CLUSTER_NO_DROPS=1`, and
/// `SIM_CLUSTER_DROP_IDLE_ONLY=1` (only connections with no SEND waiting for its answer
/// drop).
#[derive(Clone, Copy, Default)]
struct Knobs {
    no_link_faults: bool,
    no_drops: bool,
    drop_idle_only: bool,
}

impl Knobs {
    fn from_env() -> Knobs {
        let on = |name: &str| std::env::var(name).is_ok_and(|v| v == "1");
        Knobs {
            no_link_faults: on("SIM_CLUSTER_NO_LINK_FAULTS"),
            no_drops: on("SIM_CLUSTER_NO_DROPS"),
            drop_idle_only: on("SIM_CLUSTER_DROP_IDLE_ONLY"),
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
        let lost = (n.ops.len(), n.replies.len());
        n.ops.clear();
        n.replies.clear();
        for subs in self.redis.subs.values_mut() {
            subs.remove(&i);
        }
        self.log(format!(
            "node {i}: link DOWN ({} ops, {} answers lost)",
            lost.0, lost.1
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
        let reply = match op {
            ClusterOp::Subscribe(ch) => {
                let step = self.step;
                self.redis
                    .subs
                    .entry(ch.name())
                    .or_default()
                    .entry(i)
                    .or_insert(step);
                // Confirmed on the subscriber connection (this model has no stored
                // delivery, so the confirmation's timing does not matter here).
                self.nodes[i]
                    .relay
                    .handle_cluster_subscribed(ch.name().as_bytes());
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
                    self.nodes[j]
                        .relay
                        .handle_cluster_message(name.as_bytes(), &payload);
                    self.pump(j);
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
            // The inboxes' epoch, asked at link up; this model sends no stored message.
            ClusterOp::Inbox(InboxOp::Epoch { .. }) => {
                Some(ClusterReply::Bulk(Some(Bytes::from_static(b"1"))))
            }
            ClusterOp::Inbox(op) => panic!("stored delivery is not modelled here: {op:?}"),
        };
        if let Some(reply) = reply {
            self.nodes[i].replies.push_back(reply);
        }
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
        let Some(reply) = self.nodes[i].replies.pop_front() else {
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
        self.pump(node);
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
            },
        );
        self.log(format!("user {user}: conn {gid} to node {node} ({id})"));
        let login = Frame::login(MessageId(login_msg), UserId(user), b"");
        self.feed(gid, &login.to_bytes());
        // Resend what has no final answer (the SDK does, with the same msg_id).
        let c = &mut self.clients[client];
        c.retry_at.clear();
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
        self.clients[client].conn = None;
        self.stats.drops += 1;
        let delay = self.rng.range(0, 30);
        self.clients[client].reconnect_at = self.step + delay;
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
        let dedup = self.rng.chance(self.p.dedup_share());
        let c = &mut self.clients[client];
        let msg = c.next_msg;
        c.next_msg += 1;
        if dedup {
            c.unanswered.insert(msg);
        }
        let key = (c.user, msg);
        self.stats.sends += 1;
        self.msgs.insert(
            key,
            Msg {
                to,
                dedup,
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
        if m.dedup {
            frame = frame.with_flags(Flags::DEDUP);
        }
        let line = format!(
            "conn {gid}: SEND {key:?} to user {}{} seq {seq} (attempt {})",
            m.to,
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
                self.on_answer(client, gid, frame.msg_id.0, Answer::Err(code));
            }
            Opcode::Deliver => self.on_deliver(gid, frame),
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
        let offline = ErrorCode::RecipientOffline as u16;
        let unavailable = ErrorCode::ClusterUnavailable as u16;
        let slow = ErrorCode::RecipientSlow as u16;
        match answer {
            Answer::Ack(0) => {
                let msg = format!("conn {gid}: ACK counting 0 connections for {key:?}");
                self.fail("answer", msg);
            }
            Answer::Ack(_) => self.stats.acks += 1,
            Answer::Err(c) if c == offline => self.stats.offline += 1,
            Answer::Err(c) if c == unavailable => self.stats.unavailable += 1,
            Answer::Err(c) if c == slow => self.stats.slow += 1,
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
        if answer == Answer::Err(offline) {
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
            if !quiet && self.rng.chance(self.p.p_send) {
                self.new_send(c);
            }
            if quiet || self.rng.chance(self.p.p_read) {
                self.read(c);
            }
        }
        for n in &mut self.nodes {
            while n.relay.poll_transmit().is_some() {}
        }
    }

    /// True when nothing is left to answer or carry.
    fn settled(&self) -> bool {
        self.clients.iter().all(|c| {
            c.unanswered.is_empty() && c.conn.is_some_and(|gid| self.conns[&gid].logged_in)
        }) && self
            .conns
            .values()
            .all(|c| c.closed.is_some() || c.outstanding.is_empty())
            && self
                .nodes
                .iter()
                .all(|n| n.up && n.ops.is_empty() && n.replies.is_empty())
    }

    fn run(&mut self) {
        for _ in 0..self.p.steps {
            self.step(false);
            if self.failure.is_some() {
                return;
            }
        }
        self.log("faults stop".to_string());
        let quiet_from = self.step;
        while !self.settled() && self.step - quiet_from < QUIET_STEPS {
            self.step(true);
            if self.failure.is_some() {
                return;
            }
        }
        // A last turn so every answer and DELIVER is read.
        self.step(true);
        if self.failure.is_some() {
            return;
        }
        if !self.settled() {
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
            }
            for (gid, c) in &self.conns {
                if c.closed.is_none() && !c.outstanding.is_empty() {
                    lines.push(format!("conn {gid}: waiting {:?}", c.outstanding));
                }
            }
            let msg = format!(
                "not settled {QUIET_STEPS} steps after the faults stopped: {}",
                lines.join("; ")
            );
            self.fail("liveness", msg);
            return;
        }
        self.final_checks();
    }

    fn final_checks(&mut self) {
        let mut problems = Vec::new();
        for (key, m) in &self.msgs {
            let Some(Answer::Ack(n)) = m.final_answer else {
                continue;
            };
            if n == 0 || !m.delivered.is_empty() || m.stale {
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
