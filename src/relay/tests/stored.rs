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
    // Bob's sync put his device's cursor in this turn's commit, then the message.
    assert!(matches!(
        &ops[..],
        [
            StoreOp::Cursor {
                user: UserId(BOB),
                ..
            },
            StoreOp::Append {
                user: UserId(BOB),
                ..
            }
        ]
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

/// Logs `user` in, syncs from nothing, takes what is queued and acknowledges all of it.
/// Returns the connection and the sequence numbers it was sent.
fn sync_and_ack_all(h: &mut Harness, user: u64) -> (crate::ConnId, Vec<u64>) {
    let id = h.login(user);
    h.send_frame(id, Frame::inbox_sync(MessageId(1), 0, 0));
    let seqs = delivered_seqs(h, id);
    if let Some(&last) = seqs.last() {
        h.send_frame(id, Frame::inbox_ack(MessageId(2), last));
    }
    (id, seqs)
}

#[test]
fn an_inbox_emptied_by_acks_frees_its_user_slot_and_numbers_never_repeat() {
    let mut h = Harness::new(Config {
        store_max_users: 3,
        ..Config::default()
    });
    let alice = h.login(ALICE);
    for (i, user) in [10, 11, 12].into_iter().enumerate() {
        h.send_frame(alice, stored(i as u64 + 1, user, b"m"));
        assert_eq!(h.take_frames(alice)[0].opcode, Opcode::Ack);
    }
    let mut acked = Vec::new();
    for user in [10, 11, 12] {
        let (id, seqs) = sync_and_ack_all(&mut h, user);
        assert_eq!(seqs.len(), 1);
        acked.push((id, seqs[0]));
    }
    assert_eq!(h.relay.stored_messages(), 0);
    assert_eq!(h.relay.inbox_users(), 0, "empty inboxes hold no slot");
    h.send_frame(alice, stored(4, 13, b"m"));
    assert_eq!(h.take_frames(alice)[0].opcode, Opcode::Ack, "a fourth user");

    // User 10 gets mail again: its synced connection is pushed a number above the one
    // it acknowledged, and so is a device that syncs with that number later.
    let (bob, bob_acked) = acked[0];
    h.send_frame(alice, stored(5, 10, b"again"));
    let again = delivered_seqs(&mut h, bob);
    assert_eq!(again.len(), 1);
    assert!(again[0] > bob_acked, "{again:?} reuses {bob_acked}");
    let epoch = {
        let phone = h.login(10);
        h.send_frame(phone, Frame::inbox_sync(MessageId(1), 0, 0));
        let frames = h.take_frames(phone);
        frames[0].inbox_state().unwrap().epoch
    };
    let tablet = h.login(10);
    h.send_frame(tablet, Frame::inbox_sync(MessageId(1), epoch, bob_acked));
    let frames = h.take_frames(tablet);
    let state = frames[0].inbox_state().unwrap();
    assert!(
        state.expired_upto <= bob_acked,
        "no gap was made up: {state:?}"
    );
    assert_eq!(delivered_seqs(&mut h, tablet), Vec::<u64>::new());
    assert_eq!(frames[1].inbox_deliver().unwrap().0, again[0]);
}

#[test]
fn numbers_stay_above_acked_ones_after_a_restore_from_the_log_or_a_snapshot() {
    let mut h = durable();
    let alice = h.login(ALICE);
    let mut log = vec![StoreOp::Epoch(77)];
    for i in 1..=3 {
        h.send_frame(alice, stored(i, BOB, b"m"));
    }
    let commit = h.relay.take_commit(&mut log).unwrap();
    h.relay.handle_store_committed(commit, Ok(()));
    let bob = h.login(BOB);
    h.send_frame(bob, Frame::inbox_sync(MessageId(1), 77, 0));
    assert_eq!(delivered_seqs(&mut h, bob), [1, 2, 3]);
    h.send_frame(bob, Frame::inbox_ack(MessageId(2), 3));
    h.relay.take_commit(&mut log);
    assert_eq!(h.relay.inbox_users(), 0);
    let snapshot = h.relay.store_snapshot();

    for ops in [log, snapshot] {
        let mut after = durable();
        after.relay.restore(ops);
        assert_eq!(after.relay.inbox_users(), 0);
        let bob = after.login(BOB);
        after.send_frame(bob, Frame::inbox_sync(MessageId(1), 77, 3));
        let state = after.take_frames(bob)[0].inbox_state().unwrap();
        assert_eq!(state.expired_upto, 0, "acked, not missed");
        let alice = after.login(ALICE);
        after.send_frame(alice, stored(9, BOB, b"m"));
        let mut ops = Vec::new();
        let commit = after.relay.take_commit(&mut ops).unwrap();
        after.relay.handle_store_committed(commit, Ok(()));
        let seqs = delivered_seqs(&mut after, bob);
        assert_eq!(seqs.len(), 1);
        assert!(seqs[0] > 3, "seq {} was acked already", seqs[0]);
    }
}

#[test]
fn an_inbox_emptied_by_age_frees_its_slot_and_still_reports_the_gap() {
    let mut h = Harness::new(Config {
        store_max_users: 1,
        inbox_ttl: Duration::from_secs(60),
        ..Config::default()
    });
    let alice = h.login(ALICE);
    h.send_frame(alice, stored(1, BOB, b"old"));
    h.send_frame(alice, stored(2, BOB, b"old"));
    h.take_frames(alice);
    h.now += Duration::from_secs(61);
    h.relay.expire_inboxes(h.now);
    assert_eq!(h.relay.stored_messages(), 0);
    h.send_frame(alice, stored(3, 3, b"m"));
    assert_eq!(
        h.take_frames(alice)[0].opcode,
        Opcode::Ack,
        "Bob's slot is free"
    );
    let bob = h.login(BOB);
    h.send_frame(bob, Frame::inbox_sync(MessageId(1), 0, 0));
    let state = h.take_frames(bob)[0].inbox_state().unwrap();
    assert_eq!(state.expired_upto, 2, "Bob learns he missed 1..=2");
    // Once Bob has acknowledged the gap it is forgotten; his numbers go on above it.
    h.send_frame(bob, Frame::inbox_ack(MessageId(2), 2));
    h.send_frame(alice, stored(4, 3, b"m"));
    h.take_frames(alice);
    h.send_frame(alice, stored(5, BOB, b"new"));
    assert_eq!(
        h.take_frames(alice)[0].error_code(),
        Some(ErrorCode::InboxFull),
        "one user at a time"
    );
    let user3 = h.login(3);
    h.send_frame(user3, Frame::inbox_sync(MessageId(1), 0, 0));
    let seqs = delivered_seqs(&mut h, user3);
    h.send_frame(user3, Frame::inbox_ack(MessageId(2), *seqs.last().unwrap()));
    h.send_frame(alice, stored(6, BOB, b"new"));
    assert_eq!(h.take_frames(alice)[0].opcode, Opcode::Ack);
    assert!(delivered_seqs(&mut h, bob)[0] > 2);
}

/// Within the millisecond the relay's wall clock rounds to.
fn near(a: std::time::Instant, b: std::time::Instant) -> bool {
    a.max(b) - a.min(b) < Duration::from_millis(2)
}

#[test]
fn expiry_runs_on_the_timer_in_bounded_steps_and_frees_the_store() {
    let ttl = Duration::from_secs(60);
    let mut h = Harness::new(Config {
        inbox_ttl: ttl,
        ..Config::default()
    });
    let t0 = h.now;
    assert_eq!(h.relay.inbox_deadline(), None);
    let alice = h.login(ALICE);
    // 1500 messages to 300 users who never come back, then one more a bit later.
    for i in 0..1500u64 {
        h.send_frame(alice, stored(i + 1, 100 + i % 300, b"m"));
    }
    h.now += Duration::from_secs(10);
    h.send_frame(alice, stored(9999, 7, b"later"));
    h.take_frames(alice);
    let deadline = h.relay.inbox_deadline().expect("a deadline");
    assert!(near(deadline, t0 + ttl), "{deadline:?}");
    let bytes = h.relay.stored_bytes();

    h.now = t0 + ttl;
    h.relay.expire_inboxes(h.now);
    assert_eq!(
        h.relay.stored_messages(),
        1501 - 1024,
        "at most 1024 per call"
    );
    assert!(h.relay.inbox_deadline().unwrap() <= h.now, "more is due");
    h.relay.expire_inboxes(h.now);
    assert_eq!(h.relay.stored_messages(), 1);
    assert!(h.relay.stored_bytes() < bytes / 100);
    let next = h.relay.inbox_deadline().unwrap();
    assert!(near(next, t0 + ttl + Duration::from_secs(10)));
    h.now = next;
    h.relay.expire_inboxes(h.now);
    assert_eq!(h.relay.stored_messages(), 0);
    assert_eq!(h.relay.inbox_deadline(), None);
}

#[test]
fn expiry_is_recorded_so_a_restore_has_the_same_gap() {
    let mut h = Harness::new(Config {
        inbox_ttl: Duration::from_secs(60),
        ..Config::default()
    });
    h.relay.restore(vec![StoreOp::Epoch(77)]);
    let alice = h.login(ALICE);
    let mut log = vec![StoreOp::Epoch(77)];
    h.send_frame(alice, stored(1, BOB, b"old"));
    h.now += Duration::from_secs(30);
    h.send_frame(alice, stored(2, BOB, b"newer"));
    let commit = h.relay.take_commit(&mut log).unwrap();
    h.relay.handle_store_committed(commit, Ok(()));
    h.now += Duration::from_secs(31);
    h.relay.expire_inboxes(h.now);
    h.relay.take_commit(&mut log);
    assert_eq!(h.relay.stored_messages(), 1);
    for ops in [log, h.relay.store_snapshot()] {
        // Restored at the same wall-clock time: only the expiry records can explain 1.
        let mut after = Harness::new(Config::default());
        after.relay.restore(ops);
        assert_eq!(after.relay.stored_messages(), 1);
        let bob = after.login(BOB);
        after.send_frame(bob, Frame::inbox_sync(MessageId(1), 77, 0));
        let state = after.take_frames(bob)[0].inbox_state().unwrap();
        assert_eq!((state.first_seq, state.expired_upto), (2, 1));
    }
}

#[test]
fn a_stored_send_whose_inbox_deliver_would_pass_the_max_frame_is_refused() {
    let mut h = Harness::new(Config {
        max_frame: 4096,
        ..Config::default()
    });
    let alice = h.login(ALICE);
    let bob = h.login(BOB);
    h.send_frame(bob, Frame::inbox_sync(MessageId(1), 0, 0));
    h.take_frames(bob);
    // A full-size frame: fine as a plain SEND, 16 bytes too long as an INBOX_DELIVER.
    h.send_frame(alice, stored(1, BOB, &[b'x'; 4096 - 32]));
    let err = h.expect_error(alice, ErrorCode::FrameTooLarge);
    assert!(err.error().unwrap().1.contains("4080"), "{err:?}");
    assert_eq!(h.relay.stored_messages(), 0);
    h.send_frame(alice, stored(2, BOB, &[b'x'; 4096 - 32 - 16]));
    assert_eq!(h.take_frames(alice)[0].ack_count(), Some(1), "still open");
    let delivered = h.take_frames(bob);
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0].encoded_len(), 4096);
}

