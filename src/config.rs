//! One configuration for `server::run`, assembled from the settings each
//! layer owns ([`RegistrySettings`], [`OperationsSettings`],
//! [`RestSettings`]) plus what only the server reads (the store to open,
//! the transport [`Limits`], the files to load at start-up), and checked in
//! one place, [`Config::validate`], so the binary and library users get the
//! same errors.

use std::{net::SocketAddr, path::Path, path::PathBuf, time::Duration};

use crate::{
    api::{operations::OperationsSettings, rest::RestSettings},
    registry::RegistrySettings,
    store::postgres::{is_postgres_url, PostgresSettings, Target},
};

/// Where operations are kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreConfig {
    /// In process memory: lost on exit.
    Memory,
    /// A redb file: durable, the default.
    Redb(PathBuf),
    /// A PostgreSQL database that any number of replicas share
    /// (`postgres://USER@HOST:PORT/DB`; its Debug form has no password).
    Postgres(Box<Target>),
}

impl StoreConfig {
    /// The default store file, relative to the working directory.
    pub const DEFAULT_REDB_PATH: &'static str = "./opsd-data/opsd.redb";
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self::Redb(PathBuf::from(Self::DEFAULT_REDB_PATH))
    }
}

impl std::str::FromStr for StoreConfig {
    type Err = ConfigError;

    /// `memory`, `redb` (the default path), `redb:PATH`, or a PostgreSQL
    /// URL (`postgres://…` or `postgresql://…`, libpq's form).
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        if is_postgres_url(value) {
            return value
                .parse::<Target>()
                .map(|target| StoreConfig::Postgres(Box::new(target)))
                .map_err(ConfigError);
        }
        match value.split_once(':') {
            None if value == "memory" => Ok(StoreConfig::Memory),
            None if value == "redb" => Ok(StoreConfig::default()),
            Some(("redb", path)) if !path.is_empty() => Ok(StoreConfig::Redb(PathBuf::from(path))),
            _ => Err(ConfigError(format!(
                "unknown store {value:?}: use `redb:PATH`, `redb`, `memory` or \
                 `postgres://USER@HOST:PORT/DB`"
            ))),
        }
    }
}

/// Transport limits; none is left unlimited.
#[derive(Clone, Debug)]
pub struct Limits {
    /// The largest gRPC message accepted or sent, in bytes.
    pub max_message_size: usize,
    /// Concurrent HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
    /// How often an idle HTTP/2 connection is pinged.
    pub keepalive_interval: Duration,
    /// How long a ping may go unanswered before the connection is closed.
    pub keepalive_timeout: Duration,
    /// How long shutdown waits for in-flight calls before closing connections.
    pub drain_timeout: Duration,
    /// How long a new connection may take to complete its handshake (the
    /// HTTP/2 preface and SETTINGS, or its first HTTP/1 request head), and
    /// an HTTP/1 client to send each later request head.
    pub header_read_timeout: Duration,
    /// How long a connection may stay open with no call open.
    pub idle_timeout: Duration,
    /// Client PINGs closer together than this, while the server sends
    /// nothing, are strikes; past two, the client gets GOAWAY
    /// `too_many_pings`.
    pub min_ping_interval: Duration,
    /// Open connections at most. At the cap a new client still gets in: a
    /// connection that has not completed its handshake, else the one idle
    /// the longest, makes room; if every connection has a call open, the
    /// new one is closed at once (it never waits in the listen queue).
    pub max_connections: usize,
    /// Calls in flight at most (Waits and streams not counted); over it a
    /// call is answered RESOURCE_EXHAUSTED at once. 0: no limit.
    pub max_in_flight: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_size: 4 * 1024 * 1024,
            max_concurrent_streams: 1024,
            keepalive_interval: Duration::from_secs(60),
            keepalive_timeout: Duration::from_secs(20),
            drain_timeout: Duration::from_secs(30),
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            min_ping_interval: Duration::from_secs(10),
            max_connections: 10_000,
            max_in_flight: Self::DEFAULT_MAX_IN_FLIGHT,
        }
    }
}

