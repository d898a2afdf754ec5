//! imrelay-bench: a load generator for imrelay, and the loopback floor it is measured
//! against.
//!
//! `cargo run --release --bin imrelay-bench -- pairs --spawn --relay-cpu 0 --bench-cpu 1 \
//!   --pairs 100 --size 64 --window 64 --messages 200000 --compare-floor`
//!
//! Modes: `pairs`, `pingpong`, `fanout`, `floor`, `conns`, `stored` (pairs with stored
//! delivery to a durable store), `attack` (one hostile workload beside a pingpong bystander:
//! the relay's peak memory against its bound, and the bystander's latency), `logins`
//! (connect, LOGIN, LOGIN_OK, close: logins per second, optionally with signed tokens).
//! Against `--addr HOST:PORT` or a relay it starts itself (`--spawn`), in which case it
//! also reports the relay's CPU time per million messages and its memory. `pairs`,
//! `pingpong`, `fanout` and `logins` speak TLS with `--tls`.
//! `pairs`, `pingpong`, `fanout` and `stored` also drive a cluster (protocol.md section 18): with
//! `--spawn --cluster N` a redis-server and N relay nodes it starts, or `--nodes A,B,…`
//! already running; users are spread so that every message crosses nodes, and the report
//! adds the number of nodes, the relay CPU summed over them and Redis's CPU.
//! Progress on stderr, a summary on stderr, one JSON line on stdout.

mod attack;
mod engine;
mod logins;
mod relay_proc;
mod report;
mod setup;
mod tls;
#[cfg(test)]
mod tls_tests;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use imrelay::proto::Opcode;

use engine::{Conn, Job, Stream};
use relay_proc::{SpawnedRedis, SpawnedRelay};
use report::Report;
use tls::{Sock, TempDir, TlsArgs, TlsClient};

#[derive(Parser)]
#[command(version, about = "Load generator for imrelay")]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// P pairs of users; each sends M messages of S bytes to its partner, W in flight.
    Pairs(PairsArgs),
    /// One pair, one message in flight: unloaded latency.
    Pingpong(PingpongArgs),
    /// R rooms of K members; one sender per room, W messages in flight to all members.
    Fanout(FanoutArgs),
    /// The pairs workload over plain loopback socket pairs, no relay: this machine's limit.
    Floor(PairsArgs),
    /// N idle logged-in connections: relay memory per connection, and latency among them.
    Conns(ConnsArgs),
    /// The pairs workload with stored delivery: every SEND is STORED, receivers sync their
    /// inbox and ack it; reports delivery latency and the ACK ("stored") latency.
    Stored(StoredArgs),
    /// One attack (--kind pin, trickle, partial, flood, fuzz or none) for --seconds while a
    /// pingpong bystander measures latency; reports the relay's peak RSS against its bound.
    Attack(Box<attack::AttackArgs>),
    /// N connections, at most --batch at a time, each connects, logs in (with a signed
    /// token with --token), reads LOGIN_OK and closes: logins per second and their latency.
    Logins(logins::LoginsArgs),
}

#[derive(Args, Clone)]
struct StoredArgs {
    #[arg(long, default_value_t = 100)]
    pairs: usize,
    /// Payload bytes per message (at least 20).
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Messages each user sends.
    #[arg(long, default_value_t = 20_000)]
    messages: u64,
    /// Messages in flight per sender (not yet both delivered and ACKed).
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// With --spawn: the relay's store. `tmp` (a fresh data directory under the system's
    /// temp dir, removed afterwards), `memory`, or a directory.
    #[arg(long, default_value = "tmp")]
    store: String,
    /// Devices per user (each its own connection and device id): every message reaches
    /// each of the recipient's devices, and its copy each of the sender's other devices.
    #[arg(long, default_value_t = 1)]
    devices: usize,
    #[command(flatten)]
    target: Target,
}

