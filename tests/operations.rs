//! Get, Cancel and Delete against a real server, one row of DESIGN.md's
//! semantics table at a time.

mod common;

use std::time::Duration;

use common::{any_string, create, eventually, manual_clock, op, reason, status, TestServer};
use opsd::{
    api::operations::Method,
    pb::{
        google::longrunning::{
            operation::Result as OpResult, CancelOperationRequest, DeleteOperationRequest,
            GetOperationRequest, Operation,
        },
        opsd::v1::{
            complete_operation_request, CancelPolicy, CompleteOperationRequest,
            CreateOperationRequest, UpdateOperationRequest,
        },
    },
    Config,
};
use tonic::Code;
use tonic_types::StatusExt;

fn get(name: &str) -> GetOperationRequest {
    GetOperationRequest { name: name.into() }
}
fn cancel(name: &str) -> CancelOperationRequest {
    CancelOperationRequest { name: name.into() }
}
fn delete(name: &str) -> DeleteOperationRequest {
    DeleteOperationRequest { name: name.into() }
}
fn respond(name: &str, value: &str) -> CompleteOperationRequest {
    CompleteOperationRequest {
        name: name.into(),
        result: Some(complete_operation_request::Result::Response(any_string(
            value,
        ))),
        metadata: None,
    }
}

fn error_of(op: &Operation) -> &opsd::pb::google::rpc::Status {
    match &op.result {
        Some(OpResult::Error(e)) => e,
        other => panic!("expected an error result, got {other:?}"),
    }
}

