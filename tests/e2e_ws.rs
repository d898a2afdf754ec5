//! WebSocket on the relay's one port, over real loopback sockets, with tungstenite as the
//! client: browser users and binary TCP users reach each other and share rooms; bad
//! WebSocket input and bad handshakes close only the connection that sent them.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;

use bytes::Bytes;
use imrelay::proto::decode::decode_frame;
use imrelay::proto::{ErrorCode, Frame, MessageId, Opcode, RoomId, UserId};
use imrelay::relay::Config;
use support::{Bystanders, TestRelay, SAFETY_TIMEOUT};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Error as WsError, Message, WebSocket};

/// A browser stand-in: a WebSocket client that sends binary (or text) messages.
struct WsClient {
    ws: WebSocket<TcpStream>,
    next_id: u64,
}

/// How a WebSocket connection ended, as the client saw it.
#[derive(Debug, PartialEq)]
struct Closed {
    code: CloseCode,
    reason: String,
}

impl WsClient {
    fn connect(relay: &TestRelay) -> WsClient {
        let stream = TcpStream::connect(relay.addr).expect("connect");
        stream.set_read_timeout(Some(SAFETY_TIMEOUT)).unwrap();
        let url = format!("ws://{}/", relay.addr);
        let (ws, response) = tungstenite::client(url.as_str(), stream).expect("handshake");
        assert_eq!(response.status(), 101);
        WsClient { ws, next_id: 100 }
    }

    fn login(relay: &TestRelay, user: u64) -> WsClient {
        let mut c = WsClient::connect(relay);
        let id = c.id();
        c.send_frame(&Frame::login(id, UserId(user), b""));
        let ok = c.recv();
        assert_eq!((ok.opcode, ok.msg_id), (Opcode::LoginOk, id), "{ok:?}");
        c
    }

    fn id(&mut self) -> MessageId {
        self.next_id += 1;
        MessageId(self.next_id)
    }

    fn send_bytes(&mut self, bytes: &[u8]) {
        self.ws
            .send(Message::Binary(Bytes::copy_from_slice(bytes)))
            .expect("send");
    }

    fn send_frame(&mut self, frame: &Frame) {
        self.send_bytes(&frame.to_bytes());
    }

    fn send_text(&mut self, line: &str) {
        self.ws.send(Message::text(line)).expect("send");
    }

    fn send(&mut self, to: u64, payload: &[u8]) -> MessageId {
        let id = self.id();
        self.send_frame(&Frame::send(
            id,
            UserId(to),
            Bytes::copy_from_slice(payload),
        ));
        id
    }

    fn join(&mut self, room: u64) -> Frame {
        let id = self.id();
        self.send_frame(&Frame::join(id, RoomId(room)));
        let state = self.recv();
        assert_eq!(state.opcode, Opcode::RoomState, "{state:?}");
        state
    }

    /// The next data message, or how the connection closed.
    fn next(&mut self) -> Result<Message, Closed> {
        loop {
            match self.ws.read() {
                Ok(Message::Close(frame)) => {
                    let frame = frame.expect("the relay always gives a close code");
                    return Err(Closed {
                        code: frame.code,
                        reason: frame.reason.to_string(),
                    });
                }
                Ok(Message::Ping(_) | Message::Pong(_)) => continue,
                Ok(message) => return Ok(message),
                Err(e) => panic!("connection failed without a close frame: {e}"),
            }
        }
    }

    /// The next binary message, as the one frame it carries.
    fn recv(&mut self) -> Frame {
        match self.next() {
            Ok(Message::Binary(data)) => {
                let mut buf = bytes::BytesMut::from(&data[..]);
                let frame = decode_frame(&mut buf, u32::MAX)
                    .expect("relay framing")
                    .expect("a whole frame")
                    .expect("a known opcode");
                assert!(buf.is_empty(), "one frame per message");
                frame
            }
            other => panic!("expected a binary message, got {other:?}"),
        }
    }

