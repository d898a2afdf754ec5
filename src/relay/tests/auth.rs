//! Login tokens in the core: LOGIN and REFRESH checks, grants, and the token's expiry on a
//! live connection, on the harness's simulated clock (protocol.md section 16).

use super::*;
use crate::auth::{mint_hs256, RoomGrant, Verifier};

const SECRET: &[u8] = b"a test secret of at least 32 bytes!";
/// The Unix time (seconds) the harness's relay starts at.
const T0: u64 = 1_700_000_000;

fn harness() -> Harness {
    let config = Config {
        // No PINGs in the way of the token's timeline.
        ping_interval: Duration::from_secs(1000),
        idle_timeout: Duration::from_secs(2000),
        room_send_rate: 0,
        auth: Some(AuthConfig::new(Verifier::hs256_secret(SECRET).unwrap())),
        ..Config::default()
    };
    Harness::new(config)
}

fn token(user: u64, exp: u64, rooms: &RoomGrant, admin: bool) -> String {
    mint_hs256(SECRET, user, T0, exp - T0, rooms, admin, None)
}

fn login_with(h: &mut Harness, user: u64, token: &str) -> (ConnId, Vec<Frame>) {
    let id = h.open();
    h.send_frame(
        id,
        Frame::login(MessageId(1), UserId(user), token.as_bytes()),
    );
    let frames = h.take_frames(id);
    (id, frames)
}

#[test]
fn a_refused_token_gets_auth_failed_with_its_reason_and_the_connection_stays() {
    let mut h = harness();
    let (id, frames) = login_with(&mut h, 7, "not a token");
    assert_eq!(frames[0].error_code(), Some(ErrorCode::AuthFailed));
    assert_eq!(frames[0].error().unwrap().1, "LOGIN: malformed token");
    let other = token(8, T0 + 600, &RoomGrant::None, false);
    h.send_frame(id, Frame::login(MessageId(2), UserId(7), other.as_bytes()));
    let frames = h.take_frames(id);
    assert_eq!(
        frames[0].error().unwrap().1,
        "LOGIN: sub does not match user"
    );
    let good = token(7, T0 + 600, &RoomGrant::None, false);
    h.send_frame(id, Frame::login(MessageId(3), UserId(7), good.as_bytes()));
    assert_eq!(h.take_frames(id)[0].opcode, Opcode::LoginOk);
    assert_eq!(h.relay.metrics().auth_failures, 2);
}

#[test]
fn the_fifth_refused_token_in_a_row_closes() {
    let mut h = harness();
    let id = h.open();
    for n in 1..=MAX_AUTH_FAILURES {
        h.send_frame(id, Frame::login(MessageId(n.into()), UserId(7), b"x.y.z"));
        let frames = h.take_frames(id);
        assert_eq!(frames[0].error_code(), Some(ErrorCode::AuthFailed));
        let closing = h.relay.state(id) == Some(State::Closing);
        assert_eq!(closing, n == MAX_AUTH_FAILURES, "after refusal {n}");
    }
}

#[test]
fn grants_decide_join_room_send_and_broadcast() {
    let mut h = harness();
    let rooms = RoomGrant::only([7, 8]);
    let (alice, _) = login_with(&mut h, 1, &token(1, T0 + 600, &rooms, false));
    h.send_frame(alice, Frame::join(MessageId(2), RoomId(7)));
    assert_eq!(h.take_frames(alice)[0].opcode, Opcode::RoomState);
    h.send_frame(alice, Frame::join(MessageId(3), RoomId(9)));
    h.expect_error(alice, ErrorCode::Forbidden);
    h.send_frame(
        alice,
        Frame::broadcast(MessageId(4), Bytes::from_static(b"all")),
    );
    h.expect_error(alice, ErrorCode::Forbidden);

    let (admin, _) = login_with(&mut h, 2, &token(2, T0 + 600, &RoomGrant::All, true));
    h.send_frame(admin, Frame::join(MessageId(2), RoomId(9)));
    assert_eq!(h.take_frames(admin)[0].opcode, Opcode::RoomState);
    h.send_frame(
        admin,
        Frame::broadcast(MessageId(3), Bytes::from_static(b"all")),
    );
    assert_eq!(h.take_frames(alice)[0].opcode, Opcode::RoomDeliver);
}

