//! The client core driven by hand with a simulated clock: no sockets, no sleeps.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::*;
use crate::proto::decode::decode_frame;
use crate::proto::frame::{write_ack, write_error};
use crate::proto::{ErrorCode, Flags, Frame, LoginOk, MessageId, Opcode, UserId};

const ME: UserId = UserId(1001);
const BOB: UserId = UserId(1002);

fn config() -> ClientConfig {
    let mut c = ClientConfig::new(ME);
    c.heartbeat_interval = Duration::from_secs(20);
    c.heartbeat_timeout = Duration::from_secs(10);
    c.backoff_initial = Duration::from_millis(500);
    c.max_in_flight = 4;
    c.stored_inbox = false; // tested on its own below
    c
}

/// Takes every frame the core wants written.
pub(super) fn written(core: &mut ClientCore) -> Vec<Frame> {
    let mut buf = BytesMut::from(core.output());
    core.consume_output(buf.len());
    let mut frames = Vec::new();
    while let Some(frame) = decode_frame(&mut buf, 1 << 20).unwrap() {
        frames.push(frame.unwrap());
    }
    frames
}

pub(super) fn events(core: &mut ClientCore) -> Vec<Event> {
    std::iter::from_fn(|| core.poll_event()).collect()
}

fn feed(core: &mut ClientCore, frame: &[u8], now: Instant) {
    let mut buf = BytesMut::from(frame);
    core.handle_input(&mut buf, now);
}

fn login_ok(msg_id: MessageId) -> Bytes {
    let limits = LoginOk {
        max_frame: 65536,
        ping_interval_ms: 30_000,
        idle_timeout_ms: 90_000,
        out_cap: 1 << 20,
        heartbeat: None,
    };
    Frame::new(
        Opcode::LoginOk,
        msg_id,
        ME,
        Bytes::copy_from_slice(&limits.to_bytes()),
    )
    .to_bytes()
}

fn ack(id: MessageId, devices: u32) -> Bytes {
    let mut buf = BytesMut::new();
    write_ack(&mut buf, id, BOB, devices);
    buf.freeze()
}

/// Connects and logs in; returns the core in Ready with its output drained.
fn ready(now: Instant) -> ClientCore {
    let mut core = ClientCore::new(config(), now, 7);
    connect(&mut core, now);
    core
}

/// Runs one connect + login on `core` (which must be due to connect at `now`).
fn connect(core: &mut ClientCore, now: Instant) -> Vec<Frame> {
    assert_eq!(core.poll_action(now), Some(LinkAction::Connect));
    core.handle_connected(now);
    let out = written(core);
    assert_eq!(out[0].opcode, Opcode::Login);
    assert_eq!(out[0].target, ME);
    feed(core, &login_ok(out[0].msg_id), now);
    assert!(matches!(events(core)[0], Event::Connected { user: ME, .. }));
    assert_eq!(core.phase(), Phase::Ready);
    written(core)
}

#[test]
fn sends_carry_dedup_and_end_as_one_delivered_event() {
    let now = Instant::now();
    let mut core = ready(now);
    let id = core.send(BOB, Bytes::from_static(b"hi"), now).unwrap();
    let out = written(&mut core);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].opcode, Opcode::Send);
    assert_eq!(out[0].flags, Flags::DEDUP);
    assert_eq!((out[0].msg_id, out[0].target), (id, BOB));
    feed(&mut core, &ack(id, 2), now);
    assert_eq!(events(&mut core), vec![Event::Delivered { id, devices: 2 }]);
    feed(&mut core, &ack(id, 2), now);
    assert!(
        events(&mut core).is_empty(),
        "a second ACK is not a second event"
    );
    assert_eq!(core.pending(), 0);
}

#[test]
fn messages_sent_while_down_go_out_after_login_and_unacked_ones_are_resent() {
    let t0 = Instant::now();
    let mut core = ready(t0);
    let a = core.send(BOB, Bytes::from_static(b"a"), t0).unwrap();
    assert_eq!(written(&mut core).len(), 1);
    core.handle_link_error(DisconnectReason::ClosedByRelay, t0);
    assert_eq!(core.poll_action(t0), Some(LinkAction::Disconnect));
    let retry_in = match events(&mut core).as_slice() {
        [Event::Disconnected {
            reason: DisconnectReason::ClosedByRelay,
            retry_in,
        }] => *retry_in,
        other => panic!("{other:?}"),
    };
    assert!(retry_in >= Duration::from_millis(250) && retry_in <= Duration::from_millis(500));
    let b = core.send(BOB, Bytes::from_static(b"b"), t0).unwrap();
    assert!(core.output().is_empty(), "nothing is written while down");
    assert_eq!(core.poll_action(t0), None, "waits for the backoff");

    let t1 = t0 + retry_in;
    let resent = connect(&mut core, t1);
    let ids: Vec<_> = resent.iter().map(|f| (f.msg_id, f.flags)).collect();
    assert_eq!(
        ids,
        vec![(a, Flags::DEDUP), (b, Flags::DEDUP)],
        "same ids, in order"
    );
    feed(&mut core, &ack(a, 1), t1);
    feed(&mut core, &ack(b, 1), t1);
    assert_eq!(
        events(&mut core),
        vec![
            Event::Delivered { id: a, devices: 1 },
            Event::Delivered { id: b, devices: 1 }
        ]
    );
}

#[test]
fn at_most_max_in_flight_messages_are_unanswered() {
    let now = Instant::now();
    let mut core = ready(now);
    let ids: Vec<_> = (0..6)
        .map(|i| core.send(BOB, Bytes::from(vec![i]), now).unwrap())
        .collect();
    assert_eq!(written(&mut core).len(), 4);
    feed(&mut core, &ack(ids[0], 1), now);
    let next = written(&mut core);
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].msg_id, ids[4]);
}

#[test]
fn a_relay_error_fails_that_message_only() {
    let now = Instant::now();
    let mut core = ready(now);
    let a = core.send(BOB, Bytes::from_static(b"a"), now).unwrap();
    let b = core.send(BOB, Bytes::from_static(b"b"), now).unwrap();
    written(&mut core);
    let mut err = BytesMut::new();
    write_error(
        &mut err,
        a,
        BOB,
        ErrorCode::RecipientOffline,
        "user 1002 is not connected",
    );
    feed(&mut core, &err, now);
    feed(&mut core, &ack(b, 1), now);
    assert_eq!(
        events(&mut core),
        vec![
            Event::Failed {
                id: a,
                reason: FailReason::Rejected {
                    code: ErrorCode::RecipientOffline as u16,
                    reason: "user 1002 is not connected".to_string()
                }
            },
            Event::Delivered { id: b, devices: 1 }
        ]
    );
}

