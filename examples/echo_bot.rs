//! A bot that logs into a relay as a user and sends every message it receives back to its
//! sender, so anyone can test a client (or the text mode) end to end.
//!
//! Terminal 1: `cargo run --release --bin imrelay`
//! Terminal 2: `cargo run --example echo_bot` (user 9999; or `-- 127.0.0.1:7700 4242`)
//! Terminal 3: `telnet 127.0.0.1 7700`, then `login 1`, `send 9999 hello` → `MSG 9999 … hello`

use std::error::Error;
use std::io::{Read, Write};
use std::net::TcpStream;

use bytes::BytesMut;
use imrelay::proto::decode::decode_frame;
use imrelay::proto::{Flags, Frame, MessageId, Opcode, UserId, DEFAULT_MAX_FRAME};

fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:7700".to_string());
    let me = UserId(args.next().map(|s| s.parse()).transpose()?.unwrap_or(9999));

    let mut stream = TcpStream::connect(&addr)?;
    stream.set_nodelay(true)?;
    stream.write_all(&Frame::login(MessageId(1), me, b"").to_bytes())?;
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    let mut next_id = 1u64;
    loop {
        while let Some(decoded) = decode_frame(&mut buf, DEFAULT_MAX_FRAME)? {
            let Ok(frame) = decoded else {
                continue; // an opcode newer than this bot: skip it
            };
            match frame.opcode {
                Opcode::LoginOk => println!("echo bot logged in as {} on {addr}", me.0),
                Opcode::Deliver => {
                    next_id += 1;
                    let reply = Frame::send(MessageId(next_id), frame.source, frame.payload)
                        .with_flags(Flags::NO_ACK);
                    stream.write_all(&reply.to_bytes())?;
                    println!(
                        "echoed {} bytes to user {}",
                        reply.payload.len(),
                        frame.source.0
                    );
                }
                Opcode::Ping => {
                    stream.write_all(&Frame::pong(frame.msg_id, frame.payload).to_bytes())?
                }
                Opcode::Error => println!("relay says: {:?}", frame.error()),
                _ => {}
            }
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            println!("relay closed the connection");
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}
