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
use imrelay::proto::{ErrorCode, Frame, Opcode, RoomId, UserId};
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
    let screenshot = Path::new(env!("CARGO_TARGET_TMPDIR")).join(png);
    let _ = std::fs::remove_file(&screenshot);

    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    let mut child = Command::new("node")
        .arg(dir.join("e2e.mjs"))
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
