//! The in-process store, for tests and `--store memory`.
//!
//! Records are kept encoded (the codec the redb file uses), keyed by a
//! shared `Arc<str>` name: an operation costs its encoded bytes plus a few
//! dozen bytes of tree, and the change feed and the deadline index reuse the
//! key instead of copying the name. Reads decode.
//!
//! All state sits behind one `std::sync::Mutex`: nothing awaits while it is
//! held, and every critical section is short: a lookup or insert with one
//! record's encoding or decoding, one List page, or one chunk of the
//! deadline scan (which lets go between chunks). Changes are published while
//! the lock is held, which keeps the feed in commit order.

use std::{
    collections::{BTreeMap, HashMap},
    ops::Bound,
    sync::{Arc, Mutex, MutexGuard},
    time::SystemTime,
};

use tokio::sync::broadcast;

use super::{
    codec::{deadline_of, decode, encode_without_name},
    scan, scan_start, Cause, Change, Counts, Deadline, ListQuery, Revision, Scan, Store,
    StoreError, StoredRecord,
};
use crate::clock::Clock;

/// How many changes a slow subscriber may fall behind before it is told it
/// lagged (it then rescans).
const FEED_CAPACITY: usize = 4096;

/// Records the deadline scan reads per hold of the lock.
const DEADLINE_CHUNK: usize = 4096;

/// Operations kept in memory; lost when the process exits.
pub struct MemoryStore {
    state: Mutex<State>,
    feed: broadcast::Sender<Change>,
    /// Stamps each change with its commit time.
    clock: Clock,
    /// Random per process: tokens die with the store.
    page_token_key: [u8; 32],
}

#[derive(Default)]
struct State {
    /// name → the record encoded without its name.
    records: BTreeMap<Arc<str>, Box<[u8]>>,
    /// request id → name, for idempotent creates.
    request_ids: HashMap<String, Arc<str>>,
    counts: Counts,
    /// The highest revision handed out: every write takes the next one,
    /// so a re-created name never reuses a revision of its earlier life.
    revision: Revision,
}

impl State {
    fn load(&self, name: &str) -> Result<Option<StoredRecord>, StoreError> {
        match self.records.get_key_value(name) {
            Some((key, bytes)) => Ok(Some(with_name(key, bytes)?)),
            None => Ok(None),
        }
    }
}

