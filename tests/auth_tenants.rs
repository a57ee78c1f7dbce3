//! Auth: tenants by name. Tenant A (`projects/a`), tenant B (`projects/b`
//! and the prefix trap `projects/ab`), every Operations, Console and
//! Workers method, over gRPC and REST: another tenant's operation is the
//! same PERMISSION_DENIED whether it exists or not; List and `-` wildcards
//! show only the caller's names; a page token of one caller is refused to
//! another; workers create, update, complete and watch only under their
//! names; REST paths that try to climb out (`..`, `%2e%2e`, `%2F`, double
//! slashes) never reach another tenant.

mod common;

use std::time::Duration;

use common::{
    auth::{self, bearer, claims, Dir, SigningKey, POLICY},
    calls::{cancel, delete, get, next_event, respond},
    op, reason, TestServer,
};
use opsd::pb::{
    google::longrunning::{
        operations_client::OperationsClient, ListOperationsRequest, WaitOperationRequest,
    },
    opsd::v1::{
        console_client::ConsoleClient, workers_client::WorkersClient, GetOperationReportRequest,
        RegisterTypesRequest, UpdateOperationRequest, WatchOperationChangesRequest,
        WatchOperationsRequest,
    },
};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::{transport::Channel, Code, Request};

struct Fixture {
    server: TestServer,
    key: SigningKey,
    _dir: Dir,
}

impl Fixture {
    fn token(&self, sub: &str) -> String {
        self.key.sign(&claims(sub))
    }
}

/// A server with auth on and running operations `a1`..`a3` in A, `b1`..
/// in B and `ab1`.. in the prefix trap.
async fn start() -> Fixture {
    let dir = Dir::new("auth-tenants");
    let key = SigningKey::ec("k");
    let server = TestServer::start_with(auth::config(&dir, &[&key], Some(POLICY))).await;
    for (parent, prefix) in [
        ("projects/a", "a"),
        ("projects/b", "b"),
        ("projects/ab", "ab"),
    ] {
        for i in 1..=3 {
            server
                .registry
                .create(opsd::registry::CreateParams {
                    parent: parent.into(),
                    operation_id: format!("{prefix}{i}"),
                    ..Default::default()
                })
                .await
                .unwrap();
        }
    }
    Fixture {
        server,
        key,
        _dir: dir,
    }
}

fn as_<T>(token: &str, message: T) -> Request<T> {
    bearer(Request::new(message), token)
}

