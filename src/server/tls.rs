//! TLS for client connections: a sans-IO wrapper around rustls's [`ServerConnection`]
//! that the mio driver puts between a socket and the [`Relay`](crate::relay::Relay).
//!
//! Nothing here touches a socket. The driver hands [`TlsSession::receive`] the ciphertext
//! it read and gets the plaintext appended to the buffer it then gives to
//! `Relay::handle_read`; it hands [`TlsSession::send_vectored`] the slices of the core's
//! output queue and learns how many bytes were taken (that is what it reports to
//! `Relay::handle_written`); and it writes what [`TlsSession::write_to`] has pending
//! (handshake flights, alerts, records) to the socket.
//!
//! # Configuration
//!
//! [`load_server_config`] reads `--tls-cert` and `--tls-key`; with `--tls-client-ca`,
//! [`load_server_config_with_client_ca`] also requires every client to present a
//! certificate chaining to that CA (mutual TLS, rustls's `WebPkiClientVerifier`): a client
//! without one fails the handshake ([`TlsError::reason`] says "no client certificate" or
//! "client certificate refused").
//!
//! # What a session holds
//!
//! A hostile peer cannot make a session hold more than fixed amounts, whatever it sends:
//!
//! * **Incoming ciphertext.** `receive` feeds rustls at most what its buffer takes (4 KiB
//!   at a time) and processes every complete record before feeding more, so at rest rustls
//!   holds at most one incomplete record, shorter than [`MAX_RECORD_WIRE`] (18,437 bytes); a
//!   header declaring a longer record is an error at once. While rustls joins a handshake
//!   message fragmented over several records it holds the fragments too, up to
//!   [`MAX_HANDSHAKE_HELD`] (65,535 bytes): a message declared longer is an error from its
//!   header, and input that would take the buffer past it is [`TlsError::BufferFull`].
//! * **Incoming plaintext.** None at rest: `receive` moves all of it into the caller's
//!   buffer before it returns.
//! * **Outgoing ciphertext.** `send_vectored` takes no more plaintext than keeps the
//!   pending ciphertext under [`SEND_LIMIT`] (rustls's `set_buffer_limit`), so what waits
//!   is at most [`SEND_LIMIT`] plus the overhead of the records one call makes (at most 4,
//!   29 bytes each), plus what the protocol itself queues: the server's handshake flight
//!   (certificate chain included), session tickets, and the peer-provoked replies rustls
//!   caps (one queued KeyUpdate, one no_renegotiation warning, then a fatal error).
//!   Plaintext sent before the handshake completes waits in rustls, under its own
//!   [`SEND_LIMIT`], and is encrypted when it completes. [`TlsSession::held`] reports the
//!   total for the driver's memory accounting.
//! * **Fixed state.** About 2 KiB for a new session and 4 KiB for an established idle
//!   one, [`TlsSession`] itself (about 1.3 KB) included: measured over 200 sessions with a
//!   counting allocator, rustls 0.23.46.
//!
//! A stalled handshake holds these bytes until the relay's login deadline closes the
//! connection: TLS adds no timer of its own.
//!
//! # In the driver
//!
//! * Reading: read the socket into a ciphertext scratch buffer, `receive` it into the
//!   shared read buffer and call `Relay::handle_read` when plaintext came out. One
//!   `receive` appends at most its input's length plus one record (rustls may have held
//!   the start of that record). Then, if [`TlsSession::wants_write`], flush: the handshake
//!   needs its replies. On an error, write the queued alert best effort and close.
//! * Writing: offer the core's output slices to [`TlsSession::send_vectored`] and report
//!   what it took to `Relay::handle_written`; then [`TlsSession::write_to`] the socket
//!   while [`TlsSession::wants_write`]. A short write or WouldBlock is the socket's
//!   backpressure, as without TLS; `send_vectored` taking 0 with ciphertext pending is the
//!   same. The core's queue keeps whatever the session did not take.
//! * Closing: once `Relay::is_finished`, [`TlsSession::close_notify`] and write it best
//!   effort before the socket closes. [`TlsSession::peer_closed`] is the end of input,
//!   like a read of 0 bytes.

