//! The store's writer thread: the event loop never waits for the disk.
//!
//! The driver hands each loop turn's commit (its store ops and an id) to this thread and
//! goes on. The thread takes every commit waiting when it wakes, writes them with one
//! `write` and one `fdatasync` (group commit across turns), and reports the ids back,
//! waking the event loop through its mio `Waker`; the core then releases that commit's
//! ACKs and pushes its messages to online recipients. Compaction runs here too, in order
//! with the commits.
//!
//! Failures: after a failed write or fsync, or a compaction that failed after its rename,
//! every later commit is reported failed without writing (fail-stop, kept by
//! [`LogStore`]); a failed commit was cut off the log first, so its STORE_FAILED holds.
//! A commit that could not be cut off nor recorded as failed is not answered at all: the
//! process aborts, as a crash would. A failed compaction that left the log working is
//! retried once the log has grown by half.
//!
//! Each group commit's time (write and fdatasync) is recorded into a histogram the thread
//! owns, with no lock; a copy is published after each batch, beside the reports, for the
//! admin listener's snapshots ([`StoreWriter::commit_latency`]; the event loop reads it
//! only when it builds one).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use log::{error, info, warn};
use mio::Waker;

use super::admin_metrics::LatencyHistogram;
use super::store::{LogStore, StoreError};
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
    /// The writer is ready for another compaction: at once after one that worked, once the
    /// log has grown by half after one that failed (the old log stays), never after the
    /// store stopped.
    Compacted,
}

/// The handle the driver keeps.
pub struct StoreWriter {
    jobs: Option<Sender<Job>>,
    done: Arc<Mutex<Vec<Done>>>,
    /// Bytes in the log, as of the last report.
    log_size: Arc<AtomicU64>,
    /// Group commit times, as of the last report.
    commit_latency: Arc<Mutex<LatencyHistogram>>,
    thread: Option<JoinHandle<()>>,
}

impl StoreWriter {
    /// Starts the thread that owns `store`; it wakes the event loop with `waker`.
    pub fn spawn(store: LogStore, waker: Arc<Waker>) -> std::io::Result<StoreWriter> {
        StoreWriter::spawn_with(store, waker, Box::new(abort_unanswerable))
    }

    /// [`StoreWriter::spawn`], calling `on_unanswerable` instead of aborting when a failed
    /// commit may reappear (the thread then stops without reporting it).
    fn spawn_with(
        store: LogStore,
        waker: Arc<Waker>,
        on_unanswerable: OnUnanswerable,
    ) -> std::io::Result<StoreWriter> {
        let (jobs, rx) = mpsc::channel();
        let done = Arc::new(Mutex::new(Vec::new()));
        let log_size = Arc::new(AtomicU64::new(store.size()));
        let commit_latency = Arc::new(Mutex::new(LatencyHistogram::default()));
        let writer = Writer {
            store,
            compaction_retry_at: None,
            on_unanswerable,
            commit_latency: LatencyHistogram::default(),
        };
        let thread = {
            let shared = Shared {
                done: done.clone(),
                log_size: log_size.clone(),
                commit_latency: commit_latency.clone(),
            };
            std::thread::Builder::new()
                .name("imrelay-store".into())
                .spawn(move || run(writer, rx, &shared, &waker))?
        };
        Ok(StoreWriter {
            jobs: Some(jobs),
            done,
            log_size,
            commit_latency,
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

    /// Group commit times so far (as of the writer's last report).
    pub fn commit_latency(&self) -> LatencyHistogram {
        *self
            .commit_latency
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
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

/// What the writer does when a commit failed and the store could not make sure it stays
/// out of the log ([`StoreError::CommitMayReappear`]).
type OnUnanswerable = Box<dyn Fn(&StoreError) + Send>;

/// The thread's state.
struct Writer {
    store: LogStore,
    /// After a compaction that failed (and left the log working): its `Compacted` report
    /// is held until the log has grown to this size, so the driver does not build a new
    /// snapshot every turn.
    compaction_retry_at: Option<u64>,
    on_unanswerable: OnUnanswerable,
    /// Time of each group commit, recorded here and published after each batch.
    commit_latency: LatencyHistogram,
}

/// What the thread shares with the driver's handle.
struct Shared {
    done: Arc<Mutex<Vec<Done>>>,
    log_size: Arc<AtomicU64>,
    commit_latency: Arc<Mutex<LatencyHistogram>>,
}

fn run(mut writer: Writer, jobs: Receiver<Job>, shared: &Shared, waker: &Waker) {
    let mut batch: Vec<StoreOp> = Vec::new();
    'jobs: while let Ok(first) = jobs.recv() {
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
                        let Some(report) = writer.write(&mut batch, id) else {
                            break 'jobs;
                        };
                        reports.push(report);
                    }
                    writer.compact(&snapshot, &mut reports);
                }
            }
        }
        if let Some(id) = last_id {
            let Some(report) = writer.write(&mut batch, id) else {
                break 'jobs;
            };
            reports.push(report);
        }
        if writer
            .compaction_retry_at
            .is_some_and(|at| writer.store.size() >= at && writer.store.failure().is_none())
        {
            writer.compaction_retry_at = None;
            reports.push(Done::Compacted);
        }
        shared
            .log_size
            .store(writer.store.size(), Ordering::Relaxed);
        *shared
            .commit_latency
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = writer.commit_latency;
        shared
            .done
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .append(&mut reports);
        if let Err(e) = waker.wake() {
            warn!("cannot wake the event loop: {e}");
        }
    }
    info!("store writer stopped");
}

