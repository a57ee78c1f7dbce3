//! The server: one port for gRPC, REST, health and reflection; limits; drain.
//!
//! - `mod.rs` (this file): builds the services from a [`Config`], the accept
//!   loop, routing by request, drain.
//! - [`observe`]: the one wrapper of the Operations and Workers services:
//!   timing, metrics, spans and polling reports, for gRPC and REST alike.
//! - `metrics`: `/metrics` (Prometheus), the store's commit observer and
//!   the transition counter.
//! - [`trace`]: OpenTelemetry traces of the calls over OTLP (started by the
//!   binary, which owns the global subscriber), and the W3C trace context.
//!
//! Connections are accepted here and served by hyper (HTTP/1.1 and HTTP/2,
//! detected per connection). Each request goes to gRPC when its content type
//! is `application/grpc*`; `GET /healthz` and `GET /metrics` are answered
//! here; everything else goes to the REST transcoder. A semaphore caps open
//! connections; each permit moves into its connection's task, and a client
//! beyond the cap is closed at once.
//!
//! Health (`grpc.health.v1` for "" and both services, and `/healthz`)
//! follows the store's where the store has one (PostgreSQL: NOT_SERVING
//! while the database is unreachable, SERVING again when it answers), in one
//! place, `follow_store_health`.
//!
//! [`Server::serve`] takes an already bound listener (tests bind port 0) and
//! a shutdown future. When the future resolves, the listener closes, health
//! turns NOT_SERVING, the registry starts draining (open Waits return their
//! latest state at once, worker streams end), and connections finish their
//! in-flight calls. Connections still open after the drain timeout (long-lived
//! health watches, for example) are closed.

use std::{
    convert::Infallible, future::Future, path::PathBuf, pin::Pin, sync::Arc, time::Duration,
};

use futures_util::future::Either;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
};
use tokio::{
    net::TcpListener,
    sync::{watch, Semaphore},
};
use tokio_util::sync::CancellationToken;
use tonic::{body::Body, service::Routes};
use tonic_health::{server::HealthReporter, ServingStatus};
use tower::ServiceExt;

use bytes::Bytes;
use http_body_util::Full;
use metrics_exporter_prometheus::PrometheusHandle;

use self::observe::Observed;
use crate::{
    api::{
        console::ConsoleService, operations::OperationsService, rest::RestService,
        types::TypeRegistry, workers::WorkersService,
    },
    clock::Clock,
    config::{Config, ConfigError, StoreConfig},
    pb::{
        google::longrunning::operations_server::OperationsServer,
        opsd::v1::{console_server::ConsoleServer, workers_server::WorkersServer},
        FILE_DESCRIPTOR_SET,
    },
    registry::{
        scenario::{self, LoadedScenario, ScenarioError},
        Registry,
    },
    store::{MemoryStore, PostgresStore, RedbStore, Store},
};

mod metrics;
pub mod observe;
pub mod trace;
mod ui;

/// The Operations service as the server mounts it (gRPC and REST).
type Operations = Observed<OperationsService>;
/// The Workers service as the server mounts it (gRPC and REST).
type Workers = Observed<WorkersService>;
/// The Console service as the server mounts it (gRPC and REST).
type Console = Observed<ConsoleService>;

