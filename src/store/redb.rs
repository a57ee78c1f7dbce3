//! The embedded durable store (the default): one redb file.
//!
//! Every mutation is committed with `Durability::Immediate` before its caller
//! hears OK. Mutations go to a single writer thread through a bounded queue;
//! the writer drains whatever has queued up (group commit), applies each
//! mutation's conditional check and write in one write transaction, commits it
//! with one fsync, and only then answers each caller with its own result and
//! publishes the changes on the feed. So throughput grows with concurrency
//! while each acknowledgement still means "on disk".
//!
//! Reads open their own read transactions and never wait for the writer.
//! A Get is answered from a bounded cache of encoded records first
//! (`store::cache`): this process is the file's only writer (the file is
//! locked), and the writer updates the cache after each commit, before it
//! acknowledges, so the cache is never behind an acknowledged write; a
//! reader that missed fills it only if no write or eviction came between.
//!
//! A failed commit (disk full, I/O error) fails every mutation of its batch
//! with UNAVAILABLE and puts the writer in a failed state: each later batch
//! first proves the file healthy with a durable probe commit, and is refused
//! while that fails, so nothing is acknowledged on top of a failed commit.

#[cfg(any(test, feature = "failpoints"))]
use std::sync::atomic::{AtomicBool, Ordering};
use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use prost::Message;
use redb::{
    Database, DatabaseError, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition, TableHandle,
};
use tokio::sync::{broadcast, mpsc, oneshot};

use super::{
    cache::{RecordCache, DEFAULT_CACHE_BYTES},
    codec::{deadline_of, decode},
    scan, scan_start, Cause, Change, CommitObserver, Counts, Deadline, ListQuery, Revision, Scan,
    Store, StoreError, StoredRecord,
};
use crate::clock::Clock;

/// name → the encoded record (`codec`).
const OPERATIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("operations");
/// request id → name.
const REQUEST_IDS: TableDefinition<&str, &str> = TableDefinition::new("request_ids");
/// Store-level facts: the format marker, the health probe.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const FORMAT_KEY: &str = "format";
/// Version 2 keeps the counts by state; older opsd binaries refuse it, so
/// none can change the records without updating them.
const FORMAT: &[u8] = b"opsd-store-2";
/// The first version, upgraded in place at open.
const FORMAT_1: &[u8] = b"opsd-store-1";
/// The operations by state: running and done, two little-endian u64s,
/// written with every commit that changes them.
const COUNTS_KEY: &str = "counts";
/// The highest revision handed out (a little-endian u64), written with
/// every commit that changes records: every write takes the next one, so
/// a name deleted and created again never reuses a revision of its
/// earlier life. A file without it (written before it was kept) gets it
/// from a scan of the records at open.
const REVISION_KEY: &str = "revision";

/// Mutations queued for the writer before callers wait for room.
const QUEUE: usize = 4096;
/// Mutations committed together at most.
const MAX_BATCH: usize = 1024;
/// Changes a slow subscriber may fall behind before it is told it lagged.
const FEED_CAPACITY: usize = 4096;

/// The redb store. See the module docs.
pub struct RedbStore {
    db: Arc<Database>,
    path: PathBuf,
    /// Generated on first open and kept in the file.
    page_token_key: [u8; 32],
    queue: mpsc::Sender<Mutation>,
    feed: broadcast::Sender<Change>,
    /// The committed counts by state; the writer replaces them after each
    /// commit (a std mutex: one copy under it, nothing awaits).
    counts: Arc<Mutex<Counts>>,
    /// Records Gets are answered from; the writer keeps it coherent.
    cache: Arc<RecordCache>,
    /// Test hook: fail the next commits as a full disk would.
    #[cfg(any(test, feature = "failpoints"))]
    failpoints: Arc<Failpoints>,
}

/// Switches for tests: simulated commit failures, and the negative control
/// of the crash test (acknowledging non-durable commits).
#[cfg(any(test, feature = "failpoints"))]
#[derive(Default)]
pub struct Failpoints {
    pub fail_commits: std::sync::atomic::AtomicUsize,
    pub non_durable: AtomicBool,
}

struct Mutation {
    op: Op,
    reply: oneshot::Sender<Result<Option<Revision>, StoreError>>,
}

enum Op {
    Insert(StoredRecord),
    Update(StoredRecord, Revision, Cause),
    Delete(String, Revision, Cause),
}

