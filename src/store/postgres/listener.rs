//! The change feed across replicas.
//!
//! Every write appends a row to `opsd_changes` in its own transaction (the
//! same single statement), and the log is the truth. Each replica delivers
//! every change once to its `Store::subscribe` broadcast, from three
//! sources, deduplicated by the log's sequence number:
//!
//! 1. Its own commits, at once, before the write is acknowledged.
//! 2. Notifications: after its commits, each replica sends `NOTIFY`s
//!    (`pg_notify`) on the store's channel, batched (whatever committed
//!    while the previous batch was being sent goes in the next one, several
//!    changes per payload, each payload under PostgreSQL's 8000-byte limit):
//!    completions, cancellations and deletions carry the change itself,
//!    and progress (`Updated`) and creations only ask for a poll, at most
//!    one such hint per 50 ms. A notification is a latency hint: it is lost
//!    while a listener is disconnected, or when a replica dies between its
//!    commit and its `NOTIFY`.
//! 3. Polls of the log: after every (re)connect, on a hint, and every
//!    second as a backstop (also while the listener is down, through the
//!    pool). A poll reads the rows after the highest sequence seen plus the
//!    "gaps" below it: sequence numbers not yet visible, which belong to
//!    transactions still in flight or rolled back.
//!
//! Catching up rests on transaction ids, not on timing guesses:
//!
//! - A writer has its transaction id before it takes its sequence number
//!   (its change row is inserted after its operation row, and records the
//!   id). So the transaction behind a gap found by a poll started before
//!   that poll's snapshot, and its id is below the next id to be assigned
//!   then (read with the poll). A gap is abandoned (rolled back) only once
//!   a later poll's snapshot has no transaction below that id in flight
//!   (`pg_snapshot_xmin`) and the gap is still invisible, however long the
//!   transaction ran.
//! - At start-up, the transactions in flight (the snapshot's, and those
//!   above its `xmax`) are remembered by id; when one ends, its change (if
//!   it wrote one below the start-up mark) is read by that id.
//! - Pruning the log (any replica, changes older than [`KEEP_CHANGES`])
//!   raises a watermark in `opsd_meta` in the same transaction. A replica
//!   whose highest sequence seen, or one of whose gaps, is below the
//!   watermark may have missed changes: it emits a [`Cause::Resync`]
//!   marker (every consumer re-reads what it follows, and the read cache is
//!   cleared).
//!
//! So no Wait sleeps past a completion and no worker misses a cancel, even
//! across a listener outage.
//!
//! The listener is one dedicated `tokio_postgres` connection outside the
//! pool (the pool's recycling would drop its notifications), driven by
//! `poll_message` in its own task; the backstop poll doubles as its ping,
//! so a half-open socket is found within the poll timeout, and it
//! reconnects with jittered backoff (50 ms to 500 ms). When `LISTEN` does
//! not work (a standby, or pgbouncer in transaction mode), a probe
//! notification sent from a pooled connection right after `LISTEN` never
//! comes back (sent on the listening connection itself, it would come back
//! through pgbouncer, which runs both on the same server connection): the
//! replica warns and polls every 250 ms instead. Every statement of the
//! listener is bounded by the poll timeout.
//!
//! Health is the feed's: a replica whose last poll failed is not serving.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::{Duration, Instant, SystemTime},
};

use deadpool_postgres::Pool;
use sha2::{Digest, Sha256};
use tokio::sync::{broadcast, mpsc, watch, Notify};
use tokio_postgres::{AsyncMessage, Client, Row, Statement};
use tokio_util::sync::CancellationToken;

use super::{
    pool::{connect, pg_error, pool_error, Target},
    sql::from_nanos,
    PostgresSettings,
};
use crate::{
    clock::OffsetClock,
    store::{cache::RecordCache, Cause, Change, StoreError},
};

/// How long the log keeps changes; a replica that could not read it for
/// longer resynchronises (the pruning watermark tells it).
pub(super) const KEEP_CHANGES: Duration = Duration::from_secs(5 * 60);
/// The most gaps followed at once; more (a burst of failed transactions)
/// resynchronises.
const MAX_GAPS: usize = 100_000;
/// Log rows read per poll query.
const POLL_ROWS: i64 = 5000;
/// The backstop poll, while notifications work.
const POLL_EVERY: Duration = Duration::from_secs(1);
/// The poll when `LISTEN` does not work.
const FALLBACK_POLL_EVERY: Duration = Duration::from_millis(250);
/// Hints that ask the other replicas to poll: at most one per this.
const HINT_EVERY: Duration = Duration::from_millis(50);
/// The largest notification payload sent (PostgreSQL's limit is 8000).
const MAX_PAYLOAD: usize = 7900;
/// How long a probe notification may take to come back after `LISTEN`.
const PROBE_WAIT: Duration = Duration::from_secs(2);
/// How often the log is pruned, and the clock's offset measured.
const CHORES_EVERY: Duration = Duration::from_secs(30);
/// Round trips measured to find the clock's offset (the quickest counts).
const CLOCK_SAMPLES: usize = 5;

/// A poll: the rows after `$1` and the gaps `$2` (at most `$3`), in order,
/// then one row of what the poll's snapshot tells: its `xmin` and `xmax`,
/// the next transaction id to be assigned (`age()` of a transaction id
/// counts from it when the reader has none of its own), the transactions
/// in flight below `xmax`, the pruning watermark, and the highest sequence.
const POLL_SQL: &str = "\
WITH snap AS (SELECT pg_current_snapshot() AS s)
(SELECT seq, name, cause, previous_deadline, deadline, time_ns, xid,
    NULL::int8 AS xmin, NULL::int8 AS xmax, NULL::int8 AS next, NULL::int8[] AS xip,
    NULL::int8 AS pruned, NULL::int8 AS top
  FROM opsd_changes WHERE seq > $1 OR seq = ANY($2) ORDER BY seq LIMIT $3)
