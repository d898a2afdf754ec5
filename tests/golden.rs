//! protocol.md's hex test vectors, checked byte for byte against the codec: each frame the
//! spec describes must encode to exactly the bytes printed there and decode back to itself,
//! the bad-input vectors must get the answer the spec gives (from the decoder, or from the
//! relay core in memory), and every opcode and error code must be in the spec's tables.

use std::collections::BTreeMap;
use std::io::IoSlice;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use imrelay::proto::decode::decode_frame;
use imrelay::proto::frame::{write_ack, write_error, write_frame};
use imrelay::proto::{
    decode_raw, DecodeError, ErrorCode, Flags, Frame, HeartbeatBounds, InboxState, LoginOk,
    MessageId, Opcode, RoomId, RoomState, UserId, DEFAULT_MAX_FRAME,
};
use imrelay::relay::{Config, Relay, State};
use imrelay::ConnId;

fn spec() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/protocol.md");
    std::fs::read_to_string(path).expect("protocol.md is at the top of the repository")
}

/// Every ```hex NAME block of protocol.md, decoded to bytes.
fn vectors() -> BTreeMap<String, Vec<u8>> {
    let text = spec();
    let mut out = BTreeMap::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let Some(name) = line.strip_prefix("```hex ") else {
            continue;
        };
        let mut bytes = Vec::new();
        for body in lines.by_ref() {
            if body.starts_with("```") {
                break;
            }
            for pair in body.split_whitespace() {
                bytes.push(u8::from_str_radix(pair, 16).expect("two-digit hex"));
            }
        }
        let previous = out.insert(name.trim().to_string(), bytes);
        assert!(previous.is_none(), "vector {name} appears twice");
    }
    out
}

fn encode(write: impl FnOnce(&mut BytesMut)) -> Vec<u8> {
    let mut buf = BytesMut::new();
    write(&mut buf);
    buf.to_vec()
}

/// INBOX_STATE for user 1002 (msg_id 7, epoch 0xcafe0001): 6 to 7 held, `expired_upto`.
fn inbox_6_to_7(flags: Flags, expired_upto: u64) -> Vec<u8> {
    let state = InboxState {
        epoch: 0xcafe_0001,
        first_seq: 6,
        last_seq: 7,
        expired_upto,
    };
    encode(|b| {
        write_frame(
            b,
            Opcode::InboxState,
            flags,
            MessageId(7),
            UserId(1002),
            UserId::NONE,
            &state.to_bytes(),
        )
    })
}

/// INBOX_DELIVER of "hi bob" from 1001 to 1002 (msg_id 2), sequence number `seq`, stored
/// at Unix time 1,700,000,000,000 ms.
fn hi_bob_stored(seq: u64) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&1_700_000_000_000u64.to_be_bytes());
    p.extend_from_slice(b"hi bob");
    encode(|b| {
        write_frame(
            b,
            Opcode::InboxDeliver,
            Flags::EMPTY,
            MessageId(2),
            UserId(1002),
            UserId(1001),
            &p,
        )
    })
}

