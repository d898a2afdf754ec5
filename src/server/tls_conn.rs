//! The driver's side of TLS: a connection's first byte, reading through a
//! [`TlsSession`], encrypting the core's output, closing, and the memory sessions hold.
//!
//! A connection accepted while TLS is on starts [`Layer::Undecided`]. Its first byte is
//! peeked (not read): a TLS handshake record ([`tls::looks_like_tls`]) gives it a session;
//! anything else makes it an ordinary plaintext connection (its layer is dropped and it
//! costs nothing more), or, with `--tls-required`, closes it without a byte sent.
//!
//! Through a session the core sees only plaintext: what `receive` decrypts is handed to
//! `Relay::handle_read` as the plaintext path hands it what it read, so the core chooses
//! binary, text, HTTP or WebSocket from the decrypted bytes (`wss://` works on the same
//! port). Output goes the other way: the core's queue is offered to
//! [`TlsSession::send_vectored`] and `Relay::handle_written` is told what the session took;
//! the ciphertext is then written to the socket. The read budget counts ciphertext.
//!
//! Backpressure: a short write, WouldBlock, or the session taking nothing while its
//! ciphertext waits blocks the connection as a plaintext one is blocked (WRITABLE
//! interest, `Relay::handle_write_blocked`). While the handshake runs the session may take
//! nothing with nothing to write: the core is told the output is blocked (its queue is
//! copied out of the shared read buffer) and the next read that advances the handshake
//! flushes again.
//!
//! Closing: once the core says a connection is finished, its close_notify is queued after
//! the last records, and the socket is closed when they are written, or after
//! [`CLOSE_LINGER`] if the peer does not take them. A session error is logged once, its
//! alert written best effort, and the socket closed. The peer's close_notify is the end of
//! input, like a read of 0 bytes.
//!
//! A stalled handshake is closed by the core's login timeout, armed at accept.

use std::collections::VecDeque;
use std::io::{ErrorKind, IoSlice};
use std::time::Instant;

use bytes::BytesMut;
use log::{debug, info, warn};
use mio::net::TcpStream;

use super::tls::{self, TlsSession, MAX_RECORD_WIRE};
use super::{io, Conn, Server, MAX_IOVECS, READ_BUDGET, READ_CHUNK, WORK_BUDGET};
use crate::relay::counted;
use crate::relay::{State, CLOSE_LINGER};
use crate::ConnId;

/// What sits between a connection's socket and the core, when TLS is on.
pub(super) enum Layer {
    /// The connection has sent nothing yet: its first byte decides.
    Undecided,
    /// A TLS connection.
    Tls(Box<TlsConn>),
}

/// A TLS connection's session and the driver's bookkeeping for it.
pub(super) struct TlsConn {
    session: TlsSession,
    /// `session.held()` as last added to [`TlsState::held`].
    counted: usize,
    /// The core was last told this connection's output is blocked
    /// (`Relay::handle_write_blocked`), not that it is writable again.
    core_blocked: bool,
    /// The core is finished with the connection: close_notify is queued.
    closing: bool,
    /// Closed at this time whether or not the peer took the last records.
    close_deadline: Option<Instant>,
}

/// The driver's TLS totals and scratch space.
#[derive(Default)]
pub(super) struct TlsState {
    /// Bytes all sessions hold ([`TlsSession::held`]), summed.
    held: usize,
    /// Open TLS connections.
    sessions: usize,
    /// Connections closed for a TLS error (handshake failures included).
    failures: u64,
    /// Ciphertext read from a socket, before `receive` (one buffer, reused).
    ciphertext: BytesMut,
    /// Closing connections waiting for their last records to be taken, with their
    /// deadlines, oldest first.
    closes: VecDeque<(ConnId, Instant)>,
}

impl TlsState {
    /// Brings [`TlsState::held`] up to date with what `t`'s session holds now.
    fn sync(&mut self, t: &mut TlsConn) {
        let held = t.session.held();
        self.held = self.held - t.counted + held;
        t.counted = held;
    }