UNION ALL
SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL,
  pg_snapshot_xmin(s)::text::int8, pg_snapshot_xmax(s)::text::int8,
  pg_snapshot_xmin(s)::text::int8
    + age((pg_snapshot_xmin(s)::text::int8 % 4294967296)::text::xid),
  ARRAY(SELECT x::text::int8 FROM pg_snapshot_xip(s) AS x),
  (SELECT ('x' || encode(value, 'hex'))::bit(64)::int8 FROM opsd_meta
    WHERE key = 'pruned-seq'),
  (SELECT coalesce(max(seq), 0) FROM opsd_changes)
FROM snap";

/// The changes of transactions that were in flight when this replica
/// started and have ended since, at or below the start-up mark.
const ENDED_SQL: &str = "SELECT seq, name, cause, previous_deadline, deadline, time_ns, xid \
     FROM opsd_changes WHERE xid = ANY($1) AND seq <= $2 ORDER BY seq";

/// What a poll's snapshot tells (see [`POLL_SQL`]).
#[derive(Clone, Debug, Default, PartialEq)]
struct Horizon {
    /// No transaction below it was in flight.
    xmin: i64,
    /// Transactions at or above it were in flight, or not begun.
    xmax: i64,
    /// The next transaction id to be assigned, read after the snapshot.
    next: i64,
    /// The transactions in flight below `xmax`.
    xip: Vec<i64>,
    /// Every change at or below it may have been pruned.
    pruned: i64,
    /// The highest sequence visible.
    top: i64,
}

impl Horizon {
    fn of(row: &Row) -> Self {
        Self {
            xmin: row.get(7),
            xmax: row.get(8),
            next: row.get(9),
            xip: row.get(10),
            pruned: row.get::<_, Option<i64>>(11).unwrap_or(0),
            top: row.get(12),
        }
    }

    /// Whether transaction `xid` had ended when the snapshot was taken.
    fn ended(&self, xid: i64) -> bool {
        xid < self.xmin || (xid < self.xmax && !self.xip.contains(&xid))
    }
}

/// What this replica has delivered of the log.
#[derive(Default)]
struct Delivered {
    /// Every sequence at or below it is delivered or in `gaps`.
    high: i64,
    /// Sequences below `high` not seen yet, each with the next transaction
    /// id of the poll that found it: once no transaction below that id is
    /// in flight, an invisible gap was rolled back.
    gaps: BTreeMap<i64, i64>,
    /// Sequences above `high` already delivered (this replica's commits,
    /// notifications).
    ahead: BTreeSet<i64>,
    /// Transactions in flight when this replica started, whose changes may
    /// lie at or below `mark` (see the module docs).
    starting: BTreeSet<i64>,
    /// `high` at start-up.
    mark: i64,
}

/// How long after its last successful poll the feed still vouches for the
/// read cache.
const FRESH_FOR: Duration = Duration::from_millis(2500);

/// A change as the log and the notifications carry it.
pub(super) struct Logged {
    pub(super) seq: i64,
    pub(super) change: Change,
}

/// A change as a poll reads it, with its writer's transaction id.
struct Read {
    logged: Logged,
    xid: i64,
}

impl Logged {
    fn from_row(row: &Row) -> Result<Self, StoreError> {
        let cause: String = row.get(2);
        let cause = Cause::from_name(&cause)
            .ok_or_else(|| StoreError::Internal(format!("unknown change cause {cause:?}")))?;
        Ok(Self {
            seq: row.get(0),
            change: Change {
                name: Arc::from(row.get::<_, &str>(1)),
                cause,
                previous_deadline: row.get::<_, Option<i64>>(3).map(from_nanos),
                deadline: row.get::<_, Option<i64>>(4).map(from_nanos),
                time: from_nanos(row.get(5)),
            },
        })
    }
    /// One line of a notification: `seq cause previous deadline time name`.
    fn line(&self) -> String {
        let n = |t: Option<SystemTime>| t.map_or("-".into(), |t| super::sql::nanos(t).to_string());
        format!(
            "{} {} {} {} {} {}",
            self.seq,
            self.change.cause.as_str(),
            n(self.change.previous_deadline),
            n(self.change.deadline),
            super::sql::nanos(self.change.time),
            self.change.name
        )
    }

    fn parse(line: &str) -> Option<Self> {
        let mut parts = line.splitn(6, ' ');
        let seq = parts.next()?.parse().ok()?;
        let cause = Cause::from_name(parts.next()?)?;
        let time = |s: &str| -> Option<Option<SystemTime>> {
            match s {
                "-" => Some(None),
                n => n.parse().ok().map(|n| Some(from_nanos(n))),
            }
        };
        let previous_deadline = time(parts.next()?)?;
        let deadline = time(parts.next()?)?;
        let at = from_nanos(parts.next()?.parse().ok()?);
        let name = parts.next()?;
        Some(Self {
            seq,
            change: Change {
                name: Arc::from(name),
                cause,
                previous_deadline,
                deadline,
                time: at,
            },
        })
    }
}

/// What the notifier sends next.
#[derive(Default)]
struct Outbox {
    lines: Vec<String>,
    /// A poll hint is wanted.
    hint: bool,
}

/// The feed of one replica: deduplication, the broadcast, the read cache's
/// invalidation, health, and the outbox of notifications.
pub(super) struct Feed {
    /// The store's broadcast; every change goes out once.
    sender: broadcast::Sender<Change>,
    /// What was delivered (std mutex: no await under it; the broadcast is
    /// sent under it, so the feed's order is the delivery order).
    delivered: Mutex<Delivered>,
    /// Done records; deletions and resyncs remove them.
    cache: Arc<RecordCache>,
    health: watch::Sender<bool>,
    /// Notifications to send (std mutex: pushes and swaps only).
    outbox: Mutex<Outbox>,
    /// Wakes the notifier.
    outbox_ready: Notify,
    /// When a poll last succeeded, in milliseconds since `started` (0:
    /// never): an atomic, so a Get checks freshness without a lock.
    polled_at: AtomicU64,
    started: Instant,
    /// The listener's connection is up (notifications arrive, or it polls
    /// every 250 ms where they cannot).
    listening: AtomicBool,
    /// Its probe notification came back: the others' notifications arrive.
    notifying: AtomicBool,
}

