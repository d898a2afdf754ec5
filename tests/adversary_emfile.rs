//! The real `imrelay` binary out of file descriptors, over real sockets.
//!
//! The relay sets its connection limit to its fd limit minus `RESERVED_FDS` (32), so
//! connections alone meet that limit first, and the relay core refuses them (another path,
//! tested in tests/e2e_limits.rs). Here the relay starts with a low fd limit and with
//! descriptors it inherited and never closes, as if something else in the process held
//! them: it runs out of descriptors well below its connection limit, and accept(2) fails
//! with EMFILE. Then, per protocol.md (section 6, code 8) and the module doc of
//! src/server/mod.rs, the accept loop gives up its reserve descriptor to take the waiting
//! connection, sends it ERROR LIMIT_REACHED and closes it, so the backlog never stalls;
//! the connections already accepted are served as before; freed descriptors are used to
//! accept again.
//!
//! Each test checks that (1) a connection that arrives while the relay is out of
//! descriptors gets ERROR LIMIT_REACHED and then EOF, (2) connections waiting in the listen
//! backlog all get an answer with no later connection arriving to wake the relay, and those
//! the freed descriptors have room for are served, (3) a bystander pair logged in before
//! the attack exchanges messages during and after it, and (4) the relay process is still
//! running at the end.
//!
//! As in tests/adversary.rs, no assertion is about time and no sleep stands in for
//! synchronisation. A reply proves that everything sent before it was handled. A client
//! that shuts down its write side sees EOF only once the relay has closed its socket, which
//! proves the relay's descriptor is free. To queue several connections in the listen
//! backlog behind one readiness event, a test stops the relay with SIGSTOP (waitpid says
//! when it has stopped), connects them (the kernel completes the handshakes), and resumes
//! it with SIGCONT. Socket read timeouts are only safety nets.

mod support;

use std::io::{ErrorKind, Read};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use bytes::BytesMut;
use imrelay::proto::decode::decode_frame;
use imrelay::proto::{ErrorCode, Frame, Opcode, UserId};
use imrelay::server::RESERVED_FDS;
use support::process::{self, RelayProcess};
use support::{Bystanders, Client, SAFETY_TIMEOUT};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// The bystanders' user ids; every other connection logs in as another user.
const BYSTANDER_A: u64 = 1;
const BYSTANDER_B: u64 = 2;

/// Descriptors the relay inherits (`/dev/null`, opened without close-on-exec) and never
/// closes: they stand for whatever else holds descriptors in a real process. More than the
/// 32 the relay keeps out of its connection limit, so it runs out of descriptors first.
const INHERITED_FDS: usize = 64;

/// How many descriptors the relay's fd limit leaves above the inherited ones: room for its
/// own few (poller, listener, waker, reserve, signal pipe) and a few dozen connections.
const HEADROOM_FDS: libc::rlim_t = 48;

/// The binary with a low fd limit, and what it announced at start.
struct StarvedRelay {
    relay: RelayProcess,
    /// Its fd limit (soft and hard), as it logged it.
    fd_limit: u64,
    /// Its connection limit (`up to N connections`), as it logged it.
    max_connections: usize,
    bystanders: Bystanders,
}

