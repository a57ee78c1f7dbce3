//! GetOperation: unknown and malformed names, and what a running and a done
//! operation carry.

mod common;

use common::{
    any_string,
    calls::{get, respond},
    create, op, TestServer,
};
use opsd::pb::{
    google::longrunning::operation::Result as OpResult, opsd::v1::CreateOperationRequest,
};
use tonic::Code;
use tonic_types::StatusExt;

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
