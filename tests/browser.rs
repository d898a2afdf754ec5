//! End to end in a real browser: the H5 demo page in Debian's headless Chromium, driven by
//! playwright-core (`tests/browser/e2e.mjs`), shares a live room with a native binary-TCP
//! client run by this test. Two pages and the native client exchange room messages, likes
//! and direct messages, and each side asserts what it shows or receives.
//!
//! `tests/browser/setup.sh` installs Chromium, Node.js and playwright-core when they are
//! missing. A missing dependency fails this test: it never skips. The screenshot of page A
//! is saved as `h5.png` in the tests' output directory (`target/tmp/`).

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};

use bytes::Bytes;
use imrelay::proto::{Frame, Opcode, RoomId, UserId};
use imrelay::relay::Config;
use support::{Client, TestRelay};

const ROOM: u64 = 7;
const NATIVE: u64 = 3;

/// The node script, and the line protocol it speaks with this test.
struct Script {
    child: Child,
    stdin: ChildStdin,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl Script {
    /// The next `STEP <name>` the script announces; on its failure, its error output.
    fn next_step(&mut self) -> String {
        match self.lines.next() {
            Some(Ok(line)) if line.starts_with("STEP ") => line["STEP ".len()..].to_string(),
            Some(Ok(line)) => panic!("unexpected output from e2e.mjs: {line}"),
            _ => {
                let status = self.child.wait().expect("wait for node");
                let mut stderr = String::new();
                if let Some(mut err) = self.child.stderr.take() {
                    let _ = err.read_to_string(&mut stderr);
                }
                panic!("e2e.mjs ended early ({status}):\n{stderr}");
            }
        }
    }

    fn expect_step(&mut self, name: &str) {
        assert_eq!(
            self.next_step(),
            name,
            "the browser script's steps are out of order"
        );
    }

    fn answer_ok(&mut self) {
        writeln!(self.stdin, "ok").expect("write to e2e.mjs");
    }
}

fn setup() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/setup.sh");
    let out = Command::new("bash")
        .arg(&script)
        .output()
        .expect("run tests/browser/setup.sh (bash is required)");
    assert!(
        out.status.success(),
        "tests/browser/setup.sh failed ({}): the browser test needs Chromium, Node.js and \
         playwright-core.\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The next room message the native client gets: (from, payload).
fn room_message(native: &mut Client) -> (UserId, Vec<u8>) {
    let f = native.recv();
    assert_eq!(
        (f.opcode, f.target),
        (Opcode::RoomDeliver, UserId(ROOM)),
        "{f:?}"
    );
    (f.source, f.payload.to_vec())
}

#[test]
fn two_pages_and_a_native_client_share_a_live_room() {
    setup();
    let relay = TestRelay::start(Config {
        demo: true,
        ..Config::default()
    });
    let mut native = relay.login(NATIVE);
    let screenshot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("h5.png");
    let _ = std::fs::remove_file(&screenshot);

    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    let mut child = Command::new("node")
        .arg(dir.join("e2e.mjs"))
        .current_dir(&dir)
        .env("RELAY_URL", format!("http://{}", relay.addr))
        .env("SCREENSHOT", &screenshot)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start node (installed by tests/browser/setup.sh)");
    let stdin = child.stdin.take().expect("piped stdin");
    let lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
    let mut script = Script {
        child,
        stdin,
        lines,
    };

    // Both pages are logged in and in the room: the native client joins as the third.
    script.expect_step("pages-live");
    let state = native.join(ROOM);
    assert_eq!(state.payload[..], [0, 0, 0, 3, 1], "two pages and me");
    script.answer_ok();

    // Page A's room message reached the native client too.
    script.expect_step("room-sent");
    assert_eq!(
        room_message(&mut native),
        (UserId(1), b"hello from A".to_vec())
    );
    script.answer_ok();

    // Page B's like: the "/like" payload convention of imrelay.js.
    script.expect_step("liked");
    assert_eq!(room_message(&mut native), (UserId(2), b"/like".to_vec()));
    // Now the native client talks: a room message to both pages, a DM to page A's user.
    let id = native.next_id();
    native.send_frame(&Frame::room_send(
        id,
        RoomId(ROOM),
        Bytes::from_static(b"hi from native"),
    ));
    assert_eq!(native.recv().ack_count(), Some(2), "both pages got it");
    native.send(1, b"private hello from native");
    assert_eq!(native.recv().ack_count(), Some(1), "page A got it");
    script.answer_ok();

    // Page A's direct message to the native client.
    script.expect_step("dm-sent");
    let dm = native.recv();
    assert_eq!(
        (dm.opcode, dm.source),
        (Opcode::Deliver, UserId(1)),
        "{dm:?}"
    );
    assert_eq!(&dm.payload[..], b"hello native");
    script.answer_ok();

    script.expect_step("done");
    drop(script.stdin);
    let status = script.child.wait().expect("wait for node");
    assert!(status.success(), "e2e.mjs exited with {status}");
    let png = std::fs::read(&screenshot).expect("the screenshot was saved");
    assert!(
        png.starts_with(b"\x89PNG"),
        "a PNG at {}",
        screenshot.display()
    );
    eprintln!("screenshot: {}", screenshot.display());
}
