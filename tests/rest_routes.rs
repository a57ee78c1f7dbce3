//! REST routes: the defaults from operations.proto, the rules of Google
//! service configs (BeyondCorp, Security Command Center, Cloud Run), HTTP/2,
//! and rules that stop start-up.

mod common;

use common::rest::{assert_error, Rest};
use opsd::Config;
use reqwest::{Client, Method, StatusCode};
use serde_json::{json, Value};

#[tokio::test]
async fn default_routes_from_operations_proto() {
    let rest = Rest::start().await;
    rest.create("", "a").await;
    rest.create("", "b").await;
    let (status, body) = rest.get("/v1/operations").await;
    assert_eq!(status, StatusCode::OK);
    let names: Vec<&str> = body["operations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["operations/a", "operations/b"]);
    assert!(body.get("unreachable").is_none());
    assert!(body.get("nextPageToken").is_none());

    let (status, body) = rest.get("/v1/operations?pageSize=1").await;
    assert_eq!(status, StatusCode::OK);
    let token = body["nextPageToken"].as_str().unwrap().to_owned();
    let (_, body) = rest
        .get(&format!("/v1/operations?page_size=1&page_token={token}"))
        .await;
    assert_eq!(body["operations"][0]["name"], "operations/b");

    assert_eq!(rest.get("/v1/operations/a").await.1["name"], "operations/a");
    assert_eq!(
        rest.post("/v1/operations/a:cancel", Some("")).await,
        (StatusCode::OK, json!({}))
    );
    assert_eq!(
        rest.call(Method::DELETE, "/v1/operations/a", None).await,
        (StatusCode::OK, json!({}))
    );
    let (status, body) = rest.get("/v1/operations/a").await;
    assert_error(status, &body, 404, "NOT_FOUND");
    assert_eq!(body["error"]["details"][0]["reason"], "OPERATION_NOT_FOUND");
    assert_eq!(
        body["error"]["details"][1]["@type"],
        "type.googleapis.com/google.rpc.ResourceInfo"
    );
    rest.server.stop().await;
}

#[tokio::test]
async fn beyondcorp_cancel_returns_empty_json_and_get_shows_cancelled() {
    let rest = Rest::start().await;
    let name = rest.create("projects/p/locations/l", "ID").await;
    let (status, body) = rest
        .post("/v1/projects/p/locations/l/operations/ID:cancel", None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({}));

    let (status, body) = rest.get("/v1/projects/p/locations/l/operations/ID").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["name"], name);
    assert_eq!(body["done"], true);
    assert_eq!(body["error"]["code"], 1);
    assert_eq!(body["error"]["message"], "Operation was cancelled.");
    assert!(body["error"].get("details").is_none(), "{body}");
    rest.server.stop().await;
}

#[tokio::test]
async fn security_command_center_and_cloud_run_rules() {
    let rest = Rest::start().await;
    rest.create("organizations/o", "scc").await;
    let (status, body) = rest.get("/v1beta1/organizations/o/operations").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body["operations"][0]["name"],
        "organizations/o/operations/scc"
    );
    assert_eq!(
        rest.get("/v1beta1/organizations/o/operations/scc").await.0,
        StatusCode::OK
    );

    rest.create("projects/p/locations/l", "run").await;
    let (status, body) = rest
        .post(
            "/v2/projects/p/locations/l/operations/run:wait",
            Some(r#"{"timeout": "0.1s"}"#),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        body.get("done").is_none(),
        "still running after the wait: {body}"
    );
    let (_, listed) = rest.get("/v2/projects/p/locations/l/operations").await;
    assert_eq!(
        listed["operations"][0]["name"],
        "projects/p/locations/l/operations/run"
    );

    // Cancelled through the BeyondCorp route, the Cloud Run wait sees it done.
    rest.post("/v1/projects/p/locations/l/operations/run:cancel", None)
        .await;
    let (_, body) = rest
        .post(
            "/v2/projects/p/locations/l/operations/run:wait",
            Some(r#"{"name": "projects/p/locations/l/operations/run"}"#),
        )
        .await;
    assert_eq!(body["done"], true);
    assert_eq!(
        rest.call(
            Method::DELETE,
            "/v1beta1/organizations/o/operations/scc",
            None
        )
        .await
        .0,
        StatusCode::OK
    );
    rest.server.stop().await;
}

#[tokio::test]
async fn rest_over_http2_and_health() {
    let rest = Rest::start().await;
    let h2 = Client::builder().http2_prior_knowledge().build().unwrap();
    let response = h2
        .get(format!("{}/healthz", rest.server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!({"status": "SERVING"})
    );
    let response = h2
        .get(format!("{}/v1/operations/none", rest.server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    rest.server.stop().await;
}

#[tokio::test]
async fn an_unparsable_rule_stops_start_up_naming_file_and_rule() {
    let dir = std::env::temp_dir().join(format!("opsd-rest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("broken.yaml");
    std::fs::write(
        &file,
        "http:\n  rules:\n  - selector: google.longrunning.Operations.CancelOperation\n    post: '/v1/{name=**/operations/**}:cancel'\n",
    )
    .unwrap();
    let mut config = Config::for_tests();
    config.rest.http_rules = vec![file];
    let err = opsd::server::Server::new(config)
        .await
        .err()
        .expect("start-up fails")
        .to_string();
    assert!(
        err.contains("broken.yaml") && err.contains("CancelOperation"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
