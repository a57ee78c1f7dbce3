//! The load generator against a running server.
//!
//! [`run`] drives a [`Workload`] closed loop (each client sends its next call
//! when the last one answered) or open loop (a fixed schedule, latency counted
//! from each call's intended send time, so a slow server cannot hide its
//! queueing), with HDR histograms, errors by code, and the server's CPU time
//! per call and RSS from `/proc` when its pid is given. Workloads: GetOperation,
//! REST GET, create+complete (durable writes), List pages.
//!
//! Measurements of their own: [`fill`] (a large store), [`startup`] (time
//! to serve), [`cancel_notify`] (cancel → watching worker), [`waiters`]
//! (memory per parked Wait, wake latency with many parked).
//!
//! `opsd-ceiling` (src/bin) serves the same APIs with no-op handlers: the
//! reference every figure is compared with, in the same run and layout.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;

/// The bearer token the GetOperation workloads and their setup send
/// (`--token`, for a server with auth on), set once at start.
static TOKEN: std::sync::OnceLock<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> =
    std::sync::OnceLock::new();

/// Sets the token every [`authorized`] request carries.
pub fn set_token(token: &str) -> Result<(), String> {
    let value = format!("Bearer {token}")
        .parse()
        .map_err(|_| "the token is not ASCII".to_owned())?;
    TOKEN
        .set(value)
        .map_err(|_| "the token is already set".to_owned())
}

/// `message` as a request, with the `--token` bearer header if there is one.
pub fn authorized<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = TOKEN.get() {
        request
            .metadata_mut()
            .insert("authorization", token.clone());
    }
    request
}
use tonic::transport::{Channel, Endpoint};

use opsd::pb::{
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
    /// The servers, e.g. `http://127.0.0.1:50051`: replicas of one store,
    /// which clients are spread over round-robin. The cross-replica
    /// workloads act on the first and watch or wait on the last.
    pub targets: Vec<String>,
    /// Concurrent clients, each with its own connection (closed loop), or
    /// the connections the open loop spreads its calls over.
    pub concurrency: usize,
    /// How long to run.
    pub duration: Duration,
    /// The parent operations are created under (and listed).
    pub parent: String,
    /// Open loop: calls per second on a fixed schedule, latency measured
    /// from each call's intended send time. `None`: closed loop.
    pub rate: Option<f64>,
    /// Local servers' pids, to report their CPU seconds per call and their
    /// RSS (summed).
    pub server_pids: Vec<u32>,
}

impl LoadOptions {
    /// The first target: where single-server workloads go.
    pub fn target(&self) -> &str {
        self.targets
            .first()
            .map_or("http://127.0.0.1:50051", String::as_str)
    }

    /// The last target: where cross-replica workloads watch and wait.
    pub fn last_target(&self) -> &str {
        self.targets.last().map_or(self.target(), String::as_str)
    }

    /// The servers' CPU time and RSS, summed.
    fn usage(&self) -> Option<(Duration, u64)> {
        if self.server_pids.is_empty() {
            return None;
        }
        self.server_pids
            .iter()
            .map(|pid| server_usage(*pid))
            .try_fold((Duration::ZERO, 0), |(cpu, rss), usage| {
                usage.map(|(c, r)| (cpu + c, rss + r))
            })
    }
}

/// What a run does, call by call.
#[derive(Clone, Debug)]
pub enum Workload {
    /// GetOperation of one existing operation (`done`: a finished one).
    Get { name: String, done: bool },
    /// GET /v1/{name} over HTTP/1.1.
    RestGet { name: String },
    /// CreateOperation then CompleteOperation (two durable writes).
    CreateComplete,
    /// ListOperations page by page over `parent`, starting over at the end.
    List { page_size: i32, filter: String },
}

/// What a run measured.
#[derive(Debug)]
pub struct LoadReport {
    pub iterations: u64,
    pub errors: BTreeMap<String, u64>,
    pub elapsed: Duration,
    pub latency: Histogram<u64>,
    /// Open loop: how late each call was sent after its intended time (µs),
    /// the generator's own health; latency already counts it.
    pub send_lag: Option<Histogram<u64>>,
    /// Server CPU seconds per call (user + system), with `server_pid`.
    pub server_cpu_per_call: Option<Duration>,
    /// Server resident set size at the end, with `server_pid`.
    pub server_rss_bytes: Option<u64>,
}

