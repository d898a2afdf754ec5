//! The mio driver: the only code in the crate that touches sockets.
//!
//! One thread, one `Poll`. Each loop turn: poll; accept until WouldBlock; read every
//! readable connection until WouldBlock (or its read or work budget) into one shared
//! buffer and hand the bytes to the [`Relay`] (it reads frames in place and copies what it
//! keeps, so the buffer is reused at once); run due timers; then write each connection the
//! core named, once, with `write_vectored`.
//! WRITABLE interest is registered only while a connection's output is blocked. The
//! driver makes no routing decision of its own; it supplies the clock and the entropy the
//! core is created with.
//!
//! Out of descriptors (EMFILE/ENFILE), the accept loop gives up a reserve descriptor to
//! take the waiting connection, tells it LIMIT_REACHED and closes it, so the backlog never
//! stalls; other accept failures (ENOBUFS, ENOMEM) retry on a short timer.
//!
//! TLS ([`Server::set_tls`]) shares the port: a connection whose first byte starts a TLS
//! record gets a [`tls::TlsSession`] between its socket and the core (`tls_conn.rs`); the
//! core sees only plaintext and chooses its codec from that. A plaintext connection pays
//! one `None` check per read and per flush.
//!
//! The admin listener ([`Server::set_admin`], `admin.rs`) runs on a thread of its own; the
//! loop only answers its snapshot requests when the waker token fires, with a copy of its
//! counters (`admin_metrics.rs`), and records each turn's time.

mod admin;
mod admin_metrics;
mod cluster_inbox;
mod cluster_link;
pub mod io;
mod limits;
mod resp;
mod store;
pub mod store_fs;
mod store_writer;
pub mod tls;
mod tls_conn;

pub use admin::AdminError;
pub use admin_metrics::METRIC_NAMES;
pub use limits::{raise_fd_limit, RESERVED_FDS};
pub use store::{Damage, LogStore, RepairReport, StoreError};

use std::io::{ErrorKind, IoSlice, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use log::{debug, info, warn};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};

use crate::relay::{counted, Config, Metrics, Relay};
use crate::ConnId;

/// Token of the listening socket.
const LISTENER: Token = Token(usize::MAX - 1);
/// Token of the waker: shutdown, the store writer's reports, the admin thread's requests.
const WAKER: Token = Token(usize::MAX - 2);

/// Most bytes read from one connection per loop turn before the others get theirs; the
/// rest is read next turn (the loop then polls without sleeping). Bounds latency, not
/// memory: a turn lasts about the number of busy connections times this much work, which
/// is what a bystander waits behind attackers that keep their sockets full. Measured with
/// `imrelay-bench attack --kind flood` (50 flooders): 64 KiB gave the bystander a p50 of
/// 88 ms.
const READ_BUDGET: usize = 16 * 1024;
/// The read budget of a heavy connection (one that used up its budget last time): smaller,
/// so that the time a turn spends on heavy connections is cut finely among them.
const HEAVY_READ_BUDGET: usize = 2 * 1024;
/// Time a loop turn gives heavy connections, after every light one was read: the turn
/// ends when it runs out and the rest of the heavy connections are read in the turns
/// after, in order. A connection that reads what it has within its budget (a bystander)
/// is light and is read at the start of every turn, so it waits at most about this long
/// (plus one heavy read) behind any number of connections that keep their sockets full.
/// Measured with `imrelay-bench attack --kind fuzz` (50 fuzzers): 200 us gave the
/// bystander p50/p99 386/571 us, 100 us 212/425 us, at the same fan-out throughput.
const HEAVY_TURN_TIME: Duration = Duration::from_micros(100);
/// Most work (see [`Relay::take_work`]: frames handled, deliveries queued) one
/// connection's reads may cause per loop turn before the others get theirs.
const WORK_BUDGET: usize = 8 * 1024;
/// The read buffer's size. One buffer serves every connection: the core keeps nothing that
/// points into it, so it is cleared and reused after every read.
const READ_CHUNK: usize = 64 * 1024;
/// Below this much free space the read buffer reserves a new chunk before reading.
const MIN_READ_SPACE: usize = 4 * 1024;
/// SO_SNDBUF of accepted sockets unless [`Server::set_send_buffer`] says otherwise (Linux
/// doubles it for its bookkeeping).
pub const DEFAULT_SEND_BUFFER: usize = 128 * 1024;
/// How soon a failed accept (other than running out of descriptors) is tried again.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);
/// Most slices handed to one `write_vectored` call.
const MAX_IOVECS: usize = 64;
/// How long a shutdown waits for clients to take their pending output.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Asks a running [`Server`] to shut down cleanly, from any thread or a signal handler
/// thread.
#[derive(Clone, Debug)]
pub struct ShutdownHandle {
    requested: Arc<AtomicBool>,
    waker: Arc<Waker>,
}

