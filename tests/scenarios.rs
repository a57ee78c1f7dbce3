//! Scenario files: every state a client must handle, cancel reactions,
//! methods switched off, and scenarios across a restart.

mod common;

use std::time::Duration;

use common::{
    any_string, eventually, manual_clock, reason,
    scripted::{empty, get, wait, with_scenarios},
    TestServer,
};
use opsd::{
    config::StoreConfig,
    pb::google::longrunning::{
        operation::Result as OpResult, CancelOperationRequest, DeleteOperationRequest, Operation,
        WaitOperationRequest,
    },
};
use tonic::Code;

#[tokio::test]
async fn the_basic_scenario_serves_every_state() {
    let mut config = with_scenarios(&["basic.yaml"]);
    let clock = manual_clock(&mut config);
    let server = TestServer::start_with(config).await;

    let running = get(&server, "operations/running").await.unwrap();
    assert!(!running.done);
    assert_eq!(running.metadata, Some(any_string("started")));
    let succeeded = get(&server, "operations/succeeded").await.unwrap();
    assert_eq!(succeeded.result, Some(OpResult::Response(empty())));
    let failed = get(&server, "operations/failed").await.unwrap();
    assert!(matches!(failed.result, Some(OpResult::Error(ref e)) if e.code == 13));

    // slow: each step when its time comes, done with Empty 2 s after start.
    let progress = |op: &Operation| op.metadata.as_ref().unwrap().to_msg::<String>().unwrap();
    let slow = get(&server, "operations/slow").await.unwrap();
    assert_eq!(progress(&slow), "0%");
    for expected in ["25%", "50%", "75%"] {
        clock.advance(Duration::from_millis(499));
        assert!(!get(&server, "operations/slow").await.unwrap().done);
        clock.advance(Duration::from_millis(1));
        eventually(expected, || async {
            progress(&get(&server, "operations/slow").await.unwrap()) == expected
        })
        .await;
    }
    clock.advance(Duration::from_millis(499));
    assert!(!get(&server, "operations/slow").await.unwrap().done);
    clock.advance(Duration::from_millis(1));
    let done = wait(&server, "operations/slow", 5.0).await;
    assert_eq!(done.result, Some(OpResult::Response(empty())));
    assert_eq!(progress(&done), "75%");

    let mut ops = server.operations().await;
    let err = ops
        .cancel_operation(CancelOperationRequest {
            name: "operations/stubborn".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(reason(&err), "OPERATION_NOT_CANCELLABLE");
    // Cancelling the forever-running one ends it.
    ops.cancel_operation(CancelOperationRequest {
        name: "operations/running".into(),
    })
    .await
    .unwrap();
    assert!(get(&server, "operations/running").await.unwrap().done);
    server.stop().await;
}

#[tokio::test]
async fn cancellation_scenarios_react_as_scripted() {
    let mut config = with_scenarios(&["cancellation.yaml"]);
    let clock = manual_clock(&mut config);
    let server = TestServer::start_with(config).await;
    let mut ops = server.operations().await;
    for name in ["cancel-immediately", "cancel-slowly", "ignore-cancel"] {
        ops.cancel_operation(CancelOperationRequest {
            name: format!("operations/{name}"),
        })
        .await
        .unwrap();
    }
    let immediately = get(&server, "operations/cancel-immediately").await.unwrap();
    assert!(matches!(immediately.result, Some(OpResult::Error(ref e)) if e.code == 1));
    // The cooperative ones are still running right after the cancel...
    assert!(!get(&server, "operations/cancel-slowly").await.unwrap().done);
    // ...then react as their scripts say, when their scripts say.
    clock.advance(Duration::from_millis(500));
    let ignored = wait(&server, "operations/ignore-cancel", 5.0).await;
    assert_eq!(
        ignored.result,
        Some(OpResult::Response(any_string("finished anyway")))
    );
    assert!(!get(&server, "operations/cancel-slowly").await.unwrap().done);
    clock.advance(Duration::from_millis(500));
    let slowly = wait(&server, "operations/cancel-slowly", 5.0).await;
    assert!(
        matches!(slowly.result, Some(OpResult::Error(ref e)) if e.code == 1 && e.message == "Stopped at the client's request.")
    );
    server.stop().await;
}

#[tokio::test]
async fn scenario_methods_can_be_switched_off() {
    let mut config = with_scenarios(&["unimplemented.yaml"]);
    let clock = manual_clock(&mut config);
    let server = TestServer::start_with(config).await;
    let mut ops = server.operations().await;
    let name = "operations/poll-only".to_owned();
    let errors = [
        ops.cancel_operation(CancelOperationRequest { name: name.clone() })
            .await
            .unwrap_err(),
        ops.delete_operation(DeleteOperationRequest { name: name.clone() })
            .await
            .unwrap_err(),
        ops.wait_operation(WaitOperationRequest {
            name: name.clone(),
            timeout: None,
        })
        .await
        .unwrap_err(),
    ];
    for err in errors {
        assert_eq!(err.code(), Code::Unimplemented);
        assert!(
            err.message().contains("for this operation"),
            "{}",
            err.message()
        );
    }
    // Polling Get still works, and the outcome arrives on time.
    assert!(!get(&server, &name).await.unwrap().done);
    clock.advance(Duration::from_secs(1));
    eventually("the outcome", || async {
        get(&server, &name).await.unwrap().done
    })
    .await;
    server.stop().await;
}

#[tokio::test]
async fn scripts_survive_a_restart_and_scenarios_reapply_idempotently() {
    let dir = std::env::temp_dir().join(format!("opsd-scripted-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut config = with_scenarios(&["basic.yaml"]);
    config.store = StoreConfig::Redb(dir.join("opsd.redb"));
    // Both servers read the same clock, as two runs read the wall clock.
    let clock = manual_clock(&mut config);

    let server = TestServer::start_with(config.clone()).await;
    let mut ops = server.operations().await;
    ops.cancel_operation(CancelOperationRequest {
        name: "operations/running".into(),
    })
    .await
    .unwrap();
    clock.advance(Duration::from_secs(1));
    eventually("half of slow", || async {
        get(&server, "operations/slow").await.unwrap().metadata == Some(any_string("50%"))
    })
    .await;
    drop(ops);
    server.stop().await;

    // Restart on the same file with the same scenario: nothing is reset or
    // duplicated, and the slow operation still finishes on its original schedule.
    let server = loop {
        match opsd::server::Server::new(config.clone()).await {
            Ok(server) => break TestServer::serve(server).await,
            Err(err) if err.to_string().contains("in use") => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(err) => panic!("{err}"),
        }
    };
    assert_eq!(server.registry.operation_counts().await.unwrap().total(), 5);
    let running = get(&server, "operations/running").await.unwrap();
    assert!(running.done, "the cancel before the restart stands");
    let slow = get(&server, "operations/slow").await.unwrap();
    assert!(!slow.done, "not reset, not hurried: {slow:?}");
    assert_eq!(slow.metadata, Some(any_string("50%")));
    // The rest of the original schedule: done 2 s after the first start.
    clock.advance(Duration::from_secs(1));
    let slow = wait(&server, "operations/slow", 10.0).await;
    assert!(slow.done);
    server.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