/// The frames protocol.md describes in prose, built with the crate's own API.
fn expected_frames() -> Vec<(&'static str, Vec<u8>)> {
    let hi_bob = || Bytes::from_static(b"hi bob");
    let limits = LoginOk {
        max_frame: 65536,
        ping_interval_ms: 30_000,
        idle_timeout_ms: 90_000,
        out_cap: 1_048_576,
        heartbeat: None,
    };
    let room = RoomId(42);
    let none = UserId::NONE;
    vec![
        (
            "LOGIN",
            Frame::login(MessageId(1), UserId(1001), b"secret")
                .to_bytes()
                .to_vec(),
        ),
        (
            "LOGIN_DEVICE",
            Frame::login_device(MessageId(1), UserId(1001), "phone", b"secret")
                .to_bytes()
                .to_vec(),
        ),
        (
            "LOGIN_HEARTBEAT",
            Frame::login(MessageId(1), UserId(1001), b"secret")
                .with_flags(Flags::HEARTBEAT)
                .to_bytes()
                .to_vec(),
        ),
        (
            "LOGIN_OK_HEARTBEAT",
            encode(|b| {
                let p = LoginOk {
                    heartbeat: Some(HeartbeatBounds {
                        min_ms: 10_000,
                        max_ms: 30_000,
                    }),
                    ..limits
                }
                .to_bytes();
                write_frame(
                    b,
                    Opcode::LoginOk,
                    Flags::EMPTY,
                    MessageId(1),
                    UserId(1001),
                    UserId::NONE,
                    &p,
                )
            }),
        ),
        (
            "LOGIN_OK",
            encode(|b| {
                let p = limits.to_bytes();
                write_frame(
                    b,
                    Opcode::LoginOk,
                    Flags::EMPTY,
                    MessageId(1),
                    UserId(1001),
                    none,
                    &p,
                )
            }),
        ),
        (
            "SEND",
            Frame::send(MessageId(2), UserId(1002), hi_bob())
                .to_bytes()
                .to_vec(),
        ),
        (
            "SEND_NO_ACK",
            Frame::send(MessageId(3), UserId(1002), hi_bob())
                .with_flags(Flags::NO_ACK)
                .to_bytes()
                .to_vec(),
        ),
        (
            "SEND_DEDUP",
            Frame::send(MessageId(0x8c3f_1a2e_0000_0001), UserId(1002), hi_bob())
                .with_flags(Flags::DEDUP)
                .to_bytes()
                .to_vec(),
        ),
        (
            "DELIVER",
            Frame::new(Opcode::Deliver, MessageId(2), UserId(1002), hi_bob())
                .with_source(UserId(1001))
                .to_bytes()
                .to_vec(),
        ),
        (
            "ACK",
            encode(|b| write_ack(b, MessageId(2), UserId(1002), 1)),
        ),
        (
            "ERROR",
            encode(|b| {
                write_error(
                    b,
                    MessageId(4),
                    UserId(1003),
                    ErrorCode::RecipientOffline,
                    "user 1003 is not connected",
                )
            }),
        ),
        (
            "PING",
            Frame::ping(MessageId(5), Bytes::from_static(b"t=1"))
                .to_bytes()
                .to_vec(),
        ),
        (
            "PONG",
            Frame::pong(MessageId(5), Bytes::from_static(b"t=1"))
                .to_bytes()
                .to_vec(),
        ),
        ("BYE", Frame::bye(MessageId(6)).to_bytes().to_vec()),
        ("JOIN", Frame::join(MessageId(7), room).to_bytes().to_vec()),
        (
            "LEAVE",
            Frame::leave(MessageId(8), room).to_bytes().to_vec(),
        ),
        (
            "ROOM_INFO",
            Frame::room_info(MessageId(9), room).to_bytes().to_vec(),
        ),
        (
            "ROOM_STATE",
            encode(|b| {
                let p = RoomState {
                    members: 1000,
                    is_member: true,
                }
                .to_bytes();
                write_frame(
                    b,
                    Opcode::RoomState,
                    Flags::EMPTY,
                    MessageId(7),
                    UserId(42),
                    none,
                    &p,
                )
            }),
        ),
        (
            "ROOM_SEND",
            Frame::room_send(MessageId(10), room, Bytes::from_static(b"666"))
                .to_bytes()
                .to_vec(),
        ),
        (
            "ROOM_DELIVER",
            Frame::new(
                Opcode::RoomDeliver,
                MessageId(10),
                UserId(42),
                Bytes::from_static(b"666"),
            )
            .with_source(UserId(1001))
            .to_bytes()
            .to_vec(),
        ),
        (
            "BROADCAST",
            Frame::broadcast(MessageId(11), Bytes::from_static(b"maintenance at 03:00"))
                .to_bytes()
                .to_vec(),
        ),
        (
            "SEND_STORED",
            Frame::send(MessageId(2), UserId(1002), hi_bob())
                .with_flags(Flags::DEDUP.union(Flags::STORED))
                .to_bytes()
                .to_vec(),
        ),
        (
            "INBOX_SYNC",
            Frame::inbox_sync(MessageId(7), 0xcafe_0001, 4)
                .to_bytes()
                .to_vec(),
        ),
        ("INBOX_STATE", inbox_6_to_7(Flags::EMPTY, 5)),
        ("INBOX_STATE_NEW_DEVICE", inbox_6_to_7(Flags::NEW_DEVICE, 0)),
        ("INBOX_DELIVER_COPY", hi_bob_stored(9)),
        ("INBOX_DELIVER", hi_bob_stored(6)),
        (
            "INBOX_ACK",
            Frame::inbox_ack(MessageId(8), 7).to_bytes().to_vec(),
        ),
        (
            "REFRESH",
            Frame::refresh(MessageId(21), b"a.b.c").to_bytes().to_vec(),
        ),
        (
            "TOKEN_EXPIRING",
            encode(|b| {
                let p = 1_700_003_600u64.to_be_bytes();
                write_frame(
                    b,
                    Opcode::TokenExpiring,
                    Flags::EMPTY,
                    MessageId(0),
                    UserId(1001),
                    none,
                    &p,
                )
            }),
        ),
        (
            "REFRESH_OK",
            encode(|b| {
                let p = 1_700_007_200u64.to_be_bytes();
                write_frame(
                    b,
                    Opcode::RefreshOk,
                    Flags::EMPTY,
                    MessageId(21),
                    UserId(1001),
                    none,
                    &p,
                )
            }),
        ),
        (
            "ROOM_MISSED",
            encode(|b| {
                let p = 17u64.to_be_bytes();
                write_frame(
                    b,
                    Opcode::RoomMissed,
                    Flags::EMPTY,
                    MessageId(0),
                    UserId(42),
                    none,
                    &p,
                )
            }),
        ),
    ]
}

