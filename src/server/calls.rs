//! The layers every request passes through on its connection, around
//! [`App`], in order:
//!
//! 1. The connection counts the call open until its response has been sent
//!    (hyper drops the body): its idle deadline, making room at the cap and
//!    the drain's count of cut calls read that.
//! 2. Authentication, when auth is on ([`super::auth`]): the call's bearer
//!    token (or its connection's client certificate) becomes the
//!    [`Principal`] in the request's extensions, or the call is refused at
//!    once with UNAUTHENTICATED (REST 401 with `WWW-Authenticate`), or
//!    PERMISSION_DENIED for a token without the required scope; before
//!    shedding, so a flood without credentials is refused cheaply. A token
//!    whose key id the JWKS does not have waits for the set to be fetched
//!    again (rate-limited), then passes the next steps.
//! 3. Load shedding ([`super::shed`]) admits the call, or refuses it at once
//!    with RESOURCE_EXHAUSTED (REST 429 with `Retry-After`); the refusal is
//!    counted and logged as a call.
//! 4. A gRPC call to opsd's services carries a [`Witness`]: if it was
//!    answered before its handler ran (a malformed or oversized message, a
//!    slow body), `Observed` never saw it, and it is counted and logged here.
//!
//! Both what the connection counts and the shedding permit ride in the
//! response body ([`CallBody`]), so they end with the response, streams
//! included.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use tonic::{body::Body, Status};

use super::{
    app::{App, Kind, Routed},
    auth::{Authn, Principal},
    connections::ConnState,
    observe::{refused, Witness},
    shed::Permit,
    tls::PeerIdentity,
};
use crate::error::Error;

/// The service hyper calls for each request of one connection.
#[derive(Clone)]
pub struct ConnService {
    app: App,
    conn: Arc<ConnState>,
    /// The connection's verified client certificate (mTLS).
    peer: Option<Arc<PeerIdentity>>,
}

impl ConnService {
    pub fn new(app: App, conn: Arc<ConnState>, peer: Option<Arc<PeerIdentity>>) -> Self {
        Self { app, conn, peer }
    }
}

/// A call counted open on its connection until dropped.
struct OpenCall(Arc<ConnState>);

impl OpenCall {
    fn new(conn: &Arc<ConnState>) -> Self {
        conn.call_started();
        Self(conn.clone())
    }
}

impl Drop for OpenCall {
    fn drop(&mut self) {
        self.0.call_ended();
    }
}

/// What a call holds until its response has been sent.
struct Held {
    _open: OpenCall,
    _permit: Option<Permit>,
}

fn transport(kind: Kind) -> &'static str {
    if kind.grpc {
        "grpc"
    } else {
        "rest"
    }
}

impl hyper::service::Service<Request<Incoming>> for ConnService {
    type Response = Response<CallBody>;
    type Error = Infallible;
    type Future = CallFuture;

    fn call(&self, mut request: Request<Incoming>) -> CallFuture {
        let open = OpenCall::new(&self.conn);
        let kind = Kind::of(&request);
        if let Some(auth) = &self.app.auth {
            match auth.authenticate(&request, kind.grpc, self.peer.as_deref()) {
                Authn::Exempt => {}
                Authn::Principal(principal) => {
                    request.extensions_mut().insert(principal);
                }
                Authn::Refused(error) => return self.refuse(request, kind, open, error),
                Authn::Later(verified) => {
                    let service = self.clone();
                    return CallFuture::deferred(Box::pin(async move {
                        match verified.await {
                            Ok(principal) => {
                                request.extensions_mut().insert::<Principal>(principal);
                                service.admit(request, kind, open).await
                            }
                            Err(error) => service.refuse(request, kind, open, error).await,
                        }
                    }));
                }
            }
        }
        self.admit(request, kind, open)
    }
}

impl ConnService {
    /// Sheds or routes an authenticated (or exempt) call.
    fn admit(&self, mut request: Request<Incoming>, kind: Kind, open: OpenCall) -> CallFuture {
        let permit = if kind.counted {
            match self.app.shed.admit() {
                Ok(permit) => permit,
                Err(error) => return self.refuse(request, kind, open, error),
            }
        } else {
            None
        };
        let witness = kind.method.filter(|_| kind.grpc).map(|method| {
            let witness = Witness::default();
            request.extensions_mut().insert(witness.clone());
            (witness, method, Instant::now())
        });
        CallFuture {
            routed: Some(self.app.route(request, kind)),
            refusal: None,
            deferred: None,
            held: Some(Held {
                _open: open,
                _permit: permit,
            }),
            witness,
        }
    }