impl LoadReport {
    pub fn rate(&self) -> f64 {
        self.iterations as f64 / self.elapsed.as_secs_f64()
    }

    /// One line: calls/s, latency percentiles in microseconds, errors by
    /// code, server CPU per call and RSS.
    pub fn summary(&self) -> String {
        let q = |p: f64| self.latency.value_at_quantile(p);
        let mut line = format!(
            "{:.0} calls/s ({} in {:.1}s); latency µs p50 {} p99 {} p99.9 {} max {}",
            self.rate(),
            self.iterations,
            self.elapsed.as_secs_f64(),
            q(0.5),
            q(0.99),
            q(0.999),
            self.latency.max()
        );
        if let Some(lag) = &self.send_lag {
            line.push_str(&format!(
                "; send lag µs p99 {} max {}",
                lag.value_at_quantile(0.99),
                lag.max()
            ));
        }
        if self.errors.is_empty() {
            line.push_str("; 0 errors");
        } else {
            line.push_str(&format!("; errors {:?}", self.errors));
        }
        if let Some(cpu) = self.server_cpu_per_call {
            line.push_str(&format!(
                "; server CPU {:.1} µs/call",
                cpu.as_secs_f64() * 1e6
            ));
        }
        if let Some(rss) = self.server_rss_bytes {
            line.push_str(&format!(
                "; server RSS {:.1} MiB",
                rss as f64 / (1024.0 * 1024.0)
            ));
        }
        line
    }
}

async fn connect(target: &str) -> Result<Channel, BenchError> {
    Ok(Endpoint::from_shared(target.to_owned())?
        .tcp_nodelay(true)
        .connect()
        .await?)
}

type HttpClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Empty<bytes::Bytes>,
>;

/// One client's connections.
#[derive(Clone)]
struct Clients {
    ops: OperationsClient<Channel>,
    workers: WorkersClient<Channel>,
    http: HttpClient,
    target: String,
    /// List position.
    token: String,
}

impl Clients {
    async fn new(target: &str) -> Result<Self, BenchError> {
        let channel = connect(target).await?;
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.set_nodelay(true);
        let http =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build(connector);
        Ok(Self {
            ops: OperationsClient::new(channel.clone()),
            workers: WorkersClient::new(channel),
            http,
            target: target.to_owned(),
            token: String::new(),
        })
    }

    /// One call of `workload`; the error is the status code's name.
    async fn call(&mut self, workload: &Workload, parent: &str) -> Result<(), String> {
        let code = |s: tonic::Status| format!("{:?}", s.code());
        match workload {
            Workload::Get { name, .. } => self
                .ops
                .get_operation(authorized(
                    opsd::pb::google::longrunning::GetOperationRequest { name: name.clone() },
                ))
                .await
                .map(drop)
                .map_err(code),
            Workload::RestGet { name } => {
                let uri: http::Uri = format!("{}/v1/{name}", self.target)
                    .parse()
                    .map_err(|e| format!("{e}"))?;
                let response = self.http.get(uri).await.map_err(|e| format!("http: {e}"))?;
                let status = response.status();
                http_body_util::BodyExt::collect(response.into_body())
                    .await
                    .map_err(|e| format!("http: {e}"))?;
                if status.is_success() {
                    Ok(())
                } else {
                    Err(format!("HTTP {}", status.as_u16()))
                }
            }
            Workload::CreateComplete => create_complete(&mut self.workers, parent)
                .await
                .map(drop)
                .map_err(code),
            Workload::List { page_size, filter } => {
                let request = opsd::pb::google::longrunning::ListOperationsRequest {
                    name: parent.to_owned(),
                    filter: filter.clone(),
                    page_size: *page_size,
                    page_token: std::mem::take(&mut self.token),
                    return_partial_success: false,
                };
                let page = self.ops.list_operations(request).await.map_err(code)?;
                self.token = page.into_inner().next_page_token;
                Ok(())
            }
        }
    }
}

