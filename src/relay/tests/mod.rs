//! The relay core driven in memory: bytes in, queued frames out, a simulated clock.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::*;
use crate::proto::decode::decode_frame;
use crate::proto::{Frame, HEADER_LEN};

/// The peer address of harness connections (loopback: no per-address limit).
pub(super) const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

/// A relay plus helpers that play the driver's part without sockets.
pub(super) struct Harness {
    pub(super) relay: Relay,
    pub(super) now: Instant,
}

impl Harness {
    pub(super) fn new(config: Config) -> Harness {
        Harness {
            relay: Relay::new(config, Instant::now(), 1_700_000_000_000, 42),
            now: Instant::now(),
        }
    }

    pub(super) fn open(&mut self) -> ConnId {
        self.relay
            .handle_open(self.now, LOCAL)
            .expect("connection accepted")
    }

    /// Feeds raw bytes as one read.
    pub(super) fn feed(&mut self, id: ConnId, bytes: &[u8]) {
        self.relay.handle_input(id, bytes, self.now);
    }

    pub(super) fn send_frame(&mut self, id: ConnId, frame: Frame) {
        self.feed(id, &frame.to_bytes());
    }

    pub(super) fn login(&mut self, user: u64) -> ConnId {
        let id = self.open();
        self.send_frame(id, Frame::login(MessageId(1), UserId(user), b""));
        let reply = self.take_frames(id);
        assert_eq!(reply.len(), 1);
        assert_eq!(reply[0].opcode, Opcode::LoginOk);
        id
    }

    /// Everything queued to `id`, as the socket would receive it, marking it written.
    pub(super) fn take_output(&mut self, id: ConnId) -> Vec<u8> {
        let mut bytes = Vec::new();
        if let Some(out) = self.relay.output(id) {
            let mut slices = [std::io::IoSlice::new(&[]); 1024];
            let n = out.chunks(&mut slices);
            for s in &slices[..n] {
                bytes.extend_from_slice(s);
            }
        }
        self.relay.handle_written(id, bytes.len());
        bytes
    }

    pub(super) fn take_frames(&mut self, id: ConnId) -> Vec<Frame> {
        let mut buf = BytesMut::from(&self.take_output(id)[..]);
        let mut frames = Vec::new();
        while let Some(frame) = decode_frame(&mut buf, u32::MAX).expect("relay output decodes") {
            frames.push(frame.expect("relay sends known opcodes"));
        }
        assert!(buf.is_empty(), "relay output ends on a frame boundary");
        frames
    }

    pub(super) fn expect_error(&mut self, id: ConnId, code: ErrorCode) -> Frame {
        let frames = self.take_frames(id);
        assert_eq!(frames.len(), 1, "expected one ERROR, got {frames:?}");
        assert_eq!(frames[0].error_code(), Some(code), "{frames:?}");
        frames[0].clone()
    }

    pub(super) fn advance(&mut self, d: Duration) {
        self.now += d;
        self.relay.handle_timeout(self.now);
    }

    /// Drains the flush list and returns the connections it named.
    pub(super) fn flushed(&mut self) -> Vec<ConnId> {
        let mut ids = Vec::new();
        while let Some(id) = self.relay.poll_transmit() {
            ids.push(id);
        }
        ids
    }
}

fn send(msg: u64, to: u64, payload: &'static [u8]) -> Frame {
    Frame::send(MessageId(msg), UserId(to), Bytes::from_static(payload))
}

#[test]
fn send_is_delivered_with_the_source_and_acked() {
    let mut h = Harness::new(Config::default());
    let alice = h.login(1001);
    let bob = h.login(1002);
    h.send_frame(alice, send(7, 1002, b"hi bob"));

    let delivered = h.take_frames(bob);
    assert_eq!(
        delivered,
        vec![Frame::new(
            Opcode::Deliver,
            MessageId(7),
            UserId(1002),
            Bytes::from_static(b"hi bob")
        )
        .with_source(UserId(1001))]
    );
    let acks = h.take_frames(alice);
    assert_eq!(acks.len(), 1);
    assert_eq!(acks[0].opcode, Opcode::Ack);
    assert_eq!(acks[0].msg_id, MessageId(7));
    assert_eq!(acks[0].ack_count(), Some(1));
    assert_eq!(h.relay.metrics().messages_routed, 1);
}

