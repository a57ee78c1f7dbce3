//! The server: one port for gRPC, REST, health and reflection; limits; drain.
//!
//! - `mod.rs` (this file): builds the services from a [`Config`], the accept
//!   loop, the drain.
//! - `conn`: one connection's life (its deadlines, making room at the cap,
//!   graceful and lingering close), over the watched IO of `io` and the byte
//!   scanners of `frames`; `connections`: what the server knows of each open
//!   connection, and the cap.
//! - `calls`: the layers each request passes through (its connection counts
//!   it; authentication, `auth`; load shedding, `shed`; calls refused
//!   before their handler are counted); `app`: what a request is and where it goes; `guard`: the
//!   checks on gRPC request bodies (size, framing, time).
//! - [`observe`]: the one wrapper of the Operations, Workers and Console
//!   services: timing, metrics, spans and polling reports, and with auth on
//!   the per-method, per-name permission check, for gRPC and REST alike.
//! - [`auth`]: JWT bearer tokens and client certificates, the token cache,
//!   the policy file; `tls`: TLS and mTLS on the listener, reloaded on
//!   SIGHUP.
//! - `metrics`: `/metrics` (Prometheus), the store's commit observer and
//!   the transition counter.
//! - [`trace`]: OpenTelemetry traces of the calls over OTLP (started by the
//!   binary, which owns the global subscriber), and the W3C trace context.
//!
//! Connections are accepted here and served by hyper (HTTP/1.1 and HTTP/2,
//! detected per connection), over TLS when `--tls-cert` is given. Each
//! request goes to gRPC when its content type is `application/grpc*`;
//! `GET /healthz` and `GET /metrics` are answered here (`/metrics` on its
//! own listener with `--metrics-listen`); everything else goes to the REST
//! transcoder.
//!
//! Health (`grpc.health.v1` for "" and both services, and `/healthz`)
//! follows the store's where the store has one (PostgreSQL: NOT_SERVING
//! while the database is unreachable, SERVING again when it answers), in one
//! place, `follow_store_health`.
//!
//! [`Server::serve`] takes an already bound listener (tests bind port 0) and
//! a shutdown future. When the future resolves, the listener closes, health
//! turns NOT_SERVING, the registry starts draining (open Waits return their
//! latest state at once, worker streams end), and every connection shuts
//! down gracefully: each accepted call is answered, then the connection
//! closes with a lingering close. Calls still unanswered after the drain
//! timeout (long-lived health watches, for example) are cut, counted and
//! logged.

use std::{future::Future, path::PathBuf, sync::Arc, time::Duration};

use hyper_util::{
    rt::{TokioExecutor, TokioTimer},
    server::conn::auto,
};
use tokio::{net::TcpListener, sync::watch};
use tokio_util::task::TaskTracker;
use tonic::service::Routes;
use tonic_health::{server::HealthReporter, ServingStatus};

use metrics_exporter_prometheus::PrometheusHandle;

use self::observe::Observed;
use crate::{
    api::{
        console::ConsoleService,
        grpc::{
            console_server::ConsoleServer, operations_server::OperationsServer,
            workers_server::WorkersServer,
        },
        operations::OperationsService,
        rest::RestService,
        types::TypeRegistry,
        workers::WorkersService,
    },
    clock::Clock,
    config::{Config, ConfigError, StoreConfig},
    pb::FILE_DESCRIPTOR_SET,
    registry::{
        scenario::{self, LoadedScenario, ScenarioError},
        Registry,
    },
    store::{MemoryStore, PostgresStore, RedbStore, Store},
};

mod app;
pub mod auth;
mod calls;
mod conn;
mod connections;
pub(crate) mod frames;
pub(crate) mod guard;
mod io;
mod metrics;
pub mod observe;
mod shed;
mod tls;
pub mod trace;
mod ui;