#[test]
fn each_stored_message_is_charged_its_frame_and_a_fixed_overhead() {
    // An empty stored message costs 32 (header) + 16 (seq, stored_at) + 64 = 112 bytes.
    let mut h = Harness::new(Config {
        store_max_bytes: 1024,
        inbox_max_bytes: 300,
        ..Config::default()
    });
    let alice = h.login(ALICE);
    let mut answers = Vec::new();
    for i in 0..3 {
        h.send_frame(alice, stored(i + 1, BOB, b""));
        answers.push(h.take_frames(alice).remove(0));
    }
    assert_eq!(answers[1].opcode, Opcode::Ack);
    assert!(answers[2]
        .error()
        .unwrap()
        .1
        .contains("max bytes per inbox"));
    let mut acked = 2;
    for i in 0..100 {
        h.send_frame(alice, stored(i + 10, 100 + i, b""));
        let answer = h.take_frames(alice).remove(0);
        if answer.opcode != Opcode::Ack {
            assert!(answer.error().unwrap().1.contains("max store bytes"));
            break;
        }
        acked += 1;
    }
    // Bob's inbox holds two (its own cost, 320, is charged once); every further message
    // goes to a new user, whose inbox costs 320 beside the message's 112.
    let overhead = crate::relay::inbox::INBOX_OVERHEAD;
    assert_eq!(acked, 2 + (1024 - 2 * 112 - overhead) / (112 + overhead));
}

