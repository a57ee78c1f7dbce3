//! REST requests as Google's front end takes them: query parameters, cancel
//! bodies, and errors in the JSON envelope with code.proto's HTTP mapping.

mod common;

use common::{
    create, op,
    rest::{assert_error, config, field_violation, Rest},
};
use opsd::pb::opsd::v1::{CancelPolicy, CreateOperationRequest};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

#[tokio::test]
async fn query_parameters_follow_google_rules() {
    let rest = Rest::start().await;
    for id in ["x1", "x2", "x3"] {
        rest.create("projects/p/locations/l", id).await;
    }
    let list = "/v1/projects/p/locations/l/operations";
    let (_, all) = rest.get(list).await;
    for query in [
        "filter=&pageSize=0&pageToken=&returnPartialSuccess=false",
        "page_size=0&return_partial_success=False",
        "$alt=json&alt=json&$prettyPrint=true&prettyPrint=1&$fields=operations&key=k&access_token=t\
         &quotaUser=q&$.xgafv=2&$callback=cb&$userProject=u&%24alt=json&%24prettyPrint=true",
    ] {
        assert_eq!(rest.get(&format!("{list}?{query}")).await, (StatusCode::OK, all.clone()), "{query}");
    }
    // returnPartialSuccess=true: `unreachable` is still never emitted when empty.
    let (status, body) = rest.get(&format!("{list}?returnPartialSuccess=True")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.get("unreachable").is_none());
    // camelCase and proto names.
    let (_, camel) = rest.get(&format!("{list}?pageSize=2")).await;
    let (_, proto) = rest.get(&format!("{list}?page_size=2")).await;
    assert_eq!(camel, proto);
    assert_eq!(camel["operations"].as_array().unwrap().len(), 2);

    for (query, field) in [
        ("bogus=1", "bogus"),
        ("name=projects/q", "name"),
        ("pageSize=-1", "page_size"),
        ("pageSize=ten", "pageSize"),
        ("returnPartialSuccess=yes", "returnPartialSuccess"),
        ("alt=proto", "alt"),
        ("pageToken=forged", "page_token"),
    ] {
        let (status, body) = rest.get(&format!("{list}?{query}")).await;
        assert_error(status, &body, 400, "INVALID_ARGUMENT");
        assert_eq!(field_violation(&body), field, "{query}");
    }
    // `+` and `%20` are spaces: the filter arrives whole.
    rest.post("/v1/projects/p/locations/l/operations/x1:cancel", None)
        .await;
    let (status, body) = rest.get(&format!("{list}?filter=done+%3D%20true")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["operations"].as_array().unwrap().len(), 1);
    assert_eq!(
        body["operations"][0]["name"],
        "projects/p/locations/l/operations/x1"
    );
    let (status, body) = rest.get(&format!("{list}?filter=done%20%3D%20maybe")).await;
    assert_error(status, &body, 400, "INVALID_ARGUMENT");
    assert_eq!(field_violation(&body), "filter");
    rest.server.stop().await;
}

#[tokio::test]
async fn cancel_bodies_follow_google_rules() {
    let rest = Rest::start().await;
    let path = |id: &str| format!("/v1/projects/p/locations/l/operations/{id}:cancel");
    let accepted = [
        (None, None),
        (None, Some("application/json")),
        (Some("{}"), Some("application/json")),
        (Some(" "), None),
        (
            Some(r#"{"name": "projects/p/locations/l/operations/c4"}"#),
            Some("application/json"),
        ),
    ];
    for (i, (body, content_type)) in accepted.into_iter().enumerate() {
        let id = format!("c{i}");
        rest.create("projects/p/locations/l", &id).await;
        let mut request = rest.http.post(format!("{}{}", rest.server.url, path(&id)));
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        if let Some(body) = body {
            request = request.body(body);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{body:?}");
        assert_eq!(response.json::<Value>().await.unwrap(), json!({}));
    }
    rest.create("projects/p/locations/l", "keep").await;
    for body in [
        r#"{"name": "projects/p/locations/l/operations/other"}"#,
        "{",
        r#"{"unknownField": 1}"#,
        r#"{"name": 42}"#,
        "[]",
    ] {
        let (status, error) = rest.post(&path("keep"), Some(body)).await;
        assert_error(status, &error, 400, "INVALID_ARGUMENT");
    }
    let huge = format!(r#"{{"name": "{}"}}"#, "x".repeat(5000));
    let (status, error) = rest.post(&path("keep"), Some(&huge)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{error}");
    assert_eq!(error["error"]["code"], 413);
    // Nothing of that touched the operation.
    let (_, body) = rest.get("/v1/projects/p/locations/l/operations/keep").await;
    assert!(body.get("done").is_none());
    rest.server.stop().await;
}

#[tokio::test]
async fn errors_use_the_code_proto_http_mapping() {
    let mut config = config();
    config.operations.disabled_methods = [opsd::api::operations::Method::Delete]
        .into_iter()
        .collect();
    let rest = Rest::start_with(config).await;
    let mut workers = rest.server.workers().await;
    let stubborn = CreateOperationRequest {
        cancel_policy: CancelPolicy::NotCancellable as i32,
        ..op("", "stubborn")
    };
    create(&mut workers, stubborn).await;

    let (status, body) = rest.post("/v1/operations/stubborn:cancel", None).await;
    assert_error(status, &body, 400, "FAILED_PRECONDITION");
    assert_eq!(
        body["error"]["details"][0]["reason"],
        "OPERATION_NOT_CANCELLABLE"
    );
    let (status, body) = rest
        .call(Method::DELETE, "/v1/operations/stubborn", None)
        .await;
    assert_error(status, &body, 501, "UNIMPLEMENTED");
    let (status, body) = rest.get("/nowhere").await;
    assert_error(status, &body, 404, "NOT_FOUND");
    assert_eq!(body["error"]["details"][0]["reason"], "ROUTE_NOT_FOUND");
    let (status, body) = rest
        .call(Method::PUT, "/v1/operations/stubborn", None)
        .await;
    assert_error(status, &body, 404, "NOT_FOUND");
    assert!(body["error"]["message"].as_str().unwrap().contains("GET"));
    let (status, body) = rest.get("/v1/operations/bad%20name").await;
    assert_error(status, &body, 400, "INVALID_ARGUMENT");
    assert_eq!(field_violation(&body), "name");
    // Multi-segment variables keep %2F, which no name may contain.
    let (status, _) = rest
        .get("/v1/projects/p/locations/l/operations/a%2Fb")
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // Other escapes decode.
    let (status, body) = rest.get("/v1/operations/%73tubborn").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    rest.server.stop().await;
}
