//! Crash consistency of the redb store: `kill -9` at random moments loses
//! nothing that was acknowledged.
//!
//! Each cycle starts the `opsd` binary on the same redb file, checks every
//! fact acknowledged so far, drives 8 concurrent clients (create with a
//! request id, update, complete, cancel, delete, retried creates) while
//! recording every acknowledged result, then kills the server with SIGKILL
//! at a random moment. Checked after every restart:
//!
//! - 0 acknowledged creates lost, 0 acknowledged completions or cancels lost
//!   or changed, 0 deleted operations resurrected, 0 duplicates for a retried
//!   `request_id`, no operation in an impossible state (`done` without a
//!   result, a result that changed after done).
//!
//! `OPSD_CRASH_CYCLES` sets the number of cycles (default 20). The negative
//! control (built with `--features failpoints`) runs the same harness against
//! a server that acknowledges non-durable commits and must report losses:
//!
//! ```sh
//! cargo test --release --features failpoints --test crash_durability
//! ```

mod common;

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use common::crash::{client, verify, Model, Report, Rng, Server, CLIENTS};

fn store_path(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("opsd-crash-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir.join("opsd.redb")
}

async fn run_harness(cycles: usize, negative_control: bool) -> Report {
    let path = store_path(if negative_control {
        "negative"
    } else {
        "positive"
    });
    let seed = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("crash harness: {cycles} cycles, seed {seed}, negative control: {negative_control}");
    let mut rng = Rng::new(seed);
    let store = format!("redb:{}", path.display());
    let model = Arc::new(Mutex::new(Model::default()));
    let mut report = Report::default();
    for cycle in 0..cycles {
        let server = Server::start(&store, &[], negative_control);
        verify(&server.url, &model, &mut report).await;
        let clients: Vec<_> = (0..CLIENTS)
            .map(|i| {
                tokio::spawn(client(
                    server.url.clone(),
                    model.clone(),
                    seed ^ ((cycle * CLIENTS + i) as u64 + 1),
                    None,
                ))
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(150 + rng.below(450))).await;
        server.kill();
        for c in clients {
            let _ = c.await;
        }
        report.cycles += 1;
    }
    // A last restart checks the final cycle's acknowledgements.
    let server = Server::start(&store, &[], negative_control);
    verify(&server.url, &model, &mut report).await;
    server.kill();
    model.lock().unwrap().count_acknowledged(&mut report);
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
    eprintln!("{report:#?}");
    report
}

fn cycles() -> usize {
    std::env::var("OPSD_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_nothing_acknowledged() {
    let report = run_harness(cycles(), false).await;
    assert!(
        report.acked_creates > 0 && report.acked_completions > 0 && report.acked_deletes > 0,
        "{report:?}"
    );
    assert_eq!(report.violations(), 0, "{report:#?}");
}

/// The harness can fail: acknowledging non-durable commits must show losses.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_control_acknowledging_before_durability_is_caught() {
    let report = run_harness(5, true).await;
    assert!(report.acked_creates > 0, "{report:?}");
    assert!(
        report.violations() > 0,
        "the harness missed non-durable acknowledgements: {report:#?}"
    );
}
