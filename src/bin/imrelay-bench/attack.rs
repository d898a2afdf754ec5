//! `imrelay-bench attack`: one hostile workload against the relay while a bystander pair
//! measures what an ordinary user gets beside it.
//!
//! `imrelay-bench attack --kind pin --spawn --relay-cpu 0 --bench-cpu 1 --seconds 10 \
//!   --max-memory 67108864 --max-frame 65536 --frame-timeout 2`
//!
//! Attacks (`--kind`):
//! - `pin`: `--count` victims log in and never read; `--senders` attacking connections send
//!   each victim small SENDs, interleaved with max-size SENDs to an offline user and PINGs.
//! - `trickle`: `--count` connections log in, send the header of a max-size frame, then one
//!   byte every `--trickle-ms`; the relay's frame timeout closes them and they reopen.
//! - `partial`: `--count` connections log in and send all but the last byte of a max-size
//!   frame, then stop; the memory budget refuses those past it, and they reopen.
//! - `flood`: `--count` members join one room; `--senders` of them send ROOM_SENDs as fast
//!   as the relay takes them (every member reads what it gets).
//! - `fuzz`: `--count` connections send seeded random bytes (raw bytes, mangled binary
//!   frames or text lines) as fast as they can, reopening when closed.
//! - `none`: the bystander alone, the baseline.
//!
//! The attack runs in one single-threaded mio loop and the bystander in another thread, both
//! pinned to `--bench-cpu`; the attacking thread runs at `--nice` (default 19) so that the
//! bystander's wake-ups go first, as if the attacker were on another machine. The bystander
//! is the `pingpong` workload written again with retries: one pair, one message in flight,
//! alternately A to B and B to A; a SEND the relay refuses (say `RECIPIENT_SLOW`) is sent
//! again 1 ms later, and its latency counts from the first attempt. (The load engine does not
//! resend a refused message, so under memory pressure it would stall on the first refusal.)
//!
//! The relay's RSS is sampled from /proc every 50 ms; the bound is computed from the caps
//! given here (`--max-memory`, `--max-frame`): the memory budget plus an allowance of the
//! relay's RSS before any connection, 2 KiB per connection, two max frames and 4 MiB of
//! allocator slack. Everything random is drawn from a generator seeded with `--seed`.
//! Summary on stderr, one JSON line on stdout; the exit status is 1 when the relay went over
//! the bound, died, closed or starved the bystander, or refused the bystander's messages.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use serde_json::json;

use imrelay::proto::{ErrorCode, Opcode};
use imrelay::rand::Rng;

use crate::{relay_proc, setup};

/// Header of every frame (protocol.md section 3).
const HEADER: usize = 32;
/// Continuous attackers top their output up to this many unwritten bytes per turn.
const FILL: usize = 128 * 1024;
/// ... once it has fallen below this.
const LOW_WATER: usize = 64 * 1024;
/// Fuzzing connections keep less queued: they are closed often.
const FUZZ_FILL: usize = 16 * 1024;
/// The relay's own default max frame.
const DEFAULT_MAX_FRAME: usize = 64 * 1024;
/// A bystander message not delivered nor refused within this time is sent again.
const BYSTANDER_RESEND: Duration = Duration::from_secs(2);
/// The bystander waits this long before resending a refused message.
const BYSTANDER_RETRY: Duration = Duration::from_millis(1);
/// Below this many bystander messages per second the bystander counts as starved.
const STARVED_PER_SEC: f64 = 100.0;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    /// The bystander alone.
    None,
    /// Victims that never read, small SENDs to them among large SENDs and PINGs.
    Pin,
    /// Max-size frames that arrive one byte at a time.
    Trickle,
    /// Max-size frames that stop one byte short.
    Partial,
    /// A room flooded with ROOM_SENDs.
    Flood,
    /// Seeded random bytes.
    Fuzz,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::None => "none",
            Kind::Pin => "pin",
            Kind::Trickle => "trickle",
            Kind::Partial => "partial",
            Kind::Flood => "flood",
            Kind::Fuzz => "fuzz",
        }
    }
}

#[derive(Args, Clone)]
pub struct AttackArgs {
    /// The attack.
    #[arg(long, value_enum)]
    kind: Kind,
    /// How long the attack (and the bystander) runs.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Attack connections: victims (pin), slow or partial frames (trickle, partial), room
    /// members (flood), fuzzing connections (fuzz). Default 1000, 1000, 1000, 500, 50.
    #[arg(long)]
    count: Option<usize>,
    /// Sending connections: attackers (pin, default 4), members that flood (flood, 50).
    #[arg(long)]
    senders: Option<usize>,
    /// Seed of every random choice.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// trickle: milliseconds between a connection's bytes.
    #[arg(long, default_value_t = 100)]
    trickle_ms: u64,
    /// Milliseconds before reopening a connection the relay closed (trickle, partial, fuzz).
    /// Default 0, partial 100.
    #[arg(long)]
    reopen_ms: Option<u64>,
    /// Bystander payload bytes (at least 16).
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Nice value of the attacking thread.
    #[arg(long, default_value_t = 19)]
    nice: i32,
    /// Pin the bystander to this CPU instead of --bench-cpu.
    #[arg(long)]
    bystander_cpu: Option<usize>,
    /// pin: small SENDs to victims per large SEND (and per PING).
    #[arg(long, default_value_t = 64)]
    pin_small: usize,
    /// pin: payload bytes of a small SEND.
    #[arg(long, default_value_t = 16)]
    pin_payload: usize,
    /// pin: the victims shrink their socket receive buffer to this (0: leave it), so the
    /// kernel holds little and the relay's queues fill sooner.
    #[arg(long, default_value_t = 4096)]
    victim_rcvbuf: usize,
    /// The relay's memory budget (`imrelay --max-memory`); also the base of the bound.
    /// Default: the relay's, half the machine's memory.
    #[arg(long)]
    max_memory: Option<u64>,
    /// The relay's max frame (`imrelay --max-frame`); the size of the attack's large frames.
    #[arg(long)]
    max_frame: Option<usize>,
    /// `imrelay --out-cap`.
    #[arg(long)]
    out_cap: Option<u64>,
    /// `imrelay --frame-timeout` (seconds).
    #[arg(long)]
    frame_timeout: Option<u64>,
    /// `imrelay --room-rate`.
    #[arg(long)]
    room_rate: Option<u64>,
    /// `imrelay --room-total-rate`.
    #[arg(long)]
    room_total_rate: Option<u64>,
    /// `imrelay --room-total-burst`.
    #[arg(long)]
    room_total_burst: Option<u64>,
    /// `imrelay --max-connections-per-ip`.
    #[arg(long)]
    max_connections_per_ip: Option<u64>,
    /// `imrelay --limit-loopback`.
    #[arg(long)]
    limit_loopback: bool,
    /// Any other flag for the spawned relay, passed as it is (repeat: `--relay-arg=--x=1`).
    #[arg(long, allow_hyphen_values = true)]
    relay_arg: Vec<String>,
    #[command(flatten)]
    target: super::Target,
}

