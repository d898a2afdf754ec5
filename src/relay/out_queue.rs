//! A connection's output queue: encoded frames waiting to be written, and what they cost
//! in memory.

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, Bytes, BytesMut};

use crate::ConnId;

/// Frames waiting for the socket, in order: shared frames (fan-out pushes clones of one
/// `Bytes`, so a payload queued to many connections exists once in memory), then the
/// tail, a buffer of its own into which small frames are copied back to back. A burst of
/// direct messages thus costs one copy each and goes to `writev` as one slice, with no
/// allocation or reference count per frame; and nothing in the queue points into a read
/// buffer. An empty queue owns no heap memory (a drained tail is given back, and so is a
/// large deque), which keeps idle connections small.
#[derive(Debug, Default)]
pub struct OutQueue {
    /// Shared frames, all before the tail.
    frames: VecDeque<Bytes>,
    /// Bytes waiting in `frames`.
    frame_bytes: usize,
    /// Frames copied in, after every frame in `frames`.
    tail: BytesMut,
    /// Bytes at the start of the tail already written (while no frame waits before it):
    /// the tail's allocation is kept whole, so its capacity counts them.
    tail_written: usize,
    /// Bytes of the front frame already written: freed only with the rest of the frame,
    /// so still counted.
    front_written: usize,
    /// Room left unused at the end of tails that moved to the deque (a frame did not fit):
    /// still allocated, so still counted, until the queue drains.
    sealed_room: usize,
}

/// What one queued shared frame costs besides its bytes: its `Bytes` slot in the deque (up
/// to twice over, as the deque grows by doubling), the allocator's header and rounding of
/// its own allocation. Measured with a relay whose queues of 48-byte frames filled its
/// memory budget (`imrelay-bench attack --kind pin`): about 128 bytes beside each frame's
/// own. Every limit on output queues counts [`OutQueue::held`], so a queue of tiny frames is
/// charged what it really holds.
pub const FRAME_OVERHEAD: usize = 128;

/// Frames up to this size are copied into the tail ([`OutQueue::push_copy`]); a larger one
/// is cheaper as one shared allocation than as a copy per recipient.
pub const COPY_MAX: usize = 1024;

/// The tail's first allocation: a queue holding one small frame holds about what the
/// frame and a deque slot would.
const TAIL_FIRST: usize = 256 - ALLOC_HEADER;

/// Most drained tails kept in [`SpareTails`] for reuse.
const SPARE_TAILS: usize = 128;

/// Each new tail of a queue is twice the size of the one before, up to this size; a full
/// tail moves to the deque as one frame (one slice for `writev`).
const TAIL_CHUNK: usize = 16 * 1024 - ALLOC_HEADER;

/// What the allocator keeps beside each allocation (glibc: 8 bytes, rounded to 16). Tails
/// are a power of two minus this, so their blocks are exactly powers of two: a 64 KiB
/// block freed by a partial frame takes four 16 KiB tails with nothing left over. With
/// tails of exactly 16 KiB only three fitted, and the rest of each such hole, a quarter,
/// stayed unused in the relay's memory, which no cap counts (measured: under the pinning
/// attack the relay grew about 8 MiB more than its count, past the bound of its budget).
const ALLOC_HEADER: usize = 16;

/// A drained deque whose capacity exceeds this many frames gives its allocation back, so a
/// burst does not pin memory on an idle connection; a small one is kept to avoid an
/// allocation per loop turn on busy connections.
const RELEASE_CAPACITY_OVER: usize = 64;

impl OutQueue {
    /// Appends a shared frame; returns what it adds to [`OutQueue::held`].
    #[inline]
    pub fn push(&mut self, frame: Bytes) -> usize {
        if !self.tail.is_empty() {
            // Out of line, so the common path (a fan-out member's queue) keeps nothing
            // live across a call (callgrind, benches/router).
            return self.push_after_copies(frame);
        }
        let len = frame.len();
        self.frame_bytes += len;
        self.frames.push_back(frame);
        len + FRAME_OVERHEAD
    }

    /// [`OutQueue::push`] behind copied frames: what was copied moves to the deque first,
    /// and the tail keeps its spare room (still counted).
    #[inline(never)]
    fn push_after_copies(&mut self, frame: Bytes) -> usize {
        let copied = self.tail.split().freeze();
        self.seal(copied);
        let len = frame.len();
        self.frame_bytes += len;
        self.frames.push_back(frame);
        FRAME_OVERHEAD + len + FRAME_OVERHEAD
    }

