//! Live rooms over real sockets: a thousand viewers, a viewer that stops reading, cleanup
//! on disconnect, online counts, admin broadcast and the room send rate.

mod support;

use bytes::Bytes;
use imrelay::proto::{ErrorCode, Flags, Frame, MessageId, Opcode, RoomId, UserId};
use imrelay::relay::Config;
use support::{Client, TestRelay};

const ROOM: u64 = 42;

fn unlimited() -> Config {
    Config {
        room_send_rate: 0,
        room_total_rate: 0,
        ..Config::default()
    }
}

fn room_send(client: &mut Client, payload: &[u8]) -> MessageId {
    let id = client.next_id();
    let frame = Frame::room_send(id, RoomId(ROOM), Bytes::copy_from_slice(payload));
    client.send_frame(&frame.with_flags(Flags::NO_ACK));
    id
}

fn online(client: &mut Client) -> u32 {
    let id = client.next_id();
    client.send_frame(&Frame::room_info(id, RoomId(ROOM)));
    let state = client.recv();
    assert_eq!(state.msg_id, id);
    state.room_state().expect("ROOM_STATE").members
}

#[test]
fn a_thousand_viewers_each_get_every_message_in_order() {
    const VIEWERS: u64 = 1000;
    const MESSAGES: u64 = 50;
    let relay = TestRelay::start(unlimited());
    let mut streamer = relay.login(1);
    streamer.join(ROOM);
    let mut viewers: Vec<Client> = (0..VIEWERS)
        .map(|i| {
            let mut v = relay.login(1000 + i);
            v.join(ROOM);
            v
        })
        .collect();
    assert_eq!(online(&mut streamer), VIEWERS as u32 + 1);
    let ids: Vec<MessageId> = (0..MESSAGES)
        .map(|i| room_send(&mut streamer, format!("danmaku {i}").as_bytes()))
        .collect();
    for viewer in &mut viewers {
        for (i, id) in ids.iter().enumerate() {
            let got = viewer.recv();
            assert_eq!(got.opcode, Opcode::RoomDeliver);
            assert_eq!(
                (got.msg_id, got.room(), got.source),
                (*id, RoomId(ROOM), UserId(1))
            );
            assert_eq!(got.payload, Bytes::from(format!("danmaku {i}")));
        }
    }
    // The sender got no copy of its own messages: the next frame answers this PING.
    streamer.round_trip();
}

#[test]
fn a_viewer_that_stops_reading_stalls_nobody_and_learns_what_it_missed() {
    let out_cap = 256 * 1024;
    let relay = TestRelay::start(Config {
        out_cap,
        ..unlimited()
    });
    let mut streamer = relay.login(1);
    let mut attentive = relay.login(2);
    let mut asleep = relay.login(3);
    for c in [&mut streamer, &mut attentive, &mut asleep] {
        c.join(ROOM);
    }
    // 40 MB of room traffic: far past what the kernel's socket buffers (a few MB on
    // loopback) and the relay's room cap (half of 256 KiB) can hold for the sleeper.
    let payload = vec![7u8; 8000];
    const SENT: u64 = 5000;
    for i in 0..SENT {
        let id = room_send(&mut streamer, &payload);
        let got = attentive.recv();
        assert_eq!(
            got.msg_id, id,
            "message {i}: the attentive viewer is not held back"
        );
    }
    streamer.round_trip();
    attentive.round_trip();

    // The sleeper wakes: it gets a prefix of the messages in order, then one ROOM_MISSED
    // whose count makes up the rest exactly.
    let mut received = 0u64;
    let missed = loop {
        let got = asleep.recv_or(|| format!("after {received} deliveries"));
        match got.opcode {
            Opcode::RoomDeliver => received += 1,
            Opcode::RoomMissed => break got.room_missed().unwrap(),
            other => panic!("unexpected {other:?}"),
        }
    };
    assert!(
        missed > 0,
        "the backlog was past the cap, something must have been dropped"
    );
    assert_eq!(received + missed, SENT, "received + missed = sent");
    asleep.round_trip();
    // Back to normal service.
    let id = room_send(&mut streamer, b"welcome back");
    assert_eq!(asleep.recv().msg_id, id);
}

