//! A two-user tour of a running relay: alice and bob log in, alice sends bob one message,
//! bob receives it with alice's id as the source, alice receives the ACK. Every frame is
//! printed in hex next to its decoded fields, so this doubles as a wire-format walkthrough.
//!
//! Terminal 1: `cargo run --release --bin imrelay`
//! Terminal 2: `cargo run --example tour` (or `cargo run --example tour -- 127.0.0.1:7700`)
//!
//! Poke the relay by hand: a 32-byte PING frame (length 0x20, version 1, opcode 7, the rest
//! zero) comes back as a PONG (opcode 8):
//! `{ printf '\x00\x00\x00\x20\x01\x07'; head -c 26 /dev/zero; } | nc -q1 127.0.0.1 7700 | xxd`

use std::error::Error;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use imrelay::proto::decode::decode_frame;
use imrelay::proto::{Frame, MessageId, UserId, DEFAULT_MAX_FRAME};

/// One side of the conversation: a blocking socket and a decode buffer.
struct Client {
    name: &'static str,
    stream: TcpStream,
    buf: BytesMut,
}

impl Client {
    fn connect(name: &'static str, addr: SocketAddr) -> Result<Client, Box<dyn Error>> {
        let stream = TcpStream::connect(addr).map_err(|e| match e.kind() {
            ErrorKind::ConnectionRefused => format!(
                "cannot connect to {addr}: connection refused — is the relay running? \
                 (cargo run --release --bin imrelay)"
            ),
            _ => format!("cannot connect to {addr}: {e}"),
        })?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(Client {
            name,
            stream,
            buf: BytesMut::new(),
        })
    }

    fn send(&mut self, frame: Frame) -> Result<(), Box<dyn Error>> {
        let bytes = frame.to_bytes();
        println!("{} -> relay  {:?} {}", self.name, frame.opcode, hex(&bytes));
        self.stream.write_all(&bytes)?;
        Ok(())
    }

    fn recv(&mut self) -> Result<Frame, Box<dyn Error>> {
        loop {
            let before = self.buf.clone();
            if let Some(decoded) = decode_frame(&mut self.buf, DEFAULT_MAX_FRAME)? {
                let frame = decoded.map_err(|op| format!("unknown opcode 0x{op:02x}"))?;
                let raw = &before[..frame.encoded_len()];
                println!("relay -> {}  {:?} {}", self.name, frame.opcode, hex(raw));
                return Ok(frame);
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Err("relay closed the connection".into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

const USAGE: &str = "usage: tour [relay host:port, default 127.0.0.1:7700]";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:7700".to_string());
    if let Some(extra) = args.next() {
        eprintln!("tour: unexpected argument {extra:?}\n{USAGE}");
        return ExitCode::from(2);
    }
    let addr = match addr.to_socket_addrs().map(|mut a| a.next()) {
        Ok(Some(resolved)) => resolved,
        Ok(None) => {
            eprintln!("tour: cannot resolve {addr:?}: no address\n{USAGE}");
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("tour: cannot resolve {addr:?} as host:port: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match tour(addr) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tour: {e}");
            ExitCode::from(1)
        }
    }
}

fn tour(addr: SocketAddr) -> Result<(), Box<dyn Error>> {
    let mut alice = Client::connect("alice", addr)?;
    let mut bob = Client::connect("bob  ", addr)?;

    alice.send(Frame::login(MessageId(1), UserId(1001), b""))?;
    let ok = alice.recv()?;
    println!(
        "        alice is logged in; relay limits: {:?}\n",
        ok.login_ok()
    );
    bob.send(Frame::login(MessageId(1), UserId(1002), b""))?;
    bob.recv()?;
    println!();

    alice.send(Frame::send(
        MessageId(2),
        UserId(1002),
        Bytes::from_static(b"hi bob"),
    ))?;
    let delivered = bob.recv()?;
    println!(
        "        bob got {:?} from user {} (source set by the relay)",
        String::from_utf8_lossy(&delivered.payload),
        delivered.source.0
    );
    let ack = alice.recv()?;
    println!(
        "        alice's message {} was queued to {} connection(s) of bob\n",
        ack.msg_id.0,
        ack.ack_count().unwrap_or(0)
    );

    alice.send(Frame::bye(MessageId(3)))?;
    alice.recv()?;
    bob.send(Frame::bye(MessageId(2)))?;
    bob.recv()?;
    Ok(())
}
