//! The real `imrelay` binary as a child process: started on a port, signalled, crashed,
//! restarted on the same port.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};

/// The real binary on a free port, killed if the test fails.
pub struct RelayProcess {
    pub child: Child,
    pub addr: SocketAddr,
}

impl RelayProcess {
    /// Starts the binary on 127.0.0.1 and a free port, with `extra` flags.
    pub fn start(extra: &[&str]) -> RelayProcess {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        RelayProcess::start_on(format!("127.0.0.1:{port}").parse().unwrap(), extra)
    }

    /// Starts the binary on `addr` (again, after a restart) and waits until it listens.
    pub fn start_on(addr: SocketAddr, extra: &[&str]) -> RelayProcess {
        // Memory store unless the test names a data directory: tests run side by side.
        let store: &[&str] = if extra.contains(&"--store") {
            &[]
        } else {
            &["--store", "memory"]
        };
        let listen = addr.to_string();
        let args: Vec<&str> = ["--listen", listen.as_str()]
            .into_iter()
            .chain(store.iter().copied())
            .chain(extra.iter().copied())
            .collect();
        let mut child = spawn_relay(&args);
        wait_until_listening(&mut child);
        RelayProcess { child, addr }
    }

    /// Sends `signal` to the relay.
    pub fn signal(&self, signal: libc::c_int) {
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        assert_eq!(rc, 0, "kill failed");
    }

