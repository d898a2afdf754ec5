//! Stored delivery's state: each user's inbox of messages kept until the user acknowledges
//! them (protocol.md, section 15).
//!
//! An inbox is a run of messages with consecutive sequence numbers, oldest first. Each is
//! kept as the INBOX_DELIVER frame the user will get, encoded once when it is stored and
//! shared (as `Bytes`) by every connection it is pushed or replayed to. Messages leave the
//! front of the inbox when the user acknowledges them or when they pass their age limit.
//! Every change a durable store must see is also returned as a [`StoreOp`]; replaying the
//! same ops with `Inboxes::apply` rebuilds the same state after a restart.
//!
//! **Cost.** Each message is charged [`message_cost`]: its whole INBOX_DELIVER frame plus
//! [`MESSAGE_OVERHEAD`] bytes for what holding it costs beside the frame (the `VecDeque`
//! slot, the `Bytes` handle, the allocation's header). Both byte limits count that, so
//! empty messages cannot be stored for free.
//!
//! **Empty inboxes and numbering.** An inbox emptied by acknowledgements is removed: it
//! frees its user slot and holds no memory. Sequence numbers must still never repeat for a
//! user (a client's cursor would skip a new message numbered at or below it), so the
//! relay keeps one number, `high_seq`, the highest sequence number handed out to anyone
//! in this epoch, and a new inbox starts counting after it. Every number a client of that
//! user can hold came from an earlier inbox of the user, whose numbers were all at most
//! `high_seq`; so the new ones are above all of them. Within one inbox the numbers stay
//! consecutive. `high_seq` is recorded: every `Append` raises it on replay, and a snapshot
//! writes it as the `Counters` of user 0 (a user id no one can log in as or send to).
//!
//! **Gaps outlive their messages.** An inbox emptied by age still has something to say
//! (`expired_upto`: the user missed messages), so it becomes a *tombstone*: counters only,
//! no messages, no user slot, no bytes. It goes away when the user acknowledges past its
//! `expired_upto` (the user has been told), when it gets a new message (it is an inbox
//! again, numbering on), or, as the oldest of more than `max_users` tombstones, when room
//! is needed (recorded as an `Ack` of its last number); then that user's client is not
//! told of that gap. Memory is therefore bounded by `max_users` inboxes plus `max_users`
//! tombstones plus the byte limit.
//!
//! **Expiry** is driven by a timer: [`Inboxes::expire_due`] drops messages from the inboxes
//! whose oldest message passed its age limit first, at most `budget` per call, and
//! [`Inboxes::next_expiry`] says when the next one is due. The schedule is an ordered set
//! of `(due, user)`, one entry per non-empty inbox, `due` being its front message's
//! stored-at plus the age limit; it is updated whenever an inbox's front changes
//! (O(log n)). Each expiry is recorded as the inbox's `Counters` (replay drops every
//! message up to `expired_upto`), so a restart does not bring expired messages back.
//! Requests that touch one inbox (a stored SEND to it, its user's INBOX_SYNC) also expire
//! that inbox first ([`Inboxes::expire`]), so what they see is exact between timer runs.
//!
//! **Devices.** Each user has a cursor per device ([`super::devices`]): INBOX_SYNC and
//! INBOX_ACK move the syncing device's cursor ([`Inboxes::sync`], [`Inboxes::device_ack`]),
//! and messages leave the front only up to the slowest tracked device's cursor (recorded
//! as an `Ack`, so replay needs no clock). A user's record therefore outlives its messages
//! while it tracks devices: an empty inbox with devices (or a gap) is kept as an *idle
//! record*, the tombstone of above, under the same bound. A message a user sends stored
//! is also kept in the user's own inbox as a *copy* for the user's other devices
//! ([`Inboxes::append_copy`]); the device it came from skips it.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use byteorder::{BigEndian, ByteOrder};
use bytes::{BufMut, Bytes, BytesMut};

use super::devices::{DeviceCursor, DeviceCursors};
use super::hashing::{id_map, IdMap};
use crate::proto::frame::write_header;
use crate::proto::{Flags, MessageId, Opcode, UserId, HEADER_LEN};

/// Bytes of INBOX_DELIVER payload before the message: seq and stored-at time.
pub const INBOX_PREFIX: usize = 16;

/// What holding one stored message costs beside its frame, in bytes (the `VecDeque` slot,
/// the `Bytes` handle and the allocation's own header), charged against the byte limits.
pub const MESSAGE_OVERHEAD: usize = 64;

/// What one user's inbox (or tombstone) costs beside its messages, in bytes (its map entry,
/// its first queue allocation, its place in the expiry schedule): charged against the
/// store's byte limit, so many single-message inboxes are counted for what they hold.
pub const INBOX_OVERHEAD: usize = 320;

/// What a stored message with `payload_len` bytes of message counts against the byte
/// limits: its INBOX_DELIVER frame (header, seq, stored-at, message) plus
/// [`MESSAGE_OVERHEAD`].
pub const fn message_cost(payload_len: usize) -> usize {
    HEADER_LEN + INBOX_PREFIX + payload_len + MESSAGE_OVERHEAD
}

/// `Stored::origin` of a message that is not a copy of one the user sent.
pub const NO_ORIGIN: u64 = u64::MAX;

/// What tracking one device costs against the store's byte limit.
pub const DEVICE_OVERHEAD: usize = 32;

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
    /// `user` acknowledged everything up to `upto` (also written when the relay forgets a
    /// tombstone: an ack of its last number).
    Ack {
        /// The recipient.
        user: UserId,
        /// The highest acknowledged sequence number.
        upto: u64,
    },
    /// A user's counters: written by compaction (after the user's messages), and when
    /// messages expire (replay drops every message up to `expired_upto`). For user 0 it
    /// is the relay-wide highest sequence number handed out (`last_seq`).
    Counters {
        /// The user (0: the relay-wide counter).
        user: UserId,
        /// The last sequence number handed out.
        last_seq: u64,
        /// The highest sequence number dropped for age.
        expired_upto: u64,
    },
    /// A copy of a message `user` sent from device `origin`, kept in the user's own inbox
    /// for the user's other devices: the whole INBOX_DELIVER frame (`target` = the peer).
    SentCopy {
        /// The sender, whose inbox holds the copy.
        user: UserId,
        /// The frame (as for `Append`).
        frame: Bytes,
        /// The tag of the device it was sent from.
        origin: u64,
    },
    /// A device's cursor, as it is now (replay sets it; it deletes nothing by itself),
    /// with the user's last sequence number then: a record the cursor's INBOX_SYNC made
    /// (the user had none) numbers on after it when replayed, as it did live.
    Cursor {
        /// The user.
        user: UserId,
        /// The device and its cursor.
        cursor: DeviceCursor,
        /// The user's last sequence number handed out when the cursor was written.
        last_seq: u64,
    },
    /// A device is no longer tracked (not seen within the retention time, or past the
    /// limit of devices).
    ForgetDevice {
        /// The user.
        user: UserId,
        /// The device's tag.
        device: u64,
    },
    /// An idle record (no messages) was dropped to make room for others.
    Forget {
        /// The user.
        user: UserId,
    },
    /// A DEDUP SEND the relay answered, so that a resend after a restart is recognised
    /// (protocol.md, section 13). Written by compaction for every id the relay remembers;
    /// an `Append` stands for its own message. Not inbox state: `Inboxes::apply` skips it.
    Sent {
        /// The sender.
        sender: UserId,
        /// The sender's message id.
        msg_id: MessageId,
        /// The count its ACK gave.
        count: u32,
    },
}

