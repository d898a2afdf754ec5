//! The durable store behind stored delivery: an append-only log of [`StoreOp`]s in a data
//! directory, with group commit, compaction, fail-stop and repair. Its file operations go
//! through [`StoreFs`] (`store_fs.rs`), so tests inject faults and crashes.
//!
//! The relay core decides what to record; this file only writes it, on the writer thread
//! (`store_writer.rs`), which hands it every commit waiting at once
//! ([`LogStore::append`]): one `write` and one `fdatasync` cover them all, and only then
//! does the core send the ACKs that say "stored". When the log has grown past
//! `compact_at` bytes and is more than twice what is live, [`LogStore::compact`] writes the
//! live state to `inbox.log.tmp` (in chunks of [`COMPACT_CHUNK`]), syncs it and renames it
//! over the log, so disk use stays bounded.
//!
//! **Failures.** After a failed write or fsync the log's tail is unknown, so the store is
//! fail-stop: every later append fails without writing. The failed commit is answered
//! STORE_FAILED, which promises that it is not read back at the next start; to keep that
//! promise the store first cuts the log back to its length before the commit (and syncs),
//! and if it cannot, writes that *committed length* to `inbox.committed`, which the next
//! open honours. If both fail the append returns [`StoreError::CommitMayReappear`] and the
//! writer must not answer STORE_FAILED. A compaction that fails before its rename leaves
//! the log as it was (and no `inbox.log.tmp`); one that fails after it is fail-stop.
//!
//! **Reading back** ([`LogStore::open_with`]). A damaged record that nothing valid follows
//! is a torn tail (a crash mid-write; never ACKed) and is cut off. A damaged record followed
//! by valid records is corruption: the open fails naming its byte offset, unless `repair`
//! is set, which skips every damaged region (resyncing on the next position where a whole
//! record with a sane length and a valid CRC decodes), keeps every valid record, rewrites
//! the log cleanly under a new epoch (a lost record's sequence number may be handed out
//! again, so clients must count afresh) and reports what was lost ([`RepairReport`]).
//!
//! Record: `u32 body length | u32 CRC-32 of the body | body`, big-endian. Body: a kind byte,
//! then 1 Epoch `u64 epoch [, u32 format]`; 2 Append `u64 user, frame`; 3 Ack `u64 user,
//! u64 upto`; 4 Counters `u64 user, u64 last_seq, u64 expired_upto`; 5 Sent `u64 sender,
//! u64 msg_id, u32 count`; from format 2 on: 6 SentCopy `u64 user, u64 origin, frame`;
//! 7 Cursor `u64 user, u64 device, u64 acked, u64 seen_ms, u64 last_seq`; 8 ForgetDevice `u64 user,
//! u64 device`; 9 Forget `u64 user`.
//!
//! **Format.** Every log (and every compacted one) starts with an Epoch record, which
//! carries the format the log is written in: [`LOG_FORMAT`] (2, per-device cursors) now.
//! An Epoch without one is format 1, which this version reads as it is (its records are a
//! subset); a log of a format newer than [`LOG_FORMAT`] is refused at open
//! ([`StoreError::NewerFormat`]) rather than misread.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use byteorder::{BigEndian, ByteOrder};
use bytes::{BufMut, Bytes, BytesMut};
use log::{error, info, warn};

use super::store_fs::{DirLock, RealFs, StoreFile, StoreFs};
use crate::proto::{MessageId, UserId};
use crate::relay::{DeviceCursor, StoreOp};

const LOG_NAME: &str = "inbox.log";
const TMP_NAME: &str = "inbox.log.tmp";
/// The committed length of the log, written when a failed commit could not be cut off.
const COMMITTED_NAME: &str = "inbox.committed";
/// A body longer than this is corruption, not a record.
const MAX_BODY: usize = 8 * 1024 * 1024;
/// Compaction (and repair) write the new log in pieces of about this size.
pub const COMPACT_CHUNK: usize = 1024 * 1024;

const EPOCH: u8 = 1;
const APPEND: u8 = 2;
const ACK: u8 = 3;
const COUNTERS: u8 = 4;
const SENT: u8 = 5;
const SENT_COPY: u8 = 6;
const CURSOR: u8 = 7;
const FORGET_DEVICE: u8 = 8;
const FORGET: u8 = 9;

/// The log format this version writes (and the newest it reads).
pub const LOG_FORMAT: u32 = 2;

