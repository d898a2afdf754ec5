//! Rooms in memory: membership, fan-out, slow members, limits, broadcast.

use std::time::Duration;

use bytes::Bytes;

use super::Harness;
use crate::proto::{ErrorCode, Flags, Frame, MessageId, Opcode, RoomId, UserId};
use crate::relay::{Config, State};
use crate::ConnId;

const ROOM: RoomId = RoomId(42);

fn join(h: &mut Harness, id: ConnId, room: RoomId) -> Frame {
    h.send_frame(id, Frame::join(MessageId(77), room));
    let reply = h.take_frames(id);
    assert_eq!(reply.len(), 1, "{reply:?}");
    reply[0].clone()
}

fn room_msg(msg: u64, payload: &'static [u8]) -> Frame {
    Frame::room_send(MessageId(msg), ROOM, Bytes::from_static(payload))
}

#[test]
fn join_leave_and_info_report_the_online_count() {
    let mut h = Harness::new(Config::default());
    let a = h.login(1);
    let b = h.login(2);
    let state = join(&mut h, a, ROOM);
    assert_eq!(state.opcode, Opcode::RoomState);
    assert_eq!(state.msg_id, MessageId(77));
    assert_eq!(state.room(), ROOM);
    let st = state.room_state().unwrap();
    assert_eq!((st.members, st.is_member), (1, true));
    assert_eq!(
        join(&mut h, a, ROOM).room_state().unwrap().members,
        1,
        "idempotent"
    );
    assert_eq!(join(&mut h, b, ROOM).room_state().unwrap().members, 2);

    h.send_frame(a, Frame::room_info(MessageId(5), ROOM));
    let info = h.take_frames(a)[0].room_state().unwrap();
    assert_eq!((info.members, info.is_member), (2, true));

    h.send_frame(b, Frame::leave(MessageId(6), ROOM));
    let left = h.take_frames(b)[0].room_state().unwrap();
    assert_eq!((left.members, left.is_member), (1, false));
    h.send_frame(b, Frame::leave(MessageId(7), ROOM));
    assert_eq!(
        h.take_frames(b)[0].room_state().unwrap().members,
        1,
        "idempotent"
    );
}

#[test]
fn room_send_reaches_every_member_but_the_sending_connection() {
    let mut h = Harness::new(Config::default());
    let sender_phone = h.login(1);
    let sender_tablet = h.login(1);
    let viewers: Vec<ConnId> = (2..6).map(|u| h.login(u)).collect();
    let outsider = h.login(9);
    for &id in [sender_phone, sender_tablet].iter().chain(&viewers) {
        join(&mut h, id, ROOM);
    }
    h.send_frame(sender_phone, room_msg(11, b"666"));
    let ack = h.take_frames(sender_phone);
    assert_eq!(ack.len(), 1, "the sender gets only its ACK: {ack:?}");
    assert_eq!(
        ack[0].ack_count(),
        Some(5),
        "4 viewers and the sender's other device"
    );
    for &id in viewers.iter().chain([&sender_tablet]) {
        let got = h.take_frames(id);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].opcode, Opcode::RoomDeliver);
        assert_eq!(got[0].room(), ROOM);
        assert_eq!(got[0].source, UserId(1));
        assert_eq!(got[0].msg_id, MessageId(11));
        assert_eq!(&got[0].payload[..], b"666");
    }
    assert!(h.take_frames(outsider).is_empty());
    assert_eq!(h.relay.metrics().room_deliveries_queued, 5);
}

#[test]
fn room_send_needs_membership_and_valid_fields() {
    let mut h = Harness::new(Config::default());
    let a = h.login(1);
    h.send_frame(a, room_msg(1, b"x"));
    h.expect_error(a, ErrorCode::NotInRoom);
    h.send_frame(a, Frame::join(MessageId(2), RoomId(0)));
    h.expect_error(a, ErrorCode::InvalidField);
    h.send_frame(a, Frame::join(MessageId(3), ROOM).with_flags(Flags::NO_ACK));
    h.expect_error(a, ErrorCode::InvalidField);
    let newcomer = h.open();
    h.send_frame(newcomer, Frame::join(MessageId(4), ROOM));
    h.expect_error(newcomer, ErrorCode::NotLoggedIn);
}

