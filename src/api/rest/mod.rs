//! The HTTP/JSON surface of Google's front end, on the gRPC port.
//!
//! API (the defaults, from operations.proto's `google.api.http` options):
//!
//! - `GET    /v1/{name=operations}`: ListOperations (`?filter&pageSize&pageToken&returnPartialSuccess`)
//! - `GET    /v1/{name=operations/**}`: GetOperation
//! - `DELETE /v1/{name=operations/**}`: DeleteOperation → `{}`
//! - `POST   /v1/{name=operations/**}:cancel`: CancelOperation → `{}`
//! - `GET    /v1/{name=**}:report`: the polling report (`Workers.GetOperationReport`)
//!
//! plus the `google.longrunning.Operations` rules of every `--http-rules`
//! service-config file (e.g. `POST /v1/{name=projects/*/locations/*/operations/*}:cancel`).
//!
//! REST is a transcoding of the gRPC calls: a request becomes the same
//! request message and goes to the same `Operations` (or `Workers`) method
//! of the same service the gRPC routes serve (the server hands over the
//! services it observes), so every semantic, every error and every metric
//! is the gRPC one. Errors become Google's JSON envelope in one place,
//! `error::json_envelope`. `/healthz` and `/metrics` are the
//! server's, not routes of this surface.

mod request;
mod rules;
mod sse;
mod template;

pub use rules::RuleError;