impl ShutdownHandle {
    /// Requests shutdown: stop accepting, send SHUTTING_DOWN to everyone, flush, return.
    pub fn shutdown(&self) {
        self.requested.store(true, Ordering::SeqCst);
        if let Err(e) = self.waker.wake() {
            warn!("could not wake the event loop for shutdown: {e}");
        }
    }
}

/// A connection's socket and its registered interest.
struct Conn {
    stream: TcpStream,
    /// WRITABLE is registered (only while output is blocked).
    writable: bool,
    /// Its last read ended on the budget, with input left in the socket: its reads wait
    /// for the heavy part of the turn ([`HEAVY_TURN_TIME`]). Cleared when a read drains
    /// the socket.
    heavy: bool,
    /// In [`Server::heavy_reads`].
    queued: bool,
    /// None: plaintext (always, when TLS is off). Otherwise its first byte is still to
    /// come, or its TLS session.
    layer: Option<tls_conn::Layer>,
}

impl Conn {
    /// Bytes one read pass may take from the socket: less for a heavy connection.
    fn read_budget(&self) -> usize {
        if self.heavy {
            HEAVY_READ_BUDGET
        } else {
            READ_BUDGET
        }
    }
}

/// The relay server: a listener, the relay core, and the sockets.
pub struct Server {
    poll: Poll,
    listener: Option<TcpListener>,
    local_addr: SocketAddr,
    relay: Relay,
    conns: Vec<Option<Conn>>,
    read_buf: BytesMut,
    /// A descriptor held in reserve: given up to accept (and refuse) a connection when
    /// the process is out of descriptors.
    reserve_fd: Option<std::fs::File>,
    /// A failed accept is tried again at this time.
    accept_retry: Option<Instant>,
    /// SO_SNDBUF of every accepted socket (None: the kernel's autotuning).
    send_buffer: Option<usize>,
    /// Heavy connections with input left, in the order they get their next read (round
    /// robin across turns).
    heavy_reads: std::collections::VecDeque<ConnId>,
    shutdown: ShutdownHandle,
    shutdown_deadline: Option<Instant>,
    busy_poll: bool,
    /// Log a metrics line this often (None: never).
    stats_interval: Option<Duration>,
    next_stats: Option<Instant>,
    /// The last stats line logged: the same line is not logged again.
    last_stats: String,
    /// The durable store's writer thread (None: memory only).
    store: Option<store_writer::StoreWriter>,
    /// Cluster mode: the link to Redis (None: a single relay).
    cluster: Option<cluster_link::ClusterLink>,
    /// Reports from the writer, drained each turn.
    store_done: Vec<store_writer::Done>,
    /// Compact the log once it is past this size (and twice the live data).
    compact_at: u64,
    /// A compaction is queued or running.
    compacting: bool,
    /// TLS on the listening port (None: plaintext only).
    tls: Option<Arc<rustls::ServerConfig>>,
    /// Connections whose first byte does not start a TLS record are closed.
    tls_required: bool,
    /// The driver's TLS state: totals, a ciphertext buffer, closing sessions.
    tls_state: tls_conn::TlsState,
    /// The admin listener's thread and the requests it sends (None: no admin listener).
    admin: Option<admin::AdminHook>,
}

