//! The Redis commands of stored delivery in cluster mode (protocol.md, section 18.1): the
//! library of inbox functions (`cluster_inbox.lua`) and how each [`InboxOp`] is written as
//! RESP. Written straight into the link's output, keys and numbers formatted on the stack:
//! a stored message costs no allocation here.

use bytes::BytesMut;

use super::resp;
use crate::proto::UserId;
use crate::relay::{InboxOp, StoreRequest, FETCH_BATCH, NO_ORIGIN, STORED_NOTICE};

/// The inbox library: stored delivery's functions, loaded at every connect.
pub const LIBRARY: &str = include_str!("cluster_inbox.lua");

/// The store's epoch.
const EPOCH_KEY: &[u8] = b"imrelay:epoch";
/// The highest sequence number any inbox handed out.
const HIGH_KEY: &[u8] = b"imrelay:ihigh";
/// What a DEDUP key remembers of a refusal for a full inbox.
const INBOX_FULL_REFUSAL: &[u8] = b"r17";

/// A short byte string built on the stack: a key (`prefix` and an id) or a number.
struct Small {
    buf: [u8; 64],
    len: usize,
}

impl Small {
    /// `prefix` followed by `n` in decimal.
    fn new(prefix: &[u8], n: u64) -> Small {
        let mut s = Small {
            buf: [0; 64],
            len: 0,
        };
        s.push(prefix);
        s.push_num(n);
        s
    }

    /// Appends `bytes` (cut to what fits).
    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    /// Appends `n` in decimal.
    fn push_num(&mut self, n: u64) {
        let mut digits = [0u8; 20];
        self.push(resp::decimal(n, &mut digits));
    }