use std::{path::PathBuf, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{header, HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use prost_reflect::DescriptorPool;
use serde_json::{json, Value};
use tonic::Status;

use self::{
    request::Presentation,
    rules::{RestMethod, Route},
    template::SplitPath,
};
use super::{
    grpc::{console_server::Console, operations_server::Operations, workers_server::Workers},
    types::TypeRegistry,
    ViaRest,
};
use crate::{
    error::{json_envelope, retry_after, www_authenticate, Error},
    json::{any_to_json, message_to_json, render_message, status_to_json, write_json, JsonOptions},
    pb::{
        google::longrunning::{operation::Result as OpResult, ListOperationsResponse, Operation},
        opsd::v1::OperationInfo,
    },
};

/// What a REST call answers: a JSON body, or a stream of server-sent events.
enum Answer {
    Json(Vec<u8>),
    Events(sse::Changes),
}

/// The values a path template bound: (field path, value).
type PathValues = Vec<(String, String)>;

/// The content type of every response.
const JSON: &str = "application/json; charset=utf-8";

/// Which routes REST serves besides those of the protos and the
/// `--http-rules` files (`--rest-routes`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RestRoutes {
    /// Also Google Cloud's operation URL shapes under any version segment
    /// (`/{version}/{name=**/operations/*}`, ...), so Google's URLs work with
    /// no configuration.
    #[default]
    Google,
    /// Only what operations.proto and the loaded files declare, for exact
    /// Google front-end routing.
    Strict,
}

/// How the REST surface behaves; `Config` carries it.
#[derive(Clone, Debug)]
pub struct RestSettings {
    /// Google service-config YAML files whose Operations HTTP rules are
    /// served besides the defaults (and before them).
    pub http_rules: Vec<PathBuf>,
    /// Whether Google Cloud's URL shapes are served too.
    pub routes: RestRoutes,
    /// Refuse calls without a generated client's `x-goog-api-client`
    /// (`--strict-rest-clients`).
    pub strict_clients: bool,
    /// The largest request body, in bytes (larger → 413).
    pub max_body_bytes: usize,
    /// How long a client may take to send a request body.
    pub body_read_timeout: Duration,
}

impl Default for RestSettings {
    fn default() -> Self {
        Self {
            http_rules: Vec::new(),
            routes: RestRoutes::default(),
            strict_clients: false,
            max_body_bytes: 1024 * 1024,
            body_read_timeout: Duration::from_secs(30),
        }
    }
}

/// The REST service over the `Operations` service `O`, the `Workers`
/// service `W` and the `Console` service `C`. Cloning it is shallow.
pub struct RestService<O, W, C> {
    inner: Arc<Inner<O, W, C>>,
}

impl<O, W, C> Clone for RestService<O, W, C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<O, W, C> {
    /// In order of precedence: templates with a verb first, then by source
    /// (files, protos, Google's shapes), then the most specific.
    routes: Vec<Route>,
    operations: O,
    workers: W,
    console: C,
    types: TypeRegistry,
    settings: RestSettings,
}

impl<O: Operations, W: Workers, C: Console> RestService<O, W, C> {
    /// The default routes plus those of each service-config file of
    /// `settings`; `types` renders the `Any`s of responses.
    pub fn new(
        operations: O,
        workers: W,
        console: C,
        types: TypeRegistry,
        settings: RestSettings,
    ) -> Result<Self, RuleError> {
        let pool = types.pool();
        // Precedence: the files first, then the protos' rules, then Google's
        // shapes; within each, routes with a verb, then the most specific.
        let mut sources = Vec::new();
        for file in &settings.http_rules {
            sources.push(rules::routes_from_yaml(file, &pool)?);
        }
        sources.push(rules::default_routes(&pool)?);
        if settings.routes == RestRoutes::Google {
            sources.push(rules::google_routes(&pool)?);
        }
        let mut counts: Vec<(&str, usize)> = Vec::new();
        for route in sources.iter().flatten() {
            match counts
                .iter_mut()
                .find(|(origin, _)| *origin == route.origin)
            {
                Some((_, count)) => *count += 1,
                None => counts.push((&route.origin, 1)),
            }
        }
        for (origin, routes) in counts {
            tracing::info!(source = origin, routes, "REST routes");
        }
        let mut routes: Vec<(usize, Route)> = sources
            .into_iter()
            .enumerate()
            .flat_map(|(rank, routes)| routes.into_iter().map(move |r| (rank, r)))
            .collect();
        routes.sort_by_key(|(rank, r)| {
            (
                !r.template.has_verb(),
                *rank,
                r.template.has_double_star(),
                std::cmp::Reverse(r.template.literal_count()),
            )
        });
        let routes: Vec<Route> = routes.into_iter().map(|(_, r)| r).collect();
        for route in &routes {
            tracing::debug!(verb = %route.verb, template = %route.template, origin = %route.origin, "REST route");
        }
        Ok(Self {
            inner: Arc::new(Inner {
                routes,
                operations,
                workers,
                console,
                types,
                settings,
            }),
        })
    }

    /// A JSON answer of the server's own (such as `/healthz`), presented as
    /// the query asks (`prettyPrint`, `alt`) like every REST answer; a bad
    /// system parameter is a 400 error.
    pub fn json_answer(
        &self,
        query: Option<&str>,
        status: StatusCode,
        value: &Value,
    ) -> Response<Full<Bytes>> {
        match request::split_query(query.unwrap_or("")) {
            Ok((_, presentation)) => json_response(status, value, presentation),
            Err(err) => error_response(
                &Status::from(err),
                &self.inner.types.pool(),
                Presentation::default(),
            ),
        }
    }

    /// Google's JSON error envelope for `status`, presented as the query
    /// asks: the answer to a call refused before it was routed (shed).
    pub fn error_answer(&self, query: Option<&str>, status: &Status) -> Response<Full<Bytes>> {
        let presentation = request::split_query(query.unwrap_or(""))
            .map(|(_, presentation)| presentation)
            .unwrap_or_default();
        error_response(status, &self.inner.types.pool(), presentation)
    }

    /// The name of the method a request would call (`GetOperation`), if a
    /// route matches it.
    pub fn method_name(&self, method: &Method, path: &str) -> Option<&'static str> {
        let (route, _) = self.find(method, path).ok()?;
        route.method.selector().rsplit('.').next()
    }

    /// Answers one HTTP request. Never fails: errors are JSON responses.
    pub async fn handle<B>(&self, request: Request<B>) -> Response<tonic::body::Body>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (parts, body) = request.into_parts();
        let pool = self.inner.types.pool();
        let (query, presentation) = match request::split_query(parts.uri.query().unwrap_or("")) {
            Ok(split) => split,
            Err(err) => {
                return error_response(&Status::from(err), &pool, Presentation::default())
                    .map(tonic::body::Body::new)
            }
        };
        match self
            .call(
                &parts.method,
                &parts.uri,
                &parts.headers,
                &parts.extensions,
                body,
                query,
                &pool,
                presentation,
            )
            .await
        {
            Ok(Answer::Json(body)) => {
                body_response(StatusCode::OK, body).map(tonic::body::Body::new)
            }
            Ok(Answer::Events(changes)) => sse::response(changes, pool, presentation.json),
            Err(status) => error_response(&status, &pool, presentation).map(tonic::body::Body::new),
        }
    }

    #[allow(clippy::too_many_arguments)]
    #[tracing::instrument(level = "debug", name = "REST", skip_all, fields(method = %method, path = %uri.path()))]
    async fn call<B>(
        &self,
        method: &Method,
        uri: &http::Uri,
        headers: &HeaderMap,
        extensions: &http::Extensions,
        body: B,
        query: Vec<(String, String)>,
        pool: &DescriptorPool,
        presentation: Presentation,
    ) -> Result<Answer, Status>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (route, values) = self.find(method, uri.path())?;
        let settings = &self.inner.settings;
        if settings.strict_clients {
            check_client_header(headers)?;
        }
        // A bodiless request (every GET) skips the read and its timer.
        let body = if body.is_end_stream() {
            Bytes::new()
        } else {
            read_body(headers, body, settings).await?
        };
        let message = request::build(route.input.clone(), &route.body, &body, values, query)?;
        let ops = &self.inner.operations;
        Ok(Answer::Json(match route.method {
            RestMethod::List => {
                let response = ops
                    .list_operations(grpc(&message, headers, extensions)?)
                    .await?
                    .into_inner();
                list_body(&response, pool, presentation)
            }
            RestMethod::Get => operation_body(
                &ops.get_operation(grpc(&message, headers, extensions)?)
                    .await?
                    .into_inner(),
                pool,
                presentation,
            ),
            RestMethod::Wait => operation_body(
                &ops.wait_operation(grpc(&message, headers, extensions)?)
                    .await?
                    .into_inner(),
                pool,
                presentation,
            ),
            RestMethod::Delete => {
                ops.delete_operation(grpc(&message, headers, extensions)?)
                    .await?;
                b"{}".to_vec()
            }
            RestMethod::Cancel => {
                ops.cancel_operation(grpc(&message, headers, extensions)?)
                    .await?;
                b"{}".to_vec()
            }
            RestMethod::Report => {
                let report = self
                    .inner
                    .workers
                    .get_operation_report(grpc(&message, headers, extensions)?)
                    .await?;
                render_message(
                    report.get_ref(),
                    "opsd.v1.OperationReport",
                    pool,
                    presentation.json,
                    presentation.pretty,
                )
                .map_err(Status::internal)?
            }
            RestMethod::ListInfos => {
                let response = self
                    .inner
                    .console
                    .list_operation_infos(grpc(&message, headers, extensions)?)
                    .await?
                    .into_inner();
                let mut object = serde_json::Map::new();
                if !response.operations.is_empty() {
                    let infos = response
                        .operations
                        .iter()
                        .map(|info| info_json(info, pool, presentation.json))
                        .collect();
                    object.insert("operations".into(), Value::Array(infos));
                }
                if !response.next_page_token.is_empty() {
                    object.insert("nextPageToken".into(), json!(response.next_page_token));
                }
                write_json(&Value::Object(object), presentation.pretty)
            }
            RestMethod::GetInfo => {
                let info = self
                    .inner
                    .console
                    .get_operation_info(grpc(&message, headers, extensions)?)
                    .await?
                    .into_inner();
                write_json(
                    &info_json(&info, pool, presentation.json),
                    presentation.pretty,
                )
            }
            RestMethod::WatchChanges => {
                let changes = self
                    .inner
                    .console
                    .watch_operation_changes(grpc(&message, headers, extensions)?)
                    .await?
                    .into_inner();
                return Ok(Answer::Events(Box::pin(changes)));
            }
        }))
    }

    /// The route for a method and raw path, with its path values.
    fn find(&self, method: &Method, path: &str) -> Result<(&Route, PathValues), Error> {
        let mut allowed: Vec<&Method> = Vec::new();
        let split = SplitPath::new(path).ok_or_else(|| Error::RouteNotFound {
            message: format!("No route for {method} {path}."),
        })?;
        for route in &self.inner.routes {
            match route.template.matches_split(&split) {
                None => {}
                Some(_) if route.verb != method => allowed.push(&route.verb),
                Some(Ok(values)) => return Ok((route, values)),
                Some(Err(err)) => return Err(Error::invalid("path", err.to_string())),
            }
        }
        let message = if allowed.is_empty() {
            let shapes = match self.inner.settings.routes {
                RestRoutes::Google => {
                    "operations.proto's rules (/v1/{name=operations/**}), Google Cloud's \
                     operation URLs under any version (GET/DELETE /{version}/{name=**/operations/*}, \
                     POST ...:cancel and ...:wait, GET /{version}/{name=**}/operations)"
                }
                RestRoutes::Strict => {
                    "only operations.proto's rules (/v1/{name=operations/**}), as \
                     --rest-routes strict asks"
                }
            };
            format!(
                "No route for {method} {path}: this is not an operation URL opsd serves \
                 (an unknown operation would be OPERATION_NOT_FOUND). opsd serves {shapes}, \
                 and the http rules of the service configs given with --http-rules."
            )
        } else {
            allowed.dedup();
            let allowed: Vec<String> = allowed.iter().map(|m| m.to_string()).collect();
            format!(
                "{method} is not allowed on {path}; use {}.",
                allowed.join(" or ")
            )
        };
        Err(Error::RouteNotFound { message })
    }
}