impl Server {
    /// Binds the listener. The relay config should be validated by the caller.
    pub fn bind(addr: SocketAddr, config: Config) -> std::io::Result<Server> {
        let poll = Poll::new()?;
        let mut listener = TcpListener::bind(addr)?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let local_addr = listener.local_addr()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        Ok(Server {
            poll,
            listener: Some(listener),
            local_addr,
            relay: Relay::new(
                config,
                Instant::now(),
                unix_ms_now(),
                crate::rand::Rng::from_entropy().next_u64(),
            ),
            conns: Vec::new(),
            read_buf: BytesMut::new(),
            reserve_fd: open_reserve(),
            accept_retry: None,
            send_buffer: Some(DEFAULT_SEND_BUFFER),
            heavy_reads: std::collections::VecDeque::new(),
            shutdown: ShutdownHandle {
                requested: Arc::new(AtomicBool::new(false)),
                waker,
            },
            shutdown_deadline: None,
            busy_poll: false,
            stats_interval: None,
            next_stats: None,
            last_stats: String::new(),
            store: None,
            cluster: None,
            store_done: Vec::new(),
            compact_at: u64::MAX,
            compacting: false,
            tls: None,
            tls_required: false,
            tls_state: tls_conn::TlsState::default(),
            admin: None,
        })
    }

    /// Logs one line of counters every `interval` (queues, connections, errors), so an
    /// operator sees the relay's limits being approached before they are hit.
    pub fn set_stats_interval(&mut self, interval: Option<Duration>) {
        self.stats_interval = interval.filter(|d| !d.is_zero());
        self.next_stats = self.stats_interval.map(|d| Instant::now() + d);
    }

    /// The kernel send buffer of each accepted socket (`None`: the kernel's autotuning,
    /// which grows it to megabytes for a client that does not read). Outside the relay's
    /// own memory budget, so it is fixed by default.
    pub fn set_send_buffer(&mut self, size: Option<usize>) {
        self.send_buffer = size;
    }

    /// Cluster mode: this relay is node `node_name` (with the random id `node_id`, unique
    /// among the nodes) of the cluster that shares the Redis at `redis`
    /// (protocol.md, section 18). Call before [`Server::run`]; the link connects in the
    /// loop, never blocking it.
    pub fn set_cluster(&mut self, redis: SocketAddr, node_name: String, node_id: u64) {
        self.relay.enable_cluster(node_id);
        info!("cluster node {node_name}: Redis at {redis}");
        self.cluster = Some(cluster_link::ClusterLink::new(
            redis,
            node_name,
            Instant::now(),
        ));
    }

    /// TLS on the listening port, beside plaintext: a connection whose first byte starts
    /// a TLS record (a ClientHello) is served through a session of `config`; the core
    /// sees its plaintext and chooses binary, text, HTTP or WebSocket from that, so
    /// `wss://` works on the same port. With `required`, a connection whose first byte
    /// does not start a TLS record is closed, with nothing sent. `None` (the default):
    /// plaintext only. Call before [`Server::run`]. Memory the sessions hold is counted
    /// apart from the core's ([`Server::tls_memory_held`]).
    pub fn set_tls(&mut self, config: Option<Arc<rustls::ServerConfig>>, required: bool) {
        self.tls_required = required && config.is_some();
        self.tls = config;
    }

    /// Never sleep in the poller: spin on it with a zero timeout. Burns the relay's core
    /// while idle, and in exchange saves the wake-up of a sleeping thread on every message
    /// (measured on this project's 2-core VM at over 100 us per cross-core wake-up; see
    /// BENCHMARKS.md). For latency-critical deployments with a core to spare.
    pub fn set_busy_poll(&mut self, on: bool) {
        self.busy_poll = on;
    }

    /// Serves `/metrics` (Prometheus text), `/healthz` and `/readyz` over HTTP on `addr`,
    /// from a thread of its own that asks the event loop for a copy of its counters (see
    /// `admin.rs`). Returns the bound address (useful with port 0). Call before
    /// [`Server::run`].
    pub fn set_admin(&mut self, addr: SocketAddr) -> Result<SocketAddr, AdminError> {
        let hook = admin::AdminHook::start(addr, self.shutdown.waker.clone())?;
        let bound = hook.local_addr();
        self.admin = Some(hook);
        Ok(bound)
    }

