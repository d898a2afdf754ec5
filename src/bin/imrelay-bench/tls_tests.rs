//! The bench's TLS client plumbing against an in-process rustls server: a fake relay that
//! answers the first frame (the LOGIN) with LOGIN_OK, then echoes every byte back.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ServerConfig, ServerConnection, StreamOwned, SupportedProtocolVersion};

use imrelay::proto::{Frame, MessageId, Opcode, UserId};

use crate::engine::{self, Conn, Job, Stream};
use crate::tls::{self, TempDir, TlsClient};
use crate::{logins, setup};

/// A TLS server for `localhost` with a fresh self-signed certificate, and a client that
/// trusts it.
fn identity(versions: &[&'static SupportedProtocolVersion]) -> (Arc<ServerConfig>, TlsClient) {
    let dir = TempDir::new("test").unwrap();
    let made = tls::self_signed(&dir, "localhost").unwrap();
    let certs = CertificateDer::pem_file_iter(&made.cert)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(&made.key).unwrap();
    let config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(versions)
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
    (Arc::new(config), made.client)
}

/// Serves one connection: LOGIN_OK for the LOGIN, then an echo until the client leaves.
fn serve(config: Arc<ServerConfig>, sock: TcpStream, echo: bool) {
    let conn = ServerConnection::new(config).unwrap();
    let mut s = StreamOwned::new(conn, sock);
    let mut len = [0u8; 4];
    if s.read_exact(&mut len).is_err() {
        return;
    }
    let mut rest = vec![0u8; u32::from_be_bytes(len) as usize - 4];
    s.read_exact(&mut rest).unwrap();
    assert_eq!(rest[1], Opcode::Login as u8, "the first frame is a LOGIN");
    let user = u64::from_be_bytes(rest[12..20].try_into().unwrap());
    let ok = Frame::new(Opcode::LoginOk, MessageId(1), UserId(user), Bytes::new());
    s.write_all(&ok.to_bytes()).unwrap();
    if !echo {
        return;
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

/// A fake relay on a free loopback port, a thread per connection.
fn fake_relay(config: Arc<ServerConfig>, echo: bool) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for sock in listener.incoming() {
            let config = config.clone();
            std::thread::spawn(move || serve(config, sock.unwrap(), echo));
        }
    });
    addr
}

/// Logs in over TLS with the setup path, then has the engine send `messages` frames of
/// `size` bytes through the echo and receive them back in order.
fn engine_round_trip(versions: &[&'static SupportedProtocolVersion], size: usize, window: usize) {
    let (config, client) = identity(versions);
    let addr = fake_relay(config, true);
    let socks = setup::login_all_with(addr, &[7], 1, Some(&client)).unwrap();
    let messages = 2_000;
    let mut job = Job::new(messages, window, size);
    for sock in socks {
        job.conns.push(Conn::from_sock(sock));
    }
    let header = setup::header_for(Opcode::Send, 7, false).to_bytes();
    job.streams.push(Stream::new(vec![0], &header, 1, window));
    job.send(0, 0);
    job.receive(0, 0);
    let epoch = Instant::now();
    let out = engine::run(
        job,
        epoch,
        epoch + Duration::from_secs(60),
        false,
        Arc::new(AtomicU64::new(0)),
    );
    assert!(out.finished, "received {} of {messages}", out.received);
    assert_eq!(out.received, messages);
    assert_eq!((out.duplicated, out.reordered, out.errors), (0, 0, 0));
}

#[test]
fn engine_over_tls13_small_frames() {
    engine_round_trip(&[&rustls::version::TLS13], 64, 64);
}

#[test]
fn engine_over_tls12_small_frames() {
    engine_round_trip(&[&rustls::version::TLS12], 64, 64);
}

/// Frames over a TLS record each (16 KiB) and megabytes in flight: partial records, frames
/// split across records and reads, rustls's send buffer full.
#[test]
fn engine_over_tls_large_frames() {
    engine_round_trip(&[&rustls::version::TLS13], 40_000, 32);
}

/// The nonblocking login path: handshake, LOGIN behind it, LOGIN_OK, close.
#[test]
fn logins_over_tls() {
    let (config, client) = identity(&[&rustls::version::TLS13, &rustls::version::TLS12]);
    let addr = fake_relay(config, false);
    let out = logins::run_against(addr, Some(client), 50, 8);
    assert_eq!(out.ok, 50, "failures: {:?}", out.failures);
    assert_eq!(out.handshake.len(), 50);
    assert!(out.handshake.max() <= out.latency.max());
}

/// A client that does not trust the relay's certificate fails every handshake.
#[test]
fn logins_untrusted_certificate_fails() {
    let (config, _) = identity(&[&rustls::version::TLS13]);
    let (_, stranger) = identity(&[&rustls::version::TLS13]);
    let addr = fake_relay(config, false);
    let out = logins::run_against(addr, Some(stranger), 5, 5);
    assert_eq!(out.ok, 0);
    assert_eq!(out.failures.values().sum::<u64>(), 5, "{:?}", out.failures);
    assert!(
        out.failures
            .keys()
            .all(|why| why.starts_with("TLS: invalid peer certificate")),
        "{:?}",
        out.failures
    );
}