#[derive(Args, Clone)]
struct Target {
    /// A running relay.
    #[arg(long, conflicts_with = "spawn")]
    addr: Option<SocketAddr>,
    /// Start a relay for the run (the `imrelay` next to this binary, or --relay-bin).
    #[arg(long)]
    spawn: bool,
    /// The relay binary for --spawn.
    #[arg(long)]
    relay_bin: Option<PathBuf>,
    /// Pin the spawned relay to this CPU.
    #[arg(long)]
    relay_cpu: Option<usize>,
    /// Pin the generator thread(s) to this CPU.
    #[arg(long)]
    bench_cpu: Option<usize>,
    /// Read CPU and memory of an already running relay with this pid.
    #[arg(long)]
    relay_pid: Option<u32>,
    /// With --spawn (pairs, pingpong, fanout, stored): start a redis-server and N >= 2 relay nodes
    /// sharing it (`imrelay --cluster`, protocol.md section 18) and spread the users over
    /// the nodes so that every message crosses from one node to another.
    #[arg(long, requires = "spawn")]
    cluster: Option<usize>,
    /// The nodes of a running cluster, ADDR,ADDR,… (pairs, pingpong, fanout, stored; instead of
    /// --addr): users spread over them as with --cluster.
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["addr", "spawn"])]
    nodes: Vec<SocketAddr>,
    /// With --nodes: the pid of the cluster's redis-server, to report its CPU time.
    #[arg(long)]
    redis_pid: Option<u32>,
    /// The redis-server binary for --spawn --cluster.
    #[arg(long, default_value = relay_proc::REDIS_SERVER)]
    redis_bin: String,
    /// Generator threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Spin instead of sleeping in poll, in the generator and in a spawned relay
    /// (`imrelay --busy-poll`): removes thread wake-ups from the latency.
    #[arg(long)]
    busy_poll: bool,
    /// Give up (and exit non-zero) after this many seconds.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
}

#[derive(Args, Clone)]
struct PairsArgs {
    #[arg(long, default_value_t = 100)]
    pairs: usize,
    /// Payload bytes per message (at least 20: stream, sequence, timestamp).
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Messages each user sends.
    #[arg(long, default_value_t = 20_000)]
    messages: u64,
    /// Messages in flight per sender.
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// Ask for ACKs (default: NO_ACK, like a pub/sub publish).
    #[arg(long)]
    acks: bool,
    /// Also run the floor with the same parameters and print relay/floor (the floor is
    /// plaintext even with --tls).
    #[arg(long)]
    compare_floor: bool,
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    tls: TlsArgs,
}

#[derive(Args, Clone)]
struct PingpongArgs {
    #[arg(long, default_value_t = 64)]
    size: usize,
    #[arg(long, default_value_t = 20_000)]
    messages: u64,
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    tls: TlsArgs,
}

#[derive(Args, Clone)]
struct FanoutArgs {
    #[arg(long, default_value_t = 1)]
    rooms: usize,
    #[arg(long, default_value_t = 1000)]
    members: usize,
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Messages each room's sender sends.
    #[arg(long, default_value_t = 2_000)]
    messages: u64,
    #[arg(long, default_value_t = 16)]
    window: usize,
    /// Also run the fan-out floor (the generator writes each message to K sockets itself;
    /// plaintext even with --tls).
    #[arg(long)]
    compare_floor: bool,
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    tls: TlsArgs,
}

#[derive(Args, Clone)]
struct ConnsArgs {
    #[arg(long, default_value_t = 1000)]
    count: usize,
    /// Spread the connections over source addresses 127.0.0.1 .. 127.0.0.K.
    #[arg(long, default_value_t = 1)]
    sources: usize,
    #[command(flatten)]
    target: Target,
}

fn main() -> ExitCode {
    env_logger::init();
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let cli = Cli::parse();
    let result = match cli.mode {
        Mode::Pairs(a) => pairs(a, false),
        Mode::Floor(a) => pairs(a, true),
        Mode::Pingpong(a) => pairs(
            PairsArgs {
                pairs: 1,
                size: a.size,
                messages: a.messages,
                window: 1,
                acks: false,
                compare_floor: false,
                target: a.target,
                tls: a.tls,
            },
            false,
        ),
        Mode::Fanout(a) => fanout(a),
        Mode::Conns(a) => conns(a),
        Mode::Stored(a) => stored(a),
        Mode::Attack(a) => return attack::main(*a),
        Mode::Logins(a) => logins::main(a),
    };
    match result {
        Ok(report) => {
            report.print();
            if report.clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("imrelay-bench: {e}");
            ExitCode::from(2)
        }
    }
}