use std::fmt;
use std::io::{self, IoSlice, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::BytesMut;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{AlertDescription, ServerConfig, ServerConnection};

/// The content type of a TLS handshake record, the first byte of every ClientHello.
pub const HANDSHAKE_RECORD_TYPE: u8 = 0x16;

/// Most plaintext [`TlsSession::send_vectored`] lets wait as ciphertext: it takes nothing
/// more while this much is pending (rustls's `set_buffer_limit`). Also the most plaintext
/// it holds for encryption while the handshake runs.
pub const SEND_LIMIT: usize = 64 * 1024;

/// Every TLS record rustls accepts is shorter than this on the wire: it refuses a header
/// declaring 16 KiB of payload plus the 2 KiB of expansion RFC 5246 (6.2.3) allows, or
/// more. 5 bytes of header included.
pub const MAX_RECORD_WIRE: usize = 16 * 1024 + 2048 + 5;

/// Most incoming ciphertext rustls holds while it joins a handshake message fragmented
/// over several records (it refuses handshake messages larger than 64 KiB).
pub const MAX_HANDSHAKE_HELD: usize = 0xffff;

/// Upper estimate of one alert record on the wire (TLS 1.2 AES-GCM: 5-byte header, 8-byte
/// explicit nonce, 2-byte alert, 16-byte tag), counted after a fatal error queued one.
const ALERT_RECORD_MAX: usize = 32;

/// True when a connection's first byte starts a TLS handshake record (every ClientHello
/// does). No other protocol the relay speaks starts so: a binary frame's first byte is the
/// top byte of its length (0x16 would mean a frame of over 350 MB), and 0x16 is a control
/// character, so it starts neither a text line nor an HTTP request.
pub fn looks_like_tls(first_byte: u8) -> bool {
    first_byte == HANDSHAKE_RECORD_TYPE
}

// ---- configuration ---------------------------------------------------------------------

/// Why [`load_server_config`] refused the certificate or key.
#[derive(Debug)]
pub enum TlsConfigError {
    /// The file could not be read.
    Read {
        /// The file.
        path: PathBuf,
        /// Why it could not be read.
        source: io::Error,
    },
    /// The file has a PEM section that does not decode (a bad base64 body, a missing END
    /// line).
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        source: pem::Error,
    },
    /// The certificate file has no `CERTIFICATE` section.
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// The key file has no unencrypted private key (`PRIVATE KEY`, `RSA PRIVATE KEY` or
    /// `EC PRIVATE KEY`).
    NoKey {
        /// The file.
        path: PathBuf,
    },
    /// The private key is not the key of the chain's first certificate.
    KeyMismatch {
        /// The certificate file (empty from [`server_config`]).
        cert: PathBuf,
        /// The key file (empty from [`server_config`]).
        key: PathBuf,
    },
    /// rustls refused the chain or key (a key type it does not support, a certificate it
    /// cannot parse).
    Rejected(rustls::Error),
    /// `--tls-client-ca`: a certificate in the file is not a usable trust anchor.
    ClientCa {
        /// The CA file.
        path: PathBuf,
        /// Why it was refused.
        reason: String,
    },
}

impl fmt::Display for TlsConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsConfigError::Read { path, source } => {
                write!(f, "cannot read {}: {source}", path.display())
            }
            TlsConfigError::Pem { path, source } => {
                write!(f, "{} is not valid PEM: {source}", path.display())
            }
            TlsConfigError::NoCertificate { path } => {
                write!(f, "no CERTIFICATE found in {}", path.display())
            }
            TlsConfigError::NoKey { path } => write!(
                f,
                "no unencrypted private key (PKCS#8, PKCS#1 RSA or SEC1 EC) found in {}",
                path.display()
            ),
            TlsConfigError::KeyMismatch { cert, key } => write!(
                f,
                "the private key in {} does not match the certificate in {}",
                key.display(),
                cert.display()
            ),
            TlsConfigError::Rejected(e) => write!(f, "certificate or key refused: {e}"),
            TlsConfigError::ClientCa { path, reason } => {
                write!(f, "client CA {} refused: {reason}", path.display())
            }
        }
    }
}

impl std::error::Error for TlsConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TlsConfigError::Read { source, .. } => Some(source),
            TlsConfigError::Pem { source, .. } => Some(source),
            TlsConfigError::Rejected(e) => Some(e),
            _ => None,
        }
    }
}

