//! Attacks on the real `imrelay` binary over real sockets, one test per attack. Each test
//! checks three things:
//!
//! - (a) memory: the relay's peak RSS (`VmHWM` of the child process) grows by less than
//!   what its flags allow ([`Target::assert_memory_within`]);
//! - (b) service: a bystander pair of ordinary clients still exchanges messages during
//!   and after the attack;
//! - (c) the attacker gets the ERROR protocol.md documents for the attack, or is closed.
//!
//! No assertion is about time. The relay answers a connection's frames in order, so a reply
//! (a PONG to a PING, an ACK, an ERROR) proves that everything sent before it was handled;
//! sleeps appear only where slowness is the attack itself. Socket read timeouts are safety
//! nets that turn a hang into a failure.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use imrelay::proto::decode::decode_frame;
use imrelay::proto::{ErrorCode, Flags, Frame, MessageId, Opcode, RoomId, UserId};
use support::process::{self, RelayProcess};
use support::{Bystanders, Client};

const MIB: u64 = 1 << 20;

/// What the relay's RSS may grow by beyond the bytes its flags bound (`--max-memory`, plus
/// `--store-max-bytes` where an attack fills the store). Stated once for every test, it
/// covers what no cap counts: allocator slack (freed memory malloc keeps in its arenas,
/// fragmentation), the relay's fixed-size bookkeeping per connection, user, inbox and
/// timer, its 64 KiB read buffer, and the code and data pages a debug binary touches for
/// the first time on the attack's paths. A leak or a buffer pinned per frame costs far
/// more: a relay that keeps frames as views into the buffers they were read into grows by
/// about 140 MiB in the pinning attack below (tried), against a bound of 40 MiB.
const RSS_ALLOWANCE: u64 = 32 * MIB;

/// The max frame of [`SMALL_CAPS`].
const MAX_FRAME: usize = 4096;

/// Small caps, so that attacks reach the limits after little traffic.
const SMALL_CAPS: &[&str] = &[
    "--max-frame",
    "4096",
    "--out-cap",
    "65536",
    "--max-memory",
    "8388608",
];

/// Read timeout of the attack tests' clients where a lot has to come back at once.
const GENEROUS_TIMEOUT: Duration = Duration::from_secs(20);

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// The bystanders' user ids; attackers use others.
const BYSTANDER_A: u64 = 1;
const BYSTANDER_B: u64 = 2;

/// The relay binary under attack, its flags, its RSS before the attack and two bystanders.
struct Target {
    relay: RelayProcess,
    flags: Vec<String>,
    baseline_rss: u64,
    bystanders: Bystanders,
}

impl Target {
    /// Starts the relay with `flags` (which must name `--max-memory`) and logs the
    /// bystanders in from 127.0.0.1.
    fn start(flags: &[&str]) -> Target {
        Target::start_with_bystanders_from(flags, LOCALHOST)
    }

    fn start_with_bystanders_from(flags: &[&str], from: IpAddr) -> Target {
        let relay = RelayProcess::start(flags);
        let bystanders = process::bystanders_at(relay.addr, from, BYSTANDER_A, BYSTANDER_B);
        let mut target = Target {
            relay,
            flags: flags.iter().map(|f| f.to_string()).collect(),
            baseline_rss: 0,
            bystanders,
        };
        target.bystanders_served();
        target.baseline_rss = target.relay.rss();
        target.flag("--max-memory"); // every attack states its memory budget
        target
    }

