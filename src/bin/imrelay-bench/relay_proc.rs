//! The relay under test as a process: spawning it, pinning it to a CPU, and reading its CPU
//! time and memory from /proc.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

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
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free port: {e}"))?
            .port();
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
