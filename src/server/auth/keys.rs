//! The keys tokens are verified with: a JWKS document (RFC 7517) from a
//! file, or from a URL that is fetched at start-up, refreshed on its
//! interval (the response's `Cache-Control: max-age`, else
//! [`DEFAULT_REFRESH`], kept between [`MIN_REFRESH`] and a day), and
//! refetched when a token names a `kid` the set does not have (a key
//! rotated in). Refetches for unknown `kid`s happen at most once per
//! [`REFETCH_INTERVAL`]: a flood of tokens with random `kid`s costs one
//! fetch per interval, not one each.
//!
//! Only asymmetric keys are kept, each with the algorithms its type allows
//! (RSA: RS256/384/512 and PS256/384/512; EC P-256: ES256, P-384: ES384;
//! OKP Ed25519: EdDSA), narrowed to its `alg` when the JWK names one. A
//! token whose `alg` its key does not allow is refused before any
//! signature check, so neither `none` nor an HMAC made with a public key
//! can pass; symmetric (`oct`) keys, and keys marked `"use": "enc"`, are
//! skipped when the set is read.

use std::{
    path::PathBuf,
    str::FromStr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, RwLock,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};
use jsonwebtoken::{
    jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse},
    Algorithm, DecodingKey,
};
use tokio_util::sync::CancellationToken;

/// How often a JWKS URL is fetched when its response sets no `max-age`.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(600);
/// The shortest refresh interval a `max-age` can ask for.
pub const MIN_REFRESH: Duration = Duration::from_secs(60);
/// The longest.
const MAX_REFRESH: Duration = Duration::from_secs(24 * 3600);
/// Unknown-`kid` refetches happen at most once per this interval.
pub const REFETCH_INTERVAL: Duration = Duration::from_secs(5);
/// A fetch (connect, answer and body) that takes longer fails.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest JWKS document read.
const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// One usable key.
struct Key {
    kid: Option<String>,
    algorithms: Vec<Algorithm>,
    key: DecodingKey,
}

/// The keys of one JWKS document.
#[derive(Default)]
pub(super) struct KeySet {
    keys: Vec<Key>,
}

/// The algorithms a JWK's type allows, narrowed to its `alg`; `None` for
/// keys that are never used (symmetric ones, other curves, keys for
/// encryption: `"use": "enc"`).
fn algorithms(jwk: &Jwk) -> Option<Vec<Algorithm>> {
    use Algorithm::*;
    if jwk.common.public_key_use == Some(PublicKeyUse::Encryption) {
        return None;
    }
    let by_type = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => vec![RS256, RS384, RS512, PS256, PS384, PS512],
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => vec![ES256],
            EllipticCurve::P384 => vec![ES384],
            _ => return None,
        },
        AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => {
            vec![EdDSA]
        }
        _ => return None,
    };
    match &jwk.common.key_algorithm {
        None => Some(by_type),
        Some(named) => {
            let named = Algorithm::from_str(&named.to_string()).ok()?;
            by_type.contains(&named).then(|| vec![named])
        }
    }
}

impl KeySet {
    /// Reads a JWKS document; keys that cannot be used are skipped (and
    /// logged), a document with none usable is an error.
    pub(super) fn parse(text: &[u8]) -> Result<Self, String> {
        #[derive(serde::Deserialize)]
        struct Document {
            keys: Vec<serde_json::Value>,
        }
        let document: Document = serde_json::from_slice(text)
            .map_err(|e| format!("not a JWKS document ({{\"keys\": [...]}}): {e}"))?;
        let mut keys = Vec::new();
        for (i, value) in document.keys.into_iter().enumerate() {
            let jwk: Jwk = match serde_json::from_value(value) {
                Ok(jwk) => jwk,
                Err(err) => {
                    tracing::warn!(key = i, cause = %err, "JWKS: skipping a key that cannot be read");
                    continue;
                }
            };
            let kid = jwk.common.key_id.clone();
            let Some(algorithms) = algorithms(&jwk) else {
                tracing::warn!(key = i, ?kid, "JWKS: skipping a key of a type or algorithm opsd does not verify with (only RSA, EC P-256/P-384 and Ed25519)");
                continue;
            };
            match DecodingKey::from_jwk(&jwk) {
                Ok(key) => keys.push(Key {
                    kid,
                    algorithms,
                    key,
                }),
                Err(err) => {
                    tracing::warn!(key = i, ?kid, cause = %err, "JWKS: skipping a malformed key")
                }
            }
        }
        if keys.is_empty() {
            return Err("the JWKS document has no usable key".into());
        }
        Ok(Self { keys })
    }

