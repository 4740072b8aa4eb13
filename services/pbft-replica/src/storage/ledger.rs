//! The ledger file: the bytes of every batch the store keeps, appended in the order the
//! flusher applies them, with redb's `batches` table holding only where each one lies.
//!
//! Why: a batch is most of what a replica writes (hundreds of requests against a block's
//! few hundred bytes of header and certificate), and inside redb every one of them was
//! written into copy-on-write B-tree pages that later commits rewrote and freed again. As
//! the ledger grew the database file doubled its regions (304 MB to 2.4 GB over one
//! benchmark), its page cache evicted what it had just written, and the flush thread's CPU
//! tripled over five consecutive runs on one cluster. Appended to a file of its own, a
//! batch is written once and never touched again; redb keeps a 21-byte reference, so the
//! database stays small and its integrity check at start-up (which reads the whole file)
//! stays fast however long the ledger grows.
//!
//! File: `<db>.ledger` next to the database. Each batch is framed like a redb value (see
//! the store's module documentation): `[version][checksum][payload]`, the checksum taken
//! over the table name `batches`, the batch's key (sequence number and digest) and the
//! encoded batch, so a reference that points at the wrong bytes, or bytes damaged on disk,
//! fail the checksum instead of decoding into a wrong batch.
//!
//! Crash safety: the flusher writes a transaction's batches past the file's committed end
//! and `fdatasync`s them, then commits the transaction, which records the new end in
//! redb's `meta` table (`"ledger"`) beside the references. Bytes below the recorded end
//! are never written again. A crash between the two leaves bytes past the end that no
//! reference names; [`LedgerFile::open`] cuts them off, and the journal replays the
//! transaction. A file shorter than the recorded end has lost committed batches and is
//! refused. A tail longer than any one flush writes is not cut but moved aside (see
//! [`LedgerFile::open`]): it means the database is older than the file.
//!
//! Bytes once written are never written again, committed or not: after a failed commit
//! the appender moves past them instead of back. redb may report a commit as failed that
//! did reach the disk, and its references must keep pointing at what they named.
//!
//! Written pages leave the page cache once they are on disk (`POSIX_FADV_DONTNEED`): the
//! ledger is read back only to serve a lagging peer or a verification, and its pages
//! otherwise fill the cache with data nobody reads, each write touching fresh memory. On
//! this project's benchmark machine that cut the flush thread's CPU by a third (36-38
//! against 47-60 ticks per 5 s at 1,024 requests in flight), most of it the kernel's copy
//! into new page-cache pages.
//!
//! A batch whose last reference goes (a pre-prepare that a new view replaced before it
//! executed) leaves its bytes behind as dead space: rare, and the file is append-only.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use pbft_core::StorageError;

/// The ledger file next to the database `db`.
pub(super) fn path_for(db: &Path) -> PathBuf {
    let mut name = db.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".ledger");
    db.with_file_name(name)
}

/// Where a batch lies in the ledger file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Extent {
    pub(super) offset: u64,
    pub(super) len: u32,
}

impl Extent {
    pub(super) const ENCODED_LEN: usize = 8 + 4;

    pub(super) fn to_bytes(self) -> [u8; Self::ENCODED_LEN] {
        let mut out = [0; Self::ENCODED_LEN];
        out[..8].copy_from_slice(&self.offset.to_be_bytes());
        out[8..].copy_from_slice(&self.len.to_be_bytes());
        out
    }

    pub(super) fn from_bytes(bytes: &[u8]) -> Option<Extent> {
        let (offset, len) = bytes.split_first_chunk::<8>()?;
        Some(Extent {
            offset: u64::from_be_bytes(*offset),
            len: u32::from_be_bytes(len.try_into().ok()?),
        })
    }
}

/// The file, for reading from any thread (positioned reads need no lock) and for the one
/// [`Appender`].
#[derive(Debug)]
pub(super) struct LedgerFile {
    file: File,
    path: PathBuf,
    /// How far the file is durable and never to be written again: reads stop here.
    readable: AtomicU64,
}