/// Why the store failed.
#[derive(Debug)]
pub enum StoreError {
    /// A file operation failed.
    Io {
        /// What the store was doing.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// A damaged record with valid records after it (see [`LogStore::open_with`]).
    Corrupt {
        /// The log.
        path: PathBuf,
        /// Byte offset of the first damaged record that valid records follow.
        offset: u64,
        /// Bytes from there to the next valid record.
        len: u64,
    },
    /// The log is shorter than the committed length recorded after a failure.
    Truncated {
        /// The log.
        path: PathBuf,
        /// The recorded committed length.
        committed: u64,
        /// The log's length.
        len: u64,
    },
    /// The log was written by a newer imrelay, in a format this one does not know.
    NewerFormat {
        /// The log.
        path: PathBuf,
        /// Its format.
        format: u32,
    },
    /// An earlier failure made the store fail-stop; nothing is written any more.
    Failed(String),
    /// A commit failed and the store could neither cut it off the log nor record the
    /// committed length: the next start may read part of it back, so it must not be
    /// answered STORE_FAILED.
    CommitMayReappear(String),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Io { what, path, source } => {
                write!(f, "cannot {what} {}: {source}", path.display())
            }
            StoreError::Corrupt { path, offset, len } => write!(
                f,
                "{}: damaged record at byte offset {offset} ({len} bytes unreadable) with valid \
                 records after it; start with --store-repair to keep every valid record and \
                 drop the damaged ones",
                path.display()
            ),
            StoreError::Truncated {
                path,
                committed,
                len,
            } => write!(
                f,
                "{}: {len} bytes, but {committed} were committed ({COMMITTED_NAME})",
                path.display()
            ),
            StoreError::NewerFormat { path, format } => write!(
                f,
                "{}: log format {format} is newer than this relay reads ({LOG_FORMAT}); \
                 run the imrelay version that wrote it",
                path.display()
            ),
            StoreError::Failed(first) => write!(f, "the store failed earlier ({first})"),
            StoreError::CommitMayReappear(e) => write!(
                f,
                "{e}; the failed commit could not be cut off the log and may be read back"
            ),
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StoreError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<StoreError> for io::Error {
    fn from(e: StoreError) -> io::Error {
        let kind = match &e {
            StoreError::Io { source, .. } => source.kind(),
            StoreError::Corrupt { .. }
            | StoreError::Truncated { .. }
            | StoreError::NewerFormat { .. } => io::ErrorKind::InvalidData,
            StoreError::Failed(_) | StoreError::CommitMayReappear(_) => io::ErrorKind::Other,
        };
        io::Error::new(kind, e)
    }
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { what, path, source }
}

/// A damaged region of the log: from `offset`, `len` bytes up to the next valid record (or
/// the end).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Damage {
    /// Byte offset of the first damaged byte.
    pub offset: u64,
    /// Bytes skipped.
    pub len: u64,
}

/// What a repair dropped and kept.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RepairReport {
    /// Each damaged region skipped (each held at least one record).
    pub damaged: Vec<Damage>,
    /// Bytes dropped.
    pub bytes_lost: u64,
    /// Records kept.
    pub records_kept: usize,
}

/// The open log.
pub struct LogStore {
    fs: Arc<dyn StoreFs>,
    dir: PathBuf,
    /// One relay per data directory, for the store's life.
    _lock: DirLock,
    file: Box<dyn StoreFile>,
    size: u64,
    buf: BytesMut,
    /// Set by a failure after which the log's durability is unknown (fail-stop).
    failed: Option<String>,
    repaired: Option<RepairReport>,
}

