//! TLS for the bench's connections (protocol.md section 17): which certificate to trust and
//! which name to expect, a self-signed certificate for a relay the bench spawns, the
//! temporary directory such files live in, and the nonblocking client plumbing the engines
//! use over their mio sockets.

use std::io::{self, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};

use clap::Args;
use imrelay::client::TlsClientOptions;
use rustls::{ClientConnection, StreamOwned};

/// The TLS flags of the modes that speak it.
#[derive(Args, Clone, Debug)]
pub struct TlsArgs {
    /// Speak TLS on every connection (TLS 1.3 or 1.2, the relay's choice). With --spawn the
    /// bench makes a self-signed ECDSA P-256 certificate and starts the relay with
    /// --tls-cert/--tls-key; with --addr give --tls-ca.
    #[arg(long)]
    pub tls: bool,
    /// With --addr: the certificate(s) to trust (PEM): the relay's CA, or its self-signed
    /// certificate if that is not marked as a CA (webpki refuses a CA certificate as the
    /// server's own: `openssl req -x509` needs `-addext basicConstraints=critical,CA:FALSE`).
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// The name the relay's certificate must carry.
    #[arg(long, default_value = "localhost")]
    pub tls_server_name: String,
}

impl Default for TlsArgs {
    fn default() -> TlsArgs {
        TlsArgs {
            tls: false,
            tls_ca: None,
            tls_server_name: "localhost".into(),
        }
    }
}

/// A client configuration and the server name to connect with: one per run, cheap to
/// clone into threads. The SDK's own TLS options (rustls with ring, TLS 1.3 and 1.2).
#[derive(Clone)]
pub struct TlsClient(TlsClientOptions);

impl TlsClient {
    /// Trusts the PEM certificates in `path` (CA or self-signed) and expects `name`.
    pub fn from_ca_file(path: &Path, name: &str) -> Result<TlsClient, String> {
        TlsClientOptions::with_ca_file(name, path)
            .map(TlsClient)
            .map_err(|e| format!("--tls-ca {}: {e}", path.display()))
    }

    /// A new client session (nothing sent yet).
    pub fn session(&self) -> Result<ClientConnection, String> {
        let (config, name) = (self.0.rustls_config(), self.0.server_name());
        ClientConnection::new(config.clone(), name.clone()).map_err(|e| e.to_string())
    }
}

/// A blocking socket of the setup phase, plaintext or TLS; the engine takes it apart.
pub enum Sock {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Sock::Plain(s) => s.read(buf),
            Sock::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sock::Plain(s) => s.write(buf),
            Sock::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sock::Plain(s) => s.flush(),
            Sock::Tls(s) => s.flush(),
        }
    }
}

/// Starts TLS on a connected blocking socket and queues `first` (plaintext) behind the
/// handshake: the ClientHello goes out now, `first` when the handshake completes (which
/// the first read drives), so many sockets can be started before any is waited for.
pub fn start(client: &TlsClient, mut sock: TcpStream, first: &[u8]) -> Result<Sock, String> {
    let mut conn = client.session()?;
    conn.writer()
        .write_all(first)
        .map_err(|e| format!("TLS: {e}"))?;
    while conn.wants_write() {
        conn.write_tls(&mut sock)
            .map_err(|e| format!("TLS write: {e}"))?;
    }
    Ok(Sock::Tls(Box::new(StreamOwned::new(conn, sock))))
}

/// Ciphertext buffered between the socket and rustls: a nonblocking connection reads the
/// socket in large chunks (rustls's own `read_tls` takes 4 KiB at a time) and feeds rustls
/// from here.
pub struct CipherIn {
    buf: Vec<u8>,
    pos: usize,
    len: usize,
}

impl CipherIn {
    pub fn new(size: usize) -> CipherIn {
        CipherIn {
            buf: vec![0; size],
            pos: 0,
            len: 0,
        }
    }
}

