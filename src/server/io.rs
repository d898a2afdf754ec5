//! The driver's reads: the raw descriptor of a mio socket, and [`read_into`] (shared with
//! the SDK, in [`crate::net`]).

use std::os::fd::{AsRawFd, RawFd};

use mio::net::TcpStream;

pub use crate::net::{read_at_most, read_into};

/// The socket's raw descriptor.
pub fn fd(stream: &TcpStream) -> RawFd {
    stream.as_raw_fd()
}
