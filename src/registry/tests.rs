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
    prop_assert_eq!(
        registry.operation_counts().await.unwrap().total(),
        model.len() as u64
    );
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
    let clock = super::ManualClock::new();
    let settings = RegistrySettings {
        retention: Duration::from_millis(1),
        clock: clock.clone().into(),
        ..RegistrySettings::default()
    };
    let registry = Registry::new(Arc::new(MemoryStore::new()), settings);
    let params = CreateParams {
        operation_id: "x".into(),
        ..Default::default()
    };
    let record = registry.create(params).await.unwrap();
    registry.cancel(&record.name).await.unwrap();
    assert!(registry.get(&record.name).await.is_ok());
    // The clock passes the expiry; the deadline task has not run (this
    // test's runtime runs nothing in the meantime).
    clock.advance(Duration::from_millis(1));
    assert_eq!(
        registry.get(&record.name).await.unwrap_err().code(),
        Code::NotFound
    );
}

/// Filters and pagination: the store path against the reference evaluator.
mod listing {
    use std::time::SystemTime;

    use proptest::prelude::*;

    use super::super::filter;
    use super::*;
    use crate::store::{RedbStore, Store};

    fn base_time() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    /// (parent, outcome kind, error code, metadata type, response type, create offset)
    type Spec = (u8, u8, i32, Option<u8>, u8, u64);

    fn record(i: usize, spec: &Spec) -> Record {
        let (parent, kind, code, metadata, response, offset) = *spec;
        let any = |t: u8| prost_types::Any {
            type_url: format!("type.googleapis.com/acme.T{t}"),
            value: vec![],
        };
        let created = base_time() + Duration::from_secs(offset);
        let outcome = match kind % 3 {
            0 => None,
            1 => Some(Outcome::Response(any(response))),
            _ => Some(Outcome::Error(rpc::Status {
                code,
                message: "m".into(),
                details: vec![],
            })),
        };
        // Parent 3 sits a level deeper, under the same key prefix.
        let name = if parent == 3 {
            format!("projects/p1/locations/l/operations/op{i:03}")
        } else {
            format!("projects/p{parent}/operations/op{i:03}")
        };
        Record {
            name,
            revision: 0,
            metadata: metadata.map(any),
            done_time: outcome.as_ref().map(|_| created),
            outcome,
            cancel_policy: CancelPolicy::Immediate,
            cancel_grace_period: Duration::from_secs(30),
            cancel_deadline: None,
            lease: None,
            lease_deadline: None,
            request_id: None,
            create_time: created,
            update_time: created + Duration::from_secs(offset % 7),
            expire_time: None,
            script: None,
            trace: None,
        }
    }

    fn spec() -> impl Strategy<Value = Spec> {
        (
            0u8..3,
            0u8..3,
            1i32..17,
            proptest::option::of(0u8..3),
            0u8..3,
            0u64..100,
        )
    }

    fn restriction() -> impl Strategy<Value = String> {
        let ordering = prop_oneof![
            Just("="),
            Just("!="),
            Just("<"),
            Just("<="),
            Just(">"),
            Just(">=")
        ];
        let equality = prop_oneof![Just("="), Just("!=")];
        let time =
            |s: u64| humantime::format_rfc3339(base_time() + Duration::from_secs(s)).to_string();
        prop_oneof![
            (equality.clone(), any::<bool>()).prop_map(|(op, b)| format!("done {op} {b}")),
            (equality.clone(), 0u8..4).prop_map(|(op, p)| format!("name {op} \"projects/p{p}/*\"")),
            (equality.clone(), 0u8..20).prop_map(|(op, i)| format!("name {op} \"*op{i:03}\"")),
            (ordering.clone(), 0i32..18).prop_map(|(op, c)| format!("error.code {op} {c}")),
            Just("error:*".to_owned()),
            Just("response:*".to_owned()),
            Just("metadata:*".to_owned()),
            (equality.clone(), 0u8..4)
                .prop_map(|(op, t)| format!("metadata.@type {op} \"*acme.T{t}\"")),
            (equality, 0u8..4).prop_map(|(op, t)| format!(
                "response.@type {op} \"type.googleapis.com/acme.T{t}\""
            )),
            (ordering.clone(), 0u64..100)
                .prop_map(move |(op, s)| format!("create_time {op} \"{}\"", time(s))),
            (ordering, 0u64..100)
                .prop_map(move |(op, s)| format!("update_time {op} \"{}\"", time(s))),
        ]
    }

    fn filter_text() -> impl Strategy<Value = String> {
        restriction().prop_recursive(3, 12, 2, |inner| {
            prop_oneof![
                (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("({a}) AND ({b})")),
                (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("{a} OR {b}")),
                (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("({a}) ({b})")),
                inner.clone().prop_map(|a| format!("NOT ({a})")),
                inner.prop_map(|a| format!("-({a})")),
            ]
        })
    }

