//! Authentication (who is calling) for the server's call layer, and the
//! policy (`policy`) that `Observed` checks each call against.
//!
//! Off by default (a sidecar on loopback). With `--auth-jwks`, every
//! request except health, `/healthz`, the operator page's files, CORS
//! preflights and (with `--auth-open-reflection`) reflection needs
//! credentials: an `authorization: Bearer` JWT (gRPC metadata and HTTP
//! headers are the same header map), or, on a TLS port with
//! `--tls-client-ca`, a verified client certificate, whose SANs stand as
//! the subject. The call layer (`calls.rs`) runs [`Auth::authenticate`]
//! before load shedding, so a flood without credentials is refused
//! cheaply, and puts the [`Principal`] in the request's extensions; the
//! REST transcoder carries them into the gRPC request it builds, and
//! `Observed` decides per method and name.
//!
//! A token must be signed by a key of the JWKS whose type allows the
//! token's `alg` (`keys`), name the issuer and one of the audiences, carry
//! `exp`, and pass `exp`, `nbf` and `iat` with 60 s of leeway; it must then
//! hold the policy's required scope as a whole word of its `scope` claim or
//! an entry of its `scp` array (a certificate carries no scopes: its
//! principal has none to check). Failures are UNAUTHENTICATED with a
//! stable reason only ([`AuthFailure`]); the missing scope is
//! PERMISSION_DENIED `ACCESS_TOKEN_SCOPE_INSUFFICIENT`. Verified tokens are
//! cached by their SHA-256 until their `exp` (at most [`CACHE_SIZE`]), so a
//! client that reuses its token pays one signature check, not one per call.

mod keys;
pub mod policy;

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use http::Request;
use jsonwebtoken::{errors::ErrorKind, Algorithm, Validation};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

pub use self::policy::{Permission, Policy, Principal};
use super::{metrics, tls::PeerIdentity, ui};
use crate::{
    config::AuthSettings,
    error::{AuthFailure, Error, SCOPE_INSUFFICIENT},
};

/// Verified tokens kept at most.
pub const CACHE_SIZE: usize = 10_000;
/// The leeway of `exp`, `nbf` and `iat`, in seconds.
const LEEWAY: u64 = 60;

/// The claims opsd reads.
#[derive(Debug, Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    scp: Option<Scopes>,
    exp: f64,
    #[serde(default)]
    iat: Option<f64>,
}

/// `scp`: an array of scopes (or, from some issuers, one string).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Scopes {
    Many(Vec<String>),
    One(String),
}

impl Claims {
    /// Whether `required` is one of the token's scopes, as a whole word.
    fn has_scope(&self, required: &str) -> bool {
        let spaced = |s: &str| s.split(' ').any(|word| word == required);
        self.scope.as_deref().is_some_and(spaced)
            || match &self.scp {
                Some(Scopes::Many(all)) => all.iter().any(|s| s == required),
                Some(Scopes::One(s)) => spaced(s),
                None => false,
            }
    }
}

/// A verified token, as cached.
#[derive(Debug)]
struct Verified {
    principal: Principal,
    /// Its `exp`, in seconds since the epoch.
    exp: u64,
    /// It holds the required scope.
    scoped: bool,
}

/// Why a token was refused, for the log (the client sees the reason only).
#[derive(Debug)]
enum Refusal {
    Failed(AuthFailure, String),
    /// Its `kid` is not in the key set of this generation.
    UnknownKid(u64),
}

fn invalid(cause: impl Into<String>) -> Refusal {
    Refusal::Failed(AuthFailure::Invalid, cause.into())
}

/// What the call layer does with a request.
pub enum Authn {
    /// It needs no credentials (health, the operator page's files, ...).
    Exempt,
    /// It runs as this principal.
    Principal(Principal),
    /// It is refused with this error.
    Refused(Error),
    /// Its token names a key the set does not have: the set is being
    /// fetched again, then the token is verified once more.
    Later(Pin<Box<dyn Future<Output = Result<Principal, Error>> + Send>>),
}

/// The server's authentication: the keys, the claims it requires, the
/// policy, and the cache of verified tokens. Shared by every connection.
pub struct Auth {
    keys: Arc<keys::Keys>,
    issuer: String,
    audiences: Vec<String>,
    pub policy: Policy,
    open_reflection: bool,
    /// Verified tokens by the SHA-256 of their text; quick_cache bounds it
    /// (CLOCK-Pro eviction) and locks it in shards internally.
    cache: quick_cache::sync::Cache<[u8; 32], Arc<Verified>>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

impl Auth {
    /// Loads the keys and the policy; a JWKS URL is refreshed until `stop`.
    pub async fn new(settings: &AuthSettings, stop: CancellationToken) -> Result<Self, String> {
        let policy = match &settings.policy {
            Some(path) => Policy::load(path)?,
            None => Policy::default(),
        };
        let keys = keys::Keys::load(&settings.jwks).await?;
        keys.refresh_in_background(stop);
        Ok(Self {
            keys,
            issuer: settings.issuer.clone(),
            audiences: settings.audiences.clone(),
            policy,
            open_reflection: settings.open_reflection,
            cache: quick_cache::sync::Cache::new(CACHE_SIZE),
        })
    }