/// Where the relay is, and the process to watch if we know it. A cluster (--cluster,
/// --nodes) has several nodes; `addr` and `pid` are its first.
struct Relay {
    addr: SocketAddr,
    pid: Option<u32>,
    /// Every node (one without a cluster).
    nodes: Vec<SocketAddr>,
    /// The pids of the nodes whose CPU and memory the report sums (all of them, or none).
    pids: Vec<u32>,
    /// The cluster's redis-server, to read its CPU time.
    redis_pid: Option<u32>,
    /// How to speak TLS to it, with --tls.
    tls: Option<TlsClient>,
    /// Spawned nodes, killed before Redis (fields drop in this order).
    _spawned: Vec<SpawnedRelay>,
    _redis: Option<SpawnedRedis>,
    /// Files named by a spawned relay's flags (certificate, key, secret); dropped after it.
    _files: Option<TempDir>,
}

impl Relay {
    /// Waits until every node's subscriptions so far reached Redis (no-op for one node):
    /// called after the workload's users logged in and joined, before the clock starts.
    fn settle(&self, timeout: Duration) -> Result<(), String> {
        static ROUND: AtomicU64 = AtomicU64::new(0);
        let n = self.nodes.len();
        if n < 2 {
            return Ok(());
        }
        let round = ROUND.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Probe users far above the workload's (base + a few per pair or member).
        let first = user_base() + 0xF000_0000 + round * n as u64;
        let users: Vec<u64> = (0..n as u64).map(|i| first + i).collect();
        let start = Instant::now();
        let probes = setup::cluster_settle(&self.nodes, &users, self.tls.as_ref(), timeout)?;
        log::info!(
            "cluster of {n} settled after {probes} probes in {:?}",
            start.elapsed()
        );
        Ok(())
    }
}

/// The node of user `k` of `users` (`node_of(k)`, modulo the number of nodes) for each:
/// logs them in node by node (pipelined on each) and returns their sockets in the order of
/// `users`.
fn login_spread(
    relay: &Relay,
    users: &[u64],
    node_of: impl Fn(usize) -> usize,
) -> Result<Vec<Sock>, String> {
    let n = relay.nodes.len();
    let mut slots: Vec<Option<Sock>> = (0..users.len()).map(|_| None).collect();
    for node in 0..n {
        let picked: Vec<usize> = (0..users.len())
            .filter(|&k| node_of(k) % n == node)
            .collect();
        if picked.is_empty() {
            continue;
        }
        let group: Vec<u64> = picked.iter().map(|&k| users[k]).collect();
        let socks = setup::login_all_with(relay.nodes[node], &group, 1, relay.tls.as_ref())?;
        for (k, sock) in picked.into_iter().zip(socks) {
            slots[k] = Some(sock);
        }
    }
    Ok(slots
        .into_iter()
        .map(|s| s.expect("every user has a node"))
        .collect())
}

fn relay(target: &Target, flags: &[&str]) -> Result<Relay, String> {
    relay_with(target, flags, &TlsArgs::default(), None)
}

/// Like [`relay`], with TLS when `tls` asks for it (with --spawn: a self-signed certificate
/// written into `files`, or into a new temp dir), keeping `files` (whose paths `flags` may
/// name) as long as the relay. One relay: modes other than pairs, pingpong and fanout
/// refuse --cluster and --nodes here.
fn relay_with(
    target: &Target,
    flags: &[&str],
    tls: &TlsArgs,
    files: Option<TempDir>,
) -> Result<Relay, String> {
    if target.cluster.is_some() || !target.nodes.is_empty() {
        return Err("--cluster and --nodes are for pairs, pingpong and fanout".into());
    }
    relay_or_cluster(target, flags, tls, files)
}

