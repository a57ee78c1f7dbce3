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
//!
//! A failed commit (disk full, I/O error) fails every mutation of its batch
//! with UNAVAILABLE and puts the writer in a failed state: each later batch
//! first proves the file healthy with a durable probe commit, and is refused
//! while that fails, so nothing is acknowledged on top of a failed commit.

#[cfg(any(test, feature = "failpoints"))]
use std::sync::atomic::{AtomicBool, Ordering};
use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use prost::Message;
use redb::{
    Database, DatabaseError, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition, TableHandle,
};
use tokio::sync::{broadcast, mpsc, oneshot};

use super::{
    scan, scan_start, CancelPolicy, Cause, Change, ListQuery, Outcome, Record, Revision, Scan,
    Store, StoreError,
};
use crate::pb::google::rpc;

/// name → encoded [`StoredRecord`].
const OPERATIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("operations");
/// request id → name.
const REQUEST_IDS: TableDefinition<&str, &str> = TableDefinition::new("request_ids");
/// Store-level facts: the format marker, the health probe.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const FORMAT_KEY: &str = "format";
const FORMAT: &[u8] = b"opsd-store-1";

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
    reply: oneshot::Sender<Result<Option<Record>, StoreError>>,
}

enum Op {
    Insert(Record),
    Update(Record, Revision, Cause),
    Delete(String, Revision, Cause),
}

impl RedbStore {
    /// Opens (or creates) the store at `path`, creating its directory.
    /// A file that another process holds, or that is not an opsd store,
    /// is refused with a message that says so.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let shown = path.display();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Internal(format!(
                    "cannot create the directory {}: {e}",
                    dir.display()
                ))
            })?;
        }
        let db = Database::builder().create(path).map_err(|e| match e {
            DatabaseError::DatabaseAlreadyOpen => StoreError::Internal(format!(
                "{shown} is in use by another process (is another opsd running on it?)"
            )),
            DatabaseError::Storage(err) => StoreError::Internal(format!(
                "{shown} is not a readable opsd store (corrupt, or not a redb file): {err}"
            )),
            other => StoreError::Internal(format!("cannot open {shown}: {other}")),
        })?;
        check_format(&db, path)?;
        let page_token_key = page_token_key(&db)?;
        let db = Arc::new(db);
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
            failed: false,
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

    async fn submit(&self, op: Op) -> Result<Option<Record>, StoreError> {
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

fn internal(e: impl std::fmt::Display) -> StoreError {
    StoreError::Internal(e.to_string())
}

/// The single writer: drains the queue into group commits.
struct Writer {
    db: Arc<Database>,
    feed: broadcast::Sender<Change>,
    /// A commit failed; the next batch must first prove the file healthy.
    failed: bool,
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
            match self.probe() {
                Ok(()) => {
                    tracing::warn!("the store is healthy again; accepting writes");
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
        let now = SystemTime::now();
        let started = std::time::Instant::now();
        let size = batch.len();
        let mut results = Vec::with_capacity(batch.len());
        let mut changes = Vec::new();
        let outcome = (|| -> Result<(), StoreError> {
            let mut txn = self.db.begin_write().map_err(internal)?;
            txn.set_durability(self.durability()).map_err(internal)?;
            {
                let mut ops = txn.open_table(OPERATIONS).map_err(internal)?;
                let mut ids = txn.open_table(REQUEST_IDS).map_err(internal)?;
                for mutation in &batch {
                    let result = apply(&mut ops, &mut ids, &mutation.op)?;
                    if let Ok(written) = &result {
                        changes.push(change_of(&mutation.op, written.as_ref(), now));
                    }
                    results.push(result);
                }
            }
            if self.injected_failure() {
                return Err(StoreError::Unavailable("injected commit failure".into()));
            }
            txn.commit()
                .map_err(|e| StoreError::Unavailable(e.to_string()))
        })();
        crate::metrics::store_commit(size, started.elapsed(), outcome.is_ok());
        match outcome {
            Ok(()) => {
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
                for mutation in batch {
                    let _ = mutation
                        .reply
                        .send(Err(StoreError::Unavailable(err.to_string())));
                }
            }
        }
    }

    /// A durable write that proves the file takes commits again.
    fn probe(&self) -> Result<(), StoreError> {
        if self.injected_failure() {
            return Err(StoreError::Unavailable("injected commit failure".into()));
        }
        let mut txn = self.db.begin_write().map_err(internal)?;
        txn.set_durability(Durability::Immediate)
            .map_err(internal)?;
        {
            let mut meta = txn.open_table(META).map_err(internal)?;
            let stamp = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or(Duration::ZERO)
                .as_nanos()
                .to_le_bytes();
            meta.insert("probe", stamp.as_slice()).map_err(internal)?;
        }
        txn.commit()
            .map_err(|e| StoreError::Unavailable(e.to_string()))
    }
}

type Ops<'t> = redb::Table<'t, &'static str, &'static [u8]>;
type Ids<'t> = redb::Table<'t, &'static str, &'static str>;

/// Applies one mutation inside the batch's transaction. The outer error is a
/// storage fault (the whole batch fails); the inner one is this mutation's
/// own answer (conflict, exists).
#[allow(clippy::type_complexity)]
fn apply(
    ops: &mut Ops<'_>,
    ids: &mut Ids<'_>,
    op: &Op,
) -> Result<Result<Option<Record>, StoreError>, StoreError> {
    let load = |ops: &Ops<'_>, name: &str| -> Result<Option<Record>, StoreError> {
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
            record.revision = 1;
            ops.insert(record.name.as_str(), encode(&record).as_slice())
                .map_err(internal)?;
            Ok(Ok(Some(record)))
        }
        Op::Update(record, expected, _) => {
            let Some(stored) = load(ops, &record.name)? else {
                return Ok(Err(StoreError::Conflict));
            };
            if stored.revision != *expected {
                return Ok(Err(StoreError::Conflict));
            }
            let mut record = record.clone();
            record.revision = expected + 1;
            record.request_id = stored.request_id;
            ops.insert(record.name.as_str(), encode(&record).as_slice())
                .map_err(internal)?;
            Ok(Ok(Some(record)))
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
            Ok(Ok(None))
        }
    }
}

