//! Following changes live (`Console.WatchOperationChanges`, `opsd ops
//! watch`, the operator page's feed).
//!
//! Each follower is a task that reads the store's change feed, keeps the
//! changes under its parent pattern, re-reads each changed operation and
//! sends its state (or its deletion) into a bounded channel. The re-read
//! makes the store the truth: a change committed by another replica looks
//! like a local one, and a follower never shows a state that was not
//! committed. A slow client slows only its own stream, and never makes the
//! task buffer without bound: changed names wait in a set (in arrival
//! order, each name once), so a burst of changes to one operation is sent as
//! its latest state. A follower that falls behind the feed re-sends every
//! selected operation, so nothing is missed; so does a resync on the feed.
//! With a [`Visibility`] (auth on), a follower selects only the names its
//! caller may see, by name alone: not even a deletion of another name is
//! sent.

use std::{
    collections::{HashSet, VecDeque},
    sync::Arc,
    time::SystemTime,
};

use tokio::sync::{broadcast, mpsc};

use super::{expired, filter, name::parse_list_target, Record, Registry, Visibility};
use crate::{
    error::Error,
    store::{filter::Filter, parent_of, Cause, Change, ListQuery, ParentPattern},
};

/// Changes buffered per follower before it waits for its client.
const STREAM_BUFFER: usize = 64;
/// Records read per page when (re-)sending every selected operation.
const SNAPSHOT_PAGE: usize = 500;

/// One change as a follower sees it.
#[derive(Clone, Debug, PartialEq)]
pub enum Followed {
    /// The operation as it is now (its `update_time` is the time of its
    /// last change).
    Changed(Box<Record>),
    /// The operation is gone (`time`: when the follower found it gone).
    Deleted { name: String, time: SystemTime },
}

/// What a follower selects: operations under a parent pattern that pass a
/// filter.
struct Selection {
    parent: ParentPattern,
    /// The caller's filter, restricted to what it may see.
    filter: Option<Arc<Filter>>,
    visibility: Option<Visibility>,
}

impl Selection {
    fn covers(&self, name: &str) -> bool {
        self.parent.matches_parent(parent_of(name))
            && self.visibility.as_ref().is_none_or(|v| v.covers(name))
    }
}

/// The changed names waiting to be sent: each once, oldest first.
#[derive(Default)]
struct Pending {
    order: VecDeque<Arc<str>>,
    queued: HashSet<Arc<str>>,
}

impl Pending {
    fn push(&mut self, name: Arc<str>) {
        if self.queued.insert(name.clone()) {
            self.order.push_back(name);
        }
    }

    fn pop(&mut self) -> Option<Arc<str>> {
        let name = self.order.pop_front()?;
        self.queued.remove(&name);
        Some(name)
    }

    fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

impl Registry {
    /// Follows the operations under `parent` (`-` wildcards; `-` alone for
    /// all) that pass `filter`: every committed change is sent as the
    /// operation's new state, or its deletion. With `initial`, every
    /// selected operation is sent first, as it is now. With `visibility`,
    /// only the names it covers. The stream ends when the receiver is
    /// dropped or the registry shuts down.
    pub fn follow(
        &self,
        parent: &str,
        filter: &str,
        initial: bool,
        visibility: Option<Visibility>,
    ) -> Result<mpsc::Receiver<Result<Followed, Error>>, Error> {
        let selection = Selection {
            parent: parse_list_target(parent).map_err(|e| e.for_field("parent"))?,
            filter: Visibility::restrict(visibility.as_ref(), filter::parse(filter)?.map(Arc::new)),
            visibility,
        };
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        // Subscribe before the initial read, so no change falls in between.
        let feed = self.shared.store.subscribe();
        let registry = self.clone();
        tokio::spawn(async move {
            registry.run_follow(selection, feed, tx, initial).await;
        });
        Ok(rx)
    }

    async fn run_follow(
        &self,
        selection: Selection,
        mut feed: broadcast::Receiver<Change>,
        tx: mpsc::Sender<Result<Followed, Error>>,
        mut snapshot: bool,
    ) {
        let shutdown = self.shared.shutdown.clone();
        let mut pending = Pending::default();
        loop {
            if snapshot {
                snapshot = false;
                if let Err(err) = self.snapshot(&selection, &mut pending).await {
                    // The client learns why its stream ended.
                    let _ = tx.send(Err(err)).await;
                    return;
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tx.closed() => return,
                change = feed.recv() => match change {
                    // Changes may have been missed (a PostgreSQL listener's
                    // gap): send everything again.
                    Ok(change) if change.cause == Cause::Resync => snapshot = true,
                    Ok(change) if selection.covers(&change.name) => pending.push(change.name),
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::debug!(missed, "a follower fell behind the change feed; re-sending");
                        snapshot = true;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                permit = tx.reserve(), if !pending.is_empty() => {
                    let Ok(permit) = permit else { return };
                    let Some(name) = pending.pop() else { continue };
                    match self.followed(&selection, &name).await {
                        Ok(Some(event)) => permit.send(Ok(event)),
                        Ok(None) => {}
                        Err(err) => {
                            permit.send(Err(err));
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Queues every selected operation (the initial state, or a re-send
    /// after the follower fell behind).
    async fn snapshot(&self, selection: &Selection, pending: &mut Pending) -> Result<(), Error> {
        let mut after = None;
        loop {
            let scan = self
                .store()
                .list(&ListQuery {
                    filter: selection.filter.clone(),
                    ..ListQuery::page(selection.parent.clone(), after.take(), SNAPSHOT_PAGE)
                })
                .await?;
            for record in &scan.records {
                pending.push(Arc::from(record.name.as_str()));
            }
            match scan.resume_after {
                Some(next) => after = Some(next),
                None => return Ok(()),
            }
        }
    }

    /// The state to send for a changed name: its record if it passes the
    /// filter, its deletion if it is gone, nothing if it no longer passes.
    async fn followed(&self, selection: &Selection, name: &str) -> Result<Option<Followed>, Error> {
        let time = self.now();
        let stored = match self.store().get(name).await? {
            Some(stored) => stored,
            None => {
                return Ok(Some(Followed::Deleted {
                    name: name.to_owned(),
                    time,
                }))
            }
        };
        if selection
            .filter
            .as_ref()
            .is_some_and(|f| !f.matches(&stored))
        {
            return Ok(None);
        }
        let record = Record::from_stored(stored)?;
        if expired(&record, time) {
            return Ok(Some(Followed::Deleted {
                name: name.to_owned(),
                time,
            }));
        }
        Ok(Some(Followed::Changed(Box::new(record))))
    }
}
