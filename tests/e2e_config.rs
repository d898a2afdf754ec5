//! `imrelay --config FILE` and `--print-config` end to end (issue #15): the real binary
//! reads its settings from a TOML file whose keys are the long flags' names, flags win over
//! the file, an unknown key stops it with exit code 2, and `--print-config` prints settings
//! that read back to themselves.
//!
//! A relay is waited for by its "listening on" log line, never by time.

mod support;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use support::process::{run_to_exit, spawn_relay, wait_until_listening, RelayProcess};
use support::Client;

/// A per-test directory under the system temp dir, removed on drop.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new(test: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("imrelay-e2e-config-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the test's temp dir");
        Scratch { dir }
    }

    /// Writes `contents` to `name` in the directory; returns its path.
    fn file(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.dir.join(name);
        std::fs::write(&path, contents).expect("write a temp file");
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A free port on 127.0.0.1 (bound and let go).
fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind a free port")
        .local_addr()
        .expect("local addr")
}

/// A config file that puts the relay on a free port with an in-memory store, plus `extra`
/// lines; returns the file and the address.
fn relay_file(scratch: &Scratch, extra: &str) -> (PathBuf, SocketAddr) {
    let addr = free_addr();
    let text = format!("listen = \"{addr}\"\nstore = \"memory\"\n{extra}");
    (scratch.file("imrelay.toml", &text), addr)
}

/// Starts the binary with exactly `args` (no `--listen` or `--store` of its own: the file
/// gives them) and waits until it listens on `addr`.
fn start(addr: SocketAddr, args: &[&str]) -> RelayProcess {
    let mut child = spawn_relay(args);
    let line = wait_until_listening(&mut child);
    assert!(
        line.contains(&addr.to_string()),
        "listening elsewhere than the file says: {line}"
    );
    RelayProcess { child, addr }
}

/// The `max_frame` a fresh login on `addr` is told in its LOGIN_OK.
fn login_max_frame(addr: SocketAddr) -> u32 {
    let mut client = Client::connect(addr);
    let ok = client.login(1);
    ok.login_ok().expect("a LOGIN_OK payload").max_frame
}

/// Runs the binary with `args` to its end; returns its exit code, stdout and stderr.
fn run(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_imrelay"))
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .output()
        .expect("run imrelay");
    (
        out.status.code(),
        String::from_utf8(out.stdout).expect("UTF-8 stdout"),
        String::from_utf8(out.stderr).expect("UTF-8 stderr"),
    )
}

/// `imrelay ARGS --print-config`'s output; the run must succeed.
fn print_config(args: &[&str]) -> String {
    let mut all = args.to_vec();
    all.push("--print-config");
    let (code, out, err) = run(&all);
    assert_eq!(code, Some(0), "--print-config failed: {err}");
    assert!(!out.is_empty(), "--print-config printed nothing");
    out
}

fn path(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 temp path")
}

#[test]
fn the_file_alone_sets_the_relay_up() {
    let scratch = Scratch::new("file-only");
    let (file, addr) = relay_file(&scratch, "max-frame = 4096\n");
    let _relay = start(addr, &["--config", path(&file)]);
    assert_eq!(login_max_frame(addr), 4096);
}

#[test]
fn a_flag_wins_over_the_file() {
    let scratch = Scratch::new("flag-over-file");
    let (file, addr) = relay_file(&scratch, "max-frame = 4096\n");
    let _relay = start(addr, &["--config", path(&file), "--max-frame", "8192"]);
    assert_eq!(login_max_frame(addr), 8192);
}

#[test]
fn an_unknown_key_is_an_error_naming_it_and_the_file() {
    let scratch = Scratch::new("unknown-key");
    let (file, _) = relay_file(&scratch, "max-frame = 4096\nmax-fraem = 8192\n");
    let (status, log) = run_to_exit(&["--config", path(&file)]);
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(log.contains("max-fraem"), "the key is not named: {log}");
    assert!(log.contains(path(&file)), "the file is not named: {log}");
    // --print-config reads the same file the same way.
    let (code, out, err) = run(&["--config", path(&file), "--print-config"]);
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(out.is_empty(), "printed settings from a bad file: {out}");
    assert!(err.contains("max-fraem"), "{err}");
}

