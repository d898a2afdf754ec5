//! What a verified token grants ([`Grants`], [`RoomGrant`]) and the checks on its claims.
//!
//! [`grants_from_claims`] runs on a claims set whose signature jsonwebtoken has already
//! checked. It does the checks jsonwebtoken is told to skip (it would read the system
//! clock): `sub`, `exp`, `nbf`, `iat`, all against the `now` passed in, and it reads this
//! relay's own claims (`rooms`, `send_rooms`, `admin`, `device`).

use serde_json::{Map, Value};

use super::{AuthError, LEEWAY_SECS, MAX_ROOMS};

/// A sorted set of room ids without duplicates and without the reserved room 0.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct RoomSet(Vec<u64>);

impl RoomSet {
    /// The empty set.
    pub fn new() -> RoomSet {
        RoomSet(Vec::new())
    }

    /// True if `room` is in the set (binary search).
    pub fn contains(&self, room: u64) -> bool {
        self.0.binary_search(&room).is_ok()
    }

    /// The ids, ascending.
    pub fn as_slice(&self) -> &[u64] {
        &self.0
    }

    /// How many rooms.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True if there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromIterator<u64> for RoomSet {
    /// Collects ids, sorting them and dropping duplicates and the reserved room 0.
    fn from_iter<I: IntoIterator<Item = u64>>(iter: I) -> RoomSet {
        let mut rooms: Vec<u64> = iter.into_iter().filter(|&r| r != 0).collect();
        rooms.sort_unstable();
        rooms.dedup();
        RoomSet(rooms)
    }
}

/// Which rooms a token lets its holder use (join, or send to).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub enum RoomGrant {
    /// No room (the claim was absent, or an empty list).
    #[default]
    None,
    /// Every room (the claim was the string `"*"`).
    All,
    /// Exactly these rooms.
    Only(RoomSet),
}

impl RoomGrant {
    /// The grant of exactly these rooms: `Only`, or `None` if `rooms` (without 0) is empty.
    pub fn only<I: IntoIterator<Item = u64>>(rooms: I) -> RoomGrant {
        let set: RoomSet = rooms.into_iter().collect();
        if set.is_empty() {
            RoomGrant::None
        } else {
            RoomGrant::Only(set)
        }
    }

    /// True if the grant covers `room`. Room 0 (the reserved "whole relay") is never
    /// covered, not even by `All`: system broadcasts are a matter of [`Grants::admin`].
    pub fn allows(&self, room: u64) -> bool {
        match self {
            _ if room == 0 => false,
            RoomGrant::None => false,
            RoomGrant::All => true,
            RoomGrant::Only(set) => set.contains(room),
        }
    }
}

/// What a verified token grants: the identity and the permissions the relay enforces for
/// the connection until the token expires or is replaced (REFRESH).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grants {
    /// The user the token is for (its `sub`, equal to the user the connection asked for).
    pub user: u64,
    /// The token's `exp`, in unix seconds (without the leeway: a token is accepted until
    /// `expires_at + LEEWAY_SECS`, exclusive).
    pub expires_at: u64,
    /// Rooms the user may JOIN (claim `rooms`).
    pub rooms: RoomGrant,
    /// Rooms the user may ROOM_SEND to (claim `send_rooms`; when absent, the same as
    /// `rooms`). Sending also needs membership, so in effect it is limited to `rooms`.
    pub send_rooms: RoomGrant,
    /// May send BROADCAST (claim `admin`, default false).
    pub admin: bool,
    /// The device the token was issued to (claim `device`), if any.
    pub device: Option<String>,
}

impl Grants {
    /// True if the user may join `room`.
    pub fn can_join(&self, room: u64) -> bool {
        self.rooms.allows(room)
    }

    /// True if the user may send to `room` (membership is checked by the relay, not here).
    pub fn can_send(&self, room: u64) -> bool {
        self.send_rooms.allows(room)
    }
}

