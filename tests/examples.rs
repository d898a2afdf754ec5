//! Each example runs as the README says: `echo` echoes what you type, `echo_bot` answers a
//! telnet user through a relay, and `chat` chats, and reconnects visibly when the relay is
//! killed and started again.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};

use imrelay::client::{Client, Event};
use imrelay::proto::UserId;
use support::process::RelayProcess;
use support::{TestRelay, SAFETY_TIMEOUT};

/// target/debug/examples/<name>, built by `cargo test` with the tests.
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target dir");
    dir.join("examples").join(name)
}

/// A running example whose stdout lines arrive on a channel; killed on drop.
struct Running {
    child: Child,
    lines: Receiver<String>,
}

impl Running {
    fn start(name: &str, args: &[&str]) -> Running {
        let mut child = Command::new(example(name))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("start example {name}: {e}"));
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Running { child, lines }
    }

    /// Waits for a line containing `needle` and returns it (earlier lines are skipped).
    fn expect_line(&self, needle: &str) -> String {
        loop {
            let line = self
                .lines
                .recv_timeout(SAFETY_TIMEOUT)
                .unwrap_or_else(|_| panic!("no line containing {needle:?}"));
            if line.contains(needle) {
                return line;
            }
        }
    }

    fn stdin(&mut self) -> &mut ChildStdin {
        self.child.stdin.as_mut().expect("stdin")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn echo_sends_every_line_back() {
    let echo = Running::start("echo", &["127.0.0.1:0"]);
    let line = echo.expect_line("echo server listening on");
    let addr = line.rsplit(' ').next().unwrap();
    let mut socket = TcpStream::connect(addr).unwrap();
    socket.set_read_timeout(Some(SAFETY_TIMEOUT)).unwrap();
    socket.write_all(b"hello\r\n").unwrap();
    let mut back = [0u8; 7];
    socket.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"hello\r\n");
    // More than a socket buffer holds: comes back whole and in order, with the writer
    // pausing on WouldBlock and resuming on WRITABLE.
    let big: Vec<u8> = (0..4_000_000u32).map(|i| (i % 251) as u8).collect();
    let mut reader = socket.try_clone().unwrap();
    let expected = big.clone();
    let check = std::thread::spawn(move || {
        let mut got = vec![0u8; expected.len()];
        reader.read_exact(&mut got).unwrap();
        got == expected
    });
    socket.write_all(&big).unwrap();
    assert!(check.join().unwrap(), "echo changed the bytes");
}

#[test]
fn echo_bot_answers_a_telnet_user() {
    let relay = TestRelay::default_config();
    let addr = relay.addr.to_string();
    let bot = Running::start("echo_bot", &[&addr, "9999"]);
    bot.expect_line("echo bot logged in as 9999");
    let mut telnet = TcpStream::connect(&addr).unwrap();
    telnet.set_read_timeout(Some(SAFETY_TIMEOUT)).unwrap();
    telnet
        .write_all(b"login 1\r\nsend 9999 hello bot\r\n")
        .unwrap();
    let mut lines = BufReader::new(telnet.try_clone().unwrap()).lines();
    let mut seen = Vec::new();
    loop {
        let line = lines.next().expect("a line").expect("read");
        if line.starts_with("MSG") {
            assert!(
                line.starts_with("MSG 9999 ") && line.ends_with(" hello bot"),
                "{line}"
            );
            break;
        }
        seen.push(line);
    }
    assert_eq!(seen[0], "OK LOGIN 1");
    assert!(seen[1].starts_with("ACK 2 1"), "{seen:?}");
    bot.expect_line("echoing 9 bytes to user 1");
}

#[test]
fn chat_chats_and_reconnects_visibly_when_the_relay_restarts() {
    let relay = RelayProcess::start(&[]);
    let addr = relay.addr;
    let mut chat = Running::start("chat", &["1", &addr.to_string()]);
    chat.expect_line("connected as 1");
    let (mut bob, _) = Client::connect(addr, support::quick_sdk(2), SAFETY_TIMEOUT).unwrap();

    writeln!(chat.stdin(), "2 hello bob").unwrap();
    assert_eq!(&message_for(&mut bob)[..], b"hello bob");
    chat.expect_line("delivered to 2");
    bob.send(UserId(1), &b"hi alice"[..]).unwrap();
    let line = chat.expect_line("2: hi alice");
    assert!(
        line.starts_with('[') && line.as_bytes()[9] == b']',
        "a time first: {line}"
    );

    relay.crash();
    chat.expect_line("link down");
    let _relay = RelayProcess::start_on(addr, &[]);
    chat.expect_line("connected as 1");
    loop {
        match bob.recv(SAFETY_TIMEOUT).expect("bob reconnects") {
            Event::Connected { .. } => break,
            _ => continue,
        }
    }
    writeln!(chat.stdin(), "2 after the restart").unwrap();
    assert_eq!(&message_for(&mut bob)[..], b"after the restart");
    chat.expect_line("delivered to 2");

    drop(chat.child.stdin.take()); // Ctrl-D
    chat.expect_line("bye");
    assert!(chat.child.wait().unwrap().success());
}

fn message_for(client: &mut Client) -> bytes::Bytes {
    loop {
        match client.recv(SAFETY_TIMEOUT).expect("a message") {
            Event::Message { payload, .. } => return payload,
            _ => continue,
        }
    }
}

#[test]
fn tour_shows_the_send_the_deliver_and_the_ack_in_hex() {
    let relay = TestRelay::default_config();
    let out = Command::new(example("tour"))
        .arg(relay.addr.to_string())
        .output()
        .expect("run tour");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("alice -> relay  Send 00 00 00 26 01 03"),
        "{stdout}"
    );
    assert!(
        stdout.contains("relay -> bob    Deliver 00 00 00 26 01 04"),
        "{stdout}"
    );
    assert!(
        stdout.contains("bob got \"hi bob\" from user 1001"),
        "{stdout}"
    );
    assert!(stdout.contains("relay -> alice  Ack"), "{stdout}");
}
