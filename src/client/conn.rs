//! The non-blocking driver: a [`ClientCore`] plus the TCP socket it asks for.
//!
//! For an app with its own event loop (epoll, kqueue, a mobile run loop, mio). Register
//! [`Connection::raw_fd`] for readability, and for writability while
//! [`Connection::wants_write`] is true; call [`Connection::handle_ready`] when it is ready and
//! [`Connection::handle_timeout`] at [`Connection::poll_timeout`]. The socket changes on every
//! reconnect: [`Connection::socket_generation`] tells when to register the new one. Then
//! drain [`Connection::poll_event`]. Nothing here blocks, connect included.
//!
//! With `ClientConfig.tls` set (feature "tls") a rustls session sits between the socket and
//! the core, under the same readiness model: the socket is watched for writability while
//! handshake records or data wait (`wants_write`), and the core learns the link is up only
//! when the handshake is done. A failed handshake is a failed connect
//! ([`DisconnectReason::Tls`]), followed by the usual backoff.

use std::io::{self, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use socket2::{Domain, Protocol, Socket, Type};

use super::config::ClientConfig;
use super::core::{ClientCore, LinkAction, Phase};
use super::event::{DisconnectReason, Event, SendError};
use super::tls::{Secure, TlsRead};
use crate::proto::{MessageId, RoomId, UserId};
use crate::rand::Rng;

const READ_CHUNK: usize = 16 * 1024;

/// The TCP link of the moment.
#[derive(Debug)]
struct Link {
    stream: TcpStream,
    /// The TCP connect is under way.
    connecting: bool,
    /// The TLS session over the stream, if the config asks for TLS.
    tls: Option<Box<Secure>>,
    /// The core was told the link is up (TCP connected, TLS handshake done).
    up: bool,
}

impl Link {
    /// True while bytes wait for the socket: the connect, TLS records, or the core's
    /// output (which a TLS session takes only after its handshake).
    fn wants_write(&self, core_output: bool) -> bool {
        self.connecting
            || self.tls.as_ref().is_some_and(|t| t.wants_write())
            || (self.up && core_output)
    }
}

/// A client session over non-blocking TCP, driven by the app's event loop.
#[derive(Debug)]
pub struct Connection {
    core: ClientCore,
    addr: SocketAddr,
    link: Option<Link>,
    rx: BytesMut,
    generation: u64,
}

impl Connection {
    /// A client for the relay at `addr`. It starts connecting on the first `handle_timeout`
    /// (or any other call that drives it). The core's seed comes from entropy, here: the
    /// core itself never reads any.
    pub fn new(addr: SocketAddr, config: ClientConfig, now: Instant) -> Connection {
        let seed = Rng::from_entropy().next_u64();
        let mut conn = Connection {
            core: ClientCore::new(config, now, seed),
            addr,
            link: None,
            rx: BytesMut::new(),
            generation: 0,
        };
        conn.drive(now);
        conn
    }

    /// The sans-IO core, for inspection.
    pub fn core(&self) -> &ClientCore {
        &self.core
    }

    /// The socket to watch, if a link exists.
    pub fn raw_fd(&self) -> Option<RawFd> {
        self.link.as_ref().map(|l| l.stream.as_raw_fd())
    }

    /// Grows by one each time a new socket is opened.
    pub fn socket_generation(&self) -> u64 {
        self.generation
    }

    /// True while the socket should be watched for writability.
    pub fn wants_write(&self) -> bool {
        self.link
            .as_ref()
            .is_some_and(|l| l.wants_write(!self.core.output().is_empty()))
    }

    /// When to call [`handle_timeout`](Self::handle_timeout).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.core.poll_timeout()
    }

    /// The next event for the app.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.core.poll_event()
    }

    /// True once closed for good.
    pub fn is_closed(&self) -> bool {
        self.core.is_closed()
    }

    /// The socket is readable or writable: finishes a connect, reads until it would block,
    /// writes what is queued.
    pub fn handle_ready(&mut self, now: Instant) {
        if let Some(link) = &self.link {
            if link.connecting {
                match connect_result(&link.stream) {
                    Ok(true) => {
                        if let Some(l) = self.link.as_mut() {
                            l.connecting = false;
                        }
                        self.tcp_connected(now);
                    }
                    Ok(false) => return,
                    Err(e) => {
                        self.link = None;
                        self.core
                            .handle_link_error(DisconnectReason::ConnectFailed(e.to_string()), now);
                    }
                }
            }
        }
        self.read(now);
        self.drive(now);
    }

    /// Runs the core's deadlines (heartbeat, reconnect, timeouts) and acts on them.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.core.handle_timeout(now);
        self.drive(now);
    }

    /// Queues a direct message; see [`ClientCore::send`].
    pub fn send(
        &mut self,
        to: UserId,
        payload: Bytes,
        now: Instant,
    ) -> Result<MessageId, SendError> {
        let id = self.core.send(to, payload, now)?;
        self.drive(now);
        Ok(id)
    }

    /// Queues a stored message; see [`ClientCore::send_stored`].
    pub fn send_stored(
        &mut self,
        to: UserId,
        payload: Bytes,
        now: Instant,
    ) -> Result<MessageId, SendError> {
        let id = self.core.send_stored(to, payload, now)?;
        self.drive(now);
        Ok(id)
    }

    /// Joins a room (and re-joins after reconnects).
    pub fn join(&mut self, room: RoomId, now: Instant) -> Result<(), SendError> {
        self.core.join(room)?;
        self.drive(now);
        Ok(())
    }

    /// Leaves a room.
    pub fn leave(&mut self, room: RoomId, now: Instant) -> Result<(), SendError> {
        self.core.leave(room)?;
        self.drive(now);
        Ok(())
    }

    /// Sends a live room message.
    pub fn room_send(
        &mut self,
        room: RoomId,
        payload: Bytes,
        now: Instant,
    ) -> Result<(), SendError> {
        self.core.room_send(room, payload)?;
        self.drive(now);
        Ok(())
    }

    /// Asks for a room's online count.
    pub fn room_info(&mut self, room: RoomId, now: Instant) -> Result<(), SendError> {
        self.core.room_info(room)?;
        self.drive(now);
        Ok(())
    }

    /// Sends REFRESH with a new login token; see [`ClientCore::refresh_token`].
    pub fn refresh_token(&mut self, token: Vec<u8>, now: Instant) -> Result<(), SendError> {
        self.core.refresh_token(token)?;
        self.drive(now);
        Ok(())
    }

    /// Drops the link and connects again at once, skipping the backoff wait, for when the
    /// app knows the network changed (Wi-Fi to cellular): see
    /// [`ClientCore::network_changed`]. Nothing is lost: unanswered messages are resent,
    /// stored ones replayed.
    pub fn reconnect(&mut self, now: Instant) {
        self.drop_link();
        self.core.network_changed(now);
        self.drive(now);
    }

    /// The app went to the background (`false`) or came back (`true`): see
    /// [`ClientCore::set_foreground`].
    pub fn set_foreground(&mut self, foreground: bool, now: Instant) {
        self.core.set_foreground(foreground, now);
        self.drive(now);
    }

    /// Starts closing: see [`ClientCore::close`]. Keep driving until `Event::Closed`.
    pub fn close(&mut self, now: Instant) {
        self.core.close(now);
        self.drive(now);
    }

    /// Carries out the core's link actions and writes its output, until neither changes.
    fn drive(&mut self, now: Instant) {
        loop {
            while let Some(action) = self.core.poll_action(now) {
                match action {
                    LinkAction::Connect => self.start_connect(now),
                    LinkAction::Disconnect => self.drop_link(),
                }
            }
            if !self.flush(now) {
                return;
            }
        }
    }

    /// Writes queued output. Returns true if the link failed (actions to run again).
    fn flush(&mut self, now: Instant) -> bool {
        let Some(link) = self.link.as_mut() else {
            return false;
        };
        if link.connecting {
            return false;
        }
        if let Some(tls) = link.tls.as_mut() {
            return flush_tls(&mut self.core, &mut link.stream, tls, link.up, now);
        }
        while !self.core.output().is_empty() {
            match link.stream.write(self.core.output()) {
                Ok(0) => {
                    let reason = DisconnectReason::Io("wrote 0 bytes".to_string());
                    self.core.handle_link_error(reason, now);
                    return true;
                }
                Ok(n) => self.core.consume_output(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.core
                        .handle_link_error(DisconnectReason::Io(e.to_string()), now);
                    return true;
                }
            }
        }
        false
    }

    fn read(&mut self, now: Instant) {
        loop {
            let Some(link) = self.link.as_mut() else {
                return;
            };
            if link.connecting {
                return;
            }
            if let Some(tls) = link.tls.as_mut() {
                let outcome = tls.read(&mut link.stream, &mut self.rx);
                let handshaking = tls.is_handshaking();
                let finished_handshake = !link.up && !handshaking;
                match outcome {
                    TlsRead::WouldBlock | TlsRead::Progress => {
                        if finished_handshake {
                            link.up = true;
                            self.core.handle_connected(now);
                        }
                        if !self.rx.is_empty() {
                            self.core.handle_input(&mut self.rx, now);
                            if matches!(
                                self.core.phase(),
                                Phase::Waiting { .. } | Phase::Suspended | Phase::Closed
                            ) {
                                self.rx.clear();
                                return;
                            }
                        }
                        if matches!(outcome, TlsRead::WouldBlock) {
                            return;
                        }
                    }
                    TlsRead::Eof => {
                        let up = link.up;
                        self.link = None;
                        let reason = if up {
                            self.core.handle_input(&mut self.rx, now);
                            DisconnectReason::ClosedByRelay
                        } else {
                            DisconnectReason::Tls(
                                "handshake failed: the relay closed the connection".to_string(),
                            )
                        };
                        self.rx.clear();
                        self.core.handle_link_error(reason, now);
                        return;
                    }
                    TlsRead::Failed(e) => {
                        let up = link.up;
                        self.link = None;
                        self.rx.clear();
                        let reason = if up {
                            DisconnectReason::Tls(format!("error: {e}"))
                        } else {
                            DisconnectReason::Tls(format!("handshake failed: {e}"))
                        };
                        self.core.handle_link_error(reason, now);
                        return;
                    }
                }
                continue;
            }
            self.rx.reserve(READ_CHUNK);
            match crate::net::read_into(link.stream.as_raw_fd(), &mut self.rx) {
                Ok(0) => {
                    self.link = None;
                    let reason = DisconnectReason::ClosedByRelay;
                    self.core.handle_input(&mut self.rx, now);
                    self.rx.clear();
                    self.core.handle_link_error(reason, now);
                    return;
                }
                Ok(_) => {
                    self.core.handle_input(&mut self.rx, now);
                    if matches!(
                        self.core.phase(),
                        Phase::Waiting { .. } | Phase::Suspended | Phase::Closed
                    ) {
                        self.rx.clear();
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.link = None;
                    self.rx.clear();
                    self.core
                        .handle_link_error(DisconnectReason::Io(e.to_string()), now);
                    return;
                }
            }
        }
    }

    fn start_connect(&mut self, now: Instant) {
        self.rx.clear();
        self.generation += 1;
        match open_nonblocking(self.addr) {
            Ok((stream, connected)) => {
                self.link = Some(Link {
                    stream,
                    connecting: !connected,
                    tls: None,
                    up: false,
                });
                if connected {
                    self.tcp_connected(now);
                }
            }
            Err(e) => {
                self.link = None;
                self.core
                    .handle_link_error(DisconnectReason::ConnectFailed(e.to_string()), now);
            }
        }
    }
}

