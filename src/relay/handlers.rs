//! What the relay does with each decoded frame, and the helpers that queue replies.
//!
//! Like the rest of the core this never performs I/O: handlers change session state and
//! push encoded frames onto output queues.

use std::time::Instant;

use bytes::{Bytes, BytesMut};
use log::{debug, info};

use super::session::{Session, State};
use super::{millis_u32, push_output, Relay, CLOSE_LINGER, SCRATCH_CHUNK};
use crate::proto::frame::{write_ack, write_error, write_frame};
use crate::proto::{ErrorCode, Flags, LoginOk, MessageId, Opcode, RawFrame, UserId, HEADER_LEN};
use crate::ConnId;

impl Relay {
    // ---- frames ------------------------------------------------------------------------

    pub(super) fn handle_frame(&mut self, id: ConnId, frame: RawFrame, now: Instant) {
        let header = *frame.header();
        match frame.opcode() {
            Some(Opcode::Send) => self.on_send(id, frame),
            Some(Opcode::Login) => self.on_login(id, &frame),
            Some(Opcode::Ping) => {
                let pong = frame.rewrite(Opcode::Pong, UserId::NONE, UserId::NONE);
                self.queue(id, pong);
            }
            Some(Opcode::Pong) => {}
            Some(Opcode::Bye) => {
                let bye = frame.rewrite(Opcode::Bye, UserId::NONE, UserId::NONE);
                self.queue(id, bye);
                debug!("{id}: BYE");
                self.begin_close(id, now);
            }
            Some(op @ (Opcode::LoginOk | Opcode::Deliver | Opcode::Ack | Opcode::Error)) => {
                let reason = format!("opcode {} is sent only by the relay", op.name());
                self.reply_error(
                    id,
                    header.msg_id,
                    header.target,
                    ErrorCode::InvalidField,
                    &reason,
                );
            }
            None => {
                let reason = format!(
                    "opcode 0x{:02x} is not defined in protocol v1",
                    header.opcode
                );
                self.reply_error(
                    id,
                    header.msg_id,
                    header.target,
                    ErrorCode::UnknownOpcode,
                    &reason,
                );
            }
        }
    }

    pub(super) fn on_login(&mut self, id: ConnId, frame: &RawFrame) {
        let h = *frame.header();
        let Some(s) = self.sessions.get_mut(id.0) else {
            return;
        };
        let problem = if let State::Active(user) = s.state {
            Some((
                ErrorCode::AlreadyLoggedIn,
                format!("already logged in as {user}"),
            ))
        } else if h.target.is_none() {
            Some((ErrorCode::InvalidField, "user id 0 is reserved".to_string()))
        } else if !h.source.is_none() {
            Some((
                ErrorCode::InvalidField,
                "source must be 0 in LOGIN".to_string(),
            ))
        } else if h.flags != Flags::EMPTY {
            Some((ErrorCode::InvalidField, "LOGIN takes no flags".to_string()))
        } else if self.directory.devices(h.target).len() >= self.config.max_devices_per_user {
            Some((
                ErrorCode::LimitReached,
                format!(
                    "{} already has {} connections (max devices per user)",
                    h.target, self.config.max_devices_per_user
                ),
            ))
        } else {
            None
        };
        if let Some((code, reason)) = problem {
            self.reply_error(id, h.msg_id, h.target, code, &reason);
            return;
        }
        s.state = State::Active(h.target);
        self.directory.insert(h.target, id);
        debug!("{id}: logged in as {}", h.target);
        let limits = LoginOk {
            max_frame: self.config.max_frame,
            ping_interval_ms: millis_u32(self.config.ping_interval),
            idle_timeout_ms: millis_u32(self.config.idle_timeout),
            out_cap: u32::try_from(self.config.out_cap).unwrap_or(u32::MAX),
        };
        write_frame(
            self.scratch(),
            Opcode::LoginOk,
            Flags::EMPTY,
            h.msg_id,
            h.target,
            UserId::NONE,
            &limits.to_bytes(),
        );
        self.queue_scratch(id);
    }

