//! The journal: each [`Storage::persist`](pbft_core::Storage::persist) call appended to a
//! segment file and made durable with one `fdatasync`, ahead of the redb database.
//!
//! Why: a redb commit rewrites the copy-on-write B-tree pages of every table it touches and
//! frees the old ones, and a loaded replica committed two or three times per batch (accept,
//! prepare, execute). That was a third of the whole cluster's CPU: 54 of 174 us per request
//! at n = 4 with 256 requests in flight, measured against a build that skipped persistence
//! altogether. An append is one `write` and one `fdatasync`. The journal's operations reach
//! redb in one transaction per stable checkpoint, on a thread of their own (see `flusher`),
//! where most of them cancel out: the pre-prepares and certificates at or below the new
//! checkpoint are pruned in the same transaction, so they never touch the B-tree.
//!
//! Files: `<db>.journal.<first entry number, 20 digits>` next to the database. A new segment
//! starts at every hand-off to redb, and a segment is deleted once redb holds all of it.
//! redb's `meta` table records the last entry applied (`"journal"`) in the transaction that
//! applies it, so replay after a crash skips what redb already has.
//!
//! Entry: `[body length: u32 LE][XXH3-64 of the body: u64 LE][body]`, the body being
//! `[entry number: u64 LE]` and then the operations, each `[tag: u8][length: u32 LE][payload]`.
//! A record that carries a batch is written whole the first time its batch appears in a
//! segment, and after that as the batch's digest and the record without it, so a batch is
//! written once per segment however many records carry it. Segments are self-contained.
//!
//! A crash in the middle of an append leaves a torn last entry (short, or failing its
//! checksum) in the newest segment. Nothing of it was acknowledged (no message or reply
//! leaves before its `fdatasync` returns), so replay drops it. A bad entry that a good one
//! follows, or one in an older segment, cannot come from a crash and is reported as
//! corruption.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use pbft_api::convert::Wire;
use pbft_core::{
    Batch, Block, CheckpointCert, Digest, PrePrepare, PreparedProof, Seq, Signed, View,
};
use pbft_core::{PersistOp, StorageError};
use tracing::warn;

use super::{DIGEST_LEN, WithBatch};

/// One durable write, as the journal and the redb flush see it: a [`PersistOp`] whose
/// stable checkpoint is reduced to its certificate (the state goes to the snapshot file).
#[derive(Clone, Debug)]
pub(super) enum Op {
    View { view: View, changing: bool },
    Accepted(Signed<PrePrepare>),
    Prepared(PreparedProof),
    Block(Block),
    Checkpoint(CheckpointCert),
    Prune { upto: Seq },
}

impl Op {
    pub(super) fn from_persist(op: &PersistOp) -> Op {
        match op {
            PersistOp::View { view, changing } => Op::View {
                view: *view,
                changing: *changing,
            },
            PersistOp::Accepted(pp) => Op::Accepted(pp.clone()),
            PersistOp::Prepared(p) => Op::Prepared(p.clone()),
            PersistOp::Block(b) => Op::Block(b.clone()),
            PersistOp::Checkpoint(s) => Op::Checkpoint(s.cert.clone()),
            PersistOp::Prune { upto } => Op::Prune { upto: *upto },
        }
    }
}

const TAG_VIEW: u8 = 1;
const TAG_ACCEPTED: u8 = 2;
const TAG_PREPARED: u8 = 3;
const TAG_BLOCK: u8 = 4;
const TAG_CHECKPOINT: u8 = 5;
const TAG_PRUNE: u8 = 6;

/// How a record with a batch is written: whole, or as the batch digest and the record
/// without its batch (the batch having been written whole earlier in the segment).
const WHOLE: u8 = 0;
const SHALLOW: u8 = 1;

const ENTRY_HEADER: usize = 4 + 8;
/// Larger entries are refused on replay as damage: one persist call holds at most a few
/// batches, each at most a few MiB.
const MAX_ENTRY: usize = 1 << 30;

/// The segment file for entries from `first` on.
fn segment_path(db: &Path, first: u64) -> PathBuf {
    let mut name = db.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".journal.{first:020}"));
    db.with_file_name(name)
}

