//! Cluster mode end to end (`--cluster redis://…`, `--node-name`): three real relay
//! processes sharing one real Redis (Debian's `redis-server`, installed by
//! `tests/cluster/setup.sh` and run by each test as its own child on a free loopback port)
//! act as one relay. Direct messages, presence, rooms and broadcasts cross nodes; a Redis
//! outage gives clear errors (`CLUSTER_UNAVAILABLE`, `/readyz` 503) and heals; a killed
//! node drops out of presence. Stored delivery across nodes is in `e2e_cluster_stored.rs`.
//!
//! Cross-node state is eventually consistent: a login, a logout or a JOIN on one node
//! reaches the others once that node's subscription reached Redis. So every wait here is a
//! bounded retry loop on a signal (send, look at the answer or at what arrived, retry every
//! [`POLL`]) under a generous safety timeout; nothing sleeps for a fixed time to let the
//! cluster settle and nothing asserts a timing. Answers that are allowed while the state
//! settles are named at each wait; any other answer fails at once.
//!
//! A missing redis-server (after setup.sh) fails the tests: they never skip.

mod support;

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use bytes::Bytes;
use imrelay::proto::{ErrorCode, Flags, Frame, MessageId, Opcode, RoomId, UserId};
use support::redis::{node_name, Cluster, POLL};
use support::Client;

/// How long cross-node state may take to settle before a test fails.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the nodes may take to notice a restarted Redis (their reconnect backoff is up
/// to a few seconds) and resubscribe.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(30);

// Error codes (protocol.md, section 6). 22 is cluster mode's own.
const RECIPIENT_OFFLINE: u16 = 6;
const FORBIDDEN: u16 = 15;
const CLUSTER_UNAVAILABLE: u16 = ErrorCode::ClusterUnavailable as u16;

/// Node indexes in [`Cluster::nodes`].
const A: usize = 0;
const B: usize = 1;
const C: usize = 2;

const ROOM: u64 = 42;
const WARM_UP: &[u8] = b"warm-up";

// ---- answers and waits --------------------------------------------------------------------

/// What the relay answered a request, in short.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    Ack(u32),
    Error(u16),
}

const OFFLINE: Answer = Answer::Error(RECIPIENT_OFFLINE);
const UNAVAILABLE: Answer = Answer::Error(CLUSTER_UNAVAILABLE);

fn answer_of(frame: &Frame) -> Answer {
    match frame.opcode {
        Opcode::Ack => Answer::Ack(frame.ack_count().expect("a 4-byte ACK payload")),
        Opcode::Error => Answer::Error(frame.error().expect("an error code").0),
        _ => panic!("not an answer: {frame:?}"),
    }
}

/// The answer to request `id`: the next frame, which must be its ACK or ERROR. A DELIVER of
/// a probe to this client on the way is skipped: a probe answered while the cluster
/// settled (or while Redis was down) may or may not reach its recipient, or reach it late.
fn answer(client: &mut Client, id: MessageId) -> Frame {
    let frame = loop {
        let frame = client.recv_or(|| format!("waiting for the answer to message {}", id.0));
        if !(frame.opcode == Opcode::Deliver && frame.payload.starts_with(b"probe ")) {
            break frame;
        }
    };
    assert!(
        matches!(frame.opcode, Opcode::Ack | Opcode::Error) && frame.msg_id == id,
        "expected the answer to message {}: {frame:?}",
        id.0
    );
    frame
}

/// The payload of a probe: a SEND whose only purpose is to learn the cluster's state.
fn probe_payload(id: MessageId) -> Bytes {
    Bytes::from(format!("probe {}", id.0))
}

/// SENDs a probe from `from` to `to`; returns its id and the answer.
fn probe(from: &mut Client, to: u64) -> (MessageId, Frame) {
    let id = from.next_id();
    from.send_frame(&Frame::send(id, UserId(to), probe_payload(id)));
    let frame = answer(from, id);
    (id, frame)
}

