//! One connection's life: served by hyper over [`ConnIo`], in a task of its
//! own that does what hyper does not:
//!
//! - **Handshake deadline.** A connection that has not sent the HTTP/2
//!   preface and its SETTINGS, or its first HTTP/1 request head, within
//!   `--header-read-timeout` is closed: silent sockets and clients that
//!   dribble the preface do not stay for ever. On a TLS port the TLS
//!   handshake comes first and counts toward the same deadline.
//! - **Idle deadline.** A connection with no call open for `--idle-timeout`
//!   is shut down gracefully (GOAWAY; HTTP/1 closes an idle connection at
//!   once; hyper also closes an HTTP/1 connection that sends no new request
//!   head within `--header-read-timeout`).
//! - **Making room** at the connection cap (`connections.rs`): a connection
//!   without a handshake is closed at once, an idle one shut down gracefully
//!   and closed after at most [`EVICTION_GRACE`].
//! - **Too many pings** (`io.rs`): hyper fails the connection; the task
//!   writes GOAWAY `ENHANCE_YOUR_CALM` with the debug data `too_many_pings`
//!   when the server was between two frames, then closes.
//! - **Drain.** The connection is shut down gracefully once its handshake is
//!   complete (a connection accepted just before the drain may still send
//!   its calls; the handshake deadline bounds it): hyper sends GOAWAY
//!   (NO_ERROR) with the last stream it accepted and answers every accepted
//!   stream; an HTTP/1 connection finishes the response in progress with
//!   `Connection: close`. Calls still open when `--drain-timeout` passes are
//!   cut (the serve loop counts them).
//! - **Lingering close.** When hyper is done, the socket comes back
//!   ([`Handback`]): the task shuts its write side (the client reads the
//!   end of the answers), then reads and discards until the client closes,
//!   at most until the drain deadline (or [`LINGER`]), then closes. Closing
//!   a socket with unread bytes from the client (a WINDOW_UPDATE, a PING)
//!   makes the kernel send a reset, and the client's kernel then discards
//!   answers it had received but not yet read.

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::{oneshot, Notify},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use super::{
    app::App,
    calls::ConnService,
    connections::Entry,
    frames::{goaway, ENHANCE_YOUR_CALM},
    io::{ConnIo, Handback, Socket},
    metrics,
    tls::{PeerIdentity, Tls},
};

/// How long a connection that makes room has to finish after its GOAWAY.
pub const EVICTION_GRACE: Duration = Duration::from_secs(1);
/// How long a closed connection lingers for its client to close, when the
/// server is not draining.
pub const LINGER: Duration = Duration::from_secs(5);

/// What a connection's task is told.
#[derive(Clone, Copy, Debug)]
pub struct ConnSettings {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub min_ping_interval: Duration,
    pub drain_timeout: Duration,
}

/// The signals of the serve loop to every connection.
#[derive(Clone, Debug, Default)]
pub struct Signals {
    /// Shut down gracefully.
    pub drain: CancellationToken,
    /// The drain timed out: close now.
    pub cut: CancellationToken,
    /// Connections that turned graceful (or will, once their handshake is
    /// complete) since the drain began, for [`Signals::all_draining`].
    draining: Arc<(AtomicUsize, Notify)>,
}

impl Signals {
    fn drain_seen(&self) {
        self.draining.0.fetch_add(1, Ordering::AcqRel);
        self.draining.1.notify_waiters();
    }

    /// Resolves once `open` connections have seen the drain, so the calls
    /// the drain releases (open Waits) are answered as part of it: after
    /// the first GOAWAY, or with `Connection: close`.
    pub async fn all_draining(&self, open: impl Fn() -> usize) {
        loop {
            let notified = self.draining.1.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.draining.0.load(Ordering::Acquire) >= open() {
                return;
            }
            notified.await;
        }
    }
}

/// How the serving ended.
#[derive(Debug)]
enum End {
    Served(Result<(), Box<dyn std::error::Error + Send + Sync>>),
    HandshakeTimeout,
    Evicted,
    Cut,
}