/// OpenTelemetry traces over OTLP/gRPC (`server::trace::Traces` exports
/// them; the binary starts it).
#[derive(Clone, Debug)]
pub struct TraceSettings {
    /// The collector, `http://HOST:PORT`; `None`: no traces.
    pub otlp_endpoint: Option<String>,
    /// Ended spans waiting for export at most; beyond it spans are dropped
    /// (and counted), never waited for.
    pub queue_size: usize,
}

impl Default for TraceSettings {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            queue_size: 2048,
        }
    }
}

/// Who may call (`--auth-*`); auth is on when [`Config::auth`] is set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuthSettings {
    /// A JWKS file, or an `http(s)://` URL (`--auth-jwks`).
    pub jwks: String,
    /// The issuer tokens must name (`--auth-issuer`).
    pub issuer: String,
    /// The audiences a token may name, at least one (`--auth-audience`).
    pub audiences: Vec<String>,
    /// Who may do what (`--auth-policy`); without it every authenticated
    /// caller with the required scope may do everything.
    pub policy: Option<PathBuf>,
    /// Reflection answers without credentials (`--auth-open-reflection`).
    pub open_reflection: bool,
}

/// TLS on the listener (`--tls-cert`, `--tls-key`, `--tls-client-ca`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsSettings {
    /// The certificate chain (PEM), reloaded on SIGHUP.
    pub cert: PathBuf,
    /// Its private key (PEM), reloaded on SIGHUP.
    pub key: PathBuf,
    /// The CA (PEM) whose client certificates are accepted (mTLS).
    pub client_ca: Option<PathBuf>,
}

/// Room kept in a message for the envelope around an operation or a page.
const ENVELOPE_ROOM: usize = 64 * 1024;

/// The smallest operation or List page the registry accepts, whatever the
/// message size.
const MIN_ROOM: usize = 1024;

impl Limits {
    /// The default `--max-in-flight` (README, Overload).
    pub const DEFAULT_MAX_IN_FLIGHT: usize = 128;

    /// The largest operation (and List page) that fits in a message of
    /// `max_message_size` bytes with its envelope: max(1,024, size − 65,536).
    pub fn message_room(max_message_size: usize) -> usize {
        max_message_size.saturating_sub(ENVELOPE_ROOM).max(MIN_ROOM)
    }
}

/// Everything `server::run` needs.
#[derive(Clone, Debug)]
pub struct Config {
    /// The one port for every protocol.
    pub listen: SocketAddr,
    pub store: StoreConfig,
    /// The PostgreSQL store's pool and timeouts (with `StoreConfig::Postgres`).
    pub postgres: PostgresSettings,
    pub registry: RegistrySettings,
    pub operations: OperationsSettings,
    pub rest: RestSettings,
    /// Encoded FileDescriptorSets whose types REST renders inside `Any`.
    pub descriptor_sets: Vec<PathBuf>,
    /// Scenario files whose operations are created at start-up.
    pub scenarios: Vec<PathBuf>,
    /// Serve `/metrics` (Prometheus) and record into it.
    pub metrics: bool,
    /// Serve the operator page at `/ui/` (`--no-ui` turns it off).
    pub ui: bool,
    /// Origins whose browser pages may call opsd across origins (CORS, for
    /// REST and gRPC-Web): `scheme://host[:port]` each, or `*` for any.
    /// Empty (the default): no CORS headers, so browsers call only from
    /// opsd's own origin (the operator page).
    pub cors_allow_origins: Vec<String>,
    pub limits: Limits,
    pub traces: TraceSettings,
    /// Auth (`None`: off, anyone who reaches the port may call).
    pub auth: Option<AuthSettings>,
    /// TLS on the listener (`None`: plain text).
    pub tls: Option<TlsSettings>,
    /// Serve `/metrics` on this address instead of the main port
    /// (`--metrics-listen`).
    pub metrics_listen: Option<SocketAddr>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            store: StoreConfig::default(),
            postgres: PostgresSettings::default(),
            registry: RegistrySettings::default(),
            operations: OperationsSettings::default(),
            rest: RestSettings::default(),
            descriptor_sets: Vec::new(),
            scenarios: Vec::new(),
            metrics: true,
            ui: true,
            cors_allow_origins: Vec::new(),
            limits: Limits::default(),
            traces: TraceSettings::default(),
            auth: None,
            tls: None,
            metrics_listen: None,
        }
    }
}

