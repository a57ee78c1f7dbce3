//! What every call shares, in one wrapper: timing, metrics, spans and
//! polling reports.
//!
//! [`Observed`] wraps a service of the `Operations`, `Workers` or `Console` trait and
//! is itself one, so the server mounts the wrapped services for gRPC and
//! hands the same wrapped services to the REST transcoder: a call is
//! observed once, whichever transport it came by. Around each call it
//!
//! - runs the handler inside a debug-level `rpc` span (method, transport,
//!   resource, and the status code once answered), which is also the call's
//!   OpenTelemetry span when traces are on ([`super::trace`]): named
//!   `{service}/{method}`, a child of the caller's W3C `traceparent`, linked
//!   to the traces the operations it answered about were created in
//!   (`api::Linked`); the caller's trace goes into the request for
//!   CreateOperation to keep;
//! - records `opsd_rpc_total` and `opsd_rpc_duration_seconds` when the
//!   handler answers (for a stream, when the stream is handed out);
//! - logs a call that failed on the server's side (INTERNAL, UNAVAILABLE,
//!   UNKNOWN, DATA_LOSS) at warn with its method and resource, which the
//!   span (off at the default level) would otherwise carry;
//! - records a successful call in the polling reports of the operations
//!   the handler marked ([`Polled`]);
//! - with auth on ([`Observed::authorized`]), decides the call before its
//!   handler runs: the caller's [`Principal`] (put in the request by the
//!   server's call layer) needs the method's permission on what the
//!   request names (`auth::policy`); a refusal is PERMISSION_DENIED before
//!   the store is touched, and a listing gets the caller's [`Visibility`]
//!   in its extensions for the registry to apply. Each decision is logged
//!   at debug with the subject, method and name.
//!
//! The per-call work is a plain future wrapper rather than an `async fn`,
//! so a parked call (a Wait) does not hold a second copy of its state.
//!
//! A gRPC call refused before its handler runs (a message that does not
//! decode or is too large, a body too slow, a call shed) never reaches
//! `Observed`. The server's call layer gives each gRPC call a [`Witness`],
//! which `Observed` marks, and records with [`refused`] the calls whose
//! witness stayed unmarked: every call is counted and logged once.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    task::{ready, Context, Poll},
    time::Instant,
};

use tonic::{Code, Request, Response, Status};

use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::{
    auth::{policy::Targeted, Permission, Principal},
    metrics, trace,
};
use crate::{
    api::{
        grpc::{console_server::Console, operations_server::Operations, workers_server::Workers},
        transport, Linked, Polled, Resource,
    },
    error::{AuthFailure, Error},
    pb::{
        google::longrunning::{
            CancelOperationRequest, DeleteOperationRequest, GetOperationRequest,
            ListOperationsRequest, ListOperationsResponse, Operation, WaitOperationRequest,
        },
        opsd::v1::{
            CompleteOperationRequest, CreateOperationRequest, GetOperationReportRequest,
            ListOperationInfosResponse, OperationInfo, OperationReport, RegisterTypesRequest,
            RegisterTypesResponse, UpdateOperationRequest, WatchOperationChangesRequest,
            WatchOperationsRequest,
        },
    },
    registry::{Registry, Visibility},
};

/// `{service}/{method}`, the name of a call's OpenTelemetry span.
struct FullMethod(&'static str, &'static str);

impl std::fmt::Display for FullMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.0, self.1)
    }
}

/// A service with every call observed. Cloning it is as cheap as cloning
/// the service (a registry handle besides).
#[derive(Clone)]
pub struct Observed<S> {
    inner: S,
    registry: Registry,
    /// Every call needs a principal allowed to make it (auth on).
    authorized: bool,
}

impl<S> Observed<S> {
    /// Observes `inner`; polling reports go to `registry`.
    pub fn new(inner: S, registry: Registry) -> Self {
        Self {
            inner,
            registry,
            authorized: false,
        }
    }

