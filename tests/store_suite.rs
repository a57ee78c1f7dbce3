//! The store contract, one suite for every store: memory, redb and
//! PostgreSQL run the same cases (conditional writes, insert conflicts,
//! keyset pages, counts, the change feed, durability across reopening).
//!
//! PostgreSQL comes from `tests/common/postgres.rs` (a throwaway cluster or
//! `OPSD_TEST_PG_URL`); without it those cases are ignored locally and fail
//! under CI=true.

mod common;

use std::{
    future::Future,
    path::PathBuf,
    pin::Pin,
    sync::Arc,
    time::{Duration, SystemTime},
};

use common::{
    outside::{self, block_on},
    postgres::{main_with, Postgres},
};
use opsd::{
    clock::Clock,
    pb::google::rpc,
    store::{
        Cause, Counts, ListQuery, MemoryStore, ParentPattern, PostgresSettings, PostgresStore,
        RedbStore, Scan, Store, StoreError, StoredOutcome, StoredRecord, StoredTrace,
    },
};

/// Where a case's store lives, so a durable one can be opened again.
#[derive(Clone)]
enum Backend {
    Memory,
    Redb(PathBuf),
    Postgres(String),
}

impl Backend {
    fn durable(&self) -> bool {
        !matches!(self, Backend::Memory)
    }

