//! The 32-byte frame header, the owned [`Frame`] and the encoders.
//!
//! Every frame is a fixed 32-byte big-endian header followed by the payload:
//!
//! ```text
//! offset size field
//!  0      4   length   total frame length in bytes, header included
//!  4      1   version  1
//!  5      1   opcode
//!  6      2   flags
//!  8      8   msg_id   chosen by the sender, echoed by the relay
//! 16      8   target   user id the frame is about (recipient, or own id in LOGIN)
//! 24      8   source   user id of the sender, set by the relay only; 0 from clients
//! 32      …   payload
//! ```

use byteorder::{BigEndian, ByteOrder};
use bytes::{BufMut, Bytes, BytesMut};

use super::error::ErrorCode;
use super::ids::{MessageId, RoomId, UserId};
use super::opcode::{Flags, Opcode};
use super::MAX_REASON_LEN;

/// Size of the fixed header in bytes.
pub const HEADER_LEN: usize = 32;
/// The protocol version this crate speaks.
pub const VERSION: u8 = 1;

/// Byte offsets of the header fields, shared by the encoder, the decoder and the router's
/// in-place rewrite of SEND into DELIVER.
pub(crate) mod offset {
    pub const LENGTH: usize = 0;
    pub const VERSION: usize = 4;
    pub const OPCODE: usize = 5;
    pub const FLAGS: usize = 6;
    pub const MSG_ID: usize = 8;
    pub const TARGET: usize = 16;
    pub const SOURCE: usize = 24;
}

/// A parsed header. `opcode` stays a raw byte so an unknown opcode can still be answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Total frame length, header included.
    pub len: u32,
    /// Raw opcode byte.
    pub opcode: u8,
    /// Flag bits.
    pub flags: Flags,
    /// Sender-chosen message id.
    pub msg_id: MessageId,
    /// Target user id.
    pub target: UserId,
    /// Source user id (relay-set).
    pub source: UserId,
}

impl Header {
    /// Reads a header from the first 32 bytes of `buf`. The caller has checked the length
    /// and version already (see `decode_raw`). Panics if `buf` is shorter than 32 bytes.
    pub fn read(buf: &[u8]) -> Header {
        // One length check, then fixed offsets (no check per field: about 10 instructions
        // per frame).
        let Some(b) = buf.first_chunk::<HEADER_LEN>() else {
            panic!("a header needs {HEADER_LEN} bytes, got {}", buf.len());
        };
        let u64_at = |at: usize| {
            let mut field = [0u8; 8];
            field.copy_from_slice(&b[at..at + 8]);
            u64::from_be_bytes(field)
        };
        Header {
            len: u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
            opcode: b[offset::OPCODE],
            flags: Flags(u16::from_be_bytes([b[offset::FLAGS], b[offset::FLAGS + 1]])),
            msg_id: MessageId(u64_at(offset::MSG_ID)),
            target: UserId(u64_at(offset::TARGET)),
            source: UserId(u64_at(offset::SOURCE)),
        }
    }

    /// Payload length in bytes.
    pub fn payload_len(&self) -> usize {
        self.len as usize - HEADER_LEN
    }
}

/// Writes one whole frame (header and payload) to `dst`.
pub fn write_frame(
    dst: &mut BytesMut,
    opcode: Opcode,
    flags: Flags,
    msg_id: MessageId,
    target: UserId,
    source: UserId,
    payload: &[u8],
) {
    dst.reserve(HEADER_LEN + payload.len());
    let len = (HEADER_LEN + payload.len()) as u32;
    write_header(dst, len, opcode, flags, msg_id, target, source);
    dst.put_slice(payload);
}

/// Writes a 32-byte header for a frame of `len` bytes in all; the caller writes the
/// payload after it.
pub fn write_header(
    dst: &mut impl BufMut,
    len: u32,
    opcode: Opcode,
    flags: Flags,
    msg_id: MessageId,
    target: UserId,
    source: UserId,
) {
    dst.put_u32(len);
    dst.put_u8(VERSION);
    dst.put_u8(opcode as u8);
    dst.put_u16(flags.0);
    dst.put_u64(msg_id.0);
    dst.put_u64(target.0);
    dst.put_u64(source.0);
}

