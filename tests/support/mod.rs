//! Shared by the loopback tests: an in-process relay on a free port and a blocking client.
//!
//! The client's read timeout is only a safety net so a broken relay fails a test instead of
//! hanging it; no test waits on time for synchronisation.

#![allow(dead_code)]

pub mod process;
pub mod redis;
pub mod telnet;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use imrelay::proto::decode::decode_frame;
use imrelay::proto::{ErrorCode, Flags, Frame, MessageId, Opcode, RoomId, UserId};
use imrelay::relay::Config;
use imrelay::server::{Server, ShutdownHandle};

/// SDK settings for tests: quick reconnects and retries, so relay restarts do not stall
/// the suite.
pub fn quick_sdk(user: u64) -> imrelay::client::ClientConfig {
    let mut c = imrelay::client::ClientConfig::new(UserId(user));
    c.backoff_initial = Duration::from_millis(50);
    c.backoff_max = Duration::from_millis(400);
    c.retry_interval = Duration::from_millis(100);
    c
}

/// How long a client waits for a frame before the test fails.
pub const SAFETY_TIMEOUT: Duration = Duration::from_secs(10);

/// A relay running on its own thread, stopped (and joined) on drop.
pub struct TestRelay {
    pub addr: SocketAddr,
    shutdown: ShutdownHandle,
    thread: Option<JoinHandle<()>>,
}

impl TestRelay {
    /// Starts a relay with `config` on 127.0.0.1 and a free port.
    pub fn start(config: Config) -> TestRelay {
        TestRelay::start_with(config, |_| {})
    }

    /// [`TestRelay::start`], with `setup` run on the server before its loop starts (TLS,
    /// say).
    pub fn start_with(config: Config, setup: impl FnOnce(&mut Server)) -> TestRelay {
        config.validate().expect("valid test config");
        let mut server = Server::bind("127.0.0.1:0".parse().unwrap(), config).expect("bind");
        setup(&mut server);
        let addr = server.local_addr();
        let shutdown = server.shutdown_handle();
        let thread = std::thread::spawn(move || server.run().expect("event loop"));
        TestRelay {
            addr,
            shutdown,
            thread: Some(thread),
        }
    }

    /// A relay with a durable store in `dir`, compacting its log past `compact_at` bytes.
    pub fn start_with_store(config: Config, dir: &std::path::Path, compact_at: u64) -> TestRelay {
        config.validate().expect("valid test config");
        let mut server = Server::bind("127.0.0.1:0".parse().unwrap(), config).expect("bind");
        server.open_store(dir, compact_at).expect("open store");
        let addr = server.local_addr();
        let shutdown = server.shutdown_handle();
        let thread = std::thread::spawn(move || server.run().expect("event loop"));
        TestRelay {
            addr,
            shutdown,
            thread: Some(thread),
        }
    }

    /// A relay with default limits.
    pub fn default_config() -> TestRelay {
        TestRelay::start(Config::default())
    }

    /// A connected client (not logged in).
    pub fn connect(&self) -> Client {
        Client::connect(self.addr)
    }

    /// A client logged in as `user`.
    pub fn login(&self, user: u64) -> Client {
        let mut client = self.connect();
        client.login(user);
        client
    }
}

impl Drop for TestRelay {
    fn drop(&mut self) {
        self.shutdown.shutdown();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A blocking client speaking the binary protocol.
pub struct Client {
    pub stream: TcpStream,
    buf: BytesMut,
    next_id: u64,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(SAFETY_TIMEOUT)).unwrap();
        stream.set_nodelay(true).unwrap();
        Client {
            stream,
            buf: BytesMut::new(),
            next_id: 100,
        }
    }

    /// A fresh message id.
    pub fn next_id(&mut self) -> MessageId {
        self.next_id += 1;
        MessageId(self.next_id)
    }

    /// Logs in and returns the LOGIN_OK.
    pub fn login(&mut self, user: u64) -> Frame {
        self.login_with(user, b"")
    }

    /// Logs in with a credential (a token) and returns the LOGIN_OK.
    pub fn login_with(&mut self, user: u64, credential: &[u8]) -> Frame {
        let id = self.next_id();
        self.send_frame(&Frame::login(id, UserId(user), credential));
        let reply = self.recv();
        assert_eq!(reply.opcode, Opcode::LoginOk, "login as {user}: {reply:?}");
        assert_eq!(reply.msg_id, id);
        reply
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write");
    }

    pub fn send_frame(&mut self, frame: &Frame) {
        self.send_raw(&frame.to_bytes());
    }

    /// SENDs `payload` to `to`; returns the message id.
    pub fn send(&mut self, to: u64, payload: &[u8]) -> MessageId {
        let id = self.next_id();
        self.send_frame(&Frame::send(
            id,
            UserId(to),
            Bytes::copy_from_slice(payload),
        ));
        id
    }

