//! Two `opsd` replicas over one PostgreSQL database behave as one server:
//! an operation created on A is seen on B at once, a Wait parked on B
//! returns when A completes it, a cancel made on B reaches a worker stream
//! held on A, page tokens of A are accepted by B (with the same pages),
//! a complete racing a cancel across replicas ends in exactly one outcome
//! (1,000 times), and leases, grace periods and script steps fire once, not
//! once per replica.

mod common;

use std::{sync::Arc, time::Duration};

use common::{
    calls::{cancel, get, next_event, respond},
    create, eventually, manual_clock, op,
    postgres::{connect, main_with, trial, Postgres},
    postgres_config, TestServer,
};
use opsd::{
    clock::Clock,
    pb::{
        google::longrunning::{
            operation::Result as OpResult, ListOperationsRequest, WaitOperationRequest,
        },
        opsd::v1::{
            operation_event::Type as EventType, script_outcome, CancelPolicy,
            CreateOperationRequest, Script, ScriptOutcome, ScriptStep, WatchOperationsRequest,
        },
    },
};
use tonic::Code;

fn secs(s: f64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration::try_from(Duration::from_secs_f64(s)).unwrap())
}

/// The operation as `ops` reads it.
async fn read(
    ops: &opsd::pb::google::longrunning::operations_client::OperationsClient<
        tonic::transport::Channel,
    >,
    name: &str,
) -> opsd::pb::google::longrunning::Operation {
    ops.clone()
        .get_operation(get(name))
        .await
        .unwrap()
        .into_inner()
}

/// Two replicas on a fresh database.
async fn replicas(pg: &Postgres, name: &str) -> (TestServer, TestServer, String) {
    let url = pg.database(name).await;
    let a = TestServer::start_with(postgres_config(&url)).await;
    let b = TestServer::start_with(postgres_config(&url)).await;
    (a, b, url)
}

async fn waits_and_reads_cross_replicas(pg: Arc<Postgres>) {
    let (a, b, _) = replicas(&pg, "cross_wait").await;
    // The registry reads the database's time.
    assert!(matches!(a.registry.settings().clock, Clock::Offset(_)));
    let mut workers_a = a.workers().await;
    let mut ops_b = b.operations().await;
    let name = create(&mut workers_a, op("projects/x", "job")).await.name;
    // Visible on B at once.
    let seen = ops_b.get_operation(get(&name)).await.unwrap().into_inner();
    assert!(!seen.done);
    // A Wait parked on B returns when A completes the operation.
    let waiting = {
        let mut ops_b = ops_b.clone();
        let name = name.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let op = ops_b
                .wait_operation(WaitOperationRequest {
                    name,
                    timeout: secs(20.0),
                })
                .await
                .unwrap()
                .into_inner();
            (op, started.elapsed())
        })
    };
    eventually("the Wait is parked on B", || async {
        b.registry.waiter_count() == 1
    })
    .await;
    workers_a
        .complete_operation(respond(&name, "done"))
        .await
        .unwrap();
    let (waited, took) = waiting.await.unwrap();
    assert!(waited.done, "{waited:?}");
    assert!(
        took < Duration::from_secs(10),
        "the Wait slept past the completion: {took:?}"
    );
    // A deletion on A is NOT_FOUND on B (its cache of done operations
    // follows the feed).
    let mut ops_a = a.operations().await;
    ops_b.get_operation(get(&name)).await.unwrap();
    ops_a
        .delete_operation(common::calls::delete(&name))
        .await
        .unwrap();
    eventually("B sees the deletion", || {
        let mut ops_b = ops_b.clone();
        let name = name.clone();
        async move {
            ops_b
                .get_operation(get(&name))
                .await
                .is_err_and(|e| e.code() == Code::NotFound)
        }
    })
    .await;
    a.stop().await;
    b.stop().await;
}