/// Writes an ACK: `count` is how many connections the message was queued to.
pub fn write_ack(dst: &mut BytesMut, msg_id: MessageId, target: UserId, count: u32) {
    write_frame(
        dst,
        Opcode::Ack,
        Flags::EMPTY,
        msg_id,
        target,
        UserId::NONE,
        &count.to_be_bytes(),
    );
}

/// Writes an ERROR. The reason is cut to [`MAX_REASON_LEN`] bytes on a char boundary.
pub fn write_error(
    dst: &mut BytesMut,
    msg_id: MessageId,
    target: UserId,
    code: ErrorCode,
    reason: &str,
) {
    let reason = truncate_utf8(reason, MAX_REASON_LEN);
    let len = HEADER_LEN + 2 + reason.len();
    dst.reserve(len);
    dst.put_u32(len as u32);
    dst.put_u8(VERSION);
    dst.put_u8(Opcode::Error as u8);
    dst.put_u16(0);
    dst.put_u64(msg_id.0);
    dst.put_u64(target.0);
    dst.put_u64(0);
    dst.put_u16(code as u16);
    dst.put_slice(reason.as_bytes());
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The limits a relay announces in LOGIN_OK's payload: 16 bytes, or 24 with the heartbeat
/// bounds a LOGIN with the HEARTBEAT flag asks for (protocol.md, section 5.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoginOk {
    /// Largest frame the relay accepts, header included.
    pub max_frame: u32,
    /// The relay sends PING after this much silence from the client, in milliseconds.
    pub ping_interval_ms: u32,
    /// The relay closes a connection silent for this long, in milliseconds.
    pub idle_timeout_ms: u32,
    /// Per-connection output queue cap in bytes.
    pub out_cap: u32,
    /// The heartbeat bounds: present when the LOGIN carried the HEARTBEAT flag (the
    /// 24-byte form), absent in the 16-byte form.
    pub heartbeat: Option<HeartbeatBounds>,
}

/// LOGIN_OK's last 8 bytes in its 24-byte form: how often a client may send its heartbeat
/// PINGs (protocol.md, section 5.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeartbeatBounds {
    /// A client must not send its heartbeat PINGs more often than this, in milliseconds.
    pub min_ms: u32,
    /// The relay's ping interval, in milliseconds: a client that sends a heartbeat at
    /// least this often is never PINGed by the relay.
    pub max_ms: u32,
}

impl LoginOk {
    /// Payload size of LOGIN_OK without heartbeat bounds.
    pub const LEN: usize = 16;
    /// Payload size of LOGIN_OK with heartbeat bounds (a LOGIN with the HEARTBEAT flag).
    pub const LEN_HEARTBEAT: usize = 24;

    /// Encodes the payload: 16 bytes, or 24 when `heartbeat` is set.
    pub fn to_bytes(self) -> Vec<u8> {
        let len = if self.heartbeat.is_some() {
            Self::LEN_HEARTBEAT
        } else {
            Self::LEN
        };
        let mut out = vec![0u8; len];
        BigEndian::write_u32(&mut out[0..], self.max_frame);
        BigEndian::write_u32(&mut out[4..], self.ping_interval_ms);
        BigEndian::write_u32(&mut out[8..], self.idle_timeout_ms);
        BigEndian::write_u32(&mut out[12..], self.out_cap);
        if let Some(bounds) = self.heartbeat {
            BigEndian::write_u32(&mut out[16..], bounds.min_ms);
            BigEndian::write_u32(&mut out[20..], bounds.max_ms);
        }
        out
    }

