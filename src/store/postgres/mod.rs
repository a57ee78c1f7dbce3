//! The PostgreSQL store: several replicas over one database.
//!
//! Every replica of `opsd serve --store postgres://…` keeps its operations
//! in the same database and behaves as part of one server:
//!
//! - One row per operation in `opsd_operations` (the encoded
//!   [`StoredRecord`] and the columns List filters and deadlines use; see
//!   `migrations/`). Every write is ONE statement, so one round trip and one
//!   transaction: the conditional write (`… WHERE name = $1 AND revision =
//!   $2`; no row → [`StoreError::Conflict`], so exactly one of racing
//!   transitions wins), its entry in the change log `opsd_changes`, and the
//!   counts by state. A write is acknowledged only when that statement (and
//!   so its commit) returned; an error on the way, the commit's included,
//!   is an error to the caller.
//! - Inserts conflict on the name or on the request id, answered with the
//!   existing record ([`StoreError::Exists`]).
//! - The change feed (`listener`): this replica's commits at once, the
//!   others' through LISTEN/NOTIFY, and the change log as the truth.
//! - Deadlines are claimed (`FOR UPDATE SKIP LOCKED`, [`Store::claim_due`])
//!   so each fires on one replica; every write clears a claim, and a claim
//!   of a replica that died expires.
//! - Time: the store keeps an [`OffsetClock`] in step with the database's
//!   `clock_timestamp()`, which the server gives the registry, so leases
//!   and retention read the database's time on every replica.
//! - Filters run in SQL (`sql`), with the in-memory evaluator's results.
//! - Done records never change, so Gets of them are answered from a
//!   bounded cache that deletions on the feed (from any replica) and
//!   resyncs invalidate; running ones are read from the database.
//! - Faults: every call is bounded (`pool_timeout + statement_timeout`) and
//!   fails UNAVAILABLE past it; `Store::health` follows the feed's polls.
//! - The schema is created and migrated by opsd (`schema`).

mod listener;
mod pool;
mod schema;
mod sql;

use std::{
    future::Future,
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    },
    time::{Duration, SystemTime},
};

use deadpool_postgres::Pool;
use prost::Message;
use tokio::sync::{broadcast, watch};
use tokio_postgres::{types::ToSql, Row};
use tokio_util::sync::CancellationToken;

use self::{
    listener::{Feed, FeedContext, Logged},
    pool::{pg_error, pool_error},
    sql::{from_nanos, nanos, split_time, Params},
};
pub use self::{
    pool::{is_postgres_url, Target, TlsMode},
    schema::{Migrated, SCHEMA_VERSION},
};
use super::{
    cache::{RecordCache, DEFAULT_CACHE_BYTES},
    codec::decode,
    Cause, Change, Claimed, Counts, Deadline, ListQuery, Revision, Scan, Store, StoreError,
    StoredRecord,
};
use crate::clock::{Clock, OffsetClock};

/// Changes a slow subscriber may fall behind before it is told it lagged.
const FEED_CAPACITY: usize = 4096;
/// Rows of `opsd_counts` that writes spread over.
const COUNT_SLOTS: u32 = 64;

/// Tunables of the PostgreSQL store (`opsd serve --pg-*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PostgresSettings {
    /// Connections in the pool (the listener has one more).
    pub pool_size: usize,
    /// How long opening a connection may take.
    pub connect_timeout: Duration,
    /// The longest a statement may run on the server (`statement_timeout`;
    /// also `lock_timeout`, and twice it, at least 10 s,
    /// `idle_in_transaction_session_timeout`).
    pub statement_timeout: Duration,
    /// How long a call may wait for a free connection.
    pub pool_timeout: Duration,
}

impl Default for PostgresSettings {
    fn default() -> Self {
        Self {
            pool_size: 16,
            connect_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(5),
            pool_timeout: Duration::from_secs(2),
        }
    }
}

impl PostgresSettings {
    /// The longest any store call takes before it fails UNAVAILABLE.
    pub fn call_timeout(&self) -> Duration {
        self.pool_timeout + self.statement_timeout
    }
}

