//! The generated gRPC server stubs of opsd's three services (build.rs): the
//! traits the services implement and the tonic services that mount them.
//!
//! They are generated apart from `pb` (which keeps the messages and the
//! clients) because they decode requests with opsd's codec
//! ([`super::codec`]), which reports a malformed request through the one
//! error mapping.

#[allow(clippy::all, missing_docs)]
mod longrunning {
    include!(concat!(env!("OUT_DIR"), "/servers/google.longrunning.rs"));
}

#[allow(clippy::all, missing_docs)]
mod v1 {
    include!(concat!(env!("OUT_DIR"), "/servers/opsd.v1.rs"));
}

pub use longrunning::operations_server;
pub use v1::{console_server, workers_server};
