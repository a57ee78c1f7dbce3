//! What each request is, and where it goes: gRPC (opsd's three services,
//! health, reflection), the server's own endpoints (`/healthz`,
//! `/metrics`, the operator page under `/ui/`), or REST.
//!
//! [`Kind`] classifies a request from its head alone, for the layers of
//! `calls.rs`: the gRPC method it calls (known from the path; a REST call's
//! method is known once routed), and whether it counts against
//! `--max-in-flight` (Waits and streams do not). [`App`] routes it; gRPC
//! calls to opsd's services go through the request guard (`guard.rs`).
//!
//! Browsers reach the same gRPC services through gRPC-Web (tonic-web turns
//! the call into gRPC before the guard and back after), and, with
//! `--cors-allow-origin`, from pages of other origins: CORS (tower-http)
//! wraps every request that carries an `Origin`, answering preflights
//! itself.

use std::{convert::Infallible, future::Future, pin::Pin};

use bytes::Bytes;
use futures_util::future::Either;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::watch;
use tonic::{body::Body, service::Routes, Status};
use tower::{Layer, ServiceExt};
use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};

use super::{
    auth::Auth,
    connections::Connections,
    guard::{GuardSettings, Guarded},
    metrics,
    shed::Shed,
    ui, Console, Operations, Workers,
};
use crate::{api::rest::RestService, error::Error, registry::Registry};

/// What a request is, as far as its head tells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kind {
    /// gRPC (`application/grpc*`), else HTTP (REST and the server's own).
    pub grpc: bool,
    /// The method, for a gRPC call to one of opsd's services.
    pub method: Option<&'static str>,
    /// Counts against `--max-in-flight`.
    pub counted: bool,
}

/// The methods of opsd's services by gRPC path: (path, name, long-lived).
/// Long-lived calls (Wait, the streams) do not count against
/// `--max-in-flight`.
const GRPC_METHODS: &[(&str, &str, bool)] = &[
    (
        "/google.longrunning.Operations/ListOperations",
        "ListOperations",
        false,
    ),
    (
        "/google.longrunning.Operations/GetOperation",
        "GetOperation",
        false,
    ),
    (
        "/google.longrunning.Operations/DeleteOperation",
        "DeleteOperation",
        false,
    ),
    (
        "/google.longrunning.Operations/CancelOperation",
        "CancelOperation",
        false,
    ),
    (
        "/google.longrunning.Operations/WaitOperation",
        "WaitOperation",
        true,
    ),
    ("/opsd.v1.Workers/CreateOperation", "CreateOperation", false),
    ("/opsd.v1.Workers/UpdateOperation", "UpdateOperation", false),
    (
        "/opsd.v1.Workers/CompleteOperation",
        "CompleteOperation",
        false,
    ),
    ("/opsd.v1.Workers/WatchOperations", "WatchOperations", true),
    ("/opsd.v1.Workers/RegisterTypes", "RegisterTypes", false),
    (
        "/opsd.v1.Workers/GetOperationReport",
        "GetOperationReport",
        false,
    ),
    (
        "/opsd.v1.Console/ListOperationInfos",
        "ListOperationInfos",
        false,
    ),
    (
        "/opsd.v1.Console/GetOperationInfo",
        "GetOperationInfo",
        false,
    ),
    (
        "/opsd.v1.Console/WatchOperationChanges",
        "WatchOperationChanges",
        true,
    ),
];

impl Kind {
    pub fn of<B>(request: &Request<B>) -> Self {
        let grpc = request
            .headers()
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        let path = request.uri().path();
        if grpc {
            return match GRPC_METHODS.iter().find(|(p, _, _)| *p == path) {
                Some(&(_, name, long_lived)) => Self {
                    grpc,
                    method: Some(name),
                    counted: !long_lived,
                },
                None => Self {
                    grpc,
                    method: None,
                    counted: false,
                },
            };
        }
        // REST Waits and feeds are the routes with the `:wait` and `:watch`
        // verbs (every default route and service config maps them so); the
        // server's own pages do not count either.
        // CORS preflights (OPTIONS) are answered by the CORS layer alone.
        let own = matches!(path, "/healthz" | "/metrics")
            || path.starts_with("/ui")
            || request.method() == http::Method::OPTIONS;
        Self {
            grpc,
            method: None,
            counted: !own && !path.ends_with(":wait") && !path.ends_with(":watch"),
        }
    }
}