#[test]
fn a_duplicate_delivery_is_shown_once() {
    let now = Instant::now();
    let mut core = ready(now);
    let deliver = Frame::new(
        Opcode::Deliver,
        MessageId(77),
        ME,
        Bytes::from_static(b"yo"),
    )
    .with_source(BOB)
    .to_bytes();
    feed(&mut core, &deliver, now);
    // The relay restarted and the sender resent: the same (sender, id) again.
    core.handle_link_error(DisconnectReason::ClosedByRelay, now);
    let later = now + Duration::from_secs(1);
    events(&mut core);
    assert_eq!(core.poll_action(now), Some(LinkAction::Disconnect));
    connect(&mut core, later);
    feed(&mut core, &deliver, later);
    assert!(events(&mut core).is_empty());
    let from_other = Frame::new(Opcode::Deliver, MessageId(77), ME, Bytes::from_static(b"x"))
        .with_source(UserId(5))
        .to_bytes();
    feed(&mut core, &from_other, later);
    assert_eq!(
        events(&mut core).len(),
        1,
        "same id from another sender is new"
    );
}

#[test]
fn heartbeat_pings_after_silence_and_declares_a_silent_link_dead() {
    let t0 = Instant::now();
    let mut core = ready(t0);
    assert_eq!(core.poll_timeout(), Some(t0 + Duration::from_secs(20)));
    let t1 = t0 + Duration::from_secs(20);
    core.handle_timeout(t1);
    let ping = written(&mut core);
    assert_eq!(ping[0].opcode, Opcode::Ping);
    assert_eq!(core.poll_timeout(), Some(t1 + Duration::from_secs(10)));

    // An answer keeps the link.
    feed(
        &mut core,
        &Frame::pong(ping[0].msg_id, Bytes::new()).to_bytes(),
        t1,
    );
    core.handle_timeout(t1 + Duration::from_secs(10));
    assert_eq!(core.phase(), Phase::Ready);

    // Silence after the next PING kills it.
    let t2 = t1 + Duration::from_secs(20);
    core.handle_timeout(t2);
    assert_eq!(written(&mut core)[0].opcode, Opcode::Ping);
    core.handle_timeout(t2 + Duration::from_secs(10));
    assert!(matches!(core.phase(), Phase::Waiting { .. }));
    assert_eq!(core.poll_action(t2), Some(LinkAction::Disconnect));
    assert!(matches!(
        events(&mut core).as_slice(),
        [Event::Disconnected {
            reason: DisconnectReason::HeartbeatTimeout,
            ..
        }]
    ));
}

#[test]
fn relay_pings_are_answered_with_pongs() {
    let now = Instant::now();
    let mut core = ready(now);
    feed(
        &mut core,
        &Frame::ping(MessageId(9), Bytes::from_static(b"t")).to_bytes(),
        now,
    );
    let out = written(&mut core);
    assert_eq!((out[0].opcode, out[0].msg_id), (Opcode::Pong, MessageId(9)));
    assert_eq!(&out[0].payload[..], b"t");
}

#[test]
fn a_refused_login_backs_off_and_tries_again() {
    let t0 = Instant::now();
    let mut core = ClientCore::new(config(), t0, 1);
    assert_eq!(core.poll_action(t0), Some(LinkAction::Connect));
    core.handle_connected(t0);
    let login = written(&mut core);
    let mut err = BytesMut::new();
    write_error(
        &mut err,
        login[0].msg_id,
        ME,
        ErrorCode::LimitReached,
        "too many devices",
    );
    feed(&mut core, &err, t0);
    assert_eq!(core.poll_action(t0), Some(LinkAction::Disconnect));
    let Phase::Waiting { at } = core.phase() else {
        panic!("{:?}", core.phase());
    };
    assert!(matches!(
        events(&mut core).as_slice(),
        [Event::Disconnected {
            reason: DisconnectReason::LoginRejected { code: 8, .. },
            ..
        }]
    ));
    assert_eq!(core.poll_action(at), Some(LinkAction::Connect));
}

#[test]
fn connect_and_login_timeouts_bring_the_link_down() {
    let t0 = Instant::now();
    let mut core = ClientCore::new(config(), t0, 3);
    assert_eq!(core.poll_action(t0), Some(LinkAction::Connect));
    core.handle_timeout(t0 + Duration::from_secs(10));
    assert!(matches!(
        events(&mut core).as_slice(),
        [Event::Disconnected {
            reason: DisconnectReason::ConnectFailed(_),
            ..
        }]
    ));
    let Phase::Waiting { at } = core.phase() else {
        panic!()
    };
    assert_eq!(core.poll_action(at), Some(LinkAction::Disconnect));
    assert_eq!(core.poll_action(at), Some(LinkAction::Connect));
    core.handle_connected(at);
    core.handle_timeout(at + Duration::from_secs(10));
    assert!(matches!(
        events(&mut core).as_slice(),
        [Event::Disconnected {
            reason: DisconnectReason::LoginTimeout,
            ..
        }]
    ));
}

#[test]
fn messages_never_answered_fail_at_the_send_timeout_with_the_right_reason() {
    let t0 = Instant::now();
    let mut cfg = config();
    cfg.max_in_flight = 1;
    let mut core = ClientCore::new(cfg, t0, 5);
    connect(&mut core, t0);
    let sent = core.send(BOB, Bytes::from_static(b"a"), t0).unwrap();
    let queued = core.send(BOB, Bytes::from_static(b"b"), t0).unwrap();
    core.handle_timeout(t0 + Duration::from_secs(60));
    let failures: Vec<_> = events(&mut core)
        .into_iter()
        .filter(|e| matches!(e, Event::Failed { .. }))
        .collect();
    assert_eq!(
        failures,
        vec![
            Event::Failed {
                id: sent,
                reason: FailReason::Unconfirmed
            },
            Event::Failed {
                id: queued,
                reason: FailReason::NotSent
            },
        ]
    );
    assert_eq!(core.pending(), 0);
}

