//! The adaptive heartbeat and the app lifecycle (`set_foreground`) of the client core,
//! driven by hand with a simulated clock: no sockets, no sleeps.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::heartbeat::PROBE_AFTER;
use super::tests::{events, written};
use super::*;
use crate::proto::{Flags, Frame, HeartbeatBounds, LoginOk, MessageId, Opcode, UserId};

const ME: UserId = UserId(1001);
const BOB: UserId = UserId(1002);

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn config() -> ClientConfig {
    let mut c = ClientConfig::new(ME);
    c.heartbeat_interval = secs(20);
    c.heartbeat_timeout = secs(10);
    c.stored_inbox = false;
    c
}

fn feed(core: &mut ClientCore, frame: Frame, now: Instant) {
    let mut buf = BytesMut::from(&frame.to_bytes()[..]);
    core.handle_input(&mut buf, now);
}

/// LOGIN_OK with heartbeat bounds `(min, max)` in seconds, or without.
fn login_ok(msg_id: MessageId, bounds: Option<(u32, u32)>) -> Frame {
    let limits = LoginOk {
        max_frame: 65536,
        ping_interval_ms: 30_000,
        idle_timeout_ms: 90_000,
        out_cap: 1 << 20,
        heartbeat: bounds.map(|(min, max)| HeartbeatBounds {
            min_ms: min * 1000,
            max_ms: max * 1000,
        }),
    };
    Frame::new(Opcode::LoginOk, msg_id, ME, Bytes::from(limits.to_bytes()))
}

/// One connect + login at `now`, answered with `bounds`.
fn connect(core: &mut ClientCore, now: Instant, bounds: Option<(u32, u32)>) {
    assert_eq!(core.poll_action(now), Some(LinkAction::Connect));
    core.handle_connected(now);
    let out = written(core);
    assert_eq!(out[0].opcode, Opcode::Login);
    assert!(
        out[0].flags.contains(Flags::HEARTBEAT),
        "the SDK always asks"
    );
    feed(core, login_ok(out[0].msg_id, bounds), now);
    assert!(matches!(
        events(core).as_slice(),
        [Event::Connected { user: ME, .. }]
    ));
    assert_eq!(core.phase(), Phase::Ready);
    written(core);
}

/// Runs the clock to the next heartbeat, checks that a PING goes out exactly
/// `expected` after the last frame from the relay, answers it, and returns the time.
/// A core (default config, seed 1) connected at `t0` to a relay that announced `bounds`.
fn connected(t0: Instant, bounds: Option<(u32, u32)>) -> ClientCore {
    let mut core = ClientCore::new(config(), t0, 1);
    connect(&mut core, t0, bounds);
    core
}

/// `n` heartbeats answered in a row, each `expected` after the one before; returns when
/// the last was answered.
fn answered_heartbeats(
    core: &mut ClientCore,
    mut t: Instant,
    n: u32,
    expected: Duration,
) -> Instant {
    for _ in 0..n {
        t = answered_heartbeat(core, t, expected);
    }
    t
}

fn answered_heartbeat(core: &mut ClientCore, last_rx: Instant, expected: Duration) -> Instant {
    let due = core.poll_timeout().expect("a heartbeat is due");
    assert_eq!(due - last_rx, expected, "heartbeat interval");
    core.handle_timeout(due);
    let out = written(core);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].opcode, Opcode::Ping);
    feed(core, Frame::pong(out[0].msg_id, Bytes::new()), due);
    due
}

/// Runs the clock to the next heartbeat and lets its PING go unanswered: the core declares
/// the link dead at the heartbeat timeout. Returns when it did, and the retry delay.
fn silent_drop(core: &mut ClientCore, last_rx: Instant, expected: Duration) -> (Instant, Duration) {
    let due = core.poll_timeout().expect("a heartbeat is due");
    assert_eq!(due - last_rx, expected, "heartbeat interval");
    core.handle_timeout(due);
    assert_eq!(written(core)[0].opcode, Opcode::Ping);
    let dead = core.poll_timeout().expect("the heartbeat timeout");
    assert_eq!(dead - due, secs(10));
    core.handle_timeout(dead);
    assert_eq!(core.poll_action(dead), Some(LinkAction::Disconnect));
    match events(core).as_slice() {
        [Event::Disconnected {
            reason: DisconnectReason::HeartbeatTimeout,
            retry_in,
        }] => (dead, *retry_in),
        other => panic!("{other:?}"),
    }
}