/// The longest pause between failed accepts (EMFILE and the like).
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// Why the server could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("cannot load HTTP rules: {0}")]
    HttpRules(#[from] crate::api::rest::RuleError),
    #[error("cannot load the descriptor set {path}: {reason}")]
    DescriptorSet { path: PathBuf, reason: String },
    #[error("cannot open the store: {0}")]
    Store(String),
    #[error("{0}")]
    Scenario(#[from] ScenarioError),
}

/// A configured server and its registry.
pub struct Server {
    config: Config,
    registry: Registry,
    /// The same services as the gRPC routes, observed once.
    rest: RestService<Operations, Workers, Console>,
    operations: Operations,
    workers: Workers,
    console: Console,
    scenarios: Vec<LoadedScenario>,
    /// The Prometheus recorder's handle, when `/metrics` is served.
    metrics: Option<PrometheusHandle>,
    /// The store's health, for stores that can lose their backend.
    store_health: Option<watch::Receiver<bool>>,
}

impl Server {
    /// Checks the configuration, opens (or connects to) the store, starts
    /// the registry (needs a Tokio runtime), loads descriptor sets, HTTP
    /// rules and scenarios.
    pub async fn new(config: Config) -> Result<Self, ServerError> {
        config.validate()?;
        let metrics = config.metrics.then(metrics::install).flatten();
        let clock = config.registry.clock.clone();
        let mut settings = config.registry.clone();
        let store: Arc<dyn Store> = match &config.store {
            StoreConfig::Memory => Arc::new(MemoryStore::with_clock(clock)),
            StoreConfig::Redb(path) => {
                let store = RedbStore::open_with(path, Arc::new(metrics::StoreCommits), clock)
                    .map_err(|e| ServerError::Store(e.to_string()))?;
                tracing::info!(path = %path.display(), "durable store opened");
                Arc::new(store)
            }
            StoreConfig::Postgres(target) => {
                let store = PostgresStore::connect(target, config.postgres.clone(), clock)
                    .await
                    .map_err(|e| ServerError::Store(format!("{target}: {e}")))?;
                tracing::info!(database = %target, "PostgreSQL store connected");
                // Every replica reads the database's time (unless a test
                // runs the registry on its own clock).
                if matches!(settings.clock, Clock::System) {
                    settings.clock = store.clock();
                }
                Arc::new(store)
            }
        };
        let store_health = store.health();
        let registry = Registry::new(store.clone(), settings);
        if config.metrics {
            metrics::count_transitions(store.subscribe(), registry.shutdown_token());
        }
        let types = TypeRegistry::new();
        for path in &config.descriptor_sets {
            let fail = |reason: String| ServerError::DescriptorSet {
                path: path.clone(),
                reason,
            };
            let bytes = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
            let added = types
                .register_encoded(&bytes)
                .map_err(|e| fail(e.to_string()))?;
            tracing::info!(path = %path.display(), types = added.len(), "descriptor set loaded");
        }
        let operations = Observed::new(
            OperationsService::new(registry.clone(), config.operations.clone()),
            registry.clone(),
        );
        let workers = Observed::new(
            WorkersService::new(registry.clone(), types.clone()),
            registry.clone(),
        );
        let console = Observed::new(ConsoleService::new(registry.clone()), registry.clone());
        let rest = RestService::new(
            operations.clone(),
            workers.clone(),
            console.clone(),
            types.clone(),
            config.rest.clone(),
        )?;
        let scenarios = config
            .scenarios
            .iter()
            .map(|path| scenario::load(path, &types.pool()))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            config,
            registry,
            rest,
            operations,
            workers,
            console,
            scenarios,
            metrics,
            store_health,
        })
    }

    /// A handle to the registry, to embed opsd or to inspect it in tests.
    pub fn registry(&self) -> Registry {
        self.registry.clone()
    }

    /// Serves on `listener` until `shutdown` resolves, then drains.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let Self {
            config,
            registry,
            rest,
            operations,
            workers,
            console,
            scenarios,
            metrics,
            store_health,
        } = self;
        let limits = &config.limits;
        for scenario in &scenarios {
            scenario.apply(&registry).await?;
        }

        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<OperationsServer<Operations>>().await;
        health.set_serving::<WorkersServer<Workers>>().await;
        health.set_serving::<ConsoleServer<Console>>().await;
        if let Some(store_health) = &store_health {
            follow_store_health(health.clone(), store_health.clone(), &registry);
        }
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(
                    tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
                )
        };
        let grpc = Routes::builder()
            .add_service(health_service)
            .add_service(reflection().build_v1()?)
            .add_service(reflection().build_v1alpha()?)
            .add_service(
                OperationsServer::new(operations)
                    .max_decoding_message_size(limits.max_message_size)
                    .max_encoding_message_size(limits.max_message_size),
            )
            .add_service(
                WorkersServer::new(workers)
                    .max_decoding_message_size(limits.max_message_size)
                    .max_encoding_message_size(limits.max_message_size),
            )
            .add_service(
                ConsoleServer::new(console)
                    .max_decoding_message_size(limits.max_message_size)
                    .max_encoding_message_size(limits.max_message_size),
            )
            .clone()
            .routes();
        let app = App {
            grpc,
            rest,
            registry: registry.clone(),
            metrics,
            ui: config.ui,
            store_health,
        };

        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_buf_size(64 * 1024);
        builder
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(limits.keepalive_interval)
            .keep_alive_timeout(limits.keepalive_timeout)
            .max_concurrent_streams(limits.max_concurrent_streams)
            .max_header_list_size(64 * 1024);

        if let Ok(address) = listener.local_addr() {
            tracing::info!(%address, "opsd listening");
        }
        let graceful = GracefulShutdown::new();
        // Closes the connections left after the drain timeout.
        let force_close = CancellationToken::new();
        let connections = Arc::new(Semaphore::new(limits.max_connections));
        let mut backoff = Duration::from_millis(5);
        tokio::pin!(shutdown);
        loop {
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(err) => {
                        // One client's failure stays with it; back off on
                        // resource exhaustion instead of spinning.
                        tracing::error!(cause = %err, ?backoff, "accept failed");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
                        continue;
                    }
                },
                () = &mut shutdown => break,
            };
            // Over the cap a client is turned away at once (its connection
            // closes), never left waiting in the listen queue.
            let Ok(permit) = connections.clone().try_acquire_owned() else {
                tracing::warn!(
                    limit = limits.max_connections,
                    "connection limit reached; closing a new connection"
                );
                drop(stream);
                continue;
            };
            backoff = Duration::from_millis(5);
            if let Err(err) = stream.set_nodelay(true) {
                tracing::debug!(cause = %err, "cannot set TCP_NODELAY");
            }
            let app = app.clone();
            let service = hyper::service::service_fn(move |request| app.clone().call(request));
            let connection = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .into_owned();
            let connection = graceful.watch(connection);
            let force_close = force_close.clone();
            tokio::spawn(async move {
                tokio::select! {
                    result = connection => {
                        if let Err(err) = result {
                            tracing::debug!(cause = %err, "connection ended with an error");
                        }
                    }
                    () = force_close.cancelled() => {}
                }
                drop(permit);
            });
        }

        drop(listener);
        tracing::info!("shutting down: draining in-flight calls");
        for service in ["", OPERATIONS_SERVICE, WORKERS_SERVICE, CONSOLE_SERVICE] {
            health
                .set_service_status(service, ServingStatus::NotServing)
                .await;
        }
        registry.shutdown();
        let drain_timeout = limits.drain_timeout;
        tokio::select! {
            () = graceful.shutdown() => {}
            () = tokio::time::sleep(drain_timeout) => {
                tracing::warn!(?drain_timeout, "drain timeout: closing the remaining connections");
                force_close.cancel();
            }
        }
        tracing::info!("opsd stopped");
        Ok(())
    }
}