#[test]
fn members_leave_the_room_when_their_connection_goes() {
    let relay = TestRelay::default_config();
    let mut host = relay.login(1);
    host.join(ROOM);
    let mut guests: Vec<Client> = (0..10).map(|i| relay.login(10 + i)).collect();
    for g in &mut guests {
        g.join(ROOM);
    }
    assert_eq!(online(&mut host), 11);
    // Half say BYE, half just vanish.
    for (i, mut g) in guests.into_iter().enumerate() {
        if i % 2 == 0 {
            g.send_frame(&Frame::bye(MessageId(1)));
            assert_eq!(g.recv().opcode, Opcode::Bye);
            g.expect_closed();
        } else {
            drop(g);
        }
    }
    // A vanished socket is noticed when its EOF is read; ask until the count settles.
    let mut count = online(&mut host);
    for _ in 0..10_000 {
        if count == 1 {
            break;
        }
        count = online(&mut host);
    }
    assert_eq!(count, 1);
    let id = host.next_id();
    host.send_frame(&Frame::leave(id, RoomId(ROOM)));
    let state = host.recv().room_state().unwrap();
    assert_eq!((state.members, state.is_member), (0, false));
}

#[test]
fn only_admins_broadcast_and_everyone_logged_in_hears_it() {
    let relay = TestRelay::start(Config {
        admins: vec![UserId(1)],
        ..Config::default()
    });
    let mut admin = relay.login(1);
    let mut users: Vec<Client> = (0..5).map(|i| relay.login(100 + i)).collect();
    let mut anonymous = relay.connect();

    users[0].send_frame(&Frame::broadcast(
        MessageId(3),
        Bytes::from_static(b"free gifts"),
    ));
    users[0].expect_error(ErrorCode::Forbidden);

    admin.send_frame(&Frame::broadcast(
        MessageId(4),
        Bytes::from_static(b"maintenance"),
    ));
    assert_eq!(admin.recv().ack_count(), Some(5));
    for u in &mut users {
        let got = u.recv();
        assert_eq!(
            (got.opcode, got.room(), got.source),
            (Opcode::RoomDeliver, RoomId(0), UserId(1))
        );
        assert_eq!(&got.payload[..], b"maintenance");
    }
    anonymous.round_trip(); // not logged in: no broadcast before the PONG
}

#[test]
fn room_info_counts_and_membership_errors() {
    let relay = TestRelay::default_config();
    let mut a = relay.login(1);
    let mut b = relay.login(2);
    assert_eq!(online(&mut a), 0);
    let st = a.join(ROOM).room_state().unwrap();
    assert_eq!((st.members, st.is_member), (1, true));
    b.join(ROOM);
    assert_eq!(online(&mut a), 2);
    let id = b.next_id();
    b.send_frame(&Frame::room_send(
        id,
        RoomId(7),
        Bytes::from_static(b"wrong room"),
    ));
    b.expect_error(ErrorCode::NotInRoom);
}

#[test]
fn flooding_a_room_is_rate_limited_without_a_disconnect() {
    let relay = TestRelay::start(Config {
        room_send_rate: 5,
        room_send_burst: 5,
        ..Config::default()
    });
    let mut spammer = relay.login(1);
    spammer.join(ROOM);
    let mut acked = 0;
    let mut limited = 0;
    for _ in 0..50 {
        let id = spammer.next_id();
        spammer.send_frame(&Frame::room_send(
            id,
            RoomId(ROOM),
            Bytes::from_static(b"spam"),
        ));
        match spammer.recv().opcode {
            Opcode::Ack => acked += 1,
            Opcode::Error => limited += 1,
            other => panic!("{other:?}"),
        }
    }
    assert!(
        acked >= 5 && limited > 0,
        "acked {acked}, limited {limited}"
    );
    spammer.round_trip();
}