fn code<T>(result: Result<T, tonic::Status>) -> Code {
    match result {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

/// The gRPC answers of each Operations and Console method on `name`, as
/// `token`: (method, code, message when refused).
async fn operations_matrix(
    channel: Channel,
    token: &str,
    name: &str,
) -> Vec<(&'static str, Code, String)> {
    let mut ops = OperationsClient::new(channel.clone());
    let mut console = ConsoleClient::new(channel.clone());
    let mut workers = WorkersClient::new(channel);
    let parent = name.rsplit_once("/operations/").unwrap().0;
    let mut answers = Vec::new();
    macro_rules! record {
        ($method:literal, $call:expr) => {{
            let result = $call.await;
            let message = result
                .as_ref()
                .err()
                .map(|s| s.message().to_owned())
                .unwrap_or_default();
            if let Err(status) = &result {
                if status.code() == Code::PermissionDenied {
                    assert_eq!(reason(status), "IAM_PERMISSION_DENIED");
                }
            }
            answers.push(($method, code(result), message));
        }};
    }
    record!("GetOperation", ops.get_operation(as_(token, get(name))));
    record!(
        "WaitOperation",
        ops.wait_operation(as_(
            token,
            WaitOperationRequest {
                name: name.into(),
                timeout: Some(prost_types::Duration::default()),
            }
        ))
    );
    record!(
        "ListOperations",
        ops.list_operations(as_(
            token,
            ListOperationsRequest {
                name: parent.into(),
                ..Default::default()
            }
        ))
    );
    record!(
        "GetOperationInfo",
        console.get_operation_info(as_(token, get(name)))
    );
    record!(
        "ListOperationInfos",
        console.list_operation_infos(as_(
            token,
            ListOperationsRequest {
                name: parent.into(),
                ..Default::default()
            }
        ))
    );
    record!(
        "GetOperationReport",
        workers.get_operation_report(as_(token, GetOperationReportRequest { name: name.into() }))
    );
    record!(
        "CancelOperation",
        ops.cancel_operation(as_(token, cancel(name)))
    );
    record!(
        "DeleteOperation",
        ops.delete_operation(as_(token, delete(name)))
    );
    answers
}

#[tokio::test]
async fn another_tenants_operations_are_denied_alike_whether_they_exist_or_not() {
    let f = start().await;
    let alice = f.token("alice@example.com");
    let bob = f.token("bob@example.com");
    // Alice in A: everything answers (the report of an unscripted operation is NOT_FOUND).
    for (method, code, message) in
        operations_matrix(f.server.channel().await, &alice, "projects/a/operations/a1").await
    {
        assert!(
            matches!(code, Code::Ok | Code::NotFound),
            "{method}: {code:?} {message}"
        );
    }
    // Alice on B and on the prefix trap, existing or not: denied, and the
    // message names only the request's own name.
    for (existing, missing) in [
        ("projects/b/operations/b1", "projects/b/operations/zz"),
        ("projects/ab/operations/ab1", "projects/ab/operations/zz"),
    ] {
        let there = operations_matrix(f.server.channel().await, &alice, existing).await;
        let absent = operations_matrix(f.server.channel().await, &alice, missing).await;
        for ((method, code, message), (_, absent_code, absent_message)) in there.iter().zip(&absent)
        {
            assert_eq!(
                *code,
                Code::PermissionDenied,
                "{method} {existing}: {message}"
            );
            assert_eq!(*absent_code, Code::PermissionDenied, "{method} {missing}");
            assert_eq!(
                message.replace(existing, "NAME"),
                absent_message.replace(missing, "NAME"),
                "{method}"
            );
        }
    }
    // Nothing of B changed.
    for name in ["projects/b/operations/b1", "projects/ab/operations/ab1"] {
        assert!(!f.server.registry.get(name).await.unwrap().done());
    }
    // Bob in B and in the prefix trap; not in A.
    for (method, code, _) in
        operations_matrix(f.server.channel().await, &bob, "projects/ab/operations/ab2").await
    {
        assert!(
            matches!(code, Code::Ok | Code::NotFound),
            "{method}: {code:?}"
        );
    }
    for (method, code, _) in
        operations_matrix(f.server.channel().await, &bob, "projects/a/operations/a2").await
    {
        assert_eq!(code, Code::PermissionDenied, "{method}");
    }
    // A client principal cannot call the worker API.
    let mut workers = WorkersClient::new(f.server.channel().await);
    let denied = workers
        .create_operation(as_(&alice, op("projects/a", "new")))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let denied = workers
        .register_types(as_(&alice, RegisterTypesRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    f.server.stop().await;
}

#[tokio::test]
async fn the_same_matrix_holds_over_rest() {
    let f = start().await;
    let alice = f.token("alice@example.com");
    let http = reqwest::Client::new();
    let call = |method: reqwest::Method, path: String| {
        let mut request = http
            .request(method, format!("{}/v1/{path}", f.server.url))
            .bearer_auth(&alice);
        if path.ends_with(":wait") {
            request = request.body(r#"{"timeout": "0s"}"#);
        }
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap();
            (status, body)
        }
    };
    use reqwest::Method;
    for (name, expected) in [
        (
            "projects/a/operations/a1",
            [200, 200, 200, 200, 200, 200, 200],
        ),
        ("projects/b/operations/b1", [403; 7]),
        ("projects/ab/operations/ab1", [403; 7]),
        ("projects/b/operations/zz", [403; 7]),
    ] {
        let parent = name.rsplit_once("/operations/").unwrap().0;
        let answers = [
            call(Method::GET, name.into()).await,
            call(Method::POST, format!("{name}:wait")).await,
            call(Method::GET, format!("{parent}/operations")).await,
            call(Method::GET, format!("{name}:info")).await,
            call(Method::GET, format!("{parent}/operations:info")).await,
            call(Method::POST, format!("{name}:cancel")).await,
            call(Method::DELETE, name.into()).await,
        ];
        for (i, ((status, body), expected)) in answers.iter().zip(expected).enumerate() {
            assert_eq!(*status, expected, "call {i} on {name}: {body}");
            if *status == 403 {
                assert_eq!(body["error"]["status"], "PERMISSION_DENIED");
                assert_eq!(
                    body["error"]["details"][0]["reason"],
                    "IAM_PERMISSION_DENIED"
                );
            }
        }
    }
    let (status, _) = call(Method::GET, "projects/b/operations/b1:report".into()).await;
    assert_eq!(status, 403);
    f.server.stop().await;
}

/// The names of one List call's pages, walked to the end.
async fn list_all(
    ops: &mut OperationsClient<Channel>,
    token: &str,
    name: &str,
    filter: &str,
) -> Result<Vec<String>, tonic::Status> {
    let mut names = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = ops
            .list_operations(as_(
                token,
                ListOperationsRequest {
                    name: name.into(),
                    filter: filter.into(),
                    page_size: 2,
                    page_token,
                    ..Default::default()
                },
            ))
            .await?
            .into_inner();
        names.extend(page.operations.into_iter().map(|o| o.name));
        if page.next_page_token.is_empty() {
            return Ok(names);
        }
        page_token = page.next_page_token;
    }
}

#[tokio::test]
async fn listings_show_only_the_callers_names() {
    let f = start().await;
    let alice = f.token("alice@example.com");
    let bob = f.token("bob@example.com");
    let mut ops = f.server.operations().await;
    let a = [
        "projects/a/operations/a1",
        "projects/a/operations/a2",
        "projects/a/operations/a3",
    ];
    for target in [
        "projects/a",
        "projects/a/operations",
        "projects/-",
        "-",
        "-/operations",
    ] {
        assert_eq!(
            list_all(&mut ops, &alice, target, "").await.unwrap(),
            a,
            "{target}"
        );
    }
    // Filters cannot widen what a caller sees.
    for filter in [
        r#"name = "projects/b/*""#,
        r#"name != "x""#,
        "done = false OR done = true",
        r#"NOT name = "projects/a/*""#,
    ] {
        let seen = list_all(&mut ops, &alice, "-", filter).await.unwrap();
        assert!(
            seen.iter().all(|n| n.starts_with("projects/a/")),
            "{filter}: {seen:?}"
        );
    }
    // A parent no grant can cover is denied, the prefix trap included.
    for target in [
        "projects/b",
        "projects/ab",
        "operations",
        "projects/a/locations/-",
    ] {
        let denied = list_all(&mut ops, &alice, target, "").await;
        let expected = if target == "projects/a/locations/-" {
            Code::Ok
        } else {
            Code::PermissionDenied
        };
        assert_eq!(code(denied), expected, "{target}");
    }
    let bobs = list_all(&mut ops, &bob, "projects/-", "").await.unwrap();
    assert_eq!(bobs.len(), 6);
    assert!(bobs
        .iter()
        .all(|n| n.starts_with("projects/b/") || n.starts_with("projects/ab/")));

    // A page token is bound to its caller.
    let first = ops
        .list_operations(as_(
            &alice,
            ListOperationsRequest {
                name: "projects/-".into(),
                page_size: 1,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!first.next_page_token.is_empty());
    let stolen = ops
        .list_operations(as_(
            &f.token("admin"),
            ListOperationsRequest {
                name: "projects/-".into(),
                page_size: 1,
                page_token: first.next_page_token.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(stolen.code(), Code::InvalidArgument);
    let stolen = ops
        .list_operations(as_(
            &bob,
            ListOperationsRequest {
                name: "projects/-".into(),
                page_size: 1,
                page_token: first.next_page_token,
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(stolen.code(), Code::InvalidArgument);
    // REST lists the same.
    let body: Value = reqwest::Client::new()
        .get(format!("{}/v1/projects/-/operations", f.server.url))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = body["operations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, a);
    f.server.stop().await;
}

/// Reads server-sent events into `text` until it holds `count`.
async fn read_events(response: &mut reqwest::Response, text: &mut String, count: usize) {
    while text.matches("data: ").count() < count {
        let chunk = tokio::time::timeout(Duration::from_secs(5), response.chunk())
            .await
            .expect("events arrive")
            .unwrap()
            .expect("the stream is open");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
}

#[tokio::test]
async fn feeds_send_only_the_callers_names() {
    let f = start().await;
    let alice = f.token("alice@example.com");
    let admin = f.token("admin");
    let mut console = ConsoleClient::new(f.server.channel().await);
    let mut changes = console
        .watch_operation_changes(as_(
            &alice,
            WatchOperationChangesRequest {
                parent: "-".into(),
                send_initial: true,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let mut initial = Vec::new();
    for _ in 0..3 {
        let change = tokio::time::timeout(Duration::from_secs(5), changes.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        initial.push(change.name);
    }
    initial.sort();
    assert_eq!(
        initial,
        [
            "projects/a/operations/a1",
            "projects/a/operations/a2",
            "projects/a/operations/a3"
        ]
    );
    // Changes in B (a deletion too) are not sent; the next change sent is A's.
    let mut ops = f.server.operations().await;
    ops.cancel_operation(as_(&admin, cancel("projects/b/operations/b1")))
        .await
        .unwrap();
    ops.delete_operation(as_(&admin, delete("projects/ab/operations/ab1")))
        .await
        .unwrap();
    ops.cancel_operation(as_(&admin, cancel("projects/a/operations/a1")))
        .await
        .unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), changes.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(next.name, "projects/a/operations/a1");
    // The SSE watch over REST: the same.
    let mut response = reqwest::Client::new()
        .get(format!(
            "{}/v1/-/operations:watch?sendInitial=true",
            f.server.url
        ))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut text = String::new();
    read_events(&mut response, &mut text, 3).await;
    ops.cancel_operation(as_(&admin, cancel("projects/b/operations/b3")))
        .await
        .unwrap();
    ops.cancel_operation(as_(&admin, cancel("projects/a/operations/a3")))
        .await
        .unwrap();
    // The next event is A's (B's change, made first, is not sent).
    read_events(&mut response, &mut text, 4).await;
    assert!(!text.contains("projects/b/"), "{text}");
    assert!(!text.contains("projects/ab/"), "{text}");
    drop(response);
    // A feed of B's parent is denied.
    let denied = console
        .watch_operation_changes(as_(
            &alice,
            WatchOperationChangesRequest {
                parent: "projects/b".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    f.server.stop().await;
}

#[tokio::test]
async fn workers_work_only_under_their_names() {
    let f = start().await;
    let worker_a = f.token("worker-a");
    let admin = f.token("admin");
    let mut workers = WorkersClient::new(f.server.channel().await);
    // Create: under A with or without an id; not under B or the trap.
    workers
        .create_operation(as_(&worker_a, op("projects/a", "w1")))
        .await
        .unwrap();
    workers
        .create_operation(as_(&worker_a, op("projects/a", "")))
        .await
        .unwrap();
    for parent in ["projects/b", "projects/ab", ""] {
        let denied = workers
            .create_operation(as_(&worker_a, op(parent, "w2")))
            .await
            .unwrap_err();
        assert_eq!(denied.code(), Code::PermissionDenied, "{parent}");
    }
    // Update and complete: A's, not B's.
    let update = |name: &str| UpdateOperationRequest {
        name: name.into(),
        metadata: None,
    };
    workers
        .update_operation(as_(&worker_a, update("projects/a/operations/w1")))
        .await
        .unwrap();
    let denied = workers
        .update_operation(as_(&worker_a, update("projects/b/operations/b1")))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let denied = workers
        .complete_operation(as_(&worker_a, respond("projects/ab/operations/ab1", "x")))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    workers
        .complete_operation(as_(&worker_a, respond("projects/a/operations/w1", "x")))
        .await
        .unwrap();
    workers
        .register_types(as_(&worker_a, RegisterTypesRequest::default()))
        .await
        .unwrap();
    // Watch: a stream over everything reports only A's events.
    let mut events = workers
        .watch_operations(as_(&worker_a, WatchOperationsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    // Watching B's parent, or one of B's names, is denied.
    for (parent, names) in [
        ("projects/b", vec![]),
        ("", vec!["projects/b/operations/b2".into()]),
    ] {
        let request = WatchOperationsRequest {
            parent: parent.into(),
            names,
        };
        let denied = workers.watch_operations(as_(&worker_a, request)).await;
        assert_eq!(code(denied), Code::PermissionDenied, "{parent}");
    }
    let mut ops = f.server.operations().await;
    ops.cancel_operation(as_(&admin, cancel("projects/b/operations/b2")))
        .await
        .unwrap();
    ops.delete_operation(as_(&admin, delete("projects/ab/operations/ab2")))
        .await
        .unwrap();
    ops.cancel_operation(as_(&admin, cancel("projects/a/operations/a2")))
        .await
        .unwrap();
    assert_eq!(
        next_event(&mut events).await.name,
        "projects/a/operations/a2"
    );
    f.server.stop().await;
}

/// A raw HTTP/1.1 GET (no client-side path normalisation): the status.
async fn raw_get(server: &TestServer, path: &str, token: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(server.address())
        .await
        .unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nhost: opsd\r\nauthorization: Bearer {token}\r\nconnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    let status = answer[9..12].parse().unwrap();
    (status, answer)
}

#[tokio::test]
async fn rest_paths_that_climb_out_never_reach_another_tenant() {
    let f = start().await;
    let alice = f.token("alice@example.com");
    for path in [
        "/v1/projects/a/../b/operations/b1",
        "/v1/projects/a/%2e%2e/b/operations/b1",
        "/v1/projects/a/%2E%2E/b/operations/b1",
        "/v1/projects/a%2F..%2Fb/operations/b1",
        "/v1/projects/a%2f..%2fb/operations/b1",
        "/v1/projects%2Fb/operations/b1",
        "/v1/projects/b%2Foperations%2Fb1",
        "/v1//projects/b/operations/b1",
        "/v1/projects//b/operations/b1",
        "/v1/projects/a//../b/operations/b1",
        "/v1/projects/a/operations/../../b/operations/b1",
        "/v1/projects/a/./../b/operations/b1",
        "/v1/projects/%61b/operations/ab1",
        "/v1/projects/a%00/../b/operations/b1",
    ] {
        let (status, answer) = raw_get(&f.server, path, &alice).await;
        assert!(matches!(status, 400 | 403 | 404), "{path}: {answer}");
        assert!(!answer.contains("\"done\""), "{path}: {answer}");
    }
    // Alice's own operation is reachable, and so the refusals are not a
    // broken token.
    assert_eq!(
        raw_get(&f.server, "/v1/projects/a/operations/a1", &alice)
            .await
            .0,
        200
    );
    f.server.stop().await;
}
