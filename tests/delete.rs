//! DeleteOperation: running operations too, without cancelling them.

mod common;

use common::{
    calls::{delete, get, respond},
    create, op, TestServer,
};
use opsd::pb::opsd::v1::UpdateOperationRequest;
use tonic::Code;

#[tokio::test]
async fn delete_removes_a_running_operation_without_cancelling_it() {
    let server = TestServer::start().await;
    let (mut ops, mut workers) = (server.operations().await, server.workers().await);
    let name = create(&mut workers, op("projects/p", "running")).await.name;
    ops.delete_operation(delete(&name)).await.unwrap();

    let err = ops.get_operation(get(&name)).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = ops.delete_operation(delete(&name)).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // Later worker calls on it are NOT_FOUND too.
    let err = workers
        .complete_operation(respond(&name, "x"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = workers
        .update_operation(UpdateOperationRequest {
            name: name.clone(),
            metadata: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    server.stop().await;
}
