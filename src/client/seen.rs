//! Receiver-side de-duplication: the (sender, msg_id) pairs delivered to the app lately.
//!
//! The relay drops a resend it remembers (protocol.md, section 13), but a relay that
//! restarted remembers nothing, so the SDK checks too: a DELIVER whose pair it has handed
//! to the app already is dropped. FIFO eviction keeps the memory at `capacity` pairs.
//!
//! The set's hash key comes from the caller (the core's seed), not from the process's
//! entropy: the core stays deterministic, and the ids (chosen by other users) still cannot
//! be picked to collide without knowing the key.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashSet, VecDeque};
use std::hash::{BuildHasher, Hasher};

use crate::proto::{MessageId, UserId};

/// The last `capacity` (sender, msg_id) pairs shown to the app.
#[derive(Debug)]
pub struct Seen {
    capacity: usize,
    order: VecDeque<(UserId, MessageId)>,
    set: HashSet<(UserId, MessageId), Keyed>,
}

/// SipHash keyed by a secret prefix.
#[derive(Clone, Debug)]
struct Keyed(u64);

impl BuildHasher for Keyed {
    type Hasher = DefaultHasher;

    fn build_hasher(&self) -> DefaultHasher {
        let mut h = DefaultHasher::new();
        h.write_u64(self.0);
        h
    }
}

impl Seen {
    /// Remembers at most `capacity` pairs (at least 1); `hash_key` keys the set's hash.
    pub fn new(capacity: usize, hash_key: u64) -> Seen {
        Seen {
            capacity: capacity.max(1),
            order: VecDeque::new(),
            set: HashSet::with_hasher(Keyed(hash_key)),
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
        let mut seen = Seen::new(2, 17);
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