    /// Whether a request needs no credentials: gRPC health, reflection with
    /// `--auth-open-reflection`, `/healthz`, the operator page's files (its
    /// calls carry the token pasted into it), CORS preflights.
    fn exempt<B>(&self, request: &Request<B>, grpc: bool) -> bool {
        let path = request.uri().path();
        if grpc {
            return path.starts_with("/grpc.health.v1.Health/")
                || (self.open_reflection && path.starts_with("/grpc.reflection."));
        }
        let method = request.method();
        let read = method == http::Method::GET || method == http::Method::HEAD;
        (read && (path == "/healthz" || ui::is_ui_path(path)))
            || (method == http::Method::OPTIONS
                && request
                    .headers()
                    .contains_key(http::header::ACCESS_CONTROL_REQUEST_METHOD))
    }

    /// Authenticates one request (see the module docs), gRPC or HTTP.
    /// `peer` is the connection's verified client certificate, if any.
    pub fn authenticate<B>(
        self: &Arc<Self>,
        request: &Request<B>,
        grpc: bool,
        peer: Option<&PeerIdentity>,
    ) -> Authn {
        if self.exempt(request, grpc) {
            return Authn::Exempt;
        }
        let token = match bearer(request.headers()) {
            Ok(Some(token)) => token,
            Ok(None) => {
                if let Some(peer) = peer {
                    let principal = self.policy.principal(peer.sans.iter().map(String::as_str));
                    tracing::debug!(
                        subject = &*principal.subject,
                        "authenticated by client certificate"
                    );
                    return Authn::Principal(principal);
                }
                return Authn::Refused(self.refusal(Refusal::Failed(
                    AuthFailure::Missing,
                    "no authorization header".into(),
                )));
            }
            Err(refusal) => return Authn::Refused(self.refusal(refusal)),
        };
        match self.verify(token) {
            Ok(verified) => self.admit(&verified),
            Err(Refusal::UnknownKid(seen)) if self.keys.may_refetch() => {
                let auth = self.clone();
                let token = token.to_owned();
                Authn::Later(Box::pin(async move {
                    if !auth.keys.refetch(seen).await {
                        return Err(auth.refusal(invalid("unknown key id")));
                    }
                    match auth.verify(&token) {
                        Ok(verified) => match auth.admit(&verified) {
                            Authn::Principal(principal) => Ok(principal),
                            Authn::Refused(error) => Err(error),
                            _ => Err(auth.refusal(invalid("unknown key id"))),
                        },
                        Err(Refusal::UnknownKid(_)) => Err(auth.refusal(invalid("unknown key id"))),
                        Err(refusal) => Err(auth.refusal(refusal)),
                    }
                }))
            }
            Err(Refusal::UnknownKid(_)) => Authn::Refused(self.refusal(invalid(
                "unknown key id (the JWKS was fetched again too recently)",
            ))),
            Err(refusal) => Authn::Refused(self.refusal(refusal)),
        }
    }

    /// The principal of a verified token, or the missing scope.
    fn admit(&self, verified: &Verified) -> Authn {
        if !verified.scoped {
            tracing::debug!(
                subject = &*verified.principal.subject,
                "token without the required scope"
            );
            metrics::auth_denied(SCOPE_INSUFFICIENT);
            return Authn::Refused(Error::PermissionDenied {
                reason: SCOPE_INSUFFICIENT,
                message: "Request had insufficient authentication scopes.".into(),
                scope: Some(self.policy.required_scope.clone()),
            });
        }
        Authn::Principal(verified.principal.clone())
    }

    /// Logs and counts a refusal; the error the client gets.
    fn refusal(&self, refusal: Refusal) -> Error {
        let (reason, cause) = match refusal {
            Refusal::Failed(reason, cause) => (reason, cause),
            Refusal::UnknownKid(_) => (AuthFailure::Invalid, "unknown key id".into()),
        };
        tracing::debug!(reason = reason.reason(), cause, "credentials refused");
        metrics::auth_denied(reason.reason());
        Error::Unauthenticated { reason }
    }

