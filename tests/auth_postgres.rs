//! Listing cannot leak on PostgreSQL either, where the grants become SQL:
//! a server with auth on the PostgreSQL store lists only the caller's
//! names, and a property test walks random listings (random names, grants,
//! filters, targets, page sizes) through the registry on PostgreSQL and
//! compares them with what the grants allow. Needs PostgreSQL (a throwaway
//! cluster, or OPSD_TEST_PG_URL); without it the tests report themselves
//! ignored, and fail under `CI=true`.

mod common;

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc,
};

use common::{
    auth::{self, bearer, claims, Dir, SigningKey, POLICY},
    outside,
    postgres::{main_with, Postgres},
    TestServer,
};
use opsd::{
    clock::Clock,
    pb::google::longrunning::ListOperationsRequest,
    registry::{CreateParams, ListRequest, Registry, RegistrySettings, Visibility},
    store::{filter::NamePattern, PostgresSettings, PostgresStore},
    StoreError,
};
use proptest::{prelude::*, test_runner::TestRunner};
use tonic::Code;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn a_server_on_postgres_lists_only_the_callers_names(pg: Arc<Postgres>) {
    runtime().block_on(async {
        let url = pg.database("auth_listing").await;
        let dir = Dir::new("auth-postgres");
        let key = SigningKey::ec("k");
        let mut config = auth::config(&dir, &[&key], Some(POLICY));
        config.store = url.parse().unwrap();
        let server = TestServer::start_with(config).await;
        for (parent, ids) in [
            ("projects/a", ["a1", "a2"]),
            ("projects/ab", ["ab1", "ab2"]),
            ("projects/b", ["b1", "b2"]),
        ] {
            for id in ids {
                server
                    .registry
                    .create(CreateParams {
                        parent: parent.into(),
                        operation_id: id.into(),
                        ..Default::default()
                    })
                    .await
                    .unwrap();
            }
        }
        let alice = key.sign(&claims("alice@example.com"));
        let mut ops = server.operations().await;
        for (target, filter) in [
            ("-", ""),
            ("projects/-", ""),
            ("projects/-", r#"name = "projects/ab/*""#),
            ("-", "NOT done = true"),
        ] {
            let page = ops
                .list_operations(bearer(
                    tonic::Request::new(ListOperationsRequest {
                        name: target.into(),
                        filter: filter.into(),
                        ..Default::default()
                    }),
                    &alice,
                ))
                .await
                .unwrap()
                .into_inner();
            let names: Vec<String> = page.operations.into_iter().map(|o| o.name).collect();
            let expected: &[&str] = if filter.contains("ab") {
                &[]
            } else {
                &["projects/a/operations/a1", "projects/a/operations/a2"]
            };
            assert_eq!(names, expected, "{target} {filter}");
        }
        let denied = ops
            .list_operations(bearer(
                tonic::Request::new(ListOperationsRequest {
                    name: "projects/ab".into(),
                    ..Default::default()
                }),
                &alice,
            ))
            .await
            .unwrap_err();
        assert_eq!(denied.code(), Code::PermissionDenied);
        server.stop().await;
    });
}

static CASES: AtomicUsize = AtomicUsize::new(0);

/// A grant's pattern over the segments the names below use.
fn grant() -> impl Strategy<Value = NamePattern> {
    prop::collection::vec(
        prop::sample::select(vec![
            "projects",
            "t0",
            "t1",
            "t10",
            "*",
            "**",
            "locations",
            "l",
            "operations",
            "x",
        ]),
        1..6,
    )
    .prop_map(|segments| segments.join("/").parse().unwrap())
}

fn filter() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "",
        "done = false",
        r#"name = "projects/t1/*""#,
        r#"name != "*x""#,
        r#"NOT name = "*/locations/*""#,
        r#"name = "projects/t10/*" OR name = "*/operations/x""#,
    ])
    .prop_map(str::to_owned)
}