    fn recv_text(&mut self) -> String {
        match self.next() {
            Ok(Message::Text(text)) => text.to_string(),
            other => panic!("expected a text message, got {other:?}"),
        }
    }

    /// ERROR `code`, then a close frame with `close`; then the stream ends.
    fn expect_error_and_close(&mut self, code: ErrorCode, close: CloseCode) -> Closed {
        let err = self.recv();
        assert_eq!(err.error_code(), Some(code), "{err:?}");
        let closed = self.next().expect_err("a close frame after the ERROR");
        assert_eq!(closed.code, close, "{closed:?}");
        assert!(closed.reason.starts_with(code.name()), "{closed:?}");
        self.expect_end();
        closed
    }

    /// After the close frames, the relay closes the TCP connection.
    fn expect_end(&mut self) {
        match self.ws.read() {
            Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => {}
            Err(WsError::Io(e)) if e.kind() == ErrorKind::ConnectionReset => {}
            Err(WsError::Protocol(_)) => {} // reset without the closing handshake reply
            other => panic!("expected the end of the connection, got {other:?}"),
        }
    }
}

/// A raw HTTP exchange: the whole response the relay sends before closing.
fn http_exchange(relay: &TestRelay, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(relay.addr).unwrap();
    stream.set_read_timeout(Some(SAFETY_TIMEOUT)).unwrap();
    stream.write_all(request).unwrap();
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .expect("the relay answers, then closes");
    String::from_utf8(response).expect("a text response")
}

#[test]
fn websocket_and_tcp_users_message_each_other_both_ways() {
    let relay = TestRelay::default_config();
    let mut browser = WsClient::login(&relay, 1001);
    let mut native = relay.login(1002);

    let id = browser.send(1002, b"hi from the browser");
    let got = native.recv();
    assert_eq!(
        (got.opcode, got.msg_id, got.source),
        (Opcode::Deliver, id, UserId(1001))
    );
    assert_eq!(&got.payload[..], b"hi from the browser");
    assert_eq!(browser.recv().ack_count(), Some(1));

    let id = native.send(1001, b"hi from TCP");
    let got = browser.recv();
    assert_eq!(
        (got.opcode, got.msg_id, got.source),
        (Opcode::Deliver, id, UserId(1002))
    );
    assert_eq!(&got.payload[..], b"hi from TCP");
    assert_eq!(native.recv().ack_count(), Some(1));

    // A second device of the same user on WebSocket gets its copy too.
    let mut tablet = WsClient::login(&relay, 1001);
    native.send(1001, b"both of you");
    assert_eq!(&browser.recv().payload[..], b"both of you");
    assert_eq!(&tablet.recv().payload[..], b"both of you");
    assert_eq!(native.recv().ack_count(), Some(2));
}

#[test]
fn websocket_text_users_chat_with_binary_users() {
    let relay = TestRelay::default_config();
    let mut browser = WsClient::connect(&relay);
    browser.send_text("LOGIN 5");
    assert_eq!(browser.recv_text(), "OK LOGIN 5");
    let mut native = relay.login(6);
    browser.send_text("SEND 6 hello over a text message");
    let got = native.recv();
    assert_eq!(&got.payload[..], b"hello over a text message");
    assert_eq!(browser.recv_text(), format!("ACK {} 1", got.msg_id.0));
    let id = native.send(5, b"and back");
    assert_eq!(browser.recv_text(), format!("MSG 6 {} and back", id.0));
    browser.send_text("QUIT");
    assert_eq!(browser.recv_text(), "BYE");
    let closed = browser.next().expect_err("a normal close after BYE");
    assert_eq!(closed.code, CloseCode::Normal);
}

