//! Error codes carried in ERROR frames, and the decoder's error type.

use std::fmt;

/// The code in an ERROR frame's payload (protocol.md, "Error codes"). Each variant says when
/// the relay sends it and whether the relay closes the connection after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// The byte stream is not a v1 frame (length below the header size, wrong version, or the
    /// peer closed in the middle of a frame). Closes: framing can no longer be trusted.
    Malformed = 1,
    /// The opcode is not one v1 defines. The frame is skipped; the connection stays open.
    UnknownOpcode = 2,
    /// The length field is larger than the relay's max frame size. Closes: the relay will
    /// not buffer the frame, so it cannot find the next one.
    FrameTooLarge = 3,
    /// SEND (or another user request) before LOGIN. The frame is dropped; stays open.
    NotLoggedIn = 4,
    /// LOGIN on a connection that is already logged in. Stays open, still the first user.
    AlreadyLoggedIn = 5,
    /// SEND to a user with no connection on this relay. Nothing was queued; stays open.
    RecipientOffline = 6,
    /// SEND to a user one of whose connections has a full output queue. Nothing was queued
    /// to any of its connections; the sender may retry later. Stays open.
    RecipientSlow = 7,
    /// A relay limit was hit: connections (closes), devices per user (LOGIN refused, stays
    /// open), rooms per connection or members per room (JOIN refused, stays open). The
    /// reason names the limit.
    LimitReached = 8,
    /// The relay is shutting down; pending output is flushed, then it closes.
    ShuttingDown = 9,
    /// No LOGIN arrived within the login timeout. Closes.
    LoginTimeout = 10,
    /// Nothing arrived from the client within the idle timeout, PING included. Closes.
    IdleTimeout = 11,
    /// A header field has a value that is not allowed for this opcode: a client-set source
    /// id, a reserved flag bit, user id 0, a relay-only opcode sent by a client, a wrong
    /// payload size. The frame is dropped; stays open.
    InvalidField = 12,
    /// The version byte is not 1. Closes.
    UnsupportedVersion = 13,
    /// ROOM_SEND to a room this connection has not joined. Stays open.
    NotInRoom = 14,
    /// BROADCAST from a user that is not in the relay's admin list. Stays open.
    Forbidden = 15,
    /// ROOM_SEND above the per-connection rate; the frame is dropped. Stays open.
    RateLimited = 16,
    /// A stored SEND the recipient's inbox (or the store) has no room for: the reason names
    /// the limit (messages, bytes, users, store size). Nothing was stored. Stays open.
    InboxFull = 17,
    /// The relay could not write a stored SEND to disk; it is not durable and the sender
    /// should send it again later. Stays open.
    StoreFailed = 18,
    /// A frame (or text line, HTTP request head or WebSocket message) that was started was
    /// not complete within the frame timeout, however slowly its bytes kept coming. Closes.
    FrameTimeout = 19,
    /// A LOGIN or REFRESH token was refused (the reason says which check failed). Stays
    /// open for a retry; the fifth refusal in a row closes.
    AuthFailed = 20,
    /// The login token expired and no REFRESH replaced it. Closes.
    TokenExpired = 21,
    /// Cluster mode: a SEND to a user not on this node while the node's link to the
    /// cluster (Redis) is down or backed up. Stays open; retry later.
    ClusterUnavailable = 22,
}

impl ErrorCode {
    /// Parses a code from an ERROR payload; `None` for a code v1 does not define.
    pub fn from_u16(code: u16) -> Option<ErrorCode> {
        use ErrorCode::*;
        Some(match code {
            1 => Malformed,
            2 => UnknownOpcode,
            3 => FrameTooLarge,
            4 => NotLoggedIn,
            5 => AlreadyLoggedIn,
            6 => RecipientOffline,
            7 => RecipientSlow,
            8 => LimitReached,
            9 => ShuttingDown,
            10 => LoginTimeout,
            11 => IdleTimeout,
            12 => InvalidField,
            13 => UnsupportedVersion,
            14 => NotInRoom,
            15 => Forbidden,
            16 => RateLimited,
            17 => InboxFull,
            18 => StoreFailed,
            19 => FrameTimeout,
            20 => AuthFailed,
            21 => TokenExpired,
            22 => ClusterUnavailable,
            _ => return None,
        })
    }

