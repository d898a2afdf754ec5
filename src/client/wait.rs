//! How the SDK blocks on a link: the receive loop that [`Client::recv`] and
//! [`SharedClient::poll_event`] share, and its one blocking call, poll(2) on the link's
//! socket (plus, for the shared handle, the read end of its wake pipe).
//!
//! The loop is split in two so the shared handle can hold its lock around the first part
//! only: [`RecvLoop::turn`] runs the [`Connection`] (what the last wait saw, deadlines, the
//! next event) and says what to wait for; [`RecvLoop::wait`] blocks and touches nothing but
//! the file descriptors it was given.
//!
//! [`Client::recv`]: super::Client::recv
//! [`SharedClient::poll_event`]: super::SharedClient::poll_event

use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use super::conn::Connection;
use super::event::Event;

/// What [`RecvLoop::turn`] decided.
#[derive(Debug)]
pub(super) enum Turn {
    /// The next event for the app.
    Event(Event),
    /// The timeout passed without an event.
    TimedOut,
    /// The client is closed and every event was taken: nothing will ever come.
    Finished,
    /// Nothing yet: block until this.
    Wait(WaitFor),
}

/// What to block on: the socket of the moment (if any) and for how long.
#[derive(Debug, Clone, Copy)]
pub(super) struct WaitFor {
    fd: Option<RawFd>,
    write: bool,
    wait: Duration,
}

/// What a wait saw.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Woken {
    /// The wake pipe is readable: another thread changed the client.
    pub(super) wake: bool,
}

/// One call of a blocking receive: its deadline, and what the last wait saw.
#[derive(Debug)]
pub(super) struct RecvLoop {
    deadline: Instant,
    /// A wait happened: with a zero timeout the socket is still checked once.
    waited: bool,
    /// The last wait saw the socket ready.
    socket_ready: bool,
}

impl RecvLoop {
    /// A receive that gives up `timeout` from now.
    pub(super) fn new(timeout: Duration) -> RecvLoop {
        RecvLoop {
            deadline: Instant::now() + timeout,
            waited: false,
            socket_ready: false,
        }
    }

    /// Runs the connection: acts on what the last wait saw (socket I/O, deadlines), then
    /// returns the next event, or says the time is up, or what to wait for. Never blocks.
    pub(super) fn turn(&mut self, conn: &mut Connection) -> Turn {
        if self.waited {
            if self.socket_ready {
                conn.handle_ready(Instant::now());
            }
            conn.handle_timeout(Instant::now());
        }
        if let Some(event) = conn.poll_event() {
            return Turn::Event(event);
        }
        if conn.is_closed() {
            return Turn::Finished;
        }
        let now = Instant::now();
        if now >= self.deadline && self.waited {
            return Turn::TimedOut;
        }
        let wake = conn
            .poll_timeout()
            .map_or(self.deadline, |t| t.min(self.deadline));
        Turn::Wait(WaitFor {
            fd: conn.raw_fd(),
            write: conn.wants_write(),
            wait: wake.saturating_duration_since(now),
        })
    }

    /// Blocks in poll(2) until the socket in `what` is ready, `wake_fd` (the read end of a
    /// wake pipe) is readable, or the wait is over. The socket may have been closed by
    /// another thread meanwhile: the one that did so writes to the wake pipe after, so the
    /// wait ends and the next [`turn`](Self::turn) looks at the link of the moment.
    pub(super) fn wait(&mut self, what: WaitFor, wake_fd: Option<RawFd>) -> Woken {
        let mut fds = [libc::pollfd {
            fd: -1,
            events: 0,
            revents: 0,
        }; 2];
        // poll(2) ignores entries with a negative fd.
        if let Some(fd) = what.fd {
            fds[0].fd = fd;
            fds[0].events = libc::POLLIN | if what.write { libc::POLLOUT } else { 0 };
        }
        if let Some(fd) = wake_fd {
            fds[1].fd = fd;
            fds[1].events = libc::POLLIN;
        }
        // Round up so a sub-millisecond wait does not spin.
        let millis = what.wait.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
        // SAFETY: two valid pollfd entries, count 2.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, millis) };
        self.waited = true;
        // n < 0 (EINTR): nothing is known to be ready; the next turn checks the clock.
        self.socket_ready = n > 0 && what.fd.is_some() && fds[0].revents != 0;
        Woken {
            wake: n > 0 && wake_fd.is_some() && fds[1].revents != 0,
        }
    }
}
