//! TLS on the relay's one port, against the real binary, with clients nobody here wrote:
//! `openssl s_client` in text mode, Python's `ssl` module speaking the binary protocol,
//! tungstenite over rustls for `wss://`, and hostile half-handshakes.
//!
//! A CA and its certificates are made at test time with rcgen into a temporary directory.
//! openssl and python3 must be installed (Debian: the `openssl` and `python3` packages);
//! a test that needs one fails, with a message saying so, when it is missing.
//!
//! No test waits on time for synchronisation: read timeouts are only safety nets, and the
//! login-timeout tests only assert that the connection ends.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;

use bytes::{Bytes, BytesMut};
use imrelay::proto::decode::decode_frame;
use imrelay::proto::{Flags, Frame, MessageId, Opcode, UserId};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use support::process::RelayProcess;
use support::{Client, SAFETY_TIMEOUT};

// ---- certificates ----------------------------------------------------------------------

/// A temporary directory of PEM files: a CA, a server certificate for `localhost` and
/// 127.0.0.1 signed by it, a client certificate signed by it, and a client certificate
/// signed by a CA the relay does not know. Removed on drop.
struct Pki {
    dir: PathBuf,
    ca_der: CertificateDer<'static>,
    client_cert_der: CertificateDer<'static>,
    client_key_der: Vec<u8>,
}

impl Pki {
    fn new() -> Pki {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("imrelay-e2e-tls-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the certificate directory");

        let (ca_pem, ca_der, ca) = new_ca("imrelay test CA");
        let (server_pem, _, server_key) = new_leaf(
            &ca,
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client_pem, client_cert_der, client_key) =
            new_leaf(&ca, &["client.test"], ExtendedKeyUsagePurpose::ClientAuth);
        let (_, _, stranger_ca) = new_ca("somebody else's CA");
        let (stranger_pem, _, stranger_key) = new_leaf(
            &stranger_ca,
            &["stranger.test"],
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        let files = [
            ("ca.pem", ca_pem),
            ("server.pem", server_pem),
            ("server.key", server_key.serialize_pem()),
            ("client.pem", client_pem),
            ("client.key", client_key.serialize_pem()),
            ("stranger.pem", stranger_pem),
            ("stranger.key", stranger_key.serialize_pem()),
        ];
        for (name, pem) in files {
            std::fs::write(dir.join(name), pem).expect("write a PEM file");
        }
        Pki {
            dir,
            ca_der,
            client_cert_der,
            client_key_der: client_key.serialize_der(),
        }
    }

    fn path(&self, name: &str) -> String {
        self.dir
            .join(name)
            .to_str()
            .expect("a UTF-8 path")
            .to_owned()
    }

    /// The relay's TLS flags: its certificate and key.
    fn server_flags(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.path("server.pem"),
            "--tls-key".into(),
            self.path("server.key"),
        ]
    }

    /// A rustls client config trusting the test CA (with the CA's client certificate
    /// when `with_cert`).
    fn rustls_client(&self, with_cert: bool) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca_der.clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let config = if with_cert {
            let key = PrivateKeyDer::Pkcs8(self.client_key_der.clone().into());
            builder
                .with_client_auth_cert(vec![self.client_cert_der.clone()], key)
                .unwrap()
        } else {
            builder.with_no_client_auth()
        };
        Arc::new(config)
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A self-signed CA: its PEM, its DER and its issuer (for signing).
fn new_ca(name: &str) -> (String, CertificateDer<'static>, Issuer<'static, KeyPair>) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), cert.der().clone(), Issuer::new(params, key))
}

/// A certificate for `names` signed by `ca`: its PEM, its DER and its key.
fn new_leaf(
    ca: &Issuer<'static, KeyPair>,
    names: &[&str],
    usage: ExtendedKeyUsagePurpose,
) -> (String, CertificateDer<'static>, KeyPair) {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let mut params = CertificateParams::new(names.clone()).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, names[0].clone());
    params.extended_key_usages = vec![usage];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // Python 3.13's default context (VERIFY_X509_STRICT) wants the issuer's key id.
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, ca).unwrap();
    (cert.pem(), cert.der().clone(), key)
}