    /// Every page of a filtered listing, walked with `page_size`.
    async fn walk(registry: &Registry, name: &str, filter: &str, page_size: i32) -> Vec<String> {
        let mut names = Vec::new();
        let mut token = String::new();
        loop {
            let page = registry
                .list(ListRequest {
                    name: name.into(),
                    filter: filter.into(),
                    page_size,
                    page_token: token,
                    ..Default::default()
                })
                .await
                .unwrap();
            assert!(page.records.len() <= page_size as usize);
            names.extend(page.records.into_iter().map(|o| o.name));
            if page.next_page_token.is_empty() {
                return names;
            }
            token = page.next_page_token;
        }
    }

    async fn differential(
        store: Arc<dyn Store>,
        specs: &[Spec],
        filter: &str,
        page_size: i32,
        budget: usize,
    ) -> Result<(), TestCaseError> {
        let mut records = Vec::new();
        for (i, spec) in specs.iter().enumerate() {
            let mut stored = record(i, spec).to_stored();
            stored.revision = store.insert(stored.clone()).await.unwrap();
            records.push(stored);
        }
        let settings = RegistrySettings {
            list_scan_budget: budget,
            ..RegistrySettings::default()
        };
        let registry = Registry::new(store, settings);
        let parsed = filter::parse(filter).unwrap().unwrap();
        for target in ["projects/-", "projects/p1", "projects/-/locations/-"] {
            let pattern = crate::registry::parse_list_target(target).unwrap();
            let mut expected: Vec<String> = records
                .iter()
                .filter(|r| pattern.matches_parent(r.parent()) && parsed.matches(r))
                .map(|r| r.name.clone())
                .collect();
            expected.sort();
            let got = walk(&registry, target, filter, page_size).await;
            prop_assert_eq!(&got, &expected, "filter {} on {}", filter, target);
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]
        #[test]
        fn memory_store_filters_like_the_reference(
            specs in proptest::collection::vec(spec(), 0..40),
            filter in filter_text(),
            page_size in 1i32..12,
            budget in 1usize..50,
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(differential(Arc::new(crate::store::MemoryStore::new()), &specs, &filter, page_size, budget))?;
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn redb_store_filters_like_the_reference(
            specs in proptest::collection::vec(spec(), 0..30),
            filter in filter_text(),
            page_size in 1i32..12,
        ) {
            let dir = tempdir();
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let store = Arc::new(RedbStore::open(&dir.join("s.redb")).unwrap());
            let result = runtime.block_on(differential(store, &specs, &filter, page_size, 7));
            drop(runtime);
            let _ = std::fs::remove_dir_all(&dir);
            result?;
        }
    }

    /// A grant's name pattern over the segments these tests' names use.
    fn grant() -> impl Strategy<Value = crate::store::filter::NamePattern> {
        proptest::collection::vec(
            proptest::sample::select(vec![
                "projects",
                "p0",
                "p1",
                "p2",
                "*",
                "**",
                "locations",
                "l",
                "operations",
                "op001",
            ]),
            1..6,
        )
        .prop_map(|segments| segments.join("/").parse().unwrap())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]
        /// Listing cannot leak: with random grants, filters, targets (`-`
        /// wildcards included) and page sizes, a caller's walk returns
        /// exactly the operations its grants match that the target and the
        /// filter select, never another.
        #[test]
        fn listings_return_exactly_what_the_grants_allow(
            specs in proptest::collection::vec(spec(), 0..40),
            grants in proptest::collection::vec(grant(), 0..3),
            filter in proptest::option::of(filter_text()),
            page_size in 1i32..12,
            budget in 1usize..50,
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                let store = Arc::new(crate::store::MemoryStore::new());
                let mut records = Vec::new();
                for (i, spec) in specs.iter().enumerate() {
                    let stored = record(i, spec).to_stored();
                    store.insert(stored.clone()).await.unwrap();
                    records.push(stored);
                }
                let registry = Registry::new(store, RegistrySettings {
                    list_scan_budget: budget,
                    ..RegistrySettings::default()
                });
                let filter = filter.unwrap_or_default();
                let parsed = filter::parse(&filter).unwrap();
                let visibility = Visibility { caller: "c".into(), names: grants.clone() };
                for target in ["-", "projects/-", "projects/p1", "projects/-/locations/-"] {
                    let pattern = crate::registry::parse_list_target(target).unwrap();
                    let mut expected: Vec<String> = records
                        .iter()
                        .filter(|r| pattern.matches_parent(r.parent()))
                        .filter(|r| parsed.as_ref().is_none_or(|f| f.matches(r)))
                        .filter(|r| grants.iter().any(|g| g.matches(&r.name)))
                        .map(|r| r.name.clone())
                        .collect();
                    expected.sort();
                    let mut got = Vec::new();
                    let mut token = String::new();
                    loop {
                        let page = registry.list(ListRequest {
                            name: target.into(),
                            filter: filter.clone(),
                            page_size,
                            page_token: token,
                            visibility: Some(visibility.clone()),
                        }).await.unwrap();
                        got.extend(page.records.into_iter().map(|o| o.name));
                        if page.next_page_token.is_empty() {
                            break;
                        }
                        token = page.next_page_token;
                    }
                    prop_assert_eq!(&got, &expected, "grants {:?} filter {} on {}", grants, filter, target);
                }
                Ok(())
            })?;
        }
    }

    fn tempdir() -> std::path::PathBuf {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        std::env::temp_dir().join(format!("opsd-diff-{}-{n}", std::process::id()))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn walks_see_every_stable_operation_once_despite_churn(
            stable in 1usize..60,
            sizes in proptest::collection::vec(1i32..9, 1..40),
            churn in proptest::collection::vec((any::<bool>(), 0usize..80), 0..40),
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                let registry = Registry::new(Arc::new(crate::store::MemoryStore::new()), RegistrySettings::default());
                let create = |id: String| CreateParams { parent: "projects/w".into(), operation_id: id, ..Default::default() };
                for i in 0..stable {
                    registry.create(create(format!("s{i:03}"))).await.unwrap();
                }
                let mut seen = Vec::new();
                let mut token = String::new();
                let mut round = 0;
                loop {
                    let page_size = sizes[round % sizes.len()];
                    let page = registry.list(ListRequest {
                        name: "projects/w".into(),
                        page_size,
                        page_token: token,
                        ..Default::default()
                    }).await.unwrap();
                    prop_assert!(page.records.len() <= page_size as usize);
                    seen.extend(page.records.into_iter().map(|o| o.name).filter(|n| n.contains("/s")));
                    // Other clients create and delete transient operations everywhere in the order.
                    if let Some((create_it, id)) = churn.get(round % churn.len().max(1)).copied() {
                        let id = format!("{}{id:03}", ["a", "t", "z"][id % 3]);
                        if create_it {
                            let _ = registry.create(create(id)).await;
                        } else {
                            let _ = registry.delete(&format!("projects/w/operations/{id}")).await;
                        }
                    }
                    round += 1;
                    if page.next_page_token.is_empty() {
                        break;
                    }
                    token = page.next_page_token;
                }
                let expected: Vec<String> = (0..stable).map(|i| format!("projects/w/operations/s{i:03}")).collect();
                prop_assert_eq!(seen, expected);
                Ok(())
            })?;
        }
    }
}

