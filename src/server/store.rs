//! The durable store behind stored delivery: an append-only log of [`StoreOp`]s in a data
//! directory, with group commit and compaction.
//!
//! The relay core decides what to record; this file only writes it, on the writer thread
//! (`store_writer.rs`), which hands it every commit waiting at once
//! ([`LogStore::append`]): one `write` and one `fdatasync` cover them all, and only then
//! does the core send the ACKs that say "stored". At start, [`LogStore::open`] reads the log back (a torn record at the end,
//! from a crash in the middle of a write, is cut off) and the core replays it.
//! When the log has grown past `compact_at` bytes and is more than twice what is live,
//! [`LogStore::compact`] writes the live state to a new file, syncs it and renames it over
//! the old one, so disk use stays bounded.
//!
//! Record: `u32 body length | u32 CRC-32 of the body | body`, big-endian. Body: a kind byte,
//! then 1 Epoch `u64`; 2 Append `u64 user, frame`; 3 Ack `u64 user, u64 upto`;
//! 4 Counters `u64 user, u64 last_seq, u64 expired_upto`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use byteorder::{BigEndian, ByteOrder};
use bytes::{BufMut, Bytes, BytesMut};
use log::{info, warn};

use crate::proto::UserId;
use crate::relay::StoreOp;

const LOG_NAME: &str = "inbox.log";
const LOCK_NAME: &str = "LOCK";
const TMP_NAME: &str = "inbox.log.tmp";
/// A body longer than this is corruption, not a record.
const MAX_BODY: usize = 8 * 1024 * 1024;

const EPOCH: u8 = 1;
const APPEND: u8 = 2;
const ACK: u8 = 3;
const COUNTERS: u8 = 4;

/// The open log.
#[derive(Debug)]
pub struct LogStore {
    dir: PathBuf,
    /// Held with an exclusive flock for the store's life: one relay per data directory.
    _lock: File,
    file: File,
    size: u64,
    buf: BytesMut,
}

impl LogStore {
    /// Opens (or creates) the log in `dir` and returns it with every op recorded so far.
    /// A new log starts with a fresh random epoch.
    pub fn open(dir: &Path) -> io::Result<(LogStore, Vec<StoreOp>)> {
        fs::create_dir_all(dir)?;
        let lock = File::create(dir.join(LOCK_NAME))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "another relay is using this data directory",
            ));
        }
        let path = dir.join(LOG_NAME);
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let (ops, good) = decode_all(&bytes);
        if good < bytes.len() {
            warn!(
                "{}: cutting {} bytes of a torn record at the end (a crash mid-write)",
                path.display(),
                bytes.len() - good
            );
            file.set_len(good as u64)?;
            file.sync_all()?;
        }
        let mut store = LogStore {
            dir: dir.to_path_buf(),
            _lock: lock,
            file,
            size: good as u64,
            buf: BytesMut::new(),
        };
        if ops.is_empty() {
            let epoch = crate::rand::Rng::from_entropy().next_u64();
            store.append(&[StoreOp::Epoch(epoch)])?;
            sync_dir(dir)?;
            info!("{}: new store, epoch {epoch:016x}", path.display());
            return Ok((store, vec![StoreOp::Epoch(epoch)]));
        }
        info!("{}: {} records read", path.display(), ops.len());
        Ok((store, ops))
    }

    /// Writes `ops` and syncs them to disk: one write and one fdatasync for the batch.
    pub fn append(&mut self, ops: &[StoreOp]) -> io::Result<()> {
        self.buf.clear();
        for op in ops {
            encode(op, &mut self.buf);
        }
        self.file.write_all(&self.buf)?;
        self.file.sync_data()?;
        self.size += self.buf.len() as u64;
        Ok(())
    }

    /// Bytes in the log.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Replaces the log with `snapshot` (the live state): written to a temporary file,
    /// synced, renamed over the log, and the directory synced.
    pub fn compact(&mut self, snapshot: &[StoreOp]) -> io::Result<()> {
        let tmp = self.dir.join(TMP_NAME);
        let mut buf = BytesMut::new();
        for op in snapshot {
            encode(op, &mut buf);
        }
        let mut file = File::create(&tmp)?;
        file.write_all(&buf)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, self.dir.join(LOG_NAME))?;
        sync_dir(&self.dir)?;
        let before = self.size;
        self.file = OpenOptions::new()
            .append(true)
            .open(self.dir.join(LOG_NAME))?;
        self.size = buf.len() as u64;
        info!("store compacted: {before} -> {} bytes", self.size);
        Ok(())
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn encode(op: &StoreOp, dst: &mut BytesMut) {
    let start = dst.len();
    dst.put_u64(0); // length and CRC, filled in below
    match op {
        StoreOp::Epoch(epoch) => {
            dst.put_u8(EPOCH);
            dst.put_u64(*epoch);
        }
        StoreOp::Append { user, frame } => {
            dst.put_u8(APPEND);
            dst.put_u64(user.0);
            dst.put_slice(frame);
        }
        StoreOp::Ack { user, upto } => {
            dst.put_u8(ACK);
            dst.put_u64(user.0);
            dst.put_u64(*upto);
        }
        StoreOp::Counters {
            user,
            last_seq,
            expired_upto,
        } => {
            dst.put_u8(COUNTERS);
            dst.put_u64(user.0);
            dst.put_u64(*last_seq);
            dst.put_u64(*expired_upto);
        }
    }
    let body_len = dst.len() - start - 8;
    let crc = crc32fast::hash(&dst[start + 8..]);
    BigEndian::write_u32(&mut dst[start..], body_len as u32);
    BigEndian::write_u32(&mut dst[start + 4..], crc);
}