/// Loads `--tls-cert` (a PEM chain, leaf first) and `--tls-key` (a PEM private key:
/// PKCS#8, PKCS#1 RSA or SEC1 EC; the two may be one file) into a server config for TLS
/// 1.3 and 1.2, no client certificates, no ALPN.
pub fn load_server_config(
    cert_path: &Path,
    key_path: &Path,
) -> Result<Arc<ServerConfig>, TlsConfigError> {
    let (certs, key) = load_identity(cert_path, key_path)?;
    server_config(certs, key).map_err(|e| name_paths(e, cert_path, key_path))
}

/// [`load_server_config`] for mutual TLS (`--tls-client-ca`): every client must present a
/// certificate that chains to one of the CERTIFICATEs in `client_ca_path` (PEM) and is fit
/// for client authentication; a client without one fails the handshake.
pub fn load_server_config_with_client_ca(
    cert_path: &Path,
    key_path: &Path,
    client_ca_path: &Path,
) -> Result<Arc<ServerConfig>, TlsConfigError> {
    let (certs, key) = load_identity(cert_path, key_path)?;
    let ca_pem = read_file(client_ca_path)?;
    let roots = CertificateDer::pem_slice_iter(&ca_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsConfigError::Pem {
            path: client_ca_path.to_owned(),
            source,
        })?;
    if roots.is_empty() {
        return Err(TlsConfigError::NoCertificate {
            path: client_ca_path.to_owned(),
        });
    }
    server_config_with_client_ca(certs, key, roots).map_err(|e| match e {
        TlsConfigError::ClientCa { reason, .. } => TlsConfigError::ClientCa {
            path: client_ca_path.to_owned(),
            reason,
        },
        e => name_paths(e, cert_path, key_path),
    })
}

/// The chain and key of [`load_server_config`], read and decoded.
fn load_identity(
    cert_path: &Path,
    key_path: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsConfigError> {
    let cert_pem = read_file(cert_path)?;
    let certs = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsConfigError::Pem {
            path: cert_path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsConfigError::NoCertificate {
            path: cert_path.to_owned(),
        });
    }
    let key_pem = if key_path == cert_path {
        cert_pem
    } else {
        read_file(key_path)?
    };
    let key = match PrivateKeyDer::from_pem_slice(&key_pem) {
        Ok(key) => key,
        Err(pem::Error::NoItemsFound) => {
            return Err(TlsConfigError::NoKey {
                path: key_path.to_owned(),
            })
        }
        Err(source) => {
            return Err(TlsConfigError::Pem {
                path: key_path.to_owned(),
                source,
            })
        }
    };
    Ok((certs, key))
}

/// Puts the file names into a [`TlsConfigError::KeyMismatch`] from [`server_config`].
fn name_paths(e: TlsConfigError, cert_path: &Path, key_path: &Path) -> TlsConfigError {
    match e {
        TlsConfigError::KeyMismatch { .. } => TlsConfigError::KeyMismatch {
            cert: cert_path.to_owned(),
            key: key_path.to_owned(),
        },
        e => e,
    }
}

/// [`load_server_config`] for a chain and key already in memory (DER). A
/// [`TlsConfigError::KeyMismatch`] from here names no paths.
pub fn server_config(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ServerConfig>, TlsConfigError> {
    build_config(certs, key, None)
}

/// [`load_server_config_with_client_ca`] for certificates already in memory (DER): clients
/// must present a certificate chaining to one of `client_roots`. Errors name no paths.
pub fn server_config_with_client_ca(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_roots: Vec<CertificateDer<'static>>,
) -> Result<Arc<ServerConfig>, TlsConfigError> {
    let client_ca = |reason: String| TlsConfigError::ClientCa {
        path: PathBuf::new(),
        reason,
    };
    let mut roots = rustls::RootCertStore::empty();
    for root in client_roots {
        roots.add(root).map_err(|e| client_ca(e.to_string()))?;
    }
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| client_ca(e.to_string()))?;
    build_config(certs, key, Some(verifier))
}

