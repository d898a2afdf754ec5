//! What the client tells the app: events, why a link went down, why a message failed.

use std::fmt;
use std::time::Duration;

use bytes::Bytes;

use crate::proto::{ErrorCode, LoginOk, MessageId, RoomId, UserId};

/// Something the app should know. Read them with `poll_event` (or `recv` on the blocking
/// client), in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Logged in; queued and un-ACKed messages are being (re)sent now.
    Connected {
        /// The user now logged in.
        user: UserId,
        /// The relay's limits from LOGIN_OK.
        limits: LoginOk,
    },
    /// The link is down; the client reconnects by itself after `retry_in` (for
    /// [`DisconnectReason::Background`]: when the app is in the foreground again;
    /// `retry_in` is then 0).
    Disconnected {
        /// Why the link went down.
        reason: DisconnectReason,
        /// When the next attempt starts.
        retry_in: Duration,
    },
    /// A direct message for this user (shown once, even if the relay sent it twice).
    Message {
        /// The sender's user id, set by the relay.
        from: UserId,
        /// The sender's message id.
        id: MessageId,
        /// The message.
        payload: Bytes,
    },
    /// A stored message this user sent from another of its devices (protocol.md, section
    /// 15.1), so this device can show both sides of the conversation.
    SentFromOtherDevice {
        /// The user it was sent to.
        to: UserId,
        /// The message id the other device gave it.
        id: MessageId,
        /// The message.
        payload: Bytes,
    },
    /// A room message (danmaku, like, gift…).
    RoomMessage {
        /// The room.
        room: RoomId,
        /// The sender's user id.
        from: UserId,
        /// The message.
        payload: Bytes,
    },
    /// The relay dropped room messages for this connection because it was slow.
    RoomMissed {
        /// The room.
        room: RoomId,
        /// How many were dropped.
        missed: u64,
    },
    /// The relay's answer to join, leave or room info.
    RoomState {
        /// The room.
        room: RoomId,
        /// Connections in the room.
        members: u32,
        /// Whether this connection is one of them.
        is_member: bool,
    },
    /// The relay queued the message to `devices` connections of the recipient.
    Delivered {
        /// The id `send` returned.
        id: MessageId,
        /// Recipient connections it was queued to.
        devices: u32,
    },
    /// A stored message is in the recipient's inbox on the relay (on disk with a durable
    /// store): it will reach the recipient's app once, whenever it connects.
    Stored {
        /// The id `send_stored` returned.
        id: MessageId,
        /// Recipient connections it was pushed to right away (0: recipient offline).
        devices: u32,
    },
    /// Stored messages `from..=to` expired on the relay before this client received them.
    Gap {
        /// The first missed sequence number.
        from: u64,
        /// The last missed sequence number.
        to: u64,
    },
    /// The message will not be delivered by this client; nothing will be resent.
    Failed {
        /// The id `send` returned.
        id: MessageId,
        /// Why.
        reason: FailReason,
    },
    /// An ERROR from the relay that answers none of this client's messages.
    Error {
        /// The code ([`ErrorCode`] as u16).
        code: u16,
        /// The relay's reason text.
        reason: String,
    },
    /// The relay says this link's login token expires at `exp` (Unix seconds). With a
    /// `token_provider` the client has already asked it for a new token and sent REFRESH
    /// (a `TokenRefreshed` or `RefreshFailed` follows); without one, the app may call
    /// `refresh_token`, or let the relay close the link at expiry and log in again.
    TokenExpiring {
        /// When the token expires, Unix seconds.
        exp: u64,
    },
    /// The relay accepted a REFRESH: the link's token now expires at `exp` (Unix seconds;
    /// 0 from a relay that checks no tokens).
    TokenRefreshed {
        /// The new expiry.
        exp: u64,
    },
    /// The relay refused a REFRESH (`AUTH_FAILED`, with its reason). The link stays up on
    /// the old token until it expires; then the relay closes it and the client logs in
    /// again with whatever the provider gives then.
    RefreshFailed {
        /// The relay's error code ([`ErrorCode`] as u16).
        code: u16,
        /// The relay's reason text.
        reason: String,
    },
    /// `close` finished (or the config cannot work): no more events follow.
    Closed,
}

