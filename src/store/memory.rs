//! The in-process store, for tests and `--store memory`.
//!
//! All state sits behind one `std::sync::Mutex`: nothing awaits while it is
//! held, and every critical section is a map lookup or insert, so it is never
//! held for long. Changes are published while the lock is held, which keeps
//! the feed in commit order.

use std::{
    collections::{BTreeMap, HashMap},
    ops::Bound,
    sync::{Mutex, MutexGuard},
    time::SystemTime,
};

use tokio::sync::broadcast;

use super::{
    scan, scan_start, Cause, Change, ListQuery, Record, Revision, Scan, Store, StoreError,
};

/// How many changes a slow subscriber may fall behind before it is told it
/// lagged (it then rescans).
const FEED_CAPACITY: usize = 4096;

/// Operations kept in memory; lost when the process exits.
pub struct MemoryStore {
    state: Mutex<State>,
    feed: broadcast::Sender<Change>,
    /// Random per process: tokens die with the store.
    page_token_key: [u8; 32],
}

#[derive(Default)]
struct State {
    records: BTreeMap<String, Record>,
    /// request id → name, for idempotent creates.
    request_ids: HashMap<String, String>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        let (feed, _) = broadcast::channel(FEED_CAPACITY);
        let mut page_token_key = [0; 32];
        // Without OS randomness the key stays zero: tokens still bind to
        // their listing, they are only forgeable.
        if let Err(err) = getrandom::fill(&mut page_token_key) {
            tracing::error!(cause = %err, "no OS randomness for the page token key");
        }
        Self {
            state: Mutex::new(State::default()),
            feed,
            page_token_key,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while the lock was held cannot leave a half-applied write:
        // every write is a single insert or remove.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn publish(&self, name: &str, cause: Cause, deadline: Option<SystemTime>) {
        // No subscribers is fine: nobody is waiting.
        let _ = self.feed.send(Change {
            name: name.to_owned(),
            cause,
            deadline,
            time: SystemTime::now(),
        });
    }
}

#[async_trait::async_trait]
impl Store for MemoryStore {
    async fn get(&self, name: &str) -> Result<Option<Record>, StoreError> {
        Ok(self.state().records.get(name).cloned())
    }

    async fn find_by_request_id(&self, request_id: &str) -> Result<Option<Record>, StoreError> {
        let state = self.state();
        Ok(state
            .request_ids
            .get(request_id)
            .and_then(|name| state.records.get(name))
            .cloned())
    }

    async fn list(&self, query: &ListQuery) -> Result<Scan, StoreError> {
        let start = scan_start(query);
        let state = self.state();
        let entries = state
            .records
            .range::<String, _>((Bound::Included(&start), Bound::Unbounded))
            .map(|(name, record)| Ok((name.clone(), record.clone())));
        scan(query, entries)
    }

    async fn insert(&self, mut record: Record) -> Result<Record, StoreError> {
        let mut state = self.state();
        if let Some(existing) = state.records.get(&record.name) {
            return Err(StoreError::Exists(Box::new(existing.clone())));
        }
        if let Some(request_id) = &record.request_id {
            if let Some(existing) = state
                .request_ids
                .get(request_id)
                .and_then(|name| state.records.get(name))
            {
                return Err(StoreError::Exists(Box::new(existing.clone())));
            }
            state
                .request_ids
                .insert(request_id.clone(), record.name.clone());
        }
        record.revision = 1;
        state.records.insert(record.name.clone(), record.clone());
        self.publish(&record.name, Cause::Created, record.next_deadline());
        Ok(record)
    }

    async fn update(
        &self,
        mut record: Record,
        expected: Revision,
        cause: Cause,
    ) -> Result<Record, StoreError> {
        let mut state = self.state();
        let Some(slot) = state.records.get_mut(&record.name) else {
            return Err(StoreError::Conflict);
        };
        if slot.revision != expected {
            return Err(StoreError::Conflict);
        }
        record.revision = expected + 1;
        // The idempotency key belongs to the record for its whole life.
        record.request_id = slot.request_id.clone();
        *slot = record.clone();
        self.publish(&record.name, cause, record.next_deadline());
        Ok(record)
    }

    async fn delete(&self, name: &str, expected: Revision, cause: Cause) -> Result<(), StoreError> {
        let mut state = self.state();
        match state.records.get(name) {
            Some(record) if record.revision == expected => {}
            _ => return Err(StoreError::Conflict),
        }
        if let Some(record) = state.records.remove(name) {
            if let Some(request_id) = &record.request_id {
                state.request_ids.remove(request_id);
            }
        }
        self.publish(name, cause, None);
        Ok(())
    }

