//! protocol.md section 6.1, the order of checks for a frame from a client: for each pair
//! of adjacent rows, a frame that fails both gets the earlier row's answer. Then the rules
//! protocol.md states for what a client written from it alone had to guess (issue 16).
//!
//! Several checks answer the same code (INVALID_FIELD); which one fired is told by the
//! ERROR's reason, which is for humans but fixed enough to test here.

use bytes::Bytes;

use super::Harness;
use crate::proto::{ErrorCode, Flags, Frame, MessageId, Opcode, RoomId, UserId};
use crate::relay::{Config, Relay, State, StoreOp};
use crate::ConnId;

const RESERVED: Flags = Flags(0x0008);
const ROOM: RoomId = RoomId(42);

/// Sends `frame` and expects exactly one ERROR answering it; returns (code, reason).
fn refused(h: &mut Harness, id: ConnId, frame: Frame) -> (ErrorCode, String) {
    let msg_id = frame.msg_id;
    h.send_frame(id, frame);
    let frames = h.take_frames(id);
    assert_eq!(frames.len(), 1, "one answer: {frames:?}");
    assert_eq!(frames[0].msg_id, msg_id, "the ERROR answers the frame");
    let code = frames[0].error_code().expect("an ERROR with a v1 code");
    (code, frames[0].error().expect("an ERROR").1)
}

/// A frame's bytes with the version and opcode bytes replaced (header fields the API
/// will not build wrong).
fn raw(frame: Frame, version: u8, opcode: u8) -> Vec<u8> {
    let mut bytes = frame.to_bytes().to_vec();
    bytes[4] = version;
    bytes[5] = opcode;
    bytes
}

fn with_payload(mut frame: Frame, payload: &'static [u8]) -> Frame {
    frame.payload = Bytes::from_static(payload);
    frame
}

fn send(msg: u64, to: u64) -> Frame {
    Frame::send(MessageId(msg), UserId(to), Bytes::from_static(b"x"))
}

fn joined(h: &mut Harness, id: ConnId, room: RoomId) {
    h.send_frame(id, Frame::join(MessageId(99), room));
    assert_eq!(h.take_frames(id)[0].opcode, Opcode::RoomState);
}