/// Probes from `from` to `to` every [`POLL`] until the answer is `want`, within `timeout`;
/// returns the id of that probe. An answer in `pass` means "not settled yet"; any other
/// answer fails the test at once (so `pass` is also what must never be seen).
fn probe_until(
    from: &mut Client,
    to: u64,
    want: Answer,
    pass: &[Answer],
    timeout: Duration,
) -> MessageId {
    let deadline = Instant::now() + timeout;
    loop {
        let (id, frame) = probe(from, to);
        let got = answer_of(&frame);
        if got == want {
            return id;
        }
        assert!(
            pass.contains(&got),
            "SEND to user {to}: waiting for {want:?}, got {got:?}, which is not allowed on the \
             way (only {pass:?}): {frame:?}"
        );
        assert!(
            Instant::now() < deadline,
            "SEND to user {to}: still {got:?} after {timeout:?}, waiting for {want:?}: {frame:?}"
        );
        std::thread::sleep(POLL);
    }
}

/// The next DELIVER on `client` (logged in as `me`) must be message `id` from `from` with
/// `payload`. DELIVERs of earlier probes from `from` are skipped: probes ACKed while the
/// cluster settled, or sent while Redis was down, may or may not have reached this client.
fn expect_deliver(client: &mut Client, me: u64, from: u64, id: MessageId, payload: &[u8]) {
    loop {
        let got =
            client.recv_or(|| format!("user {me} waiting for message {} from user {from}", id.0));
        let earlier_probe = got.opcode == Opcode::Deliver
            && got.source == UserId(from)
            && got.msg_id < id
            && got.payload.starts_with(b"probe ");
        if earlier_probe {
            continue;
        }
        assert_eq!(
            (got.opcode, got.msg_id, got.target, got.source),
            (Opcode::Deliver, id, UserId(me), UserId(from)),
            "user {me}: {got:?}"
        );
        assert_eq!(&got.payload[..], payload, "user {me}: {got:?}");
        return;
    }
}

fn expect_probe(client: &mut Client, me: u64, from: u64, id: MessageId) {
    expect_deliver(client, me, from, id, &probe_payload(id));
}

/// SENDs `payload` from `from` (user `from_user`) to `to_user`: it must be ACKed with
/// `count` and delivered to every one of `to`.
fn send_checked(
    from: &mut Client,
    from_user: u64,
    to_user: u64,
    to: &mut [&mut Client],
    count: u32,
    payload: &[u8],
) {
    let id = from.send(to_user, payload);
    let ack = answer(from, id);
    assert_eq!(
        answer_of(&ack),
        Answer::Ack(count),
        "SEND from {from_user} to {to_user}: {ack:?}"
    );
    for client in to.iter_mut() {
        expect_deliver(client, to_user, from_user, id, payload);
    }
}

/// The next frame on `client` must answer `id` with ERROR `code`; returns the reason.
fn expect_error_answer(client: &mut Client, id: MessageId, code: u16) -> String {
    let frame = answer(client, id);
    assert_eq!(answer_of(&frame), Answer::Error(code), "{frame:?}");
    frame.error().unwrap().1
}

/// Sends the request `build(id)` and returns its id and ACK count (an ERROR fails).
fn acked(client: &mut Client, build: impl FnOnce(MessageId) -> Frame) -> (MessageId, u32) {
    let id = client.next_id();
    client.send_frame(&build(id));
    let frame = answer(client, id);
    let count = frame
        .ack_count()
        .unwrap_or_else(|| panic!("expected an ACK: {frame:?}"));
    (id, count)
}

/// A ROOM_DELIVER of `room` (0: a broadcast) from `source`.
fn is_room_deliver(frame: &Frame, room: u64, source: u64) -> bool {
    frame.opcode == Opcode::RoomDeliver
        && frame.room() == RoomId(room)
        && frame.source == UserId(source)
}

