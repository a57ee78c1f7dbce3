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

/// A call is shed once its request body is in, never before: answered
/// before the client's END_STREAM, its stream would be reset, and h2
/// closes a connection after 1,024 such resets (GOAWAY ENHANCE_YOUR_CALM
/// `too_many_internal_resets`). A client whose HEADERS and DATA arrive
/// apart gets 1,200 refusals and no reset.
#[tokio::test]
async fn shed_calls_keep_the_connection_of_a_busy_client() {
    use common::wire::{grpc_headers, Frame, Raw, DATA, END_HEADERS, END_STREAM, HEADERS};
    let mut config = Config::for_tests();
    config.limits.max_in_flight = 1;
    let server = TestServer::start_with(config).await;
    let name = server.registry_op("b").await;
    let message = grpc_message(&GetOperationRequest { name }.encode_to_vec());

    // The one place is held by a call whose body is still coming.
    let mut h2 = H2::connect(&server.address(), H2Options::default()).await;
    let (slow, mut body) = h2
        .open("/google.longrunning.Operations/GetOperation")
        .await
        .unwrap();
    body.send_data(Bytes::copy_from_slice(&message[..3]), false)
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;

    let mut raw = Raw::handshake(&server.address()).await;
    let path = "/google.longrunning.Operations/GetOperation";
    let mut next = 1;
    for _ in 0..3 {
        let ids: Vec<u32> = (0..400).map(|i| next + 2 * i).collect();
        next += 800;
        let mut heads = Vec::new();
        for &id in &ids {
            heads.extend(Frame::new(HEADERS, END_HEADERS, id, &grpc_headers(path)).encode());
        }
        raw.send(&heads).await;
        tokio::time::sleep(Duration::from_millis(30)).await;
        let mut bodies = Vec::new();
        for &id in &ids {
            bodies.extend(Frame::new(DATA, END_STREAM, id, &message).encode());
        }
        raw.send(&bodies).await;
        let mut answered = 0;
        while answered < ids.len() {
            let frame = raw.frame().await.expect("the connection stays open");
            assert!(frame.goaway().is_none(), "{:?}", frame.goaway());
            // Without the body read first, each refusal was followed by
            // RST_STREAM(NO_ERROR), and the late DATA by RST_STREAM
            // (STREAM_CLOSED), which h2 counts towards its limit.
            assert_ne!(frame.kind, common::wire::RST_STREAM, "{frame:?}");
            if frame.kind == HEADERS && frame.flags & END_STREAM != 0 {
                answered += 1;
            }
            if frame.kind == common::wire::PING && frame.flags == 0 {
                raw.send_frame(Frame::new(
                    common::wire::PING,
                    common::wire::ACK,
                    0,
                    &frame.payload,
                ))
                .await;
            }
        }
    }
    body.send_data(Bytes::copy_from_slice(&message[3..]), true)
        .unwrap();
    assert_eq!(
        read_answer(slow, Duration::ZERO).await.unwrap().code(),
        Some(Code::Ok)
    );
    drop(raw);
    server.stop().await;
}
