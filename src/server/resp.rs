//! RESP2, the Redis protocol, as far as cluster mode speaks it: commands written as arrays
//! of bulk strings, and every reply type decoded. Sans-IO: bytes in, values out.
//!
//! Hand-written because the link needs what client crates make awkward: every command of
//! a loop turn pipelined into one write on a non-blocking socket the mio loop polls, and a
//! subscriber connection whose subscriptions change while messages stream in (the `redis`
//! crate's blocking pub/sub holds its connection; its async one needs an async runtime).
//! The protocol is small: <https://redis.io/docs/latest/develop/reference/protocol-spec/>.

use bytes::{BufMut, Bytes, BytesMut};

/// A decoded reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    /// `+OK`
    Simple(Bytes),
    /// `-ERR ...`
    Error(Bytes),
    /// `:1`
    Integer(i64),
    /// `$3 foo`, or `$-1` (None)
    Bulk(Option<Bytes>),
    /// `*2 ...`, or `*-1` (None)
    Array(Option<Vec<Value>>),
}

/// Input that is not RESP, or past the limits.
#[derive(Debug, PartialEq, Eq)]
pub enum RespError {
    /// An unknown type byte, a bad number or a missing CRLF.
    Malformed(&'static str),
    /// A bulk string or array longer than allowed.
    TooLarge(usize),
}

impl std::fmt::Display for RespError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RespError::Malformed(what) => write!(f, "malformed RESP: {what}"),
            RespError::TooLarge(n) => write!(f, "RESP value of {n} bytes or items is too large"),
        }
    }
}

/// Arrays nest at most this deep (pub/sub messages are 1 deep).
const MAX_DEPTH: usize = 4;
/// Items in an array, at most.
const MAX_ITEMS: usize = 1024;

/// Appends a command (an array of bulk strings).
pub fn command(out: &mut BytesMut, args: &[&[u8]]) {
    begin(out, args.len());
    for arg in args {
        arg_bulk(out, arg);
    }
}

/// Starts a command of `n` arguments, each then appended with [`arg_bulk`].
pub fn begin(out: &mut BytesMut, n: usize) {
    out.put_u8(b'*');
    put_decimal(out, n);
}

/// Appends one argument of a command started with [`begin`].
pub fn arg_bulk(out: &mut BytesMut, arg: &[u8]) {
    out.put_u8(b'$');
    put_decimal(out, arg.len());
    out.extend_from_slice(arg);
    out.extend_from_slice(b"\r\n");
}

/// `n` in decimal and a CRLF, without an allocation.
fn put_decimal(out: &mut BytesMut, n: usize) {
    let mut digits = [0u8; 20];
    out.extend_from_slice(decimal(n as u64, &mut digits));
    out.extend_from_slice(b"\r\n");
}

/// `n` in decimal, written at the end of `digits` (no allocation); returns those bytes.
pub fn decimal(mut n: u64, digits: &mut [u8; 20]) -> &[u8] {
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &digits[at..]
}

/// Takes one whole value off the front of `buf`; `Ok(None)` while it is incomplete. A
/// bulk string longer than `max_bulk` is an error as soon as its length is read.
///
/// Bulk strings are views into one allocation taken off `buf` (no copy each): the first
/// pass finds where the value ends, the second builds it from that part.
pub fn decode(buf: &mut BytesMut, max_bulk: usize) -> Result<Option<Value>, RespError> {
    let Some((_, used)) = parse(buf, 0, max_bulk, 0, None)? else {
        return Ok(None);
    };
    let whole = buf.split_to(used).freeze();
    match parse(&whole, 0, max_bulk, 0, Some(&whole))? {
        Some((value, _)) => Ok(Some(value)),
        None => Err(RespError::Malformed("a value that was whole is not")),
    }
}

