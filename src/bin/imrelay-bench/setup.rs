//! Building a workload's sockets before the clock starts: logging users in and joining
//! rooms through a relay, or making plain loopback socket pairs for the floor.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use socket2::{Domain, Socket, Type};

use bytes::{Bytes, BytesMut};
use imrelay::proto::decode::decode_frame;
use imrelay::proto::{ErrorCode, Frame, MessageId, Opcode, RoomId, UserId};

use crate::tls::{self, Sock, TlsClient};

/// Connects `users.len()` sockets to the relay and logs each in as its user, pipelined.
pub fn login_all(addr: SocketAddr, users: &[u64]) -> Result<Vec<TcpStream>, String> {
    login_all_from(addr, users, 1)
}

/// Like [`login_all`], spreading the client sockets over the source addresses 127.0.0.1 ..
/// 127.0.0.`sources`, so more connections than one address has ephemeral ports fit.
pub fn login_all_from(
    addr: SocketAddr,
    users: &[u64],
    sources: usize,
) -> Result<Vec<TcpStream>, String> {
    Ok(login_all_with(addr, users, sources, None)?
        .into_iter()
        .map(|s| match s {
            Sock::Plain(s) => s,
            Sock::Tls(_) => unreachable!("no TLS asked for"),
        })
        .collect())
}

/// Like [`login_all_from`], over TLS when `tls` is given: every socket's ClientHello (with
/// its LOGIN queued behind the handshake) goes out before any answer is waited for.
pub fn login_all_with(
    addr: SocketAddr,
    users: &[u64],
    sources: usize,
    tls: Option<&TlsClient>,
) -> Result<Vec<Sock>, String> {
    let logins: Vec<Frame> = users
        .iter()
        .map(|&user| Frame::login(MessageId(1), UserId(user), b""))
        .collect();
    login_frames(addr, &logins, sources, tls)
}

/// [`login_all_with`] with `devices` connections per user, each logged in as its own
/// device (`d0`, `d1`, …; protocol.md, section 15.1), in the order user by user.
pub fn login_devices(
    addr: SocketAddr,
    users: &[u64],
    devices: usize,
    tls: Option<&TlsClient>,
) -> Result<Vec<Sock>, String> {
    let logins: Vec<Frame> = users
        .iter()
        .flat_map(|&user| {
            (0..devices).map(move |d| {
                Frame::login_device(MessageId(1), UserId(user), &format!("d{d}"), b"")
            })
        })
        .collect();
    login_frames(addr, &logins, 1, tls)
}

/// Connects once per LOGIN frame (from `sources` loopback addresses in turn), sends it, and
/// waits for every LOGIN_OK.
fn login_frames(
    addr: SocketAddr,
    logins: &[Frame],
    sources: usize,
    tls: Option<&TlsClient>,
) -> Result<Vec<Sock>, String> {
    let mut socks = Vec::with_capacity(logins.len());
    for (i, frame) in logins.iter().enumerate() {
        let source = Ipv4Addr::new(127, 0, 0, (1 + i % sources.clamp(1, 254)) as u8);
        let mut s = connect_from(source, addr)?;
        s.set_nodelay(true).map_err(|e| e.to_string())?;
        let login = frame.to_bytes();
        socks.push(match tls {
            None => {
                s.write_all(&login).map_err(|e| e.to_string())?;
                Sock::Plain(s)
            }
            Some(tls) => tls::start(tls, s, &login)?,
        });
    }
    for s in &mut socks {
        expect(s, Opcode::LoginOk)?;
    }
    Ok(socks)
}

/// A TCP connection to `addr` from `source` (any free port).
pub fn connect_from(source: Ipv4Addr, addr: SocketAddr) -> Result<TcpStream, String> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).map_err(|e| e.to_string())?;
    let from: SocketAddr = (source, 0).into();
    socket
        .bind(&from.into())
        .map_err(|e| format!("bind {source}: {e}"))?;
    socket
        .connect(&addr.into())
        .map_err(|e| format!("connect {addr} from {source}: {e}"))?;
    Ok(socket.into())
}

/// Starts stored delivery on every socket (INBOX_SYNC, pipelined) and waits for the
/// INBOX_STATE answers.
pub fn sync_all<S: Read + Write>(socks: &mut [S]) -> Result<(), String> {
    let sync = Frame::inbox_sync(MessageId(3), 0, 0).to_bytes();
    for s in socks.iter_mut() {
        s.write_all(&sync).map_err(|e| e.to_string())?;
    }
    for s in socks.iter_mut() {
        expect(s, Opcode::InboxState)?;
    }
    Ok(())
}

