//! Retention: done operations expire and are deleted; running ones stay.

mod common;

use std::time::Duration;

use common::{
    calls::{get, respond},
    create, eventually, manual_clock, op, TestServer,
};
use opsd::Config;
use tonic::Code;

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
