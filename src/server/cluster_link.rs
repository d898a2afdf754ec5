//! The link to Redis in cluster mode (`--cluster redis://HOST:PORT`), driven by the event
//! loop: two non-blocking connections polled like clients, never waited on.
//!
//! - The **command** connection carries PUBLISHes (and the DEDUP keys' SETs). Everything
//!   a loop turn asks is written in one pipelined write; Redis answers each in order (a
//!   PUBLISH with the number of subscribers, nodes, that got it) and each answer goes to
//!   the core ([`Relay::handle_cluster_reply`]).
//! - The **subscriber** connection carries SUBSCRIBE and UNSUBSCRIBE, and the messages
//!   other nodes publish ([`Relay::handle_cluster_message`]).
//!
//! The link is down when either connection fails or closes, when Redis leaves a PUBLISH
//! unanswered for [`REPLY_TIMEOUT`], when a connect takes longer than [`CONNECT_TIMEOUT`],
//! or when more than [`MAX_OUTPUT`] bytes wait for Redis. Then the core is told
//! ([`Relay::handle_cluster_down`]) and the link connects again after a backoff (100 ms
//! doubling to 5 s); once both connections are up the core subscribes again to everything.

use std::collections::VecDeque;
use std::io::{ErrorKind, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use log::{info, warn};
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

use super::cluster_inbox;
use super::resp::{self, Value};
use crate::proto::RoomId;
use crate::relay::{ClusterOp, ClusterReply, Relay, ROOM_COUNT_REFRESH, ROOM_COUNT_TTL_MS};

/// Token of the command connection.
pub const CMD: Token = Token(usize::MAX - 3);
/// Token of the subscriber connection.
pub const SUB: Token = Token(usize::MAX - 4);

/// A PUBLISH Redis has not answered for this long takes the link down.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// A connect that has not completed in this time is given up.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Bytes waiting to be written to Redis, at most (per connection).
pub const MAX_OUTPUT: usize = 64 << 20;
/// Bytes read from Redis and not yet decoded, at most: a message is at most a frame.
const MAX_INPUT: usize = 64 << 20;
/// The first wait before connecting again, doubled after each failure up to the next.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// One connection to Redis.
struct RedisConn {
    stream: TcpStream,
    /// The connect completed.
    connected: bool,
    out: BytesMut,
    input: BytesMut,
}

impl RedisConn {
    fn open(addr: SocketAddr, token: Token, registry: &Registry) -> std::io::Result<RedisConn> {
        let mut stream = TcpStream::connect(addr)?;
        registry.register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)?;
        let _ = stream.set_nodelay(true);
        Ok(RedisConn {
            stream,
            connected: false,
            out: BytesMut::new(),
            input: BytesMut::new(),
        })
    }

    /// Writes what is queued until the socket would block.
    fn flush(&mut self) -> std::io::Result<()> {
        while self.connected && !self.out.is_empty() {
            match self.stream.write(&self.out) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    let _ = self.out.split_to(n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.out.is_empty() && self.out.capacity() > 1 << 20 {
            self.out = BytesMut::new();
        }
        Ok(())
    }

    /// Reads until the socket would block (straight into the input buffer); an EOF is an
    /// error.
    fn fill(&mut self) -> std::io::Result<()> {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&self.stream);
        loop {
            if self.input.capacity() - self.input.len() < 4096 {
                self.input.reserve(64 * 1024);
            }
            match crate::net::read_into(fd, &mut self.input) {
                Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
                Ok(_) => {
                    if self.input.len() > MAX_INPUT {
                        return Err(std::io::Error::other("Redis sent more than the input cap"));
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// A readiness event: once connected, writes what waits and reads what came; false
    /// while the connect has not completed.
    fn ready(&mut self) -> std::io::Result<bool> {
        self.check_connected()?;
        if !self.connected {
            return Ok(false);
        }
        self.flush()?;
        self.fill()?;
        Ok(true)
    }

    /// A writable event: the connect completed, or failed.
    fn check_connected(&mut self) -> std::io::Result<()> {
        if self.connected {
            return Ok(());
        }
        if let Some(e) = self.stream.take_error()? {
            return Err(e);
        }
        match self.stream.peer_addr() {
            Ok(_) => {
                self.connected = true;
                Ok(())
            }
            Err(e) if e.kind() == ErrorKind::NotConnected => Ok(()), // not yet
            Err(e) => Err(e),
        }
    }
}

/// The cluster link of a node.
pub struct ClusterLink {
    addr: SocketAddr,
    node_name: String,
    cmd: Option<RedisConn>,
    sub: Option<RedisConn>,
    /// Both connections are up and the core was told.
    up: bool,
    /// When the connects started (for [`CONNECT_TIMEOUT`]).
    connecting_since: Option<Instant>,
    /// When to connect again, while down.
    retry_at: Option<Instant>,
    backoff: Duration,
    /// Replies the command connection still owes: the time each PUBLISH was written
    /// (`None` for a reply that answers no PUBLISH, such as CLIENT SETNAME's).
    owed: VecDeque<Option<Instant>>,
    /// Replies the subscriber connection owes before its pushes (CLIENT SETNAME's).
    sub_owed: usize,
    ops: Vec<ClusterOp>,
    /// When this node's room counts are written to Redis again.
    next_room_refresh: Option<Instant>,
    /// Why the link is down, for the log and /readyz (None while up or connecting first).
    pub last_error: Option<String>,
}

impl ClusterLink {
    /// A link to the Redis at `addr`, for the node named `node_name`; connects at once.
    pub fn new(addr: SocketAddr, node_name: String, now: Instant) -> ClusterLink {
        ClusterLink {
            addr,
            node_name,
            cmd: None,
            sub: None,
            up: false,
            connecting_since: None,
            retry_at: Some(now),
            backoff: BACKOFF_MIN,
            owed: VecDeque::new(),
            sub_owed: 0,
            ops: Vec::new(),
            next_room_refresh: None,
            last_error: None,
        }
    }

    /// The next time [`ClusterLink::turn`] has something to do without an event.
    pub fn next_deadline(&self) -> Option<Instant> {
        let oldest = self
            .owed
            .iter()
            .flatten()
            .next()
            .map(|t| *t + REPLY_TIMEOUT);
        [
            self.retry_at,
            self.connecting_since.map(|t| t + CONNECT_TIMEOUT),
            oldest,
            self.next_room_refresh.filter(|_| self.up),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Refreshes this node's room counts in Redis when due (every
    /// [`ROOM_COUNT_REFRESH`]); call before [`ClusterLink::turn`].
    pub fn refresh_rooms(&mut self, relay: &mut Relay, now: Instant) {
        if !self.up || self.next_room_refresh.is_some_and(|at| now < at) {
            return;
        }
        if self.next_room_refresh.is_some() {
            relay.refresh_cluster_rooms();
        }
        self.next_room_refresh = Some(now + ROOM_COUNT_REFRESH);
    }

    /// A readiness event on one of the link's tokens.
    pub fn handle_event(
        &mut self,
        token: Token,
        relay: &mut Relay,
        registry: &Registry,
        now: Instant,
    ) {
        let result = if token == CMD {
            self.cmd_ready(relay, now)
        } else {
            self.sub_ready(relay)
        };
        if let Err(e) = result {
            self.down(relay, registry, &e.to_string(), now);
            return;
        }
        self.maybe_up(relay);
    }

    /// Once per loop turn, after the core ran: connects when due, writes what the core
    /// asks (pipelined), and checks the deadlines.
    pub fn turn(&mut self, relay: &mut Relay, registry: &Registry, now: Instant) {
        if self.retry_at.is_some_and(|at| at <= now) {
            self.retry_at = None;
            self.connect(registry, now);
        }
        if self
            .connecting_since
            .is_some_and(|t| now >= t + CONNECT_TIMEOUT)
        {
            self.down(relay, registry, "connect timed out", now);
            return;
        }
        if self
            .owed
            .iter()
            .flatten()
            .next()
            .is_some_and(|t| now >= *t + REPLY_TIMEOUT)
        {
            self.down(relay, registry, "Redis did not answer in time", now);
            return;
        }
        relay.take_cluster_ops(&mut self.ops);
        if self.ops.is_empty() {
            return;
        }
        let (Some(cmd), Some(sub)) = (self.cmd.as_mut(), self.sub.as_mut()) else {
            self.ops.clear(); // not up: the core subscribes again when it is
            return;
        };
        for op in self.ops.drain(..) {
            match op {
                ClusterOp::Publish(channel, payload) => {
                    let mut name = [0u8; 40];
                    let name = channel.name_in(&mut name);
                    resp::command(&mut cmd.out, &[b"PUBLISH", name, &payload]);
                    self.owed.push_back(Some(now));
                }
                ClusterOp::Claim { key, token, ttl_ms } => {
                    let ttl = ttl_ms.to_string();
                    let args: [&[u8]; 7] = [
                        b"SET",
                        key.as_bytes(),
                        token.as_bytes(),
                        b"NX",
                        b"GET",
                        b"PX",
                        ttl.as_bytes(),
                    ];
                    resp::command(&mut cmd.out, &args);
                    self.owed.push_back(Some(now));
                }
                ClusterOp::Remember { key, value, ttl_ms } => {
                    let ttl = ttl_ms.to_string();
                    let args: [&[u8]; 5] = [
                        b"SET",
                        key.as_bytes(),
                        value.as_bytes(),
                        b"PX",
                        ttl.as_bytes(),
                    ];
                    resp::command(&mut cmd.out, &args);
                    self.owed.push_back(Some(now));
                }
                ClusterOp::Forget { key, token } => {
                    let args: [&[u8]; 5] = [
                        b"EVAL",
                        FORGET_CLAIM.as_bytes(),
                        b"1",
                        key.as_bytes(),
                        token.as_bytes(),
                    ];
                    resp::command(&mut cmd.out, &args);
                    self.owed.push_back(Some(now));
                }
                ClusterOp::Ping => {
                    resp::command(&mut cmd.out, &[b"PING"]);
                    self.owed.push_back(Some(now));
                }
                ClusterOp::SetRoomCount { room, node, count } => {
                    let (key, node, count) = (room_key(room), node.to_string(), count.to_string());
                    let ttl = ROOM_COUNT_TTL_MS.to_string();
                    let args: [&[u8]; 7] = [
                        b"EVAL",
                        SET_ROOM_COUNT.as_bytes(),
                        b"1",
                        key.as_bytes(),
                        node.as_bytes(),
                        count.as_bytes(),
                        ttl.as_bytes(),
                    ];
                    resp::command(&mut cmd.out, &args);
                    self.owed.push_back(Some(now));
                }
                ClusterOp::RoomCount { room, node } => {
                    let (key, node) = (room_key(room), node.to_string());
                    let args: [&[u8]; 5] = [
                        b"EVAL",
                        ROOM_COUNT.as_bytes(),
                        b"1",
                        key.as_bytes(),
                        node.as_bytes(),
                    ];
                    resp::command(&mut cmd.out, &args);
                    self.owed.push_back(Some(now));
                }
                ClusterOp::Inbox(op) => {
                    cluster_inbox::command(&mut cmd.out, &op);
                    self.owed.push_back(Some(now));
                }
                ClusterOp::Subscribe(channel) => {
                    resp::command(&mut sub.out, &[b"SUBSCRIBE", channel.name().as_bytes()]);
                }
                ClusterOp::Unsubscribe(channel) => {
                    resp::command(&mut sub.out, &[b"UNSUBSCRIBE", channel.name().as_bytes()]);
                }
            }
        }
        let too_much = cmd.out.len() > MAX_OUTPUT || sub.out.len() > MAX_OUTPUT;
        let result = cmd.flush().and_then(|()| sub.flush());
        if too_much {
            self.down(relay, registry, "Redis does not keep up", now);
        } else if let Err(e) = result {
            self.down(relay, registry, &e.to_string(), now);
        }
    }

    fn connect(&mut self, registry: &Registry, now: Instant) {
        let opened = RedisConn::open(self.addr, CMD, registry)
            .and_then(|cmd| Ok((cmd, RedisConn::open(self.addr, SUB, registry)?)));
        match opened {
            Ok((mut cmd, mut sub)) => {
                // Named, so `CLIENT LIST` on the Redis says which node holds a connection.
                let name = format!("imrelay-{}", self.node_name);
                resp::command(&mut cmd.out, &[b"CLIENT", b"SETNAME", name.as_bytes()]);
                resp::command(&mut sub.out, &[b"CLIENT", b"SETNAME", name.as_bytes()]);
                self.owed.push_back(None);
                // The inbox functions of stored delivery (replaced: every node loads its own
                // version's, so a Redis restarted empty gets them again).
                let library = cluster_inbox::LIBRARY.as_bytes();
                resp::command(&mut cmd.out, &[b"FUNCTION", b"LOAD", b"REPLACE", library]);
                self.owed.push_back(None);
                self.sub_owed = 1;
                self.cmd = Some(cmd);
                self.sub = Some(sub);
                self.connecting_since = Some(now);
            }
            Err(e) => {
                self.last_error = Some(format!("cannot connect to {}: {e}", self.addr));
                self.retry_at = Some(now + self.next_backoff());
            }
        }
    }

    fn cmd_ready(&mut self, relay: &mut Relay, now: Instant) -> std::io::Result<()> {
        let Some(cmd) = self.cmd.as_mut() else {
            return Ok(());
        };
        if !cmd.ready()? {
            return Ok(());
        }
        while let Some(value) = resp::decode(&mut cmd.input, MAX_INPUT).map_err(other)? {
            let Some(owed) = self.owed.pop_front() else {
                return Err(other("Redis answered a command that was not sent"));
            };
            let reply = cluster_reply(value);
            match (owed, reply) {
                (None, ClusterReply::Simple | ClusterReply::Bulk(_)) => {}
                (None, reply) => {
                    return Err(other(format!("setting up the link got {reply:?}")));
                }
                (Some(_), reply) => relay.handle_cluster_reply(reply, now),
            }
        }
        Ok(())
    }

    fn sub_ready(&mut self, relay: &mut Relay) -> std::io::Result<()> {
        let Some(sub) = self.sub.as_mut() else {
            return Ok(());
        };
        if !sub.ready()? {
            return Ok(());
        }
        while let Some(value) = resp::decode(&mut sub.input, MAX_INPUT).map_err(other)? {
            match value {
                Value::Simple(_) if self.sub_owed > 0 => self.sub_owed -= 1,
                Value::Array(Some(items)) => match items.as_slice() {
                    [Value::Bulk(Some(kind)), Value::Bulk(Some(channel)), Value::Bulk(Some(payload))]
                        if kind.as_ref() == b"message" =>
                    {
                        relay.handle_cluster_message(channel, payload);
                    }
                    [Value::Bulk(Some(kind)), Value::Bulk(Some(channel)), Value::Integer(_)]
                        if kind.as_ref() == b"subscribe" =>
                    {
                        relay.handle_cluster_subscribed(channel);
                    }
                    [Value::Bulk(Some(kind)), _, Value::Integer(_)]
                        if kind.as_ref() == b"unsubscribe" => {}
                    _ => return Err(other(format!("unexpected push {items:?}"))),
                },
                Value::Error(e) => {
                    return Err(other(format!(
                        "Redis refused a subscription: {}",
                        String::from_utf8_lossy(&e)
                    )));
                }
                other_value => return Err(other(format!("unexpected reply {other_value:?}"))),
            }
        }
        Ok(())
    }

    /// Both connections completed: the core subscribes to everything it holds.
    fn maybe_up(&mut self, relay: &mut Relay) {
        let connected = |c: &Option<RedisConn>| c.as_ref().is_some_and(|c| c.connected);
        if self.up || !connected(&self.cmd) || !connected(&self.sub) {
            return;
        }
        self.up = true;
        self.connecting_since = None;
        self.backoff = BACKOFF_MIN;
        self.last_error = None;
        info!("cluster: connected to Redis at {}", self.addr);
        relay.handle_cluster_up();
    }

    fn down(&mut self, relay: &mut Relay, registry: &Registry, why: &str, now: Instant) {
        for conn in [self.cmd.take(), self.sub.take()].into_iter().flatten() {
            let mut stream = conn.stream;
            let _ = registry.deregister(&mut stream);
        }
        let wait = self.next_backoff();
        if self.up || self.last_error.is_none() {
            warn!(
                "cluster: link to Redis at {} down ({why}); connecting again in {wait:?}",
                self.addr
            );
        }
        self.up = false;
        self.connecting_since = None;
        self.next_room_refresh = None;
        self.owed.clear();
        self.sub_owed = 0;
        self.ops.clear();
        self.last_error = Some(why.to_string());
        self.retry_at = Some(now + wait);
        relay.handle_cluster_down();
    }

    fn next_backoff(&mut self) -> Duration {
        let wait = self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        wait
    }
}

/// A decoded RESP value as the core takes it.
fn cluster_reply(value: Value) -> ClusterReply {
    match value {
        Value::Integer(n) => ClusterReply::Integer(n),
        Value::Bulk(b) => ClusterReply::Bulk(b),
        Value::Simple(_) => ClusterReply::Simple,
        Value::Error(e) => ClusterReply::Error(String::from_utf8_lossy(&e).into_owned()),
        Value::Array(items) => ClusterReply::Array(
            items
                .unwrap_or_default()
                .into_iter()
                .map(cluster_reply)
                .collect(),
        ),
    }
}

fn other(e: impl ToString) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// The Redis set of the nodes with members in `room`; each node's count is in
/// `<set>:<node>`.
fn room_key(room: RoomId) -> String {
    format!("imrelay:rc:{}", room.0)
}

/// Sets (or, at 0, removes) a node's member count of a room, with a time to live, and
/// keeps the node in the room's set. KEYS[1] the set; ARGV node, count, ttl in ms.
const SET_ROOM_COUNT: &str = "\
local k = KEYS[1] .. ':' .. ARGV[1]
if tonumber(ARGV[2]) > 0 then
  redis.call('SET', k, ARGV[2], 'PX', ARGV[3])
  redis.call('SADD', KEYS[1], ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
else
  redis.call('DEL', k)
  redis.call('SREM', KEYS[1], ARGV[1])
end
return 1";

/// The members of a room on every node but ARGV[1]; nodes whose count expired leave the
/// set. KEYS[1] the set.
const ROOM_COUNT: &str = "\
local total = 0
for _, node in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if node ~= ARGV[1] then
    local c = redis.call('GET', KEYS[1] .. ':' .. node)
    if c then total = total + tonumber(c) else redis.call('SREM', KEYS[1], node) end
  end
end
return total";

/// Deletes a DEDUP key if it still holds the claim token ARGV[1]: a later answer or
/// another node's claim is left alone.
const FORGET_CLAIM: &str = "\
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0";
