//! The client SDK over real loopback sockets: chat, failures, the relay's de-duplication,
//! heartbeat on a dead link, and exactly-once delivery across relay restarts and crashes.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use imrelay::client::{
    Client, ClientConfig, Connection, DisconnectReason, Event, FailReason, Phase,
};
use imrelay::proto::decode::decode_frame;
use imrelay::proto::{ErrorCode, Flags, Frame, LoginOk, MessageId, Opcode, UserId};
use support::process::RelayProcess;
use support::{TestRelay, SAFETY_TIMEOUT};

const ALICE: UserId = UserId(1);
const BOB: UserId = UserId(2);

fn config(user: UserId) -> ClientConfig {
    support::quick_sdk(user.0)
}

fn connect(addr: SocketAddr, user: UserId) -> Client {
    Client::connect(addr, config(user), SAFETY_TIMEOUT)
        .expect("connect")
        .0
}

/// Receives events until `pick` returns something; fails the test after the safety timeout.
fn wait_for<T>(client: &mut Client, mut pick: impl FnMut(&Event) -> Option<T>) -> T {
    let deadline = Instant::now() + SAFETY_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let event = client.recv(left).expect("event before the safety timeout");
        if let Some(found) = pick(&event) {
            return found;
        }
    }
}

#[test]
fn sdk_users_chat_and_each_send_ends_as_one_delivered_event() {
    let relay = TestRelay::default_config();
    let mut alice = connect(relay.addr, ALICE);
    let mut bob = connect(relay.addr, BOB);
    let id = alice.send(BOB, &b"hi bob"[..]).unwrap();
    let (from, got_id, payload) = wait_for(&mut bob, |e| match e {
        Event::Message { from, id, payload } => Some((*from, *id, payload.clone())),
        _ => None,
    });
    assert_eq!((from, got_id, &payload[..]), (ALICE, id, &b"hi bob"[..]));
    let devices = wait_for(&mut alice, |e| match e {
        Event::Delivered { id: done, devices } if *done == id => Some(*devices),
        Event::Failed { .. } => panic!("{e:?}"),
        _ => None,
    });
    assert_eq!(devices, 1);
    let events = bob.close(SAFETY_TIMEOUT);
    assert_eq!(events.last(), Some(&Event::Closed));
}

#[test]
fn a_message_to_an_offline_user_fails_with_the_relays_reason() {
    let relay = TestRelay::default_config();
    let mut alice = connect(relay.addr, ALICE);
    let id = alice.send(UserId(99), &b"anyone?"[..]).unwrap();
    let reason = wait_for(&mut alice, |e| match e {
        Event::Failed { id: failed, reason } if *failed == id => Some(reason.clone()),
        _ => None,
    });
    assert!(
        matches!(&reason, FailReason::Rejected { code, reason }
            if *code == ErrorCode::RecipientOffline as u16 && reason.contains("99")),
        "{reason:?}"
    );
}

#[test]
fn the_relay_forwards_a_dedup_resend_once_and_acks_it_again() {
    let relay = TestRelay::default_config();
    let mut alice = relay.login(1);
    let mut bob = relay.login(2);
    let send = Frame::send(MessageId(5), BOB, (&b"once"[..]).into()).with_flags(Flags::DEDUP);
    alice.send_frame(&send);
    assert_eq!(alice.recv().ack_count(), Some(1));
    let deliver = bob.recv();
    assert_eq!(
        (deliver.opcode, deliver.flags),
        (Opcode::Deliver, Flags::EMPTY)
    );
    // The resend: the same (sender, msg_id), as after a reconnect.
    alice.send_frame(&send);
    let ack = alice.recv();
    assert_eq!(
        (ack.opcode, ack.msg_id, ack.ack_count()),
        (Opcode::Ack, MessageId(5), Some(1))
    );
    bob.round_trip(); // a PONG comes back before any second DELIVER could
                      // The same id from another sender is another message.
    let mut carol = relay.login(3);
    carol.send_frame(&send);
    assert_eq!(carol.recv().ack_count(), Some(1));
    assert_eq!(bob.recv().source, UserId(3));
    // Without the flag the relay does not look: SEND stays as the core defines it.
    alice.send(2, b"plain");
    alice.send(2, b"plain");
    assert_eq!(bob.recv().payload, bob.recv().payload);
    assert_eq!(alice.recv().opcode, Opcode::Ack);
    assert_eq!(alice.recv().opcode, Opcode::Ack);
    // DEDUP needs an id to remember.
    alice.send_frame(&Frame::send(MessageId(0), BOB, (&b"x"[..]).into()).with_flags(Flags::DEDUP));
    alice.expect_error(ErrorCode::InvalidField);
    bob.round_trip();
}

