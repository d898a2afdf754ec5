//! Relay-side de-duplication of resent SENDs (protocol.md, section 13).
//!
//! A client that lost its link cannot know whether a SEND it had written reached the relay.
//! It resends it after reconnecting with the same `msg_id` and the `DEDUP` flag; the relay
//! remembers the `(sender, msg_id)` of each DEDUP SEND it forwarded and answers a repeat with
//! the original ACK instead of a second DELIVER.
//!
//! Memory is bounded three ways: each sender keeps its last `window` ids, a sender's ids are
//! forgotten between `ttl` and 1.5 × `ttl` after its last DEDUP SEND, and when the relay
//! holds `max_entries` ids in all it forgets the senders it renewed longest ago first.
//! Expiry is amortised O(1): an insertion-ordered queue of `(sender, renewed_at)` marks,
//! where a mark is live only while it matches the sender's `renewed_at`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::hashing::{id_map, IdMap};
use crate::proto::{ErrorCode, MessageId, UserId};

/// An ACK count with this bit set records a refusal instead: the low 16 bits are the
/// ERROR code the first copy got (see [`refused`], [`refusal`]).
const REFUSED: u32 = 0x8000_0000;

/// The value [`Dedup::record`] keeps for a SEND whose answer is not known yet (cluster
/// mode: its PUBLISH waits for Redis's answer).
pub const PENDING: u32 = 0x4000_0000;

/// The value [`Dedup::record`] keeps for a SEND refused with `code`.
pub fn refused(code: ErrorCode) -> u32 {
    REFUSED | code as u32
}

/// The code of a remembered refusal, if `count` is one.
pub fn refusal(count: u32) -> Option<ErrorCode> {
    if count & REFUSED == 0 {
        return None;
    }
    ErrorCode::from_u16(u16::try_from(count & 0xffff).ok()?)
}

/// The ids one sender sent recently, oldest first, each with the ACK count it got.
#[derive(Debug)]
struct Window {
    ids: VecDeque<(MessageId, u32)>,
    last_used: Instant,
    renewed_at: Instant,
}

/// Remembers recently forwarded DEDUP SENDs per sender.
#[derive(Debug)]
pub struct Dedup {
    window: usize,
    ttl: Duration,
    max_entries: usize,
    entries: usize,
    senders: IdMap<UserId, Window>,
    marks: VecDeque<(UserId, Instant)>,
}

impl Dedup {
    /// An empty memory with the given limits (each at least 1).
    pub fn new(window: usize, ttl: Duration, max_entries: usize, seed: u64) -> Dedup {
        Dedup {
            window: window.max(1),
            ttl,
            max_entries: max_entries.max(1),
            entries: 0,
            senders: id_map(seed),
            marks: VecDeque::new(),
        }
    }

    /// The ACK count recorded for `(sender, msg_id)` if the relay forwarded it recently.
    pub fn lookup(&self, sender: UserId, msg_id: MessageId, now: Instant) -> Option<u32> {
        let w = self.senders.get(&sender)?;
        if now.saturating_duration_since(w.last_used) >= self.ttl.mul_f32(1.5) {
            return None;
        }
        w.ids
            .iter()
            .rev()
            .find(|(id, _)| *id == msg_id)
            .map(|&(_, count)| count)
    }

    /// Records that `(sender, msg_id)` was forwarded to `count` connections.
    pub fn record(&mut self, sender: UserId, msg_id: MessageId, count: u32, now: Instant) {
        self.expire(now);
        let half_ttl = self.ttl / 2;
        let w = self.senders.entry(sender).or_insert_with(|| Window {
            ids: VecDeque::new(),
            last_used: now,
            renewed_at: now,
        });
        if w.ids.is_empty() || now.saturating_duration_since(w.renewed_at) >= half_ttl {
            w.renewed_at = now;
            self.marks.push_back((sender, now));
        }
        w.last_used = now;
        w.ids.push_back((msg_id, count));
        self.entries += 1;
        if w.ids.len() > self.window {
            w.ids.pop_front();
            self.entries -= 1;
        }
        while self.entries > self.max_entries {
            if !self.forget_oldest(None) {
                break;
            }
        }
    }

    /// Sets the ACK count remembered for `(sender, msg_id)`, if it is remembered: a durable
    /// stored SEND's count is known only once its commit is on disk.
    pub fn set_count(&mut self, sender: UserId, msg_id: MessageId, count: u32) {
        let Some(w) = self.senders.get_mut(&sender) else {
            return;
        };
        if let Some(entry) = w.ids.iter_mut().rev().find(|(id, _)| *id == msg_id) {
            entry.1 = count;
        }
    }

