//! Durable protocol state on [redb](https://docs.rs/redb): the replica's [`Storage`] and
//! [`StateProvider`].
//!
//! Why redb: it is pure Rust (no C library or build-time C toolchain, unlike RocksDB or
//! SQLite bindings, so the replica image stays a static Rust binary); it is ACID, and a commit
//! with [`Durability::Immediate`] has been fsync'd when `commit` returns, which is exactly the
//! "durable before anything depending on it is sent" rule the core's output demands; it keeps
//! everything in one file (easy to mount, back up and reason about in a pod); and its
//! copy-on-write B-trees with checksummed pages recover from a crash mid-commit to the last
//! committed state without a separate write-ahead log.
//!
//! Layout: one table per kind of state, keyed by sequence number (or a fixed name), values
//! protobuf-encoded through [`crate::convert`]:
//!
//! | table         | key          | value                                           |
//! |---------------|--------------|-------------------------------------------------|
//! | `meta`        | `"format"`   | format tag, checked on open                     |
//! | `meta`        | `"view"`     | view (u64, big-endian) and `changing` (1 byte)  |
//! | `accepted`    | seq          | `SignedPrePrepare`                              |
//! | `prepared`    | seq          | `PreparedProof` (the highest view per seq)      |
//! | `blocks`      | height       | `Block`; never pruned: it is the ledger         |
//! | `checkpoints` | seq          | `CheckpointCertificate`                         |
//! | `snapshot`    | `"latest"`   | `StableCheckpoint`: the latest stable state     |
//!
//! Integrity: every value is framed as `[version][checksum: 8][payload]`, the checksum being
//! the first 8 bytes of SHA-256 over the table name, the key and the payload. A damaged value,
//! or one that ended up under the wrong key, is reported as [`StorageError::Corrupt`] naming the
//! table and key, never decoded into wrong data. Below that, the database is opened with redb's
//! integrity check, which verifies every page checksum, so a truncated or overwritten file
//! fails to open. That check reads the whole file once per start; a replica restarts rarely and
//! must not run on damaged state.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use pbft_core::{
    Block, CheckpointCert, PersistOp, PrePrepare, PreparedProof, Recovered, Seq, Signed,
    StableCheckpoint, StateProvider, Storage, StorageError, View,
};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use sha2::{Digest as _, Sha256};

use pbft_api::convert::Wire;

/// A table definition together with its name (redb only lends the name out for as long as the
/// definition is borrowed, and errors and checksums need it).
struct Tab<K: redb::Key + 'static> {
    name: &'static str,
    def: TableDefinition<'static, K, &'static [u8]>,
}

impl<K: redb::Key + 'static> Clone for Tab<K> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<K: redb::Key + 'static> Copy for Tab<K> {}

impl<K: redb::Key + 'static> Tab<K> {
    const fn new(name: &'static str) -> Self {
        Tab {
            name,
            def: TableDefinition::new(name),
        }
    }

    fn open_write(
        self,
        txn: &redb::WriteTransaction,
    ) -> Result<redb::Table<'_, K, &'static [u8]>, StorageError> {
        txn.open_table(self.def)
            .map_err(|e| db_error(format_args!("opening table {:?}", self.name), e))
    }

    fn open_read(
        self,
        txn: &redb::ReadTransaction,
    ) -> Result<redb::ReadOnlyTable<K, &'static [u8]>, StorageError> {
        txn.open_table(self.def)
            .map_err(|e| db_error(format_args!("opening table {:?}", self.name), e))
    }
}

const META: Tab<&'static str> = Tab::new("meta");
const ACCEPTED: Tab<u64> = Tab::new("accepted");
const PREPARED: Tab<u64> = Tab::new("prepared");
const BLOCKS: Tab<u64> = Tab::new("blocks");
const CHECKPOINTS: Tab<u64> = Tab::new("checkpoints");
const SNAPSHOT: Tab<&'static str> = Tab::new("snapshot");

const FORMAT_KEY: &str = "format";
const VIEW_KEY: &str = "view";
const LATEST_KEY: &str = "latest";
/// Marks a file as this store's, so that some other redb file is refused instead of reused.
const FORMAT_TAG: &[u8] = b"pbft-replica-store";

/// Version of the value framing; a value with another version is refused.
/// Frame format 2: the checksum is XXH3-64. Format 1 used the first 8 bytes of SHA-256,
/// which cost 4 % of a loaded replica's node thread for what is corruption detection, not
/// authentication (everything that matters is signed); format-1 values still read.
const FRAME_VERSION: u8 = 2;
const FRAME_VERSION_SHA256: u8 = 1;
const CHECKSUM_LEN: usize = 8;
const HEADER_LEN: usize = 1 + CHECKSUM_LEN;

/// redb's page cache. Its default (1 GiB) is sized for a dedicated database server; a replica
/// mostly appends and reads recent blocks, and shares its pod's memory limit with the rest.
/// The cache fills with what was written, so its size shows up in resident memory: 64 MiB
/// put a loaded n = 4 replica at 236-252 MiB peak, 16 MiB at 195-212 MiB, with no
/// measurable change in throughput.
const CACHE_BYTES: usize = 16 << 20;

/// The replica's durable state in one redb file.
///
/// The one writer: the node loop owns it and calls [`Storage::persist`]. Readers for other
/// threads (the sync server) come from [`RedbStore::reader`].
#[derive(Debug)]
pub struct RedbStore {
    reader: RedbReader,
}

