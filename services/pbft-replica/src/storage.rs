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
//! Writes do not go to redb directly: each [`Storage::persist`] call is appended to the
//! journal (`journal`) and fsync'd there, and the flusher (`flusher`) applies the journal to
//! redb in one transaction per stable checkpoint. [`RedbStore::open`] replays what redb
//! lacks; readers see journalled blocks and certificates through `Overlay`.
//!
//! Layout: one table per kind of state, keyed by sequence number (or a fixed name), values
//! protobuf-encoded through [`pbft_api::convert`]:
//!
//! | table         | key          | value                                           |
//! |---------------|--------------|-------------------------------------------------|
//! | `meta`        | `"format"`   | format tag, checked on open                     |
//! | `meta`        | `"view"`     | view (u64, big-endian) and `changing` (1 byte)  |
//! | `meta`        | `"journal"`  | last journal entry applied (u64, big-endian)    |
//! | `meta`        | `"ledger"`   | end of the ledger file's committed part (u64)   |
//! | `accepted`    | seq          | `SignedPrePrepare`                              |
//! | `prepared`    | seq          | `PreparedProof` (the highest view per seq)      |
//! | `blocks`      | height       | `Block`; never pruned: it is the ledger         |
//! | `batches`     | seq, digest  | where the `Batch` of the three above lies in    |
//! |               |              | the ledger file (see below); in stores written  |
//! |               |              | before that file, the `Batch` itself            |
//! | `checkpoints` | seq          | `CheckpointCertificate`                         |
//! | `snapshot`    | `"latest"`   | `StableCheckpoint`, in stores written before    |
//! |               |              | snapshot files; read, never written now         |
//!
//! The newest stable checkpoint's state lives in a file of its own next to the database,
//! written off the critical path; the certificate alone is in the transaction (see
//! `storage/snapshot.rs`, which also says how recovery rebuilds a state the file lacks).
//!
//! Each batch is written once. Its accepted pre-prepare, prepared certificate and block
//! all carry it, and storing it inside each wrote every request three times (two thirds
//! of a loaded replica's write volume) and made pruning read the copies back to delete
//! them. Those records are stored with an empty batch and the batch's digest, and the
//! batch under (sequence, digest) in `batches`, where it stays while any record refers to
//! it: pruning and overwrites drop a batch once nothing does, so a batch outlives its
//! pre-prepare only as part of the ledger. The batch's bytes themselves are appended to
//! the ledger file (`<db>.ledger`, see `storage/ledger.rs`) and `batches` holds where they
//! lie, so redb stays a small index however long the ledger grows.
//!
//! Integrity: every value is framed as `[version][checksum: 8][payload]`, the checksum being
//! XXH3-64 (format 1: the first 8 bytes of SHA-256) over the table name, the key and the
//! payload; the snapshot file and each batch in the ledger file are framed the same way. A
//! damaged value, or one that ended up under the wrong key, is reported as
//! [`StorageError::Corrupt`] naming the table and key, never decoded into wrong data. Below
//! that, the database is opened with redb's integrity check, which verifies every page
//! checksum, so a truncated or overwritten file fails to open. That check reads the whole
//! database once per start, which the ledger file keeps small; the ledger file's batches
//! are checked as they are read, and all of them by [`RedbStore::verify`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use pbft_core::{
    Batch, Block, CheckpointCert, Digest, PersistOp, PrePrepare, PreparedProof, Recovered, Seq,
    Signed, StableCheckpoint, StateProvider, Storage, StorageError, View,
};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use sha2::{Digest as _, Sha256};

use pbft_api::convert::Wire;

mod flusher;
mod journal;
mod ledger;
mod snapshot;

use journal::{Journal, Op};
use ledger::{Appender, Extent, LedgerFile};

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
const BATCHES: Tab<&'static [u8]> = Tab::new("batches");
const CHECKPOINTS: Tab<u64> = Tab::new("checkpoints");
const SNAPSHOT: Tab<&'static str> = Tab::new("snapshot");

const FORMAT_KEY: &str = "format";
const VIEW_KEY: &str = "view";
/// The last journal entry applied to the database (see `journal`).
const JOURNAL_KEY: &str = "journal";
/// Where the ledger file's committed part ends (see `ledger`).
const LEDGER_KEY: &str = "ledger";
const LATEST_KEY: &str = "latest";
/// Marks a file as this store's, so that some other redb file is refused instead of reused.
const FORMAT_TAG: &[u8] = b"pbft-replica-store";

/// Version of the value framing; a value with another version is refused.
/// Frame format 2: the checksum is XXH3-64. Format 1 used the first 8 bytes of SHA-256,
/// which cost 4 % of a loaded replica's node thread for what is corruption detection, not
/// authentication (everything that matters is signed); format-1 values still read.
const FRAME_VERSION: u8 = 2;
const FRAME_VERSION_SHA256: u8 = 1;
/// Frame format 3: checksummed as format 2, for a record whose batch is stored apart (see
/// the module documentation). Its payload is the batch digest, then the record with an
/// empty batch.
const FRAME_VERSION_SPLIT: u8 = 3;
/// Frame format 4: checksummed as format 2, for a batch kept in the ledger file (see
/// `ledger`). Its payload is the batch's [`Extent`] there; only `batches` holds these.
const FRAME_VERSION_LEDGER: u8 = 4;
const DIGEST_LEN: usize = 32;
const CHECKSUM_LEN: usize = 8;
const HEADER_LEN: usize = 1 + CHECKSUM_LEN;

/// redb's page cache. Its default (1 GiB) is sized for a dedicated database server; a replica
/// mostly appends and reads recent blocks, and shares its pod's memory limit with the rest.
/// The cache fills with what was written, so its size shows up in resident memory: 64 MiB
/// put a loaded n = 4 replica at 236-252 MiB peak, 16 MiB at 195-212 MiB, with no
/// measurable change in throughput.
const CACHE_BYTES: usize = 16 << 20;

/// Journal bytes after which its operations go to redb even without a new stable
/// checkpoint (normally a checkpoint comes first), bounding the journal and replay.
const HANDOFF_BYTES: u64 = 64 << 20;

/// The replica's durable state in one redb file.
///
/// The one writer: the node loop owns it and calls [`Storage::persist`]. Readers for other
/// threads (the sync server) come from [`RedbStore::reader`].
pub struct RedbStore {
    reader: RedbReader,
    /// Writes each new stable checkpoint's state off the critical path (see [`snapshot`]).
    snapshots: snapshot::SnapshotWriter,
    /// The journal and what of it redb does not hold yet. Behind a lock only so that
    /// [`Storage::recover`] (`&self`) can hand it over; [`Storage::persist`] has `&mut self`.
    writer: Mutex<Writer>,
}

/// The journal's writing end and the operations not yet handed to the flusher.
struct Writer {
    journal: Journal,
    unflushed: Vec<Op>,
    unflushed_bytes: u64,
    /// The last entry appended.
    last: u64,
    flusher: flusher::Flusher,
}

impl Writer {
    /// Ends the journal's segment and hands its operations (and any before, not yet
    /// handed over) to the flusher; with `wait`, until redb holds them.
    fn hand_off(&mut self, wait: bool) -> Result<(), StorageError> {
        if self.unflushed.is_empty() {
            return if wait {
                self.flusher.submit(Vec::new(), self.last, true)
            } else {
                Ok(())
            };
        }
        self.journal.rotate()?;
        let ops = std::mem::take(&mut self.unflushed);
        self.unflushed_bytes = 0;
        self.flusher.submit(ops, self.last, wait)
    }
}

/// Blocks and checkpoint certificates in the journal that redb does not hold yet, for
/// readers: a peer syncing from this replica must get the newest blocks.
#[derive(Default)]
struct Overlay {
    blocks: BTreeMap<Seq, Block>,
    certs: BTreeMap<Seq, CheckpointCert>,
}

impl Overlay {
    fn add(&mut self, ops: &[Op]) {
        for op in ops {
            match op {
                Op::Block(b) => {
                    self.blocks.insert(b.height, b.clone());
                }
                Op::Checkpoint(c) => {
                    self.certs.insert(c.seq, c.clone());
                }
                _ => {}
            }
        }
    }

    /// Forgets what redb now holds; a record written again since (a newer certificate
    /// for the same checkpoint) stays until its own flush.
    fn applied(&mut self, ops: &[Op]) {
        for op in ops {
            match op {
                Op::Block(b) if self.blocks.get(&b.height) == Some(b) => {
                    self.blocks.remove(&b.height);
                }
                Op::Checkpoint(c) if self.certs.get(&c.seq) == Some(c) => {
                    self.certs.remove(&c.seq);
                }
                _ => {}
            }
        }
    }
}

impl fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.reader.path)
            .finish_non_exhaustive()
    }
}

/// A read-only handle on a [`RedbStore`]'s database, cheap to clone and safe to use from any
/// thread while the store writes: every call reads one consistent snapshot (redb's MVCC), so
/// it sees each persist call entirely or not at all.
#[derive(Clone)]
pub struct RedbReader {
    db: Arc<Database>,
    path: Arc<Path>,
    overlay: Arc<Mutex<Overlay>>,
    ledger: Arc<LedgerFile>,
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
    /// A batch in `batches`: its sequence number and digest.
    Batch(u64, Digest),
}

impl Key<'_> {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Key::Seq(s) => s.to_be_bytes().to_vec(),
            Key::Name(n) => n.as_bytes().to_vec(),
            Key::Batch(s, d) => [&s.to_be_bytes()[..], &d.0].concat(),
        }
    }
}

impl fmt::Display for Key<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::Seq(s) => write!(f, "{s}"),
            Key::Name(n) => write!(f, "{n:?}"),
            Key::Batch(s, d) => write!(f, "{s}/{}", d.to_hex()),
        }
    }
}

fn checksum(table: &str, key: Key<'_>, payload: &[u8]) -> [u8; CHECKSUM_LEN] {
    let mut h = checksum_of(table, key);
    h.update(payload);
    h.digest().to_be_bytes()
}

