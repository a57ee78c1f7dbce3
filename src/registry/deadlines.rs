//! The deadline task: lapsed leases, forced cooperative cancels, retention.
//!
//! Deadlines are data in the store ([`StoredRecord::next_deadline`]), not only
//! timers, so they survive restarts. When one is due the task re-reads the
//! record and applies whatever is due with the usual conditional write, so a
//! stale or early timer is harmless, and a transition happens once even if
//! two tasks fire it.
//!
//! How the task learns what is due depends on the store:
//!
//! - A store of one process (memory, redb): the task keeps an in-memory index,
//!   built by one scan at start-up and kept current from the change feed, and
//!   sleeps until the earliest. The index holds every done operation (its
//!   retention expiry), so it is kept small: one ordered set of (time, name)
//!   with the name shared with the store's change feed, and no reverse index
//!   by name: each change carries the record's previous deadline, which finds
//!   the entry to drop.
//! - A store shared by replicas (PostgreSQL, [`Store::claim_due`]): the
//!   replicas do not each do all the work. The task claims the due records
//!   (no other replica gets them while the claim holds; a replica that dies
//!   loses its claims when they expire), fires them as of the claim's time
//!   (what the claim found due is due, even if the clock's offset was just
//!   measured a little back), releases the claims of those it did not fire
//!   (nothing was due after all, or the action failed: any replica may take
//!   them again at once, not when the hold ends), and sleeps until the
//!   earliest deadline the claim left, a later one a fired record still
//!   has, an earlier one seen on the feed, or a second at most (deadlines
//!   other replicas set arrive on the feed too, but a notification may be
//!   late).

use std::{
    collections::BTreeSet,
    sync::{Arc, Weak},
    time::{Duration, SystemTime},
};

use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::{expired, finish, lease_expired_status, Clock, Outcome, Record, Registry, Shared};
use crate::{
    error::Error,
    store::{Cause, Claimed, StoreError},
};

/// What fell due on a running operation.
#[derive(Clone, Copy, Debug)]
enum Due {
    Lease,
    Cancel,
    Script,
}

/// Due deadlines handled at once.
const FIRE_BATCH: usize = 256;

/// How long (real time) to wait before retrying a deadline whose write
/// failed, or a failed scan of the deadlines.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// How long a claim on due records holds (by the registry's clock): longer
/// than firing a batch takes; a claim whose replica died expires after it.
const CLAIM_HOLD: Duration = Duration::from_secs(15);

/// The longest a claiming task sleeps (real time) between claims.
const CLAIM_EVERY: Duration = Duration::from_secs(1);

/// Deadlines ordered by time: (nanoseconds since the Unix epoch, name).
/// A name may have stale entries (after missed changes); they only cause a
/// harmless re-read when they fire.
#[derive(Default)]
struct Timers {
    by_time: BTreeSet<(u64, Arc<str>)>,
}

