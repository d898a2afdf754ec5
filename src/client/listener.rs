//! The callback style: [`Listener`], a network thread owned by the SDK that runs a
//! [`SharedClient`] and hands each event to the app's closure, for apps that would rather
//! be called than poll.
//!
//! Guarantees: the closure runs on that one thread only, for one event at a time (never
//! concurrently with itself), in the order the client produced the events; `Closed` is its
//! last call, and once [`Listener::stop`] returns it is never called again. The client's
//! lock is not held while it runs, so it may call the client (send, join, close...). It
//! should return quickly: while it runs, the link is not read.

use std::cell::Cell;
use std::io;
use std::sync::Arc;
use std::thread::{self, JoinHandle, ThreadId};
use std::time::Duration;

use super::event::Event;
use super::shared::{Polled, SharedClient};

/// How long one poll of the network thread lasts when nothing happens. Any change to the
/// client wakes it sooner (see `shared.rs`); this is only the loop's heartbeat.
const IDLE_POLL: Duration = Duration::from_secs(3600);

thread_local! {
    /// On a listener's network thread, its id: that thread must not wait for itself to
    /// end. (Kept here because asking for `thread::current()` on a C app's thread gives it
    /// a handle that outlives it.)
    static NETWORK_THREAD: Cell<Option<ThreadId>> = const { Cell::new(None) };
}

/// An SDK-owned thread delivering a client's events to a closure. Stops (closing the
/// client and waiting for `Closed` to be delivered) on [`stop`](Self::stop) or drop.
#[derive(Debug)]
pub struct Listener {
    client: Arc<SharedClient>,
    thread: Option<JoinHandle<()>>,
}

impl Listener {
    /// Starts the thread. From now on it takes every event of `client`: do not poll the
    /// client elsewhere while it runs (the events would be split between the two).
    pub fn start(
        client: Arc<SharedClient>,
        mut listener: impl FnMut(Event) + Send + 'static,
    ) -> io::Result<Listener> {
        let polled = Arc::clone(&client);
        let thread = thread::Builder::new()
            .name("imrelay-listener".to_string())
            .spawn(move || {
                NETWORK_THREAD.with(|id| id.set(Some(thread::current().id())));
                loop {
                    match polled.poll_event(IDLE_POLL) {
                        Polled::Event(event) => {
                            let closed = event == Event::Closed;
                            listener(event);
                            if closed {
                                return;
                            }
                        }
                        Polled::TimedOut => {}
                        Polled::Finished => return,
                    }
                }
            })?;
        Ok(Listener {
            client,
            thread: Some(thread),
        })
    }

    /// The client, to send with (from any thread, the listener included).
    pub fn client(&self) -> &Arc<SharedClient> {
        &self.client
    }

    /// The network thread's id: the listener runs there.
    pub fn thread_id(&self) -> Option<ThreadId> {
        self.thread.as_ref().map(|t| t.thread().id())
    }

    /// Closes the client and waits until the listener got its last event (`Closed`; the
    /// answers to messages in flight come first, within the client's close deadline).
    /// Returns `Err` if the listener panicked. Called on the network thread itself (from
    /// the listener), it only closes: the thread ends after `Closed`.
    pub fn stop(mut self) -> thread::Result<()> {
        self.finish()
    }

    fn finish(&mut self) -> thread::Result<()> {
        self.client.close();
        match self.thread.take() {
            Some(t) if NETWORK_THREAD.with(Cell::get) != Some(t.thread().id()) => t.join(),
            _ => Ok(()),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        // A panic in the listener was the app's; it already printed.
        let _ = self.finish();
    }
}
