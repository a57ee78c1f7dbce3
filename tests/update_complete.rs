//! Workers.UpdateOperation and CompleteOperation.

mod common;

use common::{any_string, create, op, reason, status, TestServer};
use opsd::pb::{
    google::longrunning::{operation::Result as OpResult, GetOperationRequest},
    opsd::v1::{complete_operation_request, CompleteOperationRequest, UpdateOperationRequest},
};
use tonic::Code;

#[tokio::test]
async fn update_replaces_metadata_and_complete_validates_the_outcome() {
    let server = TestServer::start().await;
    let (mut ops, mut workers) = (server.operations().await, server.workers().await);
    let name = create(&mut workers, op("", "progress")).await.name;
    let updated = workers
        .update_operation(UpdateOperationRequest {
            name: name.clone(),
            metadata: Some(any_string("50%")),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.metadata, Some(any_string("50%")));
    // Unset metadata keeps the current one.
    let renewed = workers
        .update_operation(UpdateOperationRequest {
            name: name.clone(),
            metadata: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(renewed.metadata, Some(any_string("50%")));

    let missing = CompleteOperationRequest {
        name: name.clone(),
        result: None,
        metadata: None,
    };
    assert_eq!(
        workers
            .complete_operation(missing)
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    let ok_error = CompleteOperationRequest {
        name: name.clone(),
        result: Some(complete_operation_request::Result::Error(status(0, "fine"))),
        metadata: None,
    };
    assert_eq!(
        workers
            .complete_operation(ok_error)
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );

    let failed = CompleteOperationRequest {
        name: name.clone(),
        result: Some(complete_operation_request::Result::Error(status(
            13,
            "disk on fire",
        ))),
        metadata: Some(any_string("100%")),
    };
    workers.complete_operation(failed).await.unwrap();
    let got = ops
        .get_operation(GetOperationRequest { name: name.clone() })
        .await
        .unwrap()
        .into_inner();
    assert!(got.done);
    assert_eq!(got.metadata, Some(any_string("100%")));
    assert_eq!(
        got.result,
        Some(OpResult::Error(status(13, "disk on fire")))
    );
    let again = CompleteOperationRequest {
        name: name.clone(),
        result: Some(complete_operation_request::Result::Response(any_string(
            "x",
        ))),
        metadata: None,
    };
    let err = workers.complete_operation(again).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(reason(&err), "OPERATION_ALREADY_DONE");
    server.stop().await;
}