impl fmt::Debug for LogStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogStore")
            .field("dir", &self.dir)
            .field("size", &self.size)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl LogStore {
    /// Opens (or creates) the log in `dir` and returns it with every op recorded so far;
    /// fails on corruption before the tail. A new log starts with a fresh random epoch.
    pub fn open(dir: &Path) -> Result<(LogStore, Vec<StoreOp>), StoreError> {
        LogStore::open_with(dir, false)
    }

    /// [`LogStore::open`], or with `repair` set: damaged records are skipped, every valid
    /// one kept, the log rewritten cleanly with a new epoch and the loss reported
    /// ([`LogStore::repair_report`]).
    pub fn open_with(dir: &Path, repair: bool) -> Result<(LogStore, Vec<StoreOp>), StoreError> {
        LogStore::open_in(Arc::new(RealFs), dir, repair)
    }

    /// [`LogStore::open_with`] over any file system (a test's [`super::store_fs::MemFs`]).
    pub fn open_in(
        fs: Arc<dyn StoreFs>,
        dir: &Path,
        repair: bool,
    ) -> Result<(LogStore, Vec<StoreOp>), StoreError> {
        fs.create_dir_all(dir)
            .map_err(io_err("create the directory", dir))?;
        let lock = fs.lock_dir(dir).map_err(io_err("lock", dir))?;
        let path = dir.join(LOG_NAME);
        // A compaction or repair that did not finish: the log is whole without it.
        remove_if_present(&*fs, &dir.join(TMP_NAME))?;
        let mut file = fs
            .open_append(&path)
            .map_err(io_err("open the log", &path))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(io_err("read the log", &path))?;
        honour_committed_length(&*fs, dir, &mut *file, &mut bytes)?;

        if let Some(format) = log_format(&bytes).filter(|&f| f > LOG_FORMAT) {
            return Err(StoreError::NewerFormat { path, format });
        }
        let scan = scan(&bytes);
        let len = bytes.len() as u64;
        let mut store = LogStore {
            fs,
            dir: dir.to_path_buf(),
            _lock: lock,
            file,
            size: len,
            buf: BytesMut::new(),
            failed: None,
            repaired: None,
        };
        let mut ops = scan.ops;
        let before_tail = scan
            .damaged
            .iter()
            .find(|d| d.offset + d.len < len)
            .copied();
        match (before_tail, scan.damaged.last()) {
            (Some(first), _) if !repair => {
                return Err(StoreError::Corrupt {
                    path,
                    offset: first.offset,
                    len: first.len,
                });
            }
            (Some(_), _) => {
                // A lost record may have been a user's last: its sequence number would be
                // handed out again. A new epoch makes clients count from the start.
                let records_kept = ops.len();
                let epoch = crate::rand::Rng::from_entropy().next_u64();
                ops.retain(|op| !matches!(op, StoreOp::Epoch(_)));
                ops.insert(0, StoreOp::Epoch(epoch));
                warn!("{}: new epoch {epoch} after the repair", path.display());
                let report = RepairReport {
                    bytes_lost: scan.damaged.iter().map(|d| d.len).sum(),
                    damaged: scan.damaged,
                    records_kept,
                };
                if let Err(e) = store.rewrite(&ops) {
                    // Best effort: the next open removes it too.
                    let _ = remove_if_present(&*store.fs, &dir.join(TMP_NAME));
                    return Err(e);
                }
                for d in &report.damaged {
                    warn!(
                        "{}: repair dropped {} bytes at byte offset {}",
                        path.display(),
                        d.len,
                        d.offset
                    );
                }
                warn!(
                    "{}: repaired: {} damaged regions, {} bytes lost, {} records kept",
                    path.display(),
                    report.damaged.len(),
                    report.bytes_lost,
                    report.records_kept
                );
                store.repaired = Some(report);
            }
            (None, Some(tail)) => {
                warn!(
                    "{}: cutting {} bytes of a torn record at the end (a crash mid-write)",
                    path.display(),
                    tail.len
                );
                store
                    .file
                    .set_len(tail.offset)
                    .and_then(|()| store.file.sync_data())
                    .map_err(io_err("cut the torn tail of", &path))?;
                store.size = tail.offset;
            }
            (None, None) => {}
        }
        if ops.is_empty() {
            let epoch = crate::rand::Rng::from_entropy().next_u64();
            store.append(&[StoreOp::Epoch(epoch)])?;
            store
                .fs
                .sync_dir(dir)
                .map_err(io_err("sync the directory", dir))?;
            info!("{}: new store, epoch {epoch}", path.display());
            return Ok((store, vec![StoreOp::Epoch(epoch)]));
        }
        info!(
            "{}: {} read",
            path.display(),
            crate::relay::counted(ops.len(), "record", "records")
        );
        Ok((store, ops))
    }

    /// Writes `ops` and syncs them to disk: one write and one fdatasync for the batch.
    ///
    /// On failure the store becomes fail-stop (every later call fails without writing) and
    /// makes sure the failed batch is not read back at the next start: it cuts the log
    /// back to its length before the batch, or else records that length. Only if both fail
    /// is the error [`StoreError::CommitMayReappear`].
    pub fn append(&mut self, ops: &[StoreOp]) -> Result<(), StoreError> {
        if let Some(first) = &self.failed {
            return Err(StoreError::Failed(first.clone()));
        }
        self.buf.clear();
        for op in ops {
            encode(op, &mut self.buf);
        }
        if self.buf.is_empty() {
            return Ok(());
        }
        let path = self.dir.join(LOG_NAME);
        let written = self
            .file
            .write_all(&self.buf)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            let e = io_err("append to", &path)(e);
            self.failed = Some(e.to_string());
            return Err(self.forget_failed_commit(e));
        }
        self.size += self.buf.len() as u64;
        Ok(())
    }

    /// After a failed append: cut the log back to `size` and sync; failing that, record
    /// `size` as the committed length.
    fn forget_failed_commit(&mut self, e: StoreError) -> StoreError {
        let path = self.dir.join(LOG_NAME);
        let cut = self
            .file
            .set_len(self.size)
            .and_then(|()| self.file.sync_data());
        let Err(cut) = cut else {
            warn!(
                "{e}; the log was cut back to {} bytes: the failed commit is gone",
                self.size
            );
            return e;
        };
        warn!("{e}; cannot cut the log back to {} bytes: {cut}", self.size);
        match write_committed_length(&*self.fs, &self.dir, self.size) {
            Ok(()) => {
                warn!(
                    "{}: committed length {} recorded in {COMMITTED_NAME}; the next start \
                     cuts the failed commit off",
                    path.display(),
                    self.size
                );
                e
            }
            Err(marker) => {
                error!(
                    "{e}; cannot record the committed length either ({marker}): the failed \
                     commit may be read back at the next start"
                );
                StoreError::CommitMayReappear(e.to_string())
            }
        }
    }

    /// Bytes in the log.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The failure that made the store fail-stop, if any.
    pub fn failure(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// What a repair at open dropped (None: no repair was needed or asked for).
    pub fn repair_report(&self) -> Option<&RepairReport> {
        self.repaired.as_ref()
    }

    /// Replaces the log with `snapshot` (the live state): written in chunks to a temporary
    /// file, synced, renamed over the log, and the directory synced.
    ///
    /// A failure before the rename takes effect leaves the log as it was (the temporary
    /// file is removed) and the store working; one after it makes the store fail-stop
    /// ([`LogStore::failure`]).
    pub fn compact(&mut self, snapshot: &[StoreOp]) -> Result<(), StoreError> {
        if let Some(first) = &self.failed {
            return Err(StoreError::Failed(first.clone()));
        }
        let before = self.size;
        let result = self.rewrite(snapshot);
        if let Err(e) = &result {
            if remove_if_present(&*self.fs, &self.dir.join(TMP_NAME)).is_err() {
                warn!("cannot remove {TMP_NAME} after a failed compaction");
            }
            if self.failed.is_some() {
                error!("store compaction failed after its rename: {e}; the store stops");
            } else {
                warn!("store compaction failed (the log stays as it is): {e}");
            }
        } else {
            info!("store compacted: {before} -> {} bytes", self.size);
        }
        result
    }

    /// Writes `ops` as the new log: temporary file, sync, rename, directory sync, reopen.
    fn rewrite(&mut self, ops: &[StoreOp]) -> Result<(), StoreError> {
        let tmp = self.dir.join(TMP_NAME);
        let path = self.dir.join(LOG_NAME);
        let size = write_chunked(&*self.fs, &tmp, ops).map_err(io_err("write", &tmp))?;
        if let Err(e) = self.fs.rename(&tmp, &path) {
            // The rename happened or not; it did not if the temporary file is still there.
            return match self.fs.remove_file(&tmp) {
                Ok(()) => Err(io_err("rename over the log", &tmp)(e)),
                Err(_) => Err(self.stop(io_err("rename over the log", &tmp)(e))),
            };
        }
        // From here the log is the new file: a failure leaves the old handle writing to
        // an unlinked file, so the store stops.
        if let Err(e) = self.fs.sync_dir(&self.dir) {
            return Err(self.stop(io_err("sync the directory", &self.dir)(e)));
        }
        match self.fs.open_append(&path) {
            Ok(file) => {
                self.file = file;
                self.size = size;
                Ok(())
            }
            Err(e) => Err(self.stop(io_err("reopen the compacted log", &path)(e))),
        }
    }

    fn stop(&mut self, e: StoreError) -> StoreError {
        self.failed.get_or_insert_with(|| e.to_string());
        e
    }
}

