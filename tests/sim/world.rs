//! The simulated world: N SDK clients (each a connection of one device of its user, see
//! [`devices_for`]) and one relay process, wired by in-memory TCP-like links, a simulated
//! durable store, and one seeded RNG that schedules everything.
//!
//! Time is a base instant plus a simulated offset; nothing reads the real clock after that. The world advances from one
//! scheduled thing to the next (a network segment arriving, a store write finishing, a
//! client or relay timer), and between them the RNG injects the workload and faults:
//! - links: reset (either or both sides told), black holes (nobody told: heartbeats and
//!   idle timeouts must find out), app-initiated reconnects, latency spikes, writes split
//!   at random points, relay writes that block (short writes, `handle_write_blocked`);
//! - clients offline for a while (connects fail or hang);
//! - the relay process crashing (uncommitted store jobs lost or torn, every link dropped)
//!   and restarting from the committed records;
//! - store writes failing (STORE_FAILED, fail-stop, then an "operator" restart);
//! - apps that do not take their events for a while.
//!
//! Every step ends in [`World::after_step`]: apps take their events into the ledger
//! (which checks the per-event invariants) and the relay's held memory is checked.

use std::cell::Cell;
use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use bytes::Bytes;
use imrelay::client::ClientConfig;
use imrelay::proto::UserId;

use super::adapter::{
    epoch_op, parse_record, Action, ConnId, LinkFailure, Op, RelayTuning, SimClient, SimRelay,
    Sniffer, WALL_CLOCK_IS_SIMULATED,
};
use super::ledger::Ledger;
use super::rng::SimRng;

thread_local! {
    /// (seed, step, simulated ms) of the run on this thread, for panics from inside a core.
    pub static CONTEXT: Cell<(u64, u64, u64)> = const { Cell::new((0, 0, 0)) };
}

/// The wall clock at the simulation's base instant (for the coming `Relay::new` clock).
const WALL_CLOCK_BASE_MS: u64 = 1_700_000_000_000;
/// Quiet period after the faults: long enough for every timeout in play (send timeout,
/// idle timeout, heartbeat, backoff) to resolve what is left.
const QUIET: Duration = Duration::from_secs(300);
/// Time the final probe messages get.
const PROBE: Duration = Duration::from_secs(60);
/// Known bug (SDK, being fixed): a stored message that arrived while the app was not
/// taking events is lost if the link drops before the app takes it (`on_login_ok` drops
/// the queued event, the replay is then a "duplicate" for `Seen`, and it is acked).
/// Late apps are what trigger it; while this is true they are not simulated, so the
/// other invariants can be exercised. Set to false once the fix is in.
pub const AVOID_KNOWN_BUG_LOST_UNTAKEN_STORED: bool = false;

/// Steps at one simulated instant before the run is declared livelocked.
const LIVELOCK_STEPS: u32 = 50_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dir {
    C2R,
    R2C,
}

/// One direction of a link: segments in flight, in order, then maybe the end of stream.
#[derive(Default)]
struct Pipe {
    segs: VecDeque<(Instant, Vec<u8>)>,
    fin: Option<Instant>,
    fin_done: bool,
    last_at: Option<Instant>,
}

/// One TCP connection between a client and one relay incarnation.
struct Link {
    client: usize,
    /// The relay incarnation it was accepted by.
    gen: u32,
    /// The relay's id for it (None: refused at accept).
    conn: Option<ConnId>,
    c2r: Pipe,
    r2c: Pipe,
    /// The client still holds its socket.
    client_open: bool,
    /// The relay still holds its session.
    relay_open: bool,
    /// No more bytes flow (reset, black hole, crash).
    dead: bool,
    /// The relay did not want to read: waiting for `poll_resume`.
    c2r_paused: bool,
    /// The relay's last write was short: waiting for writability.
    relay_blocked: bool,
    /// The client's last write was short: waiting for writability.
    client_blocked: bool,
    /// Frame decoders for the trace: client → relay, relay → client, relay writes.
    sniff: [Sniffer; 3],
}

struct Slot {
    user: u64,
    /// The device id it logs in with (None: the user's default device).
    device: Option<String>,
    sim: SimClient,
    link: Option<usize>,
    attempt: u64,
    connecting: bool,
    net_up: bool,
    /// The app takes no events until then.
    late_until: Option<Instant>,
}

enum Job {
    Commit(u64, Vec<Op>),
    Compact(Vec<Op>),
}

/// The durable store as the writer thread and the disk would behave.
#[derive(Default)]
struct Store {
    committed: Vec<Op>,
    jobs: VecDeque<Job>,
    failure: Option<String>,
    fail_next: bool,
    wake_scheduled: bool,
    restart_scheduled: bool,
}

enum Ev {
    Arrive {
        link: usize,
        dir: Dir,
    },
    ConnectDone {
        client: usize,
        attempt: u64,
        ok: bool,
    },
    ResetClient {
        client: usize,
        link: usize,
    },
    ResetRelay {
        link: usize,
    },
    Writable {
        link: usize,
    },
    StoreWake {
        gen: u32,
    },
    StoreReport {
        gen: u32,
        reports: Vec<(u64, Result<(), String>)>,
    },
    RelayRestart,
    OperatorRestart,
    NetUp {
        client: usize,
    },
    ClientWritable {
        client: usize,
        link: usize,
    },
    AppWake {
        client: usize,
    },
}

#[derive(Clone, Copy, Debug)]
enum Act {
    SendDirect,
    SendStored,
    AppLate,
    LinkReset,
    LinkBlackhole,
    ClientDrop,
    NetOffline,
    RelayCrash,
    StoreFail,
    Compact,
    Idle,
}

const ACTS: [Act; 11] = [
    Act::SendDirect,
    Act::SendStored,
    Act::AppLate,
    Act::LinkReset,
    Act::LinkBlackhole,
    Act::ClientDrop,
    Act::NetOffline,
    Act::RelayCrash,
    Act::StoreFail,
    Act::Compact,
    Act::Idle,
];

/// What a seed chose: the shape of the world and how hostile it is.
struct Params {
    relay: RelayTuning,
    users: u64,
    weights: [u32; 11],
    actions: u64,
    action_gap_ms: u64,
    latency_ms: (u64, u64),
    spike_chance: f64,
    split_chance: f64,
    block_chance: f64,
    max_filler: usize,
}

/// `SIM_SHORT_TTL=1`: inbox TTLs of 30 s to 10 min (gaps) even while the relay reads the
/// real wall clock. Exploratory: a replay may then differ by a millisecond of expiry.
fn short_ttl() -> bool {
    std::env::var("SIM_SHORT_TTL").is_ok()
}