impl Writer {
    /// Writes and syncs `batch` as commit `id` (every commit up to it). `None`: the commit
    /// failed in a way that must not be answered STORE_FAILED; the thread stops.
    fn write(&mut self, batch: &mut Vec<StoreOp>, id: u64) -> Option<Done> {
        let started = std::time::Instant::now();
        let result = self.store.append(batch);
        self.commit_latency.record(started.elapsed());
        batch.clear();
        match result {
            Ok(()) => Some(Done::Committed(id, Ok(()))),
            Err(e @ StoreError::CommitMayReappear(_)) => {
                (self.on_unanswerable)(&e);
                None
            }
            Err(e) => Some(Done::Committed(id, Err(e.to_string()))),
        }
    }

    /// Compacts to `snapshot`. `Compacted` is reported when the driver may ask again: at
    /// once after a success, once the log has grown by half after a failure that left the
    /// log working, never once the store has stopped.
    fn compact(&mut self, snapshot: &[StoreOp], reports: &mut Vec<Done>) {
        if self.store.failure().is_some() {
            return;
        }
        match self.store.compact(snapshot) {
            Ok(()) => reports.push(Done::Compacted),
            Err(_) if self.store.failure().is_some() => {}
            Err(_) => {
                let size = self.store.size();
                self.compaction_retry_at = Some(size.saturating_add(size / 2));
            }
        }
    }
}

