//! Hostile and broken input over real sockets: each case gets its ERROR and/or a clean
//! close for that connection only, and two bystanders keep being served afterwards.

mod support;

use std::io::Write;
use std::time::Duration;

use bytes::Bytes;
use imrelay::proto::{ErrorCode, Flags, Frame, MessageId, Opcode, RoomId, UserId};
use imrelay::relay::Config;
use support::{Bystanders, TestRelay};

/// Sends `bytes` on a fresh connection and expects `code`, then the close.
fn framing_error_closes(bytes: &[u8], code: ErrorCode) {
    let relay = TestRelay::default_config();
    let mut bystanders = Bystanders::new(&relay, 1, 2);
    let mut bad = relay.connect();
    bad.send_raw(bytes);
    bad.expect_error(code);
    bad.expect_closed();
    bystanders.still_served();
}

#[test]
fn garbage_bytes_get_an_error_and_a_close() {
    // Not a letter (text mode) and not 0x00: binary framing, and 0xfffe... as a length is
    // far past the max frame.
    framing_error_closes(b"\xff\xfe\x01garbage\r\n", ErrorCode::FrameTooLarge);
}

#[test]
fn a_length_past_the_max_frame_is_refused_before_the_body() {
    // Only the 4 length bytes are sent: the relay must not wait for 1 MiB of body.
    framing_error_closes(&[0x00, 0x10, 0x00, 0x01], ErrorCode::FrameTooLarge);
}

#[test]
fn a_length_below_the_header_is_malformed() {
    framing_error_closes(
        &[0x00, 0x00, 0x00, 0x08, 0x01, 0x07, 0, 0],
        ErrorCode::Malformed,
    );
}

#[test]
fn a_wrong_version_is_refused() {
    let mut frame = Frame::ping(MessageId(1), Bytes::new()).to_bytes().to_vec();
    frame[4] = 9;
    framing_error_closes(&frame, ErrorCode::UnsupportedVersion);
}

#[test]
fn a_truncated_frame_then_close_is_reported_to_the_half_closed_peer() {
    let relay = TestRelay::default_config();
    let mut bystanders = Bystanders::new(&relay, 1, 2);
    let mut c = relay.login(3);
    let frame = Frame::send(MessageId(1), UserId(1), Bytes::from_static(b"cut short")).to_bytes();
    c.send_raw(&frame[..frame.len() - 3]);
    c.shutdown_write();
    let err = c.expect_error(ErrorCode::Malformed);
    assert!(err.error().unwrap().1.contains("middle of a frame"));
    c.expect_closed();
    bystanders.still_served();
    // The partial frame was not delivered.
    bystanders.a.round_trip();
}

#[test]
fn requests_before_login_are_refused_and_login_still_works() {
    let relay = TestRelay::default_config();
    let mut bystanders = Bystanders::new(&relay, 1, 2);
    let mut c = relay.connect();
    c.send(1, b"who am I?");
    assert_eq!(c.expect_error(ErrorCode::NotLoggedIn).target, UserId(1));
    c.login(3);
    let id = c.send(1, b"now I am 3");
    assert_eq!(bystanders.a.recv().msg_id, id);
    bystanders.still_served();
}

#[test]
fn per_frame_errors_keep_the_connection_open() {
    let relay = TestRelay::default_config();
    let mut bystanders = Bystanders::new(&relay, 1, 2);
    let mut c = relay.login(3);

    c.send_frame(&Frame::login(MessageId(5), UserId(4), b""));
    assert_eq!(
        c.expect_error(ErrorCode::AlreadyLoggedIn).msg_id,
        MessageId(5)
    );

    let mut unknown = Frame::send(MessageId(6), UserId(1), Bytes::new())
        .to_bytes()
        .to_vec();
    unknown[5] = 0x7f;
    c.send_raw(&unknown);
    assert_eq!(
        c.expect_error(ErrorCode::UnknownOpcode).msg_id,
        MessageId(6)
    );

    let spoofed =
        Frame::send(MessageId(7), UserId(1), Bytes::from_static(b"I am 2")).with_source(UserId(2));
    c.send_frame(&spoofed);
    c.expect_error(ErrorCode::InvalidField);

    let flagged = Frame::send(MessageId(8), UserId(1), Bytes::new())
        .with_flags(Flags(Flags::NO_ACK.0 | 0x0100));
    c.send_frame(&flagged);
    c.expect_error(ErrorCode::InvalidField);

    c.send(0, b"to nobody");
    c.expect_error(ErrorCode::InvalidField);

    let relay_only = Frame::new(Opcode::Deliver, MessageId(9), UserId(1), Bytes::new());
    c.send_frame(&relay_only);
    c.expect_error(ErrorCode::InvalidField);

    c.send(77, b"anyone?");
    assert_eq!(
        c.expect_error(ErrorCode::RecipientOffline).target,
        UserId(77)
    );

    // None of the refused frames reached user 1; the connection still works.
    let id = c.send(1, b"valid");
    assert_eq!(bystanders.a.recv().msg_id, id);
    assert_eq!(c.recv().opcode, Opcode::Ack);
    bystanders.still_served();
}