#[test]
fn without_bounds_the_heartbeat_is_todays_fixed_interval() {
    let t0 = Instant::now();
    let mut core = connected(t0, None);
    let t = answered_heartbeats(&mut core, t0, 3 * PROBE_AFTER, secs(20));
    assert_eq!(core.heartbeat_interval(), secs(20));
    // Background without bounds: still the configured interval.
    core.set_foreground(false, t);
    assert_eq!(core.heartbeat_interval(), secs(20));
    answered_heartbeat(&mut core, t, secs(20));
}

#[test]
fn the_interval_grows_after_answered_heartbeats_up_to_max_and_never_beyond() {
    let t0 = Instant::now();
    let mut core = connected(t0, Some((10, 30)));
    let mut t = answered_heartbeats(&mut core, t0, PROBE_AFTER, secs(20));
    // +25 %.
    t = answered_heartbeats(&mut core, t, PROBE_AFTER, secs(25));
    // 31.25 s is above the relay's max: capped there, and it stays.
    answered_heartbeats(&mut core, t, 3 * PROBE_AFTER, secs(30));
    assert_eq!(core.heartbeat_interval(), secs(30));
}

#[test]
fn a_silent_drop_goes_back_to_the_last_good_interval_and_stays_there_across_reconnects() {
    let t0 = Instant::now();
    let mut core = connected(t0, Some((10, 60)));
    let t = answered_heartbeats(&mut core, t0, PROBE_AFTER, secs(20));
    assert_eq!(core.heartbeat_interval(), secs(25));
    // The probe at 25 s gets no answer: the NAT forgot the flow.
    let (dead, retry_in) = silent_drop(&mut core, t, secs(25));
    assert_eq!(core.heartbeat_interval(), secs(20));
    assert!(core.heartbeat_state().is_stable());
    // Same network: the next link keeps what was learned, and no longer probes upward.
    let t = dead + retry_in;
    connect(&mut core, t, Some((10, 60)));
    assert_eq!(core.heartbeat_interval(), secs(20));
    answered_heartbeats(&mut core, t, 3 * PROBE_AFTER, secs(20));
    assert!(core.heartbeat_state().is_stable());
}

#[test]
fn the_bounds_from_login_ok_are_respected() {
    let t0 = Instant::now();
    // Configured below the relay's min: min.
    let mut c = config();
    c.heartbeat_interval = secs(5);
    let mut core = ClientCore::new(c, t0, 1);
    connect(&mut core, t0, Some((10, 30)));
    let t = answered_heartbeat(&mut core, t0, secs(10));
    // Failing at min: it cannot go lower.
    let (dead, retry_in) = silent_drop(&mut core, t, secs(10));
    assert_eq!(core.heartbeat_interval(), secs(10));
    let t = dead + retry_in;
    connect(&mut core, t, Some((10, 30)));
    let (dead, retry_in) = silent_drop(&mut core, t, secs(10));
    assert_eq!(core.heartbeat_interval(), secs(10));

    // Configured above the relay's max: max, and a relay with tighter bounds later
    // brings the learned interval within them.
    let mut c = config();
    c.heartbeat_interval = secs(120);
    let mut core = ClientCore::new(c, dead, 2);
    connect(&mut core, dead + retry_in, Some((10, 30)));
    assert_eq!(core.heartbeat_interval(), secs(30));
    core.network_changed(dead + retry_in);
    written(&mut core);
    events(&mut core);
    core.poll_action(dead + retry_in);
    connect(&mut core, dead + retry_in, Some((10, 15)));
    assert_eq!(core.heartbeat_interval(), secs(15));
}