#[test]
fn a_dedup_resend_of_a_durable_stored_send_gets_the_first_ack_count() {
    let mut h = durable();
    let bob = h.login(BOB);
    h.send_frame(bob, Frame::inbox_sync(MessageId(1), 77, 0));
    h.take_frames(bob);
    let dedup = Flags::STORED.union(Flags::DEDUP);
    let alice = h.login(ALICE);
    let mut ops = Vec::new();
    // Resent after the first is on disk.
    h.send_frame(alice, stored(5, BOB, b"x").with_flags(dedup));
    let commit = h.relay.take_commit(&mut ops).unwrap();
    h.relay.handle_store_committed(commit, Ok(()));
    h.send_frame(alice, stored(5, BOB, b"x").with_flags(dedup));
    let commit = h.relay.take_commit(&mut ops).unwrap();
    h.relay.handle_store_committed(commit, Ok(()));
    let counts: Vec<_> = h.take_frames(alice).iter().map(|a| a.ack_count()).collect();
    assert_eq!(counts, [Some(1), Some(1)]);
    // Resent in the same turn.
    h.send_frame(alice, stored(6, BOB, b"y").with_flags(dedup));
    h.send_frame(alice, stored(6, BOB, b"y").with_flags(dedup));
    let commit = h.relay.take_commit(&mut ops).unwrap();
    h.relay.handle_store_committed(commit, Ok(()));
    let counts: Vec<_> = h.take_frames(alice).iter().map(|a| a.ack_count()).collect();
    assert_eq!(counts, [Some(1), Some(1)]);
    // Resent from a new connection before the first one's commit, the first one gone.
    h.send_frame(alice, stored(7, BOB, b"z").with_flags(dedup));
    h.relay.handle_closed(alice);
    let alice = h.login(ALICE);
    h.send_frame(alice, stored(7, BOB, b"z").with_flags(dedup));
    let commit = h.relay.take_commit(&mut ops).unwrap();
    h.relay.handle_store_committed(commit, Ok(()));
    let acks: Vec<_> = h
        .take_frames(alice)
        .iter()
        .map(|a| (a.msg_id, a.ack_count()))
        .collect();
    assert_eq!(acks, [(MessageId(7), Some(1))]);
    assert_eq!(delivered_seqs(&mut h, bob), [1, 2, 3]);
}