#[test]
fn send_refuses_what_cannot_work() {
    let now = Instant::now();
    let mut cfg = config();
    cfg.max_outbox = 1;
    let mut core = ClientCore::new(cfg, now, 2);
    assert_eq!(
        core.send(UserId::NONE, Bytes::new(), now),
        Err(SendError::InvalidRecipient)
    );
    assert_eq!(
        core.send(BOB, Bytes::from(vec![0; 70_000]), now),
        Err(SendError::TooLarge)
    );
    core.send(BOB, Bytes::new(), now).unwrap();
    assert_eq!(
        core.send(BOB, Bytes::new(), now),
        Err(SendError::OutboxFull)
    );
    assert_eq!(
        core.room_send(crate::proto::RoomId(1), Bytes::new()),
        Err(SendError::NotConnected)
    );
}

#[test]
fn close_waits_for_answers_in_flight_and_fails_the_rest() {
    let now = Instant::now();
    let mut cfg = config();
    cfg.max_in_flight = 1;
    let mut core = ClientCore::new(cfg, now, 9);
    connect(&mut core, now);
    let a = core.send(BOB, Bytes::from_static(b"a"), now).unwrap();
    let b = core.send(BOB, Bytes::from_static(b"b"), now).unwrap();
    written(&mut core);
    core.close(now);
    let bye = written(&mut core);
    assert_eq!(bye[0].opcode, Opcode::Bye);
    assert_eq!(core.send(BOB, Bytes::new(), now), Err(SendError::Closed));
    feed(&mut core, &ack(a, 1), now);
    feed(&mut core, &Frame::bye(bye[0].msg_id).to_bytes(), now);
    assert_eq!(
        events(&mut core),
        vec![
            Event::Failed {
                id: b,
                reason: FailReason::Closed
            },
            Event::Delivered { id: a, devices: 1 },
            Event::Closed
        ]
    );
    assert_eq!(core.poll_action(now), Some(LinkAction::Disconnect));
    assert!(core.is_closed());
}

#[test]
fn rooms_are_joined_again_after_a_reconnect() {
    let now = Instant::now();
    let mut core = ready(now);
    core.join(crate::proto::RoomId(7)).unwrap();
    assert_eq!(written(&mut core)[0].opcode, Opcode::Join);
    core.handle_link_error(DisconnectReason::ClosedByRelay, now);
    let later = now + Duration::from_secs(1);
    events(&mut core);
    let _ = core.poll_action(now);
    let rejoin = connect(&mut core, later);
    assert_eq!(rejoin[0].opcode, Opcode::Join);
    assert_eq!(rejoin[0].target, UserId(7));
}

#[test]
fn message_ids_are_unique_per_client_instance() {
    let now = Instant::now();
    let mut a = ClientCore::new(config(), now, 2);
    let mut b = ClientCore::new(config(), now, 3);
    let ia = a.send(BOB, Bytes::new(), now).unwrap();
    let ib = b.send(BOB, Bytes::new(), now).unwrap();
    assert_ne!(ia, ib, "two devices of one user must not share ids");
    assert_ne!(ia.0, 0);
}

#[test]
fn try_later_answers_hold_the_message_and_write_it_again() {
    let t0 = Instant::now();
    let mut core = ready(t0);
    let fresh = core.send(BOB, Bytes::from_static(b"a"), t0).unwrap();
    written(&mut core);
    // RECIPIENT_SLOW: kept, written again after the retry interval with the same id.
    let mut err = BytesMut::new();
    write_error(&mut err, fresh, BOB, ErrorCode::RecipientSlow, "full queue");
    feed(&mut core, &err, t0);
    assert!(events(&mut core).is_empty());
    let retry_at = t0 + Duration::from_secs(1);
    assert_eq!(core.poll_timeout(), Some(retry_at));
    core.handle_timeout(retry_at);
    let again = written(&mut core);
    assert_eq!((again[0].msg_id, again[0].flags), (fresh, Flags::DEDUP));

    // A resend answered RECIPIENT_OFFLINE is held too: its first copy may have arrived.
    core.handle_link_error(DisconnectReason::ClosedByRelay, retry_at);
    let t1 = retry_at + Duration::from_secs(1);
    events(&mut core);
    let _ = core.poll_action(retry_at);
    assert_eq!(connect(&mut core, t1)[0].msg_id, fresh);
    err.clear();
    write_error(
        &mut err,
        fresh,
        BOB,
        ErrorCode::RecipientOffline,
        "not connected",
    );
    feed(&mut core, &err, t1);
    assert!(events(&mut core).is_empty());
    assert_eq!(core.pending(), 1);

    // A first send answered RECIPIENT_OFFLINE fails at once: nothing was delivered.
    let new = core.send(BOB, Bytes::from_static(b"b"), t1).unwrap();
    written(&mut core);
    err.clear();
    write_error(
        &mut err,
        new,
        BOB,
        ErrorCode::RecipientOffline,
        "not connected",
    );
    feed(&mut core, &err, t1);
    assert!(matches!(
        events(&mut core).as_slice(),
        [Event::Failed {
            reason: FailReason::Rejected { code: 6, .. },
            ..
        }]
    ));
}

#[test]
fn a_direct_message_queued_at_a_link_drop_is_still_shown_once() {
    let now = Instant::now();
    let mut core = ready(now);
    events(&mut core);
    let deliver = Frame::new(Opcode::Deliver, MessageId(78), ME, Bytes::from_static(b"q"))
        .with_source(BOB)
        .to_bytes();
    feed(&mut core, &deliver, now);
    // The link drops before the app takes the message; after the reconnect the relay (which
    // restarted) delivers the sender's resend too.
    core.handle_link_error(DisconnectReason::ClosedByRelay, now);
    assert_eq!(core.poll_action(now), Some(LinkAction::Disconnect));
    let later = now + Duration::from_secs(1);
    assert_eq!(core.poll_action(later), Some(LinkAction::Connect));
    core.handle_connected(later);
    let login = written(&mut core);
    feed(&mut core, &login_ok(login[0].msg_id), later);
    feed(&mut core, &deliver, later);
    let evs = events(&mut core);
    let messages: Vec<_> = evs
        .iter()
        .filter(|e| matches!(e, Event::Message { .. }))
        .collect();
    assert_eq!(messages.len(), 1, "{evs:?}");
    assert!(matches!(evs[0], Event::Message { .. }), "{evs:?}");
}