/// Creates `path` and writes `ops` to it in chunks of about [`COMPACT_CHUNK`], synced;
/// returns its length.
fn write_chunked(fs: &dyn StoreFs, path: &Path, ops: &[StoreOp]) -> io::Result<u64> {
    let mut file = fs.create(path)?;
    let mut buf = BytesMut::with_capacity(COMPACT_CHUNK);
    let mut size = 0;
    for op in ops {
        encode(op, &mut buf);
        if buf.len() >= COMPACT_CHUNK {
            file.write_all(&buf)?;
            size += buf.len() as u64;
            buf.clear();
        }
    }
    if !buf.is_empty() {
        file.write_all(&buf)?;
        size += buf.len() as u64;
    }
    file.sync_data()?;
    Ok(size)
}

fn remove_if_present(fs: &dyn StoreFs, path: &Path) -> Result<(), StoreError> {
    match fs.remove_file(path) {
        Ok(()) => {
            info!("{}: removed (left by an unfinished run)", path.display());
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("remove", path)(e)),
    }
}

/// Records `len` as the log's committed length: the next open cuts the log to it.
fn write_committed_length(fs: &dyn StoreFs, dir: &Path, len: u64) -> io::Result<()> {
    let mut record = [0u8; 12];
    BigEndian::write_u64(&mut record, len);
    let crc = crc32fast::hash(&record[..8]);
    BigEndian::write_u32(&mut record[8..], crc);
    let mut file = fs.create(&dir.join(COMMITTED_NAME))?;
    file.write_all(&record)?;
    file.sync_data()?;
    fs.sync_dir(dir)
}

/// At open: if a committed length was recorded, cuts the log to it (synced), then removes
/// the record (durably, before anything new is appended). A record that is not whole was
/// never finished, so no failure was reported on it: it is ignored.
fn honour_committed_length(
    fs: &dyn StoreFs,
    dir: &Path,
    file: &mut dyn StoreFile,
    bytes: &mut Vec<u8>,
) -> Result<(), StoreError> {
    let marker = dir.join(COMMITTED_NAME);
    let record = match fs.read(&marker) {
        Ok(record) => record,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("read", &marker)(e)),
    };
    let path = dir.join(LOG_NAME);
    let committed = (record.len() == 12
        && crc32fast::hash(&record[..8]) == BigEndian::read_u32(&record[8..]))
    .then(|| BigEndian::read_u64(&record));
    match committed {
        None => warn!("{}: unfinished, ignored", marker.display()),
        Some(committed) if committed > bytes.len() as u64 => {
            return Err(StoreError::Truncated {
                path,
                committed,
                len: bytes.len() as u64,
            });
        }
        Some(committed) => {
            if committed < bytes.len() as u64 {
                warn!(
                    "{}: cutting {} bytes of a commit that failed (answered STORE_FAILED)",
                    path.display(),
                    bytes.len() as u64 - committed
                );
                file.set_len(committed)
                    .and_then(|()| file.sync_data())
                    .map_err(io_err("cut the failed commit off", &path))?;
                // committed < bytes.len() here, so it fits a usize.
                bytes.truncate(committed as usize);
            }
        }
    }
    fs.remove_file(&marker).map_err(io_err("remove", &marker))?;
    fs.sync_dir(dir).map_err(io_err("sync the directory", dir))
}