/// Marks the listener up while it lives.
struct Listening<'a>(&'a Feed);

impl Drop for Listening<'_> {
    fn drop(&mut self) {
        self.0.listening.store(false, Ordering::Relaxed);
        self.0.notifying.store(false, Ordering::Relaxed);
    }
}

impl Feed {
    pub(super) fn new(sender: broadcast::Sender<Change>, cache: Arc<RecordCache>) -> Arc<Self> {
        Arc::new(Self {
            sender,
            delivered: Mutex::new(Delivered::default()),
            cache,
            health: watch::Sender::new(true),
            outbox: Mutex::new(Outbox::default()),
            outbox_ready: Notify::new(),
            polled_at: AtomicU64::new(0),
            started: Instant::now(),
            listening: AtomicBool::new(false),
            notifying: AtomicBool::new(false),
        })
    }

    fn delivered(&self) -> MutexGuard<'_, Delivered> {
        self.delivered.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn health(&self) -> watch::Receiver<bool> {
        self.health.subscribe()
    }

    /// The highest sequence polled: a write sent after this reads it
    /// commits its change above it.
    pub(super) fn high(&self) -> i64 {
        self.delivered().high
    }

    /// Whether the others' notifications reach this replica.
    pub(super) fn notifications(&self) -> bool {
        self.listening.load(Ordering::Relaxed) && self.notifying.load(Ordering::Relaxed)
    }

    /// Whether the read cache may answer: the listener is up (a deletion
    /// elsewhere reaches it in milliseconds) and a poll succeeded lately (a
    /// notification lost with a replica that died is found within a
    /// second). While the listener is down, reads go to the database.
    pub(super) fn fresh(&self) -> bool {
        if !self.listening.load(Ordering::Relaxed) {
            return false;
        }
        let at = self.polled_at.load(Ordering::Relaxed);
        let now = self.started.elapsed().as_millis() as u64;
        at != 0 && now.saturating_sub(at) < FRESH_FOR.as_millis() as u64
    }

    /// Delivers `logged` unless it already was; true when it was new.
    fn deliver(&self, delivered: &mut Delivered, logged: Logged, broadcast: bool) -> bool {
        let seq = logged.seq;
        let new = if seq <= delivered.high {
            delivered.gaps.remove(&seq).is_some()
        } else {
            delivered.ahead.insert(seq)
        };
        if new && broadcast {
            self.publish(logged.change);
        }
        new
    }

    /// Applies a change to the cache and sends it out.
    fn publish(&self, change: Change) {
        match change.cause {
            Cause::Deleted | Cause::Expired => self.cache.remove(&change.name),
            Cause::Resync => self.cache.clear(),
            _ => {}
        }
        // No subscribers is fine: nobody is waiting.
        let _ = self.sender.send(change);
    }

    /// This replica committed `logged`: deliver it now, and tell the others.
    pub(super) fn committed(&self, logged: Logged) {
        let line = match logged.change.cause {
            Cause::Created | Cause::Updated => None,
            _ => Some(logged.line()),
        };
        {
            let mut delivered = self.delivered();
            self.deliver(&mut delivered, logged, true);
        }
        {
            let mut outbox = self.outbox.lock().unwrap_or_else(|p| p.into_inner());
            match line {
                Some(line) => outbox.lines.push(line),
                None => outbox.hint = true,
            }
        }
        self.outbox_ready.notify_one();
    }

    /// A notification's payload: changes, a poll hint, or a probe.
    fn notified(&self, payload: &str, probe: Option<&str>) -> Notified {
        let mut result = Notified::default();
        let mut delivered = self.delivered();
        for line in payload.lines() {
            if line == "p" {
                result.poll = true;
            } else if let Some(token) = line.strip_prefix("probe ") {
                result.probe |= probe == Some(token);
            } else if let Some(logged) = Logged::parse(line) {
                self.deliver(&mut delivered, logged, true);
            } else {
                tracing::debug!(line, "ignoring a malformed change notification");
            }
        }
        result
    }

    /// The arguments of the next poll: the high mark and the gaps.
    fn poll_args(&self) -> (i64, Vec<i64>) {
        let delivered = self.delivered();
        (delivered.high, delivered.gaps.keys().copied().collect())
    }

    /// The first, silent poll: what the log holds counts as delivered
    /// (nobody follows the feed yet); the transactions in flight are
    /// remembered (see the module docs).
    fn started(&self, horizon: &Horizon) {
        let mut delivered = self.delivered();
        delivered.high = horizon.top.max(horizon.pruned);
        delivered.mark = delivered.high;
        delivered.starting = horizon
            .xip
            .iter()
            .copied()
            .chain(horizon.xmax..horizon.next)
            .collect();
    }