/// `SIM_MORE_DEVICES=1` (exploratory): up to two more clients per user (see
/// [`devices_for`]).
fn more_devices() -> bool {
    std::env::var("SIM_MORE_DEVICES").is_ok()
}

/// What the faults did in a run (for the sweep's summary).
#[derive(Clone, Copy, Debug, Default)]
pub struct FaultCounts {
    pub relay_crashes: u64,
    pub torn_writes: u64,
    pub store_failures: u64,
    pub compactions: u64,
    pub link_resets: u64,
    pub black_holes: u64,
    pub offline: u64,
    pub late_apps: u64,
    pub blocked_writes: u64,
    pub client_short_writes: u64,
    /// The largest output queue seen, in multiples of 1/100 of the out cap.
    pub max_out_pct: u64,
    pub max_stored: u64,
}

/// The device id each client logs in with, drawn from its own stream of the seed (so the
/// rest of the world is what the seed gave before devices existed): a user's first client
/// is the default device (no id) one time in five, else device "d0"; each further client
/// of the user is another connection of one of the user's devices already drawn one time
/// in four, the default device about one time in seven, else a device of its own.
///
/// `SIM_MORE_DEVICES=1` (exploratory) first adds up to two more clients to each user.
fn devices_for(seed: u64, client_user: &mut Vec<u64>) -> Vec<Option<String>> {
    let mut rng = SimRng::new(seed ^ 0xde71_ce00_de71_ce00);
    if more_devices() {
        let users = client_user.iter().copied().max().unwrap_or(0);
        for u in 1..=users {
            for _ in 0..rng.range(0, 2) {
                client_user.push(u);
            }
        }
    }
    let mut out: Vec<Option<String>> = Vec::new();
    let mut named: BTreeMap<u64, u64> = BTreeMap::new();
    for (c, &user) in client_user.iter().enumerate() {
        let earlier: Vec<Option<String>> = (0..c)
            .filter(|&e| client_user[e] == user)
            .map(|e| out[e].clone())
            .collect();
        let device = if earlier.is_empty() {
            if rng.chance(0.2) {
                None
            } else {
                Some(0)
            }
        } else if rng.chance(0.25) {
            out.push(earlier[rng.index(earlier.len())].clone());
            continue;
        } else if rng.chance(0.2) {
            None
        } else {
            Some(*named.get(&user).unwrap_or(&0))
        };
        out.push(device.map(|k| {
            named.insert(user, k + 1);
            format!("d{k}")
        }));
    }
    out
}

pub struct World {
    pub faults_done: FaultCounts,
    seed: u64,
    rng: SimRng,
    base: Instant,
    now: Instant,
    step: u64,
    same_instant: u32,
    p: Params,
    relay: Option<SimRelay>,
    relay_gen: u32,
    store: Store,
    compact_requested: bool,
    slots: Vec<Slot>,
    links: Vec<Link>,
    conn_links: BTreeMap<ConnId, usize>,
    events: BTreeMap<(Instant, u64), Ev>,
    next_ev: u64,
    ledger: Ledger,
    faults: bool,
    trace_on: bool,
    trace_print: bool,
    trace: VecDeque<String>,
}

impl World {
    pub fn new(
        seed: u64,
        actions_override: Option<u64>,
        trace_on: bool,
        trace_print: bool,
    ) -> World {
        let mut rng = SimRng::new(seed);
        // Ahead of the real clock, so a relay that still reads it at start sees every
        // simulated `now` after its own base (its wall clock is then `offset + now`).
        let base = Instant::now() + Duration::from_secs(3600);
        let users = rng.range(2, 5);
        let mut client_user: Vec<u64> = (1..=users).collect();
        for u in 1..=users {
            if rng.chance(0.25) {
                client_user.push(u); // a second device
            }
        }
        let client_device = devices_for(seed, &mut client_user);
        let max_frame = if rng.chance(0.5) { 4096 } else { 16384 };
        let ping = rng.range(5, 30);
        let relay = RelayTuning {
            max_frame,
            max_connections: 64,
            out_cap: max_frame as usize * 2 * rng.range(1, 4) as usize,
            login_timeout: Duration::from_secs(rng.range(3, 10)),
            ping_interval: Duration::from_secs(ping),
            idle_timeout: Duration::from_secs(ping * 3),
            // The final probe stores one message from each client, and a copy of it for
            // the sender's other devices: with more devices, inboxes must hold them.
            inbox_max_messages: (rng.range(4, 60) as usize).max(if more_devices() {
                24
            } else {
                0
            }),
            inbox_max_bytes: rng.range(8, 256) as usize * 1024,
            inbox_ttl: if WALL_CLOCK_IS_SIMULATED || short_ttl() {
                Duration::from_secs(rng.range(30, 600))
            } else {
                Duration::from_secs(7 * 24 * 3600)
            },
        };
        // Fault mix: each fault is on or off for the seed, with a random weight.
        let level = rng.range(0, 3) as u32;
        let mut weights = [0u32; 11];
        for (i, act) in ACTS.iter().enumerate() {
            weights[i] = match act {
                Act::SendDirect => 20 + rng.range(0, 30) as u32,
                Act::SendStored => 20 + rng.range(0, 30) as u32,
                Act::Idle => 10,
                Act::AppLate if AVOID_KNOWN_BUG_LOST_UNTAKEN_STORED => 0,
                Act::AppLate => rng.range(0, 8) as u32,
                _ if level == 0 || rng.chance(0.3) => 0,
                Act::RelayCrash | Act::StoreFail => rng.range(0, level as u64) as u32,
                _ => rng.range(0, 2 * level as u64) as u32,
            };
        }
        let p = Params {
            relay,
            users,
            weights,
            actions: actions_override.unwrap_or_else(|| rng.range(100, 400)),
            action_gap_ms: rng.range(10, 800),
            latency_ms: {
                let lo = rng.range(0, 20);
                (lo, lo + rng.range(0, 40))
            },
            spike_chance: if rng.chance(0.5) { 0.0 } else { 0.02 },
            split_chance: rng.range(0, 100) as f64 / 100.0,
            block_chance: if rng.chance(0.5) {
                0.0
            } else {
                rng.range(1, 30) as f64 / 100.0
            },
            max_filler: if rng.chance(0.2) {
                max_frame as usize - 32 - 8
            } else {
                rng.range(0, 300) as usize
            },
        };
        let mut slots = Vec::new();
        for (&user, device) in client_user.iter().zip(&client_device) {
            let config = ClientConfig {
                heartbeat_interval: rng.ms(2_000, 20_000),
                heartbeat_timeout: rng.ms(1_000, 10_000),
                connect_timeout: rng.ms(500, 10_000),
                login_timeout: rng.ms(500, 10_000),
                backoff_initial: rng.ms(10, 500),
                backoff_max: rng.ms(500, 30_000),
                max_in_flight: rng.range(1, 16) as usize,
                max_outbox: if rng.chance(0.3) {
                    rng.range(2, 32) as usize
                } else {
                    1024
                },
                retry_interval: rng.ms(50, 1_000),
                send_timeout: rng.ms(5_000, 60_000),
                inbox_ack_batch: rng.range(1, 32),
                inbox_ack_delay: rng.ms(1, 200),
                device: device.clone(),
                ..ClientConfig::new(UserId(user))
            };
            let client_seed = rng.next_u64();
            slots.push(Slot {
                user,
                device: device.clone(),
                sim: SimClient::new(config, client_seed, base),
                link: None,
                attempt: 0,
                connecting: false,
                net_up: true,
                late_until: None,
            });
        }
        let store = Store {
            committed: vec![epoch_op(rng.next_u64())],
            ..Store::default()
        };
        let mut w = World {
            faults_done: FaultCounts::default(),
            seed,
            rng,
            base,
            now: base,
            step: 0,
            same_instant: 0,
            p,
            relay: None,
            relay_gen: 0,
            store,
            compact_requested: false,
            slots,
            links: Vec::new(),
            conn_links: BTreeMap::new(),
            events: BTreeMap::new(),
            next_ev: 0,
            ledger: Ledger::new(
                &client_user
                    .iter()
                    .copied()
                    .zip(client_device.iter().cloned())
                    .collect::<Vec<_>>(),
            ),
            faults: true,
            trace_on,
            trace_print,
            trace: VecDeque::new(),
        };
        w.start_relay();
        for c in 0..w.slots.len() {
            w.client_drive(c);
        }
        w
    }

