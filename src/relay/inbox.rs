//! Stored delivery's state: each user's inbox of messages kept until the user acknowledges
//! them (protocol.md, section 15).
//!
//! An inbox is a run of messages with consecutive sequence numbers, oldest first. Each is
//! kept as the INBOX_DELIVER frame the user will get, encoded once when it is stored and
//! shared (as `Bytes`) by every connection it is pushed or replayed to. Messages leave the
//! front of the inbox when the user acknowledges them or when they pass their age limit.
//! Every change a durable store must see is also returned as a [`StoreOp`]; replaying the
//! same ops with `Inboxes::apply` rebuilds the same state after a restart.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasherDefault;
use std::time::Duration;

use byteorder::{BigEndian, ByteOrder};
use bytes::{BufMut, Bytes, BytesMut};

use super::directory::IdHasher;
use crate::proto::frame::write_header;
use crate::proto::{Flags, MessageId, Opcode, UserId, HEADER_LEN};

/// Bytes of INBOX_DELIVER payload before the message: seq and stored-at time.
pub const INBOX_PREFIX: usize = 16;

/// What a durable store records, in order. Replayed through `Relay::restore`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreOp {
    /// The store's identity: clients compare it to know their sequence numbers still mean
    /// something here.
    Epoch(u64),
    /// A message stored in `user`'s inbox: the whole INBOX_DELIVER frame.
    Append {
        /// The recipient.
        user: UserId,
        /// The frame (its payload starts with the seq and the stored-at time).
        frame: Bytes,
    },
    /// `user` acknowledged everything up to `upto`.
    Ack {
        /// The recipient.
        user: UserId,
        /// The highest acknowledged sequence number.
        upto: u64,
    },
    /// A user's counters, written by compaction (the messages follow as Appends).
    Counters {
        /// The user.
        user: UserId,
        /// The last sequence number handed out.
        last_seq: u64,
        /// The highest sequence number dropped for age.
        expired_upto: u64,
    },
}

/// Limits of stored delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InboxLimits {
    /// Messages one inbox may hold.
    pub max_messages: usize,
    /// Payload bytes one inbox may hold.
    pub max_bytes: usize,
    /// How long a message waits for its recipient.
    pub ttl: Duration,
    /// Users with an inbox.
    pub max_users: usize,
    /// Payload bytes over all inboxes.
    pub max_total_bytes: usize,
}

/// Why a stored SEND cannot be kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InboxFull(pub String);

/// One stored message: its sequence number and its INBOX_DELIVER frame.
#[derive(Clone, Debug)]
pub struct Stored {
    /// The inbox sequence number.
    pub seq: u64,
    /// The frame pushed to the recipient.
    pub frame: Bytes,
}

impl Stored {
    fn stored_at_ms(&self) -> u64 {
        BigEndian::read_u64(&self.frame[HEADER_LEN + 8..])
    }

    fn payload_len(&self) -> usize {
        self.frame.len() - HEADER_LEN - INBOX_PREFIX
    }
}

/// One user's stored messages.
#[derive(Debug, Default)]
pub struct Inbox {
    messages: VecDeque<Stored>,
    bytes: usize,
    last_seq: u64,
    /// The highest sequence number known to be on disk (or every one, in memory mode):
    /// only these are sent, so no client ever holds a number a crash could reuse.
    durable_seq: u64,
    expired_upto: u64,
}

impl Inbox {
    /// The oldest sequence number held (`last_seq + 1` when empty).
    pub fn first_seq(&self) -> u64 {
        self.messages.front().map_or(self.last_seq + 1, |m| m.seq)
    }

    /// The last sequence number handed out (0 before the first message).
    #[cfg(test)]
    fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// The highest sequence number that may be sent to clients.
    pub fn durable_seq(&self) -> u64 {
        self.durable_seq
    }

    /// The highest sequence number dropped because it passed its age limit.
    pub fn expired_upto(&self) -> u64 {
        self.expired_upto
    }

