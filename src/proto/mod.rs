//! Wire format of protocol v1: frame layout, opcodes, error codes and the codec.
//!
//! This module owns bytes and nothing else: it never touches a socket, a clock or any
//! relay state. `protocol.md` at the top of the repository is the contract this code
//! implements; its hex test vectors are checked byte for byte by `tests/golden.rs`.
//!
//! Layout:
//! - [`ids`]: the `UserId` and `MessageId` newtypes.
//! - [`opcode`]: every opcode and flag bit.
//! - [`error`]: the `ErrorCode` sent in ERROR frames and the decoder's `DecodeError`.
//! - [`frame`]: the 32-byte header, the owned [`Frame`] and its encoders.
//! - [`decode`]: the incremental decoder (`Ok(None)` on a partial frame).
//! - [`device`]: the device id a LOGIN may carry, and its tag.

pub mod decode;
pub mod device;
pub mod error;
pub mod frame;
pub mod ids;
pub mod opcode;
pub mod reader;
pub mod text;

pub use decode::{decode_raw, RawFrame};
pub use device::{device_tag, login_payload, split_login, DeviceError, MAX_DEVICE_LEN};
pub use error::{DecodeError, ErrorCode};
pub use frame::{
    Frame, Header, HeartbeatBounds, InboxState, LoginOk, RoomState, HEADER_LEN, VERSION,
};
pub use ids::{MessageId, RoomId, UserId};
pub use opcode::{Flags, Opcode};
pub use reader::{FrameBytes, FrameReader};

/// Largest frame (header included) the relay accepts by default: 64 KiB.
pub const DEFAULT_MAX_FRAME: u32 = 64 * 1024;

/// Hard ceiling for a configured max frame size: 1 MiB. Keeping every legal length below
/// 16 MiB guarantees the first byte of a binary frame is 0x00, which is how a connection's
/// first bytes tell binary framing apart from text protocols (see protocol.md).
pub const MAX_FRAME_CEILING: u32 = 1024 * 1024;

/// Longest reason text the relay puts into an ERROR frame, in bytes.
pub const MAX_REASON_LEN: usize = 200;
