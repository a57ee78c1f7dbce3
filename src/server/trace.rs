//! OpenTelemetry traces over OTLP/gRPC, exported without ever holding a
//! call up.
//!
//! [`super::observe`] runs every call, gRPC or REST, in one `rpc` span
//! (debug level, so off in the logs by default). When traces are on
//! (`--otlp-endpoint`, [`TraceSettings`]), [`Traces::layer`] turns those
//! spans — and only those — into OpenTelemetry spans (tracing-opentelemetry)
//! and [`Traces`] exports them (opentelemetry-otlp over tonic). The W3C
//! trace context a caller sends (`traceparent`, `tracestate`, in gRPC
//! metadata or HTTP headers) is read by `incoming`: it parents the call's
//! span, and CreateOperation keeps it with the operation ([`TraceLink`]) so
//! later calls on it link to that trace (`span_context`).
//!
//! Between the spans and the exporter sits opsd's own bounded queue
//! (`BoundedExport`) rather than the SDK's batch processor, which drops
//! spans when its queue is full but keeps the count to itself: here a span
//! that finds the queue full is dropped at once and counted
//! (`opsd_trace_spans_dropped_total`), so a slow or absent collector costs a
//! call one failed `try_send`, never a wait. The exporter runs on a thread
//! of its own (`opsd-otlp`, with a single-threaded Tokio runtime), so its
//! encoding and network work stay off the server's runtime.

use std::{
    fmt,
    str::FromStr,
    sync::mpsc as reply,
    time::{Duration, Instant},
};

use opentelemetry::{
    propagation::{Extractor, TextMapPropagator},
    trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider,
    },
    Context, KeyValue,
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{
    error::{OTelSdkError, OTelSdkResult},
    propagation::TraceContextPropagator,
    trace::{SdkTracerProvider, Span, SpanData, SpanExporter, SpanProcessor},
    Resource,
};
use tokio::sync::mpsc;
use tonic::metadata::{KeyRef, MetadataMap};
use tracing::{Level, Subscriber};
use tracing_subscriber::{filter::Targets, registry::LookupSpan, Layer};

use crate::{config::TraceSettings, registry::TraceLink};

/// The target of the calls' `rpc` spans (`super::observe` opens them): what
/// the OpenTelemetry layer follows, and what `RUST_LOG=opsd::rpc=debug` logs.
pub(crate) const SPAN_TARGET: &str = "opsd::rpc";

/// Spans per export call at most.
const MAX_BATCH: usize = 512;
/// How long a span may wait in the queue for its batch to fill.
const EXPORT_DELAY: Duration = Duration::from_secs(1);
/// The most one export call may take (the collector's answer included).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// The most a flush or the shutdown waits for the exporter.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Why traces could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot export traces to {endpoint}: {reason}")]
pub struct TraceError {
    endpoint: String,
    reason: String,
}

/// The OTLP exporter and its tracer provider. Hold it for the life of the
/// process, and [`Traces::shutdown`] it last, to export what is queued.
pub struct Traces {
    provider: SdkTracerProvider,
}

impl fmt::Debug for Traces {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Traces").finish_non_exhaustive()
    }
}

impl Traces {
    /// Starts the exporter for `settings`; `None` when no endpoint is set
    /// (traces off). The endpoint is only checked here, not connected to:
    /// a collector that is down costs the spans, not the start.
    pub fn start(settings: &TraceSettings) -> Result<Option<Self>, TraceError> {
        let Some(endpoint) = settings.otlp_endpoint.clone() else {
            return Ok(None);
        };
        let fail = |reason: String| TraceError {
            endpoint: endpoint.clone(),
            reason,
        };
        let resource = resource();
        let (spans, queued) = mpsc::channel(settings.queue_size.max(1));
        let (control, commands) = mpsc::unbounded_channel();
        let (built, exporter_built) = reply::channel();
        let (for_thread, resource_for_thread) = (endpoint.clone(), resource.clone());
        std::thread::Builder::new()
            .name("opsd-otlp".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                let runtime = match runtime {
                    Ok(runtime) => runtime,
                    Err(err) => {
                        let _ = built.send(Err(err.to_string()));
                        return;
                    }
                };
                runtime.block_on(async move {
                    // Built here: tonic's channel belongs to this runtime.
                    let exporter = opentelemetry_otlp::SpanExporter::builder()
                        .with_tonic()
                        .with_endpoint(for_thread)
                        .with_timeout(EXPORT_TIMEOUT)
                        .build();
                    let mut exporter = match exporter {
                        Ok(exporter) => exporter,
                        Err(err) => {
                            let _ = built.send(Err(err.to_string()));
                            return;
                        }
                    };
                    exporter.set_resource(&resource_for_thread);
                    let _ = built.send(Ok(()));
                    export_loop(exporter, queued, commands).await;
                });
            })
            .map_err(|e| fail(e.to_string()))?;
        exporter_built
            .recv()
            .map_err(|_| fail("the exporter thread stopped".into()))?
            .map_err(fail)?;
        let provider = SdkTracerProvider::builder()
            .with_span_processor(BoundedExport { spans, control })
            .with_resource(resource)
            .build();
        Ok(Some(Self { provider }))
    }

    /// The layer that turns the `rpc` spans of [`super::observe`] (and the
    /// events inside them) into OpenTelemetry spans; it sees nothing else,
    /// whatever the log level.
    pub fn layer<S>(&self) -> impl Layer<S>
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        tracing_opentelemetry::layer()
            .with_tracer(self.provider.tracer("opsd"))
            .with_location(false)
            .with_threads(false)
            .with_tracked_inactivity(false)
            .with_filter(Targets::new().with_target(SPAN_TARGET, Level::DEBUG))
    }

    /// Exports what is queued (waiting at most 5 s) and stops exporting.
    /// Blocks: call it off the async runtime (`spawn_blocking`).
    pub fn shutdown(self) {
        if let Err(err) = self.provider.shutdown() {
            tracing::warn!(cause = %err, "traces not all exported at shutdown");
        }
    }
}

