//! The SDK over TLS and with login tokens, over real sockets against the real relay binary.
//!
//! The relay here speaks plain TCP: a TLS-terminating proxy written in this file (rustls's
//! `ServerConnection` on std threads, certificates from rcgen) sits in front of it, the way
//! a load balancer would, so the SDK's TLS is tested against a real TLS server while its
//! frames reach the real relay. Peers that log in over plain TCP talk to the relay
//! directly.
//!
//! Nothing here waits on time for synchronisation: every step waits for an event (the
//! client's `recv` timeout is only a safety net that fails the test). Two tests depend on
//! the relay's clock the way production does: a token that the relay's leeway lets live
//! 2 to 3 s more gets its TOKEN_EXPIRING at once (`--token-notice 3600`) and, unrefreshed,
//! is closed by the relay with TOKEN_EXPIRED when that runs out.

mod support;

use std::ffi::{c_void, CString};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use imrelay::auth::{mint_hs256, RoomGrant};
use imrelay::client::{
    Client, ClientConfig, ConnectError, DisconnectReason, Event, TlsClientOptions, TlsSetupError,
    TokenProvider,
};
use imrelay::ffi::*;
use imrelay::proto::UserId;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ServerConfig, ServerConnection};
use support::process::RelayProcess;
use support::{quick_sdk, SAFETY_TIMEOUT};

const ALICE: u64 = 1001;
const BOB: u64 = 1002;

// ---- certificates -------------------------------------------------------------------

/// A CA and a server certificate for `server_name` it signed.
struct Pki {
    ca_pem: String,
    chain: Vec<CertificateDer<'static>>,
    key_der: Vec<u8>,
}

fn pki(server_name: &str) -> Pki {
    pki_named("imrelay test CA", server_name)
}

fn pki_named(ca_name: &str, server_name: &str) -> Pki {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, ca_name);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec![server_name.to_string()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    Pki {
        ca_pem: ca.pem(),
        chain: vec![leaf.der().clone(), ca.der().clone()],
        key_der: leaf_key.serialize_der(),
    }
}

impl Pki {
    fn server_config(&self) -> Arc<ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                self.chain.clone(),
                PrivateKeyDer::Pkcs8(self.key_der.clone().into()),
            )
            .unwrap();
        Arc::new(config)
    }

    /// The CA certificate in a file of its own (named after the test).
    fn ca_file(&self, test: &str) -> PathBuf {
        let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("sdk_tls-{test}-{}-ca.pem", std::process::id()));
        std::fs::write(&path, &self.ca_pem).unwrap();
        path
    }
}

// ---- a TLS-terminating proxy in front of the relay -----------------------------------

/// Accepts TLS on its own port and forwards the plaintext to `upstream`, both ways.
struct TlsProxy {
    addr: SocketAddr,
    /// The client side of every connection, to cut them.
    clients: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
}

impl TlsProxy {
    fn start(upstream: SocketAddr, config: Arc<ServerConfig>) -> TlsProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let clients = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (list, stopping) = (clients.clone(), stop.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                list.lock().unwrap().push(client.try_clone().unwrap());
                let config = config.clone();
                std::thread::spawn(move || serve(client, upstream, config));
            }
        });
        TlsProxy {
            addr,
            clients,
            stop,
        }
    }

    /// Cuts every connection made so far (the SDK sees the relay's side close).
    fn cut_all(&self) {
        for client in self.clients.lock().unwrap().drain(..) {
            let _ = client.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr); // wakes the accept loop
        self.cut_all();
    }
}

/// Writes every record the session has pending to `out`.
fn write_pending(tls: &mut ServerConnection, out: &mut TcpStream) -> std::io::Result<()> {
    while tls.wants_write() {
        tls.write_tls(out)?;
    }
    Ok(())
}

