//! Login tokens end to end: the real `imrelay` binary, real sockets, real JWTs.
//!
//! Tokens are minted with `imrelay::auth::Mint` (or by the binary's `imrelay token`), the
//! relay is started with `--auth-secret-file` or `--auth-public-key-file`, and each test
//! checks the exact ERROR code and the reason text of `AuthError::reason()`.
//!
//! No assertion is about time and nothing sleeps. The relay answers a connection's frames in
//! order, so a reply proves that everything before it was handled. The expiry tests mint a
//! token whose `exp` is 27 s in the past: LOGIN still accepts it (30 s of leeway), the
//! relay closes the connection about 3 s later, and the test simply blocks on the socket
//! until the frames come (the read timeout is only a safety net).

mod support;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use imrelay::auth::{Algorithm, Mint, RoomGrant};
use imrelay::proto::{ErrorCode, Frame, MessageId, Opcode, RoomId, UserId};
use support::process::{self, RelayProcess};
use support::telnet::Telnet;
use support::Client;

/// The HS256 secret of the test relays (at least 32 bytes).
const SECRET: &[u8] = b"imrelay-e2e-auth-secret-0123456789abcdef";

/// Another secret of a valid length: tokens signed with it are forgeries.
const OTHER_SECRET: &[u8] = b"not-the-relay-secret-0123456789abcdefghij";

/// How far in the past the expiry tests put `exp`: LOGIN accepts the token while the
/// relay's clock is below `exp + 30`, so this leaves 3 s for the LOGIN to arrive, and the
/// relay closes the connection at most 3 s after the test starts.
const EXPIRED_BY: u64 = 27;

/// The relay's leeway on `exp`, `nbf` and `iat` (protocol: 30 s).
const LEEWAY: u64 = 30;

// ---- helpers -----------------------------------------------------------------------------