/// One create+complete iteration; returns the operation's name.
async fn create_complete(
    workers: &mut WorkersClient<Channel>,
    parent: &str,
) -> Result<String, tonic::Status> {
    let request = CreateOperationRequest {
        parent: parent.to_owned(),
        ..Default::default()
    };
    let name = workers.create_operation(request).await?.into_inner().name;
    complete(workers, &name).await?;
    Ok(name)
}

/// Completes `name` with a `google.protobuf.Empty` response.
async fn complete(workers: &mut WorkersClient<Channel>, name: &str) -> Result<(), tonic::Status> {
    let response =
        prost_types::Any::from_msg(&()).map_err(|e| tonic::Status::internal(e.to_string()))?;
    workers
        .complete_operation(CompleteOperationRequest {
            name: name.to_owned(),
            result: Some(complete_operation_request::Result::Response(response)),
            metadata: None,
        })
        .await?;
    Ok(())
}

/// Server CPU time (user + system) and RSS from /proc.
pub(crate) fn server_usage(pid: u32) -> Option<(Duration, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on Linux.
    let cpu = Duration::from_millis(ticks * 10);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some((cpu, rss_kib * 1024))
}

#[derive(Default)]
struct Tally {
    iterations: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
    latency: Mutex<Option<Histogram<u64>>>,
}

impl Tally {
    fn error(&self, code: String) {
        if let Ok(mut errors) = self.errors.lock() {
            *errors.entry(code).or_default() += 1;
        }
    }

    fn merge(&self, local: &Histogram<u64>) {
        if let Ok(mut all) = self.latency.lock() {
            match all.as_mut() {
                Some(all) => {
                    let _ = all.add(local);
                }
                None => *all = Some(local.clone()),
            }
        }
    }
}

/// Waits until `at` more precisely than tokio's 1 ms timer: sleeps to a
/// millisecond before, then yields until the moment (the load generator has
/// a core of its own; a late send would count as server latency).
async fn pace(at: Instant) {
    let early = Duration::from_millis(1);
    if let Some(rest) = at.checked_duration_since(Instant::now()) {
        if rest > early {
            tokio::time::sleep_until((at - early).into()).await;
        }
    }
    while Instant::now() < at {
        tokio::task::yield_now().await;
    }
}

