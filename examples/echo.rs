//! The smallest server on imrelay's event-loop pieces: a TCP echo server you can telnet
//! into. Every byte (so every line) you type comes back.
//!
//! `cargo run --example echo` (listens on 127.0.0.1:7800; or `-- 127.0.0.1:9000`), then
//! `telnet 127.0.0.1 7800`.
//!
//! The relay's driver (src/server/mod.rs) is this loop plus a sans-IO core in the middle.
//! The pieces it shares with the relay, and why each matters:
//! - [`read_into`]: reads straight into a `BytesMut`'s spare capacity, until WouldBlock,
//!   into one buffer reused for every connection.
//! - [`OutQueue`]: a connection's pending output as shared `Bytes`, written with one
//!   `write_vectored` per turn; a short write keeps the rest queued. ([`SpareTails`]
//!   keeps drained buffers of the queues' copied frames; this example copies none.)
//! - WRITABLE interest only while a connection has output the socket would not take.
//! - a `Slab` of connections whose keys are the mio tokens.

use std::io::{ErrorKind, IoSlice, Write};
use std::net::SocketAddr;

use bytes::BytesMut;
use imrelay::relay::{OutQueue, SpareTails};
use imrelay::server::io::{fd, read_into};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

const LISTENER: Token = Token(usize::MAX);
/// Stop reading a connection whose output is this far behind (the client is not reading).
const MAX_PENDING: usize = 1 << 20;

struct Conn {
    stream: TcpStream,
    out: OutQueue,
    /// WRITABLE is registered (the socket refused part of the output).
    write_blocked: bool,
    /// Reading stopped at MAX_PENDING with input left in the socket. Readiness is
    /// edge-triggered, so no new READABLE event will come for it: read again once the
    /// output drains.
    read_paused: bool,
}

fn main() -> std::io::Result<()> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:7800".to_string())
        .parse()
        .map_err(|e| std::io::Error::new(ErrorKind::InvalidInput, e))?;
    let mut poll = Poll::new()?;
    let mut listener = TcpListener::bind(addr)?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    println!("echo server listening on {}", listener.local_addr()?);

    let mut conns: Slab<Conn> = Slab::new();
    let mut spare = SpareTails::default();
    let mut events = Events::with_capacity(1024);
    let mut buf = BytesMut::with_capacity(64 * 1024);
    loop {
        poll.poll(&mut events, None)?;
        for event in events.iter() {
            if event.token() == LISTENER {
                accept_all(&poll, &listener, &mut conns)?;
                continue;
            }
            let key = event.token().0;
            let Some(conn) = conns.get_mut(key) else {
                continue;
            };
            let mut alive = true;
            let mut read = event.is_readable() || conn.read_paused;
            while alive {
                if read {
                    alive = read_and_echo(conn, &mut buf);
                }
                alive = alive && flush(&poll, key, conn, &mut spare)?;
                // Go on only if reading had paused and the output is below the cap again.
                read = conn.read_paused && conn.out.len_bytes() < MAX_PENDING;
                if !read {
                    break;
                }
            }
            if !alive {
                let mut conn = conns.remove(key);
                poll.registry().deregister(&mut conn.stream)?;
            }
        }
    }
}

fn accept_all(poll: &Poll, listener: &TcpListener, conns: &mut Slab<Conn>) -> std::io::Result<()> {
    loop {
        match listener.accept() {
            Ok((mut stream, peer)) => {
                let entry = conns.vacant_entry();
                poll.registry()
                    .register(&mut stream, Token(entry.key()), Interest::READABLE)?;
                println!("{peer} connected");
                entry.insert(Conn {
                    stream,
                    out: OutQueue::default(),
                    write_blocked: false,
                    read_paused: false,
                });
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

/// Reads until WouldBlock (or MAX_PENDING bytes wait to be written) and queues every byte
/// back. False when the peer is gone.
fn read_and_echo(conn: &mut Conn, buf: &mut BytesMut) -> bool {
    conn.read_paused = false;
    loop {
        if conn.out.len_bytes() >= MAX_PENDING {
            conn.read_paused = true;
            return true;
        }
        buf.reserve(16 * 1024);
        match read_into(fd(&conn.stream), buf) {
            Ok(0) => return false,
            // The echo: the bytes read become output as they are, no copy.
            Ok(_) => {
                conn.out.push(buf.split().freeze());
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
}

/// Writes what is queued; registers WRITABLE only while the socket is backed up.
fn flush(
    poll: &Poll,
    key: usize,
    conn: &mut Conn,
    spare: &mut SpareTails,
) -> std::io::Result<bool> {
    while !conn.out.is_empty() {
        let mut slices = [IoSlice::new(&[]); 64];
        let n = conn.out.chunks(&mut slices);
        match conn.stream.write_vectored(&slices[..n]) {
            Ok(0) => return Ok(false),
            Ok(written) => {
                conn.out.advance(spare, written);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return Ok(false),
        }
    }
    let blocked = !conn.out.is_empty();
    if blocked != conn.write_blocked {
        let interest = if blocked {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        poll.registry()
            .reregister(&mut conn.stream, Token(key), interest)?;
        conn.write_blocked = blocked;
    }
    Ok(true)
}