impl Connection {
    /// The TCP connect finished: the core is told at once, or once the TLS handshake (which
    /// starts now: the ClientHello goes out with the next flush) is done.
    fn tcp_connected(&mut self, now: Instant) {
        let session = self.new_session();
        let Some(link) = self.link.as_mut() else {
            return;
        };
        match session {
            Ok(None) => {
                link.up = true;
                self.core.handle_connected(now);
            }
            Ok(Some(tls)) => link.tls = Some(Box::new(tls)),
            Err(e) => {
                self.link = None;
                let reason = DisconnectReason::Tls(format!("cannot start a session: {e}"));
                self.core.handle_link_error(reason, now);
            }
        }
    }

    /// A TLS session for a new link, if the config asks for TLS.
    #[cfg(feature = "tls")]
    fn new_session(&self) -> Result<Option<Secure>, String> {
        self.core.config().tls.as_ref().map(Secure::new).transpose()
    }

    /// This build has no TLS.
    #[cfg(not(feature = "tls"))]
    fn new_session(&self) -> Result<Option<Secure>, String> {
        Ok(None)
    }

    /// Closes the link, with a TLS close_notify first (best effort, never blocking).
    fn drop_link(&mut self) {
        if let Some(mut link) = self.link.take() {
            if let Some(tls) = link.tls.as_mut() {
                if link.up {
                    tls.close(&mut link.stream);
                }
            }
        }
    }
}

