//! A damaged store log, with the real binary: a flipped byte halfway through `inbox.log`
//! makes the relay refuse to start, naming the damaged record's offset; `--store-repair`
//! starts it with every other stored message, and the repaired log starts cleanly after.

mod support;

use std::path::PathBuf;
use std::time::Instant;

use imrelay::client::{Client, Event};
use imrelay::proto::{UserId, HEADER_LEN};
use support::process::{self, RelayProcess};
use support::{run_until, SAFETY_TIMEOUT};

const ALICE: UserId = UserId(1);
const BOB: UserId = UserId(2);
const TOTAL: usize = 300;

fn connect(addr: std::net::SocketAddr, user: UserId) -> Client {
    let mut c = support::quick_sdk(user.0);
    c.max_outbox = 10_000;
    Client::connect(addr, c, SAFETY_TIMEOUT).expect("connect").0
}

fn data_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("store-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// The number a test message carries as its payload.
fn number(payload: &[u8]) -> usize {
    std::str::from_utf8(payload).unwrap().parse().unwrap()
}

/// Each record of the log: (offset, body length). Record: u32 length, u32 CRC, body.
fn records(log: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 8 <= log.len() {
        let len = u32::from_be_bytes(log[at..at + 4].try_into().unwrap()) as usize;
        out.push((at, len));
        at += 8 + len;
    }
    assert_eq!(at, log.len(), "the log is made of whole records");
    out
}

#[test]
fn a_damaged_log_stops_the_relay_and_a_repair_keeps_every_other_message() {
    let dir = data_dir("repair");
    let dir_arg = dir.to_str().unwrap().to_string();
    let relay = RelayProcess::start(&["--store", &dir_arg]);
    let addr = relay.addr;
    let mut alice = connect(addr, ALICE);
    for i in 0..TOTAL {
        alice.send_stored(BOB, i.to_string().into_bytes()).unwrap();
    }
    let mut stored = 0;
    run_until(&mut alice, |e| {
        match e {
            Event::Stored { .. } => stored += 1,
            Event::Failed { reason, .. } => panic!("{reason}"),
            _ => {}
        }
        stored == TOTAL
    });
    relay.crash();

    // Flip a byte of the message in the middle record (an Append: kind 2, user, frame).
    let path = dir.join("inbox.log");
    let mut log = std::fs::read(&path).unwrap();
    let all = records(&log);
    assert_eq!(
        all.len(),
        TOTAL + 2,
        "the epoch, the cursor of Alice's device (her client syncs its inbox at login) and \
         one record per message"
    );
    let (at, len) = all[all.len() / 2];
    let body = &log[at + 8..at + 8 + len];
    assert_eq!(body[0], 2, "an Append record");
    let lost = number(&body[9 + HEADER_LEN + 16..]);
    log[at + 8 + len - 1] ^= 0x40;
    std::fs::write(&path, &log).unwrap();

    let (status, stderr) = process::run_to_exit(&["--listen", "127.0.0.1:0", "--store", &dir_arg]);
    let ok = status.success();
    assert!(!ok, "the relay must exit with an error:\n{stderr}");
    assert!(
        stderr.contains(&format!("byte offset {at}")),
        "the error names the damaged record's offset {at}:\n{stderr}"
    );

    let relay = RelayProcess::start_on(addr, &["--store", &dir_arg, "--store-repair"]);
    let mut bob = connect(addr, BOB);
    let mut got = Vec::new();
    let deadline = Instant::now() + 3 * SAFETY_TIMEOUT;
    while got.len() < TOTAL - 1 {
        let left = deadline.saturating_duration_since(Instant::now());
        match bob.recv(left) {
            Some(Event::Message { from, payload, .. }) => {
                assert_eq!(from, ALICE);
                got.push(number(&payload));
            }
            Some(_) => {}
            None => panic!("bob got {} of {} messages: {got:?}", got.len(), TOTAL - 1),
        }
    }
    let want: Vec<usize> = (0..TOTAL).filter(|&i| i != lost).collect();
    assert_eq!(got, want, "every message but the damaged one, in order");
    bob.close(SAFETY_TIMEOUT);
    drop(relay);

    // The repaired log is clean: a plain start reads it.
    let _relay = RelayProcess::start_on(addr, &["--store", &dir_arg]);
    let _ = std::fs::remove_dir_all(&dir);
}
