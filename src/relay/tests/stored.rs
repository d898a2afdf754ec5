//! Stored delivery in the core, with a simulated clock and the driver's commit played by
//! hand: held ACKs, order under backpressure, expiry gaps, replay after a restore.

use std::time::Duration;

use bytes::Bytes;

use super::Harness;
use crate::proto::{ErrorCode, Flags, Frame, MessageId, Opcode, UserId};
use crate::relay::{Config, StoreOp};

const ALICE: u64 = 1;
const BOB: u64 = 2;

fn stored(msg: u64, to: u64, payload: &[u8]) -> Frame {
    Frame::send(MessageId(msg), UserId(to), Bytes::copy_from_slice(payload))
        .with_flags(Flags::STORED)
}

/// A relay with a durable store (empty), as the driver makes it by restoring the log.
fn durable() -> Harness {
    let mut h = Harness::new(Config::default());
    h.relay.restore(vec![StoreOp::Epoch(77)]);
    h
}

/// Sequence numbers of the INBOX_DELIVERs queued to `id`.
fn delivered_seqs(h: &mut Harness, id: crate::ConnId) -> Vec<u64> {
    h.take_frames(id)
        .iter()
        .filter_map(|f| f.inbox_deliver().map(|(seq, _, _)| seq))
        .collect()
}

#[test]
fn the_ack_and_the_delivery_wait_for_the_commit() {
    let mut h = durable();
    let alice = h.login(ALICE);
    let bob = h.login(BOB);
    h.send_frame(bob, Frame::inbox_sync(MessageId(1), 0, 0));
    h.take_frames(bob);
    h.send_frame(alice, stored(5, BOB, b"hi"));
    assert!(h.take_frames(alice).is_empty(), "no ACK before the disk");
    assert!(
        h.take_frames(bob).is_empty(),
        "no delivery of a number a crash could reuse"
    );
    assert!(h.relay.wants_commit());
    let mut ops = Vec::new();
    let first = h.relay.take_commit(&mut ops).expect("a commit");
    assert!(matches!(
        &ops[..],
        [StoreOp::Append {
            user: UserId(BOB),
            ..
        }]
    ));
    // A second turn's commit, then both reported at once (the writer groups them).
    h.send_frame(alice, stored(6, BOB, b"again"));
    let second = h.relay.take_commit(&mut ops).expect("a commit");
    assert!(second > first);
    h.relay.handle_store_committed(second, Ok(()));
    let acks = h.take_frames(alice);
    let acked: Vec<_> = acks.iter().map(|a| (a.msg_id, a.ack_count())).collect();
    assert_eq!(acked, [(MessageId(5), Some(1)), (MessageId(6), Some(1))]);
    assert_eq!(delivered_seqs(&mut h, bob), [1, 2]);
    assert_eq!(h.relay.commits_in_flight(), 0);

    // A failed write answers STORE_FAILED, sends nothing to Bob, and stops promising.
    h.send_frame(alice, stored(7, BOB, b"lost"));
    let third = h.relay.take_commit(&mut ops).unwrap();
    h.relay
        .handle_store_committed(third, Err("disk full".into()));
    let err = h.expect_error(alice, ErrorCode::StoreFailed);
    assert!(err.error().unwrap().1.contains("disk full"));
    assert!(delivered_seqs(&mut h, bob).is_empty());
    h.send_frame(alice, stored(8, BOB, b"third"));
    let err = h.expect_error(alice, ErrorCode::StoreFailed);
    assert!(err.error().unwrap().1.contains("restart"));
}

#[test]
fn a_recipient_behind_on_its_queue_gets_the_rest_in_order_as_it_drains() {
    let mut h = Harness::new(Config {
        out_cap: 64 * 1024 * 2,
        ..Config::default()
    });
    let alice = h.login(ALICE);
    let bob = h.login(BOB);
    h.send_frame(bob, Frame::inbox_sync(MessageId(1), 0, 0));
    assert_eq!(h.take_frames(bob)[0].opcode, Opcode::InboxState);
    // 40 messages of 4 KiB: more than half of Bob's 128 KiB cap at once.
    for i in 1..=40 {
        h.send_frame(alice, stored(i, BOB, &[b'x'; 4096]));
    }
    let acks = h.take_frames(alice);
    assert_eq!(acks.len(), 40);
    let pushed_now = acks.iter().filter(|a| a.ack_count() == Some(1)).count();
    assert!(pushed_now < 40, "some waited for room");
    let mut seqs = Vec::new();
    while seqs.len() < 40 {
        let more = delivered_seqs(&mut h, bob);
        assert!(!more.is_empty(), "stalled at {}", seqs.len());
        seqs.extend(more);
    }
    assert_eq!(seqs, (1..=40).collect::<Vec<u64>>());
}