#[test]
fn no_ack_flag_suppresses_only_the_ack() {
    let mut h = Harness::new(Config::default());
    let alice = h.login(1);
    let bob = h.login(2);
    h.send_frame(alice, send(1, 2, b"x").with_flags(Flags::NO_ACK));
    let delivered = h.take_frames(bob);
    assert_eq!(delivered.len(), 1);
    assert_eq!(
        delivered[0].flags,
        Flags::EMPTY,
        "relay clears flags on DELIVER"
    );
    assert!(h.take_frames(alice).is_empty());
    h.send_frame(alice, send(2, 99, b"x").with_flags(Flags::NO_ACK));
    h.expect_error(alice, ErrorCode::RecipientOffline);
}

#[test]
fn small_delivers_are_copied_per_device_and_a_large_one_is_shared() {
    let mut h = Harness::new(Config::default());
    let alice = h.login(1);
    let phones: Vec<ConnId> = (0..3).map(|_| h.login(2)).collect();
    for &phone in &phones {
        h.take_output(phone);
    }
    let large = Bytes::from(vec![9u8; COPY_MAX]);
    h.send_frame(alice, send(5, 2, b"to all devices"));
    h.send_frame(alice, send(6, 2, b"and again"));
    h.send_frame(alice, Frame::send(MessageId(7), UserId(2), large.clone()));
    let mut large_ptrs = Vec::new();
    for &phone in &phones {
        let out = h.relay.output(phone).unwrap();
        let mut slices = [std::io::IoSlice::new(&[]); 4];
        // The two small DELIVERs were copied back to back into one slice; the large
        // one follows as a frame of its own.
        assert_eq!(out.chunks(&mut slices), 2);
        assert_eq!(slices[0].len(), 2 * HEADER_LEN + 14 + 9);
        large_ptrs.push(slices[1].as_ptr());
        let frames = h.take_frames(phone);
        assert_eq!(frames.len(), 3);
        assert!(frames.iter().all(|f| f.source == UserId(1)));
        assert_eq!(frames[2].payload, large);
    }
    assert!(
        large_ptrs.windows(2).all(|w| w[0] == w[1]),
        "the large DELIVER is encoded once and shared"
    );
    let acks = h.take_frames(alice);
    assert!(acks.iter().all(|f| f.ack_count() == Some(3)), "{acks:?}");
}

#[test]
fn frames_split_across_reads_and_batched_in_one_read_all_decode() {
    let mut h = Harness::new(Config::default());
    let alice = h.login(1);
    let bob = h.login(2);
    let mut stream = Vec::new();
    for i in 0..10u64 {
        stream.extend_from_slice(
            &send(i, 2, b"0123456789")
                .with_flags(Flags::NO_ACK)
                .to_bytes(),
        );
    }
    for chunk in stream.chunks(7) {
        h.feed(alice, chunk);
    }
    h.feed(alice, &stream);
    let ids: Vec<u64> = h.take_frames(bob).iter().map(|f| f.msg_id.0).collect();
    let expected: Vec<u64> = (0..10).chain(0..10).collect();
    assert_eq!(ids, expected, "every frame once, in order");
}

#[test]
fn requests_before_login_are_refused_but_ping_works() {
    let mut h = Harness::new(Config::default());
    let c = h.open();
    h.send_frame(c, send(3, 2, b"x"));
    let err = h.expect_error(c, ErrorCode::NotLoggedIn);
    assert_eq!(err.msg_id, MessageId(3));
    h.send_frame(c, Frame::ping(MessageId(9), Bytes::from_static(b"abc")));
    assert_eq!(
        h.take_frames(c),
        vec![Frame::pong(MessageId(9), Bytes::from_static(b"abc"))]
    );
    h.send_frame(c, Frame::login(MessageId(4), UserId(5), b"token"));
    let ok = h.take_frames(c);
    assert_eq!(ok[0].opcode, Opcode::LoginOk);
    assert_eq!(ok[0].target, UserId(5));
    assert_eq!(
        ok[0].login_ok().unwrap().max_frame,
        Config::default().max_frame
    );
}

