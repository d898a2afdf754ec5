//! Multi-device stored delivery (protocol.md, sections 15 and 15.1) end to end: the real
//! `imrelay` binary, real sockets, and every kind of client a user may have at once: the
//! Rust SDK, a person at a terminal (text mode), a browser tab (WebSocket) and a plain
//! binary client.
//!
//! Each device of a user has its own cursor in the user's inbox: a stored message stays until
//! every tracked device acknowledged it, a device silent past `--device-retention` is
//! untracked (and told of a gap when it comes back), a stored message a user sends reaches
//! the user's other devices, cursors survive restarts and `kill -9`, and a token naming a
//! device pins it.
//!
//! Nothing sleeps for synchronisation: the relay answers a connection's frames in order, so
//! a PONG proves everything before it was handled (and that no stored message was sent
//! before it). The one wait on time is the retention test's, and there the elapsed time is
//! the condition under test, not a stand-in for an event.

mod support;

use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use imrelay::client::{Client as SdkClient, ClientConfig, Event};
use imrelay::proto::decode::decode_frame;
use imrelay::proto::{ErrorCode, Flags, Frame, InboxState, MessageId, Opcode, UserId};
use support::process::RelayProcess;
use support::telnet::Telnet;
use support::{run_until, Client, SAFETY_TIMEOUT};
use tungstenite::{Message, WebSocket};

const ALICE: u64 = 1001;
const BOB: u64 = 1002;
/// A bystander whose inbox the durability barrier writes to.
const CAROL: u64 = 1003;

// ---- a binary link: plain TCP or WebSocket ----------------------------------------------

/// A connection speaking binary frames, over TCP or WebSocket.
trait Link {
    fn id(&mut self) -> MessageId;
    fn send_frame(&mut self, frame: &Frame);
    fn recv(&mut self) -> Frame;

    /// LOGIN as `user` from `device` (flag DEVICE) with `credential`; returns the answer
    /// (LOGIN_OK or ERROR).
    #[track_caller]
    fn login_as(&mut self, user: u64, device: Option<&str>, credential: &[u8]) -> Frame {
        let id = self.id();
        let login = match device {
            Some(device) => Frame::login_device(id, UserId(user), device, credential),
            None => Frame::login(id, UserId(user), credential),
        };
        self.send_frame(&login);
        let answer = self.recv();
        assert_eq!(answer.msg_id, id, "{answer:?}");
        answer
    }

    /// LOGIN that must succeed.
    #[track_caller]
    fn login_ok(&mut self, user: u64, device: Option<&str>, credential: &[u8]) {
        let answer = self.login_as(user, device, credential);
        assert_eq!(
            answer.opcode,
            Opcode::LoginOk,
            "login {user}@{device:?}: {answer:?}"
        );
    }

    /// INBOX_SYNC; returns the INBOX_STATE and its flags.
    #[track_caller]
    fn sync(&mut self, epoch: u64, last: u64) -> (InboxState, Flags) {
        let id = self.id();
        self.send_frame(&Frame::inbox_sync(id, epoch, last));
        let state = self.recv();
        assert_eq!(
            (state.opcode, state.msg_id),
            (Opcode::InboxState, id),
            "{state:?}"
        );
        (
            state.inbox_state().expect("a 32-byte INBOX_STATE"),
            state.flags,
        )
    }

    /// INBOX_ACK up to `upto` (no answer comes; `nothing_more` proves it was handled).
    fn ack(&mut self, upto: u64) {
        let id = self.id();
        self.send_frame(&Frame::inbox_ack(id, upto));
    }

    /// A PING round trip: the next frame must be its PONG, so nothing (no stored message,
    /// no error) came before it, and everything sent before was handled.
    #[track_caller]
    fn nothing_more(&mut self) {
        let id = self.id();
        self.send_frame(&Frame::ping(id, Bytes::from_static(b"rt")));
        let pong = self.recv();
        assert_eq!(
            (pong.opcode, pong.msg_id),
            (Opcode::Pong, id),
            "expected only the PONG: {pong:?}"
        );
    }

    /// The next frames must be INBOX_DELIVERs of `want` (seq, sender's msg_id, text) from
    /// `from` to `to`, in this order.
    #[track_caller]
    fn expect_stored<S: AsRef<str>>(&mut self, from: u64, to: u64, want: &[(u64, MessageId, S)]) {
        for (seq, msg_id, text) in want {
            let (seq, msg_id, text) = (*seq, *msg_id, text.as_ref());
            let frame = self.recv();
            let (got_seq, _stored_at, body) = frame
                .inbox_deliver()
                .unwrap_or_else(|| panic!("expected INBOX_DELIVER seq {seq}: {frame:?}"));
            assert_eq!(
                (frame.source, frame.target, frame.msg_id, got_seq, &body[..]),
                (UserId(from), UserId(to), msg_id, seq, text.as_bytes()),
                "{frame:?}"
            );
        }
    }