/// Room traffic reaches a node once that node's subscription reached Redis: sends the
/// warm-up message (`build(id)`, a ROOM_SEND or BROADCAST from `source`) every [`POLL`]
/// until each of `remote` got one. Every ACK must count `local` when given.
fn warm_up(
    sender: &mut Client,
    source: u64,
    room: u64,
    build: impl Fn(MessageId) -> Frame,
    local: Option<u32>,
    remote: &mut [&mut Client],
) {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    let mut warm = vec![false; remote.len()];
    while warm.contains(&false) {
        assert!(
            Instant::now() < deadline,
            "room {room}: warm-ups from user {source} did not reach every node within \
             {SETTLE_TIMEOUT:?} (reached: {warm:?})"
        );
        let (_, count) = acked(sender, &build);
        if let Some(local) = local {
            assert_eq!(
                count, local,
                "room {room}: the ACK counts this node's members"
            );
        }
        for (client, warm) in remote.iter_mut().zip(&mut warm) {
            if *warm {
                continue;
            }
            if let Some(got) = client.recv_within(POLL) {
                assert!(
                    is_room_deliver(&got, room, source) && got.payload[..] == *WARM_UP,
                    "room {room}: expected a warm-up: {got:?}"
                );
                *warm = true;
            }
        }
    }
}

/// `member` must get exactly `sent` (ids and payloads) in order as ROOM_DELIVERs of `room`
/// from `source`, after any number of warm-ups.
fn expect_room_stream(
    member: &mut Client,
    name: &str,
    room: u64,
    source: u64,
    sent: &[(MessageId, Bytes)],
) {
    let mut i = 0;
    while i < sent.len() {
        let got = member.recv_or(|| format!("{name} waiting for room message {i}"));
        if i == 0 && is_room_deliver(&got, room, source) && got.payload[..] == *WARM_UP {
            continue;
        }
        assert!(
            is_room_deliver(&got, room, source),
            "{name}, message {i}: {got:?}"
        );
        assert_eq!(
            (got.msg_id, &got.payload),
            (sent[i].0, &sent[i].1),
            "{name}, message {i}: in order, nothing lost"
        );
        i += 1;
    }
}

fn room_send_frame(room: u64, payload: Bytes) -> impl Fn(MessageId) -> Frame {
    move |id| Frame::room_send(id, RoomId(room), payload.clone())
}

fn broadcast_frame(payload: Bytes) -> impl Fn(MessageId) -> Frame {
    move |id| Frame::broadcast(id, payload.clone())
}

// ---- HTTP (the admin listener) ------------------------------------------------------------

/// `GET path` over HTTP/1.0; the status and body, or why there is none.
fn get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    support::http_request(addr, &request).map_err(|e| e.to_string())
}

/// Polls `GET path` until its status is `status`, within `timeout`; returns the body.
fn poll_status(addr: SocketAddr, path: &str, status: u16, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let last = get(addr, path);
        if let Ok((got, body)) = &last {
            if *got == status {
                return body.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "GET {path}: not {status} within {timeout:?}; last: {last:?}"
        );
        std::thread::sleep(POLL);
    }
}

// ---- the tests ----------------------------------------------------------------------------