// ---- the relay and outside tools -------------------------------------------------------

/// The binary with the PKI's certificate and `extra` flags.
fn tls_relay(pki: &Pki, extra: &[&str]) -> RelayProcess {
    let mut flags = pki.server_flags();
    flags.extend(extra.iter().map(|s| s.to_string()));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    RelayProcess::start(&flags)
}

/// Fails the test, saying what to install, unless `name args` runs and succeeds.
fn require_tool(name: &str, args: &[&str], package: &str) {
    match Command::new(name).args(args).output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "`{name} {}` failed ({}): this test needs a working {name} \
             (Debian package `{package}`)",
            args.join(" "),
            out.status
        ),
        Err(e) => panic!(
            "this test needs `{name}` and could not run it ({e}); install it \
             (Debian: apt-get install {package})"
        ),
    }
}

/// `openssl s_client`, typing lines into the connection and reading the relay's lines
/// from its output.
struct SClient {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    stderr: Option<JoinHandle<String>>,
}

impl SClient {
    /// Connects to `addr`, trusting the PKI's CA, with `extra` s_client options.
    fn connect(addr: SocketAddr, pki: &Pki, extra: &[&str]) -> SClient {
        require_tool("openssl", &["version"], "openssl");
        let mut child = Command::new("openssl")
            .arg("s_client")
            .arg("-connect")
            .arg(addr.to_string())
            .args(["-quiet", "-verify_return_error", "-servername", "localhost"])
            .arg("-CAfile")
            .arg(pki.path("ca.pem"))
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start openssl s_client (Debian package `openssl`)");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = std::io::BufReader::new(stdout);
            loop {
                let mut line = String::new();
                match std::io::BufRead::read_line(&mut reader, &mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        if tx.send(line.trim_end().to_owned()).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        let mut stderr = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        SClient {
            stdin: child.stdin.take(),
            child,
            lines,
            stderr: Some(stderr),
        }
    }

    /// Types a line (s_client sends it as it is, so the line end is CRLF). Best effort:
    /// s_client may already have exited.
    fn type_line(&mut self, line: &str) {
        if let Some(stdin) = self.stdin.as_mut() {
            let _ = stdin.write_all(format!("{line}\r\n").as_bytes());
            let _ = stdin.flush();
        }
    }

    /// The next line the relay sent.
    fn read_line(&mut self) -> String {
        match self.lines.recv_timeout(SAFETY_TIMEOUT) {
            Ok(line) => line,
            Err(e) => {
                let stderr = self.finish_stderr();
                panic!("no line from s_client ({e:?}); its stderr:\n{stderr}")
            }
        }
    }

    /// Waits until s_client's output ends (the connection is over) with no further line;
    /// returns its stderr.
    fn expect_end(&mut self) -> String {
        match self.lines.recv_timeout(SAFETY_TIMEOUT) {
            Err(RecvTimeoutError::Disconnected) => {}
            Ok(line) => panic!("expected the connection to end, got {line:?}"),
            Err(RecvTimeoutError::Timeout) => panic!("s_client is still connected"),
        }
        self.stdin = None;
        let _ = self.child.wait();
        self.finish_stderr()
    }

    fn finish_stderr(&mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.stderr
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default()
    }
}

impl Drop for SClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Python's ssl module speaking the binary protocol (protocol.md sections 3 and 5): LOGIN,
/// LOGIN_OK, PING, PONG. Prints the TLS version and one line per answer.
const PYTHON_CLIENT: &str = r#"
import socket, ssl, struct, sys

host, port, cafile, version = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
ctx = ssl.create_default_context(cafile=cafile)
if version == "1.2":
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
# length, version, opcode, flags, msg_id, target, source: 32 bytes, big-endian.
HEADER = struct.Struct(">IBBHQQQ")

def frame(opcode, msg_id, target, payload=b""):
    return HEADER.pack(HEADER.size + len(payload), 1, opcode, 0, msg_id, target, 0) + payload

def recv_exact(s, n):
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            sys.exit("the relay closed the connection")
        data += chunk
    return data

def recv_frame(s):
    length, _, opcode, _, msg_id, target, source = HEADER.unpack(recv_exact(s, HEADER.size))
    return opcode, msg_id, target, recv_exact(s, length - HEADER.size)

with socket.create_connection((host, port), timeout=10) as raw:
    with ctx.wrap_socket(raw, server_hostname="localhost") as s:
        print(s.version(), flush=True)
        s.sendall(frame(0x01, 1, 1001))
        opcode, msg_id, target, payload = recv_frame(s)
        print(f"opcode={opcode:#04x} msg_id={msg_id} target={target} payload={len(payload)}B", flush=True)
        s.sendall(frame(0x07, 5, 0, b"t=1"))
        opcode, msg_id, target, payload = recv_frame(s)
        print(f"opcode={opcode:#04x} msg_id={msg_id} payload={payload.decode()}", flush=True)
"#;

/// Runs [`PYTHON_CLIENT`] against `addr` (`version`: "1.3" or "1.2" at most); returns its
/// output lines.
fn python_binary_client(addr: SocketAddr, pki: &Pki, version: &str) -> Vec<String> {
    require_tool("python3", &["-c", "import ssl"], "python3");
    let script = pki.dir.join("client.py");
    std::fs::write(&script, PYTHON_CLIENT).unwrap();
    let out = Command::new("python3")
        .arg(&script)
        .arg(addr.ip().to_string())
        .arg(addr.port().to_string())
        .arg(pki.path("ca.pem"))
        .arg(version)
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the Python client failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout.lines().map(str::to_owned).collect()
}

/// A rustls client speaking the binary protocol.
struct TlsClient {
    tls: StreamOwned<ClientConnection, TcpStream>,
    buf: BytesMut,
    next_id: u64,
}

impl TlsClient {
    fn connect(addr: SocketAddr, config: Arc<ClientConfig>) -> TlsClient {
        TlsClient::over(TcpStream::connect(addr).expect("connect"), config)
    }

    fn over(stream: TcpStream, config: Arc<ClientConfig>) -> TlsClient {
        stream.set_read_timeout(Some(SAFETY_TIMEOUT)).unwrap();
        let conn =
            ClientConnection::new(config, ServerName::try_from("localhost").unwrap()).unwrap();
        TlsClient {
            tls: StreamOwned::new(conn, stream),
            buf: BytesMut::new(),
            next_id: 100,
        }
    }

    fn next_id(&mut self) -> MessageId {
        self.next_id += 1;
        MessageId(self.next_id)
    }

    fn send_frame(&mut self, frame: &Frame) {
        self.tls.write_all(&frame.to_bytes()).expect("write");
        self.tls.flush().expect("flush");
    }

    fn login(&mut self, user: u64) {
        let id = self.next_id();
        self.send_frame(&Frame::login(id, UserId(user), b""));
        let ok = self.recv();
        assert_eq!((ok.opcode, ok.msg_id), (Opcode::LoginOk, id), "{ok:?}");
    }

    fn recv(&mut self) -> Frame {
        loop {
            if let Some(decoded) = decode_frame(&mut self.buf, u32::MAX).expect("relay framing") {
                return decoded.expect("a known opcode");
            }
            let mut chunk = [0u8; 16 * 1024];
            match self.tls.read(&mut chunk) {
                Ok(0) => panic!("the relay closed the connection"),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => panic!("read failed (safety timeout?): {e}"),
            }
        }
    }
}

impl TlsClient {
    /// The relay must end the stream next with its close_notify (rustls reports a stream
    /// cut without one as an error), with no further byte.
    fn expect_clean_end(&mut self) {
        assert!(self.buf.is_empty(), "unread bytes: {:?}", self.buf);
        loop {
            let mut chunk = [0u8; 1024];
            match self.tls.read(&mut chunk) {
                Ok(0) => return,
                Ok(n) => panic!("expected the end, got {:?}", &chunk[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => panic!("expected the relay's close_notify, got {e}"),
            }
        }
    }
}

/// A real ClientHello (rustls's), as the first bytes a TLS client sends.
fn client_hello() -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(RootCertStore::empty())
        .with_no_client_auth();
    let mut conn =
        ClientConnection::new(Arc::new(config), ServerName::try_from("localhost").unwrap())
            .unwrap();
    let mut hello = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut hello).unwrap();
    }
    assert_eq!(hello[0], 0x16, "a handshake record");
    hello
}

/// A raw TCP connection with the safety timeout.
fn raw_connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(SAFETY_TIMEOUT)).unwrap();
    stream
}

