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
//!    creations, completions, cancellations and deletions carry the change
//!    itself, and progress (`Updated`) and creations only ask for a poll,
//!    at most one such hint per 50 ms. A notification is a latency hint: it
//!    is lost while a listener is disconnected, or when a replica dies
//!    between its commit and its `NOTIFY`.
//! 3. Polls of the log: after every (re)connect, on a hint, and every
//!    second as a backstop (also while the listener is down, through the
//!    pool). A poll reads the rows after the highest sequence seen plus the
//!    "gaps" below it: sequence numbers not yet visible, which belong to
//!    transactions still in flight (they are read again until they appear,
//!    or for [`GAP_TTL`], longer than any store statement may run, after
//!    which they were rolled back).
//!
//! So no Wait sleeps past a completion and no worker misses a cancel, even
//! across a listener outage. If a replica could not read the log for longer
//! than the log keeps changes ([`KEEP_CHANGES`], pruned by any replica),
//! it emits a [`Cause::Resync`] marker: every consumer re-reads what it
//! follows, and the read cache is cleared.
//!
//! The listener is one dedicated `tokio_postgres` connection outside the
//! pool (the pool's recycling would drop its notifications), driven by
//! `poll_message` in its own task; the backstop poll doubles as its ping,
//! so a half-open socket is found within the poll timeout, and it
//! reconnects with jittered backoff (50 ms to 500 ms). When `LISTEN` does
//! not work (a standby, or pgbouncer in transaction mode, where a probe
//! notification sent right after `LISTEN` never comes back), the replica
//! warns and polls every 250 ms instead.
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
/// longer resynchronises.
pub(super) const KEEP_CHANGES: Duration = Duration::from_secs(5 * 60);
/// How long a sequence number may stay invisible before it is taken for a
/// rolled-back transaction.
pub(super) const GAP_TTL: Duration = Duration::from_secs(120);
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
/// Changes below the highest sequence at start-up that are looked at once,
/// so transactions in flight while this replica starts are not missed.
const STARTUP_WINDOW: i64 = 1000;
/// How long a probe notification may take to come back after `LISTEN`.
const PROBE_WAIT: Duration = Duration::from_secs(2);
/// How often the log is pruned, and the clock's offset measured.
const CHORES_EVERY: Duration = Duration::from_secs(30);

const POLL_SQL: &str = "SELECT seq, name, cause, previous_deadline, deadline, time_ns \
     FROM opsd_changes WHERE seq > $1 OR seq = ANY($2) ORDER BY seq LIMIT $3";

/// What this replica has delivered of the log.
#[derive(Default)]
struct Delivered {
    /// Every sequence at or below it is delivered or in `gaps`.
    high: i64,
    /// Sequences below `high` not seen yet, with when they were first missed.
    gaps: BTreeMap<i64, Instant>,
    /// Sequences above `high` already delivered (this replica's commits,
    /// notifications).
    ahead: BTreeSet<i64>,
    /// When a poll last succeeded.
    polled: Option<Instant>,
}

/// How long after its last successful poll the feed still vouches for the
/// read cache.
const FRESH_FOR: Duration = Duration::from_millis(2500);

/// A change as the log and the notifications carry it.
pub(super) struct Logged {
    pub(super) seq: i64,
    pub(super) change: Change,
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
}

/// Marks the listener up while it lives.
struct Listening<'a>(&'a Feed);

