//! Login tokens: a sans-IO check of the JWT a client presents at LOGIN (and REFRESH).
//!
//! The relay builds one [`Verifier`] at startup from its configuration (an algorithm and a
//! key: [`Verifier::hs256_secret`], [`Verifier::from_secret_file`],
//! [`Verifier::rs256_public_pem`], [`Verifier::es256_public_pem`],
//! [`Verifier::from_public_key_file`]), then calls [`Verifier::verify`] with the credential,
//! the user id the connection asks for and `now`. It gets back the [`Grants`] (rooms it may
//! join and send to, admin, device, expiry) or an [`AuthError`] whose
//! [`reason`](AuthError::reason) goes into the ERROR frame.
//!
//! No sockets and no clock: `now` (unix seconds) is always an argument. Key files are read
//! only by the constructors that take a path. All token parsing and all cryptography is
//! jsonwebtoken's (rust_crypto backend); this module only decides what the claims mean.
//!
//! # Claims
//! | claim | required | meaning |
//! |---|---|---|
//! | `sub` | yes | the user id, a decimal string (`"1001"`), nonzero, equal to the LOGIN's user |
//! | `exp` | yes | expiry, unix seconds |
//! | `nbf` | no | not valid before, unix seconds |
//! | `iat` | no | issued at, unix seconds; refused if in the future |
//! | `rooms` | no | `"*"` or an array of room ids (numbers or decimal strings): rooms it may join; absent = none |
//! | `send_rooms` | no | the same shape: rooms it may send to; absent = same as `rooms` |
//! | `admin` | no | `true` lets it BROADCAST; default `false` |
//! | `device` | no | a device name, 1 to 64 bytes, no control characters |
//!
//! Anything else (`iss`, `aud`, `jti`, custom claims) is ignored. The order of the checks,
//! which decides the error when several fail, is on [`Verifier::verify`]: size and shape,
//! algorithm, signature, `sub`, `exp` presence, claim types, then time.
//!
//! # Limits
//! Peers are hostile: a token is refused unread above [`MAX_TOKEN_LEN`] bytes, a room list
//! above [`MAX_ROOMS`] entries and a device above [`MAX_DEVICE_LEN`] bytes are `Malformed`.
//! Keys are checked at startup: HS256 secrets of at least [`MIN_SECRET_LEN`] bytes, RSA
//! keys of at least [`MIN_RSA_BITS`] bits, EC keys on P-256.
//!
//! protocol.md section 16 is the contract this module implements.

mod claims;
mod error;
mod mint;
mod verify;

#[cfg(test)]
mod tests;

pub use claims::{Grants, RoomGrant, RoomSet};
pub use error::{AuthError, KeyError, TtlError};
pub use mint::{mint_hs256, parse_ttl, Mint};
pub use verify::{read_secret_file, Algorithm, Verifier};

/// Clock slack, in seconds, allowed each way on `exp`, `nbf` and `iat`.
pub const LEEWAY_SECS: u64 = 30;

/// The longest token accepted, in bytes; longer ones are `Malformed` before any parsing.
pub const MAX_TOKEN_LEN: usize = 4096;

/// The most entries a `rooms` or `send_rooms` array may have (duplicates counted).
pub const MAX_ROOMS: usize = 1024;

/// The longest `device` claim, in bytes of UTF-8.
pub use crate::proto::device::MAX_DEVICE_LEN;

/// The shortest HS256 secret accepted, in bytes (the SHA-256 output size, RFC 7518 3.2).
pub const MIN_SECRET_LEN: usize = 32;

/// The smallest RSA modulus accepted for RS256, in bits.
pub const MIN_RSA_BITS: usize = 2048;