// ---- tests -----------------------------------------------------------------------------

#[test]
fn openssl_s_client_chats_in_text_mode_beside_plaintext_clients() {
    let pki = Pki::new();
    let relay = tls_relay(&pki, &[]);
    let mut alice = SClient::connect(relay.addr, &pki, &["-verify_ip", "127.0.0.1"]);
    alice.type_line("LOGIN 1");
    assert_eq!(alice.read_line(), "OK LOGIN 1");

    // A plaintext binary client on the same port sends to the TLS user...
    let mut bob = Client::connect(relay.addr);
    bob.login(2);
    let id = bob.send(1, b"hello over TLS");
    assert_eq!(alice.read_line(), format!("MSG 2 {} hello over TLS", id.0));
    assert_eq!(bob.recv().opcode, Opcode::Ack);

    // ... and gets the TLS user's answer.
    alice.type_line("SEND 2 hi bob, from s_client");
    let got = bob.recv();
    assert_eq!(got.opcode, Opcode::Deliver);
    assert_eq!(got.source, UserId(1));
    assert_eq!(&got.payload[..], b"hi bob, from s_client");
    assert_eq!(alice.read_line(), format!("ACK {} 1", got.msg_id.0));

    // A second TLS client reaches the first one.
    let mut carol = SClient::connect(relay.addr, &pki, &[]);
    carol.type_line("LOGIN 3");
    assert_eq!(carol.read_line(), "OK LOGIN 3");
    carol.type_line("SEND 1 tls to tls");
    let line = alice.read_line();
    assert!(
        line.starts_with("MSG 3 ") && line.ends_with(" tls to tls"),
        "{line}"
    );

    // QUIT: BYE, then the relay ends the TLS stream (close_notify) and s_client exits.
    alice.type_line("QUIT");
    assert_eq!(alice.read_line(), "BYE");
    alice.expect_end();
    bob.round_trip();
}

