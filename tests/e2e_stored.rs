//! Stored delivery over real sockets and real processes: offline recipients, `kill -9` of
//! the relay with stored messages in flight, a recipient whose link drops mid-stream,
//! every limit's error, bad inbox frames, and compaction.

mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use imrelay::client::{Client, ClientConfig, Event};
use imrelay::proto::{ErrorCode, Flags, Frame, MessageId, Opcode, UserId};
use imrelay::relay::Config;
use support::process::RelayProcess;
use support::{run_until, TestRelay, SAFETY_TIMEOUT};

const ALICE: UserId = UserId(1);
const BOB: UserId = UserId(2);

/// Quick reconnects, and room for the long streams these tests send.
fn config(user: UserId) -> ClientConfig {
    let mut c = support::quick_sdk(user.0);
    c.max_in_flight = 64;
    c.max_outbox = 10_000;
    c
}

/// The number a test message carries as its payload.
fn number(payload: &[u8]) -> usize {
    std::str::from_utf8(payload).unwrap().parse().unwrap()
}

/// Fails if any number was shown twice; returns them sorted.
fn each_once(got: &[usize]) -> Vec<usize> {
    let mut sorted = got.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), got.len(), "a message shown twice");
    sorted
}

fn connect(addr: std::net::SocketAddr, user: UserId) -> Client {
    Client::connect(addr, config(user), SAFETY_TIMEOUT)
        .expect("connect")
        .0
}

