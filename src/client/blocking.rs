//! The blocking client: a [`Connection`] that waits on its own socket with poll(2)
//! (the wait itself lives in `wait.rs`, shared with [`SharedClient`](super::SharedClient)).
//!
//! For simple single-threaded programs and tests (the C ABI and threaded apps use
//! [`SharedClient`](super::SharedClient)): `send` returns at once with the message id,
//! `recv(timeout)` runs the link (connect, heartbeat, reconnect, resend) until an event
//! comes or the timeout passes.

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::config::ClientConfig;
use super::conn::Connection;
use super::core::Phase;
use super::event::{DisconnectReason, Event, SendError};
use super::wait::{RecvLoop, Turn};
use crate::proto::{LoginOk, MessageId, RoomId, UserId};

/// Why [`Client::connect`] gave up.
#[derive(Debug)]
pub enum ConnectError {
    /// The address did not resolve.
    Resolve(io::Error),
    /// The first attempt failed (the client would have retried; this call does not).
    Link(DisconnectReason),
    /// Nothing happened within the timeout.
    Timeout,
    /// The configuration cannot work (user id 0).
    InvalidConfig,
    /// [`SharedClient`](super::SharedClient) could not make its wake pipe (out of file
    /// descriptors, say).
    Wake(io::Error),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Resolve(e) => write!(f, "cannot resolve the relay address: {e}"),
            ConnectError::Link(reason) => write!(f, "{reason}"),
            ConnectError::Timeout => write!(f, "not logged in within the timeout"),
            ConnectError::InvalidConfig => write!(f, "user id 0 is reserved"),
            ConnectError::Wake(e) => write!(f, "cannot make the wake pipe: {e}"),
        }
    }
}

impl std::error::Error for ConnectError {}

/// A client that blocks in [`Client::recv`].
#[derive(Debug)]
pub struct Client {
    conn: Connection,
}

impl Client {
    /// Starts a client that connects (and reconnects) by itself; returns at once.
    pub fn start(addr: SocketAddr, config: ClientConfig) -> Client {
        Client {
            conn: Connection::new(addr, config, Instant::now()),
        }
    }

    /// Connects and logs in, waiting up to `timeout`. Fails on the first failed attempt;
    /// after that the client reconnects by itself whenever the link dies.
    pub fn connect(
        addr: impl ToSocketAddrs,
        config: ClientConfig,
        timeout: Duration,
    ) -> Result<(Client, LoginOk), ConnectError> {
        let addr = addr
            .to_socket_addrs()
            .map_err(ConnectError::Resolve)?
            .next()
            .ok_or_else(|| {
                ConnectError::Resolve(io::Error::new(io::ErrorKind::NotFound, "no address"))
            })?;
        let mut client = Client::start(addr, config);
        match client.recv(timeout) {
            Some(Event::Connected { limits, .. }) => Ok((client, limits)),
            Some(Event::Disconnected { reason, .. }) => Err(ConnectError::Link(reason)),
            Some(Event::Closed) => Err(ConnectError::InvalidConfig),
            Some(_) | None => Err(ConnectError::Timeout),
        }
    }

    /// Queues a direct message; it ends as one `Delivered` or `Failed` event with this id.
    pub fn send(&mut self, to: UserId, payload: impl Into<Bytes>) -> Result<MessageId, SendError> {
        self.conn.send(to, payload.into(), Instant::now())
    }

    /// Queues a stored message: kept by the relay until the recipient's app has it. It
    /// ends as one `Stored` or `Failed` event with this id.
    pub fn send_stored(
        &mut self,
        to: UserId,
        payload: impl Into<Bytes>,
    ) -> Result<MessageId, SendError> {
        self.conn.send_stored(to, payload.into(), Instant::now())
    }

    /// Joins a room (re-joined after every reconnect).
    pub fn join(&mut self, room: RoomId) -> Result<(), SendError> {
        self.conn.join(room, Instant::now())
    }

    /// Leaves a room.
    pub fn leave(&mut self, room: RoomId) -> Result<(), SendError> {
        self.conn.leave(room, Instant::now())
    }

    /// Sends a live room message.
    pub fn room_send(&mut self, room: RoomId, payload: impl Into<Bytes>) -> Result<(), SendError> {
        self.conn.room_send(room, payload.into(), Instant::now())
    }

    /// Asks for a room's online count.
    pub fn room_info(&mut self, room: RoomId) -> Result<(), SendError> {
        self.conn.room_info(room, Instant::now())
    }

    /// Sends REFRESH with a new login token; see [`ClientCore::refresh_token`].
    ///
    /// [`ClientCore::refresh_token`]: super::ClientCore::refresh_token
    pub fn refresh_token(&mut self, token: Vec<u8>) -> Result<(), SendError> {
        self.conn.refresh_token(token, Instant::now())
    }

    /// Drops the link and connects again (see [`Connection::reconnect`]).
    pub fn reconnect(&mut self) {
        self.conn.reconnect(Instant::now());
    }

    /// The app went to the background (`false`) or came back to the foreground (`true`):
    /// see [`ClientCore::set_foreground`](super::ClientCore::set_foreground).
    pub fn set_foreground(&mut self, foreground: bool) {
        self.conn.set_foreground(foreground, Instant::now());
    }

    /// The connection inside, for [`SharedClient`](super::SharedClient).
    pub(super) fn into_connection(self) -> Connection {
        self.conn
    }

    /// Where the link is now.
    pub fn phase(&self) -> Phase {
        self.conn.core().phase()
    }

    /// Messages sent and not yet answered.
    pub fn pending(&self) -> usize {
        self.conn.core().pending()
    }

    /// True once closed for good.
    pub fn is_closed(&self) -> bool {
        self.conn.is_closed()
    }

    /// Runs the link until an event is ready or `timeout` passes. Once the client is
    /// closed and its events (`Closed` last) were taken, returns `None` at once.
    pub fn recv(&mut self, timeout: Duration) -> Option<Event> {
        let mut recv = RecvLoop::new(timeout);
        loop {
            match recv.turn(&mut self.conn) {
                Turn::Event(event) => return Some(event),
                Turn::TimedOut | Turn::Finished => return None,
                Turn::Wait(what) => {
                    recv.wait(what, None);
                }
            }
        }
    }

    /// Closes the session and waits (up to `timeout`) for the answers to messages in
    /// flight. Returns every event that came meanwhile, `Closed` last.
    pub fn close(&mut self, timeout: Duration) -> Vec<Event> {
        self.conn.close(Instant::now());
        let deadline = Instant::now() + timeout;
        let mut events = Vec::new();
        while let Some(event) = self.recv(deadline.saturating_duration_since(Instant::now())) {
            let closed = event == Event::Closed;
            events.push(event);
            if closed {
                break;
            }
        }
        events
    }
}
