//! Relay limits and their defaults (protocol.md, "Limits").

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::auth::Verifier;

use crate::proto::{UserId, DEFAULT_MAX_FRAME, HEADER_LEN, MAX_FRAME_CEILING};

/// Every limit the relay core enforces. The driver adds none of its own except the read
/// budget per event, which bounds latency, not memory.
#[derive(Clone, Debug)]
pub struct Config {
    /// Largest frame accepted, header included (default 64 KiB).
    pub max_frame: u32,
    /// Serve the H5 demo page and its module on a plain HTTP GET (default off: 404).
    pub demo: bool,
    /// Most connections open at once; one more is refused with LIMIT_REACHED.
    pub max_connections: usize,
    /// Most connections one user id may have logged in at once (default 16).
    pub max_devices_per_user: usize,
    /// Per-connection output queue cap in bytes (default 1 MiB). A SEND that would push a
    /// recipient past it gets RECIPIENT_SLOW; a connection past it is not read from until
    /// its queue drains below half.
    pub out_cap: usize,
    /// Time a new connection has to log in (default 10 s).
    pub login_timeout: Duration,
    /// Time a text-mode connection (protocol.md section 12: a person typing, who may read
    /// HELP first) has to log in, counted from the connection's start (default 120 s).
    pub text_login_timeout: Duration,
    /// Silence after which the relay sends PING (default 30 s).
    pub ping_interval: Duration,
    /// Silence after which the relay closes the connection (default 90 s).
    pub idle_timeout: Duration,
    /// The shortest heartbeat interval a client may use, announced in LOGIN_OK to a LOGIN
    /// with the HEARTBEAT flag (protocol.md, section 5.2). Above 0 and at most the ping
    /// interval. Default none: [`DEFAULT_HEARTBEAT_MIN`], or the ping interval when that is
    /// shorter (see [`Config::heartbeat_min`]).
    pub heartbeat_min: Option<Duration>,
    /// Most rooms one connection may be in (default 64).
    pub max_rooms_per_connection: usize,
    /// Most connections one room may hold (default 100,000).
    pub max_members_per_room: usize,
    /// ROOM_SEND and BROADCAST frames per second per connection; 0 = unlimited (default 50).
    pub room_send_rate: u32,
    /// How many ROOM_SEND frames may come at once before the rate applies (default 100).
    pub room_send_burst: u32,
    /// Users allowed to BROADCAST to every connection.
    pub admins: Vec<UserId>,
    /// DEDUP SEND ids remembered per sender (default 256: 16 devices × the SDK's 16
    /// messages in flight).
    pub dedup_window: usize,
    /// How long a sender's ids are remembered after its last DEDUP SEND (default 5 min).
    pub dedup_ttl: Duration,
    /// DEDUP SEND ids remembered over all senders (default 1,000,000, about 24 MiB).
    pub dedup_max_entries: usize,
    /// Stored messages one user's inbox may hold (default 10,000).
    pub inbox_max_messages: usize,
    /// Bytes one user's inbox may hold, each message counted as its SEND frame's length
    /// plus 80 (default 16 MiB).
    pub inbox_max_bytes: usize,
    /// How long a stored message waits for its recipient (default 7 days).
    pub inbox_ttl: Duration,
    /// Devices of one user whose stored-delivery cursors are kept (default 16); past it the
    /// least recently seen is forgotten.
    pub inbox_max_devices: usize,
    /// How long a device may go without INBOX_SYNC or INBOX_ACK before its cursor is
    /// forgotten and no longer holds messages back (default 30 days).
    pub device_retention: Duration,
    /// Users with an inbox (default 1,000,000).
    pub store_max_users: usize,
    /// Stored bytes over all inboxes, counted as per inbox (default 1 GiB).
    pub store_max_bytes: usize,
    /// Memory all connections may hold together: output queues (counted as
    /// [`super::OutQueue::held`]) and partial input (default 1 GiB; the binary derives its
    /// default from the machine's memory). Past it a SEND gets RECIPIENT_SLOW, room traffic
    /// is dropped as for slow members, and a connection that needs more input buffer is
    /// closed with LIMIT_REACHED.
    pub max_memory: usize,
    /// Time a started frame, text line, HTTP request head or WebSocket message has to
    /// arrive whole, however slowly its bytes trickle in (default 30 s). Past it the
    /// connection is closed with FRAME_TIMEOUT.
    pub frame_timeout: Duration,
    /// Login tokens (protocol.md section 16). `None`: any LOGIN is accepted as the user it
    /// names (development only; the binary refuses it on a public address).
    pub auth: Option<AuthConfig>,
    /// Most connections open at once from one IP address (default 256; 0: no limit).
    pub max_connections_per_ip: usize,
    /// The per-address limit applies to loopback addresses too (default off, so local
    /// tests and benches are not limited).
    pub limit_loopback: bool,
    /// ROOM_SEND frames per second into one room, from all its members together; 0 =
    /// unlimited (default 1,000).
    pub room_total_rate: u32,
    /// How many ROOM_SEND frames one room takes at once before its total rate applies
    /// (default 2,000).
    pub room_total_burst: u32,
}

