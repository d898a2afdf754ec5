//! Stored delivery to several devices of one user (protocol.md, section 15.1), through the
//! relay core with a simulated clock: per-device cursors, new and returning devices,
//! copies of sent messages, token pinning, and bad device ids.

use std::time::Duration;

use bytes::Bytes;

use super::Harness;
use crate::proto::{ErrorCode, Flags, Frame, MessageId, Opcode, UserId};
use crate::relay::Config;
use crate::ConnId;

const ALICE: u64 = 1;
const BOB: u64 = 2;

fn stored(msg: u64, to: u64, payload: &[u8]) -> Frame {
    Frame::send(MessageId(msg), UserId(to), Bytes::copy_from_slice(payload))
        .with_flags(Flags::STORED)
}

fn login_device(h: &mut Harness, user: u64, device: &str) -> ConnId {
    let id = h.open();
    h.send_frame(
        id,
        Frame::login_device(MessageId(1), UserId(user), device, b""),
    );
    let reply = h.take_frames(id);
    assert_eq!(reply[0].opcode, Opcode::LoginOk, "{reply:?}");
    id
}

/// Syncs `id` from `last` (epoch of the relay when `last` > 0); returns INBOX_STATE's
/// (flags, first, last, expired) and the (source, target, seq, text) of each delivery.
fn sync(h: &mut Harness, id: ConnId, last: u64) -> ((Flags, u64, u64, u64), Vec<Delivery>) {
    let epoch = if last > 0 { h.relay.inboxes.epoch() } else { 0 };
    h.send_frame(id, Frame::inbox_sync(MessageId(3), epoch, last));
    let frames = h.take_frames(id);
    let state = frames[0].inbox_state().expect("INBOX_STATE first");
    let head = (
        frames[0].flags,
        state.first_seq,
        state.last_seq,
        state.expired_upto,
    );
    (head, deliveries(&frames[1..]))
}

type Delivery = (u64, u64, u64, String);

fn deliveries(frames: &[Frame]) -> Vec<Delivery> {
    frames
        .iter()
        .filter_map(|f| {
            let (seq, _, text) = f.inbox_deliver()?;
            Some((
                f.source.0,
                f.target.0,
                seq,
                String::from_utf8_lossy(&text).into(),
            ))
        })
        .collect()
}

fn texts(d: &[Delivery]) -> Vec<&str> {
    d.iter().map(|(_, _, _, t)| t.as_str()).collect()
}

#[test]
fn each_device_gets_every_stored_message_and_acks_only_for_itself() {
    let mut h = Harness::new(Config::default());
    let alice = h.login(ALICE);
    let phone = login_device(&mut h, BOB, "phone");
    let (head, none) = sync(&mut h, phone, 0);
    assert_eq!(head.0, Flags::NEW_DEVICE);
    assert!(none.is_empty());
    h.relay.handle_closed(phone);
    let tablet = login_device(&mut h, BOB, "tablet");
    sync(&mut h, tablet, 0);
    h.relay.handle_closed(tablet);
    for (n, text) in [(1, "one"), (2, "two")] {
        h.send_frame(alice, stored(n, BOB, text.as_bytes()));
    }
    h.take_frames(alice);
    // The phone comes back, gets both and acknowledges them: the tablet still gets both.
    let phone = login_device(&mut h, BOB, "phone");
    let (head, got) = sync(&mut h, phone, 0);
    assert_eq!(head.0, Flags::EMPTY, "the phone is known");
    assert_eq!(texts(&got), ["one", "two"]);
    let last = got[1].2;
    h.send_frame(phone, Frame::inbox_ack(MessageId(4), last));
    let tablet = login_device(&mut h, BOB, "tablet");
    let (_, got) = sync(&mut h, tablet, 0);
    assert_eq!(
        texts(&got),
        ["one", "two"],
        "an ack from the phone is the phone's"
    );
    h.send_frame(tablet, Frame::inbox_ack(MessageId(4), last));
    // Both have them: the inbox is empty, and a resync of either replays nothing.
    let (head, got) = sync(&mut h, phone, last);
    assert_eq!((head.1, got.len()), (last + 1, 0));
}

