//! The `opsd` binary as users run it: `--help`, and a clean SIGTERM drain.
//! (grpcurl against it: `tests/grpcurl.rs`.)

mod common;

use std::{
    process::Command,
    time::{Duration, Instant},
};

use common::binary::Opsd;

#[test]
fn sigterm_drains_open_waits_and_exits_zero() {
    let mut opsd = Opsd::start(&["--drain-timeout", "5s", "--store", "memory"]);
    let url = format!("http://{}", opsd.address);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    use opsd::pb::{
        google::longrunning::{operations_client::OperationsClient, WaitOperationRequest},
        opsd::v1::{workers_client::WorkersClient, CreateOperationRequest},
    };
    let name = runtime.block_on(async {
        let mut workers = WorkersClient::connect(url.clone()).await.unwrap();
        let request = CreateOperationRequest {
            operation_id: "long".into(),
            ..Default::default()
        };
        workers
            .create_operation(request)
            .await
            .unwrap()
            .into_inner()
            .name
    });
    let waiting = runtime.spawn(async move {
        let mut ops = OperationsClient::connect(url).await.unwrap();
        ops.wait_operation(WaitOperationRequest {
            name,
            timeout: None,
        })
        .await
    });
    // The Wait is parked once the server's gauge counts it.
    let metrics = format!("http://{}/metrics", opsd.address);
    runtime.block_on(async {
        let http = reqwest::Client::new();
        let give_up = Instant::now() + Duration::from_secs(10);
        loop {
            let text = http
                .get(&metrics)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            if text.contains("\nopsd_waiters 1\n") {
                break;
            }
            assert!(Instant::now() < give_up, "the Wait never parked");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let started = Instant::now();
    let status = opsd.terminate();
    assert!(status.success(), "opsd exited with {status}");
    let op = runtime
        .block_on(waiting)
        .unwrap()
        .expect("the open Wait returns OK with the latest state")
        .into_inner();
    assert!(!op.done);
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn help_documents_every_serve_flag() {
    let output = Command::new(env!("CARGO_BIN_EXE_opsd"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8(output.stdout).unwrap();
    for flag in [
        "--listen",
        "--store",
        "--retention",
        "--disable-method",
        "--log-format",
        "--wait-cap",
        "--drain-timeout",
        "--header-read-timeout",
        "--body-read-timeout",
        "--idle-timeout",
        "--min-ping-interval",
        "--max-connections",
        "--max-in-flight",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
    let bad = Command::new(env!("CARGO_BIN_EXE_opsd"))
        .args(["serve", "--store", "nowhere"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown store"));
}