/// Runs the attack and prints the results; the exit status says whether the relay held.
pub fn main(a: AttackArgs) -> ExitCode {
    match run(&a) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("imrelay-bench attack: {e}");
            ExitCode::from(2)
        }
    }
}

/// The flags the spawned relay gets.
fn relay_flags(a: &AttackArgs) -> Vec<String> {
    let mut flags = Vec::new();
    let mut flag = |name: &str, value: Option<String>| {
        if let Some(v) = value {
            flags.push(name.to_string());
            flags.push(v);
        }
    };
    flag("--max-memory", a.max_memory.map(|v| v.to_string()));
    flag("--max-frame", a.max_frame.map(|v| v.to_string()));
    flag("--out-cap", a.out_cap.map(|v| v.to_string()));
    flag("--frame-timeout", a.frame_timeout.map(|v| v.to_string()));
    flag("--room-rate", a.room_rate.map(|v| v.to_string()));
    flag(
        "--room-total-rate",
        a.room_total_rate.map(|v| v.to_string()),
    );
    flag(
        "--room-total-burst",
        a.room_total_burst.map(|v| v.to_string()),
    );
    flag(
        "--max-connections-per-ip",
        a.max_connections_per_ip.map(|v| v.to_string()),
    );
    if a.limit_loopback {
        flags.push("--limit-loopback".into());
    }
    flags.extend(a.relay_arg.iter().cloned());
    flags
}

/// The relay's default memory budget: half the machine's physical memory.
fn default_max_memory() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let (pages, page) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    (pages.max(0) as u64 * page.max(0) as u64) / 2
}

/// Busy CPU seconds of the whole machine so far (all but idle and iowait, /proc/stat).
fn machine_busy_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let busy: f64 = f
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum();
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(busy / ticks)
}

/// Memory all TCP sockets of the machine hold in the kernel (/proc/net/sockstat), in KiB:
/// socket buffers are not in the relay's RSS.
fn tcp_kernel_kib() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/net/sockstat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("TCP:"))?;
    let mut words = line.split_whitespace();
    words.find(|w| *w == "mem")?;
    let pages: u64 = words.next()?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(0) as u64;
    Some(pages * page / 1024)
}

/// True while the process exists and is not a zombie.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => match stat.rfind(')') {
            Some(i) => !matches!(stat.as_bytes().get(i + 2), Some(b'Z' | b'X') | None),
            None => false,
        },
        Err(_) => false,
    }
}