    /// The keys a token with `kid` and `alg` may be verified with: `None`
    /// when the set has no key with that `kid`.
    pub(super) fn candidates<'a>(
        &'a self,
        kid: Option<&'a str>,
        alg: Algorithm,
    ) -> Option<impl Iterator<Item = &'a DecodingKey> + 'a> {
        if let Some(kid) = kid {
            if !self.keys.iter().any(|k| k.kid.as_deref() == Some(kid)) {
                return None;
            }
        }
        Some(
            self.keys
                .iter()
                .filter(move |k| kid.is_none() || k.kid.as_deref() == kid)
                .filter(move |k| k.algorithms.contains(&alg))
                .map(|k| &k.key),
        )
    }
}

/// Where the keys come from.
#[derive(Clone, Debug)]
enum Source {
    File(PathBuf),
    Url(http::Uri),
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// The current key set, and how it is refreshed. Shared by every call.
pub(super) struct Keys {
    source: Source,
    /// The current set. A `std::sync::RwLock`: read on every verification
    /// (one `Arc` clone), written only when a fetch succeeds; nothing
    /// awaits under it.
    set: RwLock<Arc<KeySet>>,
    /// Bumped at each successful fetch, so a caller that waited for a
    /// refetch knows whether the set changed meanwhile.
    generation: AtomicU64,
    /// When the last unknown-`kid` refetch started (the rate limit). A
    /// `std::sync::Mutex`: one read or write, nothing awaits under it.
    last_refetch: Mutex<Option<Instant>>,
    /// Serialises fetches, so callers waiting for the same refetch share
    /// it (a `tokio` mutex: it is held across the fetch).
    fetching: tokio::sync::Mutex<()>,
    client: Option<HttpsClient>,
}

impl Keys {
    /// Loads the keys from a file, or fetches them from an `http(s)://` URL.
    pub(super) async fn load(jwks: &str) -> Result<Arc<Self>, String> {
        let source = if jwks.starts_with("https://") || jwks.starts_with("http://") {
            Source::Url(
                jwks.parse()
                    .map_err(|e| format!("--auth-jwks {jwks:?}: not a URL: {e}"))?,
            )
        } else {
            Source::File(PathBuf::from(jwks))
        };
        let client = match &source {
            Source::File(_) => None,
            Source::Url(_) => Some(https_client()?),
        };
        let keys = Self {
            source,
            set: RwLock::new(Arc::new(KeySet::default())),
            generation: AtomicU64::new(0),
            last_refetch: Mutex::new(None),
            fetching: tokio::sync::Mutex::new(()),
            client,
        };
        keys.fetch()
            .await
            .map_err(|e| format!("--auth-jwks {jwks}: {e}"))?;
        Ok(Arc::new(keys))
    }

    /// The current set.
    pub(super) fn current(&self) -> (Arc<KeySet>, u64) {
        let set = self.set.read().unwrap_or_else(|e| e.into_inner()).clone();
        (set, self.generation.load(Ordering::Acquire))
    }

    /// Whether an unknown `kid` may make the set be fetched again now: the
    /// keys come from a URL, and no refetch started within
    /// [`REFETCH_INTERVAL`] (or one is under way, which the caller waits for).
    pub(super) fn may_refetch(&self) -> bool {
        if self.client.is_none() {
            return false;
        }
        let last = *self.last_refetch.lock().unwrap_or_else(|e| e.into_inner());
        self.fetching.try_lock().is_err() || last.is_none_or(|t| t.elapsed() >= REFETCH_INTERVAL)
    }

    /// Fetches the set again for an unknown `kid`, unless another caller
    /// did since `seen` (the generation the caller verified against) or
    /// the rate limit says no. True when the set changed.
    pub(super) async fn refetch(&self, seen: u64) -> bool {
        let _fetching = self.fetching.lock().await;
        if self.generation.load(Ordering::Acquire) != seen {
            return true;
        }
        {
            let mut last = self.last_refetch.lock().unwrap_or_else(|e| e.into_inner());
            if last.is_some_and(|t| t.elapsed() < REFETCH_INTERVAL) {
                return false;
            }
            *last = Some(Instant::now());
        }
        tracing::debug!("a token names an unknown key id; fetching the JWKS again");
        match self.fetch_now().await {
            Ok(_) => true,
            Err(err) => {
                tracing::warn!(cause = %err, "cannot fetch the JWKS");
                false
            }
        }
    }