impl Drop for Listening<'_> {
    fn drop(&mut self) {
        self.0.listening.store(false, Ordering::Relaxed);
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
        })
    }

    fn delivered(&self) -> MutexGuard<'_, Delivered> {
        self.delivered.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn health(&self) -> watch::Receiver<bool> {
        self.health.subscribe()
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

    /// Applies one poll's rows (ordered by sequence); `broadcast` is false
    /// for the silent first poll at start-up.
    fn polled(&self, rows: Vec<Logged>, broadcast: bool) {
        let now = Instant::now();
        let mut delivered = self.delivered();
        let Some(max) = rows.last().map(|r| r.seq) else {
            return;
        };
        let mut seen = BTreeSet::new();
        for logged in rows {
            seen.insert(logged.seq);
            self.deliver(&mut delivered, logged, broadcast);
        }
        if max > delivered.high {
            let span = usize::try_from(max - delivered.high).unwrap_or(usize::MAX);
            if span > MAX_GAPS {
                tracing::warn!(span, "the change log jumped; resynchronising");
                delivered.gaps.clear();
                delivered.ahead.clear();
                delivered.high = max;
                if broadcast {
                    self.publish(Change::resync(SystemTime::now()));
                }
                return;
            }
            for seq in delivered.high + 1..max {
                if !seen.contains(&seq) && !delivered.ahead.contains(&seq) {
                    delivered.gaps.insert(seq, now);
                }
            }
            delivered.ahead = delivered.ahead.split_off(&(max + 1));
            delivered.high = max;
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
    }

    /// A poll succeeded: expire old gaps, resynchronise after a long
    /// outage, and report health.
    fn poll_succeeded(&self, broadcast: bool) {
        let now = Instant::now();
        {
            let mut delivered = self.delivered();
            delivered
                .gaps
                .retain(|_, first| now.duration_since(*first) < GAP_TTL);
            let outage = delivered.polled.map(|at| now.duration_since(at));
            delivered.polled = Some(now);
            let millis = now.duration_since(self.started).as_millis() as u64;
            self.polled_at.store(millis.max(1), Ordering::Relaxed);
            if broadcast && outage.is_some_and(|o| o > KEEP_CHANGES - POLL_EVERY * 30) {
                tracing::warn!(
                    ?outage,
                    "the change log may have been pruned past this replica; resynchronising"
                );
                self.publish(Change::resync(SystemTime::now()));
            }
        }
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

impl FeedContext {
    /// How long a poll may take before the connection is given up.
    fn poll_timeout(&self) -> Duration {
        self.settings.statement_timeout.min(Duration::from_secs(2))
    }

    /// Polls the log on `client` until caught up.
    async fn poll(
        &self,
        client: &Client,
        statement: &Statement,
        broadcast: bool,
    ) -> Result<(), StoreError> {
        loop {
            let (high, gaps) = self.feed.poll_args();
            let rows = tokio::time::timeout(
                self.poll_timeout(),
                client.query(statement, &[&high, &gaps, &POLL_ROWS]),
            )
            .await
            .map_err(|_| StoreError::Unavailable("the change log poll timed out".into()))?
            .map_err(pg_error)?;
            let full = rows.len() as i64 == POLL_ROWS;
            let logged = rows
                .iter()
                .map(Logged::from_row)
                .collect::<Result<Vec<_>, _>>()?;
            self.feed.polled(logged, broadcast);
            if !full {
                self.feed.poll_succeeded(broadcast);
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
        let statement = client.prepare_cached(POLL_SQL).await.map_err(pg_error)?;
        self.poll(&client, &statement, true).await
    }

    async fn poll_pooled_and_report(&self) {
        if let Err(err) = self.poll_pooled().await {
            self.feed.poll_failed(&err);
        }
    }
}

/// The first, silent poll: the log's recent past counts as delivered.
pub(super) async fn start(ctx: &FeedContext) -> Result<(), StoreError> {
    let client = ctx.pool.get().await.map_err(pool_error)?;
    let max: i64 = client
        .query_one("SELECT coalesce(max(seq), 0) FROM opsd_changes", &[])
        .await
        .map_err(pg_error)?
        .get(0);
    ctx.feed.delivered().high = (max - STARTUP_WINDOW).max(0);
    let statement = client.prepare_cached(POLL_SQL).await.map_err(pg_error)?;
    ctx.poll(&client, &statement, false).await
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
    let statement = client.prepare(POLL_SQL).await.map_err(pg_error)?;
    let listening = probe(ctx, &client, &mut notifications).await?;
    let every = if listening {
        POLL_EVERY
    } else {
        FALLBACK_POLL_EVERY
    };
    ctx.poll(&client, &statement, true).await?;
    ctx.feed.listening.store(true, Ordering::Relaxed);
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
                    ctx.poll(&client, &statement, true).await?;
                }
            }
            _ = tick.tick() => {
                if let Err(err) = ctx.poll(&client, &statement, true).await {
                    ctx.feed.poll_failed(&err);
                    return Err(err);
                }
            }
        }
    }
}

/// Listens on the channel and checks that a notification comes back; false
/// when it does not (polling instead), with a warning.
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
    let quoted = format!("\"{}\"", ctx.channel.replace('"', "\"\""));
    if let Err(err) = client.batch_execute(&format!("LISTEN {quoted}")).await {
        if err.as_db_error().is_some() {
            return fallback(err.to_string());
        }
        return Err(pg_error(err));
    }
    let mut token = [0u8; 8];
    let _ = getrandom::fill(&mut token);
    let token = u64::from_le_bytes(token).to_string();
    if let Err(err) = client
        .execute(
            "SELECT pg_notify($1, $2)",
            &[&ctx.channel, &format!("probe {token}")],
        )
        .await
    {
        if err.as_db_error().is_some() {
            return fallback(err.to_string());
        }
        return Err(pg_error(err));
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
            if let Err(err) = step_clock(&ctx.pool, clock).await {
                tracing::debug!(cause = %err, "cannot read the database's clock");
            }
        }
    }
}

