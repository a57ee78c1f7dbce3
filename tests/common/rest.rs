//! The REST surface's test client: a server with the BeyondCorp, Security
//! Command Center, Cloud Run and OS Config service configs loaded, and JSON
//! helpers.

use std::path::PathBuf;

use opsd::{api::types::base_pool, pb::google::longrunning::Operation, Config};
use prost_reflect::DynamicMessage;
use reqwest::{Client, Method, StatusCode};
use serde_json::Value;

use super::{create, op, TestServer};

pub fn service_config(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/service-configs")
        .join(name)
}

pub fn config() -> Config {
    let mut config = Config::for_tests();
    config.rest.http_rules = [
        "beyondcorp_v1.yaml",
        "securitycenter_v1beta1.yaml",
        "run_v2.yaml",
        "osconfig_v2beta.yaml",
    ]
    .map(service_config)
    .to_vec();
    config.rest.max_body_bytes = 4096;
    config
}

pub struct Rest {
    pub server: TestServer,
    pub http: Client,
}

impl Rest {
    pub async fn start() -> Self {
        Self::start_with(config()).await
    }

    pub async fn start_with(config: Config) -> Self {
        Self {
            server: TestServer::start_with(config).await,
            http: Client::new(),
        }
    }

    /// Sends a request; returns the status and the JSON body, after checking
    /// the content type every response carries.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&str>,
    ) -> (StatusCode, Value) {
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

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Option<&str>) -> (StatusCode, Value) {
        self.call(Method::POST, path, body).await
    }

    pub async fn create(&self, parent: &str, id: &str) -> String {
        let mut workers = self.server.workers().await;
        create(&mut workers, op(parent, id)).await.name
    }
}

/// Decodes a REST operation back into the proto, through the same pool.
pub fn decode_operation(value: &Value) -> Operation {
    let descriptor = base_pool()
        .get_message_by_name("google.longrunning.Operation")
        .unwrap();
    DynamicMessage::deserialize(descriptor, value)
        .unwrap()
        .transcode_to()
        .unwrap()
}

pub fn field_violation(body: &Value) -> String {
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

pub fn assert_error(status: StatusCode, body: &Value, http: u16, code_name: &str) {
    assert_eq!(status.as_u16(), http, "{body}");
    assert_eq!(body["error"]["code"], http, "{body}");
    assert_eq!(body["error"]["status"], code_name, "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
}