    /// SENDs with NO_ACK.
    pub fn send_no_ack(&mut self, to: u64, payload: &[u8]) -> MessageId {
        let id = self.next_id();
        let frame = Frame::send(id, UserId(to), Bytes::copy_from_slice(payload));
        self.send_frame(&frame.with_flags(Flags::NO_ACK));
        id
    }

    /// JOINs a room and returns the ROOM_STATE.
    pub fn join(&mut self, room: u64) -> Frame {
        let id = self.next_id();
        self.send_frame(&Frame::join(id, RoomId(room)));
        let reply = self.recv();
        assert_eq!(reply.opcode, Opcode::RoomState, "{reply:?}");
        reply
    }

    /// The next frame; panics on EOF, a decode error or the safety timeout.
    pub fn recv(&mut self) -> Frame {
        self.try_recv().expect("the relay closed the connection")
    }

    /// The next frame; on failure the panic message includes `context()`.
    pub fn recv_or(&mut self, context: impl FnOnce() -> String) -> Frame {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.try_recv())) {
            Ok(Some(frame)) => frame,
            Ok(None) => panic!("closed ({})", context()),
            Err(_) => panic!("no frame ({})", context()),
        }
    }

    /// The next frame, or `None` at end of stream (or reset).
    pub fn try_recv(&mut self) -> Option<Frame> {
        loop {
            if let Some(decoded) = decode_frame(&mut self.buf, u32::MAX).expect("relay framing") {
                return Some(decoded.expect("relay sends known opcodes"));
            }
            let mut chunk = [0u8; 64 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return None,
                Err(e) => panic!("read failed (safety timeout?): {e}"),
            }
        }
    }

    /// The next frame must be an ERROR with `code`; returns it.
    pub fn expect_error(&mut self, code: ErrorCode) -> Frame {
        let frame = self.recv();
        assert_eq!(frame.error_code(), Some(code), "expected {code}: {frame:?}");
        frame
    }

    /// The relay must close the connection next, with no further frame.
    pub fn expect_closed(&mut self) {
        if let Some(frame) = self.try_recv() {
            panic!("expected the connection to close, got {frame:?}");
        }
    }

    /// A PING round trip: proves the connection is alive and everything before it was
    /// processed (the relay answers in order).
    pub fn round_trip(&mut self) {
        let id = self.next_id();
        self.send_frame(&Frame::ping(id, Bytes::from_static(b"rt")));
        let pong = self.recv();
        assert_eq!(pong.opcode, Opcode::Pong, "{pong:?}");
        assert_eq!(pong.msg_id, id);
    }

    pub fn shutdown_write(&self) {
        self.stream.shutdown(Shutdown::Write).unwrap();
    }
}

/// Two logged-in users that check, after some hostile event elsewhere, that the relay still
/// routes for them.
pub struct Bystanders {
    pub a: Client,
    pub b: Client,
    a_user: u64,
    b_user: u64,
}

impl Bystanders {
    pub fn new(relay: &TestRelay, a_user: u64, b_user: u64) -> Bystanders {
        Bystanders {
            a: relay.login(a_user),
            b: relay.login(b_user),
            a_user,
            b_user,
        }
    }

    /// A message each way, delivered and ACKed.
    pub fn still_served(&mut self) {
        let id = self.a.send(self.b_user, b"still there?");
        let got = self.b.recv();
        assert_eq!(
            (got.opcode, got.msg_id, got.source),
            (Opcode::Deliver, id, UserId(self.a_user))
        );
        assert_eq!(self.a.recv().opcode, Opcode::Ack);
        let id = self.b.send(self.a_user, b"yes");
        assert_eq!(self.a.recv().msg_id, id);
        assert_eq!(self.b.recv().opcode, Opcode::Ack);
    }
}

/// Runs an SDK `client` until `on_event` says so, handing it every event; fails after
/// three times the safety timeout (the stored-delivery tests move thousands of messages).
pub fn run_until(
    client: &mut imrelay::client::Client,
    mut on_event: impl FnMut(imrelay::client::Event) -> bool,
) {
    let deadline = std::time::Instant::now() + 3 * SAFETY_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let event = client.recv(left).expect("event before the safety timeout");
        if on_event(event) {
            return;
        }
    }
}

/// Reads until the relay closes the connection; returns what came. A reset counts as a
/// close too only when `reset_ok`.
pub fn read_until_closed(stream: &mut TcpStream, reset_ok: bool) -> Vec<u8> {
    let mut got = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == ErrorKind::ConnectionReset && reset_ok => return got,
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {
                panic!("the relay did not close the connection (safety timeout)")
            }
            Err(e) => panic!("read failed: {e}"),
        }
    }
}

/// One HTTP request (`HTTP/1.0`: the answer ends with the connection, never chunked);
/// returns the status and the body.
pub fn http_request(addr: SocketAddr, request: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(SAFETY_TIMEOUT))?;
    stream.set_write_timeout(Some(SAFETY_TIMEOUT))?;
    stream.write_all(request.as_bytes())?;
    let mut got = Vec::new();
    stream.read_to_end(&mut got)?;
    let text = String::from_utf8_lossy(&got).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    Ok((status, body.to_string()))
}