    /// A short description of the seed's world, for the failure report.
    pub fn describe(&self) -> String {
        format!(
            "{} users, clients {:?}, {} actions, weights {:?}, gap {} ms, latency {:?} ms, block {:.2}, relay {:?}",
            self.p.users,
            self.slots
                .iter()
                .map(|s| match &s.device {
                    Some(d) => format!("{}@{d}", s.user),
                    None => s.user.to_string(),
                })
                .collect::<Vec<_>>(),
            self.p.actions,
            self.p.weights,
            self.p.action_gap_ms,
            self.p.latency_ms,
            self.p.block_chance,
            self.p.relay
        )
    }

    /// The whole run: faults and workload, a quiet period, a probe, the final checks.
    pub fn run(&mut self) {
        for _ in 0..self.p.actions {
            let gap = if self.rng.chance(0.01) {
                self.rng.ms(10_000, 120_000)
            } else {
                self.rng.exp_ms(self.p.action_gap_ms)
            };
            let target = self.now + gap;
            self.run_until(target);
            self.random_action();
            self.after_step();
        }
        self.heal();
        let target = self.now + QUIET;
        self.run_until(target);
        let all_ready = self.slots.iter().all(|s| s.sim.is_ready());
        if !all_ready {
            let phases: Vec<String> = self.slots.iter().map(|s| s.sim.phase_name()).collect();
            self.violation(format!(
                "liveness: not every client is Ready after the quiet period: {phases:?}"
            ));
        }
        self.probe();
        let target = self.now + PROBE;
        self.run_until(target);
        self.check_final();
    }

    /// A digest of what happened, to check that a seed replays identically.
    pub fn digest(&self) -> String {
        let mut s = format!(
            "step {} t {:?} {:?}",
            self.step,
            self.now - self.base,
            self.ledger.counts
        );
        for r in &self.ledger.recs {
            let _ = write!(
                s,
                "|{}:{:?}:{:?}:{:?}",
                r.no, r.outcome, r.shown, r.copy_shown
            );
        }
        s
    }

    pub fn steps(&self) -> u64 {
        self.step
    }

    pub fn counts(&self) -> super::ledger::Counts {
        self.ledger.counts
    }

    // ---- the scheduler -----------------------------------------------------------------

    fn schedule(&mut self, at: Instant, ev: Ev) {
        let at = at.max(self.now);
        self.next_ev += 1;
        self.events.insert((at, self.next_ev), ev);
    }

    /// Processes every event and timer due up to `target`, in time order, then sets the
    /// clock to `target`.
    fn run_until(&mut self, target: Instant) {
        loop {
            let ev_at = self.events.keys().next().map(|k| k.0);
            let relay_at = self.relay.as_ref().and_then(|r| r.poll_timeout());
            let mut client_at: Option<(Instant, usize)> = None;
            for (c, s) in self.slots.iter().enumerate() {
                if let Some(t) = s.sim.poll_timeout() {
                    if client_at.is_none_or(|(best, _)| t < best) {
                        client_at = Some((t, c));
                    }
                }
            }
            let Some(t) = [ev_at, relay_at, client_at.map(|x| x.0)]
                .into_iter()
                .flatten()
                .min()
            else {
                break;
            };
            if t > target {
                break;
            }
            if t > self.now {
                self.now = t;
                self.same_instant = 0;
            } else {
                self.same_instant += 1;
                if self.same_instant > LIVELOCK_STEPS {
                    self.violation(format!(
                        "livelock: {LIVELOCK_STEPS} steps at one instant (next event {:?}, relay timer {:?}, client timer {:?})",
                        ev_at.map(|t| t.saturating_duration_since(self.now)),
                        relay_at.map(|t| t.saturating_duration_since(self.now)),
                        client_at.map(|(t, c)| (c, t.saturating_duration_since(self.now)))
                    ));
                }
            }
            if ev_at == Some(t) {
                let key = *self.events.keys().next().unwrap();
                let ev = self.events.remove(&key).unwrap();
                self.handle_event(ev);
            } else if relay_at == Some(t) {
                self.trace(|| "relay timer".to_string());
                let now = self.now;
                self.relay.as_mut().unwrap().handle_timeout(now);
                self.relay_turn();
            } else if let Some((_, c)) = client_at {
                self.trace(|| format!("client {c} timer"));
                let now = self.now;
                self.slots[c].sim.handle_timeout(now);
                self.client_drive(c);
            }
            self.after_step();
        }
        if target > self.now {
            self.now = target;
            self.same_instant = 0;
        }
    }