/// Serves one accepted connection until it closes.
pub async fn serve(
    stream: TcpStream,
    entry: Entry,
    app: App,
    builder: Arc<auto::Builder<TokioExecutor>>,
    settings: ConnSettings,
    signals: Signals,
    tls: Option<Tls>,
) {
    let state = entry.state().clone();
    let peer = stream.peer_addr().ok();
    let handshake_deadline = Instant::now() + settings.header_read_timeout;
    let (socket, identity) = match tls {
        None => (Socket::Plain(stream), None),
        Some(tls) => {
            let accepted = tokio::select! {
                accepted = tokio::time::timeout_at(handshake_deadline, tls.acceptor.accept(stream)) => accepted,
                // Making room: a connection without a handshake goes at once.
                () = state.evicted() => {
                    metrics::connection_closed("evicted");
                    return;
                }
                () = signals.cut.cancelled() => return,
            };
            match accepted {
                Ok(Ok(stream)) => {
                    let identity = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|chain| chain.first())
                        .and_then(|cert| PeerIdentity::of(cert))
                        .map(Arc::new);
                    (Socket::Tls(Box::new(stream)), identity)
                }
                Ok(Err(err)) => {
                    tracing::debug!(?peer, cause = %err, "TLS handshake failed");
                    metrics::connection_closed("tls_handshake_failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(
                        ?peer,
                        "closing a connection that did not complete its TLS handshake in time"
                    );
                    metrics::connection_closed("handshake_timeout");
                    return;
                }
            }
        }
    };
    let (back, mut handback) = oneshot::channel();
    let io = ConnIo::new(socket, state.clone(), settings.min_ping_interval, back);
    // Boxed, not pinned on the stack, so it can be dropped before the close.
    let mut conn = Box::pin(builder.serve_connection(
        TokioIo::new(io),
        ConnService::new(app, state.clone(), identity),
    ));

    // Whether hyper was asked to shut the connection down gracefully (once).
    let mut shutting_down = false;
    macro_rules! graceful {
        () => {
            if !shutting_down {
                shutting_down = true;
                conn.as_mut().graceful_shutdown();
            }
        };
    }
    let mut drain_deadline = None;
    let mut awaiting_handshake = false;
    let mut evicted = false;
    let mut evict_deadline = None;
    let timer =
        tokio::time::sleep_until(handshake_deadline.min(Instant::now() + settings.idle_timeout));
    tokio::pin!(timer);
    let end = loop {
        tokio::select! {
            biased;
            result = conn.as_mut() => break End::Served(result),
            () = signals.cut.cancelled() => break End::Cut,
            () = signals.drain.cancelled(), if drain_deadline.is_none() => {
                drain_deadline = Some(Instant::now() + settings.drain_timeout);
                if state.handshake() {
                    graceful!();
                } else {
                    awaiting_handshake = true;
                }
                signals.drain_seen();
            }
            () = state.handshake_completed(), if awaiting_handshake => {
                awaiting_handshake = false;
                graceful!();
            }
            () = state.evicted(), if !evicted => {
                evicted = true;
                if !state.handshake() {
                    break End::Evicted;
                }
                evict_deadline = Some(Instant::now() + EVICTION_GRACE);
                graceful!();
            }
            () = &mut timer => {
                let now = Instant::now();
                if !state.handshake() && now >= handshake_deadline {
                    break End::HandshakeTimeout;
                }
                if evict_deadline.is_some_and(|d| now >= d) {
                    break End::Evicted;
                }
                let mut next = now + settings.idle_timeout;
                if !shutting_down {
                    if let Some(idle) = state.idle_for() {
                        if idle >= settings.idle_timeout {
                            tracing::debug!(?peer, ?idle, "closing an idle connection");
                            metrics::connection_closed("idle");
                            graceful!();
                        } else {
                            next = now + (settings.idle_timeout - idle);
                        }
                    }
                }
                if !state.handshake() {
                    next = next.min(handshake_deadline);
                }
                if let Some(d) = evict_deadline {
                    next = next.min(d);
                }
                timer.as_mut().reset(next);
            }
        }
    };
    // hyper is done with the IO: the stream comes back.
    drop(conn);
    drop(entry);
    let handback = handback.try_recv().ok();
    match &end {
        End::Served(Err(err)) => {
            tracing::debug!(?peer, cause = ?err, "connection ended with an error")
        }
        End::Served(Ok(())) | End::Cut => {}
        End::HandshakeTimeout => {
            tracing::debug!(
                ?peer,
                "closing a connection that did not complete its handshake in time"
            );
            metrics::connection_closed("handshake_timeout");
        }
        End::Evicted => {
            tracing::debug!(?peer, "closing a connection to make room for a new one");
            metrics::connection_closed("evicted");
        }
    }
    let Some(mut handback) = handback else {
        return;
    };
    if handback.too_many_pings {
        tracing::info!(?peer, "refusing a client that sends too many pings");
        metrics::connection_closed("too_many_pings");
        if handback.http2 && handback.at_boundary {
            let frame = goaway(handback.max_stream, ENHANCE_YOUR_CALM, b"too_many_pings");
            let _ = tokio::time::timeout(LINGER, handback.stream.write_all(&frame)).await;
        }
    }
    if matches!(end, End::Cut | End::HandshakeTimeout)
        || matches!(end, End::Evicted) && !state.handshake()
    {
        return;
    }
    let until = drain_deadline.unwrap_or_else(|| Instant::now() + LINGER);
    tokio::select! {
        () = linger(handback) => {}
        () = tokio::time::sleep_until(until) => {}
        () = signals.cut.cancelled() => {}
    }
}

/// Shuts the write side, then reads and discards until the client closes.
async fn linger(handback: Handback) {
    let mut stream = handback.stream;
    let _ = stream.shutdown().await;
    let mut scratch = [0u8; 4096];
    while let Ok(n) = stream.read(&mut scratch).await {
        if n == 0 {
            break;
        }
    }
}