    /// Appends a frame of `len` bytes (at most [`COPY_MAX`] for the sizes to stay as
    /// documented), which `write` appends to the buffer it is given; returns what it adds
    /// to [`OutQueue::held`] (nothing while the tail has room: its room is counted). A new
    /// tail comes from `spare` when it has one.
    #[inline(always)]
    pub fn push_copy(
        &mut self,
        spare: &mut SpareTails,
        len: usize,
        write: impl FnOnce(&mut BytesMut),
    ) -> usize {
        let mut added = 0;
        if self.tail.capacity() - self.tail.len() < len {
            added = self.make_room(spare, len);
        }
        write(&mut self.tail);
        added
    }

    /// Room for `len` more bytes: a new tail, a spare one if one is kept, else twice the
    /// size of the last (from [`TAIL_FIRST`] up to [`TAIL_CHUNK`]); what the old one holds
    /// moves to the deque as one frame. A tail is never grown in place, so a partly
    /// written one keeps its allocation whole and counted. Returns what this adds to
    /// [`OutQueue::held`].
    #[inline(never)]
    fn make_room(&mut self, spare: &mut SpareTails, len: usize) -> usize {
        let held = self.held();
        let last = self.tail.capacity();
        self.sealed_room += last - self.tail.len();
        let old = std::mem::take(&mut self.tail);
        // A tail partly written still has bytes waiting (a fully written one was drained).
        if !old.is_empty() {
            self.seal(old.freeze());
        }
        let size = ((last + ALLOC_HEADER) * 2 - ALLOC_HEADER)
            .clamp(TAIL_FIRST, TAIL_CHUNK)
            .max(len);
        self.tail = match spare.take(size) {
            Some(tail) => tail,
            None => BytesMut::with_capacity(size),
        };
        self.held() - held
    }

    /// Moves what was copied into the tail (`copied`, taken off it) to the deque as one
    /// frame; a part already written is dropped from the front and stays counted.
    fn seal(&mut self, mut copied: Bytes) {
        if self.tail_written > 0 {
            // Only while no frame waits before the tail: this becomes the front frame.
            copied.advance(self.tail_written);
            self.front_written = self.tail_written;
            self.tail_written = 0;
        }
        self.frame_bytes += copied.len();
        self.frames.push_back(copied);
    }

    /// Bytes waiting to be written.
    pub fn len_bytes(&self) -> usize {
        self.frame_bytes + self.tail.len() - self.tail_written
    }

    /// Memory the queue holds, as every output limit counts it: the bytes of its frames
    /// (written or not, until each is freed) plus [`FRAME_OVERHEAD`] per frame in the
    /// deque, and the tail's whole allocation.
    #[inline]
    pub fn held(&self) -> usize {
        self.frame_bytes
            + self.frames.len() * FRAME_OVERHEAD
            + self.front_written
            + self.tail.capacity()
            + self.sealed_room
    }

    /// What a frame of `len` bytes may add to [`OutQueue::held`] (at most).
    pub fn cost(len: usize) -> usize {
        len + FRAME_OVERHEAD
    }

    /// True when nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.len_bytes() == 0
    }

    /// Fills `dst` with the waiting bytes in order, for one `write_vectored`; returns how
    /// many slices were filled.
    pub fn chunks<'a>(&'a self, dst: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        let tail = (self.tail.len() > self.tail_written).then(|| &self.tail[self.tail_written..]);
        let waiting = self.frames.iter().map(|frame| &frame[..]).chain(tail);
        for (slot, bytes) in dst.iter_mut().zip(waiting) {
            *slot = IoSlice::new(bytes);
            n += 1;
        }
        n
    }

    /// Drops the first `n` bytes, which the socket accepted; returns what that took off
    /// [`OutQueue::held`]. A drained tail goes to `spare`.
    #[inline]
    pub fn advance(&mut self, spare: &mut SpareTails, n: usize) -> usize {
        debug_assert!(n <= self.len_bytes(), "advanced past the queued bytes");
        if n < self.len_bytes() {
            return self.advance_part(n);
        }
        // Everything was written (the common case): no per-frame bookkeeping. A queue of
        // one frame (a room member's, typically) is cheaper to pop than to clear.
        let held = self.held();
        if self.frames.len() == 1 {
            self.frames.pop_front();
        } else {
            self.frames.clear();
        }
        self.frame_bytes = 0;
        self.sealed_room = 0;
        self.front_written = 0;
        self.tail_written = 0;
        if self.tail.capacity() != 0 {
            spare.give(std::mem::take(&mut self.tail));
        }
        self.release_deque();
        held
    }

    /// [`OutQueue::advance`] by less than everything: out of line, so the common full
    /// write keeps nothing of this loop live (callgrind, benches/router).
    #[inline(never)]
    fn advance_part(&mut self, mut n: usize) -> usize {
        let held = self.held();
        while n > 0 {
            let Some(front) = self.frames.front_mut() else {
                self.tail_written += n;
                break;
            };
            let len = front.len();
            if n >= len {
                n -= len;
                self.frame_bytes -= len;
                self.frames.pop_front();
                self.front_written = 0;
            } else {
                front.advance(n);
                self.frame_bytes -= n;
                self.front_written += n;
                n = 0;
            }
        }
        self.release_deque();
        held - self.held()
    }

    /// Gives a drained deque's memory back if it is large.
    #[inline]
    fn release_deque(&mut self) {
        if self.frames.is_empty() && self.frames.capacity() > RELEASE_CAPACITY_OVER {
            self.frames = VecDeque::new();
        }
    }

    /// Drops everything (the connection is gone); returns (bytes discarded, what that took
    /// off [`OutQueue::held`]).
    pub fn clear(&mut self) -> (usize, usize) {
        let dropped = (self.len_bytes(), self.held());
        *self = OutQueue::default();
        dropped
    }
}

