//! The admin listener (`--admin-listen`): `/metrics`, `/healthz` and `/readyz` over plain
//! HTTP/1.x, on a thread of its own, apart from the client port.
//!
//! Threads and data flow: the admin thread owns a blocking std `TcpListener` and serves
//! one connection at a time, one request per connection, with a bounded request head
//! ([`MAX_HEAD`]) and deadlines on reading it and writing the answer, so a hostile or
//! stuck scraper holds it for seconds at most. For each request it asks the event loop for
//! a [`Snapshot`]: it sends a one-shot reply channel through a bounded channel and wakes
//! the loop with the loop's own mio `Waker` (the one the store writer and shutdown use).
//! The loop, on its next turn, sees the waker token, copies its counters into a snapshot
//! and sends it back ([`AdminHook::next_request`]); it never waits on anything and takes no
//! lock. The Prometheus encoding ([`super::admin_metrics`]) happens here, on the admin
//! thread.
//!
//! When the loop is stuck (or gone): no snapshot comes within [`SNAPSHOT_TIMEOUT`], and
//! `/healthz`, `/readyz` and `/metrics` answer 503. While shutting down the loop still
//! answers, with `accepting` false: `/readyz` is 503, `/healthz` 200.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use mio::Waker;

use super::admin_metrics::{self, LatencyHistogram, Snapshot};

/// Longest request head read (request line and headers); a longer one is answered 400.
pub const MAX_HEAD: usize = 8 * 1024;
/// How long a client has to send its whole request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(2);
/// How long writing an answer may block.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the admin thread waits for the event loop's snapshot before it calls the loop
/// stuck.
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(1);
/// Snapshot requests that may wait for the loop at once; past that (the loop is stuck and
/// requests pile up), a request is answered 503 without asking.
const PENDING_REQUESTS: usize = 16;
/// Most bytes of a refused request read and dropped after the answer, so the close does
/// not reset the connection before the client reads the answer.
const DRAIN_AFTER_ANSWER: usize = 64 * 1024;

/// What the loop answers a request with: the snapshot, boxed (it is a few KiB).
type Reply = SyncSender<Box<Snapshot>>;

/// Why the admin listener could not start.
#[derive(Debug)]
pub enum AdminError {
    /// Binding the address failed.
    Bind(SocketAddr, std::io::Error),
    /// The thread could not be started.
    Spawn(std::io::Error),
}

impl std::fmt::Display for AdminError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AdminError::Bind(addr, e) => write!(f, "cannot listen on {addr}: {e}"),
            AdminError::Spawn(e) => write!(f, "cannot start the admin thread: {e}"),
        }
    }
}

impl std::error::Error for AdminError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            AdminError::Bind(_, e) | AdminError::Spawn(e) => Some(e),
        }
    }
}