#[test]
fn field_errors_answer_the_frame_and_keep_the_connection() {
    let mut h = Harness::new(Config::default());
    let alice = h.login(1);
    let _bob = h.login(2);
    h.send_frame(alice, Frame::login(MessageId(2), UserId(3), b""));
    h.expect_error(alice, ErrorCode::AlreadyLoggedIn);
    h.send_frame(alice, send(3, 2, b"x").with_source(UserId(2)));
    h.expect_error(alice, ErrorCode::InvalidField);
    h.send_frame(alice, send(4, 2, b"x").with_flags(Flags(0x8000)));
    h.expect_error(alice, ErrorCode::InvalidField);
    h.send_frame(alice, send(5, 0, b"x"));
    h.expect_error(alice, ErrorCode::InvalidField);
    h.send_frame(
        alice,
        Frame::new(Opcode::Deliver, MessageId(6), UserId(2), Bytes::new()),
    );
    h.expect_error(alice, ErrorCode::InvalidField);
    let mut unknown = send(7, 2, b"x").to_bytes().to_vec();
    unknown[5] = 0x7f;
    h.feed(alice, &unknown);
    let err = h.expect_error(alice, ErrorCode::UnknownOpcode);
    assert_eq!(err.msg_id, MessageId(7));
    assert_eq!(h.relay.state(alice), Some(State::Active(UserId(1))));
    h.send_frame(alice, send(8, 2, b"still works"));
    assert_eq!(h.take_frames(alice)[0].opcode, Opcode::Ack);
}

#[test]
fn framing_errors_close_after_the_error_is_flushed() {
    for (bytes, code) in [
        (vec![0x00, 0x00, 0x00, 0x10], ErrorCode::Malformed),
        (vec![0x00, 0x10, 0x00, 0x01], ErrorCode::FrameTooLarge),
        (
            vec![0x00, 0x00, 0x00, 0x20, 0x02],
            ErrorCode::UnsupportedVersion,
        ),
        (b"\x7fELF\x02\x01".to_vec(), ErrorCode::FrameTooLarge),
    ] {
        let mut h = Harness::new(Config::default());
        let c = h.open();
        h.feed(c, &bytes);
        assert_eq!(h.relay.state(c), Some(State::Closing), "{code}");
        assert!(!h.relay.is_finished(c), "the ERROR is still queued");
        assert!(!h.relay.wants_read(c));
        h.expect_error(c, code);
        assert!(h.relay.is_finished(c));
        h.relay.handle_closed(c);
        assert_eq!(h.relay.session_count(), 0);
    }
}

#[test]
fn eof_mid_frame_is_reported_and_closes() {
    let mut h = Harness::new(Config::default());
    let alice = h.login(1);
    let frame = send(1, 2, b"abcdef").to_bytes();
    h.feed(alice, &frame[..20]);
    h.relay.handle_eof(alice, h.now);
    h.expect_error(alice, ErrorCode::Malformed);
    assert!(h.relay.is_finished(alice));
    assert!(
        h.relay.devices(UserId(1)).is_empty(),
        "closing users leave the directory"
    );
}

#[test]
fn bye_is_answered_then_closes() {
    let mut h = Harness::new(Config::default());
    let alice = h.login(1);
    h.send_frame(alice, Frame::bye(MessageId(3)));
    assert_eq!(h.take_frames(alice), vec![Frame::bye(MessageId(3))]);
    assert!(h.relay.is_finished(alice));
}

#[test]
fn offline_and_slow_recipients_get_errors_and_nothing_is_half_delivered() {
    let config = Config {
        out_cap: 64 * 1024,
        ..Config::default()
    };
    let mut h = Harness::new(config);
    let alice = h.login(1);
    let reader = h.login(2);
    let stalled = h.login(2);
    h.send_frame(alice, send(1, 3, b"x"));
    h.expect_error(alice, ErrorCode::RecipientOffline);

    let payload = Bytes::from(vec![7u8; 1000]);
    let mut acked = 0;
    let slow = loop {
        h.send_frame(
            alice,
            Frame::send(MessageId(100 + acked), UserId(2), payload.clone()),
        );
        let reply = h.take_frames(alice);
        h.take_output(reader); // one device keeps up, the other never reads
        match reply[0].opcode {
            Opcode::Ack => acked += 1,
            _ => break reply[0].clone(),
        }
    };
    assert_eq!(slow.error_code(), Some(ErrorCode::RecipientSlow));
    // Each queued frame counts its bytes plus the per-frame overhead.
    assert_eq!(acked as usize, 64 * 1024 / (1032 + FRAME_OVERHEAD));
    // Everything ACKed is still queued for the stalled device, in order, and nothing more.
    let frames = h.take_frames(stalled);
    let ids: Vec<u64> = frames.iter().map(|f| f.msg_id.0).collect();
    assert_eq!(ids, (100..100 + acked).collect::<Vec<_>>());
    h.send_frame(alice, Frame::send(MessageId(999), UserId(2), payload));
    assert_eq!(
        h.take_frames(alice)[0].ack_count(),
        Some(2),
        "drained: accepted again"
    );
}