    fn handle_event(&mut self, ev: Ev) {
        match ev {
            Ev::Arrive { link, dir } => match dir {
                Dir::C2R => self.arrive_at_relay(link),
                Dir::R2C => self.arrive_at_client(link),
            },
            Ev::ConnectDone {
                client,
                attempt,
                ok,
            } => self.connect_done(client, attempt, ok),
            Ev::ResetClient { client, link } => {
                if self.slots[client].link == Some(link) {
                    self.trace(|| format!("client {client}: link {link} reset"));
                    let now = self.now;
                    self.slots[client].sim.link_failed(LinkFailure::Reset, now);
                    self.client_drive(client);
                }
            }
            Ev::ResetRelay { link } => self.relay_drop(link),
            Ev::Writable { link } => {
                let l = &mut self.links[link];
                if l.relay_open && l.gen == self.relay_gen && self.relay.is_some() {
                    l.relay_blocked = false;
                    let conn = l.conn.unwrap();
                    self.trace(|| format!("relay: link {link} writable"));
                    self.relay.as_mut().unwrap().writable(conn);
                    self.relay_turn();
                }
            }
            Ev::StoreWake { gen } => {
                if gen == self.relay_gen && self.relay.is_some() {
                    self.store_wake();
                }
            }
            Ev::StoreReport { gen, reports } => {
                if gen == self.relay_gen && self.relay.is_some() {
                    self.store_report(reports);
                }
            }
            Ev::RelayRestart => {
                if self.relay.is_none() {
                    self.start_relay();
                }
            }
            Ev::OperatorRestart => {
                if self.store.restart_scheduled {
                    self.trace(|| "operator restarts the relay after a store failure".to_string());
                    let downtime = self.rng.ms(0, 2_000);
                    self.crash_relay(downtime);
                }
            }
            Ev::ClientWritable { client, link } => {
                if self.slots[client].link == Some(link) {
                    self.links[link].client_blocked = false;
                    self.client_drive(client);
                }
            }
            Ev::NetUp { client } => {
                self.trace(|| format!("client {client}: network up"));
                self.slots[client].net_up = true;
            }
            Ev::AppWake { client } => {
                if self.slots[client].late_until.is_some_and(|t| t <= self.now) {
                    self.trace(|| format!("client {client}: app takes its events again"));
                    self.slots[client].late_until = None;
                }
            }
        }
    }

    /// End of every step: apps take their events (the ledger checks them), then the
    /// relay's held memory is checked.
    fn after_step(&mut self) {
        self.step += 1;
        let ms = (self.now - self.base).as_millis() as u64;
        CONTEXT.with(|c| c.set((self.seed, self.step, ms)));
        for c in 0..self.slots.len() {
            if self.slots[c].late_until.is_some() {
                continue;
            }
            while let Some(ev) = self.slots[c].sim.poll_event() {
                if self.trace_on {
                    let line = format!("client {c} app: {ev:?}");
                    self.trace(|| line);
                }
                if let Err(v) = self.ledger.on_event(c, ev) {
                    self.violation(v);
                }
            }
        }
        self.check_memory();
    }

    fn check_memory(&mut self) {
        let Some(relay) = &self.relay else {
            return;
        };
        let g = relay.gauges();
        let t = &self.p.relay;
        let users = self.p.users as usize;
        let mut problems = Vec::new();
        if g.sessions > t.max_connections {
            problems.push(format!(
                "{} sessions over the cap {}",
                g.sessions, t.max_connections
            ));
        }
        if g.stored_messages > t.inbox_max_messages * users {
            problems.push(format!(
                "{} stored messages over {} per inbox x {users} users",
                g.stored_messages, t.inbox_max_messages
            ));
        }
        if g.stored_bytes > t.inbox_max_bytes * users {
            problems.push(format!("{} stored bytes over the caps", g.stored_bytes));
        }
        if g.inbox_users > users {
            problems.push(format!("{} inboxes for {users} users", g.inbox_users));
        }
        if g.dedup_entries > relay.dedup_max_entries() {
            problems.push(format!("{} dedup entries", g.dedup_entries));
        }
        // DELIVERs stop at the cap (RECIPIENT_SLOW) and inbox pushes at half of it; only
        // the answers to what a connection itself sent may go over, a read's worth.
        let bound = t.out_cap + t.max_frame as usize;
        let mut max_out = 0;
        for (&conn, &l) in &self.conn_links {
            let n = relay.out_len(conn);
            max_out = max_out.max(n);
            if n > bound {
                problems.push(format!(
                    "link {l} ({conn}) has {n} bytes queued (out cap {})",
                    t.out_cap
                ));
            }
        }
        if !problems.is_empty() {
            self.violation(format!("relay memory: {}", problems.join("; ")));
        }
        let f = &mut self.faults_done;
        f.max_out_pct = f.max_out_pct.max((max_out * 100 / t.out_cap) as u64);
        f.max_stored = f.max_stored.max(g.stored_messages as u64);
    }

    // ---- faults and workload -----------------------------------------------------------