/// A read-only handle on a [`RedbStore`]'s database, cheap to clone and safe to use from any
/// thread while the store writes: every call reads one consistent snapshot (redb's MVCC), so
/// it sees each persist call entirely or not at all.
#[derive(Clone)]
pub struct RedbReader {
    db: Arc<Database>,
    path: Arc<Path>,
}

impl fmt::Debug for RedbReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedbReader")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Where a value lives, for checksums and error messages.
#[derive(Clone, Copy)]
enum Key<'a> {
    Seq(u64),
    Name(&'a str),
}

impl Key<'_> {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Key::Seq(s) => s.to_be_bytes().to_vec(),
            Key::Name(n) => n.as_bytes().to_vec(),
        }
    }
}

impl fmt::Display for Key<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::Seq(s) => write!(f, "{s}"),
            Key::Name(n) => write!(f, "{n:?}"),
        }
    }
}

fn checksum(table: &str, key: Key<'_>, payload: &[u8]) -> [u8; CHECKSUM_LEN] {
    let key = key.bytes();
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&(table.len() as u64).to_be_bytes());
    h.update(table.as_bytes());
    h.update(&(key.len() as u64).to_be_bytes());
    h.update(&key);
    h.update(payload);
    h.digest().to_be_bytes()
}

/// The format-1 checksum, for values written before format 2.
fn checksum_sha256(table: &str, key: Key<'_>, payload: &[u8]) -> [u8; CHECKSUM_LEN] {
    let key = key.bytes();
    let mut h = Sha256::new();
    h.update((table.len() as u64).to_be_bytes());
    h.update(table.as_bytes());
    h.update((key.len() as u64).to_be_bytes());
    h.update(&key);
    h.update(payload);
    let full = h.finalize();
    let mut out = [0; CHECKSUM_LEN];
    out.copy_from_slice(&full[..CHECKSUM_LEN]);
    out
}

/// `payload` framed for storing under `table`/`key`.
fn frame(table: &str, key: Key<'_>, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER_LEN + payload.len());
    v.push(FRAME_VERSION);
    v.extend_from_slice(&checksum(table, key, payload));
    v.extend_from_slice(payload);
    v
}

fn corrupt(table: &str, key: Key<'_>, what: impl fmt::Display) -> StorageError {
    StorageError::Corrupt(format!("table {table:?}, key {key}: {what}"))
}

/// The payload of a stored value, after checking its frame and checksum.
fn unframe<'v>(table: &str, key: Key<'_>, value: &'v [u8]) -> Result<&'v [u8], StorageError> {
    if value.len() < HEADER_LEN {
        return Err(corrupt(
            table,
            key,
            format_args!("value is {} bytes, shorter than its header", value.len()),
        ));
    }
    let (header, payload) = value.split_at(HEADER_LEN);
    let expected = match header[0] {
        FRAME_VERSION => checksum(table, key, payload),
        FRAME_VERSION_SHA256 => checksum_sha256(table, key, payload),
        other => {
            return Err(corrupt(
                table,
                key,
                format_args!("unknown value format version {other}"),
            ));
        }
    };
    if header[1..] != expected {
        return Err(corrupt(table, key, "checksum mismatch"));
    }
    Ok(payload)
}

/// Checks and decodes a stored value.
fn decode<T: Wire>(table: &str, key: Key<'_>, value: &[u8]) -> Result<T, StorageError> {
    let payload = unframe(table, key, value)?;
    T::from_bytes(payload).map_err(|e| corrupt(table, key, format_args!("does not decode: {e}")))
}

/// Values stored under a sequence number carry that number themselves; the two must agree.
trait AtSeq: Wire {
    fn seq(&self) -> Seq;
}

impl AtSeq for Signed<PrePrepare> {
    fn seq(&self) -> Seq {
        self.body.seq
    }
}

impl AtSeq for PreparedProof {
    fn seq(&self) -> Seq {
        PreparedProof::seq(self)
    }
}

impl AtSeq for Block {
    fn seq(&self) -> Seq {
        self.height
    }
}

impl AtSeq for CheckpointCert {
    fn seq(&self) -> Seq {
        self.seq
    }
}

fn decode_at<T: AtSeq>(table: &str, seq: Seq, value: &[u8]) -> Result<T, StorageError> {
    let v: T = decode(table, Key::Seq(seq), value)?;
    if v.seq() != seq {
        return Err(corrupt(
            table,
            Key::Seq(seq),
            format_args!("value is for sequence {}", v.seq()),
        ));
    }
    Ok(v)
}

fn encode_view(view: View, changing: bool) -> Vec<u8> {
    let mut v = view.to_be_bytes().to_vec();
    v.push(u8::from(changing));
    frame(META.name, Key::Name(VIEW_KEY), &v)
}

fn decode_view(value: &[u8]) -> Result<(View, bool), StorageError> {
    let key = Key::Name(VIEW_KEY);
    let payload = unframe(META.name, key, value)?;
    match payload {
        [v @ .., changing @ (0 | 1)] if v.len() == 8 => {
            let mut view = [0; 8];
            view.copy_from_slice(v);
            Ok((u64::from_be_bytes(view), *changing == 1))
        }
        _ => Err(corrupt(META.name, key, "malformed view record")),
    }
}

fn write_err(table: &'static str) -> impl Fn(redb::StorageError) -> StorageError {
    move |e| db_error(format_args!("writing table {table:?}"), e)
}