#[test]
fn the_core_is_deterministic_given_its_seed() {
    /// Runs the same calls on a core built with `seed`, on a simulated clock, and records
    /// everything it does: frames written, events, timeouts (relative to the start).
    fn run(seed: u64) -> Vec<String> {
        let t0 = Instant::now();
        let mut trace = Vec::new();
        let mut core = ClientCore::new(config(), t0, seed);
        let mut now = t0;
        for round in 0..4u8 {
            trace.push(format!("{:?}", core.poll_action(now)));
            core.handle_connected(now);
            let login = written(&mut core);
            trace.push(format!("{login:?}"));
            feed(&mut core, &login_ok(login[0].msg_id), now);
            core.send(BOB, Bytes::from(vec![round]), now).unwrap();
            trace.push(format!("{:?}", written(&mut core)));
            // The link dies: the retry time is drawn from the seed.
            core.handle_link_error(DisconnectReason::ClosedByRelay, now);
            trace.push(format!("{:?}", core.poll_action(now)));
            trace.push(format!("{:?}", core.poll_timeout().map(|t| t - t0)));
            trace.push(format!("{:?}", events(&mut core)));
            let Phase::Waiting { at } = core.phase() else {
                panic!("{:?}", core.phase());
            };
            now = at;
        }
        trace
    }
    assert_eq!(run(11), run(11));
    assert_ne!(run(2), run(3), "neighbouring seeds give different clients");
}

#[test]
fn payloads_handed_to_the_app_do_not_pin_the_read_buffer() {
    let now = Instant::now();
    let mut core = ready(now);
    let deliver = Frame::new(
        Opcode::Deliver,
        MessageId(5),
        ME,
        Bytes::from_static(b"keep"),
    )
    .with_source(BOB)
    .to_bytes();
    let room = Frame::new(
        Opcode::RoomDeliver,
        MessageId(6),
        UserId(7),
        Bytes::from_static(b"room"),
    )
    .with_source(BOB)
    .to_bytes();
    let mut kept = Vec::new();
    for frame in [&deliver, &room] {
        kept.push(take_payload_read_into_a_large_buffer(&mut core, frame, now));
    }
    assert_eq!(&kept[0][..], b"keep");
    assert_eq!(&kept[1][..], b"room");
}

/// Feeds `frame` to the core from a 64 KiB read buffer, takes the one message event it
/// makes, and checks that the read buffer is its own again while the payload is still
/// held: `try_reclaim` succeeds only if no `Bytes` shares the allocation. Returns the
/// payload.
fn take_payload_read_into_a_large_buffer(
    core: &mut ClientCore,
    frame: &[u8],
    now: Instant,
) -> Bytes {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    buf.extend_from_slice(frame);
    let capacity = buf.capacity();
    core.handle_input(&mut buf, now);
    assert!(buf.is_empty());
    let payload = match events(core).as_slice() {
        [Event::Message { payload, .. } | Event::RoomMessage { payload, .. }] => payload.clone(),
        other => panic!("{other:?}"),
    };
    assert!(
        buf.try_reclaim(capacity),
        "the payload the app keeps pins the {capacity}-byte read buffer"
    );
    payload
}

#[test]
fn close_reports_written_but_unanswered_messages_as_unconfirmed() {
    let now = Instant::now();
    let mut cfg = config();
    cfg.max_in_flight = 1;
    let mut core = ClientCore::new(cfg, now, 13);
    connect(&mut core, now);
    let held = core
        .send_stored(BOB, Bytes::from_static(b"a"), now)
        .unwrap();
    let next = core.send(BOB, Bytes::from_static(b"b"), now).unwrap();
    let queued = core.send(BOB, Bytes::from_static(b"c"), now).unwrap();
    assert_eq!(written(&mut core)[0].msg_id, held);
    // "Try later": the written stored message is held back (the relay may have stored it
    // all the same), and the next one takes its place in flight.
    let mut err = BytesMut::new();
    write_error(&mut err, held, BOB, ErrorCode::RecipientSlow, "full queue");
    feed(&mut core, &err, now);
    assert_eq!(written(&mut core)[0].msg_id, next);
    core.close(now);
    let bye = written(&mut core);
    assert_eq!(bye[0].opcode, Opcode::Bye);
    feed(&mut core, &ack(next, 1), now);
    feed(&mut core, &Frame::bye(bye[0].msg_id).to_bytes(), now);
    assert_eq!(
        events(&mut core),
        vec![
            Event::Failed {
                id: held,
                reason: FailReason::Unconfirmed
            },
            Event::Failed {
                id: queued,
                reason: FailReason::Closed
            },
            Event::Delivered {
                id: next,
                devices: 1
            },
            Event::Closed
        ]
    );
}

mod stored {
    use super::*;
    use crate::proto::frame::write_frame;
    use crate::proto::InboxState;

    fn inbox_config() -> ClientConfig {
        let mut c = config();
        c.stored_inbox = true;
        c
    }

    fn state(epoch: u64, first: u64, last: u64, expired: u64) -> Bytes {
        let s = InboxState {
            epoch,
            first_seq: first,
            last_seq: last,
            expired_upto: expired,
        };
        let mut b = BytesMut::new();
        write_frame(
            &mut b,
            Opcode::InboxState,
            Flags::EMPTY,
            MessageId(0),
            ME,
            UserId::NONE,
            &s.to_bytes(),
        );
        b.freeze()
    }

    fn inbox_deliver(seq: u64, from: UserId, id: u64, text: &[u8]) -> Bytes {
        let mut p = seq.to_be_bytes().to_vec();
        p.extend_from_slice(&0u64.to_be_bytes());
        p.extend_from_slice(text);
        let mut b = BytesMut::new();
        write_frame(
            &mut b,
            Opcode::InboxDeliver,
            Flags::EMPTY,
            MessageId(id),
            ME,
            from,
            &p,
        );
        b.freeze()
    }

    /// Logs in and returns the INBOX_SYNC written after LOGIN_OK.
    fn login(core: &mut ClientCore, now: Instant) -> Frame {
        assert_eq!(core.poll_action(now), Some(LinkAction::Connect));
        core.handle_connected(now);
        let login = written(core);
        feed(core, &login_ok(login[0].msg_id), now);
        let out = written(core);
        assert_eq!(out[0].opcode, Opcode::InboxSync);
        out[0].clone()
    }

