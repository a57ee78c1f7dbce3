//! The registry's state machine against a simple model (proptest).

use std::collections::HashMap;

use proptest::prelude::*;
use tonic::Code;

use super::*;
use crate::store::MemoryStore;

#[derive(Clone, Debug)]
enum Step {
    Create(u8, CancelPolicy),
    Update(u8),
    Complete(u8, bool),
    Cancel(u8),
    Delete(u8),
    Get(u8),
}

/// What the model knows of one operation.
#[derive(Clone, Copy, Debug, PartialEq)]
enum State {
    Running {
        policy: CancelPolicy,
        cancel_requested: bool,
    },
    Succeeded,
    Failed,
    Cancelled,
}

fn step() -> impl Strategy<Value = Step> {
    let id = 0u8..4;
    let policy = prop_oneof![
        Just(CancelPolicy::Immediate),
        Just(CancelPolicy::Cooperative),
        Just(CancelPolicy::NotCancellable),
    ];
    prop_oneof![
        (id.clone(), policy).prop_map(|(i, p)| Step::Create(i, p)),
        id.clone().prop_map(Step::Update),
        (id.clone(), any::<bool>()).prop_map(|(i, ok)| Step::Complete(i, ok)),
        id.clone().prop_map(Step::Cancel),
        id.clone().prop_map(Step::Delete),
        id.prop_map(Step::Get),
    ]
}

fn name(id: u8) -> String {
    format!("projects/p/operations/op{id}")
}

fn code(result: &Result<impl Sized, Error>) -> Code {
    match result {
        Ok(_) => Code::Ok,
        Err(e) => e.code(),
    }
}

fn observed(record: &Record) -> State {
    match &record.outcome {
        None => State::Running {
            policy: record.cancel_policy,
            cancel_requested: record.cancel_deadline.is_some(),
        },
        Some(Outcome::Response(_)) => State::Succeeded,
        Some(Outcome::Error(s)) if s.code == CANCELLED_CODE => State::Cancelled,
        Some(Outcome::Error(_)) => State::Failed,
    }
}

async fn check(steps: Vec<Step>) -> Result<(), TestCaseError> {
    let registry = Registry::new(Arc::new(MemoryStore::new()), RegistrySettings::default());
    let mut model: HashMap<u8, State> = HashMap::new();
    for step in steps {
        match step {
            Step::Create(id, policy) => {
                let params = CreateParams {
                    parent: "projects/p".into(),
                    operation_id: format!("op{id}"),
                    cancel_policy: policy,
                    ..Default::default()
                };
                let got = code(&registry.create(params).await);
                let expected = match model.entry(id) {
                    std::collections::hash_map::Entry::Occupied(_) => Code::AlreadyExists,
                    std::collections::hash_map::Entry::Vacant(slot) => {
                        slot.insert(State::Running {
                            policy,
                            cancel_requested: false,
                        });
                        Code::Ok
                    }
                };
                prop_assert_eq!(got, expected);
            }
            Step::Update(id) => {
                let got = code(&registry.update(&name(id), None).await);
                let expected = match model.get(&id) {
                    None => Code::NotFound,
                    Some(State::Running { .. }) => Code::Ok,
                    Some(_) => Code::FailedPrecondition,
                };
                prop_assert_eq!(got, expected);
            }
            Step::Complete(id, success) => {
                let outcome = if success {
                    Outcome::Response(pack(&"ok".to_owned()))
                } else {
                    Outcome::Error(rpc::Status {
                        code: 13,
                        message: "boom".into(),
                        details: vec![],
                    })
                };
                let got = code(&registry.complete(&name(id), outcome, None).await);
                let expected = match model.get(&id) {
                    None => Code::NotFound,
                    Some(State::Running { .. }) => {
                        model.insert(
                            id,
                            if success {
                                State::Succeeded
                            } else {
                                State::Failed
                            },
                        );
                        Code::Ok
                    }
                    Some(_) => Code::FailedPrecondition,
                };
                prop_assert_eq!(got, expected);
            }
            Step::Cancel(id) => {
                let got = code(&registry.cancel(&name(id)).await);
                let expected = match model.get(&id).copied() {
                    None => Code::NotFound,
                    Some(State::Running { policy, .. }) => match policy {
                        CancelPolicy::NotCancellable => Code::FailedPrecondition,
                        CancelPolicy::Immediate => {
                            model.insert(id, State::Cancelled);
                            Code::Ok
                        }
                        CancelPolicy::Cooperative => {
                            model.insert(
                                id,
                                State::Running {
                                    policy,
                                    cancel_requested: true,
                                },
                            );
                            Code::Ok
                        }
                    },
                    Some(_) => Code::Ok,
                };
                prop_assert_eq!(got, expected);
            }
            Step::Delete(id) => {
                let got = code(&registry.delete(&name(id)).await);
                let expected = match model.remove(&id) {
                    None => Code::NotFound,
                    Some(_) => Code::Ok,
                };
                prop_assert_eq!(got, expected);
            }
            Step::Get(id) => {
                let got = registry.get(&name(id)).await;
                match model.get(&id) {
                    None => prop_assert_eq!(code(&got), Code::NotFound),
                    Some(state) => {
                        let record = got.map_err(|e| TestCaseError::fail(e.to_string()))?;
                        prop_assert_eq!(observed(&record), *state);
                        let op = operation(&record);
                        prop_assert_eq!(op.done, op.result.is_some());
                    }
                }
            }
        }
    }
    // Every operation the model holds is there, in the state it expects.
    for (id, state) in &model {
        let record = registry
            .get(&name(*id))
            .await
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(observed(&record), *state);
    }
    prop_assert_eq!(registry.operation_count().await.unwrap(), model.len());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]
    #[test]
    fn registry_follows_the_model(steps in proptest::collection::vec(step(), 1..40)) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(check(steps))?;
    }
}

#[tokio::test]
async fn retention_expiry_is_not_found_even_before_the_timer() {
    let settings = RegistrySettings {
        retention: Duration::from_millis(1),
        ..RegistrySettings::default()
    };
    let registry = Registry::new(Arc::new(MemoryStore::new()), settings);
    let params = CreateParams {
        operation_id: "x".into(),
        ..Default::default()
    };
    let record = registry.create(params).await.unwrap();
    registry.cancel(&record.name).await.unwrap();
    std::thread::sleep(Duration::from_millis(5));
    assert_eq!(
        registry.get(&record.name).await.unwrap_err().code(),
        Code::NotFound
    );
}