/// Why the store file cannot be used, in the words a person needs: the
/// path and what is wrong with it (missing directory, permissions, a
/// directory where the file should be, a read-only file system).
fn file_error(path: &Path, err: &std::io::Error) -> StoreError {
    use std::io::ErrorKind;
    let shown = path.display();
    let what = match err.kind() {
        ErrorKind::NotFound => "its directory does not exist".to_owned(),
        ErrorKind::PermissionDenied => {
            "permission denied: opsd must be able to read and write it".to_owned()
        }
        ErrorKind::IsADirectory => "it is a directory, not a file".to_owned(),
        ErrorKind::ReadOnlyFilesystem => "it is on a read-only file system".to_owned(),
        _ => err.to_string(),
    };
    StoreError::Internal(format!("cannot open the store file {shown}: {what}"))
}

/// Whether an I/O error says the file cannot be reached or written (as
/// opposed to its content being wrong).
fn is_access(err: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        err.kind(),
        ErrorKind::NotFound
            | ErrorKind::PermissionDenied
            | ErrorKind::IsADirectory
            | ErrorKind::NotADirectory
            | ErrorKind::ReadOnlyFilesystem
    )
}

impl RedbStore {
    /// Opens (or creates) the store at `path`, creating its directory.
    /// A file that another process holds, or that is not an opsd store,
    /// is refused with a message that says so.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with(path, Arc::new(()), Clock::System)
    }

    /// [`RedbStore::open`], telling `observer` of every group commit and
    /// stamping changes with `clock` (the registry's).
    pub fn open_with(
        path: &Path,
        observer: Arc<dyn CommitObserver>,
        clock: Clock,
    ) -> Result<Self, StoreError> {
        let shown = path.display();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Internal(format!(
                    "cannot create the directory {}: {e}",
                    dir.display()
                ))
            })?;
        }
        // The file itself first, so a missing directory, a permission or a
        // read-only file system is reported as such, never as corruption.
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| file_error(path, &e))?;
        let db = Database::builder().create(path).map_err(|e| match e {
            DatabaseError::DatabaseAlreadyOpen => StoreError::Internal(format!(
                "{shown} is in use by another process (is another opsd running on it?)"
            )),
            DatabaseError::Storage(redb::StorageError::Io(err)) if is_access(&err) => {
                file_error(path, &err)
            }
            DatabaseError::Storage(err) => StoreError::Internal(format!(
                "{shown} is not a readable opsd store (corrupt, or not a redb file): {err}"
            )),
            other => StoreError::Internal(format!("cannot open {shown}: {other}")),
        })?;
        check_format(&db, path)?;
        let page_token_key = page_token_key(&db)?;
        let counts = Arc::new(Mutex::new(stored_counts(&db)?));
        let revision = stored_revision(&db)?;
        let db = Arc::new(db);
        let cache = Arc::new(RecordCache::new(DEFAULT_CACHE_BYTES));
        let (queue, rx) = mpsc::channel(QUEUE);
        let (feed, _) = broadcast::channel(FEED_CAPACITY);
        #[cfg(any(test, feature = "failpoints"))]
        let failpoints = Arc::new(Failpoints::default());
        #[cfg(any(test, feature = "failpoints"))]
        if std::env::var_os("OPSD_FAILPOINT_NON_DURABLE_ACK").is_some() {
            tracing::warn!(
                "failpoint: acknowledging NON-DURABLE commits (crash-test negative control)"
            );
            failpoints.non_durable.store(true, Ordering::Relaxed);
        }
        let writer = Writer {
            db: db.clone(),
            feed: feed.clone(),
            counts: counts.clone(),
            cache: cache.clone(),
            observer,
            clock,
            failed: false,
            probes: 0,
            revision,
            #[cfg(any(test, feature = "failpoints"))]
            failpoints: failpoints.clone(),
        };
        std::thread::Builder::new()
            .name("opsd-redb-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| StoreError::Internal(format!("cannot start the writer thread: {e}")))?;
        Ok(Self {
            db,
            path: path.to_owned(),
            page_token_key,
            queue,
            feed,
            counts,
            cache,
            #[cfg(any(test, feature = "failpoints"))]
            failpoints,
        })
    }

    /// The store's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Test hooks (see [`Failpoints`]).
    #[cfg(any(test, feature = "failpoints"))]
    pub fn failpoints(&self) -> &Failpoints {
        &self.failpoints
    }

    async fn submit(&self, op: Op) -> Result<Option<Revision>, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Mutation { op, reply })
            .await
            .map_err(|_| StoreError::Unavailable("the store writer has stopped".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Unavailable("the store writer has stopped".into()))?
    }

    fn read<T>(
        &self,
        f: impl FnOnce(&redb::ReadTransaction) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let txn = self.db.begin_read().map_err(internal)?;
        f(&txn)
    }
}

