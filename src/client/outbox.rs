//! The messages the app has sent that the relay has not answered yet.
//!
//! Each message stays here from `send` until its ACK (delivered), its ERROR (failed), or
//! the send timeout (failed). Messages go out in `send` order; at most `max_in_flight` are
//! written and unanswered on the current link at a time. When a link dies, the written ones
//! become unsent again and go out first on the next link, with the same ids, which lets the
//! relay recognise them as resends (protocol.md, section 13). A message can also be held
//! back until a given time and then written again (the core does that when the relay says
//! "try later").

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::event::FailReason;
use crate::proto::{MessageId, UserId};

/// One message waiting for its answer.
#[derive(Clone, Debug)]
pub struct Outgoing {
    /// The id `send` returned.
    pub id: MessageId,
    /// The recipient.
    pub to: UserId,
    /// The payload.
    pub payload: Bytes,
    /// When `send` took it.
    pub queued_at: Instant,
    /// Times it was written, over all links.
    pub writes: u32,
    /// Written to the current link and not answered.
    pub in_flight: bool,
    /// Not to be written again before this time.
    pub hold_until: Option<Instant>,
    /// Stored delivery (the STORED flag).
    pub stored: bool,
}

/// Pending messages in `send` order (so the front is the oldest).
#[derive(Debug, Default)]
pub struct Outbox {
    items: VecDeque<Outgoing>,
    in_flight: usize,
}

impl Outbox {
    /// Messages waiting, in flight or not.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Messages written to the current link and not answered.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Adds a message at the end.
    pub fn push(&mut self, to: UserId, id: MessageId, payload: Bytes, now: Instant) {
        self.items.push_back(Outgoing {
            id,
            to,
            payload,
            queued_at: now,
            writes: 0,
            in_flight: false,
            hold_until: None,
            stored: false,
        });
    }

    /// The oldest message due to be written, marked in flight, if fewer than
    /// `max_in_flight` are.
    pub fn next_to_send(&mut self, max_in_flight: usize, now: Instant) -> Option<&Outgoing> {
        if self.in_flight >= max_in_flight {
            return None;
        }
        let item = self
            .items
            .iter_mut()
            .find(|m| !m.in_flight && m.hold_until.is_none_or(|t| t <= now))?;
        item.in_flight = true;
        item.writes += 1;
        item.hold_until = None;
        self.in_flight += 1;
        Some(item)
    }

    /// Marks the message for stored delivery.
    pub fn mark_stored(&mut self, id: MessageId) {
        if let Some(m) = self.items.iter_mut().find(|m| m.id == id) {
            m.stored = true;
        }
    }

    /// The message with this id, if pending.
    pub fn get(&self, id: MessageId) -> Option<&Outgoing> {
        self.items.iter().find(|m| m.id == id)
    }

    /// Takes the message out of flight and keeps it back until `until`.
    pub fn hold(&mut self, id: MessageId, until: Instant) {
        if let Some(m) = self.items.iter_mut().find(|m| m.id == id) {
            if m.in_flight {
                m.in_flight = false;
                self.in_flight -= 1;
            }
            m.hold_until = Some(until);
        }
    }

    /// The earliest time a held message becomes due.
    pub fn next_release(&self) -> Option<Instant> {
        self.items.iter().filter_map(|m| m.hold_until).min()
    }

    /// Removes the message the relay answered. `None` if the id is not pending (an answer
    /// to a message already timed out, or a stray).
    pub fn answer(&mut self, id: MessageId) -> Option<Outgoing> {
        let pos = self.items.iter().position(|m| m.id == id)?;
        let item = self.items.remove(pos)?;
        if item.in_flight {
            self.in_flight -= 1;
        }
        Some(item)
    }

    /// The link died: every in-flight message will be written again on the next link.
    pub fn link_down(&mut self) {
        for item in self.items.iter_mut() {
            item.in_flight = false;
        }
        self.in_flight = 0;
    }

    /// When the oldest message times out.
    pub fn next_deadline(&self, timeout: Duration) -> Option<Instant> {
        self.items.front().map(|m| m.queued_at + timeout)
    }

    /// Removes every message older than `timeout` and says why each failed.
    pub fn expire(&mut self, now: Instant, timeout: Duration) -> Vec<(MessageId, FailReason)> {
        let mut failed = Vec::new();
        while let Some(front) = self.items.front() {
            if now < front.queued_at + timeout {
                break;
            }
            if let Some(m) = self.items.pop_front() {
                if m.in_flight {
                    self.in_flight -= 1;
                }
                let reason = if m.writes > 0 {
                    FailReason::Unconfirmed
                } else {
                    FailReason::NotSent
                };
                failed.push((m.id, reason));
            }
        }
        failed
    }

    /// Removes every message not in flight, oldest first, with the reason for each (on
    /// close): `Closed` if it was never written, `Unconfirmed` if it was written on some
    /// link and not answered (held after a "try later", or waiting to be resent after a
    /// reconnect): its first copy may have been delivered or stored, so its fate is not
    /// known. Messages in flight stay for their answers.
    pub fn take_unsent(&mut self) -> Vec<(MessageId, FailReason)> {
        let taken: Vec<(MessageId, FailReason)> = self
            .items
            .iter()
            .filter(|m| !m.in_flight)
            .map(|m| (m.id, end_reason(m)))
            .collect();
        self.items.retain(|m| m.in_flight);
        taken
    }

    /// Removes everything (the client is gone), with the reason for each.
    pub fn drain(&mut self) -> Vec<(MessageId, FailReason)> {
        self.in_flight = 0;
        self.items
            .drain(..)
            .map(|m| (m.id, end_reason(&m)))
            .collect()
    }
}

/// Why a message ends when the client closes before its answer.
fn end_reason(m: &Outgoing) -> FailReason {
    if m.writes > 0 {
        FailReason::Unconfirmed
    } else {
        FailReason::Closed
    }
}