    /// BYE, answered by BYE: the link is closed by the relay, the device offline.
    #[track_caller]
    fn bye(&mut self) {
        let id = self.id();
        self.send_frame(&Frame::bye(id));
        let bye = self.recv();
        assert_eq!(bye.opcode, Opcode::Bye, "{bye:?}");
    }
}

impl Link for Client {
    fn id(&mut self) -> MessageId {
        self.next_id()
    }
    fn send_frame(&mut self, frame: &Frame) {
        Client::send_frame(self, frame);
    }
    fn recv(&mut self) -> Frame {
        Client::recv(self)
    }
}

/// A browser tab: a WebSocket client sending one binary frame per message.
struct WsClient {
    ws: WebSocket<TcpStream>,
    next_id: u64,
}

impl WsClient {
    fn connect(addr: SocketAddr) -> WsClient {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(SAFETY_TIMEOUT)).unwrap();
        let url = format!("ws://{addr}/");
        let (ws, response) = tungstenite::client(url.as_str(), stream).expect("handshake");
        assert_eq!(response.status(), 101);
        WsClient { ws, next_id: 100 }
    }
}

impl Link for WsClient {
    fn id(&mut self) -> MessageId {
        self.next_id += 1;
        MessageId(self.next_id)
    }

    fn send_frame(&mut self, frame: &Frame) {
        self.ws
            .send(Message::Binary(frame.to_bytes()))
            .expect("send");
    }

    fn recv(&mut self) -> Frame {
        loop {
            match self
                .ws
                .read()
                .expect("a WebSocket message (safety timeout?)")
            {
                Message::Binary(data) => {
                    let mut buf = bytes::BytesMut::from(&data[..]);
                    let frame = decode_frame(&mut buf, u32::MAX)
                        .expect("relay framing")
                        .expect("a whole frame")
                        .expect("a known opcode");
                    assert!(buf.is_empty(), "one frame per message");
                    return frame;
                }
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("expected a binary message, got {other:?}"),
            }
        }
    }
}

// ---- helpers ------------------------------------------------------------------------------

/// A binary client of the relay at `addr`, logged in as `user` from `device`.
fn device(addr: SocketAddr, user: u64, device: &str) -> Client {
    let mut c = Client::connect(addr);
    c.login_ok(user, Some(device), b"");
    c
}

/// A STORED SEND of `text` to `to`; returns its id and the ACK's count of connections it
/// was pushed to.
#[track_caller]
fn store(sender: &mut Client, to: u64, text: &str) -> (MessageId, u32) {
    let id = sender.next_id();
    let frame = Frame::send(id, UserId(to), Bytes::copy_from_slice(text.as_bytes()))
        .with_flags(Flags::STORED);
    sender.send_frame(&frame);
    let ack = sender.recv();
    assert_eq!((ack.opcode, ack.msg_id), (Opcode::Ack, id), "{ack:?}");
    (id, ack.ack_count().expect("an ACK count"))
}

/// An SDK client for `user` on device `device` (quick reconnects).
fn sdk(addr: SocketAddr, user: u64, device: &str) -> SdkClient {
    let mut config: ClientConfig = support::quick_sdk(user);
    config.device = Some(device.to_string());
    SdkClient::connect(addr, config, SAFETY_TIMEOUT)
        .expect("the SDK logs in")
        .0
}

/// Proves that everything the SDK client `c` sent at login (its INBOX_SYNC) was handled:
/// a plain SEND to `witness` (a binary client logged in elsewhere) is answered after it.
#[track_caller]
fn sdk_round_trip(c: &mut SdkClient, user: u64, witness: &mut Client, witness_user: u64) {
    let id = c.send(UserId(witness_user), &b"round trip"[..]).unwrap();
    run_until(c, |e| match e {
        Event::Delivered { id: done, devices } if done == id => {
            assert_eq!(devices, 1);
            true
        }
        Event::Message { .. } | Event::SentFromOtherDevice { .. } | Event::Failed { .. } => {
            panic!("unexpected before the round trip's answer: {e:?}")
        }
        _ => false,
    });
    let got = witness.recv();
    assert_eq!(
        (got.opcode, got.source, got.msg_id),
        (Opcode::Deliver, UserId(user), id),
        "{got:?}"
    );
}