fn run(a: &AttackArgs) -> Result<bool, String> {
    let kind = a.kind;
    let max_frame = a.max_frame.unwrap_or(DEFAULT_MAX_FRAME);
    if max_frame < HEADER + 64 {
        return Err("--max-frame is too small for the attacks".into());
    }
    let max_memory = a.max_memory.unwrap_or_else(default_max_memory);
    let count = a.count.unwrap_or(match kind {
        Kind::None => 0,
        Kind::Pin | Kind::Trickle | Kind::Partial => 1000,
        Kind::Flood => 500,
        Kind::Fuzz => 50,
    });
    let senders = a.senders.unwrap_or(match kind {
        Kind::Pin => 4,
        Kind::Flood => 50.min(count),
        _ => 0,
    });
    if kind == Kind::Flood && (senders == 0 || senders > count) {
        return Err("flood needs 1 ..= --count senders".into());
    }
    if kind == Kind::Pin && (senders == 0 || count == 0) {
        return Err("pin needs victims and senders".into());
    }
    let reopen = Duration::from_millis(a.reopen_ms.unwrap_or(match kind {
        Kind::Partial => 100,
        _ => 0,
    }));
    let size = a.size.max(16);

    let flags = relay_flags(a);
    let flag_refs: Vec<&str> = flags.iter().map(String::as_str).collect();
    let relay = super::relay(&a.target, &flag_refs)?;
    let pid = relay.pid;
    if let Some(cpu) = a.target.bench_cpu {
        relay_proc::pin(0, cpu)?;
    }
    let rss_idle = pid.and_then(relay_proc::memory_kib).map(|m| m.0);
    let mut rss_peak = rss_idle.unwrap_or(0);
    let tcp_idle = tcp_kernel_kib();
    let mut tcp_peak = tcp_idle.unwrap_or(0);
    let sample = |peak: &mut u64, tcp: &mut u64| {
        if let Some((rss, _)) = pid.and_then(relay_proc::memory_kib) {
            *peak = (*peak).max(rss);
        }
        if let Some(kib) = tcp_kernel_kib() {
            *tcp = (*tcp).max(kib);
        }
    };

    // Setup, before the clock: the bystander pair, then the attack's logged-in sockets.
    let base = super::user_base();
    let by_users = [base + 1, base + 2];
    let by_socks = setup::login_all(relay.addr, &by_users)?;
    let first = base + 1000;
    let mut prepared = Prepared::default();
    match kind {
        Kind::Pin => {
            let victims: Vec<u64> = (0..count as u64).map(|i| first + i).collect();
            prepared.victims = setup::login_all(relay.addr, &victims)?;
            if a.victim_rcvbuf > 0 {
                for v in &prepared.victims {
                    socket2::SockRef::from(v)
                        .set_recv_buffer_size(a.victim_rcvbuf)
                        .map_err(|e| format!("SO_RCVBUF: {e}"))?;
                }
            }
            prepared.victim_ids = victims;
            let attackers: Vec<u64> = (0..senders as u64).map(|i| first + 100_000 + i).collect();
            prepared.active = setup::login_all(relay.addr, &attackers)?
                .into_iter()
                .map(|s| (s, true))
                .collect();
        }
        Kind::Flood => {
            let members: Vec<u64> = (0..count as u64).map(|i| first + i).collect();
            let mut socks = setup::login_all(relay.addr, &members)?;
            setup::join_all(&mut socks, prepared.room)?;
            prepared.active = socks
                .into_iter()
                .enumerate()
                .map(|(i, s)| (s, i < senders))
                .collect();
        }
        _ => {}
    }
    sample(&mut rss_peak, &mut tcp_peak);
    let rss_setup = pid.and_then(relay_proc::memory_kib).map(|m| m.0);

    let params = match kind {
        Kind::None => json!({}),
        Kind::Pin => json!({"victims": count, "attackers": senders,
            "small_payload": a.pin_payload, "small_per_large": a.pin_small.max(1),
            "victim_rcvbuf": a.victim_rcvbuf,
            "large_frame": max_frame, "ping_payload": 32}),
        Kind::Trickle => json!({"connections": count, "frame": max_frame,
            "byte_every_ms": a.trickle_ms, "reopen_ms": reopen.as_millis() as u64}),
        Kind::Partial => json!({"connections": count, "frame": max_frame,
            "sent": max_frame - 1, "reopen_ms": reopen.as_millis() as u64}),
        Kind::Flood => json!({"members": count, "senders": senders, "payload": 32}),
        Kind::Fuzz => json!({"connections": count, "seed": a.seed,
            "reopen_ms": reopen.as_millis() as u64}),
    };
    let peak_conns = 2 + count + if kind == Kind::Pin { senders } else { 0 };
    let allowance_kib =
        rss_idle.unwrap_or(0) + 2 * peak_conns as u64 + 2 * max_frame as u64 / 1024 + 4 * 1024;
    let bound_kib = max_memory / 1024 + allowance_kib;

    eprintln!(
        "attack {}: {params}; relay RSS idle {} KiB, after setup {} KiB; running {} s",
        kind.name(),
        rss_idle.unwrap_or(0),
        rss_setup.unwrap_or(0),
        a.seconds
    );
    let cpu_before = pid.and_then(relay_proc::cpu_seconds);
    let self_pid = std::process::id();
    let bench_before = relay_proc::cpu_seconds(self_pid);
    let machine_before = machine_busy_seconds();
    let epoch = Instant::now();
    let deadline = epoch + Duration::from_secs(a.seconds);
    let bench_cpu = a.target.bench_cpu;
    let busy = a.target.busy_poll;
    let by_cpu = a.bystander_cpu.or(bench_cpu);
    let by_thread = std::thread::spawn(move || {
        if let Some(cpu) = by_cpu {
            if let Err(e) = relay_proc::pin(0, cpu) {
                eprintln!("imrelay-bench: {e}");
            }
        }
        bystander(by_socks, by_users, epoch, deadline, size, busy)
    });
    let plan = Plan {
        kind,
        addr: relay.addr,
        count,
        max_frame,
        trickle: Duration::from_millis(a.trickle_ms.max(1)),
        reopen,
        pin_small: a.pin_small.max(1),
        pin_payload: a.pin_payload.min(max_frame - HEADER),
        seed: a.seed,
        user_base: first + 200_000,
        offline: first + 900_000,
    };
    let nice = a.nice;
    let attack_thread = std::thread::spawn(move || {
        if let Some(cpu) = bench_cpu {
            if let Err(e) = relay_proc::pin(0, cpu) {
                eprintln!("imrelay-bench: {e}");
            }
        }
        // SAFETY: gettid and setpriority have no memory preconditions; a failure is ignored
        // (the attack then runs at the default priority).
        unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            libc::setpriority(libc::PRIO_PROCESS, tid, nice);
        }
        if kind == Kind::None {
            return Ok(Stats::default());
        }
        Attacker::new(plan, prepared).map(|att| att.run(deadline))
    });
    while !(by_thread.is_finished() && attack_thread.is_finished()) {
        sample(&mut rss_peak, &mut tcp_peak);
        std::thread::sleep(Duration::from_millis(50));
    }
    sample(&mut rss_peak, &mut tcp_peak);
    let relay_cpu = match (cpu_before, pid.and_then(relay_proc::cpu_seconds)) {
        (Some(b), Some(e)) => Some(e - b),
        _ => None,
    };
    let bench_cpu_s = match (bench_before, relay_proc::cpu_seconds(self_pid)) {
        (Some(b), Some(e)) => Some(e - b),
        _ => None,
    };
    // What the rest of the machine used meanwhile (other processes, and kernel work such as
    // softirqs not charged to either process): a measure of how quiet the machine was.
    let other_cpu = match (machine_before, machine_busy_seconds()) {
        (Some(b), Some(e)) => {
            Some((e - b - relay_cpu.unwrap_or(0.0) - bench_cpu_s.unwrap_or(0.0)).max(0.0))
        }
        _ => None,
    };
    let by = by_thread
        .join()
        .map_err(|_| "the bystander thread panicked".to_string())?;
    let stats = attack_thread
        .join()
        .map_err(|_| "the attack thread panicked".to_string())??;
    let elapsed = epoch.elapsed().as_secs_f64();
    let memory = pid.and_then(relay_proc::memory_kib);
    let hwm = memory.map(|m| m.1);
    let relay_alive = pid.is_none_or(alive);

    // Verdict.
    let mut problems = Vec::new();
    if pid.is_some() && rss_peak.max(hwm.unwrap_or(0)) > bound_kib {
        problems.push(format!(
            "relay RSS peak {} KiB (HWM {} KiB) is over the bound {bound_kib} KiB",
            rss_peak,
            hwm.unwrap_or(0)
        ));
    }
    if !relay_alive {
        problems.push("the relay died during the attack".to_string());
    }
    if let Some(f) = &by.failure {
        problems.push(format!("bystander: {f}"));
    }
    let by_rate = by.delivered as f64 / elapsed;
    if by_rate < STARVED_PER_SEC {
        problems.push(format!(
            "bystander starved: {} messages in {elapsed:.1} s ({by_rate:.0}/s, under {STARVED_PER_SEC}/s)",
            by.delivered
        ));
    }
    let refused: u64 = by.refused.values().sum();
    if refused > 0 {
        problems.push(format!(
            "the relay refused the bystander's SENDs {refused} times ({})",
            counts_text(&by.refused)
        ));
    }
    if by.timeouts > 0 {
        problems.push(format!(
            "{} bystander messages neither delivered nor refused within {} s",
            by.timeouts,
            BYSTANDER_RESEND.as_secs()
        ));
    }

    let us = |q: f64| by.hist.value_at_quantile(q) as f64 / 1000.0;
    let saw = stats.saw();
    eprintln!(
        "attack {}: relay RSS peak {} KiB (HWM {} KiB) against bound {} KiB ({} MiB budget + {} KiB allowance); relay CPU {:.2} s, bench CPU {:.2} s, rest of the machine {:.2} CPU s in {elapsed:.1} s{}",
        kind.name(),
        rss_peak,
        hwm.unwrap_or(0),
        bound_kib,
        max_memory >> 20,
        allowance_kib,
        relay_cpu.unwrap_or(0.0),
        bench_cpu_s.unwrap_or(0.0),
        other_cpu.unwrap_or(0.0),
        if relay_alive { "" } else { "; RELAY DIED" }
    );
    eprintln!(
        "kernel TCP memory (whole machine): {} KiB before, peak {} KiB",
        tcp_idle.unwrap_or(0),
        tcp_peak
    );
    eprintln!(
        "bystander: {} messages ({by_rate:.0}/s), one-way latency us p50 {:.1} p99 {:.1} p99.9 {:.1} max {:.1}; refused {refused}, resent after timeout {}",
        by.delivered,
        us(0.5),
        us(0.99),
        us(0.999),
        by.hist.max() as f64 / 1000.0,
        by.timeouts
    );
    eprintln!(
        "attacker: {} opened, {} closed by the relay, {} failed to connect, {} frames / {} bytes written; saw {}",
        stats.opened,
        stats.closed,
        stats.connect_failed,
        stats.frames,
        stats.bytes,
        if saw.is_empty() {
            "nothing".to_string()
        } else {
            counts_text(&saw)
        }
    );
    for p in &problems {
        eprintln!("PROBLEM: {p}");
    }
    if problems.is_empty() {
        eprintln!("verdict: the relay held");
    }
    let j = json!({
        "mode": "attack",
        "kind": kind.name(),
        "seconds": elapsed,
        "params": params,
        "relay": {
            "flags": flags,
            "max_memory": max_memory,
            "max_frame": max_frame,
            "rss_idle_kib": rss_idle,
            "rss_after_setup_kib": rss_setup,
            "rss_peak_kib": pid.map(|_| rss_peak),
            "hwm_kib": hwm,
            "bound_kib": bound_kib,
            "allowance_kib": allowance_kib,
            "cpu_s": relay_cpu,
            "alive": relay_alive,
        },
        "kernel_tcp_kib": {"before": tcp_idle, "peak": tcp_peak},
        "bench_cpu_s": bench_cpu_s,
        "other_cpu_s": other_cpu,
        "bystander": {
            "messages": by.delivered,
            "latency_us": {
                "p50": us(0.5), "p90": us(0.9), "p99": us(0.99), "p999": us(0.999),
                "max": by.hist.max() as f64 / 1000.0,
            },
            "refused": by.refused,
            "timeouts": by.timeouts,
            "failure": by.failure,
        },
        "attacker": {
            "opened": stats.opened,
            "closed": stats.closed,
            "connect_failed": stats.connect_failed,
            "frames": stats.frames,
            "bytes": stats.bytes,
            "bad_frames_from_relay": stats.bad,
            "saw": saw,
        },
        "problems": problems,
    });
    println!("{j}");
    Ok(problems.is_empty())
}