    #[test]
    fn stored_messages_are_shown_once_and_acked_in_batches_after_the_app_takes_them() {
        let t0 = Instant::now();
        let mut core = ClientCore::new(inbox_config(), t0, 4);
        let sync = login(&mut core, t0);
        assert_eq!(
            &sync.payload[..],
            &[0u8; 16][..],
            "first sync: no epoch, nothing held"
        );
        feed(&mut core, &state(9, 1, 3, 0), t0);
        for seq in 1..=3 {
            feed(&mut core, &inbox_deliver(seq, BOB, 100 + seq, b"m"), t0);
        }
        // A replay of seq 2 (after a reconnect) is not shown again.
        feed(&mut core, &inbox_deliver(2, BOB, 102, b"m"), t0);
        assert!(
            core.output().is_empty(),
            "nothing acked before the app takes it"
        );
        let shown = events(&mut core);
        assert!(matches!(shown[0], Event::Connected { .. }));
        assert_eq!(shown.len(), 4, "{shown:?}");
        let due = core.poll_timeout().unwrap();
        assert_eq!(due, t0 + Duration::from_millis(100));
        core.handle_timeout(due);
        let ack = written(&mut core);
        assert_eq!(ack[0].opcode, Opcode::InboxAck);
        assert_eq!(&ack[0].payload[..], &3u64.to_be_bytes());
    }

    #[test]
    fn a_sync_a_cluster_node_could_not_answer_is_sent_again_after_the_retry_interval() {
        let t0 = Instant::now();
        let mut core = ClientCore::new(inbox_config(), t0, 5);
        let sync = login(&mut core, t0);
        let mut err = BytesMut::new();
        let reason = "the cluster link is down: stored messages live in Redis; sync again";
        write_error(
            &mut err,
            sync.msg_id,
            UserId::NONE,
            ErrorCode::ClusterUnavailable,
            reason,
        );
        feed(&mut core, &err, t0);
        assert!(written(&mut core).is_empty(), "not at once");
        let due = core.poll_timeout().unwrap();
        assert_eq!(due, t0 + core.config().retry_interval);
        core.handle_timeout(due);
        let again = written(&mut core);
        assert_eq!(again.len(), 1, "{again:?}");
        assert_eq!(again[0].opcode, Opcode::InboxSync);
        assert_eq!(
            again[0].payload, sync.payload,
            "the same place in the inbox"
        );
        assert_ne!(again[0].msg_id, sync.msg_id);
        // Answered this time: no more syncs.
        feed(&mut core, &state(9, 1, 0, 0), due);
        let later = core.poll_timeout().unwrap();
        core.handle_timeout(later);
        assert!(written(&mut core)
            .iter()
            .all(|f| f.opcode != Opcode::InboxSync));
        assert!(
            !events(&mut core)
                .iter()
                .any(|e| matches!(e, Event::Error { .. })),
            "the refusal is not the app's concern"
        );
    }

    #[test]
    fn the_next_sync_says_what_the_app_has_and_expiries_become_a_gap() {
        let t0 = Instant::now();
        let mut core = ClientCore::new(inbox_config(), t0, 6);
        login(&mut core, t0);
        feed(&mut core, &state(9, 1, 2, 0), t0);
        feed(&mut core, &inbox_deliver(1, BOB, 1, b"a"), t0);
        feed(&mut core, &inbox_deliver(2, BOB, 2, b"b"), t0);
        // The app took only the first message when the link died.
        assert!(matches!(core.poll_event(), Some(Event::Connected { .. })));
        assert!(matches!(core.poll_event(), Some(Event::Message { .. })));
        core.handle_link_error(DisconnectReason::ClosedByRelay, t0);
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(core.poll_action(t0), Some(LinkAction::Disconnect));
        let sync = login(&mut core, t1);
        let mut expect = 9u64.to_be_bytes().to_vec();
        expect.extend_from_slice(&1u64.to_be_bytes());
        assert_eq!(&sync.payload[..], &expect[..], "epoch 9, the app has 1");
        // Meanwhile 2..=4 expired on the relay.
        feed(&mut core, &state(9, 5, 5, 4), t1);
        feed(&mut core, &inbox_deliver(5, BOB, 5, b"e"), t1);
        let evs = events(&mut core);
        assert!(matches!(evs[0], Event::Disconnected { .. }));
        assert!(matches!(evs[1], Event::Connected { .. }));
        assert_eq!(evs[2], Event::Gap { from: 2, to: 4 });
        assert!(matches!(&evs[3], Event::Message { payload, .. } if &payload[..] == b"e"));
        assert_eq!(evs.len(), 4, "message 2 was not shown twice: {evs:?}");
    }

    #[test]
    fn a_stored_send_carries_the_flags_and_ends_as_stored() {
        let now = Instant::now();
        let mut core = ClientCore::new(inbox_config(), now, 8);
        login(&mut core, now);
        let id = core
            .send_stored(BOB, Bytes::from_static(b"later"), now)
            .unwrap();
        let out = written(&mut core);
        assert_eq!(out[0].flags, Flags::DEDUP.union(Flags::STORED));
        feed(&mut core, &ack(id, 0), now);
        assert!(events(&mut core).contains(&Event::Stored { id, devices: 0 }));
    }

