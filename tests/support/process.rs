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
        let mut child = Command::new(env!("CARGO_BIN_EXE_imrelay"))
            .arg("--listen")
            .arg(addr.to_string())
            .args(store)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start imrelay");
        // The relay logs "listening on" once its socket is bound: wait for that line, then
        // keep draining its log on a thread so it never blocks on a full pipe.
        let mut log = BufReader::new(child.stderr.take().expect("piped stderr"));
        let mut line = String::new();
        loop {
            line.clear();
            let n = log.read_line(&mut line).expect("read relay log");
            assert!(n > 0, "imrelay exited before listening");
            if line.contains("listening on") {
                break;
            }
        }
        std::thread::spawn(move || std::io::copy(&mut log, &mut std::io::sink()));
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
