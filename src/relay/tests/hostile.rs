//! The core's defences against hostile peers (issue: memory and CPU bounded per
//! connection): partial-input deadlines, per-address limits, the memory budget, one
//! frame-size rule for text lines, no frame pinning another's memory, resumable reads.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use bytes::{Bytes, BytesMut};

use super::*;

const REMOTE: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7));

#[test]
fn a_frame_trickling_in_is_closed_at_the_frame_timeout() {
    let config = Config {
        frame_timeout: Duration::from_secs(10),
        ..Config::default()
    };
    let mut h = Harness::new(config);
    let alice = h.login(1);
    let frame = send(1, 1, b"never finished").to_bytes();
    // One byte every 3 s: each byte is activity, so the idle timer alone never fires.
    for byte in &frame[..3] {
        h.feed(alice, std::slice::from_ref(byte));
        h.advance(Duration::from_secs(3));
        assert_eq!(h.relay.state(alice), Some(State::Active(UserId(1))));
    }
    h.feed(alice, &frame[3..4]);
    h.advance(Duration::from_secs(1));
    let error = h.expect_error(alice, ErrorCode::FrameTimeout);
    assert!(error.error().unwrap().1.contains("10000 ms"), "{error:?}");
    assert!(h.relay.is_finished(alice));
    assert_eq!(
        h.relay.memory_held(),
        h.relay.spare_held(),
        "the partial frame was freed: only spare output buffers remain"
    );
}

#[test]
fn whole_frames_reset_the_frame_clock_and_a_trickling_text_line_times_out_too() {
    let config = Config {
        frame_timeout: Duration::from_secs(10),
        ..Config::default()
    };
    let mut h = Harness::new(config);
    let alice = h.login(1);
    // Complete frames in many pieces, each finished within the timeout: never closed.
    for i in 0..5 {
        let frame = Frame::ping(MessageId(i), Bytes::new()).to_bytes();
        h.feed(alice, &frame[..10]);
        h.advance(Duration::from_secs(8));
        h.feed(alice, &frame[10..]);
        assert_eq!(h.take_frames(alice)[0].opcode, Opcode::Pong);
    }
    let telnet = h.open();
    h.feed(telnet, b"login 5\n");
    h.take_output(telnet);
    for _ in 0..4 {
        h.feed(telnet, b"s");
        h.advance(Duration::from_secs(3));
    }
    let out = String::from_utf8(h.take_output(telnet)).unwrap();
    assert!(out.starts_with("ERR FRAME_TIMEOUT"), "{out}");
    assert!(h.relay.is_finished(telnet));
    assert_eq!(h.relay.state(alice), Some(State::Active(UserId(1))));
}

#[test]
fn connections_per_address_are_limited_but_loopback_is_exempt() {
    let config = Config {
        max_connections_per_ip: 2,
        ..Config::default()
    };
    let mut h = Harness::new(config);
    let first = h.relay.handle_open(h.now, REMOTE).unwrap();
    h.relay.handle_open(h.now, REMOTE).unwrap();
    let refused = h.relay.handle_open(h.now, REMOTE).unwrap_err();
    assert_eq!(refused.code, ErrorCode::LimitReached);
    let other = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 8));
    h.relay.handle_open(h.now, other).unwrap();
    for _ in 0..5 {
        h.open(); // loopback
    }
    h.relay.handle_closed(first);
    h.relay
        .handle_open(h.now, REMOTE)
        .expect("a slot was freed");
}

#[test]
fn a_complete_text_line_longer_than_the_max_frame_is_refused() {
    let config = Config {
        max_frame: 1024,
        out_cap: 64 * 1024,
        ..Config::default()
    };
    let mut h = Harness::new(config);
    let bob = h.login(2);
    let telnet = h.open();
    h.feed(telnet, b"login 1\n");
    h.take_output(telnet);
    let mut line = b"send 2 ".to_vec();
    line.extend(vec![b'x'; 5000]);
    line.push(b'\n');
    h.feed(telnet, &line);
    let out = String::from_utf8(h.take_output(telnet)).unwrap();
    assert!(out.starts_with("ERR FRAME_TOO_LARGE"), "{out}");
    assert!(h.take_frames(bob).is_empty(), "nothing was forwarded");
}