/// The default for a commit that cannot be answered: exit at once, as a crash would. The
/// senders see their connection drop and resend after reconnecting; the next start reads
/// back whatever of the commit is whole.
fn abort_unanswerable(e: &StoreError) {
    error!("{e}; exiting now rather than answer STORE_FAILED");
    std::process::abort();
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    use bytes::Bytes;
    use mio::{Events, Poll, Token};

    use super::super::store_fs::{Fault, FaultKind, FsOp, MemFs};
    use super::*;
    use crate::proto::UserId;

    fn message(i: usize) -> StoreOp {
        StoreOp::Append {
            user: UserId(2),
            frame: Bytes::from(format!("message {i:0>40}").into_bytes()),
        }
    }

    struct Harness {
        fs: Arc<MemFs>,
        poll: Poll,
        writer: StoreWriter,
        got: Vec<Done>,
    }

    impl Harness {
        fn new(on_unanswerable: OnUnanswerable) -> Harness {
            let fs = Arc::new(MemFs::new());
            let (store, _) = LogStore::open_in(fs.clone(), Path::new("/data"), false).unwrap();
            let poll = Poll::new().unwrap();
            let waker = Arc::new(Waker::new(poll.registry(), Token(0)).unwrap());
            let writer = StoreWriter::spawn_with(store, waker, on_unanswerable).unwrap();
            Harness {
                fs,
                poll,
                writer,
                got: Vec::new(),
            }
        }

        /// Waits for the writer's reports until `commit` is reported; returns them all.
        fn until_committed(&mut self, commit: u64) -> Vec<Done> {
            let mut events = Events::with_capacity(4);
            loop {
                self.writer.take_done(&mut self.got);
                if let Some(i) = self
                    .got
                    .iter()
                    .position(|d| matches!(d, Done::Committed(id, _) if *id == commit))
                {
                    return self.got.drain(..=i).collect();
                }
                self.poll
                    .poll(&mut events, Some(Duration::from_secs(10)))
                    .unwrap();
                assert!(!events.is_empty(), "no report from the writer");
            }
        }

        fn log(&self) -> Vec<u8> {
            self.fs.contents(Path::new("/data/inbox.log")).unwrap()
        }
    }

    /// Before: the writer kept appending to the unlinked old log and ACKed.
    #[test]
    fn after_a_failed_reopen_every_commit_fails_and_nothing_is_written() {
        let mut h = Harness::new(Box::new(|e| panic!("{e}")));
        h.writer.commit(1, (0..20).map(message).collect());
        assert!(matches!(
            h.until_committed(1)[..],
            [Done::Committed(1, Ok(()))]
        ));
        h.fs.inject(Fault::new(FsOp::Open, FaultKind::Io).on("inbox.log").once());
        h.writer.compact(vec![StoreOp::Epoch(1), message(19)]);
        h.writer.commit(2, vec![message(20)]);
        let reports = h.until_committed(2);
        assert!(
            matches!(&reports[..], [Done::Committed(2, Err(e))] if e.contains("failed earlier")),
            "{reports:?}"
        );
        let log = h.log();
        h.writer.commit(3, vec![message(21)]);
        assert!(matches!(
            h.until_committed(3)[..],
            [Done::Committed(3, Err(_))]
        ));
        assert_eq!(h.log(), log, "nothing written after the failure");
    }

    #[test]
    fn a_failed_compaction_is_reported_ready_again_once_the_log_has_grown_by_half() {
        let mut h = Harness::new(Box::new(|e| panic!("{e}")));
        h.writer.commit(1, (0..20).map(message).collect());
        h.until_committed(1);
        let size = h.writer.log_size();
        h.fs.inject(
            Fault::new(FsOp::Write, FaultKind::NoSpace)
                .on("inbox.log.tmp")
                .once(),
        );
        h.writer.compact(vec![StoreOp::Epoch(1)]);
        h.writer.commit(2, vec![message(20)]);
        let reports = h.until_committed(2);
        assert!(
            matches!(reports[..], [Done::Committed(2, Ok(()))]),
            "no Compacted yet: {reports:?}"
        );
        h.writer.commit(3, (21..40).map(message).collect());
        let reports = h.until_committed(3);
        assert!(h.writer.log_size() >= size + size / 2);
        assert!(
            matches!(reports[..], [Done::Committed(3, Ok(()))]),
            "{reports:?}"
        );
        h.writer.take_done(&mut h.got);
        assert!(matches!(h.got[..], [Done::Compacted]), "{:?}", h.got);
    }

    /// A failure the store could not record is never answered STORE_FAILED.
    #[test]
    fn a_commit_that_may_reappear_is_not_answered() {
        let called = Arc::new(AtomicBool::new(false));
        let flag = called.clone();
        let h = Harness::new(Box::new(move |_| flag.store(true, Ordering::SeqCst)));
        h.fs.inject(Fault::new(FsOp::Sync, FaultKind::Io));
        h.fs.inject(Fault::new(FsOp::SetLen, FaultKind::Io));
        h.writer.commit(1, vec![message(1)]);
        // The writer stops: dropping the handle joins it.
        let done = h.writer.done.clone();
        drop(h.writer);
        assert!(called.load(Ordering::SeqCst));
        assert!(done.lock().unwrap().is_empty(), "no report for the commit");
    }
}