    /// `kill -9`, and wait until it is gone.
    pub fn crash(mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---- for tests that attack the binary (tests/adversary.rs) ------------------------------

impl RelayProcess {
    /// The relay's resident set size now, in bytes (`VmRSS` of /proc/<pid>/status).
    pub fn rss(&self) -> u64 {
        proc_status_kib(self.child.id(), "VmRSS:") * 1024
    }

    /// The relay's peak resident set size since it started, in bytes (`VmHWM`): what an
    /// attack cost at its worst, even if the memory was given back since.
    pub fn peak_rss(&self) -> u64 {
        proc_status_kib(self.child.id(), "VmHWM:") * 1024
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }
}

/// A `kB` field of /proc/<pid>/status.
fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    line[field.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .expect("a number of kB")
}

/// A TCP connection to `addr` from the local address `from` (port chosen by the kernel):
/// loopback has all of 127.0.0.0/8, so a test can be several "hosts".
pub fn connect_from(addr: SocketAddr, from: std::net::IpAddr) -> std::net::TcpStream {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None).expect("socket");
    socket
        .bind(&SocketAddr::new(from, 0).into())
        .expect("bind the client's address");
    socket.connect(&addr.into()).expect("connect");
    let stream: std::net::TcpStream = socket.into();
    stream
        .set_read_timeout(Some(super::SAFETY_TIMEOUT))
        .unwrap();
    stream.set_nodelay(true).unwrap();
    stream
}

/// A binary client over an already connected `stream` (see [`connect_from`]).
pub fn client_over(stream: std::net::TcpStream) -> super::Client {
    super::Client {
        stream,
        buf: bytes::BytesMut::new(),
        next_id: 100,
    }
}

/// [`super::Bystanders`] for a relay that is not in-process: users `a_user` and `b_user`
/// logged in from the local address `from`.
pub fn bystanders_at(
    addr: SocketAddr,
    from: std::net::IpAddr,
    a_user: u64,
    b_user: u64,
) -> super::Bystanders {
    let login = |user| {
        let mut client = client_over(connect_from(addr, from));
        client.login(user);
        client
    };
    super::Bystanders {
        a: login(a_user),
        b: login(b_user),
        a_user,
        b_user,
    }
}

/// Waits for the "listening on" line a relay started with its stderr piped logs once its
/// socket is bound, returns it, and keeps draining the log on a thread so the relay never
/// blocks on a full pipe.
pub fn wait_until_listening(child: &mut Child) -> String {
    let mut log = BufReader::new(child.stderr.take().expect("piped stderr"));
    let mut line = String::new();
    let mut before = String::new();
    loop {
        line.clear();
        let n = log.read_line(&mut line).expect("read relay log");
        assert!(n > 0, "imrelay exited before listening:\n{before}");
        if line.contains("listening on") {
            break;
        }
        before.push_str(&line);
    }
    std::thread::spawn(move || std::io::copy(&mut log, &mut std::io::sink()));
    line
}

/// The relay binary started with exactly `args`, its log (`RUST_LOG=info`) on a pipe.
pub fn spawn_relay(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_imrelay"))
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start imrelay")
}

/// Runs the binary with `args` until it exits, failing the test if it starts listening
/// instead (the relay was expected to refuse to start). Returns its exit status and log.
pub fn run_to_exit(args: &[&str]) -> (std::process::ExitStatus, String) {
    let mut child = spawn_relay(args);
    let mut log = String::new();
    for line in BufReader::new(child.stderr.take().expect("piped stderr")).lines() {
        let line = line.expect("read relay log");
        if line.contains("listening on") {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the relay started when it should have refused:\n{log}{line}");
        }
        log.push_str(&line);
        log.push('\n');
    }
    (child.wait().expect("wait for imrelay"), log)
}

// ---- for tests that wait on asynchronous events (tests/e2e_cluster.rs) --------------------

impl super::Client {
    /// The next frame if one arrives within about `wait`, else `None` (what was read of a
    /// partial frame is kept for the next call). For polling loops that probe for a state
    /// that comes eventually; panics on EOF or a decode error like [`super::Client::recv`].
    pub fn recv_within(&mut self, wait: std::time::Duration) -> Option<imrelay::proto::Frame> {
        use std::io::{ErrorKind, Read};
        self.stream.set_read_timeout(Some(wait)).unwrap();
        let got = loop {
            let decoded = imrelay::proto::decode::decode_frame(&mut self.buf, u32::MAX)
                .expect("relay framing");
            if let Some(decoded) = decoded {
                break Some(decoded.expect("relay sends known opcodes"));
            }
            let mut chunk = [0u8; 64 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => panic!("the relay closed the connection"),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {
                    break None
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => panic!("read failed: {e}"),
            }
        };
        self.stream
            .set_read_timeout(Some(super::SAFETY_TIMEOUT))
            .unwrap();
        got
    }
}

// ---- tools the tests install, and the example programs --------------------------------------

/// Runs `tests/<script>` (an idempotent installer, e.g. `cluster/setup.sh`) with bash,
/// failing the test with its output when it fails: `what` says what the test needs.
pub fn run_setup_script(script: &str, what: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(script);
    let out = Command::new("bash")
        .arg(&path)
        .output()
        .unwrap_or_else(|e| panic!("run tests/{script} (bash is required): {e}"));
    assert!(
        out.status.success(),
        "tests/{script} failed ({}): {what}.\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An example program (built by `cargo test`) running with its stdout lines on a
/// channel; killed on drop.
pub struct Example {
    pub child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Example {
    /// Starts `target/<profile>/examples/<name>` with `args`.
    pub fn start(name: &str, args: &[&str]) -> Example {
        let exe = std::env::current_exe().expect("test exe");
        let target = exe.parent().and_then(|d| d.parent()).expect("target dir");
        let mut child = Command::new(target.join("examples").join(name))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("start example {name} (built by `cargo test`): {e}"));
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Example { child, lines }
    }

    /// Waits for a line containing `needle` and returns it (earlier lines are skipped).
    pub fn expect_line(&self, needle: &str) -> String {
        loop {
            let line = self
                .lines
                .recv_timeout(super::SAFETY_TIMEOUT)
                .unwrap_or_else(|_| panic!("no line containing {needle:?}"));
            if line.contains(needle) {
                return line;
            }
        }
    }

    /// The program's standard input.
    pub fn stdin(&mut self) -> &mut std::process::ChildStdin {
        self.child.stdin.as_mut().expect("stdin")
    }
}

impl Drop for Example {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