#[test]
fn python_ssl_speaks_the_binary_protocol_over_tls_1_3_and_1_2() {
    let pki = Pki::new();
    let relay = tls_relay(&pki, &[]);
    for (version, name) in [("1.3", "TLSv1.3"), ("1.2", "TLSv1.2")] {
        let lines = python_binary_client(relay.addr, &pki, version);
        assert_eq!(
            lines,
            [
                name.to_owned(),
                "opcode=0x02 msg_id=1 target=1001 payload=16B".to_owned(),
                "opcode=0x08 msg_id=5 payload=t=1".to_owned(),
            ],
            "TLS {version}"
        );
    }
    // Plaintext still works beside it.
    let mut plain = Client::connect(relay.addr);
    plain.login(7);
    plain.round_trip();
}

#[test]
fn wss_websocket_over_tls_reaches_plaintext_users() {
    let pki = Pki::new();
    let relay = tls_relay(&pki, &[]);
    let stream = TcpStream::connect(relay.addr).unwrap();
    stream.set_read_timeout(Some(SAFETY_TIMEOUT)).unwrap();
    let conn = ClientConnection::new(
        pki.rustls_client(false),
        ServerName::try_from("localhost").unwrap(),
    )
    .unwrap();
    let url = format!("wss://localhost:{}/", relay.addr.port());
    let (mut ws, response) =
        tungstenite::client(url.as_str(), StreamOwned::new(conn, stream)).expect("handshake");
    assert_eq!(response.status(), 101);

    let recv = |ws: &mut tungstenite::WebSocket<_>| loop {
        match ws.read().expect("a message") {
            tungstenite::Message::Binary(data) => {
                let mut buf = BytesMut::from(&data[..]);
                return decode_frame(&mut buf, u32::MAX)
                    .expect("relay framing")
                    .expect("a whole frame")
                    .expect("a known opcode");
            }
            tungstenite::Message::Ping(_) | tungstenite::Message::Pong(_) => continue,
            other => panic!("expected a binary message, got {other:?}"),
        }
    };
    let login = Frame::login(MessageId(1), UserId(21), b"");
    ws.send(tungstenite::Message::Binary(login.to_bytes()))
        .unwrap();
    assert_eq!(recv(&mut ws).opcode, Opcode::LoginOk);

    let mut plain = Client::connect(relay.addr);
    plain.login(22);
    plain.send(21, b"to the browser");
    let got = recv(&mut ws);
    assert_eq!(got.opcode, Opcode::Deliver);
    assert_eq!(&got.payload[..], b"to the browser");
    assert_eq!(plain.recv().opcode, Opcode::Ack);
}