const OPERATIONS_SERVICE: &str = "google.longrunning.Operations";
const WORKERS_SERVICE: &str = "opsd.v1.Workers";
const CONSOLE_SERVICE: &str = "opsd.v1.Console";

/// Turns the gRPC health of "" and both services NOT_SERVING while the
/// store is unhealthy and SERVING when it recovers, until the drain starts
/// (which sets NOT_SERVING for good).
fn follow_store_health(
    health: HealthReporter,
    mut healthy: watch::Receiver<bool>,
    registry: &Registry,
) {
    let stop = registry.shutdown_token();
    tokio::spawn(async move {
        loop {
            let serving = *healthy.borrow_and_update();
            if stop.is_cancelled() {
                return;
            }
            let status = if serving {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            for service in ["", OPERATIONS_SERVICE, WORKERS_SERVICE, CONSOLE_SERVICE] {
                health.set_service_status(service, status).await;
            }
            tokio::select! {
                () = stop.cancelled() => return,
                changed = healthy.changed() => if changed.is_err() { return },
            }
        }
    });
}

/// Routes each request to gRPC, the server's own endpoints or REST.
/// Cloning it is shallow.
#[derive(Clone)]
struct App {
    grpc: Routes,
    rest: RestService<Operations, Workers, Console>,
    /// For `/healthz` and the gauges of `/metrics`.
    registry: Registry,
    metrics: Option<PrometheusHandle>,
    /// Whether `/ui/` serves the operator page.
    ui: bool,
    /// For `/healthz`: the store's health, where it has one.
    store_health: Option<watch::Receiver<bool>>,
}

/// The future of one request. A gRPC call holds only the router's future;
/// the larger REST one is boxed, so the many parked gRPC Waits do not carry
/// its size.
type Routed = Either<
    tower::util::Oneshot<Routes, Request<Incoming>>,
    Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>,
>;

impl App {
    fn call(self, request: Request<Incoming>) -> Routed {
        let grpc = request
            .headers()
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        if grpc {
            return Either::Left(self.grpc.oneshot(request));
        }
        Either::Right(Box::pin(async move {
            let get = request.method() == http::Method::GET;
            Ok(match request.uri().path() {
                "/healthz" if get => self.health(request.uri().query()).map(Body::new),
                "/metrics" if get && self.metrics.is_some() => self.metrics().await.map(Body::new),
                path if self.ui && ui::is_ui_path(path) => {
                    ui::answer(request.method(), path, request.headers()).map(Body::new)
                }
                _ => self.rest.handle(request).await,
            })
        }))
    }

    /// `{"status": "SERVING"}`, or 503 `NOT_SERVING` while draining or
    /// while the store is unhealthy.
    fn health(&self, query: Option<&str>) -> Response<Full<Bytes>> {
        let store_down = self.store_health.as_ref().is_some_and(|h| !*h.borrow());
        let (status, text) = if self.registry.is_shutting_down() || store_down {
            (http::StatusCode::SERVICE_UNAVAILABLE, "NOT_SERVING")
        } else {
            (http::StatusCode::OK, "SERVING")
        };
        self.rest
            .json_answer(query, status, &serde_json::json!({ "status": text }))
    }

    /// The Prometheus text, with the gauges read now.
    async fn metrics(&self) -> Response<Full<Bytes>> {
        let text = match &self.metrics {
            Some(handle) => metrics::render(handle, &self.registry).await,
            None => String::new(),
        };
        let mut response = Response::new(Full::new(Bytes::from(text)));
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        response
    }
}

/// Builds a server from `config` and serves on `listener` until `shutdown`.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    Server::new(config).await?.serve(listener, shutdown).await
}
