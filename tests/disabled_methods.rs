//! Methods switched off on the server answer UNIMPLEMENTED.

mod common;

use common::{
    calls::{cancel, delete, get},
    create, op, reason, TestServer,
};
use opsd::{api::operations::Method, Config};
use tonic::Code;

#[tokio::test]
async fn disabled_methods_answer_unimplemented() {
    let mut config = Config::for_tests();
    config.operations.disabled_methods = Method::ALL.into_iter().collect();
    let server = TestServer::start_with(config).await;
    let (mut ops, mut workers) = (server.operations().await, server.workers().await);
    let name = create(&mut workers, op("", "x")).await.name;

    let errors = [
        ops.cancel_operation(cancel(&name)).await.unwrap_err(),
        ops.delete_operation(delete(&name)).await.unwrap_err(),
        ops.list_operations(opsd::pb::google::longrunning::ListOperationsRequest {
            name: "operations".into(),
            ..Default::default()
        })
        .await
        .unwrap_err(),
        ops.wait_operation(opsd::pb::google::longrunning::WaitOperationRequest {
            name: name.clone(),
            timeout: None,
        })
        .await
        .unwrap_err(),
    ];
    for err in errors {
        assert_eq!(err.code(), Code::Unimplemented);
        assert_eq!(reason(&err), "METHOD_DISABLED");
        assert!(err.message().contains("is disabled on this server"));
    }
    // Get still works, and nothing was cancelled or deleted.
    assert!(
        !ops.get_operation(get(&name))
            .await
            .unwrap()
            .into_inner()
            .done
    );
    server.stop().await;
}