/// The PostgreSQL store. See the module docs.
pub struct PostgresStore {
    pool: Pool,
    target: Target,
    settings: PostgresSettings,
    feed: Arc<Feed>,
    sender: broadcast::Sender<Change>,
    /// Done records (see the module docs).
    cache: Arc<RecordCache>,
    /// Stamps changes; the database's time unless a test gave its own.
    clock: Clock,
    /// Kept in the database: every replica signs page tokens with it.
    page_token_key: [u8; 32],
    /// Picks the `opsd_counts` row of the next write.
    slot: AtomicU32,
    /// Stops the feed's tasks when the store is dropped.
    stop: CancellationToken,
    /// The crash test's negative control: acknowledge before COMMIT.
    #[cfg(any(test, feature = "failpoints"))]
    ack_before_commit: bool,
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// What a row keeps besides the encoded record.
struct Columns {
    parent: String,
    request_id: Option<Vec<u8>>,
    done: bool,
    error_code: Option<i32>,
    metadata_type: Option<Vec<u8>>,
    response_type: Option<Vec<u8>>,
    create_s: Option<i64>,
    create_ns: Option<i32>,
    update_s: Option<i64>,
    update_ns: Option<i32>,
    next_deadline: Option<i64>,
    /// The record without its name and request id (their own columns).
    record: Vec<u8>,
}

impl Columns {
    /// The columns inserts and updates both write, in their statements'
    /// order (`INSERT_SQL` $4–$13, `UPDATE_SQL` $3–$12).
    fn written(&self) -> [&(dyn ToSql + Sync); 10] {
        [
            &self.done,
            &self.error_code,
            &self.metadata_type,
            &self.response_type,
            &self.create_s,
            &self.create_ns,
            &self.update_s,
            &self.update_ns,
            &self.next_deadline,
            &self.record,
        ]
    }

