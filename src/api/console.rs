//! `opsd.v1.Console`: operations with the facts opsd keeps about them, and
//! their changes live, for people and pages that watch them (`opsd ops`,
//! the operator page).
//!
//! The calls are the registry's List and Get with another conversion
//! (`operation_info`), and its change follower. They are not the client
//! API: `--disable-method` and polling reports leave them alone.

use std::pin::Pin;

use tokio_stream::{wrappers::ReceiverStream, Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::{linked, list_request};
use crate::{
    api::grpc::console_server::{Console, ConsoleServer},
    pb::{
        google::longrunning::{GetOperationRequest, ListOperationsRequest},
        opsd::v1::{
            ListOperationInfosResponse, OperationChange, OperationInfo,
            WatchOperationChangesRequest,
        },
    },
    registry::{operation_info, Followed, Registry, Visibility},
};

/// The `opsd.v1.Console` service. Cloning it is shallow.
#[derive(Clone)]
pub struct ConsoleService {
    registry: Registry,
}

impl ConsoleService {
    pub fn new(registry: Registry) -> Self {
        Self { registry }
    }

    /// The tonic service, ready for `Server::add_service`, unobserved (see
    /// [`crate::server::observe::Observed`]).
    pub fn into_server(self, max_message_size: usize) -> ConsoleServer<Self> {
        ConsoleServer::new(self)
            .max_decoding_message_size(max_message_size)
            .max_encoding_message_size(max_message_size)
    }
}

fn change(followed: Followed) -> OperationChange {
    match followed {
        Followed::Changed(record) => OperationChange {
            name: record.name.clone(),
            change_time: Some(record.update_time.into()),
            info: Some(operation_info(&record)),
            deleted: false,
        },
        Followed::Deleted { name, time } => OperationChange {
            name,
            info: None,
            deleted: true,
            change_time: Some(time.into()),
        },
    }
}

type ChangeStream = Pin<Box<dyn Stream<Item = Result<OperationChange, Status>> + Send>>;

#[tonic::async_trait]
impl Console for ConsoleService {
    async fn list_operation_infos(
        &self,
        request: Request<ListOperationsRequest>,
    ) -> Result<Response<ListOperationInfosResponse>, Status> {
        let page = self.registry.list(list_request(request)).await?;
        Ok(Response::new(ListOperationInfosResponse {
            operations: page.records.iter().map(operation_info).collect(),
            next_page_token: page.next_page_token,
        }))
    }

    async fn get_operation_info(
        &self,
        request: Request<GetOperationRequest>,
    ) -> Result<Response<OperationInfo>, Status> {
        let record = self.registry.get(&request.get_ref().name).await?;
        Ok(linked(Response::new(operation_info(&record)), [&record]))
    }

    type WatchOperationChangesStream = ChangeStream;

    async fn watch_operation_changes(
        &self,
        request: Request<WatchOperationChangesRequest>,
    ) -> Result<Response<ChangeStream>, Status> {
        // What the caller may see, from the server's authorization.
        let visibility = request.extensions().get::<Visibility>().cloned();
        let request = request.into_inner();
        let changes = self.registry.follow(
            &request.parent,
            &request.filter,
            request.send_initial,
            visibility,
        )?;
        let stream = ReceiverStream::new(changes).map(|followed| match followed {
            Ok(followed) => Ok(change(followed)),
            Err(err) => Err(Status::from(err)),
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
