//! The HTTP and WebSocket codecs of the core, driven in memory: a client's masked
//! WebSocket frames in, the relay's messages, close frames and HTTP responses out.

use bytes::{Bytes, BytesMut};
use tungstenite::protocol::frame::coding::{CloseCode, Control, Data, OpCode};
use tungstenite::protocol::frame::{Frame as WsFrame, FrameHeader};

use super::Harness;
use crate::proto::decode::decode_frame;
use crate::proto::{ErrorCode, Frame, MessageId, Opcode, RoomId, UserId};
use crate::relay::{Config, State, CLOSE_LINGER};

const UPGRADE: &[u8] = b"GET /ws HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\n\
    Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
    Sec-WebSocket-Version: 13\r\n\r\n";

/// A client's WebSocket frame: masked, as RFC 6455 requires of clients.
fn client_frame(opcode: OpCode, payload: &[u8]) -> Vec<u8> {
    let header = FrameHeader {
        opcode,
        mask: Some([0x11, 0x22, 0x33, 0x44]),
        ..FrameHeader::default()
    };
    let mut out = Vec::new();
    WsFrame::from_payload(header, Bytes::copy_from_slice(payload))
        .format(&mut out)
        .expect("encode");
    out
}

fn binary(payload: &[u8]) -> Vec<u8> {
    client_frame(OpCode::Data(Data::Binary), payload)
}

fn text(line: &str) -> Vec<u8> {
    client_frame(OpCode::Data(Data::Text), line.as_bytes())
}

/// What the relay sent a WebSocket session, split into messages.
#[derive(Debug, PartialEq)]
enum Out {
    Binary(Frame),
    Text(String),
    Pong(Vec<u8>),
    Close(u16, String),
}

fn messages(mut bytes: &[u8]) -> Vec<Out> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let mut cursor = std::io::Cursor::new(bytes);
        let (header, len) = FrameHeader::parse(&mut cursor)
            .expect("relay's WebSocket framing")
            .expect("whole WebSocket frames");
        assert!(header.mask.is_none(), "servers do not mask");
        let start = cursor.position() as usize;
        let payload = &bytes[start..start + len as usize];
        bytes = &bytes[start + len as usize..];
        out.push(match header.opcode {
            OpCode::Data(Data::Binary) => {
                let mut buf = BytesMut::from(payload);
                let frame = decode_frame(&mut buf, u32::MAX).unwrap().unwrap().unwrap();
                assert!(buf.is_empty(), "one frame per message");
                Out::Binary(frame)
            }
            OpCode::Data(Data::Text) => Out::Text(String::from_utf8(payload.to_vec()).unwrap()),
            OpCode::Control(Control::Pong) => Out::Pong(payload.to_vec()),
            OpCode::Control(Control::Close) => Out::Close(
                u16::from_be_bytes([payload[0], payload[1]]),
                String::from_utf8_lossy(&payload[2..]).into_owned(),
            ),
            other => panic!("unexpected {other:?}"),
        });
    }
    out
}

impl Harness {
    /// A connection upgraded to WebSocket (the 101 answer taken).
    fn ws_open(&mut self) -> crate::ConnId {
        let id = self.open();
        self.feed(id, UPGRADE);
        let head = String::from_utf8(self.take_output(id)).unwrap();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        id
    }

    /// A WebSocket session logged in as `user` with binary messages.
    fn ws_login(&mut self, user: u64) -> crate::ConnId {
        let id = self.ws_open();
        self.feed(
            id,
            &binary(&Frame::login(MessageId(1), UserId(user), b"").to_bytes()),
        );
        match &self.ws_out(id)[..] {
            [Out::Binary(ok)] => assert_eq!(ok.opcode, Opcode::LoginOk),
            other => panic!("{other:?}"),
        }
        id
    }

    fn ws_out(&mut self, id: crate::ConnId) -> Vec<Out> {
        let bytes = self.take_output(id);
        messages(&bytes)
    }

    fn http_out(&mut self, id: crate::ConnId) -> String {
        String::from_utf8(self.take_output(id)).unwrap()
    }
}