/// Why a message failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FailReason {
    /// The relay refused it (recipient offline, recipient slow, invalid…).
    Rejected {
        /// The relay's error code ([`ErrorCode`] as u16; a newer relay may send others).
        code: u16,
        /// The relay's reason text.
        reason: String,
    },
    /// It was never written to a link before the send timeout.
    NotSent,
    /// It was written, but no answer came before the send timeout or before the client
    /// was closed (a message held after a "try later" answer counts as written): it may
    /// have arrived, or be in the recipient's inbox for a stored message. Its fate is
    /// unknown to this client.
    Unconfirmed,
    /// The client was closed before the message was ever written to a link.
    Closed,
}

impl fmt::Display for FailReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailReason::Rejected { code, reason } => write!(f, "{}: {reason}", code_name(*code)),
            FailReason::NotSent => write!(f, "not sent before the send timeout"),
            FailReason::Unconfirmed => {
                write!(f, "sent but not confirmed (it may have arrived)")
            }
            FailReason::Closed => write!(f, "client closed before sending"),
        }
    }
}

/// Why a link went down.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DisconnectReason {
    /// The TCP connect failed or timed out.
    ConnectFailed(String),
    /// LOGIN got no answer within the login timeout.
    LoginTimeout,
    /// The relay refused the LOGIN.
    LoginRejected {
        /// The relay's error code ([`ErrorCode`] as u16; a newer relay may send others).
        code: u16,
        /// The relay's reason text.
        reason: String,
    },
    /// Nothing arrived within the heartbeat timeout after a PING: the link is dead.
    HeartbeatTimeout,
    /// The relay closed the connection (its ERROR, if it sent one, came as an event).
    ClosedByRelay,
    /// A read or write failed.
    Io(String),
    /// The relay sent bytes that are not valid frames.
    Protocol(String),
    /// TLS failed: the handshake (an untrusted certificate, a name that does not match,
    /// no common protocol version) or a later record. The string is rustls's reason.
    Tls(String),
    /// The app was in the background past the grace period of
    /// [`Background::DisconnectAfter`](super::Background::DisconnectAfter): the client
    /// closed the link cleanly and reconnects when the app is in the foreground again.
    Background,
}

impl fmt::Display for DisconnectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DisconnectReason::ConnectFailed(e) => write!(f, "connect failed: {e}"),
            DisconnectReason::LoginTimeout => write!(f, "no answer to LOGIN"),
            DisconnectReason::LoginRejected { code, reason } => {
                write!(f, "login refused: {}: {reason}", code_name(*code))
            }
            DisconnectReason::HeartbeatTimeout => write!(f, "heartbeat timeout: link dead"),
            DisconnectReason::ClosedByRelay => write!(f, "closed by the relay"),
            DisconnectReason::Io(e) => write!(f, "i/o error: {e}"),
            DisconnectReason::Protocol(e) => write!(f, "protocol error: {e}"),
            DisconnectReason::Tls(e) => write!(f, "TLS {e}"),
            DisconnectReason::Background => {
                write!(f, "closed in the background (reconnects in the foreground)")
            }
        }
    }
}

/// Why `send` refused a message at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendError {
    /// The outbox holds `max_outbox` messages already.
    OutboxFull,
    /// The payload does not fit in the relay's max frame.
    TooLarge,
    /// User 0 is reserved.
    InvalidRecipient,
    /// Room traffic needs a live link.
    NotConnected,
    /// The client is closed.
    Closed,
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SendError::OutboxFull => "outbox full",
            SendError::TooLarge => "payload larger than the relay's max frame allows (16 bytes less for a stored message)",
            SendError::InvalidRecipient => "user id 0 is reserved",
            SendError::NotConnected => "not connected",
            SendError::Closed => "client closed",
        })
    }
}

impl std::error::Error for SendError {}

/// `RECIPIENT_OFFLINE(6)` for a code v1 defines, `error 77` for another.
pub fn code_name(code: u16) -> String {
    match ErrorCode::from_u16(code) {
        Some(known) => known.to_string(),
        None => format!("error {code}"),
    }
}
