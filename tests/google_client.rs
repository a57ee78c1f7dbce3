//! Google's own Python client library against opsd: `google-api-core`'s
//! `AbstractOperationsClient` over REST and `OperationsClient` over gRPC, and
//! its `Operation` future against scripted operations.
//!
//! The Python interpreter is `$OPSD_PYTHON`, else `target/ci-venv/bin/python`
//! (which `.ci/run` creates), else `python3`; it needs
//! `pip install "google-api-core[grpc]"`. Without it the tests report
//! themselves ignored, and fail under `CI=true` (`tests/common/outside.rs`).

mod common;

use std::{path::PathBuf, process::ExitCode};

use common::{create, op, outside, TestServer};
use opsd::Config;

fn main() -> ExitCode {
    let python = outside::find_python(
        "google.api_core.operations_v1, grpc",
        "pip install \"google-api-core[grpc]\"",
    );
    outside::run(vec![
        outside::test(
            "google_api_core_operation_futures_on_scripted_operations",
            &python,
            |python| {
                outside::block_on(google_api_core_operation_futures_on_scripted_operations(
                    python,
                ))
            },
        ),
        outside::test(
            "google_api_core_lists_gets_cancels_and_deletes",
            &python,
            |python| outside::block_on(google_api_core_lists_gets_cancels_and_deletes(python)),
        ),
    ])
}

async fn run_script(python: &PathBuf, script: &str, server: &TestServer) {
    let address = server.url.trim_start_matches("http://").to_owned();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(script);
    let output = tokio::process::Command::new(python)
        .arg(&script)
        .arg(&address)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "python failed:\n{stdout}\n{stderr}"
    );
    assert_eq!(stdout.trim(), "ok", "{stderr}");
}

async fn google_api_core_operation_futures_on_scripted_operations(python: PathBuf) {
    let mut config = Config::for_tests();
    config.scenarios =
        vec![PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/scenarios/basic.yaml")];
    let server = TestServer::start_with(config).await;
    run_script(&python, "api_core_operation.py", &server).await;
    server.stop().await;
}

async fn google_api_core_lists_gets_cancels_and_deletes(python: PathBuf) {
    let mut config = Config::for_tests();
    config.rest.http_rules = vec![PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/service-configs/beyondcorp_v1.yaml")];
    let server = TestServer::start_with(config).await;
    let mut workers = server.workers().await;
    for id in ["rest-1", "rest-2", "grpc-1", "grpc-2"] {
        create(&mut workers, op("projects/p/locations/l", id)).await;
    }
    let address = server.url.trim_start_matches("http://").to_owned();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/api_core_client.py");
    let output = tokio::process::Command::new(&python)
        .arg(&script)
        .arg(&address)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "python failed:\n{stdout}\n{stderr}"
    );
    assert_eq!(stdout.trim(), "ok", "{stderr}");
    server.stop().await;
}
