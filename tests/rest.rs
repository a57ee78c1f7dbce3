//! The HTTP/JSON surface over real HTTP, with the BeyondCorp, Security
//! Command Center and Cloud Run service configs loaded at once.

mod common;

use std::path::PathBuf;

use common::{any_string, create, op, TestServer};
use opsd::{
    api::types::base_pool,
    pb::{
        google::longrunning::{GetOperationRequest, Operation},
        opsd::v1::{CancelPolicy, CreateOperationRequest, RegisterTypesRequest},
    },
    Config,
};
use prost_reflect::DynamicMessage;
use reqwest::{Client, Method, StatusCode};
use serde_json::{json, Value};

fn service_config(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/service-configs")
        .join(name)
}

fn config() -> Config {
    let mut config = Config::for_tests();
    config.rest.http_rules = [
        "beyondcorp_v1.yaml",
        "securitycenter_v1beta1.yaml",
        "run_v2.yaml",
    ]
    .map(service_config)
    .to_vec();
    config.rest.max_body_bytes = 4096;
    config
}

struct Rest {
    server: TestServer,
    http: Client,
}

impl Rest {
    async fn start() -> Self {
        Self::start_with(config()).await
    }

    async fn start_with(config: Config) -> Self {
        Self {
            server: TestServer::start_with(config).await,
            http: Client::new(),
        }
    }

    /// Sends a request; returns the status and the JSON body, after checking
    /// the content type every response carries.
    async fn call(&self, method: Method, path: &str, body: Option<&str>) -> (StatusCode, Value) {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.server.url));
        if let Some(body) = body {
            request = request.body(body.to_owned());
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        assert_eq!(
            response.headers()["content-type"],
            "application/json; charset=utf-8",
            "{path}"
        );
        let text = response.text().await.unwrap();
        let value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}: {text}"));
        (status, value)
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path, None).await
    }

    async fn post(&self, path: &str, body: Option<&str>) -> (StatusCode, Value) {
        self.call(Method::POST, path, body).await
    }

    async fn create(&self, parent: &str, id: &str) -> String {
        let mut workers = self.server.workers().await;
        create(&mut workers, op(parent, id)).await.name
    }
}

/// Decodes a REST operation back into the proto, through the same pool.
fn decode_operation(value: &Value) -> Operation {
    let descriptor = base_pool()
        .get_message_by_name("google.longrunning.Operation")
        .unwrap();
    DynamicMessage::deserialize(descriptor, value)
        .unwrap()
        .transcode_to()
        .unwrap()
}

