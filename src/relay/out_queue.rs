//! A connection's output queue: encoded frames waiting to be written, as shared `Bytes`.

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, Bytes};

/// Frames waiting for the socket, in order. Fan-out pushes clones of one `Bytes`, so a
/// payload queued to many connections exists once in memory. An empty queue owns no heap
/// memory until first used, and a large deque is given back when drained), which keeps idle
/// connections small.
#[derive(Debug, Default)]
pub struct OutQueue {
    frames: VecDeque<Bytes>,
    bytes: usize,
}

/// A drained deque whose capacity exceeds this many frames gives its allocation back, so a
/// burst does not pin memory on an idle connection; a small one is kept to avoid an
/// allocation per loop turn on busy connections.
const RELEASE_CAPACITY_OVER: usize = 64;

impl OutQueue {
    /// Appends an encoded frame.
    pub fn push(&mut self, frame: Bytes) {
        self.bytes += frame.len();
        self.frames.push_back(frame);
    }

    /// Bytes waiting to be written.
    pub fn len_bytes(&self) -> usize {
        self.bytes
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

    /// Drops the first `n` bytes, which the socket accepted.
    pub fn advance(&mut self, mut n: usize) {
        debug_assert!(n <= self.bytes, "advanced past the queued bytes");
        self.bytes -= n.min(self.bytes);
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
        if self.frames.is_empty() && self.frames.capacity() > RELEASE_CAPACITY_OVER {
            self.frames = VecDeque::new();
        }
    }

    /// Drops everything (the connection is gone); returns how many bytes were discarded.
    pub fn clear(&mut self) -> usize {
        let dropped = self.bytes;
        self.frames = VecDeque::new();
        self.bytes = 0;
        dropped
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
        q.advance(4);
        assert_eq!(q.len_bytes(), 3);
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
    fn chunks_stops_at_the_slice_count() {
        let mut q = OutQueue::default();
        for _ in 0..10 {
            q.push(Bytes::from_static(b"x"));
        }
        {
            let mut slices = [IoSlice::new(&[]); 4];
            assert_eq!(q.chunks(&mut slices), 4);
        }
        assert_eq!(q.clear(), 10);
        assert!(q.is_empty());
    }
}
