//! The handle any thread may use: [`SharedClient`], a [`Connection`] behind a mutex plus
//! a wake pipe (`wake.rs`), so one thread can block in [`SharedClient::poll_event`] while
//! others send, join rooms, refresh the token or close.
//!
//! Lock scope: the mutex is held only while the connection runs (the core, and the
//! non-blocking socket reads and writes it asks for), never across the blocking wait:
//! the receive loop (`wait.rs`) runs a turn under the lock, lets go, then blocks in
//! poll(2) on the socket and the wake pipe. Every call that changes the client wakes the
//! pipe after letting go of the lock, so a blocked poll returns as soon as there is
//! something to write, a new deadline, a new socket, or an event (the `Closed` one after
//! [`SharedClient::close`], say).
//!
//! Several threads may poll at once: each event goes to exactly one of them.

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::blocking::{Client, ConnectError};
use super::config::ClientConfig;
use super::conn::Connection;
use super::core::Phase;
use super::event::{Event, SendError};
use super::wait::{RecvLoop, Turn};
use super::wake::Waker;
use crate::proto::{LoginOk, MessageId, RoomId, UserId};

/// What [`SharedClient::poll_event`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Polled {
    /// The next event.
    Event(Event),
    /// No event within the timeout.
    TimedOut,
    /// The client is closed and its last event (`Closed`) was taken, by this thread or
    /// another: nothing more will come. Returned at once.
    Finished,
}

/// A client that is `Send + Sync`: share it (in an `Arc`) between a thread blocked in
/// [`poll_event`](Self::poll_event) and threads that send. See the module docs.
#[derive(Debug)]
pub struct SharedClient {
    conn: Mutex<Connection>,
    waker: Waker,
    /// Threads between letting go of the lock and coming back from poll(2), so a test
    /// can act while a poll is blocked (without sleeping to guess when it is).
    #[cfg(test)]
    pub(super) waiting: std::sync::atomic::AtomicUsize,
    /// Waits ended by the wake pipe, so a test can tell a woken poll from one that ran
    /// out its timeout (and then found the event anyway).
    #[cfg(test)]
    pub(super) woken: std::sync::atomic::AtomicUsize,
}

impl SharedClient {
    /// Starts a client that connects (and reconnects) by itself; returns at once. Fails
    /// only if the wake pipe cannot be made (out of file descriptors).
    pub fn start(addr: SocketAddr, config: ClientConfig) -> io::Result<SharedClient> {
        let waker = Waker::new()?;
        Ok(SharedClient::with_waker(Client::start(addr, config), waker))
    }

    /// Connects and logs in, waiting up to `timeout`, as [`Client::connect`] does.
    pub fn connect(
        addr: impl ToSocketAddrs,
        config: ClientConfig,
        timeout: Duration,
    ) -> Result<(SharedClient, LoginOk), ConnectError> {
        let waker = Waker::new().map_err(ConnectError::Wake)?;
        let (client, limits) = Client::connect(addr, config, timeout)?;
        Ok((SharedClient::with_waker(client, waker), limits))
    }

    /// A blocking client, made shareable: no event or message is lost in the move.
    pub fn from_client(client: Client) -> io::Result<SharedClient> {
        Ok(SharedClient::with_waker(client, Waker::new()?))
    }

