//! The PostgreSQL store's own guarantees under faults and races, store by
//! store over one database: a write whose answer does not come in time is
//! cancelled, its connection discarded, and its outcome settled (committed
//! → success; else UNAVAILABLE saying the outcome is unknown, never "not
//! done"); a stale cached copy never makes a delete spin; the feed finds
//! changes of transactions in flight while a replica starts, and resyncs
//! when the log was pruned past what it saw; a database at schema version 1
//! is migrated; two schemas never share a notification channel; start-up
//! waits for another replica's migration only as long as allowed.

mod common;

use std::{
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use common::postgres::{connect, main_with, trial, Postgres};
use opsd::{
    clock::Clock,
    store::{
        postgres::{MIGRATION_LOCK, SCHEMA_VERSION},
        Cause, PostgresSettings, PostgresStore, Store, StoreError, StoredOutcome, StoredRecord,
    },
    Registry, RegistrySettings,
};
use tokio::sync::broadcast;

async fn open(url: &str, settings: PostgresSettings) -> PostgresStore {
    PostgresStore::connect(&url.parse().unwrap(), settings, Clock::System)
        .await
        .unwrap()
}

fn record(name: &str) -> StoredRecord {
    let now = SystemTime::now();
    StoredRecord {
        name: name.to_owned(),
        cancel_policy: 2,
        create_time: Some(now.into()),
        update_time: Some(now.into()),
        ..Default::default()
    }
}

fn finished(mut record: StoredRecord) -> StoredRecord {
    record.outcome = Some(StoredOutcome::Error(opsd::pb::google::rpc::Status {
        code: 1,
        message: "Operation was cancelled.".into(),
        details: vec![],
    }));
    record.done_time = record.update_time;
    record.expire_time = Some((SystemTime::now() + Duration::from_secs(3600)).into());
    record
}

/// Makes every commit that logs a change sleep `seconds` (a commit the
/// disk or a synchronous standby holds up: `statement_timeout` does not
/// cover it), ignoring a cancel when `deaf` (as a commit that already
/// reached the WAL would).
async fn slow_commits(db: &tokio_postgres::Client) {
    db.batch_execute(
        "CREATE TABLE test_slow (seconds float8 NOT NULL, deaf boolean NOT NULL);
         CREATE FUNCTION test_slow() RETURNS trigger LANGUAGE plpgsql AS $$
         DECLARE s float8; d boolean;
         BEGIN
           SELECT seconds, deaf INTO s, d FROM test_slow;
           IF s IS NULL THEN RETURN NULL; END IF;
           IF d THEN
             BEGIN PERFORM pg_sleep(s); EXCEPTION WHEN query_canceled THEN NULL; END;
           ELSE
             PERFORM pg_sleep(s);
           END IF;
           RETURN NULL;
         END $$;
         CREATE CONSTRAINT TRIGGER test_slow AFTER INSERT ON opsd_changes
           DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION test_slow();",
    )
    .await
    .unwrap();
}

async fn set_slow(db: &tokio_postgres::Client, seconds: Option<f64>, deaf: bool) {
    db.batch_execute("DELETE FROM test_slow").await.unwrap();
    if let Some(seconds) = seconds {
        db.execute("INSERT INTO test_slow VALUES ($1, $2)", &[&seconds, &deaf])
            .await
            .unwrap();
    }
}

/// Waits until no statement sleeps in the test trigger any more.
async fn until_no_slow_commit(db: &tokio_postgres::Client) {
    let give_up = Instant::now() + Duration::from_secs(10);
    loop {
        let sleeping: i64 = db
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep' \
                 AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if sleeping == 0 {
            return;
        }
        assert!(
            Instant::now() < give_up,
            "a slow commit was never cancelled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn revision_of(db: &tokio_postgres::Client, name: &str) -> i64 {
    db.query_one(
        "SELECT revision FROM opsd_operations WHERE name = $1",
        &[&name],
    )
    .await
    .unwrap()
    .get(0)
}

async fn a_write_whose_answer_is_late_is_cancelled_and_settled(pg: Arc<Postgres>) {
    let url = pg.database("late_writes").await;
    let settings = PostgresSettings {
        pool_size: 1,
        statement_timeout: Duration::from_millis(500),
        pool_timeout: Duration::from_millis(500),
        ..PostgresSettings::default()
    };
    let store = open(&url, settings.clone()).await;
    let db = connect(&url).await;
    slow_commits(&db).await;
    let a = record("operations/a");
    let first = store.insert(a.clone()).await.unwrap();
    store.insert(record("operations/b")).await.unwrap();

    // A commit that outlasts the call and honours the cancel: rolled back.
    set_slow(&db, Some(30.0), false).await;
    let started = Instant::now();
    let err = store
        .update(a.clone(), first, Cause::Updated)
        .await
        .unwrap_err();
    set_slow(&db, None, false).await;
    let took = started.elapsed();
    match &err {
        StoreError::Unavailable(why) => assert!(why.contains("outcome"), "{why}"),
        other => panic!("not UNAVAILABLE: {other:?}"),
    }
    assert!(
        took < settings.call_timeout() + settings.settle_timeout() + Duration::from_secs(2),
        "{took:?}"
    );
    // The cancel ended it: nothing committed, however long we look.
    until_no_slow_commit(&db).await;
    assert_eq!(revision_of(&db, "operations/a").await, first as i64);
    // Its connection was discarded, not handed out with the statement
    // still on it: the one-connection pool answers at once.
    let started = Instant::now();
    assert!(store.get("operations/b").await.unwrap().is_some());
    assert!(
        started.elapsed() < Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );

    // A commit that outlasts the call and cannot be stopped: it commits,
    // and the caller hears that it did.
    set_slow(&db, Some(30.0), true).await;
    let revision = store.update(a.clone(), first, Cause::Updated).await;
    set_slow(&db, None, false).await;
    let revision = revision.expect("the write committed: settled as a success");
    assert_eq!(revision_of(&db, "operations/a").await, revision as i64);
    // Deletes and inserts settle the same way.
    set_slow(&db, Some(30.0), true).await;
    let deleted = store.delete("operations/a", revision, Cause::Deleted).await;
    let inserted = store.insert(record("operations/c")).await;
    set_slow(&db, None, false).await;
    deleted.expect("the delete committed");
    let c = inserted.expect("the insert committed");
    assert_eq!(revision_of(&db, "operations/c").await, c as i64);
    let gone: i64 = db
        .query_one(
            "SELECT count(*) FROM opsd_operations WHERE name = 'operations/a'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(gone, 0);
}

async fn a_stale_cached_copy_never_makes_a_delete_spin(pg: Arc<Postgres>) {
    let url = pg.database("stale_cache").await;
    let store = Arc::new(open(&url, PostgresSettings::default()).await);
    // The cache answers only while the listener is up.
    common::eventually("the listener is up", || async { store.notifications() }).await;
    let name = "projects/p/operations/a";
    let first = store.insert(record(name)).await.unwrap();
    store
        .update(finished(record(name)), first, Cause::Cancelled)
        .await
        .unwrap();
    // A done record: cached by this read.
    assert!(store.get(name).await.unwrap().unwrap().done());
    // Deleted and created again elsewhere, and this replica's feed has not
    // heard (the log is bypassed): its cached copy is stale.
    let db = connect(&url).await;
    db.execute(
        "UPDATE opsd_operations SET revision = nextval('opsd_revisions') WHERE name = $1",
        &[&name],
    )
    .await
    .unwrap();
    let registry = Registry::new(store.clone(), RegistrySettings::default());
    let deleted = tokio::time::timeout(Duration::from_secs(5), registry.delete(name)).await;
    deleted
        .expect("the delete spun on its stale copy")
        .expect("the delete succeeded");
    assert!(store.get(name).await.unwrap().is_none());
}

/// The next change this feed delivers for `name`.
async fn next_change_of(feed: &mut broadcast::Receiver<opsd::store::Change>, name: &str) -> Cause {
    loop {
        let change = tokio::time::timeout(Duration::from_secs(10), feed.recv())
            .await
            .expect("no change arrived")
            .unwrap();
        if &*change.name == name || change.cause == Cause::Resync {
            return change.cause;
        }
    }
}

async fn the_feed_finds_what_was_in_flight_at_start_up(pg: Arc<Postgres>) {
    let url = pg.database("in_flight").await;
    let writer = open(&url, PostgresSettings::default()).await;
    // A write in flight (its change below everything logged after it)...
    let mut db = connect(&url).await;
    let txn = db.transaction().await.unwrap();
    txn.execute(
        "INSERT INTO opsd_changes (name, cause, revision, time_ns) \
         VALUES ('operations/late', 'cancelled', 1, 0)",
        &[],
    )
    .await
    .unwrap();
    // ...far below what commits meanwhile...
    let other = connect(&url).await;
    other
        .execute(
            "INSERT INTO opsd_changes (name, cause, revision, time_ns) \
             SELECT 'operations/filler', 'updated', 1, 0 FROM generate_series(1, 1500)",
            &[],
        )
        .await
        .unwrap();
    writer.insert(record("operations/x")).await.unwrap();
    // ...while a replica starts...
    let starting = open(&url, PostgresSettings::default()).await;
    let mut feed = starting.subscribe();
    // ...commits after it started: the replica delivers it.
    txn.commit().await.unwrap();
    assert_eq!(
        next_change_of(&mut feed, "operations/late").await,
        Cause::Cancelled
    );
}

async fn pruning_past_a_replica_resyncs_it(pg: Arc<Postgres>) {
    let url = pg.database("pruned").await;
    let store = open(&url, PostgresSettings::default()).await;
    let mut feed = store.subscribe();
    store.insert(record("operations/a")).await.unwrap();
    // Other replicas pruned changes this one never saw (it was cut off).
    let db = connect(&url).await;
    db.execute(
        "UPDATE opsd_meta SET value = int8send((SELECT max(seq) FROM opsd_changes) + 1000) \
         WHERE key = 'pruned-seq'",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(next_change_of(&mut feed, "-").await, Cause::Resync);
}

async fn a_database_at_version_1_is_migrated(pg: Arc<Postgres>) {
    let url = pg.database("from_v1").await;
    let db = connect(&url).await;
    db.batch_execute(include_str!(
        "../src/store/postgres/migrations/0001_init.sql"
    ))
    .await
    .unwrap();
    db.batch_execute(
        "CREATE TABLE opsd_schema (version integer PRIMARY KEY, name text NOT NULL, \
           applied_at timestamptz NOT NULL DEFAULT now());
         INSERT INTO opsd_schema (version, name) VALUES (1, 'init');
         INSERT INTO opsd_changes (name, cause, revision, time_ns)
           VALUES ('operations/old', 'deleted', 41, 0);",
    )
    .await
    .unwrap();
    // A version-1 operation, written as version 1 wrote it.
    let store = open(&url, PostgresSettings::default()).await;
    let version: i32 = db
        .query_one("SELECT max(version) FROM opsd_schema", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(version, SCHEMA_VERSION);
    // Revisions continue above every one still known (the log's too).
    let revision = store.insert(record("operations/old")).await.unwrap();
    assert!(revision > 41, "{revision}");
    let changed = store
        .update(record("operations/old"), revision, Cause::Updated)
        .await
        .unwrap();
    assert!(changed > revision);
}

async fn schemas_never_share_a_channel(pg: Arc<Postgres>) {
    let url = pg.database("schemas").await;
    let db = connect(&url).await;
    let (a, b) = ("s".repeat(63), format!("{}t", "s".repeat(62)));
    for schema in [&a, &b] {
        db.batch_execute(&format!("CREATE SCHEMA \"{schema}\""))
            .await
            .unwrap();
    }
    let in_schema = |schema: &str| format!("{url}?options=-csearch_path%3D{schema}");
    let store_a = open(&in_schema(&a), PostgresSettings::default()).await;
    let watcher_a = open(&in_schema(&a), PostgresSettings::default()).await;
    let store_b = open(&in_schema(&b), PostgresSettings::default()).await;
    common::eventually("both listeners hear notifications", || async {
        watcher_a.notifications() && store_b.notifications()
    })
    .await;
    let (mut heard_a, mut heard_b) = (watcher_a.subscribe(), store_b.subscribe());
    let revision = store_a.insert(record("operations/x")).await.unwrap();
    store_a
        .update(finished(record("operations/x")), revision, Cause::Cancelled)
        .await
        .unwrap();
    // The other replica of schema A hears it...
    assert_eq!(
        next_change_of(&mut heard_a, "operations/x").await,
        Cause::Created
    );
    assert_eq!(
        next_change_of(&mut heard_a, "operations/x").await,
        Cause::Cancelled
    );
    // ...and schema B, polled and notified meanwhile, never does.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        matches!(
            heard_b.try_recv(),
            Err(broadcast::error::TryRecvError::Empty)
        ),
        "a change of another schema reached this one"
    );
}

async fn start_up_waits_for_another_migration_only_so_long(pg: Arc<Postgres>) {
    let url = pg.database("migration_lock").await;
    let holder = connect(&url).await;
    holder
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .unwrap();
    let settings = PostgresSettings {
        migration_timeout: Duration::from_secs(1),
        ..PostgresSettings::default()
    };
    let started = Instant::now();
    let refused = tokio::time::timeout(
        Duration::from_secs(20),
        PostgresStore::connect(&url.parse().unwrap(), settings, Clock::System),
    )
    .await
    .expect("start-up waited for the migration lock without end");
    let err = refused.err().expect("the lock is held").to_string();
    assert!(err.contains("migration"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    holder
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await
        .unwrap();
    open(&url, PostgresSettings::default()).await;
}

fn main() -> std::process::ExitCode {
    main_with(|pg| {
        vec![
            trial(
                "a_write_whose_answer_is_late_is_cancelled_and_settled",
                pg,
                |pg| Box::pin(a_write_whose_answer_is_late_is_cancelled_and_settled(pg)),
            ),
            trial("a_stale_cached_copy_never_makes_a_delete_spin", pg, |pg| {
                Box::pin(a_stale_cached_copy_never_makes_a_delete_spin(pg))
            }),
            trial("the_feed_finds_what_was_in_flight_at_start_up", pg, |pg| {
                Box::pin(the_feed_finds_what_was_in_flight_at_start_up(pg))
            }),
            trial("pruning_past_a_replica_resyncs_it", pg, |pg| {
                Box::pin(pruning_past_a_replica_resyncs_it(pg))
            }),
            trial("a_database_at_version_1_is_migrated", pg, |pg| {
                Box::pin(a_database_at_version_1_is_migrated(pg))
            }),
            trial("schemas_never_share_a_channel", pg, |pg| {
                Box::pin(schemas_never_share_a_channel(pg))
            }),
            trial(
                "start_up_waits_for_another_migration_only_so_long",
                pg,
                |pg| Box::pin(start_up_waits_for_another_migration_only_so_long(pg)),
            ),
        ]
    })
}
