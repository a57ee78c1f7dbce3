//! `--max-in-flight`: a call over the budget is answered at once with
//! RESOURCE_EXHAUSTED (`SERVER_OVERLOADED`, `RetryInfo`), REST 429 with
//! `Retry-After`, and counted; Waits do not count against it.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{
    calls::get,
    eventually, reason,
    wire::{grpc_message, read_answer, H2Options, H2},
    TestServer,
};
use opsd::{
    pb::google::longrunning::{GetOperationRequest, WaitOperationRequest},
    Config,
};
use prost::Message;
use tonic::Code;
use tonic_types::StatusExt;

#[tokio::test]
async fn calls_over_the_budget_are_refused_at_once() {
    let mut config = Config::for_tests();
    config.limits.max_in_flight = 1;
    let server = TestServer::start_with(config).await;
    let name = server.registry_op("s").await;

    // A Wait does not take the budget's one place.
    let mut ops = server.operations().await;
    let waiting = tokio::spawn({
        let mut ops = ops.clone();
        let request = WaitOperationRequest {
            name: name.clone(),
            timeout: None,
        };
        async move { ops.wait_operation(request).await }
    });
    eventually("the Wait is parked", || async {
        server.registry.waiter_count() == 1
    })
    .await;
    ops.get_operation(get(&name)).await.unwrap();

    // A call whose body is still coming holds the one place.
    let mut h2 = H2::connect(&server.address(), H2Options::default()).await;
    let message = grpc_message(&GetOperationRequest { name: name.clone() }.encode_to_vec());
    let (slow, mut body) = h2
        .open("/google.longrunning.Operations/GetOperation")
        .await
        .unwrap();
    body.send_data(Bytes::copy_from_slice(&message[..3]), false)
        .unwrap();
    let http = reqwest::Client::new();
    eventually("the slow call holds the place", || {
        let (mut ops, name) = (ops.clone(), name.clone());
        async move { ops.get_operation(get(&name)).await.is_err() }
    })
    .await;

    let refused = ops.get_operation(get(&name)).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert_eq!(reason(&refused), "SERVER_OVERLOADED");
    assert_eq!(
        refused.get_details_retry_info().and_then(|r| r.retry_delay),
        Some(Duration::from_secs(1))
    );
    let response = http
        .get(format!("{}/v1/{name}", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "1");
    let envelope: serde_json::Value = response.json().await.unwrap();
    assert_eq!(envelope["error"]["status"], "RESOURCE_EXHAUSTED");

    // The slow call ends: its place is free again.
    body.send_data(Bytes::copy_from_slice(&message[3..]), true)
        .unwrap();
    let answer = read_answer(slow, Duration::ZERO).await.unwrap();
    assert_eq!(answer.code(), Some(Code::Ok));
    ops.get_operation(get(&name)).await.unwrap();

    let text = server.metrics_text().await;
    for series in [
        r#"opsd_rpc_total{method="GetOperation",transport="grpc",code="RESOURCE_EXHAUSTED"}"#,
        r#"opsd_rpc_total{method="GetOperation",transport="rest",code="RESOURCE_EXHAUSTED"}"#,
    ] {
        assert!(text.contains(series), "{series} missing from:\n{text}");
    }
    server.stop().await;
    assert!(!waiting.await.unwrap().unwrap().into_inner().done);
}