/// Refuses files that are redb databases of something else, and marks new ones.
fn check_format(db: &Database, path: &Path) -> Result<(), StoreError> {
    let foreign = || {
        StoreError::Internal(format!(
            "{} is a redb file but not an opsd store; refusing to touch it",
            path.display()
        ))
    };
    let read = db.begin_read().map_err(internal)?;
    let tables: Vec<String> = read
        .list_tables()
        .map_err(internal)?
        .map(|t| t.name().to_owned())
        .collect();
    let ours = [OPERATIONS.name(), REQUEST_IDS.name(), META.name()];
    if tables.iter().any(|t| !ours.contains(&t.as_str())) {
        return Err(foreign());
    }
    let marker = match read.open_table(META) {
        Ok(meta) => meta
            .get(FORMAT_KEY)
            .map_err(internal)?
            .map(|v| v.value().to_vec()),
        Err(redb::TableError::TableDoesNotExist(_)) => None,
        Err(e) => return Err(internal(e)),
    };
    drop(read);
    match marker {
        Some(marker) if marker == FORMAT => Ok(()),
        Some(marker) if marker == FORMAT_1 => {
            // The counts are added by `stored_counts`, which finds none.
            tracing::info!(path = %path.display(), "upgrading the store to format 2");
            let mut txn = db.begin_write().map_err(internal)?;
            txn.set_durability(Durability::Immediate)
                .map_err(internal)?;
            {
                let mut meta = txn.open_table(META).map_err(internal)?;
                meta.remove(COUNTS_KEY).map_err(internal)?;
                meta.insert(FORMAT_KEY, FORMAT).map_err(internal)?;
            }
            txn.commit().map_err(internal)
        }
        Some(_) => Err(foreign()),
        None if !tables.is_empty() => Err(foreign()),
        None => {
            let mut txn = db.begin_write().map_err(internal)?;
            txn.set_durability(Durability::Immediate)
                .map_err(internal)?;
            txn.open_table(OPERATIONS).map_err(internal)?;
            txn.open_table(REQUEST_IDS).map_err(internal)?;
            txn.open_table(META)
                .map_err(internal)?
                .insert(FORMAT_KEY, FORMAT)
                .map_err(internal)?;
            txn.commit().map_err(internal)
        }
    }
}

/// The page token key kept in the file, created on first use.
fn page_token_key(db: &Database) -> Result<[u8; 32], StoreError> {
    const KEY: &str = "page-token-key";
    let stored = db
        .begin_read()
        .map_err(internal)?
        .open_table(META)
        .map_err(internal)?
        .get(KEY)
        .map_err(internal)?
        .map(|v| v.value().to_vec());
    if let Some(bytes) = stored {
        return bytes
            .try_into()
            .map_err(|_| StoreError::Internal("the stored page token key is corrupt".into()));
    }
    let mut key = [0u8; 32];
    getrandom::fill(&mut key).map_err(|e| internal(format!("no OS randomness: {e}")))?;
    let mut txn = db.begin_write().map_err(internal)?;
    txn.set_durability(Durability::Immediate)
        .map_err(internal)?;
    txn.open_table(META)
        .map_err(internal)?
        .insert(KEY, key.as_slice())
        .map_err(internal)?;
    txn.commit().map_err(internal)?;
    Ok(key)
}

