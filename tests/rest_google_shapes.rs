//! A bare `opsd serve` (no `--http-rules`) answers the operation URLs of
//! Google's own services: OS Config `v2beta`, BeyondCorp `v1`, Security
//! Command Center `v1beta1`, under any version segment, over HTTP/1.1 and
//! h2; `--rest-routes strict` serves only what the protos and files declare;
//! a path no route matches says so and names the way out.

mod common;

use common::rest::{assert_error, service_config, Rest};
use opsd::{api::rest::RestRoutes, Config};
use reqwest::{Client, Method, StatusCode};
use serde_json::json;

/// A server with no service config loaded.
async fn bare() -> Rest {
    Rest::start_with(Config::for_tests()).await
}

/// The reference URLs answer with `{}` for running operations, and Get,
/// List, Wait and Delete work on the same shapes, over one HTTP version.
async fn every_method_on_the_seed_urls(rest: &Rest) {
    for (parent, version) in [
        ("projects/p/locations/l", "v2beta"),
        ("projects/p/locations/l", "v1"),
        ("organizations/1", "v1beta1"),
    ] {
        let name = rest.create(parent, "x").await;
        let url = |suffix: &str| format!("/{version}/{name}{suffix}");

        let (status, body) = rest.get(&url("")).await;
        assert_eq!(status, StatusCode::OK, "{version} get: {body}");
        assert_eq!(body["name"], name);
        assert!(body.get("done").is_none());

        let (status, body) = rest.get(&format!("/{version}/{parent}/operations")).await;
        assert_eq!(status, StatusCode::OK, "{version} list: {body}");
        assert_eq!(body["operations"][0]["name"], name);

        let (status, body) = rest.post(&url(":wait"), Some(r#"{"timeout": "0s"}"#)).await;
        assert_eq!(status, StatusCode::OK, "{version} wait: {body}");
        assert_eq!(body["name"], name);

        let (status, body) = rest.post(&url(":cancel"), None).await;
        assert_eq!((status, body), (StatusCode::OK, json!({})), "{version}");
        let (_, body) = rest.get(&url("")).await;
        assert_eq!(body["done"], true);
        assert_eq!(body["error"]["code"], 1);

        let (status, body) = rest.call(Method::DELETE, &url(""), None).await;
        assert_eq!((status, body), (StatusCode::OK, json!({})), "{version}");
        let (status, body) = rest.get(&url("")).await;
        assert_error(status, &body, 404, "NOT_FOUND");
        assert_eq!(body["error"]["details"][0]["reason"], "OPERATION_NOT_FOUND");
    }
}

#[tokio::test]
async fn a_bare_server_answers_google_urls_over_http1() {
    let rest = bare().await;
    every_method_on_the_seed_urls(&rest).await;
    rest.server.stop().await;
}

#[tokio::test]
async fn a_bare_server_answers_google_urls_over_h2() {
    let mut rest = bare().await;
    rest.http = Client::builder().http2_prior_knowledge().build().unwrap();
    every_method_on_the_seed_urls(&rest).await;
    rest.server.stop().await;
}

#[tokio::test]
async fn any_version_segment_and_bare_names() {
    let rest = bare().await;
    rest.create("", "bare").await;
    rest.create("projects/p", "deep").await;
    for version in ["v1", "v2", "v1alpha", "v3beta2"] {
        let (status, body) = rest.get(&format!("/{version}/operations/bare")).await;
        assert_eq!(status, StatusCode::OK, "{version}: {body}");
        let (status, body) = rest.get(&format!("/{version}/projects/p/operations")).await;
        assert_eq!(status, StatusCode::OK, "{version}: {body}");
        assert_eq!(body["operations"][0]["name"], "projects/p/operations/deep");
        let (status, body) = rest.get(&format!("/{version}/operations")).await;
        assert_eq!(status, StatusCode::OK, "{version}: {body}");
        assert_eq!(body["operations"][0]["name"], "operations/bare");
    }
    // Not a version: no route.
    let (status, body) = rest.get("/api/operations/bare").await;
    assert_error(status, &body, 404, "NOT_FOUND");
    assert_eq!(body["error"]["details"][0]["reason"], "ROUTE_NOT_FOUND");
    rest.server.stop().await;
}

#[tokio::test]
async fn an_unrouted_path_says_so_and_names_the_way_out() {
    let rest = bare().await;
    let (status, body) = rest.get("/api/projects/p/operations/x").await;
    assert_error(status, &body, 404, "NOT_FOUND");
    assert_eq!(body["error"]["details"][0]["reason"], "ROUTE_NOT_FOUND");
    let message = body["error"]["message"].as_str().unwrap();
    for hint in [
        "not an operation URL",
        "OPERATION_NOT_FOUND",
        "{version}",
        "--http-rules",
    ] {
        assert!(message.contains(hint), "{hint:?} missing from {message}");
    }
    // An operation that does not exist is another error.
    let (status, body) = rest.get("/v1/projects/p/operations/nope").await;
    assert_error(status, &body, 404, "NOT_FOUND");
    assert_eq!(body["error"]["details"][0]["reason"], "OPERATION_NOT_FOUND");
    rest.server.stop().await;
}

#[tokio::test]
async fn strict_routes_serve_only_what_is_declared() {
    let mut config = Config::for_tests();
    config.rest.routes = RestRoutes::Strict;
    config.rest.http_rules = vec![service_config("beyondcorp_v1.yaml")];
    let rest = Rest::start_with(config).await;
    rest.create("projects/p/locations/l", "x").await;
    // Declared by the BeyondCorp config.
    let (status, _) = rest.get("/v1/projects/p/locations/l/operations/x").await;
    assert_eq!(status, StatusCode::OK);
    // Google's shape, but not declared: no route in strict mode.
    let (status, body) = rest
        .get("/v2beta/projects/p/locations/l/operations/x")
        .await;
    assert_error(status, &body, 404, "NOT_FOUND");
    assert_eq!(body["error"]["details"][0]["reason"], "ROUTE_NOT_FOUND");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--rest-routes strict"),
        "{body}"
    );
    rest.server.stop().await;
}

#[tokio::test]
async fn all_four_service_configs_load_together() {
    // The rest tests' server loads BeyondCorp, SCC, Cloud Run and OS Config.
    let rest = Rest::start().await;
    for parent in [
        "projects/p/locations/l",
        "folders/f/locations/l",
        "organizations/o/locations/l",
    ] {
        let name = rest.create(parent, "os").await;
        let (status, body) = rest
            .post(&format!("/v2beta/{name}:cancel"), Some("{}"))
            .await;
        assert_eq!((status, body), (StatusCode::OK, json!({})), "{parent}");
        let (_, listed) = rest.get(&format!("/v2beta/{parent}/operations")).await;
        assert_eq!(listed["operations"][0]["name"], name);
        assert_eq!(listed["operations"][0]["done"], true);
    }
    rest.server.stop().await;
}

#[tokio::test]
async fn the_file_rules_take_precedence() {
    // A config that maps the Get URL shape onto Wait with a body: the file
    // wins over the default Google shape for the same path.
    let dir = std::env::temp_dir().join(format!("opsd-precedence-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("wait.yaml");
    std::fs::write(
        &file,
        "http:\n  rules:\n  - selector: google.longrunning.Operations.WaitOperation\n    get: '/v9/{name=projects/*/operations/*}'\n",
    )
    .unwrap();
    let mut config = Config::for_tests();
    config.rest.http_rules = vec![file];
    let rest = Rest::start_with(config).await;
    rest.create("projects/p", "w").await;
    // `timeout` is a WaitOperationRequest field, not a GetOperationRequest one.
    let (status, body) = rest.get("/v9/projects/p/operations/w?timeout=0s").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["name"], "projects/p/operations/w");
    rest.server.stop().await;
    std::fs::remove_dir_all(&dir).ok();
}
