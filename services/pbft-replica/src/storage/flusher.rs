//! The flusher: a thread that applies the journal's operations to redb, one transaction per
//! hand-off (a stable checkpoint, or enough bytes), off the persistence thread.
//!
//! Why a thread: the transaction carries a checkpoint interval's blocks (128 batches by
//! default, several MiB under load) and takes tens of milliseconds; done inline, every
//! reply waiting behind it would wait that long once per checkpoint. Meanwhile the journal
//! holds the operations durably and the reader's overlay serves the blocks and certificates
//! redb does not have yet.

use std::path::PathBuf;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use pbft_core::StorageError;
use redb::Database;
use tracing::error;

use super::Overlay;
use super::journal::{self, Op};
use super::ledger::Appender;

/// Operations for redb: every operation of the journal's entries up to `upto`, which redb
/// does not hold yet. `done` is told when they are applied (or failed).
struct Job {
    ops: Vec<Op>,
    upto: u64,
    done: Option<std::sync::mpsc::Sender<()>>,
}

pub(super) struct Flusher {
    jobs: Option<SyncSender<Job>>,
    thread: Option<JoinHandle<()>>,
    /// The first failure: the store is unusable after it (the journal keeps what redb
    /// lacks, and the next start replays it).
    failed: Arc<Mutex<Option<StorageError>>>,
}

impl Flusher {
    pub(super) fn start(
        db: Arc<Database>,
        mut ledger: Appender,
        path: PathBuf,
        overlay: Arc<Mutex<Overlay>>,
    ) -> Result<Flusher, StorageError> {
        // One job queued behind the running one: beyond that the persistence thread waits,
        // which bounds the journal and the memory the queued operations hold.
        let (tx, rx) = sync_channel(1);
        let failed = Arc::new(Mutex::new(None));
        let slot = failed.clone();
        let thread = std::thread::Builder::new()
            .name("pbft-flush".into())
            .spawn(move || run(&db, &mut ledger, &path, &overlay, &slot, rx))
            .map_err(|e| StorageError::Io(format!("starting the flush thread: {e}")))?;
        Ok(Flusher {
            jobs: Some(tx),
            thread: Some(thread),
            failed,
        })
    }

    /// The failure that stopped flushing, if any.
    pub(super) fn check(&self) -> Result<(), StorageError> {
        match &*self.failed.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    /// Queues `ops` (the journal's entries up to `upto`) for redb; with `wait`, returns once
    /// they and everything queued before are applied.
    pub(super) fn submit(&self, ops: Vec<Op>, upto: u64, wait: bool) -> Result<(), StorageError> {
        let (done, applied) = if wait {
            let (tx, rx) = std::sync::mpsc::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let gone = || StorageError::Io("the flush thread has stopped".into());
        self.jobs
            .as_ref()
            .ok_or_else(gone)?
            .send(Job { ops, upto, done })
            .map_err(|_| gone())?;
        if let Some(rx) = applied {
            rx.recv().map_err(|_| gone())?;
        }
        self.check()
    }
}

impl Drop for Flusher {
    /// Applies what is queued, then stops. What was never handed over stays in the journal.
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(
    db: &Database,
    ledger: &mut Appender,
    path: &std::path::Path,
    overlay: &Mutex<Overlay>,
    failed: &Mutex<Option<StorageError>>,
    rx: Receiver<Job>,
) {
    for job in rx {
        let broken = failed.lock().unwrap_or_else(|e| e.into_inner()).is_some();
        // After a failure nothing more is applied: a later job's `upto` would mark the
        // failed one's entries as applied, and its segments would be deleted.
        if !broken && !job.ops.is_empty() {
            let result = super::apply(db, ledger, &job.ops, job.upto)
                .and_then(|()| journal::remove_segments(path, job.upto));
            match result {
                Ok(()) => overlay
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .applied(&job.ops),
                Err(e) => {
                    error!(error = %e, "applying the journal to the database failed");
                    *failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                }
            }
        }
        if let Some(done) = job.done {
            let _ = done.send(());
        }
    }
}