/// Runs `workload` closed loop (or open loop with `rate`) for the duration.
/// `tick` is called about every second with the calls so far.
pub async fn run(
    options: &LoadOptions,
    workload: &Workload,
    tick: impl Fn(u64) + Send + Sync + 'static,
) -> Result<LoadReport, BenchError> {
    let tally = Arc::new(Tally::default());
    let mut clients = Vec::new();
    let targets = if options.targets.is_empty() {
        vec![options.target().to_owned()]
    } else {
        options.targets.clone()
    };
    for i in 0..options.concurrency.max(1) {
        clients.push(Clients::new(&targets[i % targets.len()]).await?);
    }
    let before = options.usage();
    let started = Instant::now();
    let until = started + options.duration;
    let mut send_lag = None;
    let ticker = {
        let tally = tally.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                tick(tally.iterations.load(Ordering::Relaxed));
            }
        })
    };
    match options.rate {
        None => {
            let mut tasks = Vec::new();
            for mut client in clients {
                let (tally, workload, parent) =
                    (tally.clone(), workload.clone(), options.parent.clone());
                tasks.push(tokio::spawn(async move {
                    let mut local =
                        Histogram::<u64>::new(3).expect("3 significant digits is valid");
                    while Instant::now() < until {
                        let sent = Instant::now();
                        match client.call(&workload, &parent).await {
                            Ok(()) => {
                                let _ = local.record(sent.elapsed().as_micros() as u64);
                                tally.iterations.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(code) => tally.error(code),
                        }
                    }
                    tally.merge(&local);
                }));
            }
            for task in tasks {
                task.await?;
            }
        }
        Some(rate) => {
            // Each call starts at its intended time on its own task, so a
            // slow answer delays nothing else (no coordinated omission).
            let interval = Duration::from_secs_f64(1.0 / rate.max(0.001));
            let in_flight = Arc::new(tokio::sync::Semaphore::new(100_000));
            let mut tasks = tokio::task::JoinSet::new();
            // Recorded by this scheduling task as calls finish.
            let mut latency = Histogram::<u64>::new(3)?;
            let mut lag = Histogram::<u64>::new(3)?;
            let mut i: u32 = 0;
            loop {
                let intended = started + interval * i;
                if intended >= until {
                    break;
                }
                pace(intended).await;
                let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                    tally.error("client overloaded".into());
                    i += 1;
                    continue;
                };
                let mut client = clients[i as usize % clients.len()].clone();
                let (shared, workload, parent) =
                    (tally.clone(), workload.clone(), options.parent.clone());
                tasks.spawn(async move {
                    let sent = intended.elapsed().as_micros() as u64;
                    let result = client.call(&workload, &parent).await;
                    let micros = intended.elapsed().as_micros() as u64;
                    drop(permit);
                    match result {
                        Ok(()) => {
                            shared.iterations.fetch_add(1, Ordering::Relaxed);
                            (sent, Some(micros))
                        }
                        Err(code) => {
                            shared.error(code);
                            (sent, None)
                        }
                    }
                });
                i += 1;
                while let Some(done) = tasks.try_join_next() {
                    if let Ok((sent, answered)) = done {
                        let _ = lag.record(sent);
                        if let Some(micros) = answered {
                            let _ = latency.record(micros);
                        }
                    }
                }
            }
            while let Some(done) = tasks.join_next().await {
                if let Ok((sent, answered)) = done {
                    let _ = lag.record(sent);
                    if let Some(micros) = answered {
                        let _ = latency.record(micros);
                    }
                }
            }
            tally.merge(&latency);
            send_lag = Some(lag);
        }
    }
    ticker.abort();
    let elapsed = started.elapsed();
    let after = options.usage();
    let iterations = tally.iterations.load(Ordering::Relaxed);
    let server_cpu_per_call = match (before, after) {
        (Some((a, _)), Some((b, _))) if iterations > 0 => {
            Some(b.saturating_sub(a) / iterations as u32)
        }
        _ => None,
    };
    let latency = tally
        .latency
        .lock()
        .map_err(|_| "histogram lock poisoned")?
        .clone()
        .unwrap_or(Histogram::new(3)?);
    let errors = tally
        .errors
        .lock()
        .map_err(|_| "error lock poisoned")?
        .clone();
    Ok(LoadReport {
        iterations,
        errors,
        elapsed,
        latency,
        send_lag,
        server_cpu_per_call,
        server_rss_bytes: after.map(|(_, rss)| rss),
    })
}

/// What `fill` measured.
#[derive(Debug)]
pub struct FillReport {
    pub elapsed: Duration,
    /// Server RSS before and after, with `server_pid`.
    pub rss: Option<(u64, u64)>,
    /// The encoded size of one of the operations (as GetOperation returns
    /// it), for memory per operation beyond its encoding.
    pub encoded_size: Option<usize>,
}

/// One workload against a reference server and a target, round by round.
#[derive(Debug)]
pub struct Comparison {
    /// (reference, target) for each round.
    pub rounds: Vec<(LoadReport, LoadReport)>,
}

impl Comparison {
    /// The target's calls/s over the reference's, per round.
    pub fn throughput_ratios(&self) -> Vec<f64> {
        self.rounds
            .iter()
            .filter(|(reference, _)| reference.iterations > 0)
            .map(|(reference, target)| target.rate() / reference.rate())
            .collect()
    }

    /// The target's server CPU per call over the reference's, per round
    /// (when both pids were given).
    pub fn cpu_ratios(&self) -> Vec<f64> {
        self.rounds
            .iter()
            .filter_map(|(reference, target)| {
                let (r, t) = (reference.server_cpu_per_call?, target.server_cpu_per_call?);
                (!r.is_zero()).then(|| t.as_secs_f64() / r.as_secs_f64())
            })
            .collect()
    }

