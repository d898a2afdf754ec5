//! The relay under test as a process: spawning it, pinning it to a CPU, and reading its CPU
//! time and memory from /proc. For `--cluster N`, also the redis-server the nodes share.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::tls::TempDir;

/// Debian's redis-server, started for `--spawn --cluster N`.
pub const REDIS_SERVER: &str = "/usr/bin/redis-server";

/// A redis-server this bench started on a loopback port, with a temp directory of its own
/// and no persistence; killed (and the directory removed) when dropped.
pub struct SpawnedRedis {
    child: Child,
    /// Where it listens.
    pub port: u16,
    /// Holds its log and working directory; removed after the server is killed.
    dir: Option<TempDir>,
}

impl SpawnedRedis {
    /// Starts `bin` (`--port P --bind 127.0.0.1 --dir <tmp> --save '' --appendonly no`) and
    /// waits until it answers PING.
    pub fn spawn(bin: &str) -> Result<SpawnedRedis, String> {
        let port = free_port()?;
        let dir = TempDir::new("redis")?;
        let log = std::fs::File::create(dir.path().join("redis.log"))
            .map_err(|e| format!("cannot create the redis log: {e}"))?;
        let child = Command::new(bin)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--dir"])
            .arg(dir.path())
            .args(["--save", "", "--appendonly", "no"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {bin}: {e}"))?;
        let mut redis = SpawnedRedis {
            child,
            port,
            dir: Some(dir),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let last = match ping(port) {
                Ok(()) => return Ok(redis),
                Err(e) => e,
            };
            if let Ok(Some(status)) = redis.child.try_wait() {
                return Err(format!("{bin} exited ({status}): {}", redis.log()));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{bin} did not answer PING within 10 s ({last}): {}",
                    redis.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `redis://127.0.0.1:PORT`, for the relays' `--cluster`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log(&self) -> String {
        self.dir
            .as_ref()
            .and_then(|d| std::fs::read_to_string(d.path().join("redis.log")).ok())
            .unwrap_or_default()
    }
}

impl Drop for SpawnedRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        drop(self.dir.take());
    }
}

/// One inline `PING` to Redis on `port`; Ok on `+PONG`.
fn ping(port: u16) -> Result<(), String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(1)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"PING\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut got = Vec::new();
    let mut chunk = [0u8; 64];
    while !got.ends_with(b"\r\n") {
        match s.read(&mut chunk) {
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

/// A loopback port free right now.
fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

/// A relay this bench started; killed when dropped.
pub struct SpawnedRelay {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl SpawnedRelay {
    /// Starts `bin` on a free loopback port with `extra` flags, optionally pinned to `cpu`,
    /// and waits for its "listening on" log line.
    pub fn spawn(
        bin: PathBuf,
        extra: &[String],
        cpu: Option<usize>,
    ) -> Result<SpawnedRelay, String> {
        let port = free_port()?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut child = Command::new(&bin)
            .arg("--listen")
            .arg(addr.to_string())
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        if let Some(cpu) = cpu {
            pin(child.id() as libc::pid_t, cpu)?;
        }
        let mut log = BufReader::new(child.stderr.take().ok_or("no relay stderr")?);
        let mut line = String::new();
        // Why it might exit: the first error line it writes (clap's "unexpected argument"
        // from a relay older than a flag, a bad key file), else its last line.
        let (mut first_error, mut last) = (None, String::new());
        loop {
            line.clear();
            if log.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
                let _ = child.wait();
                return Err(format!(
                    "the relay exited before listening: {}",
                    first_error.unwrap_or(last)
                ));
            }
            let text = line.trim();
            if !text.is_empty() {
                last = text.to_string();
                if first_error.is_none() && text.to_ascii_lowercase().contains("error") {
                    first_error = Some(last.clone());
                }
            }
            if line.contains("listening on") {
                break;
            }
        }
        std::thread::spawn(move || std::io::copy(&mut log, &mut std::io::sink()));
        Ok(SpawnedRelay { child, addr })
    }

    /// The relay's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for SpawnedRelay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Pins a process or thread (`pid` 0 = the calling thread) to one CPU.
pub fn pin(pid: libc::pid_t, cpu: usize) -> Result<(), String> {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET write inside it; the pointer and
    // size passed to sched_setaffinity describe it exactly.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(pid, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(format!(
                "cannot pin to CPU {cpu}: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

/// CPU seconds (user + system) a process has used so far.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((utime + stime) / ticks)
}

/// (VmRSS, VmHWM) of a process in KiB.
pub fn memory_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        line.split_whitespace().nth(1)?.parse().ok()
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}