#[test]
fn a_recipient_that_does_not_read_gets_nothing_lost_and_the_sender_hears_slow() {
    let relay = TestRelay::start(Config {
        out_cap: 128 * 1024,
        ..Config::default()
    });
    let mut bystanders = Bystanders::new(&relay, 1, 2);
    let mut sender = relay.login(10);
    let mut sleeper = relay.login(11);
    let payload = vec![0x5a; 4000];
    let mut acked = Vec::new();
    // Send one at a time until the relay refuses: socket buffers first, then the relay's
    // queue fill up; the relay must say RECIPIENT_SLOW, never drop.
    let refused = loop {
        let id = sender.send(11, &payload);
        let reply = sender.recv();
        match reply.opcode {
            Opcode::Ack => acked.push(id),
            Opcode::Error => break reply,
            other => panic!("unexpected {other:?}"),
        }
        assert!(acked.len() < 10_000, "the relay never pushed back");
    };
    assert_eq!(refused.error_code(), Some(ErrorCode::RecipientSlow));
    bystanders.still_served();
    // The sleeper wakes up: every ACKed message is there, in order, nothing else.
    for id in &acked {
        let got = sleeper.recv();
        assert_eq!((got.opcode, got.msg_id), (Opcode::Deliver, *id));
    }
    sleeper.round_trip();
    // And the sender is accepted again.
    sender.send(11, b"after the jam");
    assert_eq!(sender.recv().opcode, Opcode::Ack);
}

#[test]
fn a_peer_resetting_mid_frame_affects_nobody_else() {
    let relay = TestRelay::default_config();
    let mut bystanders = Bystanders::new(&relay, 1, 2);
    let mut c = relay.login(3);
    c.round_trip();
    // A PING whose PONG we never read: closing with unread data makes Linux send RST.
    c.send_frame(&Frame::ping(MessageId(1), Bytes::new()));
    let frame = Frame::send(MessageId(2), UserId(1), Bytes::from(vec![1u8; 1000])).to_bytes();
    c.send_raw(&frame[..500]);
    let mut bystander_c = relay.login(4);
    bystander_c.round_trip(); // the relay has processed the PING by now (it is single-threaded)
    drop(c);
    bystanders.still_served();
    bystander_c.round_trip();
}

#[test]
fn a_client_that_never_logs_in_is_timed_out() {
    let relay = TestRelay::start(Config {
        login_timeout: Duration::from_millis(300),
        ..Config::default()
    });
    let mut bystanders = Bystanders::new(&relay, 1, 2);
    let mut lurker = relay.connect();
    lurker.expect_error(ErrorCode::LoginTimeout);
    lurker.expect_closed();
    bystanders.still_served();
}

fn fast_timeouts() -> TestRelay {
    TestRelay::start(Config {
        ping_interval: Duration::from_millis(200),
        idle_timeout: Duration::from_millis(600),
        ..Config::default()
    })
}

#[test]
fn a_silent_client_is_pinged_then_timed_out() {
    let relay = fast_timeouts();
    let mut silent = relay.login(1);
    assert_eq!(silent.recv().opcode, Opcode::Ping);
    silent.expect_error(ErrorCode::IdleTimeout);
    silent.expect_closed();
}

#[test]
fn a_client_answering_pings_stays_connected() {
    let relay = fast_timeouts();
    let mut lively = relay.login(2);
    for _ in 0..3 {
        let ping = lively.recv();
        assert_eq!(ping.opcode, Opcode::Ping);
        lively.send_frame(&Frame::pong(ping.msg_id, ping.payload.clone()));
    }
    lively.round_trip();
}