/// "NAME n, NAME n" from counts.
fn counts_text(counts: &BTreeMap<String, u64>) -> String {
    counts
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The name of an error code, or `CODE_n` for one v1 does not define.
fn error_name(code: u16) -> String {
    match ErrorCode::from_u16(code) {
        Some(c) => c.name().to_string(),
        None => format!("CODE_{code}"),
    }
}

fn opcode_name(op: u8) -> String {
    match Opcode::from_u8(op) {
        Some(o) => format!("{o:?}").to_uppercase(),
        None => format!("OPCODE_0x{op:02x}"),
    }
}

/// Appends a frame header (a frame of `len` bytes in all) to `out`.
fn header(out: &mut Vec<u8>, len: usize, opcode: u8, flags: u16, msg_id: u64, target: u64) {
    out.extend_from_slice(&(len as u32).to_be_bytes());
    out.push(1);
    out.push(opcode);
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&msg_id.to_be_bytes());
    out.extend_from_slice(&target.to_be_bytes());
    out.extend_from_slice(&0u64.to_be_bytes());
}

/// Appends a whole frame whose payload is `n` filler bytes.
fn frame(out: &mut Vec<u8>, opcode: Opcode, flags: u16, msg_id: u64, target: u64, n: usize) {
    header(out, HEADER + n, opcode as u8, flags, msg_id, target);
    out.resize(out.len() + n, 0x5a);
}

const NO_ACK: u16 = 0x0001;

// ---- the bystander ------------------------------------------------------------------------

/// What the bystander measured.
struct Bystander {
    hist: Histogram<u64>,
    delivered: u64,
    /// Its SENDs the relay refused, by error name.
    refused: BTreeMap<String, u64>,
    /// Messages neither delivered nor refused within [`BYSTANDER_RESEND`].
    timeouts: u64,
    failure: Option<String>,
}

struct BConn {
    sock: TcpStream,
    rx: Vec<u8>,
    out: Vec<u8>,
    out_pos: usize,
}

/// One pair, one message in flight, alternating direction, refused messages resent; until
/// `deadline`.
fn bystander(
    socks: Vec<std::net::TcpStream>,
    users: [u64; 2],
    epoch: Instant,
    deadline: Instant,
    size: usize,
    busy: bool,
) -> Bystander {
    let mut by = Bystander {
        hist: Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("histogram bounds"),
        delivered: 0,
        refused: BTreeMap::new(),
        timeouts: 0,
        failure: None,
    };
    if let Err(e) = bystander_loop(&mut by, socks, users, epoch, deadline, size, busy) {
        by.failure = Some(e);
    }
    by
}