fn field_violation(body: &Value) -> String {
    body["error"]["details"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["@type"] == "type.googleapis.com/google.rpc.BadRequest")
        .map(|d| {
            d["fieldViolations"][0]["field"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .unwrap_or_default()
}

fn assert_error(status: StatusCode, body: &Value, http: u16, code_name: &str) {
    assert_eq!(status.as_u16(), http, "{body}");
    assert_eq!(body["error"]["code"], http, "{body}");
    assert_eq!(body["error"]["status"], code_name, "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
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
    assert_eq!(body["error"]["details"][0]["reason"], "OPERATION_CANCELLED");
    rest.server.stop().await;
}

#[tokio::test]
async fn grpc_and_rest_views_of_an_operation_are_equal() {
    let rest = Rest::start().await;
    let mut workers = rest.server.workers().await;
    let request = CreateOperationRequest {
        metadata: Some(any_string("halfway")),
        ..op("projects/p/locations/l", "same")
    };
    let name = create(&mut workers, request).await.name;
    let mut ops = rest.server.operations().await;
    for step in 0..2 {
        let grpc = ops
            .get_operation(GetOperationRequest { name: name.clone() })
            .await
            .unwrap()
            .into_inner();
        for path in [
            "/v1/projects/p/locations/l/operations/same",
            "/v2/projects/p/locations/l/operations/same",
            "/v1/projects/p/locations/l/operations/same?alt=json;enum-encoding=int&prettyPrint=false",
        ] {
            let (status, body) = rest.get(path).await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(decode_operation(&body), grpc, "{path} at step {step}");
        }
        assert_eq!(
            rest.get("/v1/projects/p/locations/l/operations/same")
                .await
                .1["metadata"],
            json!({"@type": "type.googleapis.com/google.protobuf.StringValue", "value": "halfway"})
        );
        rest.post(
            "/v1/projects/p/locations/l/operations/same:cancel",
            Some("{}"),
        )
        .await;
    }
    rest.server.stop().await;
}

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

#[tokio::test]
async fn worker_types_render_once_registered_and_fall_back_before() {
    let rest = Rest::start().await;
    // acme.Progress { int32 percent = 1; }
    let descriptor_set = prost_types::FileDescriptorSet {
        file: vec![prost_types::FileDescriptorProto {
            name: Some("acme/progress.proto".into()),
            package: Some("acme".into()),
            message_type: vec![prost_types::DescriptorProto {
                name: Some("Progress".into()),
                field: vec![prost_types::FieldDescriptorProto {
                    name: Some("percent".into()),
                    json_name: Some("percent".into()),
                    number: Some(1),
                    r#type: Some(5),
                    label: Some(1),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            syntax: Some("proto3".into()),
            ..Default::default()
        }],
    };
    let metadata = prost_types::Any {
        type_url: "type.googleapis.com/acme.Progress".into(),
        value: vec![0x08, 42],
    };
    let mut workers = rest.server.workers().await;
    let request = CreateOperationRequest {
        metadata: Some(metadata.clone()),
        ..op("", "typed")
    };
    create(&mut workers, request).await;

    let (status, body) = rest.get("/v1/operations/typed").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body["metadata"],
        json!({"@type": "type.googleapis.com/acme.Progress", "value": "CCo="})
    );

    let registered = workers
        .register_types(RegisterTypesRequest {
            descriptor_set: Some(descriptor_set),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(registered.message_types, ["acme.Progress"]);
    let (_, body) = rest.get("/v1/operations/typed").await;
    assert_eq!(
        body["metadata"],
        json!({"@type": "type.googleapis.com/acme.Progress", "percent": 42})
    );
    // gRPC returns the bytes unchanged either way.
    let mut ops = rest.server.operations().await;
    let got = ops
        .get_operation(GetOperationRequest {
            name: "operations/typed".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.metadata, Some(metadata));
    rest.server.stop().await;
}

#[tokio::test]
async fn descriptor_set_files_are_loaded_at_start_up() {
    // google.protobuf.Duration's file under another package name would clash;
    // a fresh message type is enough: acme.Size { int64 bytes = 1; }.
    let set = prost_types::FileDescriptorSet {
        file: vec![prost_types::FileDescriptorProto {
            name: Some("acme/size.proto".into()),
            package: Some("acme".into()),
            message_type: vec![prost_types::DescriptorProto {
                name: Some("Size".into()),
                field: vec![prost_types::FieldDescriptorProto {
                    name: Some("bytes".into()),
                    json_name: Some("bytes".into()),
                    number: Some(1),
                    r#type: Some(3),
                    label: Some(1),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            syntax: Some("proto3".into()),
            ..Default::default()
        }],
    };
    let path = std::env::temp_dir().join(format!("opsd-fds-{}.bin", std::process::id()));
    std::fs::write(&path, prost::Message::encode_to_vec(&set)).unwrap();
    let mut config = config();
    config.descriptor_sets = vec![path.clone()];
    let rest = Rest::start_with(config).await;
    let mut workers = rest.server.workers().await;
    let metadata = prost_types::Any {
        type_url: "type.googleapis.com/acme.Size".into(),
        value: vec![0x08, 0x80, 0x08],
    };
    create(
        &mut workers,
        CreateOperationRequest {
            metadata: Some(metadata),
            ..op("", "sized")
        },
    )
    .await;
    let (_, body) = rest.get("/v1/operations/sized").await;
    // int64 renders as a string in ProtoJSON.
    assert_eq!(
        body["metadata"],
        json!({"@type": "type.googleapis.com/acme.Size", "bytes": "1024"})
    );
    rest.server.stop().await;
    let _ = std::fs::remove_file(&path);

    // A file that is not a descriptor set stops start-up, naming the file.
    let junk = std::env::temp_dir().join(format!("opsd-fds-junk-{}.bin", std::process::id()));
    std::fs::write(&junk, b"\xff\xff\xff").unwrap();
    let mut config = Config::for_tests();
    config.descriptor_sets = vec![junk.clone()];
    let err = opsd::server::Server::new(config).err().unwrap().to_string();
    assert!(err.contains("opsd-fds-junk"), "{err}");
    let _ = std::fs::remove_file(&junk);
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
        "http:\n  rules:\n  - selector: google.longrunning.Operations.CancelOperation\n    post: '/v1/{name=operations/**}/x:cancel'\n",
    )
    .unwrap();
    let mut config = Config::for_tests();
    config.rest.http_rules = vec![file];
    let err = opsd::server::Server::new(config)
        .err()
        .expect("start-up fails")
        .to_string();
    assert!(
        err.contains("broken.yaml") && err.contains("CancelOperation"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