/// Unix time in seconds.
fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// A per-test directory under the system temp dir, removed on drop.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new(test: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("imrelay-e2e-auth-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the test's temp dir");
        Scratch { dir }
    }

    /// Writes `contents` to `name` in the directory; returns its path.
    fn file(&self, name: &str, contents: &[u8]) -> PathBuf {
        let path = self.dir.join(name);
        std::fs::write(&path, contents).expect("write a temp file");
        path
    }

    /// The secret file of the test relays, with a trailing newline (which is not part of
    /// the secret).
    fn secret_file(&self) -> PathBuf {
        let mut contents = SECRET.to_vec();
        contents.push(b'\n');
        self.file("secret", &contents)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A relay checking HS256 tokens signed with [`SECRET`], and its temp dir.
struct HsRelay {
    relay: RelayProcess,
    _scratch: Scratch,
}

impl HsRelay {
    fn start(test: &str, extra: &[&str]) -> HsRelay {
        let scratch = Scratch::new(test);
        let secret = scratch.secret_file();
        let mut flags = vec!["--auth-secret-file", path_str(&secret)];
        flags.extend_from_slice(extra);
        let relay = RelayProcess::start(&flags);
        HsRelay {
            relay,
            _scratch: scratch,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.relay.addr
    }

    fn connect(&self) -> Client {
        Client::connect(self.relay.addr)
    }

    /// A client logged in as `user` with `token`.
    fn login(&self, user: u64, token: &str) -> Client {
        let mut client = self.connect();
        login_ok(&mut client, user, token);
        client
    }
}

/// A relay checking RS256 tokens against tests/data/auth/rsa_public.pem.
fn rs256_relay() -> RelayProcess {
    let public = key_path("rsa_public.pem");
    RelayProcess::start(&[
        "--auth-public-key-file",
        path_str(&public),
        "--auth-algorithm",
        "RS256",
    ])
}

fn key_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/auth")
        .join(name)
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 temp path")
}

/// A token for `user` valid for an hour, granting `rooms` (join and send).
fn token(user: u64, rooms: &[u64]) -> String {
    grant(user, rooms).hs256(SECRET)
}

/// The claims of [`token`], to adjust before signing.
fn grant(user: u64, rooms: &[u64]) -> Mint {
    Mint {
        rooms: RoomGrant::only(rooms.iter().copied()),
        ..Mint::new(user, now(), 3600)
    }
}

/// A token for `user` whose `exp` is [`EXPIRED_BY`] seconds ago: still accepted at LOGIN
/// thanks to the leeway, and expiring for good within seconds. Returns it and its `exp`.
fn nearly_dead_token(user: u64) -> (String, u64) {
    let exp = now() - EXPIRED_BY;
    let mint = Mint::new(user, exp - 60, 60);
    assert_eq!(mint.claims()["exp"], exp);
    (mint.hs256(SECRET), exp)
}

/// Sends LOGIN as `user` with `token`; returns its message id and the reply.
fn login_reply(client: &mut Client, user: u64, token: &[u8]) -> (MessageId, Frame) {
    let id = client.next_id();
    client.send_frame(&Frame::login(id, UserId(user), token));
    let reply = client.recv();
    (id, reply)
}

/// LOGIN as `user` with `token` must succeed.
fn login_ok(client: &mut Client, user: u64, token: &str) {
    let (id, reply) = login_reply(client, user, token.as_bytes());
    assert_eq!(reply.opcode, Opcode::LoginOk, "login as {user}: {reply:?}");
    assert_eq!((reply.msg_id, reply.target), (id, UserId(user)));
}

/// `frame` must be an ERROR with `code` whose reason names `what` (LOGIN or REFRESH) and
/// contains `reason`.
fn assert_error(frame: &Frame, code: ErrorCode, what: &str, reason: &str) {
    let (raw, text) = frame
        .error()
        .unwrap_or_else(|| panic!("expected ERROR {code}, got {frame:?}"));
    assert_eq!(ErrorCode::from_u16(raw), Some(code), "{frame:?}: {text}");
    assert!(
        text.starts_with(what) && text.contains(reason),
        "reason {text:?}, expected {what}: {reason:?}"
    );
}

/// LOGIN as `user` with `token` must be refused with AUTH_FAILED and `reason`, answering
/// the LOGIN (its msg_id) and leaving the connection open (a PING still gets its PONG).
fn login_refused(client: &mut Client, user: u64, token: &[u8], reason: &str) {
    let (id, reply) = login_reply(client, user, token);
    assert_error(&reply, ErrorCode::AuthFailed, "LOGIN", reason);
    assert_eq!(reply.msg_id, id, "the ERROR answers the LOGIN");
    client.round_trip();
}

/// Sends REFRESH with `token`; returns its message id and the reply.
fn refresh_reply(client: &mut Client, token: &str) -> (MessageId, Frame) {
    let id = client.next_id();
    client.send_frame(&Frame::refresh(id, token.as_bytes()));
    (id, client.recv())
}

/// JOIN `room`; returns the reply (ROOM_STATE or ERROR).
fn join_reply(client: &mut Client, room: u64) -> Frame {
    let id = client.next_id();
    client.send_frame(&Frame::join(id, RoomId(room)));
    let reply = client.recv();
    assert_eq!(reply.msg_id, id, "{reply:?}");
    reply
}

/// JOIN `room` must be refused with FORBIDDEN.
fn join_forbidden(client: &mut Client, room: u64) {
    let reply = join_reply(client, room);
    assert_eq!(
        reply.error_code(),
        Some(ErrorCode::Forbidden),
        "JOIN {room}: {reply:?}"
    );
}

/// JOIN `room` must succeed: a ROOM_STATE that says we are a member.
fn join_ok(client: &mut Client, room: u64) {
    let reply = join_reply(client, room);
    assert_eq!(reply.opcode, Opcode::RoomState, "JOIN {room}: {reply:?}");
    let state = reply.room_state().expect("a ROOM_STATE payload");
    assert!(state.is_member, "JOIN {room}: {state:?}");
}

/// Base64url without padding (RFC 4648, section 5), for hand-built tokens.
fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

// ---- LOGIN ---------------------------------------------------------------------------------

#[test]
fn valid_token_logs_in_and_missing_or_garbage_tokens_are_refused_without_closing() {
    let relay = HsRelay::start("garbage", &[]);
    let mut alice = relay.login(7, &token(7, &[]));
    alice.round_trip();

    let mut c = relay.connect();
    login_refused(&mut c, 7, b"", "malformed token");
    login_refused(&mut c, 7, b"garbage", "malformed token");
    login_refused(&mut c, 7, b"not.a.jwt", "malformed token");
    // Refused LOGINs leave the connection logged out, and a good LOGIN after them works.
    let id = c.next_id();
    c.send_frame(&Frame::send(id, UserId(7), Bytes::from_static(b"x")));
    c.expect_error(ErrorCode::NotLoggedIn);
    login_ok(&mut c, 8, &token(8, &[]));
    let id = c.send(7, b"hello after three refusals");
    let got = alice.recv();
    assert_eq!(
        (got.opcode, got.msg_id, got.source),
        (Opcode::Deliver, id, UserId(8))
    );
    assert_eq!(c.recv().ack_count(), Some(1));
}

#[test]
fn expired_token_is_refused() {
    let relay = HsRelay::start("expired", &[]);
    let t = now();
    // exp is an hour ago: far beyond the 30 s of leeway.
    let expired = Mint::new(7, t - 7200, 3600).hs256(SECRET);
    let mut c = relay.connect();
    login_refused(&mut c, 7, expired.as_bytes(), "token expired");
    // Just past the leeway too: exp + 30 <= now.
    let expired = Mint::new(7, t - 100, 100 - LEEWAY - 1).hs256(SECRET);
    login_refused(&mut c, 7, expired.as_bytes(), "token expired");
    login_ok(&mut c, 7, &token(7, &[]));
}

#[test]
fn token_not_yet_valid_is_refused() {
    let relay = HsRelay::start("nbf", &[]);
    let t = now();
    let early = Mint {
        not_before: Some(t + 3600),
        ..Mint::new(7, t, 7200)
    }
    .hs256(SECRET);
    let mut c = relay.connect();
    login_refused(&mut c, 7, early.as_bytes(), "token not yet valid");
    login_ok(&mut c, 7, &token(7, &[]));
}

#[test]
fn token_signed_with_another_secret_is_a_bad_signature() {
    let relay = HsRelay::start("badsig", &[]);
    let forged = Mint {
        admin: true,
        rooms: RoomGrant::All,
        ..Mint::new(7, now(), 3600)
    }
    .hs256(OTHER_SECRET);
    let mut c = relay.connect();
    login_refused(&mut c, 7, forged.as_bytes(), "bad signature");
    login_ok(&mut c, 7, &token(7, &[]));
}

#[test]
fn unsigned_alg_none_token_is_the_wrong_algorithm() {
    let relay = HsRelay::start("algnone", &[]);
    let header = base64url(br#"{"alg":"none","typ":"JWT"}"#);
    let claims = Mint {
        admin: true,
        rooms: RoomGrant::All,
        ..Mint::new(7, now(), 3600)
    }
    .claims()
    .to_string();
    let unsigned = format!("{header}.{}.", base64url(claims.as_bytes()));
    let mut c = relay.connect();
    login_refused(&mut c, 7, unsigned.as_bytes(), "wrong algorithm");
    login_ok(&mut c, 7, &token(7, &[]));
}

#[test]
fn hs256_token_keyed_with_the_rsa_public_key_is_the_wrong_algorithm() {
    let relay = rs256_relay();
    let public_pem = std::fs::read(key_path("rsa_public.pem")).unwrap();
    // The "algorithm confusion" attack: HMAC keyed with the relay's public key.
    let confused = Mint {
        admin: true,
        rooms: RoomGrant::All,
        ..Mint::new(7, now(), 3600)
    }
    .hs256(&public_pem);
    let mut c = Client::connect(relay.addr);
    login_refused(&mut c, 7, confused.as_bytes(), "wrong algorithm");
}

#[test]
fn rs256_token_signed_with_the_private_key_logs_in() {
    let relay = rs256_relay();
    let private_pem = std::fs::read(key_path("rsa_private.pem")).unwrap();
    let mint = Mint {
        rooms: RoomGrant::only([5]),
        ..Mint::new(7, now(), 3600)
    };
    let signed = mint
        .sign(Algorithm::Rs256, &private_pem)
        .expect("sign RS256");
    let mut c = Client::connect(relay.addr);
    login_ok(&mut c, 7, &signed);
    join_ok(&mut c, 5);
    join_forbidden(&mut c, 6);
    // A token signed with another RSA key is a forgery.
    let other_pem = std::fs::read(key_path("rsa_other_private.pem")).unwrap();
    let forged = mint.sign(Algorithm::Rs256, &other_pem).expect("sign RS256");
    let mut d = Client::connect(relay.addr);
    login_refused(&mut d, 7, forged.as_bytes(), "bad signature");
}

#[test]
fn token_for_another_user_is_refused() {
    let relay = HsRelay::start("submismatch", &[]);
    let bobs = token(8, &[]);
    let mut c = relay.connect();
    login_refused(&mut c, 7, bobs.as_bytes(), "sub does not match user");
    login_ok(&mut c, 8, &bobs);
}

// ---- what a token permits ------------------------------------------------------------------

#[test]
fn join_is_limited_to_the_rooms_claim() {
    let relay = HsRelay::start("join", &[]);
    let mut c = relay.login(7, &token(7, &[1, 2]));
    join_forbidden(&mut c, 3);
    join_forbidden(&mut c, 0x7fff_ffff_ffff);
    join_ok(&mut c, 1);
    join_ok(&mut c, 2);
    join_forbidden(&mut c, 3);

    // A token with no rooms claim may join nothing; "*" may join anything.
    let mut none = relay.login(8, &token(8, &[]));
    join_forbidden(&mut none, 1);
    let all = Mint {
        rooms: RoomGrant::All,
        ..Mint::new(9, now(), 3600)
    }
    .hs256(SECRET);
    let mut every = relay.login(9, &all);
    join_ok(&mut every, 3);
    join_ok(&mut every, 123_456_789);
}

#[test]
fn room_send_is_limited_to_the_send_rooms_claim() {
    let relay = HsRelay::start("roomsend", &[]);
    let sender_token = Mint {
        send_rooms: Some(RoomGrant::only([1])),
        ..grant(7, &[1, 2])
    }
    .hs256(SECRET);
    let mut sender = relay.login(7, &sender_token);
    let mut member = relay.login(8, &token(8, &[1, 2]));
    for room in [1, 2] {
        join_ok(&mut sender, room);
        join_ok(&mut member, room);
    }

    // Room 2 is in `rooms` (joined above) but not in `send_rooms`.
    let id = sender.next_id();
    sender.send_frame(&Frame::room_send(id, RoomId(2), Bytes::from_static(b"no")));
    let reply = sender.expect_error(ErrorCode::Forbidden);
    assert_eq!(reply.msg_id, id);

    let id = sender.next_id();
    sender.send_frame(&Frame::room_send(id, RoomId(1), Bytes::from_static(b"yes")));
    let ack = sender.recv();
    assert_eq!((ack.opcode, ack.msg_id), (Opcode::Ack, id), "{ack:?}");
    assert_eq!(ack.ack_count(), Some(1));
    // The member gets room 1's message and nothing from room 2 before it.
    let got = member.recv();
    assert_eq!(
        (got.opcode, got.target, got.source, &got.payload[..]),
        (Opcode::RoomDeliver, UserId(1), UserId(7), &b"yes"[..])
    );
}

#[test]
fn broadcast_needs_the_admin_claim() {
    let relay = HsRelay::start("broadcast", &[]);
    let mut plain = relay.login(7, &token(7, &[]));
    let mut member = relay.login(8, &token(8, &[]));
    let admin_token = Mint {
        admin: true,
        ..Mint::new(9, now(), 3600)
    }
    .hs256(SECRET);
    let mut admin = relay.login(9, &admin_token);

    let id = plain.next_id();
    plain.send_frame(&Frame::broadcast(id, Bytes::from_static(b"everyone!")));
    let reply = plain.expect_error(ErrorCode::Forbidden);
    assert_eq!(reply.msg_id, id);

    let id = admin.next_id();
    admin.send_frame(&Frame::broadcast(id, Bytes::from_static(b"maintenance")));
    let ack = admin.recv();
    assert_eq!((ack.opcode, ack.msg_id), (Opcode::Ack, id), "{ack:?}");
    assert_eq!(ack.ack_count(), Some(2), "7 and 8, not the sender");
    for c in [&mut member, &mut plain] {
        let got = c.recv();
        assert_eq!(
            (got.opcode, got.target, got.source, &got.payload[..]),
            (
                Opcode::RoomDeliver,
                UserId(RoomId::ALL.0),
                UserId(9),
                &b"maintenance"[..]
            ),
            "the broadcast, not the refused one"
        );
    }
}

// ---- REFRESH -------------------------------------------------------------------------------

#[test]
fn refresh_with_a_valid_token_answers_refresh_ok_with_the_new_exp() {
    let relay = HsRelay::start("refreshok", &[]);
    let mut c = relay.login(7, &token(7, &[]));
    let mint = Mint::new(7, now(), 7200);
    let exp = mint.issued_at + mint.ttl_secs;
    let (id, reply) = refresh_reply(&mut c, &mint.hs256(SECRET));
    assert_eq!(
        (reply.opcode, reply.msg_id, reply.target),
        (Opcode::RefreshOk, id, UserId(7)),
        "{reply:?}"
    );
    assert_eq!(reply.token_exp(), Some(exp));
    c.round_trip();
}

#[test]
fn refresh_with_another_users_token_is_refused_and_the_connection_stays() {
    let relay = HsRelay::start("refreshsub", &[]);
    let mut c = relay.login(7, &token(7, &[1]));
    let mut peer = relay.login(8, &token(8, &[]));
    // 8's token would grant room 2; it must not be taken over.
    let (id, reply) = refresh_reply(&mut c, &token(8, &[1, 2]));
    assert_error(
        &reply,
        ErrorCode::AuthFailed,
        "REFRESH",
        "sub does not match user",
    );
    assert_eq!(reply.msg_id, id);
    c.round_trip();
    // Still 7, with 7's grants.
    join_forbidden(&mut c, 2);
    join_ok(&mut c, 1);
    let id = c.send(8, b"still me");
    let got = peer.recv();
    assert_eq!((got.msg_id, got.source), (id, UserId(7)));
    assert_eq!(c.recv().ack_count(), Some(1));
}

#[test]
fn refreshed_token_grants_apply_after_refresh_ok() {
    let relay = HsRelay::start("refreshgrants", &[]);
    let mut c = relay.login(7, &token(7, &[1]));
    join_forbidden(&mut c, 2);
    let (id, reply) = refresh_reply(&mut c, &token(7, &[1, 2]));
    assert_eq!(
        (reply.opcode, reply.msg_id),
        (Opcode::RefreshOk, id),
        "{reply:?}"
    );
    join_ok(&mut c, 2);
    join_ok(&mut c, 1);
}

// ---- expiry on a live connection -----------------------------------------------------------

#[test]
fn unrefreshed_token_gets_token_expiring_then_token_expired_and_eof() {
    // A notice of 60 s is longer than what is left of the token: TOKEN_EXPIRING comes at once.
    let relay = HsRelay::start("expiry", &["--token-notice", "60"]);
    let (dying, exp) = nearly_dead_token(7);
    let mut c = relay.login(7, &dying);

    let notice = c.recv();
    assert_eq!(
        (notice.opcode, notice.target),
        (Opcode::TokenExpiring, UserId(7)),
        "{notice:?}"
    );
    assert_eq!(notice.token_exp(), Some(exp));

    // No REFRESH: the relay closes at exp + 30 (a few seconds from now); block until then.
    let closing = c.recv();
    let (code, reason) = closing
        .error()
        .unwrap_or_else(|| panic!("expected ERROR TOKEN_EXPIRED, got {closing:?}"));
    assert_eq!(
        ErrorCode::from_u16(code),
        Some(ErrorCode::TokenExpired),
        "{reason}"
    );
    assert_eq!(closing.msg_id, MessageId(0), "answers no frame");
    c.expect_closed();
}

#[test]
fn refresh_after_token_expiring_keeps_the_connection() {
    let relay = HsRelay::start("expiryrefresh", &["--token-notice", "60"]);
    let (dying, exp) = nearly_dead_token(7);
    let mut c = relay.login(7, &dying);
    // A witness logged in with a token of the same exp, which it does not refresh: its
    // TOKEN_EXPIRED proves the relay's clock passed the old deadline (exp + 30).
    let witness_token = Mint::new(8, exp - 60, 60).hs256(SECRET);
    let mut witness = relay.login(8, &witness_token);

    let notice = c.recv();
    assert_eq!(
        (notice.opcode, notice.token_exp()),
        (Opcode::TokenExpiring, Some(exp)),
        "{notice:?}"
    );
    let fresh = Mint::new(7, now(), 3600);
    let new_exp = fresh.issued_at + fresh.ttl_secs;
    let (id, reply) = refresh_reply(&mut c, &fresh.hs256(SECRET));
    assert_eq!(
        (reply.opcode, reply.msg_id),
        (Opcode::RefreshOk, id),
        "{reply:?}"
    );
    assert_eq!(reply.token_exp(), Some(new_exp));
    c.round_trip();

    let notice = witness.recv();
    assert_eq!(notice.opcode, Opcode::TokenExpiring, "{notice:?}");
    witness.expect_error(ErrorCode::TokenExpired);
    witness.expect_closed();

    // Past the old deadline: the refreshed connection answers a PING, with no
    // TOKEN_EXPIRING or TOKEN_EXPIRED before the PONG, and still routes.
    c.round_trip();
    let mut peer = relay.login(9, &token(9, &[]));
    let id = c.send(9, b"still here");
    let got = peer.recv();
    assert_eq!((got.msg_id, got.source), (id, UserId(7)));
    assert_eq!(c.recv().ack_count(), Some(1));
}

// ---- brute force ---------------------------------------------------------------------------

#[test]
fn five_refused_logins_in_a_row_close_the_connection() {
    let relay = HsRelay::start("bruteforce", &[]);
    let mut c = relay.connect();
    let forged = Mint::new(7, now(), 3600).hs256(OTHER_SECRET);
    for attempt in 1..=4 {
        let (id, reply) = login_reply(&mut c, 7, forged.as_bytes());
        assert_error(&reply, ErrorCode::AuthFailed, "LOGIN", "bad signature");
        assert_eq!(reply.msg_id, id, "attempt {attempt} is answered");
    }
    let (_, fifth) = login_reply(&mut c, 7, forged.as_bytes());
    assert_error(&fifth, ErrorCode::AuthFailed, "LOGIN", "bad signature");
    c.expect_closed();

    // The count is per connection: another one still logs in, and the relay serves it.
    let mut d = relay.connect();
    login_refused(&mut d, 7, forged.as_bytes(), "bad signature");
    login_ok(&mut d, 7, &token(7, &[]));
}

// ---- text mode -----------------------------------------------------------------------------

#[test]
fn text_mode_login_with_token_and_refresh() {
    let relay = HsRelay::start("text", &[]);
    let mut t = Telnet::connect(relay.addr());
    t.type_line(&format!("LOGIN 7 {}", token(8, &[])));
    let refused = t.read_line();
    assert!(
        refused.starts_with("ERR AUTH_FAILED ") && refused.contains("sub does not match user"),
        "{refused}"
    );
    t.type_line(&format!("LOGIN 7 {}", token(7, &[])));
    assert_eq!(t.read_line(), "OK LOGIN 7");

    let fresh = Mint::new(7, now(), 7200);
    let exp = fresh.issued_at + fresh.ttl_secs;
    t.type_line(&format!("REFRESH {}", fresh.hs256(SECRET)));
    assert_eq!(t.read_line(), format!("OK REFRESH {exp}"));
    t.type_line("JOIN 3");
    let forbidden = t.read_line();
    assert!(forbidden.starts_with("ERR FORBIDDEN "), "{forbidden}");
    t.type_line("PING still here");
    assert_eq!(t.read_line(), "PONG still here");
}

// ---- the binary's flags and `imrelay token` ------------------------------------------------

#[test]
fn imrelay_token_subcommand_mints_a_token_the_relay_accepts() {
    let relay = HsRelay::start("subcommand", &[]);
    let secret = relay._scratch.secret_file();
    let out = Command::new(env!("CARGO_BIN_EXE_imrelay"))
        .args(["token", "--secret-file", path_str(&secret)])
        .args(["--user", "7", "--ttl", "1h", "--room", "3"])
        .stdin(Stdio::null())
        .output()
        .expect("run imrelay token");
    assert!(
        out.status.success(),
        "imrelay token failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).expect("a UTF-8 token");
    let minted = stdout.trim_end();
    assert_eq!(minted.split('.').count(), 3, "{stdout:?}");
    assert!(!minted.contains(char::is_whitespace), "{stdout:?}");

    let mut c = relay.login(7, minted);
    join_ok(&mut c, 3);
    join_forbidden(&mut c, 4);
    // It is 7's token, not 8's.
    let mut d = relay.connect();
    login_refused(&mut d, 8, minted.as_bytes(), "sub does not match user");
}

#[test]
fn auth_off_on_a_public_address_needs_insecure_no_auth() {
    let (status, stderr) = process::run_to_exit(&[
        "--auth",
        "off",
        "--listen",
        "0.0.0.0:0",
        "--store",
        "memory",
    ]);
    assert!(!status.success(), "{status}: {stderr}");
    assert!(
        status.code().is_some_and(|code| code != 0),
        "{status}: {stderr}"
    );
    assert!(stderr.contains("--insecure-no-auth"), "{stderr}");
}

#[test]
fn auth_off_with_insecure_no_auth_starts_on_a_public_address() {
    let port = TcpListener::bind("0.0.0.0:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let public: SocketAddr = format!("0.0.0.0:{port}").parse().unwrap();
    let relay = RelayProcess::start_on(public, &["--auth", "off", "--insecure-no-auth"]);
    // Any LOGIN is accepted, with no token at all.
    let mut c = Client::connect(SocketAddr::from(([127, 0, 0, 1], port)));
    c.login(7);
    c.round_trip();
    drop(relay);
}
