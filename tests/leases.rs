//! Worker leases: renewals keep an operation alive; a lapsed lease aborts it.

mod common;

use std::time::Duration;

use common::{
    calls::{next_event, secs},
    create, manual_clock, op, TestServer,
};
use opsd::pb::{
    google::longrunning::{operation::Result as OpResult, GetOperationRequest},
    opsd::v1::{
        operation_event::Type as EventType, CreateOperationRequest, UpdateOperationRequest,
        WatchOperationsRequest,
    },
};
use opsd::Config;
use tonic::Code;

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
    assert!(error.message.contains("lease expired"), "{error:?}");
    // No details unless --operation-error-details asks for them.
    assert!(error.details.is_empty(), "{error:?}");
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