/// The checksum of a value stored under `table`/`key`, to be fed its payload.
fn checksum_of(table: &str, key: Key<'_>) -> xxhash_rust::xxh3::Xxh3 {
    let key = key.bytes();
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&(table.len() as u64).to_be_bytes());
    h.update(table.as_bytes());
    h.update(&(key.len() as u64).to_be_bytes());
    h.update(&key);
    h
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
    frame_as(FRAME_VERSION, table, key, payload)
}

fn frame_as(version: u8, table: &str, key: Key<'_>, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER_LEN + payload.len());
    v.extend_from_slice(&frame_header(version, checksum(table, key, payload)));
    v.extend_from_slice(payload);
    v
}

/// What precedes a framed payload: its format version, then its checksum.
fn frame_header(version: u8, sum: [u8; CHECKSUM_LEN]) -> [u8; HEADER_LEN] {
    let mut header = [0; HEADER_LEN];
    header[0] = version;
    header[1..].copy_from_slice(&sum);
    header
}

fn corrupt(table: &str, key: Key<'_>, what: impl fmt::Display) -> StorageError {
    StorageError::Corrupt(format!("table {table:?}, key {key}: {what}"))
}

/// The payload of a stored value, after checking its frame and checksum. Only records
/// with a batch may be stored in the split format ([`unframe_record`]).
fn unframe<'v>(table: &str, key: Key<'_>, value: &'v [u8]) -> Result<&'v [u8], StorageError> {
    match unframe_record(table, key, value)? {
        (None, payload) => Ok(payload),
        (Some(_), _) => Err(corrupt(table, key, "a split record where none belongs")),
    }
}

