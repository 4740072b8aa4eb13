//! Stable checkpoints' state, written off the critical path.
//!
//! A checkpoint's snapshot is the whole replicated state (13 MB with the benchmark's 256
//! load clients). Written inside the protocol's transaction, as it used to be, it held up
//! every output queued behind it, up to a quarter of a second at each checkpoint, which was
//! the tail of the latency distribution. Only the certificate, and the pruning it allows,
//! must be durable before the replica goes on: the state at a certified sequence number
//! can be rebuilt from any older state and the blocks after it (blocks are never pruned),
//! and checked against the digest the certificate signs.
//!
//! So the store's transaction records the certificate, and a thread of its own writes the
//! snapshot to a file next to the database (`<db>.snapshot`: written to a temporary file,
//! synced, renamed, directory synced). Recovery starts from the newest snapshot it has, or
//! genesis, and replays blocks up to the newest certificate ([`catch_up`]).
//!
//! Writing the whole state at every checkpoint (about one a second under load) cost 6 % of
//! a loaded machine's CPU for nothing but a shorter replay after a crash, so the writer
//! writes at most one snapshot per [`MIN_INTERVAL`], the newest one certified when it is
//! due. Recovery then replays about that long's worth of blocks up to the newest
//! certificate (more if a write failed), which takes a fraction of the time it took to
//! commit them (no signatures, no network, no disk writes).