/// Limits of stored delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InboxLimits {
    /// Messages one inbox may hold.
    pub max_messages: usize,
    /// Bytes one inbox may hold, each message counted as its INBOX_DELIVER frame plus 64.
    pub max_bytes: usize,
    /// How long a message waits for its recipient.
    pub ttl: Duration,
    /// Users with an inbox (and, separately, tombstones kept for their gaps).
    pub max_users: usize,
    /// Bytes over all inboxes, each message counted as its INBOX_DELIVER frame plus 64.
    pub max_total_bytes: usize,
    /// Devices tracked per user.
    pub max_devices: usize,
    /// A device not heard of for this long is no longer tracked.
    pub device_retention: Duration,
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
    /// For a copy of a message the user sent: the device it came from, which skips it
    /// ([`NO_ORIGIN`] otherwise).
    pub origin: u64,
}

impl Stored {
    fn stored_at_ms(&self) -> u64 {
        BigEndian::read_u64(&self.frame[HEADER_LEN + 8..])
    }

    fn cost(&self) -> usize {
        self.frame.len() + MESSAGE_OVERHEAD
    }
}

/// One user's stored messages (or, with none, a tombstone that remembers a gap).
#[derive(Debug, Default)]
pub struct Inbox {
    messages: VecDeque<Stored>,
    /// The messages' cost ([`message_cost`] each).
    bytes: usize,
    last_seq: u64,
    /// The highest sequence number known to be on disk (or every one, in memory mode):
    /// only these are sent, so no client ever holds a number a crash could reuse.
    durable_seq: u64,
    expired_upto: u64,
    /// When the front message passes its age limit: its key in the expiry schedule.
    due: Option<u64>,
    /// A tombstone's key in the tombstone order.
    tomb: Option<u64>,
    /// The user's tracked devices.
    devices: DeviceCursors,
}

impl Inbox {
    /// An empty inbox numbering on after `seq`.
    fn after(seq: u64) -> Inbox {
        Inbox {
            last_seq: seq,
            durable_seq: seq,
            ..Inbox::default()
        }
    }

    /// The oldest sequence number held (`last_seq + 1` when empty).
    pub fn first_seq(&self) -> u64 {
        self.messages.front().map_or(self.last_seq + 1, |m| m.seq)
    }

    /// The last sequence number handed out.
    #[cfg(test)]
    fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// The highest sequence number that may be sent to clients.
    pub fn durable_seq(&self) -> u64 {
        self.durable_seq
    }

    /// The highest sequence number dropped because it passed its age limit.
    #[cfg(test)]
    pub fn expired_upto(&self) -> u64 {
        self.expired_upto
    }

    /// The cursor of `device`, if tracked.
    #[cfg(test)]
    pub fn device(&self, device: u64) -> Option<&DeviceCursor> {
        self.devices.get(device)
    }

    /// Tracked devices besides `device` that were seen within `retention_ms` of `now_ms`.
    fn other_devices(&self, device: u64, now_ms: u64, retention_ms: u64) -> bool {
        self.devices
            .iter()
            .any(|c| c.device != device && now_ms.saturating_sub(c.seen_ms) <= retention_ms)
    }

    /// Moves `device`'s cursor over the copies of its own messages right after it (the
    /// device has them: it sent them).
    fn skip_own_copies(&mut self, device: u64) {
        let Some(acked) = self.devices.get(device).map(|c| c.acked) else {
            return;
        };
        let mut upto = acked;
        while let Some(next) = self.next_after(upto) {
            if next.origin != device {
                break;
            }
            upto = next.seq;
        }
        if let Some(c) = self.devices.get_mut(device) {
            c.acked = upto;
        }
    }

    /// Messages held.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.messages.len()
    }

    /// The held message right after `seq`, if any.
    pub fn next_after(&self, seq: u64) -> Option<&Stored> {
        let first = self.messages.front()?.seq;
        let guess = usize::try_from((seq + 1).saturating_sub(first)).ok()?;
        match self.messages.get(guess) {
            // Consecutive numbers (always, unless a repair dropped a damaged record).
            Some(m) if m.seq == (seq + 1).max(first) => Some(m),
            _ => self
                .messages
                .get(self.messages.partition_point(|m| m.seq <= seq)),
        }
    }

    fn push(&mut self, stored: Stored) {
        self.last_seq = self.last_seq.max(stored.seq);
        self.bytes += stored.cost();
        self.messages.push_back(stored);
    }

    /// Drops front messages while `pred` holds, at most `max`; returns (messages, cost,
    /// last seq dropped).
    fn drop_front_while(
        &mut self,
        max: usize,
        mut pred: impl FnMut(&Stored) -> bool,
    ) -> (usize, usize, u64) {
        let (mut count, mut freed, mut last) = (0, 0, 0);
        while count < max {
            let Some(front) = self.messages.front() else {
                break;
            };
            if !pred(front) {
                break;
            }
            freed += front.cost();
            last = front.seq;
            count += 1;
            self.messages.pop_front();
        }
        self.bytes -= freed;
        (count, freed, last)
    }
}

type UserMap<V> = IdMap<UserId, V>;

/// Every user's inbox, with the limits that bound them.
#[derive(Debug)]
pub struct Inboxes {
    limits: InboxLimits,
    epoch: u64,
    /// Inboxes with messages, and tombstones (empty, `tomb` set).
    users: UserMap<Inbox>,
    /// The highest sequence number handed out to any user: a new inbox numbers on after
    /// it, so a user's numbers never repeat (see the module docs).
    high_seq: u64,
    /// `(due, user)` of every inbox with messages, earliest first.
    schedule: BTreeSet<(u64, UserId)>,
    /// Tombstones, oldest first.
    tombstones: BTreeMap<u64, UserId>,
    next_tomb: u64,
    /// Cost of every message held ([`message_cost`]).
    total_bytes: usize,
    total_messages: usize,
    /// Devices tracked over all users.
    total_devices: usize,
}

