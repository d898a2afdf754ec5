//! A rustls client drives [`TlsSession`] entirely in memory.

use std::sync::OnceLock;

use proptest::prelude::*;
use rustls::pki_types::ServerName;
use rustls::version::{TLS12, TLS13};
use rustls::{ClientConfig, ClientConnection, RootCertStore, SupportedProtocolVersion};

use super::*;

/// A self-signed certificate for `localhost` (ECDSA P-256, key as PKCS#8), made once.
struct Identity {
    cert_pem: String,
    key_pem: String,
    cert_der: CertificateDer<'static>,
    key_der: Vec<u8>,
}

fn identity() -> &'static Identity {
    static IDENTITY: OnceLock<Identity> = OnceLock::new();
    IDENTITY.get_or_init(new_identity)
}

fn new_identity() -> Identity {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    Identity {
        cert_pem: made.cert.pem(),
        key_pem: made.signing_key.serialize_pem(),
        cert_der: made.cert.der().clone(),
        key_der: made.signing_key.serialize_der(),
    }
}

fn test_server_config() -> Arc<ServerConfig> {
    static CONFIG: OnceLock<Arc<ServerConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let id = identity();
            let key = PrivateKeyDer::Pkcs8(id.key_der.clone().into());
            server_config(vec![id.cert_der.clone()], key).unwrap()
        })
        .clone()
}

const BOTH: &[&SupportedProtocolVersion] = &[&TLS13, &TLS12];

