//! `/metrics`: Prometheus text through the `metrics` crate.
//!
//! The server's observing wrapper (`observe.rs`), the store's commit
//! observer and a follower of the change feed record into the global
//! `metrics` recorder; without one (metrics
//! switched off, or a library user who installed none) every record is a
//! no-op costing an atomic load. The recorder is process-wide, so it is
//! installed once and shared by every server in the process.
//!
//! Once opsd's own recorder is installed, the per-call series (one counter
//! and one histogram per method, transport and code) are looked up once and
//! their handles kept in a map behind a `std::sync::RwLock` (read-locked on
//! every call, write-locked once per new series; nothing awaits under it),
//! so a call costs an atomic add and a histogram push instead of a registry
//! lookup. A thread drains the histograms every few seconds (the exporter's
//! upkeep), so samples never pile up between scrapes.
//!
//! Series:
//! - `opsd_rpc_total{method, transport, code}` and
//!   `opsd_rpc_duration_seconds{method, transport}` (histogram): every
//!   Operations and Workers call, over gRPC and REST.
//! - `opsd_waiters`, `opsd_watchers`, `opsd_operations{state}` (`running`,
//!   `done`): gauges, read at scrape.
//! - `opsd_store_commit_duration_seconds`, `opsd_store_commit_batch_size`
//!   (histograms) and `opsd_store_commit_failures_total`: the redb writer,
//!   through [`StoreCommits`].
//! - `opsd_operation_transitions_total{cause}`: committed changes by cause,
//!   counted by [`count_transitions`].
//! - `opsd_connections` (gauge, read at scrape) and
//!   `opsd_connections_closed_total{reason}`: connections the server closed
//!   on its own (`handshake_timeout`, `tls_handshake_failed`, `idle`,
//!   `evicted`, `too_many_pings`).
//! - `opsd_drain_cut_calls_total`: calls still unanswered when a drain
//!   timed out.
//! - `opsd_auth_denials_total{reason}`: calls refused by auth, by their
//!   `ErrorInfo` reason (`CREDENTIALS_MISSING`, `ACCESS_TOKEN_EXPIRED`,
//!   `ACCESS_TOKEN_INVALID`, `ACCESS_TOKEN_SCOPE_INSUFFICIENT`,
//!   `IAM_PERMISSION_DENIED`).
//! - `opsd_trace_spans_exported_total`, `opsd_trace_spans_dropped_total`
//!   and `opsd_trace_spans_failed_total`: the OTLP export, recorded by
//!   `super::trace` (only while traces are on).

use std::{
    collections::HashMap,
    sync::{OnceLock, RwLock},
    time::Duration,
};

use metrics::{Counter, Histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tonic::Code;

use crate::{
    registry::Registry,
    store::{Cause, Change, CommitObserver},
};

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// How often the histograms' pending samples are folded in.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// (method, transport, code) → the handles of its series.
type RpcSeries = RwLock<HashMap<(&'static str, &'static str, i32), (Counter, Histogram)>>;

/// The cached per-call series; used only while opsd's recorder is installed.
static RPC_SERIES: OnceLock<RpcSeries> = OnceLock::new();

/// Whether opsd's own recorder is the global one.
fn installed() -> bool {
    HANDLE.get().is_some_and(Option::is_some)
}

/// Installs the Prometheus recorder (once per process) and returns its handle.
pub(super) fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05,
                    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                ])
                .ok()?
                .build_recorder();
            let handle = recorder.handle();
            match metrics::set_global_recorder(recorder) {
                Ok(()) => {
                    let upkeep = handle.clone();
                    let spawned = std::thread::Builder::new()
                        .name("opsd-metrics-upkeep".into())
                        .spawn(move || loop {
                            std::thread::sleep(UPKEEP_INTERVAL);
                            upkeep.run_upkeep();
                        });
                    if let Err(err) = spawned {
                        tracing::warn!(cause = %err, "cannot start the metrics upkeep thread; histograms drain at scrape only");
                    }
                    Some(handle)
                }
                Err(err) => {
                    tracing::warn!(cause = %err, "another metrics recorder is installed; /metrics is off");
                    None
                }
            }
        })
        .clone()
}

