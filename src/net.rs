//! The one raw read, shared by the relay's driver and the SDK: into a `BytesMut`'s spare
//! capacity, without zeroing it first.

use std::os::fd::RawFd;

use bytes::{BufMut, BytesMut};

/// Reads once from `fd` into the spare capacity of `buf` and extends `buf` by what was read.
/// The caller reserves space first; with no spare capacity this reads nothing.
pub fn read_into(fd: RawFd, buf: &mut BytesMut) -> std::io::Result<usize> {
    read_at_most(fd, buf, usize::MAX)
}

/// [`read_into`], reading at most `max` bytes.
pub fn read_at_most(fd: RawFd, buf: &mut BytesMut, max: usize) -> std::io::Result<usize> {
    let spare = buf.chunk_mut();
    let len = spare.len().min(max);
    // SAFETY: `spare` is valid writable memory of `len` bytes owned by `buf`; read(2) writes
    // at most `len` bytes into it and reports how many, and no reference to uninitialised
    // memory is formed.
    let n = unsafe { libc::read(fd, spare.as_mut_ptr().cast(), len) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let n = n as usize;
    // SAFETY: read(2) initialised the first `n` bytes of the spare capacity.
    unsafe { buf.advance_mut(n) };
    Ok(n)
}