    /// The median ratios with their ranges.
    pub fn summary(&self) -> String {
        let describe = |what: &str, mut ratios: Vec<f64>| {
            if ratios.is_empty() {
                return String::new();
            }
            ratios.sort_by(f64::total_cmp);
            let median = ratios[ratios.len() / 2];
            format!(
                "{what} {median:.2}× the ceiling (rounds {:.2}–{:.2})",
                ratios[0],
                ratios[ratios.len() - 1]
            )
        };
        let parts: Vec<String> = [
            describe("throughput", self.throughput_ratios()),
            describe("server CPU per call", self.cpu_ratios()),
        ]
        .into_iter()
        .filter(|p| !p.is_empty())
        .collect();
        format!(
            "median of {} rounds: {}",
            self.rounds.len(),
            parts.join("; ")
        )
    }
}

/// Runs `workload` for `rounds` rounds against `reference` and `target`,
/// alternating which goes first (reference, target; target, reference; ...)
/// so a drift of the machine's speed weighs on both alike.
pub async fn compare(
    target: &LoadOptions,
    reference: &LoadOptions,
    workload: &Workload,
    rounds: usize,
) -> Result<Comparison, BenchError> {
    let mut out = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let (first, second) = if round % 2 == 0 {
            (reference, target)
        } else {
            (target, reference)
        };
        let a = run(first, workload, |_| {}).await?;
        let b = run(second, workload, |_| {}).await?;
        out.push(if round % 2 == 0 { (a, b) } else { (b, a) });
    }
    Ok(Comparison { rounds: out })
}

/// Creates `count` operations (each then completed) with `concurrency` clients.
pub async fn fill(options: &LoadOptions, count: u64) -> Result<FillReport, BenchError> {
    use prost::Message;
    let next = Arc::new(AtomicU64::new(0));
    let before = options.usage();
    let started = Instant::now();
    let mut clients = Vec::new();
    for i in 0..options.concurrency.max(1) {
        let target = &options.targets[i % options.targets.len().max(1)];
        let mut workers = WorkersClient::new(connect(target).await?);
        let next = next.clone();
        let parent = options.parent.clone();
        clients.push(tokio::spawn(async move {
            let mut last = None;
            while next.fetch_add(1, Ordering::Relaxed) < count {
                last = Some(create_complete(&mut workers, &parent).await?);
            }
            Ok::<_, tonic::Status>(last)
        }));
    }
    let mut sample = None;
    for client in clients {
        sample = client.await??.or(sample);
    }
    let elapsed = started.elapsed();
    let after = options.usage();
    let encoded_size = match sample {
        Some(name) => {
            let mut ops = OperationsClient::new(connect(options.target()).await?);
            let request = opsd::pb::google::longrunning::GetOperationRequest { name };
            Some(ops.get_operation(request).await?.into_inner().encoded_len())
        }
        None => None,
    };
    Ok(FillReport {
        elapsed,
        rss: before.zip(after).map(|((_, a), (_, b))| (a, b)),
        encoded_size,
    })
}

/// The `opsd` binary beside this executable (cargo builds both into the
/// same target directory).
pub fn sibling_opsd() -> Result<PathBuf, BenchError> {
    let exe = std::env::current_exe()?;
    let opsd = exe.with_file_name(format!("opsd{}", std::env::consts::EXE_SUFFIX));
    if !opsd.is_file() {
        return Err(format!(
            "no opsd binary at {}; build it (cargo build --release -p opsd) or pass --opsd PATH",
            opsd.display()
        )
        .into());
    }
    Ok(opsd)
}