/// Closes an SDK client (its pending INBOX_ACK goes out before its BYE, and `close` waits
/// for the relay's BYE, so the ack was handled); returns any stored messages that came
/// meanwhile.
#[track_caller]
fn close_sdk(c: &mut SdkClient) -> Vec<Event> {
    let events = c.close(SAFETY_TIMEOUT);
    assert_eq!(events.last(), Some(&Event::Closed), "{events:?}");
    events
        .into_iter()
        .filter(|e| matches!(e, Event::Message { .. } | Event::SentFromOtherDevice { .. }))
        .collect()
}

/// A text-mode line's words after its first, checked to start with `head`.
#[track_caller]
fn words<'a>(line: &'a str, head: &str) -> Vec<&'a str> {
    let mut it = line.split(' ');
    assert_eq!(it.next(), Some(head), "{line:?}");
    it.collect()
}

/// Text mode: `INBOX <first> <last> <expired_upto> <epoch>` as an InboxState.
#[track_caller]
fn inbox_line(line: &str) -> InboxState {
    let w = words(line, "INBOX");
    assert_eq!(w.len(), 4, "{line:?}");
    let n = |i: usize| -> u64 { w[i].parse().unwrap_or_else(|_| panic!("{line:?}")) };
    InboxState {
        first_seq: n(0),
        last_seq: n(1),
        expired_upto: n(2),
        epoch: n(3),
    }
}

/// A data directory for a durable store, empty.
fn data_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("devices-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// A TCP forwarder in front of the relay that can take a device off the network while its
/// SDK client lives on (keeping its place in the inbox, as a phone in a tunnel does).
struct Gate {
    addr: SocketAddr,
    /// The links forwarded now, and whether new ones are (under one lock, so that a link
    /// accepted while the gate closes is either cut by `close` or refused).
    state: Arc<Mutex<(bool, Vec<Forward>)>>,
}

/// One forwarded link.
struct Forward {
    client: TcpStream,
    relay: TcpStream,
    /// Copies relay → client; ends when the relay closes its side.
    from_relay: JoinHandle<std::io::Result<u64>>,
}

impl Gate {
    fn new(relay: SocketAddr) -> Gate {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the gate");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new((true, Vec::new())));
        let shared = state.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let mut state = shared.lock().unwrap();
                if !state.0 {
                    continue; // closed: the connection is dropped at once
                }
                let upstream = TcpStream::connect(relay).expect("connect to the relay");
                upstream.set_read_timeout(Some(SAFETY_TIMEOUT)).unwrap();
                let (c, u) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
                std::thread::spawn(move || copy(c, u));
                let (u, c) = (upstream.try_clone().unwrap(), client.try_clone().unwrap());
                let from_relay = std::thread::spawn(move || copy(u, c));
                state.1.push(Forward {
                    client,
                    relay: upstream,
                    from_relay,
                });
            }
        });
        Gate { addr, state }
    }

    /// Cuts every link and refuses new ones. Returns once the relay closed each link after
    /// the end of what it received: it has handled everything the device sent.
    fn close(&self) {
        let links = {
            let mut state = self.state.lock().unwrap();
            state.0 = false;
            std::mem::take(&mut state.1)
        };
        assert!(!links.is_empty(), "a device was connected through the gate");
        for link in links {
            link.relay.shutdown(Shutdown::Write).unwrap();
            let ended = link.from_relay.join().expect("the copy thread");
            assert!(
                ended.is_ok(),
                "the relay closes a link it read the end of: {ended:?}"
            );
            let _ = link.client.shutdown(Shutdown::Both);
        }
    }

    fn open(&self) {
        self.state.lock().unwrap().0 = true;
    }
}

/// Copies `from` to `to` until the end of `from`, then ends `to`'s direction too.
fn copy(mut from: TcpStream, mut to: TcpStream) -> std::io::Result<u64> {
    let copied = std::io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
    copied
}

// ---- 1. three devices, three kinds of client ----------------------------------------------