    /// Refuses a call before it is routed (credentials, shedding): counted
    /// and logged as a call, answered once its body is in.
    fn refuse(
        &self,
        request: Request<Incoming>,
        kind: Kind,
        open: OpenCall,
        error: Error,
    ) -> CallFuture {
        let method = kind
            .method
            .or_else(|| self.app.rest_method(&request))
            .unwrap_or("-");
        let code = error.code();
        let response = self.app.refusal(&request, kind, error);
        refused(method, transport(kind), code, Instant::now());
        let deadline = Instant::now() + self.app.guard.body_read_timeout;
        CallFuture {
            routed: None,
            refusal: Some(Refusal {
                body: request.into_body(),
                response: Some(response),
                seen: 0,
                deadline,
                timer: None,
            }),
            deferred: None,
            held: Some(Held {
                _open: open,
                _permit: None,
            }),
            witness: None,
        }
    }
}

pin_project_lite::pin_project! {
    /// One call: the routed request (or a refusal) and what it holds.
    pub struct CallFuture {
        #[pin]
        routed: Option<Routed>,
        refusal: Option<Refusal>,
        // A call whose credentials are still being checked: the whole call,
        // decided later (rare: a key id the JWKS did not have).
        deferred: Option<Pin<Box<dyn Future<Output = Result<Response<CallBody>, Infallible>> + Send>>>,
        held: Option<Held>,
        witness: Option<(Witness, &'static str, Instant)>,
    }
}

impl CallFuture {
    fn deferred(
        call: Pin<Box<dyn Future<Output = Result<Response<CallBody>, Infallible>> + Send>>,
    ) -> Self {
        Self {
            routed: None,
            refusal: None,
            deferred: Some(call),
            held: None,
            witness: None,
        }
    }
}

impl Future for CallFuture {
    type Output = Result<Response<CallBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Some(deferred) = this.deferred.as_mut() {
            return deferred.as_mut().poll(cx);
        }
        let response = match this.refusal.as_mut() {
            Some(refusal) => ready!(refusal.poll(cx)),
            None => match this.routed.as_pin_mut() {
                Some(routed) => match ready!(routed.poll(cx)) {
                    Ok(response) => response,
                    Err(never) => match never {},
                },
                None => Response::new(Body::empty()),
            },
        };
        if let Some((witness, method, started)) = this.witness.take() {
            if !witness.observed() {
                if let Some(status) = grpc_status(&response) {
                    tracing::debug!(method, code = ?status.code(), message = status.message(), "call refused before its handler");
                    refused(method, "grpc", status.code(), started);
                }
            }
        }
        let held = this.held.take();
        Poll::Ready(Ok(response.map(|body| CallBody { body, _held: held })))
    }
}

/// How much of a refused request's body is read before the refusal goes.
const DRAIN_LIMIT: usize = 64 * 1024;

/// A refusal, sent once the request body is in. Answered before the
/// client's END_STREAM arrives, the stream would be reset, and h2 closes a
/// connection after 1,024 such resets (GOAWAY ENHANCE_YOUR_CALM
/// `too_many_internal_resets`, its defence against reset floods): under
/// shedding, busy clients would lose their connections. The body (a few
/// bytes for every call opsd sheds) is read and dropped, at most
/// [`DRAIN_LIMIT`] bytes and until `--body-read-timeout`; the timer is
/// armed only if the body is not already in.
struct Refusal {
    body: Incoming,
    response: Option<Response<Body>>,
    seen: usize,
    deadline: Instant,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Refusal {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Response<Body>> {
        while self.seen <= DRAIN_LIMIT && !self.body.is_end_stream() {
            match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    self.seen += frame.data_ref().map_or(0, Bytes::len);
                }
                Poll::Ready(Some(Err(_)) | None) => break,
                Poll::Pending => {
                    let deadline = self.deadline;
                    let timer = self
                        .timer
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline.into())));
                    if timer.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    break;
                }
            }
        }
        Poll::Ready(self.response.take().unwrap_or_default())
    }
}

/// The status of a gRPC response answered at once (trailers only).
fn grpc_status(response: &Response<Body>) -> Option<Status> {
    if let Some(status) = response.extensions().get::<Status>() {
        return Some(status.clone());
    }
    Status::from_header_map(response.headers())
}

pin_project_lite::pin_project! {
    /// A response body, with what its call holds until it is dropped.
    pub struct CallBody {
        #[pin]
        body: Body,
        _held: Option<Held>,
    }
}

impl HttpBody for CallBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