#[test]
fn cross_node_direct_messages_and_ack_counts() {
    let cluster = Cluster::start(3);
    let mut alice = cluster.login(A, 1);
    let mut bob = cluster.login(B, 2);

    // a -> b: offline until b's subscription for user 2 reached Redis, then one node.
    let id = probe_until(&mut alice, 2, Answer::Ack(1), &[OFFLINE], SETTLE_TIMEOUT);
    expect_probe(&mut bob, 2, 1, id);
    for i in 0..5 {
        let payload = format!("hello bob {i}");
        send_checked(&mut alice, 1, 2, &mut [&mut bob], 1, payload.as_bytes());
    }
    // b -> a.
    let id = probe_until(&mut bob, 1, Answer::Ack(1), &[OFFLINE], SETTLE_TIMEOUT);
    expect_probe(&mut alice, 1, 2, id);
    for i in 0..5 {
        let payload = format!("hello alice {i}");
        send_checked(&mut bob, 2, 1, &mut [&mut alice], 1, payload.as_bytes());
    }
    // An empty payload crosses nodes too.
    send_checked(&mut alice, 1, 2, &mut [&mut bob], 1, b"");

    // User 3 on a twice, on b twice and on c once. From a: 2 local connections + 2 other
    // nodes (b counts once however many connections it has there) = 4.
    let mut carol: Vec<Client> = [A, A, B, B, C]
        .into_iter()
        .map(|node| cluster.login(node, 3))
        .collect();
    let id = probe_until(
        &mut alice,
        3,
        Answer::Ack(4),
        &[Answer::Ack(2), Answer::Ack(3)],
        SETTLE_TIMEOUT,
    );
    for c in &mut carol {
        expect_probe(c, 3, 1, id);
    }
    let mut all: Vec<&mut Client> = carol.iter_mut().collect();
    for i in 0..5 {
        let payload = format!("hello carol {i}");
        send_checked(&mut alice, 1, 3, &mut all, 4, payload.as_bytes());
    }

    // From c: 1 local connection + a + b = 3.
    let mut dave = cluster.login(C, 4);
    let id = probe_until(
        &mut dave,
        3,
        Answer::Ack(3),
        &[Answer::Ack(1), Answer::Ack(2)],
        SETTLE_TIMEOUT,
    );
    for c in all.iter_mut() {
        expect_probe(c, 3, 4, id);
    }
    for i in 0..5 {
        let payload = format!("from dave {i}");
        send_checked(&mut dave, 4, 3, &mut all, 3, payload.as_bytes());
    }

    // Nobody got anything more: each connection's next frame answers its PING.
    for c in all.iter_mut() {
        c.round_trip();
    }
    alice.round_trip();
    bob.round_trip();
}

#[test]
fn recipient_offline_only_when_connected_nowhere() {
    let cluster = Cluster::start(3);
    let mut alice = cluster.login(A, 1);

    // User 5 is connected nowhere.
    let id = alice.send(5, b"anyone?");
    expect_error_answer(&mut alice, id, RECIPIENT_OFFLINE);

    // On c: offline until c's subscription reached Redis, then ACKed, and from then on never
    // offline while the user stays connected.
    let mut eve_c = cluster.login(C, 5);
    let id = probe_until(&mut alice, 5, Answer::Ack(1), &[OFFLINE], SETTLE_TIMEOUT);
    expect_probe(&mut eve_c, 5, 1, id);
    for i in 0..20 {
        let payload = format!("to eve on c {i}");
        send_checked(&mut alice, 1, 5, &mut [&mut eve_c], 1, payload.as_bytes());
    }

    // Also on b: two nodes, never offline on the way.
    let mut eve_b = cluster.login(B, 5);
    let id = probe_until(
        &mut alice,
        5,
        Answer::Ack(2),
        &[Answer::Ack(1)],
        SETTLE_TIMEOUT,
    );
    expect_probe(&mut eve_c, 5, 1, id);
    expect_probe(&mut eve_b, 5, 1, id);

    // Gone from c, still on b: b alone, never offline on the way.
    drop(eve_c);
    let id = probe_until(
        &mut alice,
        5,
        Answer::Ack(1),
        &[Answer::Ack(2)],
        SETTLE_TIMEOUT,
    );
    expect_probe(&mut eve_b, 5, 1, id);
    for i in 0..10 {
        let payload = format!("to eve on b {i}");
        send_checked(&mut alice, 1, 5, &mut [&mut eve_b], 1, payload.as_bytes());
    }

    // Gone from b too: offline once b's unsubscription reached Redis, and then it stays so.
    eve_b.send_frame(&Frame::bye(MessageId(1)));
    loop {
        // Skip whatever was still on its way to it; the BYE answer comes last.
        let got = eve_b.recv();
        if got.opcode == Opcode::Bye {
            break;
        }
        assert_eq!(got.opcode, Opcode::Deliver, "{got:?}");
    }
    eve_b.expect_closed();
    probe_until(&mut alice, 5, OFFLINE, &[Answer::Ack(1)], SETTLE_TIMEOUT);
    for _ in 0..3 {
        let id = alice.send(5, b"still there?");
        let frame = answer(&mut alice, id);
        assert_eq!(answer_of(&frame), OFFLINE, "{frame:?}");
        assert_eq!(
            frame.target,
            UserId(5),
            "the ERROR echoes the target: {frame:?}"
        );
    }

    // Back on the sender's own node: reachable at once (local presence is not eventual).
    let mut eve_a = cluster.login(A, 5);
    send_checked(&mut alice, 1, 5, &mut [&mut eve_a], 1, b"welcome back");
}