#[test]
fn tls_required_closes_plaintext_with_nothing_sent_and_serves_tls() {
    let pki = Pki::new();
    let relay = tls_relay(&pki, &["--tls-required"]);

    // A binary LOGIN in the clear: closed, not a byte in reply.
    let mut plain = raw_connect(relay.addr);
    plain
        .write_all(&Frame::login(MessageId(1), UserId(5), b"").to_bytes())
        .unwrap();
    assert_eq!(support::read_until_closed(&mut plain, false), b"");
    // A text LOGIN in the clear: the same.
    let mut text = raw_connect(relay.addr);
    text.write_all(b"LOGIN 6\r\n").unwrap();
    assert_eq!(support::read_until_closed(&mut text, false), b"");

    // TLS clients are served.
    let mut s_client = SClient::connect(relay.addr, &pki, &[]);
    s_client.type_line("LOGIN 1");
    assert_eq!(s_client.read_line(), "OK LOGIN 1");
    let mut tls = TlsClient::connect(relay.addr, pki.rustls_client(false));
    tls.login(2);
    let id = tls.next_id();
    tls.send_frame(&Frame::send(id, UserId(1), Bytes::from_static(b"secret")));
    assert_eq!(s_client.read_line(), format!("MSG 2 {} secret", id.0));
}

#[test]
fn truncated_client_hello_is_closed_by_the_login_timeout() {
    let pki = Pki::new();
    let relay = tls_relay(&pki, &["--login-timeout", "1"]);
    let hello = client_hello();
    let mut stream = raw_connect(relay.addr);
    // Record header and the start of the handshake message, then nothing.
    stream.write_all(&hello[..10]).unwrap();
    support::read_until_closed(&mut stream, false);

    let mut bystander = Client::connect(relay.addr);
    bystander.login(1);
    bystander.round_trip();
}

#[test]
fn handshake_stalled_after_the_client_hello_is_closed_by_the_login_timeout() {
    let pki = Pki::new();
    let relay = tls_relay(&pki, &["--login-timeout", "1"]);
    let mut stream = raw_connect(relay.addr);
    stream.write_all(&client_hello()).unwrap();
    // The relay answers with its handshake flight, then waits for a Finished that never
    // comes, until the login timeout.
    let got = support::read_until_closed(&mut stream, false);
    assert_eq!(got.first(), Some(&0x16), "a ServerHello first: {got:02x?}");

    let mut bystander = Client::connect(relay.addr);
    bystander.login(1);
    bystander.round_trip();
}

