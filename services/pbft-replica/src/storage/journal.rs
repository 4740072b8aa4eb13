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
//! A segment starts with `pbftjnl1` and a random 64-bit seed; then come its entries, each
//! `[body length: u32 LE][XXH3-64 of the body, seeded: u64 LE][body]`, the body being
//! `[entry number: u64 LE]` and then the operations, each `[tag: u8][length: u32 LE][payload]`.
//! The seed is secret to the replica, so bytes a client chose (a value it wrote) can never
//! pass for an entry when replay searches damaged bytes for one.
//! A record that carries a batch is written whole the first time its batch appears in a
//! segment, and after that as the batch's digest and the record without it, so a batch is
//! written once per segment however many records carry it. Segments are self-contained.
//!
//! Every append also writes an end marker after its entry (an entry header with length 0
//! whose checksum covers the next entry's number), which the next append overwrites; a new
//! segment's header carries one too. Replay stops at the marker without complaint.
//!
//! Segments are recycled: the flush keeps one segment it no longer needs as a spare
//! (`<db>.journal.spare.<first>`, which replay ignores), and the next rotation reuses the
//! file, its new header and marker made durable before it takes a segment's name. An
//! append then overwrites blocks the file already has, and its fdatasync writes only the
//! data: appending to a growing file also commits the file system's own journal (the new
//! size and blocks), which took 1.5 to 7 times as long and about 1.7 times the CPU on
//! this machine's disk. The stale entries past the marker were checksummed under the old
//! segment's seed, so they can never pass for entries of the new one.
//!
//! A crash in the middle of an append leaves a torn last entry (short, or failing its
//! checksum) in the newest segment. Nothing of it was acknowledged (no message or reply
//! leaves before its `fdatasync` returns), so replay drops it. A bad entry that a good one
//! follows, one in an older segment, or a gap in the entry numbers cannot come from a
//! crash and is reported as corruption.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::io::Read;
use std::os::unix::fs::FileExt;
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
/// The end marker's size: an entry header.
#[cfg(test)]
pub(super) const END_MARKER: usize = ENTRY_HEADER;
const MAGIC: &[u8; 8] = b"pbftjnl1";
const SEGMENT_HEADER: usize = MAGIC.len() + 8;
/// Larger entries are refused on replay as damage: one persist call holds at most a few
/// batches, each at most a few MiB.
const MAX_ENTRY: usize = 1 << 30;

/// The segment file for entries from `first` on.
fn segment_path(db: &Path, first: u64) -> PathBuf {
    let mut name = db.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".journal.{first:020}"));
    db.with_file_name(name)
}

/// Where a segment the flush no longer needs waits to be recycled. `segments` skips it:
/// "spare.<n>" is not an entry number.
fn spare_path(db: &Path, first: u64) -> PathBuf {
    let mut name = db.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".journal.spare.{first:020}"));
    db.with_file_name(name)
}

