//! Text mode over real sockets, as `telnet 127.0.0.1 7700` would use it: the relay picks
//! text from the first byte on its one port, and text and binary users talk to each other.

mod support;

use imrelay::proto::{ErrorCode, Opcode, UserId};
use support::telnet::Telnet;
use support::TestRelay;

#[test]
fn text_and_binary_users_chat_both_ways() {
    let relay = TestRelay::default_config();
    let mut alice = Telnet::connect(relay.addr);
    alice.type_line("LOGIN 1001");
    assert_eq!(alice.read_line(), "OK LOGIN 1001");
    let mut bob = relay.login(1002);

    alice.type_line("SEND 1002 hi bob, from telnet");
    let got = bob.recv();
    assert_eq!(got.opcode, Opcode::Deliver);
    assert_eq!(got.source, UserId(1001));
    assert_eq!(&got.payload[..], b"hi bob, from telnet");
    assert_eq!(alice.read_line(), format!("ACK {} 1", got.msg_id.0));

    let id = bob.send(1001, b"hello alice");
    assert_eq!(alice.read_line(), format!("MSG 1002 {} hello alice", id.0));
    assert_eq!(bob.recv().opcode, Opcode::Ack);

    alice.type_line("SEND 1003 anybody?");
    assert!(alice.read_line().starts_with("ERR RECIPIENT_OFFLINE"));
    alice.type_line("PING");
    assert_eq!(alice.read_line(), "PONG");
    alice.type_line("PING are you there");
    assert_eq!(alice.read_line(), "PONG are you there");
    alice.type_line("QUIT");
    assert_eq!(alice.read_line(), "BYE");
}

#[test]
fn text_users_share_rooms_with_binary_users() {
    let relay = TestRelay::default_config();
    let mut viewer = Telnet::connect(relay.addr);
    viewer.type_line("login 5");
    viewer.read_line();
    viewer.type_line("join 42");
    assert_eq!(viewer.read_line(), "INFO 42 1 1");
    let mut streamer = relay.login(6);
    streamer.join(42);
    let frame = imrelay::proto::Frame::room_send(
        streamer.next_id(),
        imrelay::proto::RoomId(42),
        bytes::Bytes::from_static(b"666"),
    );
    streamer.send_frame(&frame);
    assert_eq!(streamer.recv().ack_count(), Some(1));
    assert_eq!(viewer.read_line(), "ROOM 42 6 666");
}

#[test]
fn text_mistakes_get_usage_errors_and_the_session_goes_on() {
    let relay = TestRelay::default_config();
    let mut t = Telnet::connect(relay.addr);
    t.type_line("SEND 2 before login");
    assert!(t.read_line().starts_with("ERR NOT_LOGGED_IN"));
    t.type_line("LOGIN bob");
    assert!(t
        .read_line()
        .starts_with("ERR USAGE 0 expected LOGIN <user>"));
    t.type_line("HELP");
    assert!(t.read_line().starts_with("HELP"));
    let mut binary_first = relay.connect();
    binary_first.send_raw(&[0xff, 0, 0, 0]);
    binary_first.expect_error(ErrorCode::FrameTooLarge);
}

#[test]
fn text_users_store_messages_for_offline_users_and_read_their_inbox() {
    let relay = TestRelay::default_config();
    let mut alice = Telnet::connect(relay.addr);
    alice.type_line("login 1001");
    assert_eq!(alice.read_line(), "OK LOGIN 1001");
    alice.type_line("store 1002 see you tomorrow");
    alice.type_line("store 1002 bring the slides");
    assert_eq!(alice.read_line(), "SAVED 2 0", "stored; bob is offline");
    assert_eq!(alice.read_line(), "SAVED 3 0");

    let mut bob = Telnet::connect(relay.addr);
    bob.type_line("login 1002");
    assert_eq!(bob.read_line(), "OK LOGIN 1002");
    bob.type_line("sync");
    let inbox = bob.read_line();
    let words: Vec<&str> = inbox.split(' ').collect();
    assert_eq!(&words[..4], ["INBOX", "1", "2", "0"], "{inbox}");
    let epoch = words[4];
    assert_eq!(bob.read_line(), "STORED 1001 1 see you tomorrow");
    assert_eq!(bob.read_line(), "STORED 1001 2 bring the slides");
    bob.type_line("sack 1");
    // A later session that has 1 gets only 2 (and the ack deleted 1 for good).
    bob.type_line(&format!("sync {epoch} 1"));
    assert_eq!(bob.read_line(), format!("INBOX 2 2 0 {epoch}"));
    assert_eq!(bob.read_line(), "STORED 1001 2 bring the slides");
    bob.type_line("sack two");
    assert!(bob
        .read_line()
        .starts_with("ERR USAGE 0 expected SACK <seq>"));
}

#[test]
fn a_message_line_without_text_or_a_half_sync_is_a_usage_error() {
    let relay = TestRelay::default_config();
    let mut alice = Telnet::connect(relay.addr);
    alice.type_line("login 1001");
    assert_eq!(alice.read_line(), "OK LOGIN 1001");
    let mut bob = relay.login(1002);
    for (line, form) in [
        ("send 1002", "SEND <user> <text>"),
        ("room 42", "ROOM <room> <text>"),
        ("store 1002", "STORE <user> <text>"),
    ] {
        alice.type_line(line);
        assert_eq!(
            alice.read_line(),
            format!("ERR USAGE 0 expected {form}: the text is missing"),
            "{line}"
        );
    }
    alice.type_line("sync 1");
    let got = alice.read_line();
    assert!(got.starts_with("ERR USAGE 0 expected SYNC"), "{got}");
    assert!(got.contains("SYNC <epoch> <last>"), "{got}");
    assert!(got.ends_with("got only \"1\""), "{got}");
    // Nothing was sent, and the session goes on: the next SEND is the first frame.
    alice.type_line("send 1002 now with text");
    let got = bob.recv();
    assert_eq!(&got.payload[..], b"now with text");
    assert_eq!(got.msg_id.0, 2, "usage errors take no message number");
    assert_eq!(alice.read_line(), "ACK 2 1");
}

#[test]
fn a_stored_message_is_acked_as_saved_in_text_mode_and_as_ack_in_binary() {
    let relay = TestRelay::default_config();
    let mut bob = Telnet::connect(relay.addr);
    bob.type_line("login 1002");
    assert_eq!(bob.read_line(), "OK LOGIN 1002");
    bob.type_line("sync");
    assert!(bob.read_line().starts_with("INBOX "));
    let mut alice = Telnet::connect(relay.addr);
    alice.type_line("login 1001");
    assert_eq!(alice.read_line(), "OK LOGIN 1001");
    alice.type_line("store 1002 kept and delivered");
    assert_eq!(bob.read_line(), "STORED 1001 1 kept and delivered");
    assert_eq!(
        alice.read_line(),
        "SAVED 2 1",
        "stored, and queued to bob's one sync"
    );
    alice.type_line("store 1003 for nobody yet");
    assert_eq!(alice.read_line(), "SAVED 3 0", "stored; 1003 is offline");
    // A binary client still gets the ACK frame: the binary protocol is unchanged.
    let mut carol = relay.login(1003);
    let frame = imrelay::proto::Frame::send(
        carol.next_id(),
        UserId(1004),
        bytes::Bytes::from_static(b"stored"),
    )
    .with_flags(imrelay::proto::Flags::STORED);
    carol.send_frame(&frame);
    let ack = carol.recv();
    assert_eq!(ack.opcode, Opcode::Ack);
    assert_eq!(ack.ack_count(), Some(0));
}
