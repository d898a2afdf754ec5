//! imrelay: a fast single-threaded IM relay.
//!
//! Clients connect over TCP, log in as a user id and send length-prefixed binary frames
//! addressed to another user id; the relay forwards each frame to every connection of that
//! user. `protocol.md` at the top of the repository is the wire contract.
//!
//! # Layers
//! - [`proto`]: the wire format. Bytes in, frames out, and back. No I/O, no state.
//! - [`relay`]: the sans-IO core. Sessions, the user directory, routing, timers and
//!   output queues. Takes events with `now`, hands out "write these bytes to connection X".
//! - [`server`]: the thin mio driver, the only code that touches sockets: poll, accept,
//!   read into a reused buffer, hand bytes to the core, write what it queued, run timers.
//! - [`client`]: the SDK apps link. A sans-IO client core on the same [`proto`] codec
//!   (heartbeats, reconnect with backoff, resend and de-duplication), a non-blocking
//!   driver for apps with their own event loop, and a blocking `Client`.
//! - [`ffi`]: the C ABI over the blocking client, for iOS and Android (`include/imrelay.h`).
//!
//! # Features
//! `server` (default) builds the relay, its driver and the binaries. `tls` (default, and
//! part of `server`) lets the SDK connect over TLS (rustls with ring, and the system's
//! trust store). An app that only needs the SDK depends on imrelay with
//! `default-features = false, features = ["tls"]`, or with no features at all for plain
//! TCP: `proto`, `client` and `ffi` then need only `bytes`, `byteorder`, `log`, `libc`
//! and `socket2`.
//!
//! # Layout
//! - `src/proto/`: `frame.rs` (header, `Frame`, encoders), `decode.rs` (incremental
//!   decoder), `opcode.rs`, `error.rs`, `ids.rs`.
//! - `src/relay/`: `mod.rs` (the `Relay` and its calling order), `session.rs`,
//!   `directory.rs` (user → connections), `out_queue.rs`, `timers.rs`, `config.rs`,
//!   `metrics.rs`; `http.rs`, `ws.rs`, `web.rs` and `demo.rs` for HTTP and WebSocket
//!   connections and the H5 demo page; `dedup.rs`, `inbox.rs` and `inbox_handlers.rs`
//!   for resends and stored delivery; `auth_handlers.rs` for login tokens.
//! - `src/auth/`: login tokens (JWT): verification with the algorithm pinned by
//!   configuration, the grants they carry, minting for development.
//! - `src/server/`: `mod.rs` (event loop), `io.rs` (reads), `limits.rs` (fd limits),
//!   `store.rs` (the durable log of stored delivery), `store_writer.rs` (its thread).
//! - `src/client/`: `core.rs` (the sans-IO client), `outbox.rs`, `seen.rs`, `backoff.rs`,
//!   `event.rs`, `config.rs`, `conn.rs` (non-blocking driver), `blocking.rs`.
//! - `src/net.rs`: the raw read into a buffer's spare capacity (driver and SDK).
//! - `src/rand.rs`: the small random source (jitter, message-id tags, store epochs).
//! - `src/bin/imrelay.rs`: the relay binary.

#![deny(missing_docs)]

// So code written against the public API (the cluster tests' inbox model, shared with
// tests/sim_cluster.rs) can name this crate `imrelay` from inside it too.
#[cfg(test)]
extern crate self as imrelay;

#[cfg(feature = "server")]
pub mod auth;
pub mod client;
pub mod ffi;
#[cfg(feature = "java")]
pub mod jni;
pub mod net;
pub mod proto;
pub mod rand;
#[cfg(feature = "server")]
pub mod relay;
#[cfg(feature = "server")]
pub mod server;

use std::fmt;

/// A connection's id inside one relay: the slab key of its session, and the mio token of
/// its socket. One integer, three names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub usize);

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "conn {}", self.0)
    }
}