fn bystander_loop(
    by: &mut Bystander,
    socks: Vec<std::net::TcpStream>,
    users: [u64; 2],
    epoch: Instant,
    deadline: Instant,
    size: usize,
    busy: bool,
) -> Result<(), String> {
    let mut poll = Poll::new().map_err(|e| e.to_string())?;
    let mut conns = Vec::new();
    for (i, s) in socks.into_iter().enumerate() {
        s.set_nonblocking(true).map_err(|e| e.to_string())?;
        let mut sock = TcpStream::from_std(s);
        poll.registry()
            .register(&mut sock, Token(i), Interest::READABLE | Interest::WRITABLE)
            .map_err(|e| e.to_string())?;
        conns.push(BConn {
            sock,
            rx: Vec::new(),
            out: Vec::new(),
            out_pos: 0,
        });
    }
    let mut events = Events::with_capacity(16);
    let mut buf = vec![0u8; 64 * 1024];
    let mut seq = 0u64;
    // (first attempt in ns since epoch, last attempt) of the message in flight.
    let mut inflight: Option<Instant> = None;
    let mut first_ns: Option<u64> = None;
    let mut retry_at: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Ok(());
        }
        if let Some(at) = inflight {
            if now - at >= BYSTANDER_RESEND {
                by.timeouts += 1;
                inflight = None;
            }
        }
        if inflight.is_none() && retry_at.is_none_or(|t| now >= t) {
            retry_at = None;
            let from = (seq % 2) as usize;
            let ns = *first_ns.get_or_insert(epoch.elapsed().as_nanos() as u64);
            let c = &mut conns[from];
            header(
                &mut c.out,
                HEADER + size,
                Opcode::Send as u8,
                NO_ACK,
                seq + 1,
                users[1 - from],
            );
            c.out.extend_from_slice(&seq.to_be_bytes());
            c.out.extend_from_slice(&ns.to_be_bytes());
            c.out.resize(c.out.len() + size - 16, 0);
            flush_b(c)?;
            inflight = Some(now);
        }
        let timeout = if busy {
            Duration::ZERO
        } else {
            let mut t = Duration::from_millis(50).min(deadline - now);
            if let Some(at) = retry_at {
                t = t.min(at.saturating_duration_since(now));
            }
            t
        };
        if let Err(e) = poll.poll(&mut events, Some(timeout)) {
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("poll: {e}"));
        }
        for event in events.iter() {
            let i = event.token().0;
            let Some(c) = conns.get_mut(i) else { continue };
            if event.is_writable() {
                flush_b(c)?;
            }
            if !event.is_readable() {
                continue;
            }
            loop {
                let n = match c.sock.read(&mut buf) {
                    Ok(0) => return Err(format!("the relay closed bystander connection {i}")),
                    Ok(n) => n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => return Err(format!("bystander connection {i}: {e}")),
                };
                c.rx.extend_from_slice(&buf[..n]);
                let now_ns = epoch.elapsed().as_nanos() as u64;
                let mut pos = 0;
                while c.rx.len() - pos >= HEADER {
                    let f = &c.rx[pos..];
                    let len = u32::from_be_bytes([f[0], f[1], f[2], f[3]]) as usize;
                    if len < HEADER {
                        return Err(format!("the relay sent a frame of length {len}"));
                    }
                    if f.len() < len {
                        break;
                    }
                    let f = &f[..len];
                    let msg_id =
                        u64::from_be_bytes([f[8], f[9], f[10], f[11], f[12], f[13], f[14], f[15]]);
                    match Opcode::from_u8(f[5]) {
                        Some(Opcode::Deliver) if len >= HEADER + 16 => {
                            let p = &f[HEADER..];
                            let s = u64::from_be_bytes([
                                p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7],
                            ]);
                            if s == seq {
                                if let Some(sent) = first_ns.take() {
                                    by.hist
                                        .saturating_record(now_ns.saturating_sub(sent).max(1));
                                }
                                by.delivered += 1;
                                seq += 1;
                                inflight = None;
                                retry_at = None;
                            }
                        }
                        Some(Opcode::Error) if msg_id == seq + 1 && inflight.is_some() => {
                            let code = if len >= HEADER + 2 {
                                u16::from_be_bytes([f[HEADER], f[HEADER + 1]])
                            } else {
                                0
                            };
                            *by.refused.entry(error_name(code)).or_default() += 1;
                            inflight = None;
                            retry_at = Some(Instant::now() + BYSTANDER_RETRY);
                        }
                        Some(Opcode::Ping) => {
                            let payload = f[HEADER..].to_vec();
                            let mut pong = Vec::with_capacity(len);
                            header(&mut pong, len, Opcode::Pong as u8, 0, msg_id, 0);
                            pong.extend_from_slice(&payload);
                            c.out.extend_from_slice(&pong);
                        }
                        _ => {}
                    }
                    pos += len;
                }
                c.rx.drain(..pos);
                flush_b(c)?;
            }
        }
    }
}

fn flush_b(c: &mut BConn) -> Result<(), String> {
    while c.out_pos < c.out.len() {
        match c.sock.write(&c.out[c.out_pos..]) {
            Ok(0) => return Err("bystander socket closed while writing".into()),
            Ok(n) => c.out_pos += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("bystander write: {e}")),
        }
    }
    c.out.clear();
    c.out_pos = 0;
    Ok(())
}

// ---- the attacker -------------------------------------------------------------------------

/// Sockets logged in before the clock starts.
struct Prepared {
    /// pin: victims, never read.
    victims: Vec<std::net::TcpStream>,
    victim_ids: Vec<u64>,
    /// pin: the attackers; flood: the members. `true`: it sends.
    active: Vec<(std::net::TcpStream, bool)>,
    room: u64,
}

impl Default for Prepared {
    fn default() -> Prepared {
        Prepared {
            victims: Vec::new(),
            victim_ids: Vec::new(),
            active: Vec::new(),
            room: super::user_base() + 7,
        }
    }
}

/// What the attack needs to know.
struct Plan {
    kind: Kind,
    addr: SocketAddr,
    count: usize,
    max_frame: usize,
    trickle: Duration,
    reopen: Duration,
    pin_small: usize,
    pin_payload: usize,
    seed: u64,
    /// Connection i of trickle, partial and fuzz logs in as `user_base + i`.
    user_base: u64,
    /// A user nobody logs in as.
    offline: u64,
}

