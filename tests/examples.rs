//! Each example runs as the README says: `echo` echoes what you type, `echo_bot` answers a
//! telnet user through a relay, and `chat` chats, and reconnects visibly when the relay is
//! killed and started again.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use imrelay::client::{Client, Event};
use imrelay::proto::UserId;
use support::process::{Example, RelayProcess};
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

#[test]
fn echo_sends_every_line_back() {
    let echo = Example::start("echo", &["127.0.0.1:0"]);
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
    let bot = Example::start("echo_bot", &["9999", &addr]);
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
    let mut chat = Example::start("chat", &["1", &addr.to_string()]);
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

/// What a run that ends by itself printed: (exit code, stdout, stderr).
fn run(name: &str, args: &[&str]) -> (i32, String, String) {
    run_exe(&example(name), args)
}

fn run_exe(exe: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", exe.display()));
    (
        out.status.code().expect("exited, not killed"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A loopback address nothing listens on: a port the OS just gave out and took back.
fn closed_port() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

const RELAY_HINT: &str = "is the relay running? (cargo run --release --bin imrelay)";

#[test]
fn echo_bot_takes_the_user_first_like_chat_and_says_what_is_wrong() {
    let wrong = closed_port();
    let (code, _, err) = run("echo_bot", &["4242", &wrong]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!(
            "echo_bot: cannot connect to {wrong}: connection refused — {RELAY_HINT}"
        )),
        "{err}"
    );
    // The old order (address first) is a usage error, not a parse error's Debug output.
    let (code, _, err) = run("echo_bot", &["127.0.0.1:7700", "4242"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("echo_bot: \"127.0.0.1:7700\" is not a user id"),
        "{err}"
    );
    assert!(err.contains("usage: echo_bot [my user id"), "{err}");
    let (code, _, err) = run("echo_bot", &["4242", "no-port-here"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("echo_bot: cannot resolve \"no-port-here\""),
        "{err}"
    );
    assert!(!err.contains("Resolve(") && !err.contains("kind:"), "{err}");
    let (code, _, err) = run("echo_bot", &["4242", "127.0.0.1:7700", "extra"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("unexpected argument \"extra\""), "{err}");
}

#[test]
fn tour_says_when_no_relay_answers() {
    let wrong = closed_port();
    let (code, _, err) = run("tour", &[&wrong]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(
        err.trim_end(),
        format!("tour: cannot connect to {wrong}: connection refused — {RELAY_HINT}")
    );
    let (code, _, err) = run("tour", &["no-port-here"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("tour: cannot resolve \"no-port-here\""),
        "{err}"
    );
    assert!(err.contains("usage: tour"), "{err}");
}

#[test]
fn chat_says_what_is_wrong_with_its_arguments() {
    let (code, _, err) = run("chat", &[]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("usage: chat <my user id> [relay host:port]"),
        "{err}"
    );
    let (code, _, err) = run("chat", &["127.0.0.1:7700"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("usage: chat <my user id>"), "{err}");
    let (code, _, err) = run("chat", &["1", "no-port-here"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("cannot resolve no-port-here"), "{err}");
}

/// examples/c/chat.c, compiled against the header and this run's libimrelay.a.
fn c_chat() -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    let deps = exe.parent().expect("deps dir");
    let lib = deps.join("libimrelay.a");
    assert!(lib.exists(), "{} not built", lib.display());
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("imrelay-examples-chat-c");
    let status = Command::new("cc")
        .arg(root.join("examples/c/chat.c"))
        .args(["-std=c99", "-Wall", "-Werror", "-I"])
        .arg(root.join("include"))
        .arg(&lib)
        .args(["-pthread", "-lpthread", "-ldl", "-lm", "-o"])
        .arg(&out)
        .status()
        .expect("run cc (the system C compiler; .ci/run installs it)");
    assert!(status.success(), "cc failed: {status:?}");
    out
}

#[test]
fn the_c_chat_says_once_and_by_name_why_it_could_not_connect() {
    let exe = c_chat();
    let wrong = closed_port();
    let (code, _, err) = run_exe(&exe, &[&wrong, "1", "2", "hi"]);
    assert_eq!(code, 1, "{err}");
    let first = err.lines().next().unwrap_or_default();
    assert!(
        first.starts_with("chat: connect failed: Connection refused"),
        "{err}"
    );
    assert!(first.ends_with("; code IMRELAY_ERR_CONNECT"), "{err}");
    assert_eq!(err.matches("connect failed").count(), 1, "{err}");
    assert!(!err.contains("-3"), "no raw code: {err}");
    assert!(err.contains(RELAY_HINT), "{err}");
    let (code, _, err) = run_exe(&exe, &[&wrong, "alice", "2", "hi"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("user ids are numbers from 1, got \"alice\""),
        "{err}"
    );
    assert!(err.contains("usage: "), "{err}");
}