/// Moves the core's output into the TLS session (once the handshake is done) and writes
/// the session's records to the socket until it would block. Returns true if the link
/// failed (the core was told).
fn flush_tls(
    core: &mut ClientCore,
    stream: &mut TcpStream,
    tls: &mut Secure,
    up: bool,
    now: Instant,
) -> bool {
    loop {
        if up && !core.output().is_empty() {
            match tls.send(core.output()) {
                Ok(n) => core.consume_output(n),
                Err(e) => {
                    core.handle_link_error(DisconnectReason::Tls(format!("error: {e}")), now);
                    return true;
                }
            }
        }
        if !tls.wants_write() {
            // Everything taken was written, and the session took all it could: it holds
            // up to 64 KiB, so a non-empty output here means the handshake is not done.
            return false;
        }
        match tls.write_to(stream) {
            Ok(0) => {
                core.handle_link_error(DisconnectReason::Io("wrote 0 bytes".to_string()), now);
                return true;
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                core.handle_link_error(DisconnectReason::Io(e.to_string()), now);
                return true;
            }
        }
    }
}

/// Starts a non-blocking connect. Returns the stream and whether it is already connected.
fn open_nonblocking(addr: SocketAddr) -> io::Result<(TcpStream, bool)> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    let connected = match socket.connect(&addr.into()) {
        Ok(()) => true,
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => false,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
        Err(e) => return Err(e),
    };
    let stream: TcpStream = socket.into();
    if connected {
        refuse_self_connect(&stream)?;
    }
    Ok((stream, connected))
}

