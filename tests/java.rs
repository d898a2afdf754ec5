//! The Java binding (`bindings/java`, `src/jni.rs`) in a real JVM against the real relay
//! binary: `javac` compiles `io.imrelay.ImRelayClient` and the test program
//! `bindings/java/test/ImRelayTest.java`, and `java -Djava.library.path=DIR ImRelayTest`
//! runs its scenarios against a relay process; the checks here are on its exit status and
//! its `OK ...` lines. The Java side waits on events only (blocking queues and latches with
//! generous timeouts that turn a hang into a failure), never on time.
//!
//! Needs a JDK (`javac`, `java`; Debian's `openjdk-17-jdk-headless`, which `.ci/run`
//! installs when missing): without one the test fails, it does not skip.
//!
//! Which `libimrelay.so`: the JVM loads the cdylib, which has the native methods only when
//! built with the `java` feature. Under `cargo test --features java` cargo has just built
//! it, with that feature, next to this test's executable (`target/debug/deps`); that copy is
//! used when it exports `Java_io_imrelay_ImRelayClient_nativeConnect`. Otherwise (a plain
//! `cargo test`, as CI runs, or a copy overwritten since by a build without the feature)
//! the test builds it itself, once per run: `cargo build --lib --no-default-features
//! --features java,tls --locked` into its own target directory under `CARGO_TARGET_TMPDIR`
//! (a separate one, so it never waits on the lock of the build that runs it), which is also
//! the SDK-only build an Android app ships (TLS included: the `tls` scenario needs it).

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{mpsc, OnceLock};
use std::time::Duration;

use support::process::RelayProcess;

/// How long one JVM run may take before it is killed and the test fails: a safety net
/// against a hang (a deadlocked close, say), far above what a run needs.
const JVM_SAFETY_TIMEOUT: Duration = Duration::from_secs(300);

/// A symbol only a build with the `java` feature has.
const JNI_SYMBOL: &[u8] = b"Java_io_imrelay_ImRelayClient_nativeConnect";

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn tmp_dir() -> &'static Path {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
}

/// Runs `tool -version`, failing the test with what to install when it is missing.
fn require(tool: &str) {
    let found = Command::new(tool)
        .arg("-version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    match found {
        Ok(status) if status.success() => {}
        other => panic!(
            "`{tool} -version` failed ({other:?}): the Java test needs a JDK \
             (apt-get install openjdk-17-jdk-headless; .ci/run installs it)"
        ),
    }
}

/// True if the file at `path` is a `libimrelay.so` with the Java native methods.
fn has_jni_methods(path: &Path) -> bool {
    std::fs::read(path)
        .map(|bytes| bytes.windows(JNI_SYMBOL.len()).any(|w| w == JNI_SYMBOL))
        .unwrap_or(false)
}

/// The directory holding a `libimrelay.so` with the Java native methods (see the module
/// docs), built at most once per run.
fn library_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().expect("test exe");
        let deps = exe.parent().expect("deps dir").to_path_buf();
        // The deps copy has TLS when this test was built with "tls" (a default feature).
        if cfg!(all(feature = "java", feature = "tls"))
            && has_jni_methods(&deps.join("libimrelay.so"))
        {
            return deps;
        }
        let target = tmp_dir().join("java-cdylib");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .current_dir(manifest_dir())
            .args([
                "build",
                "--lib",
                "--no-default-features",
                "--features",
                "java,tls",
            ])
            .arg("--locked")
            .arg("--target-dir")
            .arg(&target)
            .env_remove("CARGO_TARGET_DIR")
            .status()
            .expect("run cargo build for the Java binding's libimrelay.so");
        assert!(
            status.success(),
            "cargo build --features java,tls failed: {status:?}"
        );
        let dir = target.join("debug");
        assert!(
            has_jni_methods(&dir.join("libimrelay.so")),
            "{} lacks the Java native methods",
            dir.join("libimrelay.so").display()
        );
        dir
    })
}

/// The Java sources compiled by `javac` into a directory of classes, once per run.
fn classes_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        require("javac");
        let out = tmp_dir().join("java-classes");
        let _ = std::fs::remove_dir_all(&out);
        std::fs::create_dir_all(&out).expect("create the classes directory");
        let java = manifest_dir().join("bindings/java");
        let output = Command::new("javac")
            .arg("-Xlint:all")
            .arg("-Werror")
            .arg("-d")
            .arg(&out)
            .arg(java.join("io/imrelay/ImRelayClient.java"))
            .arg(java.join("test/ImRelayTest.java"))
            .output()
            .expect("run javac");
        assert!(
            output.status.success(),
            "javac failed: {}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        out
    })
}