/// The crypto provider of every config. Named rather than taken from the process default,
/// which rustls cannot choose (and panics over) if another crate in the build enables
/// aws-lc-rs too.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn build_config(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_verifier: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
) -> Result<Arc<ServerConfig>, TlsConfigError> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsConfigError::Rejected)?;
    let builder = match client_verifier {
        Some(verifier) => builder.with_client_cert_verifier(verifier),
        None => builder.with_no_client_auth(),
    };
    let config = builder.with_single_cert(certs, key).map_err(|e| match e {
        rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
            TlsConfigError::KeyMismatch {
                cert: PathBuf::new(),
                key: PathBuf::new(),
            }
        }
        e => TlsConfigError::Rejected(e),
    })?;
    Ok(Arc::new(config))
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsConfigError> {
    std::fs::read(path).map_err(|source| TlsConfigError::Read {
        path: path.to_owned(),
        source,
    })
}

// ---- sessions --------------------------------------------------------------------------

/// Why a [`TlsSession`] failed. Every error but [`TlsError::Closed`] is fatal: the
/// session has queued an alert, which the driver may write before it closes the socket.
#[derive(Clone, Debug)]
pub enum TlsError {
    /// The handshake failed: the bytes were not TLS, the client offered nothing this
    /// server supports, the client refused the certificate, or it broke the protocol.
    Handshake(rustls::Error),
    /// After the handshake, the peer sent bytes that are not a valid record of this
    /// session (corrupt or forged records, unexpected messages) or a fatal alert.
    PeerSentGarbage(rustls::Error),
    /// rustls refused more incoming bytes: its buffer held [`MAX_HANDSHAKE_HELD`] bytes of
    /// a handshake message still incomplete (record headers count too, so a message just
    /// under 64 KiB spread over several records gets here). `receive` processes records
    /// as it feeds them, so nothing else fills the buffer.
    BufferFull,
    /// `send` after [`TlsSession::close_notify`].
    Closed,
}

impl TlsError {
    /// The rustls error behind this one, if any.
    pub fn rustls_error(&self) -> Option<&rustls::Error> {
        match self {
            TlsError::Handshake(e) | TlsError::PeerSentGarbage(e) => Some(e),
            TlsError::BufferFull | TlsError::Closed => None,
        }
    }

    /// A short, fixed reason for logs and metrics labels ("not TLS", "decrypt failed",
    /// "client rejected the certificate", ...).
    pub fn reason(&self) -> &'static str {
        match self {
            TlsError::Handshake(e) | TlsError::PeerSentGarbage(e) => rustls_reason(e),
            TlsError::BufferFull => "handshake message too large",
            TlsError::Closed => "session closed",
        }
    }
}

fn rustls_reason(e: &rustls::Error) -> &'static str {
    use rustls::{Error, InvalidMessage};
    match e {
        Error::InvalidMessage(
            InvalidMessage::InvalidContentType | InvalidMessage::UnknownProtocolVersion,
        ) => "not TLS",
        Error::InvalidMessage(_) => "malformed message",
        Error::PeerSentOversizedRecord => "oversized record",
        Error::DecryptError => "decrypt failed",
        Error::InappropriateMessage { .. } | Error::InappropriateHandshakeMessage { .. } => {
            "unexpected message"
        }
        Error::PeerIncompatible(_) => "no common protocol version, cipher suite or group",
        Error::PeerMisbehaved(_) => "peer misbehaved",
        Error::NoCertificatesPresented => "no client certificate",
        Error::InvalidCertificate(_) => "client certificate refused",
        Error::AlertReceived(
            AlertDescription::BadCertificate
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateRevoked
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnknownCA,
        ) => "client rejected the certificate",
        Error::AlertReceived(_) => "peer sent a fatal alert",
        _ => "TLS error",
    }
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsError::Handshake(e) => write!(f, "TLS handshake failed ({}): {e}", self.reason()),
            TlsError::PeerSentGarbage(e) => write!(f, "bad TLS input ({}): {e}", self.reason()),
            TlsError::BufferFull => {
                write!(f, "TLS input buffer full (handshake message too large)")
            }
            TlsError::Closed => write!(f, "TLS session already closed"),
        }
    }
}