#[test]
fn a_value_of_the_wrong_type_is_an_error_naming_its_key() {
    let scratch = Scratch::new("wrong-type");
    let (file, _) = relay_file(&scratch, "max-frame = \"big\"\n");
    let (status, log) = run_to_exit(&["--config", path(&file)]);
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(log.contains("max-frame"), "the key is not named: {log}");
    assert!(log.contains(path(&file)), "the file is not named: {log}");
}

#[test]
fn print_config_round_trips() {
    let scratch = Scratch::new("round-trip");
    // The defaults alone.
    let defaults = print_config(&[]);
    let file = scratch.file("defaults.toml", &defaults);
    assert_eq!(print_config(&["--config", path(&file)]), defaults);

    // A file with settings of every kind (a list, a duration, a switch, an optional path),
    // and flags on top of it.
    let (file, _) = relay_file(
        &scratch,
        "max-frame = 4096\nadmin = [7, 9]\nlogin-timeout = 2.5\ndemo = true\n\
         admin-listen = \"127.0.0.1:9100\"\nauth-algorithm = \"ES256\"\n",
    );
    let printed = print_config(&["--config", path(&file), "--room-rate", "7"]);
    let again = scratch.file("printed.toml", &printed);
    assert_eq!(print_config(&["--config", path(&again)]), printed);
    for line in [
        "max-frame = 4096",
        "admin = [7, 9]",
        "login-timeout = 2.5",
        "demo = true",
        "admin-listen = \"127.0.0.1:9100\"",
        "auth-algorithm = \"ES256\"",
        "room-rate = 7",
        "store = \"memory\"",
    ] {
        assert!(
            printed.lines().any(|l| l == line),
            "no `{line}` in:\n{printed}"
        );
    }
    // And the printed file starts a relay with those settings.
    let (file, addr) = relay_file(&scratch, "");
    let printed = print_config(&["--config", path(&file), "--max-frame", "2048"]);
    let again = scratch.file("printed-relay.toml", &printed);
    let _relay = start(addr, &["--config", path(&again)]);
    assert_eq!(login_max_frame(addr), 2048);
}

#[test]
fn print_config_shows_a_flag_given() {
    let printed = print_config(&["--max-frame", "8192", "--admin", "3", "--admin", "4"]);
    assert!(
        printed.lines().any(|l| l == "max-frame = 8192"),
        "{printed}"
    );
    assert!(printed.lines().any(|l| l == "admin = [3, 4]"), "{printed}");
    // Over a file that says otherwise, too: the flag's list replaces the file's.
    let scratch = Scratch::new("print-flag");
    let (file, _) = relay_file(&scratch, "max-frame = 4096\nadmin = [1]\n");
    let printed = print_config(&[
        "--config",
        path(&file),
        "--max-frame",
        "8192",
        "--admin",
        "3",
    ]);
    assert!(
        printed.lines().any(|l| l == "max-frame = 8192"),
        "{printed}"
    );
    assert!(printed.lines().any(|l| l == "admin = [3]"), "{printed}");
    // A key the file leaves out keeps its flag's default.
    assert!(printed.lines().any(|l| l == "max-rooms = 64"), "{printed}");
}

#[test]
fn the_flags_rules_bind_the_file_and_the_flags_together() {
    let scratch = Scratch::new("rules");
    // The file's --tls-cert without --tls-key: refused, as the flags are.
    let (file, _) = relay_file(&scratch, "tls-cert = \"cert.pem\"\n");
    let (status, log) = run_to_exit(&["--config", path(&file)]);
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(log.contains("--tls-key"), "{log}");
    // A flag may complete the file.
    let (file, _) = relay_file(&scratch, "tls-key = \"key.pem\"\n");
    let printed = print_config(&["--config", path(&file), "--tls-cert", "cert.pem"]);
    assert!(
        printed.lines().any(|l| l == "tls-cert = \"cert.pem\""),
        "{printed}"
    );
    assert!(
        printed.lines().any(|l| l == "tls-key = \"key.pem\""),
        "{printed}"
    );
    // Two key files, one from each: refused.
    let (file, _) = relay_file(&scratch, "auth-secret-file = \"secret\"\n");
    let (status, log) = run_to_exit(&["--config", path(&file), "--auth-public-key-file", "k"]);
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(log.contains("cannot be used with"), "{log}");
}

#[test]
fn a_missing_file_is_an_error() {
    let (status, log) = run_to_exit(&["--config", "/nonexistent/imrelay.toml"]);
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(log.contains("/nonexistent/imrelay.toml"), "{log}");
}
