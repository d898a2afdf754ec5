//! File-descriptor limits: how many connections this process can hold.

use log::warn;

/// Descriptors kept free for the listener, the poller, the waker, logging and the one
/// socket accepted only to be refused at the connection limit.
pub const RESERVED_FDS: u64 = 32;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns the soft limit now in
/// force (unchanged if raising failed, which is logged).
pub fn raise_fd_limit() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(e) => {
            warn!("could not raise the fd limit: {e}");
            rlimit::getrlimit(rlimit::Resource::NOFILE)
                .map(|(soft, _)| soft)
                .unwrap_or(1024)
        }
    }
}