    /// With `on`, every call must carry a [`Principal`] (the server's call
    /// layer puts it in the request) with the method's permission on what
    /// it names.
    pub fn authorized(mut self, on: bool) -> Self {
        self.authorized = on;
        self
    }

    /// Runs `call` (the inner service's answer to `request`) as `method`
    /// of `service`.
    fn call<'a, T, R, F>(
        &'a self,
        service: &'static str,
        method: &'static str,
        mut request: Request<T>,
        call: impl FnOnce(Request<T>) -> F,
    ) -> Call<'a, F>
    where
        T: Resource + Targeted,
        F: Future<Output = Result<Response<R>, Status>>,
    {
        if let Some(witness) = request.extensions().get::<Witness>() {
            witness.0.store(true, Ordering::Relaxed);
        }
        let denied = if self.authorized {
            authorize(method, &mut request).err().map(Status::from)
        } else {
            None
        };
        let via = transport(&request);
        let resource: Box<str> = request.get_ref().resource().into();
        let span = tracing::debug_span!(
            target: trace::SPAN_TARGET,
            "rpc",
            method,
            transport = via,
            resource = &*resource,
            otel.name = %FullMethod(service, method),
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = service,
            rpc.method = method,
            rpc.grpc.status_code = Empty,
            otel.status_code = Empty,
        );
        if let Some((parent, link)) = trace::incoming(request.metadata()) {
            // Before the span is first entered, when its OpenTelemetry span
            // starts; without the layer (traces off) there is nothing to set.
            let _ = span.set_parent(parent);
            request.extensions_mut().insert(link);
        }
        let call = match denied {
            Some(_) => None,
            None => {
                let _entered = span.enter();
                Some(call(request))
            }
        };
        Call {
            call,
            denied,
            method,
            transport: via,
            resource,
            started: Instant::now(),
            span,
            registry: &self.registry,
        }
    }
}

/// Decides a call (see the module docs): puts a listing's visibility in
/// the request, or returns the refusal.
fn authorize<T: Resource + Targeted>(
    method: &'static str,
    request: &mut Request<T>,
) -> Result<(), Error> {
    let Some(principal) = request.extensions().get::<Principal>() else {
        // Without the server's call layer nothing vouches for the caller.
        metrics::auth_denied(AuthFailure::Missing.reason());
        return Err(Error::Unauthenticated {
            reason: AuthFailure::Missing,
        });
    };
    let Some(permission) = Permission::of_method(method) else {
        return Ok(());
    };
    let name = request.get_ref().resource();
    match principal.authorize(permission, request.get_ref().target()) {
        Ok(visibility) => {
            tracing::debug!(subject = &*principal.subject, method, name, "call allowed");
            if let Some(visibility) = visibility {
                request.extensions_mut().insert::<Visibility>(visibility);
            }
            Ok(())
        }
        Err(error) => {
            tracing::debug!(
                subject = &*principal.subject,
                method,
                name,
                reason = error.reason(),
                "call denied"
            );
            metrics::auth_denied(error.reason());
            Err(error)
        }
    }
}

/// Marks a gRPC call that reached [`Observed`] (a request extension).
#[derive(Clone, Debug, Default)]
pub(crate) struct Witness(Arc<AtomicBool>);

