//! The load engine: one mio thread drives a set of streams over nonblocking sockets.
//!
//! A stream is one sender sending numbered messages to a group of receiving connections
//! (one partner in `pairs`, every room member in `fanout`), keeping at most `window`
//! messages that not every receiver has yet. Each message's payload carries its stream
//! index, sequence number and send time, so receivers measure one-way latency and check
//! order, loss and duplication. Frames are encoded into a per-socket buffer and written
//! once per turn; reads go until WouldBlock into a reused buffer.
//!
//! A TLS connection (`--tls`) arrives from setup with its handshake done: writes go through
//! rustls into the socket ([`tls::write_plain`]), reads take the socket's ciphertext in
//! large chunks and decrypt it into the same buffer ([`tls::read_plain`]). A plaintext
//! connection pays one branch per read and per write for it.

use std::io::{ErrorKind, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use imrelay::proto::Opcode;
use rustls::{ClientConnection, StreamOwned};

use crate::tls::{self, CipherIn, Sock};

/// Header of every frame (protocol.md section 3).
const HEADER: usize = 32;
/// Stream index (u32), sequence (u64), send time in ns since the run's epoch (u64).
pub const MIN_PAYLOAD: usize = 20;
/// Stop encoding into a socket's buffer past this many unwritten bytes.
const WRITE_BACKLOG: usize = 256 * 1024;
const READ_BUF: usize = 256 * 1024;

/// One connection of the engine.
pub struct Conn {
    sock: TcpStream,
    /// A TLS connection's session (its handshake done in setup) and the ciphertext read
    /// ahead of it; `None` for plaintext, whose path is a single branch longer for it.
    tls: Option<Box<Tls>>,
    out: Vec<u8>,
    out_pos: usize,
    inbuf: Vec<u8>,
    in_len: usize,
    /// The stream this connection receives, and the next sequence it expects.
    recv_stream: Option<usize>,
    expected: u64,
    /// The stream this connection sends for (it may be one of several sockets of it).
    send_stream: Option<usize>,
    /// Stored mode with several devices per user: the stream the user sends from another
    /// device, whose copies (protocol.md, section 15.1) this device receives and acks.
    copy_stream: Option<usize>,
    queued_for_send: bool,
    /// Stored mode: the last inbox sequence received, and how many are not acked yet.
    inbox_seq: u64,
    inbox_unacked: u32,
}

impl Conn {
    /// Wraps a connected blocking socket.
    pub fn new(sock: std::net::TcpStream) -> Conn {
        Conn::with_tls(sock, None)
    }

    /// Wraps a socket of the setup phase, plaintext or TLS.
    pub fn from_sock(sock: Sock) -> Conn {
        match sock {
            Sock::Plain(sock) => Conn::new(sock),
            Sock::Tls(stream) => {
                let StreamOwned { conn, sock } = *stream;
                Conn::with_tls(
                    sock,
                    Some(Box::new(Tls {
                        session: conn,
                        cipher: CipherIn::new(READ_BUF),
                    })),
                )
            }
        }
    }

    fn with_tls(sock: std::net::TcpStream, tls: Option<Box<Tls>>) -> Conn {
        sock.set_nonblocking(true).expect("nonblocking");
        Conn {
            sock: TcpStream::from_std(sock),
            tls,
            out: Vec::new(),
            out_pos: 0,
            inbuf: vec![0; READ_BUF],
            in_len: 0,
            recv_stream: None,
            expected: 0,
            send_stream: None,
            copy_stream: None,
            queued_for_send: false,
            inbox_seq: 0,
            inbox_unacked: 0,
        }
    }
}

/// The TLS state of a connection.
pub struct Tls {
    session: ClientConnection,
    cipher: CipherIn,
}

/// One sender's messages to a group of receivers.
pub struct Stream {
    /// Sockets each message is written to (one through a relay; K for the fan-out floor).
    pub senders: Vec<usize>,
    /// The 32-byte header every message starts with (length and msg_id are patched).
    pub header: [u8; HEADER],
    pub receivers: usize,
    pub sent: u64,
    completed: u64,
    /// Receipts per in-flight sequence, indexed by sequence modulo the window.
    receipts: Vec<u32>,
    /// Stored mode: ACKs received (they come in order), and send times by sequence modulo
    /// the window, for the ACK latency.
    acked: u64,
    sent_at: Vec<u64>,
}

impl Stream {
    /// A stream whose messages start with `header` (an encoded frame with empty payload).
    pub fn new(senders: Vec<usize>, header: &[u8], receivers: usize, window: usize) -> Stream {
        let mut h = [0u8; HEADER];
        h.copy_from_slice(&header[..HEADER]);
        Stream {
            senders,
            header: h,
            receivers,
            sent: 0,
            completed: 0,
            receipts: vec![0; window],
            acked: 0,
            sent_at: vec![0; window],
        }
    }
}

/// What to run.
pub struct Job {
    pub conns: Vec<Conn>,
    pub streams: Vec<Stream>,
    /// Messages each stream sends.
    pub messages: u64,
    pub window: usize,
    pub size: usize,
    /// Stored delivery: messages arrive as INBOX_DELIVER, receivers ack their inbox, and a
    /// message stays in the window until it is both delivered and ACKed.
    pub stored: bool,
}

impl Job {
    /// An empty job: add connections and streams, then mark senders and receivers.
    pub fn new(messages: u64, window: usize, size: usize) -> Job {
        Job {
            conns: Vec::new(),
            streams: Vec::new(),
            messages,
            window,
            size,
            stored: false,
        }
    }

    /// Marks connection `conn` as a receiver of `stream`.
    pub fn receive(&mut self, conn: usize, stream: usize) {
        self.conns[conn].recv_stream = Some(stream);
    }

    /// Marks connection `conn` as a device of the user who sends `stream` from another
    /// device: it receives the copies of that stream's stored messages.
    pub fn copies(&mut self, conn: usize, stream: usize) {
        self.conns[conn].copy_stream = Some(stream);
    }

    /// Marks connection `conn` as (one of) the sending sockets of `stream`.
    pub fn send(&mut self, conn: usize, stream: usize) {
        self.conns[conn].send_stream = Some(stream);
    }
}

/// What one engine thread measured.
pub struct Outcome {
    pub latency_ns: Histogram<u64>,
    /// Stored mode: from SEND to its ACK ("stored", on disk with a durable store).
    pub ack_latency_ns: Histogram<u64>,
    pub received: u64,
    pub expected: u64,
    pub duplicated: u64,
    pub reordered: u64,
    /// Copies of the user's own stored messages, received on its other devices.
    pub copies: u64,
    pub acks: u64,
    pub errors: u64,
    pub finished: bool,
}

/// Runs `job` until every message reached every receiver or `deadline` passes.
pub fn run(
    mut job: Job,
    epoch: Instant,
    deadline: Instant,
    busy_poll: bool,
    progress: Arc<AtomicU64>,
) -> Outcome {
    let mut poll = Poll::new().expect("poll");
    for (i, c) in job.conns.iter_mut().enumerate() {
        poll.registry()
            .register(
                &mut c.sock,
                Token(i),
                Interest::READABLE | Interest::WRITABLE,
            )
            .expect("register");
    }
    let expected: u64 = job
        .streams
        .iter()
        .map(|s| s.receivers as u64 * job.messages)
        .sum();
    let mut out = Outcome {
        latency_ns: Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("histogram"),
        ack_latency_ns: Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("histogram"),
        received: 0,
        expected,
        duplicated: 0,
        reordered: 0,
        copies: 0,
        acks: 0,
        errors: 0,
        finished: false,
    };
    let mut events = Events::with_capacity(4096);
    let mut send_ready: Vec<usize> = Vec::new();
    let mut flush_ready: Vec<usize> = Vec::new();
    for s in 0..job.streams.len() {
        send_ready.push(s);
    }
    let mut reported = 0;
    let payload_len = job.size.max(MIN_PAYLOAD);
    let mut scratch_payload = vec![0u8; payload_len];
    // Stored mode ends when every message is both delivered and ACKed: the relay writes
    // a recipient's delivery before the sender's ACK, so the last ACKs come after it.
    // One ACK per message sent (however many devices receive it).
    let expected_acks = job.streams.len() as u64 * job.messages;
    while out.received < expected || (job.stored && out.acks < expected_acks) {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        // Fill and write every stream that has window to spare.
        for s in send_ready.drain(..) {
            fill(&mut job, s, epoch, &mut scratch_payload, &mut flush_ready);
        }
        for c in flush_ready.drain(..) {
            flush(&mut job.conns[c]);
        }
        let timeout = if busy_poll {
            Duration::ZERO
        } else {
            Duration::from_millis(50).min(deadline - now)
        };
        if let Err(e) = poll.poll(&mut events, Some(timeout)) {
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            panic!("poll: {e}");
        }
        let now_ns = epoch.elapsed().as_nanos() as u64;
        for event in events.iter() {
            let c = event.token().0;
            if event.is_writable() {
                flush(&mut job.conns[c]);
                if let Some(s) = job.conns[c].send_stream {
                    send_ready.push(s);
                }
            }
            if event.is_readable() {
                read(&mut job, c, now_ns, &mut out, &mut send_ready);
            }
        }
        send_ready.sort_unstable();
        send_ready.dedup();
        if out.received - reported > 10_000 {
            progress.fetch_add(out.received - reported, Ordering::Relaxed);
            reported = out.received;
        }
    }
    progress.fetch_add(out.received - reported, Ordering::Relaxed);
    out.finished = out.received == expected;
    out
}

fn fill(job: &mut Job, s: usize, epoch: Instant, payload: &mut [u8], flush_ready: &mut Vec<usize>) {
    let window = job.window as u64;
    let messages = job.messages;
    let stored = job.stored;
    let stream = &mut job.streams[s];
    let frame_len = (HEADER + payload.len()) as u32;
    let backlog_ok = stream
        .senders
        .iter()
        .all(|&c| job.conns[c].out.len() - job.conns[c].out_pos < WRITE_BACKLOG);
    if !backlog_ok {
        return;
    }
    let mut any = false;
    let now_ns = epoch.elapsed().as_nanos() as u64;
    loop {
        let done = if stored {
            stream.completed.min(stream.acked)
        } else {
            stream.completed
        };
        if stream.sent >= messages || stream.sent - done >= window {
            break;
        }
        let seq = stream.sent;
        stream.sent += 1;
        stream.sent_at[(seq % window) as usize] = now_ns;
        payload[0..4].copy_from_slice(&(s as u32).to_be_bytes());
        payload[4..12].copy_from_slice(&seq.to_be_bytes());
        payload[12..20].copy_from_slice(&now_ns.to_be_bytes());
        let mut header = stream.header;
        header[0..4].copy_from_slice(&frame_len.to_be_bytes());
        header[8..16].copy_from_slice(&(seq + 1).to_be_bytes());
        for &c in &stream.senders {
            let conn = &mut job.conns[c];
            conn.out.extend_from_slice(&header);
            conn.out.extend_from_slice(payload);
        }
        any = true;
    }
    if any {
        for &c in &stream.senders {
            if !job.conns[c].queued_for_send {
                job.conns[c].queued_for_send = true;
                flush_ready.push(c);
            }
        }
    }
}

fn flush(conn: &mut Conn) {
    conn.queued_for_send = false;
    if let Some(t) = conn.tls.as_deref_mut() {
        match tls::write_plain(&mut t.session, &mut conn.sock, &conn.out, &mut conn.out_pos) {
            Ok(true) => {
                conn.out.clear();
                conn.out_pos = 0;
            }
            Ok(false) => {}
            Err(e) => panic!("TLS write: {e}"),
        }
        return;
    }
    while conn.out_pos < conn.out.len() {
        match conn.sock.write(&conn.out[conn.out_pos..]) {
            Ok(0) => panic!("socket closed while writing"),
            Ok(n) => conn.out_pos += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("write: {e}"),
        }
    }
    conn.out.clear();
    conn.out_pos = 0;
}

fn read(job: &mut Job, c: usize, now_ns: u64, out: &mut Outcome, send_ready: &mut Vec<usize>) {
    loop {
        let conn = &mut job.conns[c];
        let got = match conn.tls.as_deref_mut() {
            None => conn.sock.read(&mut conn.inbuf[conn.in_len..]),
            Some(t) => tls::read_plain(
                &mut t.session,
                &mut conn.sock,
                &mut t.cipher,
                &mut conn.inbuf[conn.in_len..],
            ),
        };
        let n = match got {
            Ok(0) => panic!("connection {c} closed by the peer"),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                // What rustls wants to answer (a key update, an alert) goes out with the
                // next write, or now if nothing else is queued.
                if conn.tls.as_ref().is_some_and(|t| t.session.wants_write()) {
                    flush(conn);
                }
                return;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => panic!("read: {e}"),
        };
        conn.in_len += n;
        let mut pos = 0;
        while conn.in_len - pos >= HEADER {
            let buf = &conn.inbuf[pos..conn.in_len];
            let len = u32::from_be_bytes(buf[0..4].try_into().unwrap()) as usize;
            assert!((HEADER..=READ_BUF).contains(&len), "bad frame length {len}");
            if buf.len() < len {
                break;
            }
            let opcode = buf[5];
            // A stored message's payload starts with its inbox sequence and time.
            let body = if opcode == Opcode::InboxDeliver as u8 {
                HEADER + 16
            } else {
                HEADER
            };
            if opcode == Opcode::Ack as u8 {
                out.acks += 1;
                if job.stored {
                    if let Some(s) = conn.send_stream {
                        let seq = u64::from_be_bytes(buf[8..16].try_into().unwrap()) - 1;
                        let stream = &mut job.streams[s];
                        let w = stream.sent_at.len() as u64;
                        let sent_ns = stream.sent_at[(seq % w) as usize];
                        out.ack_latency_ns
                            .saturating_record(now_ns.saturating_sub(sent_ns).max(1));
                        stream.acked += 1;
                        send_ready.push(s);
                    }
                }
            } else if opcode == Opcode::Error as u8 {
                out.errors += 1;
            } else if len >= body + MIN_PAYLOAD {
                if body != HEADER {
                    conn.inbox_seq =
                        u64::from_be_bytes(buf[HEADER..HEADER + 8].try_into().unwrap());
                    conn.inbox_unacked += 1;
                }
                let p = &buf[body..];
                let s = u32::from_be_bytes(p[0..4].try_into().unwrap()) as usize;
                let seq = u64::from_be_bytes(p[4..12].try_into().unwrap());
                let sent_ns = u64::from_be_bytes(p[12..20].try_into().unwrap());
                out.latency_ns
                    .saturating_record(now_ns.saturating_sub(sent_ns).max(1));
                if Some(s) == conn.copy_stream {
                    out.copies += 1;
                } else if Some(s) != conn.recv_stream {
                    out.reordered += 1;
                } else if seq < conn.expected {
                    out.duplicated += 1;
                } else {
                    if seq > conn.expected {
                        out.reordered += 1;
                    }
                    conn.expected = seq + 1;
                    out.received += 1;
                    let stream = &mut job.streams[s];
                    let w = stream.receipts.len() as u64;
                    stream.receipts[(seq % w) as usize] += 1;
                    let was = stream.completed;
                    while stream.completed < stream.sent
                        && stream.receipts[(stream.completed % w) as usize] as usize
                            == stream.receivers
                    {
                        stream.receipts[(stream.completed % w) as usize] = 0;
                        stream.completed += 1;
                    }
                    if stream.completed != was {
                        send_ready.push(s);
                    }
                }
            }
            pos += len;
        }
        let conn = &mut job.conns[c];
        conn.inbuf.copy_within(pos..conn.in_len, 0);
        conn.in_len -= pos;
        // Stored mode: ack the inbox every 64 messages, as an app would in batches.
        if conn.inbox_unacked >= 64 {
            conn.inbox_unacked = 0;
            let ack =
                imrelay::proto::Frame::inbox_ack(imrelay::proto::MessageId(0), conn.inbox_seq);
            conn.out.extend_from_slice(&ack.to_bytes());
            flush(conn);
        }
    }
}