    async fn open(&self) -> Arc<dyn Store> {
        match self {
            Backend::Memory => Arc::new(MemoryStore::new()),
            Backend::Redb(path) => {
                // The previous store's writer thread lets go of the file
                // just after the store is dropped.
                let give_up = std::time::Instant::now() + Duration::from_secs(10);
                loop {
                    match RedbStore::open(path) {
                        Ok(store) => return Arc::new(store),
                        Err(err) if std::time::Instant::now() < give_up => {
                            let _ = err;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Err(err) => panic!("{err}"),
                    }
                }
            }
            Backend::Postgres(url) => Arc::new(
                PostgresStore::connect(
                    &url.parse().unwrap(),
                    PostgresSettings::default(),
                    Clock::System,
                )
                .await
                .unwrap(),
            ),
        }
    }
}

fn ts(t: SystemTime) -> Option<prost_types::Timestamp> {
    Some(t.into())
}

/// A running record without deadlines or a request id.
fn record(name: &str) -> StoredRecord {
    let now = SystemTime::now();
    StoredRecord {
        name: name.to_owned(),
        metadata: Some(prost_types::Any::from_msg(&"m".to_owned()).unwrap()),
        cancel_policy: 2,
        create_time: ts(now),
        update_time: ts(now),
        ..Default::default()
    }
}

/// The record finished with CANCELLED, with its retention expiry.
fn finished(mut record: StoredRecord) -> StoredRecord {
    record.outcome = Some(StoredOutcome::Error(rpc::Status {
        code: 1,
        message: "Operation was cancelled.".into(),
        details: vec![],
    }));
    record.lease_deadline = None;
    record.cancel_deadline = None;
    record.done_time = record.update_time;
    record.expire_time = ts(SystemTime::now() + Duration::from_secs(3600));
    record
}

fn query(parent: &[&str], after: Option<&str>, limit: usize) -> ListQuery {
    ListQuery::page(
        ParentPattern::new(parent.iter().map(|s| s.to_string()).collect()),
        after.map(str::to_owned),
        limit,
    )
}

fn names(scan: Scan) -> Vec<String> {
    scan.records.into_iter().map(|r| r.name).collect()
}

async fn conditional_writes_hold(backend: Backend) {
    let store = backend.open().await;
    // With the trace it was created in (a field newer than the schema's
    // first version), which every store keeps as it keeps the rest.
    let created = StoredRecord {
        trace: Some(StoredTrace {
            trace_id: vec![7; 16],
            span_id: vec![9; 8],
            flags: 1,
            state: "vendor=x".into(),
        }),
        ..record("operations/a")
    };
    let first = store.insert(created.clone()).await.unwrap();
    let stored = store.get("operations/a").await.unwrap().unwrap();
    assert_eq!(stored.trace, created.trace);
    assert_eq!(stored.revision, first);
    let updated = store
        .update(created.clone(), first, Cause::Updated)
        .await
        .unwrap();
    assert!(updated > first, "{updated} after {first}");
    assert_eq!(
        store.get("operations/a").await.unwrap().unwrap().revision,
        updated
    );
    assert!(matches!(
        store.update(created.clone(), first, Cause::Updated).await,
        Err(StoreError::Conflict)
    ));
    assert!(matches!(
        store.delete("operations/a", first, Cause::Deleted).await,
        Err(StoreError::Conflict)
    ));
    store
        .delete("operations/a", updated, Cause::Deleted)
        .await
        .unwrap();
    assert!(store.get("operations/a").await.unwrap().is_none());
    assert!(matches!(
        store.update(created.clone(), updated, Cause::Updated).await,
        Err(StoreError::Conflict)
    ));
    assert!(matches!(
        store.delete("operations/a", updated, Cause::Deleted).await,
        Err(StoreError::Conflict)
    ));
    // Created again, the name never takes a revision of its earlier life:
    // a write read from that life (a stale replica) cannot land.
    let mut seen = vec![first, updated];
    let again = store.insert(created.clone()).await.unwrap();
    assert!(!seen.contains(&again), "{again} reused: {seen:?}");
    seen.push(again);
    let mut revision = again;
    for _ in 0..3 {
        revision = store
            .update(created.clone(), revision, Cause::Updated)
            .await
            .unwrap();
        assert!(!seen.contains(&revision), "{revision} reused: {seen:?}");
        seen.push(revision);
    }
    for stale in [first, updated] {
        assert!(matches!(
            store.update(created.clone(), stale, Cause::Completed).await,
            Err(StoreError::Conflict)
        ));
    }
    // And not after the store is opened again either.
    if backend.durable() {
        drop(store);
        let store = backend.open().await;
        store
            .delete("operations/a", revision, Cause::Deleted)
            .await
            .unwrap();
        let reopened = store.insert(created).await.unwrap();
        assert!(!seen.contains(&reopened), "{reopened} reused: {seen:?}");
    }
}

async fn insert_refuses_a_taken_name_or_request_id(backend: Backend) {
    let store = backend.open().await;
    let mut a = record("operations/a");
    a.request_id = Some("r1".into());
    let first = store.insert(a.clone()).await.unwrap();
    match store.insert(a).await {
        Err(StoreError::Exists(existing)) => assert_eq!(existing.revision, first),
        other => panic!("unexpected {other:?}"),
    }
    let mut b = record("operations/b");
    b.request_id = Some("r1".into());
    match store.insert(b).await {
        Err(StoreError::Exists(existing)) => {
            assert_eq!(existing.name, "operations/a");
            assert_eq!(existing.request_id.as_deref(), Some("r1"));
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(
        store.find_by_request_id("r1").await.unwrap().unwrap().name,
        "operations/a"
    );
    // The request id belongs to the record for its whole life, whatever an
    // update says.
    let mut forgetful = record("operations/a");
    forgetful.request_id = None;
    let second = store
        .update(forgetful, first, Cause::Updated)
        .await
        .unwrap();
    let kept = store.get("operations/a").await.unwrap().unwrap();
    assert_eq!(kept.request_id.as_deref(), Some("r1"));
    store
        .delete("operations/a", second, Cause::Deleted)
        .await
        .unwrap();
    assert!(store.find_by_request_id("r1").await.unwrap().is_none());
    // Free again after the delete.
    let mut c = record("operations/c");
    c.request_id = Some("r1".into());
    store.insert(c).await.unwrap();
}

async fn lists_are_keyset_pages_within_the_parent(backend: Backend) {
    let store = backend.open().await;
    for name in [
        "operations/a",
        "projects/p/operations/a",
        "projects/p/operations/b",
        "projects/p/operations/c",
        "projects/p/locations/l/operations/x",
        "projects/q/operations/a",
        "projectsx/operations/z",
    ] {
        store.insert(record(name)).await.unwrap();
    }
    let page = store
        .list(&query(&["projects", "p"], None, 2))
        .await
        .unwrap();
    assert_eq!(
        page.resume_after.as_deref(),
        Some("projects/p/operations/b")
    );
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
    assert!(page.resume_after.is_none());
    assert_eq!(names(page), ["projects/p/operations/c"]);
    let page = store.list(&query(&[], None, 10)).await.unwrap();
    assert_eq!(names(page), ["operations/a"]);
    let page = store
        .list(&query(&["projects", "-"], None, 10))
        .await
        .unwrap();
    assert!(page.resume_after.is_none());
    assert_eq!(
        names(page),
        [
            "projects/p/operations/a",
            "projects/p/operations/b",
            "projects/p/operations/c",
            "projects/q/operations/a"
        ]
    );
    let page = store
        .list(&query(&["projects", "-", "locations", "-"], None, 10))
        .await
        .unwrap();
    assert_eq!(names(page), ["projects/p/locations/l/operations/x"]);
    // A scan budget stops the page early, on the last record examined.
    let mut budgeted = query(&["projects", "-"], None, 10);
    budgeted.scan_budget = 2;
    let page = store.list(&budgeted).await.unwrap();
    // Examined: the location's operation (no match), then a (a match).
    assert_eq!(
        page.resume_after.as_deref(),
        Some("projects/p/operations/a")
    );
    assert_eq!(names(page), ["projects/p/operations/a"]);
}

async fn counts_follow_each_commit_and_changes_carry_both_deadlines(backend: Backend) {
    let store = backend.open().await;
    let mut feed = store.subscribe();
    let mut leased = record("operations/a");
    let lease_deadline = SystemTime::now() + Duration::from_secs(60);
    leased.lease_deadline = Some(lease_deadline.into());
    let a = store.insert(leased.clone()).await.unwrap();
    let b = store.insert(record("operations/b")).await.unwrap();
    assert_eq!(
        store.counts().await.unwrap(),
        Counts {
            running: 2,
            done: 0
        }
    );
    let done = finished(leased.clone());
    let a = store
        .update(done.clone(), a, Cause::Completed)
        .await
        .unwrap();
    assert_eq!(
        store.counts().await.unwrap(),
        Counts {
            running: 1,
            done: 1
        }
    );
    // A refused write changes nothing.
    assert!(store
        .delete("operations/b", b + 100, Cause::Deleted)
        .await
        .is_err());
    store
        .delete("operations/a", a, Cause::Deleted)
        .await
        .unwrap();
    store
        .delete("operations/b", b, Cause::Deleted)
        .await
        .unwrap();
    assert_eq!(store.counts().await.unwrap(), Counts::default());
    let created = feed.recv().await.unwrap();
    assert_eq!(
        (created.previous_deadline, created.deadline),
        (None, Some(lease_deadline))
    );
    feed.recv().await.unwrap();
    let completed = feed.recv().await.unwrap();
    assert_eq!(completed.cause, Cause::Completed);
    assert_eq!(completed.previous_deadline, Some(lease_deadline));
    assert_eq!(completed.deadline, done.next_deadline());
    assert!(completed.deadline.is_some());
    let deleted = feed.recv().await.unwrap();
    assert_eq!(
        (deleted.previous_deadline, deleted.deadline),
        (done.next_deadline(), None)
    );
    assert_eq!(&*deleted.name, "operations/a");
}

async fn every_commit_is_published_once_in_order(backend: Backend) {
    let store = backend.open().await;
    let mut feed = store.subscribe();
    let a = record("operations/a");
    let revision = store.insert(a.clone()).await.unwrap();
    let revision = store.update(a, revision, Cause::Completed).await.unwrap();
    store
        .delete("operations/a", revision, Cause::Deleted)
        .await
        .unwrap();
    let mut causes = Vec::new();
    for _ in 0..3 {
        causes.push(feed.recv().await.unwrap().cause);
    }
    assert_eq!(causes, [Cause::Created, Cause::Completed, Cause::Deleted]);
    // Nothing more comes (a shared store's own notifications and polls
    // bring the same changes back; they are not delivered twice).
    tokio::time::sleep(Duration::from_millis(if backend.durable() {
        1500
    } else {
        10
    }))
    .await;
    assert!(matches!(
        feed.try_recv(),
        Err(tokio::sync::broadcast::error::TryRecvError::Empty)
    ));
}

async fn concurrent_writes_all_commit(backend: Backend) {
    let store = backend.open().await;
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move { store.insert(record(&format!("operations/op{i:02}"))).await })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    assert_eq!(store.counts().await.unwrap().total(), 64);
    let all = store.list(&query(&[], None, 100)).await.unwrap();
    assert_eq!(all.records.len(), 64);
}

async fn deadlines_list_every_record_that_has_one(backend: Backend) {
    let store = backend.open().await;
    let mut leased = record("operations/leased");
    let at = SystemTime::now() + Duration::from_secs(30);
    leased.lease_deadline = Some(at.into());
    store.insert(leased).await.unwrap();
    store.insert(record("operations/none")).await.unwrap();
    let done = finished(record("operations/done"));
    store.insert(done.clone()).await.unwrap();
    let mut all = store.deadlines().await.unwrap();
    all.sort_by(|a, b| a.name.cmp(&b.name));
    let found: Vec<(&str, bool)> = all.iter().map(|d| (&*d.name, d.done)).collect();
    assert_eq!(
        found,
        [("operations/done", true), ("operations/leased", false)]
    );
    assert_eq!(all[1].at, at);
    assert_eq!(Some(all[0].at), done.next_deadline());
    let running = store.running_deadlines().await.unwrap();
    assert_eq!(running.len(), 1);
    assert_eq!(&*running[0].name, "operations/leased");
}

async fn durable_stores_keep_everything_when_reopened(backend: Backend) {
    if !backend.durable() {
        return;
    }
    let (key, done_at);
    {
        let store = backend.open().await;
        key = store.page_token_key();
        let mut a = record("projects/p/operations/a");
        a.request_id = Some("req-a".into());
        let first = store.insert(a.clone()).await.unwrap();
        let b = store
            .insert(record("projects/p/operations/b"))
            .await
            .unwrap();
        done_at = store
            .update(finished(a), first, Cause::Completed)
            .await
            .unwrap();
        store
            .delete("projects/p/operations/b", b, Cause::Deleted)
            .await
            .unwrap();
    }
    let store = backend.open().await;
    assert_eq!(store.page_token_key(), key, "page tokens survive a restart");
    let a = store.get("projects/p/operations/a").await.unwrap().unwrap();
    assert_eq!(a.revision, done_at);
    assert!(a.done());
    assert!(store
        .get("projects/p/operations/b")
        .await
        .unwrap()
        .is_none());
    assert_eq!(
        store
            .find_by_request_id("req-a")
            .await
            .unwrap()
            .unwrap()
            .name,
        a.name
    );
    let page = store
        .list(&query(&["projects", "p"], None, 10))
        .await
        .unwrap();
    assert_eq!(names(page), ["projects/p/operations/a"]);
    assert_eq!(
        store.counts().await.unwrap(),
        Counts {
            running: 0,
            done: 1
        }
    );
    assert_eq!(store.deadlines().await.unwrap().len(), 1);
}

async fn only_shared_stores_hand_out_claims(backend: Backend) {
    let store = backend.open().await;
    let now = SystemTime::now();
    let mut due = record("operations/due");
    due.lease_deadline = Some((now - Duration::from_secs(1)).into());
    let due_revision = store.insert(due.clone()).await.unwrap();
    let mut later = record("operations/later");
    let later_at = now + Duration::from_secs(60);
    later.lease_deadline = Some(later_at.into());
    store.insert(later).await.unwrap();
    let hold = Duration::from_secs(30);
    let claimed = store.claim_due(now, 10, hold).await.unwrap();
    let Backend::Postgres(_) = backend else {
        assert!(claimed.is_none(), "a store of one process keeps no claims");
        return;
    };
    let claimed = claimed.unwrap();
    assert_eq!(claimed.names.len(), 1);
    assert_eq!(&*claimed.names[0], "operations/due");
    assert_eq!(claimed.next, Some(later_at));
    // Held: nobody else gets it, and the hold's end is the next wake-up.
    let again = store.claim_due(now, 10, hold).await.unwrap().unwrap();
    assert!(again.names.is_empty());
    assert_eq!(again.next, Some(later_at.min(now + hold)));
    // When the hold ends, anyone may claim it again.
    let expired = store
        .claim_due(now + hold, 10, hold)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(expired.names.len(), 1);
    assert_eq!(expired.until, Some(now + hold + hold));
    // A release of another claim (an older hold) lets go of nothing.
    store.release(&expired.names, now + hold).await.unwrap();
    let held = store
        .claim_due(now + hold, 10, hold)
        .await
        .unwrap()
        .unwrap();
    assert!(held.names.is_empty());
    // Released by its holder, it is claimable at once, hold or not.
    store
        .release(&expired.names, expired.until.unwrap())
        .await
        .unwrap();
    let released = store
        .claim_due(now + hold, 10, hold)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(released.names, expired.names);
    // A write clears the claim.
    store
        .update(due, due_revision, Cause::Updated)
        .await
        .unwrap();
    let cleared = store.claim_due(now, 10, hold).await.unwrap().unwrap();
    assert_eq!(cleared.names.len(), 1);
}

type Case = fn(Backend) -> Pin<Box<dyn Future<Output = ()> + Send>>;

macro_rules! cases {
    ($($name:ident),* $(,)?) => {
        &[$((stringify!($name), (|b| Box::pin($name(b))) as Case)),*]
    };
}

fn main() -> std::process::ExitCode {
    let cases: &[(&str, Case)] = cases![
        conditional_writes_hold,
        insert_refuses_a_taken_name_or_request_id,
        lists_are_keyset_pages_within_the_parent,
        counts_follow_each_commit_and_changes_carry_both_deadlines,
        every_commit_is_published_once_in_order,
        concurrent_writes_all_commit,
        deadlines_list_every_record_that_has_one,
        durable_stores_keep_everything_when_reopened,
        only_shared_stores_hand_out_claims,
    ];
    main_with(|pg| {
        let mut trials = Vec::new();
        for (name, case) in cases {
            let case = *case;
            trials.push(outside::plain(&format!("memory::{name}"), move || {
                block_on(case(Backend::Memory))
            }));
            let dir =
                std::env::temp_dir().join(format!("opsd-suite-{}-{name}", std::process::id()));
            trials.push(outside::plain(&format!("redb::{name}"), move || {
                let _ = std::fs::remove_dir_all(&dir);
                block_on(case(Backend::Redb(dir.join("opsd.redb"))));
                let _ = std::fs::remove_dir_all(&dir);
            }));
            let name = name.to_string();
            trials.push(outside::test(
                &format!("postgres::{name}"),
                pg,
                move |pg: Arc<Postgres>| {
                    block_on(async {
                        let url = pg.database(&name).await;
                        case(Backend::Postgres(url)).await
                    })
                },
            ));
        }
        trials
    })
}