    fn random_action(&mut self) {
        let act = ACTS[self.rng.weighted(&self.p.weights)];
        let c = self.rng.index(self.slots.len());
        match act {
            Act::SendDirect | Act::SendStored => {
                let to = self.random_recipient(c);
                let filler = self.rng.below(self.p.max_filler as u64 + 1) as usize;
                self.send(c, to, matches!(act, Act::SendStored), filler, false);
            }
            Act::AppLate => {
                let late = self.rng.ms(50, 30_000);
                let until = self.now + late;
                self.trace(|| format!("client {c}: app stops taking events for {late:?}"));
                let until = self.slots[c].late_until.map_or(until, |t| t.max(until));
                self.slots[c].late_until = Some(until);
                self.faults_done.late_apps += 1;
                self.schedule(until, Ev::AppWake { client: c });
            }
            Act::LinkReset => {
                if let Some(l) = self.slots[c].link {
                    let client_told = self.rng.chance(0.8);
                    let relay_told = self.rng.chance(0.8);
                    self.trace(|| format!("fault: reset link {l} (client told {client_told}, relay told {relay_told})"));
                    self.kill_link(l);
                    self.faults_done.link_resets += 1;
                    if client_told {
                        let at = self.now + self.rng.ms(0, 50);
                        self.schedule(at, Ev::ResetClient { client: c, link: l });
                    }
                    if relay_told {
                        let at = self.now + self.rng.ms(0, 50);
                        self.schedule(at, Ev::ResetRelay { link: l });
                    }
                }
            }
            Act::LinkBlackhole => {
                if let Some(l) = self.slots[c].link {
                    self.trace(|| format!("fault: black hole on link {l}"));
                    self.kill_link(l);
                    self.faults_done.black_holes += 1;
                }
            }
            Act::ClientDrop => {
                if self.slots[c].link.is_some() {
                    self.trace(|| format!("client {c}: app asks to reconnect"));
                    let now = self.now;
                    self.slots[c].sim.link_failed(LinkFailure::Reset, now);
                    self.client_drive(c);
                }
            }
            Act::NetOffline => {
                let back = if self.rng.chance(0.2) {
                    self.rng.ms(60_000, 180_000)
                } else {
                    self.rng.ms(200, 20_000)
                };
                self.trace(|| format!("fault: client {c} offline for {back:?}"));
                self.slots[c].net_up = false;
                self.faults_done.offline += 1;
                if let Some(l) = self.slots[c].link {
                    self.kill_link(l);
                    if self.rng.chance(0.5) {
                        let at = self.now + self.rng.ms(0, 100);
                        self.schedule(at, Ev::ResetClient { client: c, link: l });
                    }
                }
                let at = self.now + back;
                self.schedule(at, Ev::NetUp { client: c });
            }
            Act::RelayCrash => {
                if self.relay.is_some() {
                    let downtime = if self.rng.chance(0.3) {
                        Duration::ZERO
                    } else {
                        self.rng.ms(10, 10_000)
                    };
                    self.crash_relay(downtime);
                }
            }
            Act::StoreFail => {
                self.trace(|| "fault: the next store write fails".to_string());
                self.store.fail_next = true;
            }
            Act::Compact => {
                if self.relay.is_some() {
                    self.trace(|| "store: compaction requested".to_string());
                    self.compact_requested = true;
                    self.relay_turn();
                }
            }
            Act::Idle => {}
        }
    }

    fn random_recipient(&mut self, sender: usize) -> u64 {
        let me = self.slots[sender].user;
        if self.rng.chance(0.05) {
            return me;
        }
        let others: Vec<u64> = (1..=self.p.users).filter(|&u| u != me).collect();
        others[self.rng.index(others.len())]
    }

    fn send(&mut self, c: usize, to: u64, stored: bool, filler: usize, probe: bool) {
        let no = self.ledger.next_no();
        let fill = self.rng.next_u64() as u8;
        let payload = Bytes::from(Ledger::payload(no, filler, fill));
        let now = self.now;
        match self.slots[c].sim.send(to, payload, stored, now) {
            Ok(id) => {
                self.trace(|| {
                    format!(
                        "client {c}: send #{no} {} to user {to} id {id:#x} ({filler} B filler)",
                        if stored { "stored" } else { "direct" }
                    )
                });
                self.ledger.record_send(c, to, id, stored, probe);
            }
            Err(e) => {
                self.trace(|| format!("client {c}: send #{no} refused at once: {e}"));
                self.ledger.counts.refused_at_send += 1;
                if probe {
                    self.violation(format!("liveness: probe send from client {c} refused: {e}"));
                }
            }
        }
        self.client_drive(c);
    }

    /// Stops the faults and lets the world settle: everyone online, apps awake, the relay
    /// up on a working store.
    fn heal(&mut self) {
        self.trace(|| "==== quiet period ====".to_string());
        self.faults = false;
        self.store.fail_next = false;
        for s in &mut self.slots {
            s.net_up = true;
            s.late_until = None;
        }
        if self.store.failure.is_some() || self.store.restart_scheduled {
            self.crash_relay(Duration::ZERO);
        }
        if self.relay.is_none() {
            let now = self.now;
            self.schedule(now, Ev::RelayRestart);
        }
    }

    /// After the quiet period: one stored and one direct message from every client; all
    /// must get through.
    fn probe(&mut self) {
        self.trace(|| "==== probe ====".to_string());
        for c in 0..self.slots.len() {
            let me = self.slots[c].user;
            let to = if self.p.users > 1 {
                me % self.p.users + 1
            } else {
                me
            };
            self.send(c, to, true, 16, true);
            self.send(c, to, false, 16, true);
        }
    }

    fn check_final(&mut self) {
        let pending: Vec<usize> = self.slots.iter().map(|s| s.sim.pending()).collect();
        if let Err(v) = self.ledger.check_final(&pending, true) {
            self.violation(v);
        }
        let Some(relay) = &self.relay else {
            self.violation("the relay is down at the end".to_string());
        };
        let g = relay.gauges();
        let mut problems = Vec::new();
        if g.stored_messages != 0 {
            problems.push(format!(
                "{} stored messages still held after every app took everything",
                g.stored_messages
            ));
        }
        if g.commits_in_flight != 0 || !self.store.jobs.is_empty() {
            problems.push(format!("{} commits still in flight", g.commits_in_flight));
        }
        if g.sessions != self.slots.len() {
            problems.push(format!(
                "{} sessions for {} connected clients (leaked or missing sessions)",
                g.sessions,
                self.slots.len()
            ));
        }
        if !problems.is_empty() {
            self.violation(format!("end state: {}", problems.join("; ")));
        }
    }

    // ---- the relay process -------------------------------------------------------------

    fn start_relay(&mut self) {
        let (gen, records) = (self.relay_gen, self.store.committed.len());
        self.trace(|| format!("relay: start (incarnation {gen}) on {records} records"));
        let seed = self.rng.next_u64();
        let clock = (self.base, WALL_CLOCK_BASE_MS);
        self.relay = Some(SimRelay::start(
            &self.p.relay,
            seed,
            clock,
            &self.store.committed,
        ));
        self.relay_turn();
    }