/// A configuration that cannot run, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

impl Config {
    /// The configuration integration tests start servers with: the memory
    /// store and a short drain.
    pub fn for_tests() -> Self {
        let mut config = Self {
            store: StoreConfig::Memory,
            ..Self::default()
        };
        config.limits.drain_timeout = Duration::from_secs(5);
        config
    }

    /// Sets the largest gRPC message, and with it the largest operation
    /// and List page the registry accepts ([`Limits::message_room`]).
    pub fn set_max_message_size(&mut self, bytes: usize) {
        self.limits.max_message_size = bytes;
        let room = Limits::message_room(bytes);
        self.registry.max_page_bytes = room;
        self.registry.max_operation_bytes = room;
    }

    /// Every check a configuration must pass before a server starts with
    /// it (`Server::new` runs it).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |message: String| Err(ConfigError(message));
        let registry = &self.registry;
        let limits = &self.limits;
        for (flag, value) in [
            ("--retention", registry.retention),
            ("--wait-cap", registry.wait_cap),
            ("--cancel-grace-period", registry.cancel_grace_period),
            ("--page-token-ttl", registry.page_token_ttl),
            ("--keepalive-interval", limits.keepalive_interval),
            ("--keepalive-timeout", limits.keepalive_timeout),
            ("--header-read-timeout", limits.header_read_timeout),
            ("--idle-timeout", limits.idle_timeout),
            ("--min-ping-interval", limits.min_ping_interval),
            ("--body-read-timeout", self.rest.body_read_timeout),
            ("--pg-connect-timeout", self.postgres.connect_timeout),
            ("--pg-statement-timeout", self.postgres.statement_timeout),
            ("--pg-pool-timeout", self.postgres.pool_timeout),
            ("--pg-migration-timeout", self.postgres.migration_timeout),
        ] {
            if value.is_zero() {
                return fail(format!("{flag} must be greater than zero"));
            }
        }
        if limits.max_connections == 0 {
            return fail("--max-connections must be at least 1".into());
        }
        if let Some(endpoint) = &self.traces.otlp_endpoint {
            check_otlp_endpoint(endpoint)?;
        }
        if self.traces.queue_size == 0 {
            return fail("--otlp-queue-size must be at least 1".into());
        }
        for origin in &self.cors_allow_origins {
            check_origin(origin)?;
        }
        if self.postgres.pool_size == 0 {
            return fail("--pg-pool-size must be at least 1".into());
        }
        if let Some(auth) = &self.auth {
            if auth.jwks.is_empty() {
                return fail("--auth-jwks needs a file or an http(s):// URL".into());
            }
            if auth.issuer.is_empty() {
                return fail("--auth-issuer is required with --auth-jwks".into());
            }
            if auth.audiences.iter().all(String::is_empty) {
                return fail("--auth-audience is required with --auth-jwks".into());
            }
        }
        if self.metrics_listen.is_some() && !self.metrics {
            return fail("--metrics-listen cannot go with --no-metrics".into());
        }
        let room = Limits::message_room(limits.max_message_size);
        if registry.max_operation_bytes > room || registry.max_page_bytes > room {
            return fail(format!(
                "operations and List pages must fit in a message: at most {room} bytes \
                 with --max-message-size {} (see Config::set_max_message_size)",
                limits.max_message_size
            ));
        }
        Ok(())
    }
}

