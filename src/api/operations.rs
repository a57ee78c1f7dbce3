//! `google.longrunning.Operations` over the registry.

use std::{collections::BTreeSet, fmt, str::FromStr, sync::Arc};

use tonic::{Request, Response, Status};

use super::{linked, list_request, polled, rpc_deadline};
use crate::{
    api::grpc::operations_server::{Operations, OperationsServer},
    error::Error,
    pb::google::longrunning::{
        CancelOperationRequest, DeleteOperationRequest, GetOperationRequest, ListOperationsRequest,
        ListOperationsResponse, Operation, WaitOperationRequest,
    },
    registry::{model::wire_duration, operation, wait_budget, Registry},
};

/// The Operations methods a server may switch off (`--disable-method`).
/// GetOperation cannot be switched off: without it no client can work.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Method {
    List,
    Cancel,
    Delete,
    Wait,
}

impl Method {
    pub const ALL: [Method; 4] = [Method::List, Method::Cancel, Method::Delete, Method::Wait];

    /// The full gRPC method name.
    pub fn rpc_name(self) -> &'static str {
        match self {
            Method::List => "google.longrunning.Operations.ListOperations",
            Method::Cancel => "google.longrunning.Operations.CancelOperation",
            Method::Delete => "google.longrunning.Operations.DeleteOperation",
            Method::Wait => "google.longrunning.Operations.WaitOperation",
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Method::List => "list",
            Method::Cancel => "cancel",
            Method::Delete => "delete",
            Method::Wait => "wait",
        })
    }
}

impl FromStr for Method {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Method::ALL
            .into_iter()
            .find(|m| m.to_string().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                format!("unknown method {s:?}; expected one of: list, cancel, delete, wait")
            })
    }
}

/// What the Operations service is told; `Config` carries it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OperationsSettings {
    /// Methods that answer UNIMPLEMENTED (`--disable-method`).
    pub disabled_methods: BTreeSet<Method>,
}

/// The `google.longrunning.Operations` service. Cloning it is shallow.
#[derive(Clone)]
pub struct OperationsService {
    registry: Registry,
    disabled: Arc<BTreeSet<Method>>,
}

impl OperationsService {
    pub fn new(registry: Registry, settings: OperationsSettings) -> Self {
        Self {
            registry,
            disabled: Arc::new(settings.disabled_methods),
        }
    }

    /// The tonic service, ready for `Server::add_service`, unobserved: no
    /// metrics, spans or polling reports. Wrap the service in
    /// [`crate::server::observe::Observed`] first for those, as the server does.
    pub fn into_server(self, max_message_size: usize) -> OperationsServer<Self> {
        OperationsServer::new(self)
            .max_decoding_message_size(max_message_size)
            .max_encoding_message_size(max_message_size)
    }

    fn enabled(&self, method: Method) -> Result<(), Error> {
        if self.disabled.contains(&method) {
            return Err(Error::MethodDisabled {
                method: method.rpc_name(),
                per_operation: false,
            });
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl Operations for OperationsService {
    async fn list_operations(
        &self,
        request: Request<ListOperationsRequest>,
    ) -> Result<Response<ListOperationsResponse>, Status> {
        self.enabled(Method::List)?;
        let page = self.registry.list(list_request(request)).await?;
        let response = Response::new(ListOperationsResponse {
            operations: page.records.iter().map(operation).collect(),
            next_page_token: page.next_page_token,
            unreachable: Vec::new(),
        });
        Ok(polled(response, &self.registry, &page.records))
    }

    async fn get_operation(
        &self,
        request: Request<GetOperationRequest>,
    ) -> Result<Response<Operation>, Status> {
        let record = self.registry.get(&request.get_ref().name).await?;
        let response = linked(Response::new(operation(&record)), [&record]);
        Ok(polled(response, &self.registry, [&record]))
    }

    async fn delete_operation(
        &self,
        request: Request<DeleteOperationRequest>,
    ) -> Result<Response<()>, Status> {
        self.enabled(Method::Delete)?;
        // A deletion ends the operation's polling report with it.
        self.registry.delete(&request.get_ref().name).await?;
        Ok(Response::new(()))
    }

    async fn cancel_operation(
        &self,
        request: Request<CancelOperationRequest>,
    ) -> Result<Response<()>, Status> {
        self.enabled(Method::Cancel)?;
        let record = self.registry.cancel(&request.get_ref().name).await?;
        let response = linked(Response::new(()), [&record]);
        Ok(polled(response, &self.registry, [&record]))
    }

    async fn wait_operation(
        &self,
        request: Request<WaitOperationRequest>,
    ) -> Result<Response<Operation>, Status> {
        self.enabled(Method::Wait)?;
        let deadline = rpc_deadline(request.metadata());
        let request = request.into_inner();
        let timeout = request
            .timeout
            .as_ref()
            .map(|t| wire_duration("timeout", t))
            .transpose()?;
        let budget = wait_budget(timeout, deadline, self.registry.settings().wait_cap);
        let record = self.registry.wait(&request.name, budget).await?;
        let response = linked(Response::new(operation(&record)), [&record]);
        Ok(polled(response, &self.registry, [&record]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_parse_from_their_flag_names() {
        for method in Method::ALL {
            assert_eq!(method.to_string().parse::<Method>().unwrap(), method);
        }
        assert_eq!("Cancel".parse::<Method>().unwrap(), Method::Cancel);
        assert!("get".parse::<Method>().is_err());
    }
}