    /// Forgets `(sender, msg_id)`: a resend of it is delivered again. For a SEND whose
    /// fate is unknown (cluster mode lost Redis's answer). Its slot in the window stays, as
    /// id 0, which no DEDUP SEND carries.
    pub fn forget(&mut self, sender: UserId, msg_id: MessageId) {
        let Some(w) = self.senders.get_mut(&sender) else {
            return;
        };
        if let Some(entry) = w.ids.iter_mut().rev().find(|(id, _)| *id == msg_id) {
            entry.0 = MessageId(0);
        }
    }

    /// The ACK count remembered for `(sender, msg_id)`, whatever its age.
    pub fn count_of(&self, sender: UserId, msg_id: MessageId) -> Option<u32> {
        let w = self.senders.get(&sender)?;
        w.ids
            .iter()
            .rev()
            .find(|(id, _)| *id == msg_id)
            .map(|&(_, count)| count)
    }

    /// Every id remembered, with its sender and ACK count (for a store snapshot).
    pub fn remembered(&self) -> impl Iterator<Item = (UserId, MessageId, u32)> + '_ {
        self.senders
            .iter()
            .flat_map(|(&sender, w)| w.ids.iter().map(move |&(id, count)| (sender, id, count)))
    }

    /// Ids remembered, over all senders.
    pub fn entries(&self) -> usize {
        self.entries
    }

    /// Senders with a window.
    #[cfg(test)]
    fn senders(&self) -> usize {
        self.senders.len()
    }

    /// Drops the windows whose last use is more than `ttl` ago (checked at their marks).
    fn expire(&mut self, now: Instant) {
        let limit = self.ttl.mul_f32(1.5);
        while let Some(&(_, marked)) = self.marks.front() {
            if now.saturating_duration_since(marked) < limit {
                break;
            }
            self.forget_oldest(Some(now));
        }
    }

    /// Pops the oldest mark. A live mark forgets its sender (when `now` is given, only if
    /// the sender has been idle for `ttl`; otherwise the mark is renewed). Returns false
    /// when there are no marks left.
    fn forget_oldest(&mut self, now: Option<Instant>) -> bool {
        let Some((sender, marked)) = self.marks.pop_front() else {
            return false;
        };
        let Some(w) = self.senders.get_mut(&sender) else {
            return true;
        };
        if w.renewed_at != marked {
            return true; // stale: a later mark for this sender is further back
        }
        if let Some(now) = now {
            if now.saturating_duration_since(w.last_used) < self.ttl {
                w.renewed_at = now;
                self.marks.push_back((sender, now));
                return true;
            }
        }
        self.entries -= w.ids.len();
        self.senders.remove(&sender);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(60);

    #[test]
    fn remembers_an_id_and_its_count() {
        let now = Instant::now();
        let mut d = Dedup::new(4, TTL, 100, 1);
        assert_eq!(d.lookup(UserId(1), MessageId(7), now), None);
        d.record(UserId(1), MessageId(7), 2, now);
        assert_eq!(d.lookup(UserId(1), MessageId(7), now), Some(2));
        assert_eq!(d.lookup(UserId(2), MessageId(7), now), None, "per sender");
    }

    #[test]
    fn each_sender_keeps_only_its_window() {
        let now = Instant::now();
        let mut d = Dedup::new(3, TTL, 100, 1);
        for i in 1..=5 {
            d.record(UserId(1), MessageId(i), 1, now);
        }
        assert_eq!(d.lookup(UserId(1), MessageId(2), now), None);
        assert_eq!(d.lookup(UserId(1), MessageId(3), now), Some(1));
        assert_eq!(d.entries(), 3);
    }

    #[test]
    fn idle_senders_are_forgotten_after_the_ttl() {
        let t0 = Instant::now();
        let mut d = Dedup::new(8, TTL, 100, 1);
        d.record(UserId(1), MessageId(1), 1, t0);
        // Sender 2 keeps sending, so its window survives.
        for s in 0..10 {
            d.record(UserId(2), MessageId(s), 1, t0 + Duration::from_secs(s * 20));
        }
        let later = t0 + Duration::from_secs(200);
        assert_eq!(d.lookup(UserId(1), MessageId(1), later), None);
        assert_eq!(d.senders(), 1);
        assert_eq!(d.lookup(UserId(2), MessageId(9), later), Some(1));
    }

    #[test]
    fn the_entry_cap_forgets_the_oldest_sender_first() {
        let now = Instant::now();
        let mut d = Dedup::new(8, TTL, 4, 1);
        d.record(UserId(1), MessageId(1), 1, now);
        d.record(UserId(1), MessageId(2), 1, now);
        d.record(UserId(2), MessageId(1), 1, now);
        d.record(UserId(3), MessageId(1), 1, now);
        d.record(UserId(3), MessageId(2), 1, now);
        assert!(d.entries() <= 4);
        assert_eq!(d.lookup(UserId(1), MessageId(2), now), None);
        assert_eq!(d.lookup(UserId(3), MessageId(2), now), Some(1));
    }
}
