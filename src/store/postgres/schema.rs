//! The schema and its migrations.
//!
//! Migrations are numbered SQL files (`migrations/NNNN_name.sql`) embedded
//! in the binary. Each runs in its own transaction that first takes a
//! transaction-level advisory lock, so replicas starting together (or an
//! `opsd migrate` beside running replicas) apply each migration once, in
//! order; the version table `opsd_schema` records what was applied. A
//! database whose schema is newer than this binary knows is refused before
//! anything is touched. A migration may take longer than a store call and
//! may wait for another replica's, but not forever: the lock wait and each
//! migration's statements are bounded by the migration timeout.

use std::time::Duration;

use tokio_postgres::Client;

use super::pool::pg_error;
use crate::store::StoreError;

/// (version, name, SQL), in order.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "init", include_str!("migrations/0001_init.sql")),
    (
        2,
        "revisions and log horizon",
        include_str!("migrations/0002_revisions_and_log_horizon.sql"),
    ),
];

/// The advisory lock key that serialises migrations ("opsdmigr").
pub const MIGRATION_LOCK: i64 = 0x6f70_7364_6d69_6772;

/// The schema version this binary writes and reads.
pub const SCHEMA_VERSION: i32 = MIGRATIONS[MIGRATIONS.len() - 1].0;

/// What [`migrate`] did: the version found and the version left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Migrated {
    pub from: i32,
    pub to: i32,
}

/// Applies every migration the database lacks; waiting for another
/// replica's migration, and each migration's statements, are bounded by
/// `timeout` (on the server: a replica whose statement outlasts it fails).
pub(super) async fn migrate(
    client: &mut Client,
    timeout: Duration,
) -> Result<Migrated, StoreError> {
    let ms = timeout.as_millis().max(1);
    let encoding: String = client
        .query_one("SHOW server_encoding", &[])
        .await
        .map_err(pg_error)?
        .get(0);
    if encoding != "UTF8" {
        return Err(StoreError::Internal(format!(
            "the database's encoding is {encoding}; opsd needs UTF8 (CREATE DATABASE ... ENCODING 'UTF8')"
        )));
    }
    let mut from = None;
    let mut to = 0;
    for (version, name, sql) in MIGRATIONS {
        let txn = client.transaction().await.map_err(pg_error)?;
        // A migration may take longer than the store's statement timeout,
        // and may wait for another replica's: the migration timeout.
        txn.batch_execute(&format!(
            "SET LOCAL statement_timeout = {ms}; SET LOCAL lock_timeout = {ms}; \
             SET LOCAL idle_in_transaction_session_timeout = 0"
        ))
        .await
        .map_err(pg_error)?;
        txn.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(|err| match pg_error(err) {
                StoreError::Unavailable(why) => StoreError::Unavailable(format!(
                    "waited {timeout:?} for another replica's schema migration (the \
                     advisory lock {MIGRATION_LOCK:#x}): {why}"
                )),
                other => other,
            })?;
        txn.batch_execute(
            "CREATE TABLE IF NOT EXISTS opsd_schema ( \
               version integer PRIMARY KEY, \
               name text NOT NULL, \
               applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await
        .map_err(pg_error)?;
        let current: i32 = txn
            .query_one("SELECT coalesce(max(version), 0) FROM opsd_schema", &[])
            .await
            .map_err(pg_error)?
            .get(0);
        from.get_or_insert(current);
        if current > SCHEMA_VERSION {
            return Err(StoreError::Internal(format!(
                "the database's opsd schema is version {current}, newer than this opsd \
                 knows (version {SCHEMA_VERSION}); run a newer opsd (nothing was changed)"
            )));
        }
        if current >= *version {
            txn.commit().await.map_err(pg_error)?;
            to = current;
            continue;
        }
        tracing::info!(version, name, "applying a schema migration");
        txn.batch_execute(sql).await.map_err(pg_error)?;
        txn.execute(
            "INSERT INTO opsd_schema (version, name) VALUES ($1, $2)",
            &[version, name],
        )
        .await
        .map_err(pg_error)?;
        txn.commit().await.map_err(pg_error)?;
        to = *version;
    }
    Ok(Migrated {
        from: from.unwrap_or(0),
        to,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_numbered_in_order_from_one() {
        for (i, (version, name, sql)) in MIGRATIONS.iter().enumerate() {
            assert_eq!(*version as usize, i + 1, "{name}");
            assert!(!sql.trim().is_empty(), "{name}");
            assert!(
                !sql.to_ascii_uppercase().contains("COMMIT"),
                "{name}: the runner owns the transaction"
            );
        }
    }
}