    fn of(record: &mut StoredRecord) -> Self {
        let time = |t: Option<&prost_types::Timestamp>| {
            t.and_then(|t| SystemTime::try_from(*t).ok())
                .map(split_time)
        };
        let create = time(record.create_time.as_ref());
        let update = time(record.update_time.as_ref());
        let name = std::mem::take(&mut record.name);
        let request_id = record.request_id.take();
        let bytes = record.encode_to_vec();
        record.name = name;
        record.request_id = request_id;
        Self {
            parent: record.parent().to_owned(),
            request_id: record.request_id.as_ref().map(|r| r.as_bytes().to_vec()),
            done: record.done(),
            error_code: record.error().map(|e| e.code),
            metadata_type: record
                .metadata
                .as_ref()
                .map(|m| m.type_url.as_bytes().to_vec()),
            response_type: record.response().map(|r| r.type_url.as_bytes().to_vec()),
            create_s: create.map(|t| t.0),
            create_ns: create.map(|t| t.1),
            update_s: update.map(|t| t.0),
            update_ns: update.map(|t| t.1),
            next_deadline: record.next_deadline().map(nanos),
            record: bytes,
        }
    }
}

/// A record from its row's name, revision, request id and encoding (the
/// columns are the truth: the encoding was made before the revision was).
fn from_row(
    name: &str,
    revision: i64,
    request_id: Option<Vec<u8>>,
    bytes: &[u8],
) -> Result<StoredRecord, StoreError> {
    let mut record = decode(bytes)?;
    record.name = name.to_owned();
    record.revision = u64::try_from(revision)
        .map_err(|_| StoreError::Internal("a stored revision is negative".into()))?;
    record.request_id = request_id
        .map(String::from_utf8)
        .transpose()
        .map_err(|_| StoreError::Internal("a stored request id is not UTF-8".into()))?;
    Ok(record)
}

const GET_SQL: &str = "SELECT revision, request_id, record FROM opsd_operations WHERE name = $1";

const FIND_SQL: &str =
    "SELECT name, revision, request_id, record FROM opsd_operations WHERE request_id = $1";

const INSERT_SQL: &str = "\
WITH inserted AS (
  INSERT INTO opsd_operations (name, parent, revision, request_id, done, error_code,
      metadata_type, response_type, create_s, create_ns, update_s, update_ns,
      next_deadline, record)
  VALUES ($1, $2, 1, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
  ON CONFLICT DO NOTHING
  RETURNING name
), change AS (
  INSERT INTO opsd_changes (name, cause, revision, previous_deadline, deadline, time_ns)
  SELECT name, 'created', 1, NULL, $12, $14 FROM inserted
  RETURNING seq
), counted AS (
  UPDATE opsd_counts SET
    running = running + CASE WHEN $4 THEN 0 ELSE 1 END,
    done = done + CASE WHEN $4 THEN 1 ELSE 0 END
  WHERE slot = $15 AND EXISTS (SELECT 1 FROM inserted)
)
SELECT seq FROM change";

const UPDATE_SQL: &str = "\
WITH old AS (
  SELECT name, next_deadline, done FROM opsd_operations
  WHERE name = $1 AND revision = $2
  FOR UPDATE
), updated AS (
  UPDATE opsd_operations o SET revision = o.revision + 1, done = $3, error_code = $4,
      metadata_type = $5, response_type = $6, create_s = $7, create_ns = $8,
      update_s = $9, update_ns = $10, next_deadline = $11, record = $12,
      claimed_until = NULL
  FROM old WHERE o.name = old.name
  RETURNING o.revision, o.request_id, old.next_deadline AS previous_deadline,
      old.done AS was_done
), change AS (
  INSERT INTO opsd_changes (name, cause, revision, previous_deadline, deadline, time_ns)
  SELECT $1, $13, revision, previous_deadline, $11, $14 FROM updated
  RETURNING seq
), counted AS (
  UPDATE opsd_counts c SET
    running = c.running + CASE WHEN u.was_done THEN 0 ELSE -1 END + CASE WHEN $3 THEN 0 ELSE 1 END,
    done = c.done + CASE WHEN u.was_done THEN -1 ELSE 0 END + CASE WHEN $3 THEN 1 ELSE 0 END
  FROM updated u WHERE c.slot = $15 AND u.was_done <> $3
)
SELECT updated.revision, updated.request_id, updated.previous_deadline, change.seq
FROM updated, change";

const DELETE_SQL: &str = "\
WITH deleted AS (
  DELETE FROM opsd_operations WHERE name = $1 AND revision = $2
  RETURNING next_deadline, done
), change AS (
  INSERT INTO opsd_changes (name, cause, revision, previous_deadline, deadline, time_ns)
  SELECT $1, $3, $2, next_deadline, NULL, $4 FROM deleted
  RETURNING seq
), counted AS (
  UPDATE opsd_counts c SET
    running = c.running - CASE WHEN d.done THEN 0 ELSE 1 END,
    done = c.done - CASE WHEN d.done THEN 1 ELSE 0 END
  FROM deleted d WHERE c.slot = $5
)
SELECT deleted.next_deadline, change.seq FROM deleted, change";

const CLAIM_SQL: &str = "\
WITH due AS (
  SELECT name FROM opsd_operations
  WHERE next_deadline <= $1 AND (claimed_until IS NULL OR claimed_until <= $1)
  ORDER BY next_deadline LIMIT $2
  FOR UPDATE SKIP LOCKED
), claimed AS (
  UPDATE opsd_operations o SET claimed_until = $3 FROM due WHERE o.name = due.name
  RETURNING o.name, o.next_deadline
)
SELECT name, next_deadline, NULL::int8 AS next FROM claimed
UNION ALL
SELECT NULL, NULL, least(
  (SELECT min(next_deadline) FROM opsd_operations WHERE next_deadline > $1),
  (SELECT min(claimed_until) FROM opsd_operations
   WHERE next_deadline <= $1 AND claimed_until > $1))";

