//! `opsd ops health`: `GET /healthz` over HTTP/1.1, the check a container
//! runtime runs (the Dockerfile's `HEALTHCHECK`): the image carries no curl,
//! and the check must not depend on one.
//!
//! Healthy is a 2xx answer (`{"status": "SERVING"}`); anything else — a
//! 503 while the server drains, a refused connection, no answer within 5 s —
//! is UNAVAILABLE, which `opsd ops` turns into exit code 78.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tonic::Status;

/// The most a check may take, connection included.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Asks `server` (`HOST:PORT` or `http://HOST:PORT`) for `/healthz`: the
/// status it reports when healthy, else UNAVAILABLE saying why.
pub async fn check(server: &str) -> Result<String, Status> {
    let authority = match server.split_once("://") {
        None => server,
        Some(("http", rest)) => rest.trim_end_matches('/'),
        Some(_) => {
            return Err(Status::invalid_argument(format!(
            "--server {server:?}: health checks speak plain HTTP (HOST:PORT or http://HOST:PORT)"
        )))
        }
    };
    tokio::time::timeout(TIMEOUT, get(authority))
        .await
        .map_err(|_| {
            Status::unavailable(format!(
                "{authority} did not answer /healthz within {TIMEOUT:?}"
            ))
        })?
}

async fn get(authority: &str) -> Result<String, Status> {
    let failed = |what: &str, e: &dyn std::fmt::Display| {
        Status::unavailable(format!("{what} {authority}: {e}"))
    };
    let stream = TcpStream::connect(authority)
        .await
        .map_err(|e| failed("cannot reach", &e))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| failed("no HTTP/1.1 from", &e))?;
    // Drives the connection while the request below waits for its answer;
    // it ends when the connection closes, at the latest with the process.
    tokio::spawn(connection);
    let request = http::Request::get("/healthz")
        .header(http::header::HOST, authority)
        .body(Empty::<Bytes>::new())
        .map_err(|e| Status::invalid_argument(format!("--server {authority:?}: {e}")))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| failed("no answer from", &e))?;
    let code = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| failed("a broken answer from", &e))?
        .to_bytes();
    let reported = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("status")?.as_str().map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(&body).trim().to_owned());
    if code.is_success() {
        Ok(reported)
    } else {
        Err(Status::unavailable(format!(
            "{authority}/healthz answered {code}: {reported}"
        )))
    }
}
