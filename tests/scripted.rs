//! Scripted operations: scenario files, scripts through the worker API,
//! polling reports, strict REST clients, and scripts across a restart.

mod common;

use std::{path::PathBuf, time::Duration};

use common::{any_string, create, eventually, manual_clock, op, reason, status, TestServer};
use opsd::{
    config::StoreConfig,
    pb::{
        google::longrunning::{
            operation::Result as OpResult, CancelOperationRequest, DeleteOperationRequest,
            GetOperationRequest, Operation, WaitOperationRequest,
        },
        opsd::v1::{
            script_outcome, CancelPolicy, CreateOperationRequest, GetOperationReportRequest,
            Script, ScriptOutcome, ScriptStep,
        },
    },
    Config,
};
use serde_json::Value;
use tonic::Code;

fn scenario(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("examples/scenarios")
        .join(name)
}

fn with_scenarios(names: &[&str]) -> Config {
    let mut config = Config::for_tests();
    config.scenarios = names.iter().map(|n| scenario(n)).collect();
    config
}

fn secs(s: f64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration::try_from(Duration::from_secs_f64(s)).unwrap())
}

fn respond_after(s: f64, value: &str) -> ScriptOutcome {
    ScriptOutcome {
        after: secs(s),
        result: Some(script_outcome::Result::Response(any_string(value))),
    }
}

async fn get(server: &TestServer, name: &str) -> Result<Operation, tonic::Status> {
    let mut ops = server.operations().await;
    ops.get_operation(GetOperationRequest { name: name.into() })
        .await
        .map(|r| r.into_inner())
}

async fn wait(server: &TestServer, name: &str, seconds: f64) -> Operation {
    let mut ops = server.operations().await;
    ops.wait_operation(WaitOperationRequest {
        name: name.into(),
        timeout: secs(seconds),
    })
    .await
    .unwrap()
    .into_inner()
}

fn empty() -> prost_types::Any {
    prost_types::Any::from_msg(&()).unwrap()
}

