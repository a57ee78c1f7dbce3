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
//!
//! The REST surface turns that same `Status` into Google's JSON error
//! envelope in exactly one place too, `json_envelope`, with the HTTP status
//! of google/rpc/code.proto's mapping.

use std::{collections::HashMap, time::Duration};

use prost::Message;
use prost_reflect::DescriptorPool;
use serde_json::{json, Value};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::{
    json::{any_to_json, JsonOptions},
    pb::google::rpc,
    store::StoreError,
};

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

/// Why a call's credentials were refused, as its `ErrorInfo.reason` says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthFailure {
    /// No `authorization: Bearer` header (nor a client certificate).
    Missing,
    /// The token expired.
    Expired,
    /// Anything else: not a JWT, a bad signature, an algorithm or key that
    /// does not fit, the wrong issuer or audience, not yet valid.
    Invalid,
}

impl AuthFailure {
    pub fn reason(self) -> &'static str {
        match self {
            AuthFailure::Missing => "CREDENTIALS_MISSING",
            AuthFailure::Expired => "ACCESS_TOKEN_EXPIRED",
            AuthFailure::Invalid => "ACCESS_TOKEN_INVALID",
        }
    }
}

/// The `ErrorInfo.reason` of a token without the required scope.
pub const SCOPE_INSUFFICIENT: &str = "ACCESS_TOKEN_SCOPE_INSUFFICIENT";
/// The `ErrorInfo.reason` of a call no grant allows.
pub const PERMISSION_DENIED: &str = "IAM_PERMISSION_DENIED";

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
    /// The server was started with this method switched off (or the
    /// operation's script switched it off).
    #[error("The method {method} is disabled {}.", if *.per_operation { "for this operation" } else { "on this server" })]
    MethodDisabled {
        method: &'static str,
        per_operation: bool,
    },
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
    /// No REST route matches the request's path (or its method).
    #[error("{message}")]
    RouteNotFound { message: String },
    /// The request body is larger than the server accepts.
    #[error("The request body is larger than {limit} bytes.")]
    PayloadTooLarge { limit: usize },
    /// A gRPC request message does not decode: the client's mistake.
    /// `field` is the path of the field that failed, where it can be known.
    #[error("The request message cannot be decoded{}: {description}.", .field.as_ref().map(|f| format!(" (field {f})")).unwrap_or_default())]
    MalformedMessage {
        field: Option<String>,
        description: String,
    },
    /// A gRPC request message is larger than `--max-message-size`.
    #[error(
        "The request message is {size} bytes; the limit is {limit} bytes (--max-message-size)."
    )]
    MessageTooLarge { size: usize, limit: usize },
    /// The server has as many calls in flight as it takes (`--max-in-flight`).
    #[error("The server is overloaded ({limit} calls in flight); retry after {retry_after:?}.")]
    Overloaded { limit: usize, retry_after: Duration },
    /// The server is draining.
    #[error("The server is shutting down.")]
    ShuttingDown,
    /// The call carries no valid credentials (auth on). Which check failed
    /// stays in the server's debug log; the client learns only the stable
    /// `reason`.
    #[error("Request had invalid authentication credentials. Expected a valid OAuth 2 bearer token (authorization: Bearer ...).")]
    Unauthenticated { reason: AuthFailure },
    /// The caller is known but may not make this call: its token lacks the
    /// required scope (`reason` ACCESS_TOKEN_SCOPE_INSUFFICIENT, `scope`
    /// set), or no grant gives it the permission on the name
    /// (IAM_PERMISSION_DENIED). The message is the same whether the
    /// operation exists or not.
    #[error("{message}")]
    PermissionDenied {
        reason: &'static str,
        message: String,
        /// The scope the token lacked.
        scope: Option<String>,
    },
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
            Error::InvalidArgument { .. } | Error::MalformedMessage { .. } => Code::InvalidArgument,
            Error::MessageTooLarge { .. } | Error::Overloaded { .. } => Code::ResourceExhausted,
            Error::NotFound { .. } | Error::RouteNotFound { .. } => Code::NotFound,
            Error::PayloadTooLarge { .. } => Code::ResourceExhausted,
            Error::AlreadyExists { .. } => Code::AlreadyExists,
            Error::FailedPrecondition { .. } => Code::FailedPrecondition,
            Error::MethodDisabled { .. } | Error::Unimplemented { .. } => Code::Unimplemented,
            Error::ResourceExhausted { .. } => Code::ResourceExhausted,
            Error::ShuttingDown => Code::Unavailable,
            Error::Unauthenticated { .. } => Code::Unauthenticated,
            Error::PermissionDenied { .. } => Code::PermissionDenied,
            Error::Store(StoreError::Unavailable(_)) => Code::Unavailable,
            Error::Store(_) => Code::Internal,
        }
    }

    /// The `ErrorInfo.reason`: a stable UPPER_SNAKE_CASE identifier.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::InvalidArgument { .. } => "INVALID_ARGUMENT",
            Error::MalformedMessage { .. } => "MALFORMED_MESSAGE",
            Error::MessageTooLarge { .. } => "MESSAGE_TOO_LARGE",
            Error::Overloaded { .. } => "SERVER_OVERLOADED",
            Error::NotFound { .. } => "OPERATION_NOT_FOUND",
            Error::AlreadyExists { .. } => "OPERATION_ALREADY_EXISTS",
            Error::FailedPrecondition { reason, .. } => match reason {
                Precondition::AlreadyDone => "OPERATION_ALREADY_DONE",
                Precondition::NotCancellable => "OPERATION_NOT_CANCELLABLE",
            },
            Error::MethodDisabled { .. } => "METHOD_DISABLED",
            Error::RouteNotFound { .. } => "ROUTE_NOT_FOUND",
            Error::PayloadTooLarge { .. } => REQUEST_TOO_LARGE,
            Error::Unimplemented { reason, .. } | Error::ResourceExhausted { reason, .. } => reason,
            Error::ShuttingDown => "SERVER_SHUTTING_DOWN",
            Error::Unauthenticated { reason } => reason.reason(),
            Error::PermissionDenied { reason, .. } => reason,
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
            Error::MalformedMessage { field, description } => {
                let field = field.clone().unwrap_or_default();
                if !field.is_empty() {
                    metadata.insert("field".to_owned(), field.clone());
                }
                details.add_bad_request_violation(field, description.clone());
            }
            Error::MessageTooLarge { limit, .. } => {
                metadata.insert("limit".to_owned(), limit.to_string());
            }
            Error::Overloaded { retry_after, .. } => {
                details.set_retry_info(Some(*retry_after));
            }
            Error::MethodDisabled { method, .. } => {
                metadata.insert("method".to_owned(), (*method).to_owned());
            }
            Error::PermissionDenied {
                scope: Some(scope), ..
            } => {
                metadata.insert("scope".to_owned(), scope.clone());
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

/// How long a status asks the client to wait before it retries (its
/// `RetryInfo`), which REST sends as `Retry-After`.
pub fn retry_after(status: &Status) -> Option<Duration> {
    if status.details().is_empty() {
        return None;
    }
    status.get_details_retry_info()?.retry_delay
}

/// The `WWW-Authenticate` header of a REST answer with this status (RFC
/// 6750): `invalid_token` for UNAUTHENTICATED, `insufficient_scope` (with
/// the scope) for a token without the required scope.
pub fn www_authenticate(status: &Status) -> Option<String> {
    match status.code() {
        Code::Unauthenticated => Some(r#"Bearer realm="opsd", error="invalid_token""#.to_owned()),
        Code::PermissionDenied => {
            let info = status.get_details_error_info()?;
            if info.reason != SCOPE_INSUFFICIENT {
                return None;
            }
            let scope = info.metadata.get("scope").cloned().unwrap_or_default();
            Some(format!(
                r#"Bearer realm="opsd", error="insufficient_scope", scope="{scope}""#
            ))
        }
        _ => None,
    }
}

/// The `ErrorInfo.reason` that REST answers with HTTP 413.
const REQUEST_TOO_LARGE: &str = "REQUEST_TOO_LARGE";

/// The HTTP status of a gRPC code (google/rpc/code.proto), except that an
/// oversized request body is 413.
pub fn http_status(code: Code, reason: &str) -> http::StatusCode {
    use http::StatusCode as H;
    if reason == REQUEST_TOO_LARGE {
        return H::PAYLOAD_TOO_LARGE;
    }
    match code {
        Code::Ok => H::OK,
        Code::Cancelled => H::from_u16(499).unwrap_or(H::BAD_REQUEST),
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => H::BAD_REQUEST,
        Code::DeadlineExceeded => H::GATEWAY_TIMEOUT,
        Code::NotFound => H::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => H::CONFLICT,
        Code::PermissionDenied => H::FORBIDDEN,
        Code::Unauthenticated => H::UNAUTHORIZED,
        Code::ResourceExhausted => H::TOO_MANY_REQUESTS,
        Code::Unimplemented => H::NOT_IMPLEMENTED,
        Code::Unavailable => H::SERVICE_UNAVAILABLE,
        Code::Unknown | Code::Internal | Code::DataLoss => H::INTERNAL_SERVER_ERROR,
    }
}

/// Google's JSON error envelope for a status:
/// `{"error": {"code": <HTTP>, "message", "status": "NOT_FOUND", "details": [...]}}`,
/// with the details of the status's `grpc-status-details-bin` trailer.
pub(crate) fn json_envelope(
    status: &Status,
    pool: &DescriptorPool,
    options: JsonOptions,
) -> (http::StatusCode, Value) {
    let details = rpc::Status::decode(status.details())
        .map(|s| s.details)
        .unwrap_or_default();
    let reason = details
        .iter()
        .find_map(|d| d.to_msg::<rpc::ErrorInfo>().ok())
        .map(|info| info.reason)
        .unwrap_or_default();
    let http = http_status(status.code(), &reason);
    let name = rpc::Code::try_from(status.code() as i32)
        .map(|c| c.as_str_name())
        .unwrap_or("UNKNOWN");
    let mut body = json!({
        "code": http.as_u16(),
        "message": status.message(),
        "status": name,
    });
    if !details.is_empty() {
        let details: Vec<Value> = details
            .iter()
            .map(|d| any_to_json(d, pool, options))
            .collect();
        body["details"] = Value::Array(details);
    }
    (http, json!({ "error": body }))
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
    fn the_json_envelope_mirrors_the_status() {
        let pool = DescriptorPool::decode(crate::pb::FILE_DESCRIPTOR_SET).unwrap();
        let status = Status::from(Error::not_found("operations/x"));
        let (http, body) = json_envelope(&status, &pool, JsonOptions::default());
        assert_eq!(http, http::StatusCode::NOT_FOUND);
        let error = &body["error"];
        assert_eq!(error["code"], 404);
        assert_eq!(error["status"], "NOT_FOUND");
        assert_eq!(error["message"], status.message());
        assert_eq!(
            error["details"][0]["@type"],
            "type.googleapis.com/google.rpc.ErrorInfo"
        );
        assert_eq!(error["details"][0]["reason"], "OPERATION_NOT_FOUND");
        assert_eq!(error["details"][1]["resourceName"], "operations/x");

        let too_large = Status::from(Error::PayloadTooLarge { limit: 10 });
        assert_eq!(
            json_envelope(&too_large, &pool, JsonOptions::default()).0,
            413
        );
        assert_eq!(http_status(Code::Cancelled, "").as_u16(), 499);
        assert_eq!(
            http_status(Code::FailedPrecondition, ""),
            http::StatusCode::BAD_REQUEST
        );
        assert_eq!(
            http_status(Code::Unimplemented, ""),
            http::StatusCode::NOT_IMPLEMENTED
        );
    }

    #[test]
    fn auth_errors_map_to_401_and_403_with_their_challenge() {
        let status = Status::from(Error::Unauthenticated {
            reason: AuthFailure::Expired,
        });
        assert_eq!(status.code(), Code::Unauthenticated);
        assert_eq!(
            status.get_error_details().error_info().unwrap().reason,
            "ACCESS_TOKEN_EXPIRED"
        );
        assert!(www_authenticate(&status).unwrap().contains("invalid_token"));
        let scope = Status::from(Error::PermissionDenied {
            reason: SCOPE_INSUFFICIENT,
            message: "needs a scope".into(),
            scope: Some("https://www.googleapis.com/auth/cloud-platform".into()),
        });
        let challenge = www_authenticate(&scope).unwrap();
        assert!(
            challenge.contains(r#"error="insufficient_scope""#),
            "{challenge}"
        );
        assert!(challenge.contains("cloud-platform"), "{challenge}");
        let denied = Status::from(Error::PermissionDenied {
            reason: PERMISSION_DENIED,
            message: "no".into(),
            scope: None,
        });
        assert_eq!(www_authenticate(&denied), None);
        let pool = DescriptorPool::decode(crate::pb::FILE_DESCRIPTOR_SET).unwrap();
        assert_eq!(json_envelope(&status, &pool, JsonOptions::default()).0, 401);
        assert_eq!(json_envelope(&denied, &pool, JsonOptions::default()).0, 403);
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