    fn num(n: impl TryInto<u64>) -> Small {
        Small::new(b"", n.try_into().unwrap_or(u64::MAX))
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// The DEDUP key of a SEND, as plain DEDUP SENDs claim it (`relay::cluster::dedup_key`).
fn dedup_key(sender: UserId, msg_id: u64) -> Small {
    let mut key = Small::new(b"imrelay:d:", sender.0);
    key.push(b":");
    key.push_num(msg_id);
    key
}

/// The three keys of `user`'s inbox: stream, counters, device cursors.
fn keys(user: UserId) -> [Small; 3] {
    [
        Small::new(b"imrelay:ib:", user.0),
        Small::new(b"imrelay:ih:", user.0),
        Small::new(b"imrelay:iv:", user.0),
    ]
}

/// Appends the command of `op`: an `FCALL` of the library, or an `XRANGE`.
pub fn command(out: &mut BytesMut, op: &InboxOp) {
    match op {
        InboxOp::Store(r) => store(out, r),
        InboxOp::Sync {
            user,
            device,
            epoch,
            last,
            candidate,
            params: p,
        } => {
            let [b, h, v] = keys(*user);
            put(
                out,
                &[
                    b"FCALL",
                    b"imrelay_sync",
                    b"5",
                    b.bytes(),
                    h.bytes(),
                    v.bytes(),
                    EPOCH_KEY,
                    HIGH_KEY,
                    Small::num(*candidate).bytes(),
                    Small::num(*epoch).bytes(),
                    Small::num(*last).bytes(),
                    Small::num(*device).bytes(),
                    Small::num(p.ttl_ms).bytes(),
                    Small::num(p.retention_ms).bytes(),
                    Small::num(p.max_devices).bytes(),
                ],
            );
        }
        InboxOp::Ack {
            user,
            device,
            upto,
            params: p,
        } => {
            let [b, h, v] = keys(*user);
            put(
                out,
                &[
                    b"FCALL",
                    b"imrelay_ack",
                    b"3",
                    b.bytes(),
                    h.bytes(),
                    v.bytes(),
                    Small::num(*device).bytes(),
                    Small::num(*upto).bytes(),
                    Small::num(p.ttl_ms).bytes(),
                    Small::num(p.retention_ms).bytes(),
                    Small::num(p.max_devices).bytes(),
                ],
            );
        }
        InboxOp::Fetch { user, after } => {
            let [b, _, _] = keys(*user);
            // From the next number on, whatever the second part of its ID (the bytes
            // charged before it).
            let from = Small::num(after.saturating_add(1));
            put(
                out,
                &[
                    b"XRANGE",
                    b.bytes(),
                    from.bytes(),
                    b"+",
                    b"COUNT",
                    Small::num(FETCH_BATCH).bytes(),
                ],
            );
        }
        InboxOp::Epoch { candidate } => {
            put(
                out,
                &[
                    b"FCALL",
                    b"imrelay_epoch",
                    b"1",
                    EPOCH_KEY,
                    Small::num(*candidate).bytes(),
                ],
            );
        }
    }
}

/// `FCALL imrelay_store` of a batch (see the function's comment in the library for the
/// order of its keys and arguments).
fn store(out: &mut BytesMut, r: &StoreRequest) {
    let m = r.messages.len();
    let [rb, rh, rv] = keys(r.recipient);
    let [sb, sh, sv] = keys(r.sender);
    let p = r.params;
    let copies: &[u8] = if r.sender == r.recipient { b"0" } else { b"1" };
    let numkeys = Small::num(10 + m);
    let bytes: usize = r.messages.iter().map(|m| m.payload.len() + 96).sum();
    out.reserve(bytes + 640);
    resp::begin(out, 3 + 10 + m + 15 + 3 * m);
    for arg in [&b"FCALL"[..], b"imrelay_store", numkeys.bytes()] {
        resp::arg_bulk(out, arg);
    }
    for key in [
        rb.bytes(),
        rh.bytes(),
        rv.bytes(),
        sb.bytes(),
        sh.bytes(),
        sv.bytes(),
        EPOCH_KEY,
        HIGH_KEY,
        Small::new(b"imrelay:u:", r.recipient.0).bytes(),
        Small::new(b"imrelay:u:", r.sender.0).bytes(),
    ] {
        resp::arg_bulk(out, key);
    }
    for message in &r.messages {
        // Any name serves a message without DEDUP: the function does not touch it.
        // The DEDUP key (written on the stack); the function does not touch it for a
        // message without DEDUP.
        let msg_id = u64::from_be_bytes(message.header[8..16].try_into().unwrap_or_default());
        resp::arg_bulk(out, dedup_key(r.sender, msg_id).bytes());
    }
    for arg in [
        Small::num(r.candidate).bytes(),
        &STORED_NOTICE.to_be_bytes(),
        &NO_ORIGIN.to_be_bytes(),
        &r.device.to_be_bytes(),
        Small::num(r.device).bytes(),
        Small::num(p.max_messages).bytes(),
        Small::num(p.max_bytes).bytes(),
        Small::num(p.ttl_ms).bytes(),
        Small::num(p.retention_ms).bytes(),
        Small::num(p.max_devices).bytes(),
        Small::num(r.dedup_ttl_ms).bytes(),
        Small::new(b"user ", r.recipient.0).bytes(),
        Small::new(b"user ", r.sender.0).bytes(),
        INBOX_FULL_REFUSAL,
        copies,
    ] {
        resp::arg_bulk(out, arg);
    }
    for message in &r.messages {
        resp::arg_bulk(out, &message.header);
        resp::arg_bulk(out, &message.payload);
        let dedup: &[u8] = if message.dedup { b"1" } else { b"0" };
        resp::arg_bulk(out, dedup);
    }
}

/// [`super::resp::command`], with the whole command reserved at once.
fn put(out: &mut BytesMut, args: &[&[u8]]) {
    let len: usize = args.iter().map(|a| a.len() + 16).sum();
    out.reserve(len + 16);
    super::resp::command(out, args);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::ErrorCode;

    #[test]
    fn keys_and_numbers_are_written_without_allocating_and_match_the_refusal_code() {
        assert_eq!(Small::new(b"imrelay:ib:", 1002).bytes(), b"imrelay:ib:1002");
        assert_eq!(Small::num(0u64).bytes(), b"0");
        assert_eq!(
            Small::num(u64::MAX).bytes(),
            u64::MAX.to_string().as_bytes()
        );
        let longest = dedup_key(UserId(u64::MAX), u64::MAX);
        assert_eq!(
            longest.bytes(),
            format!("imrelay:d:{}:{}", u64::MAX, u64::MAX).as_bytes()
        );
        let refusal = format!("r{}", ErrorCode::InboxFull as u16);
        assert_eq!(INBOX_FULL_REFUSAL, refusal.as_bytes());
    }

    #[test]
    fn a_fetch_is_an_xrange_of_one_batch_from_the_next_number() {
        let mut out = BytesMut::new();
        command(
            &mut out,
            &InboxOp::Fetch {
                user: UserId(7),
                after: 41,
            },
        );
        let text = String::from_utf8(out.to_vec()).unwrap();
        assert_eq!(
            text,
            "*6\r\n$6\r\nXRANGE\r\n$12\r\nimrelay:ib:7\r\n$2\r\n42\r\n$1\r\n+\r\n$5\r\nCOUNT\r\n$2\r\n64\r\n"
        );
    }
}
