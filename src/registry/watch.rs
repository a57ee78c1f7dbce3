//! Worker event streams (`Workers.WatchOperations`).
//!
//! Each stream is a task that follows the store's change feed, keeps the
//! events of the operations its worker asked for, and sends them into a
//! bounded channel (the routeguide pattern): a slow worker slows only its own
//! stream. A stream reports what happens while it is open. On connect it
//! first reports the cooperative cancellations already pending (they still
//! need the worker), and reports them again if it ever falls behind the feed
//! (or the feed says it may have missed changes, `Cause::Resync`).
//! Events of the past are not replayed: an operation cancelled at once,
//! deleted or expired while no stream watched it answers the worker's next
//! call with FAILED_PRECONDITION or NOT_FOUND, so workers open their stream
//! before they create operations. The stream ends when the worker goes away
//! or the server shuts down.

use std::{
    collections::HashSet,
    sync::{atomic::Ordering, Arc},
    time::SystemTime,
};

use tokio::sync::{broadcast, mpsc};

use super::{name::parse_list_target, OperationName, Registry};
use crate::{
    error::Error,
    store::{parent_of, Cause, ListQuery, ParentPattern, StoredRecord},
};

/// Events buffered per stream before the stream waits for its worker.
const STREAM_BUFFER: usize = 64;
/// Records read per page while reporting pending cancellations.
const SYNC_PAGE: usize = 500;

/// What happened to a worker's operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A client asked to cancel it.
    CancelRequested,
    /// It was deleted (by a client or by retention).
    Deleted,
    /// The worker's lease lapsed; it is done with ABORTED.
    LeaseExpired,
}

/// One event for a worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerEvent {
    pub kind: EventKind,
    pub name: String,
    pub time: SystemTime,
}

impl EventKind {
    fn of(cause: Cause) -> Option<Self> {
        match cause {
            Cause::CancelRequested | Cause::Cancelled => Some(Self::CancelRequested),
            Cause::Deleted | Cause::Expired => Some(Self::Deleted),
            Cause::LeaseExpired => Some(Self::LeaseExpired),
            // The worker was told when the cancel was requested.
            Cause::GraceExpired => None,
            Cause::Created | Cause::Updated | Cause::Completed => None,
            // Not an event: the stream re-reads (see `run_watch`).
            Cause::Resync => None,
        }
    }
}

/// Which operations a stream reports.
#[derive(Clone, Debug)]
pub struct WatchFilter {
    parent: Option<ParentPattern>,
    names: HashSet<String>,
}

impl WatchFilter {
    /// Operations under `parent` (a parent or its `operations` collection, `-`
    /// wildcards allowed) and those in `names`; everything when both are empty.
    pub fn new(parent: &str, names: &[String]) -> Result<Self, Error> {
        let parent = if parent.is_empty() {
            None
        } else {
            Some(parse_list_target(parent).map_err(|e| e.for_field("parent"))?)
        };
        let names = names
            .iter()
            .map(|n| {
                OperationName::parse(n)
                    .map(OperationName::into_string)
                    .map_err(|e| e.for_field("names"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { parent, names })
    }

    fn everything(&self) -> bool {
        self.parent.is_none() && self.names.is_empty()
    }

    fn matches(&self, name: &str) -> bool {
        self.everything()
            || self.names.contains(name)
            || self
                .parent
                .as_ref()
                .is_some_and(|p| p.matches_parent(parent_of(name)))
    }
}

/// Sends one event unless the server shuts down first; false when the stream
/// must end (shutdown, or the worker went away).
async fn send(
    tx: &mpsc::Sender<WorkerEvent>,
    event: WorkerEvent,
    shutdown: &tokio_util::sync::CancellationToken,
) -> bool {
    tokio::select! {
        sent = tx.send(event) => sent.is_ok(),
        () = shutdown.cancelled() => false,
    }
}

/// Counts a stream as open while it lives.
struct WatcherGuard(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for WatcherGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Registry {
    /// Opens an event stream for the operations `filter` selects.
    pub fn watch(&self, filter: WatchFilter) -> mpsc::Receiver<WorkerEvent> {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        // Subscribe before reading pending cancellations, so none falls in between.
        let feed = self.shared.store.subscribe();
        self.shared.watchers.fetch_add(1, Ordering::Relaxed);
        let guard = WatcherGuard(self.shared.watchers.clone());
        let registry = self.clone();
        tokio::spawn(async move {
            let _guard = guard;
            registry.run_watch(filter, feed, tx).await;
        });
        rx
    }

    async fn run_watch(
        &self,
        filter: WatchFilter,
        mut feed: broadcast::Receiver<crate::store::Change>,
        tx: mpsc::Sender<WorkerEvent>,
    ) {
        let shutdown = self.shared.shutdown.clone();
        let mut resync = true;
        loop {
            if resync {
                resync = false;
                match self.pending_cancellations(&filter).await {
                    Ok(names) => {
                        for name in names {
                            let event = WorkerEvent {
                                kind: EventKind::CancelRequested,
                                name,
                                time: self.now(),
                            };
                            if !send(&tx, event, &shutdown).await {
                                return;
                            }
                        }
                    }
                    Err(err) => tracing::error!(cause = %err, "cannot read pending cancellations"),
                }
            }
            let change = tokio::select! {
                () = shutdown.cancelled() => return,
                () = tx.closed() => return,
                change = feed.recv() => change,
            };
            match change {
                Ok(change) if change.cause == Cause::Resync => {
                    tracing::warn!("the change feed may have missed changes; resyncing");
                    resync = true;
                }
                Ok(change) => {
                    let Some(kind) = EventKind::of(change.cause) else {
                        continue;
                    };
                    if !filter.matches(&change.name) {
                        continue;
                    }
                    let event = WorkerEvent {
                        kind,
                        name: change.name.to_string(),
                        time: change.time,
                    };
                    if !send(&tx, event, &shutdown).await {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(
                        missed,
                        "worker stream fell behind the change feed; resyncing"
                    );
                    resync = true;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    /// Running operations selected by `filter` whose cooperative cancellation
    /// is pending.
    async fn pending_cancellations(&self, filter: &WatchFilter) -> Result<Vec<String>, Error> {
        let pending = |r: &StoredRecord| !r.done() && r.cancel_deadline.is_some();
        let store = self.store();
        let mut found = Vec::new();
        if filter.everything() {
            // Every pending cancellation has a deadline (its grace period),
            // and only running operations can have one.
            for deadline in store.running_deadlines().await? {
                if store
                    .get(&deadline.name)
                    .await?
                    .is_some_and(|r| pending(&r))
                {
                    found.push(deadline.name.to_string());
                }
            }
            return Ok(found);
        }
        for name in &filter.names {
            if store.get(name).await?.is_some_and(|r| pending(&r)) {
                found.push(name.clone());
            }
        }
        if let Some(parent) = &filter.parent {
            let mut after = None;
            loop {
                let scan = store
                    .list(&ListQuery::page(parent.clone(), after.take(), SYNC_PAGE))
                    .await?;
                found.extend(
                    scan.records
                        .into_iter()
                        .filter(|r| pending(r) && !filter.names.contains(&r.name))
                        .map(|r| r.name),
                );
                match scan.resume_after {
                    Some(next) => after = Some(next),
                    None => break,
                }
            }
        }
        Ok(found)
    }
}
