//! An interactive terminal chat client on the SDK.
//!
//! `cargo run --example chat -- <my user id> [relay address]` (relay 127.0.0.1:7700), then
//! type `<user id> <message>` lines. Deliveries are printed with their sender and time;
//! sends end as "delivered" or "not delivered: <reason>". Stop the relay and start it
//! again: the client says the link is down, reconnects by itself, and sends what you typed
//! meanwhile. End with Ctrl-D (or `/quit`).

use std::io::BufRead;
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use imrelay::client::{code_name, Client, ClientConfig, Event};
use imrelay::proto::{MessageId, UserId};

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(me) = args
        .next()
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|u| *u != 0)
    else {
        eprintln!("usage: chat <my user id> [relay host:port]");
        std::process::exit(2);
    };
    let relay = args.next().unwrap_or_else(|| "127.0.0.1:7700".to_string());
    let Some(addr) = std::net::ToSocketAddrs::to_socket_addrs(relay.as_str())
        .ok()
        .and_then(|mut a| a.next())
    else {
        eprintln!("cannot resolve {relay}");
        std::process::exit(2);
    };

    let mut client = Client::start(addr, ClientConfig::new(UserId(me)));
    println!(
        "{} connecting to {relay} as {me}; type `<user id> <message>`",
        now()
    );

    let (lines_tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut sent: Vec<(MessageId, u64)> = Vec::new();
    loop {
        while let Some(event) = client.recv(Duration::from_millis(50)) {
            show(&event, &mut sent);
        }
        match lines.try_recv() {
            Ok(line) if line.trim() == "/quit" => break,
            Ok(line) => typed(&mut client, &line, &mut sent),
            Err(mpsc::TryRecvError::Empty) => {}
            Err(mpsc::TryRecvError::Disconnected) => break,
        }
    }
    for event in client.close(Duration::from_secs(5)) {
        show(&event, &mut sent);
    }
}

fn typed(client: &mut Client, line: &str, sent: &mut Vec<(MessageId, u64)>) {
    let line = line.trim();
    if line.is_empty() {
        return;
    }
    let Some((to, text)) = line
        .split_once(' ')
        .and_then(|(to, text)| Some((to.parse::<u64>().ok()?, text)))
    else {
        println!("{} type `<user id> <message>`, or /quit", now());
        return;
    };
    match client.send(UserId(to), text.as_bytes().to_vec()) {
        Ok(id) => sent.push((id, to)),
        Err(e) => println!("{} cannot send: {e}", now()),
    }
}

fn show(event: &Event, sent: &mut Vec<(MessageId, u64)>) {
    let mut recipient = |id: &MessageId| {
        let pos = sent.iter().position(|(s, _)| s == id);
        pos.map_or(0, |p| sent.remove(p).1)
    };
    match event {
        Event::Connected { user, .. } => println!("{} connected as {}", now(), user.0),
        Event::Disconnected { reason, retry_in } => {
            println!(
                "{} link down ({reason}); reconnecting in {:.1} s",
                now(),
                retry_in.as_secs_f64()
            );
        }
        Event::Message { from, payload, .. } => {
            println!("{} {}: {}", now(), from.0, String::from_utf8_lossy(payload));
        }
        Event::Delivered { id, .. } => println!("{} delivered to {}", now(), recipient(id)),
        Event::Failed { id, reason } => {
            println!("{} not delivered to {}: {reason}", now(), recipient(id));
        }
        Event::Error { code, reason } => {
            println!("{} relay error {}: {reason}", now(), code_name(*code));
        }
        Event::Closed => println!("{} bye", now()),
        _ => {}
    }
}

/// The time of day as `[hh:mm:ss]` (UTC).
fn now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!(
        "[{:02}:{:02}:{:02}]",
        secs / 3600 % 24,
        secs / 60 % 60,
        secs % 60
    )
}