#[test]
fn garbage_after_a_tls_first_byte_is_closed_and_bystanders_are_served() {
    let pki = Pki::new();
    // A login timeout far beyond the safety timeout: the close must come from the error.
    let relay = tls_relay(&pki, &["--login-timeout", "600"]);
    let mut a = Client::connect(relay.addr);
    a.login(1);
    let mut b = Client::connect(relay.addr);
    b.login(2);

    let attacks: [&[u8]; 3] = [
        b"\x16GET / HTTP/1.1\r\n\r\n",
        // A handshake record header announcing more than any record may hold.
        &[0x16, 0x03, 0x01, 0xff, 0xff, 0x01, 0x00, 0x00],
        // A well-formed record whose body is no ClientHello.
        &[0x16, 0x03, 0x01, 0x00, 0x04, 0x63, 0x00, 0x00, 0x00],
    ];
    for attack in attacks {
        let mut stream = raw_connect(relay.addr);
        stream.write_all(attack).unwrap();
        support::read_until_closed(&mut stream, true);
    }

    let id = a.send(2, b"still here");
    let got = b.recv();
    assert_eq!((got.opcode, got.msg_id), (Opcode::Deliver, id));
    assert_eq!(a.recv().opcode, Opcode::Ack);
    b.round_trip();
}

#[test]
fn mutual_tls_needs_a_client_certificate_from_the_ca() {
    let pki = Pki::new();
    let ca = pki.path("ca.pem");
    let relay = tls_relay(&pki, &["--tls-client-ca", &ca]);

    // No certificate: the handshake fails and s_client never sees the relay's answer.
    let mut anonymous = SClient::connect(relay.addr, &pki, &[]);
    anonymous.type_line("LOGIN 1");
    let stderr = anonymous.expect_end();
    assert!(stderr.contains("alert"), "s_client's stderr: {stderr}");

    // A certificate from a CA the relay does not trust: the same.
    let (cert, key) = (pki.path("stranger.pem"), pki.path("stranger.key"));
    let mut stranger = SClient::connect(relay.addr, &pki, &["-cert", &cert, "-key", &key]);
    stranger.type_line("LOGIN 1");
    let stderr = stranger.expect_end();
    assert!(stderr.contains("alert"), "s_client's stderr: {stderr}");

    // A certificate signed by the CA: logged in.
    let (cert, key) = (pki.path("client.pem"), pki.path("client.key"));
    let mut member = SClient::connect(relay.addr, &pki, &["-cert", &cert, "-key", &key]);
    member.type_line("LOGIN 1");
    assert_eq!(member.read_line(), "OK LOGIN 1");
    let mut rustls_member = TlsClient::connect(relay.addr, pki.rustls_client(true));
    rustls_member.login(2);
    let id = rustls_member.next_id();
    rustls_member.send_frame(&Frame::send(id, UserId(1), Bytes::from_static(b"mtls")));
    assert_eq!(member.read_line(), format!("MSG 2 {} mtls", id.0));
}