#[test]
fn three_devices_of_three_kinds_each_get_every_stored_message_once() {
    let relay = RelayProcess::start(&[]);
    let addr = relay.addr;
    let mut alice = Client::connect(addr);
    alice.login(ALICE);

    // Each device syncs once, so that the relay tracks it, then goes offline.
    // The phone: the Rust SDK (it syncs at login).
    let mut phone = sdk(addr, BOB, "phone");
    sdk_round_trip(&mut phone, BOB, &mut alice, ALICE);
    assert_eq!(close_sdk(&mut phone), vec![], "the inbox was empty");
    // The terminal: text mode.
    let mut terminal = Telnet::connect(addr);
    terminal.type_line("login 1002@terminal");
    assert_eq!(terminal.read_line(), "OK LOGIN 1002");
    terminal.type_line("SYNC");
    let before = inbox_line(&terminal.read_line());
    terminal.type_line("QUIT");
    assert_eq!(terminal.read_line(), "BYE");
    // The browser tab: WebSocket, binary frames.
    let mut tab = WsClient::connect(addr);
    tab.login_ok(BOB, Some("tab"), b"");
    let (tab_state, flags) = tab.sync(0, 0);
    assert!(flags.contains(Flags::NEW_DEVICE), "{flags:?}");
    assert_eq!(tab_state, before, "one inbox, whichever device asks");
    tab.bye();
    drop(tab);
    let (epoch, last) = (before.epoch, before.last_seq);
    assert_eq!(before.first_seq, last + 1, "an empty inbox");

    // Alice stores three messages while every device of Bob's is offline.
    let texts = ["one", "two", "three"];
    let mut want = Vec::new();
    for (i, text) in texts.iter().enumerate() {
        let (id, pushed) = store(&mut alice, BOB, text);
        assert_eq!(pushed, 0, "no device of Bob's is online");
        want.push((last + 1 + i as u64, id, *text));
    }

    // The terminal comes online first: all three, in order, once; it acks them.
    let mut terminal = Telnet::connect(addr);
    terminal.type_line("login 1002@terminal");
    assert_eq!(terminal.read_line(), "OK LOGIN 1002");
    terminal.type_line(&format!("SYNC {epoch} {last}"));
    let state = inbox_line(&terminal.read_line());
    assert_eq!(
        state,
        InboxState {
            epoch,
            first_seq: last + 1,
            last_seq: last + 3,
            expired_upto: 0
        }
    );
    for (seq, _, text) in &want {
        assert_eq!(terminal.read_line(), format!("STORED {ALICE} {seq} {text}"));
    }
    terminal.type_line(&format!("SACK {}", last + 3));
    terminal.type_line("PING after");
    assert_eq!(terminal.read_line(), "PONG after", "nothing else came");
    terminal.type_line("QUIT");
    assert_eq!(terminal.read_line(), "BYE");

    // The tab: the terminal's ack took nothing from it.
    let mut tab = WsClient::connect(addr);
    tab.login_ok(BOB, Some("tab"), b"");
    let (state, flags) = tab.sync(epoch, last);
    assert!(!flags.contains(Flags::NEW_DEVICE), "the tab is tracked");
    assert_eq!((state.first_seq, state.last_seq), (last + 1, last + 3));
    tab.expect_stored(ALICE, BOB, &want);
    tab.ack(last + 3);
    tab.nothing_more();
    tab.bye();
    drop(tab);

    // The phone: neither ack took anything from it either.
    let mut phone = sdk(addr, BOB, "phone");
    let mut got = Vec::new();
    run_until(&mut phone, |e| {
        match e {
            Event::Message { from, id, payload } => {
                assert_eq!(from, UserId(ALICE));
                got.push((id, String::from_utf8(payload.to_vec()).unwrap()));
            }
            Event::Gap { .. } | Event::SentFromOtherDevice { .. } => panic!("{e:?}"),
            _ => {}
        }
        got.len() == texts.len()
    });
    let want_sdk: Vec<(MessageId, String)> =
        want.iter().map(|(_, id, t)| (*id, t.to_string())).collect();
    assert_eq!(got, want_sdk, "all three, in order");
    assert_eq!(close_sdk(&mut phone), vec![], "each once");

    // Every device acked everything: a fresh sync of any of them gets nothing.
    let empty = InboxState {
        epoch,
        first_seq: last + 4,
        last_seq: last + 3,
        expired_upto: 0,
    };
    let mut terminal = Telnet::connect(addr);
    terminal.type_line("login 1002@terminal");
    assert_eq!(terminal.read_line(), "OK LOGIN 1002");
    terminal.type_line("SYNC");
    assert_eq!(inbox_line(&terminal.read_line()), empty);
    terminal.type_line("PING end");
    assert_eq!(terminal.read_line(), "PONG end", "no stored message");
    let mut tab = WsClient::connect(addr);
    tab.login_ok(BOB, Some("tab"), b"");
    assert_eq!(tab.sync(0, 0).0, empty);
    tab.nothing_more();
    let mut phone = device(addr, BOB, "phone");
    let (state, flags) = phone.sync(0, 0);
    assert_eq!(state, empty);
    assert!(!flags.contains(Flags::NEW_DEVICE), "the phone is tracked");
    phone.nothing_more();
}

