//! `opsd bench`: a load generator against a running server.
//!
//! Workloads (closed loop: each client sends its next call when the last one
//! answered; latencies go into an HDR histogram):
//!
//! - `create-complete`: CreateOperation then CompleteOperation, two durable
//!   writes per iteration; on redb this measures group commit.
//! - `fill`: creates N operations (then done), to measure start-up and List
//!   on a large store.
//! - `churn`: create+complete forever against a server with a short
//!   `--retention`, printing the store file's size, to show it stays bounded.
//! - `list`: walks a listing page by page, to compare page cost across
//!   store sizes (keyset pagination: it should not grow with the store).
//! - `startup`: starts `opsd serve` on a store and times how long it takes
//!   to answer health checks.

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use tonic::transport::{Channel, Endpoint};

use crate::pb::{
    google::longrunning::operations_client::OperationsClient,
    opsd::v1::{
        complete_operation_request, workers_client::WorkersClient, CompleteOperationRequest,
        CreateOperationRequest,
    },
};

/// A failure of the load generator itself (not of single calls).
pub type BenchError = Box<dyn std::error::Error + Send + Sync>;

/// Where and how hard to push.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// The server, e.g. `http://127.0.0.1:50051`.
    pub target: String,
    /// Concurrent clients (each with its own connection).
    pub concurrency: usize,
    /// How long to run (after warm-up).
    pub duration: Duration,
    /// The parent operations are created under.
    pub parent: String,
}

/// What a run measured.
#[derive(Debug)]
pub struct LoadReport {
    pub iterations: u64,
    pub errors: u64,
    pub elapsed: Duration,
    pub latency: Histogram<u64>,
}

impl LoadReport {
    pub fn rate(&self) -> f64 {
        self.iterations as f64 / self.elapsed.as_secs_f64()
    }

    /// One line: iterations/s and latency percentiles in microseconds.
    pub fn summary(&self) -> String {
        let q = |p: f64| self.latency.value_at_quantile(p);
        format!(
            "{:.0} iterations/s ({} in {:.1}s, {} errors); latency µs p50 {} p99 {} p99.9 {} max {}",
            self.rate(),
            self.iterations,
            self.elapsed.as_secs_f64(),
            self.errors,
            q(0.5),
            q(0.99),
            q(0.999),
            self.latency.max()
        )
    }
}

async fn connect(target: &str) -> Result<Channel, BenchError> {
    Ok(Endpoint::from_shared(target.to_owned())?
        .tcp_nodelay(true)
        .connect()
        .await?)
}

/// One create+complete iteration.
async fn create_complete(
    workers: &mut WorkersClient<Channel>,
    parent: &str,
) -> Result<(), tonic::Status> {
    let request = CreateOperationRequest {
        parent: parent.to_owned(),
        ..Default::default()
    };
    let name = workers.create_operation(request).await?.into_inner().name;
    let response =
        prost_types::Any::from_msg(&()).map_err(|e| tonic::Status::internal(e.to_string()))?;
    workers
        .complete_operation(CompleteOperationRequest {
            name,
            result: Some(complete_operation_request::Result::Response(response)),
            metadata: None,
        })
        .await?;
    Ok(())
}

/// Runs create+complete from `concurrency` clients for `duration`.
/// `tick` is called about every second with the iterations so far.
pub async fn run_create_complete(
    options: &LoadOptions,
    tick: impl Fn(u64) + Send + Sync + 'static,
) -> Result<LoadReport, BenchError> {
    let iterations = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let latency = Arc::new(Mutex::new(Histogram::<u64>::new(3)?));
    let started = Instant::now();
    let until = started + options.duration;
    let mut clients = Vec::new();
    for _ in 0..options.concurrency.max(1) {
        let mut workers = WorkersClient::new(connect(&options.target).await?);
        let (iterations, errors, latency) = (iterations.clone(), errors.clone(), latency.clone());
        let parent = options.parent.clone();
        clients.push(tokio::spawn(async move {
            let mut local = Histogram::<u64>::new(3).expect("3 significant digits is valid");
            while Instant::now() < until {
                let sent = Instant::now();
                match create_complete(&mut workers, &parent).await {
                    Ok(()) => {
                        let _ = local.record(sent.elapsed().as_micros() as u64);
                        iterations.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            if let Ok(mut all) = latency.lock() {
                let _ = all.add(&local);
            }
        }));
    }
    let ticker = {
        let iterations = iterations.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                tick(iterations.load(Ordering::Relaxed));
            }
        })
    };
    for client in clients {
        client.await?;
    }
    ticker.abort();
    let elapsed = started.elapsed();
    let latency = latency
        .lock()
        .map_err(|_| "histogram lock poisoned")?
        .clone();
    Ok(LoadReport {
        iterations: iterations.load(Ordering::Relaxed),
        errors: errors.load(Ordering::Relaxed),
        elapsed,
        latency,
    })
}

