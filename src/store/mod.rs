//! Durable records of operations and the change feed that follows them.
//!
//! The store knows nothing of the Operations semantics: it keeps
//! [`StoredRecord`]s (the storage schema the registry's model converts to)
//! ordered by name, writes them only when the caller's expected revision still
//! holds (so a cancel and a completion cannot both win), and reports every
//! commit on a broadcast change feed. Waiters, worker streams and the deadline
//! task follow that feed, so the same registry code serves a single process
//! and several replicas sharing one PostgreSQL database (whose feed also
//! carries the other replicas' commits).
//!
//! - `memory`: in process, for tests and `--store memory`.
//! - `redb`: one file, the default; a single process owns it.
//! - [`postgres`]: one database shared by any number of replicas.
//! - `cache`: the bounded read cache of encoded records the durable stores
//!   answer Gets from.

mod cache;
mod codec;
pub mod filter;
mod memory;
pub mod postgres;
mod redb;

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::sync::{broadcast, watch};

pub use self::postgres::{PostgresSettings, PostgresStore};
pub use self::redb::RedbStore;
pub use codec::{StoredOutcome, StoredRecord, StoredResult, StoredScript, StoredStep, StoredTrace};
pub use memory::MemoryStore;

/// A version of one record. Every write gives the record a new revision,
/// higher than the one it replaces and than any an earlier record of the
/// same name had, so a conditional write read before a delete and a
/// re-creation cannot land on the new record.
pub type Revision = u64;

/// The parent part of a canonical operation name.
pub fn parent_of(name: &str) -> &str {
    match name.rfind("/operations/") {
        Some(at) => &name[..at],
        None => "",
    }
}

/// Which operations a listing covers: those whose parent matches, segment by
/// segment, where a `-` segment matches any id (AIP-159); or every
/// operation at every depth ([`ParentPattern::everything`], a lone `-`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentPattern {
    segments: Vec<String>,
    /// Every parent, of any depth (bare names too).
    everything: bool,
}

impl ParentPattern {
    /// Builds a pattern from already validated segments.
    pub fn new(segments: Vec<String>) -> Self {
        Self {
            segments,
            everything: false,
        }
    }

    /// Every operation, whatever its parent.
    pub fn everything() -> Self {
        Self {
            segments: Vec::new(),
            everything: true,
        }
    }

    /// Whether this pattern covers every operation.
    pub fn is_everything(&self) -> bool {
        self.everything
    }

    /// The pattern's text, `-` segments included (`-` for everything).
    pub fn as_string(&self) -> String {
        if self.everything {
            return "-".to_owned();
        }
        self.segments.join("/")
    }

    /// The pattern's segments (none for everything).
    pub fn segments(&self) -> &[String] {
        &self.segments
    }

    /// The longest name prefix shared by every matching operation name.
    pub fn key_prefix(&self) -> String {
        if self.everything {
            return String::new();
        }
        let fixed: Vec<&str> = self
            .segments
            .iter()
            .take_while(|s| s.as_str() != "-")
            .map(String::as_str)
            .collect();
        if fixed.len() == self.segments.len() {
            if fixed.is_empty() {
                "operations/".to_owned()
            } else {
                format!("{}/operations/", fixed.join("/"))
            }
        } else if fixed.is_empty() {
            String::new()
        } else {
            format!("{}/", fixed.join("/"))
        }
    }

    /// Whether the pattern has a `-` wildcard segment (or is everything).
    pub fn has_wildcard(&self) -> bool {
        self.everything || self.segments.iter().any(|s| s == "-")
    }

    /// Whether an operation with this parent is covered.
    pub fn matches_parent(&self, parent: &str) -> bool {
        if self.everything {
            return true;
        }
        if parent.is_empty() {
            return self.segments.is_empty();
        }
        let mut count = 0;
        for (i, segment) in parent.split('/').enumerate() {
            match self.segments.get(i) {
                Some(p) if p == "-" || p == segment => count += 1,
                _ => return false,
            }
        }
        count == self.segments.len()
    }
}

/// One page request to [`Store::list`]: records matching `parent` (and
/// `filter`) with names strictly after `after`, in name order, at most
/// `limit` of them, examining at most `scan_budget` records.
#[derive(Clone, Debug)]
pub struct ListQuery {
    pub parent: ParentPattern,
    pub after: Option<String>,
    pub limit: usize,
    pub filter: Option<Arc<filter::Filter>>,
    pub scan_budget: usize,
}