#[test]
fn rows_1_2_the_length_comes_before_the_version() {
    for (bytes, code) in [
        // Length 16 (below the header) and version 2.
        (
            vec![0, 0, 0, 0x10, 2, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            ErrorCode::Malformed,
        ),
        // Length past the max frame and version 2.
        (vec![0, 0x10, 0, 1, 2, 7], ErrorCode::FrameTooLarge),
    ] {
        let mut h = Harness::new(Config::default());
        let c = h.open();
        h.feed(c, &bytes);
        h.expect_error(c, code);
        assert_eq!(h.relay.state(c), Some(State::Closing));
    }
}

#[test]
fn rows_2_3_the_version_comes_before_the_opcode() {
    let mut h = Harness::new(Config::default());
    let c = h.open();
    h.feed(c, &raw(send(1, 2), 2, 0x7f));
    h.expect_error(c, ErrorCode::UnsupportedVersion);
    assert_eq!(h.relay.state(c), Some(State::Closing));
}

#[test]
fn rows_3_4_an_unknown_opcode_comes_before_every_later_check() {
    // Direction applies to known opcodes only; an unknown one is answered UNKNOWN_OPCODE
    // whatever else is wrong with it (not logged in, source, flags, target 0).
    let mut h = Harness::new(Config::default());
    let c = h.open();
    let frame = send(5, 0).with_source(UserId(9)).with_flags(Flags(0xffff));
    h.feed(c, &raw(frame, 1, 0x7f));
    let err = h.expect_error(c, ErrorCode::UnknownOpcode);
    assert_eq!(err.msg_id, MessageId(5));
    assert_eq!(h.relay.state(c), Some(State::AwaitingLogin), "stays open");
}

#[test]
fn rows_4_5_a_relay_only_opcode_is_invalid_even_before_login() {
    let mut h = Harness::new(Config::default());
    let c = h.open();
    for op in [
        Opcode::LoginOk,
        Opcode::Deliver,
        Opcode::Ack,
        Opcode::Error,
        Opcode::RoomDeliver,
        Opcode::RoomState,
        Opcode::RoomMissed,
        Opcode::InboxState,
        Opcode::InboxDeliver,
    ] {
        let frame = Frame::new(op, MessageId(3), UserId(2), Bytes::new()).with_source(UserId(7));
        let (code, reason) = refused(&mut h, c, frame);
        assert_eq!(code, ErrorCode::InvalidField, "{op:?}");
        assert!(reason.contains("sent only by the relay"), "{reason}");
    }
    assert_eq!(h.relay.state(c), Some(State::AwaitingLogin));
}

#[test]
fn rows_5_6_the_login_state_comes_before_the_source() {
    let mut h = Harness::new(Config::default());
    let c = h.open();
    // Issue 16's example: SEND to target 0 before login.
    for frame in [
        send(1, 2).with_source(UserId(5)),
        send(2, 0),
        Frame::join(MessageId(3), ROOM).with_source(UserId(5)),
        Frame::inbox_sync(MessageId(4), 0, 0).with_source(UserId(5)),
        Frame::inbox_ack(MessageId(5), 1).with_source(UserId(5)),
        Frame::broadcast(MessageId(6), Bytes::new()).with_source(UserId(5)),
    ] {
        assert_eq!(refused(&mut h, c, frame).0, ErrorCode::NotLoggedIn);
    }
    // LOGIN's login-state check is the other way round.
    let alice = h.login(1);
    let login = Frame::login(MessageId(7), UserId(0), b"").with_source(UserId(5));
    assert_eq!(refused(&mut h, alice, login).0, ErrorCode::AlreadyLoggedIn);
}

#[test]
fn rows_6_7_the_source_comes_before_the_flags() {
    let mut h = Harness::new(Config::default());
    let newcomer = h.open();
    let alice = h.login(1);
    let cases = [
        (newcomer, Frame::ping(MessageId(1), Bytes::new())),
        (newcomer, Frame::pong(MessageId(2), Bytes::new())),
        (newcomer, Frame::bye(MessageId(3))),
        (newcomer, Frame::login(MessageId(4), UserId(3), b"")),
        (alice, send(5, 2)),
        (alice, Frame::join(MessageId(6), ROOM)),
        (alice, Frame::inbox_ack(MessageId(7), 1)),
    ];
    for (id, frame) in cases {
        let frame = frame.with_source(UserId(5)).with_flags(RESERVED);
        let (code, reason) = refused(&mut h, id, frame);
        assert_eq!(code, ErrorCode::InvalidField);
        assert!(reason.contains("source must be 0"), "{reason}");
    }
    assert_eq!(h.relay.state(newcomer), Some(State::AwaitingLogin));
}

#[test]
fn rows_7_8_the_flags_come_before_the_ids() {
    let mut h = Harness::new(Config {
        admins: vec![UserId(1)],
        ..Config::default()
    });
    let newcomer = h.open();
    let alice = h.login(1);
    let cases = [
        (
            newcomer,
            Frame::login(MessageId(1), UserId(0), b""),
            Flags::NO_ACK,
        ),
        (alice, send(2, 0), RESERVED),
        // DEDUP with msg_id 0 is the ids row; a reserved bit beside it wins.
        (alice, send(0, 2), Flags(Flags::DEDUP.0 | 0x0100)),
        (alice, Frame::join(MessageId(3), RoomId(0)), Flags::NO_ACK),
        (
            alice,
            Frame::new(Opcode::Broadcast, MessageId(4), UserId(5), Bytes::new()),
            Flags::DEDUP,
        ),
        (
            alice,
            Frame::new(Opcode::InboxSync, MessageId(5), UserId(5), Bytes::new()),
            Flags::NO_ACK,
        ),
    ];
    for (id, frame, flags) in cases {
        let (code, reason) = refused(&mut h, id, frame.with_flags(flags));
        assert_eq!(code, ErrorCode::InvalidField);
        assert!(reason.contains("not allowed on"), "{reason}");
    }
}

#[test]
fn rows_8_9_the_ids_come_before_the_payload_size() {
    let mut h = Harness::new(Config::default());
    let alice = h.login(1);
    let join = with_payload(Frame::join(MessageId(1), RoomId(0)), b"lobby");
    let (code, reason) = refused(&mut h, alice, join);
    assert_eq!(code, ErrorCode::InvalidField);
    assert!(reason.contains("target id 0"), "{reason}");

    let ack = Frame::new(
        Opcode::InboxAck,
        MessageId(2),
        UserId(5),
        Bytes::from_static(b"abc"),
    );
    let (code, reason) = refused(&mut h, alice, ack);
    assert_eq!(code, ErrorCode::InvalidField);
    assert!(reason.contains("takes target 0"), "{reason}");

    // A STORED SEND too large for its INBOX_DELIVER, to user 0 or with DEDUP and msg_id
    // 0: INVALID_FIELD, not FRAME_TOO_LARGE.
    let big = Bytes::from(vec![0u8; 65_536 - 32 - 8]);
    for (msg, to, flags) in [
        (3, 0, Flags::STORED),
        (0, 2, Flags::STORED.union(Flags::DEDUP)),
    ] {
        let frame = Frame::send(MessageId(msg), UserId(to), big.clone()).with_flags(flags);
        assert_eq!(refused(&mut h, alice, frame).0, ErrorCode::InvalidField);
    }
}

#[test]
fn rows_9_10_11_the_payload_size_comes_before_permissions_and_limits() {
    // No opcode has both a payload-size rule and a membership or permission check, so the
    // payload size is shown to win over the limits that follow on the same opcodes.
    let mut h = Harness::new(Config {
        max_rooms_per_connection: 1,
        inbox_max_messages: 1,
        ..Config::default()
    });
    let alice = h.login(1);
    joined(&mut h, alice, RoomId(1));
    let join = with_payload(Frame::join(MessageId(1), RoomId(2)), b"x");
    let (code, reason) = refused(&mut h, alice, join);
    assert_eq!(code, ErrorCode::InvalidField);
    assert!(reason.contains("takes no payload"), "{reason}");
    h.send_frame(alice, Frame::join(MessageId(2), RoomId(2)));
    h.expect_error(alice, ErrorCode::LimitReached);

    // The inbox of 2 is full: an oversized STORED SEND is still FRAME_TOO_LARGE.
    h.send_frame(alice, send(3, 2).with_flags(Flags::STORED));
    assert_eq!(h.take_frames(alice)[0].ack_count(), Some(0));
    let big = Bytes::from(vec![0u8; 65_536 - 32 - 8]);
    let frame = Frame::send(MessageId(4), UserId(2), big).with_flags(Flags::STORED);
    assert_eq!(refused(&mut h, alice, frame).0, ErrorCode::FrameTooLarge);
    h.send_frame(alice, send(5, 2).with_flags(Flags::STORED));
    h.expect_error(alice, ErrorCode::InboxFull);
    assert_eq!(h.relay.state(alice), Some(State::Active(UserId(1))));
}

#[test]
fn rows_10_11_membership_and_permission_come_before_the_rate() {
    let mut h = Harness::new(Config {
        room_send_rate: 1,
        room_send_burst: 1,
        ..Config::default()
    });
    let alice = h.login(1);
    joined(&mut h, alice, ROOM);
    let room_send = |msg| Frame::room_send(MessageId(msg), ROOM, Bytes::from_static(b"x"));
    h.send_frame(alice, room_send(1));
    assert_eq!(h.take_frames(alice)[0].opcode, Opcode::Ack, "the one token");
    let elsewhere = Frame::room_send(MessageId(2), RoomId(7), Bytes::new());
    assert_eq!(refused(&mut h, alice, elsewhere).0, ErrorCode::NotInRoom);
    let broadcast = Frame::broadcast(MessageId(3), Bytes::new());
    assert_eq!(refused(&mut h, alice, broadcast).0, ErrorCode::Forbidden);
    assert_eq!(
        refused(&mut h, alice, room_send(4)).0,
        ErrorCode::RateLimited,
        "the bucket was empty all along"
    );
    // Issue 16's example: ROOM_SEND with DEDUP from a non-member is a flags error.
    let dedup = Frame::room_send(MessageId(5), RoomId(7), Bytes::new()).with_flags(Flags::DEDUP);
    assert_eq!(refused(&mut h, alice, dedup).0, ErrorCode::InvalidField);
}

#[test]
fn within_the_last_row_the_documented_order_holds() {
    // Per-connection room rate before the room's total rate.
    let mut h = Harness::new(Config {
        room_send_rate: 1,
        room_send_burst: 1,
        room_total_rate: 1,
        room_total_burst: 1,
        ..Config::default()
    });
    let a = h.login(1);
    let b = h.login(2);
    joined(&mut h, a, ROOM);
    joined(&mut h, b, ROOM);
    let room_send = |msg| Frame::room_send(MessageId(msg), ROOM, Bytes::from_static(b"x"));
    h.send_frame(a, room_send(1));
    assert_eq!(h.take_frames(a)[0].opcode, Opcode::Ack);
    h.take_frames(b);
    let (_, reason) = refused(&mut h, a, room_send(2));
    assert!(reason.starts_with("over 1 room messages"), "{reason}");
    let (_, reason) = refused(&mut h, b, room_send(3));
    assert!(reason.contains("from all its members"), "{reason}");

    // JOIN: rooms per connection before members per room.
    let mut h = Harness::new(Config {
        max_rooms_per_connection: 1,
        max_members_per_room: 1,
        ..Config::default()
    });
    let a = h.login(1);
    let b = h.login(2);
    joined(&mut h, a, ROOM);
    joined(&mut h, b, RoomId(7));
    let (code, reason) = refused(&mut h, b, Frame::join(MessageId(1), ROOM));
    assert_eq!(code, ErrorCode::LimitReached);
    assert!(reason.contains("max rooms per connection"), "{reason}");

    // SEND: a remembered DEDUP resend is ACKed before the delivery checks.
    let mut h = Harness::new(Config::default());
    let alice = h.login(1);
    let bob = h.login(2);
    let dedup = || send(7, 2).with_flags(Flags::DEDUP);
    h.send_frame(alice, dedup());
    assert_eq!(h.take_frames(alice)[0].ack_count(), Some(1));
    h.relay.handle_closed(bob);
    h.send_frame(alice, dedup());
    assert_eq!(h.take_frames(alice)[0].ack_count(), Some(1), "not OFFLINE");
    h.send_frame(alice, send(8, 2).with_flags(Flags::DEDUP));
    h.expect_error(alice, ErrorCode::RecipientOffline);

    // STORED SEND: STORE_FAILED before INBOX_FULL.
    let mut h = Harness::new(Config {
        inbox_max_messages: 1,
        ..Config::default()
    });
    h.relay.restore(vec![StoreOp::Epoch(5)]);
    let alice = h.login(1);
    h.send_frame(alice, send(1, 2).with_flags(Flags::STORED));
    let mut ops = Vec::new();
    let commit = h.relay.take_commit(&mut ops).unwrap();
    h.relay.handle_store_committed(commit, Ok(()));
    assert_eq!(h.take_frames(alice)[0].opcode, Opcode::Ack);
    h.send_frame(alice, send(2, 2).with_flags(Flags::STORED));
    h.expect_error(alice, ErrorCode::InboxFull);
    h.send_frame(alice, send(3, 3).with_flags(Flags::STORED));
    let commit = h.relay.take_commit(&mut ops).unwrap();
    h.relay
        .handle_store_committed(commit, Err("disk full".into()));
    h.expect_error(alice, ErrorCode::StoreFailed);
    h.send_frame(alice, send(4, 2).with_flags(Flags::STORED));
    h.expect_error(alice, ErrorCode::StoreFailed);
}

// ---- PING, PONG and BYE (issue 16's mismatch) -------------------------------------------

#[test]
fn ping_pong_and_bye_are_checked_for_source_and_flags_before_and_after_login() {
    let mut h = Harness::new(Config::default());
    let newcomer = h.open();
    let alice = h.login(1);
    for id in [newcomer, alice] {
        for (flags, source) in [
            (RESERVED, UserId::NONE),
            (Flags::NO_ACK, UserId::NONE),
            (Flags::EMPTY, UserId(5)),
        ] {
            for frame in [
                Frame::ping(MessageId(1), Bytes::from_static(b"p")),
                Frame::pong(MessageId(2), Bytes::new()),
                Frame::bye(MessageId(3)),
            ] {
                let op = frame.opcode;
                let frame = frame.with_flags(flags).with_source(source);
                let (code, _) = refused(&mut h, id, frame);
                assert_eq!(code, ErrorCode::InvalidField, "{op:?} {flags:?} {source}");
            }
        }
        // A BYE with a payload is refused too; none of these closed the connection.
        let bye = with_payload(Frame::bye(MessageId(4)), b"ciao");
        assert_eq!(refused(&mut h, id, bye).0, ErrorCode::InvalidField);
        assert_ne!(h.relay.state(id), Some(State::Closing));
        // The target is not checked: a PING about user 7 gets a PONG with target 0.
        let ping = Frame::new(Opcode::Ping, MessageId(5), UserId(7), Bytes::new());
        h.send_frame(id, ping);
        assert_eq!(
            h.take_frames(id),
            vec![Frame::pong(MessageId(5), Bytes::new())]
        );
        h.send_frame(id, Frame::bye(MessageId(6)));
        assert_eq!(h.take_frames(id), vec![Frame::bye(MessageId(6))]);
        assert!(h.relay.is_finished(id));
    }
}

#[test]
fn join_leave_and_room_info_take_no_payload() {
    let mut h = Harness::new(Config::default());
    let alice = h.login(1);
    for frame in [
        Frame::join(MessageId(1), ROOM),
        Frame::leave(MessageId(2), ROOM),
        Frame::room_info(MessageId(3), ROOM),
    ] {
        let (code, reason) = refused(&mut h, alice, with_payload(frame, b"\0"));
        assert_eq!(code, ErrorCode::InvalidField);
        assert!(reason.contains("takes no payload"), "{reason}");
    }
    assert_eq!(h.relay.room_members(ROOM), 0, "the JOIN did nothing");
    joined(&mut h, alice, ROOM);
}

// ---- rules protocol.md states (issue 16) --------------------------------------------------

#[test]
fn a_second_inbox_sync_replays_again_after_its_last_seq() {
    let mut h = Harness::new(Config::default());
    let alice = h.login(1);
    for i in 1..=3 {
        h.send_frame(alice, send(i, 2).with_flags(Flags::STORED));
    }
    let bob = h.login(2);
    h.send_frame(bob, Frame::inbox_sync(MessageId(1), 0, 0));
    let first = h.take_frames(bob);
    let epoch = first[0].inbox_state().unwrap().epoch;
    assert_eq!(first.len(), 4);
    h.send_frame(bob, Frame::inbox_sync(MessageId(2), epoch, 1));
    let again = h.take_frames(bob);
    assert_eq!(again[0].opcode, Opcode::InboxState);
    assert_eq!(again[0].inbox_state().unwrap().first_seq, 2, "1 acked");
    let seqs: Vec<u64> = again[1..]
        .iter()
        .map(|f| f.inbox_deliver().unwrap().0)
        .collect();
    assert_eq!(seqs, [2, 3], "sent again on the same connection");
}

#[test]
fn a_stored_send_acks_zero_for_a_recipient_online_but_not_synced() {
    let mut h = Harness::new(Config::default());
    let alice = h.login(1);
    let bob = h.login(2);
    h.send_frame(alice, send(1, 2).with_flags(Flags::STORED));
    assert_eq!(h.take_frames(alice)[0].ack_count(), Some(0));
    assert!(h.take_frames(bob).is_empty());
    h.send_frame(bob, Frame::inbox_sync(MessageId(1), 0, 0));
    assert_eq!(h.take_frames(bob).len(), 2, "INBOX_STATE and message 1");
    h.send_frame(alice, send(2, 2).with_flags(Flags::STORED));
    assert_eq!(h.take_frames(alice)[0].ack_count(), Some(1));
}

#[test]
fn a_memory_store_has_a_new_epoch_per_start_and_a_restored_one_keeps_its_own() {
    // The driver seeds each start from entropy; a restored store brings its own epoch.
    let epoch = |seed: u64, restore: Option<Vec<StoreOp>>| {
        let now = std::time::Instant::now();
        let mut relay = Relay::new(Config::default(), now, 0, seed);
        if let Some(ops) = restore {
            relay.restore(ops);
        }
        let mut h = Harness { relay, now };
        let bob = h.login(2);
        h.send_frame(bob, Frame::inbox_sync(MessageId(1), 0, 0));
        h.take_frames(bob)[0].inbox_state().unwrap().epoch
    };
    assert_ne!(epoch(1, None), epoch(2, None));
    assert_eq!(
        epoch(1, None),
        epoch(1, None),
        "the epoch comes from the seed"
    );
    assert_eq!(epoch(3, Some(vec![StoreOp::Epoch(0xcafe)])), 0xcafe);
}

#[test]
fn dedup_keeps_a_stored_resend_from_being_stored_twice() {
    let mut h = Harness::new(Config::default());
    let alice = h.login(1);
    let stored = || send(9, 2).with_flags(Flags::STORED.union(Flags::DEDUP));
    h.send_frame(alice, stored());
    h.send_frame(alice, stored());
    let acks: Vec<_> = h.take_frames(alice).iter().map(Frame::ack_count).collect();
    assert_eq!(acks, [Some(0), Some(0)]);
    assert_eq!(h.relay.stored_messages(), 1);
}

#[test]
fn a_text_lines_limit_counts_a_carriage_return_but_not_the_newline() {
    let mut h = Harness::new(Config {
        max_frame: 256,
        ..Config::default()
    });
    let telnet = h.open();
    let mut line = vec![b'x'; 256];
    line.push(b'\n');
    h.feed(telnet, &line);
    let out = String::from_utf8(h.take_output(telnet)).unwrap();
    assert!(out.starts_with("ERR USAGE 0 unknown command"), "{out}");
    line.insert(256, b'\r');
    h.feed(telnet, &line);
    let out = String::from_utf8(h.take_output(telnet)).unwrap();
    assert!(out.starts_with("ERR FRAME_TOO_LARGE 0"), "{out}");
    assert!(h.relay.is_finished(telnet));
}

#[test]
fn refusals_before_the_first_byte_or_within_get_are_binary_errors() {
    let mut h = Harness::new(Config::default());
    let silent = h.open();
    let undecided = h.open();
    h.feed(undecided, b"GE");
    h.advance(h.relay.config().login_timeout);
    for id in [silent, undecided] {
        h.expect_error(id, ErrorCode::LoginTimeout);
        assert!(h.relay.is_finished(id));
    }
}

#[test]
fn room_missed_comes_each_time_the_queue_empties_after_drops() {
    let mut h = Harness::new(Config {
        out_cap: 64 * 1024,
        room_send_rate: 0,
        ..Config::default()
    });
    let sender = h.login(1);
    let slow = h.login(2);
    joined(&mut h, sender, ROOM);
    joined(&mut h, slow, ROOM);
    let payload = Bytes::from(vec![1u8; 968]);
    let mut missed = Vec::new();
    for round in 0..2u64 {
        for i in 0..50 {
            let frame = Frame::room_send(MessageId(round * 100 + i), ROOM, payload.clone());
            h.send_frame(sender, frame.with_flags(Flags::NO_ACK));
        }
        // Part of the queue written: not drained, no ROOM_MISSED yet.
        let queued = h.relay.output(slow).unwrap().len_bytes();
        h.relay.handle_written(slow, 1000);
        assert_eq!(h.relay.output(slow).unwrap().len_bytes(), queued - 1000);
        let rest = h.take_output(slow);
        assert_eq!(rest.len(), queued - 1000);
        // Everything handed to the socket: one ROOM_MISSED with the count since the last.
        let notice = h.take_frames(slow);
        assert_eq!(notice.len(), 1);
        assert_eq!(notice[0].opcode, Opcode::RoomMissed);
        missed.push(notice[0].room_missed().unwrap());
    }
    assert_eq!(missed.len(), 2, "one per drain, two for this room");
    assert_eq!(missed.iter().sum::<u64>(), h.relay.room_dropped(ROOM));
    assert!(missed.iter().all(|&n| n > 0));
}