impl std::error::Error for TlsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.rustls_error()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// One connection's TLS state: the server side of a handshake, then record protection.
/// See the [module docs](self) for how the driver uses it and what it holds.
pub struct TlsSession {
    conn: ServerConnection,
    /// Ciphertext waiting in `conn` to be written: exact while the session is healthy,
    /// an upper estimate after a fatal error queued an alert.
    pending_out: usize,
    /// Plaintext `send_vectored` took before the handshake let rustls encrypt it (counted
    /// until the handshake completes).
    early_plaintext: usize,
    /// The peer's close_notify was processed.
    peer_closed: bool,
    /// Our close_notify was queued.
    closed: bool,
    /// The fatal error, returned again by every later `receive` and `send`.
    failed: Option<TlsError>,
}

impl fmt::Debug for TlsSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSession")
            .field("handshaking", &self.conn.is_handshaking())
            .field("pending_out", &self.pending_out)
            .field("early_plaintext", &self.early_plaintext)
            .field("peer_closed", &self.peer_closed)
            .field("closed", &self.closed)
            .field("failed", &self.failed)
            .finish()
    }
}

impl TlsSession {
    /// A session waiting for a ClientHello.
    pub fn new(config: Arc<ServerConfig>) -> Result<TlsSession, TlsError> {
        let mut conn = ServerConnection::new(config).map_err(TlsError::Handshake)?;
        conn.set_buffer_limit(Some(SEND_LIMIT));
        Ok(TlsSession {
            conn,
            pending_out: 0,
            early_plaintext: 0,
            peer_closed: false,
            closed: false,
            failed: None,
        })
    }