/// The counts kept in the file (written in the same transactions as the
/// records, so they always agree with them). Missing (a file upgraded from
/// format 1) or disagreeing with the number of records, they are counted
/// again by a scan and stored.
fn stored_counts(db: &Database) -> Result<Counts, StoreError> {
    let read = db.begin_read().map_err(internal)?;
    let stored = read
        .open_table(META)
        .map_err(internal)?
        .get(COUNTS_KEY)
        .map_err(internal)?
        .and_then(|v| decode_counts(v.value()));
    let ops = read.open_table(OPERATIONS).map_err(internal)?;
    let records = ops.len().map_err(internal)?;
    if let Some(counts) = stored.filter(|c| c.total() == records) {
        return Ok(counts);
    }
    if stored.is_some() {
        tracing::warn!(
            records,
            ?stored,
            "stored operation counts disagree with the records; recounting"
        );
    }
    let mut counts = Counts::default();
    for entry in ops.iter().map_err(internal)? {
        let (_, value) = entry.map_err(internal)?;
        counts.add_state(deadline_of(value.value())?.1, 1);
    }
    drop(ops);
    drop(read);
    let mut txn = db.begin_write().map_err(internal)?;
    txn.set_durability(Durability::Immediate)
        .map_err(internal)?;
    txn.open_table(META)
        .map_err(internal)?
        .insert(COUNTS_KEY, encode_counts(counts).as_slice())
        .map_err(internal)?;
    txn.commit().map_err(internal)?;
    Ok(counts)
}

/// The highest revision handed out (see [`REVISION_KEY`]).
fn stored_revision(db: &Database) -> Result<Revision, StoreError> {
    let read = db.begin_read().map_err(internal)?;
    let stored = read
        .open_table(META)
        .map_err(internal)?
        .get(REVISION_KEY)
        .map_err(internal)?
        .and_then(|v| v.value().try_into().ok().map(u64::from_le_bytes));
    if let Some(revision) = stored {
        return Ok(revision);
    }
    let mut highest = 0;
    let ops = read.open_table(OPERATIONS).map_err(internal)?;
    for entry in ops.iter().map_err(internal)? {
        let (_, value) = entry.map_err(internal)?;
        highest = highest.max(decode(value.value())?.revision);
    }
    drop(ops);
    drop(read);
    let mut txn = db.begin_write().map_err(internal)?;
    txn.set_durability(Durability::Immediate)
        .map_err(internal)?;
    txn.open_table(META)
        .map_err(internal)?
        .insert(REVISION_KEY, highest.to_le_bytes().as_slice())
        .map_err(internal)?;
    txn.commit().map_err(internal)?;
    Ok(highest)
}

fn encode_counts(counts: Counts) -> [u8; 16] {
    let mut bytes = [0; 16];
    bytes[..8].copy_from_slice(&counts.running.to_le_bytes());
    bytes[8..].copy_from_slice(&counts.done.to_le_bytes());
    bytes
}

fn decode_counts(bytes: &[u8]) -> Option<Counts> {
    let running = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
    let done = u64::from_le_bytes(bytes.get(8..16)?.try_into().ok()?);
    Some(Counts { running, done })
}

fn internal(e: impl std::fmt::Display) -> StoreError {
    StoreError::Internal(e.to_string())
}

/// A committed record for the cache: its name and new encoding, or `None`
/// for a deletion.
type Cached = (Arc<str>, Option<Arc<[u8]>>);