fn encode(op: &StoreOp, dst: &mut BytesMut) {
    let start = dst.len();
    dst.put_u64(0); // length and CRC, filled in below
    match op {
        StoreOp::Epoch(epoch) => {
            dst.put_u8(EPOCH);
            dst.put_u64(*epoch);
            dst.put_u32(LOG_FORMAT);
        }
        StoreOp::SentCopy {
            user,
            frame,
            origin,
        } => {
            dst.put_u8(SENT_COPY);
            dst.put_u64(user.0);
            dst.put_u64(*origin);
            dst.put_slice(frame);
        }
        StoreOp::Cursor {
            user,
            cursor,
            last_seq,
        } => {
            dst.put_u8(CURSOR);
            dst.put_u64(user.0);
            dst.put_u64(cursor.device);
            dst.put_u64(cursor.acked);
            dst.put_u64(cursor.seen_ms);
            dst.put_u64(*last_seq);
        }
        StoreOp::ForgetDevice { user, device } => {
            dst.put_u8(FORGET_DEVICE);
            dst.put_u64(user.0);
            dst.put_u64(*device);
        }
        StoreOp::Forget { user } => {
            dst.put_u8(FORGET);
            dst.put_u64(user.0);
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
        StoreOp::Sent {
            sender,
            msg_id,
            count,
        } => {
            dst.put_u8(SENT);
            dst.put_u64(sender.0);
            dst.put_u64(msg_id.0);
            dst.put_u32(*count);
        }
    }
    let body_len = dst.len() - start - 8;
    let crc = crc32fast::hash(&dst[start + 8..]);
    BigEndian::write_u32(&mut dst[start..], body_len as u32);
    BigEndian::write_u32(&mut dst[start + 4..], crc);
}

/// The log read back: every valid record, and the damaged regions between them.
#[derive(Debug, Default)]
struct Scan {
    ops: Vec<StoreOp>,
    damaged: Vec<Damage>,
}

/// Decodes every valid record. At a damaged one it resyncs: past the damaged record if its
/// length is intact (a valid record starts right after it), otherwise on the next byte
/// offset where a valid record starts; a damaged region that reaches the end is the torn
/// tail.
fn scan(bytes: &[u8]) -> Scan {
    let mut out = Scan::default();
    let mut at = 0;
    while at < bytes.len() {
        if let Some((op, next)) = decode_at(bytes, at) {
            out.ops.push(op);
            at = next;
            continue;
        }
        let skip_whole = BigEndian::read_u32(bytes.get(at..at + 4).unwrap_or(&[0; 4])) as usize;
        let after = at + 8 + skip_whole;
        let next =
            if skip_whole <= MAX_BODY && after < bytes.len() && decode_at(bytes, after).is_some() {
                after
            } else {
                (at + 1..bytes.len())
                    .find(|&p| decode_at(bytes, p).is_some())
                    .unwrap_or(bytes.len())
            };
        out.damaged.push(Damage {
            offset: at as u64,
            len: (next - at) as u64,
        });
        at = next;
    }
    out
}

/// The record at `at` if it is whole and valid: a sane length for its kind, its CRC, a
/// body that decodes. Returns it and where the next record starts.
fn decode_at(bytes: &[u8], at: usize) -> Option<(StoreOp, usize)> {
    let header = bytes.get(at..at + 8)?;
    let len = BigEndian::read_u32(header) as usize;
    if len == 0 || len > MAX_BODY {
        return None;
    }
    let body = bytes.get(at + 8..at + 8 + len)?;
    let sane = match body[0] {
        EPOCH => len == 9 || len == 13,
        APPEND => len >= 9,
        SENT_COPY => len >= 17,
        CURSOR => len == 41,
        FORGET_DEVICE => len == 17,
        FORGET => len == 9,
        ACK => len == 17,
        COUNTERS => len == 25,
        SENT => len == 21,
        _ => false,
    };
    if !sane || crc32fast::hash(body) != BigEndian::read_u32(&header[4..]) {
        return None;
    }
    Some((decode_body(body)?, at + 8 + len))
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
        SENT => StoreOp::Sent {
            sender: UserId(u64_at(1)?),
            msg_id: MessageId(u64_at(9)?),
            count: BigEndian::read_u32(body.get(17..21)?),
        },
        SENT_COPY => StoreOp::SentCopy {
            user: UserId(u64_at(1)?),
            origin: u64_at(9)?,
            frame: Bytes::copy_from_slice(body.get(17..)?),
        },
        CURSOR => StoreOp::Cursor {
            user: UserId(u64_at(1)?),
            cursor: DeviceCursor {
                device: u64_at(9)?,
                acked: u64_at(17)?,
                seen_ms: u64_at(25)?,
            },
            last_seq: u64_at(33)?,
        },
        FORGET_DEVICE => StoreOp::ForgetDevice {
            user: UserId(u64_at(1)?),
            device: u64_at(9)?,
        },
        FORGET => StoreOp::Forget {
            user: UserId(u64_at(1)?),
        },
        _ => return None,
    })
}

/// The format of a log, from its first record (an Epoch; one without a format is 1).
/// `None` when the log does not start with a valid Epoch record.
fn log_format(bytes: &[u8]) -> Option<u32> {
    let (op, _) = decode_at(bytes, 0)?;
    if !matches!(op, StoreOp::Epoch(_)) {
        return None;
    }
    match BigEndian::read_u32(bytes.get(..4)?) {
        13 => bytes.get(17..21).map(BigEndian::read_u32),
        _ => Some(1),
    }
}

#[cfg(test)]
mod tests {
    use super::super::store_fs::{Fault, FaultKind, FsOp, MemFs};
    use super::*;
    use std::fs;

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

    fn message(i: usize) -> StoreOp {
        StoreOp::Append {
            user: UserId(2),
            frame: Bytes::from(format!("message number {i}").into_bytes()),
        }
    }

    fn encoded(ops: &[StoreOp]) -> Vec<u8> {
        let mut buf = BytesMut::new();
        for op in ops {
            encode(op, &mut buf);
        }
        buf.to_vec()
    }

    const DIR: &str = "/data";

