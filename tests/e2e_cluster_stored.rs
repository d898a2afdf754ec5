//! Stored delivery in cluster mode, end to end (protocol.md, section 18.1): relay processes
//! started with `--store memory` share one real Redis (`tests/cluster/setup.sh` installs
//! it), and the inboxes live there. A user resumes from any node; `kill -9` of the
//! sender's node or of the recipient's node loses no message that was ACKed as stored and
//! shows none twice; DEDUP answers a resend through another node; each device of a user
//! gets every message wherever it is connected, and the sender's other devices get a copy;
//! limits answer INBOX_FULL; without Redis, stored SENDs and INBOX_SYNC get
//! CLUSTER_UNAVAILABLE.
//!
//! Waits are on signals (an answer, an event), never on time; the safety timeouts only
//! turn a hang into a failure.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use imrelay::client::{Client as Sdk, ClientConfig, Event};
use imrelay::proto::{ErrorCode, Flags, Frame, InboxState, MessageId, Opcode, UserId};
use support::redis::{Cluster, Redis};
use support::{run_until, Client, SAFETY_TIMEOUT};

const A: usize = 0;
const B: usize = 1;
const C: usize = 2;
const ALICE: UserId = UserId(1);
const BOB: UserId = UserId(2);

/// A STORED SEND (with DEDUP when `dedup`) from a raw client; returns its id.
fn send_stored(client: &mut Client, to: UserId, payload: &str, dedup: bool) -> MessageId {
    let id = client.next_id();
    send_stored_as(client, id, to, payload, dedup);
    id
}

fn send_stored_as(client: &mut Client, id: MessageId, to: UserId, payload: &str, dedup: bool) {
    let flags = if dedup {
        Flags::STORED.union(Flags::DEDUP)
    } else {
        Flags::STORED
    };
    let frame = Frame::send(id, to, Bytes::from(payload.to_string()));
    client.send_frame(&frame.with_flags(flags));
}

/// The answer to `id`: Ok(ACK count) or Err(error code, reason).
fn answer(client: &mut Client, id: MessageId) -> Result<u32, (u16, String)> {
    let frame = client.recv_or(|| format!("the answer to {}", id.0));
    assert_eq!(frame.msg_id, id, "the answer to {}: {frame:?}", id.0);
    match frame.opcode {
        Opcode::Ack => Ok(frame.ack_count().expect("ACK count")),
        Opcode::Error => Err(frame.error().expect("error")),
        _ => panic!("not an answer: {frame:?}"),
    }
}

fn stored(client: &mut Client, to: UserId, payload: &str) -> u32 {
    let id = send_stored(client, to, payload, true);
    answer(client, id).unwrap_or_else(|e| panic!("{payload:?} not stored: {e:?}"))
}

/// INBOX_SYNC; returns INBOX_STATE and its flags.
fn sync(client: &mut Client, epoch: u64, last: u64) -> (InboxState, Flags) {
    let id = client.next_id();
    client.send_frame(&Frame::inbox_sync(id, epoch, last));
    let frame = client.recv_or(|| "INBOX_STATE".to_string());
    assert_eq!(frame.msg_id, id, "INBOX_STATE answers the sync: {frame:?}");
    let state = frame.inbox_state().unwrap_or_else(|| panic!("{frame:?}"));
    (state, frame.flags)
}

/// The next `n` stored messages: (seq, source, target, payload).
fn inbox(client: &mut Client, n: usize) -> Vec<(u64, u64, u64, String)> {
    (0..n)
        .map(|i| {
            let frame = client.recv_or(|| format!("stored message {} of {n}", i + 1));
            let (seq, _, payload) = frame
                .inbox_deliver()
                .unwrap_or_else(|| panic!("not INBOX_DELIVER: {frame:?}"));
            let payload = String::from_utf8(payload.to_vec()).expect("utf-8");
            (seq, frame.source.0, frame.target.0, payload)
        })
        .collect()
}

fn payloads(messages: &[(u64, u64, u64, String)]) -> Vec<&str> {
    messages.iter().map(|m| m.3.as_str()).collect()
}