    #[test]
    fn a_stored_message_not_taken_before_a_link_drop_is_replayed_shown_and_only_then_acked() {
        let t0 = Instant::now();
        let mut core = ClientCore::new(inbox_config(), t0, 10);
        login(&mut core, t0);
        feed(&mut core, &state(9, 1, 2, 0), t0);
        feed(&mut core, &inbox_deliver(1, BOB, 101, b"one"), t0);
        feed(&mut core, &inbox_deliver(2, BOB, 102, b"two"), t0);
        // The app takes message 1; the link drops with message 2 still queued.
        assert!(matches!(core.poll_event(), Some(Event::Connected { .. })));
        assert!(matches!(
            core.poll_event(),
            Some(Event::Message {
                id: MessageId(101),
                ..
            })
        ));
        core.handle_link_error(DisconnectReason::ClosedByRelay, t0);
        assert_eq!(core.poll_action(t0), Some(LinkAction::Disconnect));
        let t1 = t0 + Duration::from_secs(1);
        let sync = login(&mut core, t1);
        assert_eq!(
            &sync.payload[8..],
            &1u64.to_be_bytes(),
            "the app has 1, not 2"
        );
        // The relay replays message 2.
        feed(&mut core, &state(9, 2, 2, 0), t1);
        feed(&mut core, &inbox_deliver(2, BOB, 102, b"two"), t1);
        // Nothing is acked before the app takes message 2.
        core.handle_timeout(t1 + Duration::from_secs(1));
        assert!(
            written(&mut core)
                .iter()
                .all(|f| f.opcode != Opcode::InboxAck),
            "acked a message the app has not taken"
        );
        let evs = events(&mut core);
        let shown: Vec<_> = evs
            .iter()
            .filter_map(|e| match e {
                Event::Message { id, payload, .. } => Some((*id, payload.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(
            shown,
            vec![(MessageId(102), Bytes::from_static(b"two"))],
            "{evs:?}"
        );
        let t2 = t1 + Duration::from_secs(2);
        core.handle_timeout(t2);
        let ack = written(&mut core);
        assert_eq!(ack[0].opcode, Opcode::InboxAck);
        assert_eq!(&ack[0].payload[..], &2u64.to_be_bytes());
    }

    #[test]
    fn a_stored_message_taken_while_the_link_is_down_is_the_apps() {
        let t0 = Instant::now();
        let mut core = ClientCore::new(inbox_config(), t0, 14);
        login(&mut core, t0);
        feed(&mut core, &state(9, 1, 1, 0), t0);
        feed(&mut core, &inbox_deliver(1, BOB, 101, b"one"), t0);
        core.handle_link_error(DisconnectReason::ClosedByRelay, t0);
        assert_eq!(core.poll_action(t0), Some(LinkAction::Disconnect));
        let evs = events(&mut core);
        assert!(
            matches!(
                evs[1],
                Event::Message {
                    id: MessageId(101),
                    ..
                }
            ),
            "{evs:?}"
        );
        let sync = login(&mut core, t0 + Duration::from_secs(1));
        assert_eq!(&sync.payload[8..], &1u64.to_be_bytes());
    }

    #[test]
    fn a_duplicate_stored_copy_is_shown_once_and_still_acked() {
        let t0 = Instant::now();
        let mut core = ClientCore::new(inbox_config(), t0, 15);
        login(&mut core, t0);
        feed(&mut core, &state(9, 1, 2, 0), t0);
        // The sender's resend after a relay restart was stored again under a new number.
        feed(&mut core, &inbox_deliver(1, BOB, 101, b"one"), t0);
        feed(&mut core, &inbox_deliver(2, BOB, 101, b"one"), t0);
        let evs = events(&mut core);
        assert_eq!(
            evs.iter()
                .filter(|e| matches!(e, Event::Message { .. }))
                .count(),
            1,
            "{evs:?}"
        );
        core.handle_timeout(t0 + Duration::from_secs(1));
        let ack = written(&mut core);
        assert_eq!(&ack[0].payload[..], &2u64.to_be_bytes());
    }

    #[test]
    fn a_gap_not_taken_before_a_link_drop_is_reported_again() {
        let t0 = Instant::now();
        let mut core = ClientCore::new(inbox_config(), t0, 16);
        login(&mut core, t0);
        feed(&mut core, &state(9, 4, 3, 3), t0);
        assert!(matches!(core.poll_event(), Some(Event::Connected { .. })));
        core.handle_link_error(DisconnectReason::ClosedByRelay, t0);
        assert_eq!(core.poll_action(t0), Some(LinkAction::Disconnect));
        let t1 = t0 + Duration::from_secs(1);
        let sync = login(&mut core, t1);
        assert_eq!(&sync.payload[8..], &0u64.to_be_bytes());
        feed(&mut core, &state(9, 4, 3, 3), t1);
        let gaps: Vec<_> = events(&mut core)
            .into_iter()
            .filter(|e| matches!(e, Event::Gap { .. }))
            .collect();
        assert_eq!(gaps, vec![Event::Gap { from: 1, to: 3 }]);
    }

    #[test]
    fn stored_payloads_do_not_pin_the_read_buffer() {
        let now = Instant::now();
        let mut core = ClientCore::new(inbox_config(), now, 17);
        login(&mut core, now);
        feed(&mut core, &state(9, 1, 1, 0), now);
        events(&mut core);
        let frame = inbox_deliver(1, BOB, 101, b"stored");
        let payload = take_payload_read_into_a_large_buffer(&mut core, &frame, now);
        assert_eq!(&payload[..], b"stored");
    }
}

/// Found by the simulation (seed 8915 of a 20,000-seed soak): the relay refuses a STORED
/// SEND whose INBOX_DELIVER would pass the max frame; the SDK refuses it first.
#[test]
fn a_stored_message_must_leave_room_for_what_the_inbox_adds() {
    let now = Instant::now();
    let mut core = ready(now);
    let max = 64 * 1024 - 32; // LOGIN_OK's max frame less the header
    let too_big = Bytes::from(vec![0u8; max - 15]);
    assert_eq!(
        core.send_stored(UserId(2), too_big.clone(), now),
        Err(SendError::TooLarge)
    );
    assert!(
        core.send(UserId(2), too_big, now).is_ok(),
        "a direct SEND may use it all"
    );
    assert!(core
        .send_stored(UserId(2), Bytes::from(vec![0u8; max - 16]), now)
        .is_ok());
}

mod tokens {
    //! Login tokens: the provider at every LOGIN, TOKEN_EXPIRING → REFRESH, and the
    //! answers to it (protocol.md section 16).

    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    use super::*;

    /// A provider that counts its calls and hands out "token-1", "token-2", …
    fn counting_provider() -> (TokenProvider, Arc<AtomicU64>) {
        let calls = Arc::new(AtomicU64::new(0));
        let counter = calls.clone();
        let provider: TokenProvider = Arc::new(move |user: UserId| {
            assert_eq!(user, ME);
            let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
            format!("token-{n}").into_bytes()
        });
        (provider, calls)
    }

    fn with_provider(provider: TokenProvider) -> ClientConfig {
        let mut c = config();
        c.credential = b"static".to_vec();
        c.token_provider = Some(provider);
        c
    }

    /// Connects and logs in; returns the LOGIN frame.
    fn login(core: &mut ClientCore, now: Instant) -> Frame {
        assert_eq!(core.poll_action(now), Some(LinkAction::Connect));
        core.handle_connected(now);
        let out = written(core);
        assert_eq!(out[0].opcode, Opcode::Login);
        feed(core, &login_ok(out[0].msg_id), now);
        assert!(matches!(events(core)[0], Event::Connected { .. }));
        out[0].clone()
    }

    fn token_expiring(exp: u64) -> Bytes {
        Frame::new(
            Opcode::TokenExpiring,
            MessageId(0),
            ME,
            Bytes::copy_from_slice(&exp.to_be_bytes()),
        )
        .to_bytes()
    }

    fn refresh_ok(id: MessageId, exp: u64) -> Bytes {
        Frame::new(
            Opcode::RefreshOk,
            id,
            ME,
            Bytes::copy_from_slice(&exp.to_be_bytes()),
        )
        .to_bytes()
    }

    fn error(id: MessageId, code: ErrorCode, reason: &str) -> Bytes {
        let mut buf = BytesMut::new();
        write_error(&mut buf, id, ME, code, reason);
        buf.freeze()
    }

    #[test]
    fn the_provider_gives_the_token_of_every_login() {
        let t0 = Instant::now();
        let (provider, calls) = counting_provider();
        let mut core = ClientCore::new(with_provider(provider), t0, 1);
        assert_eq!(
            calls.load(Ordering::SeqCst),
            0,
            "not asked before a connect"
        );
        let first = login(&mut core, t0);
        assert_eq!(
            &first.payload[..],
            b"token-1",
            "the provider wins over `credential`"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        core.handle_link_error(DisconnectReason::ClosedByRelay, t0);
        let Phase::Waiting { at } = core.phase() else {
            panic!("{:?}", core.phase());
        };
        assert_eq!(core.poll_action(t0), Some(LinkAction::Disconnect));
        events(&mut core);
        assert_eq!(calls.load(Ordering::SeqCst), 1, "not asked while waiting");
        let second = login(&mut core, at);
        assert_eq!(&second.payload[..], b"token-2", "a fresh token per LOGIN");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn network_changed_drops_the_link_and_connects_again_without_the_backoff_wait() {
        let t0 = Instant::now();
        let mut core = ClientCore::new(config(), t0, 1);
        login(&mut core, t0);
        written(&mut core);
        // Up: the link goes, and the next one starts at once.
        core.network_changed(t0);
        assert_eq!(core.poll_action(t0), Some(LinkAction::Disconnect));
        assert!(matches!(
            events(&mut core)[..],
            [Event::Disconnected { .. }]
        ));
        login(&mut core, t0); // connects at t0, logs in again
        written(&mut core);
        // A failed link waits out the backoff first…
        core.handle_link_error(DisconnectReason::ClosedByRelay, t0);
        let Phase::Waiting { at } = core.phase() else {
            panic!("{:?}", core.phase());
        };
        assert!(at > t0, "the usual path waits");
        assert_eq!(core.poll_action(t0), Some(LinkAction::Disconnect));
        assert_eq!(
            core.poll_action(t0),
            None,
            "nothing until the backoff is over"
        );
        // …the app's network change does not.
        core.network_changed(t0);
        assert_eq!(core.phase(), Phase::Waiting { at: t0 });
        assert_eq!(core.poll_action(t0), Some(LinkAction::Connect));
        assert!(events(&mut core).iter().any(
            |e| matches!(e, Event::Disconnected { retry_in, .. } if *retry_in > Duration::ZERO)
        ));
    }

    #[test]
    fn a_device_id_goes_in_every_login_and_copies_of_own_messages_are_told_apart() {
        let t0 = Instant::now();
        let mut c = config();
        c.credential = b"static".to_vec();
        c.device = Some("tablet".to_string());
        let mut core = ClientCore::new(c, t0, 1);
        let login = login(&mut core, t0);
        assert_eq!(login.flags, Flags::DEVICE.union(Flags::HEARTBEAT));
        assert_eq!(
            crate::proto::split_login(login.flags, &login.payload),
            Ok((Some("tablet"), &b"static"[..]))
        );
        written(&mut core);
        // The relay pushes a copy of what this user sent from its phone, then a message
        // from someone else.
        let deliver = |seq: u64, to: UserId, from: UserId, text: &'static [u8]| {
            let mut p = seq.to_be_bytes().to_vec();
            p.extend_from_slice(&0u64.to_be_bytes());
            p.extend_from_slice(text);
            Frame::new(Opcode::InboxDeliver, MessageId(seq), to, Bytes::from(p))
                .with_source(from)
                .to_bytes()
        };
        feed(
            &mut core,
            &deliver(1, UserId(9), ME, b"sent from the phone"),
            t0,
        );
        feed(&mut core, &deliver(2, ME, UserId(9), b"an answer"), t0);
        let got = events(&mut core);
        assert_eq!(
            got,
            [
                Event::SentFromOtherDevice {
                    to: UserId(9),
                    id: MessageId(1),
                    payload: Bytes::from_static(b"sent from the phone"),
                },
                Event::Message {
                    from: UserId(9),
                    id: MessageId(2),
                    payload: Bytes::from_static(b"an answer"),
                },
            ]
        );
    }

    #[test]
    fn without_a_provider_the_static_credential_is_sent() {
        let t0 = Instant::now();
        let mut c = config();
        c.credential = b"static".to_vec();
        let mut core = ClientCore::new(c, t0, 1);
        assert_eq!(&login(&mut core, t0).payload[..], b"static");
    }

    #[test]
    fn token_expiring_sends_refresh_with_a_new_token_and_refresh_ok_is_reported() {
        let t0 = Instant::now();
        let (provider, calls) = counting_provider();
        let mut core = ClientCore::new(with_provider(provider), t0, 1);
        login(&mut core, t0);
        written(&mut core);

        feed(&mut core, &token_expiring(1_700_000_000), t0);
        let out = written(&mut core);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].opcode, Opcode::Refresh);
        assert_eq!(out[0].target, UserId::NONE, "REFRESH takes target 0");
        assert_eq!(&out[0].payload[..], b"token-2");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(
            events(&mut core),
            vec![Event::TokenExpiring { exp: 1_700_000_000 }]
        );

        feed(&mut core, &refresh_ok(MessageId(12345), 9), t0);
        assert!(events(&mut core).is_empty(), "an answer to another id");
        feed(&mut core, &refresh_ok(out[0].msg_id, 1_700_003_600), t0);
        assert_eq!(
            events(&mut core),
            vec![Event::TokenRefreshed { exp: 1_700_003_600 }]
        );
        assert_eq!(core.phase(), Phase::Ready);

        // The new token's own notice, later: refreshed again.
        feed(&mut core, &token_expiring(1_700_003_600), t0);
        let out = written(&mut core);
        assert_eq!(out[0].opcode, Opcode::Refresh);
        assert_eq!(&out[0].payload[..], b"token-3");
    }

    #[test]
    fn a_refused_refresh_is_reported_and_the_link_stays_up() {
        let t0 = Instant::now();
        let (provider, _) = counting_provider();
        let mut core = ClientCore::new(with_provider(provider), t0, 1);
        login(&mut core, t0);
        written(&mut core);
        feed(&mut core, &token_expiring(100), t0);
        let refresh = written(&mut core).remove(0);
        events(&mut core);
        feed(
            &mut core,
            &error(
                refresh.msg_id,
                ErrorCode::AuthFailed,
                "REFRESH: bad signature",
            ),
            t0,
        );
        assert_eq!(
            events(&mut core),
            vec![Event::RefreshFailed {
                code: ErrorCode::AuthFailed as u16,
                reason: "REFRESH: bad signature".to_string(),
            }]
        );
        assert_eq!(core.phase(), Phase::Ready);
        assert_eq!(core.poll_action(t0), None);
    }

    #[test]
    fn a_notice_for_a_token_no_newer_than_the_last_is_not_refreshed_again() {
        let t0 = Instant::now();
        // A provider that keeps giving the same (nearly expired) token.
        let calls = Arc::new(AtomicU64::new(0));
        let counter = calls.clone();
        let provider: TokenProvider = Arc::new(move |_| {
            counter.fetch_add(1, Ordering::SeqCst);
            b"same".to_vec()
        });
        let mut core = ClientCore::new(with_provider(provider), t0, 1);
        login(&mut core, t0);
        written(&mut core);
        feed(&mut core, &token_expiring(100), t0);
        let refresh = written(&mut core).remove(0);
        feed(&mut core, &refresh_ok(refresh.msg_id, 100), t0);
        // The relay notices the "new" token at once: same exp, no second REFRESH.
        feed(&mut core, &token_expiring(100), t0);
        assert!(written(&mut core).is_empty(), "no REFRESH loop");
        assert_eq!(calls.load(Ordering::SeqCst), 2, "LOGIN and one REFRESH");
        assert_eq!(
            events(&mut core),
            vec![
                Event::TokenExpiring { exp: 100 },
                Event::TokenRefreshed { exp: 100 },
                Event::TokenExpiring { exp: 100 },
            ]
        );
    }

    #[test]
    fn an_empty_token_from_the_provider_sends_no_refresh() {
        let t0 = Instant::now();
        let provider: TokenProvider = Arc::new(|_| Vec::new());
        let mut core = ClientCore::new(with_provider(provider), t0, 1);
        assert!(login(&mut core, t0).payload.is_empty());
        written(&mut core);
        feed(&mut core, &token_expiring(100), t0);
        assert!(written(&mut core).is_empty());
        assert_eq!(events(&mut core), vec![Event::TokenExpiring { exp: 100 }]);
    }

    #[test]
    fn without_a_provider_the_app_refreshes_by_hand_and_the_new_token_logs_in_next() {
        let t0 = Instant::now();
        let mut c = config();
        c.credential = b"old".to_vec();
        let mut core = ClientCore::new(c, t0, 1);
        login(&mut core, t0);
        written(&mut core);
        feed(&mut core, &token_expiring(100), t0);
        assert!(written(&mut core).is_empty(), "nothing to refresh with");
        assert_eq!(events(&mut core), vec![Event::TokenExpiring { exp: 100 }]);

        core.refresh_token(b"new".to_vec()).unwrap();
        let refresh = written(&mut core).remove(0);
        assert_eq!(
            (refresh.opcode, &refresh.payload[..]),
            (Opcode::Refresh, &b"new"[..])
        );
        feed(&mut core, &refresh_ok(refresh.msg_id, 200), t0);
        assert_eq!(events(&mut core), vec![Event::TokenRefreshed { exp: 200 }]);

        core.handle_link_error(DisconnectReason::ClosedByRelay, t0);
        let Phase::Waiting { at } = core.phase() else {
            panic!("{:?}", core.phase());
        };
        core.poll_action(t0);
        events(&mut core);
        assert_eq!(&login(&mut core, at).payload[..], b"new");
    }

    #[test]
    fn token_expired_closes_and_the_next_login_asks_the_provider_again() {
        let t0 = Instant::now();
        let (provider, calls) = counting_provider();
        let mut core = ClientCore::new(with_provider(provider), t0, 1);
        login(&mut core, t0);
        written(&mut core);
        feed(
            &mut core,
            &error(
                MessageId(0),
                ErrorCode::TokenExpired,
                "the login token expired at 100 and was not refreshed",
            ),
            t0,
        );
        // The relay closes after its ERROR: the driver sees EOF.
        core.handle_link_error(DisconnectReason::ClosedByRelay, t0);
        let got = events(&mut core);
        assert!(
            matches!(
                got.as_slice(),
                [
                    Event::Error { code: 21, .. },
                    Event::Disconnected {
                        reason: DisconnectReason::ClosedByRelay,
                        ..
                    }
                ]
            ),
            "{got:?}"
        );
        let Phase::Waiting { at } = core.phase() else {
            panic!("{:?}", core.phase());
        };
        core.poll_action(t0);
        assert_eq!(&login(&mut core, at).payload[..], b"token-2");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_login_refused_for_its_token_backs_off_longer_each_time() {
        let t0 = Instant::now();
        let (provider, calls) = counting_provider();
        let mut c = with_provider(provider);
        c.backoff_initial = Duration::from_millis(500);
        c.backoff_max = Duration::from_secs(30);
        let mut core = ClientCore::new(c, t0, 1);
        let mut now = t0;
        let mut waits = Vec::new();
        for attempt in 1..=5u64 {
            assert_eq!(core.poll_action(now), Some(LinkAction::Connect));
            core.handle_connected(now);
            let login = written(&mut core).remove(0);
            assert_eq!(login.payload, format!("token-{attempt}").into_bytes());
            feed(
                &mut core,
                &error(login.msg_id, ErrorCode::AuthFailed, "LOGIN: token expired"),
                now,
            );
            assert_eq!(core.poll_action(now), Some(LinkAction::Disconnect));
            let got = events(&mut core);
            let [Event::Disconnected {
                reason: DisconnectReason::LoginRejected { code: 20, reason },
                retry_in,
            }] = got.as_slice()
            else {
                panic!("{got:?}");
            };
            assert_eq!(reason, "LOGIN: token expired");
            assert_eq!(core.poll_action(now), None, "no attempt before the backoff");
            waits.push(*retry_in);
            now += *retry_in;
        }
        assert_eq!(calls.load(Ordering::SeqCst), 5, "one token per attempt");
        // Jittered within the upper half of a doubling step: each step's floor is the
        // previous step's ceiling, so the waits never shrink.
        for pair in waits.windows(2) {
            assert!(pair[1] >= pair[0], "{waits:?}");
        }
        assert!(waits[4] >= Duration::from_secs(4), "{waits:?}");
    }
}
