//! `opsd serve`: flags → `Config` → `server::run`.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::ValueEnum;
use opsd::{
    api::{operations::Method, rest::RestRoutes},
    config::{read_page_token_key, AuthSettings, Config, StoreConfig, TlsSettings},
    registry::PollingReports,
    server::trace::Traces,
    store::PostgresSettings,
};

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Address to listen on (one port for every protocol): an IP address and
    /// port, or a host name and port (`localhost:50051`; the first IPv4
    /// address it resolves to, else the first address).
    #[arg(long, default_value = "127.0.0.1:50051", env = "OPSD_LISTEN")]
    listen: String,

    /// Where operations are kept. `redb:PATH` (the default): a durable file,
    /// its directory created if needed; `redb` alone uses the default path.
    /// `memory`: in process, lost on exit (tests, ephemeral use).
    /// `postgres://USER:PASSWORD@HOST:PORT/DB?sslmode=...`: a PostgreSQL
    /// database that any number of replicas share (the schema is created
    /// and migrated at start-up).
    #[arg(long, default_value = "redb:./opsd-data/opsd.redb", env = "OPSD_STORE")]
    store: StoreConfig,

    /// PostgreSQL store: connections in the pool.
    #[arg(long, default_value_t = 16)]
    pg_pool_size: usize,

    /// PostgreSQL store: how long opening a connection may take.
    #[arg(long, default_value = "5s", value_parser = parse_positive_duration)]
    pg_connect_timeout: Duration,

    /// PostgreSQL store: the longest a statement runs on the server
    /// (statement_timeout and lock_timeout).
    #[arg(long, default_value = "5s", value_parser = parse_positive_duration)]
    pg_statement_timeout: Duration,

    /// PostgreSQL store: how long a call may wait for a free connection. A
    /// call fails UNAVAILABLE after this plus the statement timeout.
    #[arg(long, default_value = "2s", value_parser = parse_positive_duration)]
    pg_pool_timeout: Duration,

    /// PostgreSQL store: how long start-up may wait for another replica's
    /// schema migration, and run its own.
    #[arg(long, default_value = "5m", value_parser = parse_positive_duration)]
    pg_migration_timeout: Duration,

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

    /// Do not serve the operator page at /ui/.
    #[arg(long)]
    no_ui: bool,

    /// Let browser pages from this origin call opsd (CORS, for REST and
    /// gRPC-Web): scheme://host[:port], or * for any. Repeatable. Without
    /// it, no CORS headers are sent: only opsd's own pages may call it.
    #[arg(long = "cors-allow-origin", value_name = "ORIGIN")]
    cors_allow_origins: Vec<String>,

    /// Which REST routes to serve besides operations.proto's and the
    /// --http-rules files': `google` (the default) also serves Google Cloud's
    /// operation URLs under any version segment (`/{version}/{name=**/operations/*}`,
    /// `…:cancel`, `…:wait`, `/{version}/{name=**}/operations`); `strict`
    /// serves only what the protos and the files declare.
    #[arg(long, value_enum, default_value_t = RoutesArg::Google)]
    rest_routes: RoutesArg,

    /// The errors opsd itself writes into operations (cancel, cooperative
    /// grace expiry, lease expiry) carry an ErrorInfo with a stable reason
    /// (OPERATION_CANCELLED, WORKER_LEASE_EXPIRED). Off: `{code, message}`
    /// only, as Google's services write them (some clients cannot decode
    /// an ErrorInfo inside an operation).
    #[arg(long)]
    operation_error_details: bool,

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

    /// The largest gRPC message accepted or sent, in bytes; a larger request
    /// is RESOURCE_EXHAUSTED. The largest operation a worker may store (and
    /// the largest List page) is max(1,024, BYTES - 65,536).
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

    /// How long a new connection may take to complete its handshake (the
    /// HTTP/2 preface and SETTINGS, or its first HTTP/1 request head);
    /// also how long an HTTP/1 client may take to send each later request
    /// head (and so how long an idle HTTP/1 connection stays open).
    #[arg(long, default_value = "10s", value_parser = parse_positive_duration)]
    header_read_timeout: Duration,

    /// How long a client may take to send a request body, from the
    /// request's arrival: REST and gRPC calls (INVALID_ARGUMENT, REST 400).
    #[arg(long, default_value = "30s", value_parser = parse_positive_duration)]
    body_read_timeout: Duration,

    /// How long a connection may stay open with no call open; then it gets
    /// a graceful GOAWAY (HTTP/2) and is closed.
    #[arg(long, default_value = "5m", value_parser = parse_positive_duration)]
    idle_timeout: Duration,

    /// HTTP/2 PINGs from a client closer together than this, while the
    /// server sends nothing, are strikes; after two the client gets GOAWAY
    /// ENHANCE_YOUR_CALM `too_many_pings`, as grpc-go and grpc-java do.
    #[arg(long, default_value = "10s", value_parser = parse_positive_duration)]
    min_ping_interval: Duration,

    /// Open connections at most. At the cap a new client still gets in: a
    /// connection that has not completed its handshake, else the one idle
    /// the longest, is closed to make room; only when every connection has
    /// a call open is the new client closed at once.
    #[arg(long, default_value_t = 10_000)]
    max_connections: usize,

    /// Calls in flight at most, over gRPC and REST (Waits and streams do not
    /// count: see --max-waiters); a call over it is answered at once with
    /// RESOURCE_EXHAUSTED (REST 429 with Retry-After). 0: no limit.
    #[arg(long, default_value_t = opsd::config::Limits::DEFAULT_MAX_IN_FLIGHT)]
    max_in_flight: usize,

    /// On SIGTERM/SIGINT: every connection gets a graceful GOAWAY (HTTP/1:
    /// Connection: close), every accepted call is answered, connections close
    /// gracefully, and opsd exits 0; calls still unanswered after this long
    /// are cut, counted and logged.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,

    /// Export OpenTelemetry traces (a span per call) to this OTLP/gRPC
    /// collector, e.g. `http://127.0.0.1:4317`. Unset (or empty): no traces.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_name = "URL")]
    otlp_endpoint: Option<String>,

    /// Ended spans waiting for export at most; when the collector falls
    /// behind, further spans are dropped (and counted in
    /// opsd_trace_spans_dropped_total), never waited for.
    #[arg(long, default_value_t = 2048)]
    otlp_queue_size: usize,

    /// Turns auth on: a JWKS document (RSA, EC P-256/P-384 and Ed25519
    /// keys) from a FILE, or from an http(s):// URL (fetched at start-up,
    /// refreshed on its Cache-Control max-age or every 10 minutes, and
    /// fetched again, at most once per 5 s, for a token whose key id it does
    /// not have). Every call then needs a bearer JWT (or a client
    /// certificate, with --tls-client-ca); health stays open.
    #[arg(long, value_name = "FILE|URL", env = "OPSD_AUTH_JWKS")]
    auth_jwks: Option<String>,

    /// The issuer (`iss`) tokens must name; required with --auth-jwks.
    #[arg(long, value_name = "ISS", env = "OPSD_AUTH_ISSUER")]
    auth_issuer: Option<String>,

    /// An audience (`aud`) tokens may name; repeatable, at least one with
    /// --auth-jwks.
    #[arg(long = "auth-audience", value_name = "AUD")]
    auth_audiences: Vec<String>,

    /// Who may do what (YAML; README, Auth): the required scope and, per
    /// subject (`sub` or `email`, or a certificate's SAN), name patterns and
    /// permissions. Without it, every caller with a valid token and the
    /// scope may do everything.
    #[arg(long, value_name = "FILE")]
    auth_policy: Option<PathBuf>,

    /// Reflection answers without credentials when auth is on.
    #[arg(long)]
    auth_open_reflection: bool,

    /// Serve TLS with this certificate chain (PEM); needs --tls-key. h2 and
    /// HTTP/1.1 by ALPN on the same port. Certificate and key are reloaded
    /// on SIGHUP without dropping connections.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,

    /// The private key (PEM) of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,

    /// Accept client certificates signed by this CA (PEM), mTLS: a verified
    /// certificate's SAN stands as the subject of calls without a bearer
    /// token. Without --auth-jwks, a client certificate is required.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,

    /// Serve /metrics on this address (its own listener, no credentials)
    /// instead of on the main port.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ReportsArg {
    Scripted,
    All,
    Off,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum RoutesArg {
    Google,
    Strict,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub(super) enum LogFormat {
    Text,
    Json,
}

impl ServeArgs {
    /// The configuration these flags ask for, checked as every
    /// configuration is ([`Config::validate`]).
    fn into_config(self) -> Result<Config, String> {
        let mut config = Config {
            listen: resolve_listen(&self.listen)?,
            store: self.store,
            descriptor_sets: self.descriptor_sets,
            scenarios: self.scenarios,
            metrics: !self.no_metrics,
            ui: !self.no_ui,
            cors_allow_origins: self.cors_allow_origins,
            ..Config::default()
        };
        config.operations.disabled_methods = self.disable_methods.into_iter().collect();
        config.postgres = PostgresSettings {
            pool_size: self.pg_pool_size,
            connect_timeout: self.pg_connect_timeout,
            statement_timeout: self.pg_statement_timeout,
            pool_timeout: self.pg_pool_timeout,
            migration_timeout: self.pg_migration_timeout,
        };
        let rest = &mut config.rest;
        rest.http_rules = self.http_rules;
        rest.strict_clients = self.strict_rest_clients;
        rest.routes = match self.rest_routes {
            RoutesArg::Google => RestRoutes::Google,
            RoutesArg::Strict => RestRoutes::Strict,
        };
        rest.max_body_bytes = self.max_body_bytes;
        rest.body_read_timeout = self.body_read_timeout;
        let registry = &mut config.registry;
        registry.retention = self.retention;
        registry.wait_cap = self.wait_cap;
        registry.max_waiters = self.max_waiters;
        registry.cancel_grace_period = self.cancel_grace_period;
        registry.operation_error_details = self.operation_error_details;
        registry.page_token_ttl = self.page_token_ttl;
        registry.polling_reports = match self.polling_reports {
            ReportsArg::Scripted => PollingReports::Scripted,
            ReportsArg::All => PollingReports::All,
            ReportsArg::Off => PollingReports::Off,
        };
        registry.page_token_key = self
            .page_token_key_file
            .as_deref()
            .map(read_page_token_key)
            .transpose()
            .map_err(|e| e.to_string())?;
        config.set_max_message_size(self.max_message_size);
        let limits = &mut config.limits;
        limits.max_concurrent_streams = self.max_concurrent_streams;
        limits.keepalive_interval = self.keepalive_interval;
        limits.keepalive_timeout = self.keepalive_timeout;
        limits.drain_timeout = self.drain_timeout;
        limits.header_read_timeout = self.header_read_timeout;
        limits.idle_timeout = self.idle_timeout;
        limits.min_ping_interval = self.min_ping_interval;
        limits.max_in_flight = self.max_in_flight;
        limits.max_connections = self.max_connections.max(1);
        config.traces.otlp_endpoint = self.otlp_endpoint.filter(|e| !e.is_empty());
        config.traces.queue_size = self.otlp_queue_size;
        config.auth = self.auth_jwks.map(|jwks| AuthSettings {
            jwks,
            issuer: self.auth_issuer.unwrap_or_default(),
            audiences: self.auth_audiences,
            policy: self.auth_policy,
            open_reflection: self.auth_open_reflection,
        });
        if let (Some(cert), Some(key)) = (self.tls_cert, self.tls_key) {
            config.tls = Some(TlsSettings {
                cert,
                key,
                client_ca: self.tls_client_ca,
            });
        }
        config.metrics_listen = self.metrics_listen;
        config.validate().map_err(|e| e.to_string())?;
        Ok(config)
    }
}

/// The socket address of `--listen`: an IP address and port as they are, a
/// host name resolved (its first IPv4 address, else its first address).
fn resolve_listen(listen: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    if let Ok(address) = listen.parse() {
        return Ok(address);
    }
    let hint = "give an IP address and port such as 127.0.0.1:50051";
    let addresses: Vec<SocketAddr> = listen
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve --listen {listen:?} ({e}); {hint}"))?
        .collect();
    addresses
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addresses.first())
        .copied()
        .ok_or_else(|| format!("--listen {listen:?} resolves to no address; {hint}"))
}