/// Every message stored while the recipient was offline reaches it on another node, in
/// order; a later login on a third node gets only what came since (the first sync
/// acknowledged the rest); messages to an online recipient are pushed at once, across
/// nodes.
#[test]
fn a_user_resumes_its_inbox_from_any_node() {
    let cluster = Cluster::start(3);
    let mut alice = cluster.login(A, ALICE.0);
    for i in 0..5 {
        assert_eq!(
            stored(&mut alice, BOB, &format!("m{i}")),
            0,
            "bob is offline"
        );
    }

    let mut bob = cluster.login(B, BOB.0);
    let (state, flags) = sync(&mut bob, 0, 0);
    assert!(flags.contains(Flags::NEW_DEVICE), "{flags:?}");
    assert_eq!(state.last_seq - state.first_seq, 4, "{state:?}");
    assert_eq!(state.expired_upto, 0);
    let got = inbox(&mut bob, 5);
    assert_eq!(payloads(&got), ["m0", "m1", "m2", "m3", "m4"]);
    let seqs: Vec<u64> = got.iter().map(|m| m.0).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    assert!(got.iter().all(|m| m.1 == ALICE.0 && m.2 == BOB.0));
    let last = got[4].0;
    assert_eq!(last, state.last_seq);

    // Online: pushed from node A's store to node B at once, and ACKed with the one node
    // that holds bob.
    assert_eq!(stored(&mut alice, BOB, "online"), 1);
    let got = inbox(&mut bob, 1);
    assert_eq!((got[0].0, got[0].3.as_str()), (last + 1, "online"));
    let ack = bob.next_id();
    bob.send_frame(&Frame::inbox_ack(ack, last + 1));
    bob.round_trip();
    drop(bob);

    // Offline again; two more; bob comes back on node C with what he has.
    let bob_gone = Instant::now() + SAFETY_TIMEOUT;
    let mut n = 0;
    while stored(&mut alice, BOB, &format!("later{n}")) != 0 {
        // Node B unsubscribes when it sees the close; until then a store still counts it.
        assert!(Instant::now() < bob_gone, "node B still holds bob");
        n += 1;
    }
    assert_eq!(stored(&mut alice, BOB, "last"), 0);
    let mut bob = cluster.login(C, BOB.0);
    let (again, flags) = sync(&mut bob, state.epoch, last + 1);
    assert!(!flags.contains(Flags::NEW_DEVICE));
    assert_eq!(again.epoch, state.epoch, "one store for every node");
    assert_eq!(again.first_seq, last + 2, "the acknowledged ones are gone");
    let got = inbox(&mut bob, n + 2);
    assert_eq!(got[0].0, last + 2);
    assert_eq!(got.last().map(|m| m.3.as_str()), Some("last"));
    assert_eq!(again.last_seq, got.last().map_or(0, |m| m.0));
    bob.round_trip();
}

/// A DEDUP stored SEND resent through another node (the app reconnected elsewhere before
/// it saw the ACK) is answered as the first copy was and stored once.
#[test]
fn a_dedup_stored_resend_through_another_node_is_stored_once() {
    let cluster = Cluster::start(2);
    let mut alice = cluster.login(A, ALICE.0);
    let id = MessageId(77);
    send_stored_as(&mut alice, id, BOB, "once", true);
    assert_eq!(answer(&mut alice, id), Ok(0));
    drop(alice);
    let mut alice = cluster.login(B, ALICE.0);
    send_stored_as(&mut alice, id, BOB, "once", true);
    assert_eq!(answer(&mut alice, id), Ok(0), "answered as the first copy");
    assert_eq!(stored(&mut alice, BOB, "next"), 0);

    let mut bob = cluster.login(A, BOB.0);
    sync(&mut bob, 0, 0);
    let got = inbox(&mut bob, 2);
    assert_eq!(payloads(&got), ["once", "next"], "stored once");
    assert_eq!(got[1].0, got[0].0 + 1, "nothing between them");
}