#[test]
fn a_sender_that_closes_right_after_a_stored_send_still_gets_its_ack() {
    let mut h = durable();
    // End of stream right after the STORE line (`printf 'login 66\nstore 67 hello\n' | nc`).
    let telnet = h.open();
    h.feed(telnet, b"login 66\nstore 67 hello\n");
    h.relay.handle_eof(telnet, h.now);
    assert_eq!(h.take_output(telnet), b"OK LOGIN 66\r\n");
    assert!(
        !h.relay.is_finished(telnet),
        "not closed while its ACK waits for the disk"
    );
    let mut ops = Vec::new();
    let commit = h.relay.take_commit(&mut ops).expect("a commit");
    h.relay.handle_store_committed(commit, Ok(()));
    assert_eq!(h.take_output(telnet), b"SAVED 2 0\r\n");
    assert!(h.relay.is_finished(telnet));

    // BYE right after a stored SEND: the ACK first, then the BYE reply, then the close.
    let alice = h.login(ALICE);
    h.send_frame(alice, stored(5, BOB, b"hi"));
    h.send_frame(alice, Frame::bye(MessageId(6)));
    assert!(h.take_frames(alice).is_empty());
    assert!(!h.relay.is_finished(alice));
    let commit = h.relay.take_commit(&mut ops).expect("a commit");
    h.relay.handle_store_committed(commit, Ok(()));
    let replies: Vec<Opcode> = h.take_frames(alice).iter().map(|f| f.opcode).collect();
    assert_eq!(replies, [Opcode::Ack, Opcode::Bye]);
    assert!(h.relay.is_finished(alice));
}

/// Found by the simulation (a resend stored again after a relay restart): a stored
/// message whose ACK was lost in a crash is resent by the SDK with DEDUP after the
/// restart; it must not be stored a second time, whether the log still holds its
/// `Append` or a compaction left only the `Sent` record of it (the recipient had acked it).
#[test]
fn a_stored_dedup_resend_after_a_restart_is_not_stored_twice() {
    let mut h = durable();
    let alice = h.login(ALICE);
    let mut log = vec![StoreOp::Epoch(77)];
    h.send_frame(
        alice,
        stored(5, BOB, b"once").with_flags(Flags::STORED.union(Flags::DEDUP)),
    );
    let commit = h.relay.take_commit(&mut log).unwrap();
    h.relay.handle_store_committed(commit, Ok(()));
    // Bob takes and acks it; the compaction snapshot then has no Append for it.
    let (_bob, seqs) = sync_and_ack_all(&mut h, BOB);
    assert_eq!(seqs, [1]);
    h.relay.take_commit(&mut log);
    let snapshot = h.relay.store_snapshot();

    for (what, ops) in [("the log", log), ("a compacted log", snapshot)] {
        let mut after = durable();
        after.relay.restore(ops);
        let alice = after.login(ALICE);
        let resend = stored(5, BOB, b"once").with_flags(Flags::STORED.union(Flags::DEDUP));
        after.send_frame(alice, resend);
        let mut ops = Vec::new();
        if let Some(commit) = after.relay.take_commit(&mut ops) {
            after.relay.handle_store_committed(commit, Ok(()));
        }
        assert!(
            !ops.iter().any(|op| matches!(op, StoreOp::Append { .. })),
            "stored again after a restart from {what}"
        );
        let acks = after.take_frames(alice);
        assert_eq!(acks.len(), 1, "{what}: {acks:?}");
        assert_eq!(acks[0].opcode, Opcode::Ack, "{what}");
        let bob = after.login(BOB);
        after.send_frame(bob, Frame::inbox_sync(MessageId(1), 77, 1));
        let frames = after.take_frames(bob);
        assert_eq!(
            frames.len(),
            1,
            "{what}: only INBOX_STATE, nothing new: {frames:?}"
        );
    }
}