    /// Applies one poll: its rows (in sequence order; `complete` when the
    /// poll was not cut short by its row limit) and its snapshot's horizon.
    /// Returns the start-up transactions that have ended since, whose
    /// changes are to be read ([`Feed::ended`]).
    fn polled(
        &self,
        rows: Vec<Read>,
        horizon: &Horizon,
        complete: bool,
        broadcast: bool,
    ) -> Vec<i64> {
        let mut delivered = self.delivered();
        // Pruned past what this replica has seen: changes may be lost.
        let pruned_gap = delivered
            .gaps
            .first_key_value()
            .is_some_and(|(seq, _)| *seq <= horizon.pruned);
        if horizon.pruned > delivered.high || pruned_gap {
            tracing::warn!(
                high = delivered.high,
                pruned = horizon.pruned,
                "the change log was pruned past what this replica has seen; resynchronising"
            );
            delivered.gaps.retain(|seq, _| *seq > horizon.pruned);
            delivered.ahead.retain(|seq| *seq > horizon.pruned);
            delivered.high = delivered.high.max(horizon.pruned);
            if broadcast {
                self.publish(Change::resync(SystemTime::now()));
            }
        }
        let last = rows.last().map(|r| r.logged.seq);
        let mut seen = BTreeSet::new();
        for read in rows {
            seen.insert(read.logged.seq);
            delivered.starting.remove(&read.xid);
            self.deliver(&mut delivered, read.logged, broadcast);
        }
        // Gaps still invisible once every transaction that could own them
        // has ended were rolled back (only those the poll covered).
        let covered = if complete {
            i64::MAX
        } else {
            last.unwrap_or(0)
        };
        delivered.gaps.retain(|seq, owner_below| {
            *seq > covered || *owner_below > horizon.xmin || seen.contains(seq)
        });
        if let Some(max) = last.filter(|max| *max > delivered.high) {
            let span = usize::try_from(max - delivered.high).unwrap_or(usize::MAX);
            if span > MAX_GAPS {
                tracing::warn!(span, "the change log jumped; resynchronising");
                delivered.gaps.clear();
                delivered.ahead.clear();
                delivered.high = max;
                if broadcast {
                    self.publish(Change::resync(SystemTime::now()));
                }
            } else {
                for seq in delivered.high + 1..max {
                    if !seen.contains(&seq) && !delivered.ahead.contains(&seq) {
                        delivered.gaps.insert(seq, horizon.next);
                    }
                }
                delivered.ahead = delivered.ahead.split_off(&(max + 1));
                delivered.high = max;
            }
        }
        if delivered.gaps.len() > MAX_GAPS {
            tracing::warn!(
                gaps = delivered.gaps.len(),
                "too many changes in flight; resynchronising"
            );
            delivered.gaps.clear();
            if broadcast {
                self.publish(Change::resync(SystemTime::now()));
            }
        }
        delivered
            .starting
            .iter()
            .copied()
            .filter(|xid| horizon.ended(*xid))
            .collect()
    }

    /// The changes of start-up transactions that ended (`xids`), read by
    /// their ids: those at or below the start-up mark were never delivered
    /// (a poll reads only above it and the gaps; a notification below it
    /// is dropped), and are now, once.
    fn ended(&self, xids: &[i64], rows: Vec<Read>) {
        let mut delivered = self.delivered();
        for xid in xids {
            delivered.starting.remove(xid);
        }
        for read in rows {
            let seq = read.logged.seq;
            if seq <= delivered.mark && !delivered.gaps.contains_key(&seq) {
                self.publish(read.logged.change);
            }
        }
    }

    /// A poll succeeded: report freshness and health.
    fn poll_succeeded(&self) {
        let millis = self.started.elapsed().as_millis() as u64;
        self.polled_at.store(millis.max(1), Ordering::Relaxed);
        self.health
            .send_if_modified(|healthy| !std::mem::replace(healthy, true));
    }

    fn poll_failed(&self, err: &StoreError) {
        let changed = self
            .health
            .send_if_modified(|healthy| std::mem::replace(healthy, false));
        if changed {
            tracing::error!(cause = %err, "the database is unreachable: not serving");
        }
    }
}

#[derive(Default)]
struct Notified {
    poll: bool,
    probe: bool,
}

/// What the feed's tasks need besides the feed.
#[derive(Clone)]
pub(super) struct FeedContext {
    pub(super) feed: Arc<Feed>,
    pub(super) pool: Pool,
    pub(super) target: Target,
    pub(super) settings: PostgresSettings,
    /// The notification channel of this store's schema.
    pub(super) channel: String,
    /// Kept in step with the database's clock, when the store owns it.
    pub(super) clock: Option<OffsetClock>,
    pub(super) stop: CancellationToken,
}

/// The notification channel of the store in `schema`: deployments in other
/// schemas of the same database do not hear each other. A hash, since a
/// channel name is at most 63 bytes and a schema's name may be as long.
pub(super) fn channel(schema: &str) -> String {
    let digest = Sha256::digest(schema.as_bytes());
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("opsd_changes_{hex}")
}

/// Runs `query` within `limit`; past it, the connection is given up.
async fn within<T>(
    limit: Duration,
    what: &'static str,
    query: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(limit, query)
        .await
        .map_err(|_| StoreError::Unavailable(format!("{what} timed out after {limit:?}")))?
        .map_err(pg_error)
}

impl FeedContext {
    /// How long a poll may take before the connection is given up.
    fn poll_timeout(&self) -> Duration {
        self.settings.statement_timeout.min(Duration::from_secs(2))
    }

    /// One poll query: its rows and its snapshot's horizon.
    async fn read(
        &self,
        client: &Client,
        statement: &Statement,
    ) -> Result<(Vec<Read>, Horizon, bool), StoreError> {
        let (high, gaps) = self.feed.poll_args();
        let rows = within(
            self.poll_timeout(),
            "the change log poll",
            client.query(statement, &[&high, &gaps, &POLL_ROWS]),
        )
        .await?;
        let mut read = Vec::with_capacity(rows.len());
        let mut horizon = None;
        for row in &rows {
            if row.get::<_, Option<i64>>(0).is_some() {
                read.push(Read {
                    logged: Logged::from_row(row)?,
                    xid: row.get(6),
                });
            } else {
                horizon = Some(Horizon::of(row));
            }
        }
        let horizon = horizon
            .ok_or_else(|| StoreError::Internal("the change log poll read no snapshot".into()))?;
        let complete = (read.len() as i64) < POLL_ROWS;
        Ok((read, horizon, complete))
    }

