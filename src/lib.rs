//! opsd: a server and library for the `google.longrunning.Operations` API.
//!
//! # Layout
//!
//! Dependencies point down only (store → registry → api → server → the
//! `opsd` binary); no module imports one above it:
//!
//! - `main.rs` (the binary): flags → [`Config`] → [`server::run`].
//! - [`server`]: one port for gRPC, REST, health, reflection and
//!   `/metrics` (TLS optional); limits; drain; [`server::auth`], who is
//!   calling (JWT bearer tokens, client certificates) and the policy;
//!   [`server::observe`], the one wrapper that times, counts, traces,
//!   reports and (with auth on) authorizes every call; [`server::trace`],
//!   the OTLP export of those traces.
//! - [`config`]: one [`Config`] assembled from the layers' settings, checked
//!   by [`Config::validate`].
//! - [`api`]: the protocol faces. [`api::operations`] serves
//!   `google.longrunning.Operations`, [`api::workers`] the `opsd.v1.Workers`
//!   API through which services create, update and finish operations and
//!   learn of cancellations, [`api::rest`] transcodes HTTP/JSON into the
//!   same calls. They only convert requests into [`registry`] calls.
//! - [`registry`]: the semantics: the domain model ([`registry::model`]),
//!   names, the state machine, cancel policies, waiters, leases, retention,
//!   List, scripted operations and scenario files.
//! - [`error`]: the one error type and its mappings to `tonic::Status` and
//!   to Google's JSON error envelope.
//! - [`store`]: durable records ([`store::StoredRecord`]) with conditional
//!   writes and a change feed: memory, redb, and PostgreSQL
//!   ([`store::postgres`], shared by any number of replicas).
//! - [`clock`]: the one clock of the registry and the stores, and the
//!   manual clock tests advance.
//! - [`pb`]: the generated protobuf and gRPC code.
//!
//! The load generator and the reference servers are a crate of their own,
//! `opsd-bench` (`bench/`); the library never depends on it.
//!
//! # Embedding
//!
//! A tonic server can serve the Operations API over its own registry,
//! without a sidecar. [`server::observe::Observed`] adds what the opsd
//! server adds to every call (metrics, spans, polling reports); without it
//! the service only answers:
//!
//! ```no_run
//! use std::sync::Arc;
//! use opsd::{
//!     api::grpc::operations_server::OperationsServer,
//!     server::observe::Observed, MemoryStore, OperationsService, Registry, RegistrySettings,
//! };
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let registry = Registry::new(Arc::new(MemoryStore::new()), RegistrySettings::default());
//! let operations = OperationsService::new(registry.clone(), Default::default());
//! tonic::transport::Server::builder()
//!     .add_service(OperationsServer::new(Observed::new(operations, registry)))
//!     .serve("127.0.0.1:50051".parse()?)
//!     .await?;
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]

pub mod api;
pub mod clock;
pub mod config;
pub mod error;
#[doc(hidden)]
pub mod fuzz;
mod json;
pub mod pb;
pub mod registry;
pub mod server;
pub mod store;

pub use api::{
    console::ConsoleService, operations::OperationsService, rest::RestService,
    workers::WorkersService,
};
pub use clock::{Clock, ManualClock};
pub use config::{Config, ConfigError};
pub use error::Error;
pub use registry::{Registry, RegistrySettings};
pub use server::{run, Server, ServerError};
pub use store::{MemoryStore, PostgresStore, RedbStore, Store, StoreError};