/// The bad-input vectors and what the decoder must say about them.
fn expected_errors() -> Vec<(&'static str, DecodeError)> {
    vec![
        ("BAD_LENGTH", DecodeError::LengthTooSmall { declared: 16 }),
        (
            "TOO_LARGE",
            DecodeError::TooLarge {
                declared: 0x0010_0001,
                max: DEFAULT_MAX_FRAME,
            },
        ),
        ("BAD_VERSION", DecodeError::BadVersion { version: 2 }),
    ]
}

#[test]
fn every_frame_vector_matches_the_encoder_and_decodes_back() {
    let vectors = vectors();
    for (name, encoded) in expected_frames() {
        let spec_bytes = vectors
            .get(name)
            .unwrap_or_else(|| panic!("protocol.md has no ```hex {name} block"));
        assert_eq!(
            &encoded, spec_bytes,
            "vector {name} differs from the encoder"
        );

        let mut buf = BytesMut::from(&spec_bytes[..]);
        let frame = decode_frame(&mut buf, DEFAULT_MAX_FRAME)
            .expect("decodes")
            .expect("complete")
            .expect("known opcode");
        assert!(buf.is_empty(), "{name}: one frame exactly");
        assert_eq!(frame.to_bytes().to_vec(), *spec_bytes, "{name} round trip");

        // Any prefix is an incomplete frame, not an error.
        for cut in 0..spec_bytes.len() {
            let mut partial = BytesMut::from(&spec_bytes[..cut]);
            assert!(
                decode_raw(&mut partial, DEFAULT_MAX_FRAME)
                    .unwrap()
                    .is_none(),
                "{name}: {cut}-byte prefix"
            );
        }
    }
}

#[test]
fn payload_accessors_read_the_vectors() {
    let vectors = vectors();
    let decode = |name: &str| {
        let mut buf = BytesMut::from(&vectors[name][..]);
        decode_frame(&mut buf, DEFAULT_MAX_FRAME)
            .unwrap()
            .unwrap()
            .unwrap()
    };
    assert_eq!(
        decode("LOGIN_OK").login_ok().unwrap().idle_timeout_ms,
        90_000
    );
    assert_eq!(decode("ACK").ack_count(), Some(1));
    let error = decode("ERROR");
    assert_eq!(error.error_code(), Some(ErrorCode::RecipientOffline));
    assert_eq!(error.error().unwrap().1, "user 1003 is not connected");
    assert_eq!(decode("ROOM_STATE").room_state().unwrap().members, 1000);
    assert_eq!(decode("ROOM_MISSED").room_missed(), Some(17));
    assert_eq!(decode("DELIVER").source, UserId(1001));
}

#[test]
fn bad_input_vectors_give_the_documented_decoder_errors() {
    let vectors = vectors();
    for (name, expected) in expected_errors() {
        let mut buf = BytesMut::from(&vectors[name][..]);
        assert_eq!(
            decode_raw(&mut buf, DEFAULT_MAX_FRAME).unwrap_err(),
            expected,
            "{name}"
        );
    }
    let mut buf = BytesMut::from(&vectors["UNKNOWN_OPCODE"][..]);
    let decoded = decode_frame(&mut buf, DEFAULT_MAX_FRAME).unwrap().unwrap();
    assert_eq!(
        decoded,
        Err(0x7f),
        "skipped as an unknown opcode, not a framing error"
    );
    assert!(buf.is_empty());
}

/// The bad-input vectors of well-formed frames the relay refuses with an ERROR while the
/// connection stays open: the frame built with the crate's API, the code, and whether the
/// rule holds before LOGIN too.
fn expected_refusals() -> Vec<(&'static str, Frame, ErrorCode, bool)> {
    let mut join = Frame::join(MessageId(15), RoomId(42));
    join.payload = Bytes::from_static(b"x");
    vec![
        (
            "PING_RESERVED_FLAG",
            Frame::ping(MessageId(13), Bytes::from_static(b"t=1")).with_flags(Flags(0x0008)),
            ErrorCode::InvalidField,
            true,
        ),
        (
            "BYE_WITH_SOURCE",
            Frame::bye(MessageId(14)).with_source(UserId(5)),
            ErrorCode::InvalidField,
            true,
        ),
        ("JOIN_WITH_PAYLOAD", join, ErrorCode::InvalidField, false),
    ]
}

