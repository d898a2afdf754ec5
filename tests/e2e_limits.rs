//! Limits over real sockets (device and connection limits), and the real `imrelay` binary:
//! its connection limit, and clean shutdown on SIGTERM and SIGINT.

mod support;

use std::process::{Command, Stdio};

use imrelay::proto::{ErrorCode, Frame, MessageId, Opcode, UserId};
use imrelay::relay::Config;
use support::process::RelayProcess;
use support::{Client, TestRelay};

#[test]
fn a_user_past_its_device_limit_is_refused_but_stays_connected() {
    let relay = TestRelay::start(Config {
        max_devices_per_user: 2,
        ..Config::default()
    });
    let _phone = relay.login(7);
    let _tablet = relay.login(7);
    let mut laptop = relay.connect();
    laptop.send_frame(&Frame::login(MessageId(1), UserId(7), b""));
    laptop.expect_error(ErrorCode::LimitReached);
    laptop.round_trip();
    laptop.send(7, b"not logged in");
    laptop.expect_error(ErrorCode::NotLoggedIn);
}

#[test]
fn a_connection_past_the_limit_is_refused_and_a_freed_slot_is_reused() {
    let relay = TestRelay::start(Config {
        max_connections: 3,
        ..Config::default()
    });
    let mut first = relay.login(1);
    let _second = relay.login(2);
    let _third = relay.login(3);
    let mut refused = relay.connect();
    refused.expect_error(ErrorCode::LimitReached);
    refused.expect_closed();

    first.send_frame(&Frame::bye(MessageId(1)));
    assert_eq!(first.recv().opcode, Opcode::Bye);
    first.expect_closed();
    // The relay frees the slot when it closes the socket, which we just saw happen.
    let mut newcomer = relay.connect();
    newcomer.login(4);
    newcomer.round_trip();
}

fn shutdown_on(signal: libc::c_int) {
    let mut relay = RelayProcess::start(&[]);
    let mut alice = Client::connect(relay.addr);
    alice.login(1);
    let mut bob = Client::connect(relay.addr);
    bob.login(2);
    bob.round_trip();
    relay.signal(signal);
    for client in [&mut alice, &mut bob] {
        client.expect_error(ErrorCode::ShuttingDown);
        client.expect_closed();
    }
    let status = relay.child.wait().expect("wait");
    assert!(status.success(), "exit status {status:?}");
}

#[test]
fn sigterm_tells_every_client_and_exits_zero() {
    shutdown_on(libc::SIGTERM);
}

#[test]
fn sigint_tells_every_client_and_exits_zero() {
    shutdown_on(libc::SIGINT);
}

#[test]
fn the_binary_refuses_connections_past_its_limit() {
    let relay = RelayProcess::start(&["--max-connections", "2"]);
    let mut a = Client::connect(relay.addr);
    a.login(1);
    let mut b = Client::connect(relay.addr);
    b.login(2);
    let mut c = Client::connect(relay.addr);
    c.expect_error(ErrorCode::LimitReached);
    c.expect_closed();
    a.round_trip();
}

#[test]
fn the_binary_rejects_incoherent_limits() {
    let status = Command::new(env!("CARGO_BIN_EXE_imrelay"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--ping-interval",
            "100",
            "--idle-timeout",
            "50",
        ])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(2));
}