/// A deadline as the index keys it (times before 1970 are due at once).
fn nanos(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

impl Timers {
    /// Moves `name` from its `previous` deadline to `next`.
    fn replace(&mut self, name: &Arc<str>, previous: Option<SystemTime>, next: Option<SystemTime>) {
        if let Some(at) = previous {
            self.by_time.remove(&(nanos(at), name.clone()));
        }
        if let Some(at) = next {
            self.add(name.clone(), at);
        }
    }

    fn add(&mut self, name: Arc<str>, at: SystemTime) {
        self.by_time.insert((nanos(at), name));
    }

    fn next(&self) -> Option<SystemTime> {
        self.by_time
            .first()
            .map(|(at, _)| SystemTime::UNIX_EPOCH + Duration::from_nanos(*at))
    }

    /// Removes and returns the names due at `now`.
    fn take_due(&mut self, now: SystemTime) -> Vec<Arc<str>> {
        let now = nanos(now);
        let mut due = Vec::new();
        while self.by_time.first().is_some_and(|(at, _)| *at <= now) {
            if let Some((_, name)) = self.by_time.pop_first() {
                due.push(name);
            }
        }
        due
    }
}

pub(super) fn spawn(shared: Weak<Shared>, shutdown: CancellationToken) {
    let Some(registry) = shared.upgrade().map(|shared| Registry { shared }) else {
        return;
    };
    let feed = registry.shared.store.subscribe();
    let clock = registry.shared.settings.clock.clone();
    drop(registry);
    tokio::spawn(start(shared, feed, clock, shutdown));
}

/// Asks the store for due records once: a store that shares deadlines
/// answers (the claim is the first batch), the others keep a local index.
async fn start(
    shared: Weak<Shared>,
    feed: broadcast::Receiver<Change>,
    clock: Clock,
    shutdown: CancellationToken,
) {
    loop {
        let Some(registry) = shared.upgrade().map(|shared| Registry { shared }) else {
            return;
        };
        let now = clock.now();
        let claimed = registry
            .shared
            .store
            .claim_due(now, FIRE_BATCH, CLAIM_HOLD)
            .await;
        drop(registry);
        match claimed {
            Ok(None) => return run(shared, feed, clock, shutdown).await,
            Ok(Some(first)) => {
                return run_claims(shared, feed, clock, shutdown, (first, now)).await
            }
            Err(err) => {
                tracing::error!(cause = %err, "cannot claim due deadlines; retrying");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(RETRY_AFTER) => {}
                }
            }
        }
    }
}

/// Fires due names in bounded concurrent batches (so a durable store
/// commits each batch's expiries together), as of `at` when a claim made
/// at that time found them due; returns those whose action failed and the
/// later deadlines of those where nothing was due.
async fn fire(
    registry: &Registry,
    due: Vec<Arc<str>>,
    at: Option<SystemTime>,
) -> (Vec<Arc<str>>, Vec<(Arc<str>, SystemTime)>) {
    let mut failed = Vec::new();
    let mut later = Vec::new();
    for batch in due.chunks(FIRE_BATCH) {
        let mut running = tokio::task::JoinSet::new();
        for name in batch {
            let registry = registry.clone();
            let name = name.clone();
            running.spawn(async move {
                let result = registry.on_deadline_at(&name, at).await;
                (name, result)
            });
        }
        while let Some(joined) = running.join_next().await {
            let Ok((name, result)) = joined else { continue };
            match result {
                Ok(Some(next)) => later.push((name, next)),
                Ok(None) => {}
                Err(err) => {
                    tracing::error!(name = %name, cause = %err, "deadline action failed; retrying");
                    failed.push(name);
                }
            }
        }
    }
    (failed, later)
}

