//! REST requests that are malformed: 400 with Google's JSON envelope when
//! opsd sees them; what hyper answers itself (before opsd sees anything)
//! is pinned here as the README documents it.

mod common;

use std::time::Duration;

use common::{create, op, wire::closed_within, TestServer};
use tokio::{io::AsyncWriteExt, net::TcpStream};

#[tokio::test]
async fn text_that_is_not_utf8_and_too_precise_durations_are_400() {
    let server = TestServer::start().await;
    let name = create(&mut server.workers().await, op("", "r")).await.name;
    let http = reqwest::Client::new();

    let response = http
        .get(format!(
            "{}/v1/operations?filter=name%20%3D%20%22%FF%22",
            server.url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["status"], "INVALID_ARGUMENT");
    assert_eq!(
        body["error"]["details"][1]["fieldViolations"][0]["field"],
        "filter"
    );

    for timeout in ["1.0000000001s", "0.1234567890s"] {
        let response = http
            .post(format!("{}/v1/{name}:wait", server.url))
            .body(format!(r#"{{"timeout":"{timeout}"}}"#))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{timeout}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(
            body["error"]["details"][1]["fieldViolations"][0]["field"],
            "timeout"
        );
    }
    let ok = http
        .post(format!("{}/v1/{name}:wait", server.url))
        .body(r#"{"timeout":"0.000000001s"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    server.stop().await;
}

/// Sends `head` as is; the status line hyper answers with, and whether a
/// body followed the head.
async fn raw_answer(server: &TestServer, head: &[u8]) -> (String, bool) {
    let mut stream = TcpStream::connect(server.address()).await.unwrap();
    // The server may answer and close before it read everything.
    let _ = stream.write_all(head).await;
    let answer = closed_within(&mut stream, Duration::from_secs(5)).await;
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text.lines().next().unwrap_or_default().to_owned();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default();
    (status, !body.is_empty())
}

/// hyper answers these before any service sees the request, with an empty
/// body, and closes the connection; it has no hook to render them.
#[tokio::test]
async fn hyper_answers_unparsable_requests_itself() {
    let server = TestServer::start().await;
    let (status, body) = raw_answer(
        &server,
        b"GET /v1/operations/\xff HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert_eq!((status.as_str(), body), ("HTTP/1.1 400 Bad Request", false));

    let long_path = format!(
        "GET /v1/{} HTTP/1.1\r\nHost: x\r\n\r\n",
        "a".repeat(1 << 20)
    );
    let (status, body) = raw_answer(&server, long_path.as_bytes()).await;
    assert_eq!(
        (status.as_str(), body),
        ("HTTP/1.1 431 Request Header Fields Too Large", false)
    );

    let long_query = format!(
        "GET /v1/operations?pageSize={} HTTP/1.1\r\nHost: x\r\n\r\n",
        "9".repeat(100_000)
    );
    let (status, body) = raw_answer(&server, long_query.as_bytes()).await;
    assert_eq!(
        (status.as_str(), body),
        ("HTTP/1.1 431 Request Header Fields Too Large", false)
    );

    // A long query that fits hyper's buffer reaches opsd: a JSON 400.
    let response = reqwest::get(format!(
        "{}/v1/operations?pageSize={}",
        server.url,
        "9".repeat(10_000)
    ))
    .await
    .unwrap();
    assert_eq!(response.status(), 400);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["status"], "INVALID_ARGUMENT");
    server.stop().await;
}
