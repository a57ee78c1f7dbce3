//! `opsd-bench`: a load generator and measurements against a running opsd,
//! and (binary `opsd-ceiling`) the no-op reference servers its figures are
//! compared with. See `benches/README.md` in the repository for the suite.

mod load;
mod overload;

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};

/// mimalloc, as in the opsd binary, so the generator's own costs match the
/// figures in the README.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Load generator and measurements against a running opsd.
#[derive(Parser, Debug)]
#[command(name = "opsd-bench", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: BenchCommand,
    /// A bearer token for a server with auth on: GetOperation (`get`) and
    /// its setup send it (a server without auth ignores it).
    #[arg(long, global = true, env = "OPSD_BENCH_TOKEN")]
    token: Option<String>,
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// GetOperation of one operation (created first), over and over.
    Get {
        #[command(flatten)]
        load: LoadArgs,
        #[command(flatten)]
        ceiling: CeilingArgs,
        /// Complete the operation first, so every Get reads a done one.
        #[arg(long)]
        done: bool,
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
    /// WatchOperations stream, COUNT times in a row. With two --target
    /// replicas, the worker is on the first and the cancel goes to the last.
    CancelNotify {
        #[command(flatten)]
        load: LoadArgs,
        #[arg(long, default_value_t = 1000)]
        count: u64,
    },
    /// Parks WAITERS WaitOperation calls, one per operation, reports the
    /// server's memory per parked Wait (with --server-pid), then finishes
    /// SAMPLE operations one at a time, alternately completing and
    /// cancelling them, and times each one's wake-up. With two --target
    /// replicas, the Waits park on the last and the operations are finished
    /// on the first.
    Waiters {
        #[command(flatten)]
        load: LoadArgs,
        #[arg(long, default_value_t = 10_000)]
        waiters: usize,
        #[arg(long, default_value_t = 1000)]
        sample: usize,
    },
    /// GetOperation over many connections with several streams each: closed
    /// loop without --rate (the saturation rate), open loop with it.
    /// Reports goodput (OK answers per second), the latency of the OK calls
    /// from their intended send time, the codes seen, and the server's CPU
    /// and RSS (with --server-pid).
    Overload {
        /// The server to load.
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        target: String,
        #[arg(long, default_value_t = 1000)]
        connections: usize,
        /// Calls in flight per connection at most.
        #[arg(long, default_value_t = 8)]
        streams: usize,
        /// Calls per second on a fixed schedule (open loop).
        #[arg(long)]
        rate: Option<f64>,
        /// Closed loop: a stream whose call was refused waits this long
        /// before its next call (as a client honouring RetryInfo does).
        #[arg(long, value_parser = humantime::parse_duration)]
        retry_after: Option<Duration>,
        #[arg(long, default_value = "10s", value_parser = parse_positive_duration)]
        duration: Duration,
        /// A local server's pid: its CPU and RSS.
        #[arg(long)]
        server_pid: Option<u32>,
    },
    /// Starts `OPSD serve --store STORE` and times how long it takes to answer.
    Startup {
        #[arg(long)]
        store: String,
        /// The opsd binary to start: by default the `opsd` beside this
        /// executable (both are built into the same target directory).
        #[arg(long, value_name = "PATH")]
        opsd: Option<PathBuf>,
    },
}

#[derive(clap::Args, Debug)]
struct LoadArgs {
    /// The server to load. Repeatable: replicas of one store, which the
    /// clients are spread over round-robin.
    #[arg(long = "target", default_value = "http://127.0.0.1:50051")]
    targets: Vec<String>,
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
    /// Repeatable (one per replica): the figures are their sums.
    #[arg(long = "server-pid")]
    server_pids: Vec<u32>,
}

/// A reference server measured in the same run: rounds alternate between it
/// and --target, and the ratios are reported.
#[derive(clap::Args, Debug)]
struct CeilingArgs {
    /// The reference server (e.g. opsd-ceiling), loaded the same way.
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
    fn options(&self) -> load::LoadOptions {
        load::LoadOptions {
            targets: self.targets.clone(),
            concurrency: self.concurrency,
            duration: self.duration,
            parent: self.parent.clone(),
            rate: self.rate,
            server_pids: self.server_pids.clone(),
        }
    }
}