    /// The relay process dies: the writer thread dies mid-way through its queue, every
    /// socket goes, and it comes back after `downtime`.
    fn crash_relay(&mut self, downtime: Duration) {
        self.trace(|| format!("fault: relay crash, down for {downtime:?}"));
        self.faults_done.relay_crashes += 1;
        let jobs: Vec<Job> = std::mem::take(&mut self.store.jobs).into_iter().collect();
        if self.store.failure.is_none() && !jobs.is_empty() {
            // The writer got through some of its queue before the process died; the next
            // write may be torn (a prefix of its records survives).
            let done = self.rng.index(jobs.len() + 1);
            let torn = self.rng.chance(0.5);
            for (i, job) in jobs.into_iter().enumerate() {
                match job {
                    Job::Commit(_, ops) if i < done => self.persist(ops),
                    Job::Compact(snapshot) if i < done => self.store.committed = snapshot,
                    Job::Commit(_, mut ops) if i == done && torn => {
                        self.faults_done.torn_writes += 1;
                        let keep = self.rng.index(ops.len() + 1);
                        let n = ops.len();
                        self.trace(|| format!("store: torn write, {keep} of {n} records landed"));
                        ops.truncate(keep);
                        self.persist(ops);
                    }
                    _ => {}
                }
            }
        }
        self.store.failure = None;
        self.store.fail_next = false;
        self.store.wake_scheduled = false;
        self.store.restart_scheduled = false;
        self.relay = None;
        let old = self.relay_gen;
        self.relay_gen += 1;
        for l in 0..self.links.len() {
            if self.links[l].gen != old {
                continue;
            }
            self.links[l].relay_open = false;
            if !self.links[l].dead {
                self.kill_link(l);
                let c = self.links[l].client;
                if self.slots[c].link == Some(l) && self.rng.chance(0.7) {
                    let at = self.now + self.rng.ms(0, 100);
                    self.schedule(at, Ev::ResetClient { client: c, link: l });
                }
            }
        }
        self.conn_links.clear();
        let at = self.now + downtime;
        self.schedule(at, Ev::RelayRestart);
    }

    /// The end of a driver loop turn: resumed reads, the commit, the writes.
    fn relay_turn(&mut self) {
        if self.relay.is_none() {
            return;
        }
        self.drain_resumes();
        if let Some((id, ops)) = self.relay.as_mut().unwrap().take_commit() {
            self.trace(|| format!("store: commit {id} queued ({} records)", ops.len()));
            self.store.jobs.push_back(Job::Commit(id, ops));
            self.wake_store();
        }
        if self.compact_requested {
            self.compact_requested = false;
            let snapshot = self.relay.as_ref().unwrap().snapshot();
            self.store.jobs.push_back(Job::Compact(snapshot));
            self.wake_store();
        }
        while let Some(id) = self.relay.as_mut().and_then(|r| r.poll_transmit()) {
            self.flush_conn(id);
        }
        self.drain_resumes();
    }

    fn drain_resumes(&mut self) {
        while let Some(id) = self.relay.as_mut().and_then(|r| r.poll_resume()) {
            if let Some(&l) = self.conn_links.get(&id) {
                if self.links[l].c2r_paused {
                    self.links[l].c2r_paused = false;
                    let now = self.now;
                    self.schedule(
                        now,
                        Ev::Arrive {
                            link: l,
                            dir: Dir::C2R,
                        },
                    );
                }
            }
        }
    }

    /// Writes what the relay queued for `id`, as `Server::flush_conn` does.
    fn flush_conn(&mut self, id: ConnId) {
        let Some(&l) = self.conn_links.get(&id) else {
            return;
        };
        let mut blocked = false;
        loop {
            if self.links[l].relay_blocked {
                blocked = true;
                break;
            }
            let out = self.relay.as_ref().unwrap().peek_output(id);
            if out.is_empty() {
                break;
            }
            if self.faults && self.rng.chance(self.p.block_chance) {
                let n = self.rng.index(out.len());
                if n > 0 {
                    self.relay.as_mut().unwrap().written(id, n);
                    self.sniff_relay_write(l, &out[..n]);
                    self.pipe_write(l, Dir::R2C, out[..n].to_vec());
                }
                self.links[l].relay_blocked = true;
                self.faults_done.blocked_writes += 1;
                let at = self.now + self.rng.ms(1, 3_000);
                self.trace(|| {
                    format!(
                        "relay: write to link {l} blocked after {n} of {} B",
                        out.len()
                    )
                });
                self.schedule(at, Ev::Writable { link: l });
                blocked = true;
                break;
            }
            let n = out.len();
            self.relay.as_mut().unwrap().written(id, n);
            self.sniff_relay_write(l, &out);
            self.pipe_write(l, Dir::R2C, out);
        }
        if self.relay.as_ref().unwrap().is_finished(id) {
            self.trace(|| format!("relay: closes link {l}"));
            self.relay.as_mut().unwrap().closed(id);
            self.links[l].relay_open = false;
            self.conn_links.remove(&id);
            self.pipe_close(l, Dir::R2C);
            return;
        }
        if blocked {
            self.relay.as_mut().unwrap().write_blocked(id);
        }
    }

    /// The relay's socket for `link` failed (a reset it noticed).
    fn relay_drop(&mut self, link: usize) {
        let l = &self.links[link];
        if !l.relay_open || l.gen != self.relay_gen || self.relay.is_none() {
            return;
        }
        let conn = l.conn.unwrap();
        self.trace(|| format!("relay: link {link} socket error, closed"));
        self.relay.as_mut().unwrap().closed(conn);
        self.links[link].relay_open = false;
        self.conn_links.remove(&conn);
        self.relay_turn();
    }

    // ---- the store ---------------------------------------------------------------------

    fn wake_store(&mut self) {
        if !self.store.wake_scheduled {
            self.store.wake_scheduled = true;
            let delay = if self.faults && self.rng.chance(0.05) {
                self.rng.ms(50, 2_000)
            } else {
                self.rng.ms(0, 5)
            };
            let at = self.now + delay;
            let gen = self.relay_gen;
            self.schedule(at, Ev::StoreWake { gen });
        }
    }

    /// The writer thread wakes: every queued job, commits grouped into one write.
    fn store_wake(&mut self) {
        self.store.wake_scheduled = false;
        let jobs: Vec<Job> = std::mem::take(&mut self.store.jobs).into_iter().collect();
        let mut batch = Vec::new();
        let mut last = None;
        let mut reports = Vec::new();
        for job in jobs {
            match job {
                Job::Commit(id, mut ops) => {
                    batch.append(&mut ops);
                    last = Some(id);
                }
                Job::Compact(snapshot) => {
                    if let Some(id) = last.take() {
                        reports.push((id, self.write(std::mem::take(&mut batch))));
                    }
                    if self.store.failure.is_none() {
                        self.trace(|| format!("store: compacted to {} records", snapshot.len()));
                        self.faults_done.compactions += 1;
                        self.store.committed = snapshot;
                    }
                }
            }
        }
        if let Some(id) = last {
            reports.push((id, self.write(batch)));
        }
        if !reports.is_empty() {
            let at = self.now + self.rng.ms(0, 2);
            let gen = self.relay_gen;
            self.schedule(at, Ev::StoreReport { gen, reports });
        }
    }