fn change_of(op: &Op, written: Option<&Record>, time: SystemTime) -> Change {
    let (name, cause) = match op {
        Op::Insert(r) => (r.name.clone(), Cause::Created),
        Op::Update(r, _, cause) => (r.name.clone(), *cause),
        Op::Delete(name, _, cause) => (name.clone(), *cause),
    };
    Change {
        name,
        cause,
        deadline: written.and_then(Record::next_deadline),
        time,
    }
}

#[async_trait::async_trait]
impl Store for RedbStore {
    async fn get(&self, name: &str) -> Result<Option<Record>, StoreError> {
        self.read(|txn| {
            let ops = txn.open_table(OPERATIONS).map_err(internal)?;
            ops.get(name)
                .map_err(internal)?
                .map(|v| decode(v.value()))
                .transpose()
        })
    }

    async fn find_by_request_id(&self, request_id: &str) -> Result<Option<Record>, StoreError> {
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
                Ok((key.value().to_owned(), decode(value.value())?))
            });
            scan(&query, entries)
        })
        .await
        .map_err(internal)?
    }

    async fn insert(&self, record: Record) -> Result<Record, StoreError> {
        self.submit(Op::Insert(record))
            .await?
            .ok_or_else(|| internal("insert wrote nothing"))
    }

    async fn update(
        &self,
        record: Record,
        expected: Revision,
        cause: Cause,
    ) -> Result<Record, StoreError> {
        self.submit(Op::Update(record, expected, cause))
            .await?
            .ok_or_else(|| internal("update wrote nothing"))
    }

    async fn delete(&self, name: &str, expected: Revision, cause: Cause) -> Result<(), StoreError> {
        self.submit(Op::Delete(name.to_owned(), expected, cause))
            .await
            .map(drop)
    }

    async fn deadlines(&self) -> Result<Vec<(SystemTime, String)>, StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_read().map_err(internal)?;
            let ops = txn.open_table(OPERATIONS).map_err(internal)?;
            let mut out = Vec::new();
            for entry in ops.iter().map_err(internal)? {
                let (_, value) = entry.map_err(internal)?;
                let record = decode(value.value())?;
                if let Some(at) = record.next_deadline() {
                    out.push((at, record.name));
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

    async fn count(&self) -> Result<usize, StoreError> {
        self.read(|txn| {
            let ops = txn.open_table(OPERATIONS).map_err(internal)?;
            Ok(ops.len().map_err(internal)? as usize)
        })
    }

    fn page_token_key(&self) -> [u8; 32] {
        self.page_token_key
    }
}

/// The on-disk form of a [`Record`].
#[derive(Clone, PartialEq, prost::Message)]
struct StoredRecord {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(uint64, tag = "2")]
    revision: u64,
    #[prost(message, optional, tag = "3")]
    metadata: Option<prost_types::Any>,
    #[prost(oneof = "StoredOutcome", tags = "4, 5")]
    outcome: Option<StoredOutcome>,
    #[prost(int32, tag = "6")]
    cancel_policy: i32,
    #[prost(message, optional, tag = "7")]
    cancel_grace_period: Option<prost_types::Duration>,
    #[prost(message, optional, tag = "8")]
    cancel_deadline: Option<prost_types::Timestamp>,
    #[prost(message, optional, tag = "9")]
    lease: Option<prost_types::Duration>,
    #[prost(message, optional, tag = "10")]
    lease_deadline: Option<prost_types::Timestamp>,
    #[prost(string, optional, tag = "11")]
    request_id: Option<String>,
    #[prost(message, optional, tag = "12")]
    create_time: Option<prost_types::Timestamp>,
    #[prost(message, optional, tag = "13")]
    update_time: Option<prost_types::Timestamp>,
    #[prost(message, optional, tag = "14")]
    done_time: Option<prost_types::Timestamp>,
    #[prost(message, optional, tag = "15")]
    expire_time: Option<prost_types::Timestamp>,
    #[prost(message, optional, tag = "16")]
    script: Option<StoredScript>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct StoredScript {
    #[prost(message, repeated, tag = "1")]
    steps: Vec<StoredStep>,
    #[prost(message, optional, tag = "2")]
    outcome_time: Option<prost_types::Timestamp>,
    #[prost(oneof = "StoredOutcome", tags = "4, 5")]
    outcome: Option<StoredOutcome>,
    #[prost(message, optional, tag = "6")]
    on_cancel_after: Option<prost_types::Duration>,
    #[prost(message, optional, tag = "7")]
    on_cancel: Option<StoredResult>,
    #[prost(string, repeated, tag = "8")]
    disabled_methods: Vec<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct StoredStep {
    #[prost(message, optional, tag = "1")]
    at: Option<prost_types::Timestamp>,
    #[prost(message, optional, tag = "2")]
    metadata: Option<prost_types::Any>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct StoredResult {
    #[prost(oneof = "StoredOutcome", tags = "4, 5")]
    outcome: Option<StoredOutcome>,
}

fn stored_outcome(o: &Outcome) -> StoredOutcome {
    match o {
        Outcome::Response(a) => StoredOutcome::Response(a.clone()),
        Outcome::Error(s) => StoredOutcome::Error(s.clone()),
    }
}

fn outcome_of(o: StoredOutcome) -> Outcome {
    match o {
        StoredOutcome::Response(a) => Outcome::Response(a),
        StoredOutcome::Error(s) => Outcome::Error(s),
    }
}

fn encode_script(script: &super::Script) -> StoredScript {
    StoredScript {
        steps: script
            .steps
            .iter()
            .map(|(at, metadata)| StoredStep {
                at: Some((*at).into()),
                metadata: Some(metadata.clone()),
            })
            .collect(),
        outcome_time: script.outcome.as_ref().map(|(at, _)| (*at).into()),
        outcome: script.outcome.as_ref().map(|(_, o)| stored_outcome(o)),
        on_cancel_after: script
            .on_cancel
            .as_ref()
            .and_then(|(after, _)| prost_types::Duration::try_from(*after).ok()),
        on_cancel: script.on_cancel.as_ref().map(|(_, o)| StoredResult {
            outcome: Some(stored_outcome(o)),
        }),
        disabled_methods: script.disabled_methods.clone(),
    }
}

fn decode_script(stored: StoredScript) -> Result<super::Script, StoreError> {
    let corrupt = |what: &str| StoreError::Internal(format!("corrupt script: {what}"));
    let time = |t: Option<prost_types::Timestamp>| {
        t.and_then(|t| SystemTime::try_from(t).ok())
            .ok_or_else(|| corrupt("time"))
    };
    let steps = stored
        .steps
        .into_iter()
        .map(|step| Ok((time(step.at)?, step.metadata.unwrap_or_default())))
        .collect::<Result<_, StoreError>>()?;
    let outcome = match stored.outcome {
        Some(o) => Some((time(stored.outcome_time)?, outcome_of(o))),
        None => None,
    };
    let on_cancel = match stored.on_cancel.and_then(|r| r.outcome) {
        Some(o) => Some((
            stored
                .on_cancel_after
                .and_then(|d| Duration::try_from(d).ok())
                .unwrap_or_default(),
            outcome_of(o),
        )),
        None => None,
    };
    Ok(super::Script {
        steps,
        outcome,
        on_cancel,
        disabled_methods: stored.disabled_methods,
    })
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum StoredOutcome {
    #[prost(message, tag = "4")]
    Response(prost_types::Any),
    #[prost(message, tag = "5")]
    Error(rpc::Status),
}

fn encode(record: &Record) -> Vec<u8> {
    let ts = |t: Option<SystemTime>| t.map(prost_types::Timestamp::from);
    let dur = |d: Option<Duration>| d.and_then(|d| prost_types::Duration::try_from(d).ok());
    StoredRecord {
        name: record.name.clone(),
        revision: record.revision,
        metadata: record.metadata.clone(),
        outcome: record.outcome.as_ref().map(|o| match o {
            Outcome::Response(a) => StoredOutcome::Response(a.clone()),
            Outcome::Error(s) => StoredOutcome::Error(s.clone()),
        }),
        cancel_policy: match record.cancel_policy {
            CancelPolicy::Immediate => 1,
            CancelPolicy::Cooperative => 2,
            CancelPolicy::NotCancellable => 3,
        },
        cancel_grace_period: dur(Some(record.cancel_grace_period)),
        cancel_deadline: ts(record.cancel_deadline),
        lease: dur(record.lease),
        lease_deadline: ts(record.lease_deadline),
        request_id: record.request_id.clone(),
        create_time: ts(Some(record.create_time)),
        update_time: ts(Some(record.update_time)),
        done_time: ts(record.done_time),
        expire_time: ts(record.expire_time),
        script: record.script.as_deref().map(encode_script),
    }
    .encode_to_vec()
}

fn decode(bytes: &[u8]) -> Result<Record, StoreError> {
    let corrupt = |what: &str| StoreError::Internal(format!("corrupt operation record: {what}"));
    let stored = StoredRecord::decode(bytes).map_err(|e| corrupt(&e.to_string()))?;
    let time = |t: Option<prost_types::Timestamp>| -> Result<Option<SystemTime>, StoreError> {
        t.map(|t| SystemTime::try_from(t).map_err(|_| corrupt("timestamp")))
            .transpose()
    };
    let dur = |d: Option<prost_types::Duration>| -> Result<Option<Duration>, StoreError> {
        d.map(|d| Duration::try_from(d).map_err(|_| corrupt("duration")))
            .transpose()
    };
    Ok(Record {
        name: stored.name,
        revision: stored.revision,
        metadata: stored.metadata,
        outcome: stored.outcome.map(|o| match o {
            StoredOutcome::Response(a) => Outcome::Response(a),
            StoredOutcome::Error(s) => Outcome::Error(s),
        }),
        cancel_policy: match stored.cancel_policy {
            2 => CancelPolicy::Cooperative,
            3 => CancelPolicy::NotCancellable,
            _ => CancelPolicy::Immediate,
        },
        cancel_grace_period: dur(stored.cancel_grace_period)?.unwrap_or_default(),
        cancel_deadline: time(stored.cancel_deadline)?,
        lease: dur(stored.lease)?,
        lease_deadline: time(stored.lease_deadline)?,
        request_id: stored.request_id,
        create_time: time(stored.create_time)?.ok_or_else(|| corrupt("no create time"))?,
        update_time: time(stored.update_time)?.ok_or_else(|| corrupt("no update time"))?,
        done_time: time(stored.done_time)?,
        expire_time: time(stored.expire_time)?,
        script: stored.script.map(decode_script).transpose()?.map(Box::new),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ParentPattern;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("opsd-redb-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir.join("store").join("opsd.redb")
    }

    fn record(name: &str) -> Record {
        let now = SystemTime::now();
        Record {
            name: name.to_owned(),
            revision: 0,
            metadata: Some(prost_types::Any::from_msg(&"m".to_owned()).unwrap()),
            outcome: None,
            cancel_policy: CancelPolicy::Cooperative,
            cancel_grace_period: Duration::from_secs(30),
            cancel_deadline: Some(now + Duration::from_secs(5)),
            lease: Some(Duration::from_millis(1500)),
            lease_deadline: Some(now + Duration::from_secs(9)),
            request_id: Some(format!("req-{name}")),
            create_time: now,
            update_time: now,
            done_time: None,
            expire_time: None,
            script: None,
        }
    }

    #[test]
    fn records_round_trip_through_their_encoding() {
        let mut r = record("operations/a");
        assert_eq!(decode(&encode(&r)).unwrap(), r);
        r.script = Some(Box::new(crate::store::Script {
            steps: vec![(
                SystemTime::now(),
                prost_types::Any::from_msg(&"s".to_owned()).unwrap(),
            )],
            outcome: Some((
                SystemTime::now(),
                Outcome::Response(prost_types::Any::default()),
            )),
            on_cancel: Some((
                Duration::from_millis(250),
                Outcome::Error(crate::registry::cancelled_status()),
            )),
            disabled_methods: vec!["cancel".into()],
        }));
        assert_eq!(decode(&encode(&r)).unwrap(), r);
        r.outcome = Some(Outcome::Error(crate::registry::cancelled_status()));
        r.done_time = Some(SystemTime::now());
        r.expire_time = Some(SystemTime::now());
        assert_eq!(decode(&encode(&r)).unwrap(), r);
        assert!(decode(b"\xff\x01").is_err());
    }

    #[tokio::test]
    async fn writes_survive_reopening_and_conditions_hold() {
        let path = temp("reopen");
        {
            let store = RedbStore::open(&path).unwrap();
            let a = store
                .insert(record("projects/p/operations/a"))
                .await
                .unwrap();
            store
                .insert(record("projects/p/operations/b"))
                .await
                .unwrap();
            assert!(matches!(
                store.insert(record("projects/p/operations/a")).await,
                Err(StoreError::Exists(_))
            ));
            let updated = store.update(a.clone(), 1, Cause::Updated).await.unwrap();
            assert_eq!(updated.revision, 2);
            assert!(matches!(
                store.update(a, 1, Cause::Updated).await,
                Err(StoreError::Conflict)
            ));
            store
                .delete("projects/p/operations/b", 1, Cause::Deleted)
                .await
                .unwrap();
        }
        // The writer thread of the first store must let go of the file.
        let store = loop {
            match RedbStore::open(&path) {
                Ok(store) => break store,
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let a = store.get("projects/p/operations/a").await.unwrap().unwrap();
        assert_eq!(a.revision, 2);
        assert!(store
            .get("projects/p/operations/b")
            .await
            .unwrap()
            .is_none());
        assert_eq!(
            store
                .find_by_request_id("req-projects/p/operations/a")
                .await
                .unwrap()
                .unwrap()
                .name,
            a.name
        );
        assert!(store
            .find_by_request_id("req-projects/p/operations/b")
            .await
            .unwrap()
            .is_none());
        let page = store
            .list(&ListQuery::page(
                ParentPattern::new(vec!["projects".into(), "p".into()]),
                None,
                10,
            ))
            .await
            .unwrap();
        assert_eq!(page.records.len(), 1);
        assert_eq!(store.count().await.unwrap(), 1);
        assert_eq!(store.deadlines().await.unwrap().len(), 1);
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
    async fn failed_commits_are_not_acknowledged_and_reads_keep_working() {
        let path = temp("failing");
        let store = RedbStore::open(&path).unwrap();
        let a = store.insert(record("operations/a")).await.unwrap();
        // The commit fails, then the health probe fails once more.
        store.failpoints().fail_commits.store(2, Ordering::Relaxed);
        let err = store.insert(record("operations/b")).await.unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
        assert!(matches!(
            store.update(a.clone(), 1, Cause::Updated).await,
            Err(StoreError::Unavailable(_))
        ));
        // Reads work throughout, and nothing of the failed batches is there.
        assert!(store.get("operations/b").await.unwrap().is_none());
        assert_eq!(
            store.get("operations/a").await.unwrap().unwrap().revision,
            1
        );
        // Healthy again: writes are accepted.
        store.insert(record("operations/b")).await.unwrap();
        assert_eq!(store.count().await.unwrap(), 2);
    }

    #[tokio::test]
    async fn concurrent_writes_share_commits() {
        let path = temp("group");
        let store = Arc::new(RedbStore::open(&path).unwrap());
        let tasks: Vec<_> = (0..64)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(
                    async move { store.insert(record(&format!("operations/op{i}"))).await },
                )
            })
            .collect();
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        assert_eq!(store.count().await.unwrap(), 64);
    }
}
