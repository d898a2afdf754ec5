//! TLS for the SDK's link (feature "tls"): what the app configures
//! ([`TlsClientOptions`], [`TlsTrust`]) and the rustls client session the driver
//! (`conn.rs`) puts between its socket and the core.
//!
//! The core ([`ClientCore`](super::ClientCore)) never sees TLS: it is told the link is up
//! (`handle_connected`) only once the handshake is done, so the connect timeout covers TCP
//! and TLS together, and a handshake that fails (bad certificate, wrong name, no common
//! protocol) is a connect failure like any other: [`DisconnectReason::Tls`] in a
//! `Disconnected` event, then the usual backoff and a new attempt.
//!
//! [`DisconnectReason::Tls`]: super::DisconnectReason::Tls
//!
//! # Trust
//!
//! - [`TlsTrust::SystemRoots`]: the platform's trust store, read by `rustls-native-certs`
//!   when the options are built: the Keychain on macOS, the system store on Windows, the
//!   distribution's CA bundle on Linux (or `SSL_CERT_FILE` / `SSL_CERT_DIR` if set). On
//!   Android the system CA directories (`/apex/com.android.conscrypt/cacerts`,
//!   `/system/etc/security/cacerts`) are read as well. On iOS there is no store a
//!   process can read this way: give the CA as PEM (or build your own rustls config with
//!   [`TlsClientOptions::from_rustls`]).
//! - [`TlsTrust::CaFile`] / [`TlsTrust::CaPem`]: only the CA certificates given (PEM,
//!   one or more), for a relay with a private CA or a self-signed certificate.
//!
//! Everything that can be wrong with the options (an unreadable CA file, a PEM with no
//! certificate, an empty system store, a server name that is neither a DNS name nor an IP
//! address) is an error when they are built, not at each connect.

use std::fmt;
use std::io::{self, BufRead, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::BytesMut;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig as RustlsConfig, ClientConnection, RootCertStore};

/// Where the relay's certificate must chain to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TlsTrust {
    /// The platform's trust store (see the module docs for each platform).
    SystemRoots,
    /// The CA certificates in this PEM file (one or more `CERTIFICATE` blocks).
    CaFile(PathBuf),
    /// The CA certificates in these PEM bytes.
    CaPem(Vec<u8>),
}

/// How the client connects over TLS: the name the relay's certificate must carry, and the
/// trust it must chain to. Built once (CA files are read here), cloned cheaply.
#[derive(Clone)]
pub struct TlsClientOptions {
    server_name: ServerName<'static>,
    config: Arc<RustlsConfig>,
}

impl fmt::Debug for TlsClientOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsClientOptions")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// Why [`TlsClientOptions`] could not be built.
#[derive(Debug)]
pub enum TlsSetupError {
    /// The server name is neither a DNS name nor an IP address.
    InvalidServerName(String),
    /// The CA file could not be read.
    ReadCa {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The CA PEM is malformed.
    BadPem(String),
    /// No usable CA certificate was found (the string says where it looked).
    NoTrustAnchors(String),
    /// rustls refused the configuration.
    Rustls(rustls::Error),
}

impl fmt::Display for TlsSetupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsSetupError::InvalidServerName(name) => {
                write!(f, "{name:?} is not a valid DNS name or IP address")
            }
            TlsSetupError::ReadCa { path, source } => {
                write!(f, "cannot read CA file {}: {source}", path.display())
            }
            TlsSetupError::BadPem(e) => write!(f, "bad CA PEM: {e}"),
            TlsSetupError::NoTrustAnchors(e) => write!(f, "no usable CA certificate: {e}"),
            TlsSetupError::Rustls(e) => write!(f, "TLS configuration refused: {e}"),
        }
    }
}

impl std::error::Error for TlsSetupError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TlsSetupError::ReadCa { source, .. } => Some(source),
            TlsSetupError::Rustls(e) => Some(e),
            _ => None,
        }
    }
}