    fn write(&mut self, batch: Vec<Op>) -> Result<(), String> {
        if let Some(e) = &self.store.failure {
            return Err(format!("the store failed earlier ({e})"));
        }
        if batch.is_empty() {
            return Ok(());
        }
        if self.store.fail_next {
            self.store.fail_next = false;
            self.faults_done.store_failures += 1;
            // Part of the batch may have reached the disk; the store cuts the log back to
            // its last commit (or records that length for the next start to cut) before
            // the relay answers STORE_FAILED, which promises the batch is not read back
            // (protocol.md, section 15; a store that can do neither exits without
            // answering: a crash with a torn write, see `crash_relay`).
            let keep = self.rng.index(batch.len() + 1);
            self.trace(|| {
                format!(
                    "store: write fails, {keep} of {} records reached the disk and are cut back",
                    batch.len()
                )
            });
            self.store.failure = Some("simulated disk error".to_string());
            return Err("simulated disk error".to_string());
        }
        self.persist(batch);
        Ok(())
    }

    fn persist(&mut self, ops: Vec<Op>) {
        for op in ops {
            if let Some(r) = parse_record(&op) {
                if let Err(v) = self.ledger.on_persisted(r) {
                    self.violation(v);
                }
            }
            self.store.committed.push(op);
        }
    }

    fn store_report(&mut self, reports: Vec<(u64, Result<(), String>)>) {
        for (id, result) in reports {
            self.trace(|| format!("store: commit {id} reported {result:?}"));
            let failed = result.is_err();
            self.relay.as_mut().unwrap().store_committed(id, result);
            if failed && !self.store.restart_scheduled {
                self.store.restart_scheduled = true;
                let at = self.now
                    + if self.faults {
                        self.rng.ms(100, 20_000)
                    } else {
                        Duration::ZERO
                    };
                self.schedule(at, Ev::OperatorRestart);
            }
        }
        self.relay_turn();
    }

    // ---- links -------------------------------------------------------------------------

    fn latency(&mut self) -> Duration {
        let (lo, hi) = self.p.latency_ms;
        let mut d = self.rng.ms(lo, hi);
        if self.faults && self.rng.chance(self.p.spike_chance) {
            d += self.rng.ms(200, 5_000);
        }
        d
    }

    /// Bytes written into one direction of a link: split at random points, each piece
    /// arriving in order after its own latency.
    fn pipe_write(&mut self, l: usize, dir: Dir, bytes: Vec<u8>) {
        if self.links[l].dead || bytes.is_empty() {
            return;
        }
        let mut pieces = Vec::new();
        let mut rest = &bytes[..];
        while rest.len() > 1 && self.rng.chance(self.p.split_chance) {
            let cut = 1 + self.rng.index(rest.len() - 1);
            pieces.push(rest[..cut].to_vec());
            rest = &rest[cut..];
        }
        pieces.push(rest.to_vec());
        for piece in pieces {
            let lat = self.latency();
            let pipe = self.pipe(l, dir);
            let at = pipe
                .last_at
                .map_or(self.now + lat, |last| last.max(self.now + lat));
            let pipe = self.pipe_mut(l, dir);
            pipe.last_at = Some(at);
            pipe.segs.push_back((at, piece));
            self.schedule(at, Ev::Arrive { link: l, dir });
        }
    }

    /// The writer closed its side: end of stream after what is in flight.
    fn pipe_close(&mut self, l: usize, dir: Dir) {
        if self.links[l].dead {
            return;
        }
        let lat = self.latency();
        let now = self.now;
        let pipe = self.pipe_mut(l, dir);
        if pipe.fin.is_some() {
            return;
        }
        let at = pipe.last_at.map_or(now + lat, |last| last.max(now + lat));
        pipe.fin = Some(at);
        pipe.last_at = Some(at);
        self.schedule(at, Ev::Arrive { link: l, dir });
    }

    fn pipe(&self, l: usize, dir: Dir) -> &Pipe {
        match dir {
            Dir::C2R => &self.links[l].c2r,
            Dir::R2C => &self.links[l].r2c,
        }
    }

    fn pipe_mut(&mut self, l: usize, dir: Dir) -> &mut Pipe {
        match dir {
            Dir::C2R => &mut self.links[l].c2r,
            Dir::R2C => &mut self.links[l].r2c,
        }
    }

    /// No more bytes flow either way; nobody is told (callers schedule what is noticed).
    fn kill_link(&mut self, l: usize) {
        let link = &mut self.links[l];
        link.dead = true;
        link.c2r = Pipe::default();
        link.r2c = Pipe::default();
    }

    fn arrive_at_relay(&mut self, l: usize) {
        let link = &self.links[l];
        if link.dead || link.gen != self.relay_gen || !link.relay_open || self.relay.is_none() {
            return;
        }
        let conn = link.conn.unwrap();
        loop {
            let now = self.now;
            let link = &self.links[l];
            if !link.relay_open {
                break;
            }
            match link.c2r.segs.front() {
                Some(&(at, _)) if at <= now => {
                    if !self.relay.as_mut().unwrap().wants_read(conn) {
                        self.links[l].c2r_paused = true;
                        break;
                    }
                    let (_, bytes) = self.links[l].c2r.segs.pop_front().unwrap();
                    self.sniff(l, Dir::C2R, &bytes);
                    self.relay.as_mut().unwrap().input(conn, &bytes, now);
                }
                Some(_) => break,
                None => {
                    if link.c2r.fin.is_some_and(|at| at <= now) && !link.c2r.fin_done {
                        self.links[l].c2r.fin_done = true;
                        self.trace(|| format!("relay: link {l} end of stream"));
                        self.relay.as_mut().unwrap().eof(conn, now);
                    }
                    break;
                }
            }
        }
        self.relay_turn();
    }

