//! Short forms of the requests and answers the tests use most.

use std::time::Duration;

use opsd::pb::{
    google::longrunning::{
        operation::Result as OpResult, CancelOperationRequest, DeleteOperationRequest,
        GetOperationRequest, Operation,
    },
    opsd::v1::{complete_operation_request, CompleteOperationRequest, OperationEvent},
};
use tonic::Streaming;

use super::any_string;

pub fn get(name: &str) -> GetOperationRequest {
    GetOperationRequest { name: name.into() }
}

pub fn cancel(name: &str) -> CancelOperationRequest {
    CancelOperationRequest { name: name.into() }
}

pub fn delete(name: &str) -> DeleteOperationRequest {
    DeleteOperationRequest { name: name.into() }
}

/// Completes `name` with a string response.
pub fn respond(name: &str, value: &str) -> CompleteOperationRequest {
    CompleteOperationRequest {
        name: name.into(),
        result: Some(complete_operation_request::Result::Response(any_string(
            value,
        ))),
        metadata: None,
    }
}

/// The error of a failed operation (panics otherwise).
pub fn error_of(op: &Operation) -> &opsd::pb::google::rpc::Status {
    match &op.result {
        Some(OpResult::Error(e)) => e,
        other => panic!("expected an error result, got {other:?}"),
    }
}

/// The next event of a worker stream, within 5 s.
pub async fn next_event(stream: &mut Streaming<OperationEvent>) -> OperationEvent {
    tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("an event in time")
        .unwrap()
        .expect("the stream is open")
}

/// A protobuf Duration of `seconds`.
pub fn secs(seconds: f64) -> prost_types::Duration {
    prost_types::Duration::try_from(Duration::from_secs_f64(seconds)).unwrap()
}
