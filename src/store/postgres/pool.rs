//! Connections to PostgreSQL: the URL, TLS, the pool, and what errors mean.
//!
//! The URL is libpq's (`postgres://user:password@host:port/db?sslmode=...`)
//! and is parsed by `tokio_postgres::Config`, except the TLS options it does
//! not know: `sslmode=verify-ca|verify-full` and `sslrootcert`, which are
//! taken out here and honoured through rustls (ring provider):
//!
//! - `disable`: no TLS. `prefer` (the default, as in libpq): TLS when the
//!   server offers it, else plain. `require`: TLS or nothing. Neither checks
//!   the server's certificate (as libpq without a root certificate file).
//! - `verify-ca`: TLS, with a certificate chain to a trusted root.
//!   `verify-full`: that, and the certificate names the host.
//! - `sslrootcert=PATH` (PEM) names the trusted roots; without it, or with
//!   `sslrootcert=system`, they are the Mozilla roots (`webpki-roots`).
//! - Client certificates (`sslcert`, `sslkey`) are refused with a message.
//!
//! The pool is deadpool's. A connection is checked before it is handed out
//! again: one the server closed (`pg_terminate_backend`, a restart; the
//! server says so, or the socket ends) is replaced at once, and one idle
//! for more than [`VERIFY_AFTER_IDLE`] is also tried with an empty query
//! first (firewalls and NATs drop idle connections silently). A connection
//! used within the last seconds is not tried again: `Verified` recycling,
//! which tries every one, cost a round trip per store call (25–30 % of the
//! throughput of Gets and writes, measured; see the README). Waits for a
//! free connection, for a new one and for the check are bounded, and every
//! new connection gets `statement_timeout`, `lock_timeout` and
//! `idle_in_transaction_session_timeout`, so nothing the store runs can
//! hold a connection or a lock for long.

use std::{path::PathBuf, str::FromStr, sync::Arc, time::Duration};

use deadpool_postgres::{
    HookError, Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime,
};
use rustls::{
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        WebPkiServerVerifier,
    },
    crypto::CryptoProvider,
    pki_types::{CertificateDer, ServerName, UnixTime},
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use tokio_postgres::Socket;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::PostgresSettings;

/// A pooled connection idle for longer than this is tried before it is
/// handed out again.
pub const VERIFY_AFTER_IDLE: Duration = Duration::from_secs(10);
use crate::store::StoreError;

/// How the connection is protected (libpq's `sslmode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// A parsed `postgres://` URL.
#[derive(Clone)]
pub struct Target {
    /// What tokio-postgres connects with (its `sslmode` is `require` for the
    /// verifying modes; the verification is ours).
    pub(super) config: tokio_postgres::Config,
    pub(super) tls: TlsMode,
    /// `sslrootcert`: a PEM file of trusted roots; `None` for the Mozilla roots.
    pub(super) root_cert: Option<PathBuf>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}

/// The target without its password, for logs and messages.
impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hosts: Vec<String> = self
            .config
            .get_hosts()
            .iter()
            .map(|h| match h {
                tokio_postgres::config::Host::Tcp(name) => name.clone(),
                #[cfg(unix)]
                tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
            })
            .collect();
        let ports: Vec<String> = self.config.get_ports().iter().map(u16::to_string).collect();
        write!(
            f,
            "postgres://{}@{}:{}/{} (sslmode={})",
            self.config.get_user().unwrap_or(""),
            hosts.join(","),
            ports.join(","),
            self.config.get_dbname().unwrap_or(""),
            match self.tls {
                TlsMode::Disable => "disable",
                TlsMode::Prefer => "prefer",
                TlsMode::Require => "require",
                TlsMode::VerifyCa => "verify-ca",
                TlsMode::VerifyFull => "verify-full",
            }
        )
    }
}

impl PartialEq for Target {
    fn eq(&self, other: &Self) -> bool {
        self.config == other.config && self.tls == other.tls && self.root_cert == other.root_cert
    }
}

impl Eq for Target {}

/// Whether `value` names a PostgreSQL store (`postgres://` or `postgresql://`).
pub fn is_postgres_url(value: &str) -> bool {
    value.starts_with("postgres://") || value.starts_with("postgresql://")
}

impl FromStr for Target {
    type Err = String;