#[test]
fn a_token_is_noticed_before_it_expires_and_closes_the_connection_after() {
    let mut h = harness();
    let exp = T0 + 100;
    let (id, frames) = login_with(&mut h, 7, &token(7, exp, &RoomGrant::None, false));
    assert_eq!(
        frames.len(),
        1,
        "only LOGIN_OK while exp is more than the notice away"
    );
    h.advance(Duration::from_secs(39));
    assert!(h.take_frames(id).is_empty());
    h.advance(Duration::from_secs(1)); // exp - 60 s
    let frames = h.take_frames(id);
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].opcode, Opcode::TokenExpiring);
    assert_eq!(frames[0].token_exp(), Some(exp));
    h.advance(Duration::from_secs(89)); // exp + 29 s: the leeway still holds
    assert!(h.take_frames(id).is_empty());
    assert_ne!(h.relay.state(id), Some(State::Closing));
    h.advance(Duration::from_secs(1)); // exp + 30 s
    h.expect_error(id, ErrorCode::TokenExpired);
    assert_eq!(h.relay.state(id), Some(State::Closing));
    assert_eq!(h.relay.metrics().tokens_expired, 1);
}

#[test]
fn refresh_replaces_the_expiry_and_the_grants() {
    let mut h = harness();
    let (id, _) = login_with(&mut h, 7, &token(7, T0 + 100, &RoomGrant::None, false));
    h.advance(Duration::from_secs(40));
    assert_eq!(h.take_frames(id)[0].opcode, Opcode::TokenExpiring);

    let wrong_user = token(8, T0 + 400, &RoomGrant::None, false);
    h.send_frame(id, Frame::refresh(MessageId(5), wrong_user.as_bytes()));
    let e = h.expect_error(id, ErrorCode::AuthFailed);
    assert_eq!(e.error().unwrap().1, "REFRESH: sub does not match user");

    let fresh = token(7, T0 + 400, &RoomGrant::only([3]), false);
    h.send_frame(id, Frame::refresh(MessageId(6), fresh.as_bytes()));
    let ok = h.take_frames(id);
    assert_eq!(ok[0].opcode, Opcode::RefreshOk);
    assert_eq!(
        (ok[0].msg_id, ok[0].token_exp()),
        (MessageId(6), Some(T0 + 400))
    );
    h.send_frame(id, Frame::join(MessageId(7), RoomId(3)));
    assert_eq!(
        h.take_frames(id)[0].opcode,
        Opcode::RoomState,
        "new grants apply"
    );

    // Past the old token's end: nothing; the new one is noticed at its own exp - 60 s.
    h.advance(Duration::from_secs(100));
    assert!(h.take_frames(id).is_empty());
    h.advance(Duration::from_secs(200)); // T0 + 340
    assert_eq!(h.take_frames(id)[0].token_exp(), Some(T0 + 400));
    h.advance(Duration::from_secs(90)); // T0 + 430
    h.expect_error(id, ErrorCode::TokenExpired);
}

#[test]
fn refresh_without_token_checks_is_answered_with_exp_zero() {
    let mut h = Harness::new(Config::default());
    let id = h.login(7);
    h.send_frame(id, Frame::refresh(MessageId(2), b"anything"));
    let ok = h.take_frames(id);
    assert_eq!(
        (ok[0].opcode, ok[0].token_exp()),
        (Opcode::RefreshOk, Some(0))
    );
}

#[test]
fn a_token_with_a_device_pins_the_connection_to_it() {
    let mut h = harness();
    let pinned = mint_hs256(SECRET, 7, T0, 600, &RoomGrant::None, false, Some("phone"));
    let id = h.open();
    let other = Frame::login_device(MessageId(1), UserId(7), "tablet", pinned.as_bytes());
    h.send_frame(id, other);
    let frames = h.take_frames(id);
    assert_eq!(frames[0].error_code(), Some(ErrorCode::AuthFailed));
    assert_eq!(
        frames[0].error().unwrap().1,
        "LOGIN: the token is for device \"phone\", not \"tablet\""
    );
    assert_eq!(
        h.relay.metrics().auth_failures,
        1,
        "counted with refused tokens"
    );
    // Without the DEVICE flag the token's device is taken; naming it works too.
    let plain = Frame::login(MessageId(2), UserId(7), pinned.as_bytes());
    h.send_frame(id, plain);
    assert_eq!(h.take_frames(id)[0].opcode, Opcode::LoginOk);
    assert_eq!(
        h.relay.sessions.get(id.0).map(|s| s.device),
        Some(crate::proto::device_tag(Some("phone")))
    );
    let named = h.open();
    let frame = Frame::login_device(MessageId(1), UserId(7), "phone", pinned.as_bytes());
    h.send_frame(named, frame);
    assert_eq!(h.take_frames(named)[0].opcode, Opcode::LoginOk);
}
