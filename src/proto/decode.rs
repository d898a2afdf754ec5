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

/// One complete frame, header parsed, its bytes borrowed from wherever they were read (the
/// driver's read buffer, a reader's assembled partial frame, a WebSocket message). Nothing
/// the relay keeps points into those buffers: whoever holds on to a frame copies it, with
/// its header rewritten on the way ([`RawFrame::rewrite_into`], [`RawFrame::rewritten`]),
/// so a read buffer is reused from one read to the next and never pinned by a queued frame.
#[derive(Debug, Clone, Copy)]
pub struct RawFrame<'a> {
    header: Header,
    bytes: &'a [u8],
}

impl<'a> RawFrame<'a> {
    /// A frame from exactly its bytes (length checked by the caller: `bytes` is one whole
    /// frame, header included). Panics if `bytes` is shorter than a header.
    pub(crate) fn new(bytes: &'a [u8]) -> RawFrame<'a> {
        RawFrame {
            header: Header::read(bytes),
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
    pub fn payload(&self) -> &'a [u8] {
        &self.bytes[HEADER_LEN..]
    }

    /// The whole frame as it came off the wire.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// Appends the frame to `dst` with its header rewritten: opcode, target and source
    /// replaced, flags cleared; length, message id and payload stay. A SEND becomes the
    /// DELIVER its recipients get this way, a PING its PONG.
    #[inline(always)]
    pub fn rewrite_into(&self, dst: &mut BytesMut, opcode: Opcode, target: UserId, source: UserId) {
        let start = dst.len();
        // One copy of the whole frame, then the header patched where it landed (not a
        // header built aside and copied in: a second copy, and a memcpy call, per frame).
        dst.extend_from_slice(self.bytes);
        let header = dst.get_mut(start..start + HEADER_LEN);
        if let Some(Ok(header)) = header.map(<&mut [u8; HEADER_LEN]>::try_from) {
            // Fixed offsets into a fixed-size array: no bounds check per field.
            header[offset::OPCODE] = opcode as u8;
            header[offset::FLAGS..offset::FLAGS + 2].copy_from_slice(&Flags::EMPTY.0.to_be_bytes());
            header[offset::TARGET..offset::TARGET + 8].copy_from_slice(&target.0.to_be_bytes());
            header[offset::SOURCE..offset::SOURCE + 8].copy_from_slice(&source.0.to_be_bytes());
        }
    }

    /// [`RawFrame::rewrite_into`] an allocation of its own size, for a frame queued to many
    /// connections. Made shared at once (`split`): each clone and drop of it is then one
    /// reference count change, where a frozen `Vec` first checks how it is shared (about 10
    /// instructions more per room member, callgrind on benches/router).
    pub fn rewritten(&self, opcode: Opcode, target: UserId, source: UserId) -> Bytes {
        let mut dst = BytesMut::with_capacity(self.bytes.len());
        self.rewrite_into(&mut dst, opcode, target, source);
        dst.split().freeze()
    }
}

/// Cuts the next complete frame off the front of `buf` and returns its bytes, header
/// included.
///
/// - `Ok(Some(bytes))`: a whole frame was removed from `buf`.
/// - `Ok(None)`: `buf` holds only part of a frame (possibly nothing); read more.
/// - `Err(e)`: the stream is not v1 framing; the connection must be closed.
pub fn decode_raw(buf: &mut BytesMut, max_frame: u32) -> Result<Option<BytesMut>, DecodeError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let declared = check_length(BigEndian::read_u32(&buf[offset::LENGTH..]), max_frame)?;
    check_version(buf)?;
    if buf.len() < declared {
        return Ok(None);
    }
    Ok(Some(buf.split_to(declared)))
}

/// Decodes the next frame into an owned [`Frame`] (its payload a view into `buf`'s
/// allocation, no copy). An unknown opcode is returned as `Ok(Some(Err(opcode_byte)))` so
/// a client can skip it and go on.
#[allow(clippy::type_complexity)]
pub fn decode_frame(
    buf: &mut BytesMut,
    max_frame: u32,
) -> Result<Option<Result<Frame, u8>>, DecodeError> {
    Ok(decode_raw(buf, max_frame)?.map(|mut bytes| {
        let header = Header::read(&bytes);
        let opcode = Opcode::from_u8(header.opcode).ok_or(header.opcode)?;
        Ok(Frame {
            opcode,
            flags: header.flags,
            msg_id: header.msg_id,
            target: header.target,
            source: header.source,
            payload: bytes.split_off(HEADER_LEN).freeze(),
        })
    }))
}
