//! Waiters for `Operations.Wait`.
//!
//! Waiters follow the store's change feed instead of polling, so a completion
//! that another replica commits wakes them like a local one. The waiter map
//! sits behind a `std::sync::Mutex`: nothing awaits under it, and each
//! critical section is one lookup. Waiters are keyed per operation, so a
//! change wakes only the waiters of its own operation. A guard removes its
//! entry on `Drop`, so timeouts, shutdown and clients that disconnect leak
//! nothing.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use super::{OperationName, Record, Registry};
use crate::{
    error::Error,
    store::{Cause, Change},
};

/// The least time kept back from the client's deadline so the answer reaches
/// it before the deadline fires.
const MIN_MARGIN: Duration = Duration::from_millis(20);
/// The most time kept back from the client's deadline.
const MAX_MARGIN: Duration = Duration::from_millis(500);
/// How long a read after the first may run past the Wait's budget: well
/// inside the least margin, so the answer still beats the client's
/// deadline. A read that takes longer (or fails) is given up, and the Wait
/// returns the state it read last.
const LATE_READ: Duration = Duration::from_millis(10);

/// How long a Wait may block: the least of the requested timeout, the RPC
/// deadline less a margin (a tenth of it, within 20–500 ms), and the server
/// cap. `None` timeout means "as long as allowed".
pub fn wait_budget(
    timeout: Option<Duration>,
    rpc_deadline: Option<Duration>,
    cap: Duration,
) -> Duration {
    let mut budget = timeout.unwrap_or(cap).min(cap);
    if let Some(deadline) = rpc_deadline {
        let margin = (deadline / 10).clamp(MIN_MARGIN, MAX_MARGIN);
        budget = budget.min(deadline.saturating_sub(margin));
    }
    budget
}

/// The open Waits, keyed by operation name.
pub(super) struct Waiters {
    inner: Mutex<Inner>,
    /// The budget for open Waits.
    max: usize,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<String, Entry>,
    /// The sum of the entries' counts.
    open: usize,
}

struct Entry {
    tx: watch::Sender<u64>,
    count: usize,
}

impl Waiters {
    pub(super) fn new(max: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            max,
        }
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The number of open Waits.
    pub(super) fn count(&self) -> usize {
        self.inner().open
    }

    /// Registers a waiter on `name`; the guard unregisters it.
    fn register(self: &Arc<Self>, name: &str) -> Result<WaiterGuard, Error> {
        let mut inner = self.inner();
        let open = inner.open;
        if open >= self.max {
            return Err(Error::ResourceExhausted {
                reason: "TOO_MANY_WAITERS",
                message: format!(
                    "The server already holds {open} open Wait calls; poll with GetOperation or retry later."
                ),
            });
        }
        inner.open += 1;
        let entry = inner
            .entries
            .entry(name.to_owned())
            .or_insert_with(|| Entry {
                tx: watch::Sender::new(0),
                count: 0,
            });
        entry.count += 1;
        let rx = entry.tx.subscribe();
        Ok(WaiterGuard {
            waiters: self.clone(),
            name: name.to_owned(),
            rx,
        })
    }

    /// Wakes the waiters of one operation.
    fn notify(&self, name: &str) {
        if let Some(entry) = self.inner().entries.get(name) {
            entry.tx.send_modify(|v| *v = v.wrapping_add(1));
        }
    }

    /// Wakes every waiter (after missed changes).
    fn notify_all(&self) {
        for entry in self.inner().entries.values() {
            entry.tx.send_modify(|v| *v = v.wrapping_add(1));
        }
    }
}

struct WaiterGuard {
    waiters: Arc<Waiters>,
    name: String,
    rx: watch::Receiver<u64>,
}

impl Drop for WaiterGuard {
    fn drop(&mut self) {
        let mut inner = self.waiters.inner();
        inner.open -= 1;
        if let Some(entry) = inner.entries.get_mut(&self.name) {
            entry.count -= 1;
            if entry.count == 0 {
                inner.entries.remove(&self.name);
            }
        }
    }
}

