//! Setting up the PostgreSQL store: `opsd migrate`, replicas that start
//! together, a schema newer than the binary, the URL's `sslmode`s through
//! rustls, and a database that cannot be reached at start-up.

mod common;

use std::{path::PathBuf, process::Command, sync::Arc, time::Duration};

use common::{
    outside::{self, block_on, Tool},
    postgres::{connect, main_with, trial, Postgres},
    postgres_config,
};
use opsd::{
    clock::Clock,
    store::{postgres::SCHEMA_VERSION, PostgresSettings, PostgresStore},
};

fn migrate(url: &str) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_opsd"))
        .args(["migrate", "--store", url])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

async fn connect_store(url: &str) -> Result<PostgresStore, String> {
    PostgresStore::connect(
        &url.parse().unwrap(),
        PostgresSettings::default(),
        Clock::System,
    )
    .await
    .map_err(|e| e.to_string())
}

async fn opsd_migrate_creates_the_schema_once(pg: Arc<Postgres>) {
    let url = pg.database("migrate").await;
    let (ok, text) = migrate(&url);
    assert!(ok, "{text}");
    assert!(
        text.contains(&format!("from version 0 to {SCHEMA_VERSION}")),
        "{text}"
    );
    assert!(!text.contains("secret"));
    let (ok, text) = migrate(&url);
    assert!(ok, "{text}");
    assert!(text.contains("nothing to do"), "{text}");
    // Not a PostgreSQL store: said so.
    let (ok, text) = migrate("memory");
    assert!(!ok);
    assert!(text.contains("not PostgreSQL"), "{text}");
}

async fn replicas_starting_together_migrate_once(pg: Arc<Postgres>) {
    let url = pg.database("together").await;
    let starts: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { connect_store(&url).await.map(drop) })
        })
        .collect();
    for start in starts {
        start.await.unwrap().unwrap();
    }
    let db = connect(&url).await;
    let versions: Vec<i32> = db
        .query("SELECT version FROM opsd_schema ORDER BY version", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(versions, (1..=SCHEMA_VERSION).collect::<Vec<_>>());
    // One page token key for all.
    let keys: i64 = db
        .query_one(
            "SELECT count(*) FROM opsd_meta WHERE key = 'page-token-key'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(keys, 1);
}

async fn a_schema_newer_than_the_binary_is_refused(pg: Arc<Postgres>) {
    let url = pg.database("newer").await;
    connect_store(&url).await.unwrap();
    let db = connect(&url).await;
    db.execute(
        "INSERT INTO opsd_schema (version, name) VALUES ($1, 'from the future')",
        &[&(SCHEMA_VERSION + 1)],
    )
    .await
    .unwrap();
    let err = connect_store(&url).await.err().unwrap();
    assert!(err.contains("newer than this opsd"), "{err}");
    let (ok, text) = migrate(&url);
    assert!(!ok);
    assert!(text.contains("newer than this opsd"), "{text}");
    let err = opsd::server::Server::new(postgres_config(&url))
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("newer than this opsd"), "{err}");
}

async fn an_unreachable_database_fails_start_up_in_bounded_time(_pg: Arc<Postgres>) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut config = postgres_config(&format!("postgres://opsd:secret@127.0.0.1:{port}/nowhere"));
    config.postgres.connect_timeout = Duration::from_secs(1);
    config.postgres.pool_timeout = Duration::from_secs(1);
    let started = std::time::Instant::now();
    let err = opsd::server::Server::new(config)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(
        !err.contains("secret"),
        "the password stays out of messages: {err}"
    );
    assert!(err.contains("127.0.0.1"), "{err}");
}

async fn sslmodes_are_honoured(pg: Arc<Postgres>, ca: PathBuf) {
    let url = pg.database("tls").await;
    let on = |host: &str, query: &str| url.replacen("127.0.0.1", host, 1) + query;
    let ca = ca.display();
    // Encrypted, certificate unchecked (as libpq without a root file).
    let store = connect_store(&on("127.0.0.1", "?sslmode=require"))
        .await
        .unwrap();
    let db = connect(&url).await;
    let encrypted: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
             WHERE ssl AND application_name = 'opsd' AND datname = current_database()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(encrypted > 0, "sslmode=require connected without TLS");
    drop(store);
    // The chain and the name are checked.
    connect_store(&on(
        "127.0.0.1",
        &format!("?sslmode=verify-full&sslrootcert={ca}"),
    ))
    .await
    .unwrap();
    connect_store(&on(
        "localhost",
        &format!("?sslmode=verify-full&sslrootcert={ca}"),
    ))
    .await
    .unwrap();
    let err = connect_store(&on(
        "127.0.0.2",
        &format!("?sslmode=verify-full&sslrootcert={ca}"),
    ))
    .await
    .err()
    .expect("the certificate does not name 127.0.0.2");
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    // verify-ca checks the chain only.
    connect_store(&on(
        "127.0.0.2",
        &format!("?sslmode=verify-ca&sslrootcert={ca}"),
    ))
    .await
    .unwrap();
    // The Mozilla roots do not know the test CA.
    let err = connect_store(&on("127.0.0.1", "?sslmode=verify-full"))
        .await
        .err()
        .expect("an unknown issuer is refused");
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    let err = connect_store(&on(
        "127.0.0.1",
        "?sslmode=verify-ca&sslrootcert=/nonexistent.pem",
    ))
    .await
    .err()
    .unwrap();
    assert!(err.contains("sslrootcert"), "{err}");
    // disable: plain.
    connect_store(&on("127.0.0.1", "?sslmode=disable"))
        .await
        .unwrap();
}

fn main() -> std::process::ExitCode {
    main_with(|pg| {
        let tls: Tool<(Arc<Postgres>, PathBuf)> = pg.clone().and_then(|pg| {
            let ca = pg
                .with_cluster(|cluster| cluster.ca())
                .ok_or_else(|| {
                    "TLS needs the tests' own cluster (OPSD_TEST_PG_URL is set)".to_owned()
                })?
                .ok_or_else(|| "TLS needs openssl to make the test certificates".to_owned())?;
            Ok((pg, ca))
        });
        vec![
            trial("opsd_migrate_creates_the_schema_once", pg, |pg| {
                Box::pin(opsd_migrate_creates_the_schema_once(pg))
            }),
            trial("replicas_starting_together_migrate_once", pg, |pg| {
                Box::pin(replicas_starting_together_migrate_once(pg))
            }),
            trial("a_schema_newer_than_the_binary_is_refused", pg, |pg| {
                Box::pin(a_schema_newer_than_the_binary_is_refused(pg))
            }),
            trial(
                "an_unreachable_database_fails_start_up_in_bounded_time",
                pg,
                |pg| Box::pin(an_unreachable_database_fails_start_up_in_bounded_time(pg)),
            ),
            outside::test("sslmodes_are_honoured", &tls, |(pg, ca)| {
                block_on(sslmodes_are_honoured(pg, ca))
            }),
        ]
    })
}