impl StarvedRelay {
    /// Starts the binary with [`INHERITED_FDS`] inherited descriptors and an fd limit
    /// [`HEADROOM_FDS`] above the highest of them, then logs the bystanders in.
    fn start() -> StarvedRelay {
        let mut command = Command::new(env!("CARGO_BIN_EXE_imrelay"));
        command
            .args(["--listen", "127.0.0.1:0", "--store", "memory"])
            // No PING from the relay while a test reads a connection to its EOF.
            .args(["--ping-interval", "600", "--idle-timeout", "1200"])
            .args(["--login-timeout", "600", "--stats-interval", "0"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: the closure runs in the child between fork and exec, and makes only
        // async-signal-safe calls (open, setrlimit) without allocating.
        unsafe { command.pre_exec(hold_descriptors_and_lower_the_limit) };
        let mut child = command.spawn().expect("start imrelay");

        // "imrelay listening on 127.0.0.1:PORT (fd limit L: up to N connections)".
        let line = process::wait_until_listening(&mut child);
        let field = |before: &str, after: &str| -> String {
            let start = line.find(before).map(|i| i + before.len());
            let start = start.unwrap_or_else(|| panic!("no {before:?} in {line:?}"));
            let len = line[start..].find(after);
            let len = len.unwrap_or_else(|| panic!("no {after:?} in {line:?}"));
            line[start..start + len].to_string()
        };
        let addr: SocketAddr = field("listening on ", " ").parse().expect("address");
        let fd_limit: u64 = field("fd limit ", ":").parse().expect("fd limit");
        let max_connections: usize = field("up to ", " connections").parse().expect("limit");
        let relay = RelayProcess { child, addr };
        assert!(
            max_connections as u64 + RESERVED_FDS == fd_limit && fd_limit < 1024,
            "the relay should have taken the low fd limit: {line:?}"
        );

        let bystanders = process::bystanders_at(addr, LOCALHOST, BYSTANDER_A, BYSTANDER_B);
        let mut starved = StarvedRelay {
            relay,
            fd_limit,
            max_connections,
            bystanders,
        };
        starved.bystanders_served();
        starved
    }

    fn addr(&self) -> SocketAddr {
        self.relay.addr
    }

    /// (3) and (4): the bystanders exchange a message each way, and the relay is running.
    fn bystanders_served(&mut self) {
        assert!(self.relay.is_running(), "the relay exited");
        self.bystanders.still_served();
    }

    /// Opens connections, each logged in as its own user, until the relay refuses one;
    /// returns the accepted ones (held open) and the refusal. Asserts that the refusal came
    /// from running out of descriptors, not from the relay's connection limit.
    fn exhaust(&mut self, first_user: u64) -> Vec<Client> {
        let mut held: Vec<Client> = Vec::new();
        let refusal = loop {
            assert!(
                held.len() < self.max_connections,
                "{} connections accepted and still no refusal: the relay never ran out of \
                 descriptors (fd limit {})",
                held.len(),
                self.fd_limit
            );
            let user = first_user + held.len() as u64;
            let mut client = Client::connect(self.addr());
            let id = client.next_id();
            client.send_frame(&Frame::login(id, UserId(user), b""));
            let n = held.len();
            let reply = client.recv_or(|| {
                format!("connection {n} (user {user}): neither LOGIN_OK nor a refusal to LOGIN")
            });
            match reply.opcode {
                Opcode::LoginOk => held.push(client),
                Opcode::Error => {
                    // It sent LOGIN before it was refused, so the relay closed a socket
                    // with unread bytes: EOF or a reset, both count as closed here.
                    client.expect_closed();
                    break reply;
                }
                other => panic!("connection {n}: {other:?} to LOGIN: {reply:?}"),
            }
        };
        assert_eq!(
            refusal.error_code(),
            Some(ErrorCode::LimitReached),
            "the refusal after {} connections: {refusal:?}",
            held.len()
        );
        // The relay core refuses at its connection limit only: with this many sessions
        // (the held ones and the two bystanders), it was accept(2) failing with EMFILE.
        let sessions = held.len() + 2;
        assert!(
            sessions + 1 < self.max_connections,
            "refused at {sessions} sessions, near the connection limit {}: the test did not \
             reach the out-of-descriptors path ({refusal:?})",
            self.max_connections
        );
        let (_, reason) = refusal.error().expect("an ERROR");
        assert!(
            reason.contains("file descriptors"),
            "the refusal should name the cause: {reason:?}"
        );
        eprintln!(
            "fd limit {}, connection limit {}: out of descriptors after {} connections and \
             the 2 bystanders",
            self.fd_limit,
            self.max_connections,
            held.len()
        );
        held
    }

    /// Stops the relay with SIGSTOP and waits until it has stopped.
    fn stop(&self) {
        self.relay.signal(libc::SIGSTOP);
        let pid = self.relay.child.id() as libc::pid_t;
        let mut status = 0;
        // SAFETY: waitpid on our own child; WUNTRACED reports the stop without reaping.
        let rc = unsafe { libc::waitpid(pid, &mut status, libc::WUNTRACED) };
        assert_eq!(rc, pid, "waitpid: {}", std::io::Error::last_os_error());
        assert!(
            libc::WIFSTOPPED(status),
            "the relay did not stop (wait status {status:#x})"
        );
    }

    /// Resumes the relay after [`StarvedRelay::stop`].
    fn resume(&self) {
        self.relay.signal(libc::SIGCONT);
    }

    /// A connection that sends LOGIN as `user` at once, before any answer (while the
    /// relay is stopped, it waits in the listen backlog with its LOGIN).
    fn waiter(&self, user: u64) -> Waiter {
        let mut client = Client::connect(self.addr());
        let id = client.next_id();
        client.send_frame(&Frame::login(id, UserId(user), b""));
        Waiter { client, user }
    }
}

/// In the child before exec: opens [`INHERITED_FDS`] descriptors without close-on-exec,
/// then sets the fd limit (soft and hard) [`HEADROOM_FDS`] above the highest. The child
/// still has the test process's descriptors here (closed at exec), so the inherited ones
/// may land high; the limit is set from where they landed so they all count against it.
fn hold_descriptors_and_lower_the_limit() -> std::io::Result<()> {
    let mut highest = 0;
    for _ in 0..INHERITED_FDS {
        // SAFETY: open(2) of a constant C string.
        let fd = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        highest = highest.max(fd);
    }
    let limit = highest as libc::rlim_t + 1 + HEADROOM_FDS;
    let rlimit = libc::rlimit {
        rlim_cur: limit,
        rlim_max: limit,
    };
    // SAFETY: setrlimit(2) with a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &rlimit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A connection that sent LOGIN before knowing whether the relay would accept it.
struct Waiter {
    client: Client,
    user: u64,
}

impl Waiter {
    /// The relay's answer: `Some(client)` logged in (and answering a PING), or `None`:
    /// refused with ERROR LIMIT_REACHED and closed. Any other answer, or none before the
    /// safety timeout, fails.
    fn answer(mut self, what: &str) -> Option<Client> {
        let user = self.user;
        let reply = self
            .client
            .recv_or(|| format!("{what} (user {user}) got no answer to its LOGIN"));
        match reply.opcode {
            Opcode::LoginOk => {
                self.client.round_trip();
                Some(self.client)
            }
            Opcode::Error => {
                assert_eq!(
                    reply.error_code(),
                    Some(ErrorCode::LimitReached),
                    "{what} (user {user}): {reply:?}"
                );
                // Refused with its LOGIN unread: EOF or a reset, both count as closed.
                self.client.expect_closed();
                None
            }
            other => panic!("{what} (user {user}): {other:?} to LOGIN: {reply:?}"),
        }
    }
}

/// (1): a connection that sends nothing gets exactly one frame, ERROR LIMIT_REACHED, and
/// then an orderly EOF (not a reset: it left the relay nothing unread).
fn expect_refused_then_eof(addr: SocketAddr, what: &str) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(SAFETY_TIMEOUT)).unwrap();
    let mut received = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => received.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => panic!(
                "{what}: expected ERROR LIMIT_REACHED then EOF, got {e} after {} bytes \
                 {received:02x?}",
                received.len()
            ),
        }
    }
    let mut buf = BytesMut::from(&received[..]);
    let frame = decode_frame(&mut buf, u32::MAX)
        .expect("relay framing")
        .unwrap_or_else(|| panic!("{what}: EOF without a whole frame: {received:02x?}"))
        .expect("a known opcode");
    assert_eq!(
        frame.error_code(),
        Some(ErrorCode::LimitReached),
        "{what}: {frame:?}"
    );
    assert!(
        buf.is_empty(),
        "{what}: {} bytes after the ERROR, before EOF",
        buf.len()
    );
}

