//! Concurrent calls on one operation end in exactly one terminal transition.

mod common;

use common::{any_string, create, op, TestServer};
use opsd::pb::{
    google::longrunning::{
        operation::Result as OpResult, CancelOperationRequest, DeleteOperationRequest,
        GetOperationRequest,
    },
    opsd::v1::{
        complete_operation_request, operation_event::Type as EventType, CompleteOperationRequest,
        WatchOperationsRequest,
    },
};
use tonic::Code;

#[tokio::test]
async fn thirty_two_parallel_cancels_all_succeed_with_one_terminal_state() {
    let server = TestServer::start().await;
    let (ops, mut workers) = (server.operations().await, server.workers().await);
    let name = create(&mut workers, op("projects/race", "target"))
        .await
        .name;
    let sentinel = create(&mut workers, op("projects/race", "sentinel"))
        .await
        .name;
    let mut events = workers
        .watch_operations(WatchOperationsRequest {
            parent: "projects/race".into(),
            names: vec![],
        })
        .await
        .unwrap()
        .into_inner();

    let cancels: Vec<_> = (0..32)
        .map(|_| {
            let mut ops = ops.clone();
            let name = name.clone();
            tokio::spawn(async move { ops.cancel_operation(CancelOperationRequest { name }).await })
        })
        .collect();
    for cancel in cancels {
        cancel.await.unwrap().expect("every cancel is OK");
    }
    let mut ops = ops;
    ops.delete_operation(DeleteOperationRequest {
        name: sentinel.clone(),
    })
    .await
    .unwrap();

    // Exactly one cancellation event before the sentinel's deletion.
    let mut cancelled = 0;
    loop {
        let event = events.message().await.unwrap().unwrap();
        if event.name == sentinel {
            assert_eq!(event.r#type(), EventType::Deleted);
            break;
        }
        assert_eq!(event.name, name);
        cancelled += 1;
    }
    assert_eq!(cancelled, 1);
    let got = ops
        .get_operation(GetOperationRequest { name })
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(got.result, Some(OpResult::Error(ref e)) if e.code == 1));
    server.stop().await;
}

#[tokio::test]
async fn complete_versus_cancel_races_end_in_exactly_one_outcome() {
    const ROUNDS: usize = 1000;
    let server = TestServer::start().await;
    let (ops, mut workers) = (server.operations().await, server.workers().await);
    let (mut completions_won, mut cancels_won) = (0, 0);
    for round in 0..ROUNDS {
        let name = create(&mut workers, op("projects/race", &format!("r{round}")))
            .await
            .name;
        let complete = {
            let mut workers = workers.clone();
            let request = CompleteOperationRequest {
                name: name.clone(),
                result: Some(complete_operation_request::Result::Response(any_string(
                    "won",
                ))),
                metadata: None,
            };
            tokio::spawn(async move { workers.complete_operation(request).await })
        };
        let cancel = {
            let mut ops = ops.clone();
            let name = name.clone();
            tokio::spawn(async move { ops.cancel_operation(CancelOperationRequest { name }).await })
        };
        let (complete, cancel) = (complete.await.unwrap(), cancel.await.unwrap());
        cancel.expect("cancel is OK whether or not the operation was done");
        let got = ops
            .clone()
            .get_operation(GetOperationRequest { name })
            .await
            .unwrap()
            .into_inner();
        assert!(got.done);
        match complete {
            Ok(_) => {
                assert_eq!(
                    got.result,
                    Some(OpResult::Response(any_string("won"))),
                    "round {round}"
                );
                completions_won += 1;
            }
            Err(err) => {
                assert_eq!(err.code(), Code::FailedPrecondition, "round {round}");
                assert!(
                    matches!(got.result, Some(OpResult::Error(ref e)) if e.code == 1),
                    "round {round}"
                );
                cancels_won += 1;
            }
        }
    }
    assert_eq!(completions_won + cancels_won, ROUNDS);
    eprintln!("completions won {completions_won}, cancels won {cancels_won}");
    server.stop().await;
}
