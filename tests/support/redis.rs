//! A real Redis (Debian's `redis-server`, installed by `tests/cluster/setup.sh`) as a
//! child on a free loopback port, and a cluster of relay processes sharing it: for the
//! cluster-mode tests.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

use super::process::RelayProcess;
use super::{Client, SAFETY_TIMEOUT};

pub const REDIS_SERVER: &str = "/usr/bin/redis-server";
/// How often a retry loop tries again.
pub const POLL: Duration = Duration::from_millis(20);

// ---- Redis --------------------------------------------------------------------------------

pub fn setup_redis() {
    static SETUP: Once = Once::new();
    SETUP.call_once(|| {
        super::process::run_setup_script(
            "cluster/setup.sh",
            "these tests need Debian's redis-server",
        );
    });
    assert!(
        Path::new(REDIS_SERVER).exists(),
        "{REDIS_SERVER} is missing after tests/cluster/setup.sh"
    );
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind a free port")
        .local_addr()
        .expect("local addr")
        .port()
}

/// A redis-server child on a loopback port with a directory of its own, without
/// persistence unless started with [`Redis::start_durable`]; killed (and its directory
/// removed) on drop, even when the test panics.
pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    /// Its persistence flags.
    persistence: &'static [&'static str],
}

impl Redis {
    pub fn start() -> Redis {
        Redis::start_with(&["--save", "", "--appendonly", "no"])
    }

    /// With an append-only file synced at every write (`appendfsync always`): a restart
    /// keeps everything Redis acknowledged.
    pub fn start_durable() -> Redis {
        Redis::start_with(&[
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
        ])
    }

    fn start_with(persistence: &'static [&'static str]) -> Redis {
        setup_redis();
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "cluster-redis-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("redis dir");
        let mut redis = Redis {
            child: None,
            port: free_port(),
            dir,
            persistence,
        };
        redis.restart();
        redis
    }

    /// `redis://127.0.0.1:PORT`, for `--cluster`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (`SIGKILL`: no goodbye to its clients) and waits until it is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server (again) on its port and waits until it answers PING.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "redis-server is already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("redis.log"))
            .expect("redis log");
        let port = self.port.to_string();
        let child = Command::new(REDIS_SERVER)
            .args(["--port", &port, "--bind", "127.0.0.1", "--dir"])
            .arg(&self.dir)
            .args(self.persistence)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("redis log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {REDIS_SERVER}: {e}"));
        self.child = Some(child);
        let deadline = Instant::now() + SAFETY_TIMEOUT;
        loop {
            let last = match self.ping() {
                Ok(()) => return,
                Err(e) => e,
            };
            if let Some(status) = self.child.as_mut().unwrap().try_wait().expect("try_wait") {
                panic!("redis-server exited ({status}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer PING within {SAFETY_TIMEOUT:?} ({last}):\n{}",
                self.log()
            );
            std::thread::sleep(POLL);
        }
    }

    /// One inline `PING`; Ok on `+PONG`.
    pub fn ping(&self) -> Result<(), String> {
        let mut stream =
            TcpStream::connect(("127.0.0.1", self.port)).map_err(|e| format!("connect: {e}"))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(1)))
            .map_err(|e| e.to_string())?;
        stream
            .write_all(b"PING\r\n")
            .map_err(|e| format!("write: {e}"))?;
        let mut got = Vec::new();
        let mut chunk = [0u8; 256];
        while !got.ends_with(b"\r\n") {
            match stream.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(format!("read: {e}")),
            }
        }
        if got.starts_with(b"+PONG") {
            Ok(())
        } else {
            Err(format!("answered {:?}", String::from_utf8_lossy(&got)))
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---- the cluster --------------------------------------------------------------------------

/// One Redis and `n` relay nodes (named `a`, `b`, `c`, …) using it; every node has user 1
/// as admin and no room send rates (the tests send hundreds of room messages). The nodes
/// stop before Redis does.
pub struct Cluster {
    pub redis: Redis,
    pub nodes: Vec<RelayProcess>,
    /// Each node's flags, for a restart.
    args: Vec<Vec<String>>,
}

impl Cluster {
    pub fn start(n: usize) -> Cluster {
        Cluster::start_with(n, |_| Vec::new())
    }

    /// [`Cluster::start`], node `i` also given the flags `extra(i)`.
    pub fn start_with(n: usize, extra: impl Fn(usize) -> Vec<String>) -> Cluster {
        Cluster::start_on(Redis::start(), n, extra)
    }

    /// `n` nodes on a Redis started by the caller (for example [`Redis::start_durable`]).
    pub fn start_on(redis: Redis, n: usize, extra: impl Fn(usize) -> Vec<String>) -> Cluster {
        let url = redis.url();
        let args: Vec<Vec<String>> = (0..n)
            .map(|i| {
                let name = node_name(i);
                // RelayProcess::start adds `--store memory`.
                let mut args: Vec<String> = [
                    "--cluster",
                    &url,
                    "--node-name",
                    &name,
                    "--admin",
                    "1",
                    "--room-rate",
                    "0",
                    "--room-total-rate",
                    "0",
                ]
                .map(String::from)
                .to_vec();
                args.extend(extra(i));
                args
            })
            .collect();
        let nodes = args
            .iter()
            .map(|a| RelayProcess::start(&a.iter().map(String::as_str).collect::<Vec<_>>()))
            .collect();
        Cluster { redis, nodes, args }
    }

    /// `kill -9` of node `i`, which comes back on the same address with the same flags
    /// (and an empty memory: its store is `--store memory`).
    pub fn crash_and_restart(&mut self, i: usize) {
        let old = self.nodes.remove(i);
        let addr = old.addr;
        old.crash();
        let args: Vec<&str> = self.args[i].iter().map(String::as_str).collect();
        self.nodes.insert(i, RelayProcess::start_on(addr, &args));
    }

    /// A client connected to node `node`, not logged in.
    pub fn connect(&self, node: usize) -> Client {
        Client::connect(self.nodes[node].addr)
    }

    /// A client logged in as `user` on node `node`.
    pub fn login(&self, node: usize, user: u64) -> Client {
        let mut client = self.connect(node);
        client.login(user);
        client
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.nodes.clear();
    }
}

pub fn node_name(i: usize) -> String {
    char::from(b'a' + i as u8).to_string()
}