/// Decodes a stored record and gives it its name back.
fn with_name(name: &str, bytes: &[u8]) -> Result<StoredRecord, StoreError> {
    let mut record = decode(bytes)?;
    record.name = name.to_owned();
    Ok(record)
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store on the system clock.
    pub fn new() -> Self {
        Self::with_clock(Clock::System)
    }

    /// An empty store whose changes are stamped by `clock` (the registry's).
    pub fn with_clock(clock: Clock) -> Self {
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
            clock,
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

    fn publish(
        &self,
        name: Arc<str>,
        cause: Cause,
        previous_deadline: Option<SystemTime>,
        deadline: Option<SystemTime>,
    ) {
        // No subscribers is fine: nobody is waiting.
        let _ = self.feed.send(Change {
            name,
            cause,
            previous_deadline,
            deadline,
            time: self.clock.now(),
        });
    }
}

#[async_trait::async_trait]
impl Store for MemoryStore {
    async fn get(&self, name: &str) -> Result<Option<StoredRecord>, StoreError> {
        self.state().load(name)
    }

    async fn find_by_request_id(
        &self,
        request_id: &str,
    ) -> Result<Option<StoredRecord>, StoreError> {
        let state = self.state();
        match state.request_ids.get(request_id) {
            Some(name) => state.load(name),
            None => Ok(None),
        }
    }

    async fn list(&self, query: &ListQuery) -> Result<Scan, StoreError> {
        let start = scan_start(query);
        let state = self.state();
        let entries = state
            .records
            .range::<str, _>((Bound::Included(start.as_str()), Bound::Unbounded))
            .map(|(name, bytes)| Ok((name, &**bytes)));
        scan(query, entries, with_name)
    }

    async fn insert(&self, mut record: StoredRecord) -> Result<Revision, StoreError> {
        let mut state = self.state();
        if let Some(existing) = state.load(&record.name)? {
            return Err(StoreError::Exists(Box::new(existing)));
        }
        if let Some(request_id) = &record.request_id {
            if let Some(name) = state.request_ids.get(request_id) {
                if let Some(existing) = state.load(name)? {
                    return Err(StoreError::Exists(Box::new(existing)));
                }
            }
        }
        state.revision += 1;
        record.revision = state.revision;
        let name: Arc<str> = Arc::from(record.name.as_str());
        if let Some(request_id) = &record.request_id {
            state.request_ids.insert(request_id.clone(), name.clone());
        }
        state.records.insert(
            name.clone(),
            encode_without_name(&mut record).into_boxed_slice(),
        );
        state.counts.add(&record, 1);
        self.publish(name, Cause::Created, None, record.next_deadline());
        Ok(record.revision)
    }

    async fn update(
        &self,
        mut record: StoredRecord,
        expected: Revision,
        cause: Cause,
    ) -> Result<Revision, StoreError> {
        let mut state = self.state();
        let Some((name, bytes)) = state.records.get_key_value(record.name.as_str()) else {
            return Err(StoreError::Conflict);
        };
        let stored = with_name(name, bytes)?;
        // Replacing the value keeps the key, and with it the shared name.
        let name = name.clone();
        if stored.revision != expected {
            return Err(StoreError::Conflict);
        }
        state.revision = state.revision.max(expected) + 1;
        record.revision = state.revision;
        // The idempotency key belongs to the record for its whole life.
        record.request_id = stored.request_id.clone();
        state.records.insert(
            name.clone(),
            encode_without_name(&mut record).into_boxed_slice(),
        );
        state.counts.add(&stored, -1);
        state.counts.add(&record, 1);
        self.publish(name, cause, stored.next_deadline(), record.next_deadline());
        Ok(record.revision)
    }

    async fn delete(&self, name: &str, expected: Revision, cause: Cause) -> Result<(), StoreError> {
        let mut state = self.state();
        match state.load(name)? {
            Some(stored) if stored.revision == expected => {
                let Some((key, _)) = state.records.remove_entry(name) else {
                    return Err(StoreError::Conflict);
                };
                if let Some(request_id) = &stored.request_id {
                    state.request_ids.remove(request_id);
                }
                state.counts.add(&stored, -1);
                self.publish(key, cause, stored.next_deadline(), None);
                Ok(())
            }
            _ => Err(StoreError::Conflict),
        }
    }

    async fn deadlines(&self) -> Result<Vec<Deadline>, StoreError> {
        let mut out = Vec::new();
        let mut after: Option<Arc<str>> = None;
        loop {
            let last = {
                let state = self.state();
                let start = match &after {
                    Some(name) => Bound::Excluded(&**name),
                    None => Bound::Unbounded,
                };
                let mut last = None;
                for (name, bytes) in state
                    .records
                    .range::<str, _>((start, Bound::Unbounded))
                    .take(DEADLINE_CHUNK)
                {
                    if let (Some(at), done) = deadline_of(bytes)? {
                        out.push(Deadline {
                            at,
                            name: name.clone(),
                            done,
                        });
                    }
                    last = Some(name);
                }
                last.cloned()
            };
            match last {
                Some(name) => after = Some(name),
                None => return Ok(out),
            }
            // Writers get their turn between chunks.
            tokio::task::yield_now().await;
        }
    }

    fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.feed.subscribe()
    }

    async fn counts(&self) -> Result<Counts, StoreError> {
        Ok(self.state().counts)
    }

    fn page_token_key(&self) -> [u8; 32] {
        self.page_token_key
    }
}

// The store contract is tested for every store at once: tests/store_suite.rs.
