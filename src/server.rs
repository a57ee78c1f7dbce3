//! The server: one port for gRPC, health and reflection; limits; drain.
//!
//! [`Server::serve`] takes an already bound listener (tests bind port 0) and
//! a shutdown future. When the future resolves, health turns NOT_SERVING, the
//! registry starts draining (open Waits return their latest state at once,
//! worker streams end), the listener stops accepting and in-flight calls
//! finish. Connections still open after the drain timeout (long-lived health
//! watches, for example) are closed.

use std::{future::Future, sync::Arc};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

use crate::{
    api::{operations::OperationsService, workers::WorkersService},
    config::{Config, StoreConfig},
    pb::{
        google::longrunning::operations_server::OperationsServer,
        opsd::v1::workers_server::WorkersServer, FILE_DESCRIPTOR_SET,
    },
    registry::Registry,
    store::{MemoryStore, Store},
};

/// Why the server could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("transport error: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("cannot open the store: {0}")]
    Store(String),
}

/// A configured server and its registry.
pub struct Server {
    config: Config,
    registry: Registry,
}

impl Server {
    /// Opens the store and starts the registry (needs a Tokio runtime).
    pub fn new(config: Config) -> Result<Self, ServerError> {
        let store: Arc<dyn Store> = match config.store {
            StoreConfig::Memory => Arc::new(MemoryStore::new()),
        };
        let registry = Registry::new(store, config.registry.clone());
        Ok(Self { config, registry })
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
        let Self { config, registry } = self;
        let limits = &config.limits;
        let address = listener.local_addr().ok();

        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_serving::<OperationsServer<OperationsService>>()
            .await;
        health.set_serving::<WorkersServer<WorkersService>>().await;

        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(
                    tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
                )
        };
        let reflection_v1 = reflection().build_v1()?;
        let reflection_v1alpha = reflection().build_v1alpha()?;

        let operations = OperationsService::new(registry.clone(), config.disabled_methods.clone())
            .into_server(limits.max_message_size);
        let workers = WorkersService::new(registry.clone()).into_server(limits.max_message_size);

        // Resolves when shutdown starts; the drain timer runs from then on.
        let draining = CancellationToken::new();
        let signal = {
            let registry = registry.clone();
            let draining = draining.clone();
            async move {
                shutdown.await;
                tracing::info!("shutting down: draining in-flight calls");
                for service in ["", OPERATIONS_SERVICE, WORKERS_SERVICE] {
                    health
                        .set_service_status(service, ServingStatus::NotServing)
                        .await;
                }
                registry.shutdown();
                draining.cancel();
            }
        };

        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        let serve = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(limits.keepalive_interval))
            .http2_keepalive_timeout(Some(limits.keepalive_timeout))
            .max_concurrent_streams(limits.max_concurrent_streams)
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(operations)
            .add_service(workers)
            .serve_with_incoming_shutdown(incoming, signal);
        if let Some(address) = address {
            tracing::info!(%address, "opsd listening");
        }

        tokio::pin!(serve);
        let drain_timeout = limits.drain_timeout;
        tokio::select! {
            result = &mut serve => result?,
            () = async { draining.cancelled().await; tokio::time::sleep(drain_timeout).await } => {
                tracing::warn!(?drain_timeout, "drain timeout: closing the remaining connections");
            }
        }
        registry.shutdown();
        tracing::info!("opsd stopped");
        Ok(())
    }
}

const OPERATIONS_SERVICE: &str = "google.longrunning.Operations";
const WORKERS_SERVICE: &str = "opsd.v1.Workers";

/// Builds a server from `config` and serves on `listener` until `shutdown`.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    Server::new(config)?.serve(listener, shutdown).await
}