/// `service.name` from `OTEL_SERVICE_NAME` or `OTEL_RESOURCE_ATTRIBUTES`,
/// else `opsd`; the other attributes of `OTEL_RESOURCE_ATTRIBUTES`.
fn resource() -> Resource {
    let version = KeyValue::new("service.version", env!("CARGO_PKG_VERSION"));
    let detected = Resource::builder().with_attribute(version.clone()).build();
    let unnamed = detected
        .get(&opentelemetry::Key::from_static_str("service.name"))
        .is_none_or(|name| name.as_str().starts_with("unknown_service"));
    if unnamed {
        Resource::builder()
            .with_attribute(version)
            .with_service_name("opsd")
            .build()
    } else {
        detected
    }
}

/// What the export thread is asked besides exporting; each answers on its
/// channel once done.
enum Command {
    Flush(reply::Sender<()>),
    Shutdown(reply::Sender<()>),
}

/// The span processor: ended spans go into a bounded queue, or are dropped
/// and counted when it is full.
#[derive(Debug)]
struct BoundedExport {
    /// Ended spans, to the export thread. Bounded (`--otlp-queue-size`):
    /// `try_send` never waits, so a call never waits for the collector.
    spans: mpsc::Sender<SpanData>,
    /// Flush and shutdown requests, apart from the spans so a full queue
    /// cannot hold them up; a handful at most, so unbounded.
    control: mpsc::UnboundedSender<Command>,
}

impl BoundedExport {
    /// Asks the export thread for `command` and waits for its answer.
    fn ask(&self, command: fn(reply::Sender<()>) -> Command, timeout: Duration) -> OTelSdkResult {
        let (done, answered) = reply::channel();
        self.control
            .send(command(done))
            .map_err(|_| OTelSdkError::AlreadyShutdown)?;
        answered
            .recv_timeout(timeout)
            .map_err(|_| OTelSdkError::Timeout(timeout))
    }
}

impl SpanProcessor for BoundedExport {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        if self.spans.try_send(span).is_err() {
            metrics::counter!("opsd_trace_spans_dropped_total").increment(1);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.ask(Command::Flush, FLUSH_TIMEOUT)
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.ask(Command::Shutdown, timeout.min(FLUSH_TIMEOUT))
    }
}

/// The export thread's work: batches of up to [`MAX_BATCH`] spans, sent
/// when full or [`EXPORT_DELAY`] after the first span, one export at a
/// time. While an export is in flight the queue takes the new spans, and
/// drops what it cannot hold.
async fn export_loop(
    exporter: opentelemetry_otlp::SpanExporter,
    mut queued: mpsc::Receiver<SpanData>,
    mut commands: mpsc::UnboundedReceiver<Command>,
) {
    let mut batch = Batch {
        exporter,
        spans: Vec::with_capacity(MAX_BATCH),
        failing: false,
    };
    let mut due: Option<Instant> = None;
    loop {
        let deadline = due.map(tokio::time::Instant::from_std);
        tokio::select! {
            span = queued.recv() => {
                let Some(span) = span else { return };
                batch.spans.push(span);
                due.get_or_insert_with(|| Instant::now() + EXPORT_DELAY);
                if batch.spans.len() >= MAX_BATCH {
                    batch.export().await;
                    due = None;
                }
            }
            () = sleep_until(deadline) => {
                batch.export().await;
                due = None;
            }
            command = commands.recv() => {
                while let Ok(span) = queued.try_recv() {
                    batch.spans.push(span);
                    if batch.spans.len() >= MAX_BATCH {
                        batch.export().await;
                    }
                }
                batch.export().await;
                due = None;
                match command {
                    // The asker may have given up waiting: nothing to tell.
                    Some(Command::Flush(done)) => {
                        let _ = done.send(());
                    }
                    Some(Command::Shutdown(done)) => {
                        if let Err(err) = batch.exporter.shutdown() {
                            tracing::debug!(cause = %err, "OTLP exporter shutdown");
                        }
                        let _ = done.send(());
                        return;
                    }
                    None => return,
                }
            }
        }
    }
}

