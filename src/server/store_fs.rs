//! The store's file layer: every file operation the durable store makes ([`StoreFs`] and
//! [`StoreFile`]), the real one over `std::fs` ([`RealFs`]), and [`MemFs`], an in-memory
//! file system that injects faults chosen by a test and simulates crashes.
//!
//! The store (`store.rs`) never touches `std::fs` itself, so a test (or a deterministic
//! simulation of the whole relay) can run it over [`MemFs`]: make a write fail with ENOSPC
//! or EIO, tear it after a number of bytes, fail an fsync, a rename or a reopen, fill the
//! disk, then "crash" and see what a restart reads back.
//!
//! The model [`MemFs`] follows is the POSIX one the store relies on: a file's bytes survive
//! a crash only once the file was synced (`sync_data`), and a file's *name* (a create, a
//! rename, a remove) only once its directory was synced ([`StoreFs::sync_dir`]). A handle
//! keeps pointing at the file it opened when a rename replaces its name.

use std::any::Any;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// The file operations the store makes. Object safe: the store holds an
/// `Arc<dyn StoreFs>`.
pub trait StoreFs: Send + Sync + fmt::Debug {
    /// Creates `dir` and its parents if missing.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Takes the exclusive lock of `dir` (one store per directory), held until the returned
    /// guard is dropped; fails with `WouldBlock` if it is taken.
    fn lock_dir(&self, dir: &Path) -> io::Result<DirLock>;
    /// Opens `path` for reading and appending, creating it (empty) if missing.
    fn open_append(&self, path: &Path) -> io::Result<Box<dyn StoreFile>>;
    /// Creates `path` empty (replacing any file of that name), for appending.
    fn create(&self, path: &Path) -> io::Result<Box<dyn StoreFile>>;
    /// The whole content of `path` (`NotFound` if there is none).
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;
    /// Renames `from` over `to`, atomically.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes `path` (`NotFound` if there is none).
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Makes the names in `dir` (creates, renames, removes) durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// An open file of the store. Every write appends.
pub trait StoreFile: Send + fmt::Debug {
    /// Reads from the current position to the end into `buf`.
    fn read_to_end(&mut self, buf: &mut Vec<u8>) -> io::Result<usize>;
    /// Appends `buf`: all of it, or an error after any prefix of it.
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()>;
    /// `fdatasync`: the bytes written so far (and the length) survive a crash.
    fn sync_data(&mut self) -> io::Result<()>;
    /// Truncates (or extends) the file to `len` bytes.
    fn set_len(&mut self, len: u64) -> io::Result<()>;
}

/// A held directory lock (see [`StoreFs::lock_dir`]); released on drop.
pub struct DirLock(#[allow(dead_code)] Box<dyn Any + Send>);

impl fmt::Debug for DirLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DirLock")
    }
}

/// The real file system, over `std::fs`.
#[derive(Clone, Copy, Debug, Default)]
pub struct RealFs;

const LOCK_NAME: &str = "LOCK";

impl StoreFs for RealFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)
    }

    fn lock_dir(&self, dir: &Path) -> io::Result<DirLock> {
        let lock = File::create(dir.join(LOCK_NAME))?;
        // SAFETY: flock on a descriptor we own; the lock lives as long as the File.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "another relay is using this data directory",
            ));
        }
        Ok(DirLock(Box::new(lock)))
    }

    fn open_append(&self, path: &Path) -> io::Result<Box<dyn StoreFile>> {
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)?;
        Ok(Box::new(RealFile(file)))
    }

    fn create(&self, path: &Path) -> io::Result<Box<dyn StoreFile>> {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        Ok(Box::new(RealFile(file)))
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        std::fs::read(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
}

#[derive(Debug)]
struct RealFile(File);

impl StoreFile for RealFile {
    fn read_to_end(&mut self, buf: &mut Vec<u8>) -> io::Result<usize> {
        self.0.read_to_end(buf)
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.0.write_all(buf)
    }

    fn sync_data(&mut self) -> io::Result<()> {
        self.0.sync_data()
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
}

/// An operation of [`MemFs`] a [`Fault`] can hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsOp {
    /// [`StoreFs::open_append`] and [`StoreFs::create`].
    Open,
    /// [`StoreFile::write_all`].
    Write,
    /// [`StoreFile::sync_data`].
    Sync,
    /// [`StoreFile::set_len`].
    SetLen,
    /// [`StoreFs::read`] and [`StoreFile::read_to_end`].
    Read,
    /// [`StoreFs::rename`] (matched on the source's name).
    Rename,
    /// [`StoreFs::remove_file`].
    Remove,
    /// [`StoreFs::sync_dir`] (matched on the directory's name).
    SyncDir,
}

/// What a [`Fault`] does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// Fails with ENOSPC (a write first lands nothing).
    NoSpace,
    /// Fails with EIO (a write first lands nothing).
    Io,
    /// A write lands its first `n` bytes, then fails with EIO (other ops: EIO).
    Torn(usize),
}

