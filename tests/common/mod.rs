//! A real opsd server on port 0 and clients for it.
#![allow(dead_code)] // each test binary uses part of this

pub mod auth;
pub mod binary;
pub mod calls;
pub mod crash;
pub mod outside;
pub mod postgres;
pub mod rest;
pub mod scripted;
pub mod wire;

use std::time::Duration;

use opsd::{
    pb::{
        google::longrunning::{operations_client::OperationsClient, Operation},
        opsd::v1::{workers_client::WorkersClient, CreateOperationRequest},
    },
    registry::{ManualClock, Registry},
    server::{Server, ServerError},
    Config,
};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::transport::Channel;

pub struct TestServer {
    pub url: String,
    pub registry: Registry,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServerError>>>,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(Config::for_tests()).await
    }

    pub async fn start_with(config: Config) -> Self {
        Self::serve(Server::new(config).await.unwrap()).await
    }

    /// Serves an already built server on a free port.
    pub async fn serve(server: Server) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let registry = server.registry();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(listener, async {
            stopped.await.ok();
        }));
        Self {
            url,
            registry,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub async fn channel(&self) -> Channel {
        // The listener is already accepting: no sleep needed.
        Channel::from_shared(self.url.clone())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub async fn operations(&self) -> OperationsClient<Channel> {
        OperationsClient::new(self.channel().await)
    }

    pub async fn workers(&self) -> WorkersClient<Channel> {
        WorkersClient::new(self.channel().await)
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics_text(&self) -> String {
        reqwest::get(format!("{}/metrics", self.url))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Creates a running operation `operations/{id}` in the registry itself:
    /// no client connection of its own (for tests that count connections).
    pub async fn registry_op(&self, id: &str) -> String {
        self.registry
            .create(opsd::registry::CreateParams {
                operation_id: id.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .name
    }

    /// The server's address, `127.0.0.1:PORT`.
    pub fn address(&self) -> String {
        self.url.trim_start_matches("http://").to_owned()
    }

    /// Starts the drain (what SIGTERM does to the binary), without waiting.
    pub fn begin_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            stop.send(()).ok();
        }
    }

    /// Starts the drain and waits for a clean stop.
    pub async fn stop(mut self) {
        self.begin_stop();
        let task = self.task.take().unwrap();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the server drains in time")
            .unwrap()
            .unwrap();
    }
}

/// Creates an operation through the worker API.
pub async fn create(
    workers: &mut WorkersClient<Channel>,
    request: CreateOperationRequest,
) -> Operation {
    workers
        .create_operation(request)
        .await
        .unwrap()
        .into_inner()
}

/// Completes an operation through the worker API with a string response.
pub async fn complete(workers: &mut WorkersClient<Channel>, name: &str, response: &str) {
    use opsd::pb::opsd::v1::{complete_operation_request, CompleteOperationRequest};
    workers
        .complete_operation(CompleteOperationRequest {
            name: name.to_owned(),
            result: Some(complete_operation_request::Result::Response(any_string(
                response,
            ))),
            metadata: None,
        })
        .await
        .unwrap();
}

/// A request for a running operation `{parent}/operations/{id}`.
pub fn op(parent: &str, id: &str) -> CreateOperationRequest {
    CreateOperationRequest {
        parent: parent.to_owned(),
        operation_id: id.to_owned(),
        ..Default::default()
    }
}

/// An `Any` holding a string (google.protobuf.StringValue).
pub fn any_string(value: &str) -> prost_types::Any {
    prost_types::Any::from_msg(&value.to_owned()).unwrap()
}

/// An error status with the given code.
pub fn status(code: i32, message: &str) -> opsd::pb::google::rpc::Status {
    opsd::pb::google::rpc::Status {
        code,
        message: message.to_owned(),
        details: vec![],
    }
}

/// The ErrorInfo reason of a failed call.
pub fn reason(status: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    status
        .get_error_details()
        .error_info()
        .map(|i| i.reason.clone())
        .unwrap_or_default()
}

/// The test configuration on the PostgreSQL database at `url`.
pub fn postgres_config(url: &str) -> Config {
    let mut config = Config::for_tests();
    config.store = url.parse().unwrap();
    config
}

/// Puts `config` on a clock that moves only when the test advances it.
pub fn manual_clock(config: &mut Config) -> ManualClock {
    let clock = ManualClock::new();
    config.registry.clock = clock.clone().into();
    clock
}

/// Polls `check` until it holds: for the effect of something that already
/// happened (a call, the clock advanced past a deadline) that the server
/// applies in the background. Never a wait for time to pass: it gives up
/// after 10 s of real time.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let give_up = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < give_up,
            "never happened: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