/// Maps a redb failure, reporting damaged or foreign files (redb's corruption reports, and
/// its "not a redb database" I/O error) as [`StorageError::Corrupt`].
fn db_error(context: impl fmt::Display, e: impl Into<redb::Error>) -> StorageError {
    match e.into() {
        redb::Error::Corrupted(msg) => StorageError::Corrupt(format!("{context}: {msg}")),
        redb::Error::Io(io) if io.kind() == std::io::ErrorKind::InvalidData => {
            StorageError::Corrupt(format!("{context}: {io}"))
        }
        other => StorageError::Io(format!("{context}: {other}")),
    }
}

impl RedbStore {
    /// Opens the store at `path`, creating the file if it is missing or empty.
    ///
    /// Fails if the file is not a redb database, fails redb's integrity check (truncated or
    /// overwritten), or is a redb database of something else.
    pub fn open(path: &Path) -> Result<Self, StorageError> {
        let context = format!("opening {}", path.display());
        let db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .set_check_integrity_on_open(true)
            .create(path)
            .map_err(|e| db_error(&context, e))?;
        let store = RedbStore {
            reader: RedbReader {
                db: Arc::new(db),
                path: path.into(),
            },
        };
        store.init().map_err(|e| match e {
            StorageError::Io(m) => StorageError::Io(format!("{context}: {m}")),
            StorageError::Corrupt(m) => StorageError::Corrupt(format!("{context}: {m}")),
        })?;
        Ok(store)
    }

    /// The file this store lives in.
    pub fn path(&self) -> &Path {
        &self.reader.path
    }

    /// A handle for reading from other threads (serving state sync) while this store writes.
    pub fn reader(&self) -> RedbReader {
        self.reader.clone()
    }

    /// Height of the last stored block (0 when none).
    pub fn height(&self) -> Result<Seq, StorageError> {
        self.reader.height()
    }

    /// See [`RedbReader::verify`].
    pub fn verify(&self) -> Result<(), StorageError> {
        self.reader.verify()
    }

    /// Creates the tables of a new store, or checks that an existing file is one of ours.
    fn init(&self) -> Result<(), StorageError> {
        let txn = self
            .reader
            .db
            .begin_write()
            .map_err(|e| db_error("starting a transaction", e))?;
        {
            let mut meta = META.open_write(&txn)?;
            for tab in [ACCEPTED, PREPARED, BLOCKS, CHECKPOINTS] {
                tab.open_write(&txn)?;
            }
            SNAPSHOT.open_write(&txn)?;
            let key = Key::Name(FORMAT_KEY);
            let existing = meta
                .get(FORMAT_KEY)
                .map_err(|e| db_error("reading the format tag", e))?
                .map(|v| v.value().to_vec());
            match existing {
                Some(v) => {
                    let tag = unframe(META.name, key, &v)?;
                    if tag != FORMAT_TAG {
                        return Err(corrupt(
                            META.name,
                            key,
                            "not a pbft replica store (format tag differs)",
                        ));
                    }
                }
                None => {
                    meta.insert(FORMAT_KEY, frame(META.name, key, FORMAT_TAG).as_slice())
                        .map_err(|e| db_error("writing the format tag", e))?;
                }
            }
        }
        txn.commit().map_err(|e| db_error("committing", e))
    }
}

impl RedbReader {
    /// What [`Storage::recover`] returns; a reader can compute it too.
    pub fn recover(&self) -> Result<Recovered, StorageError> {
        let txn = self.read_txn()?;
        let meta = META.open_read(&txn)?;
        let (view, changing) = match get_named(&meta, VIEW_KEY)? {
            Some(v) => decode_view(&v)?,
            None => (0, false),
        };
        let snapshot = SNAPSHOT.open_read(&txn)?;
        let checkpoint = get_named(&snapshot, LATEST_KEY)?
            .map(|v| decode::<StableCheckpoint>(SNAPSHOT.name, Key::Name(LATEST_KEY), &v))
            .transpose()?;
        let base = checkpoint.as_ref().map_or(0, |c| c.cert.seq);

        // Blocks above the checkpoint must run on from it without a gap: replay needs each one.
        let mut blocks = Vec::new();
        if let Some(first) = base.checked_add(1) {
            let table = BLOCKS.open_read(&txn)?;
            blocks = read_range::<Block>(&table, BLOCKS.name, first.., usize::MAX)?;
            for (expected, b) in (first..).zip(&blocks) {
                if b.height != expected {
                    return Err(corrupt(
                        BLOCKS.name,
                        Key::Seq(b.height),
                        format_args!(
                            "gap in the chain above the stable checkpoint {base}: \
                             block {expected} is missing"
                        ),
                    ));
                }
            }
        }
        Ok(Recovered {
            view,
            changing,
            checkpoint,
            blocks,
            accepted: scan(&txn, ACCEPTED)?,
            prepared: scan(&txn, PREPARED)?,
        })
    }

    /// Height of the last stored block (0 when none).
    pub fn height(&self) -> Result<Seq, StorageError> {
        let txn = self.read_txn()?;
        let blocks = BLOCKS.open_read(&txn)?;
        let last = blocks
            .last()
            .map_err(|e| db_error("reading table \"blocks\"", e))?;
        Ok(last.map_or(0, |(k, _)| k.value()))
    }

