//! The durable store behind the real server: what must survive a restart.

mod common;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use common::{any_string, create, eventually, manual_clock, op, TestServer};
use opsd::{
    config::StoreConfig,
    pb::{
        google::longrunning::{
            operation::Result as OpResult, CancelOperationRequest, GetOperationRequest,
            WaitOperationRequest,
        },
        opsd::v1::{
            complete_operation_request, CancelPolicy, CompleteOperationRequest,
            CreateOperationRequest,
        },
    },
    Config,
};
use tonic::Code;

fn store_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("opsd-redb-it-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn config(path: &Path) -> Config {
    let mut config = Config::for_tests();
    config.store = StoreConfig::Redb(path.to_owned());
    config
}

/// Starts a server on the store, waiting for the previous one to let go of
/// it (its writer thread stops just after the server).
async fn start(config: Config) -> TestServer {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match opsd::server::Server::new(config.clone()).await {
            Ok(server) => return TestServer::serve(server).await,
            Err(err) if Instant::now() < deadline && err.to_string().contains("in use") => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(err) => panic!("{err}"),
        }
    }
}

fn secs(s: f64) -> prost_types::Duration {
    prost_types::Duration::try_from(Duration::from_secs_f64(s)).unwrap()
}

#[tokio::test]
async fn everything_acknowledged_survives_a_restart() {
    let dir = store_dir("restart");
    let path = dir.join("nested/opsd.redb");
    let mut config = config(&path);
    // Both servers read the same clock, as two runs read the wall clock.
    let clock = manual_clock(&mut config);
    let server = start(config.clone()).await;
    let (mut ops, mut workers) = (server.operations().await, server.workers().await);
    let idempotent = CreateOperationRequest {
        request_id: "r-1".into(),
        ..op("projects/p", "")
    };
    let first = create(&mut workers, idempotent.clone()).await;
    let done = create(&mut workers, op("projects/p", "done")).await.name;
    workers
        .complete_operation(CompleteOperationRequest {
            name: done.clone(),
            result: Some(complete_operation_request::Result::Response(any_string(
                "r",
            ))),
            metadata: None,
        })
        .await
        .unwrap();
    let cancelled = create(&mut workers, op("projects/p", "cancelled"))
        .await
        .name;
    ops.cancel_operation(CancelOperationRequest {
        name: cancelled.clone(),
    })
    .await
    .unwrap();
    let leased = CreateOperationRequest {
        lease: Some(secs(1.0)),
        ..op("projects/p", "leased")
    };
    let leased = create(&mut workers, leased).await.name;
    let coop = CreateOperationRequest {
        cancel_policy: CancelPolicy::Cooperative as i32,
        cancel_grace_period: Some(secs(1.0)),
        ..op("projects/p", "coop")
    };
    let coop = create(&mut workers, coop).await.name;
    ops.cancel_operation(CancelOperationRequest { name: coop.clone() })
        .await
        .unwrap();
    drop((ops, workers));
    server.stop().await;
    assert!(path.exists(), "the store directory is created");

    let server = start(config).await;
    let (mut ops, mut workers) = (server.operations().await, server.workers().await);
    // The request id is stored: a retry after the restart returns the same operation.
    assert_eq!(create(&mut workers, idempotent).await.name, first.name);
    let got = ops
        .get_operation(GetOperationRequest { name: done })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.result, Some(OpResult::Response(any_string("r"))));
    let got = ops
        .get_operation(GetOperationRequest { name: cancelled })
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(got.result, Some(OpResult::Error(ref e)) if e.code == 1));
    // The lease and the grace period were stored, not only timed: they fire
    // after the restart without any worker call, when their time comes.
    for name in [&leased, &coop] {
        let got = ops
            .get_operation(GetOperationRequest { name: name.clone() })
            .await
            .unwrap()
            .into_inner();
        assert!(!got.done, "{name} ended early");
    }
    clock.advance(Duration::from_secs(1));
    for (name, code) in [(leased, 10), (coop, 1)] {
        let waited = ops
            .wait_operation(WaitOperationRequest {
                name: name.clone(),
                timeout: Some(secs(5.0)),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(
            matches!(waited.result, Some(OpResult::Error(ref e)) if e.code == code),
            "{name}: {waited:?}"
        );
    }
    server.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn retention_deletes_done_operations_from_the_file() {
    let dir = store_dir("retention");
    let mut config = config(&dir.join("opsd.redb"));
    config.registry.retention = Duration::from_millis(200);
    let clock = manual_clock(&mut config);
    let server = start(config).await;
    let (mut ops, mut workers) = (server.operations().await, server.workers().await);
    for i in 0..50 {
        let name = create(&mut workers, op("", &format!("e{i}"))).await.name;
        ops.cancel_operation(CancelOperationRequest { name })
            .await
            .unwrap();
    }
    let running = create(&mut workers, op("", "stays")).await.name;
    clock.advance(Duration::from_millis(200));
    eventually("retention deletes the done operations", || async {
        server.registry.operation_counts().await.unwrap().total() == 1
    })
    .await;
    let err = ops
        .get_operation(GetOperationRequest {
            name: "operations/e0".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(ops
        .get_operation(GetOperationRequest { name: running })
        .await
        .is_ok());
    server.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_store_in_use_is_refused() {
    let dir = store_dir("in-use");
    let server = start(config(&dir.join("opsd.redb"))).await;
    let err = opsd::server::Server::new(config(&dir.join("opsd.redb")))
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("in use by another process"), "{err}");
    server.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
