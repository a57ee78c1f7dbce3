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
//! - Revisions come from one sequence (`opsd_revisions`): an operation
//!   deleted and created again never reuses a revision, so a conditional
//!   write read from its earlier life cannot land on the new one.
//! - A write whose answer does not come in time is cancelled on the server
//!   and its connection discarded; it may still have committed, so the
//!   store looks for its change in the log (each write's change carries a
//!   random token) once no write holds the row: found, the write succeeded;
//!   not found, the caller hears UNAVAILABLE saying the outcome is unknown,
//!   never a conflict (which would read as "it did not happen").
//! - Inserts conflict on the name or on the request id, answered with the
//!   existing record ([`StoreError::Exists`]).
//! - The change feed (`listener`): this replica's commits at once, the
//!   others' through LISTEN/NOTIFY, and the change log as the truth.
//! - Deadlines are claimed (`FOR UPDATE SKIP LOCKED`, [`Store::claim_due`])
//!   so each fires on one replica; every write clears a claim, a replica
//!   releases the claims it did not fire ([`Store::release`]), and a claim
//!   of a replica that died expires.
//! - Time: the store keeps an [`OffsetClock`] in step with the database's
//!   `clock_timestamp()`, which the server gives the registry, so leases
//!   and retention read the database's time on every replica.
//! - Filters run in SQL (`sql`), with the in-memory evaluator's results.
//! - Done records never change, so Gets of them are answered from a
//!   bounded cache that deletions on the feed (from any replica) and
//!   resyncs invalidate; running ones are read from the database. A write
//!   that finds another revision than the one it read drops the name's
//!   cached copy (the feed may not have told of a re-creation yet).
//! - Faults: every call is bounded (the connection within
//!   `pool_timeout`, the answer within `pool_timeout + statement_timeout`,
//!   an unknown outcome's settling within `statement_timeout` more; start-up
//!   within the connect and migration timeouts) and fails UNAVAILABLE past
//!   it; `Store::health` follows the feed's polls.
//! - The schema is created and migrated by opsd (`schema`).

mod listener;
mod pool;
mod schema;
mod sql;

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Arc,
    },
    time::{Duration, SystemTime},
};

use deadpool_postgres::Pool;
use prost::Message;
use tokio::sync::{broadcast, watch};
use tokio_postgres::{
    types::{ToSql, Type},
    Row,
};
use tokio_postgres_rustls::MakeRustlsConnect;
use tokio_util::sync::CancellationToken;

use self::{
    listener::{Feed, FeedContext, Logged},
    pool::{pg_error, pool_error},
    sql::{from_nanos, nanos, split_time, Params},
};
pub use self::{
    pool::{is_postgres_url, Target, TlsMode},
    schema::{Migrated, MIGRATION_LOCK, SCHEMA_VERSION},
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
    /// How long start-up may wait for another replica's migration (the
    /// advisory lock) and run its own (each migration's statements).
    pub migration_timeout: Duration,
}

impl Default for PostgresSettings {
    fn default() -> Self {
        Self {
            pool_size: 16,
            connect_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(5),
            pool_timeout: Duration::from_secs(2),
            migration_timeout: Duration::from_secs(300),
        }
    }
}

impl PostgresSettings {
    /// The longest a store call waits for its connection and its answer
    /// before it fails UNAVAILABLE. A write whose answer did not come in
    /// time takes up to [`PostgresSettings::settle_timeout`] more to find
    /// out whether it committed.
    pub fn call_timeout(&self) -> Duration {
        self.pool_timeout + self.statement_timeout
    }

    /// How long a write whose outcome is unknown may look for it: the lock
    /// wait and the read of the change log, each a statement.
    pub fn settle_timeout(&self) -> Duration {
        self.statement_timeout
    }
}

