//! The deadline task: lapsed leases, forced cooperative cancels, retention.
//!
//! Deadlines are data in the store ([`Record::next_deadline`]), not only
//! timers, so they survive restarts. This task keeps an in-memory index of
//! them, built by one scan at start-up and kept current from the change feed,
//! and sleeps until the earliest. When one is due it re-reads the record and
//! applies whatever is due with the usual conditional write, so a stale or
//! early timer is harmless.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Weak},
    time::{Duration, SystemTime},
};

use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::{expired, finish, lease_expired_status, Registry, Shared};
use crate::{
    error::Error,
    store::{Cause, Outcome, StoreError},
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

/// How long to wait before retrying a deadline whose write failed.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Deadlines ordered by time, with a reverse index by name. Both indexes
/// share one allocation of each name.
#[derive(Default)]
struct Timers {
    by_time: BTreeSet<(SystemTime, Arc<str>)>,
    by_name: HashMap<Arc<str>, SystemTime>,
}

impl Timers {
    fn set(&mut self, name: &str, deadline: Option<SystemTime>) {
        let key = match self.by_name.remove_entry(name) {
            Some((key, old)) => {
                self.by_time.remove(&(old, key.clone()));
                key
            }
            None if deadline.is_some() => Arc::from(name),
            None => return,
        };
        if let Some(at) = deadline {
            self.by_time.insert((at, key.clone()));
            self.by_name.insert(key, at);
        }
    }

    fn next(&self) -> Option<SystemTime> {
        self.by_time.first().map(|(at, _)| *at)
    }

    /// Removes and returns the names due at `now`.
    fn take_due(&mut self, now: SystemTime) -> Vec<String> {
        let mut due = Vec::new();
        while let Some((at, _)) = self.by_time.first() {
            if *at > now {
                break;
            }
            if let Some((_, name)) = self.by_time.pop_first() {
                self.by_name.remove(&name);
                due.push(name.to_string());
            }
        }
        due
    }
}

fn instant_of(at: SystemTime) -> tokio::time::Instant {
    let wait = at
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO);
    tokio::time::Instant::now() + wait
}

pub(super) fn spawn(shared: Weak<Shared>, shutdown: CancellationToken) {
    let Some(registry) = shared.upgrade().map(|shared| Registry { shared }) else {
        return;
    };
    let feed = registry.shared.store.subscribe();
    drop(registry);
    tokio::spawn(run(shared, feed, shutdown));
}

async fn run(
    shared: Weak<Shared>,
    mut feed: broadcast::Receiver<Change>,
    shutdown: CancellationToken,
) {
    let mut timers = Timers::default();
    let mut rescan = true;
    loop {
        if rescan {
            let Some(registry) = shared.upgrade().map(|shared| Registry { shared }) else {
                return;
            };
            match registry.shared.store.deadlines().await {
                Ok(all) => {
                    timers = Timers::default();
                    for (at, name) in all {
                        timers.set(&name, Some(at));
                    }
                    rescan = false;
                }
                Err(err) => tracing::error!(cause = %err, "cannot read deadlines; retrying"),
            }
        }
        let next = if rescan {
            Some(SystemTime::now() + RETRY_AFTER)
        } else {
            timers.next()
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            change = feed.recv() => match change {
                Ok(change) => timers.set(&change.name, change.deadline),
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "deadline task fell behind the change feed; rescanning");
                    rescan = true;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            () = tokio::time::sleep_until(instant_of(next.unwrap_or(SystemTime::now()))), if next.is_some() => {
                let Some(registry) = shared.upgrade().map(|shared| Registry { shared }) else {
                    return;
                };
                let due = timers.take_due(SystemTime::now());
                // Bounded batches run concurrently, so a durable store commits
                // each batch's expiries together (group commit).
                for batch in due.chunks(FIRE_BATCH) {
                    let mut running = tokio::task::JoinSet::new();
                    for name in batch {
                        let registry = registry.clone();
                        let name = name.clone();
                        running.spawn(async move {
                            let result = registry.on_deadline(&name).await;
                            (name, result)
                        });
                    }
                    while let Some(joined) = running.join_next().await {
                        let Ok((name, result)) = joined else { continue };
                        match result {
                            Ok(next) => timers.set(&name, next),
                            Err(err) => {
                                tracing::error!(name, cause = %err, "deadline action failed; retrying");
                                timers.set(&name, Some(SystemTime::now() + RETRY_AFTER));
                            }
                        }
                    }
                }
            }
        }
    }
}

use crate::store::Change;

impl Registry {
    /// Applies whatever is due on `name`. Returns the record's next deadline
    /// when nothing was written (a write re-arms the timer through the feed).
    /// Worker calls run it first too, so an overdue lease or grace period
    /// wins even when this task is late.
    pub(super) async fn on_deadline(&self, name: &str) -> Result<Option<SystemTime>, Error> {
        let retention = self.shared.settings.retention;
        loop {
            let Some(record) = self.store().get(name).await? else {
                return Ok(None);
            };
            let now = SystemTime::now();
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
                    return Ok(record.next_deadline());
                }
                tracing::debug!(name, "operation expired by retention");
                self.store()
                    .delete(name, record.revision, Cause::Expired)
                    .await
            } else {
                match next {
                    None => return Ok(record.next_deadline()),
                    Some((_, Due::Lease)) => {
                        tracing::warn!(name, "worker lease expired");
                        let outcome = Outcome::Error(lease_expired_status(record.lease));
                        self.store()
                            .update(
                                finish(&record, outcome, now, retention),
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
                                || Outcome::Error(super::cancelled_status()),
                                |(_, o)| o.clone(),
                            );
                        self.store()
                            .update(
                                finish(&record, outcome, now, retention),
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
                            (next, Some(cause)) => {
                                self.store().update(next, revision, cause).await.map(drop)
                            }
                            (record, None) => return Ok(record.next_deadline()),
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
    fn timers_keep_one_deadline_per_name() {
        let t0 = SystemTime::UNIX_EPOCH;
        let s = Duration::from_secs;
        let mut timers = Timers::default();
        timers.set("a", Some(t0 + s(5)));
        timers.set("b", Some(t0 + s(3)));
        timers.set("a", Some(t0 + s(1)));
        assert_eq!(timers.next(), Some(t0 + s(1)));
        timers.set("a", None);
        assert_eq!(timers.next(), Some(t0 + s(3)));
        assert_eq!(timers.take_due(t0 + s(4)), ["b"]);
        assert_eq!(timers.next(), None);
        assert!(timers.by_name.is_empty());
    }
}
