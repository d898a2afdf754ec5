//! What the relay does with each decoded frame, and the helpers that queue replies.
//!
//! Like the rest of the core this never performs I/O: handlers change session state and
//! push encoded frames onto output queues.

use std::time::Instant;

use bytes::{Bytes, BytesMut};
use log::{debug, info};

use super::cluster::{self, Channel, DedupClaim, PendingSend};
use super::inbox::INBOX_PREFIX;
use super::session::{Session, State};
use super::{
    arm, millis_u32, push_copied, push_output, push_rewritten, OutQueue, Relay, CLOSE_LINGER,
    SCRATCH_KEEP,
};
use crate::proto::frame::{write_ack, write_error, write_frame};
use crate::proto::{
    device_tag, split_login, ErrorCode, Flags, Header, HeartbeatBounds, LoginOk, MessageId, Opcode,
    RawFrame, UserId,
};
use crate::ConnId;

impl Relay {
    // ---- frames ------------------------------------------------------------------------

    pub(super) fn handle_frame(&mut self, id: ConnId, frame: RawFrame<'_>, now: Instant) {
        let header = *frame.header();
        match frame.opcode() {
            Some(Opcode::Send) => self.on_send(id, frame, now),
            Some(Opcode::Login) => self.on_login(id, &frame, now),
            Some(Opcode::Ping) => {
                if self.check_control(id, &frame) {
                    let pong = (Opcode::Pong, UserId::NONE, UserId::NONE);
                    self.queue_rewritten(id, &frame, pong);
                }
            }
            Some(Opcode::Pong) => {
                self.check_control(id, &frame);
            }
            Some(Opcode::Join) => self.on_join(id, &header, frame.payload().len()),
            Some(Opcode::Leave) => self.on_leave(id, &header, frame.payload().len()),
            Some(Opcode::RoomInfo) => self.on_room_info(id, &header, frame.payload().len()),
            Some(Opcode::RoomSend) => self.on_room_send(id, frame, now),
            Some(Opcode::Broadcast) => self.on_broadcast(id, frame, now),
            Some(Opcode::InboxSync) => self.on_inbox_sync(id, &frame, now),
            Some(Opcode::InboxAck) => self.on_inbox_ack(id, &frame, now),
            Some(Opcode::Refresh) => self.on_refresh(id, &frame, now),
            Some(Opcode::Bye) => {
                // A BYE that fails its checks is answered with the ERROR and does not close.
                if !self.check_control(id, &frame) {
                    return;
                }
                let bye = (Opcode::Bye, UserId::NONE, UserId::NONE);
                match self.sessions.get_mut(id.0) {
                    // ACKs of stored SENDs still wait for the disk: BYE answers last.
                    Some(s) if s.acks_held > 0 => {
                        let (opcode, target, source) = bye;
                        let frame = frame.rewritten(opcode, target, source);
                        s.extra_mut().deferred_bye = Some(frame);
                    }
                    _ => self.queue_rewritten(id, &frame, bye),
                }
                debug!("{}: BYE", self.conn_label(id));
                self.begin_close(id, now);
            }
            Some(
                op @ (Opcode::LoginOk
                | Opcode::Deliver
                | Opcode::Ack
                | Opcode::Error
                | Opcode::RoomDeliver
                | Opcode::RoomState
                | Opcode::RoomMissed
                | Opcode::InboxState
                | Opcode::InboxDeliver
                | Opcode::TokenExpiring
                | Opcode::RefreshOk),
            ) => {
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

    pub(super) fn on_login(&mut self, id: ConnId, frame: &RawFrame<'_>, now: Instant) {
        let h = *frame.header();
        let Some(s) = self.sessions.get(id.0) else {
            return;
        };
        // The order of checks of protocol.md section 6.1: login state, source, flags, ids,
        // the token, limits (the credential may have any size).
        let problem = if let State::Active(user) = s.state {
            Some((
                ErrorCode::AlreadyLoggedIn,
                format!("already logged in as {user}"),
            ))
        } else if let Some(reason) =
            source_and_flags(&h, Flags::DEVICE.union(Flags::HEARTBEAT), "LOGIN")
        {
            Some((ErrorCode::InvalidField, reason))
        } else if h.target.is_none() {
            Some((ErrorCode::InvalidField, "user id 0 is reserved".to_string()))
        } else {
            None
        };
        if let Some((code, reason)) = problem {
            self.reply_error(id, h.msg_id, h.target, code, &reason);
            return;
        }
        let (device, credential) = match split_login(h.flags, frame.payload()) {
            Ok(split) => split,
            Err(e) => {
                self.reply_error(
                    id,
                    h.msg_id,
                    h.target,
                    ErrorCode::InvalidField,
                    &e.to_string(),
                );
                return;
            }
        };
        let Ok(grants) = self.login_grants(id, &h, credential, now) else {
            return;
        };
        // A token that names a device pins it (protocol.md, section 16.2).
        let device: Option<String> =
            match (device, grants.as_ref().and_then(|g| g.device.as_deref())) {
                (Some(asked), Some(pinned)) if asked != pinned => {
                    let reason =
                        format!("LOGIN: the token is for device {pinned:?}, not {asked:?}");
                    self.refuse_login(id, h.msg_id, h.target, &reason, now);
                    return;
                }
                (None, Some(pinned)) => Some(pinned.to_owned()),
                (asked, _) => asked.map(str::to_owned),
            };
        let device_tag = device_tag(device.as_deref());
        if self.directory.devices(h.target).len() >= self.config.max_devices_per_user {
            let reason = format!(
                "{} already has {} connections (max devices per user)",
                h.target, self.config.max_devices_per_user
            );
            self.reply_error(id, h.msg_id, h.target, ErrorCode::LimitReached, &reason);
            return;
        }
        let Some(s) = self.sessions.get_mut(id.0) else {
            return;
        };
        s.state = State::Active(h.target);
        s.logged_in_as = h.target;
        s.device = device_tag;
        if let Some(name) = device {
            s.extra_mut().device_name = Some(name.into_boxed_str());
        } else if let Some(extra) = s.extra.as_mut() {
            extra.device_name = None;
        }
        s.grants = grants;
        s.auth_failures = 0;
        s.expiry_noticed = false;
        // From now on the ping/idle clock runs (the login deadline goes stale).
        arm(&mut self.timers, s, id, now + self.config.ping_interval);
        self.arm_token_due(id);
        self.directory.insert(h.target, id);
        if self.directory.devices(h.target).len() == 1 {
            cluster::subscribe(&mut self.cluster, Channel::User(h.target));
        }
        self.metrics.logins += 1;
        debug!("{}: logged in", self.conn_label(id));
        let limits = LoginOk {
            max_frame: self.config.max_frame,
            ping_interval_ms: millis_u32(self.config.ping_interval),
            idle_timeout_ms: millis_u32(self.config.idle_timeout),
            out_cap: u32::try_from(self.config.out_cap).unwrap_or(u32::MAX),
            // The 24-byte form only for a client that asked: older clients expect 16.
            heartbeat: h.flags.contains(Flags::HEARTBEAT).then(|| HeartbeatBounds {
                min_ms: millis_u32(self.config.heartbeat_min()),
                max_ms: millis_u32(self.config.ping_interval),
            }),
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

    pub(super) fn on_send(&mut self, id: ConnId, frame: RawFrame<'_>, now: Instant) {
        let h = *frame.header();
        let allowed = Flags::NO_ACK.union(Flags::DEDUP).union(Flags::STORED);
        let Some(sender) = self.check_request(id, &h, allowed, "SEND") else {
            return;
        };
        let dedup = h.flags.contains(Flags::DEDUP);
        if dedup && h.msg_id.0 == 0 {
            let reason = "DEDUP needs a non-zero msg_id";
            self.reply_error(id, h.msg_id, h.target, ErrorCode::InvalidField, reason);
            return;
        }
        if h.flags.contains(Flags::STORED) && !self.stored_send_fits(id, &frame) {
            return;
        }
        if h.flags.contains(Flags::STORED) && self.cluster.is_some() {
            // Stored in Redis, which also answers DEDUP for it (cluster_inbox.rs).
            self.cluster_stored_send(id, &frame, sender);
            return;
        }
        if dedup {
            if let Some(count) = self.dedup.lookup(sender, h.msg_id, now) {
                self.answer_resend(id, &h, count);
                return;
            }
        }
        if h.flags.contains(Flags::STORED) {
            self.on_stored_send(id, frame, sender, now);
            return;
        }
        if let Some(c) = &self.cluster {
            if dedup && !c.up {
                // De-duplication across nodes needs Redis: delivered now, a resend through
                // another node could not know (protocol.md, section 18).
                let reason = "the cluster link is down: a DEDUP SEND cannot be checked";
                self.refuse_cluster_unavailable(id, &h, reason);
                return;
            }
            if c.up && self.defer_for_cluster(id, &frame) {
                return;
            }
        }
        self.route_send(id, frame, sender, now, None);
    }

    /// Answers a DEDUP resend with what its first copy got (`count`, as the DEDUP memory
    /// keeps it: an ACK count, a refusal, or PENDING), without delivering it again.
    pub(super) fn answer_resend(&mut self, id: ConnId, h: &Header, count: u32) {
        if count == super::dedup::PENDING {
            // Cluster mode: its first copy waits for Redis's answer.
            let reason = format!("{} is still on its way; send it again later", h.msg_id);
            self.refuse_cluster_unavailable(id, h, &reason);
            return;
        }
        debug!(
            "{}: {} from {} is a resend; not delivered again",
            self.conn_label(id),
            h.msg_id,
            self.sessions
                .get(id.0)
                .and_then(Session::user)
                .unwrap_or(UserId::NONE)
        );
        self.metrics.duplicates_dropped += 1;
        if let Some(code) = super::dedup::refusal(count) {
            // Refused the first time: the same answer, so a message stored since is never
            // overtaken by this one (protocol.md, section 13); once the refusal is on disk,
            // if it is still on its way there.
            let reason = format!("{} was refused when first sent", h.msg_id);
            if h.flags.contains(Flags::STORED) {
                self.hold_refusal(id, h.msg_id, h.target, code, &reason);
            } else {
                self.reply_error(id, h.msg_id, h.target, code, &reason);
            }
        } else if h.flags.contains(Flags::STORED) {
            // Its first ACK may still wait for the disk: this one waits too.
            if !h.flags.contains(Flags::NO_ACK) {
                self.ack_stored(id, h.msg_id, h.target, count);
            }
        } else if !h.flags.contains(Flags::NO_ACK) {
            write_ack(self.scratch(), h.msg_id, h.target, count);
            self.queue_scratch(id);
        }
    }

    /// A SEND to a user with no connection (on any node, in cluster mode).
    #[cold]
    fn refuse_offline(&mut self, id: ConnId, h: &Header) {
        let reason = format!("{} is not connected", h.target);
        self.reply_error(id, h.msg_id, h.target, ErrorCode::RecipientOffline, &reason);
    }

    /// Cluster mode: whether the SEND `h` goes through Redis (`Some(true)`), to this
    /// node's connections only (`Some(false)`: the link is down), or was refused
    /// (`None`: the link is down and the recipient has no connection here).
    #[cold]
    #[inline(never)]
    fn cluster_route(&mut self, id: ConnId, h: &Header) -> Option<bool> {
        let c = self.cluster.as_ref()?;
        if c.can_publish() {
            return Some(true);
        }
        if !self.directory.devices(h.target).is_empty() {
            return Some(false);
        }
        let reason = c.unavailable_reason();
        self.refuse_cluster_unavailable(id, h, reason);
        None
    }

    /// The delivery of a SEND that passed its checks (and, in cluster mode, its DEDUP
    /// claim): to the recipient's connections, and in cluster mode to the other nodes.
    /// `claim`: the DEDUP key this node claimed for it in cluster mode (released when the
    /// SEND is refused here). Inlined: the hot path of every direct message (as a call of
    /// its own it cost about 40 instructions per SEND, callgrind on benches/router).
    #[inline(always)]
    pub(super) fn route_send(
        &mut self,
        id: ConnId,
        frame: RawFrame<'_>,
        sender: UserId,
        now: Instant,
        claim: Option<Box<DedupClaim>>,
    ) {
        let h = *frame.header();
        let dedup = h.flags.contains(Flags::DEDUP);
        // Cluster mode: the answer waits for Redis's, which says how many other nodes
        // got the message (cluster.rs).
        let via_cluster = match &self.cluster {
            None => false,
            Some(_) => match self.cluster_route(id, &h) {
                Some(via) => via,
                None => {
                    self.release_claim(claim);
                    return;
                }
            },
        };
        let devices = self.directory.devices(h.target);
        if devices.is_empty() && !via_cluster {
            self.release_claim(claim);
            self.refuse_offline(id, &h);
            return;
        }
        let cap = self.config.out_cap;
        let cost = OutQueue::cost(h.len as usize);
        // A plain loop: as an iterator `find` it was not inlined (24 instructions per SEND).
        let mut full = None;
        for &d in devices {
            if self
                .sessions
                .get(d.0)
                .is_none_or(|s| s.out.held() + cost > cap)
            {
                full = Some(d);
                break;
            }
        }
        if let Some(full) = full {
            let reason = format!("{} has a full output queue on {full}", h.target);
            self.release_claim(claim);
            self.reply_error(id, h.msg_id, h.target, ErrorCode::RecipientSlow, &reason);
            return;
        }
        if self.over_budget(cost * devices.len()) {
            let reason = format!(
                "the relay's memory budget ({} bytes) is used up",
                self.config.max_memory
            );
            self.release_claim(claim);
            self.reply_error(id, h.msg_id, h.target, ErrorCode::RecipientSlow, &reason);
            return;
        }
        // Copied into each device's queue (or shared, when large), rewritten on the way.
        let deliver = (Opcode::Deliver, h.target, sender);
        let mut shared: Option<Bytes> = None;
        let count = devices.len();
        self.metrics
            .count_frames_out(Opcode::Deliver as u8, h.len as usize, count as u64);
        if via_cluster {
            let serial = self.sessions.get(id.0).map_or(0, |s| s.serial);
            let waiting = PendingSend {
                conn: id,
                serial,
                msg_id: h.msg_id,
                target: h.target,
                local: u32::try_from(count).unwrap_or(u32::MAX),
                self_counted: count > 0,
                ack: !h.flags.contains(Flags::NO_ACK),
                dedup: claim.map(|claim| (sender, *claim)),
            };
            if let Some(c) = self.cluster.as_mut() {
                let (opcode, target, source) = deliver;
                let write =
                    |batch: &mut BytesMut| frame.rewrite_into(batch, opcode, target, source);
                let len = frame.as_bytes().len();
                c.publish_with(Channel::User(h.target), len, write, Some(waiting));
            }
            self.metrics.cluster_messages_out += 1;
        }
        for &device in devices {
            if let Some(s) = self.sessions.get_mut(device.0) {
                push_rewritten(
                    s,
                    &mut self.flush_list,
                    device,
                    &frame,
                    deliver,
                    &mut shared,
                );
            }
        }
        self.metrics.messages_routed += 1;
        self.metrics.deliveries_queued += count as u64;
        self.work += count;
        if dedup {
            // In cluster mode the answer is known once Redis answers: until then a resend
            // here is told to wait, as through another node.
            let remembered = if via_cluster {
                super::dedup::PENDING
            } else {
                count as u32
            };
            self.dedup.record(sender, h.msg_id, remembered, now);
        }
        if !h.flags.contains(Flags::NO_ACK) && !via_cluster {
            write_ack(self.scratch(), h.msg_id, h.target, count as u32);
            self.queue_scratch(id);
        }
    }

    // ---- helpers -----------------------------------------------------------------------

    /// The checks every request from a client shares, in the order of protocol.md section
    /// 6.1: logged in, source 0, no flag outside `allowed`, a non-zero target. Answers the
    /// frame with an ERROR and returns `None` when one fails; returns the sender's user id
    /// otherwise.
    pub(super) fn check_request(
        &mut self,
        id: ConnId,
        h: &Header,
        allowed: Flags,
        what: &str,
    ) -> Option<UserId> {
        let user = self.sessions.get(id.0).and_then(Session::user);
        let (code, reason) = if user.is_none() {
            (ErrorCode::NotLoggedIn, format!("log in before {what}"))
        } else if let Some(reason) = source_and_flags(h, allowed, what) {
            (ErrorCode::InvalidField, reason)
        } else if h.target.is_none() {
            (
                ErrorCode::InvalidField,
                format!("target id 0 is reserved ({what})"),
            )
        } else {
            return user;
        };
        self.reply_error(id, h.msg_id, h.target, code, &reason);
        None
    }

    /// [`Relay::check_request`] for a request that takes target 0 (BROADCAST, REFRESH): the
    /// common checks (run with a stand-in non-zero target), then target 0 itself.
    pub(super) fn check_targetless_request(
        &mut self,
        id: ConnId,
        h: &Header,
        allowed: Flags,
        what: &str,
    ) -> Option<UserId> {
        let checked = Header {
            target: UserId(u64::MAX),
            ..*h
        };
        let user = self.check_request(id, &checked, allowed, what)?;
        if !h.target.is_none() {
            let reason = format!("{what} takes target 0");
            self.reply_error(id, h.msg_id, h.target, ErrorCode::InvalidField, &reason);
            return None;
        }
        Some(user)
    }

    /// [`Relay::check_request`] and then an empty payload, for JOIN, LEAVE and ROOM_INFO.
    pub(super) fn check_bare_request(
        &mut self,
        id: ConnId,
        h: &Header,
        payload_len: usize,
        what: &str,
    ) -> Option<UserId> {
        let user = self.check_request(id, h, Flags::EMPTY, what)?;
        if payload_len != 0 {
            let reason = format!("{what} takes no payload, got {payload_len} bytes");
            self.reply_error(id, h.msg_id, h.target, ErrorCode::InvalidField, &reason);
            return None;
        }
        Some(user)
    }

    /// PING, PONG and BYE, which need no login: source 0, no flags, and for BYE no payload
    /// (`target` is not checked; the answer carries 0). False after answering with ERROR.
    fn check_control(&mut self, id: ConnId, frame: &RawFrame<'_>) -> bool {
        let h = frame.header();
        let (what, bye) = match frame.opcode() {
            Some(op) => (op.name(), op == Opcode::Bye),
            None => ("?", false),
        };
        let reason = match source_and_flags(h, Flags::EMPTY, what) {
            Some(reason) => reason,
            None if bye && !frame.payload().is_empty() => {
                format!("BYE takes no payload, got {} bytes", frame.payload().len())
            }
            None => return true,
        };
        self.reply_error(id, h.msg_id, h.target, ErrorCode::InvalidField, &reason);
        false
    }

    /// A STORED SEND must leave room for the bytes INBOX_DELIVER adds (its seq and
    /// stored-at): its INBOX_DELIVER must fit the max frame. Answers FRAME_TOO_LARGE (the
    /// connection stays open) and returns false when it does not.
    fn stored_send_fits(&mut self, id: ConnId, frame: &RawFrame<'_>) -> bool {
        let h = frame.header();
        let max_frame = self.config.max_frame as usize;
        let len = frame.as_bytes().len();
        if len + INBOX_PREFIX <= max_frame {
            return true;
        }
        let reason = format!(
            "a STORED SEND may be at most {} bytes (the max frame, {max_frame}, less the \
             {INBOX_PREFIX} bytes INBOX_DELIVER adds); this one is {len}",
            max_frame.saturating_sub(INBOX_PREFIX)
        );
        self.reply_error(id, h.msg_id, h.target, ErrorCode::FrameTooLarge, &reason);
        false
    }

    /// Queues an ERROR that answers one frame; the connection stays open.
    pub(super) fn reply_error(
        &mut self,
        id: ConnId,
        msg_id: MessageId,
        target: UserId,
        code: ErrorCode,
        reason: &str,
    ) {
        debug!("{}: {code} for {msg_id}: {reason}", self.conn_label(id));
        self.queue_error(id, msg_id, target, code, reason);
    }

    fn queue_error(
        &mut self,
        id: ConnId,
        msg_id: MessageId,
        target: UserId,
        code: ErrorCode,
        reason: &str,
    ) {
        self.metrics.count_error(code);
        write_error(self.scratch(), msg_id, target, code, reason);
        self.queue_scratch(id);
    }

    /// Queues an ERROR (answering no frame: msg_id and target 0) and closes the connection
    /// after it is flushed. One log line.
    pub(super) fn fail(&mut self, id: ConnId, code: ErrorCode, reason: &str, now: Instant) {
        info!("{}: closing: {code}: {reason}", self.conn_label(id));
        self.queue_error(id, MessageId(0), UserId::NONE, code, reason);
        self.ws_close(id, Some((code, reason)));
        self.begin_close(id, now);
    }

    /// Moves the connection to Closing: out of the directory, input ignored, output flushed,
    /// closed at the latest after [`CLOSE_LINGER`]. A WebSocket session that has not sent
    /// its close frame yet sends a normal one.
    pub(super) fn begin_close(&mut self, id: ConnId, now: Instant) {
        self.ws_close(id, None);
        let Some(s) = self.sessions.get_mut(id.0) else {
            return;
        };
        if let State::Active(user) = s.state {
            self.directory.remove(user, id);
            if self.directory.devices(user).is_empty() {
                cluster::unsubscribe(&mut self.cluster, Channel::User(user));
            }
        }
        for room in std::mem::take(&mut s.rooms) {
            self.rooms.leave(room, id);
            if self.rooms.count(room) == 0 {
                cluster::unsubscribe(&mut self.cluster, Channel::Room(room));
            }
            cluster::room_count_changed(&mut self.cluster, room);
        }
        s.state = State::Closing;
        s.clear_input();
        Relay::sync_input(&mut self.input_held, s);
        arm(&mut self.timers, s, id, now + CLOSE_LINGER);
        if !s.in_flush_list {
            s.in_flush_list = true;
            self.flush_list.push(id);
        }
    }

    pub(super) fn scratch(&mut self) -> &mut BytesMut {
        self.scratch.clear();
        &mut self.scratch
    }

    /// Queues what was just encoded into the scratch buffer to `id` (a copy, so the
    /// scratch is reused for the next frame).
    pub(super) fn queue_scratch(&mut self, id: ConnId) {
        if let Some(s) = self.sessions.get_mut(id.0) {
            self.metrics.count_out(&self.scratch, 1);
            push_copied(s, &mut self.flush_list, id, &self.scratch);
        }
        self.scratch.clear();
        if self.scratch.capacity() > SCRATCH_KEEP {
            self.scratch = BytesMut::new();
        }
    }

    /// Queues `frame` back to `id` with its header rewritten (a PONG, a BYE).
    fn queue_rewritten(
        &mut self,
        id: ConnId,
        frame: &RawFrame<'_>,
        rewrite: (Opcode, UserId, UserId),
    ) {
        if let Some(s) = self.sessions.get_mut(id.0) {
            let (opcode, len) = (rewrite.0 as u8, frame.as_bytes().len());
            self.metrics.count_frames_out(opcode, len, 1);
            push_rewritten(s, &mut self.flush_list, id, frame, rewrite, &mut None);
        }
    }

    pub(super) fn queue(&mut self, id: ConnId, frame: Bytes) {
        if let Some(s) = self.sessions.get_mut(id.0) {
            self.metrics.count_out(&frame, 1);
            push_output(s, &mut self.flush_list, id, frame);
        }
    }
}

/// Rows 6 and 7 of protocol.md's order of checks (section 6.1), shared by every request:
/// `source` must be 0, and no flag bit outside `allowed` may be set. The reason for the
/// first that fails.
pub(super) fn source_and_flags(h: &Header, allowed: Flags, what: &str) -> Option<String> {
    if !h.source.is_none() {
        Some(format!("source must be 0 in {what}: the relay sets it"))
    } else if h.flags.0 & !allowed.0 != 0 {
        Some(format!(
            "flag bits 0x{:04x} are not allowed on {what}",
            h.flags.0 & !allowed.0
        ))
    } else {
        None
    }
}