/// A `--cors-allow-origin`: `*`, or an origin as browsers send it in
/// `Origin` (`scheme://host[:port]`, no path, no trailing slash).
fn check_origin(origin: &str) -> Result<(), ConfigError> {
    if origin == "*" {
        return Ok(());
    }
    let bad = |why: &str| {
        Err(ConfigError(format!(
            "--cors-allow-origin {origin:?}: {why} (an origin is scheme://host[:port], \
             as in https://console.example.com, or * for any)"
        )))
    };
    let Ok(uri) = origin.parse::<http::Uri>() else {
        return bad("not a URL");
    };
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return bad("the scheme must be http or https"),
    }
    if uri
        .authority()
        .is_none_or(|a| a.host().is_empty() || a.as_str().contains('@'))
    {
        return bad("no host");
    }
    if !origin.ends_with(uri.authority().map_or("", |a| a.as_str())) {
        return bad("an origin has no path");
    }
    Ok(())
}

/// An OTLP/gRPC collector's address: `http://HOST:PORT`. TLS to the
/// collector is not built in (a collector beside opsd is reached in plain).
fn check_otlp_endpoint(endpoint: &str) -> Result<(), ConfigError> {
    let fail = |why: &str| {
        Err(ConfigError(format!(
            "--otlp-endpoint {endpoint:?}: {why}; give http://HOST:PORT, e.g. http://127.0.0.1:4317"
        )))
    };
    let Ok(uri) = endpoint.parse::<http::Uri>() else {
        return fail("not a URL");
    };
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => return fail("TLS to the collector is not supported"),
        _ => return fail("the scheme must be http"),
    }
    if uri.host().is_none_or(str::is_empty) {
        return fail("no host");
    }
    Ok(())
}