    /// The value of a numeric flag the relay was started with.
    fn flag(&self, name: &str) -> u64 {
        let at = self.flags.iter().position(|f| f == name);
        let value = at.and_then(|i| self.flags.get(i + 1));
        value
            .unwrap_or_else(|| panic!("the relay was started without {name}"))
            .parse()
            .unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    fn addr(&self) -> SocketAddr {
        self.relay.addr
    }

    fn connect(&self) -> Client {
        Client::connect(self.relay.addr)
    }

    fn login(&self, user: u64) -> Client {
        let mut client = self.connect();
        client.login(user);
        client
    }

    /// (b): the bystanders exchange a message each way, and the relay process is alive.
    /// (Like [`Bystanders::still_served`], but the sender's answer is read first, so a
    /// refusal fails with the ERROR instead of a timeout on the recipient.)
    fn bystanders_served(&mut self) {
        assert!(self.relay.is_running(), "the relay exited");
        let Bystanders { a, b, .. } = &mut self.bystanders;
        one_way(a, b, BYSTANDER_A, BYSTANDER_B);
        one_way(b, a, BYSTANDER_B, BYSTANDER_A);
    }

    /// (a): the relay's peak RSS since it started exceeds its RSS before the attack by less
    /// than `bound` bytes.
    fn assert_memory_within(&self, bound: u64) {
        let peak = self.relay.peak_rss();
        let growth = peak.saturating_sub(self.baseline_rss);
        eprintln!(
            "RSS before the attack {} KiB, peak {} KiB: growth {} KiB, bound {} KiB",
            self.baseline_rss >> 10,
            peak >> 10,
            growth >> 10,
            bound >> 10
        );
        assert!(
            growth < bound,
            "the relay's RSS grew by {growth} bytes under attack, past the bound of {bound} \
             (before {} bytes, peak {peak})",
            self.baseline_rss
        );
    }

    /// (a) with the usual bound: the memory budget plus the allowance.
    fn assert_memory_bounded(&self) {
        self.assert_memory_within(self.flag("--max-memory") + RSS_ALLOWANCE);
    }
}

/// `from` (user `from_user`) sends `to` (user `to_user`) a message: ACKed, delivered.
fn one_way(from: &mut Client, to: &mut Client, from_user: u64, to_user: u64) {
    let id = from.send(to_user, b"still there?");
    let ack = from.recv();
    assert_eq!(
        (ack.opcode, ack.msg_id),
        (Opcode::Ack, id),
        "a bystander's SEND: {ack:?}"
    );
    let got = to.recv();
    assert_eq!(
        (got.opcode, got.msg_id, got.source),
        (Opcode::Deliver, id, UserId(from_user)),
        "{got:?}"
    );
}

/// A text-mode client (protocol.md, section 12), as `nc` would be.
struct TextClient {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl TextClient {
    fn connect(addr: SocketAddr) -> TextClient {
        let stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(support::SAFETY_TIMEOUT))
            .unwrap();
        stream.set_nodelay(true).unwrap();
        TextClient {
            stream,
            buf: Vec::new(),
        }
    }

    fn login(addr: SocketAddr, user: u64) -> TextClient {
        let mut client = TextClient::connect(addr);
        client.write(format!("login {user}\n").as_bytes());
        assert_eq!(
            client.read_line().as_deref(),
            Some(&*format!("OK LOGIN {user}"))
        );
        client
    }

    fn write(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write");
    }

    /// The next line without its line end; `None` once the relay closed the connection.
    fn read_line(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                let line = String::from_utf8(line).expect("the relay sends UTF-8 lines");
                return Some(line.trim_end().to_string());
            }
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return None,
                Err(e) => panic!("read failed (safety timeout?): {e}"),
            }
        }
    }

    /// The next line must be the error `code` (`ERR <CODE_NAME> ...`).
    fn expect_error(&mut self, code: ErrorCode) -> String {
        let line = self.read_line().expect("the relay closed before the error");
        let prefix = format!("ERR {} ", code.name());
        assert!(
            line.starts_with(&prefix),
            "expected {prefix:?}, got {line:?}"
        );
        line
    }

    fn expect_closed(&mut self) {
        if let Some(line) = self.read_line() {
            panic!("expected the connection to close, got {line:?}");
        }
    }
}