async fn prune(ctx: &FeedContext) -> Result<(), StoreError> {
    let client = ctx.pool.get().await.map_err(pool_error)?;
    let statement = client
        .prepare_cached(
            "DELETE FROM opsd_changes WHERE seq IN ( \
               SELECT seq FROM opsd_changes \
               WHERE at < clock_timestamp() - make_interval(secs => $1) \
               ORDER BY at LIMIT 10000 FOR UPDATE SKIP LOCKED)",
        )
        .await
        .map_err(pg_error)?;
    let keep = KEEP_CHANGES.as_secs_f64();
    loop {
        let deleted = tokio::time::timeout(
            ctx.settings.statement_timeout,
            client.execute(&statement, &[&keep]),
        )
        .await
        .map_err(|_| StoreError::Unavailable("pruning timed out".into()))?
        .map_err(pg_error)?;
        if deleted < 10000 {
            return Ok(());
        }
    }
}

/// Measures the database's `clock_timestamp()` against the system clock
/// (the round trip halved) and sets the offset.
pub(super) async fn step_clock(pool: &Pool, clock: &OffsetClock) -> Result<(), StoreError> {
    let client = pool.get().await.map_err(pool_error)?;
    let statement = client
        .prepare_cached("SELECT clock_timestamp()")
        .await
        .map_err(pg_error)?;
    let before = SystemTime::now();
    let started = Instant::now();
    let db: SystemTime = client
        .query_one(&statement, &[])
        .await
        .map_err(pg_error)?
        .get(0);
    let local = before + started.elapsed() / 2;
    let offset = super::sql::nanos(db).saturating_sub(super::sql::nanos(local));
    clock.set_offset(offset);
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
        feed.polled(vec![logged(1, "x"), logged(3, "a"), logged(5, "b")], true);
        let names: Vec<String> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|c| c.name.to_string())
            .collect();
        assert_eq!(names, ["a", "b", "x"]);
        assert_eq!(feed.poll_args(), (5, vec![2, 4]));
        // The gap fills in later, once.
        feed.polled(vec![logged(4, "late")], true);
        feed.polled(vec![logged(4, "late")], true);
        assert_eq!(rx.try_recv().unwrap().name.as_ref(), "late");
        assert!(rx.try_recv().is_err());
        assert_eq!(feed.poll_args(), (5, vec![2]));
    }

    #[test]
    fn a_long_outage_resynchronises_and_clears_the_cache() {
        let (feed, mut rx) = feed();
        feed.cache.put(Arc::from("a"), Arc::from(&b"x"[..]));
        feed.delivered().polled = Some(Instant::now() - KEEP_CHANGES);
        feed.poll_succeeded(true);
        assert_eq!(rx.try_recv().unwrap().cause, Cause::Resync);
        assert!(feed.cache.get("a").is_none());
        assert!(*feed.health.borrow());
        // A deletion removes the cached record.
        feed.cache.put(Arc::from("b"), Arc::from(&b"x"[..]));
        feed.committed(Logged {
            seq: 9,
            change: change("b", Cause::Deleted),
        });
        assert!(feed.cache.get("b").is_none());
    }
}
