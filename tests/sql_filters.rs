//! Filters in SQL select exactly what the in-memory evaluator selects: a
//! differential property test over random operation sets and random filter
//! trees (every restriction, `AND`/`OR`/`NOT`, wildcards, values with `%`,
//! `_`, `*`, quotes and non-ASCII text, times to the nanosecond, a caller's
//! name patterns from its grants), walked
//! page by page with random page sizes and scan budgets, on the memory store
//! and on PostgreSQL side by side.

mod common;

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, SystemTime},
};

use common::{
    outside,
    postgres::{main_with, Postgres},
};
use opsd::{
    clock::Clock,
    pb::google::rpc,
    store::{
        filter::{AnyField, Filter, Op, Part, Pattern, Restriction, TimeField},
        ListQuery, MemoryStore, ParentPattern, PostgresSettings, PostgresStore, Store,
        StoredOutcome, StoredRecord,
    },
};
use proptest::{prelude::*, test_runner::TestRunner};

const TYPES: &[&str] = &[
    "type.googleapis.com/google.protobuf.Empty",
    "type.googleapis.com/acme.Progress",
    "type.googleapis.com/acme.Progress2",
    "x%_y",
    "",
    "a*b",
    "ünïcode/ø",
    "it's \"quoted\"",
];

const TEXTS: &[&str] = &[
    "",
    "type",
    "acme",
    "Progress",
    "Empty",
    "%",
    "_",
    "x%",
    "a*b",
    "ø",
    "'",
    "\"",
    "/",
    "op",
    "l1",
    "operations/",
    "projects/",
];

fn base() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

/// A time from a small set, so records and filters often meet exactly;
/// nanosecond neighbours, and times before 1970 too.
fn time() -> impl Strategy<Value = SystemTime> {
    let epoch = SystemTime::UNIX_EPOCH;
    let ns = Duration::from_nanos;
    let s = Duration::from_secs;
    prop::sample::select(vec![
        base(),
        base() + ns(1),
        base() + ns(999_999_999),
        base() + s(1),
        base() + s(1) + ns(1),
        epoch,
        epoch - s(1) + ns(1),
        epoch - s(1),
        epoch - s(2) + ns(5),
    ])
}

fn any_of(types: &'static [&'static str]) -> impl Strategy<Value = prost_types::Any> {
    prop::sample::select(types).prop_map(|t| prost_types::Any {
        type_url: t.to_owned(),
        value: vec![1, 2],
    })
}

/// One record, named `{parent}/operations/{id}` under `root`.
fn record() -> impl Strategy<Value = (usize, String, StoredRecord)> {
    let outcome = prop_oneof![
        Just(None),
        any_of(TYPES).prop_map(|a| Some(StoredOutcome::Response(a))),
        (-1i32..4).prop_map(|code| Some(StoredOutcome::Error(rpc::Status {
            code,
            message: "m".into(),
            details: vec![],
        }))),
    ];
    (
        0usize..3,
        "[a-z0-9._~-]{1,5}",
        prop::option::of(any_of(TYPES)),
        outcome,
        prop::option::of(time()),
        prop::option::of(time()),
    )
        .prop_map(|(parent, id, metadata, outcome, create, update)| {
            let record = StoredRecord {
                metadata,
                outcome,
                create_time: create.map(Into::into),
                update_time: update.map(Into::into),
                ..Default::default()
            };
            (parent, id, record)
        })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        Just(Op::Eq),
        Just(Op::Ne),
        Just(Op::Lt),
        Just(Op::Le),
        Just(Op::Gt),
        Just(Op::Ge)
    ]
}

fn equality() -> impl Strategy<Value = Op> {
    prop_oneof![Just(Op::Eq), Just(Op::Ne)]
}

fn pattern(pool: &'static [&'static str]) -> impl Strategy<Value = Pattern> {
    (any::<bool>(), prop::sample::select(pool), any::<bool>()).prop_map(|(pre, text, post)| {
        Pattern::new(&format!(
            "{}{text}{}",
            if pre { "*" } else { "" },
            if post { "*" } else { "" }
        ))
    })
}

