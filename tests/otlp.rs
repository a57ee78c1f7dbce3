//! OpenTelemetry traces: the opsd binary with `--otlp-endpoint` exports a
//! span per gRPC and REST call to a loopback OTLP receiver (a tonic server
//! of the OTLP trace service, in this test), parented by the caller's
//! `traceparent` and linked to the trace an operation was created in; a
//! stalled collector costs spans (counted in `/metrics`), never calls.

mod common;

use std::{net::SocketAddr, time::Duration};

use common::binary::Opsd;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        trace_service_server::{TraceService, TraceServiceServer},
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    },
    common::v1::{any_value::Value, KeyValue},
    trace::v1::{span::SpanKind, Span},
};
use opsd::pb::{
    google::longrunning::{operations_client::OperationsClient, GetOperationRequest},
    opsd::v1::workers_client::WorkersClient,
};
use tokio::sync::mpsc;
use tonic::{transport::Channel, Request, Response, Status};

/// The spans the receiver got, each with its resource's attributes.
type Received = mpsc::UnboundedReceiver<(Vec<KeyValue>, Span)>;

/// An OTLP trace service that hands every span to the test, or (stalled)
/// never answers, as a collector that hangs.
struct Receiver {
    spans: mpsc::UnboundedSender<(Vec<KeyValue>, Span)>,
    stalled: bool,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        if self.stalled {
            std::future::pending::<()>().await;
        }
        for resource_spans in request.into_inner().resource_spans {
            let resource = resource_spans.resource.unwrap_or_default().attributes;
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    let _ = self.spans.send((resource.clone(), span));
                }
            }
        }
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// A receiver on a free loopback port: its address and what it receives.
async fn receiver(stalled: bool) -> (SocketAddr, Received) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (spans, received) = mpsc::unbounded_channel();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Receiver { spans, stalled }))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (address, received)
}

fn traceparent(trace: u128, span: u64, sampled: bool) -> String {
    format!("00-{trace:032x}-{span:016x}-{:02x}", u8::from(sampled))
}

/// `message` with a `traceparent`.
fn traced<T>(message: T, trace: u128, span: u64) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "traceparent",
        traceparent(trace, span, true).parse().unwrap(),
    );
    request
}

fn attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
}

fn text<'a>(span: &'a Span, key: &str) -> &'a str {
    match attribute(&span.attributes, key) {
        Some(Value::StringValue(value)) => value,
        other => panic!("{key} of {}: {other:?}", span.name),
    }
}

fn number(span: &Span, key: &str) -> i64 {
    match attribute(&span.attributes, key) {
        Some(Value::IntValue(value)) => *value,
        other => panic!("{key} of {}: {other:?}", span.name),
    }
}

fn links(span: &Span) -> Vec<(Vec<u8>, Vec<u8>)> {
    span.links
        .iter()
        .map(|l| (l.trace_id.clone(), l.span_id.clone()))
        .collect()
}

fn ids(trace: u128, span: u64) -> (Vec<u8>, Vec<u8>) {
    (trace.to_be_bytes().to_vec(), span.to_be_bytes().to_vec())
}

