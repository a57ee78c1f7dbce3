//! A stand-in OpenTelemetry collector for `benches/suite.sh traces`: an
//! OTLP/gRPC trace service that accepts every export at once, counts its
//! spans and keeps none, so opsd's cost of tracing is measured against a
//! collector that is never the bottleneck.
//!
//! ```sh
//! cargo run --release -p opsd-bench --bin opsd-otlp-sink -- 127.0.0.1:50131
//! ```
//!
//! It prints the spans and exports received so far once a second, and
//! serves until killed.

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use opentelemetry_proto::tonic::collector::trace::v1::{
    trace_service_server::{TraceService, TraceServiceServer},
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tonic::{Request, Response, Status};

#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Spans and export calls received.
static SPANS: AtomicU64 = AtomicU64::new(0);
static EXPORTS: AtomicU64 = AtomicU64::new(0);

struct Sink;

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let spans: usize = request
            .get_ref()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        SPANS.fetch_add(spans as u64, Ordering::Relaxed);
        EXPORTS.fetch_add(1, Ordering::Relaxed);
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let address: SocketAddr = std::env::args()
        .nth(1)
        .as_deref()
        .unwrap_or("127.0.0.1:50131")
        .parse()
        .expect("an address such as 127.0.0.1:50131");
    // Reports the counts once a second, for as long as the sink serves.
    tokio::spawn(async {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            println!(
                "received {} spans in {} exports",
                SPANS.load(Ordering::Relaxed),
                EXPORTS.load(Ordering::Relaxed)
            );
        }
    });
    tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(Sink).max_decoding_message_size(64 << 20))
        .serve(address)
        .await
        .expect("the OTLP sink serves");
}