#[test]
fn a_connection_over_its_own_cap_is_not_read_until_it_drains() {
    let config = Config {
        out_cap: 64 * 1024,
        ..Config::default()
    };
    let mut h = Harness::new(config);
    let alice = h.login(1);
    let mut pings = Vec::new();
    for i in 0..100 {
        pings
            .extend_from_slice(&Frame::ping(MessageId(i), Bytes::from(vec![0u8; 1000])).to_bytes());
    }
    h.feed(alice, &pings);
    assert!(!h.relay.wants_read(alice));
    assert_eq!(h.relay.metrics().read_pauses, 1);
    assert_eq!(h.relay.poll_resume(), None);
    h.take_output(alice);
    assert_eq!(h.relay.poll_resume(), Some(alice));
    assert!(h.relay.wants_read(alice));
}

#[test]
fn device_and_connection_limits() {
    let config = Config {
        max_connections: 3,
        max_devices_per_user: 2,
        ..Config::default()
    };
    let mut h = Harness::new(config);
    h.login(1);
    h.login(1);
    let third = h.open();
    h.send_frame(third, Frame::login(MessageId(1), UserId(1), b""));
    h.expect_error(third, ErrorCode::LimitReached);
    assert_eq!(h.relay.state(third), Some(State::AwaitingLogin));
    let refused = h.relay.handle_open(h.now, LOCAL).unwrap_err();
    assert_eq!(refused.code, ErrorCode::LimitReached);
    let mut buf = BytesMut::from(&refused.frame[..]);
    let frame = decode_frame(&mut buf, u32::MAX).unwrap().unwrap().unwrap();
    assert_eq!(frame.error_code(), Some(ErrorCode::LimitReached));
    h.relay.handle_closed(third);
    assert!(h.relay.handle_open(h.now, LOCAL).is_ok());
}

#[test]
fn login_timeout_closes_silent_newcomers_only() {
    let mut h = Harness::new(Config::default());
    let lurker = h.open();
    h.advance(Duration::from_secs(5));
    let alice = h.login(1);
    h.advance(Duration::from_secs(6));
    h.expect_error(lurker, ErrorCode::LoginTimeout);
    assert!(h.relay.is_finished(lurker));
    assert_eq!(h.relay.state(alice), Some(State::Active(UserId(1))));
    assert!(h.take_frames(alice).is_empty());
}

#[test]
fn a_person_in_text_mode_has_the_text_login_timeout() {
    let mut h = Harness::new(Config::default());
    let telnet = h.open();
    let binary = h.open();
    let silent = h.open();
    h.feed(telnet, b"HELP\r\n");
    assert!(String::from_utf8(h.take_output(telnet))
        .unwrap()
        .starts_with("HELP"));
    h.feed(binary, &Frame::ping(MessageId(1), Bytes::new()).to_bytes());
    assert_eq!(h.take_frames(binary)[0].opcode, Opcode::Pong);

    h.advance(Duration::from_secs(11));
    h.expect_error(binary, ErrorCode::LoginTimeout);
    assert!(h.relay.is_finished(binary), "binary keeps the usual 10 s");
    h.expect_error(silent, ErrorCode::LoginTimeout);
    assert!(
        h.relay.is_finished(silent),
        "so does a connection that sent nothing"
    );

    h.advance(Duration::from_secs(49));
    assert_eq!(h.relay.state(telnet), Some(State::AwaitingLogin));
    assert!(h.take_output(telnet).is_empty(), "still open at 60 s");
    h.advance(Duration::from_secs(61));
    let out = String::from_utf8(h.take_output(telnet)).unwrap();
    assert!(
        out.starts_with("ERR LOGIN_TIMEOUT 0 no LOGIN within 120000 ms"),
        "{out}"
    );
    assert!(h.relay.is_finished(telnet));
}

