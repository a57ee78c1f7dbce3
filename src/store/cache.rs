//! A bounded cache of encoded records, so a Get need not pay the store.
//!
//! The durable stores answer reads from it where the store allows: the redb
//! store is the only writer of its file, so its writer keeps the cache
//! coherent with every commit; the PostgreSQL store caches only done
//! records (they never change, they are only deleted), and the change feed
//! removes them when any replica deletes them.
//!
//! Writers are the truth: [`RecordCache::put`] and [`RecordCache::remove`]
//! run after a commit, before it is acknowledged. A reader that missed the
//! cache reads the store and may [`RecordCache::fill`] what it read, which
//! must never overwrite a newer value or bring back a removed one: the
//! reader takes a [`Ticket`] (the cache's generation) before its read, and a
//! fill is refused when an entry is already there (a writer's, at least as
//! new) or when anything was removed or evicted since the ticket (the
//! reader's snapshot may predate that removal). So there are no tombstones:
//! a removal only refuses the fills of reads already in flight.
//!
//! The map sits behind a `std::sync::Mutex`: nothing awaits under it, each
//! critical section is one lookup or insert (decoding happens outside), and
//! an eviction drops a batch of entries at once.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
};

/// The default budget of a store's cache, in encoded bytes.
pub(super) const DEFAULT_CACHE_BYTES: usize = 64 * 1024 * 1024;

/// What an entry costs beyond its bytes (map slot, name, counts).
const ENTRY_OVERHEAD: usize = 64;

/// A read's place in the cache's history (see the module docs).
#[derive(Clone, Copy, Debug)]
pub(super) struct Ticket(u64);

/// Encoded records by name, within a byte budget.
pub(super) struct RecordCache {
    inner: Mutex<Inner>,
    budget: usize,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<Arc<str>, Arc<[u8]>>,
    /// The entries' cost, in bytes.
    bytes: usize,
    /// Counts removals, evictions and clears.
    generation: u64,
    /// The generation of the last removal, eviction or clear: fills by
    /// reads that started before it are refused.
    barrier: u64,
}

impl Inner {
    fn cost(name: &str, bytes: &[u8]) -> usize {
        name.len() + bytes.len() + ENTRY_OVERHEAD
    }

    fn raise_barrier(&mut self) {
        self.generation += 1;
        self.barrier = self.generation;
    }

    fn insert(&mut self, name: Arc<str>, bytes: Arc<[u8]>, budget: usize) {
        let cost = Self::cost(&name, &bytes);
        if cost > budget {
            // Too large to keep: the older value must not stay behind it
            // (nor come back through a fill of a read already in flight).
            if let Some(old) = self.entries.remove(&name) {
                self.bytes -= Self::cost(&name, &old);
            }
            self.raise_barrier();
            return;
        }
        if let Some(old) = self.entries.insert(name.clone(), bytes) {
            self.bytes -= Self::cost(&name, &old);
        }
        self.bytes += cost;
        if self.bytes > budget {
            self.evict(budget - budget / 8, &name);
        }
    }