/// Fails a connection to itself. With nothing listening on a loopback port in the
/// ephemeral range (a relay restarting on it), the kernel may pick that very port for the
/// client's end, and the SYN meets itself (TCP simultaneous open): the client would log in
/// to its own echo, and hold the port the relay needs to come back on.
fn refuse_self_connect(stream: &TcpStream) -> io::Result<()> {
    if stream.local_addr()? == stream.peer_addr()? {
        return Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            "connected to itself: nothing listens on the relay's port",
        ));
    }
    Ok(())
}

/// After writability: Ok(true) connected, Ok(false) still connecting, Err the failure.
fn connect_result(stream: &TcpStream) -> io::Result<bool> {
    if let Some(e) = stream.take_error()? {
        return Err(e);
    }
    match stream.peer_addr() {
        Ok(_) => refuse_self_connect(stream).map(|()| true),
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod self_connect_tests {
    use super::*;

    #[test]
    fn a_socket_connected_to_itself_is_refused() {
        // What a reconnecting client can hit by chance: bind a port, connect to it.
        let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
        socket
            .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        let me = socket.local_addr().unwrap();
        socket
            .connect(&me)
            .expect("TCP simultaneous open with itself");
        let stream: TcpStream = socket.into();
        let e = refuse_self_connect(&stream).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
        // An ordinary connection passes.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let other = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        assert!(refuse_self_connect(&other).is_ok());
    }
}
