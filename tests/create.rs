//! Workers.CreateOperation: generated ids, idempotent retries, validation
//! and the size limit.

mod common;

use common::{any_string, calls::secs, create, op, reason, TestServer};
use opsd::pb::{
    google::longrunning::GetOperationRequest,
    opsd::v1::{complete_operation_request, CompleteOperationRequest, CreateOperationRequest},
};
use tonic::Code;
use tonic_types::StatusExt;

#[tokio::test]
async fn generated_ids_are_uuid_v7() {
    let server = TestServer::start().await;
    let mut workers = server.workers().await;
    let a = create(&mut workers, op("projects/p", "")).await.name;
    let b = create(&mut workers, op("projects/p", "")).await.name;
    let id = a.strip_prefix("projects/p/operations/").unwrap();
    assert_eq!(uuid::Uuid::parse_str(id).unwrap().get_version_num(), 7);
    assert!(a < b, "generated ids are time-ordered");
    server.stop().await;
}

#[tokio::test]
async fn reusing_an_id_is_already_exists_unless_the_request_id_matches() {
    let server = TestServer::start().await;
    let mut workers = server.workers().await;
    let request = CreateOperationRequest {
        request_id: "req-1".into(),
        metadata: Some(any_string("first")),
        ..op("projects/p", "job")
    };
    let first = create(&mut workers, request.clone()).await;
    // A retry with the same request id returns the same operation unchanged.
    let retry = CreateOperationRequest {
        metadata: Some(any_string("retry")),
        ..request.clone()
    };
    assert_eq!(create(&mut workers, retry).await, first);

    // The same id without (or with another) request id is taken.
    for request_id in ["", "req-2"] {
        let again = CreateOperationRequest {
            request_id: request_id.into(),
            ..op("projects/p", "job")
        };
        let err = workers.create_operation(again).await.unwrap_err();
        assert_eq!(err.code(), Code::AlreadyExists);
        assert_eq!(reason(&err), "OPERATION_ALREADY_EXISTS");
    }
    // A generated id is also found by its request id.
    let generated = CreateOperationRequest {
        request_id: "req-3".into(),
        ..op("projects/p", "")
    };
    let one = create(&mut workers, generated.clone()).await;
    assert_eq!(create(&mut workers, generated).await.name, one.name);
    // The request id of one operation cannot create another.
    let other = CreateOperationRequest {
        request_id: "req-1".into(),
        ..op("projects/p", "different")
    };
    assert_eq!(
        workers.create_operation(other).await.unwrap_err().code(),
        Code::AlreadyExists
    );
    server.stop().await;
}

#[tokio::test]
async fn create_validates_its_fields() {
    let server = TestServer::start().await;
    let mut workers = server.workers().await;
    let cases = [
        (op("projects", "x"), "parent"),
        (op("projects/-", "x"), "parent"),
        (op("projects/p/operations/x", "y"), "parent"),
        (op("", "a/b"), "operation_id"),
        (op("", "-"), "operation_id"),
        (op("", ".."), "operation_id"),
        (
            CreateOperationRequest {
                lease: Some(secs(0.0)),
                ..op("", "l")
            },
            "lease",
        ),
        (
            CreateOperationRequest {
                lease: Some(prost_types::Duration {
                    seconds: -5,
                    nanos: 0,
                }),
                ..op("", "l")
            },
            "lease",
        ),
        (
            CreateOperationRequest {
                cancel_policy: 42,
                ..op("", "c")
            },
            "cancel_policy",
        ),
    ];
    for (request, field) in cases {
        let err = workers.create_operation(request.clone()).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{request:?}");
        let details = err.get_error_details();
        assert_eq!(
            details.bad_request().unwrap().field_violations[0].field,
            field,
            "{request:?}"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn operations_too_large_to_return_are_refused_and_unchanged() {
    let server = TestServer::start().await;
    let (mut ops, mut workers) = (server.operations().await, server.workers().await);
    let big = "x".repeat(3 * 1024 * 1024);
    let request = CreateOperationRequest {
        metadata: Some(any_string(&big)),
        ..op("", "big")
    };
    let name = create(&mut workers, request).await.name;
    // Metadata and response together would not fit in a 4 MiB response.
    let complete = CompleteOperationRequest {
        name: name.clone(),
        result: Some(complete_operation_request::Result::Response(any_string(
            &big,
        ))),
        metadata: None,
    };
    let err = workers.complete_operation(complete).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        err.get_error_details()
            .bad_request()
            .unwrap()
            .field_violations[0]
            .field,
        "result"
    );
    let got = ops
        .get_operation(GetOperationRequest { name })
        .await
        .unwrap()
        .into_inner();
    assert!(!got.done);
    server.stop().await;
}