#[test]
fn a_text_line_that_becomes_a_frame_over_the_max_is_refused() {
    let config = Config {
        max_frame: 1024,
        out_cap: 64 * 1024,
        ..Config::default()
    };
    let mut h = Harness::new(config);
    let bob = h.login(2);
    let telnet = h.open();
    h.feed(telnet, b"login 1\n");
    h.take_output(telnet);
    // A line of exactly the max frame, split over two reads: the SEND it becomes has a
    // 32-byte header, so it would be over the max frame the binary client was told.
    let mut line = b"send 2 ".to_vec();
    line.extend(vec![b'y'; 1024 - 7]);
    line.push(b'\n');
    h.feed(telnet, &line[..500]);
    h.feed(telnet, &line[500..]);
    let out = String::from_utf8(h.take_output(telnet)).unwrap();
    assert!(out.starts_with("ERR FRAME_TOO_LARGE"), "{out}");
    assert!(h.take_frames(bob).is_empty());
    // The largest line that fits is delivered, within the max frame.
    let telnet = h.open();
    h.feed(telnet, b"login 3\n");
    let mut line = b"send 2 ".to_vec();
    line.extend(vec![b'z'; 1024 - 32]);
    line.push(b'\n');
    h.feed(telnet, &line);
    let got = h.take_frames(bob);
    assert_eq!(got[0].encoded_len(), 1024);
}

#[test]
fn the_memory_budget_refuses_sends_and_partial_frames_past_it() {
    let config = Config {
        out_cap: 64 * 1024,
        max_memory: 128 * 1024,
        ..Config::default()
    };
    let mut h = Harness::new(config);
    let alice = h.login(1);
    for user in 2..=4 {
        h.login(user); // none of them ever reads
    }
    let payload = Bytes::from(vec![5u8; 8 * 1024]);
    let mut slow = Vec::new();
    for i in 0..60u64 {
        let to = 2 + i % 3;
        h.send_frame(
            alice,
            Frame::send(MessageId(i), UserId(to), payload.clone()),
        );
        let reply = h.take_frames(alice);
        if reply[0].opcode == Opcode::Error {
            slow.push(reply[0].error().unwrap().1);
        }
    }
    assert!(
        h.relay.memory_held() <= 128 * 1024,
        "{}",
        h.relay.memory_held()
    );
    assert!(
        slow.iter().any(|r| r.contains("memory budget")),
        "the budget, not the per-queue cap, stopped it: {slow:?}"
    );
    // A partial frame that does not fit the budget closes its connection.
    let big = h.login(9);
    let header = Frame::send(MessageId(1), UserId(2), Bytes::from(vec![0u8; 60_000])).to_bytes();
    h.feed(big, &header[..100]);
    h.expect_error(big, ErrorCode::LimitReached);
    assert!(h.relay.memory_held() <= 128 * 1024);
}

#[test]
fn no_queued_frame_points_into_the_read_buffer() {
    let mut h = Harness::new(Config::default());
    let alice = h.login(1);
    let bob = h.login(2);
    let carol = h.login(3);
    h.take_output(bob);
    h.relay.handle_write_blocked(carol);
    // One read holding a small SEND to bob, one to carol (whose socket is blocked), a
    // large SEND to bob, a PING and a large SEND to nobody: whatever waits in a queue,
    // the read buffer is free again the moment the read is handled.
    let mut read = BytesMut::with_capacity(64 * 1024);
    read.extend_from_slice(&send(1, 2, b"hello").to_bytes());
    read.extend_from_slice(&send(2, 3, b"hello").to_bytes());
    let large = Bytes::from(vec![5u8; 2 * COPY_MAX]);
    read.extend_from_slice(&Frame::send(MessageId(3), UserId(2), large.clone()).to_bytes());
    read.extend_from_slice(&Frame::ping(MessageId(4), Bytes::from_static(b"p")).to_bytes());
    read.extend_from_slice(
        &Frame::send(MessageId(5), UserId(99), Bytes::from(vec![0u8; 30_000])).to_bytes(),
    );
    let mut buf = read.split();
    h.relay.handle_read(alice, &mut buf, h.now);
    assert!(buf.is_empty(), "the read is used up");
    drop(buf);
    let before = read.capacity();
    assert!(
        read.try_reclaim(before + 1),
        "nothing points into the read buffer"
    );
    let to_bob = h.take_frames(bob);
    assert_eq!(to_bob[0].payload, Bytes::from_static(b"hello"));
    assert_eq!(to_bob[1].payload, large);
    h.relay.handle_writable(carol);
    assert_eq!(
        h.take_frames(carol)[0].payload,
        Bytes::from_static(b"hello")
    );
    let to_alice = h.take_frames(alice);
    assert_eq!(to_alice[3].opcode, Opcode::Pong, "{to_alice:?}");
}