#[test]
fn websocket_and_tcp_users_share_a_room() {
    let relay = TestRelay::default_config();
    let mut viewer = WsClient::login(&relay, 1);
    let mut text_viewer = WsClient::connect(&relay);
    text_viewer.send_text("login 2");
    text_viewer.recv_text();
    let mut streamer = relay.login(3);
    viewer.join(42);
    text_viewer.send_text("join 42");
    assert_eq!(text_viewer.recv_text(), "INFO 42 2 1");
    assert_eq!(streamer.join(42).payload[..4], [0, 0, 0, 3]);

    let id = streamer.next_id();
    streamer.send_frame(&Frame::room_send(
        id,
        RoomId(42),
        Bytes::from_static(b"666"),
    ));
    assert_eq!(streamer.recv().ack_count(), Some(2));
    let got = viewer.recv();
    assert_eq!((got.opcode, got.source), (Opcode::RoomDeliver, UserId(3)));
    assert_eq!(&got.payload[..], b"666");
    assert_eq!(text_viewer.recv_text(), "ROOM 42 3 666");

    let id = viewer.id();
    viewer.send_frame(&Frame::room_send(
        id,
        RoomId(42),
        Bytes::from_static(b"/like"),
    ));
    assert_eq!(viewer.recv().ack_count(), Some(2));
    let got = streamer.recv();
    assert_eq!((got.opcode, got.source), (Opcode::RoomDeliver, UserId(1)));
    assert_eq!(text_viewer.recv_text(), "ROOM 42 1 /like");

    let id = viewer.id();
    viewer.send_frame(&Frame::room_info(id, RoomId(42)));
    assert_eq!(viewer.recv().payload[..], [0, 0, 0, 3, 1]);
}

#[test]
fn pings_and_the_close_handshake_are_answered() {
    let relay = TestRelay::default_config();
    let mut browser = WsClient::login(&relay, 1);
    browser
        .ws
        .send(Message::Ping(Bytes::from_static(b"are you there")))
        .unwrap();
    match browser.ws.read().expect("the pong") {
        Message::Pong(data) => assert_eq!(&data[..], b"are you there"),
        other => panic!("{other:?}"),
    }
    browser.ws.close(None).unwrap();
    match browser.ws.read() {
        Ok(Message::Close(_)) => {}
        other => panic!("expected the relay's close reply, got {other:?}"),
    }
    browser.expect_end();
    let mut native = relay.login(2);
    native.send(1, b"anyone?");
    native.expect_error(ErrorCode::RecipientOffline);
}

#[test]
fn an_oversized_websocket_message_closes_only_that_connection() {
    let relay = TestRelay::start(Config {
        max_frame: 1024,
        out_cap: 8 * 1024,
        ..Config::default()
    });
    let mut bystanders = Bystanders::new(&relay, 10, 11);
    let mut ws_bystander = WsClient::login(&relay, 12);
    let mut browser = WsClient::login(&relay, 1);
    browser.send_bytes(&[0u8; 1500]);
    browser.expect_error_and_close(ErrorCode::FrameTooLarge, CloseCode::Size);

    bystanders.still_served();
    bystanders.a.send(12, b"still there?");
    assert_eq!(&ws_bystander.recv().payload[..], b"still there?");
}

#[test]
fn a_bad_frame_inside_a_websocket_message_closes_only_that_connection() {
    let relay = TestRelay::default_config();
    let mut bystanders = Bystanders::new(&relay, 10, 11);
    let bad_version: &[u8] = &[
        0, 0, 0, 0x20, 2, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0, 0,
    ];
    let mut browser = WsClient::login(&relay, 1);
    browser.send_bytes(bad_version);
    browser.expect_error_and_close(ErrorCode::UnsupportedVersion, CloseCode::Protocol);

    let mut browser = WsClient::login(&relay, 2);
    let frame = Frame::send(MessageId(1), UserId(10), Bytes::from_static(b"cut")).to_bytes();
    browser.send_bytes(&frame[..frame.len() - 1]);
    browser.expect_error_and_close(ErrorCode::Malformed, CloseCode::Protocol);

    let mut browser = WsClient::login(&relay, 3);
    browser.send_bytes(&[0, 0x10, 0, 1]);
    browser.expect_error_and_close(ErrorCode::FrameTooLarge, CloseCode::Size);

    // Unknown opcodes answer the frame and keep the connection, as on TCP.
    let mut browser = WsClient::login(&relay, 4);
    let mut unknown = Frame::ping(MessageId(9), Bytes::new()).to_bytes().to_vec();
    unknown[5] = 0x7f;
    browser.send_bytes(&unknown);
    assert_eq!(browser.recv().error_code(), Some(ErrorCode::UnknownOpcode));
    browser.send(10, b"still here");
    assert_eq!(&bystanders.a.recv().payload[..], b"still here");
    assert_eq!(browser.recv().ack_count(), Some(1));

    bystanders.still_served();
}

