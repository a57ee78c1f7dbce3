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
pub mod metrics;
pub mod registry;
pub mod scenario;
pub mod server;
pub mod store;

pub use config::Config;
pub use error::Error;

/// The generated protobuf and gRPC code.
pub mod pb {
    /// The encoded descriptor set of every opsd proto and its imports, with
    /// extension options kept (`google.api.http` among them).
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/opsd_descriptor.bin"));

    pub mod google {
        pub mod api {
            tonic::include_proto!("google.api");
        }
        pub mod longrunning {
            tonic::include_proto!("google.longrunning");
        }
        pub mod rpc {
            tonic::include_proto!("google.rpc");
        }
    }

    pub mod opsd {
        pub mod v1 {
            tonic::include_proto!("opsd.v1");
        }
    }
}
