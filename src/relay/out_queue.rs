//! A connection's output queue: encoded frames waiting to be written, as shared `Bytes`,
//! and what they cost in memory.

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, Bytes};

use crate::ConnId;

/// Frames waiting for the socket, in order. Fan-out pushes clones of one `Bytes`, so a
/// payload queued to many connections exists once in memory. An empty queue owns no heap
/// memory until first used, and a large deque is given back when drained), which keeps idle
/// connections small.
#[derive(Debug)]
pub struct OutQueue {
    frames: VecDeque<Bytes>,
    bytes: usize,
    /// Frames taken off the front since the queue was made (positions are counted from it).
    popped: u64,
    /// Position of the first frame that may be a view into a shared read buffer
    /// (`u64::MAX`: none). See [`OutQueue::unpin`].
    first_view: u64,
}

impl Default for OutQueue {
    fn default() -> OutQueue {
        OutQueue {
            frames: VecDeque::new(),
            bytes: 0,
            popped: 0,
            first_view: u64::MAX,
        }
    }
}

/// What one queued frame costs besides its bytes: its `Bytes` slot in the deque (up to
/// twice over, as the deque grows by doubling), the allocator's header and rounding of its
/// own allocation. Measured with a relay whose queues of 48-byte frames filled its memory
/// budget (`imrelay-bench attack --kind pin`): about 128 bytes beside each frame's own.
/// Every limit on output queues counts [`OutQueue::held`], so a queue of tiny frames is
/// charged what it really holds.
pub const FRAME_OVERHEAD: usize = 128;

/// A drained deque whose capacity exceeds this many frames gives its allocation back, so a
/// burst does not pin memory on an idle connection; a small one is kept to avoid an
/// allocation per loop turn on busy connections.
const RELEASE_CAPACITY_OVER: usize = 64;

impl OutQueue {
    /// Appends an encoded frame; returns what it adds to [`OutQueue::held`].
    #[inline]
    pub fn push(&mut self, frame: Bytes) -> usize {
        let len = frame.len();
        self.bytes += len;
        self.frames.push_back(frame);
        len + FRAME_OVERHEAD
    }

    /// Bytes waiting to be written.
    pub fn len_bytes(&self) -> usize {
        self.bytes
    }

    /// Marks the frame pushed next, and every one after it, as possibly a view into a
    /// shared read buffer: they are written this loop turn, or copied out by
    /// [`OutQueue::unpin`].
    #[inline]
    pub fn mark_next_as_view(&mut self) {
        // Positions only grow, so the first mark since the last unpin is the smallest.
        if self.first_view == u64::MAX {
            self.first_view = self.popped + self.frames.len() as u64;
        }
    }

    /// Replaces every frame that may be a view into a shared read buffer with a copy of
    /// its own size. Called when the socket blocks: a frame that waits no longer keeps a
    /// whole read buffer alive, only its own bytes (which the caps count). Frames are
    /// forwarded without a copy when they are written in the turn they arrived, the
    /// common case; only a queue that backs up pays for the copy, once per frame.
    pub fn unpin(&mut self) {
        if self.first_view == u64::MAX {
            return;
        }
        let start = usize::try_from(self.first_view.saturating_sub(self.popped)).unwrap_or(0);
        for frame in self.frames.range_mut(start.min(self.frames.len())..) {
            *frame = Bytes::copy_from_slice(frame);
        }
        self.first_view = u64::MAX;
    }

    /// Memory the queue holds, as every output limit counts it: the waiting bytes plus
    /// [`FRAME_OVERHEAD`] per frame.
    pub fn held(&self) -> usize {
        self.bytes + self.frames.len() * FRAME_OVERHEAD
    }

    /// What a frame of `len` bytes would add to [`OutQueue::held`].
    pub fn cost(len: usize) -> usize {
        len + FRAME_OVERHEAD
    }

