//! The incremental decoder: finds complete frames at the front of a byte buffer.
//!
//! A partial frame is `Ok(None)`, not an error. The declared length is checked against the
//! limit as soon as its 4 bytes are in, before anything is buffered for the frame, so a
//! hostile length never makes anyone reserve memory.

use byteorder::{BigEndian, ByteOrder};
use bytes::{Bytes, BytesMut};

use super::error::DecodeError;
use super::frame::{offset, Frame, Header, HEADER_LEN};
use super::ids::UserId;
use super::opcode::{Flags, Opcode};
use super::reader::{check_length, check_version};

/// One complete frame cut from the input buffer, header parsed, bytes untouched. The relay
/// forwards it without copying: [`RawFrame::into_deliver`] rewrites the header in place.
#[derive(Debug)]
pub struct RawFrame {
    header: Header,
    bytes: BytesMut,
}

impl RawFrame {
    /// A frame from exactly its bytes (length checked by the caller: `bytes` is one whole
    /// frame, header included).
    pub(crate) fn from_owned(bytes: BytesMut) -> RawFrame {
        RawFrame {
            header: Header::read(&bytes),
            bytes,
        }
    }

    /// The parsed header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The opcode, if v1 defines it.
    pub fn opcode(&self) -> Option<Opcode> {
        Opcode::from_u8(self.header.opcode)
    }

    /// The payload bytes.
    pub fn payload(&self) -> &[u8] {
        &self.bytes[HEADER_LEN..]
    }

    /// The whole frame as it came off the wire.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Turns a SEND into the DELIVER its recipients get: opcode DELIVER, flags cleared,
    /// source set to `source`; length, message id, target and payload stay. No copy.
    pub fn into_deliver(self, source: UserId) -> Bytes {
        let target = self.header.target;
        self.rewrite(Opcode::Deliver, target, source)
    }

    /// Rewrites the header in place (opcode, target, source; flags cleared) and freezes the
    /// frame. Length, message id and payload stay. Used for DELIVER, PONG and BYE replies.
    pub fn rewrite(mut self, opcode: Opcode, target: UserId, source: UserId) -> Bytes {
        // One length check for the whole header (a RawFrame always has one), then fixed
        // offsets: no check per field (about 10 instructions per forwarded SEND).
        if let Some(header) = self.bytes.get_mut(..HEADER_LEN) {
            if let Ok(header) = <&mut [u8; HEADER_LEN]>::try_from(header) {
                header[offset::OPCODE] = opcode as u8;
                header[offset::FLAGS..offset::FLAGS + 2]
                    .copy_from_slice(&Flags::EMPTY.0.to_be_bytes());
                header[offset::TARGET..offset::TARGET + 8].copy_from_slice(&target.0.to_be_bytes());
                header[offset::SOURCE..offset::SOURCE + 8].copy_from_slice(&source.0.to_be_bytes());
            }
        }
        self.bytes.freeze()
    }

    /// Converts into an owned [`Frame`]; `None` if the opcode is unknown to v1.
    pub fn into_frame(mut self) -> Option<Frame> {
        let opcode = self.opcode()?;
        let payload = self.bytes.split_off(HEADER_LEN).freeze();
        Some(Frame {
            opcode,
            flags: self.header.flags,
            msg_id: self.header.msg_id,
            target: self.header.target,
            source: self.header.source,
            payload,
        })
    }
}

/// Cuts the next complete frame off the front of `buf`.
///
/// - `Ok(Some(frame))`: a whole frame was removed from `buf`.
/// - `Ok(None)`: `buf` holds only part of a frame (possibly nothing); read more.
/// - `Err(e)`: the stream is not v1 framing; the connection must be closed.
pub fn decode_raw(buf: &mut BytesMut, max_frame: u32) -> Result<Option<RawFrame>, DecodeError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let declared = check_length(BigEndian::read_u32(&buf[offset::LENGTH..]), max_frame)?;
    check_version(buf)?;
    if buf.len() < declared {
        return Ok(None);
    }
    let header = Header::read(buf);
    let bytes = buf.split_to(declared);
    Ok(Some(RawFrame { header, bytes }))
}

/// Decodes the next frame into an owned [`Frame`]. An unknown opcode is returned as
/// `Ok(Some(Err(opcode_byte)))` so a client can skip it and go on.
#[allow(clippy::type_complexity)]
pub fn decode_frame(
    buf: &mut BytesMut,
    max_frame: u32,
) -> Result<Option<Result<Frame, u8>>, DecodeError> {
    Ok(decode_raw(buf, max_frame)?.map(|raw| {
        let opcode = raw.header().opcode;
        raw.into_frame().ok_or(opcode)
    }))
}