#[tokio::test]
async fn get_of_an_unknown_operation_is_not_found_with_details() {
    let server = TestServer::start().await;
    let mut ops = server.operations().await;
    let err = ops
        .get_operation(get("operations/missing"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(err.message(), "Operation \"operations/missing\" not found.");
    let details = err.get_error_details();
    let info = details.error_info().unwrap();
    assert_eq!(info.reason, "OPERATION_NOT_FOUND");
    assert_eq!(info.domain, "opsd");
    let resource = details.resource_info().unwrap();
    assert_eq!(resource.resource_type, "google.longrunning.Operation");
    assert_eq!(resource.resource_name, "operations/missing");
    // The detail trailer repeats the status's own code and message.
    let rpc: tonic_types::pb::Status = prost::Message::decode(err.details()).unwrap();
    assert_eq!(rpc.code, Code::NotFound as i32);
    assert_eq!(rpc.message, err.message());
    server.stop().await;
}

#[tokio::test]
async fn malformed_names_are_invalid_arguments_with_bad_request() {
    let server = TestServer::start().await;
    let mut ops = server.operations().await;
    for name in [
        "",
        "operations",
        "projects/p/operations/a b",
        "../operations/x",
        "operations/-",
    ] {
        let err = ops.get_operation(get(name)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{name:?}");
        let details = err.get_error_details();
        assert_eq!(
            details.bad_request().unwrap().field_violations[0].field,
            "name"
        );
        assert_eq!(details.error_info().unwrap().reason, "INVALID_ARGUMENT");
    }
    let long = format!("operations/{}", "a".repeat(1100));
    let err = ops.get_operation(get(&long)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    server.stop().await;
}

#[tokio::test]
async fn a_running_operation_has_no_result_and_a_done_one_has_exactly_one() {
    let server = TestServer::start().await;
    let (mut ops, mut workers) = (server.operations().await, server.workers().await);
    let created = create(
        &mut workers,
        CreateOperationRequest {
            metadata: Some(any_string("step 1")),
            ..op("projects/p/locations/l", "job")
        },
    )
    .await;
    assert_eq!(created.name, "projects/p/locations/l/operations/job");
    let running = ops
        .get_operation(get(&created.name))
        .await
        .unwrap()
        .into_inner();
    assert!(!running.done);
    assert!(running.result.is_none());
    assert_eq!(running.metadata, Some(any_string("step 1")));

    workers
        .complete_operation(respond(&created.name, "ok"))
        .await
        .unwrap();
    let done = ops
        .get_operation(get(&created.name))
        .await
        .unwrap()
        .into_inner();
    assert!(done.done);
    assert_eq!(done.result, Some(OpResult::Response(any_string("ok"))));
    server.stop().await;
}

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
    let info: opsd::pb::google::rpc::ErrorInfo = error.details[0].to_msg().unwrap();
    assert_eq!(info.reason, "OPERATION_CANCELLED");
    assert_eq!(
        error.details[0].type_url,
        "type.googleapis.com/google.rpc.ErrorInfo"
    );

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
    let waited = ops
        .wait_operation(opsd::pb::google::longrunning::WaitOperationRequest {
            name: name.clone(),
            timeout: Some(prost_types::Duration {
                seconds: 5,
                nanos: 0,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(waited.done);
    assert_eq!(error_of(&waited).code, 1);
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

#[tokio::test]
async fn delete_removes_a_running_operation_without_cancelling_it() {
    let server = TestServer::start().await;
    let (mut ops, mut workers) = (server.operations().await, server.workers().await);
    let name = create(&mut workers, op("projects/p", "running")).await.name;
    ops.delete_operation(delete(&name)).await.unwrap();

    let err = ops.get_operation(get(&name)).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = ops.delete_operation(delete(&name)).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // Later worker calls on it are NOT_FOUND too.
    let err = workers
        .complete_operation(respond(&name, "x"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = workers
        .update_operation(UpdateOperationRequest {
            name: name.clone(),
            metadata: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    server.stop().await;
}

#[tokio::test]
async fn done_operations_expire_after_retention() {
    let mut config = Config::for_tests();
    config.registry.retention = Duration::from_millis(300);
    let clock = manual_clock(&mut config);
    let server = TestServer::start_with(config).await;
    let (mut ops, mut workers) = (server.operations().await, server.workers().await);
    let done = create(&mut workers, op("", "short-lived")).await.name;
    let running = create(&mut workers, op("", "long-lived")).await.name;
    workers
        .complete_operation(respond(&done, "r"))
        .await
        .unwrap();
    clock.advance(Duration::from_millis(299));
    assert!(ops.get_operation(get(&done)).await.is_ok());

    clock.advance(Duration::from_millis(1));
    let err = ops.get_operation(get(&done)).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "expired at once");
    // Retention deletes the record itself, and only done operations.
    eventually("retention deletes the record", || async {
        server.registry.operation_counts().await.unwrap().total() == 1
    })
    .await;
    assert!(ops.get_operation(get(&running)).await.is_ok());
    server.stop().await;
}

#[tokio::test]
async fn disabled_methods_answer_unimplemented() {
    let mut config = Config::for_tests();
    config.operations.disabled_methods = Method::ALL.into_iter().collect();
    let server = TestServer::start_with(config).await;
    let (mut ops, mut workers) = (server.operations().await, server.workers().await);
    let name = create(&mut workers, op("", "x")).await.name;

    let errors = [
        ops.cancel_operation(cancel(&name)).await.unwrap_err(),
        ops.delete_operation(delete(&name)).await.unwrap_err(),
        ops.list_operations(opsd::pb::google::longrunning::ListOperationsRequest {
            name: "operations".into(),
            ..Default::default()
        })
        .await
        .unwrap_err(),
        ops.wait_operation(opsd::pb::google::longrunning::WaitOperationRequest {
            name: name.clone(),
            timeout: None,
        })
        .await
        .unwrap_err(),
    ];
    for err in errors {
        assert_eq!(err.code(), Code::Unimplemented);
        assert_eq!(reason(&err), "METHOD_DISABLED");
        assert!(err.message().contains("is disabled on this server"));
    }
    // Get still works, and nothing was cancelled or deleted.
    assert!(
        !ops.get_operation(get(&name))
            .await
            .unwrap()
            .into_inner()
            .done
    );
    server.stop().await;
}