/// Each of bob's devices gets every message wherever it is connected; alice's laptop, on
/// another node, gets a copy of what her phone sent, and the phone does not.
#[test]
fn devices_on_different_nodes_each_get_every_message_and_the_senders_copy() {
    let cluster = Cluster::start(3);
    let login = |node: usize, user: UserId, device: &str| {
        let mut client = cluster.connect(node);
        let id = client.next_id();
        client.send_frame(&Frame::login_device(id, user, device, b""));
        let ok = client.recv();
        assert_eq!(ok.opcode, Opcode::LoginOk, "{ok:?}");
        client
    };
    let mut phone = login(A, ALICE, "phone");
    let mut laptop = login(B, ALICE, "laptop");
    sync(&mut phone, 0, 0);
    sync(&mut laptop, 0, 0);
    let mut bob_phone = login(B, BOB, "phone");
    let mut bob_tablet = login(C, BOB, "tablet");
    sync(&mut bob_phone, 0, 0);
    sync(&mut bob_tablet, 0, 0);

    assert_eq!(stored(&mut phone, BOB, "hi bob"), 2, "bob is on two nodes");
    for bob in [&mut bob_phone, &mut bob_tablet] {
        let got = inbox(bob, 1);
        assert_eq!((got[0].1, got[0].2, got[0].3.as_str()), (1, 2, "hi bob"));
    }
    // The copy: from alice's own inbox, source alice, target bob.
    let copy = inbox(&mut laptop, 1);
    assert_eq!((copy[0].1, copy[0].2, copy[0].3.as_str()), (1, 2, "hi bob"));
    // The phone that sent it gets no copy: the next thing it gets is bob's answer.
    assert_eq!(
        stored(&mut bob_tablet, ALICE, "hi alice"),
        2,
        "alice is on two nodes"
    );
    let next = inbox(&mut phone, 1);
    assert_eq!((next[0].1, next[0].3.as_str()), (2, "hi alice"));
}

/// `--inbox-max-messages 3`: the fourth stored message is refused with INBOX_FULL naming
/// the limit, and nothing of it is stored.
#[test]
fn a_full_inbox_answers_inbox_full() {
    let limit = || ["--inbox-max-messages", "3"].map(String::from).to_vec();
    let cluster = Cluster::start_with(2, |_| limit());
    let mut alice = cluster.login(A, ALICE.0);
    for i in 0..3 {
        stored(&mut alice, BOB, &format!("m{i}"));
    }
    let id = send_stored(&mut alice, BOB, "too many", true);
    let (code, reason) = answer(&mut alice, id).expect_err("refused");
    assert_eq!(code, ErrorCode::InboxFull as u16, "{reason}");
    assert!(reason.contains('3'), "names the limit: {reason}");
    // A resend gets the same answer.
    send_stored_as(&mut alice, id, BOB, "too many", true);
    assert_eq!(answer(&mut alice, id).map_err(|e| e.0), Err(code));

    let mut bob = cluster.login(B, BOB.0);
    let (state, _) = sync(&mut bob, 0, 0);
    assert_eq!(state.last_seq - state.first_seq, 2, "{state:?}");
    assert_eq!(payloads(&inbox(&mut bob, 3)), ["m0", "m1", "m2"]);
}

/// Stored SENDs that arrive in one read are stored by one function call: each is still
/// answered on its own, a resend inside the batch is answered as its first copy, and the
/// inbox limit refuses the one past it.
#[test]
fn one_reads_stored_sends_are_answered_one_by_one() {
    let limit = || ["--inbox-max-messages", "2"].map(String::from).to_vec();
    let cluster = Cluster::start_with(2, |_| limit());
    let mut alice = cluster.login(A, ALICE.0);
    let frame = |id: u64, text: &'static [u8]| {
        Frame::send(MessageId(id), BOB, Bytes::from_static(text))
            .with_flags(Flags::STORED.union(Flags::DEDUP))
            .to_bytes()
    };
    let mut burst = Vec::new();
    for (id, text) in [
        (11, &b"first"[..]),
        (11, b"first"),
        (12, b"second"),
        (13, b"third"),
    ] {
        burst.extend_from_slice(&frame(id, text));
    }
    alice.send_raw(&burst);
    assert_eq!(answer(&mut alice, MessageId(11)), Ok(0));
    assert_eq!(
        answer(&mut alice, MessageId(11)),
        Ok(0),
        "the resend: as the first"
    );
    assert_eq!(answer(&mut alice, MessageId(12)), Ok(0));
    let (code, reason) = answer(&mut alice, MessageId(13)).expect_err("past the limit");
    assert_eq!(code, ErrorCode::InboxFull as u16, "{reason}");

    let mut bob = cluster.login(B, BOB.0);
    let (state, _) = sync(&mut bob, 0, 0);
    assert_eq!(state.last_seq - state.first_seq, 1, "{state:?}");
    assert_eq!(payloads(&inbox(&mut bob, 2)), ["first", "second"]);
}