fn listings_on_postgres_return_exactly_what_the_grants_allow(pg: Arc<Postgres>) {
    let runtime = runtime();
    let url = runtime.block_on(pg.database("auth_property"));
    let store = runtime.block_on(async {
        PostgresStore::connect(
            &url.parse().unwrap(),
            PostgresSettings::default(),
            Clock::System,
        )
        .await
        .unwrap()
    });
    // The registry starts its tasks on this runtime.
    let _entered = runtime.enter();
    let registry = Registry::new(Arc::new(store), RegistrySettings::default());
    let cases = std::env::var("OPSD_AUTH_PG_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(48);
    let mut runner = TestRunner::new(ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let name = (0usize..3, 0usize..3, "[a-z0-9x]{1,3}");
    let strategy = (
        prop::collection::vec(name, 0..20),
        prop::collection::vec(grant(), 0..3),
        filter(),
        1i32..6,
    );
    let result = runner.run(&strategy, |(names, grants, filter, page_size)| {
        runtime.block_on(async {
            // Every case under a root of its own: `projects/t{case}` and
            // its neighbours `t1`, `t10` share prefixes on purpose.
            let case = CASES.fetch_add(1, Ordering::Relaxed);
            let roots = [
                format!("projects/t{case}"),
                "projects/t1".into(),
                "projects/t10".into(),
            ];
            let mut created = Vec::new();
            for (root, depth, id) in names {
                let parent = if depth == 2 {
                    format!("{}/locations/l", roots[root])
                } else {
                    roots[root].clone()
                };
                let id = format!("{id}{case}");
                match registry
                    .create(CreateParams {
                        parent,
                        operation_id: id,
                        ..Default::default()
                    })
                    .await
                {
                    Ok(record) => created.push(record.name),
                    Err(opsd::Error::AlreadyExists { .. }) => {}
                    Err(opsd::Error::Store(StoreError::Conflict)) => {}
                    Err(err) => panic!("{err}"),
                }
            }
            let visibility = Visibility {
                caller: format!("caller{case}"),
                names: grants.clone(),
            };
            let parsed = opsd::registry::filter::parse(&filter).unwrap();
            for target in ["-", "projects/-", "projects/-/locations/-"] {
                let mut got = Vec::new();
                let mut token = String::new();
                loop {
                    let page = registry
                        .list(ListRequest {
                            name: target.into(),
                            filter: filter.clone(),
                            page_size,
                            page_token: token,
                            visibility: Some(visibility.clone()),
                        })
                        .await
                        .unwrap();
                    got.extend(page.records.into_iter().map(|r| r.name));
                    if page.next_page_token.is_empty() {
                        break;
                    }
                    token = page.next_page_token;
                }
                // Every name returned is one the grants allow, under the
                // target, passing the filter; of this case's names, every
                // one that qualifies is returned.
                let pattern = opsd::registry::parse_list_target(target).unwrap();
                for name in &got {
                    prop_assert!(
                        grants.iter().any(|g| g.matches(name)),
                        "{} leaked on {}",
                        name,
                        target
                    );
                    prop_assert!(pattern.matches_parent(opsd::store::parent_of(name)));
                }
                for name in &created {
                    let record = registry.get(name).await.unwrap();
                    let selected = pattern.matches_parent(opsd::store::parent_of(name))
                        && grants.iter().any(|g| g.matches(name))
                        && parsed
                            .as_ref()
                            .is_none_or(|f| f.matches(&record.to_stored()));
                    prop_assert_eq!(
                        got.contains(name),
                        selected,
                        "{} on {} with {:?} and {}",
                        name,
                        target,
                        grants,
                        filter
                    );
                }
            }
            Ok(())
        })
    });
    if let Err(err) = result {
        panic!("{err}");
    }
}

fn main() -> std::process::ExitCode {
    main_with(|pg| {
        vec![
            outside::test(
                "a_server_on_postgres_lists_only_the_callers_names",
                pg,
                a_server_on_postgres_lists_only_the_callers_names,
            ),
            outside::test(
                "listings_on_postgres_return_exactly_what_the_grants_allow",
                pg,
                listings_on_postgres_return_exactly_what_the_grants_allow,
            ),
        ]
    })
}