/// Makes every socket JOIN `room` (pipelined) and waits for the answers.
pub fn join_all<S: Read + Write>(socks: &mut [S], room: u64) -> Result<(), String> {
    let join = Frame::join(MessageId(2), RoomId(room)).to_bytes();
    for s in socks.iter_mut() {
        s.write_all(&join).map_err(|e| e.to_string())?;
    }
    for s in socks.iter_mut() {
        expect(s, Opcode::RoomState)?;
    }
    Ok(())
}

/// Reads one frame (byte by byte up to its length) and checks its opcode.
pub fn expect(s: &mut impl Read, opcode: Opcode) -> Result<Frame, String> {
    let frame = read_frame(s)?;
    if frame.opcode != opcode {
        let why = frame.error().map(|(_, r)| r).unwrap_or_default();
        return Err(format!("expected {opcode:?}, got {:?} {why}", frame.opcode));
    }
    Ok(frame)
}

/// Waits until the cluster of `nodes` carries messages between every two neighbouring
/// nodes (and, as each node subscribes in order, to every user and room logged in or
/// joined on it before this call): logs in `probe_users[i]` on node `i`, then has node
/// `i + 1` SEND (with ACK) to it until the answer is an ACK rather than RECIPIENT_OFFLINE
/// or CLUSTER_UNAVAILABLE (a subscription not yet at Redis, a link not yet up). Returns
/// the probes sent.
pub fn cluster_settle(
    nodes: &[SocketAddr],
    probe_users: &[u64],
    tls: Option<&TlsClient>,
    timeout: Duration,
) -> Result<u64, String> {
    let mut socks = Vec::with_capacity(nodes.len());
    for (&node, &user) in nodes.iter().zip(probe_users) {
        socks.extend(login_all_with(node, &[user], 1, tls)?);
    }
    let deadline = Instant::now() + timeout;
    let mut id = 100;
    let n = nodes.len();
    for j in 0..n {
        let from = (j + 1) % n;
        loop {
            id += 1;
            let probe = Frame::send(MessageId(id), UserId(probe_users[j]), Bytes::new());
            socks[from]
                .write_all(&probe.to_bytes())
                .map_err(|e| e.to_string())?;
            // Its answer, past any probe DELIVERed to this user meanwhile.
            let answer = loop {
                let frame = read_frame(&mut socks[from])?;
                if frame.msg_id == MessageId(id) && frame.opcode != Opcode::Deliver {
                    break frame;
                }
            };
            match answer.error_code() {
                None if answer.opcode == Opcode::Ack => break,
                Some(ErrorCode::RecipientOffline | ErrorCode::ClusterUnavailable)
                    if Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(5));
                }
                _ => {
                    return Err(format!(
                        "the cluster did not settle: a probe from node {} to node {} got {:?} {}",
                        nodes[from],
                        nodes[j],
                        answer.opcode,
                        answer.error().map(|(_, r)| r).unwrap_or_default()
                    ))
                }
            }
        }
    }
    Ok(id - 100)
}

/// Reads one frame (byte by byte up to its length).
pub fn read_frame(s: &mut impl Read) -> Result<Frame, String> {
    let mut header = [0u8; 4];
    s.read_exact(&mut header)
        .map_err(|e| format!("relay closed: {e}"))?;
    let len = u32::from_be_bytes(header) as usize;
    let mut rest = vec![0u8; len.saturating_sub(4)];
    s.read_exact(&mut rest).map_err(|e| e.to_string())?;
    let mut buf = BytesMut::from(&header[..]);
    buf.extend_from_slice(&rest);
    let frame = decode_frame(&mut buf, u32::MAX)
        .map_err(|e| e.to_string())?
        .ok_or("short frame")?
        .map_err(|op| format!("unknown opcode {op}"))?;
    Ok(frame)
}

/// `n` pairs of connected loopback sockets.
pub fn socket_pairs(n: usize) -> Result<Vec<(TcpStream, TcpStream)>, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let mut pairs = Vec::with_capacity(n);
    for _ in 0..n {
        let a = TcpStream::connect(addr).map_err(|e| e.to_string())?;
        let (b, _) = listener.accept().map_err(|e| e.to_string())?;
        a.set_nodelay(true).map_err(|e| e.to_string())?;
        b.set_nodelay(true).map_err(|e| e.to_string())?;
        pairs.push((a, b));
    }
    Ok(pairs)
}

/// A frame header prototype for one stream's messages: SEND to a user or ROOM_SEND to a
/// room, with NO_ACK unless ACKs are wanted. Payloads are appended per message.
pub fn header_for(opcode: Opcode, target: u64, acks: bool) -> Frame {
    let frame = Frame::new(opcode, MessageId(0), UserId(target), Bytes::new());
    if acks {
        frame
    } else {
        frame.with_flags(imrelay::proto::Flags::NO_ACK)
    }
}