    /// Decodes the payload; `None` if it is neither 16 nor 24 bytes long.
    pub fn parse(payload: &[u8]) -> Option<LoginOk> {
        let heartbeat = match payload.len() {
            Self::LEN => None,
            Self::LEN_HEARTBEAT => Some(HeartbeatBounds {
                min_ms: BigEndian::read_u32(&payload[16..]),
                max_ms: BigEndian::read_u32(&payload[20..]),
            }),
            _ => return None,
        };
        Some(LoginOk {
            max_frame: BigEndian::read_u32(&payload[0..]),
            ping_interval_ms: BigEndian::read_u32(&payload[4..]),
            idle_timeout_ms: BigEndian::read_u32(&payload[8..]),
            out_cap: BigEndian::read_u32(&payload[12..]),
            heartbeat,
        })
    }
}

/// ROOM_STATE's 5-byte payload: a room's online count and the asker's membership.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoomState {
    /// Connections currently in the room.
    pub members: u32,
    /// Whether the connection that asked is one of them.
    pub is_member: bool,
}

impl RoomState {
    /// Payload size of ROOM_STATE.
    pub const LEN: usize = 5;

    /// Encodes the payload.
    pub fn to_bytes(self) -> [u8; 5] {
        let mut out = [0u8; 5];
        BigEndian::write_u32(&mut out[0..], self.members);
        out[4] = u8::from(self.is_member);
        out
    }

    /// Decodes the payload; `None` if it is not exactly 5 bytes or the flag is not 0 or 1.
    pub fn parse(payload: &[u8]) -> Option<RoomState> {
        if payload.len() != Self::LEN || payload[4] > 1 {
            return None;
        }
        Some(RoomState {
            members: BigEndian::read_u32(payload),
            is_member: payload[4] == 1,
        })
    }
}

/// INBOX_STATE's 32-byte payload: where a user's inbox stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InboxState {
    /// The store's identity; sequence numbers from another epoch mean nothing here.
    pub epoch: u64,
    /// The oldest sequence number held (`last_seq + 1` when the inbox is empty).
    pub first_seq: u64,
    /// The last sequence number handed out.
    pub last_seq: u64,
    /// Every sequence number up to this one that was dropped for age; a client whose last
    /// sequence number is lower missed those messages.
    pub expired_upto: u64,
}

impl InboxState {
    /// Payload size of INBOX_STATE.
    pub const LEN: usize = 32;

    /// Encodes the payload.
    pub fn to_bytes(self) -> [u8; 32] {
        let mut out = [0u8; 32];
        BigEndian::write_u64(&mut out[0..], self.epoch);
        BigEndian::write_u64(&mut out[8..], self.first_seq);
        BigEndian::write_u64(&mut out[16..], self.last_seq);
        BigEndian::write_u64(&mut out[24..], self.expired_upto);
        out
    }

    /// Decodes the payload; `None` if it is not exactly 32 bytes.
    pub fn parse(payload: &[u8]) -> Option<InboxState> {
        if payload.len() != Self::LEN {
            return None;
        }
        Some(InboxState {
            epoch: BigEndian::read_u64(&payload[0..]),
            first_seq: BigEndian::read_u64(&payload[8..]),
            last_seq: BigEndian::read_u64(&payload[16..]),
            expired_upto: BigEndian::read_u64(&payload[24..]),
        })
    }
}

/// An owned, fully parsed frame: what clients, tests and tools work with. (The relay's hot
/// path forwards [`super::RawFrame`]s instead, without building one of these.)
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// The opcode.
    pub opcode: Opcode,
    /// Flag bits.
    pub flags: Flags,
    /// Sender-chosen message id.
    pub msg_id: MessageId,
    /// Target user id.
    pub target: UserId,
    /// Source user id.
    pub source: UserId,
    /// Opaque payload.
    pub payload: Bytes,
}

impl Frame {
    /// A frame with empty flags and source.
    pub fn new(opcode: Opcode, msg_id: MessageId, target: UserId, payload: Bytes) -> Frame {
        Frame {
            opcode,
            flags: Flags::EMPTY,
            msg_id,
            target,
            source: UserId::NONE,
            payload,
        }
    }