/// Walks the listing of `options.parent` page by page (starting over at the
/// end) from every client; one iteration is one page. `filter` applies to
/// every page.
pub async fn run_list(
    options: &LoadOptions,
    page_size: i32,
    filter: &str,
) -> Result<LoadReport, BenchError> {
    let iterations = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let latency = Arc::new(Mutex::new(Histogram::<u64>::new(3)?));
    let started = Instant::now();
    let until = started + options.duration;
    let mut clients = Vec::new();
    for _ in 0..options.concurrency.max(1) {
        let mut ops = OperationsClient::new(connect(&options.target).await?);
        let (iterations, errors, latency) = (iterations.clone(), errors.clone(), latency.clone());
        let (parent, filter) = (options.parent.clone(), filter.to_owned());
        clients.push(tokio::spawn(async move {
            let mut local = Histogram::<u64>::new(3).expect("3 significant digits is valid");
            let mut token = String::new();
            while Instant::now() < until {
                let request = crate::pb::google::longrunning::ListOperationsRequest {
                    name: parent.clone(),
                    filter: filter.clone(),
                    page_size,
                    page_token: std::mem::take(&mut token),
                    return_partial_success: false,
                };
                let sent = Instant::now();
                match ops.list_operations(request).await {
                    Ok(page) => {
                        let _ = local.record(sent.elapsed().as_micros() as u64);
                        iterations.fetch_add(1, Ordering::Relaxed);
                        token = page.into_inner().next_page_token;
                    }
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            if let Ok(mut all) = latency.lock() {
                let _ = all.add(&local);
            }
        }));
    }
    for client in clients {
        client.await?;
    }
    let elapsed = started.elapsed();
    let latency = latency
        .lock()
        .map_err(|_| "histogram lock poisoned")?
        .clone();
    Ok(LoadReport {
        iterations: iterations.load(Ordering::Relaxed),
        errors: errors.load(Ordering::Relaxed),
        elapsed,
        latency,
    })
}

/// Creates `count` operations (each then completed) with `concurrency` clients.
pub async fn fill(options: &LoadOptions, count: u64) -> Result<Duration, BenchError> {
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..options.concurrency.max(1) {
        let mut workers = WorkersClient::new(connect(&options.target).await?);
        let next = next.clone();
        let parent = options.parent.clone();
        clients.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < count {
                create_complete(&mut workers, &parent).await?;
            }
            Ok::<_, tonic::Status>(())
        }));
    }
    for client in clients {
        client.await??;
    }
    Ok(started.elapsed())
}

/// Starts `opsd serve` (this executable) on `store` and returns how long it
/// took to answer a GetOperation (NOT_FOUND is an answer).
pub async fn startup(store: &str, extra: &[String]) -> Result<Duration, BenchError> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let target = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--store",
            store,
        ])
        .args(extra)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()?;
    let elapsed = loop {
        if let Ok(channel) = connect(&target).await {
            let mut ops = OperationsClient::new(channel);
            let request = crate::pb::google::longrunning::GetOperationRequest {
                name: "operations/startup-probe".into(),
            };
            match ops.get_operation(request).await {
                Ok(_) => break started.elapsed(),
                Err(status) if status.code() == tonic::Code::NotFound => break started.elapsed(),
                Err(_) => {}
            }
        }
        if started.elapsed() > Duration::from_secs(120) {
            return Err("the server did not answer within 120 s".into());
        }
        if let Some(status) = child.try_wait()? {
            return Err(format!("opsd exited: {status}").into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    child.kill().await?;
    Ok(elapsed)
}

/// The size of a file in bytes (0 if it cannot be read).
pub fn file_size(path: &PathBuf) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}