    /// True when nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// Fills `dst` with the waiting bytes in order, for one `write_vectored`; returns how
    /// many slices were filled.
    pub fn chunks<'a>(&'a self, dst: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        for (slot, frame) in dst.iter_mut().zip(self.frames.iter()) {
            *slot = IoSlice::new(frame);
            n += 1;
        }
        n
    }

    /// Drops the first `n` bytes, which the socket accepted; returns what that took off
    /// [`OutQueue::held`].
    #[inline]
    pub fn advance(&mut self, mut n: usize) -> usize {
        debug_assert!(n <= self.bytes, "advanced past the queued bytes");
        let written = n.min(self.bytes);
        let popped = if written == self.bytes {
            // Everything was written (the common case): no per-frame bookkeeping. A queue
            // of one frame (a room member's, typically) is cheaper to pop than to clear.
            let count = self.frames.len();
            if count == 1 {
                self.frames.pop_front();
            } else {
                self.frames.clear();
            }
            count
        } else {
            let frames_before = self.frames.len();
            while n > 0 {
                let Some(front) = self.frames.front_mut() else {
                    break;
                };
                if n >= front.len() {
                    n -= front.len();
                    self.frames.pop_front();
                } else {
                    front.advance(n);
                    n = 0;
                }
            }
            frames_before - self.frames.len()
        };
        self.bytes -= written;
        self.popped += popped as u64;
        if self.frames.is_empty() {
            self.first_view = u64::MAX;
            if self.frames.capacity() > RELEASE_CAPACITY_OVER {
                self.frames = VecDeque::new();
            }
        }
        written + popped * FRAME_OVERHEAD
    }

    /// Drops everything (the connection is gone); returns (bytes discarded, what that took
    /// off [`OutQueue::held`]).
    pub fn clear(&mut self) -> (usize, usize) {
        let dropped = (self.bytes, self.held());
        self.popped += self.frames.len() as u64;
        self.frames = VecDeque::new();
        self.bytes = 0;
        self.first_view = u64::MAX;
        dropped
    }
}

/// The connections named for writing this loop turn, and the memory all output queues
/// hold together (what the relay's memory budget counts of them). Every push to a queue
/// goes through the relay's `push_output`/`push_raw`, which keep `held` exact.
#[derive(Debug, Default)]
pub struct FlushList {
    /// In the order output was queued: a recipient's DELIVER is handed to the kernel before
    /// the sender's ACK for it, so an ACK the sender saw means the DELIVER left the relay
    /// process, even if the relay dies a moment later.
    ids: Vec<ConnId>,
    /// How many of `ids` were popped: a cursor, not a ring buffer, because the loop pops
    /// them all every turn (then the vector is cleared), and a vector's push and read are
    /// the cheapest there are on this path (once per connection per frame queued).
    next: usize,
    /// Sum of [`OutQueue::held`] over every session.
    pub held: usize,
}

impl FlushList {
    /// Names a connection for writing (the caller keeps it from being named twice).
    #[inline]
    pub fn push(&mut self, id: ConnId) {
        self.ids.push(id);
    }

    /// The next connection to write, oldest first.
    #[inline]
    pub fn pop(&mut self) -> Option<ConnId> {
        match self.ids.get(self.next) {
            Some(&id) => {
                self.next += 1;
                Some(id)
            }
            None => {
                self.ids.clear();
                self.next = 0;
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_writes_resume_mid_frame() {
        let mut q = OutQueue::default();
        q.push(Bytes::from_static(b"abc"));
        q.push(Bytes::from_static(b"defg"));
        assert_eq!(q.len_bytes(), 7);
        assert_eq!(q.advance(4), 4 + FRAME_OVERHEAD, "one frame and one byte");
        assert_eq!(q.len_bytes(), 3);
        assert_eq!(q.held(), 3 + FRAME_OVERHEAD);
        {
            let mut slices = [IoSlice::new(&[]); 4];
            let n = q.chunks(&mut slices);
            assert_eq!(n, 1);
            assert_eq!(&*slices[0], b"efg");
        }
        q.advance(3);
        assert!(q.is_empty());
        assert_eq!(q.chunks(&mut [IoSlice::new(&[]); 4]), 0);
    }

    #[test]
    fn unpin_copies_the_marked_frames_and_frees_the_buffer_they_came_from() {
        let mut read = bytes::BytesMut::with_capacity(64 * 1024);
        read.extend_from_slice(&[7u8; 300]);
        let mut q = OutQueue::default();
        q.push(Bytes::from_static(b"owned before"));
        q.mark_next_as_view();
        q.push(read.split_to(100).freeze());
        q.push(read.split_to(100).freeze());
        q.advance(12 + 50); // the first frame and half of the second are written
        let whole = read.capacity() + 1; // only the whole allocation, reclaimed, has room
        assert!(!read.try_reclaim(whole), "the views pin the read buffer");
        q.unpin();
        assert!(read.try_reclaim(whole), "nothing points into it any more");
        let mut slices = [IoSlice::new(&[]); 4];
        assert_eq!(q.chunks(&mut slices), 2);
        assert_eq!((slices[0].len(), slices[1].len()), (50, 100));
        assert!(slices.iter().take(2).all(|s| s.iter().all(|&b| b == 7)));
    }

    #[test]
    fn chunks_stops_at_the_slice_count() {
        let mut q = OutQueue::default();
        for _ in 0..10 {
            q.push(Bytes::from_static(b"x"));
        }
        {
            let mut slices = [IoSlice::new(&[]); 4];
            assert_eq!(q.chunks(&mut slices), 4);
        }
        assert_eq!(q.held(), 10 + 10 * FRAME_OVERHEAD);
        assert_eq!(q.clear(), (10, 10 + 10 * FRAME_OVERHEAD));
        assert_eq!(q.held(), 0);
        assert!(q.is_empty());
    }
}
