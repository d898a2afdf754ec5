//! What an app chooses about its connection: who it is, and the clocks of the link.

use std::time::Duration;

use crate::proto::UserId;

/// Settings of one client. [`ClientConfig::new`] gives the defaults a phone app wants.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// The user this client logs in as (not 0).
    pub user: UserId,
    /// The opaque credential sent in LOGIN.
    pub credential: Vec<u8>,
    /// Send a PING after this much silence from the relay (default 20 s).
    pub heartbeat_interval: Duration,
    /// Declare the link dead when nothing arrives this long after a PING (default 10 s).
    pub heartbeat_timeout: Duration,
    /// Give up on a TCP connect after this long (default 10 s).
    pub connect_timeout: Duration,
    /// Give up on a LOGIN that gets no answer after this long (default 10 s).
    pub login_timeout: Duration,
    /// The first reconnect waits about this long (default 500 ms)…
    pub backoff_initial: Duration,
    /// …and each failed attempt doubles it up to this (default 30 s). The real wait is
    /// drawn uniformly from the upper half of the current step (jitter), so a relay restart
    /// does not see every phone come back in the same millisecond.
    pub backoff_max: Duration,
    /// Messages sent and not yet ACKed at any time (default 16). The relay remembers 256
    /// ids per user for de-duplication, so 16 devices × 16 stay within its window.
    pub max_in_flight: usize,
    /// Messages waiting in the outbox, sent or not (default 1024). `send` fails past it.
    pub max_outbox: usize,
    /// How long to wait before writing a message again after the relay answered "try
    /// later": RECIPIENT_SLOW, or RECIPIENT_OFFLINE for a resend (default 1 s).
    pub retry_interval: Duration,
    /// A message not ACKed this long after `send` is reported failed (default 60 s).
    pub send_timeout: Duration,
    /// Delivered (sender, id) pairs remembered to drop duplicates (default 4096).
    pub seen_window: usize,
    /// Receive stored messages: send INBOX_SYNC after each login (default true).
    pub stored_inbox: bool,
    /// Acknowledge stored messages once this many were taken by the app (default 32)…
    pub inbox_ack_batch: u64,
    /// …or this long after the first one not yet acknowledged (default 100 ms).
    pub inbox_ack_delay: Duration,
}

impl ClientConfig {
    /// The defaults for `user`, with an empty credential.
    pub fn new(user: UserId) -> ClientConfig {
        ClientConfig {
            user,
            credential: Vec::new(),
            heartbeat_interval: Duration::from_secs(20),
            heartbeat_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            login_timeout: Duration::from_secs(10),
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            max_in_flight: 16,
            max_outbox: 1024,
            retry_interval: Duration::from_secs(1),
            send_timeout: Duration::from_secs(60),
            seen_window: 4096,
            stored_inbox: true,
            inbox_ack_batch: 32,
            inbox_ack_delay: Duration::from_millis(100),
        }
    }
}