    /// LOGIN as `user` with an opaque credential (ignored while auth is off).
    pub fn login(msg_id: MessageId, user: UserId, credential: &[u8]) -> Frame {
        Frame::new(
            Opcode::Login,
            msg_id,
            user,
            Bytes::copy_from_slice(credential),
        )
    }

    /// LOGIN as `user` from device `device` (flag DEVICE; protocol.md, section 15.1). The
    /// device id must be 1 to 64 bytes of UTF-8 without control characters.
    pub fn login_device(msg_id: MessageId, user: UserId, device: &str, credential: &[u8]) -> Frame {
        Frame::new(
            Opcode::Login,
            msg_id,
            user,
            super::device::login_payload(Some(device), credential),
        )
        .with_flags(Flags::DEVICE)
    }

    /// SEND `payload` to user `to`.
    pub fn send(msg_id: MessageId, to: UserId, payload: Bytes) -> Frame {
        Frame::new(Opcode::Send, msg_id, to, payload)
    }

    /// PING with an opaque payload the peer echoes in PONG.
    pub fn ping(msg_id: MessageId, payload: Bytes) -> Frame {
        Frame::new(Opcode::Ping, msg_id, UserId::NONE, payload)
    }

    /// PONG answering a PING.
    pub fn pong(msg_id: MessageId, payload: Bytes) -> Frame {
        Frame::new(Opcode::Pong, msg_id, UserId::NONE, payload)
    }

    /// BYE.
    pub fn bye(msg_id: MessageId) -> Frame {
        Frame::new(Opcode::Bye, msg_id, UserId::NONE, Bytes::new())
    }

    /// JOIN a room.
    pub fn join(msg_id: MessageId, room: RoomId) -> Frame {
        Frame::new(Opcode::Join, msg_id, UserId(room.0), Bytes::new())
    }

    /// LEAVE a room.
    pub fn leave(msg_id: MessageId, room: RoomId) -> Frame {
        Frame::new(Opcode::Leave, msg_id, UserId(room.0), Bytes::new())
    }

    /// ROOM_SEND `payload` to every member of `room`.
    pub fn room_send(msg_id: MessageId, room: RoomId, payload: Bytes) -> Frame {
        Frame::new(Opcode::RoomSend, msg_id, UserId(room.0), payload)
    }

    /// ROOM_INFO: ask for a room's online count.
    pub fn room_info(msg_id: MessageId, room: RoomId) -> Frame {
        Frame::new(Opcode::RoomInfo, msg_id, UserId(room.0), Bytes::new())
    }

    /// BROADCAST `payload` to every logged-in connection (admins only).
    pub fn broadcast(msg_id: MessageId, payload: Bytes) -> Frame {
        Frame::new(Opcode::Broadcast, msg_id, UserId::NONE, payload)
    }

    /// INBOX_SYNC: start stored delivery; the client has everything up to `last_seq` of the
    /// store `epoch` (0 and 0 for a client that has nothing).
    pub fn inbox_sync(msg_id: MessageId, epoch: u64, last_seq: u64) -> Frame {
        let mut payload = [0u8; 16];
        BigEndian::write_u64(&mut payload[..8], epoch);
        BigEndian::write_u64(&mut payload[8..], last_seq);
        Frame::new(
            Opcode::InboxSync,
            msg_id,
            UserId::NONE,
            Bytes::copy_from_slice(&payload),
        )
    }

    /// REFRESH: a new login token for the same user (section 16).
    pub fn refresh(msg_id: MessageId, token: &[u8]) -> Frame {
        Frame::new(
            Opcode::Refresh,
            msg_id,
            UserId::NONE,
            Bytes::copy_from_slice(token),
        )
    }

    /// The `exp` (Unix seconds) a TOKEN_EXPIRING or REFRESH_OK carries.
    pub fn token_exp(&self) -> Option<u64> {
        match (self.opcode, &self.payload[..]) {
            (Opcode::TokenExpiring | Opcode::RefreshOk, &[a, b, c, d, e, f, g, h]) => {
                Some(u64::from_be_bytes([a, b, c, d, e, f, g, h]))
            }
            _ => None,
        }
    }