impl Config {
    /// The stored-delivery limits.
    pub fn inbox_limits(&self) -> super::InboxLimits {
        super::InboxLimits {
            max_messages: self.inbox_max_messages,
            max_bytes: self.inbox_max_bytes,
            ttl: self.inbox_ttl,
            max_users: self.store_max_users,
            max_total_bytes: self.store_max_bytes,
            max_devices: self.inbox_max_devices,
            device_retention: self.device_retention,
        }
    }

    /// Room traffic is dropped for a member whose output queue would pass this many bytes:
    /// half the output cap, so room floods always leave room for direct messages.
    pub fn room_cap(&self) -> usize {
        self.out_cap / 2
    }
}

/// How login tokens are checked.
#[derive(Clone)]
pub struct AuthConfig {
    /// The key and the pinned algorithm.
    pub verifier: Arc<Verifier>,
    /// How long before a token's `exp` the relay sends TOKEN_EXPIRING (default 60 s).
    pub notice: Duration,
}

impl AuthConfig {
    /// Tokens checked by `verifier`, with the default notice.
    pub fn new(verifier: Verifier) -> AuthConfig {
        AuthConfig {
            verifier: Arc::new(verifier),
            notice: DEFAULT_TOKEN_NOTICE,
        }
    }
}

impl fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthConfig")
            .field("algorithm", &self.verifier.algorithm())
            .field("notice", &self.notice)
            .finish()
    }
}

/// The heartbeat bound [`Config::heartbeat_min`] gives when none is set (unless the ping
/// interval is shorter).
pub const DEFAULT_HEARTBEAT_MIN: Duration = Duration::from_secs(10);

/// Default of [`AuthConfig::notice`].
pub const DEFAULT_TOKEN_NOTICE: Duration = Duration::from_secs(60);

impl Default for Config {
    fn default() -> Config {
        Config {
            max_frame: DEFAULT_MAX_FRAME,
            demo: false,
            max_connections: 10_000,
            max_devices_per_user: 16,
            out_cap: 1024 * 1024,
            login_timeout: Duration::from_secs(10),
            text_login_timeout: Duration::from_secs(120),
            ping_interval: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(90),
            heartbeat_min: None,
            max_rooms_per_connection: 64,
            max_members_per_room: 100_000,
            room_send_rate: 50,
            room_send_burst: 100,
            admins: Vec::new(),
            dedup_window: 256,
            dedup_ttl: Duration::from_secs(300),
            dedup_max_entries: 1_000_000,
            inbox_max_messages: 10_000,
            inbox_max_bytes: 16 * 1024 * 1024,
            inbox_ttl: Duration::from_secs(7 * 24 * 3600),
            inbox_max_devices: 16,
            device_retention: Duration::from_secs(30 * 24 * 3600),
            store_max_users: 1_000_000,
            store_max_bytes: 1024 * 1024 * 1024,
            max_memory: 1024 * 1024 * 1024,
            frame_timeout: Duration::from_secs(30),
            auth: None,
            max_connections_per_ip: 256,
            limit_loopback: false,
            room_total_rate: 1000,
            room_total_burst: 2000,
        }
    }
}

