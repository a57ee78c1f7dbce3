//! `opsd.v1.Console`: operation infos (times, cancel policy, a pending
//! cancel) over gRPC and REST, and the live change feed.

mod common;

use std::time::Duration;

use common::{
    calls::{cancel, delete, respond},
    create, manual_clock, op, TestServer,
};
use opsd::{
    pb::{
        google::longrunning::{GetOperationRequest, ListOperationsRequest},
        opsd::v1::{
            console_client::ConsoleClient, CancelPolicy, CreateOperationRequest, OperationChange,
            WatchOperationChangesRequest,
        },
    },
    Config,
};
use tonic::{transport::Channel, Code, Streaming};

async fn console(server: &TestServer) -> ConsoleClient<Channel> {
    ConsoleClient::new(server.channel().await)
}

async fn next(stream: &mut Streaming<OperationChange>) -> OperationChange {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("a change arrives")
        .unwrap()
        .expect("the stream is open")
}

#[tokio::test]
async fn infos_carry_the_times_and_facts_of_each_operation() {
    let mut config = Config::for_tests();
    let clock = manual_clock(&mut config);
    let start = clock.now();
    let server = TestServer::start_with(config).await;
    let (mut ops, mut workers) = (server.operations().await, server.workers().await);
    let mut console = console(&server).await;
    let cooperative = CreateOperationRequest {
        cancel_policy: CancelPolicy::Cooperative as i32,
        ..op("projects/p", "coop")
    };
    let coop = create(&mut workers, cooperative).await.name;
    clock.advance(Duration::from_secs(5));
    let done = create(&mut workers, op("projects/p", "done")).await.name;
    workers
        .complete_operation(respond(&done, "ok"))
        .await
        .unwrap();
    ops.cancel_operation(cancel(&coop)).await.unwrap();

    let page = console
        .list_operation_infos(ListOperationsRequest {
            name: "projects/p".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.operations.len(), 2);
    let coop_info = &page.operations[0];
    assert_eq!(coop_info.operation.as_ref().unwrap().name, coop);
    assert_eq!(
        coop_info.create_time.unwrap(),
        prost_types::Timestamp::from(start)
    );
    assert!(
        coop_info.cancel_requested,
        "the cooperative cancel is pending"
    );
    assert_eq!(coop_info.cancel_policy, CancelPolicy::Cooperative as i32);
    assert!(coop_info.done_time.is_none());
    let done_info = &page.operations[1];
    assert!(done_info.operation.as_ref().unwrap().done);
    assert!(done_info.done_time.is_some() && done_info.expire_time.is_some());
    assert!(!done_info.cancel_requested);

    let got = console
        .get_operation_info(GetOperationRequest { name: done.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(&got, done_info);
    let missing = console
        .get_operation_info(GetOperationRequest {
            name: "projects/p/operations/nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    // REST: the same infos as ProtoJSON.
    let http = reqwest::Client::new();
    let body: serde_json::Value = http
        .get(format!("{}/v1/projects/p/operations:info", server.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["operations"][0]["operation"]["name"], coop);
    assert_eq!(body["operations"][0]["cancelRequested"], true);
    assert_eq!(body["operations"][0]["cancelPolicy"], "COOPERATIVE");
    assert!(body["operations"][0]["createTime"].is_string());
    let body: serde_json::Value = http
        .get(format!("{}/v1/{done}:info", server.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["operation"]["done"], true);
    assert!(body["doneTime"].is_string(), "{body}");
    server.stop().await;
}

#[tokio::test]
async fn the_change_feed_sends_the_initial_state_then_each_change() {
    let server = TestServer::start().await;
    let (mut ops, mut workers) = (server.operations().await, server.workers().await);
    let mut console = console(&server).await;
    let before = create(&mut workers, op("projects/p", "before")).await.name;
    create(&mut workers, op("projects/other", "elsewhere")).await;
    let mut stream = console
        .watch_operation_changes(WatchOperationChangesRequest {
            parent: "projects/p".into(),
            filter: String::new(),
            send_initial: true,
        })
        .await
        .unwrap()
        .into_inner();
    let initial = next(&mut stream).await;
    assert_eq!(initial.name, before);
    assert!(!initial.deleted);

    let later = create(&mut workers, op("projects/p", "later")).await.name;
    let created = next(&mut stream).await;
    assert_eq!(created.name, later);
    assert!(!created.info.unwrap().operation.unwrap().done);

    workers
        .complete_operation(respond(&later, "ok"))
        .await
        .unwrap();
    let completed = next(&mut stream).await;
    assert_eq!(completed.name, later);
    assert!(completed.info.unwrap().operation.unwrap().done);

    ops.delete_operation(delete(&before)).await.unwrap();
    let deleted = next(&mut stream).await;
    assert_eq!(
        (deleted.name.as_str(), deleted.deleted),
        (before.as_str(), true)
    );
    assert!(deleted.info.is_none());
    server.stop().await;
}

#[tokio::test]
async fn the_change_feed_honours_filters_and_every_operation() {
    let server = TestServer::start().await;
    let mut workers = server.workers().await;
    let mut console = console(&server).await;
    let mut done_only = console
        .watch_operation_changes(WatchOperationChangesRequest {
            parent: "-".into(),
            filter: "done = true".into(),
            send_initial: false,
        })
        .await
        .unwrap()
        .into_inner();
    let a = create(&mut workers, op("", "a")).await.name;
    let b = create(&mut workers, op("projects/p/locations/l", "b"))
        .await
        .name;
    workers.complete_operation(respond(&b, "ok")).await.unwrap();
    workers.complete_operation(respond(&a, "ok")).await.unwrap();
    // Creations of running operations do not pass the filter.
    assert_eq!(next(&mut done_only).await.name, b);
    assert_eq!(next(&mut done_only).await.name, a);

    let bad = console
        .watch_operation_changes(WatchOperationChangesRequest {
            parent: "projects/p".into(),
            filter: "colour = red".into(),
            send_initial: false,
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    server.stop().await;
}