async fn a_cancel_on_one_replica_reaches_a_worker_on_the_other(pg: Arc<Postgres>) {
    let (a, b, _) = replicas(&pg, "cancel_worker").await;
    let mut workers_a = a.workers().await;
    let mut events = workers_a
        .watch_operations(WatchOperationsRequest {
            parent: "projects/w".into(),
            names: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    let mut ops_b = b.operations().await;
    for i in 0..20 {
        let request = CreateOperationRequest {
            cancel_policy: if i % 2 == 0 {
                CancelPolicy::Cooperative
            } else {
                CancelPolicy::Immediate
            } as i32,
            ..op("projects/w", &format!("job{i}"))
        };
        let name = create(&mut workers_a, request).await.name;
        ops_b.cancel_operation(cancel(&name)).await.unwrap();
        let event = next_event(&mut events).await;
        assert_eq!(event.name, name);
        assert_eq!(event.r#type(), EventType::CancelRequested);
    }
    a.stop().await;
    b.stop().await;
}

async fn page_tokens_and_pages_agree_across_replicas(pg: Arc<Postgres>) {
    let (a, b, _) = replicas(&pg, "pages").await;
    let mut workers = a.workers().await;
    for i in 0..25 {
        create(&mut workers, op("projects/l", &format!("op{i:02}"))).await;
    }
    let list = |token: String| ListOperationsRequest {
        name: "projects/l".into(),
        filter: "done = false".into(),
        page_size: 7,
        page_token: token,
        ..Default::default()
    };
    let walk = |servers: Vec<
        opsd::pb::google::longrunning::operations_client::OperationsClient<
            tonic::transport::Channel,
        >,
    >| async move {
        let mut pages = Vec::new();
        let mut token = String::new();
        for i in 0.. {
            let mut client = servers[i % servers.len()].clone();
            let page = client
                .list_operations(list(token))
                .await
                .unwrap()
                .into_inner();
            pages.push(
                page.operations
                    .iter()
                    .map(|o| o.name.clone())
                    .collect::<Vec<_>>(),
            );
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        pages
    };
    let only_a = walk(vec![a.operations().await]).await;
    let only_b = walk(vec![b.operations().await]).await;
    let alternating = walk(vec![a.operations().await, b.operations().await]).await;
    assert_eq!(only_a.len(), 4);
    assert_eq!(only_a.concat().len(), 25);
    assert_eq!(only_a, only_b);
    assert_eq!(only_a, alternating);
    a.stop().await;
    b.stop().await;
}

async fn complete_versus_cancel_across_replicas_ends_in_one_outcome(pg: Arc<Postgres>) {
    const OPERATIONS: usize = 1000;
    const AT_ONCE: usize = 16;
    let (a, b, url) = replicas(&pg, "race").await;
    let servers = [
        (a.workers().await, a.operations().await),
        (b.workers().await, b.operations().await),
    ];
    let mut completions = 0;
    for chunk in (0..OPERATIONS).collect::<Vec<_>>().chunks(AT_ONCE) {
        let mut rounds = tokio::task::JoinSet::new();
        for &i in chunk {
            let (mut workers, _) = servers[i % 2].clone();
            let (_, mut other_ops) = servers[(i + 1) % 2].clone();
            let (_, mut own_ops) = servers[i % 2].clone();
            rounds.spawn(async move {
                let name = create(&mut workers, op("projects/race", &format!("r{i}")))
                    .await
                    .name;
                let completing = {
                    let name = name.clone();
                    let mut workers = workers.clone();
                    tokio::spawn(
                        async move { workers.complete_operation(respond(&name, "won")).await },
                    )
                };
                let cancelled = other_ops.cancel_operation(cancel(&name)).await;
                let completed = completing.await.unwrap();
                cancelled.expect("a cancel is OK whether or not the operation was done");
                let got = own_ops
                    .get_operation(get(&name))
                    .await
                    .unwrap()
                    .into_inner();
                match completed {
                    Ok(_) => {
                        assert!(
                            matches!(&got.result, Some(OpResult::Response(_))),
                            "{name}: {got:?}"
                        );
                        true
                    }
                    Err(err) => {
                        assert_eq!(err.code(), Code::FailedPrecondition, "{name}");
                        assert!(
                            matches!(&got.result, Some(OpResult::Error(e)) if e.code == 1),
                            "{name}: {got:?}"
                        );
                        false
                    }
                }
            });
        }
        while let Some(won) = rounds.join_next().await {
            completions += usize::from(won.unwrap());
        }
    }
    eprintln!("completions won {completions} of {OPERATIONS}");
    // The log agrees: exactly one terminal transition per operation.
    let db = connect(&url).await;
    let bad = db
        .query(
            "SELECT name, count(*) FROM opsd_changes \
             WHERE cause IN ('completed', 'cancelled') GROUP BY name HAVING count(*) <> 1",
            &[],
        )
        .await
        .unwrap();
    assert!(
        bad.is_empty(),
        "{} operations with other than one outcome",
        bad.len()
    );
    let terminal: i64 = db
        .query_one(
            "SELECT count(*) FROM opsd_changes WHERE cause IN ('completed', 'cancelled')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(terminal, OPERATIONS as i64);
    a.stop().await;
    b.stop().await;
}

async fn deadlines_fire_once_across_replicas(pg: Arc<Postgres>) {
    let url = pg.database("deadlines_once").await;
    let mut config = postgres_config(&url);
    // Both replicas read one clock, as they read the database's.
    let clock = manual_clock(&mut config);
    let a = TestServer::start_with(config.clone()).await;
    let b = TestServer::start_with(config).await;
    let (mut workers_a, mut workers_b) = (a.workers().await, b.workers().await);
    let watch = || WatchOperationsRequest {
        parent: "projects/d".into(),
        names: vec![],
    };
    let mut events_a = workers_a
        .watch_operations(watch())
        .await
        .unwrap()
        .into_inner();
    let mut events_b = workers_b
        .watch_operations(watch())
        .await
        .unwrap()
        .into_inner();
    let leased = create(
        &mut workers_a,
        CreateOperationRequest {
            lease: secs(1.0),
            ..op("projects/d", "leased")
        },
    )
    .await
    .name;
    let coop = create(
        &mut workers_b,
        CreateOperationRequest {
            cancel_policy: CancelPolicy::Cooperative as i32,
            cancel_grace_period: secs(1.0),
            ..op("projects/d", "coop")
        },
    )
    .await
    .name;
    let scripted = create(
        &mut workers_a,
        CreateOperationRequest {
            script: Some(Script {
                steps: vec![ScriptStep {
                    after: secs(1.0),
                    metadata: Some(common::any_string("half")),
                }],
                outcome: Some(ScriptOutcome {
                    after: secs(2.0),
                    result: Some(script_outcome::Result::Response(common::any_string("ok"))),
                }),
                ..Default::default()
            }),
            ..op("projects/d", "scripted")
        },
    )
    .await
    .name;
    let mut ops_b = b.operations().await;
    ops_b.cancel_operation(cancel(&coop)).await.unwrap();
    for events in [&mut events_a, &mut events_b] {
        let event = next_event(events).await;
        assert_eq!(
            (event.name.as_str(), event.r#type()),
            (coop.as_str(), EventType::CancelRequested)
        );
    }
    clock.advance(Duration::from_secs(1));
    let ops_a = a.operations().await;
    for name in [&leased, &coop] {
        eventually("the deadline fired", || async {
            read(&ops_a, name).await.done
        })
        .await;
    }
    eventually("the script's step ran", || async {
        read(&ops_a, &scripted).await.metadata == Some(common::any_string("half"))
    })
    .await;
    clock.advance(Duration::from_secs(1));
    eventually("the script finished", || async {
        read(&ops_b, &scripted).await.done
    })
    .await;
    // Each replica's worker stream hears of the lapsed lease once.
    let sentinel = create(&mut workers_b, op("projects/d", "sentinel"))
        .await
        .name;
    ops_b
        .delete_operation(common::calls::delete(&sentinel))
        .await
        .unwrap();
    for events in [&mut events_a, &mut events_b] {
        let mut lapsed = 0;
        loop {
            let event = next_event(events).await;
            if event.name == sentinel {
                break;
            }
            if event.name == leased && event.r#type() == EventType::LeaseExpired {
                lapsed += 1;
            }
        }
        assert_eq!(lapsed, 1);
    }
    // Each fired once: one committed transition each, whichever replica won.
    let db = connect(&url).await;
    let count = |name: String, cause: &'static str| {
        let db = &db;
        async move {
            db.query_one(
                "SELECT count(*) FROM opsd_changes WHERE name = $1 AND cause = $2",
                &[&name, &cause],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
        }
    };
    assert_eq!(count(leased.clone(), "lease_expired").await, 1);
    assert_eq!(count(coop.clone(), "grace_expired").await, 1);
    assert_eq!(count(scripted.clone(), "updated").await, 1);
    assert_eq!(count(scripted.clone(), "completed").await, 1);
    a.stop().await;
    b.stop().await;
}

fn main() -> std::process::ExitCode {
    main_with(|pg| {
        vec![
            trial("waits_and_reads_cross_replicas", pg, |pg| {
                Box::pin(waits_and_reads_cross_replicas(pg))
            }),
            trial(
                "a_cancel_on_one_replica_reaches_a_worker_on_the_other",
                pg,
                |pg| Box::pin(a_cancel_on_one_replica_reaches_a_worker_on_the_other(pg)),
            ),
            trial("page_tokens_and_pages_agree_across_replicas", pg, |pg| {
                Box::pin(page_tokens_and_pages_agree_across_replicas(pg))
            }),
            trial(
                "complete_versus_cancel_across_replicas_ends_in_one_outcome",
                pg,
                |pg| {
                    Box::pin(complete_versus_cancel_across_replicas_ends_in_one_outcome(
                        pg,
                    ))
                },
            ),
            trial("deadlines_fire_once_across_replicas", pg, |pg| {
                Box::pin(deadlines_fire_once_across_replicas(pg))
            }),
        ]
    })
}