/// Writes bytes one at a time, `every` apart, on its own thread, until they are all out,
/// the socket fails (the relay closed it), or it is dropped.
struct Trickle {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Trickle {
    fn start(mut stream: TcpStream, bytes: Vec<u8>, every: Duration) -> Trickle {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            for byte in bytes {
                // The pause between bytes is the attack, not a synchronisation.
                std::thread::sleep(every);
                if stopped.load(Ordering::SeqCst) || stream.write_all(&[byte]).is_err() {
                    return;
                }
            }
        });
        Trickle {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Trickle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Encodes `frame` onto `out`.
fn encode(out: &mut BytesMut, frame: &Frame) {
    frame.encode(out);
}

// ---- 1. memory pinning -------------------------------------------------------------------

/// A client whose socket takes little: a 4 KiB receive buffer and 536-byte segments, so the
/// relay's send buffer toward it stays small too (Linux sizes a send buffer from the peer's
/// segment size: toward a loopback peer with 64 KiB segments it starts at about 2.5 MiB).
/// A recipient that never reads then fills the relay's own queue after a few thousand
/// small frames rather than tens of thousands.
fn narrow_client(addr: SocketAddr) -> Client {
    use std::os::fd::AsRawFd;
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let mss: libc::c_int = 536;
    // SAFETY: a valid socket and a c_int option value of the stated size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_MAXSEG,
            (&mss as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "TCP_MAXSEG: {}", std::io::Error::last_os_error());
    socket.connect(&addr.into()).expect("connect");
    let stream: TcpStream = socket.into();
    stream
        .set_read_timeout(Some(support::SAFETY_TIMEOUT))
        .unwrap();
    stream.set_nodelay(true).unwrap();
    process::client_over(stream)
}

/// Recipients that log in and never read, and a sender that gives each of them small
/// SENDs, each in a batch with 14 max-size SENDs to an offline user and a PING: 56 KiB,
/// one read of the relay's (the sender waits for the PONG before the next batch). A relay
/// that kept a small frame as a view into the buffer it was read into would pin those
/// 56 KiB per queued frame: 585 frames per recipient before its queue is at the cap
/// (65,536 / (48 + 64)), 4 recipients, about 130 MiB. One that copies frames out holds
/// their bytes only.
/// The queue stops at the output cap: the sender hears RECIPIENT_SLOW, and every ACKed
/// message is delivered once the recipient reads.
#[test]
fn small_frames_queued_next_to_large_ones_pin_nothing() {
    let mut t = Target::start(SMALL_CAPS);
    let sleepers: Vec<u64> = (10..14).collect();
    let mut sleeping: Vec<Client> = sleepers
        .iter()
        .map(|&u| {
            let mut c = narrow_client(t.addr());
            c.login(u);
            c
        })
        .collect();
    let mut alice = t.login(20);
    let large_payload = Bytes::from(vec![0xee; MAX_FRAME - 32]);
    const LARGE_PER_BATCH: usize = 14;
    let mut acked: Vec<Vec<MessageId>> = vec![Vec::new(); sleepers.len()];
    let mut batches = 0usize;
    for (i, &sleeper) in sleepers.iter().enumerate() {
        let mut slow = false;
        while !slow {
            let mut batch = BytesMut::new();
            let small = alice.next_id();
            let tiny = Bytes::from_static(b"tiny but pinned?");
            encode(&mut batch, &Frame::send(small, UserId(sleeper), tiny));
            let first_large = alice.next_id().0;
            for k in 0..LARGE_PER_BATCH as u64 {
                let id = MessageId(first_large + k);
                encode(
                    &mut batch,
                    &Frame::send(id, UserId(999), large_payload.clone()),
                );
                alice.next_id();
            }
            let ping = alice.next_id();
            encode(&mut batch, &Frame::ping(ping, Bytes::new()));
            alice.send_raw(&batch);
            let reply = alice.recv();
            assert_eq!(reply.msg_id, small, "{reply:?}");
            match reply.opcode {
                Opcode::Ack => acked[i].push(small),
                _ => {
                    assert_eq!(
                        reply.error_code(),
                        Some(ErrorCode::RecipientSlow),
                        "{reply:?}"
                    );
                    slow = true;
                }
            }
            for k in 0..LARGE_PER_BATCH as u64 {
                let reply = alice.recv();
                assert_eq!(
                    (reply.msg_id, reply.error_code()),
                    (
                        MessageId(first_large + k),
                        Some(ErrorCode::RecipientOffline)
                    )
                );
            }
            let reply = alice.recv();
            assert_eq!((reply.opcode, reply.msg_id), (Opcode::Pong, ping));
            batches += 1;
            assert!(batches < 50_000, "the relay never pushed back on {sleeper}");
        }
        if i == 1 {
            t.bystanders_served(); // in the middle of the attack
        }
    }
    let queued: Vec<usize> = acked.iter().map(Vec::len).collect();
    eprintln!("{batches} batches; ACKed per sleeper: {queued:?}");
    t.bystanders_served();
    t.assert_memory_bounded();

    // The sleepers wake up: every ACKed message is there, in order, and nothing else.
    for (client, ids) in sleeping.iter_mut().zip(&acked) {
        client
            .stream
            .set_read_timeout(Some(GENEROUS_TIMEOUT))
            .unwrap();
        for id in ids {
            let got = client.recv();
            assert_eq!(
                (got.opcode, got.msg_id, got.source),
                (Opcode::Deliver, *id, UserId(20))
            );
        }
        client.round_trip();
    }
    // The queues drained: the sender is accepted again.
    let id = alice.send(sleepers[0], b"after the jam");
    let reply = alice.recv();
    assert_eq!((reply.opcode, reply.msg_id), (Opcode::Ack, id));
    t.bystanders_served();
}

// ---- 2. slow partial frames --------------------------------------------------------------

/// Flags for the slow-frame attacks: a 1 s frame timeout.
const SLOW_FLAGS: &[&str] = &[
    "--max-frame",
    "4096",
    "--out-cap",
    "65536",
    "--max-memory",
    "8388608",
    "--frame-timeout",
    "1",
];

/// How often the slow attacks send one more byte: well within any idle timeout, so only
/// the frame timeout can stop them.
const TRICKLE_EVERY: Duration = Duration::from_millis(300);

/// A logged-in client sends the start of a SEND, then one byte every 0.3 s: it is closed
/// with FRAME_TIMEOUT once the frame is 1 s old, however steadily the bytes keep coming.
#[test]
fn a_binary_frame_trickled_in_times_out() {
    let mut t = Target::start(SLOW_FLAGS);
    let mut slow = t.login(30);
    let frame = Frame::send(
        MessageId(7),
        UserId(BYSTANDER_B),
        Bytes::from(vec![b's'; 500]),
    );
    let bytes = frame.to_bytes();
    slow.send_raw(&bytes[..10]);
    let trickle = Trickle::start(
        slow.stream.try_clone().unwrap(),
        bytes[10..].to_vec(),
        TRICKLE_EVERY,
    );
    t.bystanders_served(); // while the partial frame is held
    let error = slow.expect_error(ErrorCode::FrameTimeout);
    assert_eq!(error.msg_id, MessageId(0));
    slow.expect_closed();
    drop(trickle);
    // Nothing of the partial SEND reached its recipient: bystander B's next frame is the
    // bystanders' own message.
    t.bystanders_served();
    t.assert_memory_bounded();
}

/// The same with a text-mode line trickled in.
#[test]
fn a_text_line_trickled_in_times_out() {
    let mut t = Target::start(SLOW_FLAGS);
    let mut slow = TextClient::login(t.addr(), 31);
    let line = format!("send {BYSTANDER_B} {}\n", "s".repeat(500));
    slow.write(&line.as_bytes()[..8]);
    let trickle = Trickle::start(
        slow.stream.try_clone().unwrap(),
        line.as_bytes()[8..].to_vec(),
        TRICKLE_EVERY,
    );
    t.bystanders_served();
    slow.expect_error(ErrorCode::FrameTimeout);
    slow.expect_closed();
    drop(trickle);
    t.bystanders_served();
    t.assert_memory_bounded();
}

// ---- 3. many partial frames --------------------------------------------------------------

/// 200 logged-in connections each send the header of a max-size frame and part of its body,
/// against a memory budget with room for 73 such frames. The partial frames the budget has
/// no room for get LIMIT_REACHED and are closed; the others are held (and get MALFORMED
/// when their sender gives up half-way); the budget is free again afterwards.
#[test]
fn partial_frames_past_the_memory_budget_are_refused() {
    // 73 max-size frames fit (73 * 4096 = 299,008), leaving room for the bystanders'
    // messages (a 44-byte frame is charged 108) while the attack holds the rest: a budget
    // full of partial input refuses every SEND with RECIPIENT_SLOW (protocol.md, section 7).
    let mut t = Target::start(&[
        "--max-frame",
        "4096",
        "--out-cap",
        "65536",
        "--max-memory",
        "300000",
    ]);
    let budget = t.flag("--max-memory") as usize;
    let fit = budget / MAX_FRAME;
    const ATTACKERS: usize = 200;
    let mut attackers: Vec<Client> = (0..ATTACKERS).map(|i| t.login(100 + i as u64)).collect();
    let header = Frame::ping(MessageId(9), Bytes::from(vec![0xab; MAX_FRAME - 32])).to_bytes();
    for attacker in &mut attackers {
        // Header and a quarter of the body: the relay must reserve the declared length.
        attacker.send_raw(&header[..1032]);
        // A bystander's PING answered after it: on loopback the attacker's bytes were in
        // the relay's socket (and its readiness reported) before the PING was sent, so the
        // relay has taken them, and flushed any ERROR they earned, by the PONG. Each
        // partial frame therefore meets the budget as the ones before it left it.
        t.bystanders.a.round_trip();
    }
    t.bystanders_served(); // while the budget is full of partial frames

    let (mut refused, mut held) = (0, 0);
    for attacker in &mut attackers {
        // Giving up half-way: a held partial frame is MALFORMED at end of stream.
        let _ = attacker.stream.shutdown(Shutdown::Write);
        let error = attacker.recv();
        match error.error_code() {
            Some(ErrorCode::LimitReached) => refused += 1,
            Some(ErrorCode::Malformed) => held += 1,
            _ => panic!("expected LIMIT_REACHED or MALFORMED, got {error:?}"),
        }
        attacker.expect_closed();
    }
    eprintln!("{held} partial frames held, {refused} refused");
    assert_eq!(held, fit, "held partial frames; {fit} fit the budget");
    assert_eq!(refused, ATTACKERS - fit);
    t.bystanders_served();
    t.assert_memory_bounded();

    // Everything held was freed: a partial max-size frame fits the budget again (the round
    // trip makes the relay take the first part on its own, as above).
    let mut c = t.login(99);
    c.send_raw(&header[..1032]);
    t.bystanders.a.round_trip();
    c.send_raw(&header[1032..]);
    let pong = c.recv();
    assert_eq!(
        (pong.opcode, pong.payload.len()),
        (Opcode::Pong, MAX_FRAME - 32)
    );
}

// ---- 4. connections per address ----------------------------------------------------------

/// With `--max-connections-per-ip 5 --limit-loopback`, the 6th connection from 127.0.0.1
/// gets LIMIT_REACHED and is closed; 127.0.0.2 is another address with its own count, and a
/// slot freed on 127.0.0.1 is taken again.
#[test]
fn connections_per_address_are_limited() {
    let mut flags = SMALL_CAPS.to_vec();
    flags.extend(["--max-connections-per-ip", "5", "--limit-loopback"]);
    // The bystanders come from a third address, so they do not count against 127.0.0.1.
    let other = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));
    let mut t = Target::start_with_bystanders_from(&flags, other);
    let mut five: Vec<Client> = (0..5).map(|i| t.login(40 + i)).collect();
    for _ in 0..3 {
        let mut sixth = t.connect();
        let error = sixth.expect_error(ErrorCode::LimitReached);
        assert_eq!(error.msg_id, MessageId(0));
        sixth.expect_closed();
    }
    let second_host = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    let mut elsewhere = process::client_over(process::connect_from(t.addr(), second_host));
    elsewhere.login(50);
    elsewhere.round_trip();
    t.bystanders_served();

