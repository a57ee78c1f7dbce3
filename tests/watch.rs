//! Workers.WatchOperations: cancellations and deletions reach the worker;
//! closed streams are released.

mod common;

use std::time::{Duration, Instant};

use common::{calls::next_event, create, op, TestServer};
use opsd::pb::{
    google::longrunning::{
        operation::Result as OpResult, CancelOperationRequest, DeleteOperationRequest,
        GetOperationRequest,
    },
    opsd::v1::{
        operation_event::Type as EventType, CancelPolicy, CreateOperationRequest,
        WatchOperationsRequest,
    },
};
use tonic::Code;

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