/// What one JVM run printed.
struct JavaRun {
    stdout: String,
    stderr: String,
}

impl JavaRun {
    /// Fails unless a line of stdout starts with `prefix`.
    fn expect_line(&self, prefix: &str) -> &str {
        self.stdout
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line starting with {prefix:?}:\n{self}"))
    }
}

impl std::fmt::Display for JavaRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "--- stdout ---\n{}--- stderr ---\n{}",
            self.stdout, self.stderr
        )
    }
}

/// Runs `ImRelayTest <relay address> <scenarios>` in a JVM with the library; fails the
/// test unless it exits 0 having printed `ALL OK`.
fn run_java(relay: &RelayProcess, scenarios: &[&str]) -> JavaRun {
    run_java_with(relay, &JvmSetup::default(), scenarios)
}

/// What a scenario needs of its JVM beyond the library: system properties
/// (`-Dname=value`) and environment variables.
#[derive(Default)]
struct JvmSetup {
    properties: Vec<(&'static str, String)>,
    env: Vec<(&'static str, PathBuf)>,
}

/// As [`run_java`], in a JVM set up as `setup` says.
fn run_java_with(relay: &RelayProcess, setup: &JvmSetup, scenarios: &[&str]) -> JavaRun {
    let classes = classes_dir();
    let library = library_dir();
    require("java");
    let mut java = Command::new("java");
    java.arg(format!("-Djava.library.path={}", library.display()))
        .arg("-Xcheck:jni");
    for (name, value) in &setup.properties {
        java.arg(format!("-D{name}={value}"));
    }
    java.envs(setup.env.iter().map(|(k, v)| (k, v)));
    let child = java
        .arg("-cp")
        .arg(classes)
        .arg("ImRelayTest")
        .arg(relay.addr.ip().to_string())
        .arg(relay.addr.port().to_string())
        .args(scenarios)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start java");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let output: Output = match rx.recv_timeout(JVM_SAFETY_TIMEOUT) {
        Ok(output) => output.expect("wait for java"),
        Err(_) => {
            // SAFETY: kill(2) on the pid of our own child, which has not been reaped (the
            // waiting thread has not returned).
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            let output = rx.recv().expect("java's output").expect("wait for java");
            panic!(
                "java {scenarios:?} hung past {JVM_SAFETY_TIMEOUT:?}:\n{}",
                JavaRun::from(output)
            );
        }
    };
    let status = output.status;
    let run = JavaRun::from(output);
    assert!(
        status.success(),
        "java {scenarios:?} failed: {status}\n{run}"
    );
    run.expect_line("ALL OK");
    // -Xcheck:jni warns about JNI misuse (a call with an exception pending, say).
    assert!(
        !run.stderr.contains("WARNING in native method"),
        "-Xcheck:jni found JNI misuse:\n{run}"
    );
    run
}

impl From<Output> for JavaRun {
    fn from(output: Output) -> JavaRun {
        JavaRun {
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }
}

#[test]
fn java_clients_message_each_other_on_the_sdk_thread_and_reconnect_on_network_change() {
    let relay = RelayProcess::start(&[]);
    let run = run_java(&relay, &["direct", "reconnect"]);
    // (a) a direct message: the right sender and bytes, and onDelivered for the sender.
    run.expect_line("OK direct-message from=101 payload=hello bob");
    run.expect_line("OK delivered id=");
    // A send from inside a callback; close() there refused; rooms.
    run.expect_line("OK send-from-callback");
    run.expect_line("OK close-from-callback-refused");
    run.expect_line("OK room-message room=900 from=101");
    // An exception thrown by a callback is printed and cleared; the thread goes on.
    run.expect_line("OK callback-exception-survived");
    assert!(
        run.stderr
            .contains("a deliberate exception from onDelivered"),
        "the callback's exception is printed:\n{run}"
    );
    // (c) every callback of a client on one thread, not main, one thread per client.
    run.expect_line("OK callbacks-on-network-thread");
    // close waits for onClosed, is idempotent, and later calls are refused.
    run.expect_line("OK close");
    // (d) networkChanged(): one more onConnected, reconnects() from 0 to 1.
    run.expect_line("OK reconnect 0 -> 1");
    run.expect_line("OK reconnect-link-works");
}

#[test]
fn a_java_client_under_disconnect_after_leaves_in_the_background_and_returns_in_the_foreground() {
    let relay = RelayProcess::start(&[]);
    let run = run_java(&relay, &["background"]);
    run.expect_line("OK background-disconnected");
    run.expect_line("OK background-foreground-reconnected");
}

#[test]
fn a_stored_message_reaches_a_java_client_after_the_relay_restarts() {
    let dir = tmp_dir().join("java-store");
    let _ = std::fs::remove_dir_all(&dir);
    let dir_arg = dir.to_str().expect("UTF-8 path").to_string();
    let relay = RelayProcess::start(&["--store", &dir_arg]);
    let addr = relay.addr;
    // (b) user 201 stores a message for 202, who is offline (0 devices pushed to).
    run_java(&relay, &["stored-send"]).expect_line("OK stored-send id=");
    // The relay dies (kill -9) and comes back on the same port with the same data.
    relay.crash();
    let relay = RelayProcess::start_on(addr, &["--store", &dir_arg]);
    // 202 connects for the first time and gets it.
    run_java(&relay, &["stored-receive"])
        .expect_line("OK stored-receive from=201 payload=kept across a restart");
    drop(relay);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- TLS ----------------------------------------------------------------------------------

/// A CA, a relay certificate for `localhost` and 127.0.0.1 it signed, and a second CA that
/// signed nothing the relay has, as PEM files in a directory of their own (removed on drop).
struct TlsFiles {
    dir: PathBuf,
}

impl TlsFiles {
    fn new() -> TlsFiles {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair, KeyUsagePurpose,
        };
        let dir = tmp_dir().join(format!("java-tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the certificate directory");
        let new_ca = |name: &str| {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.distinguished_name.push(DnType::CommonName, name);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let key = KeyPair::generate().unwrap();
            let pem = params.self_signed(&key).unwrap().pem();
            (pem, Issuer::new(params, key))
        };
        let (ca_pem, ca) = new_ca("imrelay java test CA");
        let (stranger_pem, _) = new_ca("a CA the relay's certificate does not chain to");
        let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        let mut params = CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().unwrap();
        let server_pem = params.signed_by(&key, &ca).unwrap().pem();
        let files = [
            ("ca.pem", ca_pem),
            ("stranger-ca.pem", stranger_pem),
            ("server.pem", server_pem),
            ("server.key", key.serialize_pem()),
        ];
        for (name, pem) in files {
            std::fs::write(dir.join(name), pem).expect("write a PEM file");
        }
        TlsFiles { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn path_str(&self, name: &str) -> String {
        self.path(name).to_str().expect("a UTF-8 path").to_owned()
    }
}

impl Drop for TlsFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn java_clients_speak_tls_with_a_bundled_ca_and_an_untrusted_certificate_is_refused() {
    let files = TlsFiles::new();
    let cert = files.path_str("server.pem");
    let key = files.path_str("server.key");
    let relay = RelayProcess::start(&["--tls-cert", &cert, "--tls-key", &key]);
    let setup = JvmSetup {
        properties: vec![
            ("imrelay.test.tlsServerName", "localhost".to_string()),
            ("imrelay.test.caPem", files.path_str("ca.pem")),
        ],
        // What `Options.tls(...)` (the system trust store) reads, pinned to a CA that did
        // not sign the relay's certificate, whatever this machine trusts.
        env: vec![("SSL_CERT_FILE", files.path("stranger-ca.pem"))],
    };
    let run = run_java_with(&relay, &setup, &["tls"]);
    run.expect_line("OK tls-options-checked");
    // A PEM without a certificate: IllegalArgumentException naming the problem.
    run.expect_line("OK tls-bad-pem TLS options: ");
    // Two clients with the CA as PEM: a message each way, each answered.
    run.expect_line("OK tls-both-ways");
    // The system store lacks the CA: onDisconnected names TLS and the certificate.
    let refused = run.expect_line("OK tls-untrusted-refused reason=TLS handshake failed");
    assert!(
        refused.contains("UnknownIssuer") || refused.contains("issuer"),
        "the reason says whose certificate failed: {refused}\n{run}"
    );
}
