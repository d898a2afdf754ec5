//! The relay's log (`RUST_LOG=info`, its stderr) end to end, over real sockets: every line
//! about a connection names it by an id no later connection gets (`conn#N`, not the slab
//! key that the next connection reuses), with its user and device once logged in; an idle
//! relay logs no stats line that says what the last one said; on SIGTERM the store writer's
//! last line comes before the relay's last lines.
//!
//! Every wait is for a log line or a socket event, under a safety timeout. The one
//! exception is the quiet-stats check, which must watch the log for a while to see that
//! nothing comes: its window is several stats intervals long, and a line afterwards proves
//! the stats timer still runs.

mod support;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::Child;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use imrelay::proto::{ErrorCode, Frame, MessageId, Opcode, UserId};
use support::process::spawn_relay;
use support::{Client, SAFETY_TIMEOUT};

/// The real binary with its log read line by line.
struct LoggedRelay {
    child: Child,
    addr: SocketAddr,
    lines: Receiver<String>,
    /// Every line read so far, for failure messages.
    seen: Vec<String>,
}

impl LoggedRelay {
    /// Starts the binary on a free port with `extra` flags (which must choose `--store`)
    /// and waits for its "listening on" line.
    fn start(extra: &[&str]) -> LoggedRelay {
        let addr = TcpListener::bind("127.0.0.1:0")
            .expect("bind a free port")
            .local_addr()
            .expect("local addr");
        let listen = addr.to_string();
        let args: Vec<&str> = ["--listen", listen.as_str()]
            .into_iter()
            .chain(extra.iter().copied())
            .collect();
        let mut child = spawn_relay(&args);
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut relay = LoggedRelay {
            child,
            addr,
            lines,
            seen: Vec::new(),
        };
        relay.wait_for("the listening line", |l| l.contains("listening on"));
        relay
    }

    /// The next line, `None` once the log has ended (the relay exited); panics at the
    /// safety timeout.
    fn next_line(&mut self, deadline: Instant, what: &str) -> Option<String> {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.lines.recv_timeout(left) {
            Ok(line) => {
                self.seen.push(line.clone());
                Some(line)
            }
            Err(RecvTimeoutError::Disconnected) => None,
            Err(RecvTimeoutError::Timeout) => {
                panic!("no {what} within {SAFETY_TIMEOUT:?}; log:\n{}", self.log())
            }
        }
    }

    /// Reads the log until a line matches; returns it.
    fn wait_for(&mut self, what: &str, matches: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + SAFETY_TIMEOUT;
        loop {
            match self.next_line(deadline, what) {
                Some(line) if matches(&line) => return line,
                Some(_) => {}
                None => panic!("the log ended before {what}; log:\n{}", self.log()),
            }
        }
    }

    /// Reads the log for `window` and fails if a line matches.
    fn expect_none_for(&mut self, window: Duration, what: &str, matches: impl Fn(&str) -> bool) {
        let until = Instant::now() + window;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    assert!(
                        !matches(&line),
                        "{what} within {window:?}: {line}\nlog:\n{}",
                        self.log()
                    );
                    self.seen.push(line);
                }
                Err(RecvTimeoutError::Timeout) => return,
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("the log ended; log:\n{}", self.log())
                }
            }
        }
    }

    /// Reads the log to its end (the relay exits) and waits for the process; returns the
    /// lines read by this call and the exit status.
    fn until_exit(&mut self) -> (Vec<String>, std::process::ExitStatus) {
        let deadline = Instant::now() + SAFETY_TIMEOUT;
        let mut lines = Vec::new();
        while let Some(line) = self.next_line(deadline, "exit") {
            lines.push(line);
        }
        let status = self.child.wait().expect("wait for imrelay");
        (lines, status)
    }

    fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill only sends a signal to the child's pid.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        assert_eq!(rc, 0, "kill failed");
    }

    fn log(&self) -> String {
        self.seen.join("\n")
    }
}

impl Drop for LoggedRelay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The connection id a line names: the `conn#N` token.
fn conn_id(line: &str) -> &str {
    let start = line
        .find("conn#")
        .unwrap_or_else(|| panic!("no conn# in {line:?}"));
    let rest = &line[start..];
    let end = rest.find([' ', ':']).unwrap_or(rest.len());
    &rest[..end]
}