    // One of the five leaves; its slot is free once the relay has closed it.
    five[0].send_frame(&Frame::bye(MessageId(1)));
    assert_eq!(five[0].recv().opcode, Opcode::Bye);
    five[0].expect_closed();
    let mut newcomer = t.login(45);
    newcomer.round_trip();
    let mut sixth = t.connect();
    sixth.expect_error(ErrorCode::LimitReached);
    sixth.expect_closed();
    for client in &mut five[1..] {
        client.round_trip();
    }
    t.bystanders_served();
    t.assert_memory_bounded();
}

// ---- 5. text lines past the max frame ----------------------------------------------------

/// With `--max-frame 1024`: a 5,000-byte `send` line gets FRAME_TOO_LARGE and is closed; a
/// line of exactly 1,024 bytes, sent in two writes, is not too long itself but the SEND it
/// becomes is (32 + 1,016 bytes): FRAME_TOO_LARGE too. The recipient gets neither.
#[test]
fn text_lines_whose_frame_exceeds_the_max_frame_are_refused() {
    let mut t = Target::start(&[
        "--max-frame",
        "1024",
        "--out-cap",
        "65536",
        "--max-memory",
        "8388608",
    ]);
    let max_frame = t.flag("--max-frame") as usize;
    let mut recipient = t.login(41);

    let mut long = TextClient::login(t.addr(), 42);
    let line = format!("send 41 {}\n", "x".repeat(5000 - 9));
    assert_eq!(line.len(), 5000);
    long.write(line.as_bytes());
    long.expect_error(ErrorCode::FrameTooLarge);
    long.expect_closed();
    recipient.round_trip(); // its next frame is the PONG: nothing was delivered

    let mut exact = TextClient::login(t.addr(), 43);
    let text = format!("send 41 {}", "y".repeat(max_frame - 8));
    assert_eq!(text.len(), max_frame);
    exact.write(&text.as_bytes()[..600]);
    exact.write(format!("{}\n", &text[600..]).as_bytes());
    let error = exact.expect_error(ErrorCode::FrameTooLarge);
    assert!(error.contains("1048-byte frame"), "{error}");
    exact.expect_closed();
    recipient.round_trip();

    // The boundary: a line whose SEND is exactly the max frame goes through.
    let mut fits = TextClient::login(t.addr(), 44);
    let payload = "z".repeat(max_frame - 32);
    fits.write(format!("send 41 {payload}\n").as_bytes());
    let got = recipient.recv();
    assert_eq!(
        (got.opcode, got.payload.len()),
        (Opcode::Deliver, max_frame - 32)
    );
    assert_eq!(
        fits.read_line().as_deref(),
        Some(&*format!("ACK {} 1", got.msg_id.0))
    );

    t.bystanders_served();
    t.assert_memory_bounded();
}