/// What the attacker saw and did.
#[derive(Default)]
struct Stats {
    /// ERROR frames by code (binary connections).
    errors: BTreeMap<u16, u64>,
    /// `ERR <NAME>` lines (text connections).
    text_errors: BTreeMap<String, u64>,
    /// Other frames by opcode.
    replies: BTreeMap<u8, u64>,
    text_lines: u64,
    opened: u64,
    closed: u64,
    connect_failed: u64,
    frames: u64,
    bytes: u64,
    /// Frames from the relay with an impossible length.
    bad: u64,
}

impl Stats {
    /// Everything received, by name.
    fn saw(&self) -> BTreeMap<String, u64> {
        let mut saw = BTreeMap::new();
        for (&code, &n) in &self.errors {
            *saw.entry(format!("ERROR {}", error_name(code)))
                .or_default() += n;
        }
        for (name, &n) in &self.text_errors {
            *saw.entry(format!("ERR {name} (text)")).or_default() += n;
        }
        for (&op, &n) in &self.replies {
            *saw.entry(opcode_name(op)).or_default() += n;
        }
        if self.text_lines > 0 {
            saw.insert("other text lines".into(), self.text_lines);
        }
        if self.bad > 0 {
            saw.insert("BAD FRAMES".into(), self.bad);
        }
        saw
    }
}

/// One attacking connection.
struct Slot {
    sock: TcpStream,
    out: Vec<u8>,
    out_pos: usize,
    rx: Vec<u8>,
    /// The relay answers in text lines (the connection's first byte was a letter).
    text: bool,
    /// It generates traffic continuously (pin attackers, flood senders, fuzzers).
    sender: bool,
    /// trickle: when the next byte is due.
    next_at: Instant,
    rng: Rng,
    /// fuzz: 0 raw bytes, 1 binary frames, 2 text lines.
    mode: u8,
    seq: u64,
}

impl Slot {
    fn new(sock: TcpStream, sender: bool, rng: Rng, now: Instant) -> Slot {
        Slot {
            sock,
            out: Vec::new(),
            out_pos: 0,
            rx: Vec::new(),
            text: false,
            sender,
            next_at: now,
            rng,
            mode: 1,
            seq: 0,
        }
    }

    fn pending(&self) -> usize {
        self.out.len() - self.out_pos
    }

    /// Writes what it can; `Err` when the relay has closed the connection.
    fn flush(&mut self, stats: &mut Stats) -> Result<(), ()> {
        while self.out_pos < self.out.len() {
            match self.sock.write(&self.out[self.out_pos..]) {
                Ok(0) => return Err(()),
                Ok(n) => {
                    self.out_pos += n;
                    stats.bytes += n as u64;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Err(()),
            }
        }
        self.out.clear();
        self.out_pos = 0;
        Ok(())
    }
}

struct Attacker {
    plan: Plan,
    poll: Poll,
    slots: Vec<Option<Slot>>,
    /// How often each slot has been opened (seeds its generator).
    generation: Vec<u64>,
    reopen: BinaryHeap<Reverse<(Instant, usize)>>,
    victims: Vec<std::net::TcpStream>,
    victim_ids: Vec<u64>,
    next_victim: usize,
    room: u64,
    stats: Stats,
    scratch: Vec<u8>,
}

impl Attacker {
    fn new(plan: Plan, prepared: Prepared) -> Result<Attacker, String> {
        let poll = Poll::new().map_err(|e| e.to_string())?;
        let now = Instant::now();
        let mut att = Attacker {
            slots: Vec::new(),
            generation: Vec::new(),
            reopen: BinaryHeap::new(),
            victims: prepared.victims,
            victim_ids: prepared.victim_ids,
            next_victim: 0,
            room: prepared.room,
            stats: Stats::default(),
            scratch: vec![0u8; 256 * 1024],
            poll,
            plan,
        };
        for (s, sender) in prepared.active {
            s.set_nonblocking(true).map_err(|e| e.to_string())?;
            let mut sock = TcpStream::from_std(s);
            let i = att.slots.len();
            att.poll
                .registry()
                .register(&mut sock, Token(i), Interest::READABLE | Interest::WRITABLE)
                .map_err(|e| e.to_string())?;
            let rng = Rng::seeded(att.plan.seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            att.slots.push(Some(Slot::new(sock, sender, rng, now)));
            att.generation.push(1);
            att.stats.opened += 1;
        }
        if matches!(att.plan.kind, Kind::Trickle | Kind::Partial | Kind::Fuzz) {
            let n = att.plan.count;
            for i in 0..n {
                att.slots.push(None);
                att.generation.push(0);
                // trickle: spread the connections' byte times over one interval.
                let phase = if att.plan.kind == Kind::Trickle {
                    att.plan.trickle * i as u32 / n as u32
                } else {
                    Duration::ZERO
                };
                att.reopen.push(Reverse((now + phase, i)));
            }
        }
        Ok(att)
    }

    fn run(mut self, deadline: Instant) -> Stats {
        let mut events = Events::with_capacity(4096);
        loop {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            while let Some(&Reverse((at, i))) = self.reopen.peek() {
                if at > now {
                    break;
                }
                self.reopen.pop();
                self.open(i, now);
            }
            let more = self.pump(now);
            let mut timeout = Duration::from_millis(10).min(deadline - now);
            if more {
                timeout = Duration::ZERO;
            }
            if let Some(&Reverse((at, _))) = self.reopen.peek() {
                timeout = timeout.min(at.saturating_duration_since(now));
            }
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() == ErrorKind::Interrupted {
                    continue;
                }
                eprintln!("imrelay-bench attack: poll: {e}");
                break;
            }
            for event in events.iter() {
                let i = event.token().0;
                if event.is_writable() {
                    let closed = match self.slots.get_mut(i) {
                        Some(Some(slot)) => slot.flush(&mut self.stats).is_err(),
                        _ => false,
                    };
                    if closed {
                        self.close(i, Instant::now());
                        continue;
                    }
                }
                if event.is_readable() || event.is_read_closed() {
                    self.read(i);
                }
            }
        }
        drop(self.victims);
        self.stats
    }