/// The gRPC request for a transcoded (encoded) message, with the client's
/// deadline (`X-Server-Timeout`, in seconds) as `grpc-timeout` and its W3C
/// trace context (`traceparent`, `tracestate`) as they came.
fn grpc<T>(
    message: &[u8],
    headers: &HeaderMap,
    extensions: &http::Extensions,
) -> Result<tonic::Request<T>, Status>
where
    T: prost::Message + Default,
{
    let request = T::decode(message)
        .map_err(|e| Status::internal(format!("cannot transcode the request: {e}")))?;
    // What the server's layers left in the HTTP request (the caller's
    // principal, when auth is on) goes with the call, as on gRPC.
    let mut request = tonic::Request::from_parts(
        tonic::metadata::MetadataMap::new(),
        extensions.clone(),
        request,
    );
    request.extensions_mut().insert(ViaRest);
    let timeout = headers
        .get("x-server-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map(|s| Duration::from_secs_f64(s.min(1e6)));
    if let Some(timeout) = timeout {
        if let Ok(value) = format!("{}m", timeout.as_millis().min(99_999_999)).parse() {
            request.metadata_mut().insert("grpc-timeout", value);
        }
    }
    for header in ["traceparent", "tracestate"] {
        let value = headers
            .get(header)
            .and_then(|v| tonic::metadata::MetadataValue::try_from(v.as_bytes()).ok());
        if let Some(value) = value {
            request.metadata_mut().insert(header, value);
        }
    }
    Ok(request)
}

/// Strict mode: like Google's showcase server, REST calls must come from a
/// generated client, whose `x-goog-api-client` header names `rest/` and `gapic/`.
fn check_client_header(headers: &HeaderMap) -> Result<(), Error> {
    let value = headers
        .get("x-goog-api-client")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if value.contains("rest/") && value.contains("gapic/") {
        return Ok(());
    }
    Err(Error::invalid(
        "x-goog-api-client",
        format!(
            "strict mode: the x-goog-api-client header must name rest/ and gapic/ (got {value:?})"
        ),
    ))
}

async fn read_body<B>(headers: &HeaderMap, body: B, settings: &RestSettings) -> Result<Bytes, Error>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let limit = settings.max_body_bytes;
    let timeout = settings.body_read_timeout;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(Error::PayloadTooLarge { limit });
    }
    let read = tokio::time::timeout(timeout, Limited::new(body, limit).collect());
    let Ok(read) = read.await else {
        return Err(Error::invalid(
            "body",
            format!("the request body did not arrive within {timeout:?}"),
        ));
    };
    match read {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) if err.downcast_ref::<LengthLimitError>().is_some() => {
            Err(Error::PayloadTooLarge { limit })
        }
        Err(err) => Err(Error::invalid(
            "body",
            format!("cannot read the request body: {err}"),
        )),
    }
}