/// Shuts down the write side of `clients` and reads each to EOF: the relay has then closed
/// their sockets and freed their descriptors.
fn close_and_confirm(clients: Vec<Client>) {
    for client in &clients {
        client.shutdown_write();
    }
    for mut client in clients {
        client.expect_closed();
    }
}

#[test]
fn out_of_descriptors_new_connections_get_limit_reached_and_freed_ones_are_reused() {
    let mut relay = StarvedRelay::start();
    let mut held = relay.exhaust(1000);
    assert!(
        held.len() >= 8,
        "too few connections to test with: {}",
        held.len()
    );

    // (1) Out of descriptors: each newcomer is refused, then closed; again and again (the
    // reserve descriptor is taken back after every refusal).
    for i in 0..5 {
        expect_refused_then_eof(
            relay.addr(),
            &format!("newcomer {i} while out of descriptors"),
        );
        relay.bystanders_served();
    }
    // The connections accepted before are untouched and served.
    for client in &mut held {
        client.round_trip();
    }

    // Freed descriptors are used again: as many newcomers as connections closed are
    // served, and the next one is refused again.
    let freed = 4;
    close_and_confirm(held.drain(..freed).collect());
    for i in 0..freed {
        let what = format!("newcomer {i} of {freed} after {freed} descriptors were freed");
        let newcomer = relay.waiter(5000 + i as u64).answer(&what);
        held.push(newcomer.unwrap_or_else(|| panic!("{what} was refused")));
    }
    expect_refused_then_eof(relay.addr(), "the newcomer past the freed descriptors");

    for client in &mut held {
        client.round_trip();
    }
    relay.bystanders_served();
    assert!(relay.relay.is_running(), "the relay exited");
}