/// The single writer: drains the queue into group commits.
struct Writer {
    db: Arc<Database>,
    feed: broadcast::Sender<Change>,
    counts: Arc<Mutex<Counts>>,
    /// Updated after each commit, before the callers hear of it.
    cache: Arc<RecordCache>,
    observer: Arc<dyn CommitObserver>,
    /// Stamps each change with its commit time.
    clock: Clock,
    /// A commit failed; the next batch must first prove the file healthy.
    failed: bool,
    /// Health probes written by this writer; the value only makes each
    /// probe a write.
    probes: u64,
    /// The highest revision handed out (see [`REVISION_KEY`]); it never
    /// goes back, not even past a failed commit.
    revision: Revision,
    #[cfg(any(test, feature = "failpoints"))]
    failpoints: Arc<Failpoints>,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Mutation>) {
        while let Some(first) = rx.blocking_recv() {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
            self.commit_batch(batch);
        }
    }

    fn durability(&self) -> Durability {
        #[cfg(any(test, feature = "failpoints"))]
        if self.failpoints.non_durable.load(Ordering::Relaxed) {
            return Durability::None;
        }
        Durability::Immediate
    }

    /// A simulated commit failure, for tests.
    fn injected_failure(&self) -> bool {
        #[cfg(any(test, feature = "failpoints"))]
        {
            let fail = &self.failpoints.fail_commits;
            if fail.load(Ordering::Relaxed) > 0 {
                fail.fetch_sub(1, Ordering::Relaxed);
                return true;
            }
        }
        false
    }

    fn commit_batch(&mut self, batch: Vec<Mutation>) {
        if self.failed {
            // The failed commit may have reached the disk or not: the counts
            // are read back from the file, which agrees with its records.
            match self.probe().and_then(|()| stored_counts(&self.db)) {
                Ok(counts) => {
                    tracing::warn!("the store is healthy again; accepting writes");
                    *self.counts.lock().unwrap_or_else(|p| p.into_inner()) = counts;
                    self.failed = false;
                }
                Err(err) => {
                    for mutation in batch {
                        let _ = mutation.reply.send(Err(StoreError::Unavailable(format!(
                            "the store is failing: {err}"
                        ))));
                    }
                    return;
                }
            }
        }
        let started = std::time::Instant::now();
        let now = self.clock.now();
        let size = batch.len();
        let mut results = Vec::with_capacity(batch.len());
        let mut changes = Vec::new();
        // What the cache learns once the commit succeeded.
        let mut cached: Vec<Cached> = Vec::new();
        let mut counts = *self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let mut revision = self.revision;
        let outcome = (|| -> Result<(), StoreError> {
            let mut txn = self.db.begin_write().map_err(internal)?;
            txn.set_durability(self.durability()).map_err(internal)?;
            {
                let mut ops = txn.open_table(OPERATIONS).map_err(internal)?;
                let mut ids = txn.open_table(REQUEST_IDS).map_err(internal)?;
                for mutation in &batch {
                    let result = match apply(&mut ops, &mut ids, &mutation.op, &mut revision)? {
                        Ok(written) => {
                            if let Some(before) = &written.before {
                                counts.add(before, -1);
                            }
                            if let Some(after) = &written.after {
                                counts.add(after, 1);
                            }
                            let change = change_of(&mutation.op, &written, now);
                            cached.push((change.name.clone(), written.bytes.map(Arc::from)));
                            changes.push(change);
                            Ok(written.after.map(|after| after.revision))
                        }
                        Err(refused) => Err(refused),
                    };
                    results.push(result);
                }
                if !changes.is_empty() {
                    let mut meta = txn.open_table(META).map_err(internal)?;
                    meta.insert(COUNTS_KEY, encode_counts(counts).as_slice())
                        .map_err(internal)?;
                    meta.insert(REVISION_KEY, revision.to_le_bytes().as_slice())
                        .map_err(internal)?;
                }
            }
            if self.injected_failure() {
                return Err(StoreError::Unavailable("injected commit failure".into()));
            }
            txn.commit()
                .map_err(|e| StoreError::Unavailable(e.to_string()))
        })();
        // A failed commit may have reached the file: its revisions are
        // never handed out again either.
        self.revision = revision;
        self.observer
            .committed(size, started.elapsed(), outcome.is_ok());
        match outcome {
            Ok(()) => {
                *self.counts.lock().unwrap_or_else(|p| p.into_inner()) = counts;
                for (name, bytes) in cached {
                    match bytes {
                        Some(bytes) => self.cache.put(name, bytes),
                        None => self.cache.remove(&name),
                    }
                }
                for (mutation, result) in batch.into_iter().zip(results) {
                    let _ = mutation.reply.send(result);
                }
                for change in changes {
                    let _ = self.feed.send(change);
                }
            }
            Err(err) => {
                tracing::error!(cause = %err, "store commit failed; refusing writes until it is healthy");
                self.failed = true;
                // The failed commit may have reached the file: the cache can
                // no longer vouch for any record.
                self.cache.clear();
                for mutation in batch {
                    let _ = mutation
                        .reply
                        .send(Err(StoreError::Unavailable(err.to_string())));
                }
            }
        }
    }

    /// A durable write that proves the file takes commits again.
    fn probe(&mut self) -> Result<(), StoreError> {
        if self.injected_failure() {
            return Err(StoreError::Unavailable("injected commit failure".into()));
        }
        let mut txn = self.db.begin_write().map_err(internal)?;
        txn.set_durability(Durability::Immediate)
            .map_err(internal)?;
        {
            let mut meta = txn.open_table(META).map_err(internal)?;
            self.probes += 1;
            meta.insert("probe", self.probes.to_le_bytes().as_slice())
                .map_err(internal)?;
        }
        txn.commit()
            .map_err(|e| StoreError::Unavailable(e.to_string()))
    }
}

