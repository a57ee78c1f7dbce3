//! Worker event streams (`Workers.WatchOperations`).
//!
//! Each stream is a task that follows the store's change feed, keeps the
//! events of the operations its worker asked for, and sends them into a
//! bounded channel (the routeguide pattern): a slow worker slows only its own
//! stream. A stream reports what happens while it is open. On connect it
//! first reports the cooperative cancellations already pending (they still
//! need the worker). If it ever falls behind the feed (or the feed says it
//! may have missed changes, `Cause::Resync`), it resyncs: it reports the
//! pending cooperative cancellations again, and what became of the running
//! operations it followed (learned at the previous resync and from
//! creations on the feed): those cancelled at once (CancelRequested), whose
//! lease lapsed (LeaseExpired), or that are gone (Deleted) since. A resync
//! that cannot read the store is retried with backoff (100 ms to 5 s) until
//! it can. Events may repeat after a resync, and may name an operation the
//! worker finished itself with CANCELLED or ABORTED.
//! Events of the past are not replayed: an operation cancelled at once,
//! deleted or expired while no stream watched it answers the worker's next
//! call with FAILED_PRECONDITION or NOT_FOUND, so workers open their stream
//! before they create operations. The stream ends when the worker goes away
//! or the server shuts down. With a [`Visibility`] (auth on), a stream
//! reports only the names its worker may watch.

use std::{
    collections::HashSet,
    sync::{atomic::Ordering, Arc},
    time::{Duration, SystemTime},
};

use tokio::sync::{broadcast, mpsc};

use super::{
    name::parse_list_target, OperationName, Registry, Visibility, ABORTED_CODE, CANCELLED_CODE,
};
use crate::{
    error::Error,
    store::{
        filter::{Filter, Op, Restriction},
        parent_of, Cause, ListQuery, ParentPattern, StoredRecord,
    },
};

/// Events buffered per stream before the stream waits for its worker.
const STREAM_BUFFER: usize = 64;
/// Records read per page while reporting pending cancellations.
const SYNC_PAGE: usize = 500;
/// The first wait before a failed resync is tried again; it doubles up to
/// [`RESYNC_RETRY_MAX`].
const RESYNC_RETRY: Duration = Duration::from_millis(100);
const RESYNC_RETRY_MAX: Duration = Duration::from_secs(5);

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
    visibility: Option<Visibility>,
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
        Ok(Self {
            parent,
            names,
            visibility: None,
        })
    }

    /// Only the names `visibility` covers, of those selected.
    pub fn visible_to(mut self, visibility: Option<Visibility>) -> Self {
        self.visibility = visibility;
        self
    }

    fn everything(&self) -> bool {
        self.parent.is_none() && self.names.is_empty()
    }

    fn visible(&self, name: &str) -> bool {
        self.visibility.as_ref().is_none_or(|v| v.covers(name))
    }

    fn matches(&self, name: &str) -> bool {
        let selected = self.everything()
            || self.names.contains(name)
            || self
                .parent
                .as_ref()
                .is_some_and(|p| p.matches_parent(parent_of(name)));
        selected && self.visible(name)
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
        let mut retry = RESYNC_RETRY;
        // The running operations this stream follows (none known before
        // the first resync): a resync reports those that ended or went.
        let mut known: Option<HashSet<Arc<str>>> = None;
        loop {
            if resync {
                match self.resync(&filter, known.as_ref()).await {
                    Ok((events, running)) => {
                        resync = false;
                        retry = RESYNC_RETRY;
                        known = Some(running);
                        for event in events {
                            if !send(&tx, event, &shutdown).await {
                                return;
                            }
                        }
                    }
                    Err(err) => {
                        tracing::warn!(cause = %err, ?retry, "a worker stream cannot resync; retrying");
                        tokio::select! {
                            () = shutdown.cancelled() => return,
                            () = tx.closed() => return,
                            () = tokio::time::sleep(retry) => {}
                        }
                        retry = (retry * 2).min(RESYNC_RETRY_MAX);
                        continue;
                    }
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
                    if !filter.matches(&change.name) {
                        continue;
                    }
                    if let Some(known) = known.as_mut() {
                        match change.cause {
                            Cause::Created => {
                                known.insert(change.name.clone());
                            }
                            Cause::Updated | Cause::CancelRequested => {}
                            _ => {
                                known.remove(&change.name);
                            }
                        }
                    }
                    let Some(kind) = EventKind::of(change.cause) else {
                        continue;
                    };
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

    /// What a stream reports when it (re)syncs: the pending cooperative
    /// cancellations of the running operations `filter` selects, and what
    /// became of the `known` ones no longer running (cancelled at once,
    /// lease lapsed, gone). Returns the events and the running operations.
    async fn resync(
        &self,
        filter: &WatchFilter,
        known: Option<&HashSet<Arc<str>>>,
    ) -> Result<(Vec<WorkerEvent>, HashSet<Arc<str>>), Error> {
        let now = self.now();
        let event = |kind, name: &str| WorkerEvent {
            kind,
            name: name.to_owned(),
            time: now,
        };
        let mut events = Vec::new();
        let mut running = HashSet::new();
        for (name, cancel_pending) in self.running_selected(filter).await? {
            if cancel_pending {
                events.push(event(EventKind::CancelRequested, &name));
            }
            running.insert(name);
        }
        for name in known.into_iter().flatten() {
            if running.contains(name) {
                continue;
            }
            match self.store().get(name).await? {
                None => events.push(event(EventKind::Deleted, name)),
                Some(record) => match record.error().map(|e| e.code) {
                    Some(CANCELLED_CODE) => events.push(event(EventKind::CancelRequested, name)),
                    Some(ABORTED_CODE) if record.lease.is_some() => {
                        events.push(event(EventKind::LeaseExpired, name))
                    }
                    _ => {}
                },
            }
        }
        Ok((events, running))
    }

    /// The running operations `filter` selects, read a page at a time:
    /// each name, and whether a cooperative cancellation is pending.
    async fn running_selected(&self, filter: &WatchFilter) -> Result<Vec<(Arc<str>, bool)>, Error> {
        let store = self.store();
        let entry = |r: &StoredRecord| (Arc::from(r.name.as_str()), r.cancel_deadline.is_some());
        let mut found = Vec::new();
        for name in filter.names.iter().filter(|n| filter.visible(n)) {
            if let Some(record) = store.get(name).await?.filter(|r| !r.done()) {
                found.push(entry(&record));
            }
        }
        let parent = match &filter.parent {
            Some(parent) => parent.clone(),
            None if filter.everything() => ParentPattern::everything(),
            None => return Ok(found),
        };
        let running = Visibility::restrict(
            filter.visibility.as_ref(),
            Some(Arc::new(Filter::Test(Restriction::Done(Op::Eq, false)))),
        );
        let mut after = None;
        loop {
            let scan = store
                .list(&ListQuery {
                    filter: running.clone(),
                    ..ListQuery::page(parent.clone(), after.take(), SYNC_PAGE)
                })
                .await?;
            found.extend(
                scan.records
                    .iter()
                    .filter(|r| !r.done() && !filter.names.contains(&r.name))
                    .map(entry),
            );
            match scan.resume_after {
                Some(next) => after = Some(next),
                None => return Ok(found),
            }
        }
    }
}