    /// The address the listener is bound to (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A handle that stops [`Server::run`] cleanly.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.shutdown.clone()
    }

    /// The relay's counters.
    pub fn metrics(&self) -> &Metrics {
        self.relay.metrics()
    }

    /// Runs the event loop until a shutdown has been requested and every connection is
    /// flushed and closed (or the grace period ran out).
    pub fn run(&mut self) -> std::io::Result<()> {
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = self.poll_timeout();
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let now = Instant::now();
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept_all(now),
                    token @ (cluster_link::CMD | cluster_link::SUB) => {
                        if let Some(link) = &mut self.cluster {
                            link.handle_event(token, &mut self.relay, self.poll.registry(), now);
                        }
                    }
                    WAKER => {
                        if self.shutdown.requested.load(Ordering::SeqCst) {
                            self.begin_shutdown(now);
                        }
                        if self.admin.is_some() {
                            self.answer_admin();
                        }
                    }
                    token => {
                        let id = ConnId(token.0);
                        if event.is_writable() {
                            self.relay.handle_writable(id);
                            if self.tls.is_some() {
                                self.tls_writable(id);
                            }
                        }
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            self.read_or_queue(id, now);
                        }
                    }
                }
            }
            self.read_heavy(now);
            if self.tls.is_some() {
                // TLS records count against the memory budget (per turn: a session holds
                // at most about 140 KiB, see tls.rs).
                self.relay.set_driver_held(self.tls_memory_held());
            }
            if self.accept_retry.is_some_and(|at| at <= now) {
                self.accept_retry = None;
                self.accept_all(now);
            }
            while let Some(id) = self.relay.poll_resume() {
                self.read_conn(id, now);
            }
            if self.relay.poll_timeout().is_some_and(|at| at <= now) {
                self.relay.handle_timeout(now);
            }
            self.expire_tls_closes(now);
            if self.relay.wants_commit() || self.relay.commits_in_flight() > 0 {
                self.commit_store();
            }
            if let Some(link) = &mut self.cluster {
                link.refresh_rooms(&mut self.relay, now);
                link.turn(&mut self.relay, self.poll.registry(), now);
            }
            while let Some(id) = self.relay.poll_transmit() {
                self.flush_conn(id);
            }
            if let (Some(at), Some(every)) = (self.next_stats, self.stats_interval) {
                if now >= at {
                    self.log_stats();
                    self.next_stats = Some(now + every);
                }
            }
            if let Some(admin) = &mut self.admin {
                admin.turn_time.record(now.elapsed());
            }
            if let Some(deadline) = self.shutdown_deadline {
                if self.relay.session_count() == 0 {
                    self.stop_store();
                    info!("shutdown complete");
                    return Ok(());
                }
                if now >= deadline {
                    warn!(
                        "shutdown grace period over: closing {} with output pending",
                        counted(self.relay.session_count(), "connection", "connections")
                    );
                    for id in 0..self.conns.len() {
                        self.close_conn(ConnId(id));
                    }
                    self.stop_store();
                    info!("shutdown complete");
                    return Ok(());
                }
            }
        }
    }

    /// Opens the durable store in `dir`, loads what it holds into the relay, and starts its
    /// writer thread. Stored SENDs are then ACKed only once they are on disk (call before
    /// `run`).
    pub fn open_store(&mut self, dir: &std::path::Path, compact_at: u64) -> std::io::Result<()> {
        self.open_store_with(dir, compact_at, false)
    }

    /// [`Server::open_store`]; with `repair`, damaged records in the log are skipped
    /// instead of refusing to start ([`LogStore::open_with`]).
    pub fn open_store_with(
        &mut self,
        dir: &std::path::Path,
        compact_at: u64,
        repair: bool,
    ) -> std::io::Result<()> {
        let (store, ops) = LogStore::open_with(dir, repair)?;
        self.relay.restore(ops);
        info!(
            "store {}: {}, {} of log",
            dir.display(),
            counted(
                self.relay.stored_messages(),
                "stored message",
                "stored messages"
            ),
            counted(store.size(), "byte", "bytes")
        );
        self.store = Some(store_writer::StoreWriter::spawn(
            store,
            self.shutdown.waker.clone(),
        )?);
        self.compact_at = compact_at;
        Ok(())
    }

    /// Group commit, the event loop's side: this turn's store ops go to the writer thread
    /// as one commit; what the writer has finished is reported to the core (which then
    /// sends the ACKs and pushes the messages). Compaction is queued when the log has
    /// grown past `compact_at` and is more than twice the live data.
    fn commit_store(&mut self) {
        let Some(writer) = &self.store else {
            return; // memory only: the core never asks for a commit
        };
        let mut ops = Vec::new();
        if let Some(id) = self.relay.take_commit(&mut ops) {
            writer.commit(id, ops);
        }
        writer.take_done(&mut self.store_done);
        for done in self.store_done.drain(..) {
            match done {
                store_writer::Done::Committed(id, result) => {
                    self.relay.handle_store_committed(id, result);
                }
                store_writer::Done::Compacted => self.compacting = false,
            }
        }
        let size = writer.log_size();
        let live = self.relay.stored_bytes() as u64 + 64 * self.relay.stored_messages() as u64;
        if !self.compacting && size > self.compact_at && size > 2 * live {
            self.compacting = true;
            writer.compact(self.relay.store_snapshot());
        }
    }

    /// Stops the store writer once the loop is done: it writes what is queued, then logs
    /// "store writer stopped", before the loop's last line ("shutdown complete").
    fn stop_store(&mut self) {
        // Dropping the handle closes the writer's queue and joins its thread.
        self.store = None;
    }

    /// Answers the admin thread's snapshot requests (each with a fresh copy).
    fn answer_admin(&mut self) {
        while let Some(reply) = self.admin.as_ref().and_then(admin::AdminHook::next_request) {
            admin::AdminHook::answer(reply, self.snapshot());
        }
    }

    /// A copy of the counters and gauges for the admin listener.
    fn snapshot(&self) -> admin_metrics::Snapshot {
        let relay = &self.relay;
        admin_metrics::Snapshot {
            metrics: relay.metrics().clone(),
            accepting: self.listener.is_some(),
            store_failure: relay.store_failure().map(str::to_owned),
            cluster_up: relay.cluster_link_up(),
            cluster_down: self.cluster.as_ref().and_then(|c| {
                (relay.cluster_link_up() == Some(false))
                    .then(|| c.last_error.clone().unwrap_or_else(|| "connecting".into()))
            }),
            connections_by_codec: relay.sessions_by_codec(),
            users_online: relay.user_count(),
            rooms: relay.room_count(),
            room_members: relay.room_memberships(),
            output_queued_bytes: relay.output_held(),
            connection_memory_bytes: relay.memory_held(),
            connection_memory_limit_bytes: relay.config().max_memory,
            stored_messages: relay.stored_messages(),
            stored_bytes: relay.stored_bytes(),
            inbox_users: relay.inbox_users(),
            store: self.store.as_ref().map(|w| admin_metrics::StoreSnapshot {
                log_bytes: w.log_size(),
                commit_latency: w.commit_latency(),
            }),
            loop_turn: self.admin.as_ref().map(|a| a.turn_time).unwrap_or_default(),
        }
    }

    fn poll_timeout(&self) -> Option<Duration> {
        if self.busy_poll || !self.heavy_reads.is_empty() || self.relay.has_resumes() {
            return Some(Duration::ZERO);
        }
        let next = [
            self.relay.poll_timeout(),
            self.shutdown_deadline,
            self.next_stats,
            self.accept_retry,
            self.tls_state.next_close_deadline(),
            self.cluster.as_ref().and_then(|c| c.next_deadline()),
        ]
        .into_iter()
        .flatten()
        .min();
        // Round up to the next millisecond so a deadline is never polled for 0 ms in a loop.
        next.map(|at| at.saturating_duration_since(Instant::now()) + Duration::from_millis(1))
    }

    /// Logs the counters, unless nothing changed since the last line (an idle relay stays
    /// quiet).
    fn log_stats(&mut self) {
        let m = self.relay.metrics();
        let errors: u64 = m.errors_sent.iter().sum();
        let line = format!(
            "stats: {} ({}, {}); opened {} refused {} closed {}; frames in {} ({} B); \
             routed {} -> {}; room messages {} -> {}, {} dropped for slow members; \
             out {} B; lost on reset {} B; errors sent {errors}; read pauses {}; \
             stored {} (held {} for {}); connection memory {} B of {} B{}",
            counted(self.relay.session_count(), "connection", "connections"),
            counted(self.relay.user_count(), "user", "users"),
            counted(self.relay.room_count(), "room", "rooms"),
            m.connections_opened,
            m.connections_refused,
            m.connections_closed,
            m.frames_in,
            m.bytes_in,
            m.messages_routed,
            counted(m.deliveries_queued, "delivery", "deliveries"),
            m.room_messages,
            counted(m.room_deliveries_queued, "delivery", "deliveries"),
            m.room_deliveries_dropped,
            m.bytes_out,
            m.bytes_lost_on_reset,
            m.read_pauses,
            m.messages_stored,
            self.relay.stored_messages(),
            counted(self.relay.inbox_users(), "user", "users"),
            self.relay.memory_held(),
            self.relay.config().max_memory,
            self.tls_stats(),
        );
        if line != self.last_stats {
            info!("{line}");
            self.last_stats = line;
        }
    }

    fn begin_shutdown(&mut self, now: Instant) {
        if self.shutdown_deadline.is_some() {
            return;
        }
        info!(
            "shutting down: {} to flush",
            counted(self.relay.session_count(), "connection", "connections")
        );
        if let Some(mut listener) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut listener);
        }
        self.relay.begin_shutdown(now);
        self.shutdown_deadline = Some(now + SHUTDOWN_GRACE);
    }

    fn accept_all(&mut self, now: Instant) {
        loop {
            let Some(listener) = self.listener.as_ref() else {
                return;
            };
            let (mut stream, peer) = match listener.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::ConnectionAborted => continue,
                Err(e) if is_out_of_descriptors(&e) && self.reserve_fd.is_some() => {
                    // The connection limit is set below the fd limit, so something else
                    // holds descriptors. Refuse the waiting peer with the reserve, which
                    // keeps the backlog moving, then take the reserve back.
                    warn!("accept failed: {e}; refusing one waiting connection");
                    self.reserve_fd = None;
                    let refused = self.refuse_one();
                    self.reserve_fd = open_reserve();
                    match refused {
                        Ok(()) => continue,
                        // accept4 reports EMFILE before it looks at the backlog: with no
                        // descriptor left it fails even when nobody waits. The reserve
                        // showed that nobody does: done until the listener is readable.
                        Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                        Err(e) => {
                            warn!("accept failed: {e}; trying again in {ACCEPT_RETRY:?}");
                            self.accept_retry = Some(now + ACCEPT_RETRY);
                            return;
                        }
                    }
                }
                Err(e) => {
                    warn!("accept failed: {e}; trying again in {ACCEPT_RETRY:?}");
                    self.accept_retry = Some(now + ACCEPT_RETRY);
                    return;
                }
            };
            let id = match self.relay.handle_open(now, peer.ip()) {
                Ok(id) => id,
                Err(refused) => {
                    info!("refused {peer}: {}", refused.code);
                    // Best effort: a fresh socket's send buffer takes a small frame.
                    let _ = stream.write(&refused.frame);
                    continue;
                }
            };
            if let Err(e) = stream.set_nodelay(true) {
                debug!("{}: set_nodelay failed: {e}", self.relay.conn_label(id));
            }
            if let Some(size) = self.send_buffer {
                // A fixed send buffer: the kernel's autotuning would let every client that
                // stops reading hold megabytes of the machine's memory in its socket.
                if let Err(e) = socket2::SockRef::from(&stream).set_send_buffer_size(size) {
                    debug!(
                        "{}: setting SO_SNDBUF failed: {e}",
                        self.relay.conn_label(id)
                    );
                }
            }
            if let Err(e) =
                self.poll
                    .registry()
                    .register(&mut stream, Token(id.0), Interest::READABLE)
            {
                warn!(
                    "{} from {peer}: register failed: {e}",
                    self.relay.conn_label(id)
                );
                self.relay.handle_closed(id);
                continue;
            }
            debug!("{}: accepted from {peer}", self.relay.conn_label(id));
            if self.conns.len() <= id.0 {
                self.conns.resize_with(id.0 + 1, || None);
            }
            self.conns[id.0] = Some(Conn {
                stream,
                writable: false,
                heavy: false,
                queued: false,
                layer: self.tls.as_ref().map(|_| tls_conn::Layer::Undecided),
            });
        }
    }

    /// Accepts one connection with the reserve descriptor free, tells it LIMIT_REACHED and
    /// closes it. The error is accept's: `WouldBlock` when nobody was waiting.
    fn refuse_one(&mut self) -> std::io::Result<()> {
        let Some(listener) = self.listener.as_ref() else {
            return Err(ErrorKind::WouldBlock.into());
        };
        let (mut stream, peer) = listener.accept()?;
        let frame = self.relay.refuse_for_descriptors();
        info!("refused {peer}: out of file descriptors");
        let _ = stream.write(&frame);
        Ok(())
    }

    fn read_conn(&mut self, id: ConnId, now: Instant) {
        let Some(conn) = self.conns.get(id.0).and_then(Option::as_ref) else {
            return;
        };
        if !self.relay.wants_read(id) {
            return;
        }
        if conn.layer.is_some() {
            self.read_layered(id, now);
            return;
        }
        let fd = io::fd(&conn.stream);
        let mut budget = conn.read_budget();
        let mut failed = None;
        self.relay.take_work();
        loop {
            if self.read_buf.capacity() - self.read_buf.len() < MIN_READ_SPACE {
                self.read_buf.reserve(READ_CHUNK);
            }
            match io::read_at_most(fd, &mut self.read_buf, budget) {
                Ok(0) => {
                    self.relay.handle_eof(id, now);
                    return;
                }
                Ok(n) => {
                    self.relay.handle_read(id, &mut self.read_buf, now);
                    if !self.relay.wants_read(id) {
                        break;
                    }
                    budget = budget.saturating_sub(n);
                    if budget == 0 || self.relay.take_work() >= WORK_BUDGET {
                        self.mark_heavy(id, true);
                        break;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.mark_heavy(id, false);
                    break;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        self.read_buf.clear();
        if let Some(e) = failed {
            info!("{}: read failed: {e}", self.relay.conn_label(id));
            self.close_conn(id);
        }
    }

    /// A readable event: a light connection is read now; a heavy one waits for its turn
    /// in [`Server::read_heavy`].
    fn read_or_queue(&mut self, id: ConnId, now: Instant) {
        match self.conns.get(id.0).and_then(Option::as_ref) {
            Some(conn) if conn.heavy => self.mark_heavy(id, true),
            Some(_) => self.read_conn(id, now),
            None => {}
        }
    }

    /// Records whether a connection's last read left input behind; a heavy one is queued
    /// for a read in a later heavy part of a turn (once).
    fn mark_heavy(&mut self, id: ConnId, heavy: bool) {
        let Some(conn) = self.conns.get_mut(id.0).and_then(Option::as_mut) else {
            return;
        };
        conn.heavy = heavy;
        if heavy && !conn.queued {
            conn.queued = true;
            self.heavy_reads.push_back(id);
        }
    }

    /// The heavy part of a turn: heavy connections read in order, one read each at most,
    /// until [`HEAVY_TURN_TIME`] is used; the others keep their place for the next turn.
    fn read_heavy(&mut self, now: Instant) {
        let until = Instant::now() + HEAVY_TURN_TIME;
        for _ in 0..self.heavy_reads.len() {
            let Some(id) = self.heavy_reads.pop_front() else {
                break;
            };
            let Some(conn) = self.conns.get_mut(id.0).and_then(Option::as_mut) else {
                continue;
            };
            conn.queued = false;
            self.read_conn(id, now);
            if Instant::now() >= until {
                break;
            }
        }
    }

    /// Registers WRITABLE interest while `blocked` (output waits for the socket), and only
    /// then; a failed registration closes the connection.
    fn want_writable(&mut self, id: ConnId, blocked: bool) {
        let Some(conn) = self.conns.get_mut(id.0).and_then(Option::as_mut) else {
            return;
        };
        if blocked == conn.writable {
            return;
        }
        let interest = if blocked {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        match self
            .poll
            .registry()
            .reregister(&mut conn.stream, Token(id.0), interest)
        {
            Ok(()) => conn.writable = blocked,
            Err(e) => {
                warn!("{}: reregister failed: {e}", self.relay.conn_label(id));
                self.close_conn(id);
            }
        }
    }

    fn flush_conn(&mut self, id: ConnId) {
        let Some(conn) = self.conns.get_mut(id.0).and_then(Option::as_mut) else {
            return;
        };
        if conn.layer.is_some() {
            self.flush_layered(id);
            return;
        }
        let mut blocked = false;
        loop {
            let result = {
                let Some(out) = self.relay.output(id) else {
                    return;
                };
                if out.is_empty() {
                    break;
                }
                let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
                let n = out.chunks(&mut slices);
                let offered: usize = slices[..n].iter().map(|s| s.len()).sum();
                conn.stream
                    .write_vectored(&slices[..n])
                    .map(|written| (written, offered))
            };
            match result {
                Ok((0, _)) => {
                    info!(
                        "{}: socket accepted no bytes; closing",
                        self.relay.conn_label(id)
                    );
                    self.close_conn(id);
                    return;
                }
                Ok((written, offered)) => {
                    self.relay.handle_written(id, written);
                    // A short write means the send buffer is full: wait for WRITABLE
                    // instead of spending a syscall to hear WouldBlock.
                    if written < offered {
                        blocked = true;
                        break;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    blocked = true;
                    break;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    debug!("{}: write failed: {e}", self.relay.conn_label(id));
                    self.close_conn(id);
                    return;
                }
            }
        }
        if self.relay.is_finished(id) {
            self.close_conn(id);
            return;
        }
        if blocked {
            self.relay.handle_write_blocked(id);
        }
        self.want_writable(id, blocked);
    }

    /// The relay's core: for tests and tools that inspect its state.
    pub fn relay(&self) -> &Relay {
        &self.relay
    }

    fn close_conn(&mut self, id: ConnId) {
        let Some(mut conn) = self.conns.get_mut(id.0).and_then(Option::take) else {
            return;
        };
        if let Some(layer) = conn.layer.take() {
            self.tls_state.goodbye(layer, &mut conn.stream);
        }
        let _ = self.poll.registry().deregister(&mut conn.stream);
        drain_unread(&conn.stream);
        drop(conn);
        // Named before the core forgets the connection.
        let label =
            log::log_enabled!(log::Level::Debug).then(|| self.relay.conn_label(id).to_string());
        self.relay.handle_closed(id);
        if let Some(label) = label {
            debug!("{label}: closed");
        }
    }
}

/// Reads (and drops) what the peer sent that was not read yet, up to 256 KiB: closing a
/// socket with unread input makes the kernel reset the connection, and the peer may then
/// lose what was written last (a WebSocket close frame, a closing ERROR).
fn drain_unread(stream: &TcpStream) {
    let mut sink = [0u8; 4096];
    for _ in 0..64 {
        match std::io::Read::read(&mut &*stream, &mut sink) {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
}

/// Wall-clock milliseconds since the Unix epoch, handed to the core with `now`.
fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A descriptor to hold in reserve for [`Server::refuse_one`] (`/dev/null`).
fn open_reserve() -> Option<std::fs::File> {
    match std::fs::File::open("/dev/null") {
        Ok(file) => Some(file),
        Err(e) => {
            warn!("cannot open a reserve descriptor: {e}");
            None
        }
    }
}

/// EMFILE or ENFILE: the process (or the system) has no descriptor left.
fn is_out_of_descriptors(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
}

#[cfg(test)]
mod tests {
    use super::counted;

    #[test]
    fn counts_read_in_the_right_number() {
        assert_eq!(counted(1u64, "room", "rooms"), "1 room");
        assert_eq!(counted(0usize, "room", "rooms"), "0 rooms");
        assert_eq!(counted(2usize, "delivery", "deliveries"), "2 deliveries");
    }
}