/// Checks a claims set whose signature is already verified and turns it into [`Grants`].
///
/// The order of the checks, which decides the error when several fail:
/// 1. `sub`: absent or `null` → `MissingSub`; not a string holding the canonical decimal
///    form of a nonzero u64 → `BadSub`; another user → `SubMismatch`.
/// 2. `exp`: absent or `null` → `MissingExp`.
/// 3. Types and limits of `exp`, `nbf`, `iat`, `rooms`, `send_rooms`, `admin`, `device`
///    → `Malformed`.
/// 4. Time, with `LEEWAY_SECS` of slack each way: `now >= exp + LEEWAY_SECS` → `Expired`;
///    `nbf > now + LEEWAY_SECS` → `NotYetValid`; `iat > now + LEEWAY_SECS` →
///    `IssuedInFuture`.
pub(crate) fn grants_from_claims(
    claims: &Map<String, Value>,
    expected_user: u64,
    now: u64,
) -> Result<Grants, AuthError> {
    let user = match present(claims, "sub") {
        None => return Err(AuthError::MissingSub),
        Some(Value::String(s)) => parse_decimal_u64(s)
            .filter(|&u| u != 0)
            .ok_or(AuthError::BadSub)?,
        Some(_) => return Err(AuthError::BadSub),
    };
    if user != expected_user {
        return Err(AuthError::SubMismatch);
    }

    let exp = present(claims, "exp").ok_or(AuthError::MissingExp)?;
    let exp = numeric_date(exp, Round::Down)?;
    let nbf = present(claims, "nbf")
        .map(|v| numeric_date(v, Round::Up))
        .transpose()?;
    let iat = present(claims, "iat")
        .map(|v| numeric_date(v, Round::Up))
        .transpose()?;

    let rooms = match present(claims, "rooms") {
        None => RoomGrant::None,
        Some(v) => room_grant(v)?,
    };
    let send_rooms = match present(claims, "send_rooms") {
        None => rooms.clone(),
        Some(v) => room_grant(v)?,
    };
    let admin = match present(claims, "admin") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(AuthError::Malformed),
    };
    let device = match present(claims, "device") {
        None => None,
        Some(Value::String(s)) if valid_device(s) => Some(s.clone()),
        Some(_) => return Err(AuthError::Malformed),
    };

    // u128 so that no claim value, however large, can overflow the sums.
    let (now, leeway) = (u128::from(now), u128::from(LEEWAY_SECS));
    if now >= u128::from(exp) + leeway {
        return Err(AuthError::Expired);
    }
    if nbf.is_some_and(|nbf| u128::from(nbf) > now + leeway) {
        return Err(AuthError::NotYetValid);
    }
    if iat.is_some_and(|iat| u128::from(iat) > now + leeway) {
        return Err(AuthError::IssuedInFuture);
    }

    Ok(Grants {
        user,
        expires_at: exp,
        rooms,
        send_rooms,
        admin,
        device,
    })
}

/// The claim's value, with `null` counted as absent.
fn present<'a>(claims: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    claims.get(name).filter(|v| !v.is_null())
}

/// The canonical decimal form of a u64: ASCII digits only, no sign, no spaces, no leading
/// zero (except `"0"` itself), no overflow.
pub(crate) fn parse_decimal_u64(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.is_empty() || !b.iter().all(u8::is_ascii_digit) || (b.len() > 1 && b[0] == b'0') {
        return None;
    }
    s.parse().ok()
}

#[derive(Clone, Copy)]
enum Round {
    /// For `exp`: a fractional expiry ends at the second before.
    Down,
    /// For `nbf` and `iat`: a fractional start counts from the second after.
    Up,
}

/// A JWT NumericDate (RFC 7519, section 2): a non-negative JSON number of seconds. A
/// fraction is rounded in the stricter direction. Anything else is `Malformed`.
fn numeric_date(v: &Value, round: Round) -> Result<u64, AuthError> {
    let Value::Number(n) = v else {
        return Err(AuthError::Malformed);
    };
    if let Some(u) = n.as_u64() {
        return Ok(u);
    }
    match n.as_f64() {
        // [0, 2^64): 2^64 is exact as f64, every f64 below it and >= 2^53 is already an
        // integer, and NaN and the infinities are outside the range.
        Some(f) if (0.0..18_446_744_073_709_551_616.0).contains(&f) => Ok(match round {
            Round::Down => f.floor() as u64,
            Round::Up => f.ceil() as u64,
        }),
        _ => Err(AuthError::Malformed),
    }
}

/// `"*"`, or an array of at most `MAX_ROOMS` room ids, each a JSON integer or a canonical
/// decimal string, none 0. An empty array is `RoomGrant::None`.
fn room_grant(v: &Value) -> Result<RoomGrant, AuthError> {
    match v {
        Value::String(s) if s == "*" => Ok(RoomGrant::All),
        Value::Array(items) if items.len() <= MAX_ROOMS => {
            let mut rooms = Vec::with_capacity(items.len());
            for item in items {
                let room = match item {
                    Value::Number(n) => n.as_u64(),
                    Value::String(s) => parse_decimal_u64(s),
                    _ => None,
                };
                match room {
                    Some(r) if r != 0 => rooms.push(r),
                    _ => return Err(AuthError::Malformed),
                }
            }
            Ok(RoomGrant::only(rooms))
        }
        _ => Err(AuthError::Malformed),
    }
}

/// 1 to `MAX_DEVICE_LEN` bytes of UTF-8 with no control characters (it ends up in logs):
/// the rule of a LOGIN's device id.
fn valid_device(s: &str) -> bool {
    crate::proto::device::valid_device(s)
}
