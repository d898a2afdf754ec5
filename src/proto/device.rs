//! The device id a LOGIN may carry (protocol.md, section 15.1), and the 64-bit *tag* the
//! relay and its store know a device by.
//!
//! With the DEVICE flag, a LOGIN's payload is `u8 n` ‖ `n` bytes of device id ‖ the
//! credential. A device id is 1 to [`MAX_DEVICE_LEN`] bytes of UTF-8 without control
//! characters, stable per install of an app. Without the flag the connection is the user's
//! default device, whose tag is 0.

use bytes::{BufMut, Bytes, BytesMut};

use super::Flags;

/// Longest device id, in bytes.
pub const MAX_DEVICE_LEN: usize = 64;

/// Why a LOGIN's device id is refused (answered `INVALID_FIELD`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceError {
    /// The length byte is 0 or above [`MAX_DEVICE_LEN`].
    Length(u8),
    /// The payload ends before the id does.
    Truncated,
    /// The id is not UTF-8, or holds a control character.
    Characters,
}

impl std::fmt::Display for DeviceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceError::Length(n) => write!(
                f,
                "device id length {n} is outside 1..={MAX_DEVICE_LEN} bytes"
            ),
            DeviceError::Truncated => f.write_str("the LOGIN payload ends inside the device id"),
            DeviceError::Characters => {
                f.write_str("the device id must be UTF-8 without control characters")
            }
        }
    }
}

impl std::error::Error for DeviceError {}

/// True for a well-formed device id: 1 to [`MAX_DEVICE_LEN`] bytes, no control characters.
pub fn valid_device(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_DEVICE_LEN && !id.chars().any(char::is_control)
}

/// A LOGIN's payload split into its device id (with the DEVICE flag) and its credential.
pub fn split_login(flags: Flags, payload: &[u8]) -> Result<(Option<&str>, &[u8]), DeviceError> {
    if !flags.contains(Flags::DEVICE) {
        return Ok((None, payload));
    }
    let (&n, rest) = payload.split_first().ok_or(DeviceError::Truncated)?;
    if n == 0 || usize::from(n) > MAX_DEVICE_LEN {
        return Err(DeviceError::Length(n));
    }
    if rest.len() < usize::from(n) {
        return Err(DeviceError::Truncated);
    }
    let (id, credential) = rest.split_at(usize::from(n));
    let id = std::str::from_utf8(id).map_err(|_| DeviceError::Characters)?;
    if !valid_device(id) {
        return Err(DeviceError::Characters);
    }
    Ok((Some(id), credential))
}

/// A LOGIN payload: the credential, after the device id when there is one (send it with
/// the DEVICE flag then). The id must be [`valid_device`].
pub fn login_payload(device: Option<&str>, credential: &[u8]) -> Bytes {
    let Some(id) = device else {
        return Bytes::copy_from_slice(credential);
    };
    let mut buf = BytesMut::with_capacity(1 + id.len() + credential.len());
    buf.put_u8(u8::try_from(id.len()).unwrap_or(u8::MAX));
    buf.put_slice(id.as_bytes());
    buf.put_slice(credential);
    buf.freeze()
}

/// The tag of a device id: a 64-bit FNV-1a hash, fixed for all time (the store records
/// it). The default device (no id) is 0; a named one is never 0 or `u64::MAX`.
pub fn device_tag(id: Option<&str>) -> u64 {
    let Some(id) = id else {
        return 0;
    };
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in id.as_bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    match hash {
        0 | u64::MAX => 1,
        h => h,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_login_payload_splits_back() {
        let payload = login_payload(Some("phone-7f3a"), b"secret");
        assert_eq!(payload[0], 10);
        assert_eq!(
            split_login(Flags::DEVICE, &payload),
            Ok((Some("phone-7f3a"), &b"secret"[..]))
        );
        assert_eq!(
            split_login(Flags::EMPTY, b"secret"),
            Ok((None, &b"secret"[..]))
        );
        assert_eq!(
            split_login(Flags::DEVICE, &[3, b'a', b'b', b'c']),
            Ok((Some("abc"), &[][..]))
        );
    }

    #[test]
    fn malformed_device_ids_are_named() {
        assert_eq!(split_login(Flags::DEVICE, &[]), Err(DeviceError::Truncated));
        assert_eq!(
            split_login(Flags::DEVICE, &[0, 1]),
            Err(DeviceError::Length(0))
        );
        assert_eq!(
            split_login(Flags::DEVICE, &[65; 70]),
            Err(DeviceError::Length(65))
        );
        assert_eq!(
            split_login(Flags::DEVICE, &[5, b'a']),
            Err(DeviceError::Truncated)
        );
        assert_eq!(
            split_login(Flags::DEVICE, &[1, 0xff]),
            Err(DeviceError::Characters)
        );
        assert_eq!(
            split_login(Flags::DEVICE, &[1, b'\n']),
            Err(DeviceError::Characters)
        );
    }

    #[test]
    fn tags_are_fixed_and_never_collide_with_the_default_device() {
        assert_eq!(device_tag(None), 0);
        // FNV-1a 64 of "a" (the published test value): the store depends on it never
        // changing.
        assert_eq!(device_tag(Some("a")), 0xaf63_dc4c_8601_ec8c);
        assert_ne!(device_tag(Some("phone")), device_tag(Some("tablet")));
    }
}