// ---- 6. paused reads resume --------------------------------------------------------------

/// A client pipelines 1,000 PINGs with 1 KiB payloads and reads nothing until it has
/// written them all, then reads: every PONG arrives, in order.
///
/// The relay must have paused its reads on the way: the PONGs (1,000 charged 1,120 bytes
/// each) are far more than its queue (the 256 KiB cap, overshot by at most one 64 KiB read
/// of PINGs) and the socket buffers toward the client hold. The client's socket is narrow
/// ([`narrow_client`]) so the latter are a few dozen KiB, not megabytes. So when the client
/// starts reading, the relay is paused with PINGs waiting in its socket, and no new bytes
/// (no new readiness event) will come to wake it: it must resume on its own as its queue
/// drains. A missed wakeup stalls the client (the read timeout is only a safety net).
#[test]
fn paused_reads_resume_when_the_reader_drains() {
    let mut t = Target::start(&[
        "--max-frame",
        "4096",
        "--out-cap",
        "262144",
        "--max-memory",
        "8388608",
    ]);
    let mut flooder = narrow_client(t.addr());
    flooder.login(50);
    flooder
        .stream
        .set_read_timeout(Some(GENEROUS_TIMEOUT))
        .unwrap();
    const PINGS: u64 = 1000;
    let payload = |i: u64| Bytes::from(vec![i as u8; 1024]);
    let mut pings = BytesMut::new();
    for i in 1..=PINGS {
        encode(&mut pings, &Frame::ping(MessageId(i), payload(i)));
    }
    let mut writer = flooder.stream.try_clone().unwrap();
    let (done, written) = mpsc::channel();
    let thread = std::thread::spawn(move || {
        writer.write_all(&pings).expect("write the PINGs");
        let _ = done.send(());
    });
    // The signal is the writer's end; the timeout only keeps a failure from hanging (the
    // kernel buffers the unread PINGs: the relay's receive buffer grows as it reads).
    let all_written = written.recv_timeout(GENEROUS_TIMEOUT).is_ok();
    assert!(
        all_written,
        "the PINGs could not all be written without reading"
    );
    thread.join().unwrap();
    t.bystanders_served(); // while the flooder's reads are paused
    for i in 1..=PINGS {
        let pong = flooder.recv_or(|| format!("waiting for PONG {i} of {PINGS}"));
        assert_eq!((pong.opcode, pong.msg_id), (Opcode::Pong, MessageId(i)));
        assert_eq!(pong.payload, payload(i));
    }
    flooder.round_trip();
    t.bystanders_served();
    t.assert_memory_bounded();
}

