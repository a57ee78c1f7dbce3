//! Crash consistency of the PostgreSQL store, with two replicas: the
//! harness of `tests/common/crash.rs` (8 clients split across the replicas,
//! every acknowledged result recorded, then checked) under three faults,
//! each for `OPSD_CRASH_CYCLES` cycles (default 20):
//!
//! - `kill -9` of both opsd replicas at a random moment, then a restart;
//! - `kill -9` of the PostgreSQL postmaster at a random moment (the
//!   replicas keep running: their pools recover, their feeds reconnect),
//!   then a restart of the database;
//! - `pg_terminate_backend` of random opsd backends while clients run.
//!
//! (A debug build runs 5 cycles of each unless `OPSD_CRASH_CYCLES` says
//! otherwise; CI runs the release build's 20.)
//!
//! 0 acknowledged writes may be lost, changed or resurrected. Each cycle
//! checks the database through a replica started for the check (no cache,
//! no history); the end checks through a replica that lived through every
//! fault, once its feed had a moment to catch up (a replica's cache of done
//! operations learns of another replica's deletion from the feed, so it may
//! answer with a deleted operation for up to about a second after a fault;
//! see the README). The negative
//! control (built with `--features failpoints`) runs the replica-kill
//! cycles against replicas that acknowledge a write BEFORE its COMMIT and
//! must report losses:
//!
//! ```sh
//! cargo test --release --features failpoints --test crash_postgres
//! ```

mod common;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use common::{
    crash::{client, verify, Model, Report, Rng, Server, CLIENTS},
    outside::{self, block_on},
    postgres::{connect, postgres, Postgres},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// kill -9 of both replicas.
    Replicas,
    /// kill -9 of the postmaster.
    Postmaster,
    /// pg_terminate_backend of random opsd backends.
    Backends,
}

/// Short database timeouts, so a replica whose database is gone answers
/// UNAVAILABLE quickly.
const FLAGS: &[&str] = &[
    "--pg-statement-timeout",
    "2s",
    "--pg-pool-timeout",
    "1s",
    "--pg-connect-timeout",
    "2s",
];

/// `OPSD_CRASH_CYCLES`, else 20 on a release build (CI's run) and 5 on a
/// debug one (`cargo test --workspace`, which CI runs too).
fn cycles() -> usize {
    std::env::var("OPSD_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if cfg!(debug_assertions) { 5 } else { 20 })
}

fn seed() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

async fn run_harness(pg: &Postgres, fault: Fault, cycles: usize, negative_control: bool) -> Report {
    let url = pg.database(&format!("crash_{fault:?}")).await;
    let seed = seed();
    eprintln!("crash harness ({fault:?}): {cycles} cycles, seed {seed}, negative control: {negative_control}");
    let mut rng = Rng::new(seed);
    let model = Arc::new(Mutex::new(Model::default()));
    let mut report = Report::default();
    let start = || {
        (
            Server::start(&url, FLAGS, negative_control),
            Server::start(&url, FLAGS, negative_control),
        )
    };
    let mut replicas = Some(start());
    for cycle in 0..cycles {
        let (a, b) = replicas.take().unwrap_or_else(start);
        if fault == Fault::Replicas {
            // Fresh replicas: check through A (B's writes are seen on A).
            verify(&a.url, &model, &mut report).await;
        } else {
            let checker = Server::start(&url, FLAGS, negative_control);
            verify(&checker.url, &model, &mut report).await;
            checker.kill();
        }
        let run_for = Duration::from_millis(150 + rng.below(450));
        let until = (fault != Fault::Replicas).then(|| Instant::now() + run_for);
        let clients: Vec<_> = (0..CLIENTS)
            .map(|i| {
                let url = if i % 2 == 0 { &a.url } else { &b.url };
                tokio::spawn(client(
                    url.clone(),
                    model.clone(),
                    seed ^ ((cycle * CLIENTS + i) as u64 + 1),
                    until,
                ))
            })
            .collect();
        let kept = match fault {
            Fault::Replicas => {
                tokio::time::sleep(run_for).await;
                a.kill();
                b.kill();
                None
            }
            Fault::Postmaster => {
                tokio::time::sleep(run_for).await;
                pg.with_cluster(|cluster| cluster.kill_postmaster());
                Some((a, b))
            }
            Fault::Backends => {
                let db = connect(&url).await;
                let deadline = Instant::now() + run_for;
                while Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(20 + rng.below(60))).await;
                    let _ = db
                        .execute(
                            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                             WHERE application_name = 'opsd' AND datname = current_database() \
                             ORDER BY random() LIMIT 2",
                            &[],
                        )
                        .await;
                }
                Some((a, b))
            }
        };
        for c in clients {
            let _ = c.await;
        }
        if fault == Fault::Postmaster {
            pg.with_cluster(|cluster| cluster.start());
        }
        replicas = kept;
        report.cycles += 1;
    }
    // A last check of the final cycle's acknowledgements: on fresh replicas
    // after a replica kill; otherwise on a replica that lived through every
    // fault, once its feed caught up.
    let (a, b) = match replicas.take() {
        Some(survivors) => {
            tokio::time::sleep(Duration::from_secs(2)).await;
            survivors
        }
        None => start(),
    };
    verify(&a.url, &model, &mut report).await;
    a.kill();
    b.kill();
    model.lock().unwrap().count_acknowledged(&mut report);
    eprintln!("{fault:?}: {report:#?}");
    report
}

fn positive(pg: Arc<Postgres>, fault: Fault) {
    let report = block_on(run_harness(&pg, fault, cycles(), false));
    assert!(
        report.acked_creates > 0 && report.acked_completions > 0 && report.acked_deletes > 0,
        "{report:?}"
    );
    assert_eq!(report.violations(), 0, "{report:#?}");
}

fn main() -> std::process::ExitCode {
    let pg = postgres();
    // Killing the postmaster needs a cluster of our own.
    let own_cluster = match &pg {
        Ok(_) if std::env::var_os("OPSD_TEST_PG_URL").is_some() => Err(
            "kill -9 of the postmaster needs the tests' own cluster (OPSD_TEST_PG_URL is set)"
                .to_owned(),
        ),
        other => other.clone(),
    };
    let mut trials = vec![
        outside::test(
            "kill_9_of_the_replicas_loses_nothing_acknowledged",
            &pg,
            |pg| positive(pg, Fault::Replicas),
        ),
        outside::test(
            "kill_9_of_the_postmaster_loses_nothing_acknowledged",
            &own_cluster,
            |pg| positive(pg, Fault::Postmaster),
        ),
        outside::test("terminated_backends_lose_nothing_acknowledged", &pg, |pg| {
            positive(pg, Fault::Backends)
        }),
    ];
    // The harness can fail: acknowledging before COMMIT must show losses.
    if cfg!(feature = "failpoints") {
        trials.push(outside::test(
            "negative_control_acknowledging_before_commit_is_caught",
            &pg,
            |pg| {
                let report = block_on(run_harness(&pg, Fault::Replicas, 5, true));
                assert!(report.acked_creates > 0, "{report:?}");
                assert!(
                    report.violations() > 0,
                    "the harness missed acknowledgements made before COMMIT: {report:#?}"
                );
            },
        ));
    }
    // One at a time: one of them kills the database the others use.
    let code = outside::run_serially(trials);
    if let Ok(pg) = &pg {
        pg.stop();
    }
    code
}
