//! CancelOperation under each cancel policy, on done and unknown operations.

mod common;

use std::time::Duration;

use common::{
    calls::{cancel, delete, error_of, get, respond},
    create, manual_clock, op, reason,
    scripted::wait,
    status, TestServer,
};
use opsd::{
    pb::opsd::v1::{
        complete_operation_request, CancelPolicy, CompleteOperationRequest, CreateOperationRequest,
        UpdateOperationRequest,
    },
    Config,
};
use tonic::Code;
use tonic_types::StatusExt;

#[tokio::test]
async fn cancel_of_an_immediate_operation_finishes_it_as_cancelled() {
    let server = TestServer::start().await;
    let (mut ops, mut workers) = (server.operations().await, server.workers().await);
    let name = create(&mut workers, op("projects/p/locations/l", "a"))
        .await
        .name;

    ops.cancel_operation(cancel(&name)).await.unwrap();
    let got = ops.get_operation(get(&name)).await.unwrap().into_inner();
    assert!(got.done);
    let error = error_of(&got);
    assert_eq!(error.code, 1);
    assert_eq!(error.message, "Operation was cancelled.");
    // As Google's services write it: no details, so every client decodes it.
    assert!(error.details.is_empty(), "{:?}", error.details);

    // Repeated cancel: OK, unchanged.
    ops.cancel_operation(cancel(&name)).await.unwrap();
    assert_eq!(
        ops.get_operation(get(&name)).await.unwrap().into_inner(),
        got
    );

    // The worker's late completion is refused; the result stays.
    let err = workers
        .complete_operation(respond(&name, "late"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(reason(&err), "OPERATION_ALREADY_DONE");
    let err = workers
        .update_operation(UpdateOperationRequest {
            name: name.clone(),
            metadata: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(
        ops.get_operation(get(&name)).await.unwrap().into_inner(),
        got
    );
    server.stop().await;
}

#[tokio::test]
async fn cancel_of_a_done_operation_is_ok_and_changes_nothing() {
    let server = TestServer::start().await;
    let (mut ops, mut workers) = (server.operations().await, server.workers().await);
    let name = create(&mut workers, op("", "done")).await.name;
    let completed = workers
        .complete_operation(respond(&name, "r"))
        .await
        .unwrap()
        .into_inner();
    ops.cancel_operation(cancel(&name)).await.unwrap();
    assert_eq!(
        ops.get_operation(get(&name)).await.unwrap().into_inner(),
        completed
    );
    server.stop().await;
}

#[tokio::test]
async fn cancel_of_a_not_cancellable_operation_fails_and_keeps_it_running() {
    let server = TestServer::start().await;
    let (mut ops, mut workers) = (server.operations().await, server.workers().await);
    let request = CreateOperationRequest {
        cancel_policy: CancelPolicy::NotCancellable as i32,
        ..op("", "stubborn")
    };
    let name = create(&mut workers, request).await.name;
    let err = ops.cancel_operation(cancel(&name)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(reason(&err), "OPERATION_NOT_CANCELLABLE");
    assert_eq!(
        err.get_error_details()
            .resource_info()
            .unwrap()
            .resource_name,
        name
    );
    assert!(
        !ops.get_operation(get(&name))
            .await
            .unwrap()
            .into_inner()
            .done
    );
    server.stop().await;
}

#[tokio::test]
async fn cooperative_cancel_lets_the_worker_finish_then_forces_cancelled() {
    let mut config = Config::for_tests();
    let clock = manual_clock(&mut config);
    let server = TestServer::start_with(config).await;
    let (mut ops, mut workers) = (server.operations().await, server.workers().await);

    // The worker finishes it itself: its own result stands.
    let polite = CreateOperationRequest {
        cancel_policy: CancelPolicy::Cooperative as i32,
        ..op("", "polite")
    };
    let name = create(&mut workers, polite).await.name;
    ops.cancel_operation(cancel(&name)).await.unwrap();
    assert!(
        !ops.get_operation(get(&name))
            .await
            .unwrap()
            .into_inner()
            .done
    );
    workers
        .complete_operation(CompleteOperationRequest {
            name: name.clone(),
            result: Some(complete_operation_request::Result::Error(status(
                1,
                "stopped by worker",
            ))),
            metadata: None,
        })
        .await
        .unwrap();
    let got = ops.get_operation(get(&name)).await.unwrap().into_inner();
    assert_eq!(error_of(&got).message, "stopped by worker");

    // The worker does nothing: after its grace period opsd finishes it.
    let slow = CreateOperationRequest {
        cancel_policy: CancelPolicy::Cooperative as i32,
        cancel_grace_period: Some(prost_types::Duration {
            seconds: 0,
            nanos: 200_000_000,
        }),
        ..op("", "slow")
    };
    let name = create(&mut workers, slow).await.name;
    ops.cancel_operation(cancel(&name)).await.unwrap();
    clock.advance(Duration::from_millis(199));
    let running = ops.get_operation(get(&name)).await.unwrap().into_inner();
    assert!(!running.done, "the grace period is not over");
    clock.advance(Duration::from_millis(1));
    let waited = wait(&server, &name, 5.0).await;
    assert!(waited.done);
    assert_eq!(error_of(&waited).code, 1);
    assert!(error_of(&waited).details.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn operation_error_details_puts_reasons_into_the_errors_opsd_writes() {
    let mut config = Config::for_tests();
    config.registry.operation_error_details = true;
    let clock = manual_clock(&mut config);
    let server = TestServer::start_with(config).await;
    let (mut ops, mut workers) = (server.operations().await, server.workers().await);
    let reason_of = |op: &opsd::pb::google::longrunning::Operation| {
        let error = error_of(op);
        assert_eq!(error.details.len(), 1, "{error:?}");
        assert_eq!(
            error.details[0].type_url,
            "type.googleapis.com/google.rpc.ErrorInfo"
        );
        let info: opsd::pb::google::rpc::ErrorInfo = error.details[0].to_msg().unwrap();
        assert_eq!(info.domain, "opsd");
        (error.code, info.reason)
    };

    let name = create(&mut workers, op("", "immediate")).await.name;
    ops.cancel_operation(cancel(&name)).await.unwrap();
    let got = ops.get_operation(get(&name)).await.unwrap().into_inner();
    assert_eq!(reason_of(&got), (1, "OPERATION_CANCELLED".to_owned()));

    let name = create(
        &mut workers,
        CreateOperationRequest {
            cancel_policy: CancelPolicy::Cooperative as i32,
            cancel_grace_period: Some(prost_types::Duration {
                seconds: 1,
                nanos: 0,
            }),
            ..op("", "graceful")
        },
    )
    .await
    .name;
    ops.cancel_operation(cancel(&name)).await.unwrap();
    clock.advance(Duration::from_secs(1));
    let waited = wait(&server, &name, 5.0).await;
    assert_eq!(reason_of(&waited), (1, "OPERATION_CANCELLED".to_owned()));
    server.stop().await;
}

#[tokio::test]
async fn cancel_and_delete_of_unknown_operations_are_not_found() {
    let server = TestServer::start().await;
    let mut ops = server.operations().await;
    let err = ops
        .cancel_operation(cancel("operations/nope"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = ops
        .delete_operation(delete("operations/nope"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(reason(&err), "OPERATION_NOT_FOUND");
    server.stop().await;
}