/// Sleeps until `deadline`; never returns without one.
async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// The spans gathered for the next export, and whether the last export
/// failed (so a collector that is down is logged once, not per batch).
struct Batch {
    exporter: opentelemetry_otlp::SpanExporter,
    spans: Vec<SpanData>,
    failing: bool,
}

impl Batch {
    async fn export(&mut self) {
        if self.spans.is_empty() {
            return;
        }
        let spans = std::mem::replace(&mut self.spans, Vec::with_capacity(MAX_BATCH));
        let count = spans.len() as u64;
        let result = tokio::time::timeout(EXPORT_TIMEOUT, self.exporter.export(spans)).await;
        match result {
            Ok(Ok(())) => {
                metrics::counter!("opsd_trace_spans_exported_total").increment(count);
                if std::mem::take(&mut self.failing) {
                    tracing::info!("exporting traces again");
                }
            }
            Ok(Err(err)) => self.failed(count, &err),
            Err(_) => self.failed(count, &format!("no answer within {EXPORT_TIMEOUT:?}")),
        }
    }

    fn failed(&mut self, count: u64, cause: &dyn fmt::Display) {
        metrics::counter!("opsd_trace_spans_failed_total").increment(count);
        if !std::mem::replace(&mut self.failing, true) {
            tracing::warn!(%cause, "cannot export traces; spans are lost until the collector answers");
        }
    }
}

/// The caller's W3C trace context from a call's metadata (gRPC metadata,
/// or the HTTP headers REST copies into it): the parent of the call's span
/// and what CreateOperation keeps. `None` without a valid `traceparent`.
pub(crate) fn incoming(metadata: &MetadataMap) -> Option<(Context, TraceLink)> {
    metadata.get("traceparent")?;
    let cx = TraceContextPropagator::new().extract(&Metadata(metadata));
    let link = {
        let span = cx.span();
        let caller = span.span_context();
        if !caller.is_valid() {
            return None;
        }
        TraceLink {
            trace_id: caller.trace_id().to_bytes(),
            span_id: caller.span_id().to_bytes(),
            flags: caller.trace_flags().to_u8(),
            state: caller.trace_state().header(),
        }
    };
    Some((cx, link))
}

/// The span context an operation's [`TraceLink`] names, for a span link.
pub(crate) fn span_context(link: &TraceLink) -> SpanContext {
    SpanContext::new(
        TraceId::from_bytes(link.trace_id),
        SpanId::from_bytes(link.span_id),
        TraceFlags::new(link.flags),
        true,
        TraceState::from_str(&link.state).unwrap_or_default(),
    )
}

/// gRPC metadata as the propagator reads it.
struct Metadata<'a>(&'a MetadataMap);

impl Extractor for Metadata<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key)?.to_str().ok()
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|key| match key {
                KeyRef::Ascii(key) => Some(key.as_str()),
                KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(pairs: &[(&'static str, &str)]) -> MetadataMap {
        let mut metadata = MetadataMap::new();
        for (key, value) in pairs {
            metadata.insert(*key, value.parse().unwrap());
        }
        metadata
    }

    #[test]
    fn traceparent_and_tracestate_are_read_and_linked_back() {
        let (cx, link) = incoming(&metadata(&[
            (
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ),
            ("tracestate", "congo=t61rcWkgMzE"),
        ]))
        .unwrap();
        assert_eq!(
            link.trace_id,
            0x0af7651916cd43dd8448eb211c80319c_u128.to_be_bytes()
        );
        assert_eq!(link.span_id, 0xb7ad6b7169203331_u64.to_be_bytes());
        assert_eq!((link.flags, link.state.as_str()), (1, "congo=t61rcWkgMzE"));
        // The link names the caller's span, as the parent context does.
        let parent = cx.span().span_context().clone();
        assert_eq!(span_context(&link), parent);
    }

    #[test]
    fn calls_without_a_valid_traceparent_have_no_trace() {
        assert!(incoming(&MetadataMap::new()).is_none());
        for broken in [
            "",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "zz-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ] {
            assert!(
                incoming(&metadata(&[("traceparent", broken)])).is_none(),
                "{broken:?}"
            );
        }
    }
}
