//! Relay limits and their defaults (protocol.md, "Limits").

use std::fmt;
use std::time::Duration;

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
    /// Silence after which the relay sends PING (default 30 s).
    pub ping_interval: Duration,
    /// Silence after which the relay closes the connection (default 90 s).
    pub idle_timeout: Duration,
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
}

impl Config {
    /// Room traffic is dropped for a member whose output queue would pass this many bytes:
    /// half the output cap, so room floods always leave room for direct messages.
    pub fn room_cap(&self) -> usize {
        self.out_cap / 2
    }
}

impl Default for Config {
    fn default() -> Config {
        Config {
            max_frame: DEFAULT_MAX_FRAME,
            demo: false,
            max_connections: 10_000,
            max_devices_per_user: 16,
            out_cap: 1024 * 1024,
            login_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(90),
            max_rooms_per_connection: 64,
            max_members_per_room: 100_000,
            room_send_rate: 50,
            room_send_burst: 100,
            admins: Vec::new(),
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
    /// A limit that must be at least 1 is 0.
    Zero(&'static str),
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
            ConfigError::Zero(name) => write!(f, "{name} must be at least 1"),
        }
    }
}

impl std::error::Error for ConfigError {}

impl Config {
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
        Ok(())
    }
}