    /// Polls the log on `client` until caught up.
    async fn poll(&self, client: &Client, statement: &Statement) -> Result<(), StoreError> {
        loop {
            let (rows, horizon, complete) = self.read(client, statement).await?;
            let ended = self.feed.polled(rows, &horizon, complete, true);
            if !ended.is_empty() {
                let mark = self.feed.delivered().mark;
                let rows = within(
                    self.poll_timeout(),
                    "reading the changes of ended transactions",
                    client.query(ENDED_SQL, &[&ended, &mark]),
                )
                .await?;
                let read = rows
                    .iter()
                    .map(|row| {
                        Ok(Read {
                            logged: Logged::from_row(row)?,
                            xid: row.get(6),
                        })
                    })
                    .collect::<Result<Vec<_>, StoreError>>()?;
                self.feed.ended(&ended, read);
            }
            if complete {
                self.feed.poll_succeeded();
                return Ok(());
            }
        }
    }

    /// Polls through the pool (while the listener is down).
    async fn poll_pooled(&self) -> Result<(), StoreError> {
        let client = tokio::time::timeout(self.poll_timeout(), self.pool.get())
            .await
            .map_err(|_| StoreError::Unavailable("no database connection in time".into()))?
            .map_err(pool_error)?;
        let statement = within(
            self.poll_timeout(),
            "preparing the poll",
            client.prepare_cached(POLL_SQL),
        )
        .await?;
        self.poll(&client, &statement).await
    }

    async fn poll_pooled_and_report(&self) {
        if let Err(err) = self.poll_pooled().await {
            self.feed.poll_failed(&err);
        }
    }
}

/// The first, silent poll: what the log holds counts as delivered, and the
/// transactions in flight are remembered.
pub(super) async fn start(ctx: &FeedContext) -> Result<(), StoreError> {
    let client = ctx.pool.get().await.map_err(pool_error)?;
    let statement = client.prepare_cached(POLL_SQL).await.map_err(pg_error)?;
    let high = i64::MAX;
    let rows = client
        .query(&statement, &[&high, &Vec::<i64>::new(), &POLL_ROWS])
        .await
        .map_err(pg_error)?;
    let horizon = rows
        .iter()
        .find(|row| row.get::<_, Option<i64>>(0).is_none())
        .map(Horizon::of)
        .ok_or_else(|| StoreError::Internal("the change log poll read no snapshot".into()))?;
    ctx.feed.started(&horizon);
    ctx.feed.poll_succeeded();
    Ok(())
}

/// Starts the feed's tasks; they stop with `ctx.stop`.
pub(super) fn spawn(ctx: FeedContext) {
    tokio::spawn(listen(ctx.clone()));
    tokio::spawn(notify(ctx.clone()));
    tokio::spawn(chores(ctx));
}

/// A jittered delay in `[d/2, d]`.
fn jitter(d: Duration) -> Duration {
    let mut byte = [0u8; 1];
    let _ = getrandom::fill(&mut byte);
    d / 2 + d / 2 * u32::from(byte[0]) / 255
}

/// The listener: connects, listens, delivers notifications, polls, and
/// reconnects; polls through the pool while it is down.
async fn listen(ctx: FeedContext) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let connected = {
            let connecting = connect(&ctx.target, &ctx.settings);
            tokio::pin!(connecting);
            let mut tick = tokio::time::interval(POLL_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = ctx.stop.cancelled() => return,
                    connected = &mut connecting => break connected,
                    _ = tick.tick() => ctx.poll_pooled_and_report().await,
                }
            }
        };
        match connected {
            Ok((client, mut connection)) => {
                // The connection's task delivers notifications; it ends when
                // the connection does (unbounded: it must never stop polling
                // the connection, or the listener's own queries would stall).
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(async move {
                    loop {
                        match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                            Some(Ok(AsyncMessage::Notification(n))) => {
                                if tx.send(n.payload().to_owned()).is_err() {
                                    return;
                                }
                            }
                            Some(Ok(_)) => {}
                            Some(Err(err)) => {
                                tracing::debug!(cause = %err, "the change listener's connection failed");
                                return;
                            }
                            None => return,
                        }
                    }
                });
                backoff = Duration::from_millis(50);
                match serve(&ctx, client, rx).await {
                    Ok(()) => return,
                    Err(err) => {
                        tracing::warn!(cause = %err, "the change listener lost its connection; reconnecting");
                        ctx.poll_pooled_and_report().await;
                    }
                }
            }
            // Health follows the polls through the pool meanwhile.
            Err(err) => tracing::debug!(cause = %err, "the change listener cannot connect"),
        }
        tokio::select! {
            () = ctx.stop.cancelled() => return,
            () = tokio::time::sleep(jitter(backoff)) => {}
        }
        backoff = (backoff * 2).min(Duration::from_millis(500));
    }
}

/// One listener connection's life: LISTEN, probe, catch up, then deliver
/// notifications and poll until the connection fails (`Err`) or the store
/// stops (`Ok`).
async fn serve(
    ctx: &FeedContext,
    client: Client,
    mut notifications: mpsc::UnboundedReceiver<String>,
) -> Result<(), StoreError> {
    let statement = within(
        ctx.poll_timeout(),
        "preparing the poll",
        client.prepare(POLL_SQL),
    )
    .await?;
    let notifying = probe(ctx, &client, &mut notifications).await?;
    let every = if notifying {
        POLL_EVERY
    } else {
        FALLBACK_POLL_EVERY
    };
    ctx.poll(&client, &statement).await?;
    ctx.feed.listening.store(true, Ordering::Relaxed);
    ctx.feed.notifying.store(notifying, Ordering::Relaxed);
    let _listening = Listening(&ctx.feed);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = ctx.stop.cancelled() => return Ok(()),
            payload = notifications.recv() => {
                let Some(payload) = payload else {
                    return Err(StoreError::Unavailable("the listener's connection closed".into()));
                };
                if ctx.feed.notified(&payload, None).poll {
                    ctx.poll(&client, &statement).await?;
                }
            }
            _ = tick.tick() => {
                if let Err(err) = ctx.poll(&client, &statement).await {
                    ctx.feed.poll_failed(&err);
                    return Err(err);
                }
            }
        }
    }
}