/// Like [`relay_with`], or with --cluster N a redis-server and N nodes (each given `flags`
/// too), or with --nodes a running cluster; waits until the nodes' links to Redis are up.
fn relay_or_cluster(
    target: &Target,
    flags: &[&str],
    tls: &TlsArgs,
    mut files: Option<TempDir>,
) -> Result<Relay, String> {
    let mut flags: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
    let mut client = None;
    if tls.tls {
        if target.spawn {
            let dir = match files.take() {
                Some(dir) => dir,
                None => TempDir::new("tls")?,
            };
            let made = tls::self_signed(&dir, &tls.tls_server_name)?;
            flags.extend([
                "--tls-cert".to_string(),
                made.cert.to_string_lossy().into_owned(),
                "--tls-key".to_string(),
                made.key.to_string_lossy().into_owned(),
            ]);
            client = Some(made.client);
            files = Some(dir);
        } else {
            let ca = tls
                .tls_ca
                .as_ref()
                .ok_or("--tls with --addr needs --tls-ca FILE (the certificate to trust)")?;
            client = Some(TlsClient::from_ca_file(ca, &tls.tls_server_name)?);
        }
    } else if tls.tls_ca.is_some() {
        return Err("--tls-ca without --tls".into());
    }
    if target.spawn {
        let bin = match &target.relay_bin {
            Some(bin) => bin.clone(),
            None => std::env::current_exe()
                .map_err(|e| e.to_string())?
                .with_file_name("imrelay"),
        };
        if !flags.iter().any(|f| f == "--store") {
            flags.extend(["--store".to_string(), "memory".to_string()]);
        }
        if target.busy_poll {
            flags.push("--busy-poll".into());
        }
        let (redis, count) = match target.cluster {
            Some(n) if n < 2 => return Err("--cluster N needs N >= 2".into()),
            Some(n) => (Some(SpawnedRedis::spawn(&target.redis_bin)?), n),
            None => (None, 1),
        };
        let mut spawned = Vec::with_capacity(count);
        for i in 0..count {
            let mut node_flags = flags.clone();
            if let Some(redis) = &redis {
                node_flags.extend([
                    "--cluster".to_string(),
                    redis.url(),
                    "--node-name".to_string(),
                    format!("n{i}"),
                ]);
            }
            spawned.push(SpawnedRelay::spawn(
                bin.clone(),
                &node_flags,
                target.relay_cpu,
            )?);
        }
        let relay = Relay {
            addr: spawned[0].addr,
            pid: Some(spawned[0].pid()),
            nodes: spawned.iter().map(|s| s.addr).collect(),
            pids: spawned.iter().map(|s| s.pid()).collect(),
            redis_pid: redis.as_ref().map(|r| r.pid()),
            tls: client,
            _spawned: spawned,
            _redis: redis,
            _files: files,
        };
        // Every node's link up: a probe around the ring of nodes answered with an ACK.
        relay.settle(Duration::from_secs(20))?;
        Ok(relay)
    } else if !target.nodes.is_empty() {
        let relay = Relay {
            addr: target.nodes[0],
            pid: None,
            nodes: target.nodes.clone(),
            pids: Vec::new(),
            redis_pid: target.redis_pid,
            tls: client,
            _spawned: Vec::new(),
            _redis: None,
            _files: files,
        };
        relay.settle(Duration::from_secs(20))?;
        Ok(relay)
    } else {
        let addr = target
            .addr
            .ok_or("give --addr HOST:PORT, --nodes or --spawn")?;
        Ok(Relay {
            addr,
            pid: target.relay_pid,
            nodes: vec![addr],
            pids: target.relay_pid.into_iter().collect(),
            redis_pid: None,
            tls: client,
            _spawned: Vec::new(),
            _redis: None,
            _files: files,
        })
    }
}

/// User ids unique to this run, so runs against a shared relay do not collide.
fn user_base() -> u64 {
    (std::process::id() as u64) << 32
}

fn pairs(a: PairsArgs, floor: bool) -> Result<Report, String> {
    let mut report = if floor {
        if a.tls.tls {
            return Err("floor has no relay to speak TLS to".into());
        }
        run_pairs(&a, None)?
    } else {
        let relay = relay_or_cluster(&a.target, &[], &a.tls, None)?;
        run_pairs(&a, Some(&relay))?
    };
    if a.compare_floor && !floor {
        let floor_report = run_pairs(&a, None)?;
        report.compare(&floor_report);
    }
    Ok(report)
}

fn stored(a: StoredArgs) -> Result<Report, String> {
    // `tmp`: a fresh directory, removed when this returns (after the relay stopped).
    let tmp = match a.store.as_str() {
        "tmp" => Some(TempDir::new("store")?),
        _ => None,
    };
    let dir = tmp
        .as_ref()
        .map_or(a.store.clone(), |t| t.path().to_string_lossy().into_owned());
    // A cluster keeps the inboxes in Redis: the nodes' own store is not used.
    let relay = if a.target.cluster.is_some() || !a.target.nodes.is_empty() {
        relay_or_cluster(&a.target, &["--store", "memory"], &TlsArgs::default(), None)?
    } else {
        relay(&a.target, &["--store", &dir])?
    };
    let pairs = PairsArgs {
        pairs: a.pairs,
        size: a.size,
        messages: a.messages,
        window: a.window,
        acks: true,
        compare_floor: false,
        target: a.target.clone(),
        tls: TlsArgs::default(),
    };
    let mut report = run_pairs_with(&pairs, Some(&relay), a.devices.max(1));
    drop(relay);
    if let Ok(r) = &mut report {
        r.extra("store", serde_json::json!(a.store));
        r.extra("devices", serde_json::json!(a.devices.max(1)));
    }
    report
}

