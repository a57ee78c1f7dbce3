//! A replica whose path to PostgreSQL is cut: through a loopback TCP proxy
//! the test controls, replica A reaches the database; replica B reaches it
//! directly. While the path is cut (the proxy stops forwarding and holds
//! every connection open, as a silent network would), A acknowledges
//! nothing, its calls fail UNAVAILABLE within its bounded call time, its
//! Waits return at their timeout (the latest state, or UNAVAILABLE), and its
//! health turns NOT_SERVING; meanwhile B completes and cancels operations.
//! When the path returns, A catches up within about a second: a Wait parked
//! across the cut returns the completion, its worker stream hears the
//! cancel, and its health is SERVING again.

mod common;

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use common::{
    calls::{cancel, get, next_event, respond},
    create, eventually, op,
    postgres::{connect, main_with, trial, Postgres},
    postgres_config, TestServer,
};
use opsd::pb::{
    google::longrunning::WaitOperationRequest,
    opsd::v1::{
        operation_event::Type as EventType, CancelPolicy, CreateOperationRequest,
        WatchOperationsRequest,
    },
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tonic::Code;

/// A loopback TCP proxy that can be cut and restored.
struct Proxy {
    address: SocketAddr,
    /// `true` while cut.
    cut: watch::Sender<bool>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (cut, _) = watch::channel(false);
        let cuts = cut.clone();
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(relay(client, upstream, cuts.subscribe()));
            }
        });
        Self { address, cut }
    }

    fn cut(&self) {
        self.cut.send_replace(true);
    }

    fn restore(&self) {
        self.cut.send_replace(false);
    }
}

/// Forwards one connection until the path is cut; then holds it, silent,
/// until the path returns, and closes it.
async fn relay(mut client: TcpStream, upstream: SocketAddr, mut cut: watch::Receiver<bool>) {
    if !*cut.borrow_and_update() {
        if let Ok(mut server) = TcpStream::connect(upstream).await {
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut client, &mut server) => return,
                _ = cut.wait_for(|cut| *cut) => {}
            }
            let _ = cut.wait_for(|cut| !*cut).await;
            return;
        }
    }
    let _ = cut.wait_for(|cut| !*cut).await;
}

async fn healthz(server: &TestServer) -> u16 {
    reqwest::get(format!("{}/healthz", server.url))
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

fn secs(s: f64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration::try_from(Duration::from_secs_f64(s)).unwrap())
}

async fn a_cut_replica_acknowledges_nothing_and_catches_up(pg: Arc<Postgres>) {
    let url = pg.database("partition").await;
    let port: u16 = url
        .rsplit_once(':')
        .and_then(|(_, rest)| rest.split('/').next())
        .and_then(|p| p.parse().ok())
        .expect("the test database's URL has a port");
    let proxy = Proxy::start(SocketAddr::from(([127, 0, 0, 1], port))).await;
    let through_proxy = url.replacen(
        &format!(":{port}/"),
        &format!(":{}/", proxy.address.port()),
        1,
    );
    let mut config = postgres_config(&through_proxy);
    config.postgres.statement_timeout = Duration::from_secs(1);
    config.postgres.pool_timeout = Duration::from_secs(1);
    config.postgres.connect_timeout = Duration::from_secs(1);
    let bound = config.postgres.call_timeout();
    let a = TestServer::start_with(config).await;
    let b = TestServer::start_with(postgres_config(&url)).await;
    let (mut workers_a, mut ops_a) = (a.workers().await, a.operations().await);
    let (mut workers_b, mut ops_b) = (b.workers().await, b.operations().await);
    let mut events_a = workers_a
        .watch_operations(WatchOperationsRequest {
            parent: "projects/cut".into(),
            names: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    let finished_on_b = create(&mut workers_b, op("projects/cut", "finished"))
        .await
        .name;
    let cancelled_on_b = create(
        &mut workers_b,
        CreateOperationRequest {
            cancel_policy: CancelPolicy::Cooperative as i32,
            ..op("projects/cut", "cancelled")
        },
    )
    .await
    .name;
    assert_eq!(healthz(&a).await, 200);
    // A Wait parked on A before the cut, long enough to outlast it.
    let parked = {
        let mut ops_a = ops_a.clone();
        let name = finished_on_b.clone();
        tokio::spawn(async move {
            let op = ops_a
                .wait_operation(WaitOperationRequest {
                    name,
                    timeout: secs(50.0),
                })
                .await;
            (op, Instant::now())
        })
    };
    eventually("the Wait is parked on A", || async {
        a.registry.waiter_count() == 1
    })
    .await;

    proxy.cut();
    // A acknowledges nothing: its writes fail UNAVAILABLE within the bound.
    let started = Instant::now();
    let refused = workers_a
        .create_operation(op("projects/cut", "never"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(
        started.elapsed() < bound + Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let refused = ops_a
        .cancel_operation(cancel(&cancelled_on_b))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable);
    // Reads fail the same way, never hang.
    let refused = ops_a.get_operation(get(&finished_on_b)).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable);
    // A Wait returns at its timeout: the latest state, or UNAVAILABLE.
    let started = Instant::now();
    match ops_a
        .wait_operation(WaitOperationRequest {
            name: cancelled_on_b.clone(),
            timeout: secs(0.5),
        })
        .await
    {
        Ok(op) => assert!(!op.into_inner().done),
        Err(status) => assert_eq!(status.code(), Code::Unavailable),
    }
    assert!(started.elapsed() < bound * 2 + Duration::from_secs(2));
    eventually("A's health turns NOT_SERVING", || async {
        healthz(&a).await == 503
    })
    .await;
    // Meanwhile B works on.
    workers_b
        .complete_operation(respond(&finished_on_b, "done"))
        .await
        .unwrap();
    ops_b
        .cancel_operation(cancel(&cancelled_on_b))
        .await
        .unwrap();
    assert!(
        !parked.is_finished(),
        "the parked Wait cannot have seen the completion"
    );

    proxy.restore();
    let restored = Instant::now();
    let (waited, returned) = parked.await.unwrap();
    let waited = waited.unwrap().into_inner();
    assert!(waited.done, "{waited:?}");
    let event = next_event(&mut events_a).await;
    let heard = restored.elapsed();
    assert_eq!(
        (event.name.as_str(), event.r#type()),
        (cancelled_on_b.as_str(), EventType::CancelRequested)
    );
    let caught_up = returned.duration_since(restored);
    eprintln!("after the path returned: the Wait returned in {caught_up:?}, the cancel reached the worker in {heard:?}");
    assert!(
        caught_up < Duration::from_millis(1500) && heard < Duration::from_millis(1500),
        "A caught up late: Wait {caught_up:?}, worker {heard:?}"
    );
    eventually("A's health is SERVING again", || async {
        healthz(&a).await == 200
    })
    .await;
    // Nothing A refused was written.
    let db = connect(&url).await;
    let never: i64 = db
        .query_one(
            "SELECT count(*) FROM opsd_operations WHERE name = 'projects/cut/operations/never'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(never, 0);
    // And A works again.
    create(&mut workers_a, op("projects/cut", "after")).await;
    a.stop().await;
    b.stop().await;
}

fn main() -> std::process::ExitCode {
    main_with(|pg| {
        vec![trial(
            "a_cut_replica_acknowledges_nothing_and_catches_up",
            pg,
            |pg| Box::pin(a_cut_replica_acknowledges_nothing_and_catches_up(pg)),
        )]
    })
}