/// An operation as ProtoJSON text.
fn operation_body(op: &Operation, pool: &DescriptorPool, presentation: Presentation) -> Vec<u8> {
    let name = "google.longrunning.Operation";
    render_message(op, name, pool, presentation.json, presentation.pretty).unwrap_or_else(|_| {
        write_json(
            &operation_json(op, pool, presentation.json),
            presentation.pretty,
        )
    })
}

/// A List page as ProtoJSON text.
fn list_body(
    response: &ListOperationsResponse,
    pool: &DescriptorPool,
    presentation: Presentation,
) -> Vec<u8> {
    let name = "google.longrunning.ListOperationsResponse";
    render_message(response, name, pool, presentation.json, presentation.pretty).unwrap_or_else(
        |_| {
            write_json(
                &list_json(response, pool, presentation.json),
                presentation.pretty,
            )
        },
    )
}

/// The ProtoJSON of an operation as the REST surface writes it, for tools
/// such as `opsd ops`: an `Any` of a type `pool` does not know falls back to
/// `{"@type", "value"}` (base64) without hiding the rest.
pub fn render_operation(op: &Operation, pool: &DescriptorPool) -> Value {
    operation_json(op, pool, JsonOptions::default())
}

/// An operation as ProtoJSON; an `Any` of an unknown type falls back to
/// `{"@type", "value"}` without hiding the rest.
fn operation_json(op: &Operation, pool: &DescriptorPool, options: JsonOptions) -> Value {
    if let Ok(value) = message_to_json(op, "google.longrunning.Operation", pool, options) {
        return value;
    }
    let mut object = serde_json::Map::new();
    object.insert("name".into(), json!(op.name));
    if let Some(metadata) = &op.metadata {
        object.insert("metadata".into(), any_to_json(metadata, pool, options));
    }
    if op.done {
        object.insert("done".into(), json!(true));
    }
    match &op.result {
        Some(OpResult::Error(status)) => {
            let error =
                status_to_json(status.code, &status.message, &status.details, pool, options);
            object.insert("error".into(), error);
        }
        Some(OpResult::Response(response)) => {
            object.insert("response".into(), any_to_json(response, pool, options));
        }
        None => {}
    }
    Value::Object(object)
}

