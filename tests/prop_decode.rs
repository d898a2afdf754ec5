//! Property tests of the decoders: a byte stream split at any points decodes to the same
//! frames (binary) and gets the same answers (text mode, through the relay core), and no
//! input makes anything panic.
//!
//! `cargo test --test prop_decode`; `PROPTEST_CASES=100000` for a longer run.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use imrelay::proto::{decode_raw, text, Flags, Frame, FrameReader, MessageId, Opcode, UserId};
use imrelay::relay::{Config, Relay};
use proptest::prelude::*;

const MAX_FRAME: u32 = 4096;

/// A valid frame of any opcode byte and flags, with a payload up to 300 bytes.
fn any_frame() -> impl Strategy<Value = Vec<u8>> {
    (
        0u8..0x40,
        any::<u16>(),
        any::<u64>(),
        any::<u64>(),
        proptest::collection::vec(any::<u8>(), 0..300),
    )
        .prop_map(|(opcode, flags, msg, target, payload)| {
            let mut frame =
                Frame::new(Opcode::Send, MessageId(msg), UserId(target), payload.into())
                    .with_flags(Flags(flags))
                    .to_bytes()
                    .to_vec();
            frame[5] = opcode;
            frame
        })
}

/// Cuts `bytes` at the given points (taken modulo its length, sorted).
fn split<'a>(bytes: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    points.sort_unstable();
    let mut pieces = Vec::new();
    let mut at = 0;
    for p in points.into_iter().chain([bytes.len()]) {
        pieces.push(&bytes[at..p]);
        at = p;
    }
    pieces
}

/// Every frame the reader gets out of `pieces`, or the first error.
fn read_pieces(pieces: &[&[u8]]) -> Result<Vec<Vec<u8>>, imrelay::proto::DecodeError> {
    let mut reader = FrameReader::default();
    let mut frames = Vec::new();
    for piece in pieces {
        let mut data = *piece;
        while let Some(frame) = reader.next_frame(&mut data, MAX_FRAME)? {
            frames.push(frame.as_slice().to_vec());
        }
        assert!(data.is_empty(), "a piece is always used up");
    }
    Ok(frames)
}

/// A relay core with a text-mode client on connection 0 and a binary user 2 on
/// connection 1; returns both connections' output after feeding `pieces` to the first.
fn relay_answers(pieces: &[&[u8]]) -> (Vec<u8>, Vec<u8>) {
    let now = Instant::now();
    let config = Config {
        max_frame: MAX_FRAME,
        out_cap: 1 << 20,
        ..Config::default()
    };
    let local = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let mut relay = Relay::new(config, now, 0, 7);
    let typist = relay.handle_open(now, local).unwrap();
    let bob = relay.handle_open(now, local).unwrap();
    relay.handle_input(
        bob,
        &Frame::login(MessageId(1), UserId(2), b"").to_bytes(),
        now,
    );
    for piece in pieces {
        relay.handle_input(typist, piece, now);
    }
    let take = |relay: &mut Relay, id| {
        let mut out = Vec::new();
        if let Some(q) = relay.output(id) {
            let mut slices = [std::io::IoSlice::new(&[]); 4096];
            let n = q.chunks(&mut slices);
            for s in &slices[..n] {
                out.extend_from_slice(s);
            }
        }
        relay.handle_written(id, out.len());
        out
    };
    (take(&mut relay, typist), take(&mut relay, bob))
}

/// Text-mode input: a few known commands and random junk, with line ends.
fn text_stream() -> impl Strategy<Value = Vec<u8>> {
    let line = prop_oneof![
        Just(b"login 1".to_vec()),
        Just(b"send 2 hello there".to_vec()),
        Just(b"store 2 kept".to_vec()),
        Just(b"join 5".to_vec()),
        Just(b"room 5 hi all".to_vec()),
        Just(b"ping".to_vec()),
        Just(b"help".to_vec()),
        Just(b"sync".to_vec()),
        proptest::collection::vec(
            any::<u8>().prop_filter("no line end", |b| *b != b'\n'),
            0..80
        ),
    ];
    proptest::collection::vec(line, 1..12).prop_map(|lines| {
        let mut out = Vec::new();
        for l in lines {
            out.extend_from_slice(&l);
            out.push(b'\n');
        }
        out
    })
}

proptest! {
    #[test]
    fn binary_frames_split_anywhere_decode_the_same(
        frames in proptest::collection::vec(any_frame(), 1..8),
        cuts in proptest::collection::vec(any::<usize>(), 0..12),
    ) {
        let stream: Vec<u8> = frames.concat();
        let got = read_pieces(&split(&stream, &cuts)).expect("valid frames decode");
        prop_assert_eq!(&got, &frames);
        // The buffer decoder the SDK uses agrees.
        let mut buf = BytesMut::from(&stream[..]);
        let mut whole = Vec::new();
        while let Some(raw) = decode_raw(&mut buf, MAX_FRAME).unwrap() {
            whole.push(raw.to_vec());
        }
        prop_assert_eq!(whole, frames);
    }

    #[test]
    fn any_bytes_split_anywhere_give_the_same_frames_or_error_and_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..600),
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
    ) {
        let whole = read_pieces(&[&bytes]);
        let pieces = read_pieces(&split(&bytes, &cuts));
        match (whole, pieces) {
            (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
            (Err(a), Err(b)) => prop_assert_eq!(a, b),
            (a, b) => prop_assert!(false, "whole {a:?} vs split {b:?}"),
        }
    }

    #[test]
    fn text_lines_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let mut ids = 0;
        let _ = text::parse_line(&bytes, &mut ids);
        let _ = text::render(&Bytes::from(bytes));
    }

    #[test]
    fn a_text_stream_split_anywhere_gets_the_same_answers(
        stream in text_stream(),
        cuts in proptest::collection::vec(any::<usize>(), 0..10),
    ) {
        let whole = relay_answers(&[&stream]);
        let pieces = relay_answers(&split(&stream, &cuts));
        prop_assert_eq!(whole, pieces);
    }

    #[test]
    fn any_first_bytes_split_anywhere_never_panic_the_relay(
        bytes in proptest::collection::vec(any::<u8>(), 0..400),
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
    ) {
        let whole = relay_answers(&[&bytes]);
        let pieces = relay_answers(&split(&bytes, &cuts));
        // Binary, text or HTTP: the answers do not depend on how the bytes were cut.
        prop_assert_eq!(whole, pieces);
    }
}