#[test]
fn background_keep_alive_heartbeats_at_max_and_the_foreground_resumes_the_learned_interval() {
    let t0 = Instant::now();
    let mut core = connected(t0, Some((10, 45)));
    let mut t = answered_heartbeats(&mut core, t0, PROBE_AFTER, secs(20));
    core.set_foreground(false, t);
    assert!(!core.is_foreground());
    assert_eq!(core.heartbeat_interval(), secs(45));
    t = answered_heartbeats(&mut core, t, 2 * PROBE_AFTER, secs(45));
    // Background heartbeats teach nothing: the learned interval is where it was.
    core.set_foreground(true, t);
    assert_eq!(core.heartbeat_interval(), secs(25));
    assert_eq!(core.phase(), Phase::Ready, "KeepAlive never drops the link");
    answered_heartbeat(&mut core, t, secs(25));
}

#[test]
fn disconnect_after_closes_with_bye_after_the_grace_and_reconnects_at_once_in_the_foreground() {
    let t0 = Instant::now();
    let mut c = config();
    c.background = Background::DisconnectAfter(secs(50));
    let mut core = ClientCore::new(c, t0, 1);
    connect(&mut core, t0, Some((10, 30)));
    let bg = t0 + secs(1);
    core.set_foreground(false, bg);
    // Heartbeats at max go on until the grace is over.
    let t = answered_heartbeat(&mut core, bg - secs(1), secs(30));
    assert_eq!(t, bg + secs(29));
    let due = core.poll_timeout().unwrap();
    assert_eq!(
        due,
        bg + secs(50),
        "the grace ends before the next heartbeat"
    );
    core.handle_timeout(due);
    let out = written(&mut core);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].opcode, Opcode::Bye);
    assert!(matches!(core.phase(), Phase::Suspending { .. }));
    // A message sent meanwhile waits in the outbox.
    let id = core.send(BOB, Bytes::from_static(b"later"), due).unwrap();
    assert!(core.output().is_empty());
    feed(&mut core, Frame::bye(out[0].msg_id), due);
    assert_eq!(core.phase(), Phase::Suspended);
    assert_eq!(core.poll_action(due), Some(LinkAction::Disconnect));
    assert_eq!(
        events(&mut core),
        vec![Event::Disconnected {
            reason: DisconnectReason::Background,
            retry_in: Duration::ZERO,
        }]
    );
    // No reconnect however long the app stays in the background (only the send timeout
    // of the waiting message is a deadline).
    let far = due + secs(3600);
    assert_eq!(core.poll_action(far), None);
    assert!(core.poll_timeout().is_some_and(|t| t > due + secs(30)));
    // Foreground: a connect at once, no backoff; the message goes out after LOGIN_OK.
    let fg = due + secs(50);
    core.set_foreground(true, fg);
    assert_eq!(core.poll_action(fg), Some(LinkAction::Connect));
    core.handle_connected(fg);
    let login = written(&mut core);
    feed(&mut core, login_ok(login[0].msg_id, Some((10, 30))), fg);
    let out = written(&mut core);
    assert_eq!((out[0].opcode, out[0].msg_id), (Opcode::Send, id));
    assert!(matches!(
        events(&mut core).as_slice(),
        [Event::Connected { .. }]
    ));
}

#[test]
fn back_in_the_foreground_before_the_grace_keeps_the_link() {
    let t0 = Instant::now();
    let mut c = config();
    c.background = Background::DisconnectAfter(secs(60));
    let mut core = ClientCore::new(c, t0, 1);
    connect(&mut core, t0, Some((10, 30)));
    core.set_foreground(false, t0);
    core.set_foreground(true, t0 + secs(5));
    let mut t = answered_heartbeats(&mut core, t0, PROBE_AFTER, secs(20));
    t = answered_heartbeat(&mut core, t, secs(25));
    assert!(t > t0 + secs(60));
    assert_eq!(core.phase(), Phase::Ready);
    assert!(written(&mut core).is_empty());
}

