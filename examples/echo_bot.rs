//! A bot that logs into a relay as a user and sends every message it receives back to its
//! sender, so anyone can test a client (or the text mode) end to end. It is built on the
//! SDK, so it rides out relay restarts by itself.
//!
//! Terminal 1: `cargo run --release --bin imrelay`
//! Terminal 2: `cargo run --example echo_bot` (user 9999; or `-- 127.0.0.1:7700 4242`)
//! Terminal 3: `telnet 127.0.0.1 7700`, then `login 1`, `send 9999 hello` → `MSG 9999 … hello`

use std::error::Error;
use std::time::Duration;

use imrelay::client::{Client, ClientConfig, Event};
use imrelay::proto::UserId;

fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:7700".to_string());
    let me = UserId(args.next().map(|s| s.parse()).transpose()?.unwrap_or(9999));

    let (mut bot, _) =
        Client::connect(addr.as_str(), ClientConfig::new(me), Duration::from_secs(5))?;
    println!("echo bot logged in as {} on {addr}", me.0);
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
            Event::Error { code, reason } => println!("relay says {code}: {reason}"),
            Event::Closed => return Ok(()),
            _ => {}
        }
    }
}