/// Found by the simulation (seed 1287 of 4,000): an INBOX_FULL lost with the link, the
/// SDK's resend accepted after a later message had been stored, and the two shown out of
/// order. A DEDUP stored SEND refused with INBOX_FULL is remembered: its resend gets the
/// same answer, and only new messages are stored.
#[test]
fn a_refused_stored_resend_gets_the_same_refusal_and_is_never_stored_late() {
    let mut h = Harness::new(Config {
        inbox_max_messages: 1,
        ..Config::default()
    });
    let alice = h.login(ALICE);
    let dedup = Flags::STORED.union(Flags::DEDUP);
    h.send_frame(alice, stored(1, BOB, b"first").with_flags(dedup));
    assert_eq!(h.take_frames(alice)[0].opcode, Opcode::Ack);
    h.send_frame(alice, stored(2, BOB, b"second").with_flags(dedup));
    h.expect_error(alice, ErrorCode::InboxFull);
    // Bob takes the first: there is room again. The resend of #2 is still refused, a new
    // message is stored.
    let (_bob, seqs) = sync_and_ack_all(&mut h, BOB);
    assert_eq!(seqs, [1]);
    h.send_frame(alice, stored(2, BOB, b"second").with_flags(dedup));
    let again = h.expect_error(alice, ErrorCode::InboxFull);
    assert!(
        again.error().unwrap().1.contains("refused when first sent"),
        "{again:?}"
    );
    h.send_frame(alice, stored(3, BOB, b"third").with_flags(dedup));
    assert_eq!(h.take_frames(alice)[0].opcode, Opcode::Ack);
}

#[test]
fn a_dedup_refusal_is_answered_once_on_disk_and_remembered_after_a_restart() {
    let config = Config {
        inbox_max_messages: 1,
        ..Config::default()
    };
    let mut h = Harness::new(config.clone());
    h.relay.restore(vec![StoreOp::Epoch(77)]);
    let alice = h.login(ALICE);
    let dedup = |msg: u64, text: &[u8]| {
        stored(msg, BOB, text).with_flags(Flags::STORED.union(Flags::DEDUP))
    };
    h.send_frame(alice, dedup(1, b"fits"));
    let mut log = vec![StoreOp::Epoch(77)];
    let first = h.relay.take_commit(&mut log).expect("a commit");
    h.relay.handle_store_committed(first, Ok(()));
    assert_eq!(h.take_frames(alice)[0].opcode, Opcode::Ack);
    // The inbox is full: the refusal waits for its own record.
    h.send_frame(alice, dedup(2, b"no room"));
    assert!(
        h.take_frames(alice).is_empty(),
        "no ERROR before the refusal is on disk"
    );
    let second = h.relay.take_commit(&mut log).expect("a commit");
    assert!(matches!(
        log.last(),
        Some(StoreOp::Sent {
            msg_id: MessageId(2),
            ..
        })
    ));
    h.relay.handle_store_committed(second, Ok(()));
    h.expect_error(alice, ErrorCode::InboxFull);
    // A restart from the log: the resend is refused again, not stored.
    let mut after = Harness::new(config);
    after.relay.restore(log);
    let alice = after.login(ALICE);
    after.send_frame(alice, dedup(2, b"no room"));
    let mut ops = Vec::new();
    let commit = after
        .relay
        .take_commit(&mut ops)
        .expect("the answer waits for a commit");
    assert!(ops.is_empty(), "nothing stored: {ops:?}");
    after.relay.handle_store_committed(commit, Ok(()));
    let error = after.expect_error(alice, ErrorCode::InboxFull);
    assert!(
        error.error().unwrap().1.contains("refused when first sent"),
        "{error:?}"
    );
}