/// `--inbox-ttl 0.5`: messages older than that are dropped when their inbox is next
/// written (Redis's clock), and the recipient's next INBOX_SYNC reports them as a gap
/// (`expired_upto`); what came after them is delivered.
#[test]
fn expired_messages_are_dropped_and_reported_as_a_gap() {
    let ttl = || ["--inbox-ttl", "0.5"].map(String::from).to_vec();
    let cluster = Cluster::start_with(2, |_| ttl());
    let mut bob = cluster.login(B, BOB.0);
    let (first, _) = sync(&mut bob, 0, 0);
    drop(bob);
    let mut alice = cluster.login(A, ALICE.0);
    // Until node B sees bob's close, a store still counts it there; either way it is kept.
    stored(&mut alice, BOB, "old 1");
    stored(&mut alice, BOB, "old 2");
    // The age limit is the condition under test: only time passing can meet it.
    std::thread::sleep(Duration::from_millis(800));
    stored(&mut alice, BOB, "new");

    let mut bob = cluster.login(A, BOB.0);
    let (state, _) = sync(&mut bob, first.epoch, first.last_seq);
    assert_eq!(
        state.expired_upto,
        first.last_seq + 2,
        "both old ones expired: {state:?}"
    );
    assert_eq!(state.first_seq, first.last_seq + 3, "{state:?}");
    let got = inbox(&mut bob, 1);
    assert_eq!((got[0].0, got[0].3.as_str()), (first.last_seq + 3, "new"));
}

/// Without Redis nothing can be stored: a stored SEND and an INBOX_SYNC get
/// CLUSTER_UNAVAILABLE; once Redis is back (empty: it had no persistence), storing works
/// again under a new epoch.
#[test]
fn without_redis_stored_sends_and_syncs_are_refused_then_recover() {
    let mut cluster = Cluster::start(2);
    let mut alice = cluster.login(A, ALICE.0);
    let mut bob = cluster.login(B, BOB.0);
    let (before, _) = sync(&mut bob, 0, 0);
    cluster.redis.kill();
    // Refused whether the node has noticed the dead link yet or not: a store in flight is
    // answered when the link is found down.
    let id = send_stored(&mut alice, BOB, "while down", true);
    let (code, reason) = answer(&mut alice, id).expect_err("stored without Redis");
    assert_eq!(code, ErrorCode::ClusterUnavailable as u16, "{reason}");
    let id = bob.next_id();
    bob.send_frame(&Frame::inbox_sync(id, before.epoch, before.last_seq));
    let refused = bob.expect_error(ErrorCode::ClusterUnavailable);
    assert_eq!(refused.msg_id, id);

    cluster.redis.restart();
    // Bob's node closes his synced connection when it sees the new epoch: his client
    // must sync from the start.
    let deadline = Instant::now() + 3 * SAFETY_TIMEOUT;
    loop {
        assert!(Instant::now() < deadline, "storing never recovered");
        let id = send_stored(&mut alice, BOB, "after", true);
        if answer(&mut alice, id).is_ok() {
            break;
        }
        std::thread::sleep(support::redis::POLL); // a retry interval, not a sync
    }
    let mut bob = cluster.login(A, BOB.0);
    let (after, _) = sync(&mut bob, before.epoch, before.last_seq);
    assert_ne!(
        after.epoch, before.epoch,
        "Redis lost the inboxes: a new epoch"
    );
    let got = inbox(&mut bob, 1);
    assert_eq!(got[0].3, "after");
}

// ---- kill -9 with the SDK -----------------------------------------------------------------

fn sdk_config(user: UserId) -> ClientConfig {
    let mut c = support::quick_sdk(user.0);
    c.max_in_flight = 64;
    c.max_outbox = 10_000;
    c
}

fn sdk(addr: std::net::SocketAddr, user: UserId) -> Sdk {
    Sdk::connect(addr, sdk_config(user), SAFETY_TIMEOUT)
        .expect("connect")
        .0
}

fn number(payload: &[u8]) -> usize {
    std::str::from_utf8(payload).unwrap().parse().unwrap()
}