impl LedgerFile {
    /// Opens (creating it if the database refers to nothing yet) the ledger file of `db`,
    /// whose committed part ends at `end`, and cuts off anything past `end` (a flush that
    /// never committed). A tail larger than `max_tail` is moved aside instead, to
    /// `<file>.tail-<end>-<length>`: no one flush writes that much, so the database is
    /// older than the file (restored from an earlier copy, say), and those batches may be
    /// all that is left of them.
    pub(super) fn open(db: &Path, end: u64, max_tail: u64) -> Result<LedgerFile, StorageError> {
        let path = path_for(db);
        if end > 0 && !path.exists() {
            return Err(StorageError::Corrupt(format!(
                "{} is missing, but the database refers to {end} bytes of it: committed \
                 batches are missing",
                path.display()
            )));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| io(&path, "opening", e))?;
        // The name must survive a crash before any reference to it is committed. Synced at
        // every open, not only when this one created it: the process that did may have
        // died before its sync.
        super::journal::sync_dir(&path)?;
        let len = file
            .metadata()
            .map_err(|e| io(&path, "reading the size of", e))?
            .len();
        if len < end {
            return Err(StorageError::Corrupt(format!(
                "{} is {len} bytes, but the database refers to {end}: committed batches \
                 are missing",
                path.display()
            )));
        }
        if len - end > max_tail {
            let aside = set_aside(&file, &path, end, len)?;
            tracing::warn!(
                ledger = %path.display(),
                kept = %aside.display(),
                bytes = len - end,
                "the ledger file holds more past its committed end than one flush writes; \
                 the database is older than the file, so the tail is kept aside"
            );
        }
        if len > end {
            file.set_len(end)
                .and_then(|()| file.sync_all())
                .map_err(|e| io(&path, "cutting an unfinished flush off", e))?;
        }
        Ok(LedgerFile {
            file,
            path,
            readable: AtomicU64::new(end),
        })
    }

    /// The bytes at `at`, exactly `at.len` of them.
    pub(super) fn read(&self, at: Extent) -> Result<Vec<u8>, StorageError> {
        // Checked before allocating: a damaged reference must not ask for gigabytes.
        let readable = self.readable.load(Ordering::Acquire);
        if at
            .offset
            .checked_add(u64::from(at.len))
            .is_none_or(|e| e > readable)
        {
            return Err(StorageError::Corrupt(format!(
                "{}: {} bytes at offset {} lie past its end ({readable})",
                self.path.display(),
                at.len,
                at.offset
            )));
        }
        let mut buf = vec![0; at.len as usize];
        self.file.read_exact_at(&mut buf, at.offset).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                StorageError::Corrupt(format!(
                    "{}: {} bytes at offset {} lie past its end",
                    self.path.display(),
                    at.len,
                    at.offset
                ))
            } else {
                io(
                    &self.path,
                    format_args!("reading offset {} of", at.offset),
                    e,
                )
            }
        })?;
        Ok(buf)
    }
}

/// Copies the file's bytes from `end` to `len` into a file of their own beside it, synced,
/// and returns its path.
fn set_aside(file: &File, path: &Path, end: u64, len: u64) -> Result<PathBuf, StorageError> {
    let mut aside_name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    // Named by both ends, and never replacing a file already there: an earlier tail kept
    // aside is not overwritten by a later one.
    aside_name.push(format!(".tail-{end}-{len}"));
    let aside = path.with_file_name(aside_name);
    let mut out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&aside)
        .map_err(|e| io(&aside, "creating", e))?;
    // Everything else reads and writes this file at explicit offsets, so moving its
    // cursor here disturbs nothing.
    let mut reader = file;
    std::io::Seek::seek(&mut reader, std::io::SeekFrom::Start(end))
        .and_then(|_| std::io::copy(&mut std::io::Read::take(reader, len - end), &mut out))
        .map_err(|e| io(&aside, "copying the tail into", e))?;
    out.sync_all().map_err(|e| io(&aside, "syncing", e))?;
    super::journal::sync_dir(&aside)?;
    Ok(aside)
}