    /// Reads and checks every stored value, including the blocks below the stable checkpoint
    /// that [`Storage::recover`] does not need. For operators and tests: it reads the whole
    /// ledger.
    pub fn verify(&self) -> Result<(), StorageError> {
        let txn = self.read_txn()?;
        scan::<Signed<PrePrepare>>(&txn, ACCEPTED)?;
        scan::<PreparedProof>(&txn, PREPARED)?;
        scan::<Block>(&txn, BLOCKS)?;
        scan::<CheckpointCert>(&txn, CHECKPOINTS)?;
        let meta = META.open_read(&txn)?;
        if let Some(v) = get_named(&meta, VIEW_KEY)? {
            decode_view(&v)?;
        }
        let snapshot = SNAPSHOT.open_read(&txn)?;
        if let Some(v) = get_named(&snapshot, LATEST_KEY)? {
            decode::<StableCheckpoint>(SNAPSHOT.name, Key::Name(LATEST_KEY), &v)?;
        }
        Ok(())
    }

    fn read_txn(&self) -> Result<redb::ReadTransaction, StorageError> {
        self.db
            .begin_read()
            .map_err(|e| db_error("starting a read transaction", e))
    }
}

fn get_named(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<Vec<u8>>, StorageError> {
    Ok(table
        .get(key)
        .map_err(|e| db_error(format_args!("reading key {key:?}"), e))?
        .map(|v| v.value().to_vec()))
}

/// Decodes every value of a sequence-keyed table whose key lies in `range`, in key order, at
/// most `max` of them.
fn read_range<T: AtSeq>(
    table: &impl ReadableTable<u64, &'static [u8]>,
    name: &'static str,
    range: impl std::ops::RangeBounds<u64> + 'static,
    max: usize,
) -> Result<Vec<T>, StorageError> {
    let iter = table
        .range(range)
        .map_err(|e| db_error(format_args!("reading table {name:?}"), e))?;
    let mut out = Vec::new();
    for entry in iter.take(max) {
        let (k, v) = entry.map_err(|e| db_error(format_args!("reading table {name:?}"), e))?;
        out.push(decode_at(name, k.value(), v.value())?);
    }
    Ok(out)
}

fn scan<T: AtSeq>(txn: &redb::ReadTransaction, tab: Tab<u64>) -> Result<Vec<T>, StorageError> {
    let table = tab.open_read(txn)?;
    read_range(&table, tab.name, .., usize::MAX)
}

impl Storage for RedbStore {
    /// All of `ops` in one write transaction, fsync'd before returning. On error nothing of
    /// `ops` is applied (the transaction is dropped, which aborts it).
    fn persist(&mut self, ops: &[PersistOp]) -> Result<(), StorageError> {
        if ops.is_empty() {
            return Ok(());
        }
        let mut txn = self
            .reader
            .db
            .begin_write()
            .map_err(|e| db_error("starting a transaction", e))?;
        txn.set_durability(Durability::Immediate)
            .map_err(|e| db_error("setting durability", e))?;
        {
            let mut accepted = ACCEPTED.open_write(&txn)?;
            let mut prepared = PREPARED.open_write(&txn)?;
            let mut blocks = BLOCKS.open_write(&txn)?;
            let mut checkpoints = CHECKPOINTS.open_write(&txn)?;
            let mut meta = META.open_write(&txn)?;
            let mut snapshot = SNAPSHOT.open_write(&txn)?;

            for op in ops {
                match op {
                    PersistOp::View { view, changing } => {
                        meta.insert(VIEW_KEY, encode_view(*view, *changing).as_slice())
                            .map_err(write_err(META.name))?;
                    }
                    PersistOp::Accepted(pp) => {
                        let seq = pp.body.seq;
                        let v = frame(ACCEPTED.name, Key::Seq(seq), &pp.to_bytes());
                        accepted
                            .insert(seq, v.as_slice())
                            .map_err(write_err(ACCEPTED.name))?;
                    }
                    PersistOp::Prepared(p) => {
                        let seq = p.seq();
                        let old = prepared
                            .get(seq)
                            .map_err(write_err(PREPARED.name))?
                            .map(|v| v.value().to_vec());
                        let keep = match old {
                            None => true,
                            Some(old) => {
                                decode_at::<PreparedProof>(PREPARED.name, seq, &old)?.view()
                                    <= p.view()
                            }
                        };
                        if keep {
                            let v = frame(PREPARED.name, Key::Seq(seq), &p.to_bytes());
                            prepared
                                .insert(seq, v.as_slice())
                                .map_err(write_err(PREPARED.name))?;
                        }
                    }
                    PersistOp::Block(b) => {
                        let v = frame(BLOCKS.name, Key::Seq(b.height), &b.to_bytes());
                        blocks
                            .insert(b.height, v.as_slice())
                            .map_err(write_err(BLOCKS.name))?;
                    }
                    PersistOp::Checkpoint(stable) => {
                        let seq = stable.cert.seq;
                        let v = frame(CHECKPOINTS.name, Key::Seq(seq), &stable.cert.to_bytes());
                        checkpoints
                            .insert(seq, v.as_slice())
                            .map_err(write_err(CHECKPOINTS.name))?;
                        let v = frame(SNAPSHOT.name, Key::Name(LATEST_KEY), &stable.to_bytes());
                        snapshot
                            .insert(LATEST_KEY, v.as_slice())
                            .map_err(write_err(SNAPSHOT.name))?;
                    }
                    PersistOp::Prune { upto } => {
                        accepted
                            .retain_in(..=*upto, |_, _| false)
                            .map_err(write_err(ACCEPTED.name))?;
                        prepared
                            .retain_in(..=*upto, |_, _| false)
                            .map_err(write_err(PREPARED.name))?;
                    }
                }
            }
        }
        txn.commit().map_err(|e| db_error("committing", e))
    }

    fn recover(&self) -> Result<Recovered, StorageError> {
        self.reader.recover()
    }
}

impl StateProvider for RedbStore {
    fn blocks_from(&self, from_height: Seq, max: usize) -> Result<Vec<Block>, StorageError> {
        self.reader.blocks_from(from_height, max)
    }

    fn checkpoints(&self) -> Result<Vec<CheckpointCert>, StorageError> {
        self.reader.checkpoints()
    }

    fn checkpoint(&self, seq: Seq) -> Result<Option<CheckpointCert>, StorageError> {
        self.reader.checkpoint(seq)
    }
}

impl StateProvider for RedbReader {
    fn blocks_from(&self, from_height: Seq, max: usize) -> Result<Vec<Block>, StorageError> {
        let txn = self.read_txn()?;
        let table = BLOCKS.open_read(&txn)?;
        read_range(&table, BLOCKS.name, from_height.., max)
    }

    fn checkpoints(&self) -> Result<Vec<CheckpointCert>, StorageError> {
        scan(&self.read_txn()?, CHECKPOINTS)
    }

    fn checkpoint(&self, seq: Seq) -> Result<Option<CheckpointCert>, StorageError> {
        let txn = self.read_txn()?;
        let table = CHECKPOINTS.open_read(&txn)?;
        let value = table
            .get(seq)
            .map_err(|e| db_error("reading table \"checkpoints\"", e))?;
        value
            .map(|v| decode_at(CHECKPOINTS.name, seq, v.value()))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use pbft_core::kv::ClientRecord;
    use pbft_core::{
        Batch, Checkpoint, ClientId, Commit, Digest, MemStore, OpResult, Operation, Prepare,
        ReplicaId, Request, Signature, Snapshot,
    };
    use tempfile::TempDir;

    use super::*;

    fn sig(b: u8) -> Signature {
        Signature([b; 64])
    }

    fn batch(seq: Seq) -> Batch {
        Batch::new(vec![Request {
            client: ClientId(seq % 3),
            timestamp: seq,
            op: Operation::Put {
                key: format!("k{seq}").into_bytes(),
                value: vec![seq as u8; 5],
            },
            signature: sig(seq as u8),
        }])
    }

    fn pre_prepare(view: View, seq: Seq) -> Signed<PrePrepare> {
        let batch = batch(seq);
        Signed {
            body: PrePrepare {
                view,
                seq,
                digest: batch.digest(),
                batch,
            },
            signature: sig(view as u8),
        }
    }

    fn proof(view: View, seq: Seq) -> PreparedProof {
        let pre_prepare = pre_prepare(view, seq);
        let prepares = (1..3)
            .map(|r| Signed {
                body: Prepare {
                    view,
                    seq,
                    digest: pre_prepare.body.digest,
                    replica: ReplicaId(r),
                },
                signature: sig(r as u8),
            })
            .collect();
        PreparedProof {
            pre_prepare,
            prepares,
        }
    }

    fn block(height: Seq, prev_hash: Digest) -> Block {
        let batch = batch(height);
        let certificate = (0..3)
            .map(|r| Signed {
                body: Commit {
                    view: 0,
                    seq: height,
                    digest: batch.digest(),
                    replica: ReplicaId(r),
                },
                signature: sig(r as u8),
            })
            .collect();
        Block {
            height,
            prev_hash,
            batch,
            results_digest: Digest([height as u8; 32]),
            state_digest: Digest::ZERO,
            view: 0,
            certificate,
        }
    }

    /// Blocks `1..=n`, hash-linked.
    fn chain(n: Seq) -> Vec<Block> {
        let mut prev = Digest::ZERO;
        (1..=n)
            .map(|h| {
                let b = block(h, prev);
                prev = b.hash();
                b
            })
            .collect()
    }

    fn stable(seq: Seq, head: &Digest) -> StableCheckpoint {
        let digest = Digest([seq as u8 ^ 0x55; 32]);
        let mut snapshot = Snapshot::default();
        for i in 0..seq {
            snapshot
                .entries
                .insert(format!("k{i}").into_bytes(), vec![i as u8; 3]);
        }
        snapshot.clients.insert(
            ClientId(1),
            ClientRecord {
                timestamp: seq,
                result: OpResult::Value(Some(b"v".to_vec())),
            },
        );
        StableCheckpoint {
            cert: CheckpointCert {
                seq,
                digest,
                signatures: (0..3)
                    .map(|r| Signed {
                        body: Checkpoint {
                            seq,
                            state_digest: digest,
                            replica: ReplicaId(r),
                        },
                        signature: sig(r as u8),
                    })
                    .collect(),
            },
            snapshot,
            block_hash: *head,
        }
    }

    /// A hand-written history: view changes, a prepared certificate replaced by a higher
    /// view and not by a lower one, checkpoints, pruning, and accepted pre-prepares re-sent.
    fn script() -> Vec<Vec<PersistOp>> {
        let blocks = chain(12);
        let b = |h: Seq| PersistOp::Block(blocks[h as usize - 1].clone());
        let cp = |s: Seq| PersistOp::Checkpoint(stable(s, &blocks[s as usize - 1].hash()));
        vec![
            vec![PersistOp::View {
                view: 0,
                changing: false,
            }],
            vec![
                PersistOp::Accepted(pre_prepare(0, 1)),
                PersistOp::Accepted(pre_prepare(0, 2)),
            ],
            vec![PersistOp::Prepared(proof(0, 1)), b(1)],
            vec![PersistOp::Prepared(proof(0, 2)), b(2), b(3)],
            vec![
                PersistOp::Prepared(proof(2, 4)),
                PersistOp::Prepared(proof(1, 4)),
            ],
            vec![
                PersistOp::Prepared(proof(3, 4)),
                PersistOp::View {
                    view: 1,
                    changing: true,
                },
            ],
            vec![b(4), b(5), cp(5), PersistOp::Prune { upto: 5 }],
            vec![
                PersistOp::View {
                    view: 1,
                    changing: false,
                },
                PersistOp::Accepted(pre_prepare(1, 6)),
                PersistOp::Accepted(pre_prepare(1, 7)),
                PersistOp::Accepted(pre_prepare(2, 7)),
                PersistOp::Prepared(proof(1, 6)),
                PersistOp::Prepared(proof(1, 9)),
            ],
            vec![b(6), b(7), b(8), b(9), b(10), cp(10)],
            vec![PersistOp::Prune { upto: 7 }, b(11), b(12)],
            vec![PersistOp::Prune { upto: 10 }],
            vec![
                PersistOp::Accepted(pre_prepare(1, 13)),
                PersistOp::Prepared(proof(1, 13)),
            ],
        ]
    }

    /// A pseudo-random history from `seed` (xorshift), printed on failure.
    fn random_script(seed: u64, calls: usize) -> Vec<Vec<PersistOp>> {
        let mut x = seed | 1;
        let mut rnd = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let blocks = chain(60);
        let mut height = 0;
        let mut out = Vec::new();
        for _ in 0..calls {
            let mut ops = Vec::new();
            for _ in 0..=rnd(4) {
                let op = match rnd(7) {
                    0 => PersistOp::View {
                        view: rnd(5),
                        changing: rnd(2) == 1,
                    },
                    1 => PersistOp::Accepted(pre_prepare(rnd(4), rnd(height + 10) + 1)),
                    2 => PersistOp::Prepared(proof(rnd(4), rnd(height + 10) + 1)),
                    3 | 4 if height < 60 => {
                        height += 1;
                        PersistOp::Block(blocks[height as usize - 1].clone())
                    }
                    5 if height > 0 => {
                        let s = rnd(height) + 1;
                        PersistOp::Checkpoint(stable(s, &blocks[s as usize - 1].hash()))
                    }
                    _ => PersistOp::Prune {
                        upto: rnd(height + 5),
                    },
                };
                ops.push(op);
            }
            out.push(ops);
        }
        out
    }

    fn assert_same_answers(mem: &MemStore, db: &RedbStore, context: &str) {
        assert_eq!(
            db.recover().unwrap(),
            mem.recover().unwrap(),
            "recover differs {context}"
        );
        assert_eq!(db.checkpoints().unwrap(), mem.checkpoints().unwrap());
        for seq in 0..65 {
            assert_eq!(db.checkpoint(seq).unwrap(), mem.checkpoint(seq).unwrap());
        }
        for (from, max) in [
            (0, 100),
            (1, 1),
            (1, 5),
            (3, 0),
            (5, 3),
            (11, 100),
            (100, 5),
        ] {
            assert_eq!(
                db.blocks_from(from, max).unwrap(),
                mem.blocks_from(from, max).unwrap(),
                "blocks_from({from}, {max}) differs {context}"
            );
        }
        assert_eq!(db.height().unwrap(), mem.height());
        db.verify().unwrap();
    }

    fn open(dir: &TempDir) -> RedbStore {
        RedbStore::open(&dir.path().join("pbft.redb")).unwrap()
    }

    #[test]
    fn a_fresh_store_recovers_like_an_empty_memstore() {
        let dir = TempDir::new().unwrap();
        assert_same_answers(&MemStore::new(), &open(&dir), "when empty");
    }

    #[test]
    fn same_ops_give_the_same_answers_as_memstore() {
        let dir = TempDir::new().unwrap();
        let mut db = open(&dir);
        let mut mem = MemStore::new();
        for (i, ops) in script().iter().enumerate() {
            mem.persist(ops).unwrap();
            db.persist(ops).unwrap();
            assert_same_answers(&mem, &db, &format!("after call {i}"));
        }
        // And the same after a restart.
        drop(db);
        assert_same_answers(&mem, &open(&dir), "after reopening");
    }

    #[test]
    fn random_histories_match_memstore_and_survive_reopen() {
        let base = std::env::var("PBFT_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0x5eed);
        for seed in base..base + 3 {
            let dir = TempDir::new().unwrap();
            let mut db = open(&dir);
            let mut mem = MemStore::new();
            for (i, ops) in random_script(seed, 40).iter().enumerate() {
                mem.persist(ops).unwrap();
                db.persist(ops).unwrap();
                if i % 8 == 0 {
                    assert_same_answers(&mem, &db, &format!("PBFT_SEED={seed} call {i}"));
                }
            }
            drop(db);
            assert_same_answers(&mem, &open(&dir), &format!("PBFT_SEED={seed} reopened"));
        }
    }

    #[test]
    fn one_persist_call_is_applied_whole() {
        let dir = TempDir::new().unwrap();
        let blocks = chain(300);
        let mut ops: Vec<_> = blocks.iter().cloned().map(PersistOp::Block).collect();
        ops.push(PersistOp::View {
            view: 7,
            changing: true,
        });
        ops.push(PersistOp::Checkpoint(stable(200, &blocks[199].hash())));
        ops.push(PersistOp::Accepted(pre_prepare(7, 301)));
        ops.push(PersistOp::Prepared(proof(6, 301)));
        let mut mem = MemStore::new();
        mem.persist(&ops).unwrap();
        open(&dir).persist(&ops).unwrap();
        let db = open(&dir);
        let r = db.recover().unwrap();
        assert_eq!((r.view, r.changing, r.blocks.len()), (7, true, 100));
        assert_same_answers(&mem, &db, "after one big call");
    }

    #[test]
    fn a_failed_persist_call_applies_nothing() {
        let dir = TempDir::new().unwrap();
        let mut db = open(&dir);
        let blocks = chain(2);
        db.persist(&[
            PersistOp::Prepared(proof(0, 5)),
            PersistOp::Block(blocks[0].clone()),
        ])
        .unwrap();
        let before = db.recover().unwrap();
        // A damaged stored proof makes the third op fail (it must read the old view).
        let good = raw_seq(&db, PREPARED, 5);
        poke_seq(&db, PREPARED, 5, |v| *v.last_mut().unwrap() ^= 1);
        let err = db
            .persist(&[
                PersistOp::View {
                    view: 9,
                    changing: false,
                },
                PersistOp::Block(blocks[1].clone()),
                PersistOp::Prepared(proof(1, 5)),
            ])
            .unwrap_err();
        assert!(matches!(err, StorageError::Corrupt(_)), "{err}");
        poke_seq(&db, PREPARED, 5, |v| *v = good.clone());
        assert_eq!(db.recover().unwrap(), before);
    }

    fn raw_seq(db: &RedbStore, tab: Tab<u64>, key: u64) -> Vec<u8> {
        let txn = db.reader.db.begin_read().unwrap();
        let t = txn.open_table(tab.def).unwrap();
        t.get(key).unwrap().unwrap().value().to_vec()
    }

    /// Rewrites a stored value behind the store's back (redb's page checksums stay valid, so
    /// only our own value checksum can notice).
    fn poke_seq(db: &RedbStore, tab: Tab<u64>, key: u64, f: impl FnOnce(&mut Vec<u8>)) {
        let mut v = raw_seq(db, tab, key);
        f(&mut v);
        let txn = db.reader.db.begin_write().unwrap();
        txn.open_table(tab.def)
            .unwrap()
            .insert(key, v.as_slice())
            .unwrap();
        txn.commit().unwrap();
    }

    fn poke_named(db: &RedbStore, tab: Tab<&'static str>, key: &str, f: impl FnOnce(&mut Vec<u8>)) {
        let txn = db.reader.db.begin_write().unwrap();
        {
            let mut t = txn.open_table(tab.def).unwrap();
            let mut v = t.get(key).unwrap().unwrap().value().to_vec();
            f(&mut v);
            t.insert(key, v.as_slice()).unwrap();
        }
        txn.commit().unwrap();
    }

    fn store_with_history(dir: &TempDir) -> RedbStore {
        let mut db = open(dir);
        for ops in script() {
            db.persist(&ops).unwrap();
        }
        db
    }

    fn corrupt_message(r: Result<impl fmt::Debug, StorageError>) -> String {
        match r {
            Err(StorageError::Corrupt(m)) => m,
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    #[test]
    fn a_flipped_byte_in_a_value_is_reported_with_its_table_and_key() {
        for (tab, key) in [(BLOCKS, 11), (ACCEPTED, 13), (PREPARED, 13)] {
            let dir = TempDir::new().unwrap();
            let db = store_with_history(&dir);
            let len = raw_seq(&db, tab, key).len();
            poke_seq(&db, tab, key, |v| v[len / 2] ^= 0x20);
            let m = corrupt_message(db.recover());
            assert!(
                m.contains(&format!("table {:?}, key {key}", tab.name)) && m.contains("checksum"),
                "{m}"
            );
            assert!(db.verify().is_err());
        }
        for (tab, key) in [(SNAPSHOT, LATEST_KEY), (META, VIEW_KEY)] {
            let dir = TempDir::new().unwrap();
            let db = store_with_history(&dir);
            poke_named(&db, tab, key, |v| *v.last_mut().unwrap() ^= 1);
            let m = corrupt_message(db.recover());
            assert!(
                m.contains(&format!("table {:?}, key {key:?}", tab.name)),
                "{m}"
            );
        }
    }

    #[test]
    fn values_written_in_frame_format_1_still_read_and_are_still_checked() {
        let dir = TempDir::new().unwrap();
        let db = store_with_history(&dir);
        let before = db.recover().unwrap();
        // Rewrite every block as format 1 (SHA-256 checksum) would have stored it.
        for h in 1..=11 {
            poke_seq(&db, BLOCKS, h, |v| {
                let payload = v[HEADER_LEN..].to_vec();
                let mut old = vec![FRAME_VERSION_SHA256];
                old.extend_from_slice(&checksum_sha256(BLOCKS.name, Key::Seq(h), &payload));
                old.extend_from_slice(&payload);
                *v = old;
            });
        }
        assert_eq!(db.recover().unwrap(), before);
        let len = raw_seq(&db, BLOCKS, 11).len();
        poke_seq(&db, BLOCKS, 11, |v| v[len - 1] ^= 1);
        assert!(corrupt_message(db.recover()).contains("checksum"));
    }

    #[test]
    fn damaged_checkpoints_and_ledger_are_not_served() {
        let dir = TempDir::new().unwrap();
        let db = store_with_history(&dir);
        poke_seq(&db, CHECKPOINTS, 5, |v| v[0] = 7);
        let m = corrupt_message(db.checkpoints());
        assert!(m.contains("format version 7"), "{m}");
        assert!(db.checkpoint(5).is_err());
        assert!(db.checkpoint(10).unwrap().is_some());
        // Block 2 stored under key 3: valid bytes, wrong place.
        let two = raw_seq(&db, BLOCKS, 2);
        poke_seq(&db, BLOCKS, 3, |v| *v = two);
        let m = corrupt_message(db.blocks_from(1, 10));
        assert!(m.contains("\"blocks\", key 3"), "{m}");
        assert_eq!(db.blocks_from(1, 2).unwrap().len(), 2);
        // A short value.
        poke_seq(&db, BLOCKS, 4, |v| v.truncate(3));
        assert!(corrupt_message(db.blocks_from(4, 1)).contains("shorter than its header"));
    }

    #[test]
    fn a_gap_in_the_chain_above_the_checkpoint_is_corrupt() {
        let dir = TempDir::new().unwrap();
        let db = store_with_history(&dir);
        let txn = db.reader.db.begin_write().unwrap();
        txn.open_table(BLOCKS.def).unwrap().remove(11).unwrap();
        txn.commit().unwrap();
        let m = corrupt_message(db.recover());
        assert!(m.contains("block 11 is missing"), "{m}");
    }

    #[test]
    fn a_byte_flipped_in_the_file_fails_open_or_recover() {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("pbft.redb");
        let marker = b"MARKER-a1b2c3d4e5f6-MARKER";
        let mut db = RedbStore::open(&path).unwrap();
        let mut b = block(1, Digest::ZERO);
        b.batch.requests[0].op = Operation::Put {
            key: marker.to_vec(),
            value: b"x".to_vec(),
        };
        db.persist(&[PersistOp::Block(b)]).unwrap();
        drop(db);
        let mut bytes = std::fs::read(&path).unwrap();
        let hits: Vec<usize> = bytes
            .windows(marker.len())
            .enumerate()
            .filter(|(_, w)| *w == marker)
            .map(|(i, _)| i)
            .collect();
        assert!(!hits.is_empty(), "marker not found in the file");
        for i in hits {
            bytes[i + 3] ^= 0x01;
        }
        std::fs::write(&path, &bytes).unwrap();
        let result = RedbStore::open(&path).and_then(|db| db.recover());
        assert!(result.is_err(), "damaged file was read: {result:?}");
    }

    #[test]
    fn a_truncated_file_fails_open_or_recover() {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("pbft.redb");
        let blocks = chain(300);
        let ops: Vec<_> = blocks.into_iter().map(PersistOp::Block).collect();
        RedbStore::open(&path).unwrap().persist(&ops).unwrap();
        let len = std::fs::metadata(&path).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len / 2)
            .unwrap();
        let result = RedbStore::open(&path).and_then(|db| db.recover());
        let err = result.expect_err("a truncated file must not open");
        assert!(err.to_string().contains("pbft.redb"), "{err}");
    }

    #[test]
    fn garbage_and_foreign_files_fail_open() {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("garbage.redb");
        let mut x = 0x1234_5678_9abc_def1u64;
        let garbage: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        std::fs::write(&path, garbage).unwrap();
        let err = RedbStore::open(&path).unwrap_err();
        assert!(matches!(err, StorageError::Corrupt(_)), "{err}");
        assert!(err.to_string().contains("garbage.redb"), "{err}");
        std::fs::write(&path, b"hello").unwrap();
        assert!(RedbStore::open(&path).is_err());

        let path = dir.path().join("foreign.redb");
        let other = Database::create(&path).unwrap();
        let txn = other.begin_write().unwrap();
        txn.open_table(META.def)
            .unwrap()
            .insert(FORMAT_KEY, b"something else".as_slice())
            .unwrap();
        txn.commit().unwrap();
        drop(other);
        let err = RedbStore::open(&path).unwrap_err();
        assert!(matches!(err, StorageError::Corrupt(_)), "{err}");
    }

    #[test]
    fn a_reader_sees_what_the_writer_persisted() {
        let dir = TempDir::new().unwrap();
        let mut db = open(&dir);
        let reader = db.reader();
        let blocks = chain(3);
        let ops: Vec<_> = blocks.iter().cloned().map(PersistOp::Block).collect();
        db.persist(&ops).unwrap();
        let t = std::thread::spawn(move || reader.blocks_from(1, 10).unwrap());
        assert_eq!(t.join().unwrap(), blocks);
    }

    #[test]
    fn pruning_everything_does_not_overflow() {
        let dir = TempDir::new().unwrap();
        let mut db = open(&dir);
        db.persist(&[
            PersistOp::Accepted(pre_prepare(0, u64::MAX)),
            PersistOp::Prune { upto: u64::MAX },
        ])
        .unwrap();
        assert!(db.recover().unwrap().accepted.is_empty());
    }
}