#[tokio::test]
async fn the_basic_scenario_serves_every_state() {
    let mut config = with_scenarios(&["basic.yaml"]);
    let clock = manual_clock(&mut config);
    let server = TestServer::start_with(config).await;

    let running = get(&server, "operations/running").await.unwrap();
    assert!(!running.done);
    assert_eq!(running.metadata, Some(any_string("started")));
    let succeeded = get(&server, "operations/succeeded").await.unwrap();
    assert_eq!(succeeded.result, Some(OpResult::Response(empty())));
    let failed = get(&server, "operations/failed").await.unwrap();
    assert!(matches!(failed.result, Some(OpResult::Error(ref e)) if e.code == 13));

    // slow: each step when its time comes, done with Empty 2 s after start.
    let progress = |op: &Operation| op.metadata.as_ref().unwrap().to_msg::<String>().unwrap();
    let slow = get(&server, "operations/slow").await.unwrap();
    assert_eq!(progress(&slow), "0%");
    for expected in ["25%", "50%", "75%"] {
        clock.advance(Duration::from_millis(499));
        assert!(!get(&server, "operations/slow").await.unwrap().done);
        clock.advance(Duration::from_millis(1));
        eventually(expected, || async {
            progress(&get(&server, "operations/slow").await.unwrap()) == expected
        })
        .await;
    }
    clock.advance(Duration::from_millis(500));
    let done = wait(&server, "operations/slow", 5.0).await;
    assert_eq!(done.result, Some(OpResult::Response(empty())));
    assert_eq!(progress(&done), "75%");

    let mut ops = server.operations().await;
    let err = ops
        .cancel_operation(CancelOperationRequest {
            name: "operations/stubborn".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(reason(&err), "OPERATION_NOT_CANCELLABLE");
    // Cancelling the forever-running one ends it.
    ops.cancel_operation(CancelOperationRequest {
        name: "operations/running".into(),
    })
    .await
    .unwrap();
    assert!(get(&server, "operations/running").await.unwrap().done);
    server.stop().await;
}

#[tokio::test]
async fn cancellation_scenarios_react_as_scripted() {
    let mut config = with_scenarios(&["cancellation.yaml"]);
    let clock = manual_clock(&mut config);
    let server = TestServer::start_with(config).await;
    let mut ops = server.operations().await;
    for name in ["cancel-immediately", "cancel-slowly", "ignore-cancel"] {
        ops.cancel_operation(CancelOperationRequest {
            name: format!("operations/{name}"),
        })
        .await
        .unwrap();
    }
    let immediately = get(&server, "operations/cancel-immediately").await.unwrap();
    assert!(matches!(immediately.result, Some(OpResult::Error(ref e)) if e.code == 1));
    // The cooperative ones are still running right after the cancel...
    assert!(!get(&server, "operations/cancel-slowly").await.unwrap().done);
    // ...then react as their scripts say, when their scripts say.
    clock.advance(Duration::from_millis(500));
    let ignored = wait(&server, "operations/ignore-cancel", 5.0).await;
    assert_eq!(
        ignored.result,
        Some(OpResult::Response(any_string("finished anyway")))
    );
    assert!(!get(&server, "operations/cancel-slowly").await.unwrap().done);
    clock.advance(Duration::from_millis(500));
    let slowly = wait(&server, "operations/cancel-slowly", 5.0).await;
    assert!(
        matches!(slowly.result, Some(OpResult::Error(ref e)) if e.code == 1 && e.message == "Stopped at the client's request.")
    );
    server.stop().await;
}

#[tokio::test]
async fn scenario_methods_can_be_switched_off() {
    let mut config = with_scenarios(&["unimplemented.yaml"]);
    let clock = manual_clock(&mut config);
    let server = TestServer::start_with(config).await;
    let mut ops = server.operations().await;
    let name = "operations/poll-only".to_owned();
    let errors = [
        ops.cancel_operation(CancelOperationRequest { name: name.clone() })
            .await
            .unwrap_err(),
        ops.delete_operation(DeleteOperationRequest { name: name.clone() })
            .await
            .unwrap_err(),
        ops.wait_operation(WaitOperationRequest {
            name: name.clone(),
            timeout: None,
        })
        .await
        .unwrap_err(),
    ];
    for err in errors {
        assert_eq!(err.code(), Code::Unimplemented);
        assert!(
            err.message().contains("for this operation"),
            "{}",
            err.message()
        );
    }
    // Polling Get still works, and the outcome arrives on time.
    assert!(!get(&server, &name).await.unwrap().done);
    clock.advance(Duration::from_secs(1));
    eventually("the outcome", || async {
        get(&server, &name).await.unwrap().done
    })
    .await;
    server.stop().await;
}

#[tokio::test]
async fn scripts_through_the_worker_api() {
    let mut config = Config::for_tests();
    let clock = manual_clock(&mut config);
    let server = TestServer::start_with(config).await;
    let mut workers = server.workers().await;
    let script = Script {
        steps: vec![
            ScriptStep {
                after: secs(0.1),
                metadata: Some(any_string("a")),
            },
            ScriptStep {
                after: secs(0.2),
                metadata: Some(any_string("b")),
            },
        ],
        outcome: Some(ScriptOutcome {
            after: secs(0.3),
            result: Some(script_outcome::Result::Error(status(8, "quota"))),
        }),
        ..Default::default()
    };
    let request = CreateOperationRequest {
        script: Some(script),
        ..op("projects/s", "failing")
    };
    let name = create(&mut workers, request).await.name;
    clock.advance(Duration::from_millis(100));
    eventually("step a", || async {
        get(&server, &name).await.unwrap().metadata == Some(any_string("a"))
    })
    .await;
    clock.advance(Duration::from_millis(200));
    let done = wait(&server, &name, 5.0).await;
    assert_eq!(done.metadata, Some(any_string("b")));
    assert!(matches!(done.result, Some(OpResult::Error(ref e)) if e.code == 8));

    // No outcome: it never completes by itself.
    let forever = CreateOperationRequest {
        script: Some(Script {
            steps: vec![ScriptStep {
                after: secs(0.05),
                metadata: Some(any_string("x")),
            }],
            ..Default::default()
        }),
        ..op("projects/s", "forever")
    };
    let name = create(&mut workers, forever).await.name;
    clock.advance(Duration::from_secs(3600));
    eventually("step x", || async {
        get(&server, &name).await.unwrap().metadata == Some(any_string("x"))
    })
    .await;
    let waited = wait(&server, &name, 0.05).await;
    assert!(!waited.done);

    // Invalid scripts are refused with the field named.
    let bad = CreateOperationRequest {
        script: Some(Script {
            disabled_methods: vec!["get".into()],
            ..Default::default()
        }),
        ..op("projects/s", "bad")
    };
    let err = workers.create_operation(bad).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let bad = CreateOperationRequest {
        script: Some(Script {
            outcome: Some(ScriptOutcome {
                after: secs(1.0),
                result: None,
            }),
            ..Default::default()
        }),
        ..op("projects/s", "bad")
    };
    assert_eq!(
        workers.create_operation(bad).await.unwrap_err().code(),
        Code::InvalidArgument
    );

    // A scripted cooperative operation without on_cancel stops at once.
    let coop = CreateOperationRequest {
        cancel_policy: CancelPolicy::Cooperative as i32,
        script: Some(Script {
            outcome: Some(respond_after(60.0, "late")),
            ..Default::default()
        }),
        ..op("projects/s", "coop")
    };
    let name = create(&mut workers, coop).await.name;
    let mut ops = server.operations().await;
    ops.cancel_operation(CancelOperationRequest { name: name.clone() })
        .await
        .unwrap();
    let cancelled = wait(&server, &name, 5.0).await;
    assert!(matches!(cancelled.result, Some(OpResult::Error(ref e)) if e.code == 1));
    server.stop().await;
}

#[tokio::test]
async fn polling_reports_over_grpc_and_rest() {
    let mut config = with_scenarios(&["basic.yaml"]);
    let clock = manual_clock(&mut config);
    let server = TestServer::start_with(config).await;
    let mut workers = server.workers().await;
    let http = reqwest::Client::new();
    let name = "operations/running";
    for _ in 0..3 {
        get(&server, name).await.unwrap();
        clock.advance(Duration::from_millis(30));
    }
    let url = format!("{}/v1/{name}", server.url);
    assert_eq!(http.get(&url).send().await.unwrap().status(), 200);

    let report = workers
        .get_operation_report(GetOperationReportRequest { name: name.into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.name, name);
    assert_eq!(report.counts["GetOperation"], 4);
    let transports: Vec<&str> = report.calls.iter().map(|c| c.transport.as_str()).collect();
    assert_eq!(transports, ["grpc", "grpc", "grpc", "rest"]);
    // Each call at the time it was made: 30 ms apart.
    let times: Vec<_> = report
        .calls
        .iter()
        .map(|c| std::time::SystemTime::try_from(c.time.unwrap()).unwrap())
        .collect();
    assert!(times
        .windows(2)
        .all(|w| w[1].duration_since(w[0]).unwrap() == Duration::from_millis(30)));

    let body: Value = http
        .get(format!("{url}:report"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["name"], name);
    assert_eq!(body["counts"]["GetOperation"], "4");
    assert_eq!(body["calls"].as_array().unwrap().len(), 4);
    assert_eq!(body["calls"][0]["method"], "GetOperation");

    let missing = http
        .get(format!("{}/v1/operations/nope:report", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    // Operations that are not scripted have no report by default.
    let plain = create(&mut workers, op("", "plain")).await.name;
    get(&server, &plain).await.unwrap();
    let report = workers
        .get_operation_report(GetOperationReportRequest { name: plain })
        .await
        .unwrap()
        .into_inner();
    assert!(report.calls.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn strict_mode_wants_generated_rest_clients() {
    let mut config = with_scenarios(&["basic.yaml"]);
    config.rest.strict_clients = true;
    let server = TestServer::start_with(config).await;
    let http = reqwest::Client::new();
    let url = format!("{}/v1/operations/running", server.url);
    let refused = http.get(&url).send().await.unwrap();
    assert_eq!(refused.status(), 400);
    let body: Value = refused.json().await.unwrap();
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("x-goog-api-client"));
    let accepted = http
        .get(&url)
        .header("x-goog-api-client", "gl-python/3.11 rest/2.0 gapic/1.0")
        .send()
        .await
        .unwrap();
    assert_eq!(accepted.status(), 200);
    // gRPC is not affected.
    assert!(get(&server, "operations/running").await.is_ok());
    server.stop().await;
}

#[tokio::test]
async fn scripts_survive_a_restart_and_scenarios_reapply_idempotently() {
    let dir = std::env::temp_dir().join(format!("opsd-scripted-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut config = with_scenarios(&["basic.yaml"]);
    config.store = StoreConfig::Redb(dir.join("opsd.redb"));
    // Both servers read the same clock, as two runs read the wall clock.
    let clock = manual_clock(&mut config);

    let server = TestServer::start_with(config.clone()).await;
    let mut ops = server.operations().await;
    ops.cancel_operation(CancelOperationRequest {
        name: "operations/running".into(),
    })
    .await
    .unwrap();
    clock.advance(Duration::from_secs(1));
    eventually("half of slow", || async {
        get(&server, "operations/slow").await.unwrap().metadata == Some(any_string("50%"))
    })
    .await;
    drop(ops);
    server.stop().await;

    // Restart on the same file with the same scenario: nothing is reset or
    // duplicated, and the slow operation still finishes on its original schedule.
    let server = loop {
        match opsd::server::Server::new(config.clone()) {
            Ok(server) => break TestServer::serve(server).await,
            Err(err) if err.to_string().contains("in use") => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(err) => panic!("{err}"),
        }
    };
    assert_eq!(server.registry.operation_counts().await.unwrap().total(), 5);
    let running = get(&server, "operations/running").await.unwrap();
    assert!(running.done, "the cancel before the restart stands");
    let slow = get(&server, "operations/slow").await.unwrap();
    assert!(!slow.done, "not reset, not hurried: {slow:?}");
    assert_eq!(slow.metadata, Some(any_string("50%")));
    // The rest of the original schedule: done 2 s after the first start.
    clock.advance(Duration::from_secs(1));
    let slow = wait(&server, "operations/slow", 10.0).await;
    assert!(slow.done);
    server.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