/// Reads a page token key file: at least 32 bytes, of which the first 32
/// are the key.
pub fn read_page_token_key(path: &Path) -> Result<[u8; 32], ConfigError> {
    let bytes = std::fs::read(path)
        .map_err(|e| ConfigError(format!("cannot read {}: {e}", path.display())))?;
    bytes
        .get(..32)
        .and_then(|key| key.try_into().ok())
        .ok_or_else(|| {
            ConfigError(format!(
                "{} holds {} bytes; a page token key needs at least 32",
                path.display(),
                bytes.len()
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_and_the_test_configuration_are_valid() {
        Config::default().validate().unwrap();
        Config::for_tests().validate().unwrap();
    }

    #[test]
    fn invalid_settings_are_refused_with_their_flag() {
        let refused = |change: &dyn Fn(&mut Config)| {
            let mut config = Config::default();
            change(&mut config);
            config.validate().unwrap_err().to_string()
        };
        assert!(refused(&|c| c.registry.retention = Duration::ZERO).contains("--retention"));
        assert!(refused(&|c| c.limits.max_connections = 0).contains("--max-connections"));
        assert!(refused(&|c| c.postgres.pool_size = 0).contains("--pg-pool-size"));
        assert!(refused(&|c| c.postgres.statement_timeout = Duration::ZERO)
            .contains("--pg-statement-timeout"));
        // A smaller message without smaller operations cannot work.
        assert!(refused(&|c| c.limits.max_message_size = 100_000).contains("fit in a message"));
        let mut config = Config::default();
        config.set_max_message_size(100_000);
        config.validate().unwrap();
        assert_eq!(config.registry.max_operation_bytes, 100_000 - 65_536);
        config.set_max_message_size(2000);
        assert_eq!(config.registry.max_page_bytes, 1024);
    }

    #[test]
    fn otlp_endpoints_are_plain_http_urls() {
        let check = |endpoint: &str| {
            let mut config = Config::default();
            config.traces.otlp_endpoint = Some(endpoint.to_owned());
            config.validate().map_err(|e| e.to_string())
        };
        check("http://127.0.0.1:4317").unwrap();
        check("http://collector.observability:4317").unwrap();
        assert!(check("https://collector:4317").unwrap_err().contains("TLS"));
        assert!(check("collector:4317")
            .unwrap_err()
            .contains("http://HOST:PORT"));
        assert!(check("http://").is_err());
        assert!(check("not a url").is_err());
        let mut config = Config::default();
        config.traces.queue_size = 0;
        assert!(config.validate().is_err());
    }

    #[test]
    fn cors_origins_are_origins() {
        let check = |origin: &str| {
            let config = Config {
                cors_allow_origins: vec![origin.to_owned()],
                ..Config::default()
            };
            config.validate().map_err(|e| e.to_string())
        };
        check("*").unwrap();
        check("https://console.example.com").unwrap();
        check("http://localhost:5173").unwrap();
        assert!(check("https://console.example.com/")
            .unwrap_err()
            .contains("no path"));
        assert!(check("https://console.example.com/app").is_err());
        assert!(check("console.example.com").is_err());
        assert!(check("ftp://console.example.com")
            .unwrap_err()
            .contains("scheme"));
        assert!(check("https://user@console.example.com").is_err());
        assert!(check("").is_err());
    }

    #[test]
    fn auth_needs_an_issuer_and_an_audience() {
        let check = |auth: AuthSettings| {
            let config = Config {
                auth: Some(auth),
                ..Config::default()
            };
            config.validate().map_err(|e| e.to_string())
        };
        let auth = AuthSettings {
            jwks: "jwks.json".into(),
            issuer: "https://issuer".into(),
            audiences: vec!["opsd".into()],
            ..Default::default()
        };
        check(auth.clone()).unwrap();
        assert!(check(AuthSettings {
            issuer: String::new(),
            ..auth.clone()
        })
        .unwrap_err()
        .contains("--auth-issuer"));
        assert!(check(AuthSettings {
            audiences: vec![],
            ..auth
        })
        .unwrap_err()
        .contains("--auth-audience"));
    }

    #[test]
    fn stores_parse_from_their_flag() {
        assert_eq!("memory".parse::<StoreConfig>(), Ok(StoreConfig::Memory));
        assert_eq!("redb".parse::<StoreConfig>(), Ok(StoreConfig::default()));
        assert_eq!(
            "redb:/tmp/x.redb".parse::<StoreConfig>(),
            Ok(StoreConfig::Redb("/tmp/x.redb".into()))
        );
        assert!("redb:".parse::<StoreConfig>().is_err());
        assert!("postgres".parse::<StoreConfig>().is_err());
        let Ok(StoreConfig::Postgres(target)) =
            "postgres://opsd:pw@db:5433/ops?sslmode=require".parse::<StoreConfig>()
        else {
            panic!("a PostgreSQL URL is a store");
        };
        assert!(!format!("{target:?}").contains("pw"), "{target:?}");
        assert!("postgresql://u@h/d".parse::<StoreConfig>().is_ok());
        let err = "postgres://u@h/d?sslmode=nope"
            .parse::<StoreConfig>()
            .unwrap_err();
        assert!(err.to_string().contains("sslmode"), "{err}");
    }

    #[test]
    fn page_token_keys_need_32_bytes() {
        let dir = std::env::temp_dir().join(format!("opsd-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let short = dir.join("short");
        std::fs::write(&short, [1u8; 31]).unwrap();
        assert!(read_page_token_key(&short)
            .unwrap_err()
            .to_string()
            .contains("31 bytes"));
        let long = dir.join("long");
        std::fs::write(&long, [7u8; 40]).unwrap();
        assert_eq!(read_page_token_key(&long).unwrap(), [7u8; 32]);
        assert!(read_page_token_key(&dir.join("missing")).is_err());
        std::fs::remove_dir_all(&dir).ok();
    }
}