    fn from_str(url: &str) -> Result<Self, String> {
        if !is_postgres_url(url) {
            return Err(format!(
                "{url:?} is not a PostgreSQL URL (postgres://USER@HOST:PORT/DB)"
            ));
        }
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut tls = TlsMode::Prefer;
        let mut root_cert = None;
        let mut kept: Vec<&str> = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_encoding::percent_decode_str(value)
                .decode_utf8()
                .map_err(|_| format!("the URL option {key} is not UTF-8"))?;
            match key {
                "sslmode" => {
                    tls = match &*value {
                        "disable" => TlsMode::Disable,
                        "allow" | "prefer" => TlsMode::Prefer,
                        "require" => TlsMode::Require,
                        "verify-ca" => TlsMode::VerifyCa,
                        "verify-full" => TlsMode::VerifyFull,
                        other => {
                            return Err(format!(
                                "unknown sslmode {other:?}: use disable, prefer, require, \
                                 verify-ca or verify-full"
                            ))
                        }
                    };
                }
                "sslrootcert" if value == "system" => root_cert = None,
                "sslrootcert" => root_cert = Some(PathBuf::from(&*value)),
                "sslcert" | "sslkey" | "sslpassword" | "sslcrl" | "sslcrldir" => {
                    return Err(format!(
                        "the URL option {key} is not supported: opsd does not present \
                         client certificates"
                    ))
                }
                _ => kept.push(pair),
            }
        }
        // tokio-postgres does the TLS handshake; the verification is ours.
        let wire_mode = match tls {
            TlsMode::Disable => "disable",
            TlsMode::Prefer => "prefer",
            _ => "require",
        };
        let sslmode = format!("sslmode={wire_mode}");
        kept.push(&sslmode);
        let rebuilt = format!("{base}?{}", kept.join("&"));
        let config = tokio_postgres::Config::from_str(&rebuilt)
            .map_err(|e| format!("invalid PostgreSQL URL: {e}"))?;
        if config.get_hosts().is_empty() {
            return Err("the PostgreSQL URL names no host".into());
        }
        Ok(Self {
            config,
            tls,
            root_cert,
        })
    }
}

/// The server certificate check of the modes rustls's own verifier does not
/// cover: `prefer` and `require` accept any certificate (as libpq without a
/// root file), `verify-ca` needs a chain to a trusted root but not the name.
/// Either way the handshake's signatures are checked, so the server must
/// hold the certificate's key.
#[derive(Debug)]
struct Verifier {
    provider: Arc<CryptoProvider>,
    /// `verify-ca`: the chain check (its name check is ignored).
    chain: Option<Arc<WebPkiServerVerifier>>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The trusted roots of the verifying modes.
fn roots(target: &Target) -> Result<RootCertStore, StoreError> {
    let Some(path) = &target.root_cert else {
        return Ok(RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        });
    };
    let shown = path.display();
    let bad = |why: String| StoreError::Internal(format!("sslrootcert {shown}: {why}"));
    let mut store = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| bad(e.to_string()))? {
        store
            .add(cert.map_err(|e| bad(e.to_string()))?)
            .map_err(|e| bad(e.to_string()))?;
    }
    if store.is_empty() {
        return Err(bad("holds no certificate".into()));
    }
    Ok(store)
}

/// The TLS connector for `target`'s `sslmode` (unused when it is `disable`).
pub(super) fn tls(target: &Target) -> Result<MakeRustlsConnect, StoreError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Internal(format!("TLS: {e}")))?;
    let chain = match target.tls {
        TlsMode::Disable | TlsMode::Prefer | TlsMode::Require => None,
        TlsMode::VerifyCa => Some(
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots(target)?), provider.clone())
                .build()
                .map_err(|e| StoreError::Internal(format!("TLS: {e}")))?,
        ),
        TlsMode::VerifyFull => {
            let config = builder
                .with_root_certificates(roots(target)?)
                .with_no_client_auth();
            return Ok(MakeRustlsConnect::new(config));
        }
    };
    let config = builder
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Verifier { provider, chain }))
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// The connection settings opsd adds to the URL's: a connect timeout,
/// keepalives that find a dead peer in about a minute instead of two hours,
/// and an application name (`opsd`) that shows in `pg_stat_activity`.
pub(super) fn connection_config(
    target: &Target,
    settings: &PostgresSettings,
) -> tokio_postgres::Config {
    let mut config = target.config.clone();
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(settings.connect_timeout);
    }
    if config.get_keepalives_idle() == Duration::from_secs(2 * 60 * 60) {
        config.keepalives_idle(Duration::from_secs(15));
        config.keepalives_interval(Duration::from_secs(5));
        config.keepalives_retries(3);
    }
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout(Duration::from_secs(30));
    }
    if config.get_application_name().is_none() {
        config.application_name("opsd");
    }
    config
}

/// The settings every connection runs with (see the module docs).
pub(super) fn session_sql(settings: &PostgresSettings) -> String {
    let ms = |d: Duration| d.as_millis().max(1);
    let statement = settings.statement_timeout;
    format!(
        "SET statement_timeout = {}; SET lock_timeout = {}; \
         SET idle_in_transaction_session_timeout = {}; SET TIME ZONE 'UTC'",
        ms(statement),
        ms(statement),
        ms((statement * 2).max(Duration::from_secs(10))),
    )
}

/// Connects one connection outside the pool (the change feed's listener).
pub(super) async fn connect(
    target: &Target,
    settings: &PostgresSettings,
) -> Result<
    (
        tokio_postgres::Client,
        tokio_postgres::Connection<
            Socket,
            <MakeRustlsConnect as tokio_postgres::tls::MakeTlsConnect<Socket>>::Stream,
        >,
    ),
    StoreError,
> {
    let config = connection_config(target, settings);
    config.connect(tls(target)?).await.map_err(pg_error)
}