    fn mem() -> (Arc<MemFs>, PathBuf) {
        (Arc::new(MemFs::new()), PathBuf::from(DIR))
    }

    fn open_mem(fs: &Arc<MemFs>, repair: bool) -> Result<(LogStore, Vec<StoreOp>), StoreError> {
        LogStore::open_in(fs.clone(), Path::new(DIR), repair)
    }

    fn log_path() -> PathBuf {
        Path::new(DIR).join(LOG_NAME)
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
        assert_eq!(read.len(), 3, "a bad last record is a torn tail");
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

    /// A full disk tears a commit: what landed of it must not be read back (its messages
    /// were answered STORE_FAILED), and nothing is written after it.
    #[test]
    fn a_commit_that_fails_on_a_full_disk_is_cut_off_and_the_store_stops() {
        let (fs, _) = mem();
        let (mut store, _) = open_mem(&fs, false).unwrap();
        store.append(&[message(0)]).unwrap();
        let good = store.size();
        let batch: Vec<StoreOp> = (1..6).map(message).collect();
        // Room for two and a half records of the batch.
        let record = encoded(&batch[..1]).len() as u64;
        fs.set_capacity(Some(good + 2 * record + record / 2));
        let e = store.append(&batch).unwrap_err();
        assert!(e.to_string().contains("No space left"), "{e}");
        assert_eq!(fs.contents(&log_path()).unwrap().len() as u64, good);
        fs.set_capacity(None);
        assert!(matches!(
            store.append(&[message(9)]),
            Err(StoreError::Failed(_))
        ));
        assert_eq!(
            fs.contents(&log_path()).unwrap().len() as u64,
            good,
            "nothing written after the failure"
        );
        drop(store);
        fs.crash(0);
        let (_, read) = open_mem(&fs, false).unwrap();
        assert_eq!(
            read[1..],
            [message(0)],
            "the failed commit is not read back"
        );
    }

    /// A write fails halfway (EIO) and the cut fails too: the committed length is recorded
    /// and the next start cuts the failed commit off.
    #[test]
    fn when_the_cut_fails_the_committed_length_is_honoured_at_the_next_start() {
        let (fs, _) = mem();
        let (mut store, _) = open_mem(&fs, false).unwrap();
        store.append(&[message(0)]).unwrap();
        let batch: Vec<StoreOp> = (1..4).map(message).collect();
        let whole = encoded(&batch).len();
        fs.inject(Fault::new(FsOp::Write, FaultKind::Torn(whole - 3)).once());
        fs.inject(Fault::new(FsOp::SetLen, FaultKind::Io));
        assert!(matches!(store.append(&batch), Err(StoreError::Io { .. })));
        fs.clear_faults();
        drop(store);
        fs.crash(usize::MAX); // even the unsynced torn bytes land
        assert!(fs.contents(&Path::new(DIR).join(COMMITTED_NAME)).is_some());
        let (mut store, read) = open_mem(&fs, false).unwrap();
        assert_eq!(
            read[1..],
            [message(0)],
            "the failed commit is not read back"
        );
        store.append(&[message(7)]).unwrap();
        drop(store);
        fs.crash(0);
        let (_, read) = open_mem(&fs, false).unwrap();
        assert_eq!(read[1..], [message(0), message(7)], "the marker is gone");
    }

    /// The write lands whole but its fsync fails: the batch may or may not be on disk, so
    /// it is cut off all the same.
    #[test]
    fn a_failed_fsync_cuts_the_commit_off_too() {
        let (fs, _) = mem();
        let (mut store, _) = open_mem(&fs, false).unwrap();
        fs.inject(Fault::new(FsOp::Sync, FaultKind::Io).once());
        assert!(store.append(&[message(1)]).is_err());
        assert!(store.failure().is_some());
        drop(store);
        let (_, read) = open_mem(&fs, false).unwrap();
        assert_eq!(read.len(), 1, "only the epoch: {read:?}");
    }

    #[test]
    fn when_nothing_can_record_the_failure_the_error_says_so() {
        let (fs, _) = mem();
        let (mut store, _) = open_mem(&fs, false).unwrap();
        fs.inject(Fault::new(FsOp::Write, FaultKind::Io));
        fs.inject(Fault::new(FsOp::SetLen, FaultKind::Io));
        assert!(matches!(
            store.append(&[message(1)]),
            Err(StoreError::CommitMayReappear(_))
        ));
    }

    /// Reopening the log after the compaction's rename fails: the old handle points at the
    /// unlinked log, so nothing may be written or acknowledged any more.
    #[test]
    fn a_failed_reopen_after_the_compaction_rename_stops_the_store() {
        let (fs, _) = mem();
        let (mut store, _) = open_mem(&fs, false).unwrap();
        store
            .append(&(0..10).map(message).collect::<Vec<_>>())
            .unwrap();
        let snapshot = vec![StoreOp::Epoch(5), message(9)];
        fs.inject(Fault::new(FsOp::Open, FaultKind::Io).on(LOG_NAME).once());
        assert!(store.compact(&snapshot).is_err());
        assert!(store.failure().is_some());
        assert!(matches!(
            store.append(&[message(10)]),
            Err(StoreError::Failed(_))
        ));
        drop(store);
        fs.crash(0);
        let (_, read) = open_mem(&fs, false).unwrap();
        assert_eq!(read, snapshot);
        assert!(fs.contents(&Path::new(DIR).join(TMP_NAME)).is_none());
    }

    /// A compaction that fails before its rename (no space for the snapshot, a failed
    /// fsync, a failed rename) leaves the log as it was, no temporary file, and the store
    /// working.
    #[test]
    fn a_compaction_that_fails_before_its_rename_changes_nothing() {
        for fault in [
            Fault::new(FsOp::Write, FaultKind::NoSpace).on(TMP_NAME),
            Fault::new(FsOp::Write, FaultKind::Torn(10)).on(TMP_NAME),
            Fault::new(FsOp::Sync, FaultKind::Io).on(TMP_NAME),
            Fault::new(FsOp::Rename, FaultKind::Io),
        ] {
            let (fs, _) = mem();
            let (mut store, first) = open_mem(&fs, false).unwrap();
            store.append(&[message(1), message(2)]).unwrap();
            fs.inject(fault.clone().once());
            assert!(store.compact(&[first[0].clone(), message(2)]).is_err());
            assert_eq!(store.failure(), None, "{fault:?}");
            assert!(fs.contents(&Path::new(DIR).join(TMP_NAME)).is_none());
            store.append(&[message(3)]).unwrap();
            drop(store);
            fs.crash(0);
            let (_, read) = open_mem(&fs, false).unwrap();
            assert_eq!(read[1..], [message(1), message(2), message(3)], "{fault:?}");
        }
    }

    #[test]
    fn a_leftover_temporary_file_is_removed_at_open() {
        let (fs, dir) = mem();
        drop(open_mem(&fs, false).unwrap());
        fs.put(&dir.join(TMP_NAME), b"half a snapshot");
        let (_, read) = open_mem(&fs, false).unwrap();
        assert_eq!(read.len(), 1);
        assert!(fs.contents(&dir.join(TMP_NAME)).is_none());
    }

    #[test]
    fn compaction_writes_in_bounded_chunks() {
        let (fs, _) = mem();
        let (mut store, first) = open_mem(&fs, false).unwrap();
        let big = Bytes::from(vec![7u8; 64 * 1024]);
        let mut snapshot = vec![first[0].clone()];
        snapshot.extend((0..64).map(|_| StoreOp::Append {
            user: UserId(2),
            frame: big.clone(),
        }));
        store.compact(&snapshot).unwrap();
        assert!(store.size() > 4 * 1024 * 1024);
        assert!(
            fs.largest_write() < COMPACT_CHUNK + 64 * 1024 + 64,
            "one write of {} bytes",
            fs.largest_write()
        );
        drop(store);
        let (_, read) = open_mem(&fs, false).unwrap();
        assert_eq!(read, snapshot);
    }

    /// Writes a log of an epoch and `n` messages; returns each record's offset.
    fn log_of(fs: &Arc<MemFs>, n: usize) -> Vec<usize> {
        let (mut store, first) = open_mem(fs, false).unwrap();
        let ops: Vec<StoreOp> = (0..n).map(message).collect();
        store.append(&ops).unwrap();
        drop(store);
        let mut offsets = Vec::new();
        let mut at = 0;
        for op in [first, ops].concat() {
            offsets.push(at);
            at += encoded(&[op]).len();
        }
        offsets
    }

    fn damage(fs: &MemFs, at: usize) {
        let mut bytes = fs.contents(&log_path()).unwrap();
        bytes[at] ^= 0x5a;
        fs.put(&log_path(), &bytes);
    }

    /// A flipped byte halfway is corruption, not a torn tail: the open fails naming the
    /// offset, and a repair keeps every other record.
    #[test]
    fn corruption_before_the_tail_fails_the_open_and_a_repair_keeps_the_rest() {
        let (fs, _) = mem();
        let offsets = log_of(&fs, 100);
        let bad = offsets[51]; // message 50
        damage(&fs, bad + 20);
        let e = open_mem(&fs, false).unwrap_err();
        assert!(
            matches!(e, StoreError::Corrupt { offset, .. } if offset == bad as u64),
            "{e}"
        );
        assert!(e.to_string().contains(&format!("byte offset {bad}")), "{e}");
        let (store, read) = open_mem(&fs, true).unwrap();
        let want: Vec<StoreOp> = (0..100).filter(|&i| i != 50).map(message).collect();
        assert_eq!(read[1..], want[..]);
        let report = store.repair_report().unwrap();
        assert_eq!(report.damaged.len(), 1);
        assert_eq!(report.damaged[0].offset, bad as u64);
        assert_eq!(report.bytes_lost, (offsets[52] - bad) as u64);
        assert_eq!(report.records_kept, 100, "the epoch and 99 messages");
        drop(store);
        fs.crash(0);
        let (_, read) = open_mem(&fs, false).unwrap();
        assert_eq!(read[1..], want[..], "the repaired log is clean and durable");
    }

    /// A damaged length field: the resync scans for the next whole valid record.
    #[test]
    fn a_repair_resyncs_past_a_damaged_length() {
        let (fs, _) = mem();
        let offsets = log_of(&fs, 20);
        damage(&fs, offsets[6] + 2); // the length of message 5
        damage(&fs, offsets[13] + 9); // a body byte of message 12
        let e = open_mem(&fs, false).unwrap_err();
        assert!(matches!(e, StoreError::Corrupt { offset, .. } if offset == offsets[6] as u64));
        let (store, read) = open_mem(&fs, true).unwrap();
        let want: Vec<StoreOp> = (0..20)
            .filter(|&i| i != 5 && i != 12)
            .map(message)
            .collect();
        assert_eq!(read[1..], want[..]);
        assert_eq!(store.repair_report().unwrap().damaged.len(), 2);
    }

    /// A record whose payload holds a whole valid record (a user can send one): damaging
    /// its body skips exactly that record, the forged one inside is not read.
    #[test]
    fn a_repair_does_not_read_records_hidden_in_a_damaged_payload() {
        let (fs, _) = mem();
        let (mut store, _) = open_mem(&fs, false).unwrap();
        let forged = encoded(&[StoreOp::Ack {
            user: UserId(9),
            upto: 1000,
        }]);
        let carrier = StoreOp::Append {
            user: UserId(2),
            frame: Bytes::from([&b"header"[..], &forged].concat()),
        };
        store.append(&[message(0), carrier, message(1)]).unwrap();
        let carrier_at = encoded(&[StoreOp::Epoch(0), message(0)]).len();
        drop(store);
        damage(&fs, carrier_at + 10);
        let (_, read) = open_mem(&fs, true).unwrap();
        assert_eq!(read[1..], [message(0), message(1)]);
    }

    /// Whether the epoch record itself was damaged or not, a repair starts a new epoch.
    #[test]
    fn a_repair_starts_a_new_epoch() {
        for damaged in [0, 2] {
            let (fs, _) = mem();
            let offsets = log_of(&fs, 3);
            let (_, before) = open_mem(&fs, false).unwrap();
            damage(&fs, offsets[damaged] + 9);
            assert!(open_mem(&fs, false).is_err());
            let (_, read) = open_mem(&fs, true).unwrap();
            assert!(matches!(read[0], StoreOp::Epoch(_)) && read[0] != before[0]);
            let want: Vec<StoreOp> = (0..3).filter(|&i| i + 1 != damaged).map(message).collect();
            assert_eq!(read[1..], want[..]);
        }
    }

    /// A torn tail of several records (a crash mid-batch, with the batch's records
    /// partly landed) is still cut at open without a repair.
    #[test]
    fn a_crash_mid_batch_is_a_torn_tail() {
        let (fs, _) = mem();
        let (mut store, _) = open_mem(&fs, false).unwrap();
        store.append(&[message(0)]).unwrap();
        let batch: Vec<StoreOp> = (1..5).map(message).collect();
        fs.inject(Fault::new(FsOp::Sync, FaultKind::Io).once());
        fs.inject(Fault::new(FsOp::SetLen, FaultKind::Io).once());
        fs.inject(
            Fault::new(FsOp::Open, FaultKind::Io)
                .on(COMMITTED_NAME)
                .once(),
        );
        let torn = encoded(&batch).len() - 5;
        assert!(store.append(&batch).is_err());
        drop(store);
        fs.crash(torn);
        let (_, read) = open_mem(&fs, false).unwrap();
        // Nothing could record the failure; what landed whole is read back (it was not
        // answered STORE_FAILED: see CommitMayReappear), the torn record cut.
        assert_eq!(read[1..], [message(0), message(1), message(2), message(3)]);
    }

    /// One record as format 1 wrote it: the Epoch without a format.
    fn format1_epoch(epoch: u64) -> Vec<u8> {
        let mut body = vec![EPOCH];
        body.extend_from_slice(&epoch.to_be_bytes());
        let mut record = (body.len() as u32).to_be_bytes().to_vec();
        record.extend_from_slice(&crc32fast::hash(&body).to_be_bytes());
        record.extend_from_slice(&body);
        record
    }

    #[test]
    fn a_format_1_log_opens_as_it_is_and_new_records_carry_the_format() {
        let (fs, _) = mem();
        let mut log = format1_epoch(9);
        log.extend_from_slice(&encoded(&[
            message(1),
            StoreOp::Ack {
                user: UserId(2),
                upto: 1,
            },
        ]));
        assert_eq!(log_format(&log), Some(1));
        fs.put(&log_path(), &log);
        let (_, ops) = open_mem(&fs, false).expect("a format-1 log opens");
        assert_eq!(ops[0], StoreOp::Epoch(9));
        assert_eq!(ops.len(), 3);
        // What this version writes says format 2.
        let cursor = StoreOp::Cursor {
            user: UserId(2),
            cursor: DeviceCursor {
                device: 7,
                acked: 1,
                seen_ms: 5,
            },
            last_seq: 1,
        };
        let ours = encoded(&[
            StoreOp::Epoch(9),
            cursor.clone(),
            StoreOp::Forget { user: UserId(2) },
        ]);
        assert_eq!(log_format(&ours), Some(LOG_FORMAT));
        assert_eq!(
            scan(&ours).ops[1..],
            [cursor, StoreOp::Forget { user: UserId(2) }]
        );
    }

    #[test]
    fn a_log_of_a_newer_format_is_refused_not_misread() {
        let (fs, _) = mem();
        let mut log = encoded(&[StoreOp::Epoch(9)]);
        // Format 3 in the Epoch record (its CRC made good again).
        log[17..21].copy_from_slice(&3u32.to_be_bytes());
        let crc = crc32fast::hash(&log[8..]);
        log[4..8].copy_from_slice(&crc.to_be_bytes());
        fs.put(&log_path(), &log);
        let e = open_mem(&fs, false).unwrap_err();
        assert!(
            matches!(e, StoreError::NewerFormat { format: 3, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("log format 3 is newer"), "{e}");
    }
}