fn run_pairs(a: &PairsArgs, relay: Option<&Relay>) -> Result<Report, String> {
    run_pairs_with(a, relay, 0)
}

/// The pairs workload; with `stored_devices` > 0 every SEND is STORED and each user has
/// that many devices (the first sends, all receive).
fn run_pairs_with(
    a: &PairsArgs,
    relay: Option<&Relay>,
    stored_devices: usize,
) -> Result<Report, String> {
    let stored = stored_devices > 0;
    let devices = stored_devices.max(1);
    let threads = a.target.threads.clamp(1, a.pairs.max(1));
    let mut jobs = Vec::new();
    let base = user_base();
    for t in 0..threads {
        let pairs: Vec<usize> = (0..a.pairs).filter(|p| p % threads == t).collect();
        let socks: Vec<(Vec<Sock>, Vec<Sock>)> = match relay {
            Some(r) => {
                let users: Vec<u64> = pairs
                    .iter()
                    .flat_map(|&p| [base + 2 * p as u64 + 1, base + 2 * p as u64 + 2])
                    .collect();
                let mut socks = if devices > 1 {
                    setup::login_devices(r.addr, &users, devices, r.tls.as_ref())?
                } else {
                    // Pair p's first user on node p, its partner on node p + 1 (modulo
                    // the nodes): with a cluster every message crosses nodes.
                    login_spread(r, &users, |k| pairs[k / 2] + k % 2)?
                };
                if stored {
                    setup::sync_all(&mut socks)?;
                }
                let mut socks = socks.into_iter();
                let mut out = Vec::new();
                loop {
                    let x: Vec<Sock> = socks.by_ref().take(devices).collect();
                    let y: Vec<Sock> = socks.by_ref().take(devices).collect();
                    if y.len() < devices {
                        break;
                    }
                    out.push((x, y));
                }
                out
            }
            None => setup::socket_pairs(pairs.len())?
                .into_iter()
                .map(|(x, y)| (vec![Sock::Plain(x)], vec![Sock::Plain(y)]))
                .collect(),
        };
        let mut job = Job::new(a.messages, a.window, a.size);
        job.stored = stored;
        for (i, (x, y)) in socks.into_iter().enumerate() {
            let p = pairs[i] as u64;
            let (ux, uy) = (base + 2 * p + 1, base + 2 * p + 2);
            let first = job.conns.len();
            job.conns.extend(x.into_iter().map(Conn::from_sock));
            job.conns.extend(y.into_iter().map(Conn::from_sock));
            // Each user's devices: the first sends, every one receives.
            let xs: Vec<usize> = (first..first + devices).collect();
            let ys: Vec<usize> = (first + devices..first + 2 * devices).collect();
            let (cx, cy) = (xs[0], ys[0]);
            let header = |to| {
                let h = setup::header_for(Opcode::Send, to, a.acks);
                if stored {
                    h.with_flags(imrelay::proto::Flags::STORED).to_bytes()
                } else {
                    h.to_bytes()
                }
            };
            let (to_y, to_x) = (header(uy), header(ux));
            let (xy, yx) = (job.streams.len(), job.streams.len() + 1);
            job.streams
                .push(Stream::new(vec![cx], &to_y, devices, a.window));
            job.streams
                .push(Stream::new(vec![cy], &to_x, devices, a.window));
            job.send(cx, xy);
            job.send(cy, yx);
            for &c in &ys {
                job.receive(c, xy);
            }
            for &c in &xs {
                job.receive(c, yx);
            }
            for &c in &xs[1..] {
                job.copies(c, xy);
            }
            for &c in &ys[1..] {
                job.copies(c, yx);
            }
        }
        jobs.push(job);
    }
    if let Some(r) = relay {
        r.settle(Duration::from_secs(20))?;
    }
    let mode = match (relay.is_some(), a.pairs, a.window) {
        (false, _, _) => "floor",
        _ if stored => "stored",
        (true, 1, 1) => "pingpong",
        _ => "pairs",
    };
    let params = serde_json::json!({
        "pairs": a.pairs, "size": a.size, "messages": a.messages, "window": a.window,
        "acks": a.acks, "threads": threads,
    });
    let mut report = execute(mode, params, jobs, &a.target, relay, a.size)?;
    report.extra(
        "tls",
        serde_json::json!(relay.is_some_and(|r| r.tls.is_some())),
    );
    Ok(report)
}