    /// Drops entries (any but `keep`) until the cost is at most `target`.
    fn evict(&mut self, target: usize, keep: &str) {
        let mut freed = 0;
        let excess = self.bytes - target;
        let victims: Vec<Arc<str>> = self
            .entries
            .iter()
            .filter(|(name, _)| &***name != keep)
            .take_while(|(name, bytes)| {
                let more = freed < excess;
                freed += Self::cost(name, bytes);
                more
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in victims {
            if let Some(bytes) = self.entries.remove(&name) {
                self.bytes -= Self::cost(&name, &bytes);
            }
        }
        self.raise_barrier();
    }
}

impl RecordCache {
    /// An empty cache of at most `budget` bytes.
    pub(super) fn new(budget: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            budget,
        }
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        // Every critical section leaves the map consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cached encoding of `name`.
    pub(super) fn get(&self, name: &str) -> Option<Arc<[u8]>> {
        self.inner().entries.get(name).cloned()
    }

    /// Taken before a read of the store whose result may be filled in.
    pub(super) fn ticket(&self) -> Ticket {
        Ticket(self.inner().generation)
    }

    /// Caches what a read found, unless a writer got there first or
    /// something was removed since the read's ticket.
    pub(super) fn fill(&self, ticket: Ticket, name: &str, bytes: Arc<[u8]>) {
        let mut inner = self.inner();
        if inner.barrier > ticket.0 || inner.entries.contains_key(name) {
            return;
        }
        inner.insert(Arc::from(name), bytes, self.budget);
    }

    /// A writer's committed value of `name`.
    pub(super) fn put(&self, name: Arc<str>, bytes: Arc<[u8]>) {
        self.inner().insert(name, bytes, self.budget);
    }

    /// A writer removed `name` (or can no longer vouch for it).
    pub(super) fn remove(&self, name: &str) {
        let mut inner = self.inner();
        if let Some(bytes) = inner.entries.remove(name) {
            inner.bytes -= Inner::cost(name, &bytes);
        }
        inner.raise_barrier();
    }

    /// Forgets everything (after the store may have missed changes).
    pub(super) fn clear(&self) {
        let mut inner = self.inner();
        inner.entries.clear();
        inner.bytes = 0;
        inner.raise_barrier();
    }

    /// The number of cached records.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.inner().entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str) -> Arc<[u8]> {
        Arc::from(text.as_bytes())
    }

    #[test]
    fn a_fill_never_overwrites_a_writer_or_revives_a_removal() {
        let cache = RecordCache::new(1 << 20);
        // A read that started before a write fills nothing over it.
        let early = cache.ticket();
        cache.put(Arc::from("a"), value("v2"));
        cache.fill(early, "a", value("v1"));
        assert_eq!(cache.get("a"), Some(value("v2")));
        // A read that started before a removal cannot bring it back.
        let before_delete = cache.ticket();
        cache.remove("a");
        cache.fill(before_delete, "a", value("v2"));
        assert_eq!(cache.get("a"), None);
        // A read that started after it may fill.
        let after = cache.ticket();
        cache.fill(after, "a", value("v3"));
        assert_eq!(cache.get("a"), Some(value("v3")));
        // A clear is a removal of everything.
        let stale = cache.ticket();
        cache.clear();
        cache.fill(stale, "b", value("x"));
        assert_eq!(cache.len(), 0);
    }

    #[test]
    fn the_budget_holds_and_eviction_refuses_earlier_fills() {
        let entry = Inner::cost("k000", &[0; 100]);
        let cache = RecordCache::new(entry * 10);
        for i in 0..50 {
            cache.put(Arc::from(format!("k{i:03}")), Arc::from(vec![0u8; 100]));
            assert!(cache.inner().bytes <= entry * 10);
        }
        let last = cache.get("k049");
        assert!(last.is_some(), "the newest entry is never the one evicted");
        assert!(cache.len() <= 10);
        let early = cache.ticket();
        for i in 50..70 {
            cache.put(Arc::from(format!("k{i:03}")), Arc::from(vec![0u8; 100]));
        }
        cache.fill(early, "late", Arc::from(vec![0u8; 10]));
        assert!(cache.get("late").is_none());
        // Too large to cache at all.
        cache.put(Arc::from("huge"), Arc::from(vec![0u8; entry * 11]));
        assert!(cache.get("huge").is_none());
    }

    #[test]
    fn a_value_too_large_to_keep_drops_the_older_one() {
        let cache = RecordCache::new(1 << 10);
        cache.put(Arc::from("a"), value("small"));
        let before = cache.ticket();
        cache.put(Arc::from("a"), Arc::from(vec![0u8; 2 << 10]));
        assert_eq!(cache.get("a"), None, "the stale small value is gone");
        assert_eq!(cache.inner().bytes, 0);
        // A read from before the write cannot bring the old value back.
        cache.fill(before, "a", value("small"));
        assert_eq!(cache.get("a"), None);
    }
}
