//! The worker API: create (ids, idempotency), update, complete, leases and
//! the event stream.

mod common;

use std::time::{Duration, Instant};

use common::{any_string, create, manual_clock, op, reason, status, TestServer};
use opsd::pb::{
    google::longrunning::{
        operation::Result as OpResult, CancelOperationRequest, DeleteOperationRequest,
        GetOperationRequest,
    },
    opsd::v1::{
        complete_operation_request, operation_event::Type as EventType, CancelPolicy,
        CompleteOperationRequest, CreateOperationRequest, OperationEvent, UpdateOperationRequest,
        WatchOperationsRequest,
    },
};
use opsd::Config;
use tonic::{Code, Streaming};
use tonic_types::StatusExt;

async fn next_event(stream: &mut Streaming<OperationEvent>) -> OperationEvent {
    tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("an event in time")
        .unwrap()
        .expect("the stream is open")
}

fn secs(seconds: f64) -> prost_types::Duration {
    prost_types::Duration::try_from(Duration::from_secs_f64(seconds)).unwrap()
}

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

#[tokio::test]
async fn a_cancel_reaches_a_watching_worker_within_100ms() {
    let server = TestServer::start().await;
    let (mut ops, mut workers) = (server.operations().await, server.workers().await);
    let name = create(&mut workers, op("projects/p/locations/l", "job"))
        .await
        .name;
    let other = create(&mut workers, op("projects/p/locations/elsewhere", "job"))
        .await
        .name;
    let mut events = workers
        .watch_operations(WatchOperationsRequest {
            parent: "projects/p/locations/l".into(),
            names: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    // An operation outside the parent does not show up.
    ops.cancel_operation(CancelOperationRequest { name: other })
        .await
        .unwrap();

    let started = Instant::now();
    ops.cancel_operation(CancelOperationRequest { name: name.clone() })
        .await
        .unwrap();
    let event = next_event(&mut events).await;
    let latency = started.elapsed();
    assert_eq!(event.r#type(), EventType::CancelRequested);
    assert_eq!(event.name, name);
    assert!(event.event_time.is_some());
    assert!(
        latency < Duration::from_millis(100),
        "cancel reached the worker after {latency:?}"
    );
    // Get after cancel shows done with CANCELLED.
    let got = ops
        .get_operation(GetOperationRequest { name })
        .await
        .unwrap()
        .into_inner();
    assert!(got.done);
    assert!(matches!(got.result, Some(OpResult::Error(ref e)) if e.code == 1));
    server.stop().await;
}

#[tokio::test]
async fn watchers_learn_of_deletions_and_pending_cancellations() {
    let server = TestServer::start().await;
    let (mut ops, mut workers) = (server.operations().await, server.workers().await);
    let coop = CreateOperationRequest {
        cancel_policy: CancelPolicy::Cooperative as i32,
        ..op("projects/p", "coop")
    };
    let pending = create(&mut workers, coop).await.name;
    // Cancelled before any worker watched: reported on connect.
    ops.cancel_operation(CancelOperationRequest {
        name: pending.clone(),
    })
    .await
    .unwrap();
    let doomed = create(&mut workers, op("", "doomed")).await.name;

    let mut events = workers
        .watch_operations(WatchOperationsRequest {
            parent: "projects/p".into(),
            names: vec![doomed.clone()],
        })
        .await
        .unwrap()
        .into_inner();
    let first = next_event(&mut events).await;
    assert_eq!(
        (first.r#type(), first.name.as_str()),
        (EventType::CancelRequested, pending.as_str())
    );

    ops.delete_operation(DeleteOperationRequest {
        name: doomed.clone(),
    })
    .await
    .unwrap();
    let deleted = next_event(&mut events).await;
    assert_eq!(
        (deleted.r#type(), deleted.name.as_str()),
        (EventType::Deleted, doomed.as_str())
    );
    server.stop().await;
}

#[tokio::test]
async fn a_lapsed_lease_aborts_the_operation_and_tells_the_worker() {
    let mut config = Config::for_tests();
    let clock = manual_clock(&mut config);
    let server = TestServer::start_with(config).await;
    let (mut ops, mut workers) = (server.operations().await, server.workers().await);
    let mut events = workers
        .watch_operations(WatchOperationsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let leased = CreateOperationRequest {
        lease: Some(secs(0.4)),
        ..op("", "leased")
    };
    let name = create(&mut workers, leased).await.name;
    // Renewals keep it alive past its first deadline.
    for _ in 0..4 {
        clock.advance(Duration::from_millis(300));
        workers
            .update_operation(UpdateOperationRequest {
                name: name.clone(),
                metadata: None,
            })
            .await
            .unwrap();
    }
    let running = ops
        .get_operation(GetOperationRequest { name: name.clone() })
        .await
        .unwrap()
        .into_inner();
    assert!(!running.done, "renewed leases must not lapse");
    clock.advance(Duration::from_millis(400));

    let event = next_event(&mut events).await;
    assert_eq!(
        (event.r#type(), event.name.as_str()),
        (EventType::LeaseExpired, name.as_str())
    );
    let got = ops
        .get_operation(GetOperationRequest { name: name.clone() })
        .await
        .unwrap()
        .into_inner();
    let Some(OpResult::Error(error)) = got.result else {
        panic!("{got:?}")
    };
    assert_eq!(error.code, 10, "ABORTED");
    let info: opsd::pb::google::rpc::ErrorInfo = error.details[0].to_msg().unwrap();
    assert_eq!(info.reason, "WORKER_LEASE_EXPIRED");
    // The late worker is refused.
    let err = workers
        .update_operation(UpdateOperationRequest {
            name,
            metadata: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    server.stop().await;
}

#[tokio::test]
async fn closed_streams_are_released() {
    let server = TestServer::start().await;
    let mut workers = server.workers().await;
    let events = workers
        .watch_operations(WatchOperationsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(server.registry.watcher_count(), 1);
    drop(events);
    drop(workers);
    for _ in 0..300 {
        if server.registry.watcher_count() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(server.registry.watcher_count(), 0);
    // Invalid filters are refused up front.
    let mut workers = server.workers().await;
    let err = workers
        .watch_operations(WatchOperationsRequest {
            parent: "projects".into(),
            names: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
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
