//! The protocol faces: request → registry call → response.
//!
//! Each service here only converts: it validates the wire shapes that the
//! registry does not see (durations, oneofs, the RPC deadline), calls one
//! [`Registry`] method and converts the result. Errors are
//! [`crate::error::Error`]s, turned into `tonic::Status` in one place,
//! `src/error.rs`. What every call shares (timing, metrics, spans, polling
//! reports, traces) is not here: the server wraps these services once
//! (`server::observe`), for gRPC and REST alike, and reads what a handler
//! leaves for it in the response ([`Polled`], `Linked`) and the request
//! ([`ViaRest`], [`Resource`]); it leaves the caller's trace in the request
//! for CreateOperation to keep ([`TraceLink`]).

pub mod codec;
pub mod console;
pub mod grpc;
pub mod operations;
pub mod rest;
pub mod types;
pub mod workers;

use std::time::Duration;

use tonic::{metadata::MetadataMap, Request, Response};

use crate::{
    pb::{google::longrunning as lro, opsd::v1 as wapi},
    registry::{Record, Registry, TraceLink, Visibility},
};

/// The registry's List request for a `ListOperationsRequest` (the
/// Operations and Console services list alike). `return_partial_success` is
/// accepted and has no effect: one store answers for every parent, so
/// nothing is ever unreachable.
/// What the caller may see comes from the server's authorization, as a
/// request extension ([`Visibility`]).
pub(crate) fn list_request(
    request: Request<lro::ListOperationsRequest>,
) -> crate::registry::ListRequest {
    let visibility = request.extensions().get::<Visibility>().cloned();
    let request = request.into_inner();
    crate::registry::ListRequest {
        name: request.name,
        filter: request.filter,
        page_size: request.page_size,
        page_token: request.page_token,
        visibility,
    }
}

/// What a request is about, for its span: the operation's name, or the
/// parent it works under.
pub(crate) trait Resource {
    fn resource(&self) -> &str;
}

macro_rules! resource {
    ($($request:ty => $field:ident),* $(,)?) => {
        $(impl Resource for $request {
            fn resource(&self) -> &str {
                &self.$field
            }
        })*
    };
}

resource! {
    lro::ListOperationsRequest => name,
    lro::GetOperationRequest => name,
    lro::DeleteOperationRequest => name,
    lro::CancelOperationRequest => name,
    lro::WaitOperationRequest => name,
    wapi::CreateOperationRequest => parent,
    wapi::UpdateOperationRequest => name,
    wapi::CompleteOperationRequest => name,
    wapi::WatchOperationsRequest => parent,
    wapi::GetOperationReportRequest => name,
    wapi::WatchOperationChangesRequest => parent,
}

impl Resource for wapi::RegisterTypesRequest {
    fn resource(&self) -> &str {
        ""
    }
}

/// The operations of a response whose polling reports record the call (a
/// response extension, set only when there are some): the server's
/// observing wrapper records the call there once it succeeded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Polled(pub Vec<String>);

/// `response`, marked with those of `records` that keep polling reports.
pub(crate) fn polled<'r, T>(
    mut response: Response<T>,
    registry: &Registry,
    records: impl IntoIterator<Item = &'r Record>,
) -> Response<T> {
    let names: Vec<String> = records
        .into_iter()
        .filter(|record| registry.keeps_report(record))
        .map(|record| record.name.clone())
        .collect();
    if !names.is_empty() {
        response.extensions_mut().insert(Polled(names));
    }
    response
}

/// The traces the operations of a response were created in (a response
/// extension, set only when there are some): the server's observing wrapper
/// links the call's span to them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Linked(pub Vec<TraceLink>);

/// `response`, marked with the traces `records` were created in.
pub(crate) fn linked<'r, T>(
    mut response: Response<T>,
    records: impl IntoIterator<Item = &'r Record>,
) -> Response<T> {
    let links: Vec<TraceLink> = records
        .into_iter()
        .filter_map(|record| record.trace.clone())
        .collect();
    if !links.is_empty() {
        response.extensions_mut().insert(Linked(links));
    }
    response
}

/// Marks a gRPC request that the REST surface made (a request extension),
/// so metrics and polling reports can tell the transports apart.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ViaRest;

/// `rest` or `grpc`.
pub(crate) fn transport<T>(request: &Request<T>) -> &'static str {
    if request.extensions().get::<ViaRest>().is_some() {
        "rest"
    } else {
        "grpc"
    }
}

/// The time left before the client's deadline, from the `grpc-timeout`
/// header (`<up to 8 digits><H|M|S|m|u|n>`). Absent or malformed → `None`.
pub(crate) fn rpc_deadline(metadata: &MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_units() {
        let mut md = MetadataMap::new();
        for (text, expected) in [
            ("1S", Some(Duration::from_secs(1))),
            ("250m", Some(Duration::from_millis(250))),
            ("2M", Some(Duration::from_secs(120))),
            ("5u", Some(Duration::from_micros(5))),
            ("S", None),
            ("123456789S", None),
            ("1x", None),
        ] {
            md.insert("grpc-timeout", text.parse().unwrap());
            assert_eq!(rpc_deadline(&md), expected, "{text}");
        }
    }
}