/// Drained tails kept for the next queue that needs one. A busy relay drains and refills
/// many queues every loop turn; given back to the allocator each time, their memory was
/// returned to the kernel and faulted in again (page faults were 9% of the relay's time in
/// the headline bench). At most [`SPARE_TAILS`] are kept, and what they hold counts in the
/// relay's memory budget.
#[derive(Debug, Default)]
pub struct SpareTails {
    tails: Vec<BytesMut>,
    held: usize,
}

impl SpareTails {
    /// A drained tail with room for at least `size` bytes, if the last one kept has it.
    #[inline]
    fn take(&mut self, size: usize) -> Option<BytesMut> {
        if self.tails.last()?.capacity() < size {
            return None;
        }
        let tail = self.tails.pop()?;
        self.held -= tail.capacity();
        Some(tail)
    }

    /// Keeps a drained tail, emptied, if there is room for it; else frees it.
    #[inline]
    fn give(&mut self, mut tail: BytesMut) {
        if self.tails.len() < SPARE_TAILS {
            tail.clear();
            self.held += tail.capacity();
            self.tails.push(tail);
        }
    }

    /// Memory the kept tails hold.
    pub fn held(&self) -> usize {
        self.held
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
    /// Drained tails, for the queues to reuse.
    pub spare: SpareTails,
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

    fn copy(q: &mut OutQueue, bytes: &[u8]) -> usize {
        q.push_copy(&mut SpareTails::default(), bytes.len(), |tail| {
            tail.extend_from_slice(bytes)
        })
    }

    fn waiting(q: &OutQueue) -> Vec<u8> {
        let mut slices = [IoSlice::new(&[]); 64];
        let n = q.chunks(&mut slices);
        slices[..n].iter().flat_map(|s| s.iter().copied()).collect()
    }

    #[test]
    fn partial_writes_resume_mid_frame() {
        let mut q = OutQueue::default();
        q.push(Bytes::from_static(b"abc"));
        q.push(Bytes::from_static(b"defg"));
        assert_eq!(q.len_bytes(), 7);
        assert_eq!(
            q.advance(&mut SpareTails::default(), 4),
            3 + FRAME_OVERHEAD,
            "one frame freed; the written byte of the next is freed with it"
        );
        assert_eq!(q.len_bytes(), 3);
        assert_eq!(q.held(), 4 + FRAME_OVERHEAD);
        {
            let mut slices = [IoSlice::new(&[]); 4];
            let n = q.chunks(&mut slices);
            assert_eq!(n, 1);
            assert_eq!(&*slices[0], b"efg");
        }
        q.advance(&mut SpareTails::default(), 3);
        assert!(q.is_empty());
        assert_eq!(q.chunks(&mut [IoSlice::new(&[]); 4]), 0);
    }

    #[test]
    fn copied_frames_share_one_slice_and_keep_their_order_with_shared_ones() {
        let mut q = OutQueue::default();
        let added = copy(&mut q, b"one ") + copy(&mut q, b"two ");
        assert_eq!(
            added, TAIL_FIRST,
            "the first copy reserves the tail, the next fits"
        );
        assert_eq!(
            q.chunks(&mut [IoSlice::new(&[]); 4]),
            1,
            "one slice for both"
        );
        q.push(Bytes::from_static(b"three "));
        copy(&mut q, b"four");
        assert_eq!(waiting(&q), b"one two three four");
        assert_eq!(q.chunks(&mut [IoSlice::new(&[]); 4]), 3);
        assert_eq!(q.held(), 8 + 6 + 2 * FRAME_OVERHEAD + TAIL_FIRST - 8);
        // Written in pieces that end mid-frame, across the shared frames and the tail.
        let mut total = q.held();
        for n in [5, 6, 4, 2] {
            total -= q.advance(&mut SpareTails::default(), n);
            assert_eq!(
                total,
                q.held(),
                "what advance says it freed is what held lost"
            );
        }
        assert_eq!(waiting(&q), b"r");
        assert_eq!(q.advance(&mut SpareTails::default(), 1), total);
        assert!(q.is_empty());
        assert_eq!(q.held(), 0, "a drained queue holds nothing");
    }

    #[test]
    fn a_partly_written_tail_stays_counted_whole_until_it_is_freed() {
        let mut spare = SpareTails::default();
        let mut q = OutQueue::default();
        for _ in 0..4 {
            copy(&mut q, &[3u8; 50]);
        }
        assert_eq!(q.held(), TAIL_FIRST);
        assert_eq!(
            q.advance(&mut spare, 120),
            0,
            "the tail's allocation is still whole"
        );
        assert_eq!(q.len_bytes(), 80);
        assert_eq!(waiting(&q), vec![3u8; 80]);
        // A shared frame behind it moves the rest of the copies to the deque; the part
        // already written is still in that allocation, and still counted.
        let added = q.push(Bytes::from_static(b"shared"));
        assert_eq!(added, 2 * FRAME_OVERHEAD + 6);
        assert_eq!(q.held(), TAIL_FIRST + 2 * FRAME_OVERHEAD + 6);
        assert_eq!(waiting(&q).len(), 86);
        assert_eq!(q.advance(&mut spare, 40), 0);
        // A tail too small for the next copy moves to the deque too, its room counted.
        copy(&mut q, &[4u8; 100]);
        copy(&mut q, &[5u8; 100]);
        let added = copy(&mut q, &[6u8; 100]);
        // A block twice the size of the last, less the allocator's header.
        let twice = 2 * (TAIL_FIRST + ALLOC_HEADER) - ALLOC_HEADER;
        assert_eq!(
            added,
            FRAME_OVERHEAD + twice,
            "a new tail of twice the size"
        );
        let waiting_now = waiting(&q);
        assert_eq!(waiting_now.len(), 40 + 6 + 300);
        assert_eq!(
            &waiting_now[46..],
            [[4u8; 100], [5u8; 100], [6u8; 100]].concat()
        );
        let held = q.held();
        assert_eq!(q.advance(&mut spare, 346), held);
        assert_eq!(q.held(), 0);
    }

    #[test]
    fn a_long_burst_of_copies_moves_full_tails_to_the_deque() {
        let mut q = OutQueue::default();
        let frame = [7u8; 100];
        let mut held = 0;
        for _ in 0..1000 {
            held += copy(&mut q, &frame);
        }
        assert_eq!(q.held(), held, "every push reported what it added");
        assert_eq!(q.len_bytes(), 100_000);
        // Tails of 256, 512, ..., 8,192 bytes (158 frames), five full ones of 16 KiB (163
        // frames each) and the tail (27 frames): 12 slices.
        let slices = q.chunks(&mut [IoSlice::new(&[]); 64]);
        assert_eq!(slices, 12);
        // Every byte of every tail allocated is counted, the room left at the end of the
        // full ones included, plus the overhead of a frame in the deque for each of them.
        let allocated = (256 + 512 + 1024 + 2048 + 4096 + 8192 - 6 * ALLOC_HEADER) + 6 * TAIL_CHUNK;
        assert_eq!(held, allocated + 11 * FRAME_OVERHEAD);
        assert_eq!(waiting(&q), vec![7u8; 100_000]);
        assert_eq!(q.advance(&mut SpareTails::default(), 100_000), held);
    }

    #[test]
    fn drained_tails_are_kept_for_reuse_up_to_a_bound() {
        let mut spare = SpareTails::default();
        let mut queues: Vec<OutQueue> =
            (0..SPARE_TAILS + 10).map(|_| OutQueue::default()).collect();
        for q in &mut queues {
            q.push_copy(&mut spare, 100, |tail| tail.extend_from_slice(&[1u8; 100]));
        }
        for q in &mut queues {
            let written = q.len_bytes();
            q.advance(&mut spare, written);
            assert_eq!(q.held(), 0, "a drained queue holds nothing");
        }
        assert_eq!(
            spare.tails.len(),
            SPARE_TAILS,
            "the rest went back to the allocator"
        );
        assert_eq!(spare.held(), SPARE_TAILS * TAIL_FIRST);
        // The next queue that copies a frame takes a kept tail, allocating nothing.
        let kept = spare.tails.last().map(|t| t.as_ptr());
        let mut q = OutQueue::default();
        let added = q.push_copy(&mut spare, 10, |tail| tail.extend_from_slice(b"0123456789"));
        assert_eq!(added, TAIL_FIRST);
        assert_eq!(spare.held(), (SPARE_TAILS - 1) * TAIL_FIRST);
        let mut slices = [IoSlice::new(&[]); 2];
        assert_eq!(q.chunks(&mut slices), 1);
        assert_eq!(Some(slices[0].as_ptr()), kept);
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