/// Listens on the channel and checks that a notification sent from
/// another connection (a pooled one, as the other replicas' are) comes
/// back; false when it does not (polling instead), with a warning.
async fn probe(
    ctx: &FeedContext,
    client: &Client,
    notifications: &mut mpsc::UnboundedReceiver<String>,
) -> Result<bool, StoreError> {
    let fallback = |why: String| {
        tracing::warn!(
            cause = %why,
            "LISTEN/NOTIFY does not work on this connection (a standby, or pgbouncer in \
             transaction mode?): polling the change log every 250 ms instead"
        );
        Ok(false)
    };
    let limit = ctx.poll_timeout();
    let quoted = format!("\"{}\"", ctx.channel.replace('"', "\"\""));
    match tokio::time::timeout(limit, client.batch_execute(&format!("LISTEN {quoted}"))).await {
        Err(_) => {
            return Err(StoreError::Unavailable(format!(
                "LISTEN timed out after {limit:?}"
            )))
        }
        Ok(Err(err)) if err.as_db_error().is_some() => return fallback(err.to_string()),
        Ok(Err(err)) => return Err(pg_error(err)),
        Ok(Ok(())) => {}
    }
    let mut token = [0u8; 8];
    let _ = getrandom::fill(&mut token);
    let token = u64::from_le_bytes(token).to_string();
    let sent = tokio::time::timeout(limit, async {
        let pooled = ctx.pool.get().await.map_err(pool_error)?;
        Ok::<_, StoreError>(
            pooled
                .execute(
                    "SELECT pg_notify($1, $2)",
                    &[&ctx.channel, &format!("probe {token}")],
                )
                .await,
        )
    })
    .await;
    match sent {
        Err(_) => {
            return Err(StoreError::Unavailable(format!(
                "the probe notification could not be sent within {limit:?}"
            )))
        }
        Ok(Err(err)) => return Err(err),
        Ok(Ok(Err(err))) if err.as_db_error().is_some() => return fallback(err.to_string()),
        Ok(Ok(Err(err))) => return Err(pg_error(err)),
        Ok(Ok(Ok(_))) => {}
    }
    let give_up = tokio::time::Instant::now() + PROBE_WAIT;
    loop {
        tokio::select! {
            payload = notifications.recv() => {
                let Some(payload) = payload else {
                    return Err(StoreError::Unavailable("the listener's connection closed".into()));
                };
                if ctx.feed.notified(&payload, Some(&token)).probe {
                    return Ok(true);
                }
            }
            () = tokio::time::sleep_until(give_up) => {
                return fallback("the probe notification never arrived".into());
            }
        }
    }
}