/// Creates the operation the Get workloads read on `target` (unless it
/// exists); with `done`, a second one that is completed.
async fn bench_target(target: &str, done: bool) -> Result<String, load::BenchError> {
    use opsd::pb::opsd::v1::{
        complete_operation_request, workers_client::WorkersClient, CompleteOperationRequest,
        CreateOperationRequest,
    };
    let mut workers = WorkersClient::connect(target.to_owned()).await?;
    let id = if done { "bench-get-done" } else { "bench-get" };
    let request = CreateOperationRequest {
        operation_id: id.into(),
        request_id: id.into(),
        ..Default::default()
    };
    match workers.create_operation(load::authorized(request)).await {
        Ok(op) => {
            let op = op.into_inner();
            if done && !op.done {
                let response = prost_types::Any::from_msg(&())?;
                workers
                    .complete_operation(load::authorized(CompleteOperationRequest {
                        name: op.name.clone(),
                        result: Some(complete_operation_request::Result::Response(response)),
                        metadata: None,
                    }))
                    .await?;
            }
            Ok(op.name)
        }
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
    workload: &load::Workload,
    label: &str,
) -> Result<(), load::BenchError> {
    let Some(reference) = &ceiling.ceiling else {
        let report = load::run(&load.options(), workload, |_| {}).await?;
        println!("{label}: {}", report.summary());
        return Ok(());
    };
    // The same operation exists on both (a ceiling answers any name).
    bench_target(
        reference,
        matches!(workload, load::Workload::Get { done: true, .. }),
    )
    .await?;
    let mut reference_options = load.options();
    reference_options.targets = vec![reference.clone()];
    reference_options.server_pids = ceiling.ceiling_pid.into_iter().collect();
    let comparison = load::compare(
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

async fn bench(command: BenchCommand) -> Result<(), load::BenchError> {
    use load::{self, Workload};
    let mode = |load: &LoadArgs| match load.rate {
        Some(rate) => format!(
            "open loop at {rate}/s over {} connections",
            load.concurrency
        ),
        None => format!("{} clients", load.concurrency),
    };
    match command {
        BenchCommand::Get {
            load,
            ceiling,
            done,
        } => {
            let name = bench_target(load.options().target(), done).await?;
            let what = if done {
                "a done operation"
            } else {
                "a running operation"
            };
            let label = format!("GetOperation of {what}, {}", mode(&load));
            measure(&load, &ceiling, &Workload::Get { name, done }, &label).await?;
        }
        BenchCommand::RestGet { load, ceiling } => {
            let name = bench_target(load.options().target(), false).await?;
            let label = format!("REST GET, {}", mode(&load));
            measure(&load, &ceiling, &Workload::RestGet { name }, &label).await?;
        }
        BenchCommand::CreateComplete(load) => {
            let report = load::run(&load.options(), &Workload::CreateComplete, |_| {}).await?;
            println!("create+complete, {}: {}", mode(&load), report.summary());
        }
        BenchCommand::Fill { load, count } => {
            let report = load::fill(&load.options(), count).await?;
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
            let before = load::file_size(&store_file);
            let started = std::time::Instant::now();
            let report = load::run(&load.options(), &Workload::CreateComplete, move |done| {
                println!(
                    "{:>5.0}s {done:>9} iterations, store file {} bytes",
                    started.elapsed().as_secs_f64(),
                    load::file_size(&store_file)
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
            let report = load::run(&load.options(), &workload, |_| {}).await?;
            println!(
                "list pages of {page_size}, {}: {}",
                mode(&load),
                report.summary()
            );
        }
        BenchCommand::CancelNotify { load, count } => {
            let latency = load::cancel_notify(&load.options(), count).await?;
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
            let report = load::waiters(&load.options(), waiters, sample).await?;
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
        BenchCommand::Overload {
            target,
            connections,
            streams,
            rate,
            retry_after,
            duration,
            server_pid,
        } => {
            let name = bench_target(&target, false).await?;
            let options = overload::OverloadOptions {
                address: target
                    .trim_start_matches("http://")
                    .trim_end_matches('/')
                    .to_owned(),
                connections,
                streams,
                rate,
                retry_after,
                duration,
                name,
                server_pid,
            };
            let report = overload::overload(&options).await?;
            let mode = match (rate, retry_after) {
                (Some(rate), _) => format!("open loop at {rate}/s"),
                (None, Some(wait)) => format!("closed loop, {wait:?} after a refusal"),
                (None, None) => "closed loop".to_owned(),
            };
            println!(
                "overload, {connections} connections × {streams} streams, {mode}: {}",
                report.summary()
            );
        }
        BenchCommand::Startup { store, opsd } => {
            let opsd = match opsd {
                Some(path) => path,
                None => load::sibling_opsd()?,
            };
            let elapsed = load::startup(&opsd, &store, &[]).await?;
            println!("serving after {:.0} ms", elapsed.as_secs_f64() * 1000.0);
        }
    }
    Ok(())
}

fn parse_positive_duration(value: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(value).map_err(|e| e.to_string())?;
    if duration.is_zero() {
        return Err("must be greater than zero".to_owned());
    }
    Ok(duration)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(token) = &cli.token {
        if let Err(err) = load::set_token(token) {
            eprintln!("opsd-bench: --token: {err}");
            return ExitCode::FAILURE;
        }
    }
    // The load generator runs on one thread: pinned to one core, a second
    // thread (the runtime's main thread beside a worker) would take turns
    // with it and add milliseconds of scheduling delay to the figures.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("opsd-bench: cannot start the Tokio runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(bench(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("opsd-bench: {err}");
            ExitCode::FAILURE
        }
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
}