impl Witness {
    /// Whether `Observed` saw the call.
    pub(crate) fn observed(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Counts and logs a call refused before its handler ran, with the code
/// it was answered with.
pub(crate) fn refused(method: &'static str, transport: &'static str, code: Code, started: Instant) {
    metrics::rpc(method, transport, code, started.elapsed());
    tracing::debug!(
        method,
        transport,
        code = metrics::code_name(code),
        "call refused before its handler"
    );
}

pin_project_lite::pin_project! {
    /// One observed call: the handler's future and what is recorded when
    /// it answers.
    pub(crate) struct Call<'a, F> {
        #[pin]
        call: Option<F>,
        // The refusal of a call auth denied (then `call` is `None`).
        denied: Option<Status>,
        method: &'static str,
        transport: &'static str,
        resource: Box<str>,
        started: Instant,
        span: tracing::Span,
        registry: &'a Registry,
    }
}

impl<F, R> Future for Call<'_, F>
where
    F: Future<Output = Result<Response<R>, Status>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let _entered = this.span.enter();
        let mut result = match (this.denied.take(), this.call.as_pin_mut()) {
            (Some(status), _) => Err(status),
            (None, Some(call)) => ready!(call.poll(cx)),
            (None, None) => Err(Status::internal("a call polled after it answered")),
        };
        let code = match &mut result {
            Ok(response) => {
                if let Some(Polled(names)) = response.extensions_mut().remove::<Polled>() {
                    for name in &names {
                        this.registry.report_call(name, this.method, this.transport);
                    }
                }
                if let Some(Linked(links)) = response.extensions_mut().remove::<Linked>() {
                    for link in &links {
                        this.span.add_link(trace::span_context(link));
                    }
                }
                Code::Ok
            }
            Err(status) => status.code(),
        };
        this.span.record("rpc.grpc.status_code", code as i64);
        metrics::rpc(this.method, this.transport, code, this.started.elapsed());
        if let Err(status) = &result {
            if matches!(
                code,
                Code::Internal | Code::Unavailable | Code::Unknown | Code::DataLoss
            ) {
                this.span.record("otel.status_code", "error");
                tracing::warn!(
                    method = *this.method,
                    transport = *this.transport,
                    resource = &**this.resource,
                    code = metrics::code_name(code),
                    message = status.message(),
                    "call failed"
                );
            }
        }
        Poll::Ready(result)
    }
}

/// Delegates each method to the inner service through [`Observed::call`].
macro_rules! observed {
    ($service:literal: $($method:ident($request:ty) -> $response:ty as $name:literal;)*) => {
        $(
            fn $method<'a, 'async_trait>(
                &'a self,
                request: Request<$request>,
            ) -> Pin<Box<dyn Future<Output = Result<Response<$response>, Status>> + Send + 'async_trait>>
            where
                'a: 'async_trait,
                Self: 'async_trait,
            {
                Box::pin(self.call($service, $name, request, |request| self.inner.$method(request)))
            }
        )*
    };
}

impl<S: Operations> Operations for Observed<S> {
    observed! { "google.longrunning.Operations":
        list_operations(ListOperationsRequest) -> ListOperationsResponse as "ListOperations";
        get_operation(GetOperationRequest) -> Operation as "GetOperation";
        delete_operation(DeleteOperationRequest) -> () as "DeleteOperation";
        cancel_operation(CancelOperationRequest) -> () as "CancelOperation";
        wait_operation(WaitOperationRequest) -> Operation as "WaitOperation";
    }
}

impl<S: Workers> Workers for Observed<S> {
    type WatchOperationsStream = S::WatchOperationsStream;

    observed! { "opsd.v1.Workers":
        create_operation(CreateOperationRequest) -> Operation as "CreateOperation";
        update_operation(UpdateOperationRequest) -> Operation as "UpdateOperation";
        complete_operation(CompleteOperationRequest) -> Operation as "CompleteOperation";
        watch_operations(WatchOperationsRequest) -> S::WatchOperationsStream as "WatchOperations";
        register_types(RegisterTypesRequest) -> RegisterTypesResponse as "RegisterTypes";
        get_operation_report(GetOperationReportRequest) -> OperationReport as "GetOperationReport";
    }
}

impl<S: Console> Console for Observed<S> {
    type WatchOperationChangesStream = S::WatchOperationChangesStream;

    observed! { "opsd.v1.Console":
        list_operation_infos(ListOperationsRequest) -> ListOperationInfosResponse as "ListOperationInfos";
        get_operation_info(GetOperationRequest) -> OperationInfo as "GetOperationInfo";
        watch_operation_changes(WatchOperationChangesRequest) -> S::WatchOperationChangesStream as "WatchOperationChanges";
    }
}