fn fanout(a: FanoutArgs) -> Result<Report, String> {
    let relay = relay_or_cluster(
        &a.target,
        &["--room-rate", "0", "--room-total-rate", "0"],
        &a.tls,
        None,
    )?;
    let mut report = run_fanout(&a, Some(&relay))?;
    if a.compare_floor {
        let floor = run_fanout(&a, None)?;
        report.compare(&floor);
    }
    Ok(report)
}

fn run_fanout(a: &FanoutArgs, relay: Option<&Relay>) -> Result<Report, String> {
    let threads = a.target.threads.clamp(1, a.rooms.max(1));
    let base = user_base();
    let mut jobs = Vec::new();
    for t in 0..threads {
        let mut job = Job::new(a.messages, a.window, a.size);
        for room in (0..a.rooms).filter(|r| r % threads == t) {
            let room_id = base + room as u64 + 1;
            let s = job.streams.len();
            match relay {
                Some(r) => {
                    let first = base + (room * (a.members + 1)) as u64 + 1;
                    let users: Vec<u64> = (0..=a.members as u64).map(|i| first + i).collect();
                    // Members round robin over the nodes (the sender, member 0, on node
                    // `room`).
                    let mut socks = login_spread(r, &users, |i| room + i)?;
                    setup::join_all(&mut socks, room_id)?;
                    let sender = job.conns.len();
                    let header = setup::header_for(Opcode::RoomSend, room_id, false).to_bytes();
                    job.streams
                        .push(Stream::new(vec![sender], &header, a.members, a.window));
                    for (i, sock) in socks.into_iter().enumerate() {
                        job.conns.push(Conn::from_sock(sock));
                        if i == 0 {
                            job.send(sender, s);
                        } else {
                            job.receive(sender + i, s);
                        }
                    }
                }
                None => {
                    let header = setup::header_for(Opcode::RoomSend, room_id, false).to_bytes();
                    let mut senders = Vec::new();
                    for (out, inn) in setup::socket_pairs(a.members)? {
                        senders.push(job.conns.len());
                        job.conns.push(Conn::new(out));
                        job.conns.push(Conn::new(inn));
                    }
                    for &c in &senders {
                        job.send(c, s);
                        job.receive(c + 1, s);
                    }
                    job.streams
                        .push(Stream::new(senders, &header, a.members, a.window));
                }
            }
        }
        jobs.push(job);
    }
    if let Some(r) = relay {
        r.settle(Duration::from_secs(20))?;
    }
    let mode = if relay.is_some() {
        "fanout"
    } else {
        "fanout-floor"
    };
    let params = serde_json::json!({
        "rooms": a.rooms, "members": a.members, "size": a.size, "messages": a.messages,
        "window": a.window, "threads": threads,
    });
    let mut report = execute(mode, params, jobs, &a.target, relay, a.size)?;
    report.extra(
        "tls",
        serde_json::json!(relay.is_some_and(|r| r.tls.is_some())),
    );
    Ok(report)
}