/// A fault [`MemFs`] injects: the `op` on a file named `file` (any file if `None`) fails,
/// after `skip` such ops succeeded, `times` times (for ever if `None`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fault {
    /// The operation hit.
    pub op: FsOp,
    /// What happens.
    pub kind: FaultKind,
    /// Only ops on a file (or directory) with this file name.
    pub file: Option<String>,
    /// Matching ops that succeed first.
    pub skip: u32,
    /// How many matching ops fail (None: every one from then on).
    pub times: Option<u32>,
}

impl Fault {
    /// Every `op` fails with `kind` from now on.
    pub fn new(op: FsOp, kind: FaultKind) -> Fault {
        Fault {
            op,
            kind,
            file: None,
            skip: 0,
            times: None,
        }
    }

    /// Only on files named `name`.
    pub fn on(mut self, name: &str) -> Fault {
        self.file = Some(name.to_string());
        self
    }

    /// After `n` matching ops succeeded.
    pub fn after(mut self, n: u32) -> Fault {
        self.skip = n;
        self
    }

    /// Once only.
    pub fn once(mut self) -> Fault {
        self.times = Some(1);
        self
    }
}

/// An in-memory [`StoreFs`] for tests and deterministic simulation: faults on demand
/// ([`MemFs::inject`]), a disk size ([`MemFs::set_capacity`]), and crashes
/// ([`MemFs::crash`]) that keep only what was synced.
///
/// Clones share the same files. Each file has the bytes a reader sees and the bytes that
/// were last synced; each directory entry exists now and, separately, as of the last
/// `sync_dir`. A crash keeps the synced state only (optionally a torn prefix of what was
/// appended since), drops every lock, and invalidates every open handle.
#[derive(Clone, Debug, Default)]
pub struct MemFs {
    state: Arc<Mutex<MemState>>,
}

#[derive(Debug, Default)]
struct MemState {
    dirs: BTreeSet<PathBuf>,
    names: BTreeMap<PathBuf, u64>,
    durable_names: BTreeMap<PathBuf, u64>,
    inodes: HashMap<u64, Inode>,
    next_inode: u64,
    /// Bumped by a crash: handles of an earlier generation fail.
    generation: u64,
    locks: BTreeSet<PathBuf>,
    faults: Vec<Fault>,
    capacity: Option<u64>,
    largest_write: usize,
}

#[derive(Debug, Default)]
struct Inode {
    data: Vec<u8>,
    synced: Vec<u8>,
}

fn enospc() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOSPC)
}

fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{}: no such file", path.display()),
    )
}

fn file_name(path: &Path) -> &str {
    path.file_name().and_then(|n| n.to_str()).unwrap_or("")
}

impl MemState {
    /// The fault this op hits, if any (consuming a use of it).
    fn fault(&mut self, op: FsOp, path: &Path) -> Option<FaultKind> {
        let name = file_name(path);
        let i = self.faults.iter_mut().position(|f| {
            if f.op != op || f.file.as_deref().is_some_and(|n| n != name) {
                return false;
            }
            if f.skip > 0 {
                f.skip -= 1;
                return false;
            }
            true
        })?;
        let kind = self.faults[i].kind;
        if let Some(times) = &mut self.faults[i].times {
            *times -= 1;
            if *times == 0 {
                self.faults.remove(i);
            }
        }
        Some(kind)
    }