#[test]
fn rooms_span_nodes() {
    let cluster = Cluster::start(3);
    // Members: user 1 (the first sender) and user 2 on a, users 3 and 4 on b, user 5 on c.
    // User 6 on c is logged in but not a member.
    let mut members: Vec<(String, u64, Client)> = [(A, 1), (A, 2), (B, 3), (B, 4), (C, 5)]
        .into_iter()
        .map(|(node, user)| {
            let mut client = cluster.login(node, user);
            let state = client.join(ROOM).room_state().expect("ROOM_STATE");
            assert!(state.is_member, "user {user} joined");
            (format!("user {user} on {}", node_name(node)), user, client)
        })
        .collect();
    let mut outsider = cluster.login(C, 6);

    // From a member on a: the ACK counts a's other member (user 2) only.
    {
        let (sender, rest) = members.split_first_mut().unwrap();
        let sender = &mut sender.2;
        let mut remote: Vec<&mut Client> = rest[1..].iter_mut().map(|m| &mut m.2).collect();
        let warm = room_send_frame(ROOM, Bytes::from_static(WARM_UP));
        warm_up(sender, 1, ROOM, warm, Some(1), &mut remote);
        let sent: Vec<(MessageId, Bytes)> = (0..100)
            .map(|i| {
                let payload = Bytes::from(format!("room message {i}"));
                let (id, count) = acked(sender, room_send_frame(ROOM, payload.clone()));
                assert_eq!(count, 1, "message {i}: the ACK counts this node's members");
                (id, payload)
            })
            .collect();
        for (name, _, member) in rest.iter_mut() {
            expect_room_stream(member, name, ROOM, 1, &sent);
        }
        // The sending connection got no copy: its next frame answers this PING.
        sender.round_trip();
    }

    // From the member on c, alone on its node: ACK 0; a and b's members all get it.
    {
        let (sender, rest) = members.split_last_mut().unwrap();
        let sender = &mut sender.2;
        let mut remote: Vec<&mut Client> = rest.iter_mut().map(|m| &mut m.2).collect();
        let warm = room_send_frame(ROOM, Bytes::from_static(WARM_UP));
        warm_up(sender, 5, ROOM, warm, Some(0), &mut remote);
        let sent: Vec<(MessageId, Bytes)> = (0..20)
            .map(|i| {
                let payload = Bytes::from(format!("from c {i}"));
                let (id, count) = acked(sender, room_send_frame(ROOM, payload.clone()));
                assert_eq!(count, 0, "message {i}: no other member on c");
                (id, payload)
            })
            .collect();
        for (name, _, member) in rest.iter_mut() {
            expect_room_stream(member, name, ROOM, 5, &sent);
        }
        sender.round_trip();
    }

    // Nobody got more than that, and the non-member on c got nothing.
    for (_, _, member) in &mut members {
        member.round_trip();
    }
    outsider.round_trip();
}