/// The writing end, owned by whoever applies transactions (the replay at start-up, then
/// the flusher): stages a transaction's batches and makes them durable before it commits.
#[derive(Debug)]
pub(super) struct Appender {
    file: std::sync::Arc<LedgerFile>,
    /// Where the next transaction's batches go: the committed end, or past bytes a failed
    /// transaction wrote.
    end: u64,
    staged: Vec<u8>,
}

/// The staging buffer's capacity kept between transactions. The replay at start-up can
/// stage a whole journal (tens of MiB); the flusher's transactions are far smaller.
const KEEP_STAGING: usize = 4 << 20;

impl Appender {
    pub(super) fn new(file: std::sync::Arc<LedgerFile>, end: u64) -> Appender {
        Appender {
            file,
            end,
            staged: Vec::new(),
        }
    }

    /// Stages `framed` (a framed batch) to be written with the transaction; returns where
    /// it will lie.
    pub(super) fn stage(&mut self, framed: &[u8]) -> Result<Extent, StorageError> {
        let len = u32::try_from(framed.len()).map_err(|_| {
            StorageError::Io(format!("a batch of {} bytes is too large", framed.len()))
        })?;
        let offset = self.end + self.staged.len() as u64;
        self.staged.extend_from_slice(framed);
        Ok(Extent { offset, len })
    }

    /// Writes what is staged and makes it durable. Returns the end the transaction must
    /// record; the appender moves there at [`Appender::committed`] or
    /// [`Appender::abandon`].
    pub(super) fn write(&mut self) -> Result<u64, StorageError> {
        let new_end = self.end + self.staged.len() as u64;
        if !self.staged.is_empty() {
            let f = &self.file;
            f.file
                .write_all_at(&self.staged, self.end)
                .and_then(|()| f.file.sync_data())
                .map_err(|e| io(&f.path, "writing", e))?;
            // On disk and never written again: readers may look there as soon as a
            // reference to it commits, which can be before this transaction's caller hears.
            f.readable.fetch_max(new_end, Ordering::Release);
            drop_cached(&f.file, self.end, self.staged.len());
        }
        Ok(new_end)
    }

    /// The transaction committed: what it staged is part of the ledger now.
    pub(super) fn committed(&mut self) {
        self.end += self.staged.len() as u64;
        self.next();
    }

    /// The transaction did not commit, or its caller could not tell. What it wrote stays
    /// as it is and the next transaction goes past it: redb can fail a commit that reached
    /// the disk, whose references name these bytes. If it did not, they are dead space
    /// until the next start cuts them off or the next commit records an end past them.
    /// (Bytes whose write failed before their sync were never referenced, and are
    /// overwritten.)
    pub(super) fn abandon(&mut self) {
        self.end = self.end.max(self.file.readable.load(Ordering::Acquire));
        self.next();
    }

    fn next(&mut self) {
        self.staged.clear();
        self.staged.shrink_to(KEEP_STAGING);
    }
}

/// Asks the kernel to drop `len` bytes from `offset` on from its page cache once they are
/// on disk.
fn drop_cached(file: &File, offset: u64, len: usize) {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return;
    };
    // SAFETY: posix_fadvise only reads its arguments; the descriptor is open for as long
    // as `file` is borrowed.
    unsafe {
        libc::posix_fadvise(file.as_raw_fd(), offset, len, libc::POSIX_FADV_DONTNEED);
    }
}

