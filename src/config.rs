//! One validated configuration: every address, limit and tunable.

use std::{collections::BTreeSet, net::SocketAddr, path::PathBuf, time::Duration};

use crate::{api::operations::Method, registry::RegistrySettings};

/// Where operations are kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreConfig {
    /// In process memory: lost on exit.
    Memory,
    /// A redb file: durable, the default.
    Redb(PathBuf),
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
    /// The largest REST request body, in bytes (larger → 413).
    pub max_body_bytes: usize,
    /// How long an HTTP/1 client may take to send its request headers.
    pub header_read_timeout: Duration,
    /// Open connections at most; further clients wait in the accept queue.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_size: 4 * 1024 * 1024,
            max_concurrent_streams: 1024,
            keepalive_interval: Duration::from_secs(60),
            keepalive_timeout: Duration::from_secs(20),
            drain_timeout: Duration::from_secs(30),
            max_body_bytes: 1024 * 1024,
            header_read_timeout: Duration::from_secs(10),
            max_connections: 10_000,
        }
    }
}

/// Everything `server::run` needs.
#[derive(Clone, Debug)]
pub struct Config {
    /// The one port for every protocol.
    pub listen: SocketAddr,
    pub store: StoreConfig,
    pub registry: RegistrySettings,
    /// Operations methods that answer UNIMPLEMENTED.
    pub disabled_methods: BTreeSet<Method>,
    /// Google service-config YAML files whose Operations HTTP rules REST serves.
    pub http_rules: Vec<PathBuf>,
    /// Encoded FileDescriptorSets whose types REST renders inside `Any`.
    pub descriptor_sets: Vec<PathBuf>,
    /// Scenario files whose operations are created at start-up.
    pub scenarios: Vec<PathBuf>,
    /// REST refuses calls without a generated client's `x-goog-api-client`.
    pub strict_rest_clients: bool,
    /// Serve `/metrics` (Prometheus) and record into it.
    pub metrics: bool,
    pub limits: Limits,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            store: StoreConfig::default(),
            registry: RegistrySettings::default(),
            disabled_methods: BTreeSet::new(),
            http_rules: Vec::new(),
            descriptor_sets: Vec::new(),
            scenarios: Vec::new(),
            strict_rest_clients: false,
            metrics: true,
            limits: Limits::default(),
        }
    }
}

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
}