#[test]
fn a_text_line_started_before_the_codec_was_known_keeps_its_frame_timeout() {
    let mut h = Harness::new(Config::default());
    let telnet = h.open();
    h.feed(telnet, b"GE"); // could still be an HTTP GET
    h.advance(Duration::from_secs(5));
    h.feed(telnet, b"LP"); // text mode, a line without its end
    h.advance(Duration::from_secs(26));
    let out = String::from_utf8(h.take_output(telnet)).unwrap();
    assert!(out.starts_with("ERR FRAME_TIMEOUT"), "{out}");
    assert!(h.relay.is_finished(telnet));
}

#[test]
fn silence_gets_a_ping_then_an_idle_timeout_and_traffic_resets_both() {
    let mut h = Harness::new(Config::default());
    let alice = h.login(1);
    h.advance(Duration::from_secs(29));
    assert!(h.take_frames(alice).is_empty());
    h.advance(Duration::from_secs(2));
    let ping = h.take_frames(alice);
    assert_eq!(ping.len(), 1);
    assert_eq!(ping[0].opcode, Opcode::Ping);
    h.send_frame(alice, Frame::pong(ping[0].msg_id, Bytes::new()));
    h.advance(Duration::from_secs(60));
    assert_eq!(
        h.take_frames(alice)[0].opcode,
        Opcode::Ping,
        "a new silence, a new PING"
    );
    assert_eq!(h.relay.state(alice), Some(State::Active(UserId(1))));
    h.advance(Duration::from_secs(60));
    h.expect_error(alice, ErrorCode::IdleTimeout);
    assert!(h.relay.is_finished(alice));
}

#[test]
fn the_ping_clock_starts_at_login_not_at_the_login_deadline() {
    let config = Config {
        ping_interval: Duration::from_millis(200),
        idle_timeout: Duration::from_millis(600),
        ..Config::default()
    };
    let mut h = Harness::new(config);
    let alice = h.login(1);
    h.advance(Duration::from_millis(199));
    assert!(h.take_frames(alice).is_empty());
    h.advance(Duration::from_millis(1));
    assert_eq!(h.take_frames(alice)[0].opcode, Opcode::Ping);
    h.advance(Duration::from_millis(400));
    h.expect_error(alice, ErrorCode::IdleTimeout);
    // One live deadline per session: nothing else fires later.
    h.advance(Duration::from_secs(20));
    assert!(h.take_frames(alice).is_empty());
}

#[test]
fn text_mode_is_chosen_by_the_first_byte_and_shares_the_routing() {
    let mut h = Harness::new(Config::default());
    let telnet = h.open();
    h.feed(telnet, b"login 7\r\nHELP\r\nsend 8 anyone?\r\nSE");
    let out = String::from_utf8(h.take_output(telnet)).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "OK LOGIN 7");
    assert!(lines[1].starts_with("HELP"));
    assert_eq!(
        *lines.last().unwrap(),
        "ERR RECIPIENT_OFFLINE 2 user 8 is not connected"
    );

    let binary = h.login(8);
    h.feed(telnet, b"ND 8 hi from telnet\n");
    let got = h.take_frames(binary);
    assert_eq!(got[0].opcode, Opcode::Deliver);
    assert_eq!(
        (got[0].source, &got[0].payload[..]),
        (UserId(7), &b"hi from telnet"[..])
    );
    assert_eq!(h.take_output(telnet), b"ACK 3 1\r\n");

    h.send_frame(binary, send(40, 7, b"hi from binary"));
    assert_eq!(h.take_output(telnet), b"MSG 8 40 hi from binary\r\n");

    h.feed(telnet, b"fly me to the moon\r\n");
    let out = String::from_utf8(h.take_output(telnet)).unwrap();
    assert!(out.starts_with("ERR USAGE 0 unknown command"), "{out}");
    h.feed(telnet, b"quit\r\n");
    assert_eq!(h.take_output(telnet), b"BYE\r\n");
    assert!(h.relay.is_finished(telnet));
}