/// The files next to `db` named `<db file name>.journal.<kind><number>`, by number, oldest
/// first. Anything else with the prefix is not ours to read or delete.
fn numbered(db: &Path, kind: &str) -> Result<Vec<(u64, PathBuf)>, StorageError> {
    let dir = dir_of(db);
    let mut prefix = db
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    prefix.push_str(".journal.");
    prefix.push_str(kind);
    let entries =
        fs::read_dir(dir).map_err(|e| io(format_args!("listing {}", dir.display()), e))?;
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| io(format_args!("listing {}", dir.display()), e))?;
        let name = entry.file_name();
        let number = name.to_string_lossy().strip_prefix(&prefix).map(str::parse);
        if let Some(Ok(number)) = number {
            out.push((number, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// The spare segments next to `db`.
fn spares(db: &Path) -> Result<Vec<PathBuf>, StorageError> {
    Ok(numbered(db, "spare.")?
        .into_iter()
        .map(|(_, p)| p)
        .collect())
}

/// The journal's segments next to `db`, oldest first, with their first entry numbers.
pub(super) fn segments(db: &Path) -> Result<Vec<(u64, PathBuf)>, StorageError> {
    numbered(db, "")
}

/// Deletes the segments whose entries are all at or below `upto` (every segment that starts
/// there or below: segments end where a hand-off cut them), durably: a deleted segment
/// that came back after a crash would no longer be the newest, and its torn tail, if it
/// had one, would read as damage.
///
/// The first of them becomes the spare if there is none (the next rotation recycles it).
/// Only the writer takes spares, so at most the one made here can appear meanwhile.
pub(super) fn remove_segments(db: &Path, upto: u64) -> Result<(), StorageError> {
    let mut removed = false;
    let mut keep_spare = spares(db)?.is_empty();
    for (first, path) in segments(db)? {
        if first <= upto {
            if keep_spare {
                let spare = spare_path(db, first);
                fs::rename(&path, &spare)
                    .map_err(|e| io(format_args!("renaming {}", path.display()), e))?;
                keep_spare = false;
            } else {
                fs::remove_file(&path)
                    .map_err(|e| io(format_args!("removing {}", path.display()), e))?;
            }
            removed = true;
        }
    }
    if removed {
        sync_dir(db)?;
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

/// The directory `file` is in (a bare file name is in the current one).
fn dir_of(file: &Path) -> &Path {
    match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Makes a new directory entry (a new segment) durable.
pub(super) fn sync_dir(file: &Path) -> Result<(), StorageError> {
    let dir = dir_of(file);
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
    /// The current segment's checksum seed.
    seed: u64,
    /// Where the next entry goes: the end of the segment's header and entries. A recycled
    /// file holds stale bytes past it.
    written: u64,
    /// Batches written whole in the current segment, by (sequence, digest).
    batches: HashSet<(Seq, Digest)>,
    buf: Vec<u8>,
    /// An append failed: what it left in the file is unknown, so nothing may follow it.
    broken: bool,
}

impl Journal {
    /// Starts a new segment whose first entry will be `next`.
    pub(super) fn start(db: &Path, next: u64) -> Result<Journal, StorageError> {
        let (file, path, seed) = create_segment(db, next)?;
        Ok(Journal {
            db: db.to_path_buf(),
            file,
            path,
            next,
            seed,
            written: SEGMENT_HEADER as u64,
            batches: HashSet::new(),
            buf: Vec::new(),
            broken: false,
        })
    }

    /// Appends `ops` as one entry and makes it durable. Returns the entry's number and size.
    pub(super) fn append(&mut self, ops: &[Op]) -> Result<(u64, u64), StorageError> {
        if self.broken {
            return Err(StorageError::Io(
                "journal: an earlier append failed; restart to replay the journal".into(),
            ));
        }
        // A failed append may leave a partial entry, and `batches` may name batches that
        // never reached the file: the store stops here, and replay drops the torn tail.
        self.broken = true;
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
        let sum = xxhash_rust::xxh3::xxh3_64_with_seed(&self.buf[ENTRY_HEADER..], self.seed);
        self.buf[..4].copy_from_slice(&len.to_le_bytes());
        self.buf[4..ENTRY_HEADER].copy_from_slice(&sum.to_le_bytes());
        let entry_len = self.buf.len() as u64;
        self.buf
            .extend_from_slice(&end_marker(number + 1, self.seed));
        let path = &self.path;
        self.file
            .write_all_at(&self.buf, self.written)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| io(format_args!("appending to {}", path.display()), e))?;
        self.next += 1;
        self.written += entry_len;
        self.broken = false;
        Ok((number, entry_len))
    }

    /// Ends the current segment (its last entry is the one appended last) and starts the
    /// next, so that the ended one can be deleted once redb holds it.
    pub(super) fn rotate(&mut self) -> Result<(), StorageError> {
        let (file, path, seed) = create_segment(&self.db, self.next)?;
        self.file = file;
        self.path = path;
        self.seed = seed;
        self.written = SEGMENT_HEADER as u64;
        self.batches.clear();
        Ok(())
    }
}

/// Creates the segment starting at entry `first`, with its header and end marker,
/// recycling a spare if there is one; for a new file, the first append's fdatasync makes
/// the header durable with the entry. Returns the checksum seed.
fn create_segment(db: &Path, first: u64) -> Result<(File, PathBuf, u64), StorageError> {
    let path = segment_path(db, first);
    // std's hasher keys are random per process: an unpredictable seed without a
    // dependency.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(first);
    let seed = h.finish();
    let mut header = MAGIC.to_vec();
    header.extend_from_slice(&seed.to_le_bytes());
    header.extend_from_slice(&end_marker(first, seed));
    if let Some(spare) = spares(db)?.pop() {
        match recycle(&spare, &path, &header) {
            Ok(file) => {
                sync_dir(&path)?;
                return Ok((file, path, seed));
            }
            // A new file does as well, only slower to sync.
            Err(e) => {
                warn!(spare = %spare.display(), error = %e, "cannot recycle a journal segment; starting a new file")
            }
        }
    }
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)
        .map_err(|e| io(format_args!("creating {}", path.display()), e))?;
    file.write_all_at(&header, 0)
        .map_err(|e| io(format_args!("writing {}", path.display()), e))?;
    sync_dir(&path)?;
    Ok((file, path, seed))
}

/// Turns `spare` into the segment at `path`. The new header and marker are durable before
/// the file takes the segment's name: under its old header the stale entries would pass
/// their checksums, and replay would find them where this segment's belong. And the
/// spare's own name is durable before its header changes: the flush may have renamed it
/// a moment ago without syncing the directory yet, and a crash would bring the file back
/// under its old segment's name with this segment's header, which replay must call damage.
fn recycle(spare: &Path, path: &Path, header: &[u8]) -> Result<File, StorageError> {
    sync_dir(spare)?;
    let writing = |e| io(format_args!("recycling {}", spare.display()), e);
    let file = OpenOptions::new()
        .write(true)
        .open(spare)
        .map_err(writing)?;
    file.write_all_at(header, 0).map_err(writing)?;
    file.sync_data().map_err(writing)?;
    fs::rename(spare, path).map_err(writing)?;
    Ok(file)
}

/// What follows the last entry of a segment: an entry header of length 0 whose checksum
/// covers the number the next entry would have, under the segment's seed.
fn end_marker(next: u64, seed: u64) -> [u8; ENTRY_HEADER] {
    let mut marker = [0; ENTRY_HEADER];
    marker[4..].copy_from_slice(
        &xxhash_rust::xxh3::xxh3_64_with_seed(&next.to_le_bytes(), seed).to_le_bytes(),
    );
    marker
}

/// Whether the segment's entries end at `at`, before the entry numbered `next`.
fn ends_at(data: &[u8], at: usize, seed: u64, next: u64) -> bool {
    data.get(at..at.saturating_add(ENTRY_HEADER)) == Some(&end_marker(next, seed)[..])
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
        let seed = match segment_seed(&data) {
            Some(seed) => seed,
            // A crash right after creating the newest segment: nothing was written to it.
            // Its header may be missing, or read as zeros where the file's size reached the
            // disk but its data did not. Either way no entry in it was acknowledged: an
            // append's fdatasync makes the header (written first, when the segment was
            // created) durable along with the entry.
            None if newest && unwritten_header(&data) => continue,
            None => return Err(corrupt(path, 0, "not a journal segment (bad header)")),
        };
        let mut batches: HashMap<(Seq, Digest), Batch> = HashMap::new();
        let mut at = SEGMENT_HEADER;
        // The number the next entry of this segment has: its marker says so.
        let mut next = *first;
        while at < data.len() {
            if ends_at(&data, at, seed, next) {
                // Past here: nothing, or a recycled file's stale entries.
                break;
            }
            let body = match entry_at(&data, at, seed) {
                Ok(body) => body,
                Err(what)
                    if newest
                        && !entry_follows(
                            &data,
                            at,
                            seed,
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
            let number = entry_number(body);
            // Entries redb lacks must run on from what it holds without a gap; older
            // ones (a segment whose deletion a crash undid) only need to be in order.
            let expected = if number > applied {
                Some(prev.map_or(applied, |p| p.max(applied)) + 1)
            } else {
                prev.map(|p| p + 1)
            };
            if number == u64::MAX || expected.is_some_and(|e| number != e) {
                return Err(corrupt(
                    path,
                    at,
                    format_args!(
                        "entry {number} where entry {} belongs",
                        expected.unwrap_or_default()
                    ),
                ));
            }
            prev = Some(number);
            next = number + 1;
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

/// Whether a segment's header never reached the disk: the file is shorter than a header,
/// or its header is all zeros.
fn unwritten_header(data: &[u8]) -> bool {
    data.get(..SEGMENT_HEADER)
        .is_none_or(|header| header.iter().all(|&b| b == 0))
}

/// The checksum seed of a segment that starts with a good header.
fn segment_seed(data: &[u8]) -> Option<u64> {
    let header = data.get(..SEGMENT_HEADER)?;
    if &header[..MAGIC.len()] != MAGIC {
        return None;
    }
    Some(u64::from_le_bytes(header[MAGIC.len()..].try_into().ok()?))
}

fn entry_number(body: &[u8]) -> u64 {
    let mut n = [0; 8];
    n.copy_from_slice(&body[..8]);
    u64::from_le_bytes(n)
}

/// Entries after a bad one that [`entry_follows`] looks for: damage that spans more
/// entries than this reads as a torn tail.
const SEARCH_AHEAD: u64 = 64;

/// Whether a good entry lies after the bad one at `at`: then the bad one is damage, not a
/// torn last write. The bad entry's length may be damaged too, so the following entries
/// are looked for by their numbers (up to [`SEARCH_AHEAD`] past the bad one) at every
/// offset; the seeded checksum makes a false match vanishingly unlikely, whatever the
/// bytes.
fn entry_follows(data: &[u8], at: usize, seed: u64, last_good: u64) -> bool {
    let wanted = last_good.saturating_add(2)..=last_good.saturating_add(SEARCH_AHEAD + 1);
    (at + 1..data.len().saturating_sub(ENTRY_HEADER + 8)).any(|i| {
        let mut n = [0; 8];
        n.copy_from_slice(&data[i + ENTRY_HEADER..i + ENTRY_HEADER + 8]);
        wanted.contains(&u64::from_le_bytes(n)) && entry_at(data, i, seed).is_ok()
    })
}

/// The body of the entry at `at`, checked against its checksum.
fn entry_at(data: &[u8], at: usize, seed: u64) -> Result<&[u8], &'static str> {
    let header = data
        .get(at..at.saturating_add(ENTRY_HEADER))
        .ok_or("short entry header")?;
    let mut len = [0; 4];
    len.copy_from_slice(&header[..4]);
    let mut sum = [0; 8];
    sum.copy_from_slice(&header[4..]);
    let len = u32::from_le_bytes(len) as usize;
    if !(8..MAX_ENTRY).contains(&len) {
        return Err("entry length out of range");
    }
    let start = at + ENTRY_HEADER;
    let body = data
        .get(start..start.saturating_add(len))
        .ok_or("short entry")?;
    if xxhash_rust::xxh3::xxh3_64_with_seed(body, seed) != u64::from_le_bytes(sum) {
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
        let payload = rest
            .get(5..5usize.saturating_add(len))
            .ok_or("short operation")?;
        rest = &rest[5 + payload.len()..];
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

#[cfg(test)]
mod tests {
    use tempfile::TempDir;

    use super::*;

    fn view(v: u64) -> Op {
        Op::View {
            view: v,
            changing: false,
        }
    }

    fn views(r: &Replayed) -> Vec<u64> {
        r.ops
            .iter()
            .map(|op| match op {
                Op::View { view, .. } => *view,
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    /// Entries 1-2 in the first segment, 3-4 in the second, 5 in the third.
    fn three_segments(dir: &TempDir) -> PathBuf {
        let db = dir.path().join("pbft.redb");
        let mut j = Journal::start(&db, 1).unwrap();
        for v in 1..=5 {
            j.append(&[view(v)]).unwrap();
            if v == 2 || v == 4 {
                j.rotate().unwrap();
            }
        }
        db
    }

    #[test]
    fn replay_returns_the_entries_after_the_applied_one_across_segments() {
        let dir = TempDir::new().unwrap();
        let db = three_segments(&dir);
        assert_eq!(segments(&db).unwrap().len(), 3);
        for applied in 0..=6 {
            let r = replay(&db, applied).unwrap();
            let want: Vec<u64> = (applied + 1..=5).collect();
            assert_eq!(views(&r), want, "applied {applied}");
            assert_eq!(r.last, applied.max(5));
        }
        remove_segments(&db, 4).unwrap();
        assert_eq!(segments(&db).unwrap().len(), 1);
        assert_eq!(views(&replay(&db, 4).unwrap()), vec![5]);
    }

    #[test]
    fn a_missing_segment_is_a_gap_not_a_shorter_journal() {
        let dir = TempDir::new().unwrap();
        let db = three_segments(&dir);
        let (_, middle) = segments(&db).unwrap().remove(1);
        fs::remove_file(middle).unwrap();
        let err = replay(&db, 0).map(|r| r.last).unwrap_err();
        assert!(
            err.to_string().contains("entry 5 where entry 3 belongs"),
            "{err}"
        );
        // Redb already holding the missing entries makes it no gap.
        assert_eq!(views(&replay(&db, 4).unwrap()), vec![5]);
    }

    #[test]
    fn a_bad_header_is_corrupt_except_on_an_empty_newest_segment() {
        let dir = TempDir::new().unwrap();
        let db = three_segments(&dir);
        let segs = segments(&db).unwrap();
        // A crash right after creating a segment leaves it short of its header, or with
        // its size on disk but not its data (zeros).
        fs::write(&segs[2].1, &MAGIC[..3]).unwrap();
        assert_eq!(views(&replay(&db, 0).unwrap()), vec![1, 2, 3, 4]);
        fs::write(&segs[2].1, vec![0; SEGMENT_HEADER + 100]).unwrap();
        assert_eq!(views(&replay(&db, 0).unwrap()), vec![1, 2, 3, 4]);
        // The same in an older segment is damage: a newer segment was written after it.
        let older = fs::read(&segs[1].1).unwrap();
        fs::write(&segs[1].1, vec![0; older.len()]).unwrap();
        let err = replay(&db, 0).map(|r| r.last).unwrap_err();
        assert!(err.to_string().contains("bad header"), "{err}");
        fs::write(&segs[1].1, &older).unwrap();
        // A header that is neither whole nor zeros is damage even in the newest segment.
        let mut half = vec![0; SEGMENT_HEADER];
        half[..MAGIC.len()].copy_from_slice(MAGIC);
        half[0] ^= 1;
        fs::write(&segs[2].1, &half).unwrap();
        let err = replay(&db, 0).map(|r| r.last).unwrap_err();
        assert!(err.to_string().contains("bad header"), "{err}");
        fs::write(&segs[2].1, &MAGIC[..3]).unwrap();
        let mut bytes = fs::read(&segs[0].1).unwrap();
        bytes[0] ^= 1;
        fs::write(&segs[0].1, &bytes).unwrap();
        let err = replay(&db, 0).map(|r| r.last).unwrap_err();
        assert!(err.to_string().contains("bad header"), "{err}");
    }

    #[test]
    fn damage_across_several_entries_is_corrupt_but_a_torn_tail_is_dropped() {
        let dir = TempDir::new().unwrap();
        let db = dir.path().join("pbft.redb");
        let mut j = Journal::start(&db, 1).unwrap();
        let mut ends = vec![SEGMENT_HEADER as u64];
        for v in 1..=8 {
            let (_, bytes) = j.append(&[view(v)]).unwrap();
            ends.push(ends.last().unwrap() + bytes);
        }
        let path = segments(&db).unwrap().remove(0).1;
        let good = fs::read(&path).unwrap();
        // Entries 2 to 4 overwritten with zeros (a lost page): the good entries after
        // them show this is damage.
        let mut bytes = good.clone();
        bytes[ends[1] as usize..ends[4] as usize].fill(0);
        fs::write(&path, &bytes).unwrap();
        let err = replay(&db, 0).map(|r| r.last).unwrap_err();
        assert!(err.to_string().contains("offset"), "{err}");
        // A flipped length in entry 2: the same.
        let mut bytes = good.clone();
        bytes[ends[1] as usize] ^= 0x40;
        fs::write(&path, &bytes).unwrap();
        assert!(replay(&db, 0).is_err());
        // The same damage to the last entry alone is a torn tail.
        let mut bytes = good.clone();
        bytes[ends[7] as usize..].fill(0);
        fs::write(&path, &bytes).unwrap();
        assert_eq!(views(&replay(&db, 0).unwrap()), (1..=7).collect::<Vec<_>>());
    }

    #[test]
    fn an_entry_checksummed_under_another_segments_seed_does_not_pass() {
        let dir = TempDir::new().unwrap();
        let db = dir.path().join("pbft.redb");
        let mut j = Journal::start(&db, 1).unwrap();
        j.append(&[view(1)]).unwrap();
        j.rotate().unwrap();
        j.append(&[view(2)]).unwrap();
        let segs = segments(&db).unwrap();
        let first = fs::read(&segs[0].1).unwrap();
        let second = fs::read(&segs[1].1).unwrap();
        assert_ne!(
            first[MAGIC.len()..SEGMENT_HEADER],
            second[MAGIC.len()..SEGMENT_HEADER]
        );
        // The second segment's entry moved under the first one's header.
        let mut moved = first[..SEGMENT_HEADER].to_vec();
        moved.extend_from_slice(&second[SEGMENT_HEADER..]);
        assert!(entry_at(&moved, SEGMENT_HEADER, segment_seed(&moved).unwrap()).is_err());
    }

    #[test]
    fn a_recycled_segment_is_overwritten_in_place_and_replays_only_its_own_entries() {
        let dir = TempDir::new().unwrap();
        let db = dir.path().join("pbft.redb");
        let mut j = Journal::start(&db, 1).unwrap();
        for v in 1..=50 {
            j.append(&[view(v)]).unwrap();
        }
        j.rotate().unwrap();
        j.append(&[view(51)]).unwrap();
        // Redb holds entries 1-50: their segment becomes the spare.
        remove_segments(&db, 50).unwrap();
        let spare = spares(&db).unwrap();
        assert_eq!(spare.len(), 1);
        let spare_len = fs::metadata(&spare[0]).unwrap().len();
        j.rotate().unwrap();
        assert!(
            spares(&db).unwrap().is_empty(),
            "the rotation took the spare"
        );
        for v in 52..=53 {
            j.append(&[view(v)]).unwrap();
        }
        let segs = segments(&db).unwrap();
        assert_eq!(segs.iter().map(|s| s.0).collect::<Vec<_>>(), vec![51, 52]);
        let path = &segs[1].1;
        assert_eq!(
            fs::metadata(path).unwrap().len(),
            spare_len,
            "appends overwrite the old file in place"
        );
        let data = fs::read(path).unwrap();
        let seed = segment_seed(&data).unwrap();
        assert!(
            ends_at(&data, j.written as usize, seed, 54),
            "the entries end at a marker, not at stale bytes read as a torn write"
        );
        assert_eq!(
            views(&replay(&db, 50).unwrap()),
            (51..=53).collect::<Vec<_>>()
        );
        // A crash tearing the next append: the stale entries after it are not taken for
        // good entries that would make it damage.
        let mut torn = data.clone();
        torn[j.written as usize..j.written as usize + 40].fill(0x5a);
        fs::write(path, &torn).unwrap();
        assert_eq!(
            views(&replay(&db, 50).unwrap()),
            (51..=53).collect::<Vec<_>>()
        );
        // A crash after the spare got its new header but before the rename leaves it a
        // spare: replay never reads spares.
        fs::write(spare_path(&db, 7), &torn).unwrap();
        assert_eq!(
            views(&replay(&db, 50).unwrap()),
            (51..=53).collect::<Vec<_>>()
        );
    }

    #[test]
    fn an_append_after_a_failed_one_is_refused() {
        let dir = TempDir::new().unwrap();
        let db = dir.path().join("pbft.redb");
        let mut j = Journal::start(&db, 1).unwrap();
        j.append(&[view(1)]).unwrap();
        j.broken = true;
        let err = j.append(&[view(2)]).unwrap_err();
        assert!(err.to_string().contains("earlier append failed"), "{err}");
    }
}