    /// Messages held.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.messages.len()
    }

    /// The held message right after `seq`, if any.
    pub fn next_after(&self, seq: u64) -> Option<&Stored> {
        let first = self.messages.front()?.seq;
        let index = (seq + 1).saturating_sub(first);
        self.messages.get(usize::try_from(index).ok()?)
    }

    fn push(&mut self, stored: Stored) {
        self.last_seq = self.last_seq.max(stored.seq);
        self.bytes += stored.payload_len();
        self.messages.push_back(stored);
    }

    fn drop_front_while(&mut self, mut pred: impl FnMut(&Stored) -> bool) -> (usize, u64) {
        let (mut freed, mut last) = (0, 0);
        while let Some(front) = self.messages.front() {
            if !pred(front) {
                break;
            }
            freed += front.payload_len();
            last = front.seq;
            self.messages.pop_front();
        }
        self.bytes -= freed;
        (freed, last)
    }
}

/// Every user's inbox, with the limits that bound them.
#[derive(Debug)]
pub struct Inboxes {
    limits: InboxLimits,
    epoch: u64,
    users: HashMap<UserId, Inbox, BuildHasherDefault<IdHasher>>,
    total_bytes: usize,
    total_messages: usize,
}

impl Inboxes {
    /// Empty inboxes under `limits`, identified by `epoch`.
    pub fn new(limits: InboxLimits, epoch: u64) -> Inboxes {
        Inboxes {
            limits,
            epoch,
            users: HashMap::default(),
            total_bytes: 0,
            total_messages: 0,
        }
    }

    /// The store's identity (see [`StoreOp::Epoch`]).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// `user`'s inbox, if it has one.
    pub fn get(&self, user: UserId) -> Option<&Inbox> {
        self.users.get(&user)
    }

    /// Messages held over all inboxes.
    pub fn total_messages(&self) -> usize {
        self.total_messages
    }

    /// Payload bytes held over all inboxes.
    pub fn total_bytes(&self) -> usize {
        self.total_bytes
    }

    /// Users with an inbox.
    pub fn users(&self) -> usize {
        self.users.len()
    }

    /// Whether a message of `len` payload bytes fits in `user`'s inbox; the error names
    /// the limit that does not allow it.
    pub fn check_room(&self, user: UserId, len: usize) -> Result<(), InboxFull> {
        let l = &self.limits;
        let inbox = self.users.get(&user);
        if inbox.is_none() && self.users.len() >= l.max_users {
            return Err(InboxFull(format!(
                "the store holds inboxes for {} users (max users)",
                l.max_users
            )));
        }
        let (count, bytes) = inbox.map_or((0, 0), |i| (i.messages.len(), i.bytes));
        if count >= l.max_messages {
            return Err(InboxFull(format!(
                "the inbox of {user} holds {count} messages (max messages per inbox)"
            )));
        }
        if bytes + len > l.max_bytes {
            return Err(InboxFull(format!(
                "the inbox of {user} would pass {} bytes (max bytes per inbox)",
                l.max_bytes
            )));
        }
        if self.total_bytes + len > l.max_total_bytes {
            return Err(InboxFull(format!(
                "the store would pass {} bytes (max store bytes)",
                l.max_total_bytes
            )));
        }
        Ok(())
    }

    /// Stores a message (check [`Inboxes::check_room`] first) and returns what a durable
    /// store must record; the op's frame is the INBOX_DELIVER to push.
    pub fn append(
        &mut self,
        user: UserId,
        sender: UserId,
        msg_id: MessageId,
        payload: &[u8],
        now_ms: u64,
    ) -> (u64, Bytes) {
        let inbox = self.users.entry(user).or_default();
        let seq = inbox.last_seq + 1;
        let len = HEADER_LEN + INBOX_PREFIX + payload.len();
        let mut buf = BytesMut::with_capacity(len);
        write_header(
            &mut buf,
            len as u32,
            Opcode::InboxDeliver,
            Flags::EMPTY,
            msg_id,
            user,
            sender,
        );
        buf.put_u64(seq);
        buf.put_u64(now_ms);
        buf.put_slice(payload);
        let frame = buf.freeze();
        inbox.push(Stored {
            seq,
            frame: frame.clone(),
        });
        self.total_bytes += payload.len();
        self.total_messages += 1;
        (seq, frame)
    }

