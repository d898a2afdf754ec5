//! Connection deadlines (login, ping, idle) as a min-heap with lazy re-arming.
//!
//! Each connection has at most one entry. Activity only stamps the session's `last_rx`
//! (O(1), no heap work); when an entry comes due the relay looks at the session and either
//! acts or pushes the entry again at the session's real next deadline. So the per-event cost
//! is constant and the per-turn cost is the number of entries that actually came due: no
//! scan over all connections.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

use crate::ConnId;

/// One armed deadline: the connection and the serial of the session it was armed for (a
/// reused slab key gets a new serial, so a stale entry is recognised and skipped).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Deadline {
    /// When it comes due.
    pub at: Instant,
    /// The connection.
    pub conn: ConnId,
    /// The session serial it was armed for.
    pub serial: u64,
}

/// The deadline heap.
#[derive(Debug, Default)]
pub struct Timers {
    heap: BinaryHeap<Reverse<Deadline>>,
}

impl Timers {
    /// Arms a deadline.
    pub fn arm(&mut self, at: Instant, conn: ConnId, serial: u64) {
        self.heap.push(Reverse(Deadline { at, conn, serial }));
    }

    /// The earliest armed deadline.
    pub fn next(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse(d)| d.at)
    }

    /// Removes and returns the earliest deadline if it is due at `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<Deadline> {
        match self.heap.peek() {
            Some(Reverse(d)) if d.at <= now => self.heap.pop().map(|Reverse(d)| d),
            _ => None,
        }
    }

    /// Entries armed, stale ones included (a metric).
    pub fn len(&self) -> usize {
        self.heap.len()
    }
}

impl Timers {
    /// Keeps only the entries `live` approves (used to drop stale entries of closed
    /// connections once they outnumber the live ones).
    pub fn retain(&mut self, mut live: impl FnMut(&Deadline) -> bool) {
        self.heap.retain(|Reverse(d)| live(d));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn pops_in_deadline_order_only_when_due() {
        let t0 = Instant::now();
        let mut timers = Timers::default();
        timers.arm(t0 + Duration::from_secs(3), ConnId(1), 1);
        timers.arm(t0 + Duration::from_secs(1), ConnId(2), 2);
        assert_eq!(timers.next(), Some(t0 + Duration::from_secs(1)));
        assert_eq!(timers.pop_due(t0), None);
        let d = timers.pop_due(t0 + Duration::from_secs(2)).unwrap();
        assert_eq!(d.conn, ConnId(2));
        assert_eq!(timers.pop_due(t0 + Duration::from_secs(2)), None);
        timers.retain(|d| d.serial != 1);
        assert_eq!(timers.next(), None);
    }
}