/// Sends the start of a frame and ends the stream: the relay answers MALFORMED and logs
/// the close (at info); waits until the relay has closed the socket.
fn close_mid_frame(client: &mut Client) {
    let ping = Frame::ping(MessageId(9), bytes::Bytes::from_static(b"cut")).to_bytes();
    client.send_raw(&ping[..10]);
    client.shutdown_write();
    client.expect_error(ErrorCode::Malformed);
    client.expect_closed();
}

#[test]
fn connections_are_named_by_ids_never_reused_and_by_their_user() {
    let mut relay = LoggedRelay::start(&["--store", "memory"]);
    let closing = |l: &str| l.contains(": closing: MALFORMED");

    // One after the other: the second is accepted after the first was closed (the client
    // saw its end of stream, which the relay sends as it frees the slot), so the relay's
    // slab gives the second the first one's key. Their log names must differ.
    let mut first = Client::connect(relay.addr);
    close_mid_frame(&mut first);
    let first_line = relay.wait_for("the first close line", closing);
    let mut second = Client::connect(relay.addr);
    close_mid_frame(&mut second);
    let second_line = relay.wait_for("the second close line", closing);
    assert_ne!(
        conn_id(&first_line),
        conn_id(&second_line),
        "{first_line}\n{second_line}"
    );

    // Logged in from a named device: the close line names the user and the device.
    let mut tablet = Client::connect(relay.addr);
    tablet.send_frame(&Frame::login_device(
        MessageId(1),
        UserId(1002),
        "tablet",
        b"",
    ));
    let ok = tablet.recv();
    assert_eq!(ok.opcode, Opcode::LoginOk, "{ok:?}");
    close_mid_frame(&mut tablet);
    let line = relay.wait_for("the logged-in close line", closing);
    let id = conn_id(&line);
    assert!(
        line.contains(&format!("{id} user 1002@tablet: closing:")),
        "{line}"
    );
    assert!(
        id != conn_id(&first_line) && id != conn_id(&second_line),
        "{line}"
    );

    // Without a device: the user alone.
    let mut plain = Client::connect(relay.addr);
    plain.login(1003);
    close_mid_frame(&mut plain);
    let line = relay.wait_for("the plain close line", closing);
    let id = conn_id(&line);
    assert!(
        line.contains(&format!("{id} user 1003: closing:")),
        "{line}"
    );
}

#[test]
fn an_idle_relay_repeats_no_stats_line_and_the_store_stops_before_the_exit() {
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("logs-store-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store = dir.to_str().expect("a UTF-8 path");
    let mut relay = LoggedRelay::start(&["--stats-interval", "1", "--store", store]);
    let stats = |l: &str| l.contains("stats: ");
    let counters = |line: &str| -> String {
        let at = line.find("stats: ").expect("a stats line");
        line[at..].to_string()
    };

    let first = relay.wait_for("a stats line", stats);
    // Nothing happens for more than three intervals: no line.
    relay.expect_none_for(Duration::from_millis(3500), "a second stats line", stats);
    // Traffic changes the counters: the next line comes, and says something new.
    let mut client = Client::connect(relay.addr);
    client.login(1);
    client.round_trip();
    let second = relay.wait_for("a stats line after traffic", stats);
    assert_ne!(counters(&first), counters(&second));
    drop(client);

    relay.signal(libc::SIGTERM);
    let (lines, status) = relay.until_exit();
    assert!(status.success(), "{status}; log:\n{}", relay.log());
    let at = |needle: &str| {
        lines
            .iter()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no {needle:?} after SIGTERM; log:\n{}", relay.log()))
    };
    let stopped = at("store writer stopped");
    let complete = at("shutdown complete");
    let exiting = at("exiting: ");
    assert!(
        stopped < complete && complete < exiting,
        "out of order; log:\n{}",
        relay.log()
    );
    // Counts read in the right number.
    let last = &lines[exiting];
    assert!(last.contains("1 connection served"), "{last}");
    let _ = std::fs::remove_dir_all(&dir);
}
