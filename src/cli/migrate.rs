//! `opsd migrate`: creates or migrates the schema of a PostgreSQL store,
//! and nothing else (`opsd serve` migrates at start-up too; both take the
//! same advisory lock, so replicas starting together do not race).

use std::{process::ExitCode, time::Duration};

use opsd::{
    config::StoreConfig,
    store::{PostgresSettings, PostgresStore},
};

use super::serve::parse_positive_duration;

#[derive(clap::Args, Debug)]
pub struct MigrateArgs {
    /// The PostgreSQL store: `postgres://USER@HOST:PORT/DB` (libpq's URL).
    #[arg(long, env = "OPSD_STORE")]
    store: StoreConfig,

    /// How long connecting to the database may take.
    #[arg(long, default_value = "5s", value_parser = parse_positive_duration)]
    pg_connect_timeout: Duration,

    /// How long to wait for another replica's migration, and to run the
    /// migrations.
    #[arg(long, default_value = "5m", value_parser = parse_positive_duration)]
    pg_migration_timeout: Duration,
}

pub async fn run(args: MigrateArgs) -> ExitCode {
    super::serve::init_logging(super::serve::LogFormat::Text, None);
    let StoreConfig::Postgres(target) = args.store else {
        eprintln!(
            "opsd migrate: the store is not PostgreSQL (postgres://...); a redb file \
             is upgraded when opsd serve opens it"
        );
        return ExitCode::FAILURE;
    };
    let settings = PostgresSettings {
        connect_timeout: args.pg_connect_timeout,
        migration_timeout: args.pg_migration_timeout,
        ..PostgresSettings::default()
    };
    match PostgresStore::migrate(&target, &settings).await {
        Ok(migrated) if migrated.from == migrated.to => {
            println!(
                "{target}: the schema is at version {} (nothing to do)",
                migrated.to
            );
            ExitCode::SUCCESS
        }
        Ok(migrated) => {
            println!(
                "{target}: the schema was migrated from version {} to {}",
                migrated.from, migrated.to
            );
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("opsd migrate: {target}: {err}");
            ExitCode::FAILURE
        }
    }
}
