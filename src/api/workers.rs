//! `opsd.v1.Workers`: how services register and finish their operations and
//! learn of cancellations.

use std::pin::Pin;

use tokio_stream::{wrappers::ReceiverStream, Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::{
    api::{
        grpc::workers_server::{Workers, WorkersServer},
        linked,
        types::TypeRegistry,
    },
    error::Error,
    pb::{
        google::longrunning::Operation,
        opsd::v1::{
            complete_operation_request::Result as CompleteResult, operation_event,
            CompleteOperationRequest, CreateOperationRequest, GetOperationReportRequest,
            OperationEvent, OperationReport, PollingCall, RegisterTypesRequest,
            RegisterTypesResponse, UpdateOperationRequest, WatchOperationsRequest,
        },
    },
    registry::{
        model::wire_duration, operation, CancelPolicy, CreateParams, EventKind, Outcome, Registry,
        ScriptSpec, TraceLink, Visibility, WatchFilter, WorkerEvent,
    },
};

/// The `opsd.v1.Workers` service. Cloning it is shallow.
#[derive(Clone)]
pub struct WorkersService {
    registry: Registry,
    types: TypeRegistry,
}

impl WorkersService {
    pub fn new(registry: Registry, types: TypeRegistry) -> Self {
        Self { registry, types }
    }

    /// The tonic service, ready for `Server::add_service`, unobserved: no
    /// metrics, spans or polling reports. Wrap the service in
    /// [`crate::server::observe::Observed`] first for those, as the server does.
    pub fn into_server(self, max_message_size: usize) -> WorkersServer<Self> {
        WorkersServer::new(self)
            .max_decoding_message_size(max_message_size)
            .max_encoding_message_size(max_message_size)
    }
}

fn event(event: WorkerEvent) -> OperationEvent {
    let kind = match event.kind {
        EventKind::CancelRequested => operation_event::Type::CancelRequested,
        EventKind::Deleted => operation_event::Type::Deleted,
        EventKind::LeaseExpired => operation_event::Type::LeaseExpired,
    };
    OperationEvent {
        r#type: kind as i32,
        name: event.name,
        event_time: Some(prost_types::Timestamp::from(event.time)),
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<OperationEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Workers for WorkersService {
    async fn create_operation(
        &self,
        request: Request<CreateOperationRequest>,
    ) -> Result<Response<Operation>, Status> {
        // The caller's trace, read from its `traceparent` by the server's
        // observing wrapper.
        let trace = request.extensions().get::<TraceLink>().cloned();
        let request = request.into_inner();
        let params = CreateParams {
            parent: request.parent,
            operation_id: request.operation_id,
            request_id: request.request_id,
            metadata: request.metadata,
            cancel_policy: CancelPolicy::from_wire(request.cancel_policy)?,
            lease: request
                .lease
                .as_ref()
                .map(|d| wire_duration("lease", d))
                .transpose()?,
            cancel_grace_period: request
                .cancel_grace_period
                .as_ref()
                .map(|d| wire_duration("cancel_grace_period", d))
                .transpose()?,
            script: request
                .script
                .as_ref()
                .map(ScriptSpec::from_wire)
                .transpose()?,
            trace,
        };
        let record = self.registry.create(params).await?;
        Ok(Response::new(operation(&record)))
    }

    async fn update_operation(
        &self,
        request: Request<UpdateOperationRequest>,
    ) -> Result<Response<Operation>, Status> {
        let request = request.into_inner();
        let record = self
            .registry
            .update(&request.name, request.metadata)
            .await?;
        Ok(linked(Response::new(operation(&record)), [&record]))
    }

    async fn complete_operation(
        &self,
        request: Request<CompleteOperationRequest>,
    ) -> Result<Response<Operation>, Status> {
        let request = request.into_inner();
        let outcome = match request.result {
            Some(CompleteResult::Response(any)) => Outcome::Response(any),
            Some(CompleteResult::Error(status)) => Outcome::Error(status),
            None => {
                return Err(
                    Error::invalid("result", "set exactly one of `response` and `error`").into(),
                )
            }
        };
        let record = self
            .registry
            .complete(&request.name, outcome, request.metadata)
            .await?;
        Ok(linked(Response::new(operation(&record)), [&record]))
    }

    type WatchOperationsStream = EventStream;

    async fn watch_operations(
        &self,
        request: Request<WatchOperationsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        // What the worker may watch, from the server's authorization.
        let visibility = request.extensions().get::<Visibility>().cloned();
        let request = request.into_inner();
        let filter = WatchFilter::new(&request.parent, &request.names)?.visible_to(visibility);
        let events = self.registry.watch(filter);
        let stream = ReceiverStream::new(events).map(|e| Ok(event(e)));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn register_types(
        &self,
        request: Request<RegisterTypesRequest>,
    ) -> Result<Response<RegisterTypesResponse>, Status> {
        let set = request.into_inner().descriptor_set.unwrap_or_default();
        let message_types = self.types.register(set)?;
        tracing::info!(count = message_types.len(), "message types registered");
        Ok(Response::new(RegisterTypesResponse { message_types }))
    }

    async fn get_operation_report(
        &self,
        request: Request<GetOperationReportRequest>,
    ) -> Result<Response<OperationReport>, Status> {
        let (record, report) = self.registry.report(&request.get_ref().name).await?;
        Ok(Response::new(OperationReport {
            name: record.name,
            calls: report
                .calls
                .into_iter()
                .map(|call| PollingCall {
                    method: call.method.to_owned(),
                    time: Some(call.time.into()),
                    transport: call.transport.to_owned(),
                })
                .collect(),
            counts: report
                .counts
                .into_iter()
                .map(|(method, count)| (method.to_owned(), count))
                .collect(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;

    #[test]
    fn events_carry_type_name_and_time() {
        let e = event(WorkerEvent {
            kind: EventKind::LeaseExpired,
            name: "operations/a".into(),
            time: SystemTime::UNIX_EPOCH,
        });
        assert_eq!(e.r#type(), operation_event::Type::LeaseExpired);
        assert_eq!(e.name, "operations/a");
        assert_eq!(e.event_time.unwrap().seconds, 0);
    }
}