use self::{
    app::App,
    conn::{ConnSettings, Signals},
    connections::Connections,
    guard::GuardSettings,
    shed::Shed,
};

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
    #[error("auth: {0}")]
    Auth(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("cannot listen for /metrics on {address}: {cause}")]
    MetricsListen {
        address: std::net::SocketAddr,
        cause: std::io::Error,
    },
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
    /// Authentication, when auth is on.
    auth: Option<Arc<auth::Auth>>,
    /// TLS on the listener.
    tls: Option<tls::Tls>,
    /// `/metrics`'s own listener (`--metrics-listen`).
    metrics_listener: Option<TcpListener>,
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
        let auth = match &config.auth {
            Some(settings) => Some(Arc::new(
                auth::Auth::new(settings, registry.shutdown_token())
                    .await
                    .map_err(ServerError::Auth)?,
            )),
            None => None,
        };
        let tls = config
            .tls
            .as_ref()
            .map(|settings| tls::Tls::load(settings, auth.is_none()))
            .transpose()
            .map_err(ServerError::Tls)?;
        let metrics_listener = match config.metrics_listen {
            Some(address) => {
                Some(bind(address).map_err(|cause| ServerError::MetricsListen { address, cause })?)
            }
            None => None,
        };
        // With auth on, every call is decided before its handler runs.
        let authorized = auth.is_some();
        let operations = Observed::new(
            OperationsService::new(registry.clone(), config.operations.clone()),
            registry.clone(),
        )
        .authorized(authorized);
        let workers = Observed::new(
            WorkersService::new(registry.clone(), types.clone()),
            registry.clone(),
        )
        .authorized(authorized);
        let console = Observed::new(ConsoleService::new(registry.clone()), registry.clone())
            .authorized(authorized);
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
            auth,
            tls,
            metrics_listener,
        })
    }

    /// Where `/metrics` listens on its own (`--metrics-listen`).
    pub fn metrics_address(&self) -> Option<std::net::SocketAddr> {
        self.metrics_listener.as_ref()?.local_addr().ok()
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
            auth,
            tls,
            metrics_listener,
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
        let connections = Connections::new(limits.max_connections);
        if let (Some(listener), Some(handle)) = (metrics_listener, metrics.clone()) {
            serve_metrics(listener, handle, registry.clone(), connections.clone());
        }
        if let Some(tls) = &tls {
            reload_on_sighup(tls.clone(), registry.shutdown_token());
        }
        let app = App {
            grpc,
            rest,
            registry: registry.clone(),
            // On the main port unless it has a listener of its own.
            metrics: metrics.filter(|_| config.metrics_listen.is_none()),
            connections: connections.clone(),
            guard: GuardSettings {
                max_message_size: limits.max_message_size,
                body_read_timeout: config.rest.body_read_timeout,
            },
            shed: Shed::new(limits.max_in_flight),
            auth,
            ui: config.ui,
            store_health,
            cors: app::cors_policy(&config.cors_allow_origins),
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
        let builder = Arc::new(builder);
        let settings = ConnSettings {
            header_read_timeout: limits.header_read_timeout,
            idle_timeout: limits.idle_timeout,
            min_ping_interval: limits.min_ping_interval,
            drain_timeout: limits.drain_timeout,
        };

        if let Ok(address) = listener.local_addr() {
            tracing::info!(%address, "opsd listening");
        }
        // Every connection's task, so the drain can wait for them all.
        let tasks = TaskTracker::new();
        let signals = Signals::default();
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
            backoff = Duration::from_millis(5);
            // At the cap another connection makes room; only when every
            // connection has a call open is the new one closed at once
            // (never left waiting in the listen queue).
            let Ok(entry) = connections.admit() else {
                tracing::warn!(
                    limit = limits.max_connections,
                    "connection limit reached with a call open on every connection; closing a new connection"
                );
                drop(stream);
                continue;
            };
            if let Err(err) = stream.set_nodelay(true) {
                tracing::debug!(cause = %err, "cannot set TCP_NODELAY");
            }
            tasks.spawn(conn::serve(
                stream,
                entry,
                app.clone(),
                builder.clone(),
                settings,
                signals.clone(),
                tls.clone(),
            ));
        }

        drop(listener);
        tracing::info!("shutting down: draining in-flight calls");
        for service in ["", OPERATIONS_SERVICE, WORKERS_SERVICE, CONSOLE_SERVICE] {
            health
                .set_service_status(service, ServingStatus::NotServing)
                .await;
        }
        let drain_timeout = limits.drain_timeout;
        let drain_deadline = tokio::time::Instant::now() + drain_timeout;
        signals.drain.cancel();
        // The connections turn graceful first, so the Waits released next
        // are answered after the first GOAWAY, or with `Connection: close`.
        let turned = signals.all_draining(|| connections.len());
        if tokio::time::timeout(Duration::from_millis(200), turned)
            .await
            .is_err()
        {
            tracing::debug!("not every connection turned graceful within 200 ms");
        }
        registry.shutdown();
        tasks.close();
        tokio::select! {
            () = tasks.wait() => {}
            () = tokio::time::sleep_until(drain_deadline) => {
                let (calls, on) = connections.open_calls();
                if calls > 0 {
                    tracing::warn!(calls, connections = on, ?drain_timeout, "drain timeout: cutting the calls still unanswered");
                    metrics::drain_cut(calls);
                } else {
                    tracing::info!(?drain_timeout, "drain timeout: closing the connections left");
                }
                signals.cut.cancel();
                let _ = tokio::time::timeout(Duration::from_secs(1), tasks.wait()).await;
            }
        }
        tracing::info!("opsd stopped");
        Ok(())
    }
}

