//! The server-sent-events feed, `GET /v1/{parent}/operations:watch`, read
//! with a plain HTTP client as `curl -N` would.

mod common;

use std::time::Duration;

use common::{
    calls::{delete, respond},
    create, op, TestServer,
};
use serde_json::Value;

/// Reads a server-sent-events body event by event.
struct Events {
    response: reqwest::Response,
    buffer: String,
}

impl Events {
    async fn open(server: &TestServer, path: &str) -> Self {
        let response = reqwest::get(format!("{}{path}", server.url)).await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()["content-type"],
            "text/event-stream; charset=utf-8"
        );
        assert_eq!(response.headers()["cache-control"], "no-cache");
        Self {
            response,
            buffer: String::new(),
        }
    }

    /// The next event: its type (`message` when unnamed) and its data.
    async fn next(&mut self) -> (String, Value) {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut kind = "message".to_owned();
                let mut data = None;
                for line in block.lines() {
                    if let Some(k) = line.strip_prefix("event: ") {
                        kind = k.to_owned();
                    } else if let Some(d) = line.strip_prefix("data: ") {
                        data = Some(serde_json::from_str(d).unwrap());
                    }
                }
                match data {
                    Some(data) => return (kind, data),
                    None => continue, // a comment
                }
            }
            let chunk = tokio::time::timeout(Duration::from_secs(10), self.response.chunk())
                .await
                .expect("an event arrives")
                .unwrap()
                .expect("the stream is open");
            self.buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }
}

#[tokio::test]
async fn changes_arrive_as_server_sent_events() {
    let server = TestServer::start().await;
    let (mut ops, mut workers) = (server.operations().await, server.workers().await);
    let first = create(&mut workers, op("projects/p", "first")).await.name;
    let mut events =
        Events::open(&server, "/v1/projects/p/operations:watch?sendInitial=true").await;
    let (kind, data) = events.next().await;
    assert_eq!(
        (kind.as_str(), data["name"].as_str()),
        ("message", Some(first.as_str()))
    );
    assert!(data.get("done").is_none());

    let second = create(&mut workers, op("projects/p", "second")).await.name;
    assert_eq!(events.next().await.1["name"], second);
    workers
        .complete_operation(respond(&second, "ok"))
        .await
        .unwrap();
    let (_, done) = events.next().await;
    assert_eq!(done["name"], second);
    assert_eq!(done["done"], true);
    assert_eq!(
        done["response"]["@type"],
        "type.googleapis.com/google.protobuf.StringValue"
    );
    ops.delete_operation(delete(&first)).await.unwrap();
    let (kind, data) = events.next().await;
    assert_eq!(kind, "deleted");
    assert_eq!(data, serde_json::json!({ "name": first }));
    server.stop().await;
}

#[tokio::test]
async fn every_operation_with_a_filter_and_bad_requests_are_json_errors() {
    let server = TestServer::start().await;
    let mut workers = server.workers().await;
    let mut events = Events::open(&server, "/v1/-/operations:watch?filter=done%20%3D%20true").await;
    let bare = create(&mut workers, op("", "bare")).await.name;
    let deep = create(&mut workers, op("a/b/c/d", "deep")).await.name;
    workers
        .complete_operation(respond(&deep, "ok"))
        .await
        .unwrap();
    workers
        .complete_operation(respond(&bare, "ok"))
        .await
        .unwrap();
    // Only the completions pass `done = true`.
    assert_eq!(events.next().await.1["name"], deep);
    assert_eq!(events.next().await.1["name"], bare);

    let bad = reqwest::get(format!(
        "{}/v1/projects/p/operations:watch?filter=colour%3Dred",
        server.url
    ))
    .await
    .unwrap();
    assert_eq!(bad.status(), 400);
    let body: Value = bad.json().await.unwrap();
    assert_eq!(body["error"]["status"], "INVALID_ARGUMENT");
    // Bare names: `/v1/operations:watch`.
    let mut bare_events = Events::open(&server, "/v1/operations:watch?sendInitial=true").await;
    assert_eq!(bare_events.next().await.1["name"], bare);
    server.stop().await;
}
