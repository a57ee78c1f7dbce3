//! The `opsd` command line: flags → `Config` → `server::run`.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};
use opsd::{
    api::operations::Method,
    config::{Config, StoreConfig},
};
use tokio::net::TcpListener;

/// mimalloc: faster than the system allocator for opsd's many small
/// allocations, with no per-allocation header, so a stored operation and a
/// parked Wait cost less memory (README, Benchmarks).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// opsd serves the google.longrunning.Operations API (List, Get, Delete,
/// Cancel, Wait) and the opsd.v1.Workers API through which services register
/// their long-running jobs, report progress and results, and learn of
/// cancellations.
#[derive(Parser, Debug)]
#[command(name = "opsd", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve gRPC (Operations, Workers, health, reflection) and the REST/JSON
    /// surface on one port.
    Serve(Box<ServeArgs>),
    /// Load generator and measurements against a running opsd.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// GetOperation of one operation (created first), over and over.
    Get {
        #[command(flatten)]
        load: LoadArgs,
        #[command(flatten)]
        ceiling: CeilingArgs,
    },
    /// GET /v1/{name} of one operation over HTTP/1.1 (REST).
    RestGet {
        #[command(flatten)]
        load: LoadArgs,
        #[command(flatten)]
        ceiling: CeilingArgs,
    },
    /// CreateOperation + CompleteOperation (two durable writes per call).
    CreateComplete(LoadArgs),
    /// Creates COUNT operations (each completed), e.g. to measure start-up;
    /// with --server-pid, reports the server's RSS growth per operation and
    /// how much of it is beyond the operation's encoded size.
    Fill {
        #[command(flatten)]
        load: LoadArgs,
        #[arg(long, default_value_t = 100_000)]
        count: u64,
    },
    /// create+complete for --duration against a server with a short
    /// --retention, printing the store file's size every second.
    Churn {
        #[command(flatten)]
        load: LoadArgs,
        /// The server's store file, whose size is printed.
        #[arg(long)]
        store_file: PathBuf,
    },
    /// Walks the listing of --parent page by page, over and over; one call
    /// is one page.
    List {
        #[command(flatten)]
        load: LoadArgs,
        #[arg(long, default_value_t = 100)]
        page_size: i32,
        /// An AIP-160 filter applied to every page.
        #[arg(long, default_value = "")]
        filter: String,
    },
    /// Cancel → worker: times how long a cancel takes to reach a worker's
    /// WatchOperations stream, COUNT times in a row.
    CancelNotify {
        #[command(flatten)]
        load: LoadArgs,
        #[arg(long, default_value_t = 1000)]
        count: u64,
    },
    /// Parks WAITERS WaitOperation calls, one per operation, reports the
    /// server's memory per parked Wait (with --server-pid), then finishes
    /// SAMPLE operations one at a time, alternately completing and
    /// cancelling them, and times each one's wake-up.
    Waiters {
        #[command(flatten)]
        load: LoadArgs,
        #[arg(long, default_value_t = 10_000)]
        waiters: usize,
        #[arg(long, default_value_t = 1000)]
        sample: usize,
    },
    /// Starts `opsd serve --store STORE` and times how long it takes to answer.
    Startup {
        #[arg(long)]
        store: String,
    },
}

#[derive(clap::Args, Debug)]
struct LoadArgs {
    /// The server to load.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    target: String,
    /// Concurrent clients, one connection each (closed loop); connections
    /// the calls are spread over (open loop).
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// How long to run.
    #[arg(long, default_value = "10s", value_parser = parse_positive_duration)]
    duration: Duration,
    /// The parent the operations are created under.
    #[arg(long, default_value = "projects/bench")]
    parent: String,
    /// Open loop: calls per second on a fixed schedule (latency counts from
    /// each call's intended send time). Default: closed loop.
    #[arg(long)]
    rate: Option<f64>,
    /// A local server's pid: report its CPU seconds per call and its RSS.
    #[arg(long)]
    server_pid: Option<u32>,
}

/// A reference server measured in the same run: rounds alternate between it
/// and --target, and the ratios are reported.
#[derive(clap::Args, Debug)]
struct CeilingArgs {
    /// The reference server (e.g. benches/ceiling.rs), loaded the same way.
    #[arg(long)]
    ceiling: Option<String>,
    /// The reference server's pid, for its CPU per call.
    #[arg(long)]
    ceiling_pid: Option<u32>,
    /// Rounds; each runs both servers for --duration, in alternating order.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
}

