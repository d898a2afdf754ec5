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
use relay_proc::SpawnedRelay;
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

/// Where the relay is, and the process to watch if we know it.
struct Relay {
    addr: SocketAddr,
    pid: Option<u32>,
    /// How to speak TLS to it, with --tls.
    tls: Option<TlsClient>,
    _spawned: Option<SpawnedRelay>,
    /// Files named by a spawned relay's flags (certificate, key, secret); dropped after it.
    _files: Option<TempDir>,
}

fn relay(target: &Target, flags: &[&str]) -> Result<Relay, String> {
    relay_with(target, flags, &TlsArgs::default(), None)
}

/// Like [`relay`], with TLS when `tls` asks for it (with --spawn: a self-signed certificate
/// written into `files`, or into a new temp dir), keeping `files` (whose paths `flags` may
/// name) as long as the relay.
fn relay_with(
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
        let spawned = SpawnedRelay::spawn(bin, &flags, target.relay_cpu)?;
        Ok(Relay {
            addr: spawned.addr,
            pid: Some(spawned.pid()),
            tls: client,
            _spawned: Some(spawned),
            _files: files,
        })
    } else {
        let addr = target.addr.ok_or("give --addr HOST:PORT or --spawn")?;
        Ok(Relay {
            addr,
            pid: target.relay_pid,
            tls: client,
            _spawned: None,
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
        let relay = relay_with(&a.target, &[], &a.tls, None)?;
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
    let relay = relay(&a.target, &["--store", &dir])?;
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
                    setup::login_all_with(r.addr, &users, 1, r.tls.as_ref())?
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
    let mut report = execute(
        mode,
        params,
        jobs,
        &a.target,
        relay.and_then(|r| r.pid),
        a.size,
    )?;
    report.extra(
        "tls",
        serde_json::json!(relay.is_some_and(|r| r.tls.is_some())),
    );
    Ok(report)
}

fn fanout(a: FanoutArgs) -> Result<Report, String> {
    let relay = relay_with(
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
                    let mut socks = setup::login_all_with(r.addr, &users, 1, r.tls.as_ref())?;
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
    let mode = if relay.is_some() {
        "fanout"
    } else {
        "fanout-floor"
    };
    let params = serde_json::json!({
        "rooms": a.rooms, "members": a.members, "size": a.size, "messages": a.messages,
        "window": a.window, "threads": threads,
    });
    let mut report = execute(
        mode,
        params,
        jobs,
        &a.target,
        relay.and_then(|r| r.pid),
        a.size,
    )?;
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
    pid: Option<u32>,
    size: usize,
) -> Result<Report, String> {
    let total: u64 = jobs
        .iter()
        .map(|j| j.streams.iter().map(|s| s.receivers as u64).sum::<u64>() * j.messages)
        .sum();
    let progress = Arc::new(AtomicU64::new(0));
    let bar = report::progress_bar(total, mode);
    let cpu_before = pid.and_then(relay_proc::cpu_seconds);
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
    let cpu = match (cpu_before, pid.and_then(relay_proc::cpu_seconds)) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let memory = pid.and_then(relay_proc::memory_kib);
    Ok(Report::new(
        mode, params, outcomes, elapsed, size, cpu, memory,
    ))
}
