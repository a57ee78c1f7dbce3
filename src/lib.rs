//! opsd: a server and library for the `google.longrunning.Operations` API.
//!
//! # Layout
//!
//! Dependencies point down only:
//!
//! - [`server`]: one port for gRPC, health and reflection; limits; drain.
//! - [`api`]: the protocol faces. [`api::operations`] serves
//!   `google.longrunning.Operations`, [`api::workers`] the `opsd.v1.Workers`
//!   API through which services create, update and finish operations and
//!   learn of cancellations. They only convert requests into [`registry`]
//!   calls.
//! - [`registry`]: the semantics: names, the state machine, cancel policies,
//!   waiters, leases, retention, List.
//! - [`store`]: durable records with conditional writes and a change feed.
//! - [`error`]: the one error type and its mapping to `tonic::Status`.
//!
//! # Embedding
//!
//! A tonic server can serve the Operations API over its own registry,
//! without a sidecar:
//!
//! ```no_run
//! use std::sync::Arc;
//! use opsd::{api::operations::OperationsService, registry::{Registry, RegistrySettings}, store::MemoryStore};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let registry = Registry::new(Arc::new(MemoryStore::new()), RegistrySettings::default());
//! let operations = OperationsService::new(registry.clone(), Default::default());
//! tonic::transport::Server::builder()
//!     .add_service(operations.into_server(4 << 20))
//!     .serve("127.0.0.1:50051".parse()?)
//!     .await?;
//! # Ok(()) }
//! ```

pub mod api;
pub mod config;
pub mod error;
pub mod json;
pub mod pb;
pub mod registry;
pub mod server;
pub mod store;

pub use config::Config;
pub use error::Error;
