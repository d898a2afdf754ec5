//! Identifier newtypes so a user id, a message id and a connection id can never be mixed up.

use std::fmt;

/// A user's id. `0` is reserved: it means "nobody" (an unset source, no target).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(pub u64);

impl UserId {
    /// The reserved "nobody" id.
    pub const NONE: UserId = UserId(0);

    /// True for the reserved id 0.
    pub fn is_none(self) -> bool {
        self.0 == 0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "user {}", self.0)
    }
}

/// A message id chosen by the sender; the relay echoes it in ACK, ERROR, PONG and DELIVER.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(pub u64);

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "msg {}", self.0)
    }
}

/// A room's id. `0` is reserved: in ROOM_DELIVER it marks a system broadcast.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomId(pub u64);

impl RoomId {
    /// The reserved id of the whole relay (system broadcasts).
    pub const ALL: RoomId = RoomId(0);
}

impl fmt::Display for RoomId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "room {}", self.0)
    }
}
