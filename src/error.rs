//! The one error type of opsd and its mapping to `tonic::Status`.
//!
//! Every failure the registry or the protocol faces report is an [`Error`].
//! It is turned into a gRPC status in exactly one place (`From<Error> for
//! Status`, below), which attaches the rich details clients rely on:
//! `ErrorInfo` always, `ResourceInfo` for errors about one operation,
//! `BadRequest` for invalid input. tonic-types encodes them into the
//! `grpc-status-details-bin` trailer as a `google.rpc.Status` whose code and
//! message are the status's own. Store faults are logged here and reach the
//! client without their cause.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::{registry::NameError, store::StoreError};

/// The `ErrorInfo.domain` of every error opsd raises.
pub const ERROR_DOMAIN: &str = "opsd";

/// The resource type named in `ResourceInfo`.
pub const OPERATION_TYPE: &str = "google.longrunning.Operation";

/// Why an operation is not in a state that allows the call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precondition {
    /// It is done; its result cannot change.
    AlreadyDone,
    /// Its cancel policy is NOT_CANCELLABLE.
    NotCancellable,
}

/// An opsd failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A field of the request is invalid.
    #[error("Invalid {field}: {description}")]
    InvalidArgument { field: String, description: String },
    /// No operation has this name.
    #[error("Operation \"{name}\" not found.")]
    NotFound { name: String },
    /// The name is taken (or the request id was used for another operation).
    #[error("{message}")]
    AlreadyExists { name: String, message: String },
    /// The operation's state forbids the call.
    #[error("{message}")]
    FailedPrecondition {
        name: String,
        reason: Precondition,
        message: String,
    },
    /// The server was started with this method switched off.
    #[error("The method {method} is disabled on this server.")]
    MethodDisabled { method: &'static str },
    /// A feature this server does not offer (yet).
    #[error("{message}")]
    Unimplemented {
        reason: &'static str,
        message: String,
    },
    /// A server budget (such as open Waits) is used up.
    #[error("{message}")]
    ResourceExhausted {
        reason: &'static str,
        message: String,
    },
    /// The server is draining.
    #[error("The server is shutting down.")]
    ShuttingDown,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Error {
    /// An `InvalidArgument` for `field`.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            description: description.into(),
        }
    }

    /// An `InvalidArgument` for a name field that failed to parse.
    pub fn invalid_name(field: &str, err: NameError) -> Self {
        Self::invalid(field, err.to_string())
    }

    pub fn not_found(name: impl Into<String>) -> Self {
        Self::NotFound { name: name.into() }
    }

    pub fn already_done(name: &str) -> Self {
        Self::FailedPrecondition {
            name: name.to_owned(),
            reason: Precondition::AlreadyDone,
            message: format!("Operation \"{name}\" is already done; its result cannot change."),
        }
    }

    /// The gRPC code of this error.
    pub fn code(&self) -> Code {
        match self {
            Error::InvalidArgument { .. } => Code::InvalidArgument,
            Error::NotFound { .. } => Code::NotFound,
            Error::AlreadyExists { .. } => Code::AlreadyExists,
            Error::FailedPrecondition { .. } => Code::FailedPrecondition,
            Error::MethodDisabled { .. } | Error::Unimplemented { .. } => Code::Unimplemented,
            Error::ResourceExhausted { .. } => Code::ResourceExhausted,
            Error::ShuttingDown => Code::Unavailable,
            Error::Store(StoreError::Unavailable(_)) => Code::Unavailable,
            Error::Store(_) => Code::Internal,
        }
    }

    /// The `ErrorInfo.reason`: a stable UPPER_SNAKE_CASE identifier.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::InvalidArgument { .. } => "INVALID_ARGUMENT",
            Error::NotFound { .. } => "OPERATION_NOT_FOUND",
            Error::AlreadyExists { .. } => "OPERATION_ALREADY_EXISTS",
            Error::FailedPrecondition { reason, .. } => match reason {
                Precondition::AlreadyDone => "OPERATION_ALREADY_DONE",
                Precondition::NotCancellable => "OPERATION_NOT_CANCELLABLE",
            },
            Error::MethodDisabled { .. } => "METHOD_DISABLED",
            Error::Unimplemented { reason, .. } | Error::ResourceExhausted { reason, .. } => reason,
            Error::ShuttingDown => "SERVER_SHUTTING_DOWN",
            Error::Store(StoreError::Unavailable(_)) => "STORE_UNAVAILABLE",
            Error::Store(_) => "INTERNAL",
        }
    }

    /// The message sent to the client. Store faults keep their cause in the log.
    pub fn client_message(&self) -> String {
        match self {
            Error::Store(StoreError::Unavailable(_)) => {
                "The operation store cannot take writes right now; retry later.".to_owned()
            }
            Error::Store(_) => "Internal error in the operation store.".to_owned(),
            other => other.to_string(),
        }
    }

    /// The `ErrorInfo`, `ResourceInfo` and `BadRequest` details of this error.
    pub fn details(&self) -> ErrorDetails {
        let mut metadata = HashMap::new();
        let mut details = ErrorDetails::new();
        match self {
            Error::InvalidArgument { field, description } => {
                metadata.insert("field".to_owned(), field.clone());
                details.add_bad_request_violation(field.clone(), description.clone());
            }
            Error::NotFound { name }
            | Error::AlreadyExists { name, .. }
            | Error::FailedPrecondition { name, .. } => {
                metadata.insert("name".to_owned(), name.clone());
                details.set_resource_info(OPERATION_TYPE, name.clone(), "", self.client_message());
            }
            Error::MethodDisabled { method } => {
                metadata.insert("method".to_owned(), (*method).to_owned());
            }
            _ => {}
        }
        details.set_error_info(self.reason(), ERROR_DOMAIN, metadata);
        details
    }
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        if let Error::Store(cause) = &error {
            tracing::error!(cause = %cause, "store failure");
        }
        Status::with_error_details(error.code(), error.client_message(), error.details())
    }
}

impl From<NameError> for Error {
    fn from(err: NameError) -> Self {
        Error::invalid_name("name", err)
    }
}

#[cfg(test)]
mod tests {
    use tonic_types::StatusExt;

    use super::*;

    #[test]
    fn details_carry_the_status_code_and_message() {
        let status = Status::from(Error::not_found("operations/x"));
        assert_eq!(status.code(), Code::NotFound);
        assert_eq!(status.message(), "Operation \"operations/x\" not found.");
        let details = status.get_error_details();
        let info = details.error_info().unwrap();
        assert_eq!(info.reason, "OPERATION_NOT_FOUND");
        assert_eq!(info.domain, ERROR_DOMAIN);
        assert_eq!(
            details.resource_info().unwrap().resource_name,
            "operations/x"
        );
        // The trailer is a google.rpc.Status with the same code and message.
        let rpc: tonic_types::pb::Status =
            prost::Message::decode(status.details()).expect("a google.rpc.Status");
        assert_eq!(rpc.code, Code::NotFound as i32);
        assert_eq!(rpc.message, status.message());
    }

    #[test]
    fn store_causes_stay_in_the_log() {
        let status = Status::from(Error::Store(StoreError::Internal("disk sector 7".into())));
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("sector"));
    }

    #[test]
    fn invalid_arguments_name_their_field() {
        let status = Status::from(Error::invalid("page_size", "must not be negative"));
        let details = status.get_error_details();
        let violation = &details.bad_request().unwrap().field_violations[0];
        assert_eq!(violation.field, "page_size");
        assert_eq!(violation.description, "must not be negative");
    }
}