impl ListQuery {
    /// Everything under `parent` after `after`, `limit` at a time, unfiltered.
    pub fn page(parent: ParentPattern, after: Option<String>, limit: usize) -> Self {
        Self {
            parent,
            after,
            limit,
            filter: None,
            scan_budget: usize::MAX,
        }
    }
}

/// The answer to a [`ListQuery`].
#[derive(Clone, Debug, Default)]
pub struct Scan {
    /// At most `limit` records, in name order.
    pub records: Vec<StoredRecord>,
    /// Where the next page starts (exclusive) when the scan stopped before
    /// the end of the range: another match exists, or the budget ran out.
    pub resume_after: Option<String>,
}

/// Scans `entries` (name order, from the query's start) into a [`Scan`]:
/// the one loop both in-process stores share. An entry is a name and its
/// stored value, which `decode` turns into the record only once the name has
/// passed the prefix and parent checks.
fn scan<I, K, V, D>(query: &ListQuery, entries: I, decode: D) -> Result<Scan, StoreError>
where
    I: IntoIterator<Item = Result<(K, V), StoreError>>,
    K: AsRef<str>,
    D: Fn(&str, V) -> Result<StoredRecord, StoreError>,
{
    let prefix = query.parent.key_prefix();
    let mut out = Scan::default();
    let mut examined = 0usize;
    for entry in entries {
        let (name, value) = entry?;
        let name = name.as_ref();
        if !name.starts_with(&prefix) {
            break;
        }
        if query.after.as_deref() == Some(name) {
            continue;
        }
        examined += 1;
        if query.parent.matches_parent(parent_of(name)) {
            let record = decode(name, value)?;
            if query.filter.as_ref().is_none_or(|f| f.matches(&record)) {
                if out.records.len() == query.limit {
                    out.resume_after = out.records.last().map(|r| r.name.clone());
                    break;
                }
                out.records.push(record);
            }
        }
        if examined >= query.scan_budget {
            out.resume_after = Some(name.to_owned());
            break;
        }
    }
    Ok(out)
}

/// The first key a [`ListQuery`] looks at.
fn scan_start(query: &ListQuery) -> String {
    let prefix = query.parent.key_prefix();
    match &query.after {
        Some(after) if after.as_str() >= prefix.as_str() => after.clone(),
        _ => prefix,
    }
}

/// Why a record changed; carried on the change feed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cause {
    Created,
    /// Metadata or lease renewal from the worker.
    Updated,
    /// The worker finished it.
    Completed,
    /// A cooperative cancellation was requested (still running).
    CancelRequested,
    /// It was finished as CANCELLED by an immediate cancel.
    Cancelled,
    /// A cooperative cancel's grace period ended; opsd finished it as CANCELLED.
    GraceExpired,
    /// It was finished as ABORTED because the worker's lease lapsed.
    LeaseExpired,
    /// A client deleted it.
    Deleted,
    /// Retention deleted it.
    Expired,
    /// Not a change of one record: the feed may have missed changes (a
    /// replica cut off from the database for longer than the database keeps
    /// its change log). Every consumer re-reads what it follows, as after
    /// `RecvError::Lagged`. `name` is empty.
    Resync,
}

impl Cause {
    /// A stable lower-case name, for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Created => "created",
            Cause::Updated => "updated",
            Cause::Completed => "completed",
            Cause::CancelRequested => "cancel_requested",
            Cause::Cancelled => "cancelled",
            Cause::GraceExpired => "grace_expired",
            Cause::LeaseExpired => "lease_expired",
            Cause::Deleted => "deleted",
            Cause::Expired => "expired",
            Cause::Resync => "resync",
        }
    }

    /// The cause named by [`Cause::as_str`].
    pub fn from_name(name: &str) -> Option<Self> {
        const ALL: [Cause; 10] = [
            Cause::Created,
            Cause::Updated,
            Cause::Completed,
            Cause::CancelRequested,
            Cause::Cancelled,
            Cause::GraceExpired,
            Cause::LeaseExpired,
            Cause::Deleted,
            Cause::Expired,
            Cause::Resync,
        ];
        ALL.into_iter().find(|cause| cause.as_str() == name)
    }
}

/// Due records a store handed to one replica's deadline task
/// ([`Store::claim_due`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Claimed {
    /// The names claimed, earliest deadline first; no other replica gets
    /// them until the claim's hold ends or a write clears it.
    pub names: Vec<Arc<str>>,
    /// The earliest deadline the claim left behind: a record not yet due,
    /// or a due one another replica holds (claimable when its hold ends).
    pub next: Option<SystemTime>,
    /// When the claim's hold ends (the `now + hold` it was made with): what
    /// [`Store::release`] lets go of.
    pub until: Option<SystemTime>,
}

