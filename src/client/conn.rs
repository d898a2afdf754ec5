//! The non-blocking driver: a [`ClientCore`] plus the TCP socket it asks for.
//!
//! For an app with its own event loop (epoll, kqueue, a mobile run loop, mio). Register
//! [`Connection::raw_fd`] for readability, and for writability while
//! [`Connection::wants_write`] is true; call [`Connection::handle_ready`] when it is ready and
//! [`Connection::handle_timeout`] at [`Connection::poll_timeout`]. The socket changes on every
//! reconnect: [`Connection::socket_generation`] tells when to register the new one. Then
//! drain [`Connection::poll_event`]. Nothing here blocks, connect included.

use std::io::{self, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use socket2::{Domain, Protocol, Socket, Type};

use super::config::ClientConfig;
use super::core::{ClientCore, LinkAction, Phase};
use super::event::{DisconnectReason, Event, SendError};
use crate::proto::{MessageId, RoomId, UserId};
use crate::rand::Rng;

const READ_CHUNK: usize = 16 * 1024;

/// The TCP link of the moment.
#[derive(Debug)]
struct Link {
    stream: TcpStream,
    connecting: bool,
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
            .is_some_and(|l| l.connecting || !self.core.output().is_empty())
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
                        self.core.handle_connected(now);
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

    /// Drops the link and connects again at once (after the usual backoff step), for when
    /// the app knows the network changed (Wi-Fi to cellular). Nothing is lost: unanswered
    /// messages are resent, stored ones replayed.
    pub fn reconnect(&mut self, now: Instant) {
        self.link = None;
        self.core.handle_link_error(
            DisconnectReason::Io("reconnect requested by the app".to_string()),
            now,
        );
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
                    LinkAction::Disconnect => self.link = None,
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
                    if matches!(self.core.phase(), Phase::Waiting { .. } | Phase::Closed) {
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
                });
                if connected {
                    self.core.handle_connected(now);
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
    Ok((socket.into(), connected))
}

/// After writability: Ok(true) connected, Ok(false) still connecting, Err the failure.
fn connect_result(stream: &TcpStream) -> io::Result<bool> {
    if let Some(e) = stream.take_error()? {
        return Err(e);
    }
    match stream.peer_addr() {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
        Err(e) => Err(e),
    }
}