impl LoadArgs {
    fn options(&self) -> opsd::bench::LoadOptions {
        opsd::bench::LoadOptions {
            target: self.target.clone(),
            concurrency: self.concurrency,
            duration: self.duration,
            parent: self.parent.clone(),
            rate: self.rate,
            server_pid: self.server_pid,
        }
    }
}

/// Creates the operation the Get workloads read on `target` (unless it
/// exists).
async fn bench_target(target: &str) -> Result<String, opsd::bench::BenchError> {
    use opsd::pb::opsd::v1::{workers_client::WorkersClient, CreateOperationRequest};
    let mut workers = WorkersClient::connect(target.to_owned()).await?;
    let request = CreateOperationRequest {
        operation_id: "bench-get".into(),
        request_id: "bench-get".into(),
        ..Default::default()
    };
    match workers.create_operation(request).await {
        Ok(op) => Ok(op.into_inner().name),
        // A no-op ceiling server has no worker API: any name will do.
        Err(status) if status.code() == tonic::Code::Unimplemented => {
            Ok("operations/bench-get".into())
        }
        Err(status) => Err(status.into()),
    }
}

/// Runs `workload` against --target, or with --ceiling in alternating rounds
/// against both, printing each run and then the ratios to the ceiling.
async fn measure(
    load: &LoadArgs,
    ceiling: &CeilingArgs,
    workload: &opsd::bench::Workload,
    label: &str,
) -> Result<(), opsd::bench::BenchError> {
    let Some(reference) = &ceiling.ceiling else {
        let report = opsd::bench::run(&load.options(), workload, |_| {}).await?;
        println!("{label}: {}", report.summary());
        return Ok(());
    };
    // The same operation exists on both (a ceiling answers any name).
    bench_target(reference).await?;
    let mut reference_options = load.options();
    reference_options.target = reference.clone();
    reference_options.server_pid = ceiling.ceiling_pid;
    let comparison = opsd::bench::compare(
        &load.options(),
        &reference_options,
        workload,
        ceiling.rounds.max(1),
    )
    .await?;
    for (i, (reference, target)) in comparison.rounds.iter().enumerate() {
        println!("round {}: ceiling {label}: {}", i + 1, reference.summary());
        println!("round {}: target  {label}: {}", i + 1, target.summary());
    }
    println!("{label}: {}", comparison.summary());
    Ok(())
}