/// The event loop's side of the admin listener: the requests to answer, the loop's turn
/// time histogram, and the thread (stopped and joined on drop).
pub(super) struct AdminHook {
    requests: Receiver<Reply>,
    /// Time of each loop turn, recorded by the loop.
    pub(super) turn_time: LatencyHistogram,
    local_addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl AdminHook {
    /// Binds `addr` and starts the admin thread, which wakes the loop with `waker`.
    pub(super) fn start(addr: SocketAddr, waker: Arc<Waker>) -> Result<AdminHook, AdminError> {
        let listener = TcpListener::bind(addr).map_err(|e| AdminError::Bind(addr, e))?;
        let local_addr = listener
            .local_addr()
            .map_err(|e| AdminError::Bind(addr, e))?;
        let (tx, requests) = mpsc::sync_channel(PENDING_REQUESTS);
        let stop = Arc::new(AtomicBool::new(false));
        let admin = AdminThread {
            requests: tx,
            waker,
            stop: stop.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("imrelay-admin".into())
            .spawn(move || admin.serve(&listener))
            .map_err(AdminError::Spawn)?;
        info!("admin endpoints on http://{local_addr} (/metrics, /healthz, /readyz)");
        Ok(AdminHook {
            requests,
            turn_time: LatencyHistogram::default(),
            local_addr,
            stop,
            thread: Some(thread),
        })
    }

    /// The address the admin listener is bound to.
    pub(super) fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The next snapshot request waiting (the loop answers each with
    /// [`AdminHook::answer`]); never blocks.
    pub(super) fn next_request(&self) -> Option<Reply> {
        self.requests.try_recv().ok()
    }

    /// Sends `snapshot` to the admin thread; a request it gave up on is dropped.
    pub(super) fn answer(reply: Reply, snapshot: Snapshot) {
        let _ = reply.try_send(Box::new(snapshot));
    }
}

impl Drop for AdminHook {
    /// Stops the thread: sets the flag and wakes its `accept` with a connection of its own.
    /// Joined only when that connection was made (a request being served ends within its
    /// deadlines).
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let mut wake = self.local_addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(match wake {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        let woken = TcpStream::connect_timeout(&wake, Duration::from_secs(1)).is_ok();
        if let Some(thread) = self.thread.take() {
            if woken {
                let _ = thread.join();
            }
        }
    }
}

/// The admin thread's state.
struct AdminThread {
    requests: SyncSender<Reply>,
    waker: Arc<Waker>,
    stop: Arc<AtomicBool>,
}

/// An HTTP answer.
#[derive(Debug, PartialEq, Eq)]
struct Answer {
    status: u16,
    content_type: &'static str,
    body: String,
}

impl Answer {
    fn text(status: u16, body: &str) -> Answer {
        Answer {
            status,
            content_type: "text/plain; charset=utf-8",
            body: format!("{body}\n"),
        }
    }
}

/// Why a request got no regular answer.
#[derive(Debug)]
enum RequestError {
    /// The head passed [`MAX_HEAD`].
    TooLarge,
    /// Not an HTTP/1.x request head.
    Malformed(httparse::Error),
    /// The client closed before its head was whole.
    Closed,
    /// The head did not come whole within [`HEAD_TIMEOUT`].
    TimedOut,
    /// Reading or writing failed.
    Io(std::io::Error),
}

impl std::fmt::Display for RequestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequestError::TooLarge => write!(f, "request head over {MAX_HEAD} bytes"),
            RequestError::Malformed(e) => write!(f, "malformed request head: {e}"),
            RequestError::Closed => write!(f, "closed before the request head was whole"),
            RequestError::TimedOut => write!(f, "request head not whole in {HEAD_TIMEOUT:?}"),
            RequestError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl AdminThread {
    fn serve(self, listener: &TcpListener) {
        for stream in listener.incoming() {
            if self.stop.load(Ordering::SeqCst) {
                break;
            }
            match stream {
                Ok(stream) => {
                    let peer = stream.peer_addr().ok();
                    if let Err(e) = self.handle(stream) {
                        debug!("admin: {peer:?}: {e}");
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    // EMFILE and the like: give the process a moment rather than spin.
                    warn!("admin: accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        debug!("admin thread stopped");
    }

    /// One connection: one request, one answer, closed.
    fn handle(&self, mut stream: TcpStream) -> Result<(), RequestError> {
        stream
            .set_write_timeout(Some(WRITE_TIMEOUT))
            .map_err(RequestError::Io)?;
        let deadline = Instant::now() + HEAD_TIMEOUT;
        let answer = match read_head(&mut stream, deadline) {
            Ok((method, path)) => self.route(&method, &path),
            Err(RequestError::TooLarge) => Answer::text(400, "request head too large"),
            Err(RequestError::Malformed(_)) => Answer::text(400, "bad request"),
            Err(e) => return Err(e),
        };
        let status = answer.status;
        write_answer(&mut stream, &answer).map_err(RequestError::Io)?;
        if status == 400 {
            drain(&mut stream, deadline);
        }
        Ok(())
    }

    fn route(&self, method: &str, path: &str) -> Answer {
        // The query string, if any, is ignored.
        let path = path.split('?').next().unwrap_or(path);
        match (method, path) {
            ("GET", "/metrics") => match self.snapshot() {
                Some(snapshot) => match admin_metrics::encode(*snapshot) {
                    Ok(body) => Answer {
                        status: 200,
                        content_type: admin_metrics::CONTENT_TYPE,
                        body,
                    },
                    Err(_) => Answer::text(500, "encoding the metrics failed"),
                },
                None => Answer::text(503, "the event loop did not answer"),
            },
            ("GET", "/healthz") => match self.snapshot() {
                Some(_) => Answer::text(200, "ok"),
                None => Answer::text(503, "the event loop did not answer"),
            },
            ("GET", "/readyz") => match self.snapshot() {
                Some(s) if !s.accepting => Answer::text(503, "shutting down"),
                Some(s) => match (&s.store_failure, &s.cluster_down) {
                    (Some(e), _) => Answer::text(503, &format!("the store failed: {e}")),
                    (None, Some(e)) => Answer::text(503, &format!("the cluster link is down: {e}")),
                    (None, None) => Answer::text(200, "ready"),
                },
                None => Answer::text(503, "the event loop did not answer"),
            },
            _ => Answer::text(404, "not found"),
        }
    }

    /// Asks the event loop for a snapshot; `None` when it did not answer within
    /// [`SNAPSHOT_TIMEOUT`] (or is gone).
    fn snapshot(&self) -> Option<Box<Snapshot>> {
        let (reply, answer) = mpsc::sync_channel(1);
        match self.requests.try_send(reply) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                debug!("admin: {PENDING_REQUESTS} snapshot requests unanswered");
                return None;
            }
            Err(TrySendError::Disconnected(_)) => return None,
        }
        if let Err(e) = self.waker.wake() {
            warn!("admin: cannot wake the event loop: {e}");
        }
        match answer.recv_timeout(SNAPSHOT_TIMEOUT) {
            Ok(snapshot) => Some(snapshot),
            Err(RecvTimeoutError::Timeout) => {
                warn!("admin: the event loop did not answer within {SNAPSHOT_TIMEOUT:?}");
                None
            }
            Err(RecvTimeoutError::Disconnected) => None,
        }
    }
}

/// Reads a request head (at most [`MAX_HEAD`] bytes, by `deadline`); returns its method and
/// path.
fn read_head(stream: &mut TcpStream, deadline: Instant) -> Result<(String, String), RequestError> {
    let mut buf = vec![0u8; MAX_HEAD];
    let mut len = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(RequestError::TimedOut);
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(RequestError::Io)?;
        match stream.read(&mut buf[len..]) {
            Ok(0) => return Err(RequestError::Closed),
            Ok(n) => len += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(RequestError::TimedOut)
            }
            Err(e) => return Err(RequestError::Io(e)),
        }
        if let Some(parsed) = parse_head(&buf[..len])? {
            return Ok(parsed);
        }
        if len == buf.len() {
            return Err(RequestError::TooLarge);
        }
    }
}

/// The method and path of a whole request head, `None` while it is not whole.
fn parse_head(head: &[u8]) -> Result<Option<(String, String)>, RequestError> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(head) {
        Ok(httparse::Status::Complete(_)) => Ok(Some((
            request.method.unwrap_or_default().to_string(),
            request.path.unwrap_or_default().to_string(),
        ))),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(e) => Err(RequestError::Malformed(e)),
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

fn write_answer(stream: &mut TcpStream, answer: &Answer) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\n\
         Connection: close\r\n\r\n",
        answer.status,
        reason(answer.status),
        answer.content_type,
        answer.body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(answer.body.as_bytes())?;
    stream.flush()
}

/// After answering a refused request: ends the answer and reads (and drops) a bounded
/// amount of what the client still sends, until `deadline`, so closing does not reset the
/// connection under an answer the client has not read yet.
fn drain(stream: &mut TcpStream, deadline: Instant) {
    let _ = stream.shutdown(Shutdown::Write);
    let mut chunk = [0u8; 4096];
    let mut drained = 0;
    while drained < DRAIN_AFTER_ANSWER {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match stream.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => drained += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_is_parsed_once_whole() {
        assert!(matches!(
            parse_head(b"GET /metrics HTTP/1.1\r\nHost: x\r\n"),
            Ok(None)
        ));
        let parsed = parse_head(b"GET /metrics?x=1 HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert_eq!(
            parsed,
            Some(("GET".to_string(), "/metrics?x=1".to_string()))
        );
        assert!(matches!(
            parse_head(b"\x00\x01 nonsense\r\n\r\n"),
            Err(RequestError::Malformed(_))
        ));
    }
}
