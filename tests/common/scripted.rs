//! Scripted operations' test helpers: scenario files, scripts, and calls
//! on one server.

use std::{path::PathBuf, time::Duration};

use opsd::{
    pb::{
        google::longrunning::{GetOperationRequest, Operation, WaitOperationRequest},
        opsd::v1::{script_outcome, ScriptOutcome},
    },
    Config,
};

use super::{any_string, TestServer};

pub fn scenario(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("examples/scenarios")
        .join(name)
}

pub fn with_scenarios(names: &[&str]) -> Config {
    let mut config = Config::for_tests();
    config.scenarios = names.iter().map(|n| scenario(n)).collect();
    config
}

pub fn secs(s: f64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration::try_from(Duration::from_secs_f64(s)).unwrap())
}

pub fn respond_after(s: f64, value: &str) -> ScriptOutcome {
    ScriptOutcome {
        after: secs(s),
        result: Some(script_outcome::Result::Response(any_string(value))),
    }
}

pub async fn get(server: &TestServer, name: &str) -> Result<Operation, tonic::Status> {
    let mut ops = server.operations().await;
    ops.get_operation(GetOperationRequest { name: name.into() })
        .await
        .map(|r| r.into_inner())
}

pub async fn wait(server: &TestServer, name: &str, seconds: f64) -> Operation {
    let mut ops = server.operations().await;
    ops.wait_operation(WaitOperationRequest {
        name: name.into(),
        timeout: secs(seconds),
    })
    .await
    .unwrap()
    .into_inner()
}

pub fn empty() -> prost_types::Any {
    prost_types::Any::from_msg(&()).unwrap()
}