/// Sends the outbox: changes in batches of payloads, and hints at most once
/// per [`HINT_EVERY`]. Failures are dropped: the others' polls find the
/// changes in the log.
async fn notify(ctx: FeedContext) {
    let mut last_hint: Option<tokio::time::Instant> = None;
    loop {
        let hint_at = {
            let outbox = ctx.feed.outbox.lock().unwrap_or_else(|p| p.into_inner());
            (outbox.hint && outbox.lines.is_empty())
                .then(|| last_hint.map(|at| at + HINT_EVERY))
                .flatten()
        };
        let pending = ctx.feed.outbox_ready.notified();
        tokio::select! {
            () = ctx.stop.cancelled() => return,
            () = pending => {}
            () = async {
                match hint_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
        let (lines, hint) = {
            let mut outbox = ctx.feed.outbox.lock().unwrap_or_else(|p| p.into_inner());
            let now = tokio::time::Instant::now();
            let hint_due = outbox.hint && last_hint.is_none_or(|at| now >= at + HINT_EVERY);
            if hint_due {
                outbox.hint = false;
                last_hint = Some(now);
            }
            (std::mem::take(&mut outbox.lines), hint_due)
        };
        if lines.is_empty() && !hint {
            continue;
        }
        let mut payloads = Vec::new();
        let mut current = String::new();
        for line in lines.into_iter().chain(hint.then(|| "p".to_owned())) {
            if !current.is_empty() && current.len() + 1 + line.len() > MAX_PAYLOAD {
                payloads.push(std::mem::take(&mut current));
            }
            if !current.is_empty() {
                current.push('\n');
            }
            current.push_str(&line);
        }
        if !current.is_empty() {
            payloads.push(current);
        }
        let send = || async {
            let client = ctx.pool.get().await.map_err(pool_error)?;
            // A hint need not survive a crash: its commit does not wait for
            // the disk (the change log's rows did).
            let statement = client
                .prepare_cached(
                    "SELECT pg_notify($1, p), set_config('synchronous_commit', 'off', true) \
                     FROM unnest($2::text[]) AS p",
                )
                .await
                .map_err(pg_error)?;
            client
                .execute(&statement, &[&ctx.channel, &payloads])
                .await
                .map_err(pg_error)
        };
        // Once more on failure (a connection the server just closed); then
        // the others' polls find the changes.
        for attempt in 0..2 {
            match tokio::time::timeout(ctx.settings.statement_timeout, send()).await {
                Ok(Ok(_)) => break,
                Ok(Err(err)) if attempt == 0 => {
                    tracing::debug!(cause = %err, "cannot send change notifications; retrying")
                }
                Ok(Err(err)) => {
                    tracing::debug!(cause = %err, "cannot send change notifications")
                }
                Err(_) => {
                    tracing::debug!("sending change notifications timed out");
                    break;
                }
            }
        }
    }
}

/// Prunes the change log (any replica; idempotent, no leader) and keeps
/// the clock in step with the database's.
async fn chores(ctx: FeedContext) {
    loop {
        tokio::select! {
            () = ctx.stop.cancelled() => return,
            () = tokio::time::sleep(jitter(CHORES_EVERY * 2)) => {}
        }
        if let Err(err) = prune(&ctx).await {
            tracing::debug!(cause = %err, "cannot prune the change log");
        }
        if let Some(clock) = &ctx.clock {
            if let Err(err) = step_clock(&ctx.pool, clock, ctx.poll_timeout()).await {
                tracing::debug!(cause = %err, "cannot read the database's clock");
            }
        }
    }
}

/// Deletes changes older than [`KEEP_CHANGES`], a batch at a time, and
/// raises the pruning watermark in the same transaction.
const PRUNE_SQL: &str = "\
WITH gone AS (
  DELETE FROM opsd_changes WHERE seq IN (
    SELECT seq FROM opsd_changes
    WHERE at < clock_timestamp() - make_interval(secs => $1)
    ORDER BY at LIMIT 10000 FOR UPDATE SKIP LOCKED)
  RETURNING seq
), marked AS (
  UPDATE opsd_meta SET value = int8send(greatest(
      ('x' || encode(value, 'hex'))::bit(64)::int8, (SELECT max(seq) FROM gone)))
  WHERE key = 'pruned-seq' AND EXISTS (SELECT 1 FROM gone)
)
SELECT count(*) FROM gone";

async fn prune(ctx: &FeedContext) -> Result<(), StoreError> {
    let limit = ctx.settings.statement_timeout;
    let client = tokio::time::timeout(limit, ctx.pool.get())
        .await
        .map_err(|_| StoreError::Unavailable("no database connection in time".into()))?
        .map_err(pool_error)?;
    let statement = within(
        limit,
        "preparing to prune",
        client.prepare_cached(PRUNE_SQL),
    )
    .await?;
    let keep = KEEP_CHANGES.as_secs_f64();
    loop {
        let deleted: i64 = within(limit, "pruning", client.query_one(&statement, &[&keep]))
            .await?
            .get(0);
        if deleted < 10000 {
            return Ok(());
        }
    }
}

/// Measures the database's `clock_timestamp()` against the system clock
/// and sets the offset: of [`CLOCK_SAMPLES`] round trips, the quickest
/// (its half is the most the reading can be off), within `limit`.
pub(super) async fn step_clock(
    pool: &Pool,
    clock: &OffsetClock,
    limit: Duration,
) -> Result<(), StoreError> {
    let measured = tokio::time::timeout(limit, async {
        let client = pool.get().await.map_err(pool_error)?;
        let statement = client
            .prepare_cached("SELECT clock_timestamp()")
            .await
            .map_err(pg_error)?;
        let mut best: Option<(Duration, i64)> = None;
        for _ in 0..CLOCK_SAMPLES {
            let before = SystemTime::now();
            let started = Instant::now();
            let db: SystemTime = client
                .query_one(&statement, &[])
                .await
                .map_err(pg_error)?
                .get(0);
            let trip = started.elapsed();
            let local = before + trip / 2;
            let offset = super::sql::nanos(db).saturating_sub(super::sql::nanos(local));
            if best.is_none_or(|(quickest, _)| trip < quickest) {
                best = Some((trip, offset));
            }
        }
        Ok::<_, StoreError>(best)
    })
    .await
    .map_err(|_| {
        StoreError::Unavailable(format!(
            "reading the database's clock took longer than {limit:?}"
        ))
    })??;
    if let Some((_, offset)) = measured {
        clock.set_offset(offset);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::cache::DEFAULT_CACHE_BYTES;

    fn change(name: &str, cause: Cause) -> Change {
        Change {
            name: Arc::from(name),
            cause,
            previous_deadline: Some(from_nanos(-5)),
            deadline: None,
            time: from_nanos(1_800_000_000_123_456_789),
        }
    }

    fn feed() -> (Arc<Feed>, broadcast::Receiver<Change>) {
        let (tx, rx) = broadcast::channel(1024);
        (
            Feed::new(tx, Arc::new(RecordCache::new(DEFAULT_CACHE_BYTES))),
            rx,
        )
    }

    fn logged(seq: i64, name: &str) -> Logged {
        Logged {
            seq,
            change: change(name, Cause::Completed),
        }
    }

    fn read(seq: i64, name: &str, xid: i64) -> Read {
        Read {
            logged: logged(seq, name),
            xid,
        }
    }

    /// A snapshot with `xmin`, nothing else in flight, and `next` as the
    /// next transaction id.
    fn horizon(xmin: i64, next: i64) -> Horizon {
        Horizon {
            xmin,
            xmax: xmin,
            next,
            ..Horizon::default()
        }
    }

    fn names(rx: &mut broadcast::Receiver<Change>) -> Vec<String> {
        std::iter::from_fn(|| rx.try_recv().ok())
            .map(|c| c.name.to_string())
            .collect()
    }

    #[test]
    fn notification_lines_round_trip() {
        let l = logged(42, "projects/p/operations/a");
        let back = Logged::parse(&l.line()).unwrap();
        assert_eq!(back.seq, 42);
        assert_eq!(back.change.name, l.change.name);
        assert_eq!(back.change.cause, Cause::Completed);
        assert_eq!(back.change.previous_deadline, l.change.previous_deadline);
        assert_eq!(back.change.deadline, None);
        assert_eq!(back.change.time, l.change.time);
        assert!(Logged::parse("1 nonsense - - 0 x").is_none());
        assert!(Logged::parse("").is_none());
    }

    #[test]
    fn every_change_is_delivered_once_whatever_brings_it() {
        let (feed, mut rx) = feed();
        feed.committed(logged(3, "a"));
        feed.notified(
            &format!("{}\n{}\np", logged(3, "a").line(), logged(5, "b").line()),
            None,
        );
        // The poll sees 1..=5 except 2 (in flight) and 4 (in flight).
        let h = horizon(100, 110);
        feed.polled(
            vec![read(1, "x", 90), read(3, "a", 91), read(5, "b", 92)],
            &h,
            true,
            true,
        );
        assert_eq!(names(&mut rx), ["a", "b", "x"]);
        assert_eq!(feed.poll_args(), (5, vec![2, 4]));
        // The gap fills in later, once.
        feed.polled(vec![read(4, "late", 105)], &h, true, true);
        feed.polled(vec![read(4, "late", 105)], &h, true, true);
        assert_eq!(names(&mut rx), ["late"]);
        assert_eq!(feed.poll_args(), (5, vec![2]));
    }

    #[test]
    fn a_gap_is_abandoned_only_once_its_transaction_cannot_be_in_flight() {
        let (feed, mut rx) = feed();
        // Found at a snapshot whose next transaction id was 110.
        feed.polled(vec![read(2, "b", 100)], &horizon(100, 110), true, true);
        assert_eq!(feed.poll_args(), (2, vec![1]));
        // However long it takes: transactions below 110 may still run.
        for xmin in [101, 105, 109] {
            feed.polled(vec![], &horizon(xmin, 120), true, true);
            assert_eq!(feed.poll_args().1, vec![1], "xmin {xmin}");
        }
        // A poll cut short by its row limit before the gap decides nothing.
        feed.polled(vec![], &horizon(110, 120), false, true);
        assert_eq!(feed.poll_args().1, vec![1]);
        // It committed after all: delivered, even this late.
        feed.polled(vec![read(1, "a", 104)], &horizon(109, 120), true, true);
        assert_eq!(names(&mut rx), ["b", "a"]);
        assert!(feed.poll_args().1.is_empty());
        // Another gap, rolled back: gone once no owner can be in flight.
        feed.polled(vec![read(4, "d", 121)], &horizon(115, 130), true, true);
        assert_eq!(feed.poll_args().1, vec![3]);
        feed.polled(vec![], &horizon(130, 131), true, true);
        assert!(feed.poll_args().1.is_empty());
    }

    #[test]
    fn changes_of_transactions_in_flight_at_start_up_are_found_by_their_ids() {
        let (feed, mut rx) = feed();
        // At start-up: the log's top is 50; 7 runs below xmax 9, and 9 and
        // 10 run above it (the next id is 11).
        feed.started(&Horizon {
            xmin: 7,
            xmax: 9,
            next: 11,
            xip: vec![7],
            pruned: 0,
            top: 50,
        });
        assert_eq!(feed.poll_args(), (50, vec![]));
        // 9 commits a change above the mark: polled as usual.
        let h = Horizon {
            xmin: 7,
            xmax: 12,
            next: 12,
            xip: vec![7, 10],
            pruned: 0,
            top: 51,
        };
        let ended = feed.polled(vec![read(51, "above", 9)], &h, true, true);
        assert!(ended.is_empty(), "{ended:?}");
        // 7 and 10 end; 7 wrote seq 40 (below the mark), 10 nothing.
        let h = horizon(12, 12);
        let ended = feed.polled(vec![], &h, true, true);
        assert_eq!(ended, [7, 10]);
        // A notification of seq 40 is no proof it was delivered.
        feed.notified(&logged(40, "below").line(), None);
        feed.ended(&ended, vec![read(40, "below", 7)]);
        assert_eq!(names(&mut rx), ["above", "below"]);
        assert!(feed.polled(vec![], &h, true, true).is_empty());
    }

    #[test]
    fn pruning_past_what_a_replica_saw_resynchronises_and_clears_the_cache() {
        let (feed, mut rx) = feed();
        feed.started(&Horizon {
            top: 9,
            ..horizon(5, 5)
        });
        feed.polled(vec![read(10, "a", 1)], &horizon(5, 6), true, true);
        assert_eq!(names(&mut rx), ["a"]);
        feed.cache.put(Arc::from("a"), Arc::from(&b"x"[..]));
        // Pruned below what it saw: nothing lost.
        let mut h = horizon(5, 6);
        h.pruned = 8;
        feed.polled(vec![], &h, true, true);
        assert!(rx.try_recv().is_err());
        // Pruned past it (another replica, while this one was cut off).
        h.pruned = 20;
        feed.polled(vec![read(25, "b", 2)], &h, true, true);
        assert_eq!(rx.try_recv().unwrap().cause, Cause::Resync);
        assert_eq!(rx.try_recv().unwrap().name.as_ref(), "b");
        assert!(feed.cache.get("a").is_none());
        // A gap the pruning may have taken resynchronises too (those of
        // the last poll are abandoned: no transaction below 6 runs).
        let mut h = horizon(6, 100);
        h.pruned = 20;
        feed.polled(vec![read(30, "c", 3)], &h, true, true);
        assert_eq!(names(&mut rx), ["c"]);
        assert_eq!(feed.poll_args().1, vec![26, 27, 28, 29]);
        h.pruned = 27;
        feed.polled(vec![], &h, true, true);
        assert_eq!(rx.try_recv().unwrap().cause, Cause::Resync);
        assert_eq!(feed.poll_args().1, vec![28, 29]);
        // A deletion removes the cached record.
        feed.cache.put(Arc::from("b"), Arc::from(&b"x"[..]));
        feed.committed(Logged {
            seq: 99,
            change: change("b", Cause::Deleted),
        });
        assert!(feed.cache.get("b").is_none());
    }

    #[test]
    fn schemas_get_their_own_channels_whatever_their_length() {
        let long = "s".repeat(63);
        let other = format!("{}t", "s".repeat(62));
        let (a, b) = (channel(&long), channel(&other));
        assert_ne!(a, b, "schemas that share a 62-byte prefix");
        assert!(a.len() <= 63 && b.len() <= 63);
        assert_eq!(a, channel(&long));
        assert_ne!(channel("public"), channel("Public"));
        assert!(a.starts_with("opsd_changes_"));
    }
}