#[test]
fn paused_reads_are_announced_for_resumption_as_soon_as_the_queue_drains() {
    let config = Config {
        out_cap: 64 * 1024,
        ..Config::default()
    };
    let mut h = Harness::new(config);
    let alice = h.login(1);
    let ping = Frame::ping(MessageId(1), Bytes::from(vec![0u8; 1000])).to_bytes();
    while h.relay.wants_read(alice) {
        h.feed(alice, &ping);
    }
    assert!(!h.relay.has_resumes());
    h.take_output(alice);
    assert!(
        h.relay.has_resumes(),
        "the driver must not sleep: reads may go on"
    );
    assert_eq!(h.relay.poll_resume(), Some(alice));
    assert!(h.relay.wants_read(alice));
}

#[test]
fn a_room_over_its_total_rate_refuses_more() {
    let config = Config {
        room_send_rate: 0,
        room_total_rate: 10,
        room_total_burst: 5,
        ..Config::default()
    };
    let mut h = Harness::new(config);
    let room = RoomId(5);
    let members: Vec<ConnId> = (1..=4).map(|u| h.login(u)).collect();
    for &m in &members {
        h.send_frame(m, Frame::join(MessageId(1), room));
        h.take_output(m);
    }
    let mut limited = 0;
    for (i, &m) in members.iter().cycle().take(20).enumerate() {
        h.send_frame(
            m,
            Frame::room_send(MessageId(i as u64), room, Bytes::from_static(b"hi")),
        );
        let frames = h.take_frames(m);
        limited += frames
            .iter()
            .filter(|f| f.error_code() == Some(ErrorCode::RateLimited))
            .count();
    }
    assert_eq!(
        limited, 15,
        "a burst of 5 for the whole room, whoever sends"
    );
}

#[test]
fn reads_that_always_end_mid_frame_are_not_a_slow_frame() {
    let config = Config {
        frame_timeout: Duration::from_secs(10),
        ..Config::default()
    };
    let mut h = Harness::new(config);
    let alice = h.login(1);
    let telnet = h.open();
    h.feed(telnet, b"login 5\n");
    h.take_output(telnet);
    // Every read finishes one frame (line) and starts the next; each frame takes 8 s,
    // within the 10 s timeout, although some frame is always partial.
    let ping = |i| Frame::ping(MessageId(i), Bytes::new()).to_bytes();
    h.feed(alice, &ping(0)[..10]);
    h.feed(telnet, b"pi");
    for i in 0..5u64 {
        h.advance(Duration::from_secs(8));
        let mut read = ping(i)[10..].to_vec();
        read.extend_from_slice(&ping(i + 1)[..10]);
        h.feed(alice, &read);
        h.feed(telnet, b"ng\npi");
        assert_eq!(h.take_frames(alice)[0].opcode, Opcode::Pong, "frame {i}");
        assert!(String::from_utf8(h.take_output(telnet))
            .unwrap()
            .starts_with("PONG"));
    }
    assert_eq!(h.relay.state(alice), Some(State::Active(UserId(1))));
    assert_eq!(h.relay.state(telnet), Some(State::Active(UserId(5))));
}

#[test]
fn a_connection_whose_frames_are_all_refused_is_closed_after_a_limit() {
    let mut h = Harness::new(Config::default());
    let alice = h.login(1);
    // One short of the limit, then an accepted frame: the count starts again.
    let refused = send(1, 99, b"to nobody").to_bytes(); // RECIPIENT_OFFLINE
    for _ in 1..MAX_REFUSED_IN_A_ROW {
        h.feed(alice, &refused);
    }
    h.feed(alice, &Frame::ping(MessageId(2), Bytes::new()).to_bytes());
    h.take_output(alice);
    for _ in 1..MAX_REFUSED_IN_A_ROW {
        h.feed(alice, &refused);
    }
    assert_eq!(h.relay.state(alice), Some(State::Active(UserId(1))));
    h.take_output(alice);
    h.feed(alice, &refused);
    let frames = h.take_frames(alice);
    assert_eq!(frames[0].error_code(), Some(ErrorCode::RecipientOffline));
    let last = frames.last().unwrap();
    assert_eq!(last.error_code(), Some(ErrorCode::LimitReached), "{last:?}");
    assert!(last.error().unwrap().1.contains("in a row"));
    assert!(h.relay.is_finished(alice));
}
