//! A bot that logs into a relay as a user and sends every message it receives back to its
//! sender, so anyone can test a client (or the text mode) end to end. It is built on the
//! SDK, so it rides out relay restarts by itself.
//!
//! Terminal 1: `cargo run --release --bin imrelay`
//! Terminal 2: `cargo run --example echo_bot` (user 9999; or `-- 4242 127.0.0.1:7700`)
//! Terminal 3: `telnet 127.0.0.1 7700`, then `login 1`, `send 9999 hello` → `MSG 9999 … hello`
//!
//! Its arguments come in the order `chat` takes them: the user id, then the relay.

use std::net::ToSocketAddrs;
use std::process::ExitCode;
use std::time::Duration;

use imrelay::client::{code_name, Client, ClientConfig, ConnectError, DisconnectReason, Event};
use imrelay::proto::UserId;

const USAGE: &str =
    "usage: echo_bot [my user id, default 9999] [relay host:port, default 127.0.0.1:7700]";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let me = match args.next() {
        None => 9999,
        Some(word) => match word.parse::<u64>() {
            Ok(user) if user != 0 => user,
            _ => {
                eprintln!("echo_bot: {word:?} is not a user id (a number from 1)\n{USAGE}");
                return ExitCode::from(2);
            }
        },
    };
    let relay = args.next().unwrap_or_else(|| "127.0.0.1:7700".to_string());
    if let Some(extra) = args.next() {
        eprintln!("echo_bot: unexpected argument {extra:?}\n{USAGE}");
        return ExitCode::from(2);
    }
    let addr = match relay.to_socket_addrs().map(|mut a| a.next()) {
        Ok(Some(addr)) => addr,
        Ok(None) => {
            eprintln!("echo_bot: cannot resolve {relay:?}: no address\n{USAGE}");
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("echo_bot: cannot resolve {relay:?} as host:port: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let me = UserId(me);

    let mut bot = match Client::connect(addr, ClientConfig::new(me), Duration::from_secs(5)) {
        Ok((bot, _)) => bot,
        Err(ConnectError::Link(DisconnectReason::ConnectFailed(why))) => {
            eprintln!(
                "echo_bot: cannot connect to {addr}: {} — is the relay running? \
                 (cargo run --release --bin imrelay)",
                readable(&why)
            );
            return ExitCode::from(1);
        }
        Err(e) => {
            eprintln!("echo_bot: cannot log in to {addr}: {e}");
            return ExitCode::from(1);
        }
    };
    println!("echo bot logged in as {} on {relay}", me.0);
    loop {
        let Some(event) = bot.recv(Duration::from_secs(3600)) else {
            continue;
        };
        match event {
            Event::Message { from, payload, .. } => {
                println!("echoing {} bytes to user {}", payload.len(), from.0);
                if let Err(e) = bot.send(from, payload) {
                    println!("cannot echo to {}: {e}", from.0);
                }
            }
            Event::Failed { reason, .. } => println!("an echo was not delivered: {reason}"),
            Event::Disconnected { reason, retry_in } => {
                println!(
                    "link down ({reason}); reconnecting in {:.1} s",
                    retry_in.as_secs_f64()
                );
            }
            Event::Connected { .. } => println!("echo bot logged in again"),
            Event::Error { code, reason } => {
                println!("relay error {}: {reason}", code_name(code));
            }
            Event::Closed => return ExitCode::SUCCESS,
            _ => {}
        }
    }
}

/// An OS error as a phrase: "Connection refused (os error 111)" → "connection refused".
fn readable(why: &str) -> String {
    let why = why.split(" (os error").next().unwrap_or(why);
    let mut chars = why.chars();
    chars.next().map_or_else(String::new, |first| {
        first.to_lowercase().chain(chars).collect()
    })
}
