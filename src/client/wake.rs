//! The wake pipe of [`SharedClient`](super::SharedClient): how a thread that changed the
//! client (a send, a close, a reconnect) ends a poll(2) another thread is blocked in.
//!
//! A pipe rather than an eventfd so it works the same on Linux, Android, macOS and iOS.
//! Both ends are non-blocking. A flag keeps the pipe to (about) one byte however many
//! wakes come before the poller drains it; a wake is never lost because the waking thread
//! changes the client first and writes second, and the poller drains first and looks at
//! the client second (under the client's lock).

use std::io::{self, PipeReader, PipeWriter, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

/// A self-pipe: [`wake`](Waker::wake) from any thread, [`fd`](Waker::fd) in the poll set.
#[derive(Debug)]
pub(super) struct Waker {
    reader: PipeReader,
    writer: PipeWriter,
    /// A byte was written and not drained yet.
    pending: AtomicBool,
}

impl Waker {
    /// A new pipe (close-on-exec, non-blocking).
    pub(super) fn new() -> io::Result<Waker> {
        let (reader, writer) = io::pipe()?;
        set_nonblocking(reader.as_raw_fd())?;
        set_nonblocking(writer.as_raw_fd())?;
        Ok(Waker {
            reader,
            writer,
            pending: AtomicBool::new(false),
        })
    }

    /// The read end, to add to a poll(2) set for readability.
    pub(super) fn fd(&self) -> RawFd {
        self.reader.as_raw_fd()
    }

    /// Makes a poll on [`fd`](Self::fd) return, now or (if none is under way) the next
    /// one. Call it after changing the client, never before.
    pub(super) fn wake(&self) {
        if self.pending.swap(true, Ordering::SeqCst) {
            return; // a byte is in the pipe already
        }
        loop {
            match (&self.writer).write(&[1]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // Full (WouldBlock): a wake is pending anyway. Anything else cannot happen
                // while the read end lives; a lost byte would only delay, not corrupt.
                Err(e) if e.kind() != io::ErrorKind::WouldBlock => {
                    log::warn!("cannot write to the wake pipe: {e}");
                }
                _ => {}
            }
            return;
        }
    }

    /// Empties the pipe after a poll saw it readable. Call it before looking at the
    /// client, so a wake that comes meanwhile leaves a byte for the next poll.
    pub(super) fn drain(&self) {
        self.pending.store(false, Ordering::SeqCst);
        let mut buf = [0u8; 64];
        loop {
            match (&self.reader).read(&mut buf) {
                Ok(n) if n == buf.len() => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // Empty (WouldBlock), short read, or EOF (cannot happen: we hold the writer).
                _ => return,
            }
        }
    }
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own, with no pointer arguments.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