#[test]
fn expired_messages_are_reported_as_a_gap_at_the_next_sync() {
    let mut h = Harness::new(Config {
        inbox_ttl: Duration::from_secs(60),
        ..Config::default()
    });
    let alice = h.login(ALICE);
    h.send_frame(alice, stored(1, BOB, b"old"));
    h.now += Duration::from_secs(50);
    h.send_frame(alice, stored(2, BOB, b"newer"));
    h.now += Duration::from_secs(20);
    let bob = h.login(BOB);
    h.send_frame(bob, Frame::inbox_sync(MessageId(1), 0, 0));
    let frames = h.take_frames(bob);
    let state = frames[0].inbox_state().unwrap();
    assert_eq!(
        (state.first_seq, state.last_seq, state.expired_upto),
        (2, 2, 1)
    );
    let (seq, _, payload) = frames[1].inbox_deliver().unwrap();
    assert_eq!((seq, &payload[..]), (2, &b"newer"[..]));
}

#[test]
fn a_sync_resumes_after_the_last_seq_and_acks_what_came_before() {
    let mut h = Harness::new(Config::default());
    let alice = h.login(ALICE);
    for i in 1..=5 {
        h.send_frame(alice, stored(i, BOB, b"m"));
    }
    let bob = h.login(BOB);
    h.send_frame(bob, Frame::inbox_sync(MessageId(1), 0, 0));
    let frames = h.take_frames(bob);
    let epoch = frames[0].inbox_state().unwrap().epoch;
    assert_eq!(frames.len(), 6);
    // The phone reconnects having shown 3: it gets 4 and 5 only.
    let phone = h.login(BOB);
    h.send_frame(phone, Frame::inbox_sync(MessageId(1), epoch, 3));
    let frames = h.take_frames(phone);
    assert_eq!(
        frames[0].inbox_state().unwrap().first_seq,
        4,
        "1..=3 acked by the sync"
    );
    assert_eq!(delivered_seqs(&mut h, phone), Vec::<u64>::new());
    let seqs: Vec<u64> = frames[1..]
        .iter()
        .map(|f| f.inbox_deliver().unwrap().0)
        .collect();
    assert_eq!(seqs, [4, 5]);
    // An unsynced connection of Bob's never gets stored messages.
    let plain = h.login(BOB);
    h.send_frame(alice, stored(6, BOB, b"m"));
    assert!(h.take_frames(plain).is_empty());
}

#[test]
fn a_restored_relay_has_the_same_inboxes_and_numbering() {
    let mut h = durable();
    let alice = h.login(ALICE);
    let mut log = vec![StoreOp::Epoch(77)];
    for i in 1..=3 {
        h.send_frame(alice, stored(i, BOB, b"m"));
    }
    h.relay.take_commit(&mut log);
    log.push(StoreOp::Ack {
        user: UserId(BOB),
        upto: 1,
    });

    let mut after = durable();
    after.relay.restore(log);
    let bob = after.login(BOB);
    after.send_frame(bob, Frame::inbox_sync(MessageId(1), 77, 0));
    let frames = after.take_frames(bob);
    let state = frames[0].inbox_state().unwrap();
    assert_eq!((state.epoch, state.first_seq, state.last_seq), (77, 2, 3));
    let replayed: Vec<u64> = frames[1..]
        .iter()
        .map(|f| f.inbox_deliver().unwrap().0)
        .collect();
    assert_eq!(replayed, [2, 3]);
    let alice = after.login(ALICE);
    after.send_frame(alice, stored(9, BOB, b"m"));
    let mut ops = Vec::new();
    let commit = after.relay.take_commit(&mut ops).unwrap();
    after.relay.handle_store_committed(commit, Ok(()));
    assert_eq!(delivered_seqs(&mut after, bob), [4], "numbering goes on");
}
