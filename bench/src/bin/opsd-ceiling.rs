//! Reference ceilings for `opsd-bench`: the same APIs served by servers that
//! do nothing, so opsd's figures can be given as ratios measured in the same
//! run and layout.
//!
//! - gRPC: a bare tonic server whose `google.longrunning.Operations/GetOperation`
//!   answers `Operation{name}` at once (the other methods are UNIMPLEMENTED).
//! - REST: an axum server whose `GET /v1/{*name}` answers `{"name": ...}`.
//!
//! ```sh
//! cargo run --release -p opsd-bench --bin opsd-ceiling -- --grpc 127.0.0.1:50101 --rest 127.0.0.1:50102
//! ```
//!
//! It serves until interrupted.

use std::net::SocketAddr;

use opsd::api::grpc::operations_server::{Operations, OperationsServer};
use opsd::pb::google::longrunning::{
    CancelOperationRequest, DeleteOperationRequest, GetOperationRequest, ListOperationsRequest,
    ListOperationsResponse, Operation, WaitOperationRequest,
};
use tonic::{Request, Response, Status};

/// The allocator the opsd binary uses, so the ceiling differs from opsd only
/// in what the handlers do.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Answers GetOperation with the name it was asked for; nothing else.
struct NoOp;

#[tonic::async_trait]
impl Operations for NoOp {
    async fn list_operations(
        &self,
        _: Request<ListOperationsRequest>,
    ) -> Result<Response<ListOperationsResponse>, Status> {
        Err(Status::unimplemented("no-op ceiling"))
    }

    async fn get_operation(
        &self,
        request: Request<GetOperationRequest>,
    ) -> Result<Response<Operation>, Status> {
        Ok(Response::new(Operation {
            name: request.into_inner().name,
            ..Default::default()
        }))
    }

    async fn delete_operation(
        &self,
        _: Request<DeleteOperationRequest>,
    ) -> Result<Response<()>, Status> {
        Err(Status::unimplemented("no-op ceiling"))
    }

    async fn cancel_operation(
        &self,
        _: Request<CancelOperationRequest>,
    ) -> Result<Response<()>, Status> {
        Err(Status::unimplemented("no-op ceiling"))
    }

    async fn wait_operation(
        &self,
        _: Request<WaitOperationRequest>,
    ) -> Result<Response<Operation>, Status> {
        Err(Status::unimplemented("no-op ceiling"))
    }
}

fn address(args: &[String], flag: &str, default: &str) -> SocketAddr {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .map_or(default, String::as_str)
        .parse()
        .expect("an address such as 127.0.0.1:50101")
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let grpc = address(&args, "--grpc", "127.0.0.1:50101");
    let rest = address(&args, "--rest", "127.0.0.1:50102");

    let grpc_server = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(OperationsServer::new(NoOp))
        .serve(grpc);

    let app = axum::Router::new().route(
        "/v1/{*name}",
        axum::routing::get(
            |axum::extract::Path(name): axum::extract::Path<String>| async move {
                axum::Json(serde_json::json!({ "name": name }))
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind(rest)
        .await
        .expect("the REST address is free");
    let rest_server = axum::serve(listener, app);

    println!("no-op ceilings: gRPC on {grpc}, REST on {rest}");
    tokio::select! {
        result = grpc_server => result.expect("the gRPC ceiling serves"),
        result = rest_server => result.expect("the REST ceiling serves"),
        _ = tokio::signal::ctrl_c() => {}
    }
}