/// A duration flag that must be positive (clap reports a bad one with the
/// usage, before anything starts).
pub(super) fn parse_positive_duration(value: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(value).map_err(|e| e.to_string())?;
    if duration.is_zero() {
        return Err("must be greater than zero".to_owned());
    }
    Ok(duration)
}

/// Logs to stderr, filtered by `RUST_LOG`; with `traces`, also the calls'
/// spans to the OTLP exporter (each layer with its own filter, so the log
/// level does not decide which calls are traced).
pub(super) fn init_logging(format: LogFormat, traces: Option<&Traces>) {
    use tracing_subscriber::{layer::SubscriberExt, util::SubscriberInitExt, Layer};
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only for a person at a terminal, and never when NO_COLOR is set
    // (https://no-color.org): a log file or collector gets plain text.
    use std::io::IsTerminal;
    let colour = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let logs = tracing_subscriber::fmt::layer()
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    let logs = match format {
        LogFormat::Text => logs.boxed(),
        LogFormat::Json => logs.json().boxed(),
    };
    tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(traces.map(Traces::layer))
        .init();
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

/// Runs `opsd serve` until SIGTERM or SIGINT and a drain.
pub async fn run(args: ServeArgs) -> ExitCode {
    let format = args.log_format;
    let config = match args.into_config() {
        Ok(config) => config,
        Err(err) => {
            init_logging(format, None);
            tracing::error!(cause = %err, "invalid configuration");
            return ExitCode::FAILURE;
        }
    };
    let traces = match Traces::start(&config.traces) {
        Ok(traces) => traces,
        Err(err) => {
            init_logging(format, None);
            tracing::error!(cause = %err, "cannot start traces");
            return ExitCode::FAILURE;
        }
    };
    init_logging(format, traces.as_ref());
    if let (Some(endpoint), Some(_)) = (&config.traces.otlp_endpoint, &traces) {
        tracing::info!(%endpoint, queue = config.traces.queue_size, "exporting traces over OTLP");
    }
    let code = serve(config).await;
    if let Some(traces) = traces {
        // Exports what is queued; blocks (up to 5 s), so off the runtime.
        let _ = tokio::task::spawn_blocking(move || traces.shutdown()).await;
    }
    code
}

/// Binds the listener and serves until a signal and a drain.
async fn serve(config: Config) -> ExitCode {
    let listener = match opsd::server::bind(config.listen) {
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::{Cli, Command};
    use clap::Parser;

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
            "--idle-timeout",
            "90s",
            "--min-ping-interval",
            "30s",
            "--max-in-flight",
            "64",
        ])
        .unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("serve")
        };
        let config = args.into_config().unwrap();
        assert_eq!(config.registry.retention, Duration::from_secs(7200));
        assert_eq!(config.limits.idle_timeout, Duration::from_secs(90));
        assert_eq!(config.limits.min_ping_interval, Duration::from_secs(30));
        assert_eq!(config.limits.max_in_flight, 64);
        assert_eq!(
            config
                .operations
                .disabled_methods
                .into_iter()
                .collect::<Vec<_>>(),
            [Method::Cancel, Method::Wait]
        );
        assert!(Cli::try_parse_from(["opsd", "serve", "--store", "postgres"]).is_err());
        assert!(Cli::try_parse_from(["opsd", "serve", "--store", "redb:"]).is_err());
        let parse = |args: &[&str]| {
            let Command::Serve(args) = Cli::try_parse_from(args).unwrap().command else {
                panic!("serve")
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
        assert!(Cli::try_parse_from(["opsd", "serve", "--body-read-timeout", "0s"]).is_err());
        // Zero connections means one, as it always did.
        let Command::Serve(one) = Cli::try_parse_from(["opsd", "serve", "--max-connections", "0"])
            .unwrap()
            .command
        else {
            panic!("serve")
        };
        assert_eq!(one.into_config().unwrap().limits.max_connections, 1);
        assert!(Cli::try_parse_from(["opsd", "serve", "--disable-method", "get"]).is_err());
        let postgres = parse(&[
            "opsd",
            "serve",
            "--store",
            "postgres://opsd@127.0.0.1:5432/ops",
        ]);
        assert!(matches!(postgres, StoreConfig::Postgres(_)), "{postgres:?}");
        let Command::Serve(pg) = Cli::try_parse_from([
            "opsd",
            "serve",
            "--pg-pool-size",
            "4",
            "--pg-statement-timeout",
            "750ms",
        ])
        .unwrap()
        .command
        else {
            panic!("serve")
        };
        let config = pg.into_config().unwrap();
        assert_eq!(config.postgres.pool_size, 4);
        assert_eq!(
            config.postgres.statement_timeout,
            Duration::from_millis(750)
        );
        assert!(
            Cli::try_parse_from(["opsd", "serve", "--pg-pool-size", "0"])
                .map(|cli| match cli.command {
                    Command::Serve(args) => args.into_config().is_err(),
                    _ => false,
                })
                .unwrap_or(true)
        );
        assert!(Cli::try_parse_from(["opsd", "migrate", "--store", "postgres://u@h/d"]).is_ok());
    }

    #[test]
    fn otlp_flags_reach_the_config() {
        let config = |args: &[&str]| {
            let Command::Serve(args) = Cli::try_parse_from(args).unwrap().command else {
                panic!("serve")
            };
            args.into_config()
        };
        let traced = config(&[
            "opsd",
            "serve",
            "--otlp-endpoint",
            "http://127.0.0.1:4317",
            "--otlp-queue-size",
            "16",
        ])
        .unwrap();
        assert_eq!(
            traced.traces.otlp_endpoint.as_deref(),
            Some("http://127.0.0.1:4317")
        );
        assert_eq!(traced.traces.queue_size, 16);
        // Empty (as an unset variable often is) means off.
        let off = config(&["opsd", "serve", "--otlp-endpoint", ""]).unwrap();
        assert_eq!(off.traces.otlp_endpoint, None);
        let tls = config(&["opsd", "serve", "--otlp-endpoint", "https://c:4317"]);
        assert!(tls.unwrap_err().contains("TLS"));
    }

    #[test]
    fn auth_tls_and_metrics_flags_reach_the_config() {
        let config = |args: &[&str]| {
            let Command::Serve(args) = Cli::try_parse_from(args).unwrap().command else {
                panic!("serve")
            };
            args.into_config()
        };
        let on = config(&[
            "opsd",
            "serve",
            "--auth-jwks",
            "jwks.json",
            "--auth-issuer",
            "https://issuer",
            "--auth-audience",
            "a",
            "--auth-audience",
            "b",
            "--auth-policy",
            "policy.yaml",
            "--auth-open-reflection",
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
            "--tls-client-ca",
            "ca.pem",
            "--metrics-listen",
            "127.0.0.1:9090",
        ])
        .unwrap();
        let auth = on.auth.unwrap();
        assert_eq!(auth.audiences, ["a", "b"]);
        assert_eq!(auth.policy.as_deref(), Some(Path::new("policy.yaml")));
        assert!(auth.open_reflection);
        let tls = on.tls.unwrap();
        assert_eq!(tls.client_ca.as_deref(), Some(Path::new("ca.pem")));
        assert_eq!(on.metrics_listen, Some("127.0.0.1:9090".parse().unwrap()));
        let no_issuer = config(&["opsd", "serve", "--auth-jwks", "j", "--auth-audience", "a"]);
        assert!(no_issuer.unwrap_err().contains("--auth-issuer"));
        assert!(Cli::try_parse_from(["opsd", "serve", "--tls-cert", "c.pem"]).is_err());
        assert_eq!(config(&["opsd", "serve"]).unwrap().auth, None);
    }

    #[test]
    fn listen_takes_addresses_and_host_names() {
        assert_eq!(
            resolve_listen("127.0.0.1:7").unwrap(),
            "127.0.0.1:7".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(
            resolve_listen("[::1]:7").unwrap(),
            "[::1]:7".parse::<SocketAddr>().unwrap()
        );
        let local = resolve_listen("localhost:7").unwrap();
        assert!(local.ip().is_loopback() && local.port() == 7, "{local}");
        let err = resolve_listen("localhost").unwrap_err();
        assert!(err.contains("127.0.0.1:50051"), "{err}");
        let err = resolve_listen("no-such-host.invalid:7").unwrap_err();
        assert!(err.contains("give an IP address"), "{err}");
    }
}