/// The PostgreSQL store. See the module docs.
pub struct PostgresStore {
    pool: Pool,
    target: Target,
    /// Cancels statements whose answer came too late.
    tls: MakeRustlsConnect,
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
  VALUES ($1, $2, nextval('opsd_revisions'), $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
  ON CONFLICT DO NOTHING
  RETURNING name, revision
), change AS (
  INSERT INTO opsd_changes (name, cause, revision, previous_deadline, deadline, time_ns, token)
  SELECT name, 'created', revision, NULL, $12, $14, $16 FROM inserted
  RETURNING seq, revision
), counted AS (
  UPDATE opsd_counts SET
    running = running + CASE WHEN $4 THEN 0 ELSE 1 END,
    done = done + CASE WHEN $4 THEN 1 ELSE 0 END
  WHERE slot = $15 AND EXISTS (SELECT 1 FROM inserted)
)
SELECT seq, revision FROM change";

const UPDATE_SQL: &str = "\
WITH old AS (
  SELECT name, next_deadline, done FROM opsd_operations
  WHERE name = $1 AND revision = $2
  FOR UPDATE
), updated AS (
  UPDATE opsd_operations o SET revision = nextval('opsd_revisions'), done = $3,
      error_code = $4, metadata_type = $5, response_type = $6, create_s = $7,
      create_ns = $8, update_s = $9, update_ns = $10, next_deadline = $11, record = $12,
      claimed_until = NULL
  FROM old WHERE o.name = old.name
  RETURNING o.revision, o.request_id, old.next_deadline AS previous_deadline,
      old.done AS was_done
), change AS (
  INSERT INTO opsd_changes (name, cause, revision, previous_deadline, deadline, time_ns, token)
  SELECT $1, $13, revision, previous_deadline, $11, $14, $16 FROM updated
  RETURNING seq
), counted AS (
  UPDATE opsd_counts c SET
    running = c.running + CASE WHEN u.was_done THEN 0 ELSE -1 END + CASE WHEN $3 THEN 0 ELSE 1 END,
    done = c.done + CASE WHEN u.was_done THEN -1 ELSE 0 END + CASE WHEN $3 THEN 1 ELSE 0 END
  FROM updated u WHERE c.slot = $15 AND u.was_done <> $3
)
SELECT change.seq, updated.revision, updated.previous_deadline, updated.request_id
FROM updated, change";

const DELETE_SQL: &str = "\
WITH deleted AS (
  DELETE FROM opsd_operations WHERE name = $1 AND revision = $2
  RETURNING next_deadline, done
), change AS (
  INSERT INTO opsd_changes (name, cause, revision, previous_deadline, deadline, time_ns, token)
  SELECT $1, $3, $2, next_deadline, NULL, $4, $6 FROM deleted
  RETURNING seq
), counted AS (
  UPDATE opsd_counts c SET
    running = c.running - CASE WHEN d.done THEN 0 ELSE 1 END,
    done = c.done - CASE WHEN d.done THEN 1 ELSE 0 END
  FROM deleted d WHERE c.slot = $5
)
SELECT change.seq, $2::int8, deleted.next_deadline FROM deleted, change";

/// Waits until no write holds the row (an ambiguous write holds it until
/// it has committed or rolled back).
const SETTLE_LOCK_SQL: &str = "SELECT 1 FROM opsd_operations WHERE name = $1 FOR KEY SHARE";

/// The change a write with this token logged, if it committed; it came
/// after `$1`, the highest sequence this replica had seen before it.
const SETTLE_FIND_SQL: &str = "SELECT seq, revision, previous_deadline FROM opsd_changes \
     WHERE seq > $1 AND token = $2";

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

/// Lets go of this replica's claim (`$2`, its hold's end) on names it did
/// not fire, so they are claimable again at once.
const RELEASE_SQL: &str = "UPDATE opsd_operations SET claimed_until = NULL \
     WHERE name = ANY($1) AND claimed_until = $2";

/// Every deadline (`$1` true) or the running records' only.
const DEADLINES_SQL: &str = "SELECT name, next_deadline, done FROM opsd_operations \
     WHERE next_deadline IS NOT NULL AND ($1 OR NOT done)";