    /// INBOX_ACK: every stored message up to `upto` was received.
    pub fn inbox_ack(msg_id: MessageId, upto: u64) -> Frame {
        Frame::new(
            Opcode::InboxAck,
            msg_id,
            UserId::NONE,
            Bytes::copy_from_slice(&upto.to_be_bytes()),
        )
    }

    /// For an INBOX_STATE frame: the inbox's state.
    pub fn inbox_state(&self) -> Option<InboxState> {
        if self.opcode != Opcode::InboxState {
            return None;
        }
        InboxState::parse(&self.payload)
    }

    /// For an INBOX_DELIVER frame: the sequence number, the stored-at time (Unix ms) and
    /// the message.
    pub fn inbox_deliver(&self) -> Option<(u64, u64, Bytes)> {
        if self.opcode != Opcode::InboxDeliver || self.payload.len() < 16 {
            return None;
        }
        Some((
            BigEndian::read_u64(&self.payload),
            BigEndian::read_u64(&self.payload[8..]),
            self.payload.slice(16..),
        ))
    }

    /// The target field read as a room id (room opcodes carry the room there).
    pub fn room(&self) -> RoomId {
        RoomId(self.target.0)
    }

    /// For a ROOM_STATE frame: the online count and membership.
    pub fn room_state(&self) -> Option<RoomState> {
        if self.opcode != Opcode::RoomState {
            return None;
        }
        RoomState::parse(&self.payload)
    }

    /// For a ROOM_MISSED frame: how many room messages were dropped for this connection.
    pub fn room_missed(&self) -> Option<u64> {
        if self.opcode != Opcode::RoomMissed || self.payload.len() != 8 {
            return None;
        }
        Some(BigEndian::read_u64(&self.payload))
    }

    /// Returns the frame with `flags` set.
    pub fn with_flags(mut self, flags: Flags) -> Frame {
        self.flags = flags;
        self
    }

    /// Returns the frame with `source` set (only the relay does this on the wire).
    pub fn with_source(mut self, source: UserId) -> Frame {
        self.source = source;
        self
    }

    /// Encoded size in bytes.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.payload.len()
    }

    /// Appends the encoded frame to `dst`.
    pub fn encode(&self, dst: &mut BytesMut) {
        write_frame(
            dst,
            self.opcode,
            self.flags,
            self.msg_id,
            self.target,
            self.source,
            &self.payload,
        );
    }

    /// The encoded frame as one buffer.
    pub fn to_bytes(&self) -> Bytes {
        let mut buf = BytesMut::with_capacity(self.encoded_len());
        self.encode(&mut buf);
        buf.freeze()
    }

    /// For an ERROR frame: the raw code and the reason text. `None` for another opcode or a
    /// payload shorter than 2 bytes. A reason that is not UTF-8 is replaced lossily.
    pub fn error(&self) -> Option<(u16, String)> {
        if self.opcode != Opcode::Error || self.payload.len() < 2 {
            return None;
        }
        let code = BigEndian::read_u16(&self.payload);
        Some((
            code,
            String::from_utf8_lossy(&self.payload[2..]).into_owned(),
        ))
    }

    /// For an ERROR frame: the code, if it is one v1 defines.
    pub fn error_code(&self) -> Option<ErrorCode> {
        self.error().and_then(|(code, _)| ErrorCode::from_u16(code))
    }

    /// For an ACK frame: how many connections the message was queued to.
    pub fn ack_count(&self) -> Option<u32> {
        if self.opcode != Opcode::Ack || self.payload.len() != 4 {
            return None;
        }
        Some(BigEndian::read_u32(&self.payload))
    }

    /// For a LOGIN_OK frame: the limits it announces.
    pub fn login_ok(&self) -> Option<LoginOk> {
        if self.opcode != Opcode::LoginOk {
            return None;
        }
        LoginOk::parse(&self.payload)
    }
}