impl TlsClientOptions {
    /// Options for a relay whose certificate names `server_name` (a DNS name or an IP
    /// address) and chains to `trust`. TLS 1.3 and 1.2, rustls's ring provider.
    pub fn new(server_name: &str, trust: TlsTrust) -> Result<TlsClientOptions, TlsSetupError> {
        let name = parse_server_name(server_name)?;
        let roots = match trust {
            TlsTrust::SystemRoots => system_roots()?,
            TlsTrust::CaFile(path) => {
                let pem = std::fs::read(&path).map_err(|source| TlsSetupError::ReadCa {
                    path: path.clone(),
                    source,
                })?;
                pem_roots(&pem, &path.display().to_string())?
            }
            TlsTrust::CaPem(pem) => pem_roots(&pem, "the CA PEM")?,
        };
        // The provider is named rather than taken from the process default, which rustls
        // cannot choose (and panics over) if another crate in the app enables aws-lc-rs.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = RustlsConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(TlsSetupError::Rustls)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(TlsClientOptions {
            server_name: name,
            config: Arc::new(config),
        })
    }

    /// [`TlsTrust::SystemRoots`].
    pub fn with_system_roots(server_name: &str) -> Result<TlsClientOptions, TlsSetupError> {
        TlsClientOptions::new(server_name, TlsTrust::SystemRoots)
    }

    /// [`TlsTrust::CaFile`].
    pub fn with_ca_file(
        server_name: &str,
        path: impl AsRef<Path>,
    ) -> Result<TlsClientOptions, TlsSetupError> {
        TlsClientOptions::new(server_name, TlsTrust::CaFile(path.as_ref().to_owned()))
    }

    /// [`TlsTrust::CaPem`].
    pub fn with_ca_pem(
        server_name: &str,
        pem: impl Into<Vec<u8>>,
    ) -> Result<TlsClientOptions, TlsSetupError> {
        TlsClientOptions::new(server_name, TlsTrust::CaPem(pem.into()))
    }

    /// An app's own rustls configuration (certificate pinning, a platform verifier, client
    /// certificates…), used as is.
    pub fn from_rustls(
        server_name: &str,
        config: Arc<RustlsConfig>,
    ) -> Result<TlsClientOptions, TlsSetupError> {
        Ok(TlsClientOptions {
            server_name: parse_server_name(server_name)?,
            config,
        })
    }

    /// The name the relay's certificate must carry.
    pub fn server_name(&self) -> &ServerName<'static> {
        &self.server_name
    }

    /// The rustls configuration every connection uses.
    pub fn rustls_config(&self) -> &Arc<RustlsConfig> {
        &self.config
    }
}

fn parse_server_name(name: &str) -> Result<ServerName<'static>, TlsSetupError> {
    ServerName::try_from(name.to_owned())
        .map_err(|_| TlsSetupError::InvalidServerName(name.to_owned()))
}

fn pem_roots(pem: &[u8], origin: &str) -> Result<RootCertStore, TlsSetupError> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| TlsSetupError::BadPem(format!("{origin}: {e}")))?;
        roots.add(cert).map_err(|e| {
            TlsSetupError::NoTrustAnchors(format!("{origin}: a certificate is unusable: {e}"))
        })?;
    }
    if roots.is_empty() {
        return Err(TlsSetupError::NoTrustAnchors(format!(
            "{origin} holds no CERTIFICATE block"
        )));
    }
    Ok(roots)
}