    /// Opens connection `i` (trickle, partial, fuzz) and queues its first bytes.
    fn open(&mut self, i: usize, now: Instant) {
        let plan = &self.plan;
        let sock = match std::net::TcpStream::connect_timeout(&plan.addr, Duration::from_secs(1)) {
            Ok(s) => s,
            Err(_) => {
                self.stats.connect_failed += 1;
                self.reopen
                    .push(Reverse((now + Duration::from_millis(100), i)));
                return;
            }
        };
        let _ = sock.set_nodelay(true);
        if sock.set_nonblocking(true).is_err() {
            self.stats.connect_failed += 1;
            return;
        }
        let mut sock = TcpStream::from_std(sock);
        if self
            .poll
            .registry()
            .register(&mut sock, Token(i), Interest::READABLE | Interest::WRITABLE)
            .is_err()
        {
            self.stats.connect_failed += 1;
            return;
        }
        let generation = self.generation[i];
        self.generation[i] += 1;
        let seed = plan.seed
            ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
            ^ generation.wrapping_mul(0xc2b2_ae3d_27d4_eb4f);
        let mut slot = Slot::new(sock, plan.kind == Kind::Fuzz, Rng::seeded(seed), now);
        self.stats.opened += 1;
        let user = plan.user_base + i as u64;
        let big = plan.max_frame;
        match plan.kind {
            Kind::Trickle | Kind::Partial => {
                // A max-size SEND: its header now, then one byte at a time (trickle) or
                // all of it but the last byte (partial).
                frame(&mut slot.out, Opcode::Login, 0, 1, user, 0);
                header(
                    &mut slot.out,
                    big,
                    Opcode::Send as u8,
                    NO_ACK,
                    2,
                    plan.offline,
                );
                self.stats.frames += 1;
                if plan.kind == Kind::Partial {
                    slot.out.resize(slot.out.len() + big - HEADER - 1, 0x5a);
                } else {
                    slot.next_at = now + plan.trickle;
                }
            }
            Kind::Fuzz => {
                slot.mode = match slot.rng.next_u64() % 4 {
                    0 => 0,
                    3 => 2,
                    _ => 1,
                };
                let login = slot.rng.next_u64().is_multiple_of(2);
                match slot.mode {
                    1 if login => {
                        frame(&mut slot.out, Opcode::Login, 0, 1, user, 0);
                        self.stats.frames += 1;
                    }
                    2 if login => {
                        slot.out
                            .extend_from_slice(format!("login {user}\n").as_bytes());
                        self.stats.frames += 1;
                    }
                    _ => {}
                }
                fuzz_fill(&mut slot, big, &mut self.stats);
                slot.text = slot.out.first().is_some_and(u8::is_ascii_alphabetic);
            }
            _ => {}
        }
        let ok = slot.flush(&mut self.stats).is_ok();
        self.slots[i] = Some(slot);
        if !ok {
            self.close(i, now);
        }
    }

    /// The relay closed connection `i` (or reset it).
    fn close(&mut self, i: usize, now: Instant) {
        let Some(Some(mut slot)) = self.slots.get_mut(i).map(Option::take) else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut slot.sock);
        self.stats.closed += 1;
        if matches!(self.plan.kind, Kind::Trickle | Kind::Partial | Kind::Fuzz) {
            self.reopen.push(Reverse((now + self.plan.reopen, i)));
        }
    }

    /// Generates traffic for this turn; true when some connection could take more at once.
    fn pump(&mut self, now: Instant) -> bool {
        let mut more = false;
        let mut closed = Vec::new();
        let kind = self.plan.kind;
        for i in 0..self.slots.len() {
            let Some(slot) = self.slots[i].as_mut() else {
                continue;
            };
            match kind {
                Kind::Trickle => {
                    if slot.next_at > now || slot.pending() > 0 {
                        continue;
                    }
                    slot.next_at = (slot.next_at + self.plan.trickle).max(now);
                    // `seq` counts the payload bytes sent; a frame that is whole (only with a
                    // small max frame) is followed by the next one.
                    if slot.seq as usize == self.plan.max_frame - HEADER {
                        slot.seq = 0;
                        let (big, off) = (self.plan.max_frame, self.plan.offline);
                        header(&mut slot.out, big, Opcode::Send as u8, NO_ACK, 3, off);
                        self.stats.frames += 1;
                    } else {
                        slot.seq += 1;
                        slot.out.push(0x5a);
                    }
                }
                Kind::Pin | Kind::Flood | Kind::Fuzz => {
                    let limit = if kind == Kind::Fuzz {
                        FUZZ_FILL
                    } else {
                        LOW_WATER
                    };
                    if !slot.sender || slot.pending() >= limit {
                        continue;
                    }
                    match kind {
                        Kind::Pin => {
                            let n = self.victim_ids.len();
                            while slot.pending() < FILL {
                                for _ in 0..self.plan.pin_small {
                                    let to = self.victim_ids[self.next_victim % n];
                                    self.next_victim += 1;
                                    slot.seq += 1;
                                    let n = self.plan.pin_payload;
                                    frame(&mut slot.out, Opcode::Send, NO_ACK, slot.seq, to, n);
                                }
                                slot.seq += 1;
                                frame(&mut slot.out, Opcode::Ping, 0, slot.seq, 0, 32);
                                slot.seq += 1;
                                let big = self.plan.max_frame - HEADER;
                                let off = self.plan.offline;
                                frame(&mut slot.out, Opcode::Send, NO_ACK, slot.seq, off, big);
                                self.stats.frames += 2 + self.plan.pin_small as u64;
                            }
                        }
                        Kind::Flood => {
                            while slot.pending() < FILL {
                                slot.seq += 1;
                                frame(
                                    &mut slot.out,
                                    Opcode::RoomSend,
                                    NO_ACK,
                                    slot.seq,
                                    self.room,
                                    32,
                                );
                                self.stats.frames += 1;
                            }
                        }
                        _ => fuzz_fill(slot, self.plan.max_frame, &mut self.stats),
                    }
                }
                _ => continue,
            }
            if slot.flush(&mut self.stats).is_err() {
                closed.push(i);
            } else if slot.sender && slot.pending() == 0 {
                more = true;
            }
        }
        for i in closed {
            self.close(i, now);
        }
        more
    }

