//! Google's Node client library (google-gax 5) against opsd, over gRPC and
//! the REST fallback: get, list paging, cancel-then-get, delete, and
//! `LROperation.promise()` of operations that complete, fail and are
//! cancelled (`tests/node/gax_client.js`). With the Python api-core tests
//! (`tests/google_client.rs`), the project's client-compatibility suite.
//!
//! Needs `node` and google-gax: `.ci/run` installs it into
//! `target/node/node_modules` (`npm install --prefix target/node
//! google-gax@5`); `$OPSD_NODE_MODULES` names another folder. Without them
//! the test reports itself ignored, and fails under `CI=true`.

mod common;

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use common::{
    create, op,
    outside::{self, Tool},
    scripted::{empty, secs},
    status, TestServer,
};
use opsd::pb::opsd::v1::{script_outcome, CreateOperationRequest, Script, ScriptOutcome};

fn main() -> ExitCode {
    let modules = find_gax();
    outside::run(vec![outside::test(
        "google_gax_operations_client_over_grpc_and_rest",
        &modules,
        |modules| outside::block_on(google_gax_operations_client_over_grpc_and_rest(modules)),
    )])
}

/// The `node_modules` folder that holds google-gax, or why there is none.
fn find_gax() -> Tool<PathBuf> {
    outside::find_node_modules(&["google-gax", "google-auth-library"], "google-gax@5")
}

fn scripted(id: &str, outcome: ScriptOutcome) -> CreateOperationRequest {
    CreateOperationRequest {
        script: Some(Script {
            outcome: Some(outcome),
            ..Default::default()
        }),
        ..op("projects/p/locations/l", id)
    }
}

async fn google_gax_operations_client_over_grpc_and_rest(modules: PathBuf) {
    let server = TestServer::start().await;
    let mut workers = server.workers().await;
    for transport in ["grpc", "rest"] {
        let id = |suffix: &str| format!("{transport}-{suffix}");
        for plain in ["get", "cancel", "delete", "cancelled"] {
            create(&mut workers, op("projects/p/locations/l", &id(plain))).await;
        }
        for page in 0..5 {
            create(
                &mut workers,
                op("projects/p/locations/l", &id(&format!("page-{page}"))),
            )
            .await;
        }
        let succeeds = ScriptOutcome {
            after: secs(1.0),
            result: Some(script_outcome::Result::Response(empty())),
        };
        create(&mut workers, scripted(&id("succeeds"), succeeds)).await;
        let fails = ScriptOutcome {
            after: secs(1.0),
            result: Some(script_outcome::Result::Error(status(8, "Quota exceeded."))),
        };
        create(&mut workers, scripted(&id("fails"), fails)).await;
    }
    let address = server.url.trim_start_matches("http://").to_owned();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/node/gax_client.js");
    let output = tokio::process::Command::new("node")
        .arg(&script)
        .arg(&address)
        .env("NODE_PATH", &modules)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "node failed:\n{stdout}\n{stderr}");
    assert_eq!(stdout.trim(), "ok", "{stderr}");
    server.stop().await;
}