#[test]
fn broadcast_reaches_every_node() {
    let cluster = Cluster::start(3);
    let mut admin = cluster.login(A, 1);
    let mut users: Vec<(String, Client)> = [(A, 2), (B, 3), (C, 4), (C, 5)]
        .into_iter()
        .map(|(node, user)| {
            let name = format!("user {user} on {}", node_name(node));
            (name, cluster.login(node, user))
        })
        .collect();
    let mut anonymous = cluster.connect(B);

    // Only admins broadcast, on every node.
    let id = users[1].1.next_id();
    users[1]
        .1
        .send_frame(&Frame::broadcast(id, Bytes::from_static(b"free gifts")));
    expect_error_answer(&mut users[1].1, id, FORBIDDEN);

    // The ACK's count is not checked: what it counts for a broadcast is the node's business.
    let mut remote: Vec<&mut Client> = users[1..].iter_mut().map(|u| &mut u.1).collect();
    let warm = broadcast_frame(Bytes::from_static(WARM_UP));
    warm_up(&mut admin, 1, 0, warm, None, &mut remote);
    let sent: Vec<(MessageId, Bytes)> = (0..20)
        .map(|i| {
            let payload = Bytes::from(format!("announcement {i}"));
            let (id, _) = acked(&mut admin, broadcast_frame(payload.clone()));
            (id, payload)
        })
        .collect();
    for (name, user) in &mut users {
        expect_room_stream(user, name, 0, 1, &sent);
        user.round_trip();
    }
    admin.round_trip();
    // Not logged in: no broadcast before the PONG.
    anonymous.round_trip();
}

#[test]
fn redis_restart_gives_clear_errors_then_recovers() {
    let admin = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut cluster = Cluster::start_with(3, |i| {
        if i == A {
            vec!["--admin-listen".to_string(), admin.to_string()]
        } else {
            Vec::new()
        }
    });
    let mut alice = cluster.login(A, 1);
    let mut bob = cluster.login(B, 2);
    let mut carol: Vec<Client> = (0..2).map(|_| cluster.login(A, 3)).collect();

    // Ready once the link to Redis is up.
    poll_status(admin, "/readyz", 200, SETTLE_TIMEOUT);
    let id = probe_until(&mut alice, 2, Answer::Ack(1), &[OFFLINE], SETTLE_TIMEOUT);
    expect_probe(&mut bob, 2, 1, id);
    let mut both: Vec<&mut Client> = carol.iter_mut().collect();
    send_checked(&mut alice, 1, 3, &mut both, 2, b"before the outage");

    cluster.redis.kill();

    // A user connected elsewhere cannot be reached: CLUSTER_UNAVAILABLE once a notices
    // (an ACK on the way: a had not noticed yet).
    probe_until(
        &mut alice,
        2,
        UNAVAILABLE,
        &[Answer::Ack(1)],
        SETTLE_TIMEOUT,
    );
    let id = alice.send(2, b"during the outage");
    let frame = answer(&mut alice, id);
    assert_eq!(answer_of(&frame), UNAVAILABLE, "{frame:?}");
    assert_eq!(
        frame.target,
        UserId(2),
        "the ERROR echoes the target: {frame:?}"
    );
    // The other way too, once b noticed.
    probe_until(&mut bob, 1, UNAVAILABLE, &[Answer::Ack(1)], SETTLE_TIMEOUT);

    // Local users are still served, with the local count.
    for i in 0..3 {
        let payload = format!("local during the outage {i}");
        send_checked(&mut alice, 1, 3, &mut both, 2, payload.as_bytes());
    }

    // a is alive but not ready.
    let body = poll_status(admin, "/readyz", 503, SETTLE_TIMEOUT);
    assert!(
        body.starts_with("the cluster link is down"),
        "/readyz body: {body:?}"
    );
    assert_eq!(get(admin, "/healthz").expect("/healthz").0, 200);

    cluster.redis.restart();

    // The nodes reconnect and resubscribe: ready again, cross-node SENDs work again (on the
    // way: still unavailable, or offline until b resubscribed).
    poll_status(admin, "/readyz", 200, RECOVERY_TIMEOUT);
    let id = probe_until(
        &mut alice,
        2,
        Answer::Ack(1),
        &[UNAVAILABLE, OFFLINE],
        RECOVERY_TIMEOUT,
    );
    expect_probe(&mut bob, 2, 1, id);
    for i in 0..5 {
        let payload = format!("after the outage {i}");
        send_checked(&mut alice, 1, 2, &mut [&mut bob], 1, payload.as_bytes());
    }
    let id = probe_until(
        &mut bob,
        1,
        Answer::Ack(1),
        &[UNAVAILABLE, OFFLINE],
        RECOVERY_TIMEOUT,
    );
    expect_probe(&mut alice, 1, 2, id);
    send_checked(&mut alice, 1, 3, &mut both, 2, b"after the outage, locally");
    assert_eq!(get(admin, "/healthz").expect("/healthz").0, 200);
}