/// A relay core in memory and one connection to it (logged in as 1001 if `login`).
fn relay_with_connection(login: bool) -> (Relay, ConnId, Instant) {
    let now = Instant::now();
    let mut relay = Relay::new(Config::default(), now, 1_700_000_000_000, 7);
    let id = relay
        .handle_open(now, IpAddr::V4(Ipv4Addr::LOCALHOST))
        .expect("accepted");
    if login {
        let ok = exchange(
            &mut relay,
            id,
            now,
            &Frame::login(MessageId(1), UserId(1001), b"").to_bytes(),
        );
        assert_eq!(ok[0].opcode, Opcode::LoginOk);
    }
    (relay, id, now)
}

/// Feeds `bytes` to the relay and returns what it queued for the connection.
fn exchange(relay: &mut Relay, id: ConnId, now: Instant, bytes: &[u8]) -> Vec<Frame> {
    relay.handle_input(id, bytes, now);
    let mut out = Vec::new();
    if let Some(queue) = relay.output(id) {
        let mut slices = [IoSlice::new(&[]); 64];
        let n = queue.chunks(&mut slices);
        for s in &slices[..n] {
            out.extend_from_slice(s);
        }
    }
    relay.handle_written(id, out.len());
    let mut buf = BytesMut::from(&out[..]);
    let mut frames = Vec::new();
    while let Some(frame) = decode_frame(&mut buf, u32::MAX).expect("relay framing") {
        frames.push(frame.expect("known opcode"));
    }
    frames
}

#[test]
fn refused_frame_vectors_get_their_error_and_the_connection_stays() {
    let vectors = vectors();
    for (name, frame, code, before_login) in expected_refusals() {
        let spec_bytes = vectors
            .get(name)
            .unwrap_or_else(|| panic!("protocol.md has no ```hex {name} block"));
        assert_eq!(
            frame.to_bytes().to_vec(),
            *spec_bytes,
            "vector {name} differs from the encoder"
        );
        let mut buf = BytesMut::from(&spec_bytes[..]);
        let decoded = decode_frame(&mut buf, DEFAULT_MAX_FRAME)
            .expect("decodes")
            .expect("complete")
            .expect("known opcode");
        assert!(buf.is_empty(), "{name}: one frame exactly");
        assert_eq!(decoded, frame, "{name} round trip");

        let logins: &[bool] = if before_login {
            &[false, true]
        } else {
            &[true]
        };
        for &login in logins {
            let (mut relay, id, now) = relay_with_connection(login);
            let answer = exchange(&mut relay, id, now, spec_bytes);
            assert_eq!(answer.len(), 1, "{name}: only the ERROR: {answer:?}");
            assert_eq!(answer[0].error_code(), Some(code), "{name}");
            assert_eq!(answer[0].msg_id, frame.msg_id, "{name}");
            assert_ne!(relay.state(id), Some(State::Closing), "{name}");
            assert_eq!(relay.room_members(RoomId(42)), 0, "{name}");
            let ping = Frame::ping(MessageId(99), Bytes::new()).to_bytes();
            let pong = exchange(&mut relay, id, now, &ping);
            assert_eq!(pong, [Frame::pong(MessageId(99), Bytes::new())], "{name}");
        }
    }
}

#[test]
fn protocol_md_has_no_vector_the_tests_do_not_check() {
    let mut known: Vec<&str> = expected_frames().iter().map(|(n, _)| *n).collect();
    known.extend(expected_errors().iter().map(|(n, _)| *n));
    known.extend(expected_refusals().iter().map(|(n, ..)| *n));
    known.push("UNKNOWN_OPCODE");
    // Checked by the core's WebSocket tests (src/relay/tests/ws.rs).
    known.push("WS_PONG_MESSAGE");
    for name in vectors().keys() {
        assert!(known.contains(&name.as_str()), "unchecked vector {name}");
    }
}

#[test]
fn every_opcode_and_error_code_is_in_the_tables() {
    let text = spec();
    for op in Opcode::ALL {
        let row = format!("| `0x{:02x}` | `{}`", op as u8, op.name());
        assert!(text.contains(&row), "opcode table lacks {row}");
    }
    for code in ErrorCode::ALL {
        let (number, name) = ((code as u16).to_string(), format!("`{}`", code.name()));
        let found = text.lines().any(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            cells.len() > 3 && cells[1] == number && cells[2] == name
        });
        assert!(found, "error table lacks {number} {name}");
    }
}