/// The `google.rpc.Code` name of a status code.
pub(super) fn code_name(code: Code) -> &'static str {
    crate::pb::google::rpc::Code::try_from(code as i32)
        .map(|c| c.as_str_name())
        .unwrap_or("UNKNOWN")
}

fn rpc_series(method: &'static str, transport: &'static str, code: Code) -> (Counter, Histogram) {
    (
        metrics::counter!("opsd_rpc_total", "method" => method, "transport" => transport, "code" => code_name(code)),
        metrics::histogram!("opsd_rpc_duration_seconds", "method" => method, "transport" => transport),
    )
}

/// Records one call.
pub(super) fn rpc(method: &'static str, transport: &'static str, code: Code, elapsed: Duration) {
    let seconds = elapsed.as_secs_f64();
    if !installed() {
        // Another recorder (or none): plain lookups.
        let (calls, duration) = rpc_series(method, transport, code);
        calls.increment(1);
        duration.record(seconds);
        return;
    }
    let cache = RPC_SERIES.get_or_init(RpcSeries::default);
    let key = (method, transport, code as i32);
    if let Some((calls, duration)) = cache.read().unwrap_or_else(|p| p.into_inner()).get(&key) {
        calls.increment(1);
        duration.record(seconds);
        return;
    }
    let mut cache = cache.write().unwrap_or_else(|p| p.into_inner());
    let (calls, duration) = cache
        .entry(key)
        .or_insert_with(|| rpc_series(method, transport, code));
    calls.increment(1);
    duration.record(seconds);
}

/// The store's group commits, as the store reports them.
pub(super) struct StoreCommits;

impl CommitObserver for StoreCommits {
    fn committed(&self, batch: usize, elapsed: Duration, ok: bool) {
        metrics::histogram!("opsd_store_commit_duration_seconds").record(elapsed.as_secs_f64());
        metrics::histogram!("opsd_store_commit_batch_size").record(batch as f64);
        if !ok {
            metrics::counter!("opsd_store_commit_failures_total").increment(1);
        }
    }
}

/// Counts the committed changes of `feed` by cause until `stop`.
pub(super) fn count_transitions(mut feed: broadcast::Receiver<Change>, stop: CancellationToken) {
    tokio::spawn(async move {
        loop {
            let change = tokio::select! {
                change = feed.recv() => change,
                () = stop.cancelled() => return,
            };
            match change {
                // A marker, not a transition.
                Ok(change) if change.cause == Cause::Resync => {}
                Ok(change) => metrics::counter!(
                    "opsd_operation_transitions_total",
                    "cause" => change.cause.as_str()
                )
                .increment(1),
                // Missed changes are not counted: a counter cannot be
                // re-read from the store.
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::debug!(missed, "transition counter fell behind the change feed")
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    });
}

/// The server closed a connection on its own, for `reason`.
pub(super) fn connection_closed(reason: &'static str) {
    metrics::counter!("opsd_connections_closed_total", "reason" => reason).increment(1);
}

/// Auth refused a call, for `reason`.
pub(super) fn auth_denied(reason: &'static str) {
    metrics::counter!("opsd_auth_denials_total", "reason" => reason).increment(1);
}

/// A drain timed out with `calls` unanswered.
pub(super) fn drain_cut(calls: usize) {
    metrics::counter!("opsd_drain_cut_calls_total").increment(calls as u64);
}

/// The Prometheus text of `/metrics`, with the gauges read now.
pub(super) async fn render(
    handle: &PrometheusHandle,
    registry: &Registry,
    connections: usize,
) -> String {
    metrics::gauge!("opsd_connections").set(connections as f64);
    metrics::gauge!("opsd_waiters").set(registry.waiter_count() as f64);
    metrics::gauge!("opsd_watchers").set(registry.watcher_count() as f64);
    if let Ok(counts) = registry.operation_counts().await {
        metrics::gauge!("opsd_operations", "state" => "running").set(counts.running as f64);
        metrics::gauge!("opsd_operations", "state" => "done").set(counts.done as f64);
    }
    handle.render()
}