/// Starts `opsd serve` (the binary at `opsd`) on `store` and returns how
/// long it took to answer a GetOperation (NOT_FOUND is an answer).
pub async fn startup(
    opsd: &std::path::Path,
    store: &str,
    extra: &[String],
) -> Result<Duration, BenchError> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let target = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    let mut child = tokio::process::Command::new(opsd)
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
            let request = opsd::pb::google::longrunning::GetOperationRequest {
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

/// Cancel → watching worker: creates an operation, cancels it and times
/// how long the worker's `WatchOperations` stream takes to report it, `count`
/// times in a row. Returns the latency histogram (µs). The worker (its
/// stream and its creates) is on the first target, the cancelling client
/// on the last (another replica, when there are two).
pub async fn cancel_notify(
    options: &LoadOptions,
    count: u64,
) -> Result<Histogram<u64>, BenchError> {
    use opsd::pb::{
        google::longrunning::CancelOperationRequest,
        opsd::v1::{operation_event, WatchOperationsRequest},
    };
    let mut workers = WorkersClient::new(connect(options.target()).await?);
    let mut ops = OperationsClient::new(connect(options.last_target()).await?);
    let mut events = workers
        .watch_operations(WatchOperationsRequest {
            parent: options.parent.clone(),
            names: vec![],
        })
        .await?
        .into_inner();
    let mut latency = Histogram::<u64>::new(3)?;
    for _ in 0..count {
        let request = CreateOperationRequest {
            parent: options.parent.clone(),
            ..Default::default()
        };
        let name = workers.create_operation(request).await?.into_inner().name;
        let sent = Instant::now();
        ops.cancel_operation(CancelOperationRequest { name: name.clone() })
            .await?;
        loop {
            let event = events.message().await?.ok_or("the event stream ended")?;
            if event.name == name && event.r#type() == operation_event::Type::CancelRequested {
                break;
            }
        }
        latency.record(sent.elapsed().as_micros() as u64)?;
    }
    Ok(latency)
}

/// What `waiters` measured.
#[derive(Debug)]
pub struct WaitersReport {
    pub waiters: usize,
    /// How many Waits the server reported parked before memory was read
    /// (its `opsd_waiters` gauge), when it serves `/metrics`.
    pub parked: Option<u64>,
    /// Server RSS growth per parked Wait, with `server_pid`.
    pub bytes_per_waiter: Option<f64>,
    /// For sampled operations completed by their worker: from sending the
    /// completion to its Wait's answer, while all the other Waits stay
    /// parked (µs).
    pub wake_by_completion: Histogram<u64>,
    /// The same for sampled operations cancelled by a client (µs).
    pub wake_by_cancel: Histogram<u64>,
}

