//! End to end in a real browser: the H5 demo page in Debian's headless Chromium, driven by
//! playwright-core (`tests/browser/*.mjs`), shares a live room with a native binary-TCP
//! client run by this test. Two pages and the native client exchange room messages, likes
//! and direct messages, and each side asserts what it shows or receives (`e2e.mjs`, over
//! ws:// and over wss:// with tokens). A page outlives a relay restart on the same port:
//! it reconnects by itself, rejoins its room and gets the room's messages again
//! (`reconnect.mjs`). On a phone's viewport (390x844) the page fits and works by taps
//! (`mobile.mjs`). Stored delivery (protocol.md section 15): messages stored for a user
//! while no page of theirs is open show on the next page, which acknowledges them
//! (`inbox.mjs`); a direct message to an offline user is stored, and that user's native
//! client finds it in its inbox (`offline-dm.mjs`). Without a browser, `codec.mjs` checks
//! imrelay.js's codec against protocol.md's hex vectors and its inbox client against a
//! fake relay.
//!
//! `tests/browser/setup.sh` installs Chromium, Node.js and playwright-core when they are
//! missing. A missing dependency fails these tests: they never skip. Screenshots are saved
//! in the tests' output directory (`target/tmp/`): `h5.png` (desktop), `h5-wss.png`,
//! `h5-mobile.png` (390x844), `h5-reconnect.png` (after the restart), `h5-inbox.png` and
//! `h5-offline-dm.png`.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::thread::JoinHandle;

use bytes::Bytes;
use imrelay::proto::{ErrorCode, Flags, Frame, Opcode, RoomId, UserId};
use imrelay::relay::Config;
use imrelay::server::{Server, ShutdownHandle};
use support::{Client, TestRelay};

const ROOM: u64 = 7;
const NATIVE: u64 = 3;

/// The node script, and the line protocol it speaks with this test (common.mjs).
struct Script {
    child: Child,
    stdin: ChildStdin,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
    /// Where the script saves its screenshot.
    screenshot: PathBuf,
}

impl Script {
    /// Starts `tests/browser/<name>` on the demo at `url`, its screenshot to be saved as
    /// `png` in the tests' output directory; `env` goes to the script.
    fn start(name: &str, url: &str, env: &[(&str, String)], png: &str) -> Script {
        let screenshot = Path::new(env!("CARGO_TARGET_TMPDIR")).join(png);
        let _ = std::fs::remove_file(&screenshot);
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
        let mut child = Command::new("node")
            .arg(dir.join(name))
            .current_dir(&dir)
            .env("RELAY_URL", url)
            .env("SCREENSHOT", &screenshot)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start node (installed by tests/browser/setup.sh)");
        let stdin = child.stdin.take().expect("piped stdin");
        let lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        Script {
            child,
            stdin,
            lines,
            screenshot,
        }
    }

    /// The next `STEP <name>` (or `STEP <name> <data>`) the script announces; on its
    /// failure, its error output.
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

    /// The next step must be `name` with data: returns the data.
    fn expect_step_with(&mut self, name: &str) -> String {
        let step = self.next_step();
        match step
            .strip_prefix(name)
            .and_then(|rest| rest.strip_prefix(' '))
        {
            Some(data) => data.to_string(),
            None => panic!("the browser script's steps are out of order: {step:?}, not {name}"),
        }
    }

    fn answer_ok(&mut self) {
        writeln!(self.stdin, "ok").expect("write to the browser script");
    }

    /// The script's last step, its exit, and its screenshot.
    fn finish(mut self) {
        self.expect_step("done");
        drop(self.stdin);
        let status = self.child.wait().expect("wait for node");
        assert!(status.success(), "the browser script exited with {status}");
        let png = std::fs::read(&self.screenshot).expect("the screenshot was saved");
        assert!(
            png.starts_with(b"\x89PNG"),
            "a PNG at {}",
            self.screenshot.display()
        );
        eprintln!("screenshot: {}", self.screenshot.display());
    }
}