const OPERATIONS_SERVICE: &str = "google.longrunning.Operations";
const WORKERS_SERVICE: &str = "opsd.v1.Workers";
const CONSOLE_SERVICE: &str = "opsd.v1.Console";

/// The listen backlog [`bind`] asks for; the kernel caps it at
/// `net.core.somaxconn`.
const LISTEN_BACKLOG: u32 = 4096;

/// Binds `address` for [`run`], with a listen backlog (4,096) that holds a
/// burst of clients connecting at once (after a restart, say) until the
/// accept loop takes them; tokio's default (1,024) overflows, and a client
/// whose handshake overflowed the queue is reset when it sends its first
/// bytes.
pub fn bind(address: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if address.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(LISTEN_BACKLOG)
}

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

/// Reloads the TLS certificate and key on each SIGHUP until `stop`; a
/// reload that fails keeps the current ones.
fn reload_on_sighup(tls: tls::Tls, stop: tokio_util::sync::CancellationToken) {
    let mut hangups = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => signal,
        Err(err) => {
            tracing::warn!(cause = %err, "cannot listen for SIGHUP: the TLS certificate will not be reloaded");
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                signal = hangups.recv() => if signal.is_none() { return },
            }
            match tls.reload() {
                Ok(()) => tracing::info!("SIGHUP: TLS certificate reloaded"),
                Err(err) => {
                    tracing::error!(cause = %err, "SIGHUP: cannot reload the TLS certificate; keeping the current one")
                }
            }
        }
    });
}

/// Serves `GET /metrics` (HTTP/1.1) on its own listener until the registry
/// shuts down: a task for the accept loop, one per connection. Nothing else
/// is served there, and it needs no credentials: it is meant for an address
/// only the scraper reaches.
fn serve_metrics(
    listener: TcpListener,
    handle: PrometheusHandle,
    registry: Registry,
    connections: Arc<Connections>,
) {
    if let Ok(address) = listener.local_addr() {
        tracing::info!(%address, "/metrics listening");
    }
    let stop = registry.shutdown_token();
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                () = stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(err) => {
                        tracing::debug!(cause = %err, "/metrics: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let (handle, registry, connections) =
                (handle.clone(), registry.clone(), connections.clone());
            let service =
                hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
                    let (handle, registry, connections) =
                        (handle.clone(), registry.clone(), connections.clone());
                    async move {
                        let mut response = if request.uri().path() == "/metrics"
                            && request.method() == http::Method::GET
                        {
                            let text = metrics::render(&handle, &registry, connections.len()).await;
                            let mut response = http::Response::new(http_body_util::Full::new(
                                bytes::Bytes::from(text),
                            ));
                            response.headers_mut().insert(
                                http::header::CONTENT_TYPE,
                                http::HeaderValue::from_static(
                                    "text/plain; version=0.0.4; charset=utf-8",
                                ),
                            );
                            response
                        } else {
                            let mut response = http::Response::new(http_body_util::Full::new(
                                bytes::Bytes::from_static(b"only GET /metrics is served here\n"),
                            ));
                            *response.status_mut() = http::StatusCode::NOT_FOUND;
                            response
                        };
                        response.headers_mut().insert(
                            http::header::CACHE_CONTROL,
                            http::HeaderValue::from_static("no-store"),
                        );
                        Ok::<_, std::convert::Infallible>(response)
                    }
                });
            tokio::spawn(async move {
                let io = hyper_util::rt::TokioIo::new(stream);
                let served = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .serve_connection(io, service);
                let _ = tokio::time::timeout(Duration::from_secs(60), served).await;
            });
        }
    });
}

/// Builds a server from `config` and serves on `listener` until `shutdown`.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    Server::new(config).await?.serve(listener, shutdown).await
}