    /// Marks `user`'s messages up to `seq` as on disk (sendable).
    pub fn mark_durable(&mut self, user: UserId, seq: u64) {
        if let Some(inbox) = self.users.get_mut(&user) {
            inbox.durable_seq = inbox.durable_seq.max(seq.min(inbox.last_seq));
        }
    }

    /// After a restore: everything that was read back is on disk.
    pub fn mark_all_durable(&mut self) {
        for inbox in self.users.values_mut() {
            inbox.durable_seq = inbox.last_seq;
        }
    }

    /// Drops `user`'s messages up to `upto`. Returns true if `upto` is news (an op to
    /// record).
    pub fn ack(&mut self, user: UserId, upto: u64) -> bool {
        let Some(inbox) = self.users.get_mut(&user) else {
            return false;
        };
        let upto = upto.min(inbox.last_seq);
        let before = inbox.messages.len();
        let (freed, _) = inbox.drop_front_while(|m| m.seq <= upto);
        self.total_bytes -= freed;
        self.total_messages -= before - inbox.messages.len();
        before != inbox.messages.len()
    }

    /// Drops `user`'s messages older than the age limit.
    pub fn expire(&mut self, user: UserId, now_ms: u64) {
        let ttl = u64::try_from(self.limits.ttl.as_millis()).unwrap_or(u64::MAX);
        let Some(inbox) = self.users.get_mut(&user) else {
            return;
        };
        let before = inbox.messages.len();
        let (freed, last) =
            inbox.drop_front_while(|m| m.stored_at_ms().saturating_add(ttl) <= now_ms);
        if before != inbox.messages.len() {
            inbox.expired_upto = inbox.expired_upto.max(last);
            self.total_bytes -= freed;
            self.total_messages -= before - inbox.messages.len();
        }
    }

    /// Replays one recorded op (recovery). Limits are not checked: what was stored stays.
    pub fn apply(&mut self, op: StoreOp) {
        match op {
            StoreOp::Epoch(epoch) => self.epoch = epoch,
            StoreOp::Append { user, frame } => {
                if frame.len() < HEADER_LEN + INBOX_PREFIX {
                    return;
                }
                let seq = BigEndian::read_u64(&frame[HEADER_LEN..]);
                let inbox = self.users.entry(user).or_default();
                if inbox.messages.back().is_some_and(|m| seq <= m.seq) {
                    return; // already there
                }
                let stored = Stored { seq, frame };
                self.total_bytes += stored.payload_len();
                self.total_messages += 1;
                inbox.push(stored);
            }
            StoreOp::Ack { user, upto } => {
                self.ack(user, upto);
            }
            StoreOp::Counters {
                user,
                last_seq,
                expired_upto,
            } => {
                let inbox = self.users.entry(user).or_default();
                inbox.last_seq = inbox.last_seq.max(last_seq);
                inbox.expired_upto = inbox.expired_upto.max(expired_upto);
            }
        }
    }