/// Routes each request to gRPC, the server's own endpoints or REST.
/// Cloning it is shallow.
#[derive(Clone)]
pub struct App {
    pub grpc: Routes,
    pub rest: RestService<Operations, Workers, Console>,
    /// For `/healthz` and the gauges of `/metrics`.
    pub registry: Registry,
    pub metrics: Option<PrometheusHandle>,
    /// For the `opsd_connections` gauge of `/metrics`.
    pub connections: std::sync::Arc<Connections>,
    pub guard: GuardSettings,
    pub shed: std::sync::Arc<Shed>,
    /// Authentication, when auth is on.
    pub auth: Option<std::sync::Arc<Auth>>,
    /// Whether `/ui/` serves the operator page.
    pub ui: bool,
    /// For `/healthz`: the store's health, where it has one.
    pub store_health: Option<watch::Receiver<bool>>,
    /// With `--cors-allow-origin`: the CORS policy requests with an
    /// `Origin` pass through.
    pub cors: Option<CorsLayer>,
}

/// The CORS policy for `origins` (`*` allows any): the methods REST uses
/// (gRPC-Web posts), any request header the browser asks for (so
/// `authorization`, `content-type`, `x-grpc-web`, `grpc-timeout`), the
/// response headers that carry gRPC's outcome and `Retry-After`. No
/// credentials (cookies): opsd's callers send bearer tokens.
pub fn cors_policy(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            origins
                .iter()
                .filter_map(|o| http::HeaderValue::from_str(o).ok()),
        )
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([
                http::Method::GET,
                http::Method::POST,
                http::Method::PATCH,
                http::Method::DELETE,
            ])
            .allow_headers(AllowHeaders::mirror_request())
            .expose_headers([
                http::HeaderName::from_static("grpc-status"),
                http::HeaderName::from_static("grpc-message"),
                http::HeaderName::from_static("grpc-status-details-bin"),
                http::header::RETRY_AFTER,
            ])
            .max_age(std::time::Duration::from_secs(600)),
    )
}

/// Whether a gRPC request is gRPC-Web (`application/grpc-web`,
/// `application/grpc-web+proto`, `application/grpc-web-text…`).
fn is_grpc_web<B>(request: &Request<B>) -> bool {
    request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc-web"))
}

/// The future of one request. A gRPC call holds only the router's future;
/// the larger REST one is boxed, so the many parked gRPC Waits do not carry
/// its size.
pub type Routed = Either<
    tower::util::Oneshot<Routes, Request<Guarded<Incoming>>>,
    Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>,
>;

impl App {
    /// Routes `request`, of `kind`, through the CORS policy when it is
    /// set and the request comes from a page (`Origin`).
    pub fn route(&self, request: Request<Incoming>, kind: Kind) -> Routed {
        match &self.cors {
            Some(cors) if request.headers().contains_key(http::header::ORIGIN) => {
                let app = self.clone();
                let service = cors.layer(tower::service_fn(move |request| {
                    app.route_inner(request, kind)
                }));
                Either::Right(Box::pin(service.oneshot(request)))
            }
            _ => self.route_inner(request, kind),
        }
    }

    fn route_inner(&self, request: Request<Incoming>, kind: Kind) -> Routed {
        // Only opsd's unary request bodies are guarded.
        let guard = kind.method.map(|_| self.guard);
        if kind.grpc && is_grpc_web(&request) {
            let routes = self.grpc.clone();
            let grpc = tower::service_fn(move |request: Request<Body>| {
                let request = request.map(|body| Guarded::new(body, guard));
                routes.clone().oneshot(request)
            });
            return Either::Right(Box::pin(
                tonic_web::GrpcWebLayer::new().layer(grpc).oneshot(request),
            ));
        }
        if kind.grpc {
            let request = request.map(|body| Guarded::new(body, guard));
            return Either::Left(self.grpc.clone().oneshot(request));
        }
        let app = self.clone();
        Either::Right(Box::pin(async move {
            let get = request.method() == http::Method::GET;
            Ok(match request.uri().path() {
                "/healthz" if get => app.health(request.uri().query()).map(Body::new),
                "/metrics" if get && app.metrics.is_some() => app.metrics().await.map(Body::new),
                path if app.ui && ui::is_ui_path(path) => {
                    ui::answer(request.method(), path, request.headers()).map(Body::new)
                }
                _ => app.rest.handle(request).await,
            })
        }))
    }