#[test]
fn connections_waiting_in_the_backlog_are_all_answered_without_a_new_arrival() {
    let mut relay = StarvedRelay::start();
    let mut held = relay.exhaust(1000);
    let freed = 6;
    assert!(
        held.len() >= freed + 2,
        "too few connections to test with: {}",
        held.len()
    );

    // (2a) Several connections wait in the backlog behind one readiness event while the
    // relay is out of descriptors: every one is answered, none is left hanging, though no
    // connection arrives after them.
    relay.stop();
    let burst: Vec<Waiter> = (0..5).map(|i| relay.waiter(2000 + i)).collect();
    relay.resume();
    for (i, waiter) in burst.into_iter().enumerate() {
        let served = waiter.answer(&format!("backlog connection {i} while out of descriptors"));
        assert!(
            served.is_none(),
            "backlog connection {i} was served though the relay had no descriptor free"
        );
    }
    relay.bystanders_served();

    // (2b) Connections wait in the backlog from before the relay frees descriptors (its
    // clients close while it is stopped), and nothing arrives afterwards: each is served
    // or refused, none hangs, and no more are served than were freed.
    relay.stop();
    let early: Vec<Waiter> = (0..3).map(|i| relay.waiter(3000 + i)).collect();
    let closing: Vec<Client> = held.drain(..freed).collect();
    for client in &closing {
        client.shutdown_write();
    }
    relay.resume();
    let mut early_served = Vec::new();
    for (i, waiter) in early.into_iter().enumerate() {
        if let Some(client) = waiter.answer(&format!("connection {i} waiting before the close")) {
            early_served.push(client);
        }
    }
    for mut client in closing {
        client.expect_closed();
    }
    assert!(early_served.len() <= freed);
    let free = freed - early_served.len();
    eprintln!(
        "{} of 3 connections waiting before the close were served; {free} descriptors free",
        early_served.len()
    );
    held.extend(early_served);
    relay.bystanders_served();

    // (2c) With `free` descriptors free, `free + 3` connections wait in the backlog behind
    // one readiness event: exactly `free` are served (log in, answer a PING), the other
    // three are refused, and none hangs, though nothing arrives after them.
    assert!(free > 0, "no descriptor left free for (2c)");
    relay.stop();
    let queued: Vec<Waiter> = (0..free + 3)
        .map(|i| relay.waiter(4000 + i as u64))
        .collect();
    relay.resume();
    let mut served = 0;
    for (i, waiter) in queued.into_iter().enumerate() {
        if let Some(client) = waiter.answer(&format!("backlog connection {i} of {}", free + 3)) {
            served += 1;
            held.push(client);
        }
    }
    assert_eq!(
        served,
        free,
        "of {} connections in the backlog with {free} descriptors free",
        free + 3
    );

    // Still out of descriptors, still refusing politely, still serving everyone accepted.
    expect_refused_then_eof(relay.addr(), "a newcomer after the backlog was drained");
    for client in &mut held {
        client.round_trip();
    }
    relay.bystanders_served();
    assert!(relay.relay.is_running(), "the relay exited");
}