#[test]
fn a_slow_member_loses_room_traffic_then_hears_how_much() {
    let config = Config {
        out_cap: 128 * 1024,
        room_send_rate: 0,
        ..Config::default()
    };
    let mut h = Harness::new(config);
    let sender = h.login(1);
    let reader = h.login(2);
    let stalled = h.login(3);
    for id in [sender, reader, stalled] {
        join(&mut h, id, ROOM);
    }
    let payload = Bytes::from(vec![1u8; 968]); // 1000-byte frames
    for i in 0..100 {
        h.send_frame(
            sender,
            Frame::room_send(MessageId(i), ROOM, payload.clone()).with_flags(Flags::NO_ACK),
        );
        assert_eq!(h.take_frames(reader).len(), 1, "the reader misses nothing");
    }
    // The room cap is half the output cap; each frame counts its overhead too.
    let queued_for_stalled = 64 * 1024 / (1000 + crate::relay::FRAME_OVERHEAD);
    assert_eq!(h.relay.room_dropped(ROOM), 100 - queued_for_stalled as u64);
    // A direct message still fits: room floods leave the other half for it.
    h.send_frame(
        sender,
        Frame::send(MessageId(500), UserId(3), payload.clone()),
    );
    assert_eq!(h.take_frames(sender)[0].opcode, Opcode::Ack);

    let frames = h.take_frames(stalled);
    let room_ids: Vec<u64> = frames
        .iter()
        .filter(|f| f.opcode == Opcode::RoomDeliver)
        .map(|f| f.msg_id.0)
        .collect();
    assert_eq!(room_ids, (0..queued_for_stalled as u64).collect::<Vec<_>>());
    assert_eq!(
        frames
            .iter()
            .filter(|f| f.opcode == Opcode::Deliver)
            .count(),
        1
    );
    // Drained: one notice with the count, then normal service again.
    let notice = h.take_frames(stalled);
    assert_eq!(notice.len(), 1);
    assert_eq!(notice[0].opcode, Opcode::RoomMissed);
    assert_eq!(notice[0].room(), ROOM);
    assert_eq!(
        notice[0].room_missed(),
        Some(100 - queued_for_stalled as u64)
    );
    h.send_frame(sender, room_msg(1000, b"back"));
    assert_eq!(h.take_frames(stalled)[0].msg_id, MessageId(1000));
}

#[test]
fn room_send_rate_limit_answers_with_an_error_not_a_disconnect() {
    let config = Config {
        room_send_rate: 10,
        room_send_burst: 3,
        ..Config::default()
    };
    let mut h = Harness::new(config);
    let a = h.login(1);
    join(&mut h, a, ROOM);
    for i in 0..3 {
        h.send_frame(a, room_msg(i, b"x"));
        assert_eq!(h.take_frames(a)[0].opcode, Opcode::Ack);
    }
    h.send_frame(a, room_msg(3, b"x"));
    let err = h.expect_error(a, ErrorCode::RateLimited);
    assert_eq!(err.msg_id, MessageId(3));
    assert_eq!(h.relay.state(a), Some(State::Active(UserId(1))));
    h.advance(Duration::from_millis(100));
    h.send_frame(a, room_msg(4, b"x"));
    assert_eq!(h.take_frames(a)[0].opcode, Opcode::Ack);
}

#[test]
fn room_limits_refuse_the_join() {
    let config = Config {
        max_rooms_per_connection: 2,
        max_members_per_room: 2,
        ..Config::default()
    };
    let mut h = Harness::new(config);
    let a = h.login(1);
    join(&mut h, a, RoomId(1));
    join(&mut h, a, RoomId(2));
    let err = join(&mut h, a, RoomId(3));
    assert_eq!(err.error_code(), Some(ErrorCode::LimitReached));
    let b = h.login(2);
    let c = h.login(3);
    join(&mut h, b, RoomId(1));
    assert_eq!(
        join(&mut h, c, RoomId(1)).error_code(),
        Some(ErrorCode::LimitReached)
    );
    assert_eq!(h.relay.room_members(RoomId(1)), 2);
}

#[test]
fn membership_ends_with_the_connection() {
    let mut h = Harness::new(Config::default());
    let ids: Vec<ConnId> = (1..=50).map(|u| h.login(u)).collect();
    for (i, &id) in ids.iter().enumerate() {
        join(&mut h, id, ROOM);
        join(&mut h, id, RoomId(1000 + i as u64));
    }
    assert_eq!(h.relay.room_count(), 51);
    for (i, &id) in ids.iter().enumerate() {
        if i % 2 == 0 {
            h.relay.handle_closed(id);
        } else {
            h.send_frame(id, Frame::bye(MessageId(1)));
        }
    }
    assert_eq!(h.relay.room_members(ROOM), 0);
    assert_eq!(h.relay.room_count(), 0);
}

#[test]
fn broadcast_is_for_admins_and_reaches_everyone_logged_in() {
    let config = Config {
        admins: vec![UserId(1)],
        ..Config::default()
    };
    let mut h = Harness::new(config);
    let admin = h.login(1);
    let users: Vec<ConnId> = (2..10).map(|u| h.login(u)).collect();
    let anonymous = h.open();
    h.send_frame(
        users[0],
        Frame::broadcast(MessageId(1), Bytes::from_static(b"hi")),
    );
    h.expect_error(users[0], ErrorCode::Forbidden);
    h.send_frame(
        admin,
        Frame::broadcast(MessageId(2), Bytes::from_static(b"maintenance at 3am")),
    );
    assert_eq!(h.take_frames(admin)[0].ack_count(), Some(8));
    for &id in &users {
        let got = h.take_frames(id);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].opcode, Opcode::RoomDeliver);
        assert_eq!(got[0].room(), RoomId::ALL);
        assert_eq!(got[0].source, UserId(1));
    }
    assert!(h.take_frames(anonymous).is_empty());
}