/// A fake relay that logs the client in and then never says another word: a dead link as
/// a phone sees it when the network drops packets without resetting the connection.
#[test]
fn heartbeat_detects_a_dead_link_and_the_client_reconnects() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (seen_tx, seen) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let (mut socket, _) = listener.accept().unwrap();
        socket.set_read_timeout(Some(SAFETY_TIMEOUT)).unwrap();
        let login = read_frame(&mut socket).expect("LOGIN");
        assert_eq!(login.opcode, Opcode::Login);
        let limits = LoginOk {
            max_frame: 65536,
            ping_interval_ms: 30_000,
            idle_timeout_ms: 90_000,
            out_cap: 1 << 20,
            heartbeat: None,
        };
        let ok = Frame::new(
            Opcode::LoginOk,
            login.msg_id,
            ALICE,
            limits.to_bytes().to_vec().into(),
        );
        socket.write_all(&ok.to_bytes()).unwrap();
        // Silence. The client PINGs, then gives up on the link and closes it.
        seen_tx
            .send(read_frame(&mut socket).map(|f| f.opcode))
            .unwrap();
        seen_tx
            .send(read_frame(&mut socket).map(|f| f.opcode))
            .unwrap();
        // And it comes back on its own.
        let (mut again, _) = listener.accept().unwrap();
        again.set_read_timeout(Some(SAFETY_TIMEOUT)).unwrap();
        seen_tx
            .send(read_frame(&mut again).map(|f| f.opcode))
            .unwrap();
    });

    let mut cfg = config(ALICE);
    cfg.heartbeat_interval = Duration::from_millis(200);
    cfg.heartbeat_timeout = Duration::from_millis(300);
    cfg.stored_inbox = false; // the fake relay speaks the core protocol only
    let mut client = Client::start(addr, cfg);
    wait_for(&mut client, |e| {
        matches!(e, Event::Connected { .. }).then_some(())
    });
    let reason = wait_for(&mut client, |e| match e {
        Event::Disconnected { reason, .. } => Some(reason.clone()),
        _ => None,
    });
    assert_eq!(reason, DisconnectReason::HeartbeatTimeout);
    assert_eq!(seen.recv().unwrap(), Some(Opcode::Ping), "it asked first");
    assert_eq!(seen.recv().unwrap(), None, "then closed the dead link");
    // Keep the client running until the fake relay sees its next LOGIN.
    let deadline = Instant::now() + SAFETY_TIMEOUT;
    loop {
        match seen.try_recv() {
            Ok(opcode) => {
                assert_eq!(opcode, Some(Opcode::Login));
                break;
            }
            Err(_) => assert!(Instant::now() < deadline, "no reconnect"),
        }
        client.recv(Duration::from_millis(10));
    }
}