fn client_config(
    versions: &[&'static SupportedProtocolVersion],
    trusted: &[CertificateDer<'static>],
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in trusted {
        roots.add(cert.clone()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

fn new_client(config: Arc<ClientConfig>) -> ClientConnection {
    ClientConnection::new(config, ServerName::try_from("localhost").unwrap()).unwrap()
}

/// A client and a server session, and the plaintext each has received.
struct Pair {
    client: ClientConnection,
    server: TlsSession,
    /// Plaintext the server received.
    at_server: BytesMut,
    /// Plaintext the client received.
    at_client: Vec<u8>,
}

impl Pair {
    fn new(versions: &[&'static SupportedProtocolVersion]) -> Pair {
        Pair::with(
            test_server_config(),
            client_config(versions, std::slice::from_ref(&identity().cert_der)),
        )
    }

    fn with(server: Arc<ServerConfig>, client: Arc<ClientConfig>) -> Pair {
        Pair {
            client: new_client(client),
            server: TlsSession::new(server).unwrap(),
            at_server: BytesMut::new(),
            at_client: Vec::new(),
        }
    }

    /// Everything the client has to send, fed to the server in pieces of `step` bytes.
    /// Returns how many bytes went over.
    fn client_to_server(&mut self, step: usize) -> Result<usize, TlsError> {
        let wire = client_output(&mut self.client);
        for piece in wire.chunks(step) {
            let before = self.at_server.len();
            let n = self.server.receive(piece, &mut self.at_server)?;
            assert_eq!(
                self.at_server.len() - before,
                n,
                "receive reports what it appended"
            );
        }
        Ok(wire.len())
    }

    /// Everything the server has to send, fed to the client. Returns how many bytes.
    fn server_to_client(&mut self) -> Result<usize, rustls::Error> {
        let pending = self.server.pending_ciphertext_len();
        let mut wire = Vec::new();
        let n = self.server.take_ciphertext(&mut wire);
        assert_eq!(n, wire.len());
        if self.server.error().is_none() {
            assert_eq!(n, pending, "pending_ciphertext_len is exact");
        }
        assert!(!self.server.wants_write());
        feed_client(&mut self.client, &wire, &mut self.at_client)?;
        Ok(n)
    }

    /// Runs the handshake with the client's flights fed `step` bytes at a time.
    fn handshake(&mut self, step: usize) {
        for _ in 0..10 {
            let moved = self.client_to_server(step).unwrap() + self.server_to_client().unwrap();
            if moved == 0 && !self.client.is_handshaking() && !self.server.is_handshaking() {
                return;
            }
        }
        panic!("handshake did not finish: {:?}", self.server);
    }
}

fn client_output(client: &mut ClientConnection) -> Vec<u8> {
    let mut wire = Vec::new();
    while client.wants_write() {
        client.write_tls(&mut wire).unwrap();
    }
    wire
}

/// Feeds `wire` to the client and appends the plaintext it yields to `plain`.
fn feed_client(
    client: &mut ClientConnection,
    mut wire: &[u8],
    plain: &mut Vec<u8>,
) -> Result<(), rustls::Error> {
    while !wire.is_empty() {
        if client.read_tls(&mut wire).unwrap() == 0 {
            break;
        }
        let state = client.process_new_packets()?;
        let n = state.plaintext_bytes_to_read();
        let at = plain.len();
        plain.resize(at + n, 0);
        client.reader().read_exact(&mut plain[at..]).unwrap();
    }
    Ok(())
}

/// `len` bytes that are not all alike (so a misplaced slice shows).
fn pattern(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_u32;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

// ---- handshake and data -------------------------------------------------------------------

#[test]
fn handshake_completes_with_tls13_and_tls12() {
    for (versions, expect) in [
        (&[&TLS13][..], rustls::ProtocolVersion::TLSv1_3),
        (&[&TLS12][..], rustls::ProtocolVersion::TLSv1_2),
        (BOTH, rustls::ProtocolVersion::TLSv1_3),
    ] {
        let mut pair = Pair::new(versions);
        assert!(pair.server.is_handshaking());
        pair.handshake(usize::MAX);
        assert!(!pair.server.is_handshaking());
        assert_eq!(pair.server.protocol_version(), Some(expect));
        assert_eq!(pair.client.protocol_version(), Some(expect));
        assert_eq!(pair.server.server_name(), Some("localhost"));
        assert_eq!(pair.server.held(), 0);
        assert!(pair.at_server.is_empty() && pair.at_client.is_empty());
    }
}

#[test]
fn application_data_goes_both_ways() {
    for versions in [&[&TLS13][..], &[&TLS12][..]] {
        let mut pair = Pair::new(versions);
        pair.handshake(usize::MAX);
        pair.client.writer().write_all(b"HELLO alice\n").unwrap();
        pair.client_to_server(usize::MAX).unwrap();
        assert_eq!(&pair.at_server[..], b"HELLO alice\n");

        assert_eq!(pair.server.send(b"OK\n").unwrap(), 3);
        assert!(pair.server.wants_write());
        pair.server_to_client().unwrap();
        assert_eq!(pair.at_client, b"OK\n");

        // Several slices go out in order (and share records).
        let parts = [&b"one "[..], b"two ", b"three"];
        let slices: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
        assert_eq!(pair.server.send_vectored(&slices).unwrap(), 13);
        pair.server_to_client().unwrap();
        assert_eq!(pair.at_client, b"OK\none two three");
    }
}

#[test]
fn input_split_one_byte_at_a_time() {
    for versions in [&[&TLS13][..], &[&TLS12][..]] {
        let mut pair = Pair::new(versions);
        pair.handshake(1);
        let data = pattern(40_000);
        pair.client.writer().write_all(&data).unwrap();
        pair.client_to_server(1).unwrap();
        assert_eq!(&pair.at_server[..], &data[..]);
        pair.server.send(b"pong").unwrap();
        pair.server_to_client().unwrap();
        assert_eq!(pair.at_client, b"pong");
    }
}

#[test]
fn a_megabyte_each_way_with_outgoing_ciphertext_bounded() {
    const MIB: usize = 1 << 20;
    for versions in [&[&TLS13][..], &[&TLS12][..]] {
        let mut pair = Pair::new(versions);
        pair.handshake(usize::MAX);
        let data = pattern(MIB);

        pair.client.set_buffer_limit(None);
        pair.client.writer().write_all(&data).unwrap();
        // In socket-read-sized pieces, as the driver hands them over.
        pair.client_to_server(16 * 1024).unwrap();
        assert_eq!(pair.at_server.len(), MIB);
        assert!(pair.at_server[..] == data[..]);

        let mut sent = 0;
        let mut short_sends = 0;
        while sent < MIB {
            let n = pair.server.send(&data[sent..]).unwrap();
            if n < MIB - sent {
                short_sends += 1;
            }
            sent += n;
            // SEND_LIMIT, plus what records of the last send add on top.
            let overhead = (SEND_LIMIT / (16 * 1024) + 1) * 64;
            assert!(
                pair.server.held() <= SEND_LIMIT + overhead,
                "{:?}",
                pair.server
            );
            // Nothing more is taken until the pending ciphertext is written.
            if pair.server.held() >= SEND_LIMIT {
                assert_eq!(pair.server.send(&data[sent..]).unwrap(), 0);
            }
            pair.server_to_client().unwrap();
        }
        assert!(short_sends >= MIB / SEND_LIMIT - 1, "the limit applied");
        assert_eq!(pair.at_client.len(), MIB);
        assert!(pair.at_client == data);
    }
}

#[test]
fn plaintext_sent_during_the_handshake_goes_out_after_it() {
    let mut pair = Pair::new(BOTH);
    assert_eq!(pair.server.send(b"early").unwrap(), 5);
    assert_eq!(pair.server.held(), 5);
    // Held under the same limit as ciphertext.
    let big = pattern(2 * SEND_LIMIT);
    let n = pair.server.send(&big).unwrap();
    assert_eq!(n, SEND_LIMIT - 5);
    assert_eq!(pair.server.send(b"more").unwrap(), 0);
    assert_eq!(pair.server.held(), SEND_LIMIT);
    pair.handshake(usize::MAX);
    assert_eq!(&pair.at_client[..5], b"early");
    assert_eq!(pair.at_client[5..], big[..n]);
    assert_eq!(pair.server.held(), 0);
}

/// Sent after the server's flight but before the client's Finished: held as plaintext
/// (rustls sends no TLS 1.3 "half-RTT" data by default), counted exactly, sent after.
#[test]
fn data_sent_mid_handshake_is_held_then_sent() {
    for versions in [&[&TLS13][..], &[&TLS12][..]] {
        let mut pair = Pair::new(versions);
        pair.client_to_server(usize::MAX).unwrap();
        assert!(pair.server.is_handshaking());
        let flight = pair.server.pending_ciphertext_len();
        assert!(flight > 0);
        assert_eq!(pair.server.send(b"mid").unwrap(), 3);
        assert_eq!(pair.server.pending_ciphertext_len(), flight);
        assert_eq!(pair.server.held(), flight + 3);
        pair.handshake(usize::MAX);
        assert_eq!(pair.at_client, b"mid");
        assert_eq!(pair.server.held(), 0);
    }
}

#[test]
fn write_to_writes_what_is_pending() {
    let mut pair = Pair::new(BOTH);
    pair.client_to_server(usize::MAX).unwrap();
    let pending = pair.server.pending_ciphertext_len();
    assert!(pending > 0, "the server flight is pending");
    // A writer that takes 100 bytes at a time, like a nearly full socket.
    struct Trickle(Vec<u8>);
    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let n = buf.len().min(100);
            self.0.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let mut socket = Trickle(Vec::new());
    let n = pair.server.write_to(&mut socket).unwrap();
    assert_eq!(n, 100);
    assert_eq!(pair.server.pending_ciphertext_len(), pending - 100);
    while pair.server.wants_write() {
        pair.server.write_to(&mut socket).unwrap();
    }
    assert_eq!(socket.0.len(), pending);
    assert_eq!(pair.server.pending_ciphertext_len(), 0);
    assert_eq!(pair.server.write_to(&mut socket).unwrap(), 0);
    let mut ignored = Vec::new();
    feed_client(&mut pair.client, &socket.0, &mut ignored).unwrap();
    pair.handshake(usize::MAX);
}

// ---- closing -------------------------------------------------------------------------------

#[test]
fn close_notify_is_seen_both_ways() {
    let mut pair = Pair::new(BOTH);
    pair.handshake(usize::MAX);
    pair.client.writer().write_all(b"bye").unwrap();
    pair.client.send_close_notify();
    let mut wire = client_output(&mut pair.client);
    // Whatever follows the close_notify is ignored.
    wire.extend_from_slice(b"\x17\x03\x03\x00\x05junk!");
    let n = pair.server.receive(&wire, &mut pair.at_server).unwrap();
    assert_eq!(n, 3);
    assert_eq!(&pair.at_server[..], b"bye");
    assert!(pair.server.peer_closed());
    assert_eq!(
        pair.server.receive(b"more", &mut pair.at_server).unwrap(),
        0
    );

    // The server may still send (TLS allows a half-close), then closes.
    pair.server.send(b"last").unwrap();
    pair.server.close_notify();
    pair.server.close_notify();
    assert!(matches!(pair.server.send(b"x"), Err(TlsError::Closed)));
    let mut wire = Vec::new();
    pair.server.take_ciphertext(&mut wire);
    let mut plain = Vec::new();
    let mut rest = &wire[..];
    let mut closed = false;
    while !rest.is_empty() {
        if pair.client.read_tls(&mut rest).unwrap() == 0 {
            break;
        }
        let state = pair.client.process_new_packets().unwrap();
        let at = plain.len();
        plain.resize(at + state.plaintext_bytes_to_read(), 0);
        pair.client.reader().read_exact(&mut plain[at..]).unwrap();
        closed |= state.peer_has_closed();
    }
    assert_eq!(plain, b"last");
    assert!(closed, "the client saw the server's close_notify");
}

// ---- hostile and confused peers ---------------------------------------------------------

#[test]
fn garbage_after_the_handshake_is_an_error() {
    for versions in [&[&TLS13][..], &[&TLS12][..]] {
        // An application-data record whose contents are not from this session.
        let mut forged = b"\x17\x03\x03\x00\x20".to_vec();
        forged.extend_from_slice(&[0x5a; 32]);
        for (garbage, reason) in [(&forged[..], "decrypt failed"), (b"PING\n", "not TLS")] {
            let mut pair = Pair::new(versions);
            pair.handshake(usize::MAX);
            let err = pair
                .server
                .receive(garbage, &mut pair.at_server)
                .unwrap_err();
            assert!(matches!(err, TlsError::PeerSentGarbage(_)), "{err:?}");
            assert_eq!(err.reason(), reason, "{err}");
            assert!(err.rustls_error().is_some());
            // The session stays failed.
            assert!(pair.server.receive(b"x", &mut pair.at_server).is_err());
            assert!(pair.server.send(b"x").is_err());
            assert!(pair.server.error().is_some());
            // It queued an alert, which the client takes as the end.
            assert!(pair.server.wants_write());
            assert!(pair.server.pending_ciphertext_len() > 0);
            let client_err = pair.server_to_client().unwrap_err();
            assert!(
                matches!(client_err, rustls::Error::AlertReceived(_)),
                "{client_err:?}"
            );
            assert!(pair.at_server.is_empty());
        }
    }
}

#[test]
fn a_non_tls_stream_is_an_error_not_a_panic() {
    let inputs: [&[u8]; 6] = [
        b"PING\n",
        b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
        b"\0\0\0\x05hello",
        // A handshake record too large to be one.
        b"\x16\x03\x01\xff\xff",
        // A handshake record holding no ClientHello.
        b"\x16\x03\x01\x00\x04\x02\x00\x00\x00",
        // Not even a whole record header, then garbage.
        b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\xff\xff\xff\xff",
    ];
    for input in inputs {
        for step in [1, usize::MAX] {
            let mut session = TlsSession::new(test_server_config()).unwrap();
            let mut plain = BytesMut::new();
            let mut result = Ok(0);
            for piece in input.chunks(step) {
                result = session.receive(piece, &mut plain);
                if result.is_err() {
                    break;
                }
            }
            let err = result.unwrap_err();
            assert!(matches!(err, TlsError::Handshake(_)), "{input:?}: {err:?}");
            assert!(plain.is_empty());
            assert!(session.is_handshaking());
        }
    }
    let err = TlsSession::new(test_server_config())
        .unwrap()
        .receive(b"PING\n", &mut BytesMut::new())
        .unwrap_err();
    assert_eq!(err.reason(), "not TLS");
    assert!(err.to_string().contains("not TLS"), "{err}");
}

#[test]
fn a_client_that_rejects_the_certificate_is_a_handshake_error() {
    let mut pair = Pair::with(test_server_config(), client_config(BOTH, &[]));
    pair.client_to_server(usize::MAX).unwrap();
    assert!(
        pair.server_to_client().is_err(),
        "the client trusts nothing"
    );
    let err = pair.client_to_server(usize::MAX).unwrap_err();
    assert!(matches!(err, TlsError::Handshake(_)), "{err:?}");
    assert_eq!(err.reason(), "client rejected the certificate");
}

/// A handshake message fragmented over endless records is refused before rustls holds
/// more than [`MAX_HANDSHAKE_HELD`].
#[test]
fn an_endless_handshake_message_is_refused_within_the_bound() {
    for declared in [0x00ff_fff0_u32, 0xfff0] {
        let mut session = TlsSession::new(test_server_config()).unwrap();
        let mut plain = BytesMut::new();
        let mut body = vec![0x01]; // ClientHello
        body.extend_from_slice(&declared.to_be_bytes()[1..]);
        body.resize(16 * 1024, 0x03);
        let mut fed = 0;
        let err = loop {
            let mut record = vec![0x16, 0x03, 0x01];
            record.extend_from_slice(&(body.len() as u16).to_be_bytes());
            record.extend_from_slice(&body);
            fed += record.len();
            if let Err(e) = session.receive(&record, &mut plain) {
                break e;
            }
            assert!(
                fed <= MAX_HANDSHAKE_HELD + 2 * MAX_RECORD_WIRE,
                "still taking input"
            );
            body.fill(0x03);
        };
        // Declared over 64 KiB: refused from its header. Under it, but spread over records
        // whose headers take rustls's buffer past 64 KiB: refused when the buffer fills.
        assert!(
            matches!(err, TlsError::Handshake(_) | TlsError::BufferFull),
            "{declared:#x}: {err:?}"
        );
        if declared > 0xffff {
            assert!(matches!(err, TlsError::Handshake(_)), "{err:?}");
        }
    }
}

/// An incomplete record of the largest size is held; a header declaring one byte more is
/// refused at once.
#[test]
fn records_over_the_size_limit_are_refused() {
    let mut pair = Pair::new(BOTH);
    pair.handshake(usize::MAX);
    let largest = MAX_RECORD_WIRE - 1;
    let mut record = vec![0x17, 0x03, 0x03];
    record.extend_from_slice(&((largest - 5) as u16).to_be_bytes());
    record.extend_from_slice(&pattern(largest - 6));
    assert_eq!(
        pair.server.receive(&record, &mut pair.at_server).unwrap(),
        0
    );

    let mut pair = Pair::new(BOTH);
    pair.handshake(usize::MAX);
    let mut header = vec![0x17, 0x03, 0x03];
    header.extend_from_slice(&((largest - 4) as u16).to_be_bytes());
    let err = pair
        .server
        .receive(&header, &mut pair.at_server)
        .unwrap_err();
    assert!(matches!(err, TlsError::PeerSentGarbage(_)), "{err:?}");
}

#[test]
fn looks_like_tls_only_for_a_handshake_record() {
    assert!(looks_like_tls(0x16));
    let mut pair = Pair::new(BOTH);
    let hello = client_output(&mut pair.client);
    assert!(looks_like_tls(hello[0]));
    for byte in [0x00, b'G', b'H', b'P', b'\n', 0x17, 0x15, 0x80, 0xff] {
        assert!(!looks_like_tls(byte), "{byte:#x}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// However the client's bytes are cut, the server yields the same plaintext.
    #[test]
    fn any_split_of_a_session_yields_the_same_plaintext(
        cuts in proptest::collection::vec(1usize..600, 1..40),
        tls12 in any::<bool>(),
    ) {
        let versions: &[&'static SupportedProtocolVersion] =
            if tls12 { &[&TLS12] } else { &[&TLS13] };
        let mut pair = Pair::new(versions);
        // Written at once: the client sends it as soon as its handshake allows.
        let data = pattern(5000);
        pair.client.writer().write_all(&data).unwrap();
        let mut cut = cuts.iter().cycle();
        for _ in 0..4 {
            let wire = client_output(&mut pair.client);
            let mut rest = &wire[..];
            while !rest.is_empty() {
                let (piece, tail) = rest.split_at((*cut.next().unwrap()).min(rest.len()));
                pair.server.receive(piece, &mut pair.at_server).unwrap();
                rest = tail;
            }
            pair.server_to_client().unwrap();
        }
        prop_assert!(!pair.server.is_handshaking());
        prop_assert_eq!(&pair.at_server[..], &data[..]);
    }

    /// Arbitrary bytes, cut anywhere, give an error or nothing; never a panic, and never
    /// plaintext.
    #[test]
    fn arbitrary_input_never_panics(
        bytes in proptest::collection::vec(any::<u8>(), 0..3000),
        step in 1usize..300,
        start_as_tls in any::<bool>(),
    ) {
        let mut session = TlsSession::new(test_server_config()).unwrap();
        let mut plain = BytesMut::new();
        let mut input = if start_as_tls { vec![0x16, 0x03, 0x01] } else { Vec::new() };
        input.extend_from_slice(&bytes);
        for piece in input.chunks(step) {
            if session.receive(piece, &mut plain).is_err() {
                prop_assert!(session.receive(b"\x16", &mut plain).is_err());
                break;
            }
        }
        prop_assert!(plain.is_empty());
        let mut out = Vec::new();
        session.take_ciphertext(&mut out);
        prop_assert!(out.len() <= 16 * 1024);
    }
}

// ---- loading the certificate and key ----------------------------------------------------

/// A fresh directory under the system's temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("imrelay-tls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn file(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn load_server_config_reads_pem_files() {
    let dir = TempDir::new("load");
    let id = identity();
    let cert = dir.file("cert.pem", &id.cert_pem);
    let key = dir.file("key.pem", &id.key_pem);
    let config = load_server_config(&cert, &key).unwrap();
    // The loaded config serves a handshake the client trusts.
    let mut pair = Pair::with(
        config,
        client_config(BOTH, std::slice::from_ref(&id.cert_der)),
    );
    pair.handshake(usize::MAX);

    // Key and chain in one file, in either order, with other text around.
    let both = dir.file(
        "both.pem",
        &format!("key first\n{}\nthen the chain\n{}", id.key_pem, id.cert_pem),
    );
    load_server_config(&both, &both).unwrap();
}

#[test]
fn load_server_config_takes_pkcs1_and_sec1_keys() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tls");
    for name in ["rsa-pkcs1", "ec-sec1"] {
        let cert = data.join(format!("{name}.crt"));
        let config = load_server_config(&cert, &data.join(format!("{name}.key")))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let der = CertificateDer::from_pem_file(&cert).unwrap();
        for versions in [&[&TLS13][..], &[&TLS12][..]] {
            let mut pair = Pair::with(
                config.clone(),
                client_config(versions, std::slice::from_ref(&der)),
            );
            pair.handshake(usize::MAX);
        }
    }
}

#[test]
fn load_server_config_refuses_bad_files_with_the_right_error() {
    let dir = TempDir::new("refuse");
    let id = identity();
    let cert = dir.file("cert.pem", &id.cert_pem);
    let key = dir.file("key.pem", &id.key_pem);
    let missing = dir.0.join("missing.pem");
    let text = dir.file("text.pem", "this is not PEM at all\n");
    let garbled = dir.file(
        "garbled.pem",
        "-----BEGIN CERTIFICATE-----\n!!not base64!!\n-----END CERTIFICATE-----\n",
    );
    let unterminated = dir.file(
        "unterminated.pem",
        &id.key_pem.replace("-----END PRIVATE KEY-----", ""),
    );
    let other = new_identity();
    let other_key = dir.file("other.pem", &other.key_pem);
    let bad_der_key = dir.file(
        "bad-der.pem",
        "-----BEGIN PRIVATE KEY-----\nAAECAwQFBgcICQ==\n-----END PRIVATE KEY-----\n",
    );

    match load_server_config(&missing, &key) {
        Err(TlsConfigError::Read { path, source }) => {
            assert_eq!(path, missing);
            assert_eq!(source.kind(), io::ErrorKind::NotFound);
        }
        other => panic!("{other:?}"),
    }
    match load_server_config(&cert, &missing) {
        Err(TlsConfigError::Read { path, .. }) => assert_eq!(path, missing),
        other => panic!("{other:?}"),
    }
    match load_server_config(&text, &key) {
        Err(TlsConfigError::NoCertificate { path }) => assert_eq!(path, text),
        other => panic!("{other:?}"),
    }
    // A key where the chain should be: no certificate in it.
    assert!(matches!(
        load_server_config(&key, &key),
        Err(TlsConfigError::NoCertificate { .. })
    ));
    match load_server_config(&garbled, &key) {
        Err(TlsConfigError::Pem { path, .. }) => assert_eq!(path, garbled),
        other => panic!("{other:?}"),
    }
    match load_server_config(&cert, &cert) {
        Err(TlsConfigError::NoKey { path }) => assert_eq!(path, cert),
        other => panic!("{other:?}"),
    }
    match load_server_config(&cert, &text) {
        Err(TlsConfigError::NoKey { path }) => assert_eq!(path, text),
        other => panic!("{other:?}"),
    }
    match load_server_config(&cert, &unterminated) {
        Err(TlsConfigError::Pem { path, .. }) => assert_eq!(path, unterminated),
        other => panic!("{other:?}"),
    }
    match load_server_config(&cert, &other_key) {
        Err(TlsConfigError::KeyMismatch { cert: c, key: k }) => {
            assert_eq!((c, k), (cert.clone(), other_key.clone()));
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        load_server_config(&cert, &bad_der_key),
        Err(TlsConfigError::Rejected(_))
    ));
    // Every error says which file.
    let err = load_server_config(&cert, &other_key).unwrap_err();
    assert!(err.to_string().contains("other.pem"), "{err}");
    let err = load_server_config(&missing, &key).unwrap_err();
    assert!(err.to_string().contains("missing.pem"), "{err}");
}

// ---- mutual TLS ----------------------------------------------------------------------------

/// A CA (its certificate) and a client certificate it signed (chain, key), made once.
struct ClientPki {
    ca_der: CertificateDer<'static>,
    ca_pem: String,
    client_der: CertificateDer<'static>,
    client_key_der: Vec<u8>,
}

fn client_pki() -> &'static ClientPki {
    static PKI: OnceLock<ClientPki> = OnceLock::new();
    PKI.get_or_init(|| {
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let mut params = rcgen::CertificateParams::new(vec!["client.test".to_owned()]).unwrap();
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let key = rcgen::KeyPair::generate().unwrap();
        let client = params.signed_by(&key, &issuer).unwrap();
        ClientPki {
            ca_der: ca.der().clone(),
            ca_pem: ca.pem(),
            client_der: client.der().clone(),
            client_key_der: key.serialize_der(),
        }
    })
}

fn mtls_server_config() -> Arc<ServerConfig> {
    let id = identity();
    server_config_with_client_ca(
        vec![id.cert_der.clone()],
        PrivateKeyDer::Pkcs8(id.key_der.clone().into()),
        vec![client_pki().ca_der.clone()],
    )
    .unwrap()
}

/// A client trusting the test identity, presenting `cert` and `key` (PKCS#8).
fn client_config_with_cert(
    versions: &[&'static SupportedProtocolVersion],
    cert: CertificateDer<'static>,
    key: Vec<u8>,
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(identity().cert_der.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(vec![cert], PrivateKeyDer::Pkcs8(key.into()))
            .unwrap(),
    )
}

/// Runs the handshake until the server fails; returns its error.
fn server_refuses(pair: &mut Pair) -> TlsError {
    for _ in 0..10 {
        if let Err(e) = pair.client_to_server(usize::MAX) {
            return e;
        }
        if pair.server_to_client().is_err() {
            panic!("the client failed first: {:?}", pair.server);
        }
    }
    panic!("the server accepted the client: {:?}", pair.server);
}

#[test]
fn mutual_tls_accepts_a_certificate_from_the_ca() {
    let pki = client_pki();
    for versions in [&[&TLS13][..], &[&TLS12][..]] {
        let client =
            client_config_with_cert(versions, pki.client_der.clone(), pki.client_key_der.clone());
        let mut pair = Pair::with(mtls_server_config(), client);
        pair.handshake(usize::MAX);
        assert!(!pair.server.is_handshaking());
    }
}

#[test]
fn mutual_tls_refuses_clients_without_a_certificate_from_the_ca() {
    for versions in [&[&TLS13][..], &[&TLS12][..]] {
        let anonymous = client_config(versions, std::slice::from_ref(&identity().cert_der));
        let mut pair = Pair::with(mtls_server_config(), anonymous);
        let err = server_refuses(&mut pair);
        assert!(matches!(err, TlsError::Handshake(_)), "{err:?}");
        assert_eq!(err.reason(), "no client certificate");

        // A self-signed certificate the CA did not sign.
        let stranger = new_identity();
        let client = client_config_with_cert(versions, stranger.cert_der, stranger.key_der);
        let mut pair = Pair::with(mtls_server_config(), client);
        let err = server_refuses(&mut pair);
        assert_eq!(err.reason(), "client certificate refused", "{err:?}");
    }
}

#[test]
fn load_server_config_with_client_ca_reads_and_refuses_ca_files() {
    let dir = TempDir::new("client-ca");
    let id = identity();
    let cert = dir.file("cert.pem", &id.cert_pem);
    let key = dir.file("key.pem", &id.key_pem);
    let ca = dir.file("ca.pem", &client_pki().ca_pem);
    let config = load_server_config_with_client_ca(&cert, &key, &ca).unwrap();
    let pki = client_pki();
    let client = client_config_with_cert(BOTH, pki.client_der.clone(), pki.client_key_der.clone());
    Pair::with(config, client).handshake(usize::MAX);

    let text = dir.file("text.pem", "no certificate here\n");
    match load_server_config_with_client_ca(&cert, &key, &text) {
        Err(TlsConfigError::NoCertificate { path }) => assert_eq!(path, text),
        other => panic!("{other:?}"),
    }
    let missing = dir.0.join("missing.pem");
    match load_server_config_with_client_ca(&cert, &key, &missing) {
        Err(TlsConfigError::Read { path, .. }) => assert_eq!(path, missing),
        other => panic!("{other:?}"),
    }
    // Not a certificate rustls can use as a trust anchor.
    let garbage = dir.file(
        "garbage-ca.pem",
        "-----BEGIN CERTIFICATE-----\nAAECAwQFBgcICQ==\n-----END CERTIFICATE-----\n",
    );
    match load_server_config_with_client_ca(&cert, &key, &garbage) {
        Err(e @ TlsConfigError::ClientCa { .. }) => {
            assert!(e.to_string().contains("garbage-ca.pem"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    // The server's own files are still checked first, with their names.
    let other_key = dir.file("other.pem", &new_identity().key_pem);
    assert!(matches!(
        load_server_config_with_client_ca(&cert, &other_key, &ca),
        Err(TlsConfigError::KeyMismatch { .. })
    ));
}
