//! The three error types of the module: why a token was refused ([`AuthError`]), why a key
//! could not be loaded ([`KeyError`]) and why a TTL did not parse ([`TtlError`]).

use std::fmt;
use std::io;
use std::path::PathBuf;

/// Why [`Verifier::verify`](super::Verifier::verify) refused a token.
///
/// Each variant has a short, stable [`reason`](AuthError::reason) string the relay puts in
/// its ERROR frame. The variants carry no detail on purpose: the peer learns which check
/// failed, never anything about the key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AuthError {
    /// Not a well-formed token: too long, not UTF-8, not three base64url parts, a header or
    /// claims set that is not the expected JSON (or repeats `sub`, `exp`, `nbf`, `iss` or
    /// `aud`), an unsupported critical header, or a claim of the wrong type or over its limit (`exp`, `nbf`, `iat`, `rooms`, `send_rooms`,
    /// `admin`, `device`).
    Malformed,
    /// The signature does not match the header and claims under the configured key.
    BadSignature,
    /// The header's `alg` is not the configured algorithm (this includes `none` and any
    /// name the library does not know).
    WrongAlgorithm,
    /// `exp` has passed, beyond the leeway.
    Expired,
    /// `nbf` is still in the future, beyond the leeway.
    NotYetValid,
    /// `iat` is in the future, beyond the leeway.
    IssuedInFuture,
    /// No `sub` claim (or `sub` is `null`).
    MissingSub,
    /// `sub` is not the canonical decimal string of a nonzero u64.
    BadSub,
    /// `sub` is a valid user id, but not the one the connection asked to log in as.
    SubMismatch,
    /// No `exp` claim (or `exp` is `null`): tokens without an expiry are refused.
    MissingExp,
}

impl AuthError {
    /// Every variant, in the order of the checks that produce them (for tests and docs).
    pub const ALL: [AuthError; 10] = [
        AuthError::Malformed,
        AuthError::WrongAlgorithm,
        AuthError::BadSignature,
        AuthError::MissingSub,
        AuthError::BadSub,
        AuthError::SubMismatch,
        AuthError::MissingExp,
        AuthError::Expired,
        AuthError::NotYetValid,
        AuthError::IssuedInFuture,
    ];

    /// A short, stable, human-readable reason (ASCII, under 32 bytes), for the ERROR frame
    /// and logs. Stable means: tests and operators may rely on it; clients should not parse
    /// it (protocol.md, section 5.6).
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Malformed => "malformed token",
            AuthError::BadSignature => "bad signature",
            AuthError::WrongAlgorithm => "wrong algorithm",
            AuthError::Expired => "token expired",
            AuthError::NotYetValid => "token not yet valid",
            AuthError::IssuedInFuture => "token issued in the future",
            AuthError::MissingSub => "missing sub",
            AuthError::BadSub => "bad sub",
            AuthError::SubMismatch => "sub does not match user",
            AuthError::MissingExp => "missing exp",
        }
    }
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason())
    }
}

impl std::error::Error for AuthError {}

/// Why a [`Verifier`](super::Verifier) (or a signing key for [`Mint`](super::Mint)) could not
/// be built. These happen at startup, from configuration, never from a peer.
#[derive(Debug)]
pub enum KeyError {
    /// The key file could not be read.
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: io::Error,
    },
    /// An HS256 secret shorter than [`MIN_SECRET_LEN`](super::MIN_SECRET_LEN) bytes.
    SecretTooShort {
        /// Its length in bytes (after trimming a trailing newline, for a file).
        len: usize,
        /// The minimum.
        min: usize,
    },
    /// A private key where the public key was expected. The relay needs only the public
    /// key; keep the private one with the token issuer.
    PrivateKey,
    /// Not a PEM public key of the kind the algorithm needs (for RS256 an RSA `PUBLIC KEY`
    /// or `RSA PUBLIC KEY`, for ES256 an EC `PUBLIC KEY`), or not PEM at all.
    BadPem,
    /// The PEM is of the right kind but the key in it does not parse (for ES256: it is not
    /// a point on P-256, e.g. a P-384 key).
    InvalidKey(String),
    /// An RSA key below [`MIN_RSA_BITS`](super::MIN_RSA_BITS) bits.
    RsaKeyTooSmall {
        /// The modulus size in bits.
        bits: usize,
        /// The minimum.
        min: usize,
    },
    /// [`Verifier::from_public_key_file`](super::Verifier::from_public_key_file) was asked
    /// for HS256, which takes a shared secret, not a public key.
    NotPublicKeyAlgorithm,
    /// An algorithm name other than `HS256`, `RS256` or `ES256`.
    UnknownAlgorithm(String),
    /// jsonwebtoken has no crypto backend for this process (two backends were enabled by
    /// feature unification and none was installed). Not expected with this crate's features.
    NoCryptoProvider,
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::Io { path, source } => write!(f, "cannot read {}: {source}", path.display()),
            KeyError::SecretTooShort { len, min } => {
                write!(
                    f,
                    "HS256 secret is {len} bytes, at least {min} are required"
                )
            }
            KeyError::PrivateKey => {
                f.write_str("a private key was given where the public key is needed")
            }
            KeyError::BadPem => f.write_str("not a PEM public key of the kind the algorithm needs"),
            KeyError::InvalidKey(why) => write!(f, "invalid key: {why}"),
            KeyError::RsaKeyTooSmall { bits, min } => {
                write!(f, "RSA key is {bits} bits, at least {min} are required")
            }
            KeyError::NotPublicKeyAlgorithm => {
                f.write_str("HS256 takes a shared secret, not a public key file")
            }
            KeyError::UnknownAlgorithm(name) => {
                write!(
                    f,
                    "unknown algorithm {name:?} (expected HS256, RS256 or ES256)"
                )
            }
            KeyError::NoCryptoProvider => f.write_str("jsonwebtoken has no crypto backend"),
        }
    }
}

impl std::error::Error for KeyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            KeyError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Why [`parse_ttl`](super::parse_ttl) refused its input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TtlError {
    /// The empty string.
    Empty,
    /// Digits without a unit (`"90"`): write `"90s"`.
    MissingUnit,
    /// A unit other than `s`, `m`, `h` or `d`.
    UnknownUnit(char),
    /// The part before the unit is not a plain decimal number.
    BadNumber,
    /// A TTL of zero.
    Zero,
    /// More seconds than a u64 holds.
    Overflow,
}

impl fmt::Display for TtlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TtlError::Empty => f.write_str("empty TTL"),
            TtlError::MissingUnit => f.write_str("TTL needs a unit: s, m, h or d (e.g. 90s, 1h)"),
            TtlError::UnknownUnit(c) => write!(f, "unknown TTL unit {c:?} (use s, m, h or d)"),
            TtlError::BadNumber => f.write_str("TTL must be a decimal number and a unit"),
            TtlError::Zero => f.write_str("TTL must not be zero"),
            TtlError::Overflow => f.write_str("TTL too large"),
        }
    }
}

impl std::error::Error for TtlError {}
