//! `logins`: the cost of a login. N connections, at most `--batch` in flight at once (a new
//! one starts as one finishes); each connects, sends LOGIN (with `--token` a signed token
//! for its user, protocol.md section 16; with `--tls` behind a TLS handshake), reads
//! LOGIN_OK and closes. Reports logins per second, the latency from connect to LOGIN_OK
//! (and to the end of the TLS handshake), and the relay's CPU time per login.
//!
//! Tokens are minted before the clock starts: the relay's verification is measured, not
//! the bench's signing. With `--spawn` the bench makes the key: a 48-byte HS256 secret
//! (`--auth-secret-file`), or an ES256 (rcgen) or RS256 (`openssl genpkey`) key pair whose
//! public half the relay gets (`--auth-public-key-file`, `--auth-algorithm`).

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use clap::Args;
use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use rustls::ClientConnection;
use serde_json::{json, Map, Value};
use slab::Slab;

use imrelay::auth::{Algorithm, Mint};
use imrelay::proto::decode::decode_frame;
use imrelay::proto::{Frame, MessageId, Opcode, UserId};

use crate::report::{self, Report};
use crate::tls::{self, CipherIn, TempDir, TlsArgs, TlsClient};
use crate::{relay_proc, setup, Target};

#[derive(Args, Clone)]
pub struct LoginsArgs {
    /// Connections in all.
    #[arg(long, default_value_t = 2000)]
    count: usize,
    /// Connections in flight at once, over all threads: a new one starts as one finishes.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Spread the connections over source addresses 127.0.0.1 .. 127.0.0.K (loopback
    /// relays only). Every closed connection leaves a TIME_WAIT socket on the bench's side
    /// for 60 s; past some 10,000 of them finding a free port costs the bench more than the
    /// login costs the relay, so use 8 or so with large --count or repeated runs.
    #[arg(long, default_value_t = 1)]
    sources: usize,
    /// Log in with a signed token per user. With --spawn the bench makes the key and starts
    /// the relay with it; with --addr give --auth-secret-file or --auth-private-key-file.
    #[arg(long)]
    token: bool,
    /// The tokens' algorithm: HS256, ES256 or RS256.
    #[arg(long, default_value = "HS256")]
    auth_algorithm: Algorithm,
    /// With --addr --token: the relay's HS256 secret file (one trailing newline ignored).
    #[arg(long, conflicts_with = "auth_private_key_file")]
    auth_secret_file: Option<PathBuf>,
    /// With --addr --token: the issuer's private key, PEM, for ES256 or RS256.
    #[arg(long)]
    auth_private_key_file: Option<PathBuf>,
    /// The tokens' lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    token_ttl: u64,
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    tls: TlsArgs,
}