    /// Takes ciphertext read from the socket, in any split (one byte at a time works),
    /// processes every complete record and appends all the plaintext they carried to
    /// `plaintext_out`. Returns how many plaintext bytes were appended. Handshake replies
    /// may now be pending: write them when [`TlsSession::wants_write`].
    ///
    /// Bytes after the peer's close_notify are ignored. On an error the session is dead:
    /// write the alert it queued (best effort) and close; `plaintext_out` may have had the
    /// plaintext of records before the bad one appended.
    pub fn receive(
        &mut self,
        mut ciphertext: &[u8],
        plaintext_out: &mut BytesMut,
    ) -> Result<usize, TlsError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let start = plaintext_out.len();
        while !ciphertext.is_empty() && !self.peer_closed {
            // Takes what rustls's buffer has room for (at most 4 KiB) and advances the
            // slice. Never called with an empty slice: rustls would take that for EOF.
            match self.conn.read_tls(&mut ciphertext) {
                Ok(0) => break,
                Ok(_) => {}
                Err(_) => return Err(self.fail(TlsError::BufferFull)),
            }
            let handshaking = self.conn.is_handshaking();
            let state = match self.conn.process_new_packets() {
                Ok(state) => state,
                Err(e) => {
                    let e = if handshaking {
                        TlsError::Handshake(e)
                    } else {
                        TlsError::PeerSentGarbage(e)
                    };
                    return Err(self.fail(e));
                }
            };
            self.pending_out = state.tls_bytes_to_write();
            self.peer_closed = state.peer_has_closed();
            let n = state.plaintext_bytes_to_read();
            if n > 0 {
                let at = plaintext_out.len();
                plaintext_out.resize(at + n, 0);
                if self
                    .conn
                    .reader()
                    .read_exact(&mut plaintext_out[at..])
                    .is_err()
                {
                    // rustls said it had `n` bytes; it cannot have fewer.
                    plaintext_out.truncate(at);
                    return Err(self.fail(TlsError::BufferFull));
                }
            }
        }
        if !self.conn.is_handshaking() {
            self.early_plaintext = 0;
        }
        Ok(plaintext_out.len() - start)
    }

    /// Encrypts as much of `plaintext` as fits under [`SEND_LIMIT`] into the pending
    /// ciphertext and returns how much it took (possibly 0: write the pending ciphertext
    /// first). Before the handshake completes, rustls holds the plaintext (under the same
    /// limit) and encrypts it when it completes.
    pub fn send(&mut self, plaintext: &[u8]) -> Result<usize, TlsError> {
        self.send_vectored(&[IoSlice::new(plaintext)])
    }

    /// [`TlsSession::send`] for a list of slices (such as the relay's output queue),
    /// taken in order; records span slice boundaries, so many small frames make few
    /// records.
    pub fn send_vectored(&mut self, plaintext: &[IoSlice<'_>]) -> Result<usize, TlsError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if self.closed {
            return Err(TlsError::Closed);
        }
        let before = self.pending_out;
        // Writing to rustls's plaintext sink does no I/O; it fails only if the session has
        // failed, which `failed` already says.
        let n = match self.conn.writer().write_vectored(plaintext) {
            Ok(n) => n,
            Err(_) => return Err(TlsError::Closed),
        };
        if n > 0 {
            self.sync();
            // Encrypted at once, the ciphertext grew; if not, the handshake is still
            // running and rustls holds the plaintext until it can encrypt it.
            if self.pending_out == before {
                self.early_plaintext += n;
            }
        }
        Ok(n)
    }

    /// True while ciphertext waits to be written (handshake flight, records, alerts).
    pub fn wants_write(&self) -> bool {
        self.conn.wants_write()
    }

    /// Bytes of ciphertext waiting to be written: exact while the session is healthy, an
    /// upper estimate after an error queued its alert.
    pub fn pending_ciphertext_len(&self) -> usize {
        if self.conn.wants_write() {
            self.pending_out
        } else {
            0
        }
    }

    /// Bytes the session holds for the connection beyond its fixed state, for memory
    /// accounting: pending ciphertext plus plaintext sent before the handshake completed,
    /// which rustls encrypts when it completes (it sends no TLS 1.3 half-RTT data, which
    /// [`server_config`] leaves off). Incoming ciphertext (at most one incomplete record,
    /// see the module docs) is not counted; it is bounded by [`MAX_HANDSHAKE_HELD`].
    pub fn held(&self) -> usize {
        self.pending_ciphertext_len() + self.early_plaintext
    }

    /// Writes pending ciphertext to `w` (one `write_vectored` of up to 64 records) and
    /// returns what `w` took. Returns `Ok(0)` without writing when nothing is pending, so
    /// call it only when [`TlsSession::wants_write`]; `w`'s errors (WouldBlock included)
    /// are returned as they are.
    pub fn write_to(&mut self, w: &mut impl Write) -> io::Result<usize> {
        let n = self.conn.write_tls(w)?;
        self.pending_out = self.pending_out.saturating_sub(n);
        Ok(n)
    }

    /// Moves all pending ciphertext to the end of `out`; returns how many bytes.
    pub fn take_ciphertext(&mut self, out: &mut Vec<u8>) -> usize {
        let mut total = 0;
        while self.conn.wants_write() {
            match self.conn.write_tls(out) {
                Ok(n) => total += n,
                Err(_) => break,
            }
        }
        self.pending_out = 0;
        total
    }

    /// True until the handshake completes.
    pub fn is_handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    /// Queues a close_notify alert (once); write it, then close or shut down the socket.
    /// `send` refuses from now on; `receive` still works, as TLS allows.
    pub fn close_notify(&mut self) {
        if self.closed {
            return;
        }
        self.closed = true;
        self.conn.send_close_notify();
        self.sync();
    }

    /// True once the peer's close_notify has been received: it sends nothing more, and
    /// the driver may treat it as end of input.
    pub fn peer_closed(&self) -> bool {
        self.peer_closed
    }

    /// The fatal error the session has hit, if any.
    pub fn error(&self) -> Option<&TlsError> {
        self.failed.as_ref()
    }

    /// The negotiated protocol version, once the handshake has chosen one.
    pub fn protocol_version(&self) -> Option<rustls::ProtocolVersion> {
        self.conn.protocol_version()
    }

    /// The server name the client asked for (SNI), if it sent one.
    pub fn server_name(&self) -> Option<&str> {
        self.conn.server_name()
    }

    /// Records a fatal error; rustls has queued its alert.
    fn fail(&mut self, e: TlsError) -> TlsError {
        if self.conn.wants_write() {
            self.pending_out += ALERT_RECORD_MAX;
        }
        self.failed = Some(e.clone());
        e
    }

    /// Refreshes `pending_out` from rustls. Processing with no new input only reports
    /// state: `receive` leaves no complete record unprocessed.
    fn sync(&mut self) {
        if self.failed.is_some() {
            return;
        }
        if let Ok(state) = self.conn.process_new_packets() {
            self.pending_out = state.tls_bytes_to_write();
        }
    }
}

#[cfg(test)]
mod tests;