impl PostgresStore {
    /// Connects to the database, applies the migrations it lacks, and
    /// starts the change feed. With [`Clock::System`], the store keeps its
    /// own clock in step with the database's (see [`PostgresStore::clock`]);
    /// any other clock (a test's manual one) is used as given.
    pub async fn connect(
        target: &Target,
        settings: PostgresSettings,
        clock: Clock,
    ) -> Result<Self, StoreError> {
        let pool = pool::pool(target, &settings)?;
        let bounded = |what: &'static str| {
            let limit = settings.call_timeout() + settings.connect_timeout;
            move |_| StoreError::Unavailable(format!("{what} took longer than {limit:?}"))
        };
        let limit = settings.call_timeout() + settings.connect_timeout;
        let mut client = tokio::time::timeout(limit, pool.get())
            .await
            .map_err(bounded("connecting to the database"))?
            .map_err(pool_error)?;
        let migrated = schema::migrate(&mut client).await?;
        if migrated.from != migrated.to {
            tracing::info!(
                from = migrated.from,
                to = migrated.to,
                "database schema migrated"
            );
        }
        let page_token_key = page_token_key(&client).await?;
        let schema: String = client
            .query_one("SELECT current_schema()", &[])
            .await
            .map_err(pg_error)?
            .get(0);
        drop(client);
        // One channel per schema: deployments in other schemas of the same
        // database do not hear each other (a channel is at most 63 bytes).
        let mut channel = format!("opsd_changes.{schema}");
        while channel.len() > 63 {
            channel.pop();
        }
        let offset = match clock {
            Clock::System => {
                let offset = OffsetClock::default();
                listener::step_clock(&pool, &offset).await?;
                Some(offset)
            }
            _ => None,
        };
        let clock = offset.clone().map_or(clock, Clock::Offset);
        let (sender, _) = broadcast::channel(FEED_CAPACITY);
        let cache = Arc::new(RecordCache::new(DEFAULT_CACHE_BYTES));
        let feed = Feed::new(sender.clone(), cache.clone());
        let stop = CancellationToken::new();
        let context = FeedContext {
            feed: feed.clone(),
            pool: pool.clone(),
            target: target.clone(),
            settings: settings.clone(),
            channel,
            clock: offset,
            stop: stop.clone(),
        };
        tokio::time::timeout(limit, listener::start(&context))
            .await
            .map_err(bounded("reading the change log"))??;
        listener::spawn(context);
        #[cfg(any(test, feature = "failpoints"))]
        let ack_before_commit = std::env::var_os("OPSD_FAILPOINT_NON_DURABLE_ACK").is_some();
        #[cfg(any(test, feature = "failpoints"))]
        if ack_before_commit {
            tracing::warn!(
                "failpoint: acknowledging writes BEFORE their COMMIT (crash-test negative control)"
            );
        }
        let mut slot = [0u8; 4];
        let _ = getrandom::fill(&mut slot);
        Ok(Self {
            pool,
            target: target.clone(),
            settings,
            feed,
            sender,
            cache,
            clock,
            page_token_key,
            slot: AtomicU32::new(u32::from_le_bytes(slot)),
            stop,
            #[cfg(any(test, feature = "failpoints"))]
            ack_before_commit,
        })
    }

    /// Applies the migrations the database lacks, and nothing else
    /// (`opsd migrate`).
    pub async fn migrate(
        target: &Target,
        settings: &PostgresSettings,
    ) -> Result<Migrated, StoreError> {
        let (mut client, connection) = pool::connect(target, settings).await?;
        let driver = tokio::spawn(connection);
        client
            .batch_execute(&pool::session_sql(settings))
            .await
            .map_err(pg_error)?;
        let migrated = schema::migrate(&mut client).await;
        drop(client);
        let _ = driver.await;
        migrated
    }

    /// The clock the store stamps changes with: the database's time (the
    /// system clock plus a measured offset) unless a test gave its own.
    pub fn clock(&self) -> Clock {
        self.clock.clone()
    }

    /// The database, without its password.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Runs `call` within the call timeout.
    async fn bounded<T>(
        &self,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let limit = self.settings.call_timeout();
        tokio::time::timeout(limit, call).await.map_err(|_| {
            StoreError::Unavailable(format!("the database did not answer within {limit:?}"))
        })?
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(pool_error)
    }

    /// Runs one fixed statement (prepared once per connection).
    async fn query(
        &self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        self.bounded(async {
            let client = self.client().await?;
            let statement = client.prepare_cached(sql).await.map_err(pg_error)?;
            client.query(&statement, params).await.map_err(pg_error)
        })
        .await
    }

    /// Runs one writing statement: its own transaction, committed when it
    /// returns.
    async fn write(
        &self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        #[cfg(any(test, feature = "failpoints"))]
        if self.ack_before_commit {
            return self.write_acked_early(sql, params).await;
        }
        self.query(sql, params).await
    }

    /// The negative control: the statement runs in a transaction that is
    /// committed a moment AFTER the caller hears OK (a crash in between
    /// loses an acknowledged write, which the crash test must catch).
    #[cfg(any(test, feature = "failpoints"))]
    async fn write_acked_early(
        &self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        self.bounded(async {
            let client = self.client().await?;
            let statement = client.prepare_cached(sql).await.map_err(pg_error)?;
            client.batch_execute("BEGIN").await.map_err(pg_error)?;
            let rows = client.query(&statement, params).await.map_err(pg_error)?;
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let _ = client.batch_execute("COMMIT").await;
            });
            Ok(rows)
        })
        .await
    }

    fn slot(&self) -> i32 {
        (self.slot.fetch_add(1, Ordering::Relaxed) % COUNT_SLOTS) as i32
    }

    /// Reads a record from the database, past the cache.
    async fn load(&self, name: &str) -> Result<Option<StoredRecord>, StoreError> {
        let rows = self.query(GET_SQL, &[&name]).await?;
        rows.first()
            .map(|row| from_row(name, row.get(0), row.get(1), row.get(2)))
            .transpose()
    }

    /// Caches a done record read (or written) after `ticket`.
    fn cache_done(&self, ticket: super::cache::Ticket, record: &StoredRecord) {
        if record.done() {
            self.cache
                .fill(ticket, &record.name, Arc::from(record.encode_to_vec()));
        }
    }
}