#[test]
fn unmasked_websocket_frames_close_with_a_protocol_error() {
    let relay = TestRelay::default_config();
    let mut bystanders = Bystanders::new(&relay, 10, 11);
    let mut browser = WsClient::login(&relay, 1);
    // Write an unmasked binary frame under the client's nose: servers must refuse it.
    browser.ws.get_mut().write_all(&[0x82, 0x01, 0x00]).unwrap();
    browser.expect_error_and_close(ErrorCode::Malformed, CloseCode::Protocol);
    bystanders.still_served();
}

#[test]
fn garbage_and_oversized_handshakes_get_http_errors() {
    let relay = TestRelay::default_config();
    let mut bystanders = Bystanders::new(&relay, 10, 11);

    let response = http_exchange(&relay, b"GET \x01\x02 nonsense\r\n\r\n");
    assert!(
        response.starts_with("HTTP/1.1 400 Bad Request"),
        "{response}"
    );

    let response = http_exchange(
        &relay,
        b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Version: 12\r\nSec-WebSocket-Key: x\r\n\r\n",
    );
    assert!(
        response.starts_with("HTTP/1.1 400 Bad Request"),
        "{response}"
    );

    let mut huge = b"GET / HTTP/1.1\r\nHost: relay\r\n".to_vec();
    while huge.len() < 9000 {
        huge.extend_from_slice(b"X-Filler: 0123456789012345678901234567890123456789\r\n");
    }
    let response = http_exchange(&relay, &huge);
    assert!(
        response.starts_with("HTTP/1.1 431 Request Header Fields Too Large"),
        "{response}"
    );
    bystanders.still_served();
}

#[test]
fn a_slow_handshake_hits_the_login_timeout() {
    let relay = TestRelay::start(Config {
        login_timeout: std::time::Duration::from_millis(200),
        ..Config::default()
    });
    // Half a request head, then nothing: the relay's timer answers (no sleep here).
    let response = http_exchange(&relay, b"GET / HTTP/1.1\r\nHost: rel");
    assert!(
        response.starts_with("HTTP/1.1 408 Request Timeout"),
        "{response}"
    );
}

#[test]
fn the_demo_page_is_served_only_with_the_demo_flag() {
    let get = b"GET /?user=1&room=7 HTTP/1.1\r\nHost: relay\r\n\r\n";
    let relay = TestRelay::default_config();
    let response = http_exchange(&relay, get);
    assert!(response.starts_with("HTTP/1.1 404 Not Found"), "{response}");
    assert!(response.contains("--demo"), "{response}");

    let relay = TestRelay::start(Config {
        demo: true,
        ..Config::default()
    });
    let page = http_exchange(&relay, get);
    assert!(page.starts_with("HTTP/1.1 200 OK"), "{page}");
    assert!(page.contains("text/html"), "{page}");
    assert!(page.contains("imrelay.js"), "the page loads the module");
    let module = http_exchange(&relay, b"GET /imrelay.js HTTP/1.1\r\nHost: relay\r\n\r\n");
    assert!(module.starts_with("HTTP/1.1 200 OK"), "{module}");
    assert!(module.contains("text/javascript"), "{module}");
    let missing = http_exchange(&relay, b"GET /nothing HTTP/1.1\r\n\r\n");
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
}
