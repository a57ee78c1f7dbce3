//! Polling reports over gRPC and REST, and strict REST clients.

mod common;

use std::time::Duration;

use common::{
    create, manual_clock, op,
    scripted::{get, with_scenarios},
    TestServer,
};
use opsd::pb::opsd::v1::GetOperationReportRequest;
use serde_json::Value;

#[tokio::test]
async fn polling_reports_over_grpc_and_rest() {
    let mut config = with_scenarios(&["basic.yaml"]);
    let clock = manual_clock(&mut config);
    let server = TestServer::start_with(config).await;
    let mut workers = server.workers().await;
    let http = reqwest::Client::new();
    let name = "operations/running";
    for _ in 0..3 {
        get(&server, name).await.unwrap();
        clock.advance(Duration::from_millis(30));
    }
    let url = format!("{}/v1/{name}", server.url);
    assert_eq!(http.get(&url).send().await.unwrap().status(), 200);

    let report = workers
        .get_operation_report(GetOperationReportRequest { name: name.into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.name, name);
    assert_eq!(report.counts["GetOperation"], 4);
    let transports: Vec<&str> = report.calls.iter().map(|c| c.transport.as_str()).collect();
    assert_eq!(transports, ["grpc", "grpc", "grpc", "rest"]);
    // Each call at the time it was made: 30 ms apart.
    let times: Vec<_> = report
        .calls
        .iter()
        .map(|c| std::time::SystemTime::try_from(c.time.unwrap()).unwrap())
        .collect();
    assert!(times
        .windows(2)
        .all(|w| w[1].duration_since(w[0]).unwrap() == Duration::from_millis(30)));

    let body: Value = http
        .get(format!("{url}:report"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["name"], name);
    assert_eq!(body["counts"]["GetOperation"], "4");
    assert_eq!(body["calls"].as_array().unwrap().len(), 4);
    assert_eq!(body["calls"][0]["method"], "GetOperation");

    let missing = http
        .get(format!("{}/v1/operations/nope:report", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    // Operations that are not scripted have no report by default.
    let plain = create(&mut workers, op("", "plain")).await.name;
    get(&server, &plain).await.unwrap();
    let report = workers
        .get_operation_report(GetOperationReportRequest { name: plain })
        .await
        .unwrap()
        .into_inner();
    assert!(report.calls.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn strict_mode_wants_generated_rest_clients() {
    let mut config = with_scenarios(&["basic.yaml"]);
    config.rest.strict_clients = true;
    let server = TestServer::start_with(config).await;
    let http = reqwest::Client::new();
    let url = format!("{}/v1/operations/running", server.url);
    let refused = http.get(&url).send().await.unwrap();
    assert_eq!(refused.status(), 400);
    let body: Value = refused.json().await.unwrap();
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("x-goog-api-client"));
    let accepted = http
        .get(&url)
        .header("x-goog-api-client", "gl-python/3.11 rest/2.0 gapic/1.0")
        .send()
        .await
        .unwrap();
    assert_eq!(accepted.status(), 200);
    // gRPC is not affected.
    assert!(get(&server, "operations/running").await.is_ok());
    server.stop().await;
}
