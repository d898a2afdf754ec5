//! Minting tokens for development and tests ([`Mint`], [`mint_hs256`]), and [`parse_ttl`].
//!
//! A production issuer is a separate service (it holds the private key or the secret);
//! these helpers exist so a developer can log in to a local relay and so tests can build
//! real tokens.

use jsonwebtoken::{EncodingKey, Header};
use serde_json::{json, Map, Value};

use super::{Algorithm, KeyError, RoomGrant, TtlError};

/// The claims of a token to mint. Build with [`Mint::new`], adjust the fields, then sign
/// with [`hs256`](Mint::hs256) or [`sign`](Mint::sign).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mint {
    /// `sub`: the user id (written as a decimal string).
    pub user: u64,
    /// `iat`, unix seconds.
    pub issued_at: u64,
    /// `exp` is `issued_at + ttl_secs` (saturating).
    pub ttl_secs: u64,
    /// `nbf`, if set.
    pub not_before: Option<u64>,
    /// `rooms`: `"*"`, a list, or left out for `RoomGrant::None`.
    pub rooms: RoomGrant,
    /// `send_rooms`; `None` leaves the claim out (the verifier then uses `rooms`).
    /// `Some(RoomGrant::None)` writes `[]`: no sending at all.
    pub send_rooms: Option<RoomGrant>,
    /// `admin`, written only when true.
    pub admin: bool,
    /// `device`, if set.
    pub device: Option<String>,
}

impl Mint {
    /// A token for `user`, issued at `now_unix`, valid for `ttl_secs`, with no rooms, no
    /// admin and no device.
    pub fn new(user: u64, now_unix: u64, ttl_secs: u64) -> Mint {
        Mint {
            user,
            issued_at: now_unix,
            ttl_secs,
            not_before: None,
            rooms: RoomGrant::None,
            send_rooms: None,
            admin: false,
            device: None,
        }
    }

    /// The claims set, as JSON.
    pub fn claims(&self) -> Value {
        let mut c = Map::new();
        c.insert("sub".into(), json!(self.user.to_string()));
        c.insert("iat".into(), json!(self.issued_at));
        c.insert(
            "exp".into(),
            json!(self.issued_at.saturating_add(self.ttl_secs)),
        );
        if let Some(nbf) = self.not_before {
            c.insert("nbf".into(), json!(nbf));
        }
        if self.rooms != RoomGrant::None {
            c.insert("rooms".into(), grant_json(&self.rooms));
        }
        if let Some(send) = &self.send_rooms {
            c.insert("send_rooms".into(), grant_json(send));
        }
        if self.admin {
            c.insert("admin".into(), json!(true));
        }
        if let Some(device) = &self.device {
            c.insert("device".into(), json!(device));
        }
        Value::Object(c)
    }

    /// Signs with HS256 and `secret`.
    ///
    /// # Panics
    /// If `secret` is empty (jsonwebtoken refuses empty HMAC keys). Nothing checks the
    /// [`MIN_SECRET_LEN`](super::MIN_SECRET_LEN) here, so tests can mint with short secrets
    /// and watch the verifier refuse them.
    pub fn hs256(&self, secret: &[u8]) -> String {
        self.sign(Algorithm::Hs256, secret)
            .expect("mint_hs256: the secret must not be empty")
    }

    /// Signs with `alg`: for HS256 `key` is the secret; for RS256 a PEM RSA private key
    /// (PKCS#1 or PKCS#8); for ES256 a PEM PKCS#8 P-256 private key (what
    /// `openssl genpkey` writes).
    pub fn sign(&self, alg: Algorithm, key: &[u8]) -> Result<String, KeyError> {
        let bad = |e: jsonwebtoken::errors::Error| KeyError::InvalidKey(e.to_string());
        let key = match alg {
            Algorithm::Hs256 => EncodingKey::from_secret(key).map_err(bad)?,
            Algorithm::Rs256 => EncodingKey::from_rsa_pem(key).map_err(bad)?,
            Algorithm::Es256 => EncodingKey::from_ec_pem(key).map_err(bad)?,
        };
        jsonwebtoken::encode(&Header::new(alg.jwt()), &self.claims(), &key).map_err(bad)
    }
}

fn grant_json(grant: &RoomGrant) -> Value {
    match grant {
        RoomGrant::None => json!([]),
        RoomGrant::All => json!("*"),
        RoomGrant::Only(set) => json!(set.as_slice()),
    }
}

/// An HS256 token for `user`, issued at `now_unix`, expiring `ttl_secs` later, granting
/// `rooms` (join and send), `admin` and `device`. For development and tests; see [`Mint`]
/// for `send_rooms`, `nbf` and the other algorithms.
///
/// # Panics
/// If `secret` is empty.
pub fn mint_hs256(
    secret: &[u8],
    user: u64,
    now_unix: u64,
    ttl_secs: u64,
    rooms: &RoomGrant,
    admin: bool,
    device: Option<&str>,
) -> String {
    Mint {
        rooms: rooms.clone(),
        admin,
        device: device.map(str::to_string),
        ..Mint::new(user, now_unix, ttl_secs)
    }
    .hs256(secret)
}

/// A TTL such as `"90s"`, `"30m"`, `"1h"` or `"2d"`, in seconds: a decimal number (no
/// sign, no spaces) and exactly one lowercase unit, `s`, `m`, `h` or `d`. Zero is refused.
pub fn parse_ttl(s: &str) -> Result<u64, TtlError> {
    let unit = s.chars().next_back().ok_or(TtlError::Empty)?;
    let scale: u64 = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3_600,
        'd' => 86_400,
        '0'..='9' => return Err(TtlError::MissingUnit),
        other => return Err(TtlError::UnknownUnit(other)),
    };
    let digits = &s[..s.len() - 1];
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(TtlError::BadNumber);
    }
    let n: u64 = digits.parse().map_err(|_| TtlError::Overflow)?;
    if n == 0 {
        return Err(TtlError::Zero);
    }
    n.checked_mul(scale).ok_or(TtlError::Overflow)
}