type Ops<'t> = redb::Table<'t, &'static str, &'static [u8]>;
type Ids<'t> = redb::Table<'t, &'static str, &'static str>;
#[cfg(test)]
type Meta<'t> = redb::Table<'t, &'static str, &'static [u8]>;

/// What one mutation wrote: the record before (`None` for an insert) and
/// after (`None` for a delete).
struct Written {
    before: Option<StoredRecord>,
    after: Option<StoredRecord>,
    /// The encoding of `after`, as written.
    bytes: Option<Vec<u8>>,
}

/// Applies one mutation inside the batch's transaction. The outer error is a
/// storage fault (the whole batch fails); the inner one is this mutation's
/// own answer (conflict, exists).
fn apply(
    ops: &mut Ops<'_>,
    ids: &mut Ids<'_>,
    op: &Op,
    revision: &mut Revision,
) -> Result<Result<Written, StoreError>, StoreError> {
    let load = |ops: &Ops<'_>, name: &str| -> Result<Option<StoredRecord>, StoreError> {
        ops.get(name)
            .map_err(internal)?
            .map(|v| decode(v.value()))
            .transpose()
    };
    match op {
        Op::Insert(record) => {
            if let Some(existing) = load(ops, &record.name)? {
                return Ok(Err(StoreError::Exists(Box::new(existing))));
            }
            if let Some(request_id) = &record.request_id {
                let holder = ids
                    .get(request_id.as_str())
                    .map_err(internal)?
                    .map(|v| v.value().to_owned());
                if let Some(holder) = holder {
                    if let Some(existing) = load(ops, &holder)? {
                        return Ok(Err(StoreError::Exists(Box::new(existing))));
                    }
                }
                ids.insert(request_id.as_str(), record.name.as_str())
                    .map_err(internal)?;
            }
            let mut record = record.clone();
            *revision += 1;
            record.revision = *revision;
            let bytes = record.encode_to_vec();
            ops.insert(record.name.as_str(), bytes.as_slice())
                .map_err(internal)?;
            Ok(Ok(Written {
                before: None,
                after: Some(record),
                bytes: Some(bytes),
            }))
        }
        Op::Update(record, expected, _) => {
            let Some(stored) = load(ops, &record.name)? else {
                return Ok(Err(StoreError::Conflict));
            };
            if stored.revision != *expected {
                return Ok(Err(StoreError::Conflict));
            }
            let mut record = record.clone();
            *revision = (*revision).max(*expected) + 1;
            record.revision = *revision;
            record.request_id = stored.request_id.clone();
            let bytes = record.encode_to_vec();
            ops.insert(record.name.as_str(), bytes.as_slice())
                .map_err(internal)?;
            Ok(Ok(Written {
                before: Some(stored),
                after: Some(record),
                bytes: Some(bytes),
            }))
        }
        Op::Delete(name, expected, _) => {
            let Some(stored) = load(ops, name)? else {
                return Ok(Err(StoreError::Conflict));
            };
            if stored.revision != *expected {
                return Ok(Err(StoreError::Conflict));
            }
            ops.remove(name.as_str()).map_err(internal)?;
            if let Some(request_id) = &stored.request_id {
                ids.remove(request_id.as_str()).map_err(internal)?;
            }
            Ok(Ok(Written {
                before: Some(stored),
                after: None,
                bytes: None,
            }))
        }
    }
}

fn change_of(op: &Op, written: &Written, time: std::time::SystemTime) -> Change {
    let (name, cause) = match op {
        Op::Insert(r) => (r.name.as_str(), Cause::Created),
        Op::Update(r, _, cause) => (r.name.as_str(), *cause),
        Op::Delete(name, _, cause) => (name.as_str(), *cause),
    };
    Change {
        name: Arc::from(name),
        cause,
        previous_deadline: written
            .before
            .as_ref()
            .and_then(StoredRecord::next_deadline),
        deadline: written.after.as_ref().and_then(StoredRecord::next_deadline),
        time,
    }
}

#[async_trait::async_trait]
impl Store for RedbStore {
    async fn get(&self, name: &str) -> Result<Option<StoredRecord>, StoreError> {
        if let Some(bytes) = self.cache.get(name) {
            return decode(&bytes).map(Some);
        }
        let ticket = self.cache.ticket();
        let bytes = self.read(|txn| {
            let ops = txn.open_table(OPERATIONS).map_err(internal)?;
            Ok(ops.get(name).map_err(internal)?.map(|v| v.value().to_vec()))
        })?;
        let Some(bytes) = bytes else {
            return Ok(None);
        };
        let record = decode(&bytes)?;
        self.cache.fill(ticket, name, Arc::from(bytes));
        Ok(Some(record))
    }