/// What INBOX_STATE tells a syncing device ([`Inboxes::sync`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyncReport {
    /// The oldest sequence number held (`last_seq + 1` when none is).
    pub first_seq: u64,
    /// The last sequence number that may be sent.
    pub last_seq: u64,
    /// Every number up to this one that the device may have missed (dropped for age, or
    /// deleted while the device was not tracked).
    pub expired_upto: u64,
    /// The device was not tracked and its client has no numbers: it starts from what the
    /// inbox holds.
    pub new_device: bool,
}

impl Inboxes {
    /// Empty inboxes under `limits`, identified by `epoch`; the user map is hashed with
    /// `seed` (user ids are chosen by senders).
    pub fn new(limits: InboxLimits, epoch: u64, seed: u64) -> Inboxes {
        Inboxes {
            limits,
            epoch,
            users: id_map(seed),
            high_seq: 0,
            schedule: BTreeSet::new(),
            tombstones: BTreeMap::new(),
            next_tomb: 0,
            total_bytes: 0,
            total_messages: 0,
            total_devices: 0,
        }
    }

    /// Devices tracked over all users.
    #[cfg(test)]
    pub fn devices(&self) -> usize {
        self.total_devices
    }

    /// The store's identity (see [`StoreOp::Epoch`]).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// `user`'s inbox or tombstone, if it has one.
    pub fn get(&self, user: UserId) -> Option<&Inbox> {
        self.users.get(&user)
    }

    /// The highest sequence number handed out to any user (a user without an inbox gets
    /// numbers above it).
    #[cfg(test)]
    pub fn high_seq(&self) -> u64 {
        self.high_seq
    }

    /// Messages held over all inboxes.
    pub fn total_messages(&self) -> usize {
        self.total_messages
    }

    /// What the messages held count against the store byte limit ([`message_cost`] each).
    #[cfg(test)]
    pub fn total_bytes(&self) -> usize {
        self.total_bytes
    }

    /// Bytes of the INBOX_DELIVER frames held (what the log holds of them).
    pub fn frame_bytes(&self) -> usize {
        self.total_bytes - MESSAGE_OVERHEAD * self.total_messages
    }

    /// Users with messages held (tombstones not counted).
    pub fn users(&self) -> usize {
        self.users.len() - self.tombstones.len()
    }

    /// Users whose inbox emptied by age, remembered for their gap.
    #[cfg(test)]
    pub fn tombstones(&self) -> usize {
        self.tombstones.len()
    }

    /// When the next message passes its age limit (Unix milliseconds), if any is held.
    pub fn next_expiry(&self) -> Option<u64> {
        self.schedule.first().map(|&(due, _)| due)
    }