    fn check(&mut self, op: FsOp, path: &Path) -> io::Result<()> {
        match self.fault(op, path) {
            None => Ok(()),
            Some(FaultKind::NoSpace) => Err(enospc()),
            Some(FaultKind::Io | FaultKind::Torn(_)) => Err(eio()),
        }
    }

    fn used(&self) -> u64 {
        self.inodes.values().map(|i| i.data.len() as u64).sum()
    }

    fn new_inode(&mut self) -> u64 {
        self.next_inode += 1;
        self.inodes.insert(self.next_inode, Inode::default());
        self.next_inode
    }

    /// Drops the files no name points to (now or durably). A handle to such a file still
    /// "writes" to it, and the bytes vanish, as with an unlinked file.
    fn collect(&mut self) {
        let live: BTreeSet<u64> = self
            .names
            .values()
            .chain(self.durable_names.values())
            .copied()
            .collect();
        self.inodes.retain(|id, _| live.contains(id));
    }
}

impl MemFs {
    /// An empty file system.
    pub fn new() -> MemFs {
        MemFs::default()
    }

    fn lock(&self) -> MutexGuard<'_, MemState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a fault (faults are checked in the order they were added).
    pub fn inject(&self, fault: Fault) {
        self.lock().faults.push(fault);
    }

    /// Removes every fault not yet used up.
    pub fn clear_faults(&self) {
        self.lock().faults.clear();
    }

    /// Limits the bytes all files may hold: a write past it lands what fits, then fails
    /// with ENOSPC (a full disk). `None`: unlimited.
    pub fn set_capacity(&self, bytes: Option<u64>) {
        self.lock().capacity = bytes;
    }

    /// The largest single write so far.
    pub fn largest_write(&self) -> usize {
        self.lock().largest_write
    }

    /// The content of `path` as a reader sees it now (None: no such file).
    pub fn contents(&self, path: &Path) -> Option<Vec<u8>> {
        let state = self.lock();
        let id = state.names.get(path)?;
        state.inodes.get(id).map(|i| i.data.clone())
    }

    /// Replaces the content of `path` (creating it), durably: for a test that damages a
    /// file between two runs.
    pub fn put(&self, path: &Path, bytes: &[u8]) {
        let mut state = self.lock();
        let id = match state.names.get(path) {
            Some(&id) => id,
            None => {
                let id = state.new_inode();
                state.names.insert(path.to_path_buf(), id);
                id
            }
        };
        state.durable_names.insert(path.to_path_buf(), id);
        if let Some(inode) = state.inodes.get_mut(&id) {
            inode.data = bytes.to_vec();
            inode.synced = bytes.to_vec();
        }
    }

    /// A power cut: every file goes back to what was last synced and every name to what
    /// its directory last synced; of the bytes appended to a file since its last sync,
    /// the first `keep_unsynced` survive (a torn write; 0 for none). Locks are released
    /// and every open handle fails from now on.
    pub fn crash(&self, keep_unsynced: usize) {
        let mut state = self.lock();
        state.generation += 1;
        state.locks.clear();
        state.names = state.durable_names.clone();
        state.collect();
        for inode in state.inodes.values_mut() {
            let mut survived = inode.synced.clone();
            if inode.data.starts_with(&inode.synced) {
                let extra = &inode.data[inode.synced.len()..];
                survived.extend_from_slice(&extra[..keep_unsynced.min(extra.len())]);
            }
            inode.data = survived.clone();
            inode.synced = survived;
        }
    }
}

struct MemLock {
    fs: MemFs,
    dir: PathBuf,
    generation: u64,
}

impl Drop for MemLock {
    fn drop(&mut self) {
        let mut state = self.fs.lock();
        if state.generation == self.generation {
            state.locks.remove(&self.dir);
        }
    }
}