/// Sends `total` numbered stored messages from alice, crashes node `victim` (`kill -9`,
/// restarted on its address with an empty memory) once a quarter are ACKed, and checks
/// that bob's app is shown every message exactly once, each ACKed one included.
fn crash_while_storing(victim: usize, bob_online: bool) {
    const TOTAL: usize = 1000;
    let mut cluster = Cluster::start(2);
    let mut alice = sdk(cluster.nodes[A].addr, ALICE);
    let mut bob = bob_online.then(|| sdk(cluster.nodes[B].addr, BOB));
    let mut got = Vec::new();
    if let Some(bob) = bob.as_mut() {
        // Ready once its first message arrives.
        alice.send_stored(BOB, b"0".to_vec()).unwrap();
        run_until(bob, |e| {
            if let Event::Message { payload, .. } = e {
                got.push(number(&payload));
            }
            !got.is_empty()
        });
    } else {
        alice.send_stored(BOB, b"0".to_vec()).unwrap();
    }
    let mut by_id = BTreeMap::new();
    for i in 1..TOTAL {
        let id = alice.send_stored(BOB, i.to_string().into_bytes()).unwrap();
        by_id.insert(id, i);
    }
    let mut acked = Vec::new();
    run_until(&mut alice, |e| {
        if let Event::Stored { id, .. } = e {
            acked.extend(by_id.get(&id));
        }
        acked.len() >= TOTAL / 4
    });
    cluster.crash_and_restart(victim);
    let mut bob = bob.unwrap_or_else(|| sdk(cluster.nodes[B].addr, BOB));
    let acked_before_crash = acked.clone();
    let sorted = shown_once_each(&mut alice, &mut bob, &by_id, &mut acked, &mut got, TOTAL);
    for i in &acked_before_crash {
        assert!(sorted.binary_search(i).is_ok(), "{i} was ACKed and lost");
    }
    if bob_online {
        assert!(got.windows(2).all(|w| w[0] < w[1]), "in order: {got:?}");
    }
}

/// Runs alice's and bob's clients until every message of `by_id` was ACKed as stored
/// (into `acked`) and bob was shown `total` messages (into `got`); then checks that none
/// was shown twice and that they are `0..total`. Returns them sorted.
fn shown_once_each(
    alice: &mut Sdk,
    bob: &mut Sdk,
    by_id: &BTreeMap<MessageId, usize>,
    acked: &mut Vec<usize>,
    got: &mut Vec<usize>,
    total: usize,
) -> Vec<usize> {
    let deadline = Instant::now() + 6 * SAFETY_TIMEOUT;
    while got.len() < total || acked.len() < by_id.len() {
        assert!(
            Instant::now() < deadline,
            "stuck: bob got {}, {} ACKed",
            got.len(),
            acked.len()
        );
        while let Some(e) = alice.recv(Duration::from_millis(1)) {
            match e {
                Event::Stored { id, .. } => acked.extend(by_id.get(&id)),
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
    let mut sorted = got.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), got.len(), "a message shown twice");
    assert_eq!(
        sorted,
        (0..total).collect::<Vec<_>>(),
        "every message arrived"
    );
    sorted
}

/// Redis itself is killed (`SIGKILL`) while a stream is being stored, and restarted on
/// its append-only file (`appendfsync always`, the durable row of protocol.md 18.1's
/// table): every message ACKed as stored, before or after, reaches the recipient once, and
/// the store keeps its epoch (no client starts over).
#[test]
fn kill_9_of_a_durable_redis_loses_no_acked_message() {
    const TOTAL: usize = 600;
    let mut cluster = Cluster::start_on(Redis::start_durable(), 2, |_| Vec::new());
    let mut alice = sdk(cluster.nodes[A].addr, ALICE);
    let mut bob = sdk(cluster.nodes[B].addr, BOB);
    let mut by_id = BTreeMap::new();
    for i in 0..TOTAL {
        let id = alice.send_stored(BOB, i.to_string().into_bytes()).unwrap();
        by_id.insert(id, i);
    }
    let mut acked: Vec<usize> = Vec::new();
    let mut got: Vec<usize> = Vec::new();
    run_until(&mut alice, |e| {
        if let Event::Stored { id, .. } = e {
            acked.extend(by_id.get(&id));
        }
        acked.len() >= TOTAL / 4
    });
    let mut carol = cluster.login(B, 9);
    let (before, _) = sync(&mut carol, 0, 0);
    drop(carol);
    let acked_before_kill = acked.len();
    cluster.redis.kill();
    cluster.redis.restart();
    shown_once_each(&mut alice, &mut bob, &by_id, &mut acked, &mut got, TOTAL);
    println!("{acked_before_kill} of {TOTAL} ACKed as stored before Redis was killed");
    assert!(acked_before_kill < TOTAL, "Redis was killed mid-stream");
    let mut carol = cluster.login(A, 9);
    let (after, _) = sync(&mut carol, before.epoch, before.last_seq);
    assert_eq!(after.epoch, before.epoch, "the store kept its epoch");
}

#[test]
fn kill_9_of_the_senders_node_loses_no_acked_message() {
    crash_while_storing(A, true);
}

#[test]
fn kill_9_of_the_recipients_node_loses_no_acked_message() {
    crash_while_storing(B, true);
}

#[test]
fn kill_9_of_the_senders_node_with_the_recipient_offline() {
    crash_while_storing(A, false);
}
