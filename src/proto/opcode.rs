//! Opcodes and flag bits of protocol v1 (protocol.md, "Opcodes" and "Flags").

/// Every opcode protocol v1 defines. Ranges kept free for later versions are listed in
/// protocol.md; a relay answers an opcode it does not know with `UNKNOWN_OPCODE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Opcode {
    /// Client → relay: log in as the user id in the target field.
    Login = 0x01,
    /// Relay → client: the login succeeded; the payload carries the relay's limits.
    LoginOk = 0x02,
    /// Client → relay: deliver the payload to every connection of the target user.
    Send = 0x03,
    /// Relay → client: a message from the user in the source field.
    Deliver = 0x04,
    /// Relay → client: a SEND was queued to every connection of its recipient.
    Ack = 0x05,
    /// Relay → client: a request failed, or the connection is about to be closed.
    Error = 0x06,
    /// Either direction: please answer with PONG.
    Ping = 0x07,
    /// Either direction: the answer to PING, same message id and payload.
    Pong = 0x08,
    /// Either direction: end the session; the relay answers BYE and closes.
    Bye = 0x09,
    /// Client → relay: join the room in the target field; answered with ROOM_STATE.
    Join = 0x10,
    /// Client → relay: leave the room in the target field; answered with ROOM_STATE.
    Leave = 0x11,
    /// Client → relay: deliver the payload to every member of the room in the target field.
    RoomSend = 0x12,
    /// Relay → client: a room message (target = room id, 0 for a system broadcast; source =
    /// the sender).
    RoomDeliver = 0x13,
    /// Client → relay: ask for a room's online count; answered with ROOM_STATE.
    RoomInfo = 0x14,
    /// Relay → client: a room's online count and whether this connection is a member.
    RoomState = 0x15,
    /// Client → relay, admins only: deliver the payload to every logged-in connection.
    Broadcast = 0x16,
    /// Relay → client: how many room messages this connection missed while it was slow.
    RoomMissed = 0x17,
    /// Client → relay: start stored delivery on this connection from the last sequence
    /// number the client has; answered with INBOX_STATE, then the replay.
    InboxSync = 0x20,
    /// Relay → client: the state of the user's inbox (epoch, sequence range, expiries).
    InboxState = 0x21,
    /// Relay → client: one stored message with its inbox sequence number.
    InboxDeliver = 0x22,
    /// Client → relay: every stored message up to this sequence number was received.
    InboxAck = 0x23,
    /// Relay → client: the login token expires soon (payload: its `exp`, u64 Unix
    /// seconds); send REFRESH with a new one before then.
    TokenExpiring = 0x30,
    /// Client → relay: a new token for the same user (payload: the token); answered with
    /// REFRESH_OK or ERROR AUTH_FAILED.
    Refresh = 0x31,
    /// Relay → client: the REFRESH was accepted (payload: the new `exp`, u64 Unix seconds).
    RefreshOk = 0x32,
}

impl Opcode {
    /// Parses a raw opcode byte; `None` for an opcode v1 does not define.
    pub fn from_u8(byte: u8) -> Option<Opcode> {
        Some(match byte {
            0x01 => Opcode::Login,
            0x02 => Opcode::LoginOk,
            0x03 => Opcode::Send,
            0x04 => Opcode::Deliver,
            0x05 => Opcode::Ack,
            0x06 => Opcode::Error,
            0x07 => Opcode::Ping,
            0x08 => Opcode::Pong,
            0x09 => Opcode::Bye,
            0x10 => Opcode::Join,
            0x11 => Opcode::Leave,
            0x12 => Opcode::RoomSend,
            0x13 => Opcode::RoomDeliver,
            0x14 => Opcode::RoomInfo,
            0x15 => Opcode::RoomState,
            0x16 => Opcode::Broadcast,
            0x17 => Opcode::RoomMissed,
            0x20 => Opcode::InboxSync,
            0x21 => Opcode::InboxState,
            0x22 => Opcode::InboxDeliver,
            0x23 => Opcode::InboxAck,
            0x30 => Opcode::TokenExpiring,
            0x31 => Opcode::Refresh,
            0x32 => Opcode::RefreshOk,
            _ => return None,
        })
    }