/// Reads plaintext from a nonblocking TLS connection into `out`, like `Read::read` on a
/// plaintext socket: `Ok(0)` when the peer closed (close_notify or end of stream),
/// `WouldBlock` only once the socket itself has none left (so edge-triggered polling stays
/// correct). Anything rustls wants to send in return (a handshake flight, an alert) is left
/// for [`write_tls`].
pub fn read_plain(
    tls: &mut ClientConnection,
    sock: &mut impl Read,
    cipher: &mut CipherIn,
    out: &mut [u8],
) -> io::Result<usize> {
    loop {
        match tls.reader().read(out) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        if cipher.pos == cipher.len {
            let n = loop {
                match sock.read(&mut cipher.buf) {
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    other => break other?,
                }
            };
            if n == 0 {
                return Ok(0);
            }
            cipher.pos = 0;
            cipher.len = n;
        }
        let mut pending = &cipher.buf[cipher.pos..cipher.len];
        let fed = tls.read_tls(&mut pending)?;
        cipher.pos += fed;
        tls.process_new_packets()
            .map_err(|e| io::Error::new(ErrorKind::InvalidData, e))?;
    }
}

/// Writes what rustls has to send until it has nothing or the socket would block:
/// `Ok(true)` when everything went out.
pub fn write_tls(tls: &mut ClientConnection, sock: &mut impl Write) -> io::Result<bool> {
    while tls.wants_write() {
        match tls.write_tls(sock) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Encrypts `out[*pos..]` and writes it to a nonblocking socket, as far as the socket
/// takes it; `*pos` advances over what rustls took. `Ok(true)` when rustls took all of it
/// and has nothing left to send (after the handshake: all of it is on the socket);
/// `Ok(false)` when the socket would block (a writable event follows) or, before the
/// handshake completes, when rustls holds the plaintext until it does.
pub fn write_plain(
    tls: &mut ClientConnection,
    sock: &mut impl Write,
    out: &[u8],
    pos: &mut usize,
) -> io::Result<bool> {
    loop {
        if !write_tls(tls, sock)? {
            return Ok(false);
        }
        if *pos == out.len() {
            return Ok(true);
        }
        // rustls takes up to its buffer limit (64 KiB) and encrypts it into records.
        let n = tls.writer().write(&out[*pos..])?;
        *pos += n;
        if n == 0 && !tls.wants_write() {
            // Nothing taken and nothing to send: the handshake is still going; its next
            // flight (driven by reads) lets the plaintext out.
            return Ok(false);
        }
    }
}

/// A directory under the system's temp dir for one run's files (certificates, keys,
/// secrets), readable by this user only, removed when dropped.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(purpose: &str) -> Result<TempDir, String> {
        use std::os::unix::fs::DirBuilderExt;
        let mut tag = [0u8; 8];
        random_fill(&mut tag)?;
        let path = std::env::temp_dir().join(format!(
            "imrelay-bench-{purpose}-{}-{:016x}",
            std::process::id(),
            u64::from_ne_bytes(tag)
        ));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        Ok(TempDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `contents` to `name` in the directory (mode 0600) and returns its path.
    pub fn write(&self, name: &str, contents: &[u8]) -> Result<PathBuf, String> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.path.join(name);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut f| f.write_all(contents))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        Ok(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Fills `buf` from the system's secure random source (ring's, through rustls).
pub fn random_fill(buf: &mut [u8]) -> Result<(), String> {
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(buf)
        .map_err(|_| "no secure random source".to_string())
}

/// The files a spawned relay is given (`--tls-cert`, `--tls-key`) and the client that
/// trusts them.
pub struct SelfSigned {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client: TlsClient,
}

/// A self-signed ECDSA P-256 certificate for `name` (and 127.0.0.1) written into `dir`.
pub fn self_signed(dir: &TempDir, name: &str) -> Result<SelfSigned, String> {
    let made = rcgen::generate_simple_self_signed(vec![name.to_string(), "127.0.0.1".into()])
        .map_err(|e| format!("cannot make a certificate: {e}"))?;
    let cert = dir.write("cert.pem", made.cert.pem().as_bytes())?;
    let key = dir.write("key.pem", made.signing_key.serialize_pem().as_bytes())?;
    let client = TlsClient::from_ca_file(&cert, name)?;
    Ok(SelfSigned { cert, key, client })
}
