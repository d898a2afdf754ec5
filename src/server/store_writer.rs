//! The store's writer thread: the event loop never waits for the disk.
//!
//! The driver hands each loop turn's commit (its store ops and an id) to this thread and
//! goes on. The thread takes every commit waiting when it wakes, writes them with one
//! `write` and one `fdatasync` (group commit across turns), and reports the ids back,
//! waking the event loop through its mio `Waker`; the core then releases that commit's
//! ACKs and pushes its messages to online recipients. Compaction runs here too, in order
//! with the commits. After a failed write every later commit fails without writing
//! (fail-stop: the log's tail is unknown until a restart reads it back).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use log::{info, warn};
use mio::Waker;

use super::store::LogStore;
use crate::relay::StoreOp;

enum Job {
    Commit(u64, Vec<StoreOp>),
    Compact(Vec<StoreOp>),
}

/// What the thread reports back.
#[derive(Debug)]
pub enum Done {
    /// Commit `id` (and every earlier one) is on disk, or failed.
    Committed(u64, Result<(), String>),
    /// A compaction finished (or failed: the old log stays).
    Compacted,
}

/// The handle the driver keeps.
pub struct StoreWriter {
    jobs: Option<Sender<Job>>,
    done: Arc<Mutex<Vec<Done>>>,
    /// Bytes in the log, as of the last report.
    log_size: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl StoreWriter {
    /// Starts the thread that owns `store`; it wakes the event loop with `waker`.
    pub fn spawn(store: LogStore, waker: Arc<Waker>) -> std::io::Result<StoreWriter> {
        let (jobs, rx) = mpsc::channel();
        let done = Arc::new(Mutex::new(Vec::new()));
        let log_size = Arc::new(AtomicU64::new(store.size()));
        let thread = {
            let (done, log_size) = (done.clone(), log_size.clone());
            std::thread::Builder::new()
                .name("imrelay-store".into())
                .spawn(move || run(store, rx, &done, &log_size, &waker))?
        };
        Ok(StoreWriter {
            jobs: Some(jobs),
            done,
            log_size,
            thread: Some(thread),
        })
    }

    /// Queues a commit.
    pub fn commit(&self, id: u64, ops: Vec<StoreOp>) {
        if let Some(jobs) = &self.jobs {
            let _ = jobs.send(Job::Commit(id, ops));
        }
    }

    /// Queues a compaction to `snapshot` (after every commit queued before it).
    pub fn compact(&self, snapshot: Vec<StoreOp>) {
        if let Some(jobs) = &self.jobs {
            let _ = jobs.send(Job::Compact(snapshot));
        }
    }

    /// Everything reported since the last call, in order.
    pub fn take_done(&self, out: &mut Vec<Done>) {
        out.append(&mut self.done.lock().unwrap_or_else(PoisonError::into_inner));
    }

    /// Bytes in the log.
    pub fn log_size(&self) -> u64 {
        self.log_size.load(Ordering::Relaxed)
    }
}

impl Drop for StoreWriter {
    /// Lets the thread write what is queued, then joins it.
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(
    mut store: LogStore,
    jobs: Receiver<Job>,
    done: &Mutex<Vec<Done>>,
    log_size: &AtomicU64,
    waker: &Waker,
) {
    let mut failure: Option<String> = None;
    let mut batch: Vec<StoreOp> = Vec::new();
    while let Ok(first) = jobs.recv() {
        let mut reports = Vec::new();
        let mut last_id = None;
        for job in std::iter::once(first).chain(jobs.try_iter()) {
            match job {
                Job::Commit(id, mut ops) => {
                    batch.append(&mut ops);
                    last_id = Some(id);
                }
                Job::Compact(snapshot) => {
                    if let Some(id) = last_id.take() {
                        reports.push(write(&mut store, &mut batch, id, &mut failure));
                    }
                    if failure.is_none() {
                        if let Err(e) = store.compact(&snapshot) {
                            warn!("store compaction failed (the log stays as it is): {e}");
                        }
                    }
                    reports.push(Done::Compacted);
                }
            }
        }
        if let Some(id) = last_id {
            reports.push(write(&mut store, &mut batch, id, &mut failure));
        }
        log_size.store(store.size(), Ordering::Relaxed);
        done.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .append(&mut reports);
        if let Err(e) = waker.wake() {
            warn!("cannot wake the event loop: {e}");
        }
    }
    info!("store writer stopped");
}

/// Writes and syncs `batch` as commit `id` (every commit up to it).
fn write(
    store: &mut LogStore,
    batch: &mut Vec<StoreOp>,
    id: u64,
    failure: &mut Option<String>,
) -> Done {
    let result = match failure {
        Some(e) => Err(format!("the store failed earlier ({e})")),
        None if batch.is_empty() => Ok(()),
        None => store.append(batch).map_err(|e| e.to_string()),
    };
    batch.clear();
    if let Err(e) = &result {
        failure.get_or_insert_with(|| e.clone());
    }
    Done::Committed(id, result)
}