    pub(super) fn on_send(&mut self, id: ConnId, frame: RawFrame) {
        let h = *frame.header();
        let Some(sender) = self.sessions.get(id.0).and_then(Session::user) else {
            self.reply_error(
                id,
                h.msg_id,
                h.target,
                ErrorCode::NotLoggedIn,
                "log in before SEND",
            );
            return;
        };
        let invalid = if !h.source.is_none() {
            Some("source must be 0: the relay sets it".to_string())
        } else if h.flags.reserved_bits() != 0 {
            Some(format!(
                "reserved flag bits 0x{:04x} are set",
                h.flags.reserved_bits()
            ))
        } else if h.target.is_none() {
            Some("target user id 0 is reserved".to_string())
        } else {
            None
        };
        if let Some(reason) = invalid {
            self.reply_error(id, h.msg_id, h.target, ErrorCode::InvalidField, &reason);
            return;
        }
        let devices = self.directory.devices(h.target);
        if devices.is_empty() {
            let reason = format!("{} is not connected", h.target);
            self.reply_error(id, h.msg_id, h.target, ErrorCode::RecipientOffline, &reason);
            return;
        }
        let cap = self.config.out_cap;
        let full = devices.iter().copied().find(|d| {
            self.sessions
                .get(d.0)
                .is_none_or(|s| s.out.len_bytes() + h.len as usize > cap)
        });
        if let Some(full) = full {
            let reason = format!("{} has a full output queue on {full}", h.target);
            self.reply_error(id, h.msg_id, h.target, ErrorCode::RecipientSlow, &reason);
            return;
        }
        let deliver = frame.into_deliver(sender);
        let count = devices.len();
        for &device in devices {
            if let Some(s) = self.sessions.get_mut(device.0) {
                push_output(s, &mut self.flush_list, device, deliver.clone());
            }
        }
        self.metrics.messages_routed += 1;
        self.metrics.deliveries_queued += count as u64;
        if !h.flags.contains(Flags::NO_ACK) {
            write_ack(self.scratch(), h.msg_id, h.target, count as u32);
            self.queue_scratch(id);
        }
    }

    // ---- helpers -----------------------------------------------------------------------

    /// Queues an ERROR that answers one frame; the connection stays open.
    pub(super) fn reply_error(
        &mut self,
        id: ConnId,
        msg_id: MessageId,
        target: UserId,
        code: ErrorCode,
        reason: &str,
    ) {
        debug!("{id}: {code} for {msg_id}: {reason}");
        self.metrics.count_error(code);
        write_error(self.scratch(), msg_id, target, code, reason);
        self.queue_scratch(id);
    }

    /// Queues an ERROR and closes the connection after it is flushed. One log line.
    pub(super) fn fail(
        &mut self,
        id: ConnId,
        msg_id: MessageId,
        target: UserId,
        code: ErrorCode,
        reason: &str,
        now: Instant,
    ) {
        let who = match self.sessions.get(id.0).and_then(Session::user) {
            Some(user) => format!(" ({user})"),
            None => String::new(),
        };
        info!("{id}{who}: closing: {code}: {reason}");
        self.metrics.count_error(code);
        write_error(self.scratch(), msg_id, target, code, reason);
        self.queue_scratch(id);
        self.begin_close(id, now);
    }

    /// Moves the connection to Closing: out of the directory, input ignored, output flushed,
    /// closed at the latest after [`CLOSE_LINGER`].
    pub(super) fn begin_close(&mut self, id: ConnId, now: Instant) {
        let Some(s) = self.sessions.get_mut(id.0) else {
            return;
        };
        if let State::Active(user) = s.state {
            self.directory.remove(user, id);
        }
        s.state = State::Closing;
        s.partial = BytesMut::new();
        self.timers.arm(now + CLOSE_LINGER, id, s.serial);
        if !s.in_flush_list {
            s.in_flush_list = true;
            self.flush_list.push(id);
        }
    }

    pub(super) fn scratch(&mut self) -> &mut BytesMut {
        if self.scratch.capacity() - self.scratch.len() < HEADER_LEN + 256 {
            self.scratch.reserve(SCRATCH_CHUNK);
        }
        &mut self.scratch
    }

    /// Queues what was just encoded into the scratch buffer to `id`.
    pub(super) fn queue_scratch(&mut self, id: ConnId) {
        let frame = self.scratch.split().freeze();
        self.queue(id, frame);
    }

    pub(super) fn queue(&mut self, id: ConnId, frame: Bytes) {
        if let Some(s) = self.sessions.get_mut(id.0) {
            push_output(s, &mut self.flush_list, id, frame);
        }
    }
}
