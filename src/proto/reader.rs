//! The frame reader: turns a connection's byte stream, handed over one read at a time,
//! into frames.
//!
//! A frame complete inside one read is handed out in place, borrowed from the caller's
//! read buffer ([`FrameBytes::InPlace`]): no copy, no reference count, and the buffer is
//! the caller's again when the read is used up, so one buffer serves every connection.
//! A frame cut off by the end of a read goes into the reader's partial buffer, reserved
//! once at the frame's declared length (checked against the limit first), and later reads
//! fill it in place ([`FrameBytes::Assembled`]): a frame that trickles in one byte per read
//! costs linear time, never a re-copy per read.
//!
//! This module never performs I/O and never reads the clock; the caller decides how long a
//! partial frame may take.

use byteorder::{BigEndian, ByteOrder};
use bytes::BytesMut;

use super::decode::RawFrame;
use super::error::DecodeError;
use super::frame::{offset, HEADER_LEN, VERSION};

/// Bytes of a frame that must be in before its length is known and checked.
const LENGTH_PREFIX: usize = 4;

/// One connection's incremental frame reader. Owns no heap memory between frames.
#[derive(Debug, Default)]
pub struct FrameReader {
    /// The start of the frame being read: at most 3 bytes until its length is known, then
    /// a buffer with capacity for exactly the declared length.
    partial: BytesMut,
    /// The declared length of the frame in `partial` (0: not known yet).
    declared: usize,
}

/// The bytes of one whole frame, header included.
#[derive(Debug)]
pub enum FrameBytes<'a> {
    /// Whole inside the read it came in: borrowed from it.
    InPlace(&'a [u8]),
    /// Assembled from several reads in the reader's partial buffer, now the caller's.
    Assembled(BytesMut),
}

impl FrameBytes<'_> {
    /// The frame's bytes.
    #[inline]
    pub fn as_slice(&self) -> &[u8] {
        match self {
            FrameBytes::InPlace(bytes) => bytes,
            FrameBytes::Assembled(bytes) => bytes,
        }
    }

    /// The frame, its header parsed.
    #[inline]
    pub fn raw(&self) -> RawFrame<'_> {
        RawFrame::new(self.as_slice())
    }
}

impl FrameReader {
    /// True while part of a frame is buffered.
    pub fn has_partial(&self) -> bool {
        !self.partial.is_empty()
    }

    /// Bytes of the partial frame buffered so far.
    pub fn partial_len(&self) -> usize {
        self.partial.len()
    }

    /// Heap bytes this reader holds (the partial frame's reserved capacity).
    pub fn held(&self) -> usize {
        self.partial.capacity()
    }

    /// Takes the next complete frame from the partial buffer and `data`, advancing `data`
    /// past what it used. `Ok(None)`: `data` is used up and the rest of a frame (if any) is
    /// buffered. An error means the stream has lost its framing; the reader is then reset,
    /// `data` emptied, and the connection must be closed.
    #[inline]
    pub fn next_frame<'a>(
        &mut self,
        data: &mut &'a [u8],
        max_frame: u32,
    ) -> Result<Option<FrameBytes<'a>>, DecodeError> {
        // The common case, inline: a whole, valid frame at the front of the read.
        if self.partial.is_empty() && data.len() >= LENGTH_PREFIX {
            let declared = BigEndian::read_u32(data) as usize;
            if declared >= HEADER_LEN
                && declared <= max_frame as usize
                && data.len() >= declared
                && data[offset::VERSION] == VERSION
            {
                let (frame, rest) = data.split_at(declared);
                *data = rest;
                return Ok(Some(FrameBytes::InPlace(frame)));
            }
        }
        let result = self.next_slow(data, max_frame);
        if result.is_err() {
            *self = FrameReader::default();
            *data = &[];
        }
        result
    }

    /// [`FrameReader::next_frame`] for everything but a whole valid frame at the front: a
    /// partial frame, or a length or version to refuse.
    #[inline(never)]
    fn next_slow<'a>(
        &mut self,
        data: &mut &'a [u8],
        max_frame: u32,
    ) -> Result<Option<FrameBytes<'a>>, DecodeError> {
        if self.partial.is_empty() {
            if data.len() < LENGTH_PREFIX {
                self.partial.extend_from_slice(data);
                *data = &[];
                return Ok(None);
            }
            let declared = check_length(BigEndian::read_u32(data), max_frame)?;
            check_version(data)?;
            if data.len() >= declared {
                let (frame, rest) = data.split_at(declared);
                *data = rest;
                return Ok(Some(FrameBytes::InPlace(frame)));
            }
            self.begin(declared);
            self.partial.extend_from_slice(data);
            *data = &[];
            return Ok(None);
        }
        if self.declared == 0 {
            let need = LENGTH_PREFIX - self.partial.len();
            let take = need.min(data.len());
            self.partial.extend_from_slice(&data[..take]);
            *data = &data[take..];
            if self.partial.len() < LENGTH_PREFIX {
                return Ok(None);
            }
            let declared = check_length(BigEndian::read_u32(&self.partial), max_frame)?;
            let prefix = std::mem::take(&mut self.partial);
            self.begin(declared);
            self.partial.extend_from_slice(&prefix);
        }
        let take = (self.declared - self.partial.len()).min(data.len());
        self.partial.extend_from_slice(&data[..take]);
        *data = &data[take..];
        check_version(&self.partial)?;
        if self.partial.len() < self.declared {
            return Ok(None);
        }
        self.declared = 0;
        Ok(Some(FrameBytes::Assembled(std::mem::take(
            &mut self.partial,
        ))))
    }

    /// Reserves the partial buffer once, at the frame's declared length.
    fn begin(&mut self, declared: usize) {
        self.declared = declared;
        self.partial = BytesMut::with_capacity(declared);
    }

    /// Drops a buffered partial frame (the connection is closing); returns its length.
    pub fn clear(&mut self) -> usize {
        let len = self.partial.len();
        *self = FrameReader::default();
        len
    }
}