/// The server's `opsd_waiters` gauge, from its `/metrics`.
async fn parked_waiters(http: &HttpClient, target: &str) -> Option<u64> {
    let uri: http::Uri = format!("{target}/metrics").parse().ok()?;
    let response = http.get(uri).await.ok()?;
    if !response.status().is_success() {
        return None;
    }
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .ok()?
        .to_bytes();
    std::str::from_utf8(&body)
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix("opsd_waiters "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

/// Parks `waiters` WaitOperation calls, one per operation (spread over
/// connections of at most 1,000 streams), waits until the server reports
/// them all parked (or 3 s when it serves no `/metrics`), measures the
/// server's RSS growth, then finishes `sample` of the operations one at a
/// time, alternately completing and cancelling them, and times how long
/// each one's Wait takes to answer while the others stay parked. The Waits
/// are parked on the last target; the operations are created, completed
/// and cancelled on the first (another replica, when there are two).
pub async fn waiters(
    options: &LoadOptions,
    waiters: usize,
    sample: usize,
) -> Result<WaitersReport, BenchError> {
    use opsd::pb::google::longrunning::{CancelOperationRequest, WaitOperationRequest};
    const PER_CONNECTION: usize = 1000;
    let clients = Clients::new(options.target()).await?;
    let waiting = options.last_target();
    let mut workers = clients.workers.clone();
    let mut ops = clients.ops.clone();
    let mut names = Vec::with_capacity(waiters);
    for _ in 0..waiters {
        let request = CreateOperationRequest {
            parent: options.parent.clone(),
            ..Default::default()
        };
        names.push(workers.create_operation(request).await?.into_inner().name);
    }
    let already = parked_waiters(&clients.http, waiting).await;
    let before = options.usage().map(|(_, rss)| rss);
    let (woken_tx, mut woken) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    let mut tasks = tokio::task::JoinSet::new();
    let mut channel = connect(waiting).await?;
    for (i, name) in names.iter().enumerate() {
        if i > 0 && i % PER_CONNECTION == 0 {
            channel = connect(waiting).await?;
        }
        let mut ops = OperationsClient::new(channel.clone());
        let (name, woken_tx) = (name.clone(), woken_tx.clone());
        tasks.spawn(async move {
            let request = WaitOperationRequest {
                name: name.clone(),
                timeout: Some(prost_types::Duration {
                    seconds: 60,
                    nanos: 0,
                }),
            };
            if let Ok(op) = ops.wait_operation(request).await {
                if op.into_inner().done {
                    let _ = woken_tx.send((name, Instant::now()));
                }
            }
        });
    }
    // Only the Waits hold senders now: when they are all gone, `recv` ends.
    drop(woken_tx);
    // Let every Wait reach the server and park (well within the Waits' own
    // 60 s, which the measurement after this must fit in).
    let mut parked = None;
    match already {
        Some(already) => {
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(200)).await;
                parked = parked_waiters(&clients.http, waiting).await;
                if parked.is_some_and(|p| p >= already + waiters as u64) {
                    break;
                }
            }
            parked = parked.map(|p| p.saturating_sub(already));
            // The last streams' buffers settle.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        None => tokio::time::sleep(Duration::from_secs(3)).await,
    }
    let after = options.usage().map(|(_, rss)| rss);
    let bytes_per_waiter = match (before, after) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / waiters.max(1) as f64),
        _ => None,
    };
    let mut wake_by_completion = Histogram::<u64>::new(3)?;
    let mut wake_by_cancel = Histogram::<u64>::new(3)?;
    let step = (waiters / sample.max(1)).max(1);
    for (i, name) in names.iter().step_by(step).take(sample).enumerate() {
        let sent = Instant::now();
        if i % 2 == 0 {
            complete(&mut workers, name).await?;
        } else {
            ops.cancel_operation(CancelOperationRequest { name: name.clone() })
                .await?;
        }
        loop {
            let (woke, at) = tokio::time::timeout(Duration::from_secs(5), woken.recv())
                .await
                .map_err(|_| format!("the Wait on {name} did not answer within 5 s"))?
                .ok_or("every Wait ended before its operation finished")?;
            if woke == *name {
                let micros = at.saturating_duration_since(sent).as_micros() as u64;
                if i % 2 == 0 {
                    wake_by_completion.record(micros)?;
                } else {
                    wake_by_cancel.record(micros)?;
                }
                break;
            }
        }
    }
    tasks.abort_all();
    Ok(WaitersReport {
        waiters,
        parked,
        bytes_per_waiter,
        wake_by_completion,
        wake_by_cancel,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(calls: u64, cpu_micros: Option<u64>) -> LoadReport {
        LoadReport {
            iterations: calls,
            errors: BTreeMap::new(),
            elapsed: Duration::from_secs(1),
            latency: Histogram::new(3).unwrap(),
            send_lag: None,
            server_cpu_per_call: cpu_micros.map(Duration::from_micros),
            server_rss_bytes: None,
        }
    }

    #[test]
    fn comparisons_report_median_ratios_and_their_range() {
        let comparison = Comparison {
            rounds: vec![
                (report(100, Some(20)), report(90, Some(22))),
                (report(100, Some(20)), report(110, Some(18))),
                (report(100, Some(20)), report(100, Some(21))),
            ],
        };
        let throughput = comparison.throughput_ratios();
        assert_eq!(throughput.len(), 3);
        assert!((throughput[0] - 0.9).abs() < 1e-9);
        assert_eq!(
            comparison.summary(),
            "median of 3 rounds: throughput 1.00× the ceiling (rounds 0.90–1.10); \
             server CPU per call 1.05× the ceiling (rounds 0.90–1.10)"
        );
        // Without pids there is no CPU ratio.
        let comparison = Comparison {
            rounds: vec![(report(100, None), report(95, None))],
        };
        assert!(comparison.cpu_ratios().is_empty());
        assert_eq!(
            comparison.summary(),
            "median of 1 rounds: throughput 0.95× the ceiling (rounds 0.95–0.95)"
        );
    }
}