// ---- 7. many chosen user ids -------------------------------------------------------------

/// One client sends 20,000 STORED SENDs (with DEDUP, msg ids chosen the same way), then
/// 20,000 plain SENDs, to user ids that are all multiples of 2^32: ids that collide in every
/// bucket of a table hashed by its low bits. Each is answered (ACK, then RECIPIENT_OFFLINE);
/// the stored messages are all there; the relay stays within its budget plus its store's.
#[test]
fn twenty_thousand_chosen_user_ids_do_not_degrade_the_relay() {
    let mut flags = SMALL_CAPS.to_vec();
    flags.extend([
        // 20,000 one-message inboxes: 20,000 x (119 + 320) bytes as the store counts them.
        "--store-max-bytes",
        "16777216",
        "--store-max-users",
        "100000",
    ]);
    let mut t = Target::start(&flags);
    let mut attacker = t.login(60);
    attacker
        .stream
        .set_read_timeout(Some(GENEROUS_TIMEOUT))
        .unwrap();
    const IDS: u64 = 20_000;
    const BATCH: u64 = 250;
    let chosen = |k: u64| (k + 1) << 32;
    let stored = Flags::STORED.union(Flags::DEDUP);
    for (flags, expect) in [
        (stored, None),
        (Flags::EMPTY, Some(ErrorCode::RecipientOffline)),
    ] {
        for start in (0..IDS).step_by(BATCH as usize) {
            let mut batch = BytesMut::new();
            for k in start..start + BATCH {
                let frame = Frame::send(
                    MessageId(chosen(k)),
                    UserId(chosen(k)),
                    Bytes::from_static(b"collide"),
                );
                encode(&mut batch, &frame.with_flags(flags));
            }
            // A PING after each batch: an accepted frame, as a working client's traffic
            // has, so 20,000 refused SENDs do not trip the refused-in-a-row limit (1,024,
            // tested in src/relay/tests/hostile.rs); this test is about the hash maps.
            encode(&mut batch, &Frame::ping(MessageId(1), Bytes::new()));
            attacker.send_raw(&batch);
            for k in start..start + BATCH {
                let reply = attacker.recv();
                assert_eq!(
                    (reply.msg_id, reply.target),
                    (MessageId(chosen(k)), UserId(chosen(k)))
                );
                match expect {
                    None => assert_eq!(
                        (reply.opcode, reply.ack_count()),
                        (Opcode::Ack, Some(0)),
                        "{reply:?}"
                    ),
                    Some(code) => assert_eq!(reply.error_code(), Some(code), "{reply:?}"),
                }
            }
            assert_eq!(attacker.recv().opcode, Opcode::Pong);
            if start == IDS / 2 {
                t.bystanders_served();
            }
        }
    }
    t.bystanders_served();
    t.assert_memory_within(t.flag("--max-memory") + t.flag("--store-max-bytes") + RSS_ALLOWANCE);

    // The inboxes are all told apart: a few of the users find exactly their message.
    for k in [0, IDS / 2, IDS - 1] {
        let mut user = t.login(chosen(k));
        user.send_frame(&Frame::inbox_sync(MessageId(1), 0, 0));
        let state = user.recv().inbox_state().expect("INBOX_STATE");
        assert_eq!(
            state.last_seq,
            state.first_seq,
            "one message for {}",
            chosen(k)
        );
        let got = user.recv();
        let (seq, _, body) = got.inbox_deliver().expect("INBOX_DELIVER");
        assert_eq!(
            (seq, &body[..], got.msg_id, got.source),
            (
                state.first_seq,
                &b"collide"[..],
                MessageId(chosen(k)),
                UserId(60)
            )
        );
        user.round_trip();
    }
}