    fn arrive_at_client(&mut self, l: usize) {
        let c = self.links[l].client;
        loop {
            let now = self.now;
            let link = &self.links[l];
            if link.dead {
                return;
            }
            if self.slots[c].link != Some(l) || !link.client_open {
                // The client's socket is gone: data hitting it draws a reset.
                let had_data = !link.r2c.segs.is_empty();
                self.links[l].r2c = Pipe::default();
                if had_data && self.links[l].relay_open {
                    let at = self.now + self.latency();
                    self.schedule(at, Ev::ResetRelay { link: l });
                }
                return;
            }
            match link.r2c.segs.front() {
                Some(&(at, _)) if at <= now => {
                    let (_, bytes) = self.links[l].r2c.segs.pop_front().unwrap();
                    self.sniff(l, Dir::R2C, &bytes);
                    self.slots[c].sim.input(&bytes, now);
                    self.client_drive(c);
                }
                Some(_) => return,
                None => {
                    if link.r2c.fin.is_some_and(|at| at <= now) && !link.r2c.fin_done {
                        self.links[l].r2c.fin_done = true;
                        self.trace(|| format!("client {c}: link {l} closed by the relay"));
                        self.slots[c]
                            .sim
                            .link_failed(LinkFailure::ClosedByRelay, now);
                        self.client_drive(c);
                    }
                    return;
                }
            }
        }
    }

    // ---- clients -----------------------------------------------------------------------

    /// Carries out the core's link actions and writes its output (as `conn.rs` does).
    fn client_drive(&mut self, c: usize) {
        let now = self.now;
        while let Some(action) = self.slots[c].sim.poll_action(now) {
            match action {
                Action::Connect => self.start_connect(c),
                Action::Disconnect => self.client_disconnect(c),
            }
        }
        let Some(l) = self.slots[c].link else {
            return;
        };
        let sim = &self.slots[c].sim;
        if !sim.linked() || sim.output().is_empty() || self.links[l].client_blocked {
            return;
        }
        let mut out = sim.output().to_vec();
        if self.faults && self.rng.chance(self.p.block_chance) {
            // A short write: the rest stays in the core until the socket is writable.
            let n = self.rng.index(out.len());
            out.truncate(n);
            self.links[l].client_blocked = true;
            self.faults_done.client_short_writes += 1;
            let at = self.now + self.rng.ms(1, 2_000);
            self.schedule(at, Ev::ClientWritable { client: c, link: l });
        }
        if !out.is_empty() {
            self.slots[c].sim.consume_output(out.len());
            self.pipe_write(l, Dir::C2R, out);
        }
    }

    fn start_connect(&mut self, c: usize) {
        let slot = &mut self.slots[c];
        slot.attempt += 1;
        slot.connecting = true;
        let attempt = slot.attempt;
        let up = self.relay.is_some() && slot.net_up;
        if up && !(self.faults && self.rng.chance(0.02)) {
            let at = self.now + self.latency();
            self.schedule(
                at,
                Ev::ConnectDone {
                    client: c,
                    attempt,
                    ok: true,
                },
            );
        } else if self.rng.chance(0.5) {
            let at = self.now + self.rng.ms(1, 200);
            self.schedule(
                at,
                Ev::ConnectDone {
                    client: c,
                    attempt,
                    ok: false,
                },
            );
        }
        // else: no answer; the core's connect timeout finds out.
    }

    fn connect_done(&mut self, c: usize, attempt: u64, ok: bool) {
        let slot = &mut self.slots[c];
        if slot.attempt != attempt || !slot.connecting {
            return;
        }
        slot.connecting = false;
        let now = self.now;
        if !(ok && self.slots[c].net_up && self.relay.is_some()) {
            self.trace(|| format!("client {c}: connect failed"));
            self.slots[c]
                .sim
                .link_failed(LinkFailure::ConnectFailed, now);
            self.client_drive(c);
            return;
        }
        let opened = self.relay.as_mut().unwrap().open(now);
        let l = self.links.len();
        self.links.push(Link {
            client: c,
            gen: self.relay_gen,
            conn: opened.as_ref().ok().copied(),
            c2r: Pipe::default(),
            r2c: Pipe::default(),
            client_open: true,
            relay_open: opened.is_ok(),
            dead: false,
            c2r_paused: false,
            relay_blocked: false,
            client_blocked: false,
            sniff: Default::default(),
        });
        self.slots[c].link = Some(l);
        match opened {
            Ok(conn) => {
                self.trace(|| format!("client {c}: connected, link {l} = relay {conn}"));
                if let Some(old) = self.conn_links.insert(conn, l) {
                    self.violation(format!(
                        "sim: relay reused {conn} while link {old} still held it"
                    ));
                }
            }
            Err(frame) => {
                self.trace(|| format!("client {c}: connection refused by the relay (link {l})"));
                self.pipe_write(l, Dir::R2C, frame);
                self.pipe_close(l, Dir::R2C);
            }
        }
        self.slots[c].sim.connected(now);
        self.client_drive(c);
        self.relay_turn();
    }

    /// The core dropped its link: the socket closes (end of stream to the relay).
    fn client_disconnect(&mut self, c: usize) {
        self.slots[c].connecting = false;
        if let Some(l) = self.slots[c].link.take() {
            self.trace(|| format!("client {c}: drops link {l}"));
            self.links[l].client_open = false;
            self.pipe_close(l, Dir::C2R);
        }
    }

    // ---- reporting ---------------------------------------------------------------------

    /// Traces the frames a read completes.
    fn sniff(&mut self, l: usize, dir: Dir, bytes: &[u8]) {
        if !self.trace_on {
            return;
        }
        let c = self.links[l].client;
        let (i, arrow) = match dir {
            Dir::C2R => (0, format!("client {c} → relay (link {l})")),
            Dir::R2C => (1, format!("relay → client {c} (link {l})")),
        };
        for frame in self.links[l].sniff[i].feed(bytes) {
            self.trace(|| format!("{arrow}: {frame}"));
        }
    }

    fn sniff_relay_write(&mut self, l: usize, bytes: &[u8]) {
        if !self.trace_on {
            return;
        }
        for frame in self.links[l].sniff[2].feed(bytes) {
            self.trace(|| format!("relay writes to link {l}: {frame}"));
        }
    }

    fn trace(&mut self, line: impl FnOnce() -> String) {
        if !self.trace_on {
            return;
        }
        let ms = (self.now - self.base).as_millis();
        let line = format!("[step {} t={}ms] {}", self.step, ms, line());
        if self.trace_print {
            eprintln!("{line}");
        }
        self.trace.push_back(line);
        if self.trace.len() > 400 {
            self.trace.pop_front();
        }
    }

    fn violation(&self, what: String) -> ! {
        let ms = (self.now - self.base).as_millis();
        if self.trace_on && !self.trace_print {
            eprintln!("---- last {} trace lines ----", self.trace.len());
            for line in &self.trace {
                eprintln!("{line}");
            }
            eprintln!("---- end of trace ----");
        }
        panic!(
            "SIM VIOLATION seed {} step {} t={}ms: {}",
            self.seed, self.step, ms, what
        );
    }
}
