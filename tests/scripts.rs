//! Scripts through the worker API: steps, outcomes, cancel reactions,
//! validation.

mod common;

use std::time::Duration;

use common::{
    any_string, create, eventually, manual_clock, op,
    scripted::{get, respond_after, secs, wait},
    status, TestServer,
};
use opsd::{
    pb::{
        google::longrunning::{operation::Result as OpResult, CancelOperationRequest},
        opsd::v1::{
            script_outcome, CancelPolicy, CreateOperationRequest, Script, ScriptOutcome, ScriptStep,
        },
    },
    Config,
};
use tonic::Code;

#[tokio::test]
async fn scripts_through_the_worker_api() {
    let mut config = Config::for_tests();
    let clock = manual_clock(&mut config);
    let server = TestServer::start_with(config).await;
    let mut workers = server.workers().await;
    let script = Script {
        steps: vec![
            ScriptStep {
                after: secs(0.1),
                metadata: Some(any_string("a")),
            },
            ScriptStep {
                after: secs(0.2),
                metadata: Some(any_string("b")),
            },
        ],
        outcome: Some(ScriptOutcome {
            after: secs(0.3),
            result: Some(script_outcome::Result::Error(status(8, "quota"))),
        }),
        ..Default::default()
    };
    let request = CreateOperationRequest {
        script: Some(script),
        ..op("projects/s", "failing")
    };
    let name = create(&mut workers, request).await.name;
    clock.advance(Duration::from_millis(100));
    eventually("step a", || async {
        get(&server, &name).await.unwrap().metadata == Some(any_string("a"))
    })
    .await;
    clock.advance(Duration::from_millis(200));
    let done = wait(&server, &name, 5.0).await;
    assert_eq!(done.metadata, Some(any_string("b")));
    assert!(matches!(done.result, Some(OpResult::Error(ref e)) if e.code == 8));

    // No outcome: it never completes by itself.
    let forever = CreateOperationRequest {
        script: Some(Script {
            steps: vec![ScriptStep {
                after: secs(0.05),
                metadata: Some(any_string("x")),
            }],
            ..Default::default()
        }),
        ..op("projects/s", "forever")
    };
    let name = create(&mut workers, forever).await.name;
    clock.advance(Duration::from_secs(3600));
    eventually("step x", || async {
        get(&server, &name).await.unwrap().metadata == Some(any_string("x"))
    })
    .await;
    let waited = wait(&server, &name, 0.05).await;
    assert!(!waited.done);

    // Invalid scripts are refused with the field named.
    let bad = CreateOperationRequest {
        script: Some(Script {
            disabled_methods: vec!["get".into()],
            ..Default::default()
        }),
        ..op("projects/s", "bad")
    };
    let err = workers.create_operation(bad).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let bad = CreateOperationRequest {
        script: Some(Script {
            outcome: Some(ScriptOutcome {
                after: secs(1.0),
                result: None,
            }),
            ..Default::default()
        }),
        ..op("projects/s", "bad")
    };
    assert_eq!(
        workers.create_operation(bad).await.unwrap_err().code(),
        Code::InvalidArgument
    );

    // A scripted cooperative operation without on_cancel stops at once.
    let coop = CreateOperationRequest {
        cancel_policy: CancelPolicy::Cooperative as i32,
        script: Some(Script {
            outcome: Some(respond_after(60.0, "late")),
            ..Default::default()
        }),
        ..op("projects/s", "coop")
    };
    let name = create(&mut workers, coop).await.name;
    let mut ops = server.operations().await;
    ops.cancel_operation(CancelOperationRequest { name: name.clone() })
        .await
        .unwrap();
    let cancelled = wait(&server, &name, 5.0).await;
    assert!(matches!(cancelled.result, Some(OpResult::Error(ref e)) if e.code == 1));
    server.stop().await;
}