    async fn deadlines(&self) -> Result<Vec<(SystemTime, String)>, StoreError> {
        Ok(self
            .state()
            .records
            .values()
            .filter_map(|r| r.next_deadline().map(|d| (d, r.name.clone())))
            .collect())
    }

    fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.feed.subscribe()
    }

    async fn count(&self) -> Result<usize, StoreError> {
        Ok(self.state().records.len())
    }

    fn page_token_key(&self) -> [u8; 32] {
        self.page_token_key
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::store::{CancelPolicy, ParentPattern};

    fn record(name: &str) -> Record {
        let now = SystemTime::now();
        Record {
            name: name.to_owned(),
            revision: 0,
            metadata: None,
            outcome: None,
            cancel_policy: CancelPolicy::Immediate,
            cancel_grace_period: Duration::from_secs(30),
            cancel_deadline: None,
            lease: None,
            lease_deadline: None,
            request_id: None,
            create_time: now,
            update_time: now,
            done_time: None,
            expire_time: None,
            script: None,
        }
    }

    fn query(parent: &[&str], after: Option<&str>, limit: usize) -> ListQuery {
        ListQuery::page(
            ParentPattern::new(parent.iter().map(|s| s.to_string()).collect()),
            after.map(str::to_owned),
            limit,
        )
    }

    #[tokio::test]
    async fn update_with_a_stale_revision_conflicts() {
        let store = MemoryStore::new();
        let created = store.insert(record("operations/a")).await.unwrap();
        assert_eq!(created.revision, 1);
        let updated = store
            .update(created.clone(), 1, Cause::Updated)
            .await
            .unwrap();
        assert_eq!(updated.revision, 2);
        assert!(matches!(
            store.update(created, 1, Cause::Updated).await,
            Err(StoreError::Conflict)
        ));
    }

    #[tokio::test]
    async fn insert_refuses_a_taken_name_or_request_id() {
        let store = MemoryStore::new();
        let mut a = record("operations/a");
        a.request_id = Some("r1".into());
        store.insert(a.clone()).await.unwrap();
        assert!(matches!(store.insert(a).await, Err(StoreError::Exists(_))));
        let mut b = record("operations/b");
        b.request_id = Some("r1".into());
        match store.insert(b).await {
            Err(StoreError::Exists(existing)) => assert_eq!(existing.name, "operations/a"),
            other => panic!("unexpected {other:?}"),
        }
        store
            .delete("operations/a", 1, Cause::Deleted)
            .await
            .unwrap();
        assert!(store.find_by_request_id("r1").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn list_is_keyset_paginated_within_the_parent() {
        let store = MemoryStore::new();
        for name in [
            "operations/a",
            "projects/p/operations/a",
            "projects/p/operations/b",
            "projects/p/operations/c",
            "projects/p/locations/l/operations/x",
            "projects/q/operations/a",
        ] {
            store.insert(record(name)).await.unwrap();
        }
        let names = |scan: Scan| scan.records.into_iter().map(|r| r.name).collect::<Vec<_>>();
        let page = store
            .list(&query(&["projects", "p"], None, 2))
            .await
            .unwrap();
        assert_eq!(
            names(page),
            ["projects/p/operations/a", "projects/p/operations/b"]
        );
        let page = store
            .list(&query(
                &["projects", "p"],
                Some("projects/p/operations/b"),
                2,
            ))
            .await
            .unwrap();
        assert_eq!(names(page), ["projects/p/operations/c"]);
        let page = store.list(&query(&[], None, 10)).await.unwrap();
        assert_eq!(names(page), ["operations/a"]);
        let page = store
            .list(&query(&["projects", "-"], None, 10))
            .await
            .unwrap();
        assert_eq!(page.records.len(), 4);
        assert!(page.resume_after.is_none());
    }

    #[tokio::test]
    async fn every_commit_is_published_in_order() {
        let store = MemoryStore::new();
        let mut feed = store.subscribe();
        let a = store.insert(record("operations/a")).await.unwrap();
        store.update(a, 1, Cause::Completed).await.unwrap();
        store
            .delete("operations/a", 2, Cause::Deleted)
            .await
            .unwrap();
        let causes: Vec<Cause> = (0..3).map(|_| feed.try_recv().unwrap().cause).collect();
        assert_eq!(causes, [Cause::Created, Cause::Completed, Cause::Deleted]);
    }
}