async fn channel(opsd: &Opsd) -> Channel {
    Channel::from_shared(format!("http://{}", opsd.address))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// Receives spans until `count` have come (at most 20 s: the exporter
/// sends a batch a second).
async fn spans(received: &mut Received, count: usize) -> Vec<(Vec<KeyValue>, Span)> {
    let mut spans = Vec::new();
    while spans.len() < count {
        let next = tokio::time::timeout(Duration::from_secs(20), received.recv()).await;
        let span = next
            .unwrap_or_else(|_| panic!("{} of {count} spans came: {spans:#?}", spans.len()))
            .unwrap();
        spans.push(span);
    }
    spans
}

// Multi-threaded: the clients' connections must close while the test
// thread waits for opsd to exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_spans_under_the_callers_trace_linked_to_the_creating_trace() {
    let (collector, mut received) = receiver(false).await;
    let endpoint = format!("http://{collector}");
    let mut opsd = Opsd::start(&["--store", "memory", "--otlp-endpoint", &endpoint]);
    let channel = channel(&opsd).await;
    let mut workers = WorkersClient::new(channel.clone());
    let mut operations = OperationsClient::new(channel);
    let rest = reqwest::Client::new();
    let url = |path: &str| format!("http://{}/v1/{path}", opsd.address);
    let name = "projects/p/locations/l/operations/job";

    // A worker creates a job in its trace A.
    let (a, a_span) = (0xa1_u128 << 64 | 7, 0xa2_u64);
    let create = common::op("projects/p/locations/l", "job");
    workers
        .create_operation(traced(create, a, a_span))
        .await
        .unwrap();
    // A client polls it in its own trace B (gRPC), another in C (REST).
    let (b, b_span) = (0xb1_u128 << 64 | 7, 0xb2_u64);
    let get = GetOperationRequest { name: name.into() };
    operations
        .get_operation(traced(get, b, b_span))
        .await
        .unwrap();
    let (c, c_span) = (0xc1_u128 << 64 | 7, 0xc2_u64);
    let got = rest
        .get(url(name))
        .header("traceparent", traceparent(c, c_span, true))
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 200);
    // The worker completes it without a trace of its own.
    common::complete(&mut workers, name, "exported").await;
    // A second job, created in trace D, cancelled over REST with no trace.
    let (d, d_span) = (0xd1_u128 << 64 | 7, 0xd2_u64);
    let second = common::op("projects/p/locations/l", "second");
    workers
        .create_operation(traced(second, d, d_span))
        .await
        .unwrap();
    let cancelled = rest
        .post(url("projects/p/locations/l/operations/second:cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(cancelled.status(), 200);
    // A failed call in trace E, and one whose caller does not sample (F).
    let (e, e_span) = (0xe1_u128 << 64 | 7, 0xe2_u64);
    let missing = GetOperationRequest {
        name: "operations/missing".into(),
    };
    let status = operations
        .get_operation(traced(missing.clone(), e, e_span))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    let (f, f_span) = (0xf1_u128 << 64 | 7, 0xf2_u64);
    let mut unsampled = Request::new(missing);
    unsampled.metadata_mut().insert(
        "traceparent",
        traceparent(f, f_span, false).parse().unwrap(),
    );
    operations.get_operation(unsampled).await.unwrap_err();

    let spans = spans(&mut received, 7).await;
    let find = |trace: u128| {
        spans
            .iter()
            .map(|(_, span)| span)
            .find(|span| span.trace_id == trace.to_be_bytes())
            .unwrap_or_else(|| panic!("no span in trace {trace:x}: {spans:#?}"))
    };
    for (resource, span) in &spans {
        assert!(
            matches!(attribute(resource, "service.name"), Some(Value::StringValue(s)) if s == "opsd")
        );
        assert_eq!(span.kind, SpanKind::Server as i32, "{span:?}");
        assert_ne!(
            span.trace_id,
            f.to_be_bytes(),
            "an unsampled caller's call was exported"
        );
    }

    // The creation continues the worker's trace, and names its call.
    let created = find(a);
    assert_eq!(created.name, "opsd.v1.Workers/CreateOperation");
    assert_eq!(created.parent_span_id, a_span.to_be_bytes());
    assert_eq!(text(created, "rpc.service"), "opsd.v1.Workers");
    assert_eq!(text(created, "rpc.method"), "CreateOperation");
    assert_eq!(text(created, "transport"), "grpc");
    assert_eq!(text(created, "resource"), "projects/p/locations/l");
    assert_eq!(number(created, "rpc.grpc.status_code"), 0);
    assert!(created.links.is_empty());

    // Polls continue their callers' traces and link to the job's.
    for (trace, span, transport) in [(b, b_span, "grpc"), (c, c_span, "rest")] {
        let polled = find(trace);
        assert_eq!(polled.name, "google.longrunning.Operations/GetOperation");
        assert_eq!(polled.parent_span_id, span.to_be_bytes());
        assert_eq!(text(polled, "transport"), transport);
        assert_eq!(text(polled, "resource"), name);
        assert_eq!(number(polled, "rpc.grpc.status_code"), 0);
        assert_eq!(links(polled), [ids(a, a_span)]);
    }

    // The completion starts a trace of its own, linked to the job's.
    let completed = spans
        .iter()
        .map(|(_, span)| span)
        .find(|span| span.name == "opsd.v1.Workers/CompleteOperation")
        .unwrap();
    assert!(completed.parent_span_id.is_empty());
    assert!(![a, b, c, d, e]
        .iter()
        .any(|t| completed.trace_id == t.to_be_bytes()));
    assert_eq!(links(completed), [ids(a, a_span)]);

    // The REST cancel of the second job links to its creation's trace.
    let cancel = spans
        .iter()
        .map(|(_, span)| span)
        .find(|span| span.name == "google.longrunning.Operations/CancelOperation")
        .unwrap();
    assert_eq!(text(cancel, "transport"), "rest");
    assert_eq!(links(cancel), [ids(d, d_span)]);

    // A failed call carries its code; a client's error is not the server's.
    let failed = find(e);
    assert_eq!(number(failed, "rpc.grpc.status_code"), 5);
    assert!(failed.links.is_empty());
    assert_ne!(
        failed.status.as_ref().map(|s| s.code),
        Some(2),
        "NOT_FOUND marked as a server error"
    );

    drop((workers, operations, rest));
    assert!(opsd.terminate().success());
}

// Multi-threaded: the clients' connections must close while the test
// thread waits for opsd to exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_collector_costs_spans_never_calls_and_drops_are_counted() {
    let (collector, _received) = receiver(true).await;
    let endpoint = format!("http://{collector}");
    let mut opsd = Opsd::start(&[
        "--store",
        "memory",
        "--otlp-endpoint",
        &endpoint,
        "--otlp-queue-size",
        "4",
    ]);
    let mut operations = OperationsClient::new(channel(&opsd).await);
    let metrics = format!("http://{}/metrics", opsd.address);
    // Calls go on while the exporter waits for the collector: once its
    // batch is out, 4 spans fill the queue and the rest are dropped.
    let mut calls = 0;
    let dropped = loop {
        for _ in 0..50 {
            let missing = GetOperationRequest {
                name: "operations/missing".into(),
            };
            let status = operations
                .get_operation(traced(missing, 1, 1))
                .await
                .unwrap_err();
            assert_eq!(status.code(), tonic::Code::NotFound);
            calls += 1;
        }
        let text = reqwest::get(&metrics).await.unwrap().text().await.unwrap();
        let dropped = text
            .lines()
            .find_map(|line| line.strip_prefix("opsd_trace_spans_dropped_total "))
            .map(|n| n.trim().parse::<f64>().unwrap());
        if let Some(dropped) = dropped.filter(|n| *n > 0.0) {
            break dropped;
        }
        assert!(calls < 100_000, "no span was dropped after {calls} calls");
    };
    assert!(dropped <= calls as f64, "{dropped} of {calls}");
    drop(operations);
    assert!(opsd.terminate().success());
}