/// One statement for [`PostgresStore::run`].
enum Statement<'a> {
    /// A fixed statement, prepared once per connection.
    Cached(&'static str, &'a [&'a (dyn ToSql + Sync)]),
    /// A statement whose text varies (List filters): not cached.
    Typed(&'a str, &'a [(&'a (dyn ToSql + Sync), Type)]),
}

/// Why [`PostgresStore::run`] returned no rows.
enum Failed {
    /// The statement did not commit: it was never sent, or the database
    /// answered with an error (its transaction rolled back).
    Refused(StoreError),
    /// It was sent and its answer did not come in time or was lost with
    /// the connection: it may have committed.
    Unknown(String),
}

/// What a write committed, as its statement (or the change log) tells.
struct Written {
    seq: i64,
    revision: i64,
    previous_deadline: Option<i64>,
    /// The stored request id (updates only; `None` when settled).
    request_id: Option<Option<Vec<u8>>>,
}

impl Written {
    fn of(row: &Row) -> Self {
        Self {
            seq: row.get(0),
            revision: row.get(1),
            previous_deadline: row.try_get(2).ok().flatten(),
            request_id: row.try_get::<_, Option<Vec<u8>>>(3).ok(),
        }
    }
}

impl PostgresStore {
    /// Connects to the database, applies the migrations it lacks, and
    /// starts the change feed. With [`Clock::System`], the store keeps its
    /// own clock in step with the database's (see [`PostgresStore::clock`]);
    /// any other clock (a test's manual one) is used as given. Every step is
    /// bounded: the migrations by the migration timeout, the others by the
    /// connect and call timeouts.
    pub async fn connect(
        target: &Target,
        settings: PostgresSettings,
        clock: Clock,
    ) -> Result<Self, StoreError> {
        let pool = pool::pool(target, &settings)?;
        let limit = settings.call_timeout() + settings.connect_timeout;
        let within = |what: &'static str, limit: Duration| {
            move |_| StoreError::Unavailable(format!("{what} took longer than {limit:?}"))
        };
        let mut client = tokio::time::timeout(limit, pool.get())
            .await
            .map_err(within("connecting to the database", limit))?
            .map_err(pool_error)?;
        let migrating = settings.migration_timeout + limit;
        let migrated = tokio::time::timeout(
            migrating,
            schema::migrate(&mut client, settings.migration_timeout),
        )
        .await
        .map_err(within("migrating the schema", migrating))??;
        if migrated.from != migrated.to {
            tracing::info!(
                from = migrated.from,
                to = migrated.to,
                "database schema migrated"
            );
        }
        let (page_token_key, schema) = tokio::time::timeout(limit, async {
            let key = page_token_key(&client).await?;
            let schema: String = client
                .query_one("SELECT current_schema()", &[])
                .await
                .map_err(pg_error)?
                .get(0);
            Ok::<_, StoreError>((key, schema))
        })
        .await
        .map_err(within("reading the store's settings", limit))??;
        drop(client);
        let offset = match clock {
            Clock::System => {
                let offset = OffsetClock::default();
                listener::step_clock(&pool, &offset, limit).await?;
                Some(offset)
            }
            _ => None,
        };
        let clock = offset.clone().map_or(clock, Clock::Offset);
        let (sender, _) = broadcast::channel(FEED_CAPACITY);
        let cache = Arc::new(RecordCache::new(DEFAULT_CACHE_BYTES));
        let feed = Feed::new(sender.clone(), cache.clone());
        let stop = CancellationToken::new();
        let tls = pool::tls(target)?;
        let context = FeedContext {
            feed: feed.clone(),
            pool: pool.clone(),
            target: target.clone(),
            settings: settings.clone(),
            channel: listener::channel(&schema),
            clock: offset,
            stop: stop.clone(),
        };
        tokio::time::timeout(limit, listener::start(&context))
            .await
            .map_err(within("reading the change log", limit))??;
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
            tls,
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
    /// (`opsd migrate`), within the connect and migration timeouts.
    pub async fn migrate(
        target: &Target,
        settings: &PostgresSettings,
    ) -> Result<Migrated, StoreError> {
        let limit = settings.connect_timeout + settings.migration_timeout;
        tokio::time::timeout(limit, async {
            let (mut client, connection) = pool::connect(target, settings).await?;
            let driver = tokio::spawn(connection);
            client
                .batch_execute(&pool::session_sql(settings))
                .await
                .map_err(pg_error)?;
            let migrated = schema::migrate(&mut client, settings.migration_timeout).await;
            drop(client);
            let _ = driver.await;
            migrated
        })
        .await
        .map_err(|_| StoreError::Unavailable(format!("migrating took longer than {limit:?}")))?
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

    /// Whether this replica hears the others' notifications (`false`: its
    /// listener is down, or `LISTEN` does not work and it polls the change
    /// log instead).
    pub fn notifications(&self) -> bool {
        self.feed.notifications()
    }

    /// Runs one statement on a pooled connection: the connection within
    /// the pool's timeout, the answer within the call timeout. A statement
    /// whose answer does not come in time is cancelled on the server and
    /// its connection discarded, never handed out again with a statement
    /// still running on it; so is one whose connection fails under it.
    /// Either may have committed ([`Failed::Unknown`]).
    async fn run(&self, statement: Statement<'_>) -> Result<Vec<Row>, Failed> {
        let deadline = tokio::time::Instant::now() + self.settings.call_timeout();
        let client = match tokio::time::timeout_at(deadline, self.pool.get()).await {
            Ok(Ok(client)) => client,
            Ok(Err(err)) => return Err(Failed::Refused(pool_error(err))),
            Err(_) => {
                return Err(Failed::Refused(StoreError::Unavailable(format!(
                    "no database connection within {:?}",
                    self.settings.call_timeout()
                ))))
            }
        };
        // Set once the statement may have reached the server.
        let sent = AtomicBool::new(false);
        let answer = tokio::time::timeout_at(deadline, async {
            match statement {
                Statement::Cached(sql, params) => {
                    let prepared = client.prepare_cached(sql).await?;
                    sent.store(true, Ordering::Relaxed);
                    client.query(&prepared, params).await
                }
                Statement::Typed(sql, params) => {
                    sent.store(true, Ordering::Relaxed);
                    client.query_typed(sql, params).await
                }
            }
        })
        .await;
        let sent = sent.load(Ordering::Relaxed);
        match answer {
            Ok(Ok(rows)) => Ok(rows),
            // The server answered: the statement's transaction rolled back.
            Ok(Err(err)) if err.as_db_error().is_some() || !sent => {
                Err(Failed::Refused(pg_error(err)))
            }
            Ok(Err(err)) => {
                let why = pg_error(err).to_string();
                self.discard(client);
                Err(Failed::Unknown(why))
            }
            Err(_) => {
                self.discard(client);
                let why = format!(
                    "the database did not answer within {:?}",
                    self.settings.call_timeout()
                );
                if sent {
                    Err(Failed::Unknown(why))
                } else {
                    Err(Failed::Refused(StoreError::Unavailable(why)))
                }
            }
        }
    }

    /// Takes a connection out of the pool for good, and cancels whatever
    /// still runs on it (in the background, within the connect timeout).
    fn discard(&self, client: deadpool_postgres::Object) {
        let token = client.cancel_token();
        drop(deadpool_postgres::Object::take(client));
        let (tls, within) = (self.tls.clone(), self.settings.connect_timeout);
        tokio::spawn(async move {
            match tokio::time::timeout(within, token.cancel_query(tls)).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => tracing::debug!(cause = %err, "cannot cancel a late statement"),
                Err(_) => tracing::debug!("cancelling a late statement timed out"),
            }
        });
    }

    /// Runs one reading statement.
    async fn query(
        &self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        self.run(Statement::Cached(sql, params))
            .await
            .map_err(|failed| match failed {
                Failed::Refused(err) => err,
                Failed::Unknown(why) => StoreError::Unavailable(why),
            })
    }

    /// Runs one writing statement of `name` (its own transaction, committed
    /// when it returns) whose change carries `token`: the row it returned,
    /// or none when its condition did not hold. A write whose outcome is
    /// unknown is settled ([`PostgresStore::settle`]).
    async fn write(
        &self,
        name: &str,
        token: i64,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Written>, StoreError> {
        #[cfg(any(test, feature = "failpoints"))]
        if self.ack_before_commit {
            let rows = self.write_acked_early(sql, params).await?;
            return Ok(rows.first().map(Written::of));
        }
        let seen = self.feed.high();
        match self.run(Statement::Cached(sql, params)).await {
            Ok(rows) => Ok(rows.first().map(Written::of)),
            Err(Failed::Refused(err)) => Err(err),
            Err(Failed::Unknown(why)) => self.settle(name, token, seen, why).await.map(Some),
        }
    }

    /// Finds out whether a write whose answer was lost committed: waits
    /// until no write holds its row (the lost one holds it until it ends,
    /// and was cancelled), then looks for its change in the log by its
    /// token. Found: the write committed. Not found: it was rolled back or
    /// may still commit, which cannot be told apart; the caller hears
    /// UNAVAILABLE saying that the outcome is unknown, never that the
    /// write did not happen.
    async fn settle(
        &self,
        name: &str,
        token: i64,
        seen: i64,
        why: String,
    ) -> Result<Written, StoreError> {
        let within = self.settings.settle_timeout();
        let found = tokio::time::timeout(within, async {
            let client = self.pool.get().await.map_err(pool_error)?;
            // A lock wait that runs out (lock_timeout) still leaves the
            // log to look at.
            let lock = client
                .prepare_cached(SETTLE_LOCK_SQL)
                .await
                .map_err(pg_error)?;
            let _ = client.query(&lock, &[&name]).await;
            let find = client
                .prepare_cached(SETTLE_FIND_SQL)
                .await
                .map_err(pg_error)?;
            let rows = client
                .query(&find, &[&seen, &token])
                .await
                .map_err(pg_error)?;
            Ok::<_, StoreError>(rows.first().map(|row| Written {
                seq: row.get(0),
                revision: row.get(1),
                previous_deadline: row.get(2),
                request_id: None,
            }))
        })
        .await;
        match found {
            Ok(Ok(Some(written))) => {
                tracing::warn!(name, cause = %why, "a write whose answer was lost had committed");
                Ok(written)
            }
            Ok(Ok(None)) => Err(unknown(name, &why)),
            Ok(Err(err)) => Err(unknown(name, &format!("{why}; then {err}"))),
            Err(_) => Err(unknown(
                name,
                &format!("{why}; then its outcome could not be read within {within:?}"),
            )),
        }
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
        let limit = self.settings.call_timeout();
        tokio::time::timeout(limit, async {
            let client = self.pool.get().await.map_err(pool_error)?;
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
        .map_err(|_| StoreError::Unavailable(format!("no answer within {limit:?}")))?
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

    /// A conditional write of `name` found another revision: a done copy
    /// of it in the cache is stale (the record was deleted and created
    /// again, and the feed has not said so yet), so it goes.
    fn conflict(&self, name: &str) -> StoreError {
        self.cache.remove(name);
        StoreError::Conflict
    }
}

/// A write's outcome is unknown (see [`PostgresStore::settle`]).
fn unknown(name: &str, why: &str) -> StoreError {
    StoreError::Unavailable(format!(
        "the outcome of a write to {name} is unknown (it may or may not have committed; \
         read the operation to find out): {why}"
    ))
}

/// A random token for one write.
fn token() -> i64 {
    let mut bytes = [0u8; 8];
    let _ = getrandom::fill(&mut bytes);
    i64::from_le_bytes(bytes)
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
            .run(Statement::Typed(&sql, &params.typed()))
            .await
            .map_err(|failed| match failed {
                Failed::Refused(err) => err,
                Failed::Unknown(why) => StoreError::Unavailable(why),
            })?;
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
            let (time_ns, slot, token) = (nanos(time), self.slot(), token());
            let params = [
                &[
                    &record.name as &(dyn ToSql + Sync),
                    &columns.parent,
                    &columns.request_id,
                ][..],
                &columns.written(),
                &[&time_ns, &slot, &token],
            ]
            .concat();
            if let Some(written) = self.write(&record.name, token, INSERT_SQL, &params).await? {
                record.revision = revision_of(written.revision)?;
                self.feed.committed(Logged {
                    seq: written.seq,
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
        let (cause_name, time_ns, slot, token) =
            (cause.as_str(), nanos(time), self.slot(), token());
        let params = [
            &[&record.name as &(dyn ToSql + Sync), &expected][..],
            &columns.written(),
            &[&cause_name, &time_ns, &slot, &token],
        ]
        .concat();
        let Some(written) = self.write(&record.name, token, UPDATE_SQL, &params).await? else {
            return Err(self.conflict(&record.name));
        };
        let revision = revision_of(written.revision)?;
        self.feed.committed(Logged {
            seq: written.seq,
            change: Change {
                name: Arc::from(record.name.as_str()),
                cause,
                previous_deadline: written.previous_deadline.map(from_nanos),
                deadline: columns.next_deadline.map(from_nanos),
                time,
            },
        });
        // Settled writes do not know the stored request id: not cached.
        if let (true, Some(request_id)) = (record.done(), written.request_id) {
            record.revision = revision;
            record.request_id = request_id.and_then(|r| String::from_utf8(r).ok());
            self.cache_done(ticket, &record);
        }
        Ok(revision)
    }

    async fn delete(&self, name: &str, expected: Revision, cause: Cause) -> Result<(), StoreError> {
        let expected = i64::try_from(expected).map_err(|_| StoreError::Conflict)?;
        let time = self.clock.now();
        let token = token();
        let params: [&(dyn ToSql + Sync); 6] = [
            &name,
            &expected,
            &cause.as_str(),
            &nanos(time),
            &self.slot(),
            &token,
        ];
        let Some(written) = self.write(name, token, DELETE_SQL, &params).await? else {
            return Err(self.conflict(name));
        };
        self.feed.committed(Logged {
            seq: written.seq,
            change: Change {
                name: Arc::from(name),
                cause,
                previous_deadline: written.previous_deadline.map(from_nanos),
                deadline: None,
                time,
            },
        });
        Ok(())
    }

    async fn deadlines(&self) -> Result<Vec<Deadline>, StoreError> {
        let rows = self.query(DEADLINES_SQL, &[&true]).await?;
        Ok(deadlines(&rows))
    }

    async fn running_deadlines(&self) -> Result<Vec<Deadline>, StoreError> {
        let rows = self.query(DEADLINES_SQL, &[&false]).await?;
        Ok(deadlines(&rows))
    }

    async fn claim_due(
        &self,
        now: SystemTime,
        limit: usize,
        hold: Duration,
    ) -> Result<Option<Claimed>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let until = now + hold;
        let rows = self
            .query(CLAIM_SQL, &[&nanos(now), &limit, &nanos(until)])
            .await?;
        let mut claimed = Claimed {
            until: Some(until),
            ..Claimed::default()
        };
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

    async fn release(&self, names: &[Arc<str>], until: SystemTime) -> Result<(), StoreError> {
        if names.is_empty() {
            return Ok(());
        }
        let names: Vec<&str> = names.iter().map(|n| &**n).collect();
        self.query(RELEASE_SQL, &[&names, &nanos(until)]).await?;
        Ok(())
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

/// A stored revision as the store trait counts them.
fn revision_of(revision: i64) -> Result<Revision, StoreError> {
    u64::try_from(revision)
        .map_err(|_| StoreError::Internal("a stored revision is negative".into()))
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