    /// The name protocol.md uses for this code.
    pub fn name(self) -> &'static str {
        use ErrorCode::*;
        match self {
            Malformed => "MALFORMED",
            UnknownOpcode => "UNKNOWN_OPCODE",
            FrameTooLarge => "FRAME_TOO_LARGE",
            NotLoggedIn => "NOT_LOGGED_IN",
            AlreadyLoggedIn => "ALREADY_LOGGED_IN",
            RecipientOffline => "RECIPIENT_OFFLINE",
            RecipientSlow => "RECIPIENT_SLOW",
            LimitReached => "LIMIT_REACHED",
            ShuttingDown => "SHUTTING_DOWN",
            LoginTimeout => "LOGIN_TIMEOUT",
            IdleTimeout => "IDLE_TIMEOUT",
            InvalidField => "INVALID_FIELD",
            UnsupportedVersion => "UNSUPPORTED_VERSION",
            NotInRoom => "NOT_IN_ROOM",
            Forbidden => "FORBIDDEN",
            RateLimited => "RATE_LIMITED",
            InboxFull => "INBOX_FULL",
            StoreFailed => "STORE_FAILED",
            FrameTimeout => "FRAME_TIMEOUT",
            AuthFailed => "AUTH_FAILED",
            TokenExpired => "TOKEN_EXPIRED",
            ClusterUnavailable => "CLUSTER_UNAVAILABLE",
        }
    }

    /// Every code, in numeric order (used by metrics and tests).
    pub const ALL: [ErrorCode; 22] = [
        ErrorCode::Malformed,
        ErrorCode::UnknownOpcode,
        ErrorCode::FrameTooLarge,
        ErrorCode::NotLoggedIn,
        ErrorCode::AlreadyLoggedIn,
        ErrorCode::RecipientOffline,
        ErrorCode::RecipientSlow,
        ErrorCode::LimitReached,
        ErrorCode::ShuttingDown,
        ErrorCode::LoginTimeout,
        ErrorCode::IdleTimeout,
        ErrorCode::InvalidField,
        ErrorCode::UnsupportedVersion,
        ErrorCode::NotInRoom,
        ErrorCode::Forbidden,
        ErrorCode::RateLimited,
        ErrorCode::InboxFull,
        ErrorCode::StoreFailed,
        ErrorCode::FrameTimeout,
        ErrorCode::AuthFailed,
        ErrorCode::TokenExpired,
        ErrorCode::ClusterUnavailable,
    ];
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", self.name(), *self as u16)
    }
}

/// Why the decoder cannot go on reading a byte stream. Every variant is fatal for the
/// connection: the stream has lost its framing. (An unknown opcode is not a decode error:
/// the frame is still well delimited and the relay answers it without closing.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The length field is below the 32-byte header size.
    LengthTooSmall {
        /// The length the peer declared.
        declared: u32,
    },
    /// The length field exceeds the configured max frame size.
    TooLarge {
        /// The length the peer declared.
        declared: u32,
        /// The limit in force.
        max: u32,
    },
    /// The version byte is not 1.
    BadVersion {
        /// The version byte the peer sent.
        version: u8,
    },
}

impl DecodeError {
    /// The ERROR code the relay sends before closing.
    pub fn code(self) -> ErrorCode {
        match self {
            DecodeError::LengthTooSmall { .. } => ErrorCode::Malformed,
            DecodeError::TooLarge { .. } => ErrorCode::FrameTooLarge,
            DecodeError::BadVersion { .. } => ErrorCode::UnsupportedVersion,
        }
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            DecodeError::LengthTooSmall { declared } => {
                write!(f, "length {declared} is below the 32-byte header")
            }
            DecodeError::TooLarge { declared, max } => {
                write!(f, "length {declared} exceeds the max frame size {max}")
            }
            DecodeError::BadVersion { version } => {
                write!(f, "version {version} is not supported (expected 1)")
            }
        }
    }
}

impl std::error::Error for DecodeError {}