#[test]
fn a_text_line_longer_than_the_max_frame_closes() {
    let mut h = Harness::new(Config::default());
    let telnet = h.open();
    h.feed(telnet, &vec![b'a'; 70_000]);
    let out = String::from_utf8(h.take_output(telnet)).unwrap();
    assert!(out.starts_with("ERR FRAME_TOO_LARGE"), "{out}");
    assert!(h.relay.is_finished(telnet));
}

#[test]
fn closing_connections_linger_at_most_the_linger_time() {
    let mut h = Harness::new(Config::default());
    let alice = h.login(1);
    h.send_frame(alice, Frame::bye(MessageId(1)));
    h.relay.handle_write_blocked(alice);
    h.flushed();
    assert!(!h.relay.is_finished(alice), "BYE reply still queued");
    h.advance(CLOSE_LINGER);
    assert_eq!(h.flushed(), vec![alice]);
    assert!(h.relay.is_finished(alice));
}

#[test]
fn shutdown_tells_everyone_and_refuses_newcomers() {
    let mut h = Harness::new(Config::default());
    let a = h.login(1);
    let b = h.open();
    h.relay.begin_shutdown(h.now);
    for id in [a, b] {
        h.expect_error(id, ErrorCode::ShuttingDown);
        assert!(h.relay.is_finished(id));
    }
    assert_eq!(
        h.relay.handle_open(h.now, LOCAL).unwrap_err().code,
        ErrorCode::ShuttingDown
    );
}

#[test]
fn closed_connections_leave_nothing_behind() {
    let mut h = Harness::new(Config::default());
    for round in 0..3000u64 {
        let id = h.login(round % 7 + 1);
        h.send_frame(id, send(1, 1, b"x"));
        h.relay.handle_closed(id);
    }
    assert_eq!(h.relay.session_count(), 0);
    assert_eq!(h.relay.user_count(), 0);
    assert!(
        h.relay.timers.len() <= 1024 + 1,
        "stale deadlines are compacted"
    );
}

#[test]
fn each_connection_is_flushed_once_per_round() {
    let mut h = Harness::new(Config::default());
    let alice = h.login(1);
    let bob = h.login(2);
    h.flushed();
    for i in 0..5 {
        h.send_frame(alice, send(i, 2, b"x"));
    }
    let mut named = h.flushed();
    named.sort();
    assert_eq!(named, vec![alice, bob]);
    h.relay.handle_write_blocked(bob);
    h.send_frame(alice, send(9, 2, b"x").with_flags(Flags::NO_ACK));
    assert!(
        h.flushed().is_empty(),
        "a blocked socket waits for writable"
    );
    h.relay.handle_writable(bob);
    assert_eq!(h.flushed(), vec![bob]);
}

mod auth;
mod cluster;
mod devices;
mod hostile;
#[path = "../../../tests/sim/inbox_model.rs"]
mod inbox_model;
mod order;
mod rooms;
mod stored;
mod ws;

#[test]
fn log_labels_never_reuse_a_connection_id_and_name_the_user_and_device() {
    let mut h = Harness::new(Config::default());
    let first = h.open();
    let first_label = h.relay.conn_label(first).to_string();
    h.relay.handle_closed(first);
    let second = h.open();
    assert_eq!(first, second, "the slab key is reused");
    let second_label = h.relay.conn_label(second).to_string();
    assert_ne!(first_label, second_label);
    assert!(second_label.starts_with("conn#"), "{second_label}");
    // Unknown (closed) connections are named by their slab key.
    h.relay.handle_closed(second);
    assert_eq!(h.relay.conn_label(second).to_string(), "conn slot 0");

    let tablet = h.open();
    h.send_frame(
        tablet,
        Frame::login_device(MessageId(1), UserId(1002), "tablet", b""),
    );
    assert_eq!(h.take_frames(tablet)[0].opcode, Opcode::LoginOk);
    let label = h.relay.conn_label(tablet).to_string();
    assert!(label.ends_with(" user 1002@tablet"), "{label}");
    // Still named while it closes (the state no longer holds the user).
    h.send_frame(tablet, Frame::bye(MessageId(2)));
    assert_eq!(h.relay.state(tablet), Some(State::Closing));
    assert_eq!(h.relay.conn_label(tablet).to_string(), label);

    // A device id that is not plain is quoted: it cannot forge the rest of a line.
    let odd = h.open();
    h.send_frame(
        odd,
        Frame::login_device(MessageId(1), UserId(7), "a: closing", b""),
    );
    assert_eq!(h.take_frames(odd)[0].opcode, Opcode::LoginOk);
    let label = h.relay.conn_label(odd).to_string();
    assert!(label.ends_with(" user 7@\"a: closing\""), "{label}");

    let plain = h.login(8);
    let label = h.relay.conn_label(plain).to_string();
    assert!(label.ends_with(" user 8"), "{label}");
}