/// A record's next deadline ([`StoredRecord::next_deadline`]), as
/// [`Store::deadlines`] lists them.
#[derive(Clone, Debug, PartialEq)]
pub struct Deadline {
    pub at: SystemTime,
    pub name: Arc<str>,
    /// Whether the record is done (its deadline is its retention expiry).
    pub done: bool,
}

/// One committed change, published after the commit.
#[derive(Clone, Debug)]
pub struct Change {
    /// Shared, not copied: the memory store hands out its own key, so a
    /// deadline index that keeps the name costs no second allocation.
    pub name: Arc<str>,
    pub cause: Cause,
    /// The record's next deadline before the change (`None` for a creation),
    /// so a deadline index can drop the old entry without a reverse index.
    /// It is exactly the `deadline` of the change that set it: a store must
    /// keep deadlines to the nanosecond.
    pub previous_deadline: Option<SystemTime>,
    /// The record's next deadline after the change (`None` once deleted).
    pub deadline: Option<SystemTime>,
    /// When the change was committed, by the store's clock.
    pub time: SystemTime,
}

/// How many operations a store holds, by state. Done operations that
/// retention has not swept yet still count as done.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub running: u64,
    pub done: u64,
}

impl Change {
    /// The marker of a possible gap in the feed ([`Cause::Resync`]).
    pub fn resync(time: SystemTime) -> Self {
        Self {
            name: Arc::from(""),
            cause: Cause::Resync,
            previous_deadline: None,
            deadline: None,
            time,
        }
    }
}

impl Counts {
    pub fn total(&self) -> u64 {
        self.running + self.done
    }

    /// Counts `record` in (`sign` 1) or out (`sign` -1).
    fn add(&mut self, record: &StoredRecord, sign: i64) {
        self.add_state(record.done(), sign);
    }

    fn add_state(&mut self, done: bool, sign: i64) {
        let slot = if done {
            &mut self.done
        } else {
            &mut self.running
        };
        *slot = slot.saturating_add_signed(sign);
    }
}

/// A store failure. `Conflict` and `Exists` are answers the registry acts on;
/// the others are faults that reach the client as UNAVAILABLE or INTERNAL.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The record's revision is not the expected one (or it is gone).
    #[error("the record changed since it was read")]
    Conflict,
    /// A record with this name or request id already exists.
    #[error("operation {} already exists", .0.name)]
    Exists(Box<StoredRecord>),
    /// The store cannot take writes now (disk full, I/O error); reads may work.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Anything else: a bug or corrupt data.
    #[error("store failure: {0}")]
    Internal(String),
}

/// What a store tells of its group commits (the server turns it into
/// metrics); `()` listens to nothing.
pub trait CommitObserver: Send + Sync + 'static {
    /// A commit of `batch` mutations took `elapsed`; `ok` is false when it
    /// failed (nothing of the batch was acknowledged).
    fn committed(&self, batch: usize, elapsed: std::time::Duration, ok: bool);
}

impl CommitObserver for () {
    fn committed(&self, _: usize, _: std::time::Duration, _: bool) {}
}