/// Follows the change feed and wakes the waiters of each changed operation.
/// If it falls behind the feed, or the feed says it may have missed changes
/// (`Cause::Resync`), it wakes everyone: each waiter re-reads its operation,
/// so nothing is missed.
pub(super) fn spawn_dispatcher(
    mut feed: broadcast::Receiver<Change>,
    waiters: Arc<Waiters>,
    reports: Arc<super::report::Reports>,
    shutdown: CancellationToken,
) {
    tokio::spawn(async move {
        loop {
            let change = tokio::select! {
                change = feed.recv() => change,
                () = shutdown.cancelled() => break,
            };
            match change {
                // The feed may have missed changes: everyone re-reads.
                Ok(change) if change.cause == Cause::Resync => waiters.notify_all(),
                Ok(change) => {
                    waiters.notify(&change.name);
                    // A deleted name's report goes; a re-created name starts afresh.
                    if matches!(
                        change.cause,
                        Cause::Deleted | Cause::Expired | Cause::Created
                    ) {
                        reports.forget(&change.name);
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => waiters.notify_all(),
                Err(broadcast::error::RecvError::Closed) => break,
            }
        }
        // Shutdown: every open Wait returns its latest state.
        waiters.notify_all();
    });
}

impl Registry {
    /// Blocks until the operation is done or `budget` has passed (see
    /// [`wait_budget`]), then returns its latest state. Deleted meanwhile →
    /// NOT_FOUND. On shutdown it returns the latest state at once. Only the
    /// first read may take the store's own time (it is the answer of a
    /// poll with a zero timeout); every later one is bounded to end by the
    /// budget plus [`LATE_READ`], past which (or if the last read fails)
    /// the Wait returns the state it read last: the feed would have woken
    /// it had that state changed.
    pub async fn wait(&self, name: &str, budget: Duration) -> Result<Record, Error> {
        let name = OperationName::parse(name)?;
        let until = tokio::time::Instant::now() + budget.min(self.shared.settings.wait_cap);
        let late = until + LATE_READ;
        // Register before reading, so a change committed after the read wakes us.
        let mut guard = self.shared.waiters.register(name.as_str())?;
        guard.rx.borrow_and_update();
        let mut last = self.load(&name).await?;
        Self::enabled_for(&last, "wait")?;
        loop {
            if last.done() || self.is_shutting_down() {
                return Ok(last);
            }
            let ended = tokio::select! {
                changed = guard.rx.changed() => {
                    // The sender is gone only if the map lost the entry:
                    // re-read once more and answer.
                    changed.is_err()
                }
                () = tokio::time::sleep_until(until) => true,
                () = self.shared.shutdown.cancelled() => true,
            };
            guard.rx.borrow_and_update();
            let read = tokio::time::timeout_at(late, self.load(&name)).await;
            match read {
                Ok(Ok(record)) => last = record,
                Ok(Err(err @ Error::NotFound { .. })) => return Err(err),
                Ok(Err(err)) if !ended => return Err(err),
                Ok(Err(err)) => {
                    tracing::debug!(name = %name, cause = %err, "a Wait's last read failed; answering with the state read before");
                    return Ok(last);
                }
                Err(_) => return Ok(last),
            }
            if ended {
                return Ok(last);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAP: Duration = Duration::from_secs(60);

    #[test]
    fn budget_is_the_least_of_timeout_deadline_and_cap() {
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        assert_eq!(wait_budget(None, None, CAP), CAP);
        assert_eq!(wait_budget(Some(s(600)), None, CAP), CAP);
        assert_eq!(wait_budget(Some(s(5)), None, CAP), s(5));
        assert_eq!(
            wait_budget(Some(Duration::ZERO), Some(s(1)), CAP),
            Duration::ZERO
        );
        assert_eq!(wait_budget(None, Some(s(1)), CAP), ms(900));
        assert_eq!(wait_budget(Some(s(30)), Some(s(10)), CAP), s(9) + ms(500));
        assert_eq!(wait_budget(None, Some(ms(100)), CAP), ms(80));
        assert_eq!(wait_budget(None, Some(ms(10)), CAP), Duration::ZERO);
    }

    #[test]
    fn guards_unregister_and_the_budget_holds() {
        let waiters = Arc::new(Waiters::new(2));
        let a = waiters.register("operations/a").unwrap();
        let b = waiters.register("operations/a").unwrap();
        assert_eq!(waiters.count(), 2);
        assert!(matches!(
            waiters.register("operations/b"),
            Err(Error::ResourceExhausted { .. })
        ));
        drop(a);
        drop(b);
        assert_eq!(waiters.count(), 0);
        assert!(waiters.inner().entries.is_empty());
    }
}