/// One proxied connection: this thread carries client → relay, another relay → client.
fn serve(client: TcpStream, upstream: SocketAddr, config: Arc<ServerConfig>) {
    let Ok(relay) = TcpStream::connect(upstream) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    let tls = Arc::new(Mutex::new(ServerConnection::new(config).unwrap()));

    let (mut relay_in, mut client_out) = (relay.try_clone().unwrap(), client.try_clone().unwrap());
    let session = tls.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match relay_in.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let mut tls = session.lock().unwrap();
            if tls.writer().write_all(&buf[..n]).is_err()
                || write_pending(&mut tls, &mut client_out).is_err()
            {
                break;
            }
        }
        let mut tls = session.lock().unwrap();
        tls.send_close_notify();
        let _ = write_pending(&mut tls, &mut client_out);
        let _ = client_out.shutdown(Shutdown::Both);
    });

    let (mut client_in, mut client_out, mut relay_out) =
        (client.try_clone().unwrap(), client, relay);
    let mut buf = vec![0u8; 16 * 1024];
    let mut plain = Vec::new();
    'conn: loop {
        let n = match client_in.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        {
            let mut tls = tls.lock().unwrap();
            let mut input = &buf[..n];
            while !input.is_empty() {
                if tls.read_tls(&mut input).is_err() {
                    break 'conn;
                }
                if tls.process_new_packets().is_err() {
                    // The alert for the client, best effort.
                    let _ = write_pending(&mut tls, &mut client_out);
                    break 'conn;
                }
                let _ = tls.reader().read_to_end(&mut plain);
            }
            // Handshake flights (and data the relay side queued before it completed).
            if write_pending(&mut tls, &mut client_out).is_err() {
                break;
            }
        }
        if !plain.is_empty() && relay_out.write_all(&plain).is_err() {
            break;
        }
        plain.clear();
    }
    let _ = relay_out.shutdown(Shutdown::Both);
    let _ = client_out.shutdown(Shutdown::Both);
}

// ---- helpers ------------------------------------------------------------------------

/// Events until one matches `want` (returned with all before it); a test failure if the
/// safety timeout passes first.
fn wait_for(client: &mut Client, what: &str, want: impl Fn(&Event) -> bool) -> Vec<Event> {
    let mut seen = Vec::new();
    loop {
        match client.recv(SAFETY_TIMEOUT) {
            Some(event) => {
                let done = want(&event);
                seen.push(event);
                if done {
                    return seen;
                }
            }
            None => panic!("no {what} within the safety timeout; saw {seen:?}"),
        }
    }
}

fn is_connected(e: &Event) -> bool {
    matches!(e, Event::Connected { .. })
}