/// Durable records. Writes return once committed; [`Store::subscribe`]
/// reports every commit.
#[async_trait::async_trait] // object-safe: the registry holds Arc<dyn Store>
pub trait Store: Send + Sync + 'static {
    /// The record with this name, if any.
    async fn get(&self, name: &str) -> Result<Option<StoredRecord>, StoreError>;

    /// The record created with this request id, if any.
    async fn find_by_request_id(
        &self,
        request_id: &str,
    ) -> Result<Option<StoredRecord>, StoreError>;

    /// One page of records in name order (keyset pagination), filtered in
    /// the store before the page is cut.
    async fn list(&self, query: &ListQuery) -> Result<Scan, StoreError>;

    /// Inserts a new record and returns its first revision (never one an
    /// earlier record of the same name had; see [`Revision`]). A record
    /// with the same name or the same request id → [`StoreError::Exists`]
    /// with that record.
    async fn insert(&self, record: StoredRecord) -> Result<Revision, StoreError>;

    /// Replaces the record if its stored revision is still `expected`, and
    /// returns the new revision; otherwise (or if it is gone) →
    /// [`StoreError::Conflict`]. The stored request id is kept whatever
    /// `record` says.
    async fn update(
        &self,
        record: StoredRecord,
        expected: Revision,
        cause: Cause,
    ) -> Result<Revision, StoreError>;

    /// Removes the record if its stored revision is still `expected`;
    /// otherwise (or if it is gone) → [`StoreError::Conflict`].
    async fn delete(&self, name: &str, expected: Revision, cause: Cause) -> Result<(), StoreError>;

    /// Every record's next deadline, for the deadline task at start-up and
    /// after it missed changes. Reads only the fields that decide it, and
    /// never holds writers back for the whole scan.
    async fn deadlines(&self) -> Result<Vec<Deadline>, StoreError>;

    /// The running records' next deadlines (leases, cooperative cancels,
    /// script steps): [`Store::deadlines`] without the done records, which
    /// a store that indexes them answers without reading every record.
    async fn running_deadlines(&self) -> Result<Vec<Deadline>, StoreError> {
        let mut all = self.deadlines().await?;
        all.retain(|d| !d.done);
        Ok(all)
    }

    /// For stores shared by several replicas: claims up to `limit` records
    /// whose next deadline is at or before `now` and that no other replica
    /// holds, for `hold` (a replica that dies mid-claim loses it by expiry;
    /// any write to a record clears its claim). `None`: the store is not
    /// shared, and the deadline task keeps its own index of deadlines from
    /// [`Store::deadlines`] and the feed.
    async fn claim_due(
        &self,
        now: SystemTime,
        limit: usize,
        hold: Duration,
    ) -> Result<Option<Claimed>, StoreError> {
        let _ = (now, limit, hold);
        Ok(None)
    }

    /// Lets go of a claim ([`Claimed::until`]) on names the deadline task
    /// did not fire (nothing was due after all, or the action failed), so
    /// they are claimable again at once instead of when the hold ends.
    async fn release(&self, names: &[Arc<str>], until: SystemTime) -> Result<(), StoreError> {
        let _ = (names, until);
        Ok(())
    }

    /// The change feed: every commit from now on, in commit order (for a
    /// shared store: this replica's commits in their order, the others'
    /// as the feed learns of them, each once).
    fn subscribe(&self) -> broadcast::Receiver<Change>;

    /// Whether the store can serve, for stores that can lose their backend
    /// (a database): `true` while it answers. `None`: always serving.
    fn health(&self) -> Option<watch::Receiver<bool>> {
        None
    }

    /// The number of stored records, by state, kept current with every
    /// commit (a store counts its records once, when it opens a file written
    /// before counts were kept).
    async fn counts(&self) -> Result<Counts, StoreError>;

    /// The secret that signs page tokens: kept with the store, so tokens
    /// survive restarts and every replica of the store accepts them.
    fn page_token_key(&self) -> [u8; 32];
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(s: &str) -> ParentPattern {
        ParentPattern::new(if s.is_empty() {
            vec![]
        } else {
            s.split('/').map(str::to_owned).collect()
        })
    }

    #[test]
    fn key_prefix_stops_at_the_first_wildcard() {
        assert_eq!(pattern("").key_prefix(), "operations/");
        assert_eq!(pattern("projects/p").key_prefix(), "projects/p/operations/");
        assert_eq!(
            pattern("projects/p/locations/-").key_prefix(),
            "projects/p/locations/"
        );
        assert_eq!(pattern("projects/-/locations/l").key_prefix(), "projects/");
    }

    #[test]
    fn wildcard_matches_one_segment_of_the_same_depth() {
        let p = pattern("projects/p/locations/-");
        assert!(p.matches_parent("projects/p/locations/l"));
        assert!(!p.matches_parent("projects/p"));
        assert!(!p.matches_parent("projects/q/locations/l"));
        assert!(!p.matches_parent("projects/p/locations/l/x/y"));
        assert!(pattern("").matches_parent(""));
        assert!(!pattern("").matches_parent("projects/p"));
    }

    #[test]
    fn everything_matches_every_parent_from_the_first_key() {
        let all = ParentPattern::everything();
        assert_eq!(all.key_prefix(), "");
        assert_eq!(all.as_string(), "-");
        for parent in ["", "projects/p", "projects/p/locations/l", "a/b/c/d/e/f"] {
            assert!(all.matches_parent(parent), "{parent}");
        }
    }

    #[test]
    fn parent_of_a_bare_name_is_empty() {
        assert_eq!(parent_of("operations/a"), "");
        assert_eq!(parent_of("projects/p/operations/a"), "projects/p");
    }
}
