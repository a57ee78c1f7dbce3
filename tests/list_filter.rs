//! ListOperations filters against the real server, on both stores.

mod common;

use std::{path::PathBuf, time::Duration};

use common::{any_string, create, manual_clock, op, status, TestServer};
use opsd::{
    config::StoreConfig,
    pb::{
        google::longrunning::{CancelOperationRequest, ListOperationsRequest},
        opsd::v1::{complete_operation_request, CompleteOperationRequest, CreateOperationRequest},
    },
    Config,
};

async fn names(server: &TestServer, filter: &str, page_size: i32) -> Vec<String> {
    let mut ops = server.operations().await;
    let mut names = Vec::new();
    let mut token = String::new();
    loop {
        let page = ops
            .list_operations(ListOperationsRequest {
                name: "projects/f".into(),
                filter: filter.into(),
                page_size,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("{filter}: {e}"))
            .into_inner();
        names.extend(
            page.operations
                .into_iter()
                .map(|o| o.name.rsplit('/').next().unwrap().to_owned()),
        );
        if page.next_page_token.is_empty() {
            return names;
        }
        token = page.next_page_token;
    }
}

async fn exercise(mut config: Config) {
    let clock = manual_clock(&mut config);
    let server = TestServer::start_with(config).await;
    let (mut ops, mut workers) = (server.operations().await, server.workers().await);
    let with_metadata = CreateOperationRequest {
        metadata: Some(any_string("50%")),
        ..op("projects/f", "running")
    };
    create(&mut workers, with_metadata).await;
    clock.advance(Duration::from_millis(10));
    let before = prost_types::Timestamp::from(clock.now());
    clock.advance(Duration::from_millis(10));
    for id in ["ok", "failed", "cancelled"] {
        create(&mut workers, op("projects/f", id)).await;
    }
    let complete = |id: &str, result| CompleteOperationRequest {
        name: format!("projects/f/operations/{id}"),
        result: Some(result),
        metadata: None,
    };
    workers
        .complete_operation(complete(
            "ok",
            complete_operation_request::Result::Response(any_string("r")),
        ))
        .await
        .unwrap();
    workers
        .complete_operation(complete(
            "failed",
            complete_operation_request::Result::Error(status(13, "boom")),
        ))
        .await
        .unwrap();
    ops.cancel_operation(CancelOperationRequest {
        name: "projects/f/operations/cancelled".into(),
    })
    .await
    .unwrap();

    let cases: &[(&str, &[&str])] = &[
        ("", &["cancelled", "failed", "ok", "running"]),
        ("done = false", &["running"]),
        ("done = true AND error.code = CANCELLED", &["cancelled"]),
        ("error.code != 1", &["failed"]),
        ("NOT error.code = 1", &["failed", "ok", "running"]),
        ("error:* OR response:*", &["cancelled", "failed", "ok"]),
        ("-error:*", &["ok", "running"]),
        ("metadata:*", &["running"]),
        (r#"metadata.@type = "*StringValue""#, &["running"]),
        (
            r#"response.@type = "type.googleapis.com/google.protobuf.StringValue""#,
            &["ok"],
        ),
        (r#"name = "*/c*""#, &["cancelled"]),
        (
            r#"name = "projects/f/operations/o*" OR name = "*ing""#,
            &["ok", "running"],
        ),
        ("done = true error.code >= 13", &["failed"]),
    ];
    for (filter, expected) in cases {
        for page_size in [1, 2, 50] {
            assert_eq!(
                names(&server, filter, page_size).await,
                *expected,
                "{filter:?} by {page_size}"
            );
        }
    }
    let after =
        humantime::format_rfc3339(std::time::SystemTime::try_from(before).unwrap()).to_string();
    assert_eq!(
        names(&server, &format!("create_time > \"{after}\""), 2).await,
        ["cancelled", "failed", "ok"]
    );
    assert_eq!(
        names(&server, &format!("update_time < \"{after}\""), 2).await,
        ["running"]
    );
    server.stop().await;
}

#[tokio::test]
async fn filters_select_on_the_memory_store() {
    exercise(Config::for_tests()).await;
}

#[tokio::test]
async fn filters_select_on_the_redb_store() {
    let dir = std::env::temp_dir().join(format!("opsd-filter-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut config = Config::for_tests();
    config.store = StoreConfig::Redb(PathBuf::from(&dir).join("opsd.redb"));
    exercise(config).await;
    let _ = std::fs::remove_dir_all(&dir);
}