impl StoreFs for MemFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut state = self.lock();
        for d in dir.ancestors() {
            state.dirs.insert(d.to_path_buf());
        }
        Ok(())
    }

    fn lock_dir(&self, dir: &Path) -> io::Result<DirLock> {
        let mut state = self.lock();
        if !state.dirs.contains(dir) {
            return Err(not_found(dir));
        }
        if !state.locks.insert(dir.to_path_buf()) {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "another relay is using this data directory",
            ));
        }
        Ok(DirLock(Box::new(MemLock {
            fs: self.clone(),
            dir: dir.to_path_buf(),
            generation: state.generation,
        })))
    }

    fn open_append(&self, path: &Path) -> io::Result<Box<dyn StoreFile>> {
        let mut state = self.lock();
        state.check(FsOp::Open, path)?;
        let parent = path.parent().unwrap_or(Path::new(""));
        if !state.dirs.contains(parent) {
            return Err(not_found(parent));
        }
        let inode = match state.names.get(path) {
            Some(&id) => id,
            None => {
                let id = state.new_inode();
                state.names.insert(path.to_path_buf(), id);
                id
            }
        };
        Ok(Box::new(MemFile {
            fs: self.clone(),
            path: path.to_path_buf(),
            inode,
            generation: state.generation,
            read_pos: 0,
        }))
    }

    fn create(&self, path: &Path) -> io::Result<Box<dyn StoreFile>> {
        let mut state = self.lock();
        state.check(FsOp::Open, path)?;
        let parent = path.parent().unwrap_or(Path::new(""));
        if !state.dirs.contains(parent) {
            return Err(not_found(parent));
        }
        let inode = state.new_inode();
        state.names.insert(path.to_path_buf(), inode);
        state.collect();
        Ok(Box::new(MemFile {
            fs: self.clone(),
            path: path.to_path_buf(),
            inode,
            generation: state.generation,
            read_pos: 0,
        }))
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let mut state = self.lock();
        state.check(FsOp::Read, path)?;
        let id = *state.names.get(path).ok_or_else(|| not_found(path))?;
        Ok(state
            .inodes
            .get(&id)
            .map(|i| i.data.clone())
            .unwrap_or_default())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut state = self.lock();
        state.check(FsOp::Rename, from)?;
        let id = state.names.remove(from).ok_or_else(|| not_found(from))?;
        state.names.insert(to.to_path_buf(), id);
        state.collect();
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut state = self.lock();
        state.check(FsOp::Remove, path)?;
        state.names.remove(path).ok_or_else(|| not_found(path))?;
        state.collect();
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut state = self.lock();
        state.check(FsOp::SyncDir, dir)?;
        if !state.dirs.contains(dir) {
            return Err(not_found(dir));
        }
        let in_dir = |p: &PathBuf| p.parent() == Some(dir);
        state.durable_names.retain(|p, _| !in_dir(p));
        let now: Vec<(PathBuf, u64)> = state
            .names
            .iter()
            .filter(|(p, _)| in_dir(p))
            .map(|(p, &id)| (p.clone(), id))
            .collect();
        state.durable_names.extend(now);
        state.collect();
        Ok(())
    }
}

/// An open [`MemFs`] file.
#[derive(Debug)]
struct MemFile {
    fs: MemFs,
    /// The name it was opened by (for faults).
    path: PathBuf,
    inode: u64,
    generation: u64,
    read_pos: usize,
}

impl MemFile {
    /// The state, if this handle is still valid (no crash since it was opened).
    fn state(&self) -> io::Result<MutexGuard<'_, MemState>> {
        let state = self.fs.lock();
        if state.generation != self.generation {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the file system crashed since this file was opened",
            ));
        }
        Ok(state)
    }
}