/// A configuration that cannot work, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigError {
    /// max_frame outside 33 ..= 1 MiB.
    MaxFrame(u32),
    /// out_cap below twice max_frame: a single room frame could never be queued.
    OutCapBelowMaxFrame,
    /// ping_interval not below idle_timeout: the relay would close before it pings.
    PingNotBeforeIdle,
    /// heartbeat_min set to 0 or above the ping interval.
    HeartbeatMin,
    /// A limit that must be at least 1 is 0.
    Zero(&'static str),
    /// max_memory below twice the output cap: one slow recipient could use it all.
    MemoryBelowOutCap,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::MaxFrame(v) => write!(
                f,
                "max frame {v} is outside {}..={MAX_FRAME_CEILING}",
                HEADER_LEN + 1
            ),
            ConfigError::OutCapBelowMaxFrame => {
                write!(f, "output cap is below twice the max frame")
            }
            ConfigError::PingNotBeforeIdle => {
                write!(f, "ping interval must be shorter than the idle timeout")
            }
            ConfigError::HeartbeatMin => write!(
                f,
                "heartbeat min must be above 0 and at most the ping interval"
            ),
            ConfigError::Zero(name) => write!(f, "{name} must be at least 1"),
            ConfigError::MemoryBelowOutCap => {
                write!(f, "max memory is below twice the output cap")
            }
        }
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// The shortest heartbeat interval announced to clients: `heartbeat_min` when set,
    /// else [`DEFAULT_HEARTBEAT_MIN`] capped at the ping interval.
    pub fn heartbeat_min(&self) -> Duration {
        self.heartbeat_min
            .unwrap_or(DEFAULT_HEARTBEAT_MIN.min(self.ping_interval))
    }

    /// Checks that the limits are coherent.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_frame as usize <= HEADER_LEN || self.max_frame > MAX_FRAME_CEILING {
            return Err(ConfigError::MaxFrame(self.max_frame));
        }
        if self.room_cap() < self.max_frame as usize {
            return Err(ConfigError::OutCapBelowMaxFrame);
        }
        if self.ping_interval >= self.idle_timeout {
            return Err(ConfigError::PingNotBeforeIdle);
        }
        if self
            .heartbeat_min
            .is_some_and(|min| min.is_zero() || min > self.ping_interval)
        {
            return Err(ConfigError::HeartbeatMin);
        }
        if self.max_connections == 0 {
            return Err(ConfigError::Zero("max connections"));
        }
        if self.max_devices_per_user == 0 {
            return Err(ConfigError::Zero("max devices per user"));
        }
        if self.max_rooms_per_connection == 0 {
            return Err(ConfigError::Zero("max rooms per connection"));
        }
        if self.max_members_per_room == 0 {
            return Err(ConfigError::Zero("max members per room"));
        }
        if self.dedup_window == 0 || self.dedup_max_entries == 0 {
            return Err(ConfigError::Zero("dedup window"));
        }
        if self.inbox_max_messages == 0 || self.store_max_users == 0 {
            return Err(ConfigError::Zero("inbox limits"));
        }
        if self.frame_timeout.is_zero() {
            return Err(ConfigError::Zero("frame timeout"));
        }
        if self.max_memory < 2 * self.out_cap {
            return Err(ConfigError::MemoryBelowOutCap);
        }
        Ok(())
    }
}