    /// The name protocol.md uses for this opcode.
    pub fn name(self) -> &'static str {
        match self {
            Opcode::Login => "LOGIN",
            Opcode::LoginOk => "LOGIN_OK",
            Opcode::Send => "SEND",
            Opcode::Deliver => "DELIVER",
            Opcode::Ack => "ACK",
            Opcode::Error => "ERROR",
            Opcode::Ping => "PING",
            Opcode::Pong => "PONG",
            Opcode::Bye => "BYE",
            Opcode::Join => "JOIN",
            Opcode::Leave => "LEAVE",
            Opcode::RoomSend => "ROOM_SEND",
            Opcode::RoomDeliver => "ROOM_DELIVER",
            Opcode::RoomInfo => "ROOM_INFO",
            Opcode::RoomState => "ROOM_STATE",
            Opcode::Broadcast => "BROADCAST",
            Opcode::RoomMissed => "ROOM_MISSED",
            Opcode::InboxSync => "INBOX_SYNC",
            Opcode::InboxState => "INBOX_STATE",
            Opcode::InboxDeliver => "INBOX_DELIVER",
            Opcode::InboxAck => "INBOX_ACK",
            Opcode::TokenExpiring => "TOKEN_EXPIRING",
            Opcode::Refresh => "REFRESH",
            Opcode::RefreshOk => "REFRESH_OK",
        }
    }
}

/// The 16-bit flags field. v1 defines six bits; every other bit is reserved and must be 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Flags(pub u16);

impl Flags {
    /// No flag set.
    pub const EMPTY: Flags = Flags(0);
    /// On SEND, ROOM_SEND and BROADCAST: do not answer with ACK when the message is queued (errors are still sent).
    pub const NO_ACK: Flags = Flags(0x0001);
    /// On SEND: this message may be a resend; the relay forwards a given (sender, msg_id)
    /// once and answers repeats with the first ACK (protocol.md, section 13).
    pub const DEDUP: Flags = Flags(0x0002);
    /// On SEND: stored delivery. The relay keeps the message in the recipient's inbox until
    /// the recipient acknowledges it, and ACKs only once it is stored (protocol.md, 15).
    pub const STORED: Flags = Flags(0x0004);
    /// On LOGIN: the payload starts with the device id (protocol.md, section 15.1).
    pub const DEVICE: Flags = Flags(0x0008);
    /// On INBOX_STATE (sent by the relay): the syncing device is new to the relay, and
    /// starts from what the inbox holds (protocol.md, section 15.1).
    pub const NEW_DEVICE: Flags = Flags(0x0010);
    /// On LOGIN: the client wants the relay's heartbeat bounds, so LOGIN_OK carries 24
    /// bytes instead of 16 (protocol.md, sections 5.1 and 5.2).
    pub const HEARTBEAT: Flags = Flags(0x0020);
    /// Every bit v1 defines; the others are reserved.
    pub const KNOWN: Flags = Flags(0x003f);

    /// Both sets of bits.
    pub const fn union(self, other: Flags) -> Flags {
        Flags(self.0 | other.0)
    }

    /// True when every bit of `other` is set here.
    pub fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }

    /// The bits set here that v1 does not define.
    pub fn reserved_bits(self) -> u16 {
        self.0 & !Flags::KNOWN.0
    }
}

impl Opcode {
    /// Every opcode, in numeric order (used by tests and docs checks).
    pub const ALL: [Opcode; 24] = [
        Opcode::Login,
        Opcode::LoginOk,
        Opcode::Send,
        Opcode::Deliver,
        Opcode::Ack,
        Opcode::Error,
        Opcode::Ping,
        Opcode::Pong,
        Opcode::Bye,
        Opcode::Join,
        Opcode::Leave,
        Opcode::RoomSend,
        Opcode::RoomDeliver,
        Opcode::RoomInfo,
        Opcode::RoomState,
        Opcode::Broadcast,
        Opcode::RoomMissed,
        Opcode::InboxSync,
        Opcode::InboxState,
        Opcode::InboxDeliver,
        Opcode::InboxAck,
        Opcode::TokenExpiring,
        Opcode::Refresh,
        Opcode::RefreshOk,
    ];
}
