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
//!
//! # Layout
//! - `src/proto/`: `frame.rs` (header, `Frame`, encoders), `decode.rs` (incremental
//!   decoder), `opcode.rs`, `error.rs`, `ids.rs`.
//! - `src/relay/`: `mod.rs` (the `Relay` and its calling order), `session.rs`,
//!   `directory.rs` (user → connections), `out_queue.rs`, `timers.rs`, `config.rs`,
//!   `metrics.rs`; `http.rs`, `ws.rs`, `web.rs` and `demo.rs` for HTTP and WebSocket
//!   connections and the H5 demo page.
//! - `src/server/`: `mod.rs` (event loop), `listen.rs` (fd limits, listener).
//! - `src/bin/imrelay.rs`: the relay binary.

#![deny(missing_docs)]

pub mod proto;
pub mod relay;
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