    fn ttl_ms(&self) -> u64 {
        u64::try_from(self.limits.ttl.as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether a message of `len` payload bytes fits in `user`'s inbox; the error names
    /// the limit that does not allow it.
    pub fn check_room(&self, user: UserId, len: usize) -> Result<(), InboxFull> {
        let l = &self.limits;
        let inbox = self.users.get(&user).filter(|i| i.tomb.is_none());
        if inbox.is_none() && self.users() >= l.max_users {
            return Err(InboxFull(format!(
                "the store holds inboxes for {} users (max users)",
                l.max_users
            )));
        }
        let cost = message_cost(len);
        let (count, bytes) = inbox.map_or((0, 0), |i| (i.messages.len(), i.bytes));
        if count >= l.max_messages {
            return Err(InboxFull(format!(
                "the inbox of {user} holds {count} messages (max messages per inbox)"
            )));
        }
        if bytes + cost > l.max_bytes {
            return Err(InboxFull(format!(
                "the inbox of {user} would pass {} bytes (max bytes per inbox)",
                l.max_bytes
            )));
        }
        // A user without a record adds one; an idle record (counted already) revives.
        let inboxes = self.users.len() + usize::from(!self.users.contains_key(&user));
        let bookkeeping = inboxes * INBOX_OVERHEAD + self.total_devices * DEVICE_OVERHEAD;
        if self.total_bytes + bookkeeping + cost > l.max_total_bytes {
            return Err(InboxFull(format!(
                "the store would pass {} bytes (max store bytes)",
                l.max_total_bytes
            )));
        }
        Ok(())
    }

    /// Stores a message (check [`Inboxes::check_room`] first) and returns its sequence
    /// number and INBOX_DELIVER frame (what a durable store records as an `Append`).
    pub fn append(
        &mut self,
        user: UserId,
        sender: UserId,
        msg_id: MessageId,
        payload: &[u8],
        now_ms: u64,
    ) -> (u64, Bytes) {
        self.append_frame(user, user, sender, msg_id, payload, now_ms, NO_ORIGIN)
    }

    /// Keeps a copy of a message `user` sent to `peer` from device `origin` in the user's
    /// own inbox, for the user's other devices (check [`Inboxes::check_room`] first).
    /// Returns its sequence number and INBOX_DELIVER frame (`target` = `peer`, `source` =
    /// `user`: what a durable store records as a `SentCopy`).
    pub fn append_copy(
        &mut self,
        user: UserId,
        peer: UserId,
        msg_id: MessageId,
        payload: &[u8],
        now_ms: u64,
        origin: u64,
    ) -> (u64, Bytes) {
        self.append_frame(user, peer, user, msg_id, payload, now_ms, origin)
    }

    /// True when `user` tracks a device besides `device` that was seen within the
    /// retention time: a message the user sends from `device` is worth a copy.
    pub fn has_other_devices(&self, user: UserId, device: u64, now_ms: u64) -> bool {
        let retention = self.retention_ms();
        self.users
            .get(&user)
            .is_some_and(|i| i.other_devices(device, now_ms, retention))
    }

    #[allow(clippy::too_many_arguments)]
    fn append_frame(
        &mut self,
        user: UserId,
        target: UserId,
        sender: UserId,
        msg_id: MessageId,
        payload: &[u8],
        now_ms: u64,
        origin: u64,
    ) -> (u64, Bytes) {
        let high_seq = self.high_seq;
        let seq = self.users.get(&user).map_or(high_seq, |i| i.last_seq) + 1;
        let len = HEADER_LEN + INBOX_PREFIX + payload.len();
        let mut buf = BytesMut::with_capacity(len);
        write_header(
            &mut buf,
            len as u32,
            Opcode::InboxDeliver,
            Flags::EMPTY,
            msg_id,
            target,
            sender,
        );
        buf.put_u64(seq);
        buf.put_u64(now_ms);
        buf.put_slice(payload);
        let frame = buf.freeze();
        let stored = Stored {
            seq,
            frame: frame.clone(),
            origin,
        };
        self.push_stored(user, stored, high_seq);
        (seq, frame)
    }

    /// Puts a message at the end of `user`'s inbox (made, numbering after `high_seq`, or
    /// revived from a tombstone), keeping the totals and the expiry schedule.
    fn push_stored(&mut self, user: UserId, stored: Stored, high_seq: u64) {
        let ttl_ms = self.ttl_ms();
        let inbox = self
            .users
            .entry(user)
            .or_insert_with(|| Inbox::after(high_seq));
        if let Some(tomb) = inbox.tomb.take() {
            self.tombstones.remove(&tomb);
        }
        self.total_bytes += stored.cost();
        self.total_messages += 1;
        self.high_seq = self.high_seq.max(stored.seq);
        let origin = stored.origin;
        inbox.push(stored);
        if origin != NO_ORIGIN {
            inbox.skip_own_copies(origin);
        }
        reschedule(&mut self.schedule, user, inbox, ttl_ms);
    }

    fn retention_ms(&self) -> u64 {
        u64::try_from(self.limits.device_retention.as_millis()).unwrap_or(u64::MAX)
    }

    /// Device `device` of `user` sends INBOX_SYNC, saying it has every message up to
    /// `client_last` (`None`: a fresh client, or numbers of another epoch). Tracks the
    /// device (a new one starts from what the inbox holds), moves its cursor, deletes what
    /// every device has, and says what to answer. What a durable store must record goes
    /// to `ops`.
    pub fn sync(
        &mut self,
        user: UserId,
        device: u64,
        client_last: Option<u64>,
        now_ms: u64,
        ops: &mut Vec<StoreOp>,
    ) -> SyncReport {
        let high_seq = self.high_seq;
        let retention = self.retention_ms();
        let max_devices = self.limits.max_devices;
        let inbox = self
            .users
            .entry(user)
            .or_insert_with(|| Inbox::after(high_seq));
        // (A record made just now numbers after `high_seq`; so does its replay: the
        // `Cursor` below carries the number.)
        let devices_before = inbox.devices.len();
        let mut forgotten = Vec::new();
        inbox.devices.prune(now_ms, retention, &mut forgotten);
        let first_seq = inbox.first_seq();
        let sendable = inbox.durable_seq;
        let mut report = SyncReport {
            first_seq,
            last_seq: sendable,
            expired_upto: inbox.expired_upto,
            new_device: false,
        };
        let known = inbox.devices.get(device).copied();
        match (known, client_last) {
            (Some(mut c), last) => {
                c.acked = c.acked.max(last.unwrap_or(0).min(sendable));
                c.seen_ms = now_ms;
                inbox.devices.set(c);
            }
            (None, Some(last)) if last > 0 => {
                // Tracked once, forgotten since: what it may have missed is reported like
                // an expiry.
                if last + 1 < first_seq {
                    report.expired_upto = report.expired_upto.max(first_seq - 1);
                }
                let c = DeviceCursor {
                    device,
                    acked: last.min(sendable),
                    seen_ms: now_ms,
                };
                forgotten.extend(inbox.devices.add(c, max_devices));
            }
            (None, _) => {
                report.new_device = true;
                if !inbox.devices.is_empty() {
                    // Another device may have had what expired: only the user's first
                    // device is told of expiries from before it came.
                    report.expired_upto = 0;
                }
                let c = DeviceCursor {
                    device,
                    acked: first_seq - 1,
                    seen_ms: now_ms,
                };
                forgotten.extend(inbox.devices.add(c, max_devices));
            }
        }
        self.record_cursor(user, device, devices_before, forgotten, ops);
        if let Some(inbox) = self.users.get(&user) {
            report.first_seq = inbox.first_seq();
        }
        report
    }

    /// Device `device` of `user` acknowledges every message up to `upto`: its cursor
    /// moves, and what every device has is deleted. What a durable store must record goes
    /// to `ops`.
    pub fn device_ack(
        &mut self,
        user: UserId,
        device: u64,
        upto: u64,
        now_ms: u64,
        ops: &mut Vec<StoreOp>,
    ) {
        let retention = self.retention_ms();
        let max_devices = self.limits.max_devices;
        let Some(inbox) = self.users.get_mut(&user) else {
            return;
        };
        // Only what may have been sent can be acknowledged.
        let upto = upto.min(inbox.durable_seq);
        let devices_before = inbox.devices.len();
        let mut forgotten = Vec::new();
        inbox.devices.prune(now_ms, retention, &mut forgotten);
        match inbox.devices.get_mut(device) {
            Some(c) => {
                c.acked = c.acked.max(upto);
                c.seen_ms = now_ms;
            }
            None => {
                let c = DeviceCursor {
                    device,
                    acked: upto,
                    seen_ms: now_ms,
                };
                forgotten.extend(inbox.devices.add(c, max_devices));
            }
        }
        self.record_cursor(user, device, devices_before, forgotten, ops);
    }

    /// After `device`'s cursor moved: skips it over its own copies, keeps the device
    /// count, records the devices `forgotten` and the cursor, and deletes what every
    /// device has.
    fn record_cursor(
        &mut self,
        user: UserId,
        device: u64,
        devices_before: usize,
        forgotten: Vec<u64>,
        ops: &mut Vec<StoreOp>,
    ) {
        let Some(inbox) = self.users.get_mut(&user) else {
            return;
        };
        inbox.skip_own_copies(device);
        let (devices_after, last_seq) = (inbox.devices.len(), inbox.last_seq);
        let cursor = inbox.devices.get(device).copied();
        self.count_devices(devices_before, devices_after);
        ops.extend(
            forgotten
                .into_iter()
                .map(|device| StoreOp::ForgetDevice { user, device }),
        );
        if let Some(cursor) = cursor {
            ops.push(StoreOp::Cursor {
                user,
                cursor,
                last_seq,
            });
        }
        self.settle(user, ops);
    }

    /// Deletes `user`'s messages every tracked device has acknowledged (recorded as an
    /// `Ack`); an emptied inbox becomes an idle record.
    fn settle(&mut self, user: UserId, ops: &mut Vec<StoreOp>) {
        let Some(floor) = self.users.get(&user).and_then(|i| i.devices.floor()) else {
            return;
        };
        if self.drop_upto(user, floor) {
            ops.push(StoreOp::Ack { user, upto: floor });
        }
        let Some(inbox) = self.users.get(&user) else {
            return;
        };
        if !inbox.messages.is_empty() {
            return;
        }
        match inbox.tomb {
            None => self.entomb(user, Some(ops)),
            // Heard of just now: the last idle record to be forgotten.
            Some(tomb) => self.touch_tomb(user, tomb),
        }
    }

    /// Keeps the count of tracked devices (charged against the store's byte limit).
    fn count_devices(&mut self, before: usize, after: usize) {
        self.total_devices = (self.total_devices + after).saturating_sub(before);
    }

    /// Moves an idle record to the young end of the forgetting order.
    fn touch_tomb(&mut self, user: UserId, tomb: u64) {
        self.tombstones.remove(&tomb);
        self.next_tomb += 1;
        self.tombstones.insert(self.next_tomb, user);
        if let Some(inbox) = self.users.get_mut(&user) {
            inbox.tomb = Some(self.next_tomb);
        }
    }

    /// Drops `user`'s messages up to `upto`, keeping the record; true if any went.
    fn drop_upto(&mut self, user: UserId, upto: u64) -> bool {
        let ttl_ms = self.ttl_ms();
        let Some(inbox) = self.users.get_mut(&user) else {
            return false;
        };
        let (count, freed, _) = inbox.drop_front_while(usize::MAX, |m| m.seq <= upto);
        if count == 0 {
            return false;
        }
        self.total_bytes -= freed;
        self.total_messages -= count;
        reschedule(&mut self.schedule, user, inbox, ttl_ms);
        true
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

    /// Drops `user`'s messages up to `upto`; an inbox left empty is removed, and so is a
    /// tombstone acknowledged past its gap. Returns true if anything changed (an op to
    /// record).
    pub fn ack(&mut self, user: UserId, upto: u64) -> bool {
        let Some(inbox) = self.users.get(&user) else {
            return false;
        };
        if let Some(tomb) = inbox.tomb {
            if upto < inbox.expired_upto || !inbox.devices.is_empty() {
                return false;
            }
            self.tombstones.remove(&tomb);
            self.users.remove(&user);
            return true;
        }
        if !self.drop_upto(user, upto) {
            return false;
        }
        let Some(inbox) = self.users.get(&user) else {
            return true;
        };
        if inbox.messages.is_empty() {
            if inbox.devices.is_empty() {
                self.users.remove(&user);
            } else {
                // Its devices' cursors are still needed: an idle record.
                self.entomb(user, None);
            }
        }
        true
    }

    /// Drops `user`'s messages older than the age limit; what a durable store must record
    /// goes to `ops`. Returns how many were dropped.
    pub fn expire(&mut self, user: UserId, now_ms: u64, ops: &mut Vec<StoreOp>) -> usize {
        self.expire_user(user, now_ms, usize::MAX, ops)
    }

    /// Drops up to `budget` messages that passed the age limit by `now_ms`, from the
    /// inboxes whose oldest message is oldest first; what a durable store must record goes
    /// to `ops`. Returns how many were dropped (`budget`: there may be more due, see
    /// [`Inboxes::next_expiry`]).
    pub fn expire_due(&mut self, now_ms: u64, budget: usize, ops: &mut Vec<StoreOp>) -> usize {
        let mut done = 0;
        while done < budget {
            let Some(&(due, user)) = self.schedule.first() else {
                break;
            };
            if due > now_ms {
                break;
            }
            let n = self.expire_user(user, now_ms, budget - done, ops);
            if n == 0 {
                // Cannot happen (`due` is exact); never spin on it.
                debug_assert!(false, "{user} was due at {due} and had nothing to expire");
                self.schedule.remove(&(due, user));
                if let Some(inbox) = self.users.get_mut(&user) {
                    inbox.due = None;
                }
            }
            done += n;
        }
        done
    }

    fn expire_user(
        &mut self,
        user: UserId,
        now_ms: u64,
        budget: usize,
        ops: &mut Vec<StoreOp>,
    ) -> usize {
        let ttl_ms = self.ttl_ms();
        let Some(inbox) = self.users.get_mut(&user) else {
            return 0;
        };
        let (count, freed, last) = inbox.drop_front_while(budget, |m| {
            m.stored_at_ms().saturating_add(ttl_ms) <= now_ms
        });
        if count == 0 {
            return 0;
        }
        inbox.expired_upto = inbox.expired_upto.max(last);
        self.total_bytes -= freed;
        self.total_messages -= count;
        ops.push(StoreOp::Counters {
            user,
            last_seq: inbox.last_seq,
            expired_upto: inbox.expired_upto,
        });
        reschedule(&mut self.schedule, user, inbox, ttl_ms);
        if inbox.messages.is_empty() {
            self.entomb(user, Some(ops));
        }
        count
    }

    /// Makes `user`'s (empty) inbox a tombstone. With `ops`, forgets the oldest tombstones
    /// past the limit and records that; without (replay), what the log says stays.
    fn entomb(&mut self, user: UserId, ops: Option<&mut Vec<StoreOp>>) {
        let Some(inbox) = self.users.get_mut(&user) else {
            return;
        };
        if inbox.tomb.is_some() {
            return;
        }
        self.next_tomb += 1;
        inbox.tomb = Some(self.next_tomb);
        self.tombstones.insert(self.next_tomb, user);
        let Some(ops) = ops else {
            return;
        };
        while self.tombstones.len() > self.limits.max_users {
            let Some((_, oldest)) = self.tombstones.pop_first() else {
                break;
            };
            if let Some(gone) = self.users.remove(&oldest) {
                self.count_devices(gone.devices.len(), 0);
                ops.push(StoreOp::Forget { user: oldest });
            }
        }
    }

    /// Replays one recorded op (recovery). Limits are not checked: what was stored stays.
    pub fn apply(&mut self, op: StoreOp) {
        let ttl_ms = self.ttl_ms();
        match op {
            StoreOp::Epoch(epoch) => self.epoch = epoch,
            StoreOp::Append { user, frame } => self.apply_append(user, frame, NO_ORIGIN),
            StoreOp::SentCopy {
                user,
                frame,
                origin,
            } => self.apply_append(user, frame, origin),
            StoreOp::Cursor {
                user,
                cursor,
                last_seq,
            } => {
                self.high_seq = self.high_seq.max(last_seq);
                let inbox = self
                    .users
                    .entry(user)
                    .or_insert_with(|| Inbox::after(last_seq));
                inbox.last_seq = inbox.last_seq.max(last_seq);
                let before = inbox.devices.len();
                inbox.devices.set(cursor);
                let (after, idle) = (inbox.devices.len(), inbox.messages.is_empty());
                self.count_devices(before, after);
                if idle {
                    self.entomb(user, None);
                }
            }
            StoreOp::ForgetDevice { user, device } => {
                if let Some(inbox) = self.users.get_mut(&user) {
                    if inbox.devices.remove(device) {
                        self.count_devices(1, 0);
                    }
                }
            }
            StoreOp::Forget { user } => {
                if let Some(gone) = self.users.remove(&user) {
                    if let Some(tomb) = gone.tomb {
                        self.tombstones.remove(&tomb);
                    }
                    if let Some(due) = gone.due {
                        self.schedule.remove(&(due, user));
                    }
                    self.total_bytes -= gone.bytes;
                    self.total_messages -= gone.messages.len();
                    self.count_devices(gone.devices.len(), 0);
                }
            }
            StoreOp::Ack { user, upto } => {
                self.ack(user, upto);
            }
            StoreOp::Sent { .. } => {}
            StoreOp::Counters {
                user,
                last_seq,
                expired_upto,
            } => {
                self.high_seq = self.high_seq.max(last_seq);
                if user.is_none() {
                    return;
                }
                let inbox = self.users.entry(user).or_default();
                inbox.last_seq = inbox.last_seq.max(last_seq);
                inbox.expired_upto = inbox.expired_upto.max(expired_upto);
                let upto = inbox.expired_upto;
                let (count, freed, _) = inbox.drop_front_while(usize::MAX, |m| m.seq <= upto);
                self.total_bytes -= freed;
                self.total_messages -= count;
                reschedule(&mut self.schedule, user, inbox, ttl_ms);
                if !inbox.messages.is_empty() {
                    return;
                }
                if inbox.expired_upto == 0 && inbox.devices.is_empty() {
                    self.users.remove(&user); // nothing to say: numbering is in high_seq
                } else {
                    self.entomb(user, None);
                }
            }
        }
    }

    /// Replays a stored message (or a copy, from device `origin`).
    fn apply_append(&mut self, user: UserId, frame: Bytes, origin: u64) {
        if frame.len() < HEADER_LEN + INBOX_PREFIX {
            return;
        }
        let seq = BigEndian::read_u64(&frame[HEADER_LEN..]);
        if self.users.get(&user).is_some_and(|i| seq <= i.last_seq) {
            return; // already there
        }
        // A replayed message numbers as it did: a new inbox starts at 0, not after the
        // relay-wide number.
        self.push_stored(user, Stored { seq, frame, origin }, 0);
    }

    /// Everything held, as the ops that rebuild it (what compaction writes): the epoch,
    /// the relay-wide counter, each inbox's messages and counters, then the tombstones
    /// oldest first.
    pub fn snapshot(&self) -> Vec<StoreOp> {
        let mut ops = vec![
            StoreOp::Epoch(self.epoch),
            StoreOp::Counters {
                user: UserId::NONE,
                last_seq: self.high_seq,
                expired_upto: 0,
            },
        ];
        let counters = |user: UserId, inbox: &Inbox| StoreOp::Counters {
            user,
            last_seq: inbox.last_seq,
            expired_upto: inbox.expired_upto,
        };
        fn cursors(user: UserId, inbox: &Inbox) -> impl Iterator<Item = StoreOp> + '_ {
            let cursors = inbox.devices.iter();
            cursors.map(move |&cursor| StoreOp::Cursor {
                user,
                cursor,
                last_seq: inbox.last_seq,
            })
        }
        for (&user, inbox) in self.users.iter().filter(|(_, i)| i.tomb.is_none()) {
            ops.extend(inbox.messages.iter().map(|m| match m.origin {
                NO_ORIGIN => StoreOp::Append {
                    user,
                    frame: m.frame.clone(),
                },
                origin => StoreOp::SentCopy {
                    user,
                    frame: m.frame.clone(),
                    origin,
                },
            }));
            ops.push(counters(user, inbox));
            ops.extend(cursors(user, inbox));
        }
        for &user in self.tombstones.values() {
            if let Some(inbox) = self.users.get(&user) {
                ops.extend(cursors(user, inbox));
                ops.push(counters(user, inbox));
            }
        }
        ops
    }
}

/// Puts `user`'s entry in the expiry schedule where its front message is due (out of it
/// when it has none).
fn reschedule(schedule: &mut BTreeSet<(u64, UserId)>, user: UserId, inbox: &mut Inbox, ttl: u64) {
    let due = inbox
        .messages
        .front()
        .map(|m| m.stored_at_ms().saturating_add(ttl));
    if due != inbox.due {
        if let Some(old) = inbox.due {
            schedule.remove(&(old, user));
        }
        if let Some(new) = due {
            schedule.insert((new, user));
        }
        inbox.due = due;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cost of a message of `n` payload bytes.
    const fn c(n: usize) -> usize {
        message_cost(n)
    }

    fn limits() -> InboxLimits {
        InboxLimits {
            max_messages: 3,
            max_bytes: c(0) + c(100),
            ttl: Duration::from_secs(60),
            max_users: 2,
            // Two inboxes' fixed cost, then room for messages.
            max_total_bytes: 2 * INBOX_OVERHEAD + c(0) * 2 + c(150),
            max_devices: 3,
            device_retention: Duration::from_secs(600),
        }
    }

    const BOB: UserId = UserId(2);

    #[test]
    fn sequence_numbers_count_up_and_acks_drop_the_front() {
        let mut inboxes = Inboxes::new(limits(), 7, 1);
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
        assert_eq!(inboxes.total_bytes(), c(2));
        assert_eq!(inboxes.frame_bytes(), HEADER_LEN + INBOX_PREFIX + 2);
    }

    #[test]
    fn an_emptied_inbox_is_removed_and_the_next_one_numbers_on_above_every_user() {
        let mut inboxes = Inboxes::new(limits(), 7, 1);
        inboxes.append(BOB, UserId(1), MessageId(1), b"a", 0);
        inboxes.append(BOB, UserId(1), MessageId(2), b"b", 0);
        for _ in 0..5 {
            inboxes.append(UserId(3), UserId(1), MessageId(1), b"c", 0);
            inboxes.ack(UserId(3), u64::MAX);
        }
        assert!(inboxes.ack(BOB, 2));
        assert!(inboxes.get(BOB).is_none());
        assert_eq!(inboxes.users(), 0);
        assert_eq!(inboxes.high_seq(), 7, "user 3 got 3, 4, 5, 6, 7");
        let (seq, _) = inboxes.append(BOB, UserId(1), MessageId(3), b"d", 0);
        assert_eq!(seq, 8);
        assert_eq!(inboxes.get(BOB).unwrap().first_seq(), 8);
    }

    #[test]
    fn each_limit_is_named_when_hit() {
        let mut inboxes = Inboxes::new(limits(), 7, 1);
        for _ in 0..3 {
            inboxes.append(BOB, UserId(1), MessageId(1), b"", 0);
        }
        let full = |r: Result<(), InboxFull>, what: &str| {
            let reason = r.unwrap_err().0;
            assert!(reason.contains(what), "{reason:?} is not {what:?}");
        };
        full(inboxes.check_room(BOB, 0), "max messages");
        full(inboxes.check_room(UserId(3), c(0) + 101), "max bytes");
        inboxes.append(UserId(3), UserId(1), MessageId(1), &[0; 90], 0);
        full(inboxes.check_room(UserId(4), 0), "max users");
        full(inboxes.check_room(UserId(3), 11), "max bytes");
        inboxes.ack(BOB, 2);
        assert!(inboxes.check_room(BOB, 60).is_ok());
        full(inboxes.check_room(BOB, 61), "max store bytes");
    }

    #[test]
    fn expiry_takes_the_oldest_first_in_bounded_steps_and_leaves_a_tombstone() {
        let mut inboxes = Inboxes::new(limits(), 7, 1);
        let mut ops = Vec::new();
        inboxes.append(BOB, UserId(1), MessageId(1), b"old", 1_000);
        inboxes.append(UserId(3), UserId(1), MessageId(1), b"mid", 2_000);
        inboxes.append(BOB, UserId(1), MessageId(2), b"new", 50_000);
        assert_eq!(inboxes.next_expiry(), Some(61_000));
        assert_eq!(inboxes.expire_due(61_999, 10, &mut ops), 1);
        assert_eq!(inboxes.next_expiry(), Some(62_000));
        let inbox = inboxes.get(BOB).unwrap();
        assert_eq!((inbox.first_seq(), inbox.expired_upto()), (2, 1));
        assert_eq!(inboxes.total_bytes(), c(3) * 2);
        assert_eq!(inboxes.expire_due(200_000, 1, &mut ops), 1, "the budget");
        assert_eq!(inboxes.expire_due(200_000, 10, &mut ops), 1);
        assert_eq!(inboxes.next_expiry(), None);
        assert_eq!((inboxes.users(), inboxes.tombstones()), (0, 2));
        assert_eq!(
            ops.last(),
            Some(&StoreOp::Counters {
                user: BOB,
                last_seq: 2,
                expired_upto: 2
            })
        );
        // A third tombstone with max_users 2: the oldest (user 3) is forgotten, recorded.
        inboxes.append(UserId(4), UserId(1), MessageId(1), b"x", 0);
        inboxes.expire(UserId(4), 60_000, &mut ops);
        assert_eq!(inboxes.tombstones(), 2);
        assert!(inboxes.get(UserId(3)).is_none());
        assert!(ops.contains(&StoreOp::Forget { user: UserId(3) }));
        // Acknowledging past the gap forgets it; a new message numbers on after it.
        assert!(!inboxes.ack(BOB, 1));
        let (seq, _) = inboxes.append(BOB, UserId(1), MessageId(3), b"z", 0);
        assert_eq!(seq, 3);
        assert_eq!(inboxes.get(BOB).unwrap().expired_upto(), 2);
    }

    #[test]
    fn replaying_the_ops_or_a_snapshot_rebuilds_the_same_inboxes() {
        let mut live = Inboxes::new(limits(), 7, 1);
        let mut log = vec![StoreOp::Epoch(7)];
        for i in 1..=3 {
            let (_, frame) = live.append(BOB, UserId(1), MessageId(i), b"m", i * 1000);
            log.push(StoreOp::Append { user: BOB, frame });
        }
        for i in 1..=2 {
            let (_, frame) = live.append(UserId(3), UserId(1), MessageId(i), b"m", 0);
            log.push(StoreOp::Append {
                user: UserId(3),
                frame,
            });
        }
        live.ack(BOB, 1);
        log.push(StoreOp::Ack { user: BOB, upto: 1 });
        live.expire(BOB, 62_000, &mut log);
        live.ack(UserId(3), 5);
        log.push(StoreOp::Ack {
            user: UserId(3),
            upto: 5,
        });
        for ops in [log, live.snapshot()] {
            let mut rebuilt = Inboxes::new(limits(), 0, 1);
            for op in ops {
                rebuilt.apply(op);
            }
            assert_eq!(rebuilt.epoch(), 7);
            let inbox = rebuilt.get(BOB).unwrap();
            assert_eq!(
                (inbox.first_seq(), inbox.last_seq(), inbox.len()),
                (3, 3, 1)
            );
            assert_eq!(inbox.expired_upto(), 2);
            assert!(rebuilt.get(UserId(3)).is_none());
            assert_eq!(rebuilt.high_seq(), 5);
            assert_eq!(rebuilt.total_messages(), 1);
            assert_eq!(rebuilt.total_bytes(), live.total_bytes());
            assert_eq!(rebuilt.next_expiry(), Some(63_000));
        }
    }

    const PHONE: u64 = 11;
    const TABLET: u64 = 22;
    const LAPTOP: u64 = 33;

    fn roomy() -> InboxLimits {
        InboxLimits {
            max_messages: 100,
            max_bytes: 1 << 20,
            max_users: 10,
            max_total_bytes: 1 << 22,
            ..limits()
        }
    }

    /// A durable store's view: apply every op, as a restart would.
    fn replayed(log: &[StoreOp]) -> Inboxes {
        let mut rebuilt = Inboxes::new(roomy(), 0, 1);
        for op in log {
            rebuilt.apply(op.clone());
        }
        rebuilt
    }

    fn acked(inboxes: &Inboxes, user: UserId, device: u64) -> Option<u64> {
        inboxes.get(user)?.device(device).map(|c| c.acked)
    }

    #[test]
    fn a_message_stays_until_every_tracked_device_acknowledged_it() {
        let mut inboxes = Inboxes::new(roomy(), 7, 1);
        let mut log = Vec::new();
        assert!(inboxes.sync(BOB, PHONE, None, 0, &mut log).new_device);
        assert!(inboxes.sync(BOB, TABLET, None, 0, &mut log).new_device);
        for i in 1..=3 {
            inboxes.append(BOB, UserId(1), MessageId(i), b"m", 10);
            inboxes.mark_all_durable();
        }
        inboxes.device_ack(BOB, PHONE, 3, 20, &mut log);
        assert_eq!(
            inboxes.get(BOB).unwrap().len(),
            3,
            "the tablet has none yet"
        );
        inboxes.device_ack(BOB, TABLET, 2, 30, &mut log);
        let inbox = inboxes.get(BOB).unwrap();
        assert_eq!((inbox.first_seq(), inbox.len()), (3, 1), "both have 1..=2");
        assert!(log.contains(&StoreOp::Ack { user: BOB, upto: 2 }));
        inboxes.device_ack(BOB, TABLET, 3, 40, &mut log);
        let inbox = inboxes.get(BOB).expect("an idle record keeps the cursors");
        assert_eq!(
            (inbox.len(), inboxes.users(), inboxes.tombstones()),
            (0, 0, 1)
        );
        // The next message numbers on, and still waits for both devices.
        let (seq, _) = inboxes.append(BOB, UserId(1), MessageId(9), b"m", 50);
        inboxes.mark_all_durable();
        assert_eq!(seq, 4);
        inboxes.device_ack(BOB, PHONE, 4, 60, &mut log);
        assert_eq!(inboxes.get(BOB).unwrap().len(), 1);
    }

    #[test]
    fn a_new_device_starts_from_what_the_inbox_holds_without_a_gap() {
        let mut inboxes = Inboxes::new(roomy(), 7, 1);
        let mut log = Vec::new();
        inboxes.sync(BOB, PHONE, None, 0, &mut log);
        for i in 1..=3 {
            inboxes.append(BOB, UserId(1), MessageId(i), b"m", 10);
            inboxes.mark_all_durable();
        }
        inboxes.device_ack(BOB, PHONE, 3, 20, &mut log);
        inboxes.append(BOB, UserId(1), MessageId(4), b"m", 30);
        inboxes.mark_all_durable();
        let report = inboxes.sync(BOB, TABLET, Some(0), 40, &mut log);
        assert_eq!(
            report,
            SyncReport {
                first_seq: 4,
                last_seq: 4,
                expired_upto: 0,
                new_device: true
            }
        );
        assert_eq!(acked(&inboxes, BOB, TABLET), Some(3));
        // Known now: its next sync is not new.
        assert!(!inboxes.sync(BOB, TABLET, Some(3), 50, &mut log).new_device);
    }

    #[test]
    fn a_device_back_after_it_was_forgotten_is_told_what_it_may_have_missed() {
        let mut inboxes = Inboxes::new(roomy(), 7, 1);
        let mut log = Vec::new();
        let day = 600_000; // the retention of `limits()` is 600 s
        inboxes.sync(BOB, PHONE, None, 0, &mut log);
        inboxes.sync(BOB, TABLET, None, 0, &mut log);
        for i in 1..=2 {
            inboxes.append(BOB, UserId(1), MessageId(i), b"m", 10);
            inboxes.mark_all_durable();
        }
        inboxes.device_ack(BOB, TABLET, 1, 20, &mut log);
        // The phone stays away past the retention: it no longer holds messages back.
        inboxes.device_ack(BOB, TABLET, 2, day + 100, &mut log);
        assert!(log.contains(&StoreOp::ForgetDevice {
            user: BOB,
            device: PHONE
        }));
        assert_eq!(inboxes.get(BOB).unwrap().len(), 0);
        inboxes.append(BOB, UserId(1), MessageId(3), b"m", day + 200);
        inboxes.mark_all_durable();
        let report = inboxes.sync(BOB, PHONE, Some(0), day + 300, &mut log);
        assert!(report.new_device, "a reinstalled phone has no numbers: new");
        let mut log2 = Vec::new();
        let mut again = Inboxes::new(roomy(), 7, 1);
        again.sync(BOB, PHONE, None, 0, &mut log2);
        again.sync(BOB, TABLET, None, 0, &mut log2);
        for i in 1..=3 {
            again.append(BOB, UserId(1), MessageId(i), b"m", 10);
            again.mark_all_durable();
        }
        again.device_ack(BOB, TABLET, 3, day + 100, &mut log2);
        again.append(BOB, UserId(1), MessageId(4), b"m", day + 200);
        again.mark_all_durable();
        // The phone had 1 and comes back: 2..=3 went while it was untracked.
        let report = again.sync(BOB, PHONE, Some(1), day + 300, &mut log2);
        assert_eq!((report.first_seq, report.expired_upto), (4, 3));
        assert!(!report.new_device);
    }

    #[test]
    fn past_the_device_limit_the_least_recently_seen_device_is_untracked() {
        let mut inboxes = Inboxes::new(roomy(), 7, 1); // max_devices 3
        let mut log = Vec::new();
        for (device, at) in [(PHONE, 10), (TABLET, 5), (LAPTOP, 20)] {
            inboxes.sync(BOB, device, None, at, &mut log);
        }
        assert_eq!(inboxes.devices(), 3);
        inboxes.sync(BOB, 44, None, 30, &mut log);
        assert_eq!(inboxes.devices(), 3);
        assert_eq!(acked(&inboxes, BOB, TABLET), None, "seen longest ago");
        assert!(log.contains(&StoreOp::ForgetDevice {
            user: BOB,
            device: TABLET
        }));
    }

    #[test]
    fn a_copy_of_a_sent_message_skips_the_device_it_came_from() {
        let mut inboxes = Inboxes::new(roomy(), 7, 1);
        let mut log = Vec::new();
        let alice = UserId(1);
        inboxes.sync(alice, PHONE, None, 0, &mut log);
        inboxes.sync(alice, LAPTOP, None, 0, &mut log);
        assert!(inboxes.has_other_devices(alice, PHONE, 10));
        assert!(!inboxes.has_other_devices(BOB, PHONE, 10));
        let (seq, frame) = inboxes.append_copy(alice, BOB, MessageId(5), b"hi", 10, PHONE);
        inboxes.mark_all_durable();
        let header = crate::proto::Header::read(&frame);
        assert_eq!(
            (header.target, header.source),
            (BOB, alice),
            "to the peer, from self"
        );
        assert_eq!(acked(&inboxes, alice, PHONE), Some(seq), "the phone has it");
        assert_eq!(acked(&inboxes, alice, LAPTOP), Some(0));
        assert_eq!(inboxes.get(alice).unwrap().len(), 1);
        inboxes.device_ack(alice, LAPTOP, seq, 20, &mut log);
        assert_eq!(inboxes.get(alice).unwrap().len(), 0);
    }

    #[test]
    fn cursors_copies_and_forgotten_devices_survive_replay_and_compaction() {
        let mut live = Inboxes::new(roomy(), 7, 1);
        let mut log = vec![StoreOp::Epoch(7)];
        let alice = UserId(1);
        live.sync(BOB, PHONE, None, 0, &mut log);
        live.sync(BOB, TABLET, None, 0, &mut log);
        live.sync(alice, PHONE, None, 0, &mut log);
        live.sync(alice, LAPTOP, None, 0, &mut log);
        for i in 1..=3 {
            let (_, frame) = live.append(BOB, alice, MessageId(i), b"m", 10);
            live.mark_all_durable();
            log.push(StoreOp::Append { user: BOB, frame });
            let (_, frame) = live.append_copy(alice, BOB, MessageId(i), b"m", 10, PHONE);
            live.mark_all_durable();
            log.push(StoreOp::SentCopy {
                user: alice,
                frame,
                origin: PHONE,
            });
        }
        live.device_ack(BOB, PHONE, 3, 20, &mut log);
        live.device_ack(BOB, TABLET, 1, 30, &mut log);
        live.device_ack(alice, LAPTOP, 2, 40, &mut log);
        for ops in [log, live.snapshot()] {
            let rebuilt = replayed(&ops);
            for (user, device) in [(BOB, PHONE), (BOB, TABLET), (alice, PHONE), (alice, LAPTOP)] {
                assert_eq!(
                    acked(&rebuilt, user, device),
                    acked(&live, user, device),
                    "{user} {device}"
                );
            }
            for user in [BOB, alice] {
                let (a, b) = (rebuilt.get(user).unwrap(), live.get(user).unwrap());
                assert_eq!(
                    (a.first_seq(), a.last_seq(), a.len()),
                    (b.first_seq(), b.last_seq(), b.len())
                );
            }
            assert_eq!(
                rebuilt.get(alice).unwrap().next_after(0).unwrap().origin,
                PHONE
            );
            assert_eq!(rebuilt.devices(), 4);
            assert_eq!(rebuilt.total_bytes(), live.total_bytes());
        }
    }
}
