//! `/metrics`: Prometheus text on the same port.

mod common;

use common::{create, op, TestServer};
use opsd::pb::google::longrunning::GetOperationRequest;

#[tokio::test]
async fn metrics_count_calls_by_method_transport_and_code() {
    let server = TestServer::start().await;
    let (mut ops, mut workers) = (server.operations().await, server.workers().await);
    let name = create(&mut workers, op("", "m")).await.name;
    ops.get_operation(GetOperationRequest { name: name.clone() })
        .await
        .unwrap();
    let _ = ops
        .get_operation(GetOperationRequest {
            name: "operations/missing".into(),
        })
        .await;
    let http = reqwest::Client::new();
    assert_eq!(
        http.get(format!("{}/v1/{name}", server.url))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    let response = http
        .get(format!("{}/metrics", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = response.text().await.unwrap();
    for series in [
        r#"opsd_rpc_total{method="GetOperation",transport="grpc",code="OK"}"#,
        r#"opsd_rpc_total{method="GetOperation",transport="grpc",code="NOT_FOUND"}"#,
        r#"opsd_rpc_total{method="GetOperation",transport="rest",code="OK"}"#,
        r#"opsd_rpc_total{method="CreateOperation",transport="grpc",code="OK"}"#,
        "opsd_rpc_duration_seconds_bucket{",
        "opsd_waiters ",
        "opsd_watchers ",
        "opsd_operations ",
    ] {
        assert!(text.contains(series), "{series} missing from:\n{text}");
    }
    server.stop().await;
}
