//! Routing over real loopback sockets: A to B, ACKs, multi-device, PING, BYE, and a
//! thousand connections exchanging messages with nothing lost and order kept.

mod support;

use std::collections::HashMap;

use bytes::Bytes;
use imrelay::proto::{Frame, MessageId, Opcode, UserId};
use support::{Client, TestRelay};

#[test]
fn a_message_goes_from_a_to_b_with_the_source_set_and_an_ack() {
    let relay = TestRelay::default_config();
    let mut alice = relay.login(1001);
    let mut bob = relay.login(1002);
    let id = alice.send(1002, b"hi bob");
    let got = bob.recv();
    assert_eq!(got.opcode, Opcode::Deliver);
    assert_eq!(got.msg_id, id);
    assert_eq!(got.target, UserId(1002));
    assert_eq!(got.source, UserId(1001));
    assert_eq!(&got.payload[..], b"hi bob");
    let ack = alice.recv();
    assert_eq!(
        (ack.opcode, ack.msg_id, ack.ack_count()),
        (Opcode::Ack, id, Some(1))
    );
}

#[test]
fn no_ack_means_no_ack() {
    let relay = TestRelay::default_config();
    let mut alice = relay.login(1);
    let mut bob = relay.login(2);
    let id = alice.send_no_ack(2, b"fire and forget");
    assert_eq!(bob.recv().msg_id, id);
    alice.round_trip(); // the PONG is the very next frame: no ACK came before it
}

#[test]
fn every_device_of_a_user_gets_the_message() {
    let relay = TestRelay::default_config();
    let mut alice = relay.login(1);
    let mut bob_devices: Vec<Client> = (0..3).map(|_| relay.login(2)).collect();
    let id = alice.send(2, b"to all of bob");
    for device in &mut bob_devices {
        let got = device.recv();
        assert_eq!((got.msg_id, got.source), (id, UserId(1)));
    }
    assert_eq!(alice.recv().ack_count(), Some(3));

    // Sending to yourself reaches every one of your connections, the sender's included.
    let mut alice_tablet = relay.login(1);
    let id = alice.send(1, b"note to self");
    let mut own = Vec::new();
    for _ in 0..2 {
        own.push(alice.recv());
    }
    own.sort_by_key(|f| f.opcode as u8);
    assert_eq!(own[0].opcode, Opcode::Deliver);
    assert_eq!(own[1].ack_count(), Some(2));
    assert_eq!(alice_tablet.recv().msg_id, id);
}

#[test]
fn ping_is_answered_before_and_after_login_and_bye_closes() {
    let relay = TestRelay::default_config();
    let mut c = relay.connect();
    c.send_frame(&Frame::ping(MessageId(9), Bytes::from_static(b"payload")));
    assert_eq!(
        c.recv(),
        Frame::pong(MessageId(9), Bytes::from_static(b"payload"))
    );
    c.login(5);
    c.round_trip();
    c.send_frame(&Frame::bye(MessageId(10)));
    assert_eq!(c.recv(), Frame::bye(MessageId(10)));
    c.expect_closed();
}

/// 1,000 connections in a ring: user i sends 100 numbered messages to user i+1, on 4 client
/// threads. Every message arrives exactly once, in order, with its ACK.
#[test]
fn a_thousand_connections_exchange_a_hundred_messages_each_in_order() {
    const USERS: u64 = 1000;
    const MESSAGES: u64 = 100;
    const THREADS: u64 = 4;
    let relay = TestRelay::default_config();
    let addr = relay.addr;
    let per_thread = USERS / THREADS;

    // Log everyone in first so nobody sends to an offline user.
    let mut clients: Vec<(u64, Client)> = (0..USERS)
        .map(|u| {
            let mut c = Client::connect(addr);
            c.login(u + 1);
            (u + 1, c)
        })
        .collect();
    let mut groups: Vec<Vec<(u64, Client)>> = Vec::new();
    for _ in 0..THREADS {
        let rest = clients.split_off(per_thread as usize);
        groups.push(std::mem::replace(&mut clients, rest));
    }

    // Phase 1: each client sends all its messages (ACKs pile up in its socket buffer and
    // the relay's queue, both far below the limits for 100 small frames).
    // Phase 2: each client reads until it has its 100 deliveries and 100 ACKs.
    let handles: Vec<_> = groups
        .into_iter()
        .map(|mut group| {
            std::thread::spawn(move || {
                for seq in 0..MESSAGES {
                    for (user, client) in group.iter_mut() {
                        let to = *user % USERS + 1;
                        let payload = [user.to_be_bytes(), seq.to_be_bytes()].concat();
                        client.send(to, &payload);
                    }
                }
                let mut received = HashMap::new();
                for (user, client) in group.iter_mut() {
                    let (mut delivered, mut acked) = (0, 0);
                    while delivered < MESSAGES || acked < MESSAGES {
                        let frame = client.recv();
                        match frame.opcode {
                            Opcode::Ack => acked += 1,
                            Opcode::Deliver => {
                                let from =
                                    u64::from_be_bytes(frame.payload[..8].try_into().unwrap());
                                let seq =
                                    u64::from_be_bytes(frame.payload[8..16].try_into().unwrap());
                                assert_eq!(
                                    frame.source,
                                    UserId(from),
                                    "source matches the payload"
                                );
                                assert_eq!(from % USERS + 1, *user, "delivered to the right user");
                                assert_eq!(seq, delivered, "user {user}: in order, none lost");
                                delivered += 1;
                            }
                            other => panic!("unexpected {other:?}: {frame:?}"),
                        }
                    }
                    received.insert(*user, delivered);
                }
                received
            })
        })
        .collect();
    let mut total = 0;
    for handle in handles {
        for (_, n) in handle.join().expect("client thread") {
            total += n;
        }
    }
    assert_eq!(total, USERS * MESSAGES);
}