    /// The answer to a call refused before it was routed (shed, or without
    /// valid credentials): a trailers-only gRPC answer, or REST's JSON error
    /// envelope (429 with `Retry-After`, 401 or 403 with `WWW-Authenticate`).
    pub fn refusal<B>(&self, request: &Request<B>, kind: Kind, error: Error) -> Response<Body> {
        let response = self.refusal_of(request, kind, error);
        self.with_cors(request, response)
    }

    /// `response`, answered before routing (shed, unauthenticated), with
    /// the CORS headers the request's origin would get once routed: a page
    /// of an allowed origin can read why it was refused.
    fn with_cors<B>(&self, request: &Request<B>, response: Response<Body>) -> Response<Body> {
        let Some(cors) = &self.cors else {
            return response;
        };
        let mut head = Request::new(());
        *head.method_mut() = request.method().clone();
        *head.uri_mut() = request.uri().clone();
        *head.headers_mut() = request.headers().clone();
        let mut answer = Some(response);
        let service = cors.layer(tower::service_fn(move |_: Request<()>| {
            std::future::ready(Ok::<_, Infallible>(
                answer
                    .take()
                    .unwrap_or_else(|| Response::new(Body::empty())),
            ))
        }));
        // The inner future is ready, so the layer's is too.
        match futures_util::FutureExt::now_or_never(service.oneshot(head)) {
            Some(Ok(response)) => response,
            Some(Err(never)) => match never {},
            None => unreachable!("a ready response wrapped by CORS is ready"),
        }
    }

    fn refusal_of<B>(&self, request: &Request<B>, kind: Kind, error: Error) -> Response<Body> {
        if kind.grpc {
            if let Error::Overloaded { .. } = error {
                let mut response = Response::new(Body::empty());
                *response.headers_mut() = self.shed.grpc_refusal();
                return response;
            }
            return Status::from(error).into_http();
        }
        self.rest
            .error_answer(request.uri().query(), &Status::from(error))
            .map(Body::new)
    }

    /// The method a REST request would call, for the metrics of a refusal.
    pub fn rest_method<B>(&self, request: &Request<B>) -> Option<&'static str> {
        self.rest
            .method_name(request.method(), request.uri().path())
    }

    /// `{"status": "SERVING"}`, or 503 `NOT_SERVING` while draining or
    /// while the store is unhealthy.
    fn health(&self, query: Option<&str>) -> Response<Full<Bytes>> {
        let store_down = self.store_health.as_ref().is_some_and(|h| !*h.borrow());
        let (status, text) = if self.registry.is_shutting_down() || store_down {
            (http::StatusCode::SERVICE_UNAVAILABLE, "NOT_SERVING")
        } else {
            (http::StatusCode::OK, "SERVING")
        };
        self.rest
            .json_answer(query, status, &serde_json::json!({ "status": text }))
    }

    /// The Prometheus text, with the gauges read now.
    async fn metrics(&self) -> Response<Full<Bytes>> {
        let text = match &self.metrics {
            Some(handle) => metrics::render(handle, &self.registry, self.connections.len()).await,
            None => String::new(),
        };
        let mut response = Response::new(Full::new(Bytes::from(text)));
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(content_type: &str, path: &str) -> Kind {
        let request = Request::builder()
            .uri(path)
            .header("content-type", content_type)
            .body(())
            .unwrap();
        Kind::of(&request)
    }

    #[test]
    fn requests_are_classified_from_their_head() {
        let get = kind(
            "application/grpc",
            "/google.longrunning.Operations/GetOperation",
        );
        assert_eq!((get.method, get.counted), (Some("GetOperation"), true));
        let wait = kind(
            "application/grpc+proto",
            "/google.longrunning.Operations/WaitOperation",
        );
        assert_eq!((wait.method, wait.counted), (Some("WaitOperation"), false));
        let health = kind("application/grpc", "/grpc.health.v1.Health/Check");
        assert_eq!((health.method, health.counted), (None, false));
        assert!(kind("application/json", "/v1/operations/a").counted);
        assert!(!kind("", "/v1/operations/a:wait").counted);
        assert!(!kind("", "/v1/projects/p/operations:watch").counted);
        assert!(!kind("", "/ui/app.js").counted);
        assert!(!kind("", "/metrics").counted);
        for (path, name, _) in GRPC_METHODS {
            assert!(path.ends_with(name), "{path}");
        }
    }
}
