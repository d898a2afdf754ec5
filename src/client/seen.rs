//! Receiver-side de-duplication: the (sender, msg_id) pairs delivered to the app lately.
//!
//! The relay drops a resend it remembers (protocol.md, section 13), but a relay that
//! restarted remembers nothing, so the SDK checks too: a DELIVER whose pair it has handed
//! to the app already is dropped. FIFO eviction keeps the memory at `capacity` pairs.

use std::collections::{HashSet, VecDeque};

use crate::proto::{MessageId, UserId};

/// The last `capacity` (sender, msg_id) pairs shown to the app.
#[derive(Debug)]
pub struct Seen {
    capacity: usize,
    order: VecDeque<(UserId, MessageId)>,
    set: HashSet<(UserId, MessageId)>,
}

impl Seen {
    /// Remembers at most `capacity` pairs (at least 1).
    pub fn new(capacity: usize) -> Seen {
        Seen {
            capacity: capacity.max(1),
            order: VecDeque::new(),
            set: HashSet::new(),
        }
    }

    /// True the first time a pair is offered; false for a duplicate.
    pub fn first_time(&mut self, from: UserId, id: MessageId) -> bool {
        if !self.set.insert((from, id)) {
            return false;
        }
        self.order.push_back((from, id));
        if self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pair_passes_once_and_old_pairs_are_forgotten() {
        let mut seen = Seen::new(2);
        assert!(seen.first_time(UserId(1), MessageId(5)));
        assert!(!seen.first_time(UserId(1), MessageId(5)));
        assert!(seen.first_time(UserId(2), MessageId(5)), "per sender");
        assert!(seen.first_time(UserId(1), MessageId(6)));
        assert!(
            seen.first_time(UserId(1), MessageId(5)),
            "evicted, so new again"
        );
    }
}