/// The page token key kept in `opsd_meta`, created by the first replica.
async fn page_token_key(client: &tokio_postgres::Client) -> Result<[u8; 32], StoreError> {
    let mut key = [0u8; 32];
    getrandom::fill(&mut key)
        .map_err(|e| StoreError::Internal(format!("no OS randomness: {e}")))?;
    client
        .execute(
            "INSERT INTO opsd_meta (key, value) VALUES ('page-token-key', $1) \
             ON CONFLICT (key) DO NOTHING",
            &[&key.as_slice()],
        )
        .await
        .map_err(pg_error)?;
    let stored: Vec<u8> = client
        .query_one(
            "SELECT value FROM opsd_meta WHERE key = 'page-token-key'",
            &[],
        )
        .await
        .map_err(pg_error)?
        .get(0);
    stored
        .try_into()
        .map_err(|_| StoreError::Internal("the stored page token key is corrupt".into()))
}

#[async_trait::async_trait]
impl Store for PostgresStore {
    async fn get(&self, name: &str) -> Result<Option<StoredRecord>, StoreError> {
        if self.feed.fresh() {
            if let Some(bytes) = self.cache.get(name) {
                return decode(&bytes).map(Some);
            }
        }
        let ticket = self.cache.ticket();
        let record = self.load(name).await?;
        if let Some(record) = &record {
            self.cache_done(ticket, record);
        }
        Ok(record)
    }

    async fn find_by_request_id(
        &self,
        request_id: &str,
    ) -> Result<Option<StoredRecord>, StoreError> {
        let rows = self.query(FIND_SQL, &[&request_id.as_bytes()]).await?;
        rows.first()
            .map(|row| from_row(row.get(0), row.get(1), row.get(2), row.get(3)))
            .transpose()
    }