pub fn main(a: LoginsArgs) -> Result<Report, String> {
    if a.count == 0 {
        return Err("--count 0: nothing to do".into());
    }
    // The key, and the relay flags that make it check tokens with it.
    let (signing, files, flags) = if !a.token {
        if a.auth_secret_file.is_some() || a.auth_private_key_file.is_some() {
            return Err("--auth-secret-file and --auth-private-key-file need --token".into());
        }
        (None, None, Vec::new())
    } else if a.target.spawn {
        let dir = TempDir::new("auth")?;
        let (key, flags) = make_key(&dir, a.auth_algorithm)?;
        (Some(key), Some(dir), flags)
    } else {
        (Some(read_key(&a)?), None, Vec::new())
    };
    let flag_refs: Vec<&str> = flags.iter().map(String::as_str).collect();
    let relay = crate::relay_with(&a.target, &flag_refs, &a.tls, files)?;

    let base = crate::user_base();
    let users: Vec<u64> = (0..a.count as u64).map(|i| base + i + 1).collect();
    let credentials: Vec<Vec<u8>> = match &signing {
        None => vec![Vec::new(); a.count],
        Some(key) => {
            let started = Instant::now();
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_err(|e| e.to_string())?
                .as_secs();
            let tokens = users
                .iter()
                .map(|&u| {
                    Mint::new(u, now, a.token_ttl)
                        .sign(a.auth_algorithm, key)
                        .map(String::into_bytes)
                        .map_err(|e| format!("cannot sign a token: {e}"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            eprintln!(
                "minted {} {} tokens ({} bytes each) in {:.2} s",
                tokens.len(),
                a.auth_algorithm,
                tokens[0].len(),
                started.elapsed().as_secs_f64()
            );
            tokens
        }
    };
    let logins: Arc<Vec<(u64, Vec<u8>)>> = Arc::new(users.into_iter().zip(credentials).collect());

    let threads = a.target.threads.clamp(1, a.count);
    let batch = a.batch.max(1);
    let progress = Arc::new(AtomicU64::new(0));
    let bar = report::progress_bar_of(a.count as u64, "logins", "logins");
    let cpu_before = relay.pid.and_then(relay_proc::cpu_seconds);
    let bench_before = relay_proc::cpu_seconds(std::process::id());
    let epoch = Instant::now();
    let deadline = epoch + Duration::from_secs(a.target.timeout);
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let plan = Plan {
                addr: relay.addr,
                tls: relay.tls.clone(),
                logins: logins.clone(),
                mine: (t..a.count).step_by(threads).collect(),
                batch: (batch / threads + usize::from(t < batch % threads)).max(1),
                sources: a.sources,
                deadline,
            };
            let progress = progress.clone();
            let cpu = a.target.bench_cpu;
            let busy = a.target.busy_poll;
            std::thread::spawn(move || {
                if let Some(cpu) = cpu {
                    if let Err(e) = relay_proc::pin(0, cpu) {
                        eprintln!("imrelay-bench: {e}");
                    }
                }
                run(plan, busy, &progress).map(|o| (o, Instant::now()))
            })
        })
        .collect();
    while !handles.iter().all(|h| h.is_finished()) {
        bar.set_position(progress.load(Ordering::Relaxed));
        std::thread::sleep(Duration::from_millis(100));
    }
    bar.finish_and_clear();
    let outcomes = handles
        .into_iter()
        .map(|h| {
            h.join()
                .map_err(|_| "a generator thread panicked".to_string())?
        })
        .collect::<Result<Vec<_>, String>>()?;
    // When the last thread finished, not when the loop above, which sleeps, noticed it.
    let elapsed = outcomes.iter().map(|(_, end)| *end).max().unwrap_or(epoch) - epoch;
    let relay_cpu = match (cpu_before, relay.pid.and_then(relay_proc::cpu_seconds)) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let memory = relay.pid.and_then(relay_proc::memory_kib);
    let bench_cpu = match (bench_before, relay_proc::cpu_seconds(std::process::id())) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };

    let mut total = Outcome::new();
    for (o, _) in outcomes {
        total.merge(o);
    }
    let secs = elapsed.as_secs_f64();
    let failed: u64 = total.failures.values().sum();
    let per_sec = total.ok as f64 / secs;
    let tls = relay.tls.is_some();
    let cpu_per_login_us = relay_cpu.map(|c| c * 1e6 / total.ok.max(1) as f64);
    let mut j = Map::new();
    j.insert("mode".into(), json!("logins"));
    j.insert(
        "params".into(),
        json!({
            "count": a.count, "batch": batch, "threads": threads, "sources": a.sources,
            "token": a.token,
            "algorithm": if a.token { Some(a.auth_algorithm.to_string()) } else { None },
        }),
    );
    j.insert("tls".into(), json!(tls));
    j.insert("elapsed_s".into(), json!(secs));
    j.insert("logins".into(), json!(total.ok));
    j.insert("logins_per_sec".into(), json!(per_sec.round()));
    j.insert("latency_us".into(), quantiles(&total.latency));
    if tls {
        j.insert("handshake_us".into(), quantiles(&total.handshake));
    }
    j.insert("failed".into(), json!(failed));
    j.insert("failures".into(), json!(total.failures));
    j.insert("relay_cpu_s".into(), json!(relay_cpu));
    j.insert("relay_cpu_us_per_login".into(), json!(cpu_per_login_us));
    j.insert("bench_cpu_s".into(), json!(bench_cpu));
    j.insert("relay_rss_kib".into(), json!(memory.map(|m| m.0)));
    j.insert("relay_hwm_kib".into(), json!(memory.map(|m| m.1)));
    let us = |q: f64| total.latency.value_at_quantile(q) as f64 / 1000.0;
    let mut summary = format!(
        "logins{}{}: {} in {secs:.2} s = {per_sec:.0} logins/s; connect to LOGIN_OK us p50 {:.1} p90 {:.1} p99 {:.1} max {:.1}",
        if a.token { format!(" ({} tokens)", a.auth_algorithm) } else { String::new() },
        if tls { " over TLS" } else { "" },
        total.ok,
        us(0.5),
        us(0.9),
        us(0.99),
        total.latency.max() as f64 / 1000.0,
    );
    if tls {
        let hs = |q: f64| total.handshake.value_at_quantile(q) as f64 / 1000.0;
        summary += &format!("; TLS handshake us p50 {:.1} p99 {:.1}", hs(0.5), hs(0.99));
    }
    if let Some(c) = cpu_per_login_us {
        summary += &format!("; relay CPU {c:.1} us per login");
    }
    if let Some(c) = bench_cpu {
        summary += &format!(" (bench CPU {:.0}% of the run)", 100.0 * c / secs);
    }
    if failed > 0 {
        summary += &format!("; {failed} failed: {:?}", total.failures);
    }
    let unfinished = a.count as u64 - total.ok - failed;
    if unfinished > 0 {
        summary += &format!("; {unfinished} unfinished at the timeout");
    }
    drop(relay);
    Ok(Report::from_parts(j, summary, unfinished, failed))
}

fn quantiles(h: &Histogram<u64>) -> Value {
    let us = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    json!({
        "p50": us(0.5), "p90": us(0.9), "p99": us(0.99), "p999": us(0.999),
        "max": h.max() as f64 / 1000.0,
    })
}

/// Makes a key for `alg` in `dir`: the signing key the tokens are minted with, and the
/// relay flags that verify them.
fn make_key(dir: &TempDir, alg: Algorithm) -> Result<(Vec<u8>, Vec<String>), String> {
    let path = |p: PathBuf| p.to_string_lossy().into_owned();
    match alg {
        Algorithm::Hs256 => {
            let mut secret = vec![0u8; 48];
            tls::random_fill(&mut secret)?;
            // The relay drops one trailing newline from the file: keep the secret whole.
            if secret[47] == b'\n' {
                secret[47] = b'N';
            }
            let file = dir.write("secret", &secret)?;
            Ok((secret, vec!["--auth-secret-file".into(), path(file)]))
        }
        Algorithm::Es256 => {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                .map_err(|e| format!("cannot make an ES256 key: {e}"))?;
            let public = dir.write("es256.pub.pem", key.public_key_pem().as_bytes())?;
            Ok((
                key.serialize_pem().into_bytes(),
                public_flags(path(public), alg),
            ))
        }
        Algorithm::Rs256 => {
            // ring (rcgen's backend) cannot generate RSA keys; openssl can.
            let private = dir.path().join("rs256.pem");
            let public = dir.path().join("rs256.pub.pem");
            openssl(&[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
                &path(private.clone()),
            ])?;
            openssl(&[
                "pkey",
                "-in",
                &path(private.clone()),
                "-pubout",
                "-out",
                &path(public.clone()),
            ])?;
            let key = std::fs::read(&private)
                .map_err(|e| format!("cannot read {}: {e}", private.display()))?;
            Ok((key, public_flags(path(public), alg)))
        }
    }
}

fn public_flags(file: String, alg: Algorithm) -> Vec<String> {
    vec![
        "--auth-public-key-file".into(),
        file,
        "--auth-algorithm".into(),
        alg.to_string(),
    ]
}

fn openssl(args: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new("openssl")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run openssl (needed for RS256 keys): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "openssl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// The signing key of `--auth-secret-file` or `--auth-private-key-file` (with --addr).
fn read_key(a: &LoginsArgs) -> Result<Vec<u8>, String> {
    let read = |p: &PathBuf| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    match (
        a.auth_algorithm,
        &a.auth_secret_file,
        &a.auth_private_key_file,
    ) {
        (Algorithm::Hs256, Some(file), None) => {
            // Read as the relay reads its --auth-secret-file.
            let mut secret = read(file)?;
            if secret.last() == Some(&b'\n') {
                secret.pop();
                if secret.last() == Some(&b'\r') {
                    secret.pop();
                }
            }
            Ok(secret)
        }
        (Algorithm::Hs256, _, _) => {
            Err("--token --addr with HS256 needs --auth-secret-file".into())
        }
        (alg, None, Some(file)) => {
            let key = read(file)?;
            // Fail now rather than at the first token.
            Mint::new(1, 0, 1)
                .sign(alg, &key)
                .map_err(|e| format!("{}: {e}", file.display()))?;
            Ok(key)
        }
        (alg, _, _) => Err(format!(
            "--token --addr with {alg} needs --auth-private-key-file"
        )),
    }
}

/// One thread's share.
struct Plan {
    addr: SocketAddr,
    tls: Option<TlsClient>,
    /// Every login's user and credential.
    logins: Arc<Vec<(u64, Vec<u8>)>>,
    /// Indices into `logins` this thread makes.
    mine: Vec<usize>,
    batch: usize,
    sources: usize,
    deadline: Instant,
}

/// What one thread measured.
pub(crate) struct Outcome {
    /// Connect to LOGIN_OK, ns.
    pub(crate) latency: Histogram<u64>,
    /// Connect to the end of the TLS handshake (the client's view: the server's Finished
    /// verified), ns.
    pub(crate) handshake: Histogram<u64>,
    pub(crate) ok: u64,
    /// Failed logins by reason.
    pub(crate) failures: BTreeMap<String, u64>,
}

impl Outcome {
    fn new() -> Outcome {
        let h = || Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("histogram");
        Outcome {
            latency: h(),
            handshake: h(),
            ok: 0,
            failures: BTreeMap::new(),
        }
    }

    fn merge(&mut self, o: Outcome) {
        self.latency.add(&o.latency).expect("same bounds");
        self.handshake.add(&o.handshake).expect("same bounds");
        self.ok += o.ok;
        for (reason, n) in o.failures {
            *self.failures.entry(reason).or_default() += n;
        }
    }
}

/// `count` logins without credentials (users 1 ..= count), `batch` at a time, on this
/// thread.
#[cfg(test)]
pub(crate) fn run_against(
    addr: SocketAddr,
    tls: Option<TlsClient>,
    count: usize,
    batch: usize,
) -> Outcome {
    let plan = Plan {
        addr,
        tls,
        logins: Arc::new((1..=count as u64).map(|u| (u, Vec::new())).collect()),
        mine: (0..count).collect(),
        batch,
        sources: 1,
        deadline: Instant::now() + Duration::from_secs(30),
    };
    run(plan, false, &AtomicU64::new(0)).expect("run")
}

/// One connection on its way to LOGIN_OK.
struct Attempt {
    sock: TcpStream,
    tls: Option<Box<(ClientConnection, CipherIn)>>,
    started: Instant,
    /// TLS: when the handshake was seen complete, ns after `started`.
    handshake_ns: Option<u64>,
    /// Plaintext: what is not written yet (the LOGIN, unless the socket took it at once).
    out: Vec<u8>,
    out_pos: usize,
    /// Plaintext received so far.
    inbuf: BytesMut,
}

enum Step {
    Waiting,
    LoggedIn,
    Failed(String),
}

/// Ciphertext read ahead per TLS connection: the relay's handshake flight and tickets, then
/// LOGIN_OK.
const CIPHER_BUF: usize = 32 * 1024;

fn run(plan: Plan, busy_poll: bool, progress: &AtomicU64) -> Result<Outcome, String> {
    let mut poll = Poll::new().map_err(|e| format!("poll: {e}"))?;
    let mut events = Events::with_capacity(1024);
    let mut live: Slab<Attempt> = Slab::with_capacity(plan.batch);
    let mut out = Outcome::new();
    let mut next = 0;
    while next < plan.mine.len() || !live.is_empty() {
        while live.len() < plan.batch && next < plan.mine.len() {
            let i = plan.mine[next];
            next += 1;
            let (user, credential) = &plan.logins[i];
            let mut attempt = start(&plan, i, *user, credential)?;
            let entry = live.vacant_entry();
            poll.registry()
                .register(
                    &mut attempt.sock,
                    Token(entry.key()),
                    Interest::READABLE | Interest::WRITABLE,
                )
                .map_err(|e| format!("register: {e}"))?;
            entry.insert(attempt);
        }
        let now = Instant::now();
        if now >= plan.deadline {
            break;
        }
        let timeout = if busy_poll {
            Duration::ZERO
        } else {
            Duration::from_millis(50).min(plan.deadline - now)
        };
        if let Err(e) = poll.poll(&mut events, Some(timeout)) {
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("poll: {e}"));
        }
        for event in events.iter() {
            let key = event.token().0;
            let Some(attempt) = live.get_mut(key) else {
                continue;
            };
            let step = advance(attempt, event.is_readable());
            let step = match step {
                Step::Waiting => continue,
                step => step,
            };
            let mut attempt = live.remove(key);
            let _ = poll.registry().deregister(&mut attempt.sock);
            match step {
                Step::LoggedIn => {
                    out.latency
                        .saturating_record((attempt.started.elapsed().as_nanos() as u64).max(1));
                    out.ok += 1;
                }
                Step::Failed(why) => *out.failures.entry(why).or_default() += 1,
                Step::Waiting => unreachable!(),
            }
            progress.fetch_add(1, Ordering::Relaxed);
            // Close as a client does: TLS says close_notify first (best effort).
            if let Some(t) = attempt.tls.as_deref_mut() {
                t.0.send_close_notify();
                let _ = tls::write_tls(&mut t.0, &mut attempt.sock);
            }
            if let Some(ns) = attempt.handshake_ns {
                out.handshake.saturating_record(ns.max(1));
            }
        }
    }
    Ok(out)
}

/// Connects (blocking: loopback connects at once, and the relay's backlog takes them
/// before it accepts) and sends the LOGIN, or the ClientHello with the LOGIN queued.
fn start(plan: &Plan, i: usize, user: u64, credential: &[u8]) -> Result<Attempt, String> {
    let started = Instant::now();
    let sock = if plan.sources > 1 {
        let source = Ipv4Addr::new(127, 0, 0, (1 + i % plan.sources.min(254)) as u8);
        setup::connect_from(source, plan.addr)?
    } else {
        std::net::TcpStream::connect(plan.addr)
            .map_err(|e| format!("connect {}: {e}", plan.addr))?
    };
    sock.set_nodelay(true).map_err(|e| e.to_string())?;
    sock.set_nonblocking(true).map_err(|e| e.to_string())?;
    let sock = TcpStream::from_std(sock);
    let login = Frame::login(MessageId(1), UserId(user), credential).to_bytes();
    let mut attempt = Attempt {
        sock,
        tls: None,
        started,
        handshake_ns: None,
        out: Vec::new(),
        out_pos: 0,
        inbuf: BytesMut::with_capacity(256),
    };
    match &plan.tls {
        None => attempt.out = login.to_vec(),
        Some(client) => {
            let mut session = client.session()?;
            session
                .writer()
                .write_all(&login)
                .map_err(|e| format!("TLS: {e}"))?;
            attempt.tls = Some(Box::new((session, CipherIn::new(CIPHER_BUF))));
        }
    }
    // Nothing can fail here that the first event would not report again.
    let _ = write(&mut attempt);
    Ok(attempt)
}

/// Writes what the attempt has pending.
fn write(a: &mut Attempt) -> std::io::Result<()> {
    match a.tls.as_deref_mut() {
        Some((session, _)) => tls::write_tls(session, &mut a.sock).map(drop),
        None => {
            while a.out_pos < a.out.len() {
                match a.sock.write(&a.out[a.out_pos..]) {
                    Ok(n) => a.out_pos += n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        }
    }
}

/// Reads and writes what an event allows; says whether the login is over.
fn advance(a: &mut Attempt, readable: bool) -> Step {
    if let Err(e) = write(a) {
        return Step::Failed(format!("write: {}", e.kind()));
    }
    if !readable {
        return Step::Waiting;
    }
    let mut chunk = [0u8; 4096];
    loop {
        let got = match a.tls.as_deref_mut() {
            None => a.sock.read(&mut chunk),
            Some((session, cipher)) => tls::read_plain(session, &mut a.sock, cipher, &mut chunk),
        };
        match got {
            Ok(0) => return Step::Failed("closed by the relay".into()),
            Ok(n) => a.inbuf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::InvalidData => {
                return Step::Failed(format!("TLS: {e}"));
            }
            Err(e) => return Step::Failed(format!("read: {}", e.kind())),
        }
        // The answer is one frame; stop reading once it is here.
        loop {
            match decode_frame(&mut a.inbuf, u32::MAX) {
                Err(e) => return Step::Failed(format!("bad frame: {e}")),
                Ok(None) => break,
                Ok(Some(Err(op))) => return Step::Failed(format!("unknown opcode {op}")),
                Ok(Some(Ok(frame))) => match frame.opcode {
                    Opcode::LoginOk => return Step::LoggedIn,
                    Opcode::Error => {
                        let why = frame.error().map(|(_, r)| r).unwrap_or_default();
                        return Step::Failed(format!("ERROR {why}"));
                    }
                    // Anything else (a PING) before the answer: keep waiting.
                    _ => {}
                },
            }
        }
    }
    if let Some((session, _)) = a.tls.as_deref() {
        if a.handshake_ns.is_none() && !session.is_handshaking() {
            a.handshake_ns = Some(a.started.elapsed().as_nanos() as u64);
        }
    }
    // The handshake's next flight, and the LOGIN once it is done.
    match write(a) {
        Ok(()) => Step::Waiting,
        Err(e) => Step::Failed(format!("write: {}", e.kind())),
    }
}