#[tokio::test]
async fn overdue_script_events_and_cancels_apply_in_time_order() {
    let store = Arc::new(MemoryStore::new());
    let registry = Registry::new(store.clone(), RegistrySettings::default());
    let now = SystemTime::now();
    let second = Duration::from_secs(1);
    let any = |v: &str| pack(&v.to_owned());
    let mut record = Record {
        name: "operations/late".into(),
        revision: 0,
        metadata: None,
        outcome: None,
        cancel_policy: CancelPolicy::Cooperative,
        cancel_grace_period: second,
        // The cancel fell due after the outcome; both are overdue.
        cancel_deadline: Some(now - second),
        lease: None,
        lease_deadline: None,
        request_id: None,
        create_time: now - 10 * second,
        update_time: now - 10 * second,
        done_time: None,
        expire_time: None,
        trace: None,
        script: Some(Box::new(Script {
            steps: vec![
                (now - 4 * second, any("early")),
                (now - 2 * second, any("after the outcome")),
            ],
            outcome: Some((now - 3 * second, Outcome::Response(any("done")))),
            on_cancel: None,
            disabled_methods: vec![],
        })),
    };
    record.revision = store.insert(record.to_stored()).await.unwrap();
    registry.on_deadline(&record.name).await.unwrap();
    let done = registry.get(&record.name).await.unwrap();
    assert_eq!(done.outcome, Some(Outcome::Response(any("done"))));
    assert_eq!(
        done.metadata,
        Some(any("early")),
        "steps after the outcome never happen"
    );
}

#[tokio::test]
async fn scripted_operations_take_no_lease() {
    let registry = Registry::new(Arc::new(MemoryStore::new()), RegistrySettings::default());
    let params = CreateParams {
        operation_id: "s".into(),
        lease: Some(Duration::from_secs(5)),
        script: Some(ScriptSpec::default()),
        ..Default::default()
    };
    assert_eq!(
        registry.create(params).await.unwrap_err().code(),
        Code::InvalidArgument
    );
}