fn restriction() -> impl Strategy<Value = Restriction> {
    prop_oneof![
        (equality(), any::<bool>()).prop_map(|(op, v)| Restriction::Done(op, v)),
        (equality(), pattern(TEXTS)).prop_map(|(op, p)| Restriction::Name(op, p)),
        (op(), -2i64..5).prop_map(|(op, c)| Restriction::ErrorCode(op, c)),
        prop_oneof![
            Just(Part::Error),
            Just(Part::Response),
            Just(Part::Metadata)
        ]
        .prop_map(Restriction::Present),
        (
            prop_oneof![Just(AnyField::Metadata), Just(AnyField::Response)],
            equality(),
            prop_oneof![pattern(TYPES), pattern(TEXTS)]
        )
            .prop_map(|(f, op, p)| Restriction::TypeUrl(f, op, p)),
        (
            prop_oneof![Just(TimeField::CreateTime), Just(TimeField::UpdateTime)],
            op(),
            time()
        )
            .prop_map(|(f, op, at)| Restriction::Time(f, op, at)),
        // A caller's grant (auth): whole segments, `*` and `**`.
        prop::collection::vec(
            prop::sample::select(vec![
                "projects",
                "*",
                "**",
                "locations",
                "l1",
                "l2",
                "operations",
                "a",
                "a.b",
                "op",
            ]),
            1..7,
        )
        .prop_map(|segments| Restriction::Granted(segments.join("/").parse().unwrap())),
    ]
}

fn filter() -> impl Strategy<Value = Filter> {
    restriction()
        .prop_map(Filter::Test)
        .prop_recursive(4, 24, 3, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..3).prop_map(Filter::And),
                prop::collection::vec(inner.clone(), 0..3).prop_map(Filter::Or),
                inner.prop_map(|f| Filter::Not(Box::new(f))),
            ]
        })
}

/// Every page of `query` from `store`: (names, resume_after) per page.
async fn walk(store: &dyn Store, mut query: ListQuery) -> Vec<(Vec<String>, Option<String>)> {
    let mut pages = Vec::new();
    for _ in 0..200 {
        let scan = store.list(&query).await.unwrap();
        let names = scan.records.iter().map(|r| r.name.clone()).collect();
        pages.push((names, scan.resume_after.clone()));
        match scan.resume_after {
            Some(after) => query.after = Some(after),
            None => break,
        }
    }
    pages
}

static CASES: AtomicUsize = AtomicUsize::new(0);

fn differential(pg: Arc<Postgres>) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let url = runtime.block_on(pg.database("sql_filters"));
    let store = runtime.block_on(async {
        PostgresStore::connect(
            &url.parse().unwrap(),
            PostgresSettings::default(),
            Clock::System,
        )
        .await
        .unwrap()
    });
    let cases = std::env::var("OPSD_SQL_FILTER_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(96);
    let mut runner = TestRunner::new(ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let strategy = (
        prop::collection::vec(record(), 0..24),
        prop::collection::vec(filter(), 1..4),
        1usize..6,
        prop_oneof![Just(usize::MAX), 1usize..12],
        any::<bool>(),
    );
    let result = runner.run(&strategy, |(records, filters, limit, budget, wildcard)| {
        runtime.block_on(async {
            let root = format!("projects/c{}", CASES.fetch_add(1, Ordering::Relaxed));
            let memory = MemoryStore::new();
            let parents = [
                root.clone(),
                format!("{root}/locations/l1"),
                format!("{root}/locations/l2"),
            ];
            for (parent, id, mut record) in records {
                record.name = format!("{}/operations/{id}", parents[parent]);
                let inserted = memory.insert(record.clone()).await;
                let in_pg = store.insert(record).await;
                prop_assert_eq!(inserted.is_ok(), in_pg.is_ok());
            }
            let segments: Vec<String> = if wildcard {
                format!("{root}/locations/-")
                    .split('/')
                    .map(str::to_owned)
                    .collect()
            } else {
                root.split('/').map(str::to_owned).collect()
            };
            for filter in filters {
                let query = ListQuery {
                    parent: ParentPattern::new(segments.clone()),
                    after: None,
                    limit,
                    filter: Some(Arc::new(filter.clone())),
                    scan_budget: budget,
                };
                let expected = walk(&memory, query.clone()).await;
                let got = walk(&store, query).await;
                prop_assert_eq!(got, expected, "filter {:?}", filter);
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
        vec![outside::test(
            "sql_filters_select_what_the_memory_evaluator_selects",
            pg,
            differential,
        )]
    })
}
