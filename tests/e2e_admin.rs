//! The admin listener (`--admin-listen`) end to end: the real binary serves `/healthz`,
//! `/readyz` and `/metrics` (Prometheus text) beside its client port, the counters follow
//! the traffic of real clients, bad requests do not hurt it, and a real Prometheus server
//! (Debian's, installed by `tests/admin/setup.sh`) scrapes it.
//!
//! A missing Prometheus fails the Prometheus test: it never skips. Every wait polls for a
//! signal (an answer, a sample) under a generous safety timeout; nothing is timed.

mod support;

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use imrelay::proto::{ErrorCode, Flags, Frame, MessageId, Opcode, UserId};
use imrelay::relay::Config;
use imrelay::server::Server;
use support::process::{run_to_exit, RelayProcess};
use support::{Client, SAFETY_TIMEOUT};

/// How long the Prometheus test waits for Prometheus to start and scrape.
const PROMETHEUS_TIMEOUT: Duration = Duration::from_secs(90);

/// A free port on 127.0.0.1 (bound and let go).
fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind a free port")
        .local_addr()
        .expect("local addr")
}

fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    support::http_request(
        addr,
        &format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: e2e_admin\r\n\r\n"),
    )
    .unwrap_or_else(|e| panic!("GET {path} from {addr}: {e}"))
}

/// One sample of the Prometheus text format.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Parses the Prometheus text exposition format (0.0.4) strictly enough to catch a broken
/// encoder: comment lines are HELP or TYPE lines; every sample belongs to a family with a
/// TYPE line before it; names, label pairs and values are well formed.
fn parse_exposition(text: &str) -> Vec<Sample> {
    let mut typed: HashMap<String, String> = HashMap::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix("# ") {
            let mut words = comment.splitn(3, ' ');
            let (kind, name, rest) = (words.next(), words.next(), words.next());
            let name = name.unwrap_or_else(|| panic!("comment without a name: {line:?}"));
            assert!(valid_name(name), "bad metric name in {line:?}");
            match kind {
                Some("HELP") => {}
                Some("TYPE") => {
                    let kind = rest.unwrap_or_default();
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                        "bad type in {line:?}"
                    );
                    assert!(
                        typed.insert(name.to_string(), kind.to_string()).is_none(),
                        "{name} typed twice"
                    );
                }
                _ => panic!("unexpected comment {line:?}"),
            }
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value in {line:?}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series, Vec::new()),
            Some((name, rest)) => {
                let inner = rest
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("unclosed labels in {line:?}"));
                let labels = inner
                    .split(',')
                    .filter(|pair| !pair.is_empty())
                    .map(|pair| {
                        let (k, v) = pair
                            .split_once('=')
                            .unwrap_or_else(|| panic!("bad label in {line:?}"));
                        assert!(valid_name(k), "bad label name in {line:?}");
                        let v = v
                            .strip_prefix('"')
                            .and_then(|v| v.strip_suffix('"'))
                            .unwrap_or_else(|| panic!("unquoted label value in {line:?}"));
                        (k.to_string(), v.to_string())
                    })
                    .collect();
                (name, labels)
            }
        };
        assert!(valid_name(name), "bad metric name in {line:?}");
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                name.strip_suffix(suffix)
                    .filter(|base| typed.get(*base).is_some_and(|t| t == "histogram"))
            })
            .unwrap_or(name);
        assert!(
            typed.contains_key(family),
            "sample {name} before its TYPE line"
        );
        samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    samples
}

/// The value of the sample `name` whose labels include `labels`; panics if there is none.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.iter().any(|(sk, sv)| sk == k && sv == v))
        })
        .unwrap_or_else(|| panic!("no sample {name}{labels:?}"))
        .value
}

/// `/metrics`, parsed.
fn scrape(admin: SocketAddr) -> Vec<Sample> {
    let (status, body) = get(admin, "/metrics");
    assert_eq!(status, 200, "{body}");
    parse_exposition(&body)
}

/// The relay binary with an admin listener on a free port; returns it and the admin
/// address.
fn relay_with_admin() -> (RelayProcess, SocketAddr) {
    let admin = free_addr();
    let relay = RelayProcess::start(&["--admin-listen", &admin.to_string()]);
    (relay, admin)
}