    /// Reads connection `i` until it would block, counting what the relay sent.
    fn read(&mut self, i: usize) {
        loop {
            let Some(Some(slot)) = self.slots.get_mut(i) else {
                return;
            };
            let n = match slot.sock.read(&mut self.scratch) {
                Ok(0) => {
                    self.close(i, Instant::now());
                    return;
                }
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.close(i, Instant::now());
                    return;
                }
            };
            slot.rx.extend_from_slice(&self.scratch[..n]);
            if slot.text {
                parse_text(&mut slot.rx, &mut self.stats);
            } else {
                parse_binary(&mut slot.rx, &mut self.stats);
            }
        }
    }
}

/// Counts the complete frames in `rx` and removes them.
fn parse_binary(rx: &mut Vec<u8>, stats: &mut Stats) {
    let mut pos = 0;
    while rx.len() - pos >= 4 {
        let f = &rx[pos..];
        let len = u32::from_be_bytes([f[0], f[1], f[2], f[3]]) as usize;
        if !(HEADER..=16 << 20).contains(&len) {
            // Not a frame: the stream cannot be split any more.
            stats.bad += 1;
            rx.clear();
            return;
        }
        if f.len() < len {
            break;
        }
        if f[5] == Opcode::Error as u8 {
            let code = if len >= HEADER + 2 {
                u16::from_be_bytes([f[HEADER], f[HEADER + 1]])
            } else {
                0
            };
            *stats.errors.entry(code).or_default() += 1;
        } else {
            *stats.replies.entry(f[5]).or_default() += 1;
        }
        pos += len;
    }
    rx.drain(..pos);
}

/// Counts the complete lines in `rx` (`ERR <NAME> ...` by name) and removes them.
fn parse_text(rx: &mut Vec<u8>, stats: &mut Stats) {
    let mut start = 0;
    while let Some(nl) = rx[start..].iter().position(|&b| b == b'\n') {
        let line = &rx[start..start + nl];
        if let Some(rest) = line.strip_prefix(b"ERR ") {
            let name = rest.split(|&b| b == b' ').next().unwrap_or_default();
            *stats
                .text_errors
                .entry(String::from_utf8_lossy(name).into_owned())
                .or_default() += 1;
        } else {
            stats.text_lines += 1;
        }
        start += nl + 1;
    }
    rx.drain(..start);
    if rx.len() > 1 << 20 {
        stats.bad += 1;
        rx.clear();
    }
}

/// Opcodes the binary fuzzer picks from (plus, one time in eight, any byte).
const FUZZ_OPCODES: [u8; 14] = [
    0x01, 0x02, 0x03, 0x03, 0x03, 0x04, 0x07, 0x08, 0x10, 0x11, 0x12, 0x14, 0x16, 0x23,
];
/// Commands the text fuzzer picks from.
const FUZZ_COMMANDS: [&str; 15] = [
    "LOGIN",
    "SEND",
    "JOIN",
    "LEAVE",
    "INFO",
    "ROOM",
    "BROADCAST",
    "STORE",
    "SYNC",
    "SACK",
    "PING",
    "PONG",
    "HELP",
    "send",
    "XYZZY",
];

/// Appends `n` random bytes.
fn random_bytes(rng: &mut Rng, out: &mut Vec<u8>, n: usize) {
    let mut left = n;
    while left > 0 {
        let word = rng.next_u64().to_le_bytes();
        let take = left.min(8);
        out.extend_from_slice(&word[..take]);
        left -= take;
    }
}

/// Tops a fuzzing connection's output up to [`FUZZ_FILL`] bytes in its mode.
fn fuzz_fill(slot: &mut Slot, max_frame: usize, stats: &mut Stats) {
    while slot.pending() < FUZZ_FILL {
        let rng = &mut slot.rng;
        match slot.mode {
            0 => random_bytes(rng, &mut slot.out, 4096),
            1 => {
                let r = rng.next_u64();
                let payload = if r.is_multiple_of(16) {
                    (rng.next_u64() % max_frame as u64) as usize
                } else {
                    ((r >> 4) % 64) as usize
                };
                // The length field usually tells the truth (sometimes one header past the
                // max frame); one time in 32 it lies.
                let len = match (r >> 12) % 64 {
                    0 => rng.next_u64() as u32 as usize,
                    1 => ((r >> 20) % 32) as usize,
                    _ => HEADER + payload,
                };
                let opcode = if (r >> 30).is_multiple_of(8) {
                    (r >> 33) as u8
                } else {
                    FUZZ_OPCODES[((r >> 33) % FUZZ_OPCODES.len() as u64) as usize]
                };
                let flags = if (r >> 41).is_multiple_of(4) {
                    ((r >> 43) & 0x0f) as u16
                } else {
                    0
                };
                let msg_id = rng.next_u64();
                let target = rng.next_u64() % 8;
                let start = slot.out.len();
                header(&mut slot.out, len, opcode, flags, msg_id, target);
                if (r >> 18).is_multiple_of(32) {
                    slot.out[start + 4] = (r >> 24) as u8; // version
                }
                if (r >> 47).is_multiple_of(16) {
                    let source = rng.next_u64().to_be_bytes();
                    slot.out[start + 24..start + 32].copy_from_slice(&source);
                }
                random_bytes(rng, &mut slot.out, payload);
            }
            _ => {
                let r = rng.next_u64();
                let cmd = FUZZ_COMMANDS[(r % FUZZ_COMMANDS.len() as u64) as usize];
                slot.out.extend_from_slice(cmd.as_bytes());
                let arg = match (r >> 8) % 4 {
                    0 => format!(" {}", (r >> 16) % 8),
                    1 => format!(" {}", rng.next_u64()),
                    2 => " -1".to_string(),
                    _ => String::new(),
                };
                slot.out.extend_from_slice(arg.as_bytes());
                let text_len = ((r >> 24) % 48) as usize;
                if (r >> 32).is_multiple_of(16) {
                    slot.out.push(b' ');
                    random_bytes(rng, &mut slot.out, text_len);
                    // A random byte may be a line end: fine, that is a shorter line.
                } else {
                    slot.out.push(b' ');
                    for _ in 0..text_len {
                        slot.out.push(b' ' + (rng.next_u64() % 95) as u8);
                    }
                }
                slot.out.extend_from_slice(if (r >> 40).is_multiple_of(2) {
                    b"\n"
                } else {
                    b"\r\n"
                });
            }
        }
        stats.frames += 1;
    }
}
