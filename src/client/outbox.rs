//! The messages the app has sent that the relay has not answered yet.
//!
//! Each message stays here from `send` until its ACK (delivered), its ERROR (failed), or
//! the send timeout (failed). Messages go out in `send` order; at most `max_in_flight` are
//! written and unanswered on the current link at a time. When a link dies, the written ones
//! become unsent again and go out first on the next link, with the same ids, which lets the
//! relay recognise them as resends (protocol.md, section 13).

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
    /// Written to some link at least once.
    pub ever_sent: bool,
    /// Written to the current link and not answered.
    pub in_flight: bool,
}

/// Pending messages in `send` order. In-flight messages are always a prefix.
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

    /// Adds a message at the end.
    pub fn push(&mut self, to: UserId, id: MessageId, payload: Bytes, now: Instant) {
        self.items.push_back(Outgoing {
            id,
            to,
            payload,
            queued_at: now,
            ever_sent: false,
            in_flight: false,
        });
    }

    /// The next message to write, marked in flight, if fewer than `max_in_flight` are.
    pub fn next_to_send(&mut self, max_in_flight: usize) -> Option<&Outgoing> {
        if self.in_flight >= max_in_flight {
            return None;
        }
        let item = self.items.get_mut(self.in_flight)?;
        item.in_flight = true;
        item.ever_sent = true;
        self.in_flight += 1;
        Some(item)
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
        for item in self.items.iter_mut().take(self.in_flight) {
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
                let reason = if m.ever_sent {
                    FailReason::Unconfirmed
                } else {
                    FailReason::NotSent
                };
                failed.push((m.id, reason));
            }
        }
        failed
    }

    /// Removes every message that was never written, oldest first (on close).
    pub fn take_unsent(&mut self) -> Vec<MessageId> {
        let unsent: Vec<MessageId> = self
            .items
            .iter()
            .filter(|m| !m.in_flight)
            .map(|m| m.id)
            .collect();
        self.items.retain(|m| m.in_flight);
        unsent
    }

    /// Removes everything (the client is gone), with the reason for each.
    pub fn drain(&mut self) -> Vec<(MessageId, FailReason)> {
        self.in_flight = 0;
        self.items
            .drain(..)
            .map(|m| {
                let reason = if m.ever_sent {
                    FailReason::Unconfirmed
                } else {
                    FailReason::Closed
                };
                (m.id, reason)
            })
            .collect()
    }
}