    /// The earliest deadline of a closing TLS connection.
    pub(super) fn next_close_deadline(&self) -> Option<Instant> {
        self.closes.front().map(|&(_, at)| at)
    }

    /// The connection's socket is about to close: forget its session, and write what it
    /// can say last (close_notify, or the alert of its error), best effort.
    pub(super) fn goodbye(&mut self, layer: Layer, stream: &mut TcpStream) {
        let Layer::Tls(mut t) = layer else {
            return;
        };
        self.held -= t.counted;
        self.sessions -= 1;
        if t.session.error().is_none() {
            t.session.close_notify();
        }
        if t.session.wants_write() {
            let _ = t.session.write_to(stream);
        }
    }
}

impl Server {
    /// Bytes all TLS sessions hold now: ciphertext waiting for the sockets, and plaintext
    /// taken before a handshake completed. The driver hands it to the core once per loop
    /// turn (`Relay::set_driver_held`), which counts it in its memory budget.
    pub fn tls_memory_held(&self) -> usize {
        self.tls_state.held
    }

    /// Open TLS connections.
    pub fn tls_sessions(&self) -> usize {
        self.tls_state.sessions
    }

    /// The TLS part of the stats line (empty while TLS is off).
    pub(super) fn tls_stats(&self) -> String {
        if self.tls.is_none() {
            return String::new();
        }
        format!(
            "; TLS {} holding {} B (in the connection memory), {} failed",
            counted(self.tls_state.sessions, "session", "sessions"),
            self.tls_state.held,
            self.tls_state.failures
        )
    }