/// Like [`unframe`], for a record that may keep its batch apart: the batch's digest when
/// it does, and the payload.
fn unframe_record<'v>(
    table: &str,
    key: Key<'_>,
    value: &'v [u8],
) -> Result<(Option<Digest>, &'v [u8]), StorageError> {
    if value.len() < HEADER_LEN {
        return Err(corrupt(
            table,
            key,
            format_args!("value is {} bytes, shorter than its header", value.len()),
        ));
    }
    let (header, payload) = value.split_at(HEADER_LEN);
    let expected = match header[0] {
        FRAME_VERSION | FRAME_VERSION_SPLIT | FRAME_VERSION_LEDGER => checksum(table, key, payload),
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
    if header[0] == FRAME_VERSION_LEDGER {
        return Err(corrupt(table, key, "a ledger reference where none belongs"));
    }
    if header[0] != FRAME_VERSION_SPLIT {
        return Ok((None, payload));
    }
    if payload.len() < DIGEST_LEN {
        return Err(corrupt(table, key, "split record shorter than its digest"));
    }
    let (digest, rest) = payload.split_at(DIGEST_LEN);
    let mut d = [0; DIGEST_LEN];
    d.copy_from_slice(digest);
    Ok((Some(Digest(d)), rest))
}

/// Checks and decodes a stored value.
fn decode<T: Wire>(table: &str, key: Key<'_>, value: &[u8]) -> Result<T, StorageError> {
    decode_payload(table, key, unframe(table, key, value)?)
}

fn decode_payload<T: Wire>(table: &str, key: Key<'_>, payload: &[u8]) -> Result<T, StorageError> {
    T::from_bytes(payload).map_err(|e| corrupt(table, key, format_args!("does not decode: {e}")))
}

/// A value of `batches`: the batch itself (stores before the ledger file), or where it
/// lies in the ledger file.
enum StoredBatch<'v> {
    Inline(&'v [u8]),
    InLedger(Extent),
}

fn unframe_batch<'v>(key: Key<'_>, value: &'v [u8]) -> Result<StoredBatch<'v>, StorageError> {
    let name = BATCHES.name;
    if value.first() != Some(&FRAME_VERSION_LEDGER) {
        return Ok(StoredBatch::Inline(unframe(name, key, value)?));
    }
    let (header, payload) = value
        .split_at_checked(HEADER_LEN)
        .ok_or_else(|| corrupt(name, key, "value shorter than its header"))?;
    if header[1..] != checksum(name, key, payload) {
        return Err(corrupt(name, key, "checksum mismatch"));
    }
    match Extent::from_bytes(payload) {
        Some(at) if payload.len() == Extent::ENCODED_LEN => Ok(StoredBatch::InLedger(at)),
        _ => Err(corrupt(
            name,
            key,
            format_args!("a ledger reference of {} bytes", payload.len()),
        )),
    }
}

/// The batch stored under `key` in `batches` (`value`), read from the ledger file if it
/// lies there; checked against its checksum either way.
fn load_batch(ledger: &LedgerFile, key: Key<'_>, value: &[u8]) -> Result<Batch, StorageError> {
    match unframe_batch(key, value)? {
        StoredBatch::Inline(payload) => decode_payload(BATCHES.name, key, payload),
        StoredBatch::InLedger(at) => {
            let framed = ledger.read(at)?;
            decode(BATCHES.name, key, &framed).map_err(|e| match e {
                StorageError::Corrupt(m) => StorageError::Corrupt(format!(
                    "ledger file, {} bytes at offset {}: {m}",
                    at.len, at.offset
                )),
                io => io,
            })
        }
    }
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
    payload_at(table, seq, unframe(table, Key::Seq(seq), value)?)
}

/// Decodes a checked payload stored under `seq`, which must be the value's own.
fn payload_at<T: AtSeq>(table: &str, seq: Seq, payload: &[u8]) -> Result<T, StorageError> {
    let v = T::from_bytes(payload)
        .map_err(|e| corrupt(table, Key::Seq(seq), format_args!("does not decode: {e}")))?;
    if v.seq() != seq {
        return Err(corrupt(
            table,
            Key::Seq(seq),
            format_args!("value is for sequence {}", v.seq()),
        ));
    }
    Ok(v)
}

/// A record that carries a batch, which the store keeps apart (frame format 3).
trait WithBatch: AtSeq {
    fn batch(&self) -> &Batch;
    fn batch_mut(&mut self) -> &mut Batch;
    /// A copy with an empty batch: cheap, everything but the batch is small.
    fn without_batch(&self) -> Self;
    /// The digest the batch is stored under.
    fn batch_digest(&self) -> Digest;
}

impl WithBatch for Signed<PrePrepare> {
    fn batch(&self) -> &Batch {
        &self.body.batch
    }
    fn batch_mut(&mut self) -> &mut Batch {
        &mut self.body.batch
    }
    fn without_batch(&self) -> Self {
        let b = &self.body;
        Signed {
            body: PrePrepare {
                view: b.view,
                seq: b.seq,
                digest: b.digest,
                batch: Batch::default(),
            },
            signature: self.signature,
        }
    }
    /// The core persists only pre-prepares whose digest it checked against the batch.
    fn batch_digest(&self) -> Digest {
        self.body.digest
    }
}

impl WithBatch for PreparedProof {
    fn batch(&self) -> &Batch {
        self.pre_prepare.batch()
    }
    fn batch_mut(&mut self) -> &mut Batch {
        self.pre_prepare.batch_mut()
    }
    fn without_batch(&self) -> Self {
        PreparedProof {
            pre_prepare: self.pre_prepare.without_batch(),
            prepares: self.prepares.clone(),
        }
    }
    fn batch_digest(&self) -> Digest {
        self.digest()
    }
}

impl WithBatch for Block {
    fn batch(&self) -> &Batch {
        &self.batch
    }
    fn batch_mut(&mut self) -> &mut Batch {
        &mut self.batch
    }
    fn without_batch(&self) -> Self {
        Block {
            height: self.height,
            prev_hash: self.prev_hash,
            batch: Batch::default(),
            results_digest: self.results_digest,
            state_digest: self.state_digest,
            view: self.view,
            certificate: self.certificate.clone(),
        }
    }
    /// A block names no digest of its own: hashed here, once per block written.
    fn batch_digest(&self) -> Digest {
        self.batch.digest()
    }
}

/// A stored record, its batch left empty if it is kept apart, and that batch's digest.
fn decode_shallow<T: WithBatch>(
    table: &str,
    seq: Seq,
    value: &[u8],
) -> Result<(T, Option<Digest>), StorageError> {
    let (digest, payload) = unframe_record(table, Key::Seq(seq), value)?;
    Ok((payload_at(table, seq, payload)?, digest))
}

/// A stored record with its batch, fetched through `batches` if it is kept apart.
fn decode_record<T: WithBatch>(
    batches: &impl ReadableTable<&'static [u8], &'static [u8]>,
    ledger: &LedgerFile,
    table: &str,
    seq: Seq,
    value: &[u8],
) -> Result<T, StorageError> {
    let (mut record, digest) = decode_shallow::<T>(table, seq, value)?;
    if let Some(digest) = digest {
        let key = Key::Batch(seq, digest);
        let stored = batches
            .get(key.bytes().as_slice())
            .map_err(|e| db_error(format_args!("reading table {:?}", BATCHES.name), e))?
            .ok_or_else(|| {
                corrupt(
                    table,
                    Key::Seq(seq),
                    format_args!("its batch {key} is missing"),
                )
            })?;
        *record.batch_mut() = load_batch(ledger, key, stored.value())?;
    }
    Ok(record)
}

/// The (sequence, digest) a key of `batches` stands for.
fn parse_batch_key(key: &[u8]) -> Option<(Seq, Digest)> {
    if key.len() != 8 + DIGEST_LEN {
        return None;
    }
    let (seq, digest) = key.split_at(8);
    Some((
        u64::from_be_bytes(seq.try_into().ok()?),
        Digest::from_slice(digest)?,
    ))
}

/// The batch a stored record keeps apart, if it does.
fn batch_ref(table: &str, seq: Seq, value: &[u8]) -> Result<Option<Digest>, StorageError> {
    Ok(unframe_record(table, Key::Seq(seq), value)?.0)
}

/// Writes `record` under `seq`, its batch into the ledger file and a reference to it into
/// `batches` unless already there (an empty batch stays inline). Returns the batch the
/// replaced value kept apart, if any: it may now be unused.
fn put_record<T: WithBatch>(
    table: &mut redb::Table<'_, u64, &'static [u8]>,
    name: &'static str,
    batches: &mut redb::Table<'_, &'static [u8], &'static [u8]>,
    ledger: &mut Appender,
    seq: Seq,
    record: &T,
) -> Result<Option<(Seq, Digest)>, StorageError> {
    let value = if record.batch().is_empty() {
        frame(name, Key::Seq(seq), &record.to_bytes())
    } else {
        let digest = record.batch_digest();
        let key = Key::Batch(seq, digest);
        let key_bytes = key.bytes();
        let stored = batches
            .get(key_bytes.as_slice())
            .map_err(write_err(BATCHES.name))?
            .is_some();
        if !stored {
            let at = ledger.stage(&frame(BATCHES.name, key, &record.batch().to_bytes()))?;
            let v = frame_as(FRAME_VERSION_LEDGER, BATCHES.name, key, &at.to_bytes());
            batches
                .insert(key_bytes.as_slice(), v.as_slice())
                .map_err(write_err(BATCHES.name))?;
        }
        let mut payload = digest.0.to_vec();
        payload.extend_from_slice(&record.without_batch().to_bytes());
        frame_as(FRAME_VERSION_SPLIT, name, Key::Seq(seq), &payload)
    };
    let old = table
        .insert(seq, value.as_slice())
        .map_err(write_err(name))?
        .map(|old| batch_ref(name, seq, old.value()))
        .transpose()?
        .flatten();
    Ok(old.map(|d| (seq, d)))
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

/// Maps a redb failure, reporting damaged or foreign files (redb's corruption reports, its
/// "not a redb database" I/O error, and reads past the end of a file shorter than its own
/// header says: a truncated one) as [`StorageError::Corrupt`].
fn db_error(context: impl fmt::Display, e: impl Into<redb::Error>) -> StorageError {
    match e.into() {
        redb::Error::Corrupted(msg) => StorageError::Corrupt(format!("{context}: {msg}")),
        redb::Error::Io(io) if io.kind() == std::io::ErrorKind::InvalidData => {
            StorageError::Corrupt(format!("{context}: {io}"))
        }
        redb::Error::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            StorageError::Corrupt(format!("{context}: the file is truncated ({io})"))
        }
        redb::Error::DatabaseAlreadyOpen => StorageError::Io(format!(
            "{context}: another process has it open (is a replica with this data_dir still running?)"
        )),
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
        let db = Arc::new(db);
        let with_context = |e| match e {
            StorageError::Io(m) => StorageError::Io(format!("{context}: {m}")),
            StorageError::Corrupt(m) => StorageError::Corrupt(format!("{context}: {m}")),
        };
        init(&db).map_err(with_context)?;
        let end = meta_u64(&db, LEDGER_KEY).map_err(with_context)?;
        let file = Arc::new(LedgerFile::open(path, end, max_unfinished_flush(path)?)?);
        let mut ledger = Appender::new(file.clone(), end);
        let last = replay_journal(&db, &mut ledger, path).map_err(with_context)?;
        let overlay = Arc::new(Mutex::new(Overlay::default()));
        let writer = Writer {
            journal: Journal::start(path, last + 1)?,
            unflushed: Vec::new(),
            unflushed_bytes: 0,
            last,
            flusher: flusher::Flusher::start(db.clone(), ledger, path.into(), overlay.clone())?,
        };
        Ok(RedbStore {
            reader: RedbReader {
                db,
                path: path.into(),
                overlay,
                ledger: file,
            },
            snapshots: snapshot::SnapshotWriter::start(snapshot::path_for(path))?,
            writer: Mutex::new(writer),
        })
    }

    fn writer(&self) -> MutexGuard<'_, Writer> {
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands everything journalled to redb and waits until redb holds it.
    fn flush_journal(&self) -> Result<(), StorageError> {
        self.writer().hand_off(true)
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

    /// Reads and checks every stored value, including the blocks below the stable
    /// checkpoint that [`Storage::recover`] does not need, after applying the journal. For
    /// operators and tests: it reads the whole ledger.
    ///
    /// Every batch kept apart must be referred to by some record: an unreferenced one is
    /// reported too, since only a bug in this store could leave it.
    pub fn verify(&self) -> Result<(), StorageError> {
        self.flush_journal()?;
        self.reader.verify()
    }

    /// Waits until the newest stable checkpoint's snapshot is written. Not needed for
    /// safety (recovery rebuilds a missing one from blocks); dropping the store does it too.
    pub fn flush_snapshots(&self) {
        self.snapshots.flush();
    }
}

/// Creates the tables of a new store, or checks that an existing file is one of ours.
fn init(db: &Database) -> Result<(), StorageError> {
    let txn = db
        .begin_write()
        .map_err(|e| db_error("starting a transaction", e))?;
    {
        let mut meta = META.open_write(&txn)?;
        for tab in [ACCEPTED, PREPARED, BLOCKS, CHECKPOINTS] {
            tab.open_write(&txn)?;
        }
        BATCHES.open_write(&txn)?;
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

/// A number kept under `key` in `meta` (0 if it is not there yet).
fn meta_u64(db: &Database, key: &'static str) -> Result<u64, StorageError> {
    let txn = db
        .begin_read()
        .map_err(|e| db_error("starting a read transaction", e))?;
    let meta = META.open_read(&txn)?;
    let Some(v) = get_named(&meta, key)? else {
        return Ok(0);
    };
    let payload = unframe(META.name, Key::Name(key), &v)?;
    let n: [u8; 8] = payload.try_into().map_err(|_| {
        corrupt(
            META.name,
            Key::Name(key),
            format_args!("{} bytes, not 8", payload.len()),
        )
    })?;
    Ok(u64::from_be_bytes(n))
}

/// Applies what the journal holds beyond the database, then deletes its segments. Returns
/// the last journal entry number, applied or seen.
fn replay_journal(db: &Database, ledger: &mut Appender, path: &Path) -> Result<u64, StorageError> {
    let applied = meta_u64(db, JOURNAL_KEY)?;
    let replayed = journal::replay(path, applied)?;
    if !replayed.ops.is_empty() {
        apply(db, ledger, &replayed.ops, replayed.last)?;
    }
    journal::remove_segments(path, u64::MAX)?;
    Ok(replayed.last)
}

impl RedbReader {
    fn overlay(&self) -> MutexGuard<'_, Overlay> {
        self.overlay.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What [`Storage::recover`] returns, from redb alone: the store applies its journal
    /// first.
    fn recover(&self) -> Result<Recovered, StorageError> {
        let txn = self.read_txn()?;
        let meta = META.open_read(&txn)?;
        let (view, changing) = match get_named(&meta, VIEW_KEY)? {
            Some(v) => decode_view(&v)?,
            None => (0, false),
        };
        let batches = BATCHES.open_read(&txn)?;
        let newest_cert = {
            let table = CHECKPOINTS.open_read(&txn)?;
            let last = table
                .last()
                .map_err(|e| db_error("reading table \"checkpoints\"", e))?;
            last.map(|(k, v)| decode_at::<CheckpointCert>(CHECKPOINTS.name, k.value(), v.value()))
                .transpose()?
        };
        let checkpoint =
            snapshot::catch_up(self.newest_snapshot(&txn)?, newest_cert, |from, to| {
                let table = BLOCKS.open_read(&txn)?;
                read_range(&table, BLOCKS.name, from..=to, usize::MAX, |seq, v| {
                    decode_record(&batches, &self.ledger, BLOCKS.name, seq, v)
                })
            })?;
        let base = checkpoint.as_ref().map_or(0, |c| c.cert.seq);

        // Blocks above the checkpoint must run on from it without a gap: replay needs each one.
        let mut blocks: Vec<Block> = Vec::new();
        if let Some(first) = base.checked_add(1) {
            let table = BLOCKS.open_read(&txn)?;
            blocks = read_range(&table, BLOCKS.name, first.., usize::MAX, |seq, v| {
                decode_record(&batches, &self.ledger, BLOCKS.name, seq, v)
            })?;
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
            accepted: scan_records(&txn, &batches, &self.ledger, ACCEPTED)?,
            prepared: scan_records(&txn, &batches, &self.ledger, PREPARED)?,
        })
    }

    /// The newest snapshot held: the snapshot file, or the table where stores before it
    /// kept theirs.
    fn newest_snapshot(
        &self,
        txn: &redb::ReadTransaction,
    ) -> Result<Option<StableCheckpoint>, StorageError> {
        let file = snapshot::read(&snapshot::path_for(&self.path))?;
        let table = SNAPSHOT.open_read(txn)?;
        let old = get_named(&table, LATEST_KEY)?
            .map(|v| decode::<StableCheckpoint>(SNAPSHOT.name, Key::Name(LATEST_KEY), &v))
            .transpose()?;
        Ok(match (file, old) {
            (Some(f), Some(o)) if o.cert.seq > f.cert.seq => Some(o),
            (Some(f), _) => Some(f),
            (None, o) => o,
        })
    }

    /// Height of the last stored block (0 when none).
    pub fn height(&self) -> Result<Seq, StorageError> {
        // The overlay first: what leaves it is in redb by then (see `blocks_from`).
        let journalled = self.overlay().blocks.keys().next_back().copied();
        let txn = self.read_txn()?;
        let blocks = BLOCKS.open_read(&txn)?;
        let last = blocks
            .last()
            .map_err(|e| db_error("reading table \"blocks\"", e))?;
        Ok(last
            .map_or(0, |(k, _)| k.value())
            .max(journalled.unwrap_or(0)))
    }

    /// [`RedbStore::verify`] on redb alone.
    fn verify(&self) -> Result<(), StorageError> {
        let txn = self.read_txn()?;
        let batches = BATCHES.open_read(&txn)?;
        let mut used = BTreeSet::new();
        let accepted: Vec<Signed<PrePrepare>> =
            scan_records(&txn, &batches, &self.ledger, ACCEPTED)?;
        let prepared: Vec<PreparedProof> = scan_records(&txn, &batches, &self.ledger, PREPARED)?;
        let blocks: Vec<Block> = scan_records(&txn, &batches, &self.ledger, BLOCKS)?;
        used.extend(accepted.iter().map(|r| (r.seq(), r.batch_digest())));
        used.extend(prepared.iter().map(|r| (r.seq(), r.batch_digest())));
        used.extend(blocks.iter().map(|r| (r.seq(), r.batch_digest())));
        let iter = batches
            .iter()
            .map_err(|e| db_error(format_args!("reading table {:?}", BATCHES.name), e))?;
        for entry in iter {
            let (k, v) =
                entry.map_err(|e| db_error(format_args!("reading table {:?}", BATCHES.name), e))?;
            let key = parse_batch_key(k.value()).ok_or_else(|| {
                StorageError::Corrupt(format!(
                    "table {:?}: a key of {} bytes",
                    BATCHES.name,
                    k.value().len()
                ))
            })?;
            let batch = load_batch(&self.ledger, Key::Batch(key.0, key.1), v.value())?;
            if batch.digest() != key.1 {
                return Err(corrupt(
                    BATCHES.name,
                    Key::Batch(key.0, key.1),
                    "holds a batch with another digest",
                ));
            }
            if !used.contains(&key) {
                return Err(corrupt(
                    BATCHES.name,
                    Key::Batch(key.0, key.1),
                    "no record refers to this batch",
                ));
            }
        }
        scan::<CheckpointCert>(&txn, CHECKPOINTS)?;
        let meta = META.open_read(&txn)?;
        if let Some(v) = get_named(&meta, VIEW_KEY)? {
            decode_view(&v)?;
        }
        self.newest_snapshot(&txn)?;
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

/// Decodes (with `decode`) every value of a sequence-keyed table whose key lies in
/// `range`, in key order, at most `max` of them.
fn read_range<T>(
    table: &impl ReadableTable<u64, &'static [u8]>,
    name: &'static str,
    range: impl std::ops::RangeBounds<u64> + 'static,
    max: usize,
    decode: impl Fn(Seq, &[u8]) -> Result<T, StorageError>,
) -> Result<Vec<T>, StorageError> {
    let iter = table
        .range(range)
        .map_err(|e| db_error(format_args!("reading table {name:?}"), e))?;
    let mut out = Vec::new();
    for entry in iter.take(max) {
        let (k, v) = entry.map_err(|e| db_error(format_args!("reading table {name:?}"), e))?;
        out.push(decode(k.value(), v.value())?);
    }
    Ok(out)
}

fn scan<T: AtSeq>(txn: &redb::ReadTransaction, tab: Tab<u64>) -> Result<Vec<T>, StorageError> {
    let table = tab.open_read(txn)?;
    read_range(&table, tab.name, .., usize::MAX, |seq, v| {
        decode_at(tab.name, seq, v)
    })
}

/// Every record of `tab`, with its batch.
fn scan_records<T: WithBatch>(
    txn: &redb::ReadTransaction,
    batches: &impl ReadableTable<&'static [u8], &'static [u8]>,
    ledger: &LedgerFile,
    tab: Tab<u64>,
) -> Result<Vec<T>, StorageError> {
    let table = tab.open_read(txn)?;
    read_range(&table, tab.name, .., usize::MAX, |seq, v| {
        decode_record(batches, ledger, tab.name, seq, v)
    })
}

impl Storage for RedbStore {
    /// All of `ops` as one journal entry, fsync'd before returning; redb gets them later
    /// (see `journal`). An error from the append itself leaves at most a torn entry, which
    /// replay drops; one from handing the journal to redb comes after the entry is durable,
    /// so replay applies it (more is kept than was announced, which is safe). Either way
    /// the persistence thread stops at the error, and with it the replica.
    fn persist(&mut self, ops: &[PersistOp]) -> Result<(), StorageError> {
        if ops.is_empty() {
            return Ok(());
        }
        let writer = self.writer.get_mut().unwrap_or_else(|e| e.into_inner());
        writer.flusher.check()?;
        let jops: Vec<Op> = ops.iter().map(Op::from_persist).collect();
        let (entry, bytes) = writer.journal.append(&jops)?;
        self.reader.overlay().add(&jops);
        writer.last = entry;
        writer.unflushed.extend(jops);
        writer.unflushed_bytes += bytes;
        let newest = ops.iter().rev().find_map(|op| match op {
            PersistOp::Checkpoint(stable) => Some(stable),
            _ => None,
        });
        if newest.is_some() || writer.unflushed_bytes >= HANDOFF_BYTES {
            writer.hand_off(false)?;
        }
        if let Some(stable) = newest {
            // The certificate is in the journal; the state goes to its file off the
            // critical path (see `snapshot`).
            self.snapshots.submit(stable.clone());
        }
        Ok(())
    }

    fn recover(&self) -> Result<Recovered, StorageError> {
        self.flush_journal()?;
        self.reader.recover()
    }
}

/// The most bytes one unfinished flush can have left past the ledger file's committed end.
/// A flush writes the batches of journal entries that are still on disk (segments go only
/// after the flush commits), each batch once, so no more than the journal holds, plus a
/// frame header per batch, which [`HANDOFF_BYTES`] covers many times over.
fn max_unfinished_flush(db: &Path) -> Result<u64, StorageError> {
    let mut bytes = HANDOFF_BYTES;
    for (_, segment) in journal::segments(db)? {
        let len = std::fs::metadata(&segment)
            .map_err(|e| StorageError::Io(format!("{}: {e}", segment.display())))?
            .len();
        bytes = bytes.saturating_add(len);
    }
    Ok(bytes)
}

/// Applies `ops`, in order, to redb in one transaction that also records `upto` as the last
/// journal entry applied, and commits it durably; their new batches go to the ledger file
/// first. On error nothing of `ops` is applied (the transaction is dropped, which aborts
/// it, and the ledger's recorded end stays where it was; batches already written stay as
/// dead space, see `ledger`).
fn apply(db: &Database, ledger: &mut Appender, ops: &[Op], upto: u64) -> Result<(), StorageError> {
    let result = apply_in_transaction(db, ledger, ops, upto);
    match result {
        Ok(()) => ledger.committed(),
        Err(_) => ledger.abandon(),
    }
    result
}

fn apply_in_transaction(
    db: &Database,
    ledger: &mut Appender,
    ops: &[Op],
    upto: u64,
) -> Result<(), StorageError> {
    let keep = survivors(ops);
    let mut txn = db
        .begin_write()
        .map_err(|e| db_error("starting a transaction", e))?;
    txn.set_durability(Durability::Immediate)
        .map_err(|e| db_error("setting durability", e))?;
    {
        let mut accepted = ACCEPTED.open_write(&txn)?;
        let mut prepared = PREPARED.open_write(&txn)?;
        let mut blocks = BLOCKS.open_write(&txn)?;
        let mut batches = BATCHES.open_write(&txn)?;
        let mut checkpoints = CHECKPOINTS.open_write(&txn)?;
        let mut meta = META.open_write(&txn)?;
        meta.insert(
            JOURNAL_KEY,
            frame(META.name, Key::Name(JOURNAL_KEY), &upto.to_be_bytes()).as_slice(),
        )
        .map_err(write_err(META.name))?;
        // Batches a replaced or pruned record kept apart: dropped at the end of the
        // transaction unless some record still refers to them.
        let mut released = BTreeSet::new();

        for op in ops.iter().zip(&keep).filter_map(|(op, k)| k.then_some(op)) {
            match op {
                Op::View { view, changing } => {
                    meta.insert(VIEW_KEY, encode_view(*view, *changing).as_slice())
                        .map_err(write_err(META.name))?;
                }
                Op::Accepted(pp) => {
                    let seq = pp.body.seq;
                    released.extend(put_record(
                        &mut accepted,
                        ACCEPTED.name,
                        &mut batches,
                        ledger,
                        seq,
                        pp,
                    )?);
                }
                Op::Prepared(p) => {
                    let seq = p.seq();
                    let old_view = prepared
                        .get(seq)
                        .map_err(write_err(PREPARED.name))?
                        .map(|v| decode_shallow::<PreparedProof>(PREPARED.name, seq, v.value()))
                        .transpose()?
                        .map(|(old, _)| old.view());
                    if old_view.is_none_or(|v| v <= p.view()) {
                        released.extend(put_record(
                            &mut prepared,
                            PREPARED.name,
                            &mut batches,
                            ledger,
                            seq,
                            p,
                        )?);
                    }
                }
                Op::Block(b) => {
                    released.extend(put_record(
                        &mut blocks,
                        BLOCKS.name,
                        &mut batches,
                        ledger,
                        b.height,
                        b,
                    )?);
                }
                Op::Checkpoint(cert) => {
                    let seq = cert.seq;
                    let v = frame(CHECKPOINTS.name, Key::Seq(seq), &cert.to_bytes());
                    checkpoints
                        .insert(seq, v.as_slice())
                        .map_err(write_err(CHECKPOINTS.name))?;
                }
                Op::Prune { upto } => {
                    for (table, name) in [
                        (&mut accepted, ACCEPTED.name),
                        (&mut prepared, PREPARED.name),
                    ] {
                        // Split records are small; a record in an older format holds
                        // its batch inline and releases nothing, so it is not copied.
                        let mut pruned = Vec::new();
                        table
                            .retain_in(..=*upto, |seq, v| {
                                if v.first() == Some(&FRAME_VERSION_SPLIT) {
                                    pruned.push((seq, v.to_vec()));
                                }
                                false
                            })
                            .map_err(write_err(name))?;
                        for (seq, v) in pruned {
                            if let Some(d) = batch_ref(name, seq, &v)? {
                                released.insert((seq, d));
                            }
                        }
                    }
                }
            }
        }
        for (seq, digest) in released {
            let mut used = false;
            for (table, name) in [
                (&accepted, ACCEPTED.name),
                (&prepared, PREPARED.name),
                (&blocks, BLOCKS.name),
            ] {
                if let Some(v) = table.get(seq).map_err(write_err(name))? {
                    used |= batch_ref(name, seq, v.value())? == Some(digest);
                }
            }
            if !used {
                batches
                    .remove(Key::Batch(seq, digest).bytes().as_slice())
                    .map_err(write_err(BATCHES.name))?;
            }
        }
        // The batches are durable before the references to them are.
        let end = ledger.write()?;
        meta.insert(
            LEDGER_KEY,
            frame(META.name, Key::Name(LEDGER_KEY), &end.to_be_bytes()).as_slice(),
        )
        .map_err(write_err(META.name))?;
    }
    txn.commit().map_err(|e| db_error("committing", e))
}

/// Which of `ops` can change the database: a pre-prepare or certificate that a later
/// prune in the same `ops` deletes again is skipped, so it never touches the B-tree. Under
/// load most of them are: a hand-off carries a checkpoint interval and its prune.
fn survivors(ops: &[Op]) -> Vec<bool> {
    let mut keep = vec![true; ops.len()];
    let mut pruned_later: Option<Seq> = None;
    for (op, k) in ops.iter().zip(keep.iter_mut()).rev() {
        match op {
            Op::Prune { upto } => pruned_later = pruned_later.max(Some(*upto)),
            Op::Accepted(pp) => *k = pruned_later.is_none_or(|u| pp.body.seq > u),
            Op::Prepared(p) => *k = pruned_later.is_none_or(|u| p.seq() > u),
            _ => {}
        }
    }
    keep
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

/// Blocks and certificates come from the journal's overlay and from redb: the overlay is
/// read first, because the flusher commits to redb before it drops what it applied from
/// the overlay, so each record is in one or the other (or both) whenever it is looked for.
impl StateProvider for RedbReader {
    fn blocks_from(&self, from_height: Seq, max: usize) -> Result<Vec<Block>, StorageError> {
        let mut found: BTreeMap<Seq, Block> = self
            .overlay()
            .blocks
            .range(from_height..)
            .take(max)
            .map(|(h, b)| (*h, b.clone()))
            .collect();
        let txn = self.read_txn()?;
        let table = BLOCKS.open_read(&txn)?;
        let batches = BATCHES.open_read(&txn)?;
        let stored: Vec<Block> = read_range(&table, BLOCKS.name, from_height.., max, |seq, v| {
            decode_record(&batches, &self.ledger, BLOCKS.name, seq, v)
        })?;
        found.extend(stored.into_iter().map(|b| (b.height, b)));
        Ok(found.into_values().take(max).collect())
    }

    fn checkpoints(&self) -> Result<Vec<CheckpointCert>, StorageError> {
        let mut found = self.overlay().certs.clone();
        let stored: Vec<CheckpointCert> = scan(&self.read_txn()?, CHECKPOINTS)?;
        found.extend(stored.into_iter().map(|c| (c.seq, c)));
        Ok(found.into_values().collect())
    }

    fn checkpoint(&self, seq: Seq) -> Result<Option<CheckpointCert>, StorageError> {
        if let Some(c) = self.overlay().certs.get(&seq) {
            return Ok(Some(c.clone()));
        }
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

    /// The batch blocks carry at `seq` (`variant` 0), or another one for the same seq.
    fn batch(seq: Seq, variant: u8) -> Batch {
        Batch::new(vec![Request {
            client: ClientId(seq % 3),
            timestamp: seq,
            op: Operation::Put {
                key: format!("k{seq}").into_bytes(),
                value: vec![seq as u8 ^ variant; 5],
            },
            signature: sig(seq as u8),
        }])
    }

    /// Pre-prepares of odd views propose another batch than the block's, so histories
    /// leave batches that end up unused (and must be dropped).
    fn pre_prepare(view: View, seq: Seq) -> Signed<PrePrepare> {
        let batch = batch(seq, (view % 2) as u8);
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
                    vouches: true,
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
        let batch = batch(height, 0);
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
            snapshot.insert(format!("k{i}").as_bytes(), &[i as u8; 3]);
        }
        snapshot.insert_client(
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
            snapshot: Arc::new(snapshot),
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
        let mut last_checkpoint = 0;
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
                    // Stable checkpoints only move forward, as the core makes them.
                    5 if height > last_checkpoint => {
                        let s = last_checkpoint + 1 + rnd(height - last_checkpoint);
                        last_checkpoint = s;
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
        // The test snapshots are not states the test blocks lead to, so recovery must find
        // each one written rather than rebuild it (which the snapshot tests cover).
        db.flush_snapshots();
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

    /// The first seed of a randomised test: `PBFT_SEED` replays a failure.
    fn base_seed(default: u64) -> u64 {
        std::env::var("PBFT_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default)
    }

    #[test]
    fn random_histories_match_memstore_and_survive_reopen() {
        let base = base_seed(0x5eed);
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
    fn a_failed_flush_applies_nothing_and_the_journal_keeps_it() {
        let dir = TempDir::new().unwrap();
        let mut db = open(&dir);
        let blocks = chain(2);
        db.persist(&[
            PersistOp::Prepared(proof(0, 5)),
            PersistOp::Block(blocks[0].clone()),
        ])
        .unwrap();
        let before = db.recover().unwrap();
        // A damaged stored proof makes applying the third op fail (it must read the old
        // view); the call itself only journals.
        let good = raw_seq(&db, PREPARED, 5);
        poke_seq(&db, PREPARED, 5, |v| *v.last_mut().unwrap() ^= 1);
        let ops = [
            PersistOp::View {
                view: 9,
                changing: false,
            },
            PersistOp::Block(blocks[1].clone()),
            PersistOp::Prepared(proof(1, 5)),
        ];
        db.persist(&ops).unwrap();
        let err = db.recover().unwrap_err();
        assert!(matches!(err, StorageError::Corrupt(_)), "{err}");
        // Nothing of the failed transaction reached redb, and the store refuses to go on.
        put_raw_seq(&db, PREPARED, 5, &good);
        assert_eq!(db.reader.recover().unwrap(), before);
        let err = db.persist(&ops[..1]).unwrap_err();
        assert!(matches!(err, StorageError::Corrupt(_)), "{err}");
        // The journal still holds the call: a restart applies it.
        drop(db);
        let mut mem = MemStore::new();
        for ops in [&before_ops(&blocks)[..], &ops[..]] {
            mem.persist(ops).unwrap();
        }
        assert_same_answers(&mem, &open(&dir), "after the restart");
    }

    fn before_ops(blocks: &[Block]) -> Vec<PersistOp> {
        vec![
            PersistOp::Prepared(proof(0, 5)),
            PersistOp::Block(blocks[0].clone()),
        ]
    }

    fn raw_seq(db: &RedbStore, tab: Tab<u64>, key: u64) -> Vec<u8> {
        db.flush_journal().unwrap();
        let txn = db.reader.db.begin_read().unwrap();
        let t = txn.open_table(tab.def).unwrap();
        t.get(key).unwrap().unwrap().value().to_vec()
    }

    /// Rewrites a stored value behind the store's back (redb's page checksums stay valid, so
    /// only our own value checksum can notice).
    fn poke_seq(db: &RedbStore, tab: Tab<u64>, key: u64, f: impl FnOnce(&mut Vec<u8>)) {
        let mut v = raw_seq(db, tab, key);
        f(&mut v);
        put_raw_seq(db, tab, key, &v);
    }

    /// Writes a raw value into redb, leaving the journal alone.
    fn put_raw_seq(db: &RedbStore, tab: Tab<u64>, key: u64, v: &[u8]) {
        let txn = db.reader.db.begin_write().unwrap();
        txn.open_table(tab.def).unwrap().insert(key, v).unwrap();
        txn.commit().unwrap();
    }

    fn poke_named(db: &RedbStore, tab: Tab<&'static str>, key: &str, f: impl FnOnce(&mut Vec<u8>)) {
        db.flush_journal().unwrap();
        let txn = db.reader.db.begin_write().unwrap();
        {
            let mut t = txn.open_table(tab.def).unwrap();
            let mut v = t.get(key).unwrap().unwrap().value().to_vec();
            f(&mut v);
            t.insert(key, v.as_slice()).unwrap();
        }
        txn.commit().unwrap();
    }

    /// A store with the script's history, its newest snapshot written (the script's
    /// snapshots are not states its blocks lead to, so recovery could not rebuild them).
    fn store_with_history(dir: &TempDir) -> RedbStore {
        let mut db = open(dir);
        for ops in script() {
            db.persist(&ops).unwrap();
        }
        db.flush_snapshots();
        db.flush_journal().unwrap();
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
        let dir = TempDir::new().unwrap();
        let db = store_with_history(&dir);
        poke_named(&db, META, VIEW_KEY, |v| *v.last_mut().unwrap() ^= 1);
        let m = corrupt_message(db.recover());
        assert!(m.contains("table \"meta\", key \"view\""), "{m}");
        // The snapshot file is checked the same way.
        let dir = TempDir::new().unwrap();
        let db = store_with_history(&dir);
        db.flush_snapshots();
        let file = snapshot::path_for(db.path());
        let mut bytes = std::fs::read(&file).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x20;
        std::fs::write(&file, bytes).unwrap();
        let m = corrupt_message(db.recover());
        assert!(
            m.contains("table \"snapshot\"") && m.contains("checksum"),
            "{m}"
        );
        assert!(db.verify().is_err());
    }

    #[test]
    fn values_written_in_frame_format_1_still_read_and_are_still_checked() {
        let dir = TempDir::new().unwrap();
        let db = store_with_history(&dir);
        let before = db.recover().unwrap();
        // Rewrite every block as format 1 (SHA-256 checksum, batch inline) stored it.
        for b in db.blocks_from(1, 11).unwrap() {
            let h = b.height;
            poke_seq(&db, BLOCKS, h, |v| {
                let payload = b.to_bytes();
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

    /// Flips a byte inside every copy of `marker` in `file`; returns how many there were.
    fn flip_marker(file: &std::path::Path, marker: &[u8]) -> usize {
        let mut bytes = std::fs::read(file).unwrap();
        let hits: Vec<usize> = bytes
            .windows(marker.len())
            .enumerate()
            .filter(|(_, w)| *w == marker)
            .map(|(i, _)| i)
            .collect();
        for &i in &hits {
            bytes[i + 3] ^= 0x01;
        }
        std::fs::write(file, &bytes).unwrap();
        hits.len()
    }

    fn store_with_marked_block(path: &std::path::Path, marker: &[u8]) {
        let mut db = RedbStore::open(path).unwrap();
        let mut b = block(1, Digest::ZERO);
        b.batch.requests_mut()[0].op = Operation::Put {
            key: marker.to_vec(),
            value: b"x".to_vec(),
        };
        db.persist(&[PersistOp::Block(b)]).unwrap();
        db.flush_journal().unwrap();
    }

    #[test]
    fn a_byte_flipped_in_the_file_fails_open_or_recover() {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("pbft.redb");
        let marker = b"MARKER-a1b2c3d4e5f6-MARKER";
        store_with_marked_block(&path, marker);
        let hits = flip_marker(&path, marker) + flip_marker(&ledger::path_for(&path), marker);
        assert!(hits > 0, "marker not found in the files");
        let result = RedbStore::open(&path).and_then(|db| db.recover());
        assert!(result.is_err(), "damaged file was read: {result:?}");
    }

    #[test]
    fn a_block_batch_lies_in_the_ledger_file_and_damage_there_names_it() {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("pbft.redb");
        let marker = b"MARKER-in-the-ledger-file";
        store_with_marked_block(&path, marker);
        assert_eq!(flip_marker(&path, marker), 0, "the batch is not in redb");
        assert_eq!(flip_marker(&ledger::path_for(&path), marker), 1);
        let db = RedbStore::open(&path).unwrap();
        let m = corrupt_message(db.recover());
        assert!(m.contains("ledger file") && m.contains("key 1/"), "{m}");
        assert!(m.contains("checksum mismatch"), "{m}");
        let m = corrupt_message(db.verify());
        assert!(m.contains("ledger file"), "{m}");
    }

    #[test]
    fn a_ledger_file_shorter_than_the_database_says_is_refused() {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("pbft.redb");
        store_with_marked_block(&path, b"marker");
        let file = ledger::path_for(&path);
        let len = std::fs::metadata(&file).unwrap().len();
        std::fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_len(len - 1)
            .unwrap();
        let m = corrupt_message(RedbStore::open(&path).map(|_| ()));
        assert!(m.contains("committed batches are missing"), "{m}");
    }

    #[test]
    fn bytes_past_the_committed_end_are_cut_off_and_overwritten() {
        // A flush that wrote its batches and crashed before its commit: the journal
        // replays it, and the next batches go where the unfinished ones were.
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("pbft.redb");
        let blocks = chain(6);
        let mut mem = MemStore::default();
        {
            let mut db = RedbStore::open(&path).unwrap();
            let ops: Vec<_> = blocks[..3].iter().cloned().map(PersistOp::Block).collect();
            db.persist(&ops).unwrap();
            mem.persist(&ops).unwrap();
            db.flush_journal().unwrap();
        }
        let file = ledger::path_for(&path);
        let committed = std::fs::metadata(&file).unwrap().len();
        let mut bytes = std::fs::read(&file).unwrap();
        bytes.extend_from_slice(&[0xAB; 5000]);
        std::fs::write(&file, &bytes).unwrap();
        let mut db = RedbStore::open(&path).unwrap();
        assert_eq!(std::fs::metadata(&file).unwrap().len(), committed);
        let ops: Vec<_> = blocks[3..].iter().cloned().map(PersistOp::Block).collect();
        db.persist(&ops).unwrap();
        mem.persist(&ops).unwrap();
        db.flush_journal().unwrap();
        db.verify().unwrap();
        assert_same_answers(&mem, &db, "after the cut");
        drop(db);
        let db = RedbStore::open(&path).unwrap();
        db.verify().unwrap();
        assert_same_answers(&mem, &db, "reopened");
    }

    #[test]
    fn a_crash_between_the_ledger_write_and_the_commit_loses_nothing() {
        // The flush wrote and synced blocks 4-6 into the ledger file, and the crash came
        // before redb committed the references: redb and the journal are as they were
        // before that flush, the ledger file is not. Reopening cuts the unreferenced tail
        // and replays the journal, which writes the same batches again.
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("pbft.redb");
        let file = ledger::path_for(&path);
        let blocks = chain(6);
        let mut mem = MemStore::default();
        let ops: Vec<_> = blocks.iter().cloned().map(PersistOp::Block).collect();
        {
            let mut db = RedbStore::open(&path).unwrap();
            db.persist(&ops[..3]).unwrap();
            mem.persist(&ops[..3]).unwrap();
            db.flush_journal().unwrap();
        }
        let old_redb = std::fs::read(&path).unwrap();
        let old_end = std::fs::metadata(&file).unwrap().len();
        let segments;
        {
            let mut db = RedbStore::open(&path).unwrap();
            db.persist(&ops[3..]).unwrap();
            mem.persist(&ops[3..]).unwrap();
            segments = segment_files(&dir)
                .into_iter()
                .map(|p| {
                    let b = std::fs::read(&p).unwrap();
                    (p, b)
                })
                .collect::<Vec<_>>();
            db.flush_journal().unwrap();
        }
        let full = std::fs::read(&file).unwrap();
        assert!(
            full.len() as u64 > old_end,
            "the second flush wrote batches"
        );
        std::fs::write(&path, &old_redb).unwrap();
        for (p, b) in segments {
            std::fs::write(p, b).unwrap();
        }
        let db = RedbStore::open(&path).unwrap();
        assert!(
            std::fs::read(&file).unwrap() == full,
            "the tail was cut and the replay wrote the same batches where they were"
        );
        db.verify().unwrap();
        assert_same_answers(&mem, &db, "after the crash");
        assert!(
            !dir.path().read_dir().unwrap().any(|e| {
                let name = e.unwrap().file_name();
                name.to_string_lossy().contains(".tail-")
            }),
            "one flush's tail is not kept aside"
        );
    }

    #[test]
    fn a_missing_ledger_file_is_refused_and_the_database_left_alone() {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("pbft.redb");
        store_with_marked_block(&path, b"marker");
        let file = ledger::path_for(&path);
        let kept = std::fs::read(&file).unwrap();
        std::fs::remove_file(&file).unwrap();
        let m = corrupt_message(RedbStore::open(&path).map(|_| ()));
        assert!(m.contains("is missing"), "{m}");
        assert!(
            !file.exists(),
            "an empty file would hide the loss at the next start"
        );
        // The refusal changed nothing: with its ledger back, the store reads as before.
        std::fs::write(&file, kept).unwrap();
        let db = RedbStore::open(&path).unwrap();
        db.verify().unwrap();
        assert_eq!(db.recover().unwrap().blocks.len(), 1);
    }

    #[test]
    fn a_reference_past_the_ledger_files_end_is_damage_not_a_panic() {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("pbft.redb");
        store_with_marked_block(&path, b"marker");
        let db = RedbStore::open(&path).unwrap();
        let end = std::fs::metadata(ledger::path_for(&path)).unwrap().len();
        // A checksum-valid reference, as a damaged or foreign database could hold.
        let (seq, digest) = stored_batches(&db)[0];
        let key = Key::Batch(seq, digest);
        for wild in [
            Extent {
                offset: end,
                len: 10,
            },
            Extent {
                offset: 0,
                len: u32::MAX,
            },
        ] {
            let value = frame_as(FRAME_VERSION_LEDGER, BATCHES.name, key, &wild.to_bytes());
            let e = load_batch(&db.reader.ledger, key, &value).unwrap_err();
            assert!(
                matches!(&e, StorageError::Corrupt(m) if m.contains("past its end")),
                "{e:?}"
            );
        }
    }

    #[test]
    fn a_truncated_file_fails_open_or_recover() {
        // Wherever the cut falls, the replica is told its data is damaged, not a bare I/O
        // error. (A cut that makes redb read past the end of a larger file, reported as
        // corruption too, is what t10_cluster's damaged_database_refuses_to_start hits.)
        for cut in 1..32 {
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
                .set_len(len * cut / 32)
                .unwrap();
            let result = RedbStore::open(&path).and_then(|db| db.recover());
            let err = result.expect_err("a truncated file must not open");
            assert!(err.to_string().contains("pbft.redb"), "{err}");
            assert!(
                matches!(err, StorageError::Corrupt(_)),
                "cut at {cut}/32: {err}"
            );
        }
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
    fn the_reader_serves_journalled_blocks_and_certificates_before_redb_has_them() {
        let dir = TempDir::new().unwrap();
        let mut db = open(&dir);
        let reader = db.reader();
        let blocks = chain(6);
        let ops: Vec<_> = blocks[..4].iter().cloned().map(PersistOp::Block).collect();
        db.persist(&ops).unwrap();
        // A checkpoint hands the journal to redb; the blocks after it stay journalled.
        let cp = stable(4, &blocks[3].hash());
        db.persist(&[PersistOp::Checkpoint(cp.clone())]).unwrap();
        db.persist(&[
            PersistOp::Block(blocks[4].clone()),
            PersistOp::Block(blocks[5].clone()),
        ])
        .unwrap();
        assert!(
            !reader.overlay().blocks.is_empty(),
            "nothing left in the journal"
        );
        assert_eq!(reader.blocks_from(1, 100).unwrap(), blocks);
        assert_eq!(reader.blocks_from(3, 2).unwrap(), blocks[2..4].to_vec());
        assert_eq!(reader.blocks_from(5, 9).unwrap(), blocks[4..].to_vec());
        assert_eq!(reader.height().unwrap(), 6);
        assert_eq!(reader.checkpoints().unwrap(), vec![cp.cert.clone()]);
        assert_eq!(reader.checkpoint(4).unwrap(), Some(cp.cert));
        db.flush_journal().unwrap();
        assert!(reader.overlay().blocks.is_empty() && reader.overlay().certs.is_empty());
        assert_eq!(reader.blocks_from(1, 100).unwrap(), blocks);
    }

    /// A crash after any call: what the journal holds and redb does not is replayed, and
    /// nothing the calls wrote is lost or resurrected.
    #[test]
    fn a_restart_after_any_call_recovers_exactly_what_was_persisted() {
        let base = base_seed(0x10a7);
        for seed in base..base + 4 {
            let script = random_script(seed, 30);
            for stop in [1, 5, 12, 21, 30] {
                let dir = TempDir::new().unwrap();
                let mut db = open(&dir);
                let mut mem = MemStore::new();
                for ops in &script[..stop] {
                    mem.persist(ops).unwrap();
                    db.persist(ops).unwrap();
                }
                // Dropping the store applies what was handed over and leaves the rest in
                // the journal, as a crash would.
                drop(db);
                let context = format!("PBFT_SEED={seed} stopped after call {stop}");
                assert_same_answers(&mem, &open(&dir), &context);
                // And again: the replayed entries are in redb now, not applied twice.
                assert_same_answers(&mem, &open(&dir), &format!("{context}, reopened"));
            }
        }
    }

    fn segment_files(dir: &TempDir) -> Vec<std::path::PathBuf> {
        journal::segments(&dir.path().join("pbft.redb"))
            .unwrap()
            .into_iter()
            .map(|(_, p)| p)
            .collect()
    }

    #[test]
    fn a_torn_last_journal_entry_is_dropped_and_the_entries_before_it_replayed() {
        let blocks = chain(3);
        for tear in [1usize, 7, 40] {
            let dir = TempDir::new().unwrap();
            let mut db = open(&dir);
            db.persist(&[PersistOp::Block(blocks[0].clone())]).unwrap();
            db.persist(&[PersistOp::Block(blocks[1].clone())]).unwrap();
            drop(db);
            let files = segment_files(&dir);
            let last = files.last().unwrap();
            let len = std::fs::metadata(last).unwrap().len();
            // The end marker and `tear` bytes of the last entry never reached the disk.
            std::fs::OpenOptions::new()
                .write(true)
                .open(last)
                .unwrap()
                .set_len(len - (journal::END_MARKER + tear) as u64)
                .unwrap();
            let db = open(&dir);
            assert_eq!(db.recover().unwrap().blocks, blocks[..1], "tear {tear}");
        }
        // Zeros after the last entry (a file extended before its data reached the disk)
        // are a torn entry too.
        let dir = TempDir::new().unwrap();
        let mut db = open(&dir);
        db.persist(&[PersistOp::Block(blocks[0].clone())]).unwrap();
        drop(db);
        let last = segment_files(&dir).pop().unwrap();
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&last)
            .unwrap();
        std::io::Write::write_all(&mut f, &[0; 4096]).unwrap();
        drop(f);
        let mut db = open(&dir);
        assert_eq!(db.recover().unwrap().blocks, blocks[..1]);
        // The store goes on after the dropped tail.
        db.persist(&[PersistOp::Block(blocks[1].clone())]).unwrap();
        drop(db);
        assert_eq!(open(&dir).recover().unwrap().blocks, blocks[..2]);
    }

    #[test]
    fn a_flipped_byte_in_a_journal_entry_before_the_last_is_corrupt() {
        let dir = TempDir::new().unwrap();
        let mut db = open(&dir);
        let blocks = chain(2);
        db.persist(&[PersistOp::Block(blocks[0].clone())]).unwrap();
        db.persist(&[PersistOp::Block(blocks[1].clone())]).unwrap();
        drop(db);
        // Only the newest segment holds entries; its first entry is not its last.
        let last = segment_files(&dir).pop().unwrap();
        let mut bytes = std::fs::read(&last).unwrap();
        bytes[30] ^= 0x01;
        std::fs::write(&last, &bytes).unwrap();
        let m = corrupt_message(RedbStore::open(&dir.path().join("pbft.redb")).map(|_| ()));
        assert!(m.contains("journal") && m.contains("offset 16"), "{m}");
    }

    #[test]
    fn entries_redb_already_holds_are_not_applied_again() {
        // A crash between redb's commit and the segment's deletion leaves the segment:
        // replaying it again would bring back pre-prepares the prune in redb removed.
        let dir = TempDir::new().unwrap();
        let mut db = open(&dir);
        let blocks = chain(4);
        let mut mem = MemStore::new();
        let first = vec![
            PersistOp::Accepted(pre_prepare(0, 2)),
            PersistOp::Block(blocks[0].clone()),
            PersistOp::Block(blocks[1].clone()),
        ];
        db.persist(&first).unwrap();
        mem.persist(&first).unwrap();
        let kept: Vec<(std::path::PathBuf, Vec<u8>)> = segment_files(&dir)
            .into_iter()
            .map(|p| {
                let b = std::fs::read(&p).unwrap();
                (p, b)
            })
            .collect();
        let second = vec![
            PersistOp::Checkpoint(stable(2, &blocks[1].hash())),
            PersistOp::Prune { upto: 2 },
        ];
        db.persist(&second).unwrap();
        mem.persist(&second).unwrap();
        db.flush_journal().unwrap();
        db.flush_snapshots();
        drop(db);
        for (p, b) in kept {
            std::fs::write(p, b).unwrap();
        }
        let db = open(&dir);
        assert!(db.recover().unwrap().accepted.is_empty());
        assert_same_answers(&mem, &db, "after replaying a stale segment");
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

    /// The keys of `batches`, as (seq, digest).
    fn stored_batches(db: &RedbStore) -> Vec<(Seq, Digest)> {
        db.flush_journal().unwrap();
        let txn = db.reader.db.begin_read().unwrap();
        let t = txn.open_table(BATCHES.def).unwrap();
        t.iter()
            .unwrap()
            .map(|e| parse_batch_key(e.unwrap().0.value()).unwrap())
            .collect()
    }

    #[test]
    fn a_batch_is_written_once_for_its_pre_prepare_certificate_and_block() {
        let dir = TempDir::new().unwrap();
        let mut db = open(&dir);
        let b = chain(1).remove(0);
        let pp = pre_prepare(0, 1);
        assert_eq!(pp.body.digest, b.batch.digest());
        db.persist(&[PersistOp::Accepted(pp.clone())]).unwrap();
        db.persist(&[
            PersistOp::Prepared(proof(0, 1)),
            PersistOp::Block(b.clone()),
        ])
        .unwrap();
        assert_eq!(stored_batches(&db), vec![(1, b.batch.digest())]);
        // Each record is stored with an empty batch and the batch's digest.
        let digest = Some(b.batch.digest());
        let (a, d) =
            decode_shallow::<Signed<PrePrepare>>("accepted", 1, &raw_seq(&db, ACCEPTED, 1))
                .unwrap();
        assert!(a.batch().is_empty() && d == digest);
        let (p, d) =
            decode_shallow::<PreparedProof>("prepared", 1, &raw_seq(&db, PREPARED, 1)).unwrap();
        assert!(p.batch().is_empty() && d == digest);
        let (k, d) = decode_shallow::<Block>("blocks", 1, &raw_seq(&db, BLOCKS, 1)).unwrap();
        assert!(k.batch().is_empty() && d == digest);
        // Pruning the log keeps the batch: the ledger still refers to it.
        db.persist(&[PersistOp::Prune { upto: 1 }]).unwrap();
        assert_eq!(stored_batches(&db), vec![(1, b.batch.digest())]);
        assert_eq!(db.blocks_from(1, 1).unwrap(), vec![b]);
        db.verify().unwrap();
    }

    #[test]
    fn a_batch_nothing_refers_to_any_more_is_dropped() {
        let dir = TempDir::new().unwrap();
        let mut db = open(&dir);
        let (odd, even) = (pre_prepare(1, 4), pre_prepare(2, 4));
        assert_ne!(odd.body.digest, even.body.digest);
        db.persist(&[PersistOp::Accepted(odd.clone())]).unwrap();
        db.persist(&[PersistOp::Prepared(proof(1, 4))]).unwrap();
        // A later view's pre-prepare replaces the accepted one; the certificate still
        // needs the first batch.
        db.persist(&[PersistOp::Accepted(even.clone())]).unwrap();
        let both = vec![(4, odd.body.digest), (4, even.body.digest)];
        let mut stored = stored_batches(&db);
        stored.sort();
        let mut expected = both.clone();
        expected.sort();
        assert_eq!(stored, expected);
        // The new view's certificate replaces the old one: the first batch is unused now.
        db.persist(&[PersistOp::Prepared(proof(2, 4))]).unwrap();
        assert_eq!(stored_batches(&db), vec![(4, even.body.digest)]);
        db.verify().unwrap();
        db.persist(&[PersistOp::Prune { upto: 4 }]).unwrap();
        assert_eq!(stored_batches(&db), vec![]);
        db.verify().unwrap();
    }

    #[test]
    fn a_missing_or_unused_batch_is_reported() {
        let dir = TempDir::new().unwrap();
        let db = store_with_history(&dir);
        db.verify().unwrap();
        let (seq, digest) = stored_batches(&db)[0];
        let key = Key::Batch(seq, digest).bytes();
        let txn = db.reader.db.begin_write().unwrap();
        let value = {
            let mut t = txn.open_table(BATCHES.def).unwrap();
            t.remove(key.as_slice()).unwrap().unwrap().value().to_vec()
        };
        txn.commit().unwrap();
        let msg = corrupt_message(db.verify());
        assert!(msg.contains("is missing"), "{msg}");
        // Put back under a sequence number nothing uses: now it is the one unreferenced.
        let txn = db.reader.db.begin_write().unwrap();
        {
            let mut t = txn.open_table(BATCHES.def).unwrap();
            let batch = load_batch(&db.reader.ledger, Key::Batch(seq, digest), &value).unwrap();
            t.insert(key.as_slice(), value.as_slice()).unwrap();
            let stray = Key::Batch(999, batch.digest());
            let v = frame(BATCHES.name, stray, &batch.to_bytes());
            t.insert(stray.bytes().as_slice(), v.as_slice()).unwrap();
        }
        txn.commit().unwrap();
        let msg = corrupt_message(db.verify());
        assert!(msg.contains("no record refers"), "{msg}");
    }

    #[test]
    fn blocks_whose_batches_redb_holds_still_read_beside_ledger_file_ones() {
        // Stores written before the ledger file kept each batch in `batches` itself.
        let dir = TempDir::new().unwrap();
        let mut db = open(&dir);
        let blocks = chain(4);
        let txn = db.reader.db.begin_write().unwrap();
        {
            let mut records = txn.open_table(BLOCKS.def).unwrap();
            let mut batches = txn.open_table(BATCHES.def).unwrap();
            for b in &blocks[..2] {
                let key = Key::Batch(b.height, b.batch_digest());
                let v = frame(BATCHES.name, key, &b.batch.to_bytes());
                batches
                    .insert(key.bytes().as_slice(), v.as_slice())
                    .unwrap();
                let mut payload = b.batch_digest().0.to_vec();
                payload.extend_from_slice(&b.without_batch().to_bytes());
                let v = frame_as(
                    FRAME_VERSION_SPLIT,
                    BLOCKS.name,
                    Key::Seq(b.height),
                    &payload,
                );
                records.insert(b.height, v.as_slice()).unwrap();
            }
        }
        txn.commit().unwrap();
        let ops: Vec<_> = blocks[2..].iter().cloned().map(PersistOp::Block).collect();
        db.persist(&ops).unwrap();
        db.flush_journal().unwrap();
        db.verify().unwrap();
        assert_eq!(db.recover().unwrap().blocks, blocks);
        assert_eq!(db.blocks_from(1, 10).unwrap(), blocks);
    }

    #[test]
    fn records_stored_with_their_batch_inline_still_read_and_prune() {
        let dir = TempDir::new().unwrap();
        let mut db = open(&dir);
        let pp = pre_prepare(0, 3);
        // As a store from before batches were kept apart wrote it.
        let txn = db.reader.db.begin_write().unwrap();
        {
            let mut t = txn.open_table(ACCEPTED.def).unwrap();
            let v = frame(ACCEPTED.name, Key::Seq(3), &pp.to_bytes());
            t.insert(3, v.as_slice()).unwrap();
        }
        txn.commit().unwrap();
        assert_eq!(db.recover().unwrap().accepted, vec![pp.clone()]);
        db.persist(&[PersistOp::Prepared(proof(0, 3))]).unwrap();
        assert_eq!(db.recover().unwrap().prepared, vec![proof(0, 3)]);
        db.verify().unwrap();
        db.persist(&[PersistOp::Prune { upto: 3 }]).unwrap();
        assert_eq!(stored_batches(&db), vec![]);
        let r = db.recover().unwrap();
        assert!(r.accepted.is_empty() && r.prepared.is_empty());
    }

    /// The stable checkpoint at `seq` of `blocks` as a replica makes it: the state its
    /// batches lead to from genesis, certified by the digest of that state and the head.
    fn real_stable(blocks: &[Block], seq: Seq) -> StableCheckpoint {
        real_stable_with(blocks, seq, pbft_core::StateDigest::Buckets)
    }

    /// [`real_stable`] certified under `scheme`.
    fn real_stable_with(
        blocks: &[Block],
        seq: Seq,
        scheme: pbft_core::StateDigest,
    ) -> StableCheckpoint {
        let mut kv = pbft_core::KvStore::default();
        for b in &blocks[..seq as usize] {
            kv.execute(&b.batch);
        }
        let block_hash = blocks[seq as usize - 1].hash();
        StableCheckpoint {
            cert: CheckpointCert {
                seq,
                digest: pbft_core::checkpoint_digest(&kv.digest(scheme), &block_hash),
                signatures: Vec::new(),
            },
            snapshot: Arc::new(kv.snapshot()),
            block_hash,
        }
    }

    /// A store holding the blocks `1..=n` of `chain(n)`, and those blocks.
    fn store_with_chain(dir: &TempDir, n: Seq) -> (RedbStore, Vec<Block>) {
        let mut db = open(dir);
        let blocks = chain(n);
        let ops: Vec<_> = blocks.iter().cloned().map(PersistOp::Block).collect();
        db.persist(&ops).unwrap();
        (db, blocks)
    }

    #[test]
    fn a_streamed_snapshot_file_is_the_framed_encoding() {
        let dir = TempDir::new().unwrap();
        let (db, blocks) = store_with_chain(&dir, 12);
        let file = snapshot::path_for(db.path());
        for seq in [1, 12] {
            let stable = real_stable(&blocks, seq);
            snapshot::write(&file, &stable).unwrap();
            // The same bytes the whole-value framing gives, so files written before
            // streaming and after it read alike.
            let framed = frame("snapshot", Key::Name("snapshot"), &stable.to_bytes());
            assert_eq!(std::fs::read(&file).unwrap(), framed);
            assert_eq!(snapshot::read(&file).unwrap(), Some(stable));
        }
        // A damaged byte anywhere fails the checksum.
        let mut bytes = std::fs::read(&file).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&file, &bytes).unwrap();
        assert!(matches!(
            snapshot::read(&file),
            Err(StorageError::Corrupt(_))
        ));
    }

    #[test]
    fn a_checkpoint_whose_snapshot_is_missing_or_older_is_rebuilt_from_blocks() {
        let dir = TempDir::new().unwrap();
        let (mut db, blocks) = store_with_chain(&dir, 12);
        let (at5, at10) = (real_stable(&blocks, 5), real_stable(&blocks, 10));
        db.persist(&[PersistOp::Checkpoint(at5.clone())]).unwrap();
        db.persist(&[PersistOp::Checkpoint(at10.clone())]).unwrap();
        db.flush_snapshots();
        let file = snapshot::path_for(db.path());
        let expect = |db: &RedbStore| {
            let r = db.recover().unwrap();
            assert_eq!(r.checkpoint, Some(at10.clone()));
            assert_eq!(r.blocks, blocks[10..].to_vec());
        };
        expect(&db);
        // A crash before the writer got to it: rebuilt from genesis.
        std::fs::remove_file(&file).unwrap();
        expect(&db);
        // Or only an older snapshot written: rebuilt from there.
        snapshot::write(&file, &at5).unwrap();
        expect(&db);
        // A store from before snapshot files keeps its snapshot in a table.
        std::fs::remove_file(&file).unwrap();
        let txn = db.reader.db.begin_write().unwrap();
        {
            let mut t = txn.open_table(SNAPSHOT.def).unwrap();
            let v = frame(SNAPSHOT.name, Key::Name(LATEST_KEY), &at10.to_bytes());
            t.insert(LATEST_KEY, v.as_slice()).unwrap();
        }
        txn.commit().unwrap();
        expect(&db);
        db.verify().unwrap();
    }

    /// The writer writes the first snapshot at once, holds later ones back for the
    /// interval (keeping only the newest), and writes what it holds when flushed or dropped.
    #[test]
    fn snapshots_are_written_at_most_once_per_interval_and_flushed_on_demand() {
        let dir = TempDir::new().unwrap();
        let file = dir.path().join("s.snapshot");
        let written = || snapshot::read(&file).unwrap().map(|s| s.cert.seq);
        let head = Digest([3; 32]);
        let writer = snapshot::SnapshotWriter::start(file.clone()).unwrap();
        writer.submit(stable(5, &head));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while written() != Some(5) {
            assert!(
                std::time::Instant::now() < deadline,
                "first snapshot never written"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        writer.submit(stable(10, &head));
        writer.submit(stable(15, &head));
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert_eq!(written(), Some(5), "a second snapshot within the interval");
        writer.flush();
        assert_eq!(written(), Some(15), "flush writes the newest held back");
        writer.submit(stable(20, &head));
        drop(writer);
        assert_eq!(
            written(),
            Some(20),
            "dropping the writer writes what it holds"
        );
    }

    /// A store whose cluster certifies checkpoints with the older linear digest rebuilds its
    /// state as well; whether that is the configured scheme is the core's check.
    #[test]
    fn a_checkpoint_certified_with_the_linear_digest_is_rebuilt_too() {
        let dir = TempDir::new().unwrap();
        let (mut db, blocks) = store_with_chain(&dir, 12);
        let at10 = real_stable_with(&blocks, 10, pbft_core::StateDigest::Linear);
        db.persist(&[PersistOp::Checkpoint(at10.clone())]).unwrap();
        db.flush_snapshots();
        std::fs::remove_file(snapshot::path_for(db.path())).unwrap();
        let r = db.recover().unwrap();
        assert_eq!(r.checkpoint, Some(at10));
    }

    #[test]
    fn a_rebuilt_state_that_does_not_match_its_certificate_is_refused() {
        let dir = TempDir::new().unwrap();
        let (mut db, blocks) = store_with_chain(&dir, 12);
        db.persist(&[PersistOp::Checkpoint(real_stable(&blocks, 5))])
            .unwrap();
        db.flush_snapshots();
        let mut forged = real_stable(&blocks, 10);
        forged.cert.digest = Digest([9; 32]);
        db.persist(&[PersistOp::Checkpoint(forged)]).unwrap();
        db.flush_snapshots();
        snapshot::write(&snapshot::path_for(db.path()), &real_stable(&blocks, 5)).unwrap();
        let m = corrupt_message(db.recover());
        assert!(m.contains("does not match the certificate"), "{m}");
        // A block missing on the way is named too.
        let txn = db.reader.db.begin_write().unwrap();
        txn.open_table(BLOCKS.def).unwrap().remove(7).unwrap();
        txn.commit().unwrap();
        let m = corrupt_message(db.recover());
        assert!(m.contains("block 7"), "{m}");
    }
}