/// Decodes records until the end or the first one that is torn or corrupt. Returns the ops
/// and how many bytes were good.
fn decode_all(bytes: &[u8]) -> (Vec<StoreOp>, usize) {
    let mut ops = Vec::new();
    let mut at = 0;
    while bytes.len() - at >= 8 {
        let len = BigEndian::read_u32(&bytes[at..]) as usize;
        let crc = BigEndian::read_u32(&bytes[at + 4..]);
        if len == 0 || len > MAX_BODY || bytes.len() - at - 8 < len {
            break;
        }
        let body = &bytes[at + 8..at + 8 + len];
        if crc32fast::hash(body) != crc {
            break;
        }
        let Some(op) = decode_body(body) else {
            break;
        };
        ops.push(op);
        at += 8 + len;
    }
    (ops, at)
}

fn decode_body(body: &[u8]) -> Option<StoreOp> {
    let u64_at = |i: usize| body.get(i..i + 8).map(BigEndian::read_u64);
    Some(match *body.first()? {
        EPOCH => StoreOp::Epoch(u64_at(1)?),
        APPEND => StoreOp::Append {
            user: UserId(u64_at(1)?),
            frame: Bytes::copy_from_slice(body.get(9..)?),
        },
        ACK => StoreOp::Ack {
            user: UserId(u64_at(1)?),
            upto: u64_at(9)?,
        },
        COUNTERS => StoreOp::Counters {
            user: UserId(u64_at(1)?),
            last_seq: u64_at(9)?,
            expired_upto: u64_at(17)?,
        },
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("imrelay-store-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn ops() -> Vec<StoreOp> {
        vec![
            StoreOp::Append {
                user: UserId(2),
                frame: Bytes::from_static(b"a frame, as far as the log cares"),
            },
            StoreOp::Ack {
                user: UserId(2),
                upto: 1,
            },
            StoreOp::Counters {
                user: UserId(3),
                last_seq: 9,
                expired_upto: 4,
            },
        ]
    }

    #[test]
    fn what_was_appended_is_read_back_after_reopening() {
        let dir = temp_dir("reopen");
        let (mut store, first) = LogStore::open(&dir).unwrap();
        assert!(matches!(first[..], [StoreOp::Epoch(_)]));
        store.append(&ops()).unwrap();
        drop(store);
        let (_, read) = LogStore::open(&dir).unwrap();
        assert_eq!(read[0], first[0], "the same epoch");
        assert_eq!(read[1..], ops()[..]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_torn_tail_is_cut_and_the_rest_kept() {
        let dir = temp_dir("torn");
        let (mut store, _) = LogStore::open(&dir).unwrap();
        store.append(&ops()).unwrap();
        drop(store);
        let path = dir.join(LOG_NAME);
        let full = fs::read(&path).unwrap();
        // A crash in the middle of the last record, then garbage in a flipped byte.
        fs::write(&path, &full[..full.len() - 5]).unwrap();
        let (mut store, read) = LogStore::open(&dir).unwrap();
        assert_eq!(read.len(), 3, "epoch, append, ack; the counters were torn");
        store.append(&ops()[2..]).unwrap();
        drop(store);
        let (_, read) = LogStore::open(&dir).unwrap();
        assert_eq!(read.len(), 4, "appending after the cut works");
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(&path, &bytes).unwrap();
        let (_, read) = LogStore::open(&dir).unwrap();
        assert_eq!(read.len(), 3, "a bad CRC ends the log");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_second_relay_cannot_open_the_same_directory() {
        let dir = temp_dir("lock");
        let (first, _) = LogStore::open(&dir).unwrap();
        assert!(LogStore::open(&dir).is_err());
        drop(first);
        assert!(LogStore::open(&dir).is_ok());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn compaction_replaces_the_log_with_the_snapshot() {
        let dir = temp_dir("compact");
        let (mut store, _) = LogStore::open(&dir).unwrap();
        for _ in 0..10 {
            store.append(&ops()).unwrap();
        }
        let big = store.size();
        let snapshot = vec![StoreOp::Epoch(5), ops()[2].clone()];
        store.compact(&snapshot).unwrap();
        assert!(store.size() < big / 5);
        store.append(&ops()[..1]).unwrap();
        drop(store);
        let (_, read) = LogStore::open(&dir).unwrap();
        assert_eq!(read, [snapshot, ops()[..1].to_vec()].concat());
        fs::remove_dir_all(&dir).unwrap();
    }
}