    async fn find_by_request_id(
        &self,
        request_id: &str,
    ) -> Result<Option<StoredRecord>, StoreError> {
        self.read(|txn| {
            let ids = txn.open_table(REQUEST_IDS).map_err(internal)?;
            let Some(name) = ids
                .get(request_id)
                .map_err(internal)?
                .map(|v| v.value().to_owned())
            else {
                return Ok(None);
            };
            let ops = txn.open_table(OPERATIONS).map_err(internal)?;
            ops.get(name.as_str())
                .map_err(internal)?
                .map(|v| decode(v.value()))
                .transpose()
        })
    }

    async fn list(&self, query: &ListQuery) -> Result<Scan, StoreError> {
        let db = self.db.clone();
        let query = query.clone();
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_read().map_err(internal)?;
            let ops = txn.open_table(OPERATIONS).map_err(internal)?;
            let start = scan_start(&query);
            let entries = ops.range(start.as_str()..).map_err(internal)?.map(|entry| {
                let (key, value) = entry.map_err(internal)?;
                Ok((key.value().to_owned(), value))
            });
            scan(&query, entries, |_, value| decode(value.value()))
        })
        .await
        .map_err(internal)?
    }

    async fn insert(&self, record: StoredRecord) -> Result<Revision, StoreError> {
        self.submit(Op::Insert(record))
            .await?
            .ok_or_else(|| internal("insert wrote nothing"))
    }

    async fn update(
        &self,
        record: StoredRecord,
        expected: Revision,
        cause: Cause,
    ) -> Result<Revision, StoreError> {
        self.submit(Op::Update(record, expected, cause))
            .await?
            .ok_or_else(|| internal("update wrote nothing"))
    }

    async fn delete(&self, name: &str, expected: Revision, cause: Cause) -> Result<(), StoreError> {
        self.submit(Op::Delete(name.to_owned(), expected, cause))
            .await
            .map(drop)
    }

    async fn deadlines(&self) -> Result<Vec<Deadline>, StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_read().map_err(internal)?;
            let ops = txn.open_table(OPERATIONS).map_err(internal)?;
            let mut out = Vec::new();
            for entry in ops.iter().map_err(internal)? {
                let (key, value) = entry.map_err(internal)?;
                if let (Some(at), done) = deadline_of(value.value())? {
                    out.push(Deadline {
                        at,
                        name: Arc::from(key.value()),
                        done,
                    });
                }
            }
            Ok(out)
        })
        .await
        .map_err(internal)?
    }

    fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.feed.subscribe()
    }

    async fn counts(&self) -> Result<Counts, StoreError> {
        Ok(*self.counts.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn page_token_key(&self) -> [u8; 32] {
        self.page_token_key
    }
}

// The store contract (writes, conflicts, pages, counts, the feed, reopening)
// is tested for every store at once in tests/store_suite.rs; these tests
// are the redb file's own: its format, its lock, its failures.
#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::store::codec::tests::{done, record};

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("opsd-redb-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir.join("store").join("opsd.redb")
    }

    /// Opens `path`, waiting for an earlier store's writer to let go.
    fn reopen(path: &Path) -> RedbStore {
        loop {
            match RedbStore::open(path) {
                Ok(store) => break store,
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    #[tokio::test]
    async fn counts_by_state_are_kept_in_the_file() {
        let path = temp("counts");
        {
            let store = RedbStore::open(&path).unwrap();
            let a = record("operations/a");
            let first = store.insert(a.clone()).await.unwrap();
            store.insert(record("operations/b")).await.unwrap();
            let c = store.insert(record("operations/c")).await.unwrap();
            store
                .update(done(a), first, Cause::Cancelled)
                .await
                .unwrap();
            store
                .delete("operations/c", c, Cause::Deleted)
                .await
                .unwrap();
            // A refused write changes nothing.
            assert!(store
                .delete("operations/b", 7, Cause::Deleted)
                .await
                .is_err());
            assert_eq!(
                store.counts().await.unwrap(),
                Counts {
                    running: 1,
                    done: 1
                }
            );
        }
        let store = reopen(&path);
        assert_eq!(
            store.counts().await.unwrap(),
            Counts {
                running: 1,
                done: 1
            }
        );
        drop(store);
        // A format-1 file (from before the counts were kept) is upgraded and
        // counted once at open; counts that disagree with the records are
        // counted again.
        let raw = |change: &dyn Fn(&mut Meta<'_>)| {
            let db = loop {
                match Database::builder().create(&path) {
                    Ok(db) => break db,
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            };
            let txn = db.begin_write().unwrap();
            change(&mut txn.open_table(META).unwrap());
            txn.commit().unwrap();
            db
        };
        let right = Counts {
            running: 1,
            done: 1,
        };
        drop(raw(&|meta| {
            meta.remove(COUNTS_KEY).unwrap();
            meta.insert(FORMAT_KEY, FORMAT_1).unwrap();
        }));
        let store = reopen(&path);
        assert_eq!(store.counts().await.unwrap(), right);
        drop(store);
        let db = raw(&|meta| {
            let wrong = Counts {
                running: 5,
                done: 0,
            };
            meta.insert(COUNTS_KEY, encode_counts(wrong).as_slice())
                .unwrap();
        });
        let marker = db
            .begin_read()
            .unwrap()
            .open_table(META)
            .unwrap()
            .get(FORMAT_KEY)
            .unwrap()
            .map(|v| v.value().to_vec());
        assert_eq!(marker.as_deref(), Some(FORMAT));
        drop(db);
        let store = reopen(&path);
        assert_eq!(store.counts().await.unwrap(), right);
    }

    #[tokio::test]
    async fn a_second_opener_and_foreign_files_are_refused() {
        let path = temp("locked");
        let _store = RedbStore::open(&path).unwrap();
        let err = RedbStore::open(&path).err().unwrap().to_string();
        assert!(err.contains("in use"), "{err}");

        let junk = temp("junk");
        std::fs::create_dir_all(junk.parent().unwrap()).unwrap();
        std::fs::write(&junk, b"this is not a database at all, just some text").unwrap();
        let err = RedbStore::open(&junk).err().unwrap().to_string();
        assert!(err.contains("not a readable opsd store"), "{err}");

        let foreign = temp("foreign");
        std::fs::create_dir_all(foreign.parent().unwrap()).unwrap();
        {
            let db = Database::create(&foreign).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(TableDefinition::<&str, &str>::new("someone_elses"))
                .unwrap();
            txn.commit().unwrap();
        }
        let err = RedbStore::open(&foreign).err().unwrap().to_string();
        assert!(err.contains("not an opsd store"), "{err}");
        // And the foreign file is left as it was.
        assert!(Database::create(&foreign).is_ok());
    }

    #[tokio::test]
    async fn files_that_cannot_be_opened_are_not_called_corrupt() {
        let dir = temp("a-directory");
        std::fs::create_dir_all(&dir).unwrap();
        let err = RedbStore::open(&dir).err().unwrap().to_string();
        assert!(err.contains("is a directory"), "{err}");
        assert!(!err.contains("corrupt"), "{err}");
        // A file where a directory of the path should be.
        let blocker = temp("blocker");
        std::fs::create_dir_all(blocker.parent().unwrap()).unwrap();
        std::fs::write(&blocker, b"").unwrap();
        let err = RedbStore::open(&blocker.join("opsd.redb"))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("cannot create the directory"), "{err}");
        assert!(!err.contains("corrupt"), "{err}");
    }

    #[tokio::test]
    async fn failed_commits_are_not_acknowledged_and_reads_keep_working() {
        let path = temp("failing");
        let store = RedbStore::open(&path).unwrap();
        let a = record("operations/a");
        let first = store.insert(a.clone()).await.unwrap();
        // The commit fails, then the health probe fails once more.
        store.failpoints().fail_commits.store(2, Ordering::Relaxed);
        let err = store.insert(record("operations/b")).await.unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
        assert!(matches!(
            store.update(a.clone(), first, Cause::Updated).await,
            Err(StoreError::Unavailable(_))
        ));
        // Reads work throughout, and nothing of the failed batches is there.
        assert!(store.get("operations/b").await.unwrap().is_none());
        assert_eq!(
            store.get("operations/a").await.unwrap().unwrap().revision,
            first
        );
        // Healthy again: writes are accepted.
        store.insert(record("operations/b")).await.unwrap();
        assert_eq!(store.counts().await.unwrap().total(), 2);
    }
}