/// `n` messages from `from` to user `to_user` (logged in on `to`), each delivered and
/// ACKed before the next.
fn send_and_check(from: &mut Client, to: &mut Client, to_user: u64, n: usize) {
    for i in 0..n {
        let id = from.send(to_user, format!("message {i}").as_bytes());
        let got = to.recv();
        assert_eq!((got.opcode, got.msg_id), (Opcode::Deliver, id), "{got:?}");
        let ack = from.recv();
        assert_eq!((ack.opcode, ack.msg_id), (Opcode::Ack, id), "{ack:?}");
    }
}

/// Users 1 and 2 log in; 1 sends `to_b` messages to 2, 2 sends `to_a` back. Returns the
/// clients, still logged in.
fn exchange(relay: SocketAddr, to_b: usize, to_a: usize) -> (Client, Client) {
    let mut a = Client::connect(relay);
    a.login(1);
    let mut b = Client::connect(relay);
    b.login(2);
    send_and_check(&mut a, &mut b, 2, to_b);
    send_and_check(&mut b, &mut a, 1, to_a);
    (a, b)
}

#[test]
fn health_readiness_and_metrics_follow_the_traffic() {
    let (relay, admin) = relay_with_admin();
    assert_eq!(get(admin, "/healthz"), (200, "ok\n".to_string()));
    assert_eq!(get(admin, "/readyz"), (200, "ready\n".to_string()));

    let before = scrape(admin);
    let send = [("opcode", "SEND")];
    let login = [("opcode", "LOGIN")];
    let (mut a, mut b) = exchange(relay.addr, 3, 2);
    let after = scrape(admin);

    let grew = |name: &str, labels: &[(&str, &str)]| {
        value(&after, name, labels) - value(&before, name, labels)
    };
    assert!(grew("imrelay_logins_total", &[]) >= 2.0);
    assert!(grew("imrelay_frames_received_total", &login) >= 2.0);
    assert!(grew("imrelay_frames_received_total", &send) >= 5.0);
    assert!(grew("imrelay_deliveries_total", &[]) >= 5.0);
    assert!(grew("imrelay_messages_routed_total", &[]) >= 5.0);
    assert!(grew("imrelay_connections_accepted_total", &[]) >= 2.0);
    // Each SEND is a 32-byte header and its payload.
    assert!(grew("imrelay_received_bytes_total", &[]) >= 5.0 * 32.0);
    // Out: 2 LOGIN_OK, 5 DELIVER and 5 ACK.
    assert!(grew("imrelay_sent_bytes_total", &[]) >= 12.0 * 32.0);
    assert!(value(&after, "imrelay_connections", &[("codec", "binary")]) >= 2.0);
    assert!(value(&after, "imrelay_users_online", &[]) >= 2.0);
    assert!(value(&after, "imrelay_loop_turn_seconds_count", &[]) > 0.0);
    assert_eq!(
        value(
            &after,
            "imrelay_loop_turn_seconds_bucket",
            &[("le", "+Inf")]
        ),
        value(&after, "imrelay_loop_turn_seconds_count", &[])
    );
    assert_eq!(value(&after, "imrelay_accepting", &[]), 1.0);

    // Anything else is 404.
    assert_eq!(get(admin, "/").0, 404);
    assert_eq!(get(admin, "/metrics/extra").0, 404);
    let (status, _) =
        support::http_request(admin, "POST /metrics HTTP/1.0\r\nContent-Length: 0\r\n\r\n")
            .expect("POST");
    assert_eq!(status, 404);

    // A head past 8 KiB is refused with 400 (or the connection closed under it), and the
    // relay goes on serving both ports.
    let mut stream = TcpStream::connect(admin).expect("connect");
    stream.set_read_timeout(Some(SAFETY_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(SAFETY_TIMEOUT)).unwrap();
    let huge = format!(
        "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Padding: {}\r\n\r\n",
        "a".repeat(32 * 1024)
    );
    let _ = stream.write_all(huge.as_bytes()); // may fail once the admin side closes
    let mut answer = Vec::new();
    match stream.read_to_end(&mut answer) {
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the admin listener did not close the oversized request: {e}"),
    }
    assert!(
        answer.is_empty() || answer.starts_with(b"HTTP/1.1 400 "),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    // Garbage is 400.
    let (status, _) = support::http_request(admin, "\x01\x02 nonsense\r\n\r\n").expect("garbage");
    assert_eq!(status, 400);

    assert_eq!(get(admin, "/healthz").0, 200);
    a.round_trip();
    b.round_trip();
    let id = a.send(2, b"still routed");
    assert_eq!(b.recv().msg_id, id);
    drop(relay);
}

/// How long a shutdown waits for clients to take their output (protocol.md, limits:
/// "shutdown grace").
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// SIGTERM with a client whose output cannot drain: the relay stays in its shutdown grace,
/// where `/readyz` answers 503 (stop sending traffic here) while `/healthz` answers 200
/// (the loop is alive, do not restart it); then it closes the client and exits 0.
#[test]
fn readyz_is_503_during_the_shutdown_grace_while_healthz_stays_200() {
    let (mut relay, admin) = relay_with_admin();
    assert_eq!(get(admin, "/readyz"), (200, "ready\n".to_string()));

    // User 11 never reads; user 12 sends it large messages until its output queue is at
    // the cap (RECIPIENT_SLOW), well past what the sockets take.
    let mut stuck = Client::connect(relay.addr);
    stuck.login(11);
    let mut sender = Client::connect(relay.addr);
    sender.login(12);
    let payload = vec![b'x'; 60_000];
    let mut full = false;
    for _ in 0..10_000 {
        let id = sender.send(11, &payload);
        let answer = sender.recv();
        assert_eq!(answer.msg_id, id, "{answer:?}");
        match answer.opcode {
            Opcode::Ack => {}
            Opcode::Error if answer.error_code() == Some(ErrorCode::RecipientSlow) => {
                full = true;
                break;
            }
            _ => panic!("unexpected answer to SEND: {answer:?}"),
        }
    }
    assert!(full, "the reader's queue never filled");
    let metrics = scrape(admin);
    assert!(value(&metrics, "imrelay_output_queued_bytes", &[]) > 0.0);

    let signalled = Instant::now();
    relay.signal(libc::SIGTERM);
    // The loop takes the signal on its next turn: poll readiness until it says so.
    let deadline = signalled + SAFETY_TIMEOUT;
    loop {
        match get(admin, "/readyz") {
            (503, body) => {
                assert_eq!(body, "shutting down\n");
                break;
            }
            (200, _) => {}
            other => panic!("/readyz during shutdown: {other:?}"),
        }
        assert!(
            Instant::now() < deadline,
            "/readyz still 200 {SAFETY_TIMEOUT:?} after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(get(admin, "/healthz"), (200, "ok\n".to_string()));
    let metrics = scrape(admin);
    assert_eq!(value(&metrics, "imrelay_accepting", &[]), 0.0);
    assert!(
        relay.is_running(),
        "the relay exited with the reader's output pending"
    );

    // The grace runs out: the relay closes the stuck client and exits 0.
    let deadline = signalled + SHUTDOWN_GRACE + SAFETY_TIMEOUT;
    let status = loop {
        if let Some(status) = relay.child.try_wait().expect("try_wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the relay did not exit after its shutdown grace"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    drop(stuck);
    drop(sender);
}

/// With a durable store: stored messages, the log's size and the store writer's commit
/// latency histogram show in /metrics.
#[test]
fn the_store_metrics_count_stored_messages_and_commits() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("admin-store");
    let _ = std::fs::remove_dir_all(&dir);
    let admin = free_addr();
    let relay = RelayProcess::start(&[
        "--admin-listen",
        &admin.to_string(),
        "--store",
        dir.to_str().expect("a UTF-8 path"),
    ]);
    let mut alice = Client::connect(relay.addr);
    alice.login(1);
    for i in 1..=3u64 {
        let frame = Frame::send(MessageId(i), UserId(9), Bytes::from_static(b"for later"))
            .with_flags(Flags::STORED);
        alice.send_frame(&frame);
        // The ACK of a stored SEND comes once its commit is on disk.
        let ack = alice.recv();
        assert_eq!(
            (ack.opcode, ack.msg_id),
            (Opcode::Ack, MessageId(i)),
            "{ack:?}"
        );
    }
    let metrics = scrape(admin);
    assert_eq!(value(&metrics, "imrelay_stored_messages", &[]), 3.0);
    assert_eq!(value(&metrics, "imrelay_inbox_users", &[]), 1.0);
    assert!(value(&metrics, "imrelay_messages_stored_total", &[]) >= 3.0);
    assert!(value(&metrics, "imrelay_stored_bytes", &[]) > 0.0);
    assert!(value(&metrics, "imrelay_store_log_bytes", &[]) > 0.0);
    assert!(value(&metrics, "imrelay_store_commit_seconds_count", &[]) >= 1.0);
    assert!(value(&metrics, "imrelay_store_commit_seconds_sum", &[]) > 0.0);
    drop(relay);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A store that cannot write (the relay runs under a file size limit, so its log's writes
/// fail with EFBIG once the log reaches it): every stored SEND from then on gets
/// STORE_FAILED, nothing is ACKed that is not on disk, `/readyz` answers 503 naming the
/// failure, and direct messages are still routed.
#[test]
fn a_failed_store_write_makes_the_relay_unready_and_refuses_stored_sends() {
    const LOG_LIMIT: u64 = 64 * 1024;
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("admin-store-full");
    let _ = std::fs::remove_dir_all(&dir);
    let admin = free_addr();
    let addr = free_addr();
    let args = [
        "--listen".to_string(),
        addr.to_string(),
        "--admin-listen".to_string(),
        admin.to_string(),
        "--store".to_string(),
        dir.to_str().expect("a UTF-8 path").to_string(),
    ];
    let mut command = Command::new(env!("CARGO_BIN_EXE_imrelay"));
    command
        .args(&args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: between fork and exec only async-signal-safe calls (setrlimit, signal).
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, || {
            let limit = libc::rlimit {
                rlim_cur: LOG_LIMIT,
                rlim_max: LOG_LIMIT,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Past the limit a write fails with EFBIG instead of killing the process.
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            Ok(())
        });
    }
    let mut child = command.spawn().expect("start imrelay");
    support::process::wait_until_listening(&mut child);
    let relay = RelayProcess { child, addr };
    assert_eq!(get(admin, "/readyz"), (200, "ready\n".to_string()));

    let mut alice = Client::connect(relay.addr);
    alice.login(1);
    let mut bob = Client::connect(relay.addr);
    bob.login(2);
    let payload = Bytes::from(vec![b's'; 1000]);
    let (mut acked, mut failed) = (0u64, None);
    for i in 1..=LOG_LIMIT / 500 {
        let frame = Frame::send(MessageId(i), UserId(9), payload.clone()).with_flags(Flags::STORED);
        alice.send_frame(&frame);
        let answer = alice.recv();
        assert_eq!(answer.msg_id, MessageId(i), "{answer:?}");
        match answer.opcode {
            Opcode::Ack => acked += 1,
            Opcode::Error => {
                assert_eq!(
                    answer.error_code(),
                    Some(ErrorCode::StoreFailed),
                    "{answer:?}"
                );
                failed = Some(i);
                break;
            }
            _ => panic!("unexpected answer to a stored SEND: {answer:?}"),
        }
    }
    let failed = failed.expect("the log outgrew its file size limit without a failure");
    assert!(acked > 0, "the first stored SENDs fit and were ACKed");
    // Every ACKed message is in the log, which never passed the limit.
    let log_bytes: u64 = std::fs::read_dir(&dir)
        .expect("data dir")
        .map(|e| e.expect("entry").metadata().expect("metadata").len())
        .sum();
    assert!(log_bytes <= LOG_LIMIT + 4096, "{log_bytes} bytes on disk");
    assert!(
        log_bytes >= acked * 1000,
        "{acked} ACKed messages of 1000 bytes, {log_bytes} bytes on disk"
    );

    // From now on: refused at once, and the relay says it is not ready.
    let next = MessageId(failed + 1);
    alice.send_frame(&Frame::send(next, UserId(9), payload.clone()).with_flags(Flags::STORED));
    let answer = alice.recv();
    assert_eq!(
        (answer.opcode, answer.msg_id, answer.error_code()),
        (Opcode::Error, next, Some(ErrorCode::StoreFailed)),
        "{answer:?}"
    );
    let (status, body) = get(admin, "/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.starts_with("the store failed: "), "{body}");
    assert_eq!(get(admin, "/healthz"), (200, "ok\n".to_string()));
    assert_eq!(value(&scrape(admin), "imrelay_store_failed", &[]), 1.0);

    // Direct messages are not the store's business.
    send_and_check(&mut alice, &mut bob, 2, 3);
    drop(relay);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A loop that does not turn (here: never started) answers no snapshot: health, readiness
/// and metrics are all 503 once the admin thread has waited its second.
#[test]
fn a_loop_that_does_not_answer_is_unhealthy() {
    let mut server = Server::bind("127.0.0.1:0".parse().unwrap(), Config::default()).expect("bind");
    let admin = server
        .set_admin("127.0.0.1:0".parse().unwrap())
        .expect("admin listener");
    for path in ["/healthz", "/readyz", "/metrics"] {
        let (status, body) = get(admin, path);
        assert_eq!(status, 503, "{path}: {body}");
    }
    assert_eq!(get(admin, "/nothing").0, 404);
    drop(server); // stops and joins the admin thread
    assert!(
        TcpStream::connect(admin).is_err(),
        "the admin listener outlived its server"
    );
}

#[test]
fn the_admin_address_must_not_be_the_client_address() {
    let addr = free_addr().to_string();
    let (status, log) = run_to_exit(&[
        "--listen",
        &addr,
        "--admin-listen",
        &addr,
        "--store",
        "memory",
    ]);
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(log.contains("--admin-listen"), "{log}");
}

// ---- a real Prometheus --------------------------------------------------------------------

fn setup_prometheus() {
    support::process::run_setup_script("admin/setup.sh", "this test needs Debian's prometheus");
}

/// A Prometheus server scraping the relay, killed (and its data removed) on drop, even
/// when the test panics.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Prometheus {
    /// Starts Prometheus on a free port, scraping `target` every second as job `imrelay`.
    fn start(target: SocketAddr) -> Prometheus {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("admin-prometheus-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("data")).expect("prometheus dir");
        let config = dir.join("prom.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: imrelay\n    scrape_interval: 1s\n    \
                 scrape_timeout: 900ms\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .expect("write prom.yml");
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("log file");
        let addr = free_addr();
        let child = Command::new("/usr/bin/prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("start /usr/bin/prometheus");
        Prometheus { child, addr, dir }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// Polls `query` (PromQL) until its first sample's value is `done`; returns it.
    fn poll_query(&mut self, query: &str, done: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + PROMETHEUS_TIMEOUT;
        let path = format!("/api/v1/query?query={}", url_encode(query));
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("prometheus exited ({status}):\n{}", self.log());
            }
            let request = format!("GET {path} HTTP/1.0\r\nHost: {}\r\n\r\n", self.addr);
            let last = match support::http_request(self.addr, &request) {
                Ok((200, body)) => {
                    let json: serde_json::Value =
                        serde_json::from_str(&body).expect("Prometheus answers JSON");
                    assert_eq!(json["status"], "success", "{body}");
                    if let Some(sample) = json["data"]["result"].get(0) {
                        let value = sample["value"][1]
                            .as_str()
                            .unwrap_or_else(|| panic!("no value in {body}"));
                        let value: f64 = value.parse().expect("a number");
                        if done(value) {
                            return value;
                        }
                    }
                    body
                }
                Ok((status, body)) => format!("{status}: {body}"),
                // Not listening yet.
                Err(e) => e.to_string(),
            };
            assert!(
                Instant::now() < deadline,
                "no sample for {query} within {PROMETHEUS_TIMEOUT:?}; last answer: {last}\n\
                 prometheus log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Percent-encodes a query parameter.
fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn a_real_prometheus_scrapes_the_relay() {
    setup_prometheus();
    let (relay, admin) = relay_with_admin();
    // Known traffic on a fresh relay: 2 logins, 4 + 3 SENDs.
    let (_a, _b) = exchange(relay.addr, 4, 3);

    let mut prometheus = Prometheus::start(admin);
    // The relay is up for Prometheus once a scrape succeeded.
    prometheus.poll_query("up{job=\"imrelay\"}", |up| up == 1.0);
    // Then the scraped counters are the test's traffic, exactly.
    let any = |_| true;
    let sends = "imrelay_frames_received_total{job=\"imrelay\",opcode=\"SEND\"}";
    assert_eq!(prometheus.poll_query(sends, any), 7.0);
    let logins = "imrelay_logins_total{job=\"imrelay\"}";
    assert_eq!(prometheus.poll_query(logins, any), 2.0);
    let deliveries = "imrelay_deliveries_total{job=\"imrelay\"}";
    assert_eq!(prometheus.poll_query(deliveries, any), 7.0);
    let turns = "imrelay_loop_turn_seconds_count{job=\"imrelay\"}";
    assert!(
        prometheus.poll_query(turns, any) > 0.0,
        "the loop turn histogram is scraped"
    );
    drop(prometheus);
    drop(relay);
}

#[test]
fn promtool_finds_nothing_wrong_with_the_exposition() {
    setup_prometheus();
    let (relay, admin) = relay_with_admin();
    let (_a, _b) = exchange(relay.addr, 2, 1);
    let (status, body) = get(admin, "/metrics");
    assert_eq!(status, 200, "{body}");
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package, tests/admin/setup.sh)");
    {
        use std::io::Write as _;
        let mut stdin = promtool.stdin.take().expect("piped stdin");
        stdin
            .write_all(body.as_bytes())
            .expect("write the exposition");
    }
    let out = promtool.wait_with_output().expect("promtool ran");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{said}"
    );
    assert!(
        said.trim().is_empty(),
        "promtool has remarks (lint):\n{said}"
    );
}