    /// Everything held, as the ops that rebuild it (what compaction writes).
    pub fn snapshot(&self) -> Vec<StoreOp> {
        let mut ops = vec![StoreOp::Epoch(self.epoch)];
        for (&user, inbox) in &self.users {
            ops.extend(inbox.messages.iter().map(|m| StoreOp::Append {
                user,
                frame: m.frame.clone(),
            }));
            ops.push(StoreOp::Counters {
                user,
                last_seq: inbox.last_seq,
                expired_upto: inbox.expired_upto,
            });
        }
        ops
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> InboxLimits {
        InboxLimits {
            max_messages: 3,
            max_bytes: 100,
            ttl: Duration::from_secs(60),
            max_users: 2,
            max_total_bytes: 150,
        }
    }

    const BOB: UserId = UserId(2);

    #[test]
    fn sequence_numbers_count_up_and_acks_drop_the_front() {
        let mut inboxes = Inboxes::new(limits(), 7);
        for i in 1..=3u64 {
            let (seq, frame) = inboxes.append(BOB, UserId(1), MessageId(i * 10), b"hi", 1000);
            assert_eq!(seq, i);
            assert_eq!(frame[5], Opcode::InboxDeliver as u8);
        }
        let inbox = inboxes.get(BOB).unwrap();
        assert_eq!((inbox.first_seq(), inbox.last_seq()), (1, 3));
        assert_eq!(inbox.next_after(1).unwrap().seq, 2);
        assert!(inbox.next_after(3).is_none());
        assert!(inboxes.ack(BOB, 2));
        assert!(!inboxes.ack(BOB, 2), "nothing new");
        let inbox = inboxes.get(BOB).unwrap();
        assert_eq!((inbox.first_seq(), inbox.len()), (3, 1));
        assert_eq!(
            inbox.next_after(0).unwrap().seq,
            3,
            "before the front: the front"
        );
        assert_eq!(inboxes.total_messages(), 1);
    }

    #[test]
    fn each_limit_is_named_when_hit() {
        let mut inboxes = Inboxes::new(limits(), 7);
        for _ in 0..3 {
            inboxes.append(BOB, UserId(1), MessageId(1), b"x", 0);
        }
        assert!(inboxes
            .check_room(BOB, 1)
            .unwrap_err()
            .0
            .contains("max messages"));
        assert!(inboxes
            .check_room(UserId(3), 101)
            .unwrap_err()
            .0
            .contains("max bytes"));
        inboxes.append(UserId(3), UserId(1), MessageId(1), &[0; 90], 0);
        assert!(inboxes
            .check_room(UserId(4), 1)
            .unwrap_err()
            .0
            .contains("max users"));
        assert!(inboxes
            .check_room(UserId(3), 60)
            .unwrap_err()
            .0
            .contains("max bytes"));
        inboxes.ack(BOB, 3);
        assert!(inboxes.check_room(BOB, 60).is_ok());
        assert!(inboxes
            .check_room(BOB, 61)
            .unwrap_err()
            .0
            .contains("max store bytes"));
    }

    #[test]
    fn old_messages_expire_and_the_gap_is_remembered() {
        let mut inboxes = Inboxes::new(limits(), 7);
        inboxes.append(BOB, UserId(1), MessageId(1), b"old", 1_000);
        inboxes.append(BOB, UserId(1), MessageId(2), b"new", 50_000);
        inboxes.expire(BOB, 61_000);
        let inbox = inboxes.get(BOB).unwrap();
        assert_eq!((inbox.first_seq(), inbox.expired_upto()), (2, 1));
        assert_eq!(inboxes.total_bytes(), 3);
    }

    #[test]
    fn replaying_the_ops_or_a_snapshot_rebuilds_the_same_inboxes() {
        let mut live = Inboxes::new(limits(), 7);
        let mut log = vec![StoreOp::Epoch(7)];
        for i in 1..=3 {
            let (_, frame) = live.append(BOB, UserId(1), MessageId(i), b"m", 0);
            log.push(StoreOp::Append { user: BOB, frame });
        }
        live.ack(BOB, 1);
        log.push(StoreOp::Ack { user: BOB, upto: 1 });
        for ops in [log, live.snapshot()] {
            let mut rebuilt = Inboxes::new(limits(), 0);
            for op in ops {
                rebuilt.apply(op);
            }
            assert_eq!(rebuilt.epoch(), 7);
            let inbox = rebuilt.get(BOB).unwrap();
            assert_eq!(
                (inbox.first_seq(), inbox.last_seq(), inbox.len()),
                (2, 3, 2)
            );
            assert_eq!(rebuilt.total_messages(), 2);
        }
    }
}
