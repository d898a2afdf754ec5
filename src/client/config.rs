//! What an app chooses about its connection: who it is, how it proves it, TLS, and the
//! clocks of the link.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

#[cfg(feature = "tls")]
use super::tls::TlsClientOptions;
use crate::proto::UserId;

/// Gives the client a login token for a user: called at every connect and reconnect (for
/// the LOGIN) and when the relay announces that the token expires soon (for the REFRESH).
///
/// It runs on the thread that drives the client (inside `Connection`'s or `Client`'s
/// calls), so it should return quickly: a token cached by the app, refreshed in the
/// background, is the usual shape. An empty token means "none available now": a LOGIN
/// goes out with it anyway (a relay without token checks accepts it), a REFRESH is not
/// sent.
pub type TokenProvider = Arc<dyn Fn(UserId) -> Vec<u8> + Send + Sync>;

/// What the client does while the app is in the background
/// ([`ClientCore::set_foreground`](super::ClientCore::set_foreground)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Background {
    /// Keep the link, heartbeating as seldom as the relay allows: at the upper heartbeat
    /// bound from LOGIN_OK (the configured or learned interval with a relay that sends no
    /// bounds). The default.
    #[default]
    KeepAlive,
    /// Keep the link this long in the background, then close it cleanly (BYE) and do not
    /// reconnect until the app is in the foreground again, which reconnects at once.
    DisconnectAfter(Duration),
}

/// Settings of one client. [`ClientConfig::new`] gives the defaults a phone app wants.
#[derive(Clone)]
pub struct ClientConfig {
    /// The user this client logs in as (not 0).
    pub user: UserId,
    /// The opaque credential sent in LOGIN when there is no `token_provider` (a static
    /// token, or none for a relay that checks none).
    pub credential: Vec<u8>,
    /// This install's device id, sent in every LOGIN (protocol.md, section 15.1): each
    /// device of a user gets every stored message, and messages the user sends stored are
    /// copied to the user's other devices. 1 to 64 bytes of UTF-8 without control
    /// characters, the same for every run of the app: [`super::device_id_in`] makes one and
    /// keeps it in a file. Default none: the user's default device (shared by every client
    /// that names none).
    pub device: Option<String>,
    /// Where login tokens come from when they expire (JWTs, protocol.md section 16):
    /// asked at every (re)connect and at each TOKEN_EXPIRING. Takes the place of
    /// `credential` when set (default none).
    pub token_provider: Option<TokenProvider>,
    /// Connect over TLS (default none: plain TCP).
    #[cfg(feature = "tls")]
    pub tls: Option<TlsClientOptions>,
    /// Send a PING after this much silence from the relay (default 20 s). With a relay that
    /// announces heartbeat bounds this is the start value of the adaptive interval
    /// (`heartbeat.rs`), brought within the bounds; without, it is the fixed interval.
    pub heartbeat_interval: Duration,
    /// Declare the link dead when nothing arrives this long after a PING (default 10 s).
    pub heartbeat_timeout: Duration,
    /// Give up on a TCP connect, TLS handshake included, after this long (default 10 s).
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
    /// What to do while the app is in the background (default
    /// [`Background::KeepAlive`]).
    pub background: Background,
}

impl ClientConfig {
    /// The defaults for `user`, with an empty credential.
    pub fn new(user: UserId) -> ClientConfig {
        ClientConfig {
            user,
            credential: Vec::new(),
            device: None,
            token_provider: None,
            #[cfg(feature = "tls")]
            tls: None,
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
            background: Background::KeepAlive,
        }
    }
}

impl fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("ClientConfig");
        d.field("user", &self.user)
            // A credential is a secret: its length only.
            .field(
                "credential",
                &format_args!("[{} bytes]", self.credential.len()),
            )
            .field("device", &self.device)
            .field(
                "token_provider",
                &self
                    .token_provider
                    .as_ref()
                    .map(|_| "Fn(UserId) -> Vec<u8>"),
            );
        #[cfg(feature = "tls")]
        d.field("tls", &self.tls);
        d.field("heartbeat_interval", &self.heartbeat_interval)
            .field("heartbeat_timeout", &self.heartbeat_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("login_timeout", &self.login_timeout)
            .field("backoff_initial", &self.backoff_initial)
            .field("backoff_max", &self.backoff_max)
            .field("max_in_flight", &self.max_in_flight)
            .field("max_outbox", &self.max_outbox)
            .field("retry_interval", &self.retry_interval)
            .field("send_timeout", &self.send_timeout)
            .field("seen_window", &self.seen_window)
            .field("stored_inbox", &self.stored_inbox)
            .field("inbox_ack_batch", &self.inbox_ack_batch)
            .field("inbox_ack_delay", &self.inbox_ack_delay)
            .field("background", &self.background)
            .finish()
    }
}