fn data_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("store-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Bob's view: the numbered payloads he was shown, in order.
fn receive(bob: &mut Client, want: usize) -> Vec<usize> {
    let mut got = Vec::new();
    run_until(bob, |e| {
        if let Event::Message { from, payload, .. } = e {
            assert_eq!(from, ALICE);
            got.push(number(&payload));
        }
        got.len() >= want
    });
    got
}

#[test]
fn messages_to_an_offline_user_arrive_in_order_at_its_next_login() {
    let relay = TestRelay::default_config();
    let mut alice = connect(relay.addr, ALICE);
    let ids: Vec<MessageId> = (0..50)
        .map(|i| alice.send_stored(BOB, i.to_string().into_bytes()).unwrap())
        .collect();
    let mut stored = Vec::new();
    run_until(&mut alice, |e| {
        match e {
            Event::Stored { id, devices } => {
                assert_eq!(devices, 0, "bob is offline");
                stored.push(id);
            }
            Event::Failed { reason, .. } => panic!("{reason}"),
            _ => {}
        }
        stored.len() == 50
    });
    assert_eq!(stored, ids, "one Stored per message, in order");

    let mut bob = connect(relay.addr, BOB);
    assert_eq!(receive(&mut bob, 50), (0..50).collect::<Vec<_>>());
    // Bob acked them (the SDK does, in batches): a second device finds the inbox empty.
    bob.close(SAFETY_TIMEOUT);
    let mut tablet = connect(relay.addr, BOB);
    let id = alice.send_stored(BOB, &b"50"[..]).unwrap();
    assert_eq!(receive(&mut tablet, 1), vec![50]);
    run_until(
        &mut alice,
        |e| matches!(e, Event::Stored { id: done, .. } if done == id),
    );
}

#[test]
fn kill_9_with_stored_messages_in_flight_loses_none_that_was_acked() {
    const TOTAL: usize = 2000;
    let dir = data_dir("kill9");
    let dir_arg = dir.to_str().unwrap().to_string();
    let relay = RelayProcess::start(&["--store", &dir_arg]);
    let addr = relay.addr;
    let mut alice = connect(addr, ALICE);
    let mut by_id = BTreeMap::new();
    for i in 0..TOTAL {
        let id = alice.send_stored(BOB, i.to_string().into_bytes()).unwrap();
        by_id.insert(id, i);
    }
    // Crash the relay once part of the stream is ACKed as stored.
    let mut acked_before_crash = Vec::new();
    run_until(&mut alice, |e| {
        if let Event::Stored { id, .. } = e {
            acked_before_crash.push(by_id[&id]);
        }
        acked_before_crash.len() >= TOTAL / 4
    });
    relay.crash();
    // Whatever Alice still sees from the dead link was ACKed before the crash too.
    while let Some(e) = alice.recv(Duration::ZERO) {
        if let Event::Stored { id, .. } = e {
            acked_before_crash.push(by_id[&id]);
        }
    }
    let _relay = RelayProcess::start_on(addr, &["--store", &dir_arg]);

    // Bob comes online and must get every message that was ACKed before the crash.
    let mut bob = connect(addr, BOB);
    let mut stored_after = 0;
    let mut got = Vec::new();
    let deadline = Instant::now() + 3 * SAFETY_TIMEOUT;
    while got.len() < TOTAL || stored_after + acked_before_crash.len() < TOTAL {
        assert!(Instant::now() < deadline, "stuck at {} received", got.len());
        while let Some(e) = alice.recv(Duration::from_millis(1)) {
            match e {
                Event::Stored { .. } => stored_after += 1,
                Event::Failed { reason, .. } => panic!("{reason}"),
                _ => {}
            }
        }
        while let Some(e) = bob.recv(Duration::from_millis(1)) {
            if let Event::Message { payload, .. } = e {
                got.push(number(&payload));
            }
        }
    }
    println!(
        "{} ACKed as stored before the crash, {} after; bob got {}",
        acked_before_crash.len(),
        stored_after,
        got.len()
    );
    let sorted = each_once(&got);
    for i in &acked_before_crash {
        assert!(
            sorted.binary_search(i).is_ok(),
            "message {i} was ACKed as stored and lost"
        );
    }
    assert_eq!(
        sorted,
        (0..TOTAL).collect::<Vec<_>>(),
        "every message arrived"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_recipient_whose_link_drops_mid_stream_sees_every_message_once_in_order() {
    const TOTAL: usize = 3000;
    let relay = TestRelay::default_config();
    let mut alice = connect(relay.addr, ALICE);
    let mut bob = connect(relay.addr, BOB);
    for i in 0..TOTAL {
        alice.send_stored(BOB, i.to_string().into_bytes()).unwrap();
    }
    let mut got = Vec::new();
    let mut drops = 0;
    let deadline = Instant::now() + 3 * SAFETY_TIMEOUT;
    while got.len() < TOTAL {
        assert!(Instant::now() < deadline, "stuck at {}", got.len());
        while let Some(e) = alice.recv(Duration::ZERO) {
            if let Event::Failed { reason, .. } = e {
                panic!("{reason}");
            }
        }
        if let Some(Event::Message { payload, .. }) = bob.recv(Duration::from_millis(1)) {
            got.push(number(&payload));
            // The phone switches networks three times while the stream comes in.
            if got.len() % 700 == 0 {
                bob.reconnect();
                drops += 1;
            }
        }
    }
    assert_eq!(drops, 4);
    assert_eq!(got, (0..TOTAL).collect::<Vec<_>>(), "once each, in order");
}

#[test]
fn each_stored_delivery_limit_answers_inbox_full_naming_it() {
    // Each message counts its INBOX_DELIVER frame (48 bytes + payload) plus 64 bytes, and
    // each user's inbox 320 bytes (the store's limit: 544 for messages, 640 for 2 inboxes).
    let relay = TestRelay::start(Config {
        inbox_max_messages: 2,
        inbox_max_bytes: 300,
        store_max_users: 2,
        store_max_bytes: 544 + 2 * 320,
        ..Config::default()
    });
    let mut alice = relay.login(1);
    let stored = |id: u64, to: u64, len: usize| {
        Frame::send(MessageId(id), UserId(to), Bytes::from(vec![b'x'; len]))
            .with_flags(Flags::STORED)
    };
    let mut expect = |frame: Frame, limit: Option<&str>| {
        alice.send_frame(&frame);
        let answer = alice.recv();
        match limit {
            None => assert_eq!(answer.opcode, Opcode::Ack, "{answer:?}"),
            Some(limit) => {
                let (code, reason) = answer.error().unwrap_or_else(|| panic!("{answer:?}"));
                assert_eq!(code, ErrorCode::InboxFull as u16);
                assert!(reason.contains(limit), "{reason:?} does not name {limit:?}");
            }
        }
    };
    expect(stored(1, 7, 10), None);
    expect(stored(2, 7, 10), None);
    expect(stored(3, 7, 10), Some("max messages per inbox"));
    expect(stored(4, 8, 189), Some("max bytes per inbox"));
    expect(stored(5, 8, 188), None);
    expect(stored(6, 9, 1), Some("max users"));
    let mut bob = relay.login(7);
    bob.send_frame(&Frame::inbox_sync(MessageId(1), 0, 0));
    assert_eq!(bob.recv().opcode, Opcode::InboxState);
    bob.recv();
    bob.recv();
    bob.send_frame(&Frame::inbox_ack(MessageId(2), 2));
    bob.round_trip();
    // Bob's device is tracked since his sync: its cursor costs 32 bytes of the store's.
    expect(stored(7, 7, 101), Some("max store bytes"));
    expect(stored(8, 7, 100), None);
}

#[test]
fn bad_inbox_frames_get_errors_and_the_connection_stays() {
    let relay = TestRelay::default_config();
    let mut anon = relay.connect();
    anon.send_frame(&Frame::inbox_sync(MessageId(1), 0, 0));
    anon.expect_error(ErrorCode::NotLoggedIn);
    let mut bob = relay.login(2);
    let short = Frame::new(
        Opcode::InboxSync,
        MessageId(2),
        UserId::NONE,
        Bytes::from_static(b"x"),
    );
    bob.send_frame(&short);
    bob.expect_error(ErrorCode::InvalidField);
    let ack_with_target = Frame::inbox_ack(MessageId(3), 1).with_source(UserId::NONE);
    let mut ack_with_target = ack_with_target;
    ack_with_target.target = UserId(5);
    bob.send_frame(&ack_with_target);
    bob.expect_error(ErrorCode::InvalidField);
    let forged = Frame::new(
        Opcode::InboxDeliver,
        MessageId(4),
        BOB,
        Bytes::from(vec![0; 16]),
    );
    bob.send_frame(&forged);
    bob.expect_error(ErrorCode::InvalidField);
    // A sync with a foreign epoch starts from the beginning; acks past the end are fine.
    bob.send_frame(&Frame::inbox_sync(MessageId(5), 12345, 99));
    let state = bob.recv().inbox_state().expect("INBOX_STATE");
    assert_eq!((state.first_seq, state.last_seq), (1, 0));
    bob.send_frame(&Frame::inbox_ack(MessageId(6), 1_000_000));
    bob.round_trip();
}

#[test]
fn the_log_is_compacted_and_what_is_live_survives_a_restart() {
    let dir = data_dir("compact");
    let sent = {
        let relay = TestRelay::start_with_store(Config::default(), &dir, 20_000);
        let mut alice = connect(relay.addr, ALICE);
        let mut bob = connect(relay.addr, BOB);
        // 400 messages through Bob (acked), then 5 more while he is away.
        let mut stored = 0;
        let mut count_stored = |alice: &mut Client, want: usize| {
            run_until(alice, |e| {
                if let Event::Stored { .. } = e {
                    stored += 1;
                }
                stored == want
            })
        };
        for i in 0..400 {
            alice
                .send_stored(BOB, format!("{i:0>100}").into_bytes())
                .unwrap();
        }
        count_stored(&mut alice, 400);
        assert_eq!(receive(&mut bob, 400), (0..400).collect::<Vec<_>>());
        bob.close(SAFETY_TIMEOUT);
        for i in 0..5 {
            alice
                .send_stored(BOB, format!("late {i}").into_bytes())
                .unwrap();
        }
        count_stored(&mut alice, 405);
        stored
    };
    assert_eq!(sent, 405);
    let log = std::fs::metadata(dir.join("inbox.log")).unwrap().len();
    assert!(log < 20_000, "the log was not compacted: {log} bytes");
    let relay = TestRelay::start_with_store(Config::default(), &dir, 20_000);
    let mut bob = connect(relay.addr, BOB);
    let mut got = Vec::new();
    run_until(&mut bob, |e| {
        if let Event::Message { payload, .. } = e {
            got.push(String::from_utf8(payload.to_vec()).unwrap());
        }
        got.len() == 5
    });
    assert_eq!(got, (0..5).map(|i| format!("late {i}")).collect::<Vec<_>>());
}

/// The recipient is online while the relay dies: it must never have been sent a sequence
/// number that the restarted relay hands out again for another message.
#[test]
fn kill_9_while_the_recipient_is_online_loses_and_repeats_nothing() {
    const TOTAL: usize = 3000;
    let dir = data_dir("kill9-online");
    let dir_arg = dir.to_str().unwrap().to_string();
    let relay = RelayProcess::start(&["--store", &dir_arg]);
    let addr = relay.addr;
    let mut alice = connect(addr, ALICE);
    let mut bob = connect(addr, BOB);
    for i in 0..TOTAL {
        alice.send_stored(BOB, i.to_string().into_bytes()).unwrap();
    }
    let mut got = Vec::new();
    let mut relay = Some(relay);
    let deadline = Instant::now() + 3 * SAFETY_TIMEOUT;
    let mut restarted = None;
    while got.len() < TOTAL {
        assert!(Instant::now() < deadline, "stuck at {}", got.len());
        while let Some(e) = alice.recv(Duration::ZERO) {
            if let Event::Failed { reason, .. } = e {
                panic!("{reason}");
            }
        }
        while let Some(e) = bob.recv(Duration::from_millis(1)) {
            if let Event::Message { payload, .. } = e {
                got.push(number(&payload));
            }
        }
        if got.len() >= TOTAL / 3 {
            if let Some(r) = relay.take() {
                r.crash();
                restarted = Some(RelayProcess::start_on(addr, &["--store", &dir_arg]));
            }
        }
    }
    assert!(restarted.is_some(), "the relay was crashed mid-stream");
    let sorted = each_once(&got);
    assert_eq!(
        sorted,
        (0..TOTAL).collect::<Vec<_>>(),
        "every message arrived"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `printf 'login 66\nstore 67 hello\n' | nc -q 3 127.0.0.1 7700`: the sender closes its
/// side right after the STORE, before the store's commit. It still gets the ACK (in text
/// mode the line `SAVED <id> <n>`), then the relay closes.
#[test]
fn a_sender_closing_right_after_a_store_gets_its_ack() {
    use std::io::{Read, Write};
    let dir = data_dir("close-after-store");
    let relay = TestRelay::start_with_store(Config::default(), &dir, 1 << 30);
    let mut telnet = std::net::TcpStream::connect(relay.addr).unwrap();
    telnet.set_read_timeout(Some(SAFETY_TIMEOUT)).unwrap();
    telnet.write_all(b"login 66\nstore 67 hello\n").unwrap();
    telnet.shutdown(std::net::Shutdown::Write).unwrap();
    let mut out = String::new();
    telnet
        .read_to_string(&mut out)
        .expect("the relay closes after answering");
    assert_eq!(out, "OK LOGIN 66\r\nSAVED 2 0\r\n");
}
