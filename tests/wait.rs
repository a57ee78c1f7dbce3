//! WaitOperation: wakes on complete, cancel and delete; honours timeouts and
//! deadlines with OK; leaks nothing when clients go away.

mod common;

use std::time::{Duration, Instant};

use common::{any_string, create, op, TestServer};
use opsd::pb::{
    google::longrunning::{
        operations_client::OperationsClient, CancelOperationRequest, DeleteOperationRequest,
        WaitOperationRequest,
    },
    opsd::v1::{complete_operation_request, CompleteOperationRequest},
};
use tonic::{transport::Channel, Code};

fn wait(name: &str, timeout: Option<Duration>) -> WaitOperationRequest {
    WaitOperationRequest {
        name: name.into(),
        timeout: timeout.map(|t| prost_types::Duration::try_from(t).unwrap()),
    }
}

/// Polls until `n` Waits are parked on the server.
async fn until_waiters(server: &TestServer, n: usize) {
    for _ in 0..500 {
        if server.registry.waiter_count() == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "expected {n} waiters, have {}",
        server.registry.waiter_count()
    );
}

fn spawn_wait(
    mut ops: OperationsClient<Channel>,
    name: &str,
    timeout: Option<Duration>,
) -> tokio::task::JoinHandle<Result<opsd::pb::google::longrunning::Operation, tonic::Status>> {
    let request = wait(name, timeout);
    tokio::spawn(async move { ops.wait_operation(request).await.map(|r| r.into_inner()) })
}

#[tokio::test]
async fn wait_wakes_on_completion() {
    let server = TestServer::start().await;
    let (ops, mut workers) = (server.operations().await, server.workers().await);
    let name = create(&mut workers, op("", "w")).await.name;
    let waiting = spawn_wait(ops, &name, Some(Duration::from_secs(30)));
    until_waiters(&server, 1).await;

    workers
        .complete_operation(CompleteOperationRequest {
            name: name.clone(),
            result: Some(complete_operation_request::Result::Response(any_string(
                "done",
            ))),
            metadata: None,
        })
        .await
        .unwrap();
    let done = tokio::time::timeout(Duration::from_secs(2), waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(done.done);
    until_waiters(&server, 0).await;
    server.stop().await;
}

#[tokio::test]
async fn wait_wakes_on_cancel_and_on_delete() {
    let server = TestServer::start().await;
    let (mut ops, mut workers) = (server.operations().await, server.workers().await);
    let cancelled = create(&mut workers, op("", "c")).await.name;
    let deleted = create(&mut workers, op("", "d")).await.name;
    let w1 = spawn_wait(ops.clone(), &cancelled, None);
    let w2 = spawn_wait(ops.clone(), &deleted, None);
    until_waiters(&server, 2).await;

    ops.cancel_operation(CancelOperationRequest {
        name: cancelled.clone(),
    })
    .await
    .unwrap();
    ops.delete_operation(DeleteOperationRequest {
        name: deleted.clone(),
    })
    .await
    .unwrap();

    let op = tokio::time::timeout(Duration::from_secs(2), w1)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(op.done);
    let err = tokio::time::timeout(Duration::from_secs(2), w2)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    until_waiters(&server, 0).await;
    server.stop().await;
}

#[tokio::test]
async fn wait_honours_a_1s_deadline_with_ok_and_the_latest_state() {
    let server = TestServer::start().await;
    let (mut ops, mut workers) = (server.operations().await, server.workers().await);
    let name = create(&mut workers, op("", "slow")).await.name;
    let mut request = tonic::Request::new(wait(&name, None));
    request.set_timeout(Duration::from_secs(1));
    let started = Instant::now();
    let op = ops
        .wait_operation(request)
        .await
        .expect("OK, not DEADLINE_EXCEEDED or CANCELLED")
        .into_inner();
    let elapsed = started.elapsed();
    assert!(!op.done);
    assert_eq!(op.name, name);
    assert!(
        elapsed >= Duration::from_millis(500),
        "returned after {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(1),
        "returned after {elapsed:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn wait_timeouts_return_the_latest_state() {
    let server = TestServer::start().await;
    let (mut ops, mut workers) = (server.operations().await, server.workers().await);
    let name = create(&mut workers, op("", "t")).await.name;
    // 0s is an immediate poll.
    let started = Instant::now();
    let op = ops
        .wait_operation(wait(&name, Some(Duration::ZERO)))
        .await
        .unwrap()
        .into_inner();
    assert!(!op.done);
    assert!(started.elapsed() < Duration::from_millis(500));
    // A short timeout returns OK with the running state.
    let op = ops
        .wait_operation(wait(&name, Some(Duration::from_millis(200))))
        .await
        .unwrap()
        .into_inner();
    assert!(!op.done);
    // A done operation returns at once.
    ops.cancel_operation(CancelOperationRequest { name: name.clone() })
        .await
        .unwrap();
    let op = ops
        .wait_operation(wait(&name, None))
        .await
        .unwrap()
        .into_inner();
    assert!(op.done);
    server.stop().await;
}

#[tokio::test]
async fn wait_validates_its_input() {
    let server = TestServer::start().await;
    let mut ops = server.operations().await;
    let bad = WaitOperationRequest {
        name: "operations/x".into(),
        timeout: Some(prost_types::Duration {
            seconds: -1,
            nanos: 0,
        }),
    };
    assert_eq!(
        ops.wait_operation(bad).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let err = ops
        .wait_operation(wait("operations/missing", None))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = ops
        .wait_operation(wait("bad name", None))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    server.stop().await;
}

#[tokio::test]
async fn dropped_waiters_leak_nothing() {
    let server = TestServer::start().await;
    let (ops, mut workers) = (server.operations().await, server.workers().await);
    let name = create(&mut workers, op("", "abandoned")).await.name;
    let waits: Vec<_> = (0..20)
        .map(|_| spawn_wait(ops.clone(), &name, None))
        .collect();
    until_waiters(&server, 20).await;
    // The clients go away: the server notices the reset streams.
    for w in &waits {
        w.abort();
    }
    drop(ops);
    until_waiters(&server, 0).await;
    server.stop().await;
}

#[tokio::test]
async fn the_waiter_budget_answers_resource_exhausted() {
    let mut config = opsd::Config::for_tests();
    config.registry.max_waiters = 2;
    let server = TestServer::start_with(config).await;
    let (mut ops, mut workers) = (server.operations().await, server.workers().await);
    let name = create(&mut workers, op("", "busy")).await.name;
    let _w1 = spawn_wait(ops.clone(), &name, None);
    let _w2 = spawn_wait(ops.clone(), &name, None);
    until_waiters(&server, 2).await;
    let err = ops.wait_operation(wait(&name, None)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(common::reason(&err), "TOO_MANY_WAITERS");
    server.stop().await;
}

#[tokio::test]
async fn shutdown_returns_open_waits_with_the_latest_state() {
    let server = TestServer::start().await;
    let (ops, mut workers) = (server.operations().await, server.workers().await);
    let name = create(&mut workers, op("", "draining")).await.name;
    let waiting = spawn_wait(ops, &name, None);
    until_waiters(&server, 1).await;
    let started = Instant::now();
    server.stop().await;
    let op = waiting
        .await
        .unwrap()
        .expect("an open Wait returns OK on drain");
    assert!(!op.done);
    assert!(started.elapsed() < Duration::from_secs(3));
}
