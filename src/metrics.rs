//! `/metrics`: Prometheus text through the `metrics` crate.
//!
//! Handlers record into the global `metrics` recorder; without one (metrics
//! switched off, or a library user who installed none) every record is a
//! no-op costing an atomic load. The recorder is process-wide, so it is
//! installed once and shared by every server in the process.
//!
//! Series:
//! - `opsd_rpc_total{method, transport, code}` and
//!   `opsd_rpc_duration_seconds{method, transport}` (histogram): every
//!   Operations and Workers call, over gRPC and REST.
//! - `opsd_waiters`, `opsd_watchers`, `opsd_operations`: gauges, read at scrape.
//! - `opsd_store_commit_duration_seconds`, `opsd_store_commit_batch_size`
//!   (histograms) and `opsd_store_commit_failures_total`: the redb writer.
//! - `opsd_operation_transitions_total{cause}`: committed changes by cause.

use std::{
    future::Future,
    sync::OnceLock,
    time::{Duration, Instant},
};

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tonic::{Code, Status};

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the Prometheus recorder (once per process) and returns its handle.
pub fn install() -> Option<PrometheusHandle> {
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
                Ok(()) => Some(handle),
                Err(err) => {
                    tracing::warn!(cause = %err, "another metrics recorder is installed; /metrics is off");
                    None
                }
            }
        })
        .clone()
}

fn code_name(code: Code) -> &'static str {
    crate::pb::google::rpc::Code::try_from(code as i32)
        .map(|c| c.as_str_name())
        .unwrap_or("UNKNOWN")
}

/// Records one call.
pub fn rpc(method: &'static str, transport: &'static str, code: Code, elapsed: Duration) {
    metrics::counter!("opsd_rpc_total", "method" => method, "transport" => transport, "code" => code_name(code))
        .increment(1);
    metrics::histogram!("opsd_rpc_duration_seconds", "method" => method, "transport" => transport)
        .record(elapsed.as_secs_f64());
}

/// Runs a handler and records it.
pub async fn observed<T>(
    method: &'static str,
    transport: &'static str,
    call: impl Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    let started = Instant::now();
    let result = call.await;
    let code = match &result {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    };
    rpc(method, transport, code, started.elapsed());
    result
}

/// One redb group commit.
pub fn store_commit(batch: usize, elapsed: Duration, ok: bool) {
    metrics::histogram!("opsd_store_commit_duration_seconds").record(elapsed.as_secs_f64());
    metrics::histogram!("opsd_store_commit_batch_size").record(batch as f64);
    if !ok {
        metrics::counter!("opsd_store_commit_failures_total").increment(1);
    }
}

/// A committed change, by cause.
pub fn transition(cause: &'static str) {
    metrics::counter!("opsd_operation_transitions_total", "cause" => cause).increment(1);
}

/// The scrape-time gauges.
pub fn gauges(waiters: usize, watchers: usize, operations: Option<usize>) {
    metrics::gauge!("opsd_waiters").set(waiters as f64);
    metrics::gauge!("opsd_watchers").set(watchers as f64);
    if let Some(operations) = operations {
        metrics::gauge!("opsd_operations").set(operations as f64);
    }
}