// ---- 8. room flood -----------------------------------------------------------------------

/// Four members flood one room (no per-connection rate; the room takes 100 frames/s with a
/// burst of 200): past the room's budget each flooder gets RATE_LIMITED, the room never
/// takes more than its rate allows, and the bystanders still exchange direct messages and
/// use a room of their own.
#[test]
fn a_room_flood_is_rate_limited_for_the_room() {
    let mut flags = SMALL_CAPS.to_vec();
    flags.extend([
        "--room-total-rate",
        "100",
        "--room-total-burst",
        "200",
        "--room-rate",
        "0",
    ]);
    let mut t = Target::start(&flags);
    let (rate, burst) = (t.flag("--room-total-rate"), t.flag("--room-total-burst"));
    const ROOM: u64 = 9;
    let mut flooders: Vec<Client> = (70..74).map(|u| t.login(u)).collect();
    for f in &mut flooders {
        f.join(ROOM);
    }
    let mut limited = vec![0u64; flooders.len()];
    let mut accepted = 0u64;
    let mut sent = 0u64;
    const PER_TURN: usize = 25;
    let began = Instant::now();
    // Rounds of 25 ROOM_SENDs from each flooder, until every flooder has been refused (and
    // at least 4 rounds: 400 frames, twice the burst).
    let mut rounds = 0;
    while rounds < 4 || limited.contains(&0) {
        for (i, f) in flooders.iter_mut().enumerate() {
            let mut batch = BytesMut::new();
            let mut ids = Vec::new();
            for _ in 0..PER_TURN {
                let id = f.next_id();
                let payload = Bytes::from_static(b"flood!");
                encode(&mut batch, &Frame::room_send(id, RoomId(ROOM), payload));
                ids.push(id);
            }
            f.send_raw(&batch);
            sent += PER_TURN as u64;
            let mut answered = 0;
            while answered < PER_TURN {
                let reply = f.recv();
                match reply.opcode {
                    // The other flooders' traffic, or what this member missed of it.
                    Opcode::RoomDeliver | Opcode::RoomMissed => continue,
                    Opcode::Ack => accepted += 1,
                    _ => {
                        assert_eq!(
                            reply.error_code(),
                            Some(ErrorCode::RateLimited),
                            "{reply:?}"
                        );
                        limited[i] += 1;
                    }
                }
                assert_eq!(reply.msg_id, ids[answered]);
                answered += 1;
            }
        }
        rounds += 1;
        if rounds == 2 {
            t.bystanders_served(); // during the flood, its burst used up
        }
        assert!(sent < 100_000, "the room never pushed back");
    }
    // The room's budget over the whole flood: its burst, plus its rate for as long as the
    // flood lasted (measured here, around all of it: an upper bound, not a timing check).
    let lasted = began.elapsed().as_secs_f64();
    let allowed = burst + (rate as f64 * lasted).ceil() as u64;
    eprintln!("{sent} sent, {accepted} accepted in {lasted:.2} s (at most {allowed}), limited {limited:?}");
    assert!(
        accepted >= burst,
        "{accepted} accepted: less than the burst"
    );
    assert!(
        accepted <= allowed,
        "{accepted} accepted, more than the room's {allowed}"
    );
    t.bystanders_served();

    // The limit is the flooded room's: the bystanders' own room is not affected.
    let (a, b) = (&mut t.bystanders.a, &mut t.bystanders.b);
    a.join(10);
    b.join(10);
    let id = a.next_id();
    a.send_frame(&Frame::room_send(
        id,
        RoomId(10),
        Bytes::from_static(b"quiet room"),
    ));
    let ack = a.recv();
    assert_eq!(
        (ack.opcode, ack.msg_id, ack.ack_count()),
        (Opcode::Ack, id, Some(1))
    );
    let got = b.recv();
    assert_eq!((got.opcode, got.msg_id), (Opcode::RoomDeliver, id));
    t.assert_memory_bounded();
}