fn conns(a: ConnsArgs) -> Result<Report, String> {
    let relay = relay(&a.target, &[])?;
    let pid = relay
        .pid
        .ok_or("conns needs --spawn or --relay-pid to read the relay's memory")?;
    let (rss_before, _) = relay_proc::memory_kib(pid).ok_or("cannot read /proc")?;
    let base = user_base();
    let users: Vec<u64> = (0..a.count as u64).map(|i| base + i + 1).collect();
    let idle = setup::login_all_from(relay.addr, &users, a.sources)?;
    // login_all has read every LOGIN_OK, so the relay has written (and freed) them all.
    let (rss_after, hwm) = relay_proc::memory_kib(pid).ok_or("cannot read /proc")?;
    let per_conn = (rss_after.saturating_sub(rss_before) * 1024) as f64 / a.count as f64;
    eprintln!(
        "{} idle connections: relay RSS {rss_before} KiB -> {rss_after} KiB = {per_conn:.0} bytes per connection",
        a.count
    );
    let latency = pairs(
        PairsArgs {
            pairs: 1,
            size: 64,
            messages: 10_000,
            window: 1,
            acks: false,
            compare_floor: false,
            target: Target {
                addr: Some(relay.addr),
                spawn: false,
                relay_pid: Some(pid),
                ..a.target.clone()
            },
            tls: TlsArgs::default(),
        },
        false,
    )?;
    drop(idle);
    let mut report = latency;
    report.set_mode("conns");
    report.extra("connections", serde_json::json!(a.count));
    report.extra("relay_rss_before_kib", serde_json::json!(rss_before));
    report.extra("relay_rss_after_kib", serde_json::json!(rss_after));
    report.extra("relay_hwm_kib", serde_json::json!(hwm));
    report.extra(
        "relay_bytes_per_connection",
        serde_json::json!(per_conn.round()),
    );
    Ok(report)
}

fn execute(
    mode: &str,
    params: serde_json::Value,
    jobs: Vec<Job>,
    target: &Target,
    relay: Option<&Relay>,
    size: usize,
) -> Result<Report, String> {
    let pids = relay.map_or(&[][..], |r| &r.pids[..]);
    let redis_pid = relay.and_then(|r| r.redis_pid);
    let total: u64 = jobs
        .iter()
        .map(|j| j.streams.iter().map(|s| s.receivers as u64).sum::<u64>() * j.messages)
        .sum();
    let progress = Arc::new(AtomicU64::new(0));
    let bar = report::progress_bar(total, mode);
    let cpu_before = cpu_of(pids);
    let redis_before = redis_pid.and_then(relay_proc::cpu_seconds);
    let epoch = Instant::now();
    let deadline = epoch + Duration::from_secs(target.timeout);
    let handles: Vec<_> = jobs
        .into_iter()
        .map(|job| {
            let progress = progress.clone();
            let cpu = target.bench_cpu;
            let busy = target.busy_poll;
            std::thread::spawn(move || {
                if let Some(cpu) = cpu {
                    if let Err(e) = relay_proc::pin(0, cpu) {
                        eprintln!("imrelay-bench: {e}");
                    }
                }
                let outcome = engine::run(job, epoch, deadline, busy, progress);
                (outcome, Instant::now())
            })
        })
        .collect();
    while !handles.iter().all(|h| h.is_finished()) {
        bar.set_position(progress.load(std::sync::atomic::Ordering::Relaxed));
        std::thread::sleep(Duration::from_millis(100));
    }
    bar.finish_and_clear();
    let (outcomes, ends): (Vec<_>, Vec<_>) = handles
        .into_iter()
        .map(|h| {
            h.join()
                .map_err(|_| "a generator thread panicked".to_string())
        })
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .unzip();
    // When the last thread finished, not when this loop, which sleeps, noticed it.
    let elapsed = ends.into_iter().max().unwrap_or(epoch) - epoch;
    // Per node, then their sum.
    let cpu_nodes: Option<Vec<f64>> = match (cpu_before, cpu_of(pids)) {
        (Some(a), Some(b)) => Some(b.iter().zip(&a).map(|(b, a)| b - a).collect()),
        _ => None,
    };
    let redis_cpu = match (redis_before, redis_pid.and_then(relay_proc::cpu_seconds)) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let cpu = cpu_nodes.as_ref().map(|c| c.iter().sum());
    // RSS and high-water mark summed over the nodes.
    let memory = pids
        .iter()
        .map(|&p| relay_proc::memory_kib(p))
        .collect::<Option<Vec<_>>>()
        .filter(|m| !m.is_empty())
        .map(|m| m.iter().fold((0, 0), |(r, h), (mr, mh)| (r + mr, h + mh)));
    let mut report = Report::new(mode, params, outcomes, elapsed, size, cpu, memory);
    if let Some(r) = relay {
        report.nodes(r.nodes.len(), cpu_nodes, redis_cpu);
    }
    Ok(report)
}

/// The CPU seconds of each of `pids`; `None` if there are none or one cannot be read.
fn cpu_of(pids: &[u32]) -> Option<Vec<f64>> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|&p| relay_proc::cpu_seconds(p)).collect()
}