    async fn list(&self, query: &ListQuery) -> Result<Scan, StoreError> {
        let mut params = Params::default();
        let sql = sql::list(query, &mut params);
        let rows = self
            .bounded(async {
                let client = self.client().await?;
                // The text varies with the filter's shape: not cached.
                client
                    .query_typed(&sql, &params.typed())
                    .await
                    .map_err(pg_error)
            })
            .await?;
        let budget = i64::try_from(query.scan_budget.max(1)).unwrap_or(i64::MAX);
        let mut scan = Scan::default();
        let mut budget_end = None;
        for row in &rows {
            let name: &str = row.get(0);
            if row.get::<_, bool>(4) {
                scan.records
                    .push(from_row(name, row.get(1), row.get(2), row.get(3))?);
            }
            if row.get::<_, i64>(5) == budget {
                budget_end = Some(name.to_owned());
            }
        }
        if scan.records.len() > query.limit {
            scan.records.truncate(query.limit);
            scan.resume_after = scan.records.last().map(|r| r.name.clone());
        } else {
            scan.resume_after = budget_end;
        }
        Ok(scan)
    }

    async fn insert(&self, mut record: StoredRecord) -> Result<Revision, StoreError> {
        let columns = Columns::of(&mut record);
        let time = self.clock.now();
        loop {
            let ticket = self.cache.ticket();
            let (time_ns, slot) = (nanos(time), self.slot());
            let params = [
                &[
                    &record.name as &(dyn ToSql + Sync),
                    &columns.parent,
                    &columns.request_id,
                ][..],
                &columns.written(),
                &[&time_ns, &slot],
            ]
            .concat();
            let rows = self.write(INSERT_SQL, &params).await?;
            if let Some(row) = rows.first() {
                record.revision = 1;
                self.feed.committed(Logged {
                    seq: row.get(0),
                    change: Change {
                        name: Arc::from(record.name.as_str()),
                        cause: Cause::Created,
                        previous_deadline: None,
                        deadline: columns.next_deadline.map(from_nanos),
                        time,
                    },
                });
                self.cache_done(ticket, &record);
                return Ok(record.revision);
            }
            // The name or the request id is taken.
            if let Some(existing) = self.load(&record.name).await? {
                return Err(StoreError::Exists(Box::new(existing)));
            }
            if let Some(request_id) = &record.request_id {
                if let Some(existing) = self.find_by_request_id(request_id).await? {
                    return Err(StoreError::Exists(Box::new(existing)));
                }
            }
            // The record in the way was deleted meanwhile: try again.
        }
    }

    async fn update(
        &self,
        mut record: StoredRecord,
        expected: Revision,
        cause: Cause,
    ) -> Result<Revision, StoreError> {
        let columns = Columns::of(&mut record);
        let time = self.clock.now();
        let expected = i64::try_from(expected).map_err(|_| StoreError::Conflict)?;
        let ticket = self.cache.ticket();
        let (cause_name, time_ns, slot) = (cause.as_str(), nanos(time), self.slot());
        let params = [
            &[&record.name as &(dyn ToSql + Sync), &expected][..],
            &columns.written(),
            &[&cause_name, &time_ns, &slot],
        ]
        .concat();
        let rows = self.write(UPDATE_SQL, &params).await?;
        let Some(row) = rows.first() else {
            return Err(StoreError::Conflict);
        };
        let revision: i64 = row.get(0);
        let request_id: Option<Vec<u8>> = row.get(1);
        let previous: Option<i64> = row.get(2);
        self.feed.committed(Logged {
            seq: row.get(3),
            change: Change {
                name: Arc::from(record.name.as_str()),
                cause,
                previous_deadline: previous.map(from_nanos),
                deadline: columns.next_deadline.map(from_nanos),
                time,
            },
        });
        if record.done() {
            record.revision = revision as u64;
            record.request_id = request_id.and_then(|r| String::from_utf8(r).ok());
            self.cache_done(ticket, &record);
        }
        Ok(revision as u64)
    }

