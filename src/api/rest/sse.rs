//! Server-sent events: the REST face of `Console.WatchOperationChanges`
//! (`GET /v1/{parent}/operations:watch`), what the operator page and
//! `curl -N` follow.
//!
//! ```text
//! data: {"name":"projects/p/operations/a","done":true,"response":{...}}
//!
//! event: deleted
//! data: {"name":"projects/p/operations/b"}
//!
//! : keep-alive
//! ```
//!
//! One `data:` line of compact ProtoJSON `Operation` per change, a
//! `deleted` event for a deletion, and a comment every
//! [`KEEP_ALIVE`] so proxies keep the connection and a client that went
//! away is found (the write fails and the stream, with its follower, is
//! dropped). A failure while following ends the stream with an `error`
//! event holding Google's JSON error envelope.

use std::{pin::Pin, time::Duration};

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body::Frame;
use http_body_util::StreamBody;
use prost_reflect::DescriptorPool;
use serde_json::json;
use tokio_stream::{Stream, StreamExt};
use tonic::Status;

use super::operation_json;
use crate::{error::json_envelope, json::JsonOptions, pb::opsd::v1::OperationChange};

/// The changes a follower sends.
pub(super) type Changes = Pin<Box<dyn Stream<Item = Result<OperationChange, Status>> + Send>>;

/// How often an idle stream sends a comment.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The `text/event-stream` response that follows `changes`.
pub(super) fn response(
    changes: Changes,
    pool: DescriptorPool,
    options: JsonOptions,
) -> Response<tonic::body::Body> {
    // A follower ends its stream after an error, so the error event is last.
    let events = changes.map(move |change| event(change, &pool, options));
    let keep_alive = tokio_stream::wrappers::IntervalStream::new(tokio::time::interval_at(
        tokio::time::Instant::now() + KEEP_ALIVE,
        KEEP_ALIVE,
    ))
    .map(|_| Bytes::from_static(b": keep-alive\n\n"));
    // The events decide when the stream ends; the comments only fill the gaps.
    let merged = events
        .map(Some)
        .chain(tokio_stream::once(None))
        .merge(keep_alive.map(Some))
        .take_while(Option::is_some)
        .map(|bytes| Ok::<_, std::convert::Infallible>(Frame::data(bytes.unwrap_or_default())));
    let mut response = Response::new(tonic::body::Body::new(StreamBody::new(merged)));
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Tells buffering proxies (nginx) to pass each event on at once.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// One event's text.
fn event(
    change: Result<OperationChange, Status>,
    pool: &DescriptorPool,
    options: JsonOptions,
) -> Bytes {
    let (kind, data) = match change {
        Ok(change) => match change.info.and_then(|info| info.operation) {
            Some(op) if !change.deleted => (None, operation_json(&op, pool, options)),
            _ => (Some("deleted"), json!({ "name": change.name })),
        },
        Err(status) => (Some("error"), json_envelope(&status, pool, options).1),
    };
    let mut text = String::new();
    if let Some(kind) = kind {
        text.push_str("event: ");
        text.push_str(kind);
        text.push('\n');
    }
    // Compact JSON holds no newline, so one `data:` line carries it.
    text.push_str("data: ");
    text.push_str(&data.to_string());
    text.push_str("\n\n");
    Bytes::from(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        api::types::base_pool,
        pb::{google::longrunning::Operation, opsd::v1::OperationInfo},
    };

    #[test]
    fn events_are_one_data_line_each() {
        let pool = base_pool();
        let changed = OperationChange {
            name: "operations/a".into(),
            info: Some(OperationInfo {
                operation: Some(Operation {
                    name: "operations/a".into(),
                    done: true,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            deleted: false,
            change_time: None,
        };
        let text = event(Ok(changed), &pool, JsonOptions::default());
        assert_eq!(
            &text[..],
            b"data: {\"name\":\"operations/a\",\"done\":true}\n\n"
        );
        let deleted = OperationChange {
            name: "operations/b".into(),
            deleted: true,
            ..Default::default()
        };
        let text = event(Ok(deleted), &pool, JsonOptions::default());
        assert_eq!(
            &text[..],
            b"event: deleted\ndata: {\"name\":\"operations/b\"}\n\n"
        );
        let text = event(
            Err(Status::unavailable("gone")),
            &pool,
            JsonOptions::default(),
        );
        assert!(
            text.starts_with(b"event: error\ndata: {\"error\":"),
            "{text:?}"
        );
    }
}