#[test]
fn a_network_change_resets_the_learning_to_the_start_value() {
    let t0 = Instant::now();
    let mut core = connected(t0, Some((10, 60)));
    let t = answered_heartbeats(&mut core, t0, PROBE_AFTER, secs(20));
    let (dead, retry_in) = silent_drop(&mut core, t, secs(25));
    let t = dead + retry_in;
    connect(&mut core, t, Some((10, 60)));
    assert!(core.heartbeat_state().is_stable());
    // Stable: no probing after more answered heartbeats.
    let t = answered_heartbeats(&mut core, t, PROBE_AFTER, secs(20));
    core.network_changed(t);
    assert_eq!(core.poll_action(t), Some(LinkAction::Disconnect));
    events(&mut core);
    connect(&mut core, t, Some((10, 60)));
    assert!(!core.heartbeat_state().is_stable());
    assert_eq!(core.heartbeat_interval(), secs(20));
    answered_heartbeats(&mut core, t, PROBE_AFTER, secs(20));
    assert_eq!(core.heartbeat_interval(), secs(25), "probing upward again");
}

/// A relay older than the HEARTBEAT flag answers it with INVALID_FIELD: the core logs in
/// again on the same link without it, heartbeats at its fixed interval, and asks again
/// only after a network change (which may reach a newer relay).
#[test]
fn a_relay_that_refuses_the_heartbeat_flag_gets_a_login_without_it() {
    let t0 = Instant::now();
    let mut core = ClientCore::new(config(), t0, 1);
    assert_eq!(core.poll_action(t0), Some(LinkAction::Connect));
    core.handle_connected(t0);
    let first = written(&mut core);
    assert!(first[0].flags.contains(Flags::HEARTBEAT));
    refuse_login(
        &mut core,
        first[0].msg_id,
        "flags 0x0020 not allowed on LOGIN",
        t0,
    );
    assert_eq!(core.poll_action(t0), None, "the link stays up");
    assert!(events(&mut core).is_empty(), "{:?}", core.poll_event());
    let second = written(&mut core);
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].opcode, Opcode::Login);
    assert!(!second[0].flags.contains(Flags::HEARTBEAT));
    assert_ne!(second[0].msg_id, first[0].msg_id);
    feed(&mut core, login_ok(second[0].msg_id, None), t0);
    assert!(matches!(
        events(&mut core).as_slice(),
        [Event::Connected { user: ME, .. }]
    ));
    answered_heartbeat(&mut core, t0, secs(20));

    // A second refusal of the plain LOGIN is a real one: the link goes down.
    core.network_changed(t0);
    assert_eq!(core.poll_action(t0), Some(LinkAction::Disconnect));
    events(&mut core);
    assert_eq!(core.poll_action(t0), Some(LinkAction::Connect));
    core.handle_connected(t0);
    let asked = written(&mut core);
    assert!(
        asked[0].flags.contains(Flags::HEARTBEAT),
        "asks again on a new network"
    );
    for login in [asked, Vec::new()] {
        let id = match login.first() {
            Some(frame) => frame.msg_id,
            None => written(&mut core)[0].msg_id,
        };
        refuse_login(&mut core, id, "bad device id", t0);
    }
    assert_eq!(core.poll_action(t0), Some(LinkAction::Disconnect));
    assert!(matches!(
        events(&mut core).as_slice(),
        [Event::Disconnected {
            reason: DisconnectReason::LoginRejected { .. },
            ..
        }]
    ));
}

/// Feeds the core an INVALID_FIELD answer to its LOGIN `msg_id`.
fn refuse_login(core: &mut ClientCore, msg_id: MessageId, reason: &str, now: Instant) {
    let mut buf = BytesMut::new();
    crate::proto::frame::write_error(
        &mut buf,
        msg_id,
        ME,
        crate::proto::ErrorCode::InvalidField,
        reason,
    );
    core.handle_input(&mut buf, now);
}