    async fn delete(&self, name: &str, expected: Revision, cause: Cause) -> Result<(), StoreError> {
        let expected = i64::try_from(expected).map_err(|_| StoreError::Conflict)?;
        let time = self.clock.now();
        let rows = self
            .write(
                DELETE_SQL,
                &[
                    &name,
                    &expected,
                    &cause.as_str(),
                    &nanos(time),
                    &self.slot(),
                ],
            )
            .await?;
        let Some(row) = rows.first() else {
            return Err(StoreError::Conflict);
        };
        let previous: Option<i64> = row.get(0);
        self.feed.committed(Logged {
            seq: row.get(1),
            change: Change {
                name: Arc::from(name),
                cause,
                previous_deadline: previous.map(from_nanos),
                deadline: None,
                time,
            },
        });
        Ok(())
    }

    async fn deadlines(&self) -> Result<Vec<Deadline>, StoreError> {
        let rows = self
            .query(
                "SELECT name, next_deadline, done FROM opsd_operations \
                 WHERE next_deadline IS NOT NULL",
                &[],
            )
            .await?;
        Ok(deadlines(&rows))
    }

    async fn running_deadlines(&self) -> Result<Vec<Deadline>, StoreError> {
        let rows = self
            .query(
                "SELECT name, next_deadline, done FROM opsd_operations \
                 WHERE NOT done AND next_deadline IS NOT NULL",
                &[],
            )
            .await?;
        Ok(deadlines(&rows))
    }

    async fn claim_due(
        &self,
        now: SystemTime,
        limit: usize,
        hold: Duration,
    ) -> Result<Option<Claimed>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self
            .query(CLAIM_SQL, &[&nanos(now), &limit, &nanos(now + hold)])
            .await?;
        let mut claimed = Claimed::default();
        let mut due: Vec<(i64, Arc<str>)> = Vec::new();
        for row in &rows {
            match row.get::<_, Option<&str>>(0) {
                Some(name) => {
                    due.push((row.get::<_, Option<i64>>(1).unwrap_or(0), Arc::from(name)))
                }
                None => claimed.next = row.get::<_, Option<i64>>(2).map(from_nanos),
            }
        }
        due.sort();
        claimed.names = due.into_iter().map(|(_, name)| name).collect();
        Ok(Some(claimed))
    }

    fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.sender.subscribe()
    }

    fn health(&self) -> Option<watch::Receiver<bool>> {
        Some(self.feed.health())
    }

    async fn counts(&self) -> Result<Counts, StoreError> {
        let rows = self
            .query(
                "SELECT coalesce(sum(running), 0)::int8, coalesce(sum(done), 0)::int8 \
                 FROM opsd_counts",
                &[],
            )
            .await?;
        let row = rows
            .first()
            .ok_or_else(|| StoreError::Internal("no counts".into()))?;
        let count = |i: usize| u64::try_from(row.get::<_, i64>(i)).unwrap_or(0);
        Ok(Counts {
            running: count(0),
            done: count(1),
        })
    }

    fn page_token_key(&self) -> [u8; 32] {
        self.page_token_key
    }
}

fn deadlines(rows: &[Row]) -> Vec<Deadline> {
    rows.iter()
        .map(|row| Deadline {
            name: Arc::from(row.get::<_, &str>(0)),
            at: from_nanos(row.get(1)),
            done: row.get(2),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::codec::tests::{done, record};

    #[test]
    fn rows_keep_the_record_without_its_name_and_request_id() {
        let mut r = done(record("projects/p/operations/a"));
        let columns = Columns::of(&mut r);
        assert_eq!(
            r.name, "projects/p/operations/a",
            "the record is left as it was"
        );
        assert_eq!(columns.parent, "projects/p");
        assert!(columns.done);
        assert_eq!(columns.error_code, Some(1));
        assert_eq!(
            columns.request_id.as_deref(),
            Some(b"req-projects/p/operations/a".as_slice())
        );
        let back = from_row(&r.name, 3, columns.request_id.clone(), &columns.record).unwrap();
        assert_eq!(back, r);
        assert_eq!(columns.next_deadline.map(from_nanos), r.next_deadline());
    }
}