#[test]
fn login_ok_carries_heartbeat_bounds_only_for_a_login_that_asks() {
    let config = Config {
        ping_interval: Duration::from_secs(25),
        heartbeat_min: Some(Duration::from_millis(7_500)),
        ..Config::default()
    };
    let mut h = Harness::new(config);
    // Without the flag: the 16 bytes of before.
    let old = h.open();
    h.send_frame(old, Frame::login(MessageId(1), UserId(1), b""));
    let ok = h.take_frames(old);
    assert_eq!(ok[0].opcode, Opcode::LoginOk);
    assert_eq!(ok[0].payload.len(), crate::proto::LoginOk::LEN);
    assert_eq!(ok[0].login_ok().map(|l| l.heartbeat), Some(None));
    // With it (and DEVICE alongside): 24 bytes, min then the ping interval.
    let new = h.open();
    h.send_frame(
        new,
        Frame::login_device(MessageId(2), UserId(2), "phone", b"")
            .with_flags(Flags::DEVICE.union(Flags::HEARTBEAT)),
    );
    let ok = h.take_frames(new);
    assert_eq!(ok[0].opcode, Opcode::LoginOk, "{ok:?}");
    assert_eq!(ok[0].payload.len(), crate::proto::LoginOk::LEN_HEARTBEAT);
    let limits = ok[0].login_ok().expect("24-byte LOGIN_OK parses");
    assert_eq!(limits.ping_interval_ms, 25_000);
    assert_eq!(
        limits.heartbeat,
        Some(crate::proto::HeartbeatBounds {
            min_ms: 7_500,
            max_ms: 25_000,
        })
    );
}

#[test]
fn heartbeat_min_defaults_to_ten_seconds_capped_at_the_ping_interval_and_is_validated() {
    let config = Config::default();
    assert_eq!(config.heartbeat_min(), Duration::from_secs(10));
    let fast = Config {
        ping_interval: Duration::from_millis(200),
        idle_timeout: Duration::from_millis(600),
        ..Config::default()
    };
    assert_eq!(fast.heartbeat_min(), Duration::from_millis(200));
    assert_eq!(fast.validate(), Ok(()));
    for bad in [Duration::ZERO, Duration::from_millis(201)] {
        let config = Config {
            heartbeat_min: Some(bad),
            ..fast.clone()
        };
        assert_eq!(config.validate(), Err(ConfigError::HeartbeatMin));
    }
}

#[test]
fn frames_and_bytes_are_counted_by_opcode_both_ways() {
    let mut h = Harness::new(Config::default());
    let alice = h.login(1);
    let bob = h.login(2);
    let sent = send(5, 2, b"hello");
    let len = sent.to_bytes().len() as u64;
    h.send_frame(alice, sent);
    h.take_frames(bob);
    h.take_frames(alice);
    let m = h.relay.metrics();
    let (send_op, deliver, ack) = (Opcode::Send as u8, Opcode::Deliver as u8, Opcode::Ack as u8);
    assert_eq!(m.frames_in_by_opcode.get(send_op), 1);
    assert_eq!(m.bytes_in_by_opcode.get(send_op), len);
    assert_eq!(m.frames_out_by_opcode.get(deliver), 1);
    assert_eq!(
        m.bytes_out_by_opcode.get(deliver),
        len,
        "a DELIVER is its SEND rewritten"
    );
    assert_eq!(m.frames_out_by_opcode.get(ack), 1);
    assert_eq!(m.bytes_out_by_opcode.get(ack), 36);
    assert_eq!(m.frames_out_by_opcode.get(Opcode::LoginOk as u8), 2);
}