/// A relay on a given address: the restart of a [`TestRelay`] on the port it had. Stopped
/// (and joined) on drop, like a `TestRelay`.
struct RelayOn {
    shutdown: ShutdownHandle,
    thread: Option<JoinHandle<()>>,
}

impl RelayOn {
    fn start(addr: SocketAddr, config: Config) -> RelayOn {
        config.validate().expect("valid test config");
        // The listener sets SO_REUSEADDR (mio): the old relay's closed connections do not
        // keep the port.
        let mut server =
            Server::bind(addr, config).unwrap_or_else(|e| panic!("bind {addr} again: {e}"));
        let shutdown = server.shutdown_handle();
        let thread = std::thread::spawn(move || server.run().expect("event loop"));
        RelayOn {
            shutdown,
            thread: Some(thread),
        }
    }
}

impl Drop for RelayOn {
    fn drop(&mut self) {
        self.shutdown.shutdown();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn demo_config() -> Config {
    Config {
        demo: true,
        ..Config::default()
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
    let relay = TestRelay::start(demo_config());
    let native = relay.login(NATIVE);
    let url = format!("http://{}", relay.addr);
    live_room(native, &url, &[], "h5.png");
}

/// The same live room with the pages on `https://` and `wss://` (TLS on the relay's one
/// port) and every user logging in with a signed token. Chromium trusts the relay's
/// self-signed certificate by its public key (`--ignore-certificate-errors-spki-list`),
/// made by this test with openssl; nothing else is trusted that way.
#[test]
fn the_live_room_over_wss_with_login_tokens() {
    setup();
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser-wss");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        path(&key),
        "-out",
        path(&cert),
        "-days",
        "1",
        "-subj",
        "/CN=localhost",
        "-addext",
        "subjectAltName=DNS:localhost,IP:127.0.0.1",
    ]);
    let spki = spki_sha256(&cert);
    let tls = imrelay::server::tls::load_server_config(&cert, &key).expect("test certificate");

    const SECRET: &[u8] = b"browser test secret, 32 bytes or more";
    let verifier = imrelay::auth::Verifier::hs256_secret(SECRET).expect("secret");
    let relay = TestRelay::start_with(
        Config {
            demo: true,
            auth: Some(imrelay::relay::AuthConfig::new(verifier)),
            ..Config::default()
        },
        |server| server.set_tls(Some(tls), false),
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let rooms = imrelay::auth::RoomGrant::only([ROOM]);
    let token = |user| imrelay::auth::mint_hs256(SECRET, user, now, 600, &rooms, false, None);
    // Without its token a page's user is refused: the tokens below are what lets them in.
    let mut stranger = relay.connect();
    let id = stranger.next_id();
    stranger.send_frame(&Frame::login(id, UserId(1), b""));
    assert_eq!(stranger.recv().error_code(), Some(ErrorCode::AuthFailed));

    let mut native = relay.connect();
    native.login_with(NATIVE, token(NATIVE).as_bytes());
    let tokens = format!(r#"{{"1":"{}","2":"{}"}}"#, token(1), token(2));
    let url = format!("https://localhost:{}", relay.addr.port());
    live_room(
        native,
        &url,
        &[("SPKI", spki), ("TOKENS", tokens)],
        "h5-wss.png",
    );
}

/// A page in room 7 loses its relay: the relay stops (SHUTTING_DOWN, WebSocket close 1001)
/// and, once the page has said it is reconnecting and one attempt has failed, a new relay
/// starts on the same port. The page comes back by itself, logs in and rejoins room 7,
/// counts the reconnect, and shows a room message the native client sends to the new relay.
/// Every wait is on what the page shows, none on time.
#[test]
fn the_page_reconnects_after_a_relay_restart() {
    setup();
    let relay = TestRelay::start(demo_config());
    let addr = relay.addr;
    let url = format!("http://{addr}");
    let mut script = Script::start("reconnect.mjs", &url, &[], "h5-reconnect.png");

    script.expect_step("page-live");
    drop(relay); // SHUTTING_DOWN to the page, every connection closed, the listener gone
    script.answer_ok();

    // The page saw the close and is retrying: the relay comes back on the same port.
    script.expect_step("relay-down");
    let _relay = RelayOn::start(addr, demo_config());
    script.answer_ok();

    let reconnects = script.expect_step_with("rejoined");
    let reconnects: u32 = reconnects.parse().expect("a reconnect count");
    assert!(reconnects >= 1, "the page counts {reconnects} reconnects");
    let mut native = Client::connect(addr);
    native.login(NATIVE);
    let state = native.join(ROOM);
    assert_eq!(
        state.payload[..],
        [0, 0, 0, 2, 1],
        "the page is back in room 7 on the new relay, and me"
    );
    assert_eq!(room_send(&mut native, b"hello after the restart"), 1);
    script.answer_ok();

    script.finish();
}

/// The page at 390x844 (an iPhone 13, touch): the header, its pills, the stage and the
/// controls are all inside the viewport with no horizontal scroll, before and after the
/// page is used by taps (a like and a room message, checked by the native client).
#[test]
fn the_page_fits_a_phone() {
    setup();
    let relay = TestRelay::start(demo_config());
    let url = format!("http://{}", relay.addr);
    let mut script = Script::start("mobile.mjs", &url, &[], "h5-mobile.png");

    script.expect_step("page-live");
    let mut native = relay.login(NATIVE);
    assert_eq!(
        native.join(ROOM).payload[..],
        [0, 0, 0, 2, 1],
        "the page and me"
    );
    assert_eq!(room_send(&mut native, b"hello phone"), 1);
    script.answer_ok();

    assert_fits_phone(&script.expect_step_with("layout"));
    script.answer_ok();

    script.expect_step("phone-sent");
    assert_eq!(room_message(&mut native), (UserId(1), b"/like".to_vec()));
    assert_eq!(
        room_message(&mut native),
        (UserId(1), b"hi from my phone".to_vec())
    );
    script.answer_ok();

    assert_fits_phone(&script.expect_step_with("layout"));
    script.answer_ok();

    script.finish();
}

/// imrelay.js in Node.js, no browser: its encoder and decoder against protocol.md's hex
/// vectors (LOGIN, SEND_DEDUP, SEND_STORED, INBOX_SYNC, INBOX_STATE, INBOX_DELIVER,
/// INBOX_ACK, read from the file), the device LOGIN, and its stored-delivery client (sync
/// from the saved cursor, gaps, replays dropped by seq, acks every 32 messages or 100 ms,
/// stored SENDs resent after a reconnect) against a scripted fake relay (`codec.mjs`).
#[test]
fn the_js_client_matches_protocol_md() {
    setup();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    let out = Command::new("node")
        .arg(dir.join("codec.mjs"))
        .current_dir(&dir)
        .output()
        .expect("start node (installed by tests/browser/setup.sh)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.trim_end().ends_with("codec ok"),
        "codec.mjs failed ({}):\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A STORED SEND with DEDUP from `client` to `to`; returns the ACK's count.
fn send_stored(client: &mut Client, to: u64, text: &'static [u8]) -> u32 {
    let id = client.next_id();
    let frame = Frame::send(id, UserId(to), Bytes::from_static(text));
    client.send_frame(&frame.with_flags(Flags::STORED.union(Flags::DEDUP)));
    let ack = client.recv();
    assert_eq!((ack.opcode, ack.msg_id), (Opcode::Ack, id), "{ack:?}");
    ack.ack_count().expect("an ACK count")
}

/// INBOX_SYNC from nothing (epoch 0, last 0); returns the INBOX_STATE's
/// (first_seq, last_seq).
fn sync_from_nothing(client: &mut Client) -> (u64, u64) {
    let id = client.next_id();
    client.send_frame(&Frame::inbox_sync(id, 0, 0));
    let state = client.recv();
    assert_eq!(
        (state.opcode, state.msg_id),
        (Opcode::InboxState, id),
        "{state:?}"
    );
    let s = state.inbox_state().expect("an INBOX_STATE payload");
    (s.first_seq, s.last_seq)
}

/// User 1's page syncs its inbox and is closed. With no page of user 1 open, the native
/// client (user 3) stores a message for user 1, and user 1's own other device (a native
/// client logged in as 1) stores a note to itself. A new page of user 1 (the same browser
/// storage) shows both, the note as sent from another device, each with its stored time,
/// and acknowledges them: a fresh INBOX_SYNC of user 1 then finds the inbox empty and
/// gets no INBOX_DELIVER. A reload shows neither again.
#[test]
fn stored_messages_reach_the_next_page() {
    setup();
    let relay = TestRelay::start(demo_config());
    let url = format!("http://{}", relay.addr);
    let mut script = Script::start("inbox.mjs", &url, &[], "h5-inbox.png");

    script.expect_step("page-closed");
    let mut native = relay.login(NATIVE);
    // The closed page's connection may still be open at the relay, synced: count 0 or 1,
    // stored either way (only an INBOX_ACK removes a stored message).
    assert!(send_stored(&mut native, 1, b"stored hello for 1") <= 1);
    let mut phone = relay.login(1);
    assert!(send_stored(&mut phone, 1, b"a note from my phone") <= 1);
    script.answer_ok();

    let seq: u64 = script
        .expect_step_with("acked")
        .parse()
        .expect("a sequence number");
    let (first_seq, last_seq) = sync_from_nothing(&mut phone);
    assert!(
        first_seq > seq && last_seq >= seq,
        "the page acknowledged up to {seq}, yet the inbox holds {first_seq}..={last_seq}"
    );
    // The relay answers in order: a stored message still held would come before the PONG.
    phone.round_trip();
    script.answer_ok();

    script.finish();
}

/// The page sends a direct message to user 3, who is offline: RECIPIENT_OFFLINE, so the
/// page sends it again as a stored message (STORED|DEDUP, ACK count 0) and says "stored
/// for 3". Then user 3 logs in on a native client, syncs from nothing and receives it as
/// an INBOX_DELIVER from user 1.
#[test]
fn a_direct_message_to_an_offline_user_is_stored() {
    setup();
    let relay = TestRelay::start(demo_config());
    let url = format!("http://{}", relay.addr);
    let mut script = Script::start("offline-dm.mjs", &url, &[], "h5-offline-dm.png");

    script.expect_step("dm-stored");
    let mut native = relay.login(NATIVE);
    let (first_seq, last_seq) = sync_from_nothing(&mut native);
    assert_eq!(first_seq, last_seq, "one message waits for user 3");
    let d = native.recv();
    assert_eq!(
        (d.opcode, d.source, d.target, d.flags),
        (
            Opcode::InboxDeliver,
            UserId(1),
            UserId(NATIVE),
            Flags::EMPTY
        ),
        "{d:?}"
    );
    let (seq, _stored_at, payload) = d.inbox_deliver().expect("an INBOX_DELIVER payload");
    assert_eq!(seq, first_seq);
    assert_eq!(&payload[..], b"see you later, 3");
    assert_ne!(
        d.msg_id.0 >> 32,
        0,
        "the page's stored SEND has a tagged DEDUP msg id: {d:?}"
    );
    native.round_trip();
    script.answer_ok();

    script.finish();
}

/// ROOM_SENDs `text` to room 7 from the native client; returns the ACK's count.
fn room_send(native: &mut Client, text: &'static [u8]) -> u32 {
    let id = native.next_id();
    native.send_frame(&Frame::room_send(
        id,
        RoomId(ROOM),
        Bytes::from_static(text),
    ));
    let ack = native.recv();
    assert_eq!((ack.opcode, ack.msg_id), (Opcode::Ack, id), "{ack:?}");
    ack.ack_count().expect("an ACK count")
}

/// Judges mobile.mjs's measurements (`viewport=390x844 scroll=W,X name=l,t,w,h …`): the
/// viewport is a phone's, nothing scrolls sideways, and every element it measured (the
/// header and its pills, the stage and its LIVE badge, the message box and the Send and
/// Like buttons) is fully inside the viewport; the buttons are thumb-sized.
fn assert_fits_phone(layout: &str) {
    const W: f64 = 390.0;
    const H: f64 = 844.0;
    const EPS: f64 = 0.05; // the script rounds to 0.1 px
    let mut boxes = std::collections::BTreeMap::new();
    for part in layout.split_whitespace() {
        let (key, value) = part
            .split_once('=')
            .unwrap_or_else(|| panic!("bad layout item {part:?}"));
        match key {
            "viewport" => assert_eq!(value, "390x844", "the phone's viewport"),
            "scroll" => {
                let (width, x) = value.split_once(',').expect("scroll=W,X");
                let width: f64 = width.parse().expect("scrollWidth");
                assert!(
                    width <= W,
                    "the page scrolls sideways: scrollWidth {width} > {W}"
                );
                assert_eq!(x, "0", "the page is scrolled sideways");
            }
            name => {
                let b: Vec<f64> = value
                    .split(',')
                    .map(|v| v.parse().expect("a number"))
                    .collect();
                assert_eq!(b.len(), 4, "{name}={value}");
                boxes.insert(name.to_string(), (b[0], b[1], b[2], b[3]));
            }
        }
    }
    for name in [
        "header",
        "status",
        "online",
        "likes",
        "stage",
        "live-badge",
        "msg-input",
        "send",
        "like",
    ] {
        assert!(
            boxes.contains_key(name),
            "{name} was not measured: {layout}"
        );
    }
    for (name, &(left, top, width, height)) in &boxes {
        assert!(
            width > 0.0 && height > 0.0,
            "{name} is not visible: {width}x{height}"
        );
        assert!(
            left >= -EPS && top >= -EPS && left + width <= W + EPS && top + height <= H + EPS,
            "{name} is not inside the 390x844 viewport: left {left}, top {top}, width {width}, \
             height {height}\n{layout}"
        );
    }
    for name in ["send", "like"] {
        let height = boxes[name].3;
        assert!(
            height >= 44.0 - EPS,
            "{name} is {height} px tall: too small for a thumb"
        );
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// Runs openssl (Debian's `openssl`, installed by .ci/run) and returns its stdout.
fn openssl(args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("run openssl (Debian package openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Base64 of the SHA-256 of the certificate's SubjectPublicKeyInfo (Chromium's pin form).
fn spki_sha256(cert: &Path) -> String {
    let public = openssl(&["x509", "-in", path(cert), "-pubkey", "-noout"]);
    let pubkey = cert.with_file_name("pubkey.pem");
    std::fs::write(&pubkey, public).expect("write the public key");
    let der = cert.with_file_name("pubkey.der");
    openssl(&[
        "pkey",
        "-pubin",
        "-in",
        path(&pubkey),
        "-outform",
        "der",
        "-out",
        path(&der),
    ]);
    let digest = openssl(&["dgst", "-sha256", "-binary", path(&der)]);
    let b64 = cert.with_file_name("digest.bin");
    std::fs::write(&b64, digest).expect("write the digest");
    let encoded = openssl(&["base64", "-A", "-in", path(&b64)]);
    String::from_utf8(encoded)
        .expect("base64")
        .trim()
        .to_string()
}

/// Two pages of the H5 demo at `url` and the native client (user 3, logged in already)
/// share room 7; each side checks what the others did. `env` goes to e2e.mjs.
fn live_room(mut native: Client, url: &str, env: &[(&str, String)], png: &str) {
    let mut script = Script::start("e2e.mjs", url, env, png);

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

    script.finish();
}
