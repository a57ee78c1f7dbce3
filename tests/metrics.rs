//! `/metrics`: Prometheus text on the same port.

mod common;

use common::{complete, create, eventually, op, TestServer};
use opsd::pb::google::longrunning::{GetOperationRequest, WaitOperationRequest};

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
        "\nopsd_waiters 0\n",
        "\nopsd_watchers 0\n",
        "\nopsd_operations{state=\"running\"} 1\n",
        "\nopsd_operations{state=\"done\"} 0\n",
    ] {
        assert!(text.contains(series), "{series} missing from:\n{text}");
    }

    // A parked Wait shows, and a completion moves the operation to done.
    let wait = tokio::spawn({
        let mut ops = ops.clone();
        let name = name.clone();
        async move {
            ops.wait_operation(WaitOperationRequest {
                name,
                timeout: Some(prost_types::Duration {
                    seconds: 30,
                    nanos: 0,
                }),
            })
            .await
        }
    });
    let scrape = || async {
        http.get(format!("{}/metrics", server.url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    while !scrape().await.contains("\nopsd_waiters 1\n") {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    complete(&mut workers, &name, "done").await;
    assert!(wait.await.unwrap().unwrap().into_inner().done);
    // Transitions are counted by a follower of the change feed, which may
    // run just after the waiter woke.
    let transition = r#"opsd_operation_transitions_total{cause="completed"} 1"#;
    eventually("the completion is counted", || async {
        scrape().await.contains(transition)
    })
    .await;
    let text = scrape().await;
    for series in [
        "\nopsd_waiters 0\n",
        "\nopsd_operations{state=\"running\"} 0\n",
        "\nopsd_operations{state=\"done\"} 1\n",
        r#"opsd_operation_transitions_total{cause="completed"} 1"#,
        r#"opsd_rpc_total{method="WaitOperation",transport="grpc",code="OK"} 1"#,
    ] {
        assert!(text.contains(series), "{series} missing from:\n{text}");
    }
    server.stop().await;
}