async fn bench(command: BenchCommand) -> Result<(), opsd::bench::BenchError> {
    use opsd::bench::{self, Workload};
    let mode = |load: &LoadArgs| match load.rate {
        Some(rate) => format!(
            "open loop at {rate}/s over {} connections",
            load.concurrency
        ),
        None => format!("{} clients", load.concurrency),
    };
    match command {
        BenchCommand::Get { load, ceiling } => {
            let name = bench_target(&load.target).await?;
            let label = format!("GetOperation, {}", mode(&load));
            measure(&load, &ceiling, &Workload::Get { name }, &label).await?;
        }
        BenchCommand::RestGet { load, ceiling } => {
            let name = bench_target(&load.target).await?;
            let label = format!("REST GET, {}", mode(&load));
            measure(&load, &ceiling, &Workload::RestGet { name }, &label).await?;
        }
        BenchCommand::CreateComplete(load) => {
            let report = bench::run(&load.options(), &Workload::CreateComplete, |_| {}).await?;
            println!("create+complete, {}: {}", mode(&load), report.summary());
        }
        BenchCommand::Fill { load, count } => {
            let report = bench::fill(&load.options(), count).await?;
            let mut line = format!(
                "created and completed {count} operations in {:.1}s",
                report.elapsed.as_secs_f64()
            );
            if let Some((before, after)) = report.rss {
                let per = after.saturating_sub(before) as f64 / count.max(1) as f64;
                line.push_str(&format!(
                    "; server RSS {:.1} → {:.1} MiB: {per:.0} bytes per operation",
                    before as f64 / 1048576.0,
                    after as f64 / 1048576.0
                ));
                if let Some(size) = report.encoded_size {
                    line.push_str(&format!(
                        ", {:.0} beyond its {size}-byte encoding",
                        per - size as f64
                    ));
                }
            }
            println!("{line}");
        }
        BenchCommand::Churn { load, store_file } => {
            let before = bench::file_size(&store_file);
            let started = std::time::Instant::now();
            let report = bench::run(&load.options(), &Workload::CreateComplete, move |done| {
                println!(
                    "{:>5.0}s {done:>9} iterations, store file {} bytes",
                    started.elapsed().as_secs_f64(),
                    bench::file_size(&store_file)
                );
            })
            .await?;
            println!("churn: {}; store file was {before} bytes", report.summary());
        }
        BenchCommand::List {
            load,
            page_size,
            filter,
        } => {
            let workload = Workload::List { page_size, filter };
            let report = bench::run(&load.options(), &workload, |_| {}).await?;
            println!(
                "list pages of {page_size}, {}: {}",
                mode(&load),
                report.summary()
            );
        }
        BenchCommand::CancelNotify { load, count } => {
            let latency = bench::cancel_notify(&load.options(), count).await?;
            let q = |p: f64| latency.value_at_quantile(p);
            println!(
                "cancel → worker, {count} in a row: latency µs p50 {} p99 {} p99.9 {} max {}",
                q(0.5),
                q(0.99),
                q(0.999),
                latency.max()
            );
        }
        BenchCommand::Waiters {
            load,
            waiters,
            sample,
        } => {
            let report = bench::waiters(&load.options(), waiters, sample).await?;
            let memory = report.bytes_per_waiter.map_or_else(String::new, |b| {
                format!("; server RSS {b:.0} bytes per parked Wait")
            });
            let parked = report
                .parked
                .map_or_else(String::new, |p| format!(" ({p} parked per the server)"));
            let wake = |h: &hdrhistogram::Histogram<u64>| {
                format!(
                    "p50 {} p99 {} max {} µs",
                    h.value_at_quantile(0.5),
                    h.value_at_quantile(0.99),
                    h.max()
                )
            };
            println!(
                "{} parked Waits{parked}{memory}; wake-up, with the others parked: {} completed, {}; {} cancelled, {}",
                report.waiters,
                report.wake_by_completion.len(),
                wake(&report.wake_by_completion),
                report.wake_by_cancel.len(),
                wake(&report.wake_by_cancel),
            );
        }
        BenchCommand::Startup { store } => {
            let elapsed = bench::startup(&store, &[]).await?;
            println!("serving after {:.0} ms", elapsed.as_secs_f64() * 1000.0);
        }
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// Address to listen on (one port for every protocol).
    #[arg(long, default_value = "127.0.0.1:50051", env = "OPSD_LISTEN")]
    listen: SocketAddr,

    /// Where operations are kept. `redb:PATH` (the default): a durable file,
    /// its directory created if needed; `redb` alone uses the default path.
    /// `memory`: in process, lost on exit (tests, ephemeral use).
    #[arg(long, default_value = "redb:./opsd-data/opsd.redb", value_parser = parse_store)]
    store: StoreConfig,

    /// How long done operations are kept before they are deleted (AIP-151),
    /// e.g. `30d`, `12h`, `90s`.
    #[arg(long, default_value = "30d", value_parser = parse_positive_duration)]
    retention: Duration,

    /// Switch an Operations method off: it answers UNIMPLEMENTED. Repeatable.
    #[arg(long = "disable-method", value_name = "cancel|delete|list|wait")]
    disable_methods: Vec<Method>,

    /// A Google service-config YAML file; REST also serves its `http: rules:`
    /// for google.longrunning.Operations methods (with additional_bindings).
    /// Repeatable. A rule that cannot be parsed stops start-up.
    #[arg(long = "http-rules", value_name = "FILE")]
    http_rules: Vec<PathBuf>,

    /// A scenario file (YAML, see examples/scenarios/): scripted operations
    /// created at start-up. Repeatable; applying a file again is idempotent.
    #[arg(long = "scenario", value_name = "FILE")]
    scenarios: Vec<PathBuf>,

    /// Do not serve /metrics and record nothing (every metric is then a no-op).
    #[arg(long)]
    no_metrics: bool,

    /// REST refuses calls whose x-goog-api-client header does not name
    /// rest/ and gapic/ (as Google's showcase server does). Off: curl works.
    #[arg(long)]
    strict_rest_clients: bool,

    /// Which operations record the calls clients make on them (see
    /// Workers.GetOperationReport): scripted ones, all, or none.
    #[arg(long, value_enum, default_value_t = ReportsArg::Scripted)]
    polling_reports: ReportsArg,

    /// An encoded FileDescriptorSet (`protoc --include_imports
    /// --descriptor_set_out`, `buf build -o`) whose message types REST renders
    /// inside `metadata` and `response`. Repeatable.
    #[arg(long = "descriptor-set", value_name = "FILE")]
    descriptor_sets: Vec<PathBuf>,

    /// Log format on standard error. The level comes from RUST_LOG (default `info`).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,

    /// The longest a single WaitOperation call blocks.
    #[arg(long, default_value = "60s", value_parser = parse_positive_duration)]
    wait_cap: Duration,

    /// How many WaitOperation calls may be open at once; more answer
    /// RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 100_000)]
    max_waiters: usize,

    /// How long a COOPERATIVE operation's worker has to finish after a cancel
    /// before opsd finishes it as CANCELLED (unless the worker chose its own).
    #[arg(long, default_value = "30s", value_parser = parse_positive_duration)]
    cancel_grace_period: Duration,

    /// The largest gRPC message accepted or sent, in bytes.
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    max_message_size: usize,

    /// Concurrent HTTP/2 streams per connection.
    #[arg(long, default_value_t = 1024)]
    max_concurrent_streams: u32,

    /// How often idle HTTP/2 connections are pinged.
    #[arg(long, default_value = "60s", value_parser = parse_positive_duration)]
    keepalive_interval: Duration,

    /// How long a keepalive ping may go unanswered.
    #[arg(long, default_value = "20s", value_parser = parse_positive_duration)]
    keepalive_timeout: Duration,

    /// A file holding the secret (at least 32 bytes; its first 32 are used)
    /// that signs List page tokens. Default: a random key kept in the store,
    /// so tokens survive restarts and every replica sharing the store accepts them.
    #[arg(long, value_name = "FILE")]
    page_token_key_file: Option<PathBuf>,

    /// How long a List page token stays valid.
    #[arg(long, default_value = "3d", value_parser = parse_positive_duration)]
    page_token_ttl: Duration,

    /// The largest REST request body, in bytes; larger answers 413.
    #[arg(long, default_value_t = 1024 * 1024)]
    max_body_bytes: usize,

    /// How long an HTTP/1 client may take to send its request headers.
    #[arg(long, default_value = "10s", value_parser = parse_positive_duration)]
    header_read_timeout: Duration,

    /// Open connections at most; more wait in the listen queue.
    #[arg(long, default_value_t = 10_000)]
    max_connections: usize,

    /// On SIGTERM/SIGINT, how long in-flight calls may take to finish before
    /// the remaining connections are closed.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ReportsArg {
    Scripted,
    All,
    Off,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn parse_store(value: &str) -> Result<StoreConfig, String> {
    match value.split_once(':') {
        None if value == "memory" => Ok(StoreConfig::Memory),
        None if value == "redb" => Ok(StoreConfig::default()),
        Some(("redb", path)) if !path.is_empty() => Ok(StoreConfig::Redb(PathBuf::from(path))),
        _ => Err(format!(
            "unknown store {value:?}: use `redb:PATH`, `redb` or `memory`"
        )),
    }
}

fn parse_positive_duration(value: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(value).map_err(|e| e.to_string())?;
    if duration.is_zero() {
        return Err("must be greater than zero".to_owned());
    }
    Ok(duration)
}

fn read_key(path: &std::path::Path) -> Result<[u8; 32], String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    bytes
        .get(..32)
        .and_then(|key| key.try_into().ok())
        .ok_or_else(|| {
            format!(
                "{} holds {} bytes; a page token key needs at least 32",
                path.display(),
                bytes.len()
            )
        })
}

impl ServeArgs {
    fn into_config(self) -> Result<Config, String> {
        let mut config = Config {
            listen: self.listen,
            store: self.store,
            disabled_methods: self.disable_methods.into_iter().collect(),
            http_rules: self.http_rules,
            descriptor_sets: self.descriptor_sets,
            scenarios: self.scenarios,
            strict_rest_clients: self.strict_rest_clients,
            metrics: !self.no_metrics,
            ..Config::default()
        };
        let registry = &mut config.registry;
        registry.retention = self.retention;
        registry.wait_cap = self.wait_cap;
        registry.max_waiters = self.max_waiters;
        registry.cancel_grace_period = self.cancel_grace_period;
        registry.page_token_ttl = self.page_token_ttl;
        registry.polling_reports = match self.polling_reports {
            ReportsArg::Scripted => opsd::registry::PollingReports::Scripted,
            ReportsArg::All => opsd::registry::PollingReports::All,
            ReportsArg::Off => opsd::registry::PollingReports::Off,
        };
        registry.page_token_key = self
            .page_token_key_file
            .as_deref()
            .map(read_key)
            .transpose()?;
        // Leave room for the envelope around an operation or a page.
        let room = self.max_message_size.saturating_sub(64 * 1024).max(1024);
        registry.max_page_bytes = room;
        registry.max_operation_bytes = room;
        let limits = &mut config.limits;
        limits.max_message_size = self.max_message_size;
        limits.max_concurrent_streams = self.max_concurrent_streams;
        limits.keepalive_interval = self.keepalive_interval;
        limits.keepalive_timeout = self.keepalive_timeout;
        limits.drain_timeout = self.drain_timeout;
        limits.max_body_bytes = self.max_body_bytes;
        limits.header_read_timeout = self.header_read_timeout;
        limits.max_connections = self.max_connections.max(1);
        Ok(config)
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(cause = %err, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                tracing::error!(cause = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match &cli.command {
        // The server uses every core it is given.
        Command::Serve(_) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
        // The load generator runs on one thread: pinned to one core, a second
        // thread (the runtime's main thread beside a worker) would take turns
        // with it and add milliseconds of scheduling delay to the figures.
        Command::Bench(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
    };
    match runtime {
        Ok(runtime) => runtime.block_on(run(cli.command)),
        Err(err) => {
            eprintln!("opsd: cannot start the Tokio runtime: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> ExitCode {
    match command {
        Command::Serve(args) => {
            init_logging(args.log_format);
            let config = match args.into_config() {
                Ok(config) => config,
                Err(err) => {
                    tracing::error!(cause = %err, "invalid configuration");
                    return ExitCode::FAILURE;
                }
            };
            let listener = match TcpListener::bind(config.listen).await {
                Ok(listener) => listener,
                Err(err) => {
                    tracing::error!(address = %config.listen, cause = %err, "cannot listen");
                    return ExitCode::FAILURE;
                }
            };
            match opsd::server::run(listener, config, shutdown_signal()).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    tracing::error!(cause = %err, "server failed");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Bench(command) => match bench(command).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("opsd bench: {err}");
                ExitCode::FAILURE
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn serve_flags_reach_the_config() {
        let cli = Cli::try_parse_from([
            "opsd",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--retention",
            "2h",
            "--disable-method",
            "cancel",
            "--disable-method",
            "wait",
        ])
        .unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("serve parses as serve")
        };
        let config = args.into_config().unwrap();
        assert_eq!(config.registry.retention, Duration::from_secs(7200));
        assert_eq!(
            config.disabled_methods.into_iter().collect::<Vec<_>>(),
            [Method::Cancel, Method::Wait]
        );
        assert!(Cli::try_parse_from(["opsd", "serve", "--store", "postgres"]).is_err());
        assert!(Cli::try_parse_from(["opsd", "serve", "--store", "redb:"]).is_err());
        let parse = |args: &[&str]| {
            let Command::Serve(args) = Cli::try_parse_from(args).unwrap().command else {
                panic!("serve parses as serve")
            };
            args.into_config().unwrap().store
        };
        assert_eq!(parse(&["opsd", "serve"]), StoreConfig::default());
        assert_eq!(
            parse(&["opsd", "serve", "--store", "redb:/tmp/x.redb"]),
            StoreConfig::Redb("/tmp/x.redb".into())
        );
        assert_eq!(
            parse(&["opsd", "serve", "--store", "memory"]),
            StoreConfig::Memory
        );
        assert!(Cli::try_parse_from(["opsd", "serve", "--retention", "0s"]).is_err());
        assert!(Cli::try_parse_from(["opsd", "serve", "--disable-method", "get"]).is_err());
    }
}