/// The journal's segments next to `db`, oldest first, with their first entry numbers.
pub(super) fn segments(db: &Path) -> Result<Vec<(u64, PathBuf)>, StorageError> {
    let dir = match db.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut prefix = db
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    prefix.push_str(".journal.");
    let entries =
        fs::read_dir(&dir).map_err(|e| io(format_args!("listing {}", dir.display()), e))?;
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| io(format_args!("listing {}", dir.display()), e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let Some(number) = name.strip_prefix(&prefix) else {
            continue;
        };
        // Anything else with the prefix is not ours to read or delete.
        if let Ok(first) = number.parse::<u64>() {
            out.push((first, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Deletes the segments whose entries are all at or below `upto` (every segment that starts
/// there or below: segments end where a hand-off cut them).
pub(super) fn remove_segments(db: &Path, upto: u64) -> Result<(), StorageError> {
    for (first, path) in segments(db)? {
        if first <= upto {
            fs::remove_file(&path)
                .map_err(|e| io(format_args!("removing {}", path.display()), e))?;
        }
    }
    Ok(())
}

fn io(context: impl std::fmt::Display, e: std::io::Error) -> StorageError {
    StorageError::Io(format!("journal: {context}: {e}"))
}

fn corrupt(path: &Path, offset: usize, what: impl std::fmt::Display) -> StorageError {
    StorageError::Corrupt(format!(
        "journal {}, offset {offset}: {what}",
        path.display()
    ))
}

/// Makes a new directory entry (a new segment) durable.
fn sync_dir(file: &Path) -> Result<(), StorageError> {
    let dir = match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io(format_args!("syncing {}", dir.display()), e))
}

/// The writing end: the current segment.
pub(super) struct Journal {
    db: PathBuf,
    file: File,
    path: PathBuf,
    next: u64,
    /// Batches written whole in the current segment, by (sequence, digest).
    batches: HashSet<(Seq, Digest)>,
    buf: Vec<u8>,
}

impl Journal {
    /// Starts a new segment whose first entry will be `next`.
    pub(super) fn start(db: &Path, next: u64) -> Result<Journal, StorageError> {
        let (file, path) = create_segment(db, next)?;
        Ok(Journal {
            db: db.to_path_buf(),
            file,
            path,
            next,
            batches: HashSet::new(),
            buf: Vec::new(),
        })
    }

    /// Appends `ops` as one entry and makes it durable. Returns the entry's number and size.
    pub(super) fn append(&mut self, ops: &[Op]) -> Result<(u64, u64), StorageError> {
        let number = self.next;
        self.buf.clear();
        self.buf.extend_from_slice(&[0; ENTRY_HEADER]);
        self.buf.extend_from_slice(&number.to_le_bytes());
        for op in ops {
            encode_op(&mut self.buf, &mut self.batches, op);
        }
        let body_len = self.buf.len() - ENTRY_HEADER;
        let len = u32::try_from(body_len)
            .ok()
            .filter(|&l| (l as usize) < MAX_ENTRY)
            .ok_or_else(|| {
                StorageError::Io(format!(
                    "journal: an entry of {body_len} bytes is too large"
                ))
            })?;
        let sum = xxhash_rust::xxh3::xxh3_64(&self.buf[ENTRY_HEADER..]);
        self.buf[..4].copy_from_slice(&len.to_le_bytes());
        self.buf[4..ENTRY_HEADER].copy_from_slice(&sum.to_le_bytes());
        let path = &self.path;
        self.file
            .write_all(&self.buf)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| io(format_args!("appending to {}", path.display()), e))?;
        self.next += 1;
        Ok((number, self.buf.len() as u64))
    }

    /// Ends the current segment (its last entry is the one appended last) and starts the
    /// next, so that the ended one can be deleted once redb holds it.
    pub(super) fn rotate(&mut self) -> Result<(), StorageError> {
        let (file, path) = create_segment(&self.db, self.next)?;
        self.file = file;
        self.path = path;
        self.batches.clear();
        Ok(())
    }
}

fn create_segment(db: &Path, first: u64) -> Result<(File, PathBuf), StorageError> {
    let path = segment_path(db, first);
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)
        .map_err(|e| io(format_args!("creating {}", path.display()), e))?;
    sync_dir(&path)?;
    Ok((file, path))
}

fn put_op(buf: &mut Vec<u8>, tag: u8, payload: &[u8]) {
    buf.push(tag);
    // A single record is far below 4 GiB: a batch is bounded by the request limits.
    buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    buf.extend_from_slice(payload);
}

fn encode_op(buf: &mut Vec<u8>, batches: &mut HashSet<(Seq, Digest)>, op: &Op) {
    match op {
        Op::View { view, changing } => {
            let mut p = view.to_le_bytes().to_vec();
            p.push(u8::from(*changing));
            put_op(buf, TAG_VIEW, &p);
        }
        Op::Accepted(pp) => put_record(buf, batches, TAG_ACCEPTED, pp),
        Op::Prepared(p) => put_record(buf, batches, TAG_PREPARED, p),
        Op::Block(b) => put_record(buf, batches, TAG_BLOCK, b),
        Op::Checkpoint(cert) => put_op(buf, TAG_CHECKPOINT, &cert.to_bytes()),
        Op::Prune { upto } => put_op(buf, TAG_PRUNE, &upto.to_le_bytes()),
    }
}

fn put_record<T: WithBatch>(
    buf: &mut Vec<u8>,
    batches: &mut HashSet<(Seq, Digest)>,
    tag: u8,
    record: &T,
) {
    let mut p = Vec::new();
    if record.batch().is_empty() || batches.insert((record.seq(), record.batch_digest())) {
        p.push(WHOLE);
        p.extend_from_slice(&record.to_bytes());
    } else {
        p.push(SHALLOW);
        p.extend_from_slice(&record.batch_digest().0);
        p.extend_from_slice(&record.without_batch().to_bytes());
    }
    put_op(buf, tag, &p);
}

/// What the journal holds beyond redb.
pub(super) struct Replayed {
    /// The operations of every entry after the applied one, in order.
    pub ops: Vec<Op>,
    /// The last entry number seen or applied: the next entry is numbered one higher.
    pub last: u64,
}

/// Reads every segment next to `db` and returns the operations of the entries numbered
/// above `applied`. Drops a torn last entry of the newest segment (with a warning); any
/// other damage is [`StorageError::Corrupt`].
pub(super) fn replay(db: &Path, applied: u64) -> Result<Replayed, StorageError> {
    let segs = segments(db)?;
    let mut out = Replayed {
        ops: Vec::new(),
        last: applied,
    };
    let mut prev: Option<u64> = None;
    for (i, (first, path)) in segs.iter().enumerate() {
        let newest = i + 1 == segs.len();
        let mut data = Vec::new();
        File::open(path)
            .and_then(|mut f| f.read_to_end(&mut data))
            .map_err(|e| io(format_args!("reading {}", path.display()), e))?;
        let mut batches: HashMap<(Seq, Digest), Batch> = HashMap::new();
        let mut at = 0;
        while at < data.len() {
            let body = match entry_at(&data, at) {
                Ok(body) => body,
                Err(what)
                    if newest
                        && !valid_entry_follows(
                            &data,
                            at,
                            prev.unwrap_or(first.saturating_sub(1)),
                        ) =>
                {
                    warn!(
                        journal = %path.display(),
                        offset = at,
                        dropped_bytes = data.len() - at,
                        reason = what,
                        "dropping a torn last journal entry (a crash in the middle of a write; it was never acknowledged)"
                    );
                    break;
                }
                Err(what) => return Err(corrupt(path, at, what)),
            };
            let number = u64::from_le_bytes(body[..8].try_into().unwrap_or_default());
            if prev.is_some_and(|p| number <= p) {
                return Err(corrupt(
                    path,
                    at,
                    format_args!("entry {number} follows entry {}", prev.unwrap_or_default()),
                ));
            }
            prev = Some(number);
            let ops = decode_ops(&body[8..], &mut batches)
                .map_err(|what| corrupt(path, at, format_args!("entry {number}: {what}")))?;
            if number > applied {
                out.ops.extend(ops);
            }
            out.last = out.last.max(number);
            at += ENTRY_HEADER + body.len();
        }
    }
    Ok(out)
}

/// Whether a good entry lies after the bad one at `at`: then the bad one is damage, not a
/// torn last write. Its length may be damaged too, so the next entry is looked for by its
/// number (two past the last good entry: the bad one would be the first), wherever it is.
fn valid_entry_follows(data: &[u8], at: usize, last_good: u64) -> bool {
    let Some(next) = last_good.checked_add(2) else {
        return false;
    };
    let needle = next.to_le_bytes();
    let start = at + ENTRY_HEADER + 1;
    (start..data.len().saturating_sub(needle.len() - 1))
        .filter(|&i| data[i..i + needle.len()] == needle)
        .any(|i| entry_at(data, i - ENTRY_HEADER).is_ok())
}

/// The body of the entry at `at`, checked against its checksum.
fn entry_at(data: &[u8], at: usize) -> Result<&[u8], &'static str> {
    let header = data
        .get(at..at + ENTRY_HEADER)
        .ok_or("short entry header")?;
    let len = u32::from_le_bytes(header[..4].try_into().map_err(|_| "short entry header")?);
    let sum = u64::from_le_bytes(header[4..].try_into().map_err(|_| "short entry header")?);
    let len = len as usize;
    if !(8..MAX_ENTRY).contains(&len) {
        return Err("entry length out of range");
    }
    let start = at + ENTRY_HEADER;
    let body = data.get(start..start + len).ok_or("short entry")?;
    if xxhash_rust::xxh3::xxh3_64(body) != sum {
        return Err("checksum mismatch");
    }
    Ok(body)
}

fn decode_ops(
    mut rest: &[u8],
    batches: &mut HashMap<(Seq, Digest), Batch>,
) -> Result<Vec<Op>, String> {
    let mut ops = Vec::new();
    while !rest.is_empty() {
        if rest.len() < 5 {
            return Err("short operation header".into());
        }
        let tag = rest[0];
        let len = u32::from_le_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        let payload = rest.get(5..5 + len).ok_or("short operation")?;
        rest = &rest[5 + len..];
        ops.push(match tag {
            TAG_VIEW => {
                if payload.len() != 9 {
                    return Err(format!("a view of {} bytes", payload.len()));
                }
                let mut v = [0; 8];
                v.copy_from_slice(&payload[..8]);
                Op::View {
                    view: u64::from_le_bytes(v),
                    changing: payload[8] != 0,
                }
            }
            TAG_ACCEPTED => Op::Accepted(get_record(payload, batches)?),
            TAG_PREPARED => Op::Prepared(get_record(payload, batches)?),
            TAG_BLOCK => Op::Block(get_record(payload, batches)?),
            TAG_CHECKPOINT => Op::Checkpoint(
                CheckpointCert::from_bytes(payload)
                    .map_err(|e| format!("a checkpoint certificate does not decode: {e}"))?,
            ),
            TAG_PRUNE => {
                let v: [u8; 8] = payload
                    .try_into()
                    .map_err(|_| format!("a prune of {} bytes", payload.len()))?;
                Op::Prune {
                    upto: u64::from_le_bytes(v),
                }
            }
            other => return Err(format!("unknown operation tag {other}")),
        });
    }
    Ok(ops)
}

fn get_record<T: WithBatch>(
    payload: &[u8],
    batches: &mut HashMap<(Seq, Digest), Batch>,
) -> Result<T, String> {
    let (form, rest) = payload.split_first().ok_or("an empty record")?;
    match *form {
        WHOLE => {
            let record =
                T::from_bytes(rest).map_err(|e| format!("a record does not decode: {e}"))?;
            if !record.batch().is_empty() {
                batches.insert(
                    (record.seq(), record.batch_digest()),
                    record.batch().clone(),
                );
            }
            Ok(record)
        }
        SHALLOW => {
            if rest.len() < DIGEST_LEN {
                return Err("a record shorter than its batch digest".into());
            }
            let (d, rest) = rest.split_at(DIGEST_LEN);
            let mut digest = [0; DIGEST_LEN];
            digest.copy_from_slice(d);
            let mut record =
                T::from_bytes(rest).map_err(|e| format!("a record does not decode: {e}"))?;
            let batch = batches
                .get(&(record.seq(), Digest(digest)))
                .ok_or_else(|| {
                    format!(
                        "the batch of a record at {} is not in the segment",
                        record.seq()
                    )
                })?;
            *record.batch_mut() = batch.clone();
            Ok(record)
        }
        other => Err(format!("unknown record form {other}")),
    }
}