/// The declared length, if it is a legal frame length.
pub(crate) fn check_length(declared: u32, max_frame: u32) -> Result<usize, DecodeError> {
    if (declared as usize) < HEADER_LEN {
        return Err(DecodeError::LengthTooSmall { declared });
    }
    if declared > max_frame {
        return Err(DecodeError::TooLarge {
            declared,
            max: max_frame,
        });
    }
    Ok(declared as usize)
}

/// Checks the version byte once it is in.
pub(crate) fn check_version(frame_start: &[u8]) -> Result<(), DecodeError> {
    match frame_start.get(offset::VERSION) {
        Some(&version) if version != VERSION => Err(DecodeError::BadVersion { version }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Frame, MessageId, UserId};
    use bytes::Bytes;

    fn encoded(payload_len: usize) -> Vec<u8> {
        let mut buf = BytesMut::new();
        Frame::send(
            MessageId(7),
            UserId(9),
            Bytes::from(vec![0xab; payload_len]),
        )
        .encode(&mut buf);
        buf.to_vec()
    }

    fn read_all(reader: &mut FrameReader, mut data: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(frame) = reader.next_frame(&mut data, 1 << 20).unwrap() {
            out.push(frame.as_slice().to_vec());
        }
        assert!(data.is_empty());
        out
    }

    #[test]
    fn whole_frames_are_borrowed_from_the_read_and_a_cut_one_is_assembled() {
        let mut stream = encoded(10);
        stream.extend(encoded(3));
        stream.extend(&encoded(100)[..50]);
        let mut reader = FrameReader::default();
        let mut data = &stream[..];
        let first = reader.next_frame(&mut data, 1024).unwrap().unwrap();
        assert!(
            matches!(first, FrameBytes::InPlace(bytes) if std::ptr::eq(bytes, &stream[..42])),
            "the read's own bytes, not a copy"
        );
        let second = reader.next_frame(&mut data, 1024).unwrap().unwrap();
        assert_eq!(second.as_slice(), &stream[42..77]);
        assert!(reader.next_frame(&mut data, 1024).unwrap().is_none());
        assert!(data.is_empty(), "the partial frame went into the reader");
        assert_eq!((reader.partial_len(), reader.held()), (50, 132));
        let rest = &encoded(100)[50..];
        let mut data = rest;
        let third = reader.next_frame(&mut data, 1024).unwrap().unwrap();
        assert!(matches!(&third, FrameBytes::Assembled(_)));
        assert_eq!(third.as_slice(), &encoded(100)[..]);
        assert_eq!(reader.held(), 0, "the assembled frame is the caller's now");
    }

    #[test]
    fn one_byte_at_a_time_reserves_once_at_the_declared_length() {
        let frame = encoded(5000);
        let mut reader = FrameReader::default();
        let mut frames = Vec::new();
        for (i, byte) in frame.iter().enumerate() {
            frames.extend(read_all(&mut reader, std::slice::from_ref(byte)));
            if (4..frame.len() - 1).contains(&i) {
                assert_eq!(reader.held(), frame.len(), "reserved once, never regrown");
            }
        }
        assert_eq!(frames, vec![frame]);
        assert_eq!(reader.held(), 0);
    }

    #[test]
    fn any_split_gives_the_same_frames() {
        let mut stream = encoded(0);
        stream.extend(encoded(70));
        stream.extend(encoded(1));
        let expected = read_all(&mut FrameReader::default(), &stream);
        assert_eq!(expected.len(), 3);
        for a in 0..stream.len() {
            for b in a..stream.len() {
                let mut reader = FrameReader::default();
                let mut got = read_all(&mut reader, &stream[..a]);
                got.extend(read_all(&mut reader, &stream[a..b]));
                got.extend(read_all(&mut reader, &stream[b..]));
                assert_eq!(got, expected, "split at {a} and {b}");
            }
        }
    }

    #[test]
    fn bad_lengths_and_versions_are_errors_before_anything_is_reserved() {
        let mut reader = FrameReader::default();
        let mut data: &[u8] = &[0, 0, 0, 5];
        assert_eq!(
            reader.next_frame(&mut data, 1024).unwrap_err(),
            DecodeError::LengthTooSmall { declared: 5 }
        );
        let mut reader = FrameReader::default();
        let mut data: &[u8] = &[0, 0, 0x10];
        assert!(reader.next_frame(&mut data, 1024).unwrap().is_none());
        let mut data: &[u8] = &[0];
        assert!(matches!(
            reader.next_frame(&mut data, 1024),
            Err(DecodeError::TooLarge { declared: 4096, .. })
        ));
        assert_eq!(reader.held(), 0);
        let mut reader = FrameReader::default();
        let mut data: &[u8] = &[0, 0, 0, 40, 2];
        assert_eq!(
            reader.next_frame(&mut data, 1024).unwrap_err(),
            DecodeError::BadVersion { version: 2 }
        );
    }
}
