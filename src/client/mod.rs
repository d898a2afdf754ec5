//! The client SDK: what a mobile or desktop app links to talk to an imrelay.
//!
//! Three layers, each usable on its own:
//! - [`ClientCore`] (`core.rs`): the sans-IO session. LOGIN, heartbeats and dead-link
//!   detection, reconnect with exponential backoff and jitter, the outbox that resends every
//!   un-ACKed message after a reconnect (with the DEDUP flag, protocol.md section 13), and
//!   receiver-side de-duplication. Bytes in, bytes and events out, `now` and a random seed
//!   passed in: it reads no clock and no entropy, so it is deterministic.
//! - [`Connection`] (`conn.rs`): the core plus a non-blocking TCP socket, and the TLS
//!   session over it when `ClientConfig.tls` is set (`tls.rs`, feature "tls"), for an
//!   app's own event loop.
//! - [`Client`] (`blocking.rs`): the same, blocking in `recv(timeout)`, for simple
//!   single-threaded programs. The wait (poll(2) on the socket) is `wait.rs`.
//! - [`SharedClient`] (`shared.rs`): the same behind a lock, `Send + Sync`: one thread
//!   blocks in `poll_event(timeout)` while others send or close; a wake pipe (`wake.rs`)
//!   ends the blocked poll as soon as another thread gives it work. The C ABI
//!   (`src/ffi.rs`) is built on it.
//! - [`Listener`] (`listener.rs`): the callback style over a [`SharedClient`], an SDK-owned
//!   thread calling the app's closure with each event, in order, one at a time.
//!
//! Login tokens: a static `credential`, or a [`TokenProvider`] the core asks at every
//! (re)connect and when the relay sends TOKEN_EXPIRING (it then sends REFRESH and reports
//! `TokenRefreshed` or `RefreshFailed`).
//!
//! TLS as the C and Java bindings ask for it, in every build (`tls_request.rs`):
//! [`tls_setting`] and [`ClientConfig::use_tls`].
//!
//! The rest: `config.rs` (settings), `event.rs` (what the app is told), `outbox.rs`,
//! `seen.rs` (de-duplication of deliveries), `backoff.rs` (its random source is
//! [`crate::rand`]).
//!
//! ```no_run
//! use std::time::Duration;
//! use imrelay::client::{Client, ClientConfig, Event};
//! use imrelay::proto::UserId;
//!
//! let config = ClientConfig::new(UserId(1001));
//! let (mut client, _limits) =
//!     Client::connect("127.0.0.1:7700", config, Duration::from_secs(5)).unwrap();
//! let id = client.send(UserId(1002), &b"hi bob"[..]).unwrap();
//! while let Some(event) = client.recv(Duration::from_secs(5)) {
//!     match event {
//!         Event::Delivered { id: done, .. } if done == id => break,
//!         Event::Failed { reason, .. } => panic!("{reason}"),
//!         _ => {}
//!     }
//! }
//! ```

mod backoff;
mod blocking;
mod config;
mod conn;
mod core;
mod device_id;
mod event;
mod heartbeat;
mod listener;
mod outbox;
mod seen;
mod shared;
#[cfg(feature = "tls")]
mod tls;
#[cfg(not(feature = "tls"))]
#[path = "tls_off.rs"]
mod tls;
mod tls_request;
mod wait;
mod wake;

pub use crate::rand::Rng;
pub use backoff::Backoff;
pub use blocking::{Client, ConnectError};
pub use config::{Background, ClientConfig, TokenProvider};
pub use conn::Connection;
pub use core::{ClientCore, LinkAction, Phase};
pub use device_id::device_id_in;
pub use event::{code_name, DisconnectReason, Event, FailReason, SendError};
pub use listener::Listener;
pub use shared::{Polled, SharedClient};
#[cfg(feature = "tls")]
pub use tls::{TlsClientOptions, TlsSetupError, TlsTrust};
pub use tls_request::{tls_setting, TlsCa, TlsRequestError, TlsSetting};

#[cfg(test)]
mod heartbeat_tests;
#[cfg(test)]
mod shared_tests;
#[cfg(test)]
mod tests;
