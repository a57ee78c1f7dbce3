//! Scenario files: scripted operations created at start-up.
//!
//! A scenario is YAML in the shape of the `opsd.v1.Scenario` message
//! (proto field names or their JSON names; `Any` with `@type`, durations as
//! `"2s"`), read through prost-reflect like the service-config HTTP rules:
//!
//! ```yaml
//! name: basic
//! disabled_methods: [delete]        # for every operation of the scenario
//! operations:
//!   - name: operations/slow
//!     script:
//!       outcome: {after: 2s, response: {"@type": type.googleapis.com/google.protobuf.Empty}}
//! ```
//!
//! Each operation is created through the registry with a request id derived
//! from the scenario's name and the operation's (`scenario:<digest>`), so applying the same file again (or
//! restarting on a durable store) finds the operations it made instead of
//! duplicating or resetting them.

use std::path::Path;

use prost_reflect::{DescriptorPool, DynamicMessage};

use crate::{
    api::workers::script_spec,
    error::Error,
    pb::opsd::v1::{CancelPolicy as PbCancelPolicy, Scenario},
    registry::{CreateParams, OperationName, Registry, ScriptSpec},
    store::{parent_of, CancelPolicy},
};

/// A scenario file that cannot be read or applied.
#[derive(Debug, thiserror::Error)]
#[error("scenario {file}: {reason}")]
pub struct ScenarioError {
    file: String,
    reason: String,
}

/// A parsed scenario and the file it came from.
#[derive(Clone, Debug)]
pub struct LoadedScenario {
    pub file: String,
    pub scenario: Scenario,
}

/// Reads a scenario file; `pool` resolves the `@type`s of its `Any`s.
pub fn load(path: &Path, pool: &DescriptorPool) -> Result<LoadedScenario, ScenarioError> {
    let file = path.display().to_string();
    let fail = |reason: String| ScenarioError {
        file: file.clone(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read: {e}")))?;
    let mut document: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&text).map_err(|e| fail(format!("not YAML: {e}")))?;
    empty_any_with_value(&mut document);
    let descriptor = pool
        .get_message_by_name("opsd.v1.Scenario")
        .ok_or_else(|| fail("opsd.v1.Scenario is missing from the descriptor pool".into()))?;
    let scenario: Scenario = DynamicMessage::deserialize(descriptor, document)
        .map_err(|e| fail(format!("not an opsd.v1.Scenario: {e}")))?
        .transcode_to()
        .map_err(|e| fail(e.to_string()))?;
    if scenario.name.is_empty() {
        return Err(fail("the scenario needs a `name`".into()));
    }
    Ok(LoadedScenario {
        file: file.clone(),
        scenario,
    })
}

/// The request id of a scenario operation: stable across runs, short
/// whatever the names' lengths.
fn request_id(scenario: &str, name: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("{scenario}\0{name}").as_bytes());
    let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!("scenario:{hex}")
}

/// Accepts `{"@type": ".../google.protobuf.Empty"}` (protobuf's own
/// ProtoJSON for an Empty in an `Any`) as well as prost-reflect's form with
/// `value: {}`, which is what the deserializer needs.
fn empty_any_with_value(value: &mut serde_yaml_ng::Value) {
    use serde_yaml_ng::Value;
    match value {
        Value::Mapping(map) => {
            let is_empty_any = map
                .get("@type")
                .and_then(Value::as_str)
                .is_some_and(|t| t.ends_with("/google.protobuf.Empty"));
            if is_empty_any && !map.contains_key("value") {
                map.insert(Value::from("value"), Value::Mapping(Default::default()));
            }
            map.values_mut().for_each(empty_any_with_value);
        }
        Value::Sequence(items) => items.iter_mut().for_each(empty_any_with_value),
        _ => {}
    }
}

impl LoadedScenario {
    /// Creates the scenario's operations (or finds them from an earlier run).
    pub async fn apply(&self, registry: &Registry) -> Result<usize, ScenarioError> {
        let fail = |name: &str, err: Error| ScenarioError {
            file: self.file.clone(),
            reason: format!("operation {name:?}: {}", err.client_message()),
        };
        let scenario = &self.scenario;
        for op in &scenario.operations {
            let name = OperationName::parse(&op.name).map_err(|e| fail(&op.name, e.into()))?;
            let mut script = match &op.script {
                Some(script) => script_spec(script).map_err(|e| fail(&op.name, e))?,
                None => ScriptSpec::default(),
            };
            for method in &scenario.disabled_methods {
                if !script.disabled_methods.contains(method) {
                    script.disabled_methods.push(method.clone());
                }
            }
            let cancel_policy = match PbCancelPolicy::try_from(op.cancel_policy) {
                Ok(PbCancelPolicy::Cooperative) => CancelPolicy::Cooperative,
                Ok(PbCancelPolicy::NotCancellable) => CancelPolicy::NotCancellable,
                _ => CancelPolicy::Immediate,
            };
            let id = name
                .as_str()
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .to_owned();
            let params = CreateParams {
                parent: parent_of(name.as_str()).to_owned(),
                operation_id: id,
                request_id: request_id(&scenario.name, name.as_str()),
                metadata: op.metadata.clone(),
                cancel_policy,
                script: Some(script),
                ..Default::default()
            };
            registry
                .create(params)
                .await
                .map_err(|e| fail(&op.name, e))?;
        }
        tracing::info!(file = %self.file, scenario = %scenario.name, operations = scenario.operations.len(), "scenario applied");
        Ok(scenario.operations.len())
    }
}