/// The pool of connections the store's reads and writes use.
pub(super) fn pool(target: &Target, settings: &PostgresSettings) -> Result<Pool, StoreError> {
    let manager = Manager::from_config(
        connection_config(target, settings),
        tls(target)?,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let session: Arc<str> = Arc::from(session_sql(settings));
    let check_within = settings.connect_timeout.min(settings.statement_timeout);
    Pool::builder(manager)
        .max_size(settings.pool_size.max(1))
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(settings.pool_timeout))
        .create_timeout(Some(settings.connect_timeout))
        .recycle_timeout(Some(
            settings.connect_timeout.min(settings.statement_timeout),
        ))
        .post_create(deadpool_postgres::Hook::async_fn(move |client, _| {
            let session = session.clone();
            Box::pin(async move {
                client
                    .batch_execute(&session)
                    .await
                    .map_err(HookError::Backend)
            })
        }))
        .pre_recycle(deadpool_postgres::Hook::async_fn(move |client, metrics| {
            let idle = metrics.last_used();
            Box::pin(async move {
                // A closed one is refused by the recycling itself.
                if idle < VERIFY_AFTER_IDLE || client.is_closed() {
                    return Ok(());
                }
                match tokio::time::timeout(check_within, client.simple_query("")).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(err)) => Err(HookError::Backend(err)),
                    Err(_) => Err(HookError::message("an idle connection did not answer")),
                }
            })
        }))
        .build()
        .map_err(|e| StoreError::Internal(format!("cannot build the connection pool: {e}")))
}

/// What a database error means for the caller: faults that pass (the
/// connection, the server shutting down or out of resources, timeouts,
/// lock and serialization failures, a read-only standby) are UNAVAILABLE;
/// anything else (the schema is not what this opsd expects) is INTERNAL.
pub(super) fn pg_error(err: tokio_postgres::Error) -> StoreError {
    let Some(db) = err.as_db_error() else {
        // The causes say what went wrong (a refused connection, a TLS
        // certificate the mode does not accept).
        let mut message = format!("database connection: {err}");
        let mut source = std::error::Error::source(&err);
        while let Some(cause) = source {
            message.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        return StoreError::Unavailable(message);
    };
    let code = db.code().code();
    let passing = [
        "08", "40", "53", "55P03", "57", "58", "25006", "3D000", "28",
    ]
    .iter()
    .any(|prefix| code.starts_with(prefix));
    let message = format!("database: {} ({code})", db.message());
    if passing {
        StoreError::Unavailable(message)
    } else {
        StoreError::Internal(message)
    }
}

/// A connection could not be had from the pool.
pub(super) fn pool_error(err: PoolError) -> StoreError {
    match err {
        PoolError::Backend(err) => pg_error(err),
        PoolError::Timeout(kind) => StoreError::Unavailable(format!(
            "no database connection within the pool's timeout ({kind:?})"
        )),
        other => StoreError::Unavailable(format!("database connection pool: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> Result<Target, String> {
        url.parse()
    }

    #[test]
    fn urls_parse_with_their_tls_mode() {
        let t = parse("postgres://opsd:secret@db.example:6432/ops").unwrap();
        assert_eq!(t.tls, TlsMode::Prefer);
        assert_eq!(t.config.get_dbname(), Some("ops"));
        assert_eq!(t.config.get_ports(), [6432]);
        assert!(!t.to_string().contains("secret"), "{t}");
        let t = parse(
            "postgresql://u@h/d?sslmode=verify-full&sslrootcert=/etc/ca.pem&application_name=x",
        )
        .unwrap();
        assert_eq!(t.tls, TlsMode::VerifyFull);
        assert_eq!(t.root_cert, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(
            t.config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
        assert_eq!(t.config.get_application_name(), Some("x"));
        let t = parse("postgres://u@h/d?sslmode=verify-ca&sslrootcert=system").unwrap();
        assert_eq!((t.tls, t.root_cert), (TlsMode::VerifyCa, None));
        let t = parse("postgres://u@h/d?sslmode=disable").unwrap();
        assert_eq!(
            t.config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Disable
        );
        assert!(parse("postgres://u@h/d?sslmode=sometimes")
            .unwrap_err()
            .contains("sslmode"));
        assert!(parse("postgres://u@h/d?sslcert=/c.pem")
            .unwrap_err()
            .contains("client certificates"));
        assert!(parse("postgres://u@h/d?colour=blue").is_err());
        assert!(parse("mysql://u@h/d").is_err());
    }

    #[test]
    fn sessions_get_bounded_timeouts() {
        let settings = PostgresSettings {
            statement_timeout: Duration::from_millis(1500),
            ..PostgresSettings::default()
        };
        let sql = session_sql(&settings);
        assert!(sql.contains("statement_timeout = 1500"), "{sql}");
        assert!(sql.contains("lock_timeout = 1500"), "{sql}");
        assert!(
            sql.contains("idle_in_transaction_session_timeout = 10000"),
            "{sql}"
        );
        let config = connection_config(&parse("postgres://u@h/d").unwrap(), &settings);
        assert_eq!(config.get_application_name(), Some("opsd"));
        assert_eq!(
            config.get_connect_timeout(),
            Some(&settings.connect_timeout)
        );
    }
}
