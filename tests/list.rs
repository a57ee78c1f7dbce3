//! ListOperations: targets, order, page sizes, page tokens, the 4 MiB cap.

mod common;

use std::collections::HashSet;

use common::{any_string, create, op, reason, TestServer};
use opsd::pb::{
    google::longrunning::{ListOperationsRequest, ListOperationsResponse},
    opsd::v1::{workers_client::WorkersClient, CreateOperationRequest},
};
use tonic::{transport::Channel, Code};
use tonic_types::StatusExt;

fn list(name: &str, page_size: i32, page_token: &str) -> ListOperationsRequest {
    ListOperationsRequest {
        name: name.into(),
        page_size,
        page_token: page_token.into(),
        ..Default::default()
    }
}

fn names(page: &ListOperationsResponse) -> Vec<String> {
    page.operations.iter().map(|o| o.name.clone()).collect()
}

async fn create_many(workers: &mut WorkersClient<Channel>, parent: &str, n: usize) {
    for i in 0..n {
        create(workers, op(parent, &format!("op-{i:04}"))).await;
    }
}

#[tokio::test]
async fn parent_and_collection_names_list_the_same_operations_in_name_order() {
    let server = TestServer::start().await;
    let (mut ops, mut workers) = (server.operations().await, server.workers().await);
    for id in ["c", "a", "b"] {
        create(&mut workers, op("projects/p/locations/l", id)).await;
    }
    create(&mut workers, op("projects/p/locations/other", "z")).await;
    create(&mut workers, op("projects/p", "parent-only")).await;
    create(&mut workers, op("", "bare")).await;

    let by_parent = ops
        .list_operations(list("projects/p/locations/l", 0, ""))
        .await
        .unwrap()
        .into_inner();
    let by_collection = ops
        .list_operations(list("projects/p/locations/l/operations", 0, ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_parent, by_collection);
    assert_eq!(
        names(&by_parent),
        [
            "projects/p/locations/l/operations/a",
            "projects/p/locations/l/operations/b",
            "projects/p/locations/l/operations/c"
        ]
    );
    assert!(by_parent.next_page_token.is_empty());
    assert!(by_parent.unreachable.is_empty());

    let bare = ops
        .list_operations(list("operations", 0, ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(names(&bare), ["operations/bare"]);
    let parent_only = ops
        .list_operations(list("projects/p", 0, ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(names(&parent_only), ["projects/p/operations/parent-only"]);

    // `-` lists across one level; names stay canonical.
    let across = ops
        .list_operations(list("projects/p/locations/-", 0, ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(names(&across).len(), 4);
    assert!(names(&across).contains(&"projects/p/locations/other/operations/z".to_owned()));

    let empty = ops
        .list_operations(list("projects/none", 0, ""))
        .await
        .unwrap()
        .into_inner();
    assert!(empty.operations.is_empty() && empty.next_page_token.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn a_lone_dash_lists_every_operation_at_every_depth_over_grpc_and_rest() {
    let server = TestServer::start().await;
    let (mut ops, mut workers) = (server.operations().await, server.workers().await);
    let parents = [
        "",
        "projects/p",
        "projects/p/locations/l",
        "folders/f/x/y/z/w",
    ];
    let mut expected = Vec::new();
    for parent in parents {
        expected.push(create(&mut workers, op(parent, "a")).await.name);
        expected.push(create(&mut workers, op(parent, "b")).await.name);
    }
    expected.sort();
    // Paged, and with a filter that still applies.
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = ops
            .list_operations(list("-", 3, &token))
            .await
            .unwrap()
            .into_inner();
        seen.extend(names(&page));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, expected);
    let filtered = ops
        .list_operations(ListOperationsRequest {
            filter: r#"name = "*/a""#.into(),
            ..list("-/operations", 0, "")
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(names(&filtered).len(), parents.len());
    // A token of the everything listing is not one of a parent's.
    let page = ops
        .list_operations(list("-", 1, ""))
        .await
        .unwrap()
        .into_inner();
    let err = ops
        .list_operations(list("operations", 1, &page.next_page_token))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // REST: GET /v1/-/operations.
    let body: serde_json::Value = reqwest::get(format!("{}/v1/-/operations", server.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let rest: Vec<&str> = body["operations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    assert_eq!(rest, expected);
    server.stop().await;
}

#[tokio::test]
async fn page_size_defaults_to_50_and_is_capped_at_1000() {
    let server = TestServer::start().await;
    let (mut ops, mut workers) = (server.operations().await, server.workers().await);
    create_many(&mut workers, "projects/many", 1005).await;

    let page = ops
        .list_operations(list("projects/many", 0, ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.operations.len(), 50);
    assert!(!page.next_page_token.is_empty());

    let page = ops
        .list_operations(list("projects/many", 5000, ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.operations.len(), 1000);
    let rest = ops
        .list_operations(list("projects/many", 5000, &page.next_page_token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.operations.len(), 5);
    assert!(rest.next_page_token.is_empty());

    let err = ops
        .list_operations(list("projects/many", -1, ""))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        err.get_error_details()
            .bad_request()
            .unwrap()
            .field_violations[0]
            .field,
        "page_size"
    );
    server.stop().await;
}

#[tokio::test]
async fn walking_pages_returns_every_operation_once_while_others_change() {
    let server = TestServer::start().await;
    let (mut ops, mut workers) = (server.operations().await, server.workers().await);
    create_many(&mut workers, "projects/walk", 40).await;
    let stable: HashSet<String> = (0..40)
        .map(|i| format!("projects/walk/operations/op-{i:04}"))
        .collect();

    let mut seen = Vec::new();
    let mut token = String::new();
    let mut round = 0;
    loop {
        let page = ops
            .list_operations(list("projects/walk", 7, &token))
            .await
            .unwrap()
            .into_inner();
        assert!(page.operations.len() <= 7);
        seen.extend(names(&page));
        // Meanwhile other clients create and delete operations in the same parent.
        create(&mut workers, op("projects/walk", &format!("extra-{round}"))).await;
        ops.delete_operation(opsd::pb::google::longrunning::DeleteOperationRequest {
            name: format!("projects/walk/operations/extra-{round}"),
        })
        .await
        .unwrap();
        round += 1;
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let unique: HashSet<String> = seen.iter().cloned().collect();
    assert_eq!(unique.len(), seen.len(), "an operation was returned twice");
    assert!(stable.is_subset(&unique));
    server.stop().await;
}

#[tokio::test]
async fn forged_or_foreign_page_tokens_are_invalid_arguments() {
    let server = TestServer::start().await;
    let (mut ops, mut workers) = (server.operations().await, server.workers().await);
    create_many(&mut workers, "projects/a", 3).await;
    create_many(&mut workers, "projects/b", 3).await;
    let page = ops
        .list_operations(list("projects/a", 1, ""))
        .await
        .unwrap()
        .into_inner();
    let token = page.next_page_token;

    let mut flipped = token.clone().into_bytes();
    flipped[3] = if flipped[3] == b'A' { b'B' } else { b'A' };
    let forged = [
        "garbage".to_owned(),
        "!!!".to_owned(),
        token[..token.len() / 2].to_owned(),
        String::from_utf8(flipped).unwrap(),
        format!("{token}="),
    ];
    for bad in &forged {
        let err = ops
            .list_operations(list("projects/a", 1, bad))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad}");
        assert_eq!(
            err.get_error_details()
                .bad_request()
                .unwrap()
                .field_violations[0]
                .field,
            "page_token"
        );
    }
    // A token of another listing.
    let err = ops
        .list_operations(list("projects/b", 1, &token))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // The same listing under its collection name accepts it.
    let next = ops
        .list_operations(list("projects/a/operations", 1, &token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(names(&next), ["projects/a/operations/op-0001"]);
    server.stop().await;
}

#[tokio::test]
async fn invalid_targets_and_filters_are_refused_clearly() {
    let server = TestServer::start().await;
    let mut ops = server.operations().await;
    for name in [
        "",
        "projects",
        "projects/p/locations",
        "operations/x",
        "a//b",
    ] {
        let err = ops.list_operations(list(name, 0, "")).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{name:?}");
    }
    for filter in ["done = maybe", "colour = red", "(done = true", "done"] {
        let err = ops
            .list_operations(ListOperationsRequest {
                name: "operations".into(),
                filter: filter.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{filter}");
        assert_eq!(
            err.get_error_details()
                .bad_request()
                .unwrap()
                .field_violations[0]
                .field,
            "filter"
        );
        assert_eq!(reason(&err), "INVALID_ARGUMENT");
    }
    server.stop().await;
}

#[tokio::test]
async fn a_page_stops_before_4_mib() {
    let server = TestServer::start().await;
    let (mut ops, mut workers) = (server.operations().await, server.workers().await);
    let big = "x".repeat(900 * 1024);
    for i in 0..8 {
        let request = CreateOperationRequest {
            metadata: Some(any_string(&big)),
            ..op("projects/big", &format!("op-{i}"))
        };
        create(&mut workers, request).await;
    }
    let mut total = 0;
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = ops
            .list_operations(list("projects/big", 100, &token))
            .await
            .unwrap()
            .into_inner();
        assert!(prost::Message::encoded_len(&page) < 4 * 1024 * 1024);
        assert!(page.operations.len() < 8);
        total += page.operations.len();
        pages += 1;
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(total, 8);
    assert!(pages >= 2);
    server.stop().await;
}