#[test]
fn a_sent_stored_message_reaches_the_senders_other_devices_but_not_the_sender() {
    let mut h = Harness::new(Config::default());
    let phone = login_device(&mut h, ALICE, "phone");
    let laptop = login_device(&mut h, ALICE, "laptop");
    sync(&mut h, phone, 0);
    sync(&mut h, laptop, 0);
    let bob = h.login(BOB);
    sync(&mut h, bob, 0);
    h.send_frame(phone, stored(7, BOB, b"hi bob"));
    let phone_got = h.take_frames(phone);
    assert_eq!(phone_got.len(), 1, "only the ACK: {phone_got:?}");
    assert_eq!(phone_got[0].ack_count(), Some(1));
    let laptop_got = deliveries(&h.take_frames(laptop));
    assert_eq!(laptop_got.len(), 1);
    let (source, target, _, text) = &laptop_got[0];
    assert_eq!((*source, *target, text.as_str()), (ALICE, BOB, "hi bob"));
    let bob_got = deliveries(&h.take_frames(bob));
    assert_eq!(texts(&bob_got), ["hi bob"]);
    // A user with one device gets no copy.
    h.send_frame(bob, stored(8, ALICE, b"hi alice"));
    let bob_frames = h.take_frames(bob);
    assert!(deliveries(&bob_frames).is_empty(), "{bob_frames:?}");
}

#[test]
fn a_device_away_past_the_retention_stops_holding_messages_and_is_told_of_the_gap() {
    let config = Config {
        device_retention: Duration::from_secs(60),
        ..Config::default()
    };
    let mut h = Harness::new(config);
    let alice = h.login(ALICE);
    let phone = login_device(&mut h, BOB, "phone");
    let tablet = login_device(&mut h, BOB, "tablet");
    sync(&mut h, phone, 0);
    sync(&mut h, tablet, 0);
    h.send_frame(alice, stored(1, BOB, b"first"));
    let seq = deliveries(&h.take_frames(phone))[0].2;
    h.take_frames(tablet);
    h.send_frame(tablet, Frame::inbox_ack(MessageId(4), seq));
    h.relay.handle_closed(phone);
    for n in 2..=3 {
        h.send_frame(alice, stored(n, BOB, b"later"));
    }
    let later = deliveries(&h.take_frames(tablet));
    h.advance(Duration::from_secs(61));
    h.send_frame(tablet, Frame::inbox_ack(MessageId(5), later[1].2));
    // The phone had `seq` only; 2 and 3 went while it was untracked.
    let phone = login_device(&mut h, BOB, "phone");
    let ((flags, first, _, expired), got) = sync(&mut h, phone, seq);
    assert_eq!(flags, Flags::EMPTY);
    assert!(got.is_empty());
    assert_eq!(
        expired,
        first - 1,
        "a gap up to what the inbox no longer holds"
    );
    assert!(expired > seq);
}

#[test]
fn bad_device_ids_are_refused_and_the_connection_stays_usable() {
    let mut h = Harness::new(Config::default());
    let id = h.open();
    let mut bad = Frame::login(MessageId(1), UserId(BOB), b"\x00x").with_flags(Flags::DEVICE);
    h.send_frame(id, bad.clone());
    let error = h.expect_error(id, ErrorCode::InvalidField);
    assert!(
        error.error().unwrap().1.contains("device id length 0"),
        "{error:?}"
    );
    bad.payload = Bytes::from_static(b"\x05ab");
    h.send_frame(id, bad);
    h.expect_error(id, ErrorCode::InvalidField);
    // Still open and not logged in: a good LOGIN works.
    h.send_frame(
        id,
        Frame::login_device(MessageId(2), UserId(BOB), "ok", b""),
    );
    assert_eq!(h.take_frames(id)[0].opcode, Opcode::LoginOk);
}