#[test]
fn a_tls_reader_that_falls_behind_gets_everything_in_order() {
    let pki = Pki::new();
    // Small socket buffers on both sides: the session's ciphertext (up to 64 KiB) takes
    // many writes, so the relay writes it on WRITABLE with the core's queue already empty.
    let relay = tls_relay(&pki, &["--socket-send-buffer", "4096"]);
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&relay.addr.into()).expect("connect");
    let mut reader = TlsClient::over(socket.into(), pki.rustls_client(false));
    reader.login(1);
    let mut sender = Client::connect(relay.addr);
    sender.login(2);

    // More than the socket buffers and the session's ciphertext limit hold, while the
    // reader reads nothing: the relay's writes to it block and resume.
    const COUNT: usize = 600;
    let payload = |i: usize| {
        let mut p = format!("{i:06} ").into_bytes();
        p.resize(1000, b'x');
        p
    };
    for i in 0..COUNT {
        let frame = Frame::send(MessageId(i as u64 + 1), UserId(1), Bytes::from(payload(i)));
        sender.send_frame(&frame.with_flags(Flags::NO_ACK));
    }
    sender.round_trip();
    // BYE before reading: the relay's answer waits behind everything queued, and the
    // connection closes only after the last record and close_notify are taken.
    let bye = reader.next_id();
    reader.send_frame(&Frame::bye(bye));

    for i in 0..COUNT {
        let got = reader.recv();
        assert_eq!(got.opcode, Opcode::Deliver, "{got:?}");
        assert_eq!(got.msg_id, MessageId(i as u64 + 1));
        assert_eq!(&got.payload[..], &payload(i)[..]);
    }
    let got = reader.recv();
    assert_eq!((got.opcode, got.msg_id), (Opcode::Bye, bye), "{got:?}");
    reader.expect_clean_end();
}

#[test]
fn bad_tls_flags_stop_the_relay_with_a_reason() {
    let pki = Pki::new();
    let run = |flags: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_imrelay"))
            .args(["--listen", "127.0.0.1:0", "--store", "memory"])
            .args(flags)
            .output()
            .expect("run imrelay")
    };
    let (cert, key, client_key) = (
        pki.path("server.pem"),
        pki.path("server.key"),
        pki.path("client.key"),
    );
    let out = run(&["--tls-cert", &cert]);
    assert_eq!(out.status.code(), Some(2), "--tls-cert alone");
    let out = run(&["--tls-required"]);
    assert_eq!(out.status.code(), Some(2), "--tls-required alone");
    let out = run(&["--tls-cert", &cert, "--tls-key", &client_key]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a key that is not the certificate's"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("does not match"), "{stderr}");
    let missing = Path::new(&key).with_file_name("missing.pem");
    let out = run(&["--tls-cert", &cert, "--tls-key", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "a missing key file");
}

#[test]
fn a_client_close_notify_ends_the_connection_cleanly() {
    let pki = Pki::new();
    let relay = tls_relay(&pki, &[]);
    let mut client = TlsClient::connect(relay.addr, pki.rustls_client(false));
    client.login(1);
    // close_notify is the end of the client's input: the relay closes the session and
    // answers with its own close_notify (a clean end of stream, not a truncation).
    client.tls.conn.send_close_notify();
    client.tls.flush().unwrap();
    client.expect_clean_end();

    // User 1 is gone.
    let mut other = Client::connect(relay.addr);
    other.login(2);
    other.send(1, b"anyone?");
    other.expect_error(imrelay::proto::ErrorCode::RecipientOffline);
}

#[test]
fn shutdown_tells_tls_clients_and_ends_their_streams() {
    let pki = Pki::new();
    let relay = tls_relay(&pki, &[]);
    let mut s_client = SClient::connect(relay.addr, &pki, &[]);
    s_client.type_line("LOGIN 1");
    assert_eq!(s_client.read_line(), "OK LOGIN 1");
    let mut binary = TlsClient::connect(relay.addr, pki.rustls_client(false));
    binary.login(2);

    relay.signal(libc::SIGTERM);
    let line = s_client.read_line();
    assert!(line.contains("SHUTTING_DOWN"), "{line}");
    s_client.expect_end();
    let frame = binary.recv();
    assert_eq!(
        frame.error_code(),
        Some(imrelay::proto::ErrorCode::ShuttingDown),
        "{frame:?}"
    );
}

#[test]
fn tls_required_sends_a_silent_connection_nothing_at_the_login_timeout() {
    let pki = Pki::new();
    let relay = tls_relay(&pki, &["--tls-required", "--login-timeout", "1"]);
    // Without --tls-required this would get a binary LOGIN_TIMEOUT ERROR; with it, not a
    // byte goes out in the clear.
    let mut silent = raw_connect(relay.addr);
    assert_eq!(support::read_until_closed(&mut silent, false), b"");
}