/// Parses a value at `at`: the value and where it ends, or `None` if incomplete.
/// Parses a value at `at`. Without `whole` it only finds where the value ends (the values
/// it returns hold nothing); with it, bulk strings are slices of `whole` (which is `buf`).
fn parse(
    buf: &[u8],
    at: usize,
    max_bulk: usize,
    depth: usize,
    whole: Option<&Bytes>,
) -> Result<Option<(Value, usize)>, RespError> {
    let take = |from: usize, to: usize| whole.map_or_else(Bytes::new, |w| w.slice(from..to));
    let Some(line_end) = find_crlf(buf, at + 1)? else {
        return Ok(None);
    };
    let Some(&kind) = buf.get(at) else {
        return Ok(None);
    };
    let line = &buf[at + 1..line_end];
    let next = line_end + 2;
    Ok(Some(match kind {
        b'+' => (Value::Simple(take(at + 1, line_end)), next),
        b'-' => (Value::Error(take(at + 1, line_end)), next),
        b':' => (Value::Integer(number(line)?), next),
        b'$' => {
            let len = number(line)?;
            if len < 0 {
                return Ok(Some((Value::Bulk(None), next)));
            }
            let len = usize::try_from(len).map_err(|_| RespError::Malformed("bulk length"))?;
            if len > max_bulk {
                return Err(RespError::TooLarge(len));
            }
            let end = next + len;
            if buf.len() < end + 2 {
                return Ok(None);
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err(RespError::Malformed("bulk string without CRLF"));
            }
            (Value::Bulk(Some(take(next, end))), end + 2)
        }
        b'*' => {
            let n = number(line)?;
            if n < 0 {
                return Ok(Some((Value::Array(None), next)));
            }
            let n = usize::try_from(n).map_err(|_| RespError::Malformed("array length"))?;
            if n > MAX_ITEMS {
                return Err(RespError::TooLarge(n));
            }
            if depth >= MAX_DEPTH {
                return Err(RespError::Malformed("arrays nested too deep"));
            }
            let mut items = Vec::with_capacity(if whole.is_some() { n } else { 0 });
            let mut pos = next;
            for _ in 0..n {
                match parse(buf, pos, max_bulk, depth + 1, whole)? {
                    Some((item, end)) => {
                        if whole.is_some() {
                            items.push(item);
                        }
                        pos = end;
                    }
                    None => return Ok(None),
                }
            }
            (Value::Array(Some(items)), pos)
        }
        _ => return Err(RespError::Malformed("unknown type byte")),
    }))
}

/// Where the line that starts at `from` ends; a line is a type byte and a number or a short
/// text, so one past 1 KiB without its CRLF is not RESP.
fn find_crlf(buf: &[u8], from: usize) -> Result<Option<usize>, RespError> {
    const MAX_LINE: usize = 1024;
    let Some(rest) = buf.get(from..) else {
        return Ok(None);
    };
    let window = &rest[..rest.len().min(MAX_LINE)];
    match window.windows(2).position(|w| w == b"\r\n") {
        Some(i) => Ok(Some(from + i)),
        None if rest.len() > MAX_LINE => Err(RespError::Malformed("line too long")),
        None => Ok(None),
    }
}

fn number(line: &[u8]) -> Result<i64, RespError> {
    std::str::from_utf8(line)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(RespError::Malformed("not a number"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(bytes: &[u8]) -> Vec<Value> {
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        while let Some(v) = decode(&mut buf, 1 << 20).expect("valid") {
            out.push(v);
        }
        assert!(buf.is_empty(), "left over: {buf:?}");
        out
    }

    #[test]
    fn commands_are_arrays_of_bulk_strings() {
        let mut out = BytesMut::new();
        command(&mut out, &[b"PUBLISH", b"imrelay:u:7", b"hi\r\n"]);
        assert_eq!(
            &out[..],
            b"*3\r\n$7\r\nPUBLISH\r\n$11\r\nimrelay:u:7\r\n$4\r\nhi\r\n\r\n"
        );
    }

    #[test]
    fn every_reply_type_decodes() {
        let values = decode_all(
            b"+OK\r\n-ERR wrong\r\n:3\r\n$-1\r\n$5\r\nhe\r\nl\r\n*-1\r\n\
              *3\r\n$7\r\nmessage\r\n$4\r\nchan\r\n$0\r\n\r\n",
        );
        assert_eq!(
            values,
            vec![
                Value::Simple(Bytes::from_static(b"OK")),
                Value::Error(Bytes::from_static(b"ERR wrong")),
                Value::Integer(3),
                Value::Bulk(None),
                Value::Bulk(Some(Bytes::from_static(b"he\r\nl"))),
                Value::Array(None),
                Value::Array(Some(vec![
                    Value::Bulk(Some(Bytes::from_static(b"message"))),
                    Value::Bulk(Some(Bytes::from_static(b"chan"))),
                    Value::Bulk(Some(Bytes::new())),
                ])),
            ]
        );
    }

    #[test]
    fn a_value_cut_anywhere_waits_for_the_rest() {
        let whole = b"*3\r\n$7\r\nmessage\r\n$4\r\nchan\r\n$5\r\nhello\r\n";
        for cut in 0..whole.len() {
            let mut buf = BytesMut::from(&whole[..cut]);
            assert_eq!(decode(&mut buf, 1 << 20), Ok(None), "cut at {cut}");
            assert_eq!(buf.len(), cut, "nothing consumed");
            buf.extend_from_slice(&whole[cut..]);
            assert!(matches!(
                decode(&mut buf, 1 << 20),
                Ok(Some(Value::Array(_)))
            ));
        }
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        for bad in [
            &b"?x\r\n"[..],
            b":12a\r\n",
            b"$3\r\nabcd\r\n",
            b"$99999999\r\n",
            b"*9999\r\n",
            b"*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n",
        ] {
            let mut buf = BytesMut::from(bad);
            assert!(decode(&mut buf, 1024).is_err(), "{bad:?}");
        }
        let mut long_line = BytesMut::from(&b":"[..]);
        long_line.extend_from_slice(&[b'1'; 2000]);
        assert!(decode(&mut long_line, 1024).is_err());
    }
}