#[test]
fn the_connection_from_a_writer_that_floods_without_reading_is_bounded() {
    // A client that pipelines PINGs and never reads its PONGs: the relay stops reading it
    // once its own queue is past the cap instead of buffering without bound.
    let relay = TestRelay::start(Config {
        out_cap: 128 * 1024,
        ..Config::default()
    });
    let mut bystanders = Bystanders::new(&relay, 1, 2);
    let mut flooder = relay.login(3);
    flooder.stream.set_nonblocking(true).unwrap();
    let ping = Frame::ping(MessageId(1), Bytes::from(vec![0u8; 8000])).to_bytes();
    let mut written = 0usize;
    // Write until the kernel pushes back: that only happens because the relay stopped
    // reading (otherwise it would drain us forever). Bounded at 64 MiB.
    while written < 64 << 20 {
        match flooder.stream.write(&ping) {
            Ok(n) => written += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(
        written < 64 << 20,
        "the relay kept reading a client that never reads"
    );
    bystanders.still_served();
}

// ---- protocol.md rules a client written from the spec alone had to guess (issue 16) ----

#[test]
fn ping_pong_and_bye_with_a_bad_flag_or_source_get_invalid_field_and_the_connection_stays() {
    let relay = TestRelay::default_config();
    let mut bystanders = Bystanders::new(&relay, 1, 2);
    let newcomer = relay.connect();
    let member = relay.login(3);
    for mut c in [newcomer, member] {
        for (flags, source) in [
            (Flags(0x0008), UserId::NONE),
            (Flags::NO_ACK, UserId::NONE),
            (Flags::EMPTY, UserId(5)),
        ] {
            let frames = [
                Frame::ping(MessageId(1), Bytes::from_static(b"t=1")),
                Frame::pong(MessageId(2), Bytes::new()),
                Frame::bye(MessageId(3)),
            ];
            for frame in frames {
                let msg_id = frame.msg_id;
                c.send_frame(&frame.with_flags(flags).with_source(source));
                let err = c.expect_error(ErrorCode::InvalidField);
                assert_eq!(err.msg_id, msg_id);
            }
        }
        let mut bye = Frame::bye(MessageId(4));
        bye.payload = Bytes::from_static(b"ciao");
        c.send_frame(&bye);
        c.expect_error(ErrorCode::InvalidField);
        // None of those BYEs closed the connection: the next PING is answered.
        c.round_trip();
        c.send_frame(&Frame::bye(MessageId(5)));
        assert_eq!(c.recv(), Frame::bye(MessageId(5)));
        c.expect_closed();
    }
    bystanders.still_served();
}

#[test]
fn join_leave_and_room_info_with_a_payload_are_invalid_and_do_nothing() {
    let relay = TestRelay::default_config();
    let mut c = relay.login(3);
    for frame in [
        Frame::join(MessageId(1), RoomId(42)),
        Frame::leave(MessageId(2), RoomId(42)),
        Frame::room_info(MessageId(3), RoomId(42)),
    ] {
        let mut frame = frame;
        frame.payload = Bytes::from_static(b"x");
        c.send_frame(&frame);
        assert_eq!(c.expect_error(ErrorCode::InvalidField).msg_id, frame.msg_id);
    }
    c.send_frame(&Frame::room_info(MessageId(4), RoomId(42)));
    let state = c.recv().room_state().expect("ROOM_STATE");
    assert_eq!((state.members, state.is_member), (0, false), "not joined");
    assert_eq!(c.join(42).room_state().unwrap().members, 1);
}

#[test]
fn the_first_failing_check_answers_over_tcp() {
    let relay = TestRelay::default_config();
    let mut c = relay.connect();
    // Login state before ids; direction before login state.
    c.send(0, b"to nobody");
    c.expect_error(ErrorCode::NotLoggedIn);
    c.send_frame(&Frame::new(
        Opcode::Deliver,
        MessageId(1),
        UserId(2),
        Bytes::new(),
    ));
    c.expect_error(ErrorCode::InvalidField);
    c.login(3);
    // Flags before membership.
    let frame = Frame::room_send(MessageId(2), RoomId(7), Bytes::new()).with_flags(Flags::DEDUP);
    c.send_frame(&frame);
    c.expect_error(ErrorCode::InvalidField);
    c.send_frame(&Frame::room_send(MessageId(3), RoomId(7), Bytes::new()));
    c.expect_error(ErrorCode::NotInRoom);
    c.round_trip();
}

/// Reads text-mode lines until one starts with `prefix`; returns all of them.
fn lines_until(stream: &mut std::net::TcpStream, prefix: &str) -> Vec<String> {
    use std::io::Read;
    let mut got = String::new();
    let mut chunk = [0u8; 4096];
    while !got.lines().any(|l| l.starts_with(prefix)) || !got.ends_with('\n') {
        let n = stream.read(&mut chunk).expect("read");
        assert!(n > 0, "closed; got {got:?}");
        got.push_str(std::str::from_utf8(&chunk[..n]).unwrap());
    }
    got.lines().map(str::to_string).collect()
}

#[test]
fn text_lines_that_make_no_frame_take_no_number() {
    let relay = TestRelay::default_config();
    let mut telnet = std::net::TcpStream::connect(relay.addr).unwrap();
    telnet
        .set_read_timeout(Some(support::SAFETY_TIMEOUT))
        .unwrap();
    telnet
        .write_all(b"login 5\r\njoin lobby\r\nHELP\r\n\r\nsack\r\nsend 6 hi\r\n")
        .unwrap();
    let lines = lines_until(&mut telnet, "ERR RECIPIENT_OFFLINE");
    assert_eq!(lines[0], "OK LOGIN 5");
    let usage = lines
        .iter()
        .filter(|l| l.starts_with("ERR USAGE 0 "))
        .count();
    assert_eq!(usage, 2, "{lines:?}");
    assert!(
        lines
            .last()
            .unwrap()
            .starts_with("ERR RECIPIENT_OFFLINE 2 "),
        "the SEND is frame 2: {lines:?}"
    );
}

#[test]
fn a_request_line_and_32_header_lines_are_read_but_33_are_too_many() {
    use std::io::Read;
    let relay = TestRelay::default_config();
    for (headers, status) in [(32, "HTTP/1.1 404"), (33, "HTTP/1.1 431")] {
        let mut head = b"GET /nothing HTTP/1.1\r\n".to_vec();
        for i in 0..headers {
            head.extend_from_slice(format!("X-Header-{i}: {i}\r\n").as_bytes());
        }
        head.extend_from_slice(b"\r\n");
        let mut stream = std::net::TcpStream::connect(relay.addr).unwrap();
        stream
            .set_read_timeout(Some(support::SAFETY_TIMEOUT))
            .unwrap();
        stream.write_all(&head).unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        assert!(response.starts_with(status), "{headers}: {response}");
    }
}

#[test]
fn the_websocket_close_reason_is_the_code_name_a_space_and_the_error_reason() {
    use tungstenite::Message;
    let relay = TestRelay::default_config();
    let stream = std::net::TcpStream::connect(relay.addr).unwrap();
    stream
        .set_read_timeout(Some(support::SAFETY_TIMEOUT))
        .unwrap();
    let url = format!("ws://{}/", relay.addr);
    let (mut ws, _) = tungstenite::client(url.as_str(), stream).expect("handshake");
    let mut bad = Frame::ping(MessageId(1), Bytes::new()).to_bytes().to_vec();
    bad[4] = 2;
    ws.send(Message::Binary(Bytes::from(bad))).unwrap();
    let error = match ws.read().unwrap() {
        Message::Binary(data) => {
            let mut buf = bytes::BytesMut::from(&data[..]);
            imrelay::proto::decode::decode_frame(&mut buf, u32::MAX)
                .unwrap()
                .unwrap()
                .unwrap()
        }
        other => panic!("expected the ERROR, got {other:?}"),
    };
    assert_eq!(error.error_code(), Some(ErrorCode::UnsupportedVersion));
    let reason = error.error().unwrap().1;
    match ws.read().unwrap() {
        Message::Close(Some(close)) => {
            assert_eq!(u16::from(close.code), 1002);
            assert_eq!(
                close.reason.as_str(),
                format!("UNSUPPORTED_VERSION {reason}")
            );
        }
        other => panic!("expected the close frame, got {other:?}"),
    }
}

#[test]
fn times_are_seconds_with_fractions_and_room_rate_0_is_unlimited() {
    use std::time::Instant;
    use support::process::RelayProcess;
    let relay = RelayProcess::start(&[
        "--login-timeout",
        "0.3",
        "--ping-interval",
        "0.25",
        "--idle-timeout",
        "2.5",
        "--room-rate",
        "0",
    ]);
    let mut c = support::Client::connect(relay.addr);
    let limits = c.login(1).login_ok().unwrap();
    assert_eq!(
        (limits.ping_interval_ms, limits.idle_timeout_ms),
        (250, 2500)
    );
    c.join(7);
    // Far past the default burst of 100: no RATE_LIMITED.
    for i in 0..300 {
        c.send_frame(&Frame::room_send(
            MessageId(1000 + i),
            RoomId(7),
            Bytes::from_static(b"x"),
        ));
    }
    let mut acks = 0;
    while acks < 300 {
        let frame = c.recv();
        match frame.opcode {
            Opcode::Ack => acks += 1,
            Opcode::Ping => c.send_frame(&Frame::pong(frame.msg_id, frame.payload.clone())),
            _ => panic!("{frame:?}"),
        }
    }
    let started = Instant::now();
    let mut lurker = support::Client::connect(relay.addr);
    lurker.expect_error(ErrorCode::LoginTimeout);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(5),
        "{waited:?}"
    );

    // A time of 0 is refused at start.
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_imrelay"))
        .args(["--listen", "127.0.0.1:0", "--login-timeout", "0"])
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(2));
}