fn io(path: &Path, what: impl std::fmt::Display, e: std::io::Error) -> StorageError {
    StorageError::Io(format!("ledger: {what} {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn an_extent_round_trips_and_short_bytes_are_refused() {
        let e = Extent {
            offset: 0x0102_0304_0506_0708,
            len: 0x0a0b_0c0d,
        };
        assert_eq!(Extent::from_bytes(&e.to_bytes()), Some(e));
        assert_eq!(Extent::from_bytes(&e.to_bytes()[..11]), None);
    }

    /// A new, empty ledger file in a directory of its own, and its appender.
    fn empty_ledger() -> (tempfile::TempDir, Arc<LedgerFile>, Appender) {
        let dir = tempfile::tempdir().unwrap();
        let file = Arc::new(LedgerFile::open(&dir.path().join("pbft.redb"), 0, 0).unwrap());
        let appender = Appender::new(file.clone(), 0);
        (dir, file, appender)
    }

    #[test]
    fn committed_bytes_stay_and_abandoned_ones_are_never_overwritten() {
        let (_dir, file, mut a) = empty_ledger();
        let first = a.stage(b"first").unwrap();
        assert_eq!(a.write().unwrap(), 5);
        a.committed();
        // A commit that failed after its batches were written: redb may still have made
        // it durable, so its bytes must keep what it referred to.
        let maybe = a.stage(b"maybe!").unwrap();
        assert_eq!(a.write().unwrap(), 11);
        a.abandon();
        // One that failed before writing anything leaves no gap.
        a.stage(b"never written").unwrap();
        a.abandon();
        let second = a.stage(b"2nd").unwrap();
        assert_eq!(
            second.offset, 11,
            "written bytes are skipped, unwritten ones are not"
        );
        assert_eq!(a.write().unwrap(), 14);
        a.committed();
        assert_eq!(file.read(first).unwrap(), b"first");
        assert_eq!(file.read(maybe).unwrap(), b"maybe!");
        assert_eq!(file.read(second).unwrap(), b"2nd");
    }

    #[test]
    fn reads_stop_at_what_is_durable_and_a_wild_extent_allocates_nothing() {
        let (_dir, file, mut a) = empty_ledger();
        let staged = a.stage(b"staged, not yet written").unwrap();
        assert!(matches!(file.read(staged), Err(StorageError::Corrupt(_))));
        a.write().unwrap();
        assert_eq!(file.read(staged).unwrap(), b"staged, not yet written");
        for wild in [
            Extent {
                offset: 0,
                len: u32::MAX,
            },
            Extent {
                offset: u64::MAX - 1,
                len: 8,
            },
        ] {
            let e = file.read(wild).unwrap_err();
            assert!(matches!(e, StorageError::Corrupt(m) if m.contains("past its end")));
        }
    }

    #[test]
    fn open_cuts_off_an_uncommitted_tail_and_refuses_a_short_file() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("pbft.redb");
        std::fs::write(path_for(&db), b"committed|torn tail").unwrap();
        let file = LedgerFile::open(&db, 9, 100).unwrap();
        assert_eq!(std::fs::metadata(path_for(&db)).unwrap().len(), 9);
        let past = file.read(Extent { offset: 5, len: 10 }).unwrap_err();
        assert!(matches!(past, StorageError::Corrupt(m) if m.contains("past its end")));
        drop(file);
        let short = LedgerFile::open(&db, 10, 100).unwrap_err();
        assert!(matches!(short, StorageError::Corrupt(m) if m.contains("committed batches")));
        let aside = dir.path().read_dir().unwrap().count();
        assert_eq!(aside, 1, "a short tail is not kept");
    }

    #[test]
    fn a_tail_longer_than_one_flush_is_kept_aside_before_the_cut() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("pbft.redb");
        let tail: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let mut bytes = b"committed|".to_vec();
        bytes.extend_from_slice(&tail);
        std::fs::write(path_for(&db), &bytes).unwrap();
        LedgerFile::open(&db, 10, 1000).unwrap();
        assert_eq!(std::fs::metadata(path_for(&db)).unwrap().len(), 10);
        let kept = dir
            .path()
            .join(format!("pbft.redb.ledger.tail-10-{}", bytes.len()));
        assert!(
            std::fs::read(kept).unwrap() == tail,
            "the tail kept aside is the tail"
        );
    }

    #[test]
    fn a_missing_file_the_database_refers_to_is_refused_and_not_recreated() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("pbft.redb");
        let e = LedgerFile::open(&db, 42, 100).unwrap_err();
        assert!(matches!(e, StorageError::Corrupt(m) if m.contains("is missing")));
        assert!(!path_for(&db).exists());
        LedgerFile::open(&db, 0, 100).unwrap();
        assert!(path_for(&db).exists(), "a new store creates it");
    }
}
