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

use super::{CancelPolicy, CreateParams, OperationName, Registry, ScriptSpec};
use crate::{error::Error, pb::opsd::v1::Scenario, store::parent_of};

/// A scenario file that cannot be read or applied.
#[derive(Debug, thiserror::Error)]
#[error("scenario {file}: {reason}")]
pub struct ScenarioError {
    file: String,
    reason: String,
}

/// A scenario checked at load: the file it came from, its name, and the
/// operations it creates.
#[derive(Clone, Debug)]
pub struct LoadedScenario {
    file: String,
    name: String,
    /// Each operation's name and what creates it.
    operations: Vec<(String, CreateParams)>,
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
    let operations = scenario
        .operations
        .iter()
        .map(|op| {
            operation_params(&scenario, op)
                .map(|params| (op.name.clone(), params))
                .map_err(|err| fail(format!("operation {:?}: {}", op.name, err.client_message())))
        })
        .collect::<Result<_, _>>()?;
    Ok(LoadedScenario {
        file,
        name: scenario.name,
        operations,
    })
}

/// What the registry is asked to create for one operation of a scenario.
fn operation_params(
    scenario: &Scenario,
    op: &crate::pb::opsd::v1::ScenarioOperation,
) -> Result<CreateParams, Error> {
    let name = OperationName::parse(&op.name)?;
    let mut script = match &op.script {
        Some(script) => ScriptSpec::from_wire(script)?,
        None => ScriptSpec::default(),
    };
    for method in &scenario.disabled_methods {
        if !script.disabled_methods.contains(method) {
            script.disabled_methods.push(method.clone());
        }
    }
    let id = name
        .as_str()
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_owned();
    Ok(CreateParams {
        parent: parent_of(name.as_str()).to_owned(),
        operation_id: id,
        request_id: request_id(&scenario.name, name.as_str()),
        metadata: op.metadata.clone(),
        cancel_policy: CancelPolicy::from_wire(op.cancel_policy)?,
        script: Some(script),
        ..Default::default()
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
        for (name, params) in &self.operations {
            registry
                .create(params.clone())
                .await
                .map_err(|err| ScenarioError {
                    file: self.file.clone(),
                    reason: format!("operation {name:?}: {}", err.client_message()),
                })?;
        }
        tracing::info!(file = %self.file, scenario = %self.name, operations = self.operations.len(), "scenario applied");
        Ok(self.operations.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(text: &str) -> Result<LoadedScenario, ScenarioError> {
        let dir = std::env::temp_dir().join(format!("opsd-scenario-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!(
            "{:x}.yaml",
            sha2::Sha256::digest(text.as_bytes())[0]
        ));
        std::fs::write(&path, text).unwrap();
        let pool = DescriptorPool::decode(crate::pb::FILE_DESCRIPTOR_SET).unwrap();
        let loaded = load(&path, &pool);
        std::fs::remove_file(&path).ok();
        loaded
    }

    use sha2::Digest;

    #[test]
    fn an_unknown_cancel_policy_fails_at_load_naming_file_and_operation() {
        let err =
            load_text("name: s\noperations:\n  - name: operations/odd\n    cancel_policy: 7\n")
                .unwrap_err()
                .to_string();
        assert!(err.starts_with("scenario "), "{err}");
        assert!(err.contains(".yaml"), "{err}");
        assert!(err.contains("operations/odd"), "{err}");
        assert!(err.contains("7 is not a CancelPolicy"), "{err}");
        let ok = load_text(
            "name: s\noperations:\n  - name: operations/c\n    cancel_policy: COOPERATIVE\n",
        )
        .unwrap();
        assert_eq!(ok.operations[0].1.cancel_policy, CancelPolicy::Cooperative);
    }

    #[test]
    fn a_bad_script_fails_at_load() {
        let err = load_text(
            "name: s\noperations:\n  - name: operations/x\n    script: {outcome: {after: 1s}}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("operations/x") && err.contains("script.outcome"),
            "{err}"
        );
    }
}
