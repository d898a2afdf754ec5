//! A build without the "tls" feature: the driver's TLS session type has no values, so
//! every TLS branch of `conn.rs` compiles and none can run.

use std::io;
use std::net::TcpStream;

use bytes::BytesMut;

/// What one `Secure::read` saw (as in `tls.rs`).
#[allow(dead_code)]
pub(super) enum TlsRead {
    WouldBlock,
    Progress,
    Eof,
    Failed(String),
}

/// No TLS session can exist in this build.
#[derive(Debug)]
pub(super) enum Secure {}

impl Secure {
    pub(super) fn is_handshaking(&self) -> bool {
        match *self {}
    }

    pub(super) fn wants_write(&self) -> bool {
        match *self {}
    }

    pub(super) fn read(&mut self, _stream: &mut TcpStream, _rx: &mut BytesMut) -> TlsRead {
        match *self {}
    }

    pub(super) fn send(&mut self, _plaintext: &[u8]) -> io::Result<usize> {
        match *self {}
    }

    pub(super) fn write_to(&mut self, _stream: &mut TcpStream) -> io::Result<usize> {
        match *self {}
    }

    pub(super) fn close(&mut self, _stream: &mut TcpStream) {
        match *self {}
    }
}