fn system_roots() -> Result<RootCertStore, TlsSetupError> {
    #[allow(unused_mut)]
    let mut found = rustls_native_certs::load_native_certs();
    #[cfg(target_os = "android")]
    for dir in [
        "/apex/com.android.conscrypt/cacerts",
        "/system/etc/security/cacerts",
    ] {
        let more = rustls_native_certs::load_certs_from_paths(None, Some(Path::new(dir)));
        found.certs.extend(more.certs);
    }
    let mut roots = RootCertStore::empty();
    let (_added, _ignored) = roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        let errors: Vec<String> = found.errors.iter().map(|e| e.to_string()).collect();
        return Err(TlsSetupError::NoTrustAnchors(if errors.is_empty() {
            "the system trust store is empty or not readable on this platform; \
             give the CA as a file or PEM"
                .to_string()
        } else {
            format!("the system trust store: {}", errors.join("; "))
        }));
    }
    Ok(roots)
}

// ---- the session the driver runs ------------------------------------------------------

/// What one [`Secure::read`] saw.
pub(super) enum TlsRead {
    /// The socket has nothing more now (plaintext, if any, was appended).
    WouldBlock,
    /// Some ciphertext was processed (plaintext, if any, was appended); read again.
    Progress,
    /// The relay closed: TCP EOF or TLS close_notify (plaintext before it was appended).
    Eof,
    /// A fatal TLS or socket error; the string says why.
    Failed(String),
}

/// A rustls client session over the driver's non-blocking socket.
pub(super) struct Secure {
    conn: ClientConnection,
}

impl fmt::Debug for Secure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Secure")
            .field("handshaking", &self.conn.is_handshaking())
            .finish_non_exhaustive()
    }
}

impl Secure {
    /// A session that will send its ClientHello at the next [`Secure::write_to`].
    pub(super) fn new(options: &TlsClientOptions) -> Result<Secure, String> {
        ClientConnection::new(options.config.clone(), options.server_name.clone())
            .map(|conn| Secure { conn })
            .map_err(|e| e.to_string())
    }

    /// True until the handshake is done.
    pub(super) fn is_handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    /// True while records (handshake flights, data, alerts) wait to be written.
    pub(super) fn wants_write(&self) -> bool {
        self.conn.wants_write()
    }

    /// Reads one chunk of ciphertext from `stream`, processes it, and appends the plaintext
    /// that came out to `rx`.
    pub(super) fn read(&mut self, stream: &mut TcpStream, rx: &mut BytesMut) -> TlsRead {
        let eof = match self.conn.read_tls(stream) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return TlsRead::WouldBlock,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return TlsRead::Progress,
            Err(e) => return TlsRead::Failed(format!("i/o error: {e}")),
        };
        if let Err(e) = self.conn.process_new_packets() {
            // The alert rustls queued for the relay, best effort: the link is gone anyway.
            let _ = self.conn.write_tls(stream);
            return TlsRead::Failed(e.to_string());
        }
        loop {
            let mut reader = self.conn.reader();
            match reader.fill_buf() {
                Ok([]) => return TlsRead::Eof, // close_notify
                Ok(chunk) => {
                    let n = chunk.len();
                    rx.extend_from_slice(chunk);
                    reader.consume(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return if eof { TlsRead::Eof } else { TlsRead::Progress };
                }
                // TCP EOF without close_notify: the relay (or the network) cut the link.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return TlsRead::Eof,
                Err(e) => return TlsRead::Failed(e.to_string()),
            }
        }
    }

    /// Encrypts as much of `plaintext` as the session takes now (it buffers at most
    /// rustls's default 64 KiB); returns how much it took.
    pub(super) fn send(&mut self, plaintext: &[u8]) -> io::Result<usize> {
        self.conn.writer().write(plaintext)
    }

    /// Writes pending records to `stream` once; as `Write::write`.
    pub(super) fn write_to(&mut self, stream: &mut TcpStream) -> io::Result<usize> {
        self.conn.write_tls(stream)
    }

    /// Queues close_notify and writes what it can without blocking.
    pub(super) fn close(&mut self, stream: &mut TcpStream) {
        self.conn.send_close_notify();
        while self.conn.wants_write() {
            match self.conn.write_tls(stream) {
                Ok(n) if n > 0 => {}
                _ => break,
            }
        }
    }
}