#[test]
fn a_killed_node_drops_out_of_presence() {
    let mut cluster = Cluster::start(3);
    let mut alice = cluster.login(A, 1);
    // User 3 only on c; user 4 on b and on c.
    let mut carol = cluster.login(C, 3);
    let mut dave_b = cluster.login(B, 4);
    let mut dave_c = cluster.login(C, 4);

    let id = probe_until(&mut alice, 3, Answer::Ack(1), &[OFFLINE], SETTLE_TIMEOUT);
    expect_probe(&mut carol, 3, 1, id);
    let id = probe_until(
        &mut alice,
        4,
        Answer::Ack(2),
        &[OFFLINE, Answer::Ack(1)],
        SETTLE_TIMEOUT,
    );
    expect_probe(&mut dave_b, 4, 1, id);
    expect_probe(&mut dave_c, 4, 1, id);

    // kill -9: c says goodbye to nobody; Redis drops its connection and its subscriptions.
    cluster.nodes.remove(C).crash();
    drop((carol, dave_c));

    probe_until(&mut alice, 3, OFFLINE, &[Answer::Ack(1)], SETTLE_TIMEOUT);
    let id = probe_until(
        &mut alice,
        4,
        Answer::Ack(1),
        &[Answer::Ack(2)],
        SETTLE_TIMEOUT,
    );
    expect_probe(&mut dave_b, 4, 1, id);
    for i in 0..3 {
        let id = alice.send(3, b"carol?");
        let frame = answer(&mut alice, id);
        assert_eq!(answer_of(&frame), OFFLINE, "{frame:?}");
        let payload = format!("dave on b {i}");
        send_checked(&mut alice, 1, 4, &mut [&mut dave_b], 1, payload.as_bytes());
    }
    // b still reaches a.
    let id = probe_until(&mut dave_b, 1, Answer::Ack(1), &[OFFLINE], SETTLE_TIMEOUT);
    expect_probe(&mut alice, 1, 4, id);
}