    fn with_waker(client: Client, waker: Waker) -> SharedClient {
        SharedClient {
            conn: Mutex::new(client.into_connection()),
            waker,
            #[cfg(test)]
            waiting: std::sync::atomic::AtomicUsize::new(0),
            #[cfg(test)]
            woken: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// The connection, for one short run. A panic under the lock (caught at the C
    /// boundary) leaves the connection as it was at that point: memory-safe, and the core
    /// keeps its own invariants call by call, so the poison is ignored.
    fn lock(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `change` on the connection, then wakes a blocked poll to look at it.
    fn change<T>(&self, change: impl FnOnce(&mut Connection, Instant) -> T) -> T {
        let out = {
            let mut conn = self.lock();
            change(&mut conn, Instant::now())
        };
        self.waker.wake();
        out
    }

    /// Queues a direct message; it ends as one `Delivered` or `Failed` event with this id.
    pub fn send(&self, to: UserId, payload: impl Into<Bytes>) -> Result<MessageId, SendError> {
        let payload = payload.into();
        self.change(|c, now| c.send(to, payload, now))
    }

    /// Queues a stored message; it ends as one `Stored` or `Failed` event with this id.
    pub fn send_stored(
        &self,
        to: UserId,
        payload: impl Into<Bytes>,
    ) -> Result<MessageId, SendError> {
        let payload = payload.into();
        self.change(|c, now| c.send_stored(to, payload, now))
    }

    /// Joins a room (re-joined after every reconnect).
    pub fn join(&self, room: RoomId) -> Result<(), SendError> {
        self.change(|c, now| c.join(room, now))
    }

    /// Leaves a room.
    pub fn leave(&self, room: RoomId) -> Result<(), SendError> {
        self.change(|c, now| c.leave(room, now))
    }

    /// Sends a live room message.
    pub fn room_send(&self, room: RoomId, payload: impl Into<Bytes>) -> Result<(), SendError> {
        let payload = payload.into();
        self.change(|c, now| c.room_send(room, payload, now))
    }

    /// Asks for a room's online count.
    pub fn room_info(&self, room: RoomId) -> Result<(), SendError> {
        self.change(|c, now| c.room_info(room, now))
    }

    /// Sends REFRESH with a new login token; see [`ClientCore::refresh_token`].
    ///
    /// [`ClientCore::refresh_token`]: super::ClientCore::refresh_token
    pub fn refresh_token(&self, token: Vec<u8>) -> Result<(), SendError> {
        self.change(|c, now| c.refresh_token(token, now))
    }

    /// Drops the link and connects again (see [`Connection::reconnect`]).
    pub fn reconnect(&self) {
        self.change(|c, now| c.reconnect(now));
    }

    /// The app went to the background (`false`) or came back to the foreground (`true`):
    /// see [`ClientCore::set_foreground`](super::ClientCore::set_foreground). Any thread.
    pub fn set_foreground(&self, foreground: bool) {
        self.change(|c, now| c.set_foreground(foreground, now));
    }

    /// Starts closing and returns at once: messages never written fail now, those in
    /// flight get their answers, then `Closed` comes out of [`poll_event`](Self::poll_event)
    /// (a poll blocked in another thread returns with these events). Calling it again does
    /// nothing.
    pub fn close(&self) {
        self.change(|c, now| c.close(now));
    }

    /// Closes and waits (up to `timeout`) for the answers to messages in flight, taking
    /// the events itself: for when no other thread polls. Returns them, `Closed` last.
    pub fn close_and_drain(&self, timeout: Duration) -> Vec<Event> {
        self.close();
        let deadline = Instant::now() + timeout;
        let mut events = Vec::new();
        while let Polled::Event(event) =
            self.poll_event(deadline.saturating_duration_since(Instant::now()))
        {
            let closed = event == Event::Closed;
            events.push(event);
            if closed {
                break;
            }
        }
        events
    }

    /// Where the link is now.
    pub fn phase(&self) -> Phase {
        self.lock().core().phase()
    }

    /// Messages sent and not yet answered.
    pub fn pending(&self) -> usize {
        self.lock().core().pending()
    }

    /// True once closed for good (the `Closed` event may still wait to be taken).
    pub fn is_closed(&self) -> bool {
        self.lock().is_closed()
    }

    /// Runs the link until an event is ready or `timeout` passes (a zero timeout still
    /// checks the socket once). Returns as soon as another thread's call gives it something
    /// to do. May be called from several threads at once; each event goes to one of them.
    pub fn poll_event(&self, timeout: Duration) -> Polled {
        let mut recv = RecvLoop::new(timeout);
        loop {
            let turn = recv.turn(&mut self.lock());
            let what = match turn {
                Turn::Event(event) => {
                    if event == Event::Closed {
                        // Other pollers: nothing more will come.
                        self.waker.wake();
                    }
                    return Polled::Event(event);
                }
                Turn::TimedOut => return Polled::TimedOut,
                Turn::Finished => return Polled::Finished,
                Turn::Wait(what) => what,
            };
            // The lock is released: others may change the client while this thread waits.
            #[cfg(test)]
            self.waiting
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let woken = recv.wait(what, Some(self.waker.fd()));
            #[cfg(test)]
            self.waiting
                .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            if woken.wake {
                #[cfg(test)]
                self.woken.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                self.waker.drain();
            }
        }
    }

    /// [`poll_event`](Self::poll_event) as an `Option`, like [`Client::recv`].
    pub fn recv(&self, timeout: Duration) -> Option<Event> {
        match self.poll_event(timeout) {
            Polled::Event(event) => Some(event),
            Polled::TimedOut | Polled::Finished => None,
        }
    }
}

/// The point of this type: a compile error if the connection stops being `Send`.
const _: () = {
    const fn shareable<T: Send + Sync>() {}
    shareable::<SharedClient>();
};