/// An `opsd.v1.OperationInfo` as ProtoJSON; its operation's `Any`s of
/// unknown types fall back as in [`operation_json`].
fn info_json(info: &OperationInfo, pool: &DescriptorPool, options: JsonOptions) -> Value {
    const NAME: &str = "opsd.v1.OperationInfo";
    if let Ok(value) = message_to_json(info, NAME, pool, options) {
        return value;
    }
    let facts = OperationInfo {
        operation: None,
        ..info.clone()
    };
    let mut value = message_to_json(&facts, NAME, pool, options).unwrap_or_else(|_| json!({}));
    if let (Some(op), Value::Object(object)) = (&info.operation, &mut value) {
        object.insert("operation".into(), operation_json(op, pool, options));
    }
    value
}

fn list_json(
    response: &ListOperationsResponse,
    pool: &DescriptorPool,
    options: JsonOptions,
) -> Value {
    if let Ok(value) = message_to_json(
        response,
        "google.longrunning.ListOperationsResponse",
        pool,
        options,
    ) {
        return value;
    }
    let mut object = serde_json::Map::new();
    let operations: Vec<Value> = response
        .operations
        .iter()
        .map(|op| operation_json(op, pool, options))
        .collect();
    object.insert("operations".into(), Value::Array(operations));
    if !response.next_page_token.is_empty() {
        object.insert("nextPageToken".into(), json!(response.next_page_token));
    }
    Value::Object(object)
}

fn json_response(
    status: StatusCode,
    value: &Value,
    presentation: Presentation,
) -> Response<Full<Bytes>> {
    body_response(status, write_json(value, presentation.pretty))
}

/// A JSON response of already rendered text (a newline is added).
fn body_response(status: StatusCode, mut body: Vec<u8>) -> Response<Full<Bytes>> {
    body.push(b'\n');
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(JSON));
    response
}

fn error_response(
    status: &Status,
    pool: &DescriptorPool,
    presentation: Presentation,
) -> Response<Full<Bytes>> {
    let (http, body) = json_envelope(status, pool, presentation.json);
    let mut response = json_response(http, &body, presentation);
    if let Some(delay) = retry_after(status) {
        // Whole seconds, rounded up: never sooner than the status asks.
        let seconds = delay.as_secs() + u64::from(delay.subsec_nanos() > 0);
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from(seconds));
    }
    let challenge = www_authenticate(status).and_then(|c| header::HeaderValue::try_from(c).ok());
    if let Some(challenge) = challenge {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, challenge);
    }
    response
}