/// The task over a store that shares deadlines (see the module docs).
async fn run_claims(
    shared: Weak<Shared>,
    mut feed: broadcast::Receiver<Change>,
    clock: Clock,
    shutdown: CancellationToken,
    first: (Claimed, SystemTime),
) {
    let mut first = Some(first);
    loop {
        let Some(registry) = shared.upgrade().map(|shared| Registry { shared }) else {
            return;
        };
        let (claimed, now) = match first.take() {
            Some((claimed, now)) => (Ok(Some(claimed)), now),
            None => {
                let now = clock.now();
                let claimed = registry
                    .shared
                    .store
                    .claim_due(now, FIRE_BATCH, CLAIM_HOLD)
                    .await;
                (claimed, now)
            }
        };
        // When to claim again, by the clock; a failure waits real time.
        let mut wake_at = None;
        let mut cap = CLAIM_EVERY;
        match claimed {
            Ok(Some(claimed)) => {
                let full = claimed.names.len() >= FIRE_BATCH;
                let (failed, later) = fire(&registry, claimed.names, Some(now)).await;
                wake_at = claimed.next;
                // What was not fired is released: claimable again at once
                // (a failed action is retried within a second, here or on
                // another replica), not when the hold ends.
                let mut unfired = failed;
                for (name, next) in later {
                    wake_at = Some(wake_at.map_or(next, |at| at.min(next)));
                    unfired.push(name);
                }
                if let (false, Some(until)) = (unfired.is_empty(), claimed.until) {
                    if let Err(err) = registry.shared.store.release(&unfired, until).await {
                        tracing::warn!(cause = %err, "cannot release claims; they lapse when their hold ends");
                    }
                }
                if full {
                    continue;
                }
            }
            Ok(None) => {}
            Err(err) => {
                tracing::error!(cause = %err, "cannot claim due deadlines; retrying");
                cap = RETRY_AFTER;
            }
        }
        drop(registry);
        let cap = tokio::time::Instant::now() + cap;
        loop {
            let due = async {
                match wake_at {
                    Some(at) => clock.sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep_until(cap) => break,
                () = due => break,
                change = feed.recv() => match change {
                    Ok(change) => {
                        if let Some(at) = change.deadline {
                            if wake_at.is_none_or(|w| at < w) {
                                wake_at = Some(at);
                            }
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => break,
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    }
}

async fn run(
    shared: Weak<Shared>,
    mut feed: broadcast::Receiver<Change>,
    clock: Clock,
    shutdown: CancellationToken,
) {
    let mut timers = Timers::default();
    let mut rescan = true;
    // Failures wait one real second, whatever the clock does (a manual
    // clock in a test may never move): the names whose action failed, and
    // when the retry (and a failed rescan's) is due.
    let mut retry: Vec<Arc<str>> = Vec::new();
    let mut retry_at: Option<tokio::time::Instant> = None;
    loop {
        if rescan {
            let Some(registry) = shared.upgrade().map(|shared| Registry { shared }) else {
                return;
            };
            match registry.shared.store.deadlines().await {
                Ok(all) => {
                    timers = Timers::default();
                    for deadline in all {
                        timers.add(deadline.name, deadline.at);
                    }
                    rescan = false;
                }
                Err(err) => {
                    tracing::error!(cause = %err, "cannot read deadlines; retrying");
                    retry_at.get_or_insert_with(|| tokio::time::Instant::now() + RETRY_AFTER);
                }
            }
        }
        let next = if rescan { None } else { timers.next() };
        let due = async {
            match next {
                Some(at) => clock.sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let retry_due = async {
            match retry_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            change = feed.recv() => match change {
                Ok(change) if change.cause == Cause::Resync => {
                    tracing::warn!("the change feed may have missed changes; rescanning deadlines");
                    rescan = true;
                }
                Ok(change) => timers.replace(&change.name, change.previous_deadline, change.deadline),
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "deadline task fell behind the change feed; rescanning");
                    rescan = true;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            () = retry_due => {
                // A rescan (still wanted) runs at the top of the loop; the
                // failed names are due again now.
                retry_at = None;
                let now = clock.now();
                for name in retry.drain(..) {
                    timers.add(name, now);
                }
            }
            () = due => {
                let Some(registry) = shared.upgrade().map(|shared| Registry { shared }) else {
                    return;
                };
                let due = timers.take_due(clock.now());
                let (failed, later) = fire(&registry, due, None).await;
                for (name, next) in later {
                    timers.add(name, next);
                }
                if !failed.is_empty() {
                    retry.extend(failed);
                    retry_at.get_or_insert_with(|| tokio::time::Instant::now() + RETRY_AFTER);
                }
            }
        }
    }
}

use crate::store::Change;
#[cfg(doc)]
use crate::store::{Store, StoredRecord};

impl Registry {
    /// Applies whatever is due on `name`. Returns the record's next deadline
    /// when nothing was written (a write re-arms the timer through the feed).
    /// Worker calls run it first too, so an overdue lease or grace period
    /// wins even when this task is late.
    pub(super) async fn on_deadline(&self, name: &str) -> Result<Option<SystemTime>, Error> {
        self.on_deadline_at(name, None).await
    }

    /// [`Registry::on_deadline`], deciding what is due as of `at` at the
    /// earliest (the time of the claim that found it due).
    async fn on_deadline_at(
        &self,
        name: &str,
        at: Option<SystemTime>,
    ) -> Result<Option<SystemTime>, Error> {
        let retention = self.shared.settings.retention;
        let details = self.shared.settings.operation_error_details;
        loop {
            let Some(stored) = self.store().get(name).await? else {
                return Ok(None);
            };
            // When to look again if nothing is due now.
            let deadline = stored.next_deadline();
            let record = Record::from_stored(stored)?;
            let now = at.map_or_else(|| self.now(), |at| at.max(self.now()));
            let due = |at: Option<SystemTime>| at.filter(|at| *at <= now);
            let script = record.script.as_ref();
            let script_at = script.and_then(|s| {
                [
                    s.steps.first().map(|(at, _)| *at),
                    s.outcome.as_ref().map(|(at, _)| *at),
                ]
                .into_iter()
                .flatten()
                .min()
            });
            // Whatever fell due first happens first (a late task, e.g. after a
            // restart, must not reorder a script's outcome and a cancel).
            let next = [
                (due(record.lease_deadline), Due::Lease),
                (due(record.cancel_deadline), Due::Cancel),
                (due(script_at), Due::Script),
            ]
            .into_iter()
            .filter_map(|(at, what)| at.map(|at| (at, what)))
            .min_by_key(|(at, _)| *at);
            let result = if record.done() {
                if !expired(&record, now) {
                    return Ok(deadline);
                }
                tracing::debug!(name, "operation expired by retention");
                self.store()
                    .delete(name, record.revision, Cause::Expired)
                    .await
            } else {
                match next {
                    None => return Ok(deadline),
                    Some((_, Due::Lease)) => {
                        tracing::warn!(name, "worker lease expired");
                        let outcome = Outcome::Error(lease_expired_status(record.lease, details));
                        self.store()
                            .update(
                                finish(&record, outcome, now, retention).to_stored(),
                                record.revision,
                                Cause::LeaseExpired,
                            )
                            .await
                            .map(drop)
                    }
                    Some((_, Due::Cancel)) => {
                        tracing::debug!(name, "cancel grace period over; finishing");
                        // A script's reaction to the cancel, or CANCELLED.
                        let outcome = record
                            .script
                            .as_ref()
                            .and_then(|s| s.on_cancel.as_ref())
                            .map_or_else(
                                || Outcome::Error(super::cancelled_status(details)),
                                |(_, o)| o.clone(),
                            );
                        self.store()
                            .update(
                                finish(&record, outcome, now, retention).to_stored(),
                                record.revision,
                                Cause::GraceExpired,
                            )
                            .await
                            .map(drop)
                    }
                    Some((at, Due::Script)) => {
                        let revision = record.revision;
                        // Only what is due up to this event: a later cancel
                        // deadline still comes after it.
                        let until = [record.cancel_deadline, record.lease_deadline]
                            .into_iter()
                            .flatten()
                            .filter(|t| *t > at)
                            .min()
                            .map_or(now, |t| t.min(now));
                        match super::settle_script(record, until, retention) {
                            (next, Some(cause)) => self
                                .store()
                                .update(next.to_stored(), revision, cause)
                                .await
                                .map(drop),
                            (_, None) => return Ok(deadline),
                        }
                    }
                }
            };
            match result {
                Ok(()) => return Ok(None),
                Err(StoreError::Conflict) => continue,
                Err(other) => return Err(other.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timers_move_with_each_change() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let s = Duration::from_secs;
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        let mut timers = Timers::default();
        timers.replace(&a, None, Some(t0 + s(5)));
        timers.replace(&b, None, Some(t0 + s(3)));
        timers.replace(&a, Some(t0 + s(5)), Some(t0 + s(1)));
        assert_eq!(timers.next(), Some(t0 + s(1)));
        timers.replace(&a, Some(t0 + s(1)), None);
        assert_eq!(timers.next(), Some(t0 + s(3)));
        assert_eq!(timers.take_due(t0 + s(4)), std::slice::from_ref(&b));
        assert_eq!(timers.next(), None);
        // A stale entry (a missed change) stays until it fires.
        timers.replace(&a, None, Some(t0 + s(7)));
        timers.replace(&a, Some(t0 + s(6)), Some(t0 + s(8)));
        assert_eq!(timers.take_due(t0 + s(9)), [a.clone(), a.clone()]);
        assert!(timers.by_time.is_empty());
        assert_eq!(nanos(SystemTime::UNIX_EPOCH - s(1)), 0);
    }
}