impl StoreFile for MemFile {
    fn read_to_end(&mut self, buf: &mut Vec<u8>) -> io::Result<usize> {
        let mut state = self.state()?;
        state.check(FsOp::Read, &self.path)?;
        let data = state
            .inodes
            .get(&self.inode)
            .map(|i| i.data.as_slice())
            .unwrap_or_default();
        let rest = data.get(self.read_pos..).unwrap_or_default();
        buf.extend_from_slice(rest);
        let n = rest.len();
        drop(state);
        self.read_pos += n;
        Ok(n)
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        let mut state = self.state()?;
        state.largest_write = state.largest_write.max(buf.len());
        let (mut len, mut error) = match state.fault(FsOp::Write, &self.path) {
            None => (buf.len(), None),
            Some(FaultKind::NoSpace) => (0, Some(enospc())),
            Some(FaultKind::Io) => (0, Some(eio())),
            Some(FaultKind::Torn(n)) => (n.min(buf.len()), Some(eio())),
        };
        if let Some(capacity) = state.capacity {
            let room = usize::try_from(capacity.saturating_sub(state.used())).unwrap_or(usize::MAX);
            if room < len {
                len = room;
                error = Some(enospc());
            }
        }
        if let Some(inode) = state.inodes.get_mut(&self.inode) {
            inode.data.extend_from_slice(&buf[..len]);
        }
        error.map_or(Ok(()), Err)
    }

    fn sync_data(&mut self) -> io::Result<()> {
        let mut state = self.state()?;
        state.check(FsOp::Sync, &self.path)?;
        if let Some(inode) = state.inodes.get_mut(&self.inode) {
            inode.synced = inode.data.clone();
        }
        Ok(())
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        let mut state = self.state()?;
        state.check(FsOp::SetLen, &self.path)?;
        let len = usize::try_from(len).map_err(|_| enospc())?;
        if let Some(inode) = state.inodes.get_mut(&self.inode) {
            inode.data.resize(len, 0);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_crash_keeps_what_was_synced_and_names_whose_directory_was_synced() {
        let fs = MemFs::new();
        let dir = Path::new("/d");
        fs.create_dir_all(dir).unwrap();
        let mut a = fs.open_append(&dir.join("a")).unwrap();
        a.write_all(b"synced").unwrap();
        a.sync_data().unwrap();
        fs.sync_dir(dir).unwrap();
        a.write_all(b" not yet").unwrap();
        let mut b = fs.create(&dir.join("b")).unwrap();
        b.write_all(b"no name on disk").unwrap();
        b.sync_data().unwrap();
        assert_eq!(fs.contents(&dir.join("a")).unwrap(), b"synced not yet");
        fs.crash(4);
        assert_eq!(
            fs.contents(&dir.join("a")).unwrap(),
            b"synced not",
            "a torn write keeps a prefix"
        );
        assert!(
            fs.contents(&dir.join("b")).is_none(),
            "b's name was not synced"
        );
        assert!(a.write_all(b"x").is_err(), "handles die with the crash");
    }

    #[test]
    fn faults_hit_the_chosen_op_file_and_count() {
        let fs = MemFs::new();
        let dir = Path::new("/d");
        fs.create_dir_all(dir).unwrap();
        fs.inject(
            Fault::new(FsOp::Write, FaultKind::Torn(3))
                .on("log")
                .after(1)
                .once(),
        );
        let mut other = fs.open_append(&dir.join("other")).unwrap();
        other.write_all(b"fine").unwrap();
        let mut log = fs.open_append(&dir.join("log")).unwrap();
        log.write_all(b"first ").unwrap();
        let e = log.write_all(b"second").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        log.write_all(b"!").unwrap();
        assert_eq!(fs.contents(&dir.join("log")).unwrap(), b"first sec!");
        fs.set_capacity(Some(16));
        let e = log.write_all(b"0123456789").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        // "fine" and "first sec!" hold 14 of the 16 bytes.
        assert_eq!(fs.contents(&dir.join("log")).unwrap(), b"first sec!01");
    }

    #[test]
    fn a_rename_replaces_the_name_and_old_handles_keep_the_old_file() {
        let fs = MemFs::new();
        let dir = Path::new("/d");
        fs.create_dir_all(dir).unwrap();
        let mut old = fs.open_append(&dir.join("log")).unwrap();
        old.write_all(b"old").unwrap();
        let mut new = fs.create(&dir.join("tmp")).unwrap();
        new.write_all(b"new").unwrap();
        fs.rename(&dir.join("tmp"), &dir.join("log")).unwrap();
        old.write_all(b" and lost").unwrap();
        assert_eq!(fs.read(&dir.join("log")).unwrap(), b"new");
        assert_eq!(
            fs.read(&dir.join("tmp")).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
    }
}