// ---- 2. restarts and kill -9 keep every cursor --------------------------------------------

/// The relay's ACK of a stored SEND comes only once the message is on disk, and the store
/// writes its commits in order: once this ACK is in, every cursor the relay recorded before
/// (the acks of earlier frames, answered by PONGs) is on disk too.
fn durability_barrier(alice: &mut Client) {
    store(alice, CAROL, "barrier");
}

#[test]
fn a_restart_and_kill_9_keep_each_devices_cursor() {
    let dir = data_dir("cursors");
    let dir_arg = dir.to_str().unwrap().to_string();
    let flags = ["--store", dir_arg.as_str()];
    let relay = RelayProcess::start(&flags);
    let addr = relay.addr;
    let mut alice = Client::connect(addr);
    alice.login(ALICE);

    // Both devices sync once (now tracked), then go offline.
    let mut phone = device(addr, BOB, "phone");
    let (before, _) = phone.sync(0, 0);
    phone.bye();
    let mut tablet = device(addr, BOB, "tablet");
    let (state, flags_new) = tablet.sync(0, 0);
    assert!(flags_new.contains(Flags::NEW_DEVICE), "{flags_new:?}");
    assert_eq!(state, before);
    tablet.bye();
    let (epoch, last) = (before.epoch, before.last_seq);

    let mut want = Vec::new();
    for i in 1..=4u64 {
        let text = format!("message {i}");
        let (id, pushed) = store(&mut alice, BOB, &text);
        assert_eq!(pushed, 0, "Bob is offline");
        want.push((last + i, id, text));
    }
    // The phone takes and acks all four.
    let mut phone = device(addr, BOB, "phone");
    let (state, _) = phone.sync(epoch, last);
    assert_eq!((state.first_seq, state.last_seq), (last + 1, last + 4));
    phone.expect_stored(ALICE, BOB, &want);
    phone.ack(last + 4);
    phone.nothing_more();
    phone.bye();
    // The tablet takes all four and acks the first two.
    let mut tablet = device(addr, BOB, "tablet");
    let (state, _) = tablet.sync(epoch, last);
    assert_eq!((state.first_seq, state.last_seq), (last + 1, last + 4));
    tablet.expect_stored(ALICE, BOB, &want);
    tablet.ack(last + 2);
    tablet.nothing_more();
    tablet.bye();
    durability_barrier(&mut alice);

    relay.crash();
    let relay = RelayProcess::start_on(addr, &flags);

    // The phone first, with the store's epoch and nothing of its own: had the relay lost
    // its device it would be a new one (NEW_DEVICE). Had it lost the tablet's cursor, the
    // phone's sync would delete 3..4 (first_seq past them); had it moved it back, 1..2
    // would be held again. The replay is what the inbox holds after the sync's last_seq.
    let mut phone = device(addr, BOB, "phone");
    let (state, flags_after) = phone.sync(epoch, 0);
    assert!(
        !flags_after.contains(Flags::NEW_DEVICE),
        "the phone is still tracked after kill -9"
    );
    assert_eq!(
        state,
        InboxState {
            epoch,
            first_seq: last + 3,
            last_seq: last + 4,
            expired_upto: 0
        },
        "same epoch; 1..2 gone (both acked them), 3..4 held for the tablet"
    );
    phone.expect_stored(ALICE, BOB, &want[2..]);
    phone.nothing_more();
    phone.bye();
    // The tablet with its last: exactly 3..4.
    let mut tablet = device(addr, BOB, "tablet");
    let (state, flags_after) = tablet.sync(epoch, last + 2);
    assert!(!flags_after.contains(Flags::NEW_DEVICE));
    assert_eq!((state.first_seq, state.last_seq), (last + 3, last + 4));
    assert_eq!(state.expired_upto, 0, "no gap");
    tablet.expect_stored(ALICE, BOB, &want[2..]);
    tablet.ack(last + 4);
    tablet.nothing_more();
    // That deleted 3..4: the phone's cursor (not moved since the restart: a sync with
    // last_seq 0 acknowledges nothing) is still past them.
    let (state, _) = tablet.sync(epoch, last + 4);
    assert_eq!(
        (state.first_seq, state.last_seq),
        (last + 5, last + 4),
        "the phone's cursor came back at message 4"
    );
    tablet.nothing_more();
    tablet.bye();
    // The phone with its own last: nothing.
    let mut phone = device(addr, BOB, "phone");
    let (state, flags_after) = phone.sync(epoch, last + 4);
    assert!(!flags_after.contains(Flags::NEW_DEVICE));
    assert_eq!((state.first_seq, state.last_seq), (last + 5, last + 4));
    phone.nothing_more();
    phone.bye();

    // A graceful restart (SIGTERM) in between keeps them too.
    let mut relay = relay;
    relay.signal(libc::SIGTERM);
    let status = relay.child.wait().expect("wait for the relay");
    assert!(status.success(), "SIGTERM is a clean shutdown: {status}");
    drop(relay);
    let _relay = RelayProcess::start_on(addr, &flags);
    let mut alice = Client::connect(addr);
    alice.login(ALICE);
    let (id, pushed) = store(&mut alice, BOB, "message 5");
    assert_eq!(pushed, 0);
    let five = [(last + 5, id, "message 5")];
    // The phone, again with nothing of its own: still tracked, so exactly message 5.
    let mut phone = device(addr, BOB, "phone");
    let (state, flags_after) = phone.sync(epoch, 0);
    assert!(
        !flags_after.contains(Flags::NEW_DEVICE),
        "the phone is still tracked after SIGTERM"
    );
    assert_eq!(
        (state.epoch, state.first_seq, state.last_seq),
        (epoch, last + 5, last + 5)
    );
    phone.expect_stored(ALICE, BOB, &five);
    phone.ack(last + 5);
    phone.nothing_more();
    phone.bye();
    // The phone's ack did not delete it: the tablet's cursor came back too.
    let mut tablet = device(addr, BOB, "tablet");
    let (state, flags_after) = tablet.sync(epoch, last + 4);
    assert!(!flags_after.contains(Flags::NEW_DEVICE));
    assert_eq!((state.first_seq, state.last_seq), (last + 5, last + 5));
    tablet.expect_stored(ALICE, BOB, &five);
    tablet.ack(last + 5);
    tablet.nothing_more();
    // Both have it: gone.
    let (state, _) = tablet.sync(epoch, last + 5);
    assert_eq!((state.first_seq, state.last_seq), (last + 6, last + 5));
    tablet.nothing_more();
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- 3. a device silent past the retention time -------------------------------------------

#[test]
fn a_device_silent_past_the_retention_time_is_told_of_a_gap() {
    const RETENTION: Duration = Duration::from_secs(1);
    let relay = RelayProcess::start(&["--device-retention", "1"]);
    let addr = relay.addr;
    let mut alice = Client::connect(addr);
    alice.login(ALICE);

    let mut phone = device(addr, BOB, "phone");
    let (before, _) = phone.sync(0, 0);
    let (epoch, last) = (before.epoch, before.last_seq);
    let mut tablet = device(addr, BOB, "tablet");
    let (state, _) = tablet.sync(0, 0);
    assert_eq!(state, before);
    // A watch runs the SDK, through a gate that can take it off the network.
    let gate = Gate::new(addr);
    let mut watch = sdk(gate.addr, BOB, "watch");
    sdk_round_trip(&mut watch, BOB, &mut alice, ALICE);

    // Message 1 reaches all three.
    let (id, pushed) = store(&mut alice, BOB, "m1");
    assert_eq!(pushed, 3, "every device is synced");
    let m1 = [(last + 1, id, "m1")];
    phone.expect_stored(ALICE, BOB, &m1);
    phone.ack(last + 1);
    phone.nothing_more();
    run_until(&mut watch, |e| match e {
        Event::Message { id: got, .. } => {
            assert_eq!(got, id);
            true
        }
        Event::Gap { .. } | Event::SentFromOtherDevice { .. } => panic!("{e:?}"),
        _ => false,
    });
    tablet.expect_stored(ALICE, BOB, &m1);
    tablet.ack(last + 1);
    // The PONG proves the relay handled the tablet's ack, and the gate's close that it
    // handled all the watch sent: both were last heard of before now.
    tablet.nothing_more();
    gate.close();
    let silent_since = Instant::now();
    tablet.bye();
    drop(tablet);

    // The tablet and the watch are silent; the phone gets and acks 2..4.
    let mut more = Vec::new();
    for i in 2..=4u64 {
        let text = format!("m{i}");
        let (id, pushed) = store(&mut alice, BOB, &text);
        assert_eq!(pushed, 1, "the phone only");
        more.push((last + i, id, text));
    }
    phone.expect_stored(ALICE, BOB, &more);
    phone.ack(last + 4);
    phone.nothing_more();

    // The condition under test: more than the retention time since the tablet was last
    // heard of (the relay counts whole milliseconds, hence the margin).
    let silent = RETENTION + Duration::from_millis(50);
    if let Some(left) = silent.checked_sub(silent_since.elapsed()) {
        std::thread::sleep(left);
    }
    // The relay looks at its devices again when the phone acks a later message.
    let (id, pushed) = store(&mut alice, BOB, "m5");
    assert_eq!(pushed, 1);
    phone.expect_stored(ALICE, BOB, &[(last + 5, id, "m5")]);
    phone.ack(last + 5);
    phone.nothing_more();

    // The tablet is back with its old last seq: untracked meanwhile, it missed 2..5.
    let mut tablet = device(addr, BOB, "tablet");
    let (state, flags) = tablet.sync(epoch, last + 1);
    assert!(
        !flags.contains(Flags::NEW_DEVICE),
        "a device back, not a new one: {flags:?}"
    );
    assert_eq!(
        (state.epoch, state.first_seq, state.last_seq),
        (epoch, last + 6, last + 5),
        "the phone's acks deleted everything once the tablet was untracked"
    );
    assert!(
        state.expired_upto >= state.first_seq - 1,
        "a gap up to before the oldest held: {state:?}"
    );
    assert!(
        state.expired_upto > last + 1,
        "past the tablet's last seq: {state:?}"
    );
    tablet.nothing_more();
    // Tracked again from then on: a new message reaches it, and waits for it.
    let (id, pushed) = store(&mut alice, BOB, "m6");
    assert_eq!(pushed, 2);
    let m6 = [(last + 6, id, "m6")];
    phone.expect_stored(ALICE, BOB, &m6);
    tablet.expect_stored(ALICE, BOB, &m6);

    // The watch is back on the network: its SDK syncs with the last message it took (1)
    // and reports the gap 2..5 before message 6.
    gate.open();
    let mut got = Vec::new();
    run_until(&mut watch, |e| {
        match e {
            Event::Gap { .. } => got.push(e),
            Event::Message { id: m, .. } => {
                assert_eq!(m, id, "message 6");
                got.push(e);
                return true;
            }
            Event::SentFromOtherDevice { .. } => panic!("{e:?}"),
            _ => {}
        }
        false
    });
    assert_eq!(
        got[0],
        Event::Gap {
            from: last + 2,
            to: last + 5
        }
    );
    assert_eq!(got.len(), 2, "one gap, then message 6: {got:?}");
}

// ---- 4. sent from another device ----------------------------------------------------------

#[test]
fn a_stored_message_sent_from_one_device_reaches_the_users_other_devices() {
    let relay = RelayProcess::start(&[]);
    let addr = relay.addr;
    // Bob is online (the witness of the SDK's round trip) but has not synced yet.
    let mut bob = Client::connect(addr);
    bob.login(BOB);

    // Alice's laptop (binary) and tablet (SDK) are synced, so tracked.
    let mut laptop = device(addr, ALICE, "laptop");
    let (before, _) = laptop.sync(0, 0);
    let (epoch, last) = (before.epoch, before.last_seq);
    let mut tablet = sdk(addr, ALICE, "tablet");
    sdk_round_trip(&mut tablet, ALICE, &mut bob, BOB);
    // The phone syncs and sends a stored message to Bob.
    let mut phone = device(addr, ALICE, "phone");
    let (state, flags) = phone.sync(0, 0);
    assert!(flags.contains(Flags::NEW_DEVICE), "{flags:?}");
    assert_eq!(state, before);
    let text = "hi bob, from my phone";
    let (id, pushed) = store(&mut phone, BOB, text);
    assert_eq!(pushed, 0, "Bob's connection has not synced");

    // The laptop gets the copy from Alice's own inbox: source Alice, target Bob.
    laptop.expect_stored(ALICE, BOB, &[(last + 1, id, text)]);
    laptop.nothing_more();
    // The SDK shows it as sent from another device.
    run_until(&mut tablet, |e| match e {
        Event::SentFromOtherDevice {
            to,
            id: got,
            payload,
        } => {
            assert_eq!((to, got, &payload[..]), (UserId(BOB), id, text.as_bytes()));
            true
        }
        Event::Message { .. } | Event::Gap { .. } => panic!("{e:?}"),
        _ => false,
    });
    // The phone does not get it back, live or by a new sync.
    phone.nothing_more();
    let (state, _) = phone.sync(epoch, 0);
    assert_eq!(state.last_seq, last + 1, "the copy is in Alice's inbox");
    phone.nothing_more();

    // Bob gets it once, as usual.
    let (state, _) = bob.sync(0, 0);
    assert_eq!(state.first_seq, state.last_seq, "one message: {state:?}");
    bob.expect_stored(ALICE, BOB, &[(state.last_seq, id, text)]);
    bob.nothing_more();
    assert_eq!(close_sdk(&mut tablet), vec![], "the copy came once");
}

// ---- 5. a token pins the device -----------------------------------------------------------

/// The HS256 secret of the token relay (at least 32 bytes).
const SECRET: &[u8] = b"imrelay-e2e-devices-secret-0123456789abcdef";

#[test]
fn a_token_naming_a_device_pins_it() {
    let dir = data_dir("token");
    std::fs::create_dir_all(&dir).unwrap();
    let secret = dir.join("secret");
    std::fs::write(&secret, SECRET).unwrap();
    let relay = RelayProcess::start(&["--auth-secret-file", secret.to_str().unwrap()]);
    let addr = relay.addr;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let token = |user: u64, device: Option<&str>| {
        imrelay::auth::mint_hs256(
            SECRET,
            user,
            now,
            3600,
            &imrelay::auth::RoomGrant::None,
            false,
            device,
        )
    };
    let phone_token = token(BOB, Some("phone"));

    // Naming another device than the token's is refused.
    let mut wrong = Client::connect(addr);
    let answer = wrong.login_as(BOB, Some("tablet"), phone_token.as_bytes());
    assert_eq!(
        answer.error_code(),
        Some(ErrorCode::AuthFailed),
        "{answer:?}"
    );
    let (_, reason) = answer.error().unwrap();
    assert!(
        reason.contains("the token is for device \"phone\", not \"tablet\""),
        "{reason:?}"
    );

    let mut alice = Client::connect(addr);
    alice.login_with(ALICE, token(ALICE, None).as_bytes());
    // The phone (naming itself) and the tablet (its own token) are tracked.
    let mut phone = Client::connect(addr);
    phone.login_ok(BOB, Some("phone"), phone_token.as_bytes());
    let (before, _) = phone.sync(0, 0);
    let (epoch, last) = (before.epoch, before.last_seq);
    let mut tablet = Client::connect(addr);
    tablet.login_ok(BOB, Some("tablet"), token(BOB, Some("tablet")).as_bytes());
    tablet.sync(0, 0);
    tablet.bye();

    // Two messages: the phone acks them, the tablet holds them in the inbox.
    let mut want = Vec::new();
    for i in 1..=2u64 {
        let text = format!("m{i}");
        let (id, pushed) = store(&mut alice, BOB, &text);
        assert_eq!(pushed, 1, "the phone only");
        want.push((last + i, id, text));
    }
    phone.expect_stored(ALICE, BOB, &want);
    phone.ack(last + 2);
    phone.nothing_more();
    phone.bye();

    // A LOGIN without the DEVICE flag, with the phone's token, is the phone: a tracked
    // device (no NEW_DEVICE), whose cursor is past both messages. Its sync with last_seq 0
    // acknowledges nothing and replays what the inbox holds.
    let mut pinned = Client::connect(addr);
    pinned.login_with(BOB, phone_token.as_bytes());
    let (state, flags) = pinned.sync(epoch, 0);
    assert!(!flags.contains(Flags::NEW_DEVICE), "the phone: {flags:?}");
    assert_eq!((state.first_seq, state.last_seq), (last + 1, last + 2));
    pinned.expect_stored(ALICE, BOB, &want);
    pinned.nothing_more();
    // Once the tablet acks them both are gone: no other device holds them back (the
    // default device, had the pinned LOGIN been it, would hold them now).
    let mut tablet = Client::connect(addr);
    tablet.login_ok(BOB, Some("tablet"), token(BOB, Some("tablet")).as_bytes());
    let (_, flags) = tablet.sync(epoch, last);
    assert!(!flags.contains(Flags::NEW_DEVICE));
    tablet.expect_stored(ALICE, BOB, &want);
    tablet.ack(last + 2);
    tablet.nothing_more();
    let (state, _) = tablet.sync(epoch, last + 2);
    assert_eq!((state.first_seq, state.last_seq), (last + 3, last + 2));
    tablet.nothing_more();
    // Without a device in the token, a LOGIN without the flag is the default device: new.
    let mut default = Client::connect(addr);
    default.login_with(BOB, token(BOB, None).as_bytes());
    let (_, flags) = default.sync(epoch, 0);
    assert!(flags.contains(Flags::NEW_DEVICE), "{flags:?}");
    default.nothing_more();
    let _ = std::fs::remove_dir_all(&dir);
}