// ---- 9. garbage ----------------------------------------------------------------------------

/// True when `answer` holds an error in the codec the first byte chose (protocol.md,
/// section 2): an ERROR frame (binary), an `ERR` line (text), a 4xx status (HTTP). Also
/// checks that what the relay sent is well formed in that codec.
fn answer_has_error(sent: &[u8], answer: &[u8]) -> bool {
    if sent.starts_with(b"GET ") {
        return answer.starts_with(b"HTTP/1.1 4");
    }
    if sent[0].is_ascii_alphabetic() {
        let text = std::str::from_utf8(answer).expect("text mode answers in UTF-8");
        return text.lines().any(|l| l.starts_with("ERR "));
    }
    let mut buf = BytesMut::from(answer);
    let mut error = false;
    while let Some(frame) = decode_frame(&mut buf, u32::MAX).expect("the relay's framing") {
        let frame = frame.expect("a known opcode");
        error |= frame.opcode == Opcode::Error;
    }
    assert!(buf.is_empty(), "a cut-off frame from the relay");
    error
}

/// Text-mode garbage that gets past the line parser now and then: command words, numbers
/// and junk, in random lines, logged in (as user 9) or not. No bystander's id is a word.
fn random_text(rng: &mut imrelay::rand::Rng, len: usize, logged_in: bool) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "login",
        "send",
        "join",
        "leave",
        "info",
        "room",
        "broadcast",
        "store",
        "sync",
        "sack",
        "ping",
        "pong",
        "help",
        "0",
        "3",
        "9",
        "42",
        "18446744073709551615",
        "-1",
        "\u{0}",
        "\t",
        "\r",
        "é",
        "x",
    ];
    let mut out = Vec::with_capacity(len + 32);
    if logged_in {
        out.extend_from_slice(b"login 9\n");
    }
    out.push(b'a' + (rng.next_u64() % 26) as u8);
    while out.len() < len {
        match rng.next_u64() % 8 {
            0 => out.push(b'\n'),
            1 => out.extend((0..rng.next_u64() % 64).map(|_| b'!' + (rng.next_u64() % 94) as u8)),
            _ => {
                out.extend_from_slice(
                    WORDS[(rng.next_u64() % WORDS.len() as u64) as usize].as_bytes(),
                );
                out.push(b' ');
            }
        }
    }
    out
}

/// Connections send random bytes (seeded, so every run sends the same), starting in each
/// codec's way: a zero byte and a plausible header (binary), a letter (text, raw bytes or
/// command words), `GET ` (HTTP), anything. Each then ends its stream. Each is closed (it
/// may not be left waiting), every one but the command-word ones gets an error in its
/// codec, the relay stays up and serves the bystanders.
#[test]
fn random_garbage_gets_errors_and_closes() {
    let mut t = Target::start(SMALL_CAPS);
    let mut rng = imrelay::rand::Rng::seeded(0x5eed_0bad_f00d);
    const CONNECTIONS: usize = 25;
    let mut victims = Vec::new();
    for i in 0..CONNECTIONS {
        let len = 1 + (rng.next_u64() % 10_000) as usize;
        let mut garbage: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        match i % 5 {
            0 => {
                // A header that passes the length and version checks, random after that.
                let declared = 32 + (rng.next_u64() % (MAX_FRAME as u64 - 31)) as u32;
                garbage.splice(0..0, declared.to_be_bytes().into_iter().chain([1]));
            }
            1 => garbage.insert(0, b'a' + (rng.next_u64() % 26) as u8),
            2 => {
                garbage.splice(0..0, *b"GET ");
            }
            3 => garbage = random_text(&mut rng, len, i % 2 == 1),
            _ => {}
        }
        let mut stream = TcpStream::connect(t.addr()).expect("connect");
        stream
            .set_read_timeout(Some(support::SAFETY_TIMEOUT))
            .unwrap();
        // The relay may close before it has read it all: a failed write is part of the game.
        let _ = stream.write_all(&garbage);
        let _ = stream.shutdown(Shutdown::Write);
        victims.push((i, stream, garbage));
    }
    t.bystanders_served();
    for (i, stream, garbage) in &mut victims {
        let answer = support::read_until_closed(stream, true);
        let words = *i % 5 == 3;
        assert!(
            answer_has_error(garbage, &answer) || words,
            "connection {i} ({} bytes starting {:02x?}) got no error: {:?}",
            garbage.len(),
            &garbage[..garbage.len().min(8)],
            String::from_utf8_lossy(&answer[..answer.len().min(300)])
        );
    }
    t.bystanders_served();
    t.assert_memory_bounded();
}