/// A DEDUP SEND resent through another node (the app reconnected elsewhere) is answered
/// with its first copy's ACK and not delivered again; the next message arrives next.
#[test]
fn a_dedup_resend_through_another_node_is_delivered_once() {
    let cluster = Cluster::start(3);
    let mut alice_a = cluster.login(A, 1);
    let mut bob = cluster.login(C, 2);
    let id = probe_until(&mut alice_a, 2, Answer::Ack(1), &[OFFLINE], SETTLE_TIMEOUT);
    expect_probe(&mut bob, 2, 1, id);

    let (first, count) = acked(&mut alice_a, |id| {
        Frame::send(id, UserId(2), Bytes::from_static(b"exactly once")).with_flags(Flags::DEDUP)
    });
    assert_eq!(count, 1);
    expect_deliver(&mut bob, 2, 1, first, b"exactly once");

    // The same message id again, through node b.
    let mut alice_b = cluster.login(B, 1);
    alice_b.send_frame(
        &Frame::send(first, UserId(2), Bytes::from_static(b"exactly once"))
            .with_flags(Flags::DEDUP),
    );
    let again = answer(&mut alice_b, first);
    assert_eq!(answer_of(&again), Answer::Ack(1), "{again:?}");
    // Nothing between: the next message from b is the next bob sees.
    let next = loop {
        let id = alice_b.next_id();
        alice_b.send_frame(&Frame::send(id, UserId(2), Bytes::from_static(b"next")));
        match answer_of(&answer(&mut alice_b, id)) {
            Answer::Ack(1) => break id,
            OFFLINE => continue, // b's subscription not in Redis yet: not this test's point
            other => panic!("{other:?}"),
        }
    };
    expect_deliver(&mut bob, 2, 1, next, b"next");
}

/// ROOM_STATE counts the members on every node (against a real Redis: the counting
/// scripts run there).
#[test]
fn room_counts_cover_every_node() {
    let cluster = Cluster::start(3);
    let room = 77u64;
    let mut members = Vec::new();
    for (i, node) in [A, B, B, C].into_iter().enumerate() {
        let mut member = cluster.login(node, 100 + i as u64);
        let state = member.join(room);
        assert_eq!(state.opcode, Opcode::RoomState, "{state:?}");
        assert_eq!(
            room_state_members(&state),
            i as u32 + 1,
            "JOIN on node {node}"
        );
        members.push(member);
    }
    for node in [A, B, C] {
        let mut viewer = cluster.login(node, 200 + node as u64);
        let id = viewer.next_id();
        viewer.send_frame(&Frame::room_info(id, RoomId(room)));
        let state = viewer.recv();
        assert_eq!(state.msg_id, id, "{state:?}");
        assert_eq!(room_state_members(&state), 4, "ROOM_INFO on node {node}");
    }
    // A member leaves: every node counts 3.
    drop(members.pop());
    for node in [A, B, C] {
        let mut viewer = cluster.login(node, 300 + node as u64);
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            let id = viewer.next_id();
            viewer.send_frame(&Frame::room_info(id, RoomId(room)));
            let state = viewer.recv();
            assert_eq!(state.msg_id, id, "{state:?}");
            let n = room_state_members(&state);
            if n == 3 {
                break;
            }
            assert_eq!(n, 4, "node {node}: only 4 (not yet seen) or 3");
            assert!(Instant::now() < deadline, "node {node} still counts 4");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn room_state_members(frame: &Frame) -> u32 {
    assert_eq!(frame.opcode, Opcode::RoomState, "{frame:?}");
    u32::from_be_bytes(frame.payload[..4].try_into().unwrap())
}

/// The README's two-terminal chat across two nodes: `chat` as user 1 on node a, the
/// `echo_bot` as user 2 on node b. (The examples are built by `cargo test`.)
#[test]
fn the_chat_example_talks_to_the_echo_bot_across_nodes() {
    let cluster = Cluster::start(2);
    let bot =
        support::process::Example::start("echo_bot", &["2", &cluster.nodes[B].addr.to_string()]);
    bot.expect_line("echo bot logged in as 2");
    // User 2 is reachable from node a once b's subscription reached Redis.
    let mut probe = cluster.login(A, 3);
    probe_until(&mut probe, 2, Answer::Ack(1), &[OFFLINE], SETTLE_TIMEOUT);

    let mut chat =
        support::process::Example::start("chat", &["1", &cluster.nodes[A].addr.to_string()]);
    chat.expect_line("connected as 1");
    writeln!(chat.stdin(), "2 hello across nodes").unwrap();
    chat.expect_line("delivered to 2");
    bot.expect_line("echoing 18 bytes to user 1");
    chat.expect_line("2: hello across nodes");
}