    /// Verifies a token, through the cache.
    fn verify(&self, token: &str) -> Result<Arc<Verified>, Refusal> {
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(verified) = self.cache.get(&hash) {
            if now_secs() <= verified.exp.saturating_add(LEEWAY) {
                return Ok(verified);
            }
            self.cache.remove(&hash);
            return Err(Refusal::Failed(AuthFailure::Expired, "expired".into()));
        }
        let verified = Arc::new(self.verify_uncached(token)?);
        self.cache.insert(hash, verified.clone());
        Ok(verified)
    }

    fn verify_uncached(&self, token: &str) -> Result<Verified, Refusal> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| invalid(format!("not a JWT: {e}")))?;
        let (set, generation) = self.keys.current();
        let candidates = set
            .candidates(header.kid.as_deref(), header.alg)
            .ok_or(Refusal::UnknownKid(generation))?;
        let validation = self.validation(header.alg);
        let mut last = invalid(format!("no key of the JWKS verifies {:?}", header.alg));
        let mut claims = None;
        for key in candidates {
            match jsonwebtoken::decode::<Claims>(token, key, &validation) {
                Ok(data) => {
                    claims = Some(data.claims);
                    break;
                }
                Err(err) => {
                    last = match err.kind() {
                        ErrorKind::ExpiredSignature => {
                            Refusal::Failed(AuthFailure::Expired, "expired".into())
                        }
                        other => invalid(format!("{other:?}")),
                    };
                    if !matches!(err.kind(), ErrorKind::InvalidSignature) {
                        break;
                    }
                }
            }
        }
        let claims = claims.ok_or(last)?;
        let now = now_secs() as f64;
        if claims.iat.is_some_and(|iat| iat > now + LEEWAY as f64) {
            return Err(invalid("issued in the future"));
        }
        let identities: Vec<&str> = [claims.sub.as_deref(), claims.email.as_deref()]
            .into_iter()
            .flatten()
            .filter(|s| !s.is_empty())
            .collect();
        if identities.is_empty() {
            return Err(invalid("neither sub nor email"));
        }
        let principal = self.policy.principal(identities);
        Ok(Verified {
            principal,
            exp: claims.exp.max(0.0) as u64,
            scoped: claims.has_scope(&self.policy.required_scope),
        })
    }

    fn validation(&self, alg: Algorithm) -> Validation {
        let mut validation = Validation::new(alg);
        validation.leeway = LEEWAY;
        validation.validate_nbf = true;
        validation.validate_exp = true;
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&self.audiences);
        validation
    }
}

/// The token of an `authorization: Bearer …` header: `Ok(None)` without
/// one, an error for another scheme or an unreadable value.
fn bearer(headers: &http::HeaderMap) -> Result<Option<&str>, Refusal> {
    let Some(value) = headers.get(http::header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| invalid("the authorization header is not ASCII"))?;
    let (scheme, token) = value
        .split_once(' ')
        .ok_or_else(|| invalid("the authorization header is not `Bearer TOKEN`"))?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(invalid("the authorization header is not `Bearer TOKEN`"));
    }
    Ok(Some(token.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(json: &str) -> Claims {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn scopes_match_whole_words_only() {
        let scope = policy::DEFAULT_SCOPE;
        assert!(
            claims(&format!(r#"{{"exp": 1, "scope": "openid {scope} email"}}"#)).has_scope(scope)
        );
        assert!(claims(&format!(r#"{{"exp": 1, "scp": ["a", "{scope}"]}}"#)).has_scope(scope));
        assert!(claims(&format!(r#"{{"exp": 1, "scp": "{scope}"}}"#)).has_scope(scope));
        for near in [
            format!("{scope}X"),
            format!("{scope}.read-only"),
            "https://www.googleapis.com/auth/cloud".to_owned(),
            String::new(),
        ] {
            assert!(
                !claims(&format!(r#"{{"exp": 1, "scope": "{near}"}}"#)).has_scope(scope),
                "{near}"
            );
            assert!(
                !claims(&format!(r#"{{"exp": 1, "scp": ["{near}"]}}"#)).has_scope(scope),
                "{near}"
            );
        }
        assert!(!claims(r#"{"exp": 1}"#).has_scope(scope));
    }

    #[test]
    fn bearer_headers() {
        let mut headers = http::HeaderMap::new();
        assert!(matches!(bearer(&headers), Ok(None)));
        headers.insert("authorization", "Bearer abc".parse().unwrap());
        assert_eq!(bearer(&headers).ok().flatten(), Some("abc"));
        headers.insert("authorization", "bearer  abc ".parse().unwrap());
        assert_eq!(bearer(&headers).ok().flatten(), Some("abc"));
        for bad in ["Basic abc", "Bearer", "Bearer ", "abc"] {
            headers.insert("authorization", bad.parse().unwrap());
            assert!(bearer(&headers).is_err(), "{bad}");
        }
    }
}