use std::fs::File;
use std::io::{Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use pbft_api::convert::write_stable_checkpoint;
use pbft_core::{
    Block, CheckpointCert, KvStore, Seq, StableCheckpoint, StateDigest, StorageError,
    checkpoint_digest,
};
use tracing::warn;

use super::{FRAME_VERSION, HEADER_LEN, Key, checksum_of, corrupt, decode, frame_header};

/// Least time between the starts of two snapshot writes, unless flushed or stopping.
const MIN_INTERVAL: Duration = Duration::from_secs(10);

/// Name the snapshot file's checksum and errors go by.
const FILE: &str = "snapshot";

/// Where the snapshot of the database at `db` lives.
pub(super) fn path_for(db: &Path) -> PathBuf {
    db.with_extension(FILE)
}

/// Writes snapshots handed to it, newest first: one still waiting when a newer one arrives
/// is dropped (recovery needs only the newest), and one is written at most every
/// [`MIN_INTERVAL`]. Flushing or dropping the writer writes what is queued at once.
pub(super) struct SnapshotWriter {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct Shared {
    slot: Mutex<Slot>,
    changed: Condvar,
}

#[derive(Default)]
struct Slot {
    pending: Option<StableCheckpoint>,
    busy: bool,
    stop: bool,
    /// A flush is waiting: write what is pending without waiting for the interval.
    urgent: bool,
}

impl Shared {
    /// The slot; a panic elsewhere while holding it leaves nothing half-written in it.
    fn lock(&self) -> MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl SnapshotWriter {
    pub(super) fn start(file: PathBuf) -> Result<Self, StorageError> {
        let shared = Arc::new(Shared {
            slot: Mutex::new(Slot::default()),
            changed: Condvar::new(),
        });
        let worker = shared.clone();
        let thread = std::thread::Builder::new()
            .name("pbft-snapshot".into())
            .spawn(move || write_loop(&worker, &file))
            .map_err(|e| StorageError::Io(format!("cannot start the snapshot writer: {e}")))?;
        Ok(SnapshotWriter {
            shared,
            thread: Some(thread),
        })
    }

    /// Queues `stable` to be written, replacing one not yet started.
    pub(super) fn submit(&self, stable: StableCheckpoint) {
        self.shared.lock().pending = Some(stable);
        self.shared.changed.notify_all();
    }

    /// Waits until everything queued so far is written (or failed, which is logged).
    pub(super) fn flush(&self) {
        let mut slot = self.shared.lock();
        slot.urgent = true;
        self.shared.changed.notify_all();
        while slot.pending.is_some() || slot.busy {
            slot = self
                .shared
                .changed
                .wait(slot)
                .unwrap_or_else(|e| e.into_inner());
        }
        slot.urgent = false;
    }
}

impl Drop for SnapshotWriter {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.changed.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn write_loop(shared: &Shared, file: &Path) {
    let mut last_started: Option<Instant> = None;
    loop {
        let stable = {
            let mut slot = shared.lock();
            loop {
                if slot.pending.is_none() {
                    if slot.stop {
                        return;
                    }
                    slot = shared.changed.wait(slot).unwrap_or_else(|e| e.into_inner());
                    continue;
                }
                // Time left before the next write is due; none when flushing or stopping.
                let left = match last_started {
                    Some(t) if !slot.stop && !slot.urgent => {
                        MIN_INTERVAL.saturating_sub(t.elapsed())
                    }
                    _ => Duration::ZERO,
                };
                if left.is_zero()
                    && let Some(s) = slot.pending.take()
                {
                    slot.busy = true;
                    break s;
                }
                slot = shared
                    .changed
                    .wait_timeout(slot, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        };
        last_started = Some(Instant::now());
        if let Err(e) = write(file, &stable) {
            // Not fatal: recovery replays blocks from an older snapshot instead.
            warn!(seq = stable.cert.seq, error = %e, file = %file.display(), "writing the checkpoint snapshot failed");
        }
        shared.lock().busy = false;
        shared.changed.notify_all();
    }
}

/// Writes `stable` to `file` atomically: a crash leaves the old file or the new one.
///
/// The state is streamed to the file (see [`write_stable_checkpoint`]), not encoded whole
/// first: the encoding and its framed copy were about twice the state, the peak memory of a
/// loaded replica. The frame's header holds the payload's checksum, so it is written last,
/// over a placeholder; the file is synced before it is renamed into place either way.
pub(super) fn write(file: &Path, stable: &StableCheckpoint) -> std::io::Result<()> {
    let tmp = file.with_extension("snapshot.tmp");
    {
        let mut f = File::create(&tmp)?;
        f.write_all(&[0; HEADER_LEN])?;
        let mut out = Hashing {
            file: &mut f,
            hash: checksum_of(FILE, Key::Name(FILE)),
            unsynced: 0,
        };
        write_stable_checkpoint(stable, &mut out)?;
        let header = frame_header(FRAME_VERSION, out.hash.digest().to_be_bytes());
        f.seek(SeekFrom::Start(0))?;
        f.write_all(&header)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, file)?;
    if let Some(dir) = file.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Bytes of a snapshot written between two syncs of its file.
///
/// Synced once at the end, a snapshot (the whole state: 13 MB in the benchmark) goes to the
/// disk in one flush, and the journal's fdatasyncs, which every batch waits for, can wait
/// behind it. In a micro-benchmark on the benchmark machine (6 KB write + fdatasync in a
/// loop while 17 MB are written and synced beside it), the slowest fdatasync took 6.3 and
/// 8.6 ms with one sync at the end, 4.1 and 4.3 ms with a sync every MiB. Synced as it
/// goes, the file never has more than this much waiting for the disk.
const SYNC_EVERY: usize = 1 << 20;

/// Writes through to `file`, hashing what it writes, and syncs it every [`SYNC_EVERY`].
struct Hashing<'f> {
    file: &'f mut File,
    hash: xxhash_rust::xxh3::Xxh3,
    /// Bytes written since the last sync.
    unsynced: usize,
}

impl std::io::Write for Hashing<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hash.update(&buf[..n]);
        self.unsynced += n;
        if self.unsynced >= SYNC_EVERY {
            self.file.sync_data()?;
            self.unsynced = 0;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// The snapshot in `file`, if there is one.
pub(super) fn read(file: &Path) -> Result<Option<StableCheckpoint>, StorageError> {
    match std::fs::read(file) {
        Ok(bytes) => decode(FILE, Key::Name(FILE), &bytes).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StorageError::Io(format!("reading {}: {e}", file.display()))),
    }
}

/// The stable checkpoint recovery starts from: `cert` (the newest certificate), its state
/// rebuilt from `base` (the newest snapshot held, or genesis) and the blocks after it,
/// which `blocks(from, to)` reads, and checked against the certified digest. `base` itself
/// when it is already at `cert` or later (or there is no certificate).
pub(super) fn catch_up(
    base: Option<StableCheckpoint>,
    cert: Option<CheckpointCert>,
    blocks: impl FnOnce(Seq, Seq) -> Result<Vec<Block>, StorageError>,
) -> Result<Option<StableCheckpoint>, StorageError> {
    let Some(cert) = cert else { return Ok(base) };
    let from = base.as_ref().map_or(0, |b| b.cert.seq);
    if from >= cert.seq {
        return Ok(base);
    }
    let (mut kv, mut head) = match base {
        Some(b) => (
            KvStore::from_snapshot(Arc::unwrap_or_clone(b.snapshot)),
            b.block_hash,
        ),
        None => (KvStore::default(), pbft_core::Digest::ZERO),
    };
    let here = Key::Seq(cert.seq);
    let replayed = blocks(from + 1, cert.seq)?;
    for (expected, b) in (from + 1..).zip(&replayed) {
        if b.height != expected || b.prev_hash != head {
            return Err(corrupt(
                "checkpoints",
                here,
                format_args!("block {expected} needed to rebuild its state is missing or unlinked"),
            ));
        }
        kv.execute(&b.batch);
        head = b.hash();
    }
    if replayed.len() as u64 != cert.seq - from {
        return Err(corrupt(
            "checkpoints",
            here,
            format_args!(
                "blocks {}..={} needed to rebuild its state are missing",
                from + 1,
                cert.seq
            ),
        ));
    }
    // Either digest scheme proves the rebuilt state is the certified one; whether it is the
    // scheme this replica is configured for is the core's check when it recovers.
    let certified = [StateDigest::Buckets, StateDigest::Linear]
        .into_iter()
        .any(|scheme| checkpoint_digest(&kv.digest(scheme), &head) == cert.digest);
    if !certified {
        return Err(corrupt(
            "checkpoints",
            here,
            "the state rebuilt from the snapshot and blocks does not match the certificate",
        ));
    }
    Ok(Some(StableCheckpoint {
        cert,
        snapshot: std::sync::Arc::new(kv.snapshot()),
        block_hash: head,
    }))
}