fn close_code(code: CloseCode) -> u16 {
    code.into()
}

#[test]
fn get_is_recognised_byte_by_byte_and_upgrades_to_websocket() {
    let mut h = Harness::new(Config::default());
    let id = h.open();
    for byte in &UPGRADE[..3] {
        h.feed(id, &[*byte]);
        assert_eq!(h.take_output(id), b"", "GET is only a prefix so far");
    }
    h.feed(id, &UPGRADE[3..]);
    let head = h.http_out(id);
    assert!(
        head.starts_with("HTTP/1.1 101 Switching Protocols\r\n"),
        "{head}"
    );
    assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{head}");
    assert_eq!(h.relay.metrics().websocket_sessions, 1);
}

#[test]
fn websocket_and_tcp_users_message_each_other() {
    let mut h = Harness::new(Config::default());
    let browser = h.ws_login(1);
    let native = h.login(2);
    h.feed(
        browser,
        &binary(&super::send(5, 2, b"hi from H5").to_bytes()),
    );
    let got = h.take_frames(native);
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].opcode, got[0].source), (Opcode::Deliver, UserId(1)));
    assert_eq!(&got[0].payload[..], b"hi from H5");
    match &h.ws_out(browser)[..] {
        [Out::Binary(ack)] => assert_eq!(ack.ack_count(), Some(1)),
        other => panic!("{other:?}"),
    }
    h.send_frame(native, super::send(6, 1, b"hi from TCP"));
    match &h.ws_out(browser)[..] {
        [Out::Binary(d)] => {
            assert_eq!(
                (d.opcode, d.source, d.msg_id),
                (Opcode::Deliver, UserId(2), MessageId(6))
            );
            assert_eq!(&d.payload[..], b"hi from TCP");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn one_message_may_carry_several_frames_but_not_part_of_one() {
    let mut h = Harness::new(Config::default());
    let browser = h.ws_login(1);
    let mut two = Frame::join(MessageId(2), RoomId(7)).to_bytes().to_vec();
    two.extend_from_slice(&Frame::room_info(MessageId(3), RoomId(7)).to_bytes());
    h.feed(browser, &binary(&two));
    let out = h.ws_out(browser);
    assert_eq!(out.len(), 2, "{out:?}");
    let cut = super::send(4, 1, b"abc").to_bytes();
    h.feed(browser, &binary(&cut[..cut.len() - 1]));
    match &h.ws_out(browser)[..] {
        [Out::Binary(err), Out::Close(code, reason)] => {
            assert_eq!(err.error_code(), Some(ErrorCode::Malformed));
            assert_eq!(*code, close_code(CloseCode::Protocol));
            assert!(reason.starts_with("MALFORMED"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert!(h.relay.is_finished(browser));
    assert_eq!(h.relay.room_members(RoomId(7)), 0, "left its rooms");
}

#[test]
fn text_messages_carry_lines_and_get_lines_back() {
    let mut h = Harness::new(Config::default());
    let browser = h.ws_open();
    let native = h.login(2);
    h.feed(browser, &text("LOGIN 1"));
    assert_eq!(h.ws_out(browser), vec![Out::Text("OK LOGIN 1".into())]);
    h.feed(browser, &text("send 2 hello\njoin 7"));
    assert_eq!(&h.take_frames(native)[0].payload[..], b"hello");
    assert_eq!(
        h.ws_out(browser),
        vec![Out::Text("ACK 2 1".into()), Out::Text("INFO 7 1 1".into())]
    );
    h.send_frame(native, super::send(9, 1, b"back"));
    assert_eq!(h.ws_out(browser), vec![Out::Text("MSG 2 9 back".into())]);
    h.feed(browser, &text("FLY"));
    match &h.ws_out(browser)[..] {
        [Out::Text(line)] => assert!(line.starts_with("ERR USAGE"), "{line}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_stored_message_is_acked_as_saved_in_a_text_message() {
    let mut h = Harness::new(Config::default());
    let browser = h.ws_open();
    h.feed(browser, &text("LOGIN 1"));
    assert_eq!(h.ws_out(browser), vec![Out::Text("OK LOGIN 1".into())]);
    h.feed(browser, &text("store 2 for later"));
    assert_eq!(h.ws_out(browser), vec![Out::Text("SAVED 2 0".into())]);
    h.feed(browser, &text("store 2"));
    match &h.ws_out(browser)[..] {
        [Out::Text(line)] => assert_eq!(
            line,
            "ERR USAGE 0 expected STORE <user> <text>: the text is missing"
        ),
        other => panic!("{other:?}"),
    }
}

#[test]
fn pings_are_answered_and_the_peers_close_is_echoed() {
    let mut h = Harness::new(Config::default());
    let browser = h.ws_login(1);
    h.feed(
        browser,
        &client_frame(OpCode::Control(Control::Ping), b"p1"),
    );
    assert_eq!(h.ws_out(browser), vec![Out::Pong(b"p1".to_vec())]);
    let mut close = vec![0x03, 0xe8];
    close.extend_from_slice(b"done");
    h.feed(
        browser,
        &client_frame(OpCode::Control(Control::Close), &close),
    );
    assert_eq!(h.ws_out(browser), vec![Out::Close(1000, "done".into())]);
    assert!(h.relay.is_finished(browser));
    assert!(h.relay.devices(UserId(1)).is_empty());
}

#[test]
fn bye_gets_bye_then_a_normal_close() {
    let mut h = Harness::new(Config::default());
    let browser = h.ws_login(1);
    h.feed(browser, &binary(&Frame::bye(MessageId(3)).to_bytes()));
    assert_eq!(
        h.ws_out(browser),
        vec![
            Out::Binary(Frame::bye(MessageId(3))),
            Out::Close(1000, "bye".into())
        ]
    );
}

#[test]
fn oversized_and_malformed_websocket_input_fail_only_that_session() {
    let config = Config {
        max_frame: 1024,
        out_cap: 4096,
        ..Config::default()
    };
    let mut h = Harness::new(config);
    let bystander = h.ws_login(9);
    let cases: Vec<(Vec<u8>, ErrorCode, CloseCode)> = vec![
        (
            binary(&[0u8; 1025]),
            ErrorCode::FrameTooLarge,
            CloseCode::Size,
        ),
        // A frame length over the max inside a message that is itself small.
        (
            binary(&[0, 0, 0x10, 0]),
            ErrorCode::FrameTooLarge,
            CloseCode::Size,
        ),
        // Unmasked client data.
        (
            vec![0x82, 0x01, 0x00],
            ErrorCode::Malformed,
            CloseCode::Protocol,
        ),
        // Reserved opcode 0x3.
        (
            client_frame(OpCode::Data(Data::Reserved(3)), b"x"),
            ErrorCode::Malformed,
            CloseCode::Protocol,
        ),
        // A text message that is not UTF-8.
        (
            client_frame(OpCode::Data(Data::Text), &[0xff, 0xfe]),
            ErrorCode::Malformed,
            CloseCode::Protocol,
        ),
    ];
    for (bytes, code, close) in cases {
        let id = h.ws_login(1);
        h.feed(id, &bytes);
        match &h.ws_out(id)[..] {
            [Out::Binary(err), Out::Close(c, _)] => {
                assert_eq!(err.error_code(), Some(code), "{err:?}");
                assert_eq!(*c, close_code(close));
            }
            other => panic!("{code}: {other:?}"),
        }
        assert_eq!(h.relay.state(id), Some(State::Closing));
        h.relay.handle_closed(id);
    }
    h.feed(
        bystander,
        &binary(&Frame::ping(MessageId(5), Bytes::new()).to_bytes()),
    );
    assert!(matches!(&h.ws_out(bystander)[..], [Out::Binary(p)] if p.opcode == Opcode::Pong));
}

#[test]
fn http_gets_serve_the_demo_only_when_it_is_on() {
    let mut h = Harness::new(Config::default());
    let id = h.open();
    h.feed(id, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(h.http_out(id).starts_with("HTTP/1.1 404 Not Found"));
    assert!(h.relay.is_finished(id));

    let mut h = Harness::new(Config {
        demo: true,
        ..Config::default()
    });
    for (path, kind) in [
        ("/?user=1&room=7", "text/html"),
        ("/imrelay.js", "text/javascript"),
    ] {
        let id = h.open();
        h.feed(
            id,
            format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
        );
        let response = h.http_out(id);
        assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
        assert!(response.contains(kind), "{response}");
        assert!(h.relay.is_finished(id));
    }
    let id = h.open();
    h.feed(id, b"GET /etc/passwd HTTP/1.1\r\n\r\n");
    assert!(h.http_out(id).starts_with("HTTP/1.1 404"));
    assert_eq!(h.relay.metrics().http_served, 2);
}

#[test]
fn bad_and_oversized_request_heads_get_400_and_431() {
    let mut h = Harness::new(Config::default());
    let garbage = h.open();
    h.feed(garbage, b"GET \x01\x02 nonsense\r\n\r\n");
    assert!(h.http_out(garbage).starts_with("HTTP/1.1 400"));
    assert!(h.relay.is_finished(garbage));

    let no_key = h.open();
    h.feed(
        no_key,
        b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    );
    assert!(h.http_out(no_key).starts_with("HTTP/1.1 400"));

    let huge = h.open();
    h.feed(huge, b"GET / HTTP/1.1\r\n");
    for _ in 0..100 {
        h.feed(huge, b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        if h.relay.state(huge) == Some(State::Closing) {
            break;
        }
    }
    assert!(h.http_out(huge).starts_with("HTTP/1.1 431"));
    assert!(h.relay.is_finished(huge));
}

#[test]
fn the_login_timeout_covers_the_handshake_and_the_login() {
    let mut h = Harness::new(Config::default());
    let stalled = h.open();
    h.feed(stalled, b"GET / HTTP/1.1\r\nHost:");
    let upgraded = h.ws_open();
    h.advance(h.relay.config().login_timeout);
    assert!(h
        .http_out(stalled)
        .starts_with("HTTP/1.1 408 Request Timeout"));
    match &h.ws_out(upgraded)[..] {
        [Out::Binary(err), Out::Close(code, _)] => {
            assert_eq!(err.error_code(), Some(ErrorCode::LoginTimeout));
            assert_eq!(*code, close_code(CloseCode::Policy));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn shutdown_closes_websocket_sessions_with_going_away() {
    let mut h = Harness::new(Config::default());
    let browser = h.ws_login(1);
    h.relay.begin_shutdown(h.now);
    match &h.ws_out(browser)[..] {
        [Out::Binary(err), Out::Close(code, _)] => {
            assert_eq!(err.error_code(), Some(ErrorCode::ShuttingDown));
            assert_eq!(*code, close_code(CloseCode::Away));
        }
        other => panic!("{other:?}"),
    }
    h.advance(CLOSE_LINGER);
    assert!(h.relay.is_finished(browser));
}

/// protocol.md's ```hex NAME block, as bytes.
fn spec_vector(name: &str) -> Vec<u8> {
    let spec = include_str!("../../../protocol.md");
    let start = spec
        .find(&format!("```hex {name}\n"))
        .unwrap_or_else(|| panic!("protocol.md has no {name} vector"));
    let body = &spec[start..].lines().skip(1).collect::<Vec<_>>();
    body.iter()
        .take_while(|line| !line.starts_with("```"))
        .flat_map(|line| line.split_whitespace())
        .map(|pair| u8::from_str_radix(pair, 16).expect("two-digit hex"))
        .collect()
}

#[test]
fn the_pong_message_of_protocol_md_section_14_is_byte_exact() {
    let mut h = Harness::new(Config::default());
    let browser = h.ws_open();
    let ping = Frame::ping(MessageId(5), Bytes::from_static(b"t=1")).to_bytes();
    h.feed(browser, &binary(&ping));
    assert_eq!(h.take_output(browser), spec_vector("WS_PONG_MESSAGE"));
}