/// The next frame, or `None` when the peer closed.
fn read_frame(socket: &mut std::net::TcpStream) -> Option<Frame> {
    let mut buf = BytesMut::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(frame) = decode_frame(&mut buf, 1 << 20).unwrap() {
            return Some(frame.unwrap());
        }
        let n = socket.read(&mut chunk).expect("read");
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// What one test run saw: per payload, how often Bob got it and how Alice's sends ended.
#[derive(Default)]
struct Ledger {
    received: BTreeMap<String, usize>,
    /// Alice's message id → payload, for sends not answered yet.
    open: HashMap<MessageId, String>,
    delivered: usize,
    resent_after_offline: usize,
    disconnects: usize,
    /// Payloads refused because Bob was offline, to send again once he is back.
    retry: Vec<String>,
}

impl Ledger {
    fn send(&mut self, alice: &mut Client, payload: String) {
        let id = alice.send(BOB, payload.clone().into_bytes()).expect("send");
        self.open.insert(id, payload);
    }

    /// Handles one event of Alice's.
    fn alice_event(&mut self, event: Event) {
        match event {
            Event::Delivered { id, .. } => {
                self.open.remove(&id).expect("one answer per id");
                self.delivered += 1;
            }
            // Bob was not back yet when this first send arrived: nothing was delivered,
            // so the app sends it again once Bob is back, as a chat app would.
            Event::Failed {
                id,
                reason: FailReason::Rejected { code, .. },
            } if code == ErrorCode::RecipientOffline as u16 => {
                let payload = self.open.remove(&id).expect("one answer per id");
                self.resent_after_offline += 1;
                self.retry.push(payload);
            }
            Event::Failed { id, reason } => panic!("{id} failed: {reason}"),
            Event::Disconnected { .. } => self.disconnects += 1,
            _ => {}
        }
    }

    fn bob_event(&mut self, event: Event) {
        if let Event::Message { from, payload, .. } = event {
            assert_eq!(from, ALICE);
            *self
                .received
                .entry(String::from_utf8(payload.to_vec()).unwrap())
                .or_default() += 1;
        }
    }

    /// Runs both clients until every send is answered and Bob has `expected` payloads.
    fn settle(&mut self, alice: &mut Client, bob: &mut Client, expected: usize) {
        let deadline = Instant::now() + 3 * SAFETY_TIMEOUT;
        while !(self.open.is_empty() && self.retry.is_empty() && self.received.len() >= expected) {
            assert!(
                Instant::now() < deadline,
                "stuck: {} open, {} received; alice {:?} ({} pending), bob {:?}",
                self.open.len(),
                self.received.len(),
                alice.phase(),
                alice.pending(),
                bob.phase()
            );
            while let Some(e) = alice.recv(Duration::from_millis(5)) {
                self.alice_event(e);
            }
            while let Some(e) = bob.recv(Duration::from_millis(5)) {
                self.bob_event(e);
            }
            if bob.phase() == Phase::Ready {
                for payload in std::mem::take(&mut self.retry) {
                    self.send(alice, payload);
                }
            }
        }
    }

    fn assert_each_once(&self, expected: usize) {
        assert_eq!(self.received.len(), expected, "every payload arrived");
        let twice: Vec<_> = self.received.iter().filter(|(_, n)| **n > 1).collect();
        assert!(twice.is_empty(), "shown twice: {twice:?}");
    }
}

#[test]
fn messages_sent_while_the_relay_is_down_go_out_once_it_is_back() {
    let relay = RelayProcess::start(&[]);
    let addr = relay.addr;
    let mut alice = connect(addr, ALICE);
    let mut bob = connect(addr, BOB);
    let mut ledger = Ledger::default();
    for i in 0..20 {
        ledger.send(&mut alice, format!("before {i}"));
    }
    ledger.settle(&mut alice, &mut bob, 20);

    relay.crash();
    // Both clients notice.
    wait_for(&mut alice, |e| {
        matches!(e, Event::Disconnected { .. }).then_some(())
    });
    wait_for(&mut bob, |e| {
        matches!(e, Event::Disconnected { .. }).then_some(())
    });
    for i in 0..20 {
        ledger.send(&mut alice, format!("while down {i}"));
    }
    assert_eq!(alice.pending(), 20);
    let _relay = RelayProcess::start_on(addr, &[]);
    ledger.settle(&mut alice, &mut bob, 40);
    ledger.assert_each_once(40);
    assert_eq!(ledger.delivered, 40);
}

#[test]
fn a_relay_crash_mid_stream_loses_nothing_and_shows_nothing_twice() {
    let relay = RelayProcess::start(&[]);
    let addr = relay.addr;
    let mut alice = connect(addr, ALICE);
    let mut bob = connect(addr, BOB);
    let mut ledger = Ledger::default();
    const TOTAL: usize = 400;
    for i in 0..TOTAL {
        ledger.send(&mut alice, format!("m{i}"));
    }
    // Let part of the stream through, then kill -9 the relay with messages in flight.
    while ledger.received.len() < TOTAL / 4 {
        if let Some(e) = alice.recv(Duration::from_millis(1)) {
            ledger.alice_event(e);
        }
        if let Some(e) = bob.recv(Duration::from_millis(1)) {
            ledger.bob_event(e);
        }
    }
    relay.crash();
    let _relay = RelayProcess::start_on(addr, &[]);
    ledger.settle(&mut alice, &mut bob, TOTAL);
    ledger.assert_each_once(TOTAL);
    assert!(ledger.disconnects >= 1, "alice saw the crash");
    assert_eq!(
        ledger.delivered + ledger.resent_after_offline,
        TOTAL + ledger.resent_after_offline
    );
}

/// Runs `conn` (readiness by polling, every millisecond) without taking any event, until
/// `done` says so; fails after the safety timeout.
fn drive_until(conn: &mut Connection, mut done: impl FnMut(&Connection) -> bool) {
    let deadline = Instant::now() + SAFETY_TIMEOUT;
    while !done(conn) {
        assert!(
            Instant::now() < deadline,
            "stuck in {:?}",
            conn.core().phase()
        );
        conn_step(conn);
    }
}

/// An app on its own event loop may let events wait while the link drops and comes back:
/// stored messages received but not yet taken must still reach it, once each, and the
/// relay must not have been told the app has them.
#[test]
fn stored_messages_not_taken_across_a_reconnect_are_shown_once_each() {
    const TOTAL: usize = 20;
    let relay = TestRelay::default_config();
    let mut alice = connect(relay.addr, ALICE);
    for i in 0..TOTAL {
        alice.send_stored(BOB, i.to_string().into_bytes()).unwrap();
    }
    let mut stored = 0;
    wait_for(&mut alice, |e| match e {
        Event::Stored { .. } => {
            stored += 1;
            (stored == TOTAL).then_some(())
        }
        Event::Failed { reason, .. } => panic!("{reason}"),
        _ => None,
    });

    let mut bob = Connection::new(relay.addr, config(BOB), Instant::now());
    let mut got = Vec::new();
    // Bob's app takes the first message; the rest of the replay is read meanwhile.
    let deadline = Instant::now() + SAFETY_TIMEOUT;
    while got.is_empty() {
        assert!(Instant::now() < deadline, "no first message");
        conn_step(&mut bob);
        take(&mut bob, &mut got);
    }
    // The phone switches networks; the app takes nothing until the link is back.
    bob.reconnect(Instant::now());
    drive_until(&mut bob, |c| c.core().phase() == Phase::Ready);
    let deadline = Instant::now() + SAFETY_TIMEOUT;
    while got.len() < TOTAL {
        assert!(
            Instant::now() < deadline,
            "stuck at {} of {TOTAL}: {got:?}",
            got.len()
        );
        conn_step(&mut bob);
        take(&mut bob, &mut got);
    }
    let want: Vec<String> = (0..TOTAL).map(|i| i.to_string()).collect();
    assert_eq!(got, want, "each once, in order");
    // Everything taken was acked: a second device of Bob's finds the inbox empty.
    while bob.poll_event().is_some() {}
    bob.close(Instant::now());
    drive_until(&mut bob, |c| c.is_closed());
    let mut tablet = connect(relay.addr, BOB);
    let id = alice.send_stored(BOB, &b"last"[..]).unwrap();
    let first = wait_for(&mut tablet, |e| match e {
        Event::Message { payload, .. } => Some(payload.clone()),
        _ => None,
    });
    assert_eq!(&first[..], b"last");
    wait_for(&mut alice, |e| {
        matches!(e, Event::Stored { id: done, .. } if *done == id).then_some(())
    });
}

/// One turn of an app's event loop: whatever the socket and the clock have, then a nap.
fn conn_step(conn: &mut Connection) {
    conn.handle_ready(Instant::now());
    conn.handle_timeout(Instant::now());
    std::thread::sleep(Duration::from_millis(1));
}

/// Takes events until the first message (if any), whose payload goes to `got`.
fn take(conn: &mut Connection, got: &mut Vec<String>) {
    while let Some(e) = conn.poll_event() {
        if let Event::Message { payload, .. } = e {
            got.push(String::from_utf8(payload.to_vec()).unwrap());
            return;
        }
    }
}