    /// `read_conn` for a connection with a [`Layer`]: decides an undecided one from its
    /// first byte, then reads through its session.
    pub(super) fn read_layered(&mut self, id: ConnId, now: Instant) {
        let Some(conn) = self.conns.get_mut(id.0).and_then(Option::as_mut) else {
            return;
        };
        if matches!(conn.layer, Some(Layer::Undecided)) {
            let mut first = [0u8; 1];
            let peeked = loop {
                match conn.stream.peek(&mut first) {
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    result => break result,
                }
            };
            match peeked {
                Ok(0) => {
                    self.relay.handle_eof(id, now);
                    return;
                }
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    info!("{}: read failed: {e}", self.relay.conn_label(id));
                    self.close_conn(id);
                    return;
                }
            }
            let config = self.tls.as_ref().filter(|_| tls::looks_like_tls(first[0]));
            match config {
                Some(config) => match TlsSession::new(config.clone()) {
                    Ok(session) => {
                        debug!("{}: TLS", self.relay.conn_label(id));
                        conn.layer = Some(Layer::Tls(Box::new(TlsConn {
                            session,
                            counted: 0,
                            core_blocked: false,
                            closing: false,
                            close_deadline: None,
                        })));
                        self.tls_state.sessions += 1;
                    }
                    Err(e) => {
                        warn!(
                            "{}: cannot start a TLS session: {e}",
                            self.relay.conn_label(id)
                        );
                        self.close_conn(id);
                        return;
                    }
                },
                None if self.tls_required => {
                    info!(
                        "{}: not TLS (first byte {:#04x}) and TLS is required; closing",
                        self.relay.conn_label(id),
                        first[0]
                    );
                    // Read what came, so the close is a FIN rather than a reset.
                    let scratch = &mut self.tls_state.ciphertext;
                    scratch.clear();
                    scratch.reserve(READ_BUDGET);
                    let _ = io::read_at_most(io::fd(&conn.stream), scratch, READ_BUDGET);
                    scratch.clear();
                    self.close_conn(id);
                    return;
                }
                None => {
                    // Plaintext from now on, at plaintext's cost.
                    conn.layer = None;
                    self.read_conn(id, now);
                    return;
                }
            }
        }
        self.read_tls(id, now);
    }

    /// Reads ciphertext until WouldBlock or the budgets, hands the plaintext to the core,
    /// then flushes if the session has something to say (a handshake flight) or the core
    /// has output the handshake held back.
    fn read_tls(&mut self, id: ConnId, now: Instant) {
        let Some(conn) = self.conns.get_mut(id.0).and_then(Option::as_mut) else {
            return;
        };
        let mut budget = conn.read_budget();
        let Some(Layer::Tls(t)) = conn.layer.as_mut() else {
            return;
        };
        let fd = io::fd(&conn.stream);
        let mut heavy = None;
        let mut failed: Option<String> = None;
        self.relay.take_work();
        loop {
            let ciphertext = &mut self.tls_state.ciphertext;
            ciphertext.clear();
            ciphertext.reserve(READ_BUDGET);
            match io::read_at_most(fd, ciphertext, budget) {
                Ok(0) => {
                    self.relay.handle_eof(id, now);
                    break;
                }
                Ok(n) => {
                    // `receive` appends at most its input plus one record.
                    if self.read_buf.capacity() - self.read_buf.len() < n + MAX_RECORD_WIRE {
                        self.read_buf.reserve(READ_CHUNK);
                    }
                    match t.session.receive(ciphertext, &mut self.read_buf) {
                        Ok(0) => {}
                        Ok(_) => self.relay.handle_read(id, &mut self.read_buf, now),
                        Err(e) => {
                            // Records before the bad one count, as bytes read before a
                            // failed read do.
                            if !self.read_buf.is_empty() {
                                self.relay.handle_read(id, &mut self.read_buf, now);
                            }
                            self.tls_state.failures += 1;
                            failed = Some(e.to_string());
                            break;
                        }
                    }
                    if t.session.peer_closed() {
                        self.relay.handle_eof(id, now);
                        break;
                    }
                    if !self.relay.wants_read(id) {
                        break;
                    }
                    budget = budget.saturating_sub(n);
                    if budget == 0 || self.relay.take_work() >= WORK_BUDGET {
                        heavy = Some(true);
                        break;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    heavy = Some(false);
                    break;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    failed = Some(format!("read failed: {e}"));
                    break;
                }
            }
        }
        self.read_buf.clear();
        self.tls_state.ciphertext.clear();
        self.tls_state.sync(t);
        if let Some(reason) = failed {
            info!("{}: {reason}; closing", self.relay.conn_label(id));
            self.close_conn(id);
            return;
        }
        let flush = t.session.wants_write() || (t.core_blocked && !conn.writable);
        if let Some(heavy) = heavy {
            self.mark_heavy(id, heavy);
        }
        if flush {
            self.flush_tls(id);
        }
    }

    /// `flush_conn` for a connection with a [`Layer`].
    pub(super) fn flush_layered(&mut self, id: ConnId) {
        let Some(conn) = self.conns.get_mut(id.0).and_then(Option::as_mut) else {
            return;
        };
        match conn.layer {
            Some(Layer::Tls(_)) => self.flush_tls(id),
            // Nothing goes out before TLS when it is required: the core only ever queues
            // an ERROR and closes such a connection (login timeout, shutdown).
            Some(Layer::Undecided) if self.tls_required => {
                let closing = self.relay.state(id) == Some(State::Closing);
                if closing {
                    self.close_conn(id);
                }
            }
            Some(Layer::Undecided) => {
                // As plaintext (a binary ERROR: section 2 of protocol.md), still undecided.
                conn.layer = None;
                self.flush_conn(id);
                if let Some(conn) = self.conns.get_mut(id.0).and_then(Option::as_mut) {
                    conn.layer = Some(Layer::Undecided);
                }
            }
            None => {}
        }
    }

    /// The socket of `id` is writable again (the core has been told): a TLS connection
    /// writes its pending ciphertext, which the core's flush list does not know about.
    pub(super) fn tls_writable(&mut self, id: ConnId) {
        let Some(Some(Conn {
            layer: Some(Layer::Tls(t)),
            ..
        })) = self.conns.get_mut(id.0)
        else {
            return;
        };
        t.core_blocked = false;
        self.flush_tls(id);
    }

    /// Closes the closing TLS connections whose peers did not take their last records in
    /// time.
    pub(super) fn expire_tls_closes(&mut self, now: Instant) {
        while let Some(&(id, at)) = self.tls_state.closes.front() {
            if at > now {
                break;
            }
            self.tls_state.closes.pop_front();
            let due = matches!(
                self.conns.get(id.0),
                Some(Some(Conn { layer: Some(Layer::Tls(t)), .. })) if t.close_deadline == Some(at)
            );
            if due {
                info!(
                    "{}: the peer did not take the end of its TLS stream in time; closing",
                    self.relay.conn_label(id)
                );
                self.close_conn(id);
            }
        }
    }

    /// Offers the core's output to the session and writes the ciphertext, until
    /// everything is written or the socket (or the session, or the handshake) takes no
    /// more; then closes the connection if the core is finished with it, or registers the
    /// interest the rest needs.
    fn flush_tls(&mut self, id: ConnId) {
        let max_memory = self.relay.config().max_memory;
        let Some(conn) = self.conns.get_mut(id.0).and_then(Option::as_mut) else {
            return;
        };
        let Some(Layer::Tls(t)) = conn.layer.as_mut() else {
            return;
        };
        let mut blocked = false;
        let mut failed: Option<String> = None;
        loop {
            let mut took = 0;
            if let Some(out) = self
                .relay
                .output(id)
                .filter(|o| !o.is_empty() && !t.closing)
            {
                // Over the memory budget, a session that still has ciphertext to write
                // takes no more: the rest waits in the core's queue, where it is counted.
                let tight =
                    t.session.pending_ciphertext_len() > 0 && self.relay.memory_held() > max_memory;
                if !tight {
                    let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
                    let n = out.chunks(&mut slices);
                    match t.session.send_vectored(&slices[..n]) {
                        Ok(n) => took = n,
                        Err(e) => {
                            failed = Some(e.to_string());
                            break;
                        }
                    }
                }
            }
            if took > 0 {
                self.relay.handle_written(id, took);
            }
            if t.session.wants_write() {
                let pending = t.session.pending_ciphertext_len();
                match t.session.write_to(&mut conn.stream) {
                    Ok(0) => {
                        failed = Some("socket accepted no bytes".to_owned());
                        break;
                    }
                    // A short write: the send buffer is full, wait for WRITABLE.
                    Ok(n) if n < pending => {
                        blocked = true;
                        break;
                    }
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        blocked = true;
                        break;
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => {
                        debug!("{}: write failed: {e}", self.relay.conn_label(id));
                        failed = Some(format!("write failed: {e}"));
                        break;
                    }
                }
            } else if took == 0 {
                break;
            }
        }
        if failed.is_none() && self.relay.is_finished(id) {
            if !t.closing {
                t.closing = true;
                t.session.close_notify();
                while t.session.wants_write() {
                    match t.session.write_to(&mut conn.stream) {
                        Ok(n) if n > 0 => {}
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        _ => break,
                    }
                }
            }
            if !t.session.wants_write() {
                self.tls_state.sync(t);
                self.close_conn(id);
                return;
            }
            if t.close_deadline.is_none() {
                let at = Instant::now() + CLOSE_LINGER;
                t.close_deadline = Some(at);
                self.tls_state.closes.push_back((id, at));
            }
            blocked = true;
        }
        self.tls_state.sync(t);
        if let Some(reason) = failed {
            info!("{}: {reason}; closing", self.relay.conn_label(id));
            self.close_conn(id);
            return;
        }
        // Output left in the core's queue waits like a blocked socket's: copied out of the
        // shared read buffer, and flushed again on WRITABLE or when the handshake moves.
        let held_back = blocked || self.relay.output(id).is_some_and(|o| !o.is_empty());
        if held_back && !t.core_blocked {
            t.core_blocked = true;
            self.relay.handle_write_blocked(id);
        } else if !held_back && t.core_blocked {
            t.core_blocked = false;
            self.relay.handle_writable(id);
        }
        self.want_writable(id, blocked);
    }
}