    /// Fetches (or reads) the set and makes it current; returns how long
    /// the document may be cached (URL only).
    async fn fetch(&self) -> Result<Option<Duration>, String> {
        let _fetching = self.fetching.lock().await;
        self.fetch_now().await
    }

    async fn fetch_now(&self) -> Result<Option<Duration>, String> {
        let (set, max_age) = match (&self.source, &self.client) {
            (Source::File(path), _) => {
                let text = std::fs::read(path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                (KeySet::parse(&text)?, None)
            }
            (Source::Url(uri), Some(client)) => {
                tokio::time::timeout(FETCH_TIMEOUT, get(client, uri))
                    .await
                    .map_err(|_| format!("no answer within {FETCH_TIMEOUT:?}"))??
            }
            (Source::Url(_), None) => return Err("no HTTP client".into()),
        };
        let count = set.keys.len();
        *self.set.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(set);
        self.generation.fetch_add(1, Ordering::AcqRel);
        tracing::info!(keys = count, "JWKS loaded");
        Ok(max_age)
    }

    /// Refreshes a URL's set on its interval until `stop`.
    pub(super) fn refresh_in_background(self: &Arc<Self>, stop: CancellationToken) {
        if self.client.is_none() {
            return;
        }
        let keys = self.clone();
        tokio::spawn(async move {
            let mut interval = DEFAULT_REFRESH;
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(interval) => {}
                }
                interval = match keys.fetch().await {
                    Ok(max_age) => max_age
                        .unwrap_or(DEFAULT_REFRESH)
                        .clamp(MIN_REFRESH, MAX_REFRESH),
                    Err(err) => {
                        tracing::warn!(cause = %err, "cannot refresh the JWKS; keeping the keys it had");
                        MIN_REFRESH
                    }
                };
            }
        });
    }
}

fn https_client() -> Result<HttpsClient, String> {
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(Arc::new(rustls::crypto::ring::default_provider()))
        .map_err(|e| format!("TLS: {e}"))?
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .build();
    Ok(Client::builder(TokioExecutor::new()).build(connector))
}

/// GETs a JWKS document; returns it with its `max-age`.
async fn get(client: &HttpsClient, uri: &http::Uri) -> Result<(KeySet, Option<Duration>), String> {
    let response = client
        .get(uri.clone())
        .await
        .map_err(|e| format!("GET failed: {e}"))?;
    if response.status() != http::StatusCode::OK {
        return Err(format!("GET answered {}", response.status()));
    }
    let max_age = response
        .headers()
        .get(http::header::CACHE_CONTROL)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.split(',')
                .find_map(|d| d.trim().strip_prefix("max-age="))
                .and_then(|s| s.parse::<u64>().ok())
        })
        .map(Duration::from_secs);
    let body = Limited::new(response.into_body(), MAX_JWKS_BYTES)
        .collect()
        .await
        .map_err(|e| format!("cannot read the answer: {e}"))?
        .to_bytes();
    Ok((KeySet::parse(&body)?, max_age))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_asymmetric_keys_are_kept_with_their_algorithms() {
        let set = KeySet::parse(
            br#"{"keys": [
                {"kty": "oct", "kid": "h", "k": "c2VjcmV0"},
                {"kty": "OKP", "kid": "e", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
                {"kty": "RSA", "kid": "r", "alg": "RS256", "n": "sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw", "e": "AQAB"},
                {"kty": "EC", "kid": "p", "crv": "P-521", "x": "AA", "y": "AA"},
                {"kty": "OKP", "kid": "enc", "use": "enc", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
                {"kty": "nonsense"}
            ]}"#,
        )
        .unwrap();
        assert_eq!(set.keys.len(), 2);
        assert!(set.candidates(Some("enc"), Algorithm::EdDSA).is_none());
        assert!(set.candidates(Some("h"), Algorithm::HS256).is_none());
        assert_eq!(
            set.candidates(Some("r"), Algorithm::RS256).unwrap().count(),
            1
        );
        // The RSA key's `alg` narrows it to RS256.
        assert_eq!(
            set.candidates(Some("r"), Algorithm::PS256).unwrap().count(),
            0
        );
        assert_eq!(
            set.candidates(Some("r"), Algorithm::HS256).unwrap().count(),
            0
        );
        assert_eq!(set.candidates(None, Algorithm::EdDSA).unwrap().count(), 1);
        assert!(KeySet::parse(br#"{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}"#).is_err());
        assert!(KeySet::parse(b"[]").is_err());
    }
}