/// Sends from `from` to `to`, and checks it is delivered and received.
fn exchange(from: &mut Client, to: &mut Client, to_user: u64, text: &'static [u8]) {
    let id = from.send(UserId(to_user), text).unwrap();
    wait_for(
        from,
        "delivery",
        |e| matches!(e, Event::Delivered { id: done, .. } if *done == id),
    );
    let got = wait_for(to, "the message", |e| matches!(e, Event::Message { .. }));
    match got.last() {
        Some(Event::Message {
            payload,
            id: got_id,
            ..
        }) => {
            assert_eq!(&payload[..], text);
            assert_eq!(*got_id, id);
        }
        other => panic!("{other:?}"),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

const SECRET: &[u8] = b"sdk-tls-test-secret-of-at-least-32-bytes";

/// A relay checking HS256 tokens under [`SECRET`], announcing expiry an hour ahead.
fn auth_relay(test: &str) -> RelayProcess {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("sdk_tls-{test}-{}-secret", std::process::id()));
    std::fs::write(&path, SECRET).unwrap();
    RelayProcess::start(&[
        "--auth-secret-file",
        path.to_str().unwrap(),
        "--token-notice",
        "3600",
    ])
}

/// A token for `user`, valid for two hours: outside the relay's notice period.
fn fresh_token(user: u64) -> Vec<u8> {
    mint_hs256(
        SECRET,
        user,
        unix_now(),
        7200,
        &RoomGrant::None,
        false,
        None,
    )
    .into_bytes()
}

/// A token for `user` that expired 27 s ago: still accepted for the relay's 30 s of
/// leeway (for 2 to 3 s more), and inside any notice period at once.
fn expiring_token(user: u64) -> Vec<u8> {
    mint_hs256(
        SECRET,
        user,
        unix_now() - 28,
        1,
        &RoomGrant::None,
        false,
        None,
    )
    .into_bytes()
}

/// A provider that counts its calls and answers with `answer(call number)`.
fn counting(
    answer: impl Fn(u64) -> Vec<u8> + Send + Sync + 'static,
) -> (TokenProvider, Arc<AtomicU64>) {
    let calls = Arc::new(AtomicU64::new(0));
    let counter = calls.clone();
    let provider: TokenProvider = Arc::new(move |_user| {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        answer(n)
    });
    (provider, calls)
}

fn tls_config(user: u64, tls: TlsClientOptions) -> ClientConfig {
    let mut config = quick_sdk(user);
    config.tls = Some(tls);
    config
}

// ---- TLS ----------------------------------------------------------------------------

#[test]
fn a_client_trusting_the_ca_file_logs_in_over_tls_and_chats_with_a_plaintext_peer() {
    let relay = RelayProcess::start(&[]);
    let pki = pki("localhost");
    let proxy = TlsProxy::start(relay.addr, pki.server_config());
    let tls = TlsClientOptions::with_ca_file("localhost", pki.ca_file("chat")).unwrap();

    let (mut alice, limits) =
        Client::connect(proxy.addr, tls_config(ALICE, tls), SAFETY_TIMEOUT).unwrap();
    assert!(limits.max_frame > 0);
    let (mut bob, _) = Client::connect(relay.addr, quick_sdk(BOB), SAFETY_TIMEOUT).unwrap();

    exchange(&mut alice, &mut bob, BOB, b"hello over TLS");
    exchange(&mut bob, &mut alice, ALICE, b"hello in plaintext");

    // A bigger message than one TLS record (16 KiB) both ways.
    let big: &'static [u8] = Box::leak(vec![b'x'; 40_000].into_boxed_slice());
    exchange(&mut alice, &mut bob, BOB, big);
    exchange(&mut bob, &mut alice, ALICE, big);

    let closing = alice.close(SAFETY_TIMEOUT);
    assert_eq!(closing.last(), Some(&Event::Closed));
}

#[test]
fn the_ca_as_pem_bytes_works_the_same() {
    let relay = RelayProcess::start(&[]);
    let pki = pki("localhost");
    let proxy = TlsProxy::start(relay.addr, pki.server_config());
    let tls = TlsClientOptions::with_ca_pem("localhost", pki.ca_pem.as_bytes()).unwrap();
    let (mut alice, _) =
        Client::connect(proxy.addr, tls_config(ALICE, tls), SAFETY_TIMEOUT).unwrap();
    let (mut bob, _) = Client::connect(relay.addr, quick_sdk(BOB), SAFETY_TIMEOUT).unwrap();
    exchange(&mut alice, &mut bob, BOB, b"pem");
}

/// The reason of a failed first attempt, which must be a TLS failure.
fn tls_failure(addr: SocketAddr, tls: TlsClientOptions) -> String {
    match Client::connect(addr, tls_config(ALICE, tls), SAFETY_TIMEOUT) {
        Err(ConnectError::Link(DisconnectReason::Tls(reason))) => reason,
        Err(other) => panic!("not a TLS failure: {other}"),
        Ok(_) => panic!("connected"),
    }
}

#[test]
fn a_certificate_for_another_name_is_a_handshake_failure_then_backoff_and_retries() {
    let relay = RelayProcess::start(&[]);
    let pki = pki("localhost");
    let proxy = TlsProxy::start(relay.addr, pki.server_config());
    let ca = pki.ca_file("wrong-name");
    let tls = TlsClientOptions::with_ca_file("relay.example.com", &ca).unwrap();

    let reason = tls_failure(proxy.addr, tls.clone());
    assert!(reason.starts_with("handshake failed"), "{reason}");
    assert!(reason.contains("not valid for name"), "{reason}");
    let shown = DisconnectReason::Tls(reason).to_string();
    assert!(shown.starts_with("TLS handshake failed"), "{shown}");

    // A long-lived client: each attempt fails the same way, with a backoff between them,
    // and nothing else happens (no login, no panic).
    let mut client = Client::start(proxy.addr, tls_config(ALICE, tls));
    for _ in 0..2 {
        let seen = wait_for(&mut client, "a disconnect", |e| {
            matches!(e, Event::Disconnected { .. })
        });
        match seen.as_slice() {
            [Event::Disconnected {
                reason: DisconnectReason::Tls(reason),
                retry_in,
            }] => {
                assert!(reason.contains("not valid for name"), "{reason}");
                assert!(!retry_in.is_zero());
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(client.close(SAFETY_TIMEOUT), vec![Event::Closed]);
}

#[test]
fn a_certificate_from_an_unknown_ca_is_a_handshake_failure() {
    let relay = RelayProcess::start(&[]);
    let served = pki("localhost");
    let other = pki_named("another CA", "localhost");
    let proxy = TlsProxy::start(relay.addr, served.server_config());
    let tls = TlsClientOptions::with_ca_pem("localhost", other.ca_pem.as_bytes()).unwrap();
    let reason = tls_failure(proxy.addr, tls);
    assert!(reason.contains("UnknownIssuer"), "{reason}");
}

#[test]
fn tls_to_a_relay_that_speaks_none_is_a_handshake_failure() {
    let relay = RelayProcess::start(&[]);
    let pki = pki("localhost");
    let tls = TlsClientOptions::with_ca_pem("localhost", pki.ca_pem.as_bytes()).unwrap();
    let reason = tls_failure(relay.addr, tls);
    assert!(reason.starts_with("handshake failed"), "{reason}");
}

#[test]
fn bad_tls_options_are_refused_when_built() {
    let pki = pki("localhost");
    assert!(matches!(
        TlsClientOptions::with_ca_file("localhost", "/nonexistent/ca.pem"),
        Err(TlsSetupError::ReadCa { .. })
    ));
    assert!(matches!(
        TlsClientOptions::with_ca_pem("localhost", &b"not a pem"[..]),
        Err(TlsSetupError::NoTrustAnchors(_))
    ));
    assert!(matches!(
        TlsClientOptions::with_ca_pem("not a name!", pki.ca_pem.as_bytes()),
        Err(TlsSetupError::InvalidServerName(_))
    ));
    // An IP address is a valid server name (the certificate must then carry it).
    assert!(TlsClientOptions::with_ca_pem("127.0.0.1", pki.ca_pem.as_bytes()).is_ok());
}

// ---- login tokens -------------------------------------------------------------------

#[test]
fn the_provider_is_asked_at_connect_and_again_after_the_relay_side_closes() {
    let relay = RelayProcess::start(&[]);
    let pki = pki("localhost");
    let proxy = TlsProxy::start(relay.addr, pki.server_config());
    let tls = TlsClientOptions::with_ca_pem("localhost", pki.ca_pem.as_bytes()).unwrap();
    let (provider, calls) = counting(|n| format!("token-{n}").into_bytes());
    let mut config = tls_config(ALICE, tls);
    config.token_provider = Some(provider);

    let (mut alice, _) = Client::connect(proxy.addr, config, SAFETY_TIMEOUT).unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    proxy.cut_all();
    let seen = wait_for(&mut alice, "a new login", is_connected);
    assert_closed_by_relay_first(&seen);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "asked again for the new LOGIN"
    );

    // And the same when the relay itself goes away and comes back.
    let addr = relay.addr;
    relay.crash();
    let _relay = RelayProcess::start_on(addr, &[]);
    let before = calls.load(Ordering::SeqCst);
    wait_for(&mut alice, "a login to the new relay", is_connected);
    assert!(calls.load(Ordering::SeqCst) > before);

    let (mut bob, _) = Client::connect(addr, quick_sdk(BOB), SAFETY_TIMEOUT).unwrap();
    exchange(&mut bob, &mut alice, ALICE, b"after the restart");
}

#[test]
fn the_providers_token_logs_in_and_a_near_expiry_one_is_refreshed() {
    let relay = auth_relay("refresh");
    let pki = pki("localhost");
    let proxy = TlsProxy::start(relay.addr, pki.server_config());
    let tls = TlsClientOptions::with_ca_pem("localhost", pki.ca_pem.as_bytes()).unwrap();
    // The LOGIN gets a token about to expire, the REFRESH a fresh one.
    let (provider, calls) = counting(|n| {
        if n == 1 {
            expiring_token(ALICE)
        } else {
            fresh_token(ALICE)
        }
    });
    let mut config = tls_config(ALICE, tls);
    config.token_provider = Some(provider);
    let (mut alice, _) = Client::connect(proxy.addr, config, SAFETY_TIMEOUT).unwrap();

    let seen = wait_for(&mut alice, "the refresh", |e| {
        matches!(
            e,
            Event::TokenRefreshed { .. } | Event::RefreshFailed { .. }
        )
    });
    let (expiring, refreshed) = match seen.as_slice() {
        [.., Event::TokenExpiring { exp }, Event::TokenRefreshed { exp: new }] => (*exp, *new),
        other => panic!("{other:?}"),
    };
    assert!(refreshed > expiring + 7000, "{expiring} -> {refreshed}");
    assert_eq!(calls.load(Ordering::SeqCst), 2, "LOGIN, then REFRESH");

    // The link is still good, and a peer with a static token reaches it.
    let mut bob_config = quick_sdk(BOB);
    bob_config.credential = fresh_token(BOB);
    let (mut bob, _) = Client::connect(relay.addr, bob_config, SAFETY_TIMEOUT).unwrap();
    exchange(&mut bob, &mut alice, ALICE, b"after the refresh");
    exchange(&mut alice, &mut bob, BOB, b"and back");
}

#[test]
fn an_unrefreshed_token_is_closed_by_the_relay_and_the_next_login_gets_a_fresh_one() {
    let relay = auth_relay("expired");
    let pki = pki("localhost");
    let proxy = TlsProxy::start(relay.addr, pki.server_config());
    let tls = TlsClientOptions::with_ca_pem("localhost", pki.ca_pem.as_bytes()).unwrap();
    // The provider's cached token is about to expire; it gives it again for the REFRESH
    // (which does not extend it), and only a later call mints a new one.
    let cached = expiring_token(ALICE);
    let (provider, calls) = counting(move |n| {
        if n <= 2 {
            cached.clone()
        } else {
            fresh_token(ALICE)
        }
    });
    let mut config = tls_config(ALICE, tls);
    config.token_provider = Some(provider);
    let (mut alice, _) = Client::connect(proxy.addr, config, SAFETY_TIMEOUT).unwrap();

    let seen = wait_for(&mut alice, "TOKEN_EXPIRED", |e| {
        matches!(e, Event::Error { code: 21, .. })
    });
    assert!(
        seen.iter()
            .any(|e| matches!(e, Event::TokenRefreshed { .. })),
        "{seen:?}"
    );
    let seen = wait_for(&mut alice, "a new login", is_connected);
    assert_closed_by_relay_first(&seen);
    assert_eq!(calls.load(Ordering::SeqCst), 3, "LOGIN, REFRESH, LOGIN");
}

#[test]
fn a_refused_login_token_is_reported_and_the_next_attempt_asks_again() {
    let relay = auth_relay("refused");
    let (provider, calls) = counting(|n| {
        if n == 1 {
            b"not-a-token".to_vec()
        } else {
            fresh_token(ALICE)
        }
    });
    let mut config = quick_sdk(ALICE);
    config.token_provider = Some(provider);
    let mut alice = Client::start(relay.addr, config);
    let seen = wait_for(&mut alice, "a login", is_connected);
    match seen.as_slice() {
        [Event::Disconnected {
            reason: DisconnectReason::LoginRejected { code: 20, reason },
            retry_in,
        }, Event::Connected { .. }] => {
            assert!(reason.contains("malformed token"), "{reason}");
            assert!(!retry_in.is_zero(), "backs off before trying again");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

// ---- the C ABI ----------------------------------------------------------------------

/// What the C token provider of the test reads through its `ctx`.
struct CProvider {
    calls: AtomicU64,
    token: Vec<u8>,
}

extern "C" fn c_provider(user: u64, ctx: *mut c_void, out: *mut u8, cap: usize) -> isize {
    // SAFETY: ctx is the &CProvider the test passed, alive until imrelay_close.
    let state = unsafe { &*(ctx as *const CProvider) };
    assert_eq!(user, ALICE);
    state.calls.fetch_add(1, Ordering::SeqCst);
    if state.token.len() <= cap {
        // SAFETY: `out` has `cap` writable bytes.
        unsafe { std::ptr::copy_nonoverlapping(state.token.as_ptr(), out, state.token.len()) };
    }
    state.token.len() as isize
}

fn last_error() -> String {
    let mut buf = vec![0u8; 512];
    // SAFETY: buf has 512 writable bytes.
    let n = unsafe { imrelay_last_error_message(buf.as_mut_ptr().cast(), buf.len()) };
    buf.truncate(n.min(511));
    String::from_utf8_lossy(&buf).into_owned()
}

#[test]
fn the_c_abi_connects_over_tls_with_a_token_provider() {
    let relay = RelayProcess::start(&[]);
    let pki = pki("localhost");
    let proxy = TlsProxy::start(relay.addr, pki.server_config());
    let ca = CString::new(pki.ca_file("c-abi").to_str().unwrap()).unwrap();
    let name = CString::new("localhost").unwrap();
    let addr = CString::new(proxy.addr.to_string()).unwrap();
    // Longer than the first buffer: the provider is called twice for one LOGIN.
    let state = CProvider {
        calls: AtomicU64::new(0),
        token: vec![b't'; 5000],
    };

    // SAFETY: every pointer below is live and NUL-terminated where it must be; `state`
    // outlives the client.
    unsafe {
        let options = imrelay_options_new();
        assert_eq!(
            imrelay_options_set_tls(options, name.as_ptr(), c"/nonexistent.pem".as_ptr()),
            IMRELAY_ERR_INVALID
        );
        assert!(
            last_error().contains("/nonexistent.pem"),
            "{}",
            last_error()
        );
        assert_eq!(
            imrelay_options_set_tls(options, name.as_ptr(), ca.as_ptr()),
            IMRELAY_OK
        );
        assert_eq!(
            imrelay_options_set_token_provider(
                options,
                Some(c_provider),
                &state as *const CProvider as *mut c_void,
            ),
            IMRELAY_OK
        );
        let client = imrelay_connect_with(addr.as_ptr(), ALICE, options, 10_000);
        assert!(!client.is_null(), "{}", last_error());
        imrelay_options_free(options);
        assert_eq!(state.calls.load(Ordering::SeqCst), 2);

        let (mut bob, _) = Client::connect(relay.addr, quick_sdk(BOB), SAFETY_TIMEOUT).unwrap();
        bob.send(UserId(ALICE), &b"to C"[..]).unwrap();
        loop {
            let mut event = std::ptr::null_mut();
            assert_eq!(imrelay_poll_event(client, 10_000, &mut event), IMRELAY_OK);
            let kind = (*event).kind;
            let got = (kind == IMRELAY_EVENT_MESSAGE)
                .then(|| std::slice::from_raw_parts((*event).data, (*event).len).to_vec());
            imrelay_event_free(event);
            if let Some(payload) = got {
                assert_eq!(payload, b"to C");
                break;
            }
        }
        imrelay_close(client, 1000);
    }
}

#[test]
fn the_c_abi_reports_a_handshake_failure_at_connect() {
    let relay = RelayProcess::start(&[]);
    let pki = pki("localhost");
    let proxy = TlsProxy::start(relay.addr, pki.server_config());
    let name = CString::new("relay.example.com").unwrap();
    let addr = CString::new(proxy.addr.to_string()).unwrap();
    // SAFETY: live pointers, NUL-terminated strings.
    unsafe {
        let options = imrelay_options_new();
        assert_eq!(
            imrelay_options_set_tls_ca_pem(
                options,
                name.as_ptr(),
                pki.ca_pem.as_ptr(),
                pki.ca_pem.len()
            ),
            IMRELAY_OK
        );
        let client = imrelay_connect_with(addr.as_ptr(), ALICE, options, 10_000);
        imrelay_options_free(options);
        assert!(client.is_null());
        assert_eq!(imrelay_last_error_code(), IMRELAY_ERR_CONNECT);
        let message = last_error();
        assert!(message.contains("TLS handshake failed"), "{message}");
    }
}

/// The first of `seen` is the relay closing the link.
fn assert_closed_by_relay_first(seen: &[Event]) {
    assert!(
        matches!(
            seen.first(),
            Some(Event::Disconnected {
                reason: DisconnectReason::ClosedByRelay,
                ..
            })
        ),
        "{seen:?}"
    );
}
