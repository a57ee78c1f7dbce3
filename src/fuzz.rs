//! The entry points of the fuzz targets (`tests/fuzz`), one per decoder of
//! what clients send; `tests/fuzz_corpus.rs` replays each target's corpus
//! through the same function under `cargo test`. Not an API: hidden from
//! the docs, and it may change with the decoders.
//!
//! Every function must return, whatever the bytes: a panic, a hang or an
//! error of the wrong kind is a finding.
//!
//! - [`grpc_message`]: a request message of opsd's services, decoded as the
//!   gRPC codec decodes it; a failure must be INVALID_ARGUMENT.
//! - [`grpc_framing`]: a gRPC request body through the server's request
//!   guard (message prefixes, sizes).
//! - [`client_bytes`]: the first bytes of a connection through the
//!   server's scanner (preface, HTTP/1 head, HTTP/2 frames), in chunks.
//! - [`rest_request`]: an HTTP request through the REST surface (routes,
//!   path templates, query, JSON body, names, filters, page tokens) over a
//!   memory store.
//! - The AIP-160 filter parser has its own target, `registry::filter::parse`.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use prost::Message;
use tonic::Code;

use crate::{
    api::{
        codec::malformed, console::ConsoleService, operations::OperationsService,
        rest::RestService, types::TypeRegistry, workers::WorkersService,
    },
    pb::{google::longrunning as lro, opsd::v1 as wapi},
    registry::{CreateParams, Registry, RegistrySettings},
    server::{
        frames::Inbound,
        guard::{GuardSettings, Guarded},
    },
    store::MemoryStore,
};

/// Decodes `data[1..]` as the request type `data[0]` picks, as the gRPC
/// codec does: a failure must map to INVALID_ARGUMENT.
pub fn grpc_message(data: &[u8]) {
    let Some((&pick, bytes)) = data.split_first() else {
        return;
    };
    fn decode<M: Message + Default>(bytes: &[u8]) {
        if let Err(err) = M::decode(bytes) {
            let status = tonic::Status::from(malformed(&err));
            assert_eq!(status.code(), Code::InvalidArgument, "{err}");
        }
    }
    match pick % 13 {
        0 => decode::<lro::GetOperationRequest>(bytes),
        1 => decode::<lro::ListOperationsRequest>(bytes),
        2 => decode::<lro::DeleteOperationRequest>(bytes),
        3 => decode::<lro::CancelOperationRequest>(bytes),
        4 => decode::<lro::WaitOperationRequest>(bytes),
        5 => decode::<wapi::CreateOperationRequest>(bytes),
        6 => decode::<wapi::UpdateOperationRequest>(bytes),
        7 => decode::<wapi::CompleteOperationRequest>(bytes),
        8 => decode::<wapi::WatchOperationsRequest>(bytes),
        9 => decode::<wapi::RegisterTypesRequest>(bytes),
        10 => decode::<wapi::GetOperationReportRequest>(bytes),
        11 => decode::<wapi::WatchOperationChangesRequest>(bytes),
        _ => decode::<lro::Operation>(bytes),
    }
}

thread_local! {
    /// One runtime per fuzzing thread: the targets are synchronous.
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a Tokio runtime");
    /// The REST surface over a small memory store, built once per thread.
    static REST: RestService<OperationsService, WorkersService, ConsoleService> =
        RUNTIME.with(|runtime| runtime.block_on(rest_service()));
}

/// A gRPC request body (`data[1..]`, in chunks of `data[0]` bytes) through
/// the server's request guard, with a 64 KiB message limit.
pub fn grpc_framing(data: &[u8]) {
    let Some((&size, body)) = data.split_first() else {
        return;
    };
    let chunks: Vec<Result<http_body::Frame<Bytes>, std::io::Error>> = body
        .chunks(usize::from(size).max(1))
        .map(|c| Ok(http_body::Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    let settings = GuardSettings {
        max_message_size: 64 * 1024,
        body_read_timeout: Duration::from_secs(60),
    };
    let body = Guarded::new(StreamBody::new(tokio_stream::iter(chunks)), Some(settings));
    RUNTIME.with(|runtime| {
        if let Err(err) = runtime.block_on(body.collect()) {
            let status = err
                .downcast::<tonic::Status>()
                .expect("the guard fails with a status");
            assert!(
                matches!(
                    status.code(),
                    Code::InvalidArgument | Code::ResourceExhausted
                ),
                "{status:?}"
            );
        }
    });
}

/// The first bytes of a connection (`data[1..]`, in chunks of `data[0]`
/// bytes) through the server's scanner.
pub fn client_bytes(data: &[u8]) {
    let Some((&size, bytes)) = data.split_first() else {
        return;
    };
    let mut inbound = Inbound::default();
    let mut held = Vec::new();
    for (i, chunk) in bytes.chunks(usize::from(size).max(1)).enumerate() {
        if i == 3 {
            // As if the server had sent its GOAWAY: frames get dropped.
            inbound.server_goaway(1);
        }
        let mut buf = std::mem::take(&mut held);
        buf.extend_from_slice(chunk);
        let scan = inbound.scan(&mut buf);
        assert!(scan.kept <= scan.held && scan.held <= buf.len(), "{scan:?}");
        assert!(buf.len() - scan.held < 9, "at most a frame header is held");
        held = buf[scan.held..].to_vec();
    }
}

/// An HTTP request, `METHOD PATH[?QUERY]\n` then its body, through the
/// REST surface. Answers of every kind are fine; the surface never panics
/// and never answers 5xx to a request it could parse.
pub fn rest_request(data: &[u8]) {
    let (head, body) = match data.iter().position(|&b| b == b'\n') {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let Ok(head) = std::str::from_utf8(head) else {
        return;
    };
    let Some((method, target)) = head.split_once(' ') else {
        return;
    };
    let Ok(request) = http::Request::builder()
        .method(method)
        .uri(target)
        .body(http_body_util::Full::new(Bytes::copy_from_slice(body)))
    else {
        return; // http cannot even represent it: hyper refuses it first
    };
    let response = REST.with(|rest| RUNTIME.with(|runtime| runtime.block_on(rest.handle(request))));
    assert!(
        response.status().as_u16() < 500,
        "{method} {target}: {}",
        response.status()
    );
}

async fn rest_service() -> RestService<OperationsService, WorkersService, ConsoleService> {
    let settings = RegistrySettings {
        wait_cap: Duration::from_millis(1),
        ..RegistrySettings::default()
    };
    let registry = Registry::new(Arc::new(MemoryStore::new()), settings);
    for (parent, id) in [
        ("", "a"),
        ("projects/p/locations/l", "b"),
        ("projects/p", "c"),
    ] {
        let _ = registry
            .create(CreateParams {
                parent: parent.into(),
                operation_id: id.into(),
                ..CreateParams::default()
            })
            .await;
    }
    let types = TypeRegistry::new();
    RestService::new(
        OperationsService::new(registry.clone(), Default::default()),
        WorkersService::new(registry.clone(), types.clone()),
        ConsoleService::new(registry),
        types,
        Default::default(),
    )
    .expect("the default routes load")
}
