//! Auth: which bearer tokens pass, over gRPC and REST alike. Every refusal
//! is UNAUTHENTICATED (REST 401 with `WWW-Authenticate: Bearer
//! error="invalid_token"`) with a stable reason and no more; a valid token
//! without the scope is PERMISSION_DENIED ACCESS_TOKEN_SCOPE_INSUFFICIENT
//! (REST 403, `error="insufficient_scope"`). Health stays open; reflection
//! and `/metrics` on the main port need a token.

mod common;

use common::{
    auth::{self, bearer, claims, now, unsigned, Dir, SigningKey, POLICY, SCOPE},
    reason, TestServer,
};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use opsd::pb::google::longrunning::{operations_client::OperationsClient, GetOperationRequest};
use serde_json::{json, Value};
use tonic::Code;

const NAME: &str = "projects/a/operations/x";

struct Fixture {
    server: TestServer,
    rsa: SigningKey,
    ec: SigningKey,
    ed: SigningKey,
    _dir: Dir,
}

async fn start() -> Fixture {
    let dir = Dir::new("auth-tokens");
    let (rsa, ec, ed) = (
        SigningKey::rsa("rsa-1"),
        SigningKey::ec("ec-1"),
        SigningKey::ed25519("ed-1"),
    );
    let config = auth::config(&dir, &[&rsa, &ec, &ed], Some(POLICY));
    let server = TestServer::start_with(config).await;
    server
        .registry
        .create(opsd::registry::CreateParams {
            parent: "projects/a".into(),
            operation_id: "x".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    Fixture {
        server,
        rsa,
        ec,
        ed,
        _dir: dir,
    }
}

/// GetOperation over gRPC: `Ok`, or the code and the ErrorInfo reason.
async fn grpc(server: &TestServer, token: Option<&str>) -> Result<(), (Code, String)> {
    let mut client = OperationsClient::new(server.channel().await);
    let mut request = tonic::Request::new(GetOperationRequest { name: NAME.into() });
    if let Some(token) = token {
        request = bearer(request, token);
    }
    client
        .get_operation(request)
        .await
        .map(|_| ())
        .map_err(|status| (status.code(), reason(&status)))
}

/// GetOperation over REST: the status, the `WWW-Authenticate` header and
/// the ErrorInfo reason.
async fn rest(server: &TestServer, token: Option<&str>) -> (u16, String, String) {
    let mut request = reqwest::Client::new().get(format!("{}/v1/{NAME}", server.url));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let challenge = response
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body: Value = response.json().await.unwrap();
    let reason = body["error"]["details"][0]["reason"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    (status, challenge, reason)
}

/// Both transports refuse `token` as UNAUTHENTICATED with `why`.
async fn refused(server: &TestServer, token: Option<&str>, why: &str) {
    assert_eq!(
        grpc(server, token).await,
        Err((Code::Unauthenticated, why.to_owned())),
        "{token:?}"
    );
    let (status, challenge, reason) = rest(server, token).await;
    assert_eq!((status, reason.as_str()), (401, why), "{token:?}");
    assert!(
        challenge.contains(r#"error="invalid_token""#),
        "{challenge}"
    );
}

/// Both transports answer `token` as a token without the scope.
async fn unscoped(server: &TestServer, token: &str) {
    assert_eq!(
        grpc(server, Some(token)).await,
        Err((
            Code::PermissionDenied,
            "ACCESS_TOKEN_SCOPE_INSUFFICIENT".to_owned()
        ))
    );
    let (status, challenge, reason) = rest(server, Some(token)).await;
    assert_eq!(
        (status, reason.as_str()),
        (403, "ACCESS_TOKEN_SCOPE_INSUFFICIENT")
    );
    assert!(
        challenge.contains(r#"error="insufficient_scope""#),
        "{challenge}"
    );
    assert!(challenge.contains(SCOPE), "{challenge}");
}

async fn accepted(server: &TestServer, token: &str) {
    assert_eq!(grpc(server, Some(token)).await, Ok(()));
    assert_eq!(rest(server, Some(token)).await.0, 200);
}

fn with(sub: &str, change: impl FnOnce(&mut serde_json::Map<String, Value>)) -> Value {
    let mut claims = claims(sub);
    change(claims.as_object_mut().unwrap());
    claims
}

#[tokio::test]
async fn valid_tokens_of_each_key_type_pass() {
    let f = start().await;
    for key in [&f.rsa, &f.ec, &f.ed] {
        accepted(&f.server, &key.sign(&claims("alice@example.com"))).await;
    }
    // The `scp` array form, and `email` standing for the subject.
    let scp = with("nobody", |c| {
        c.remove("scope");
        c.insert("scp".into(), json!(["openid", SCOPE]));
        c.insert("email".into(), json!("alice@example.com"));
    });
    accepted(&f.server, &f.ec.sign(&scp)).await;
    // Expired 30 s ago: within the 60 s leeway.
    let late = with("alice@example.com", |c| {
        c.insert("exp".into(), json!(now() - 30));
    });
    accepted(&f.server, &f.rsa.sign(&late)).await;
    // The same token again comes from the cache.
    let token = f.rsa.sign(&claims("alice@example.com"));
    accepted(&f.server, &token).await;
    accepted(&f.server, &token).await;
    f.server.stop().await;
}

#[tokio::test]
async fn missing_and_malformed_credentials_are_unauthenticated() {
    let f = start().await;
    refused(&f.server, None, "CREDENTIALS_MISSING").await;
    refused(&f.server, Some("not-a-jwt"), "ACCESS_TOKEN_INVALID").await;
    refused(&f.server, Some("a.b.c"), "ACCESS_TOKEN_INVALID").await;
    // Another scheme.
    let response = reqwest::Client::new()
        .get(format!("{}/v1/{NAME}", f.server.url))
        .basic_auth("alice", Some("secret"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    f.server.stop().await;
}

#[tokio::test]
async fn forged_tokens_are_unauthenticated() {
    let f = start().await;
    let alice = claims("alice@example.com");
    // Signed by a key that is not the one its kid names.
    let stranger = SigningKey::ec("ec-1");
    refused(
        &f.server,
        Some(&stranger.sign(&alice)),
        "ACCESS_TOKEN_INVALID",
    )
    .await;
    // A signature from another token.
    let good = f.ed.sign(&alice);
    let other = f.ed.sign(&claims("admin"));
    let spliced = format!(
        "{}.{}",
        other.rsplit_once('.').unwrap().0,
        good.rsplit_once('.').unwrap().1
    );
    refused(&f.server, Some(&spliced), "ACCESS_TOKEN_INVALID").await;
    // alg: none.
    refused(&f.server, Some(&unsigned(&alice)), "ACCESS_TOKEN_INVALID").await;
    // HS256 with the RSA public key as the secret (the classic confusion).
    let public = serde_json::to_vec(&f.rsa.jwk).unwrap();
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("rsa-1".into());
    let confused =
        jsonwebtoken::encode(&header, &alice, &EncodingKey::from_secret(&public).unwrap()).unwrap();
    refused(&f.server, Some(&confused), "ACCESS_TOKEN_INVALID").await;
    // An algorithm the key's type does not allow (an RSA key for ES256).
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("rsa-1".into());
    let mismatched = jsonwebtoken::encode(&header, &alice, &f.ec.key).unwrap();
    refused(&f.server, Some(&mismatched), "ACCESS_TOKEN_INVALID").await;
    // A kid the JWKS (a file: never fetched again) does not have.
    let unknown = SigningKey::ec("ec-2");
    refused(
        &f.server,
        Some(&unknown.sign(&alice)),
        "ACCESS_TOKEN_INVALID",
    )
    .await;
    f.server.stop().await;
}

#[tokio::test]
async fn claims_that_do_not_hold_are_unauthenticated() {
    let f = start().await;
    let expired = with("alice@example.com", |c| {
        c.insert("exp".into(), json!(now() - 3600));
        c.insert("iat".into(), json!(now() - 7200));
    });
    refused(
        &f.server,
        Some(&f.rsa.sign(&expired)),
        "ACCESS_TOKEN_EXPIRED",
    )
    .await;
    for (what, claims) in [
        (
            "not yet valid",
            with("alice@example.com", |c| {
                c.insert("nbf".into(), json!(now() + 3600));
            }),
        ),
        (
            "issued in the future",
            with("alice@example.com", |c| {
                c.insert("iat".into(), json!(now() + 3600));
            }),
        ),
        (
            "wrong issuer",
            with("alice@example.com", |c| {
                c.insert("iss".into(), json!("https://elsewhere.test"));
            }),
        ),
        (
            "no issuer",
            with("alice@example.com", |c| {
                c.remove("iss");
            }),
        ),
        (
            "wrong audience",
            with("alice@example.com", |c| {
                c.insert("aud".into(), json!(["someone-else"]));
            }),
        ),
        (
            "no expiry",
            with("alice@example.com", |c| {
                c.remove("exp");
            }),
        ),
        (
            "no subject",
            with("alice@example.com", |c| {
                c.remove("sub");
            }),
        ),
    ] {
        let token = f.ec.sign(&claims);
        assert_eq!(
            grpc(&f.server, Some(&token)).await,
            Err((Code::Unauthenticated, "ACCESS_TOKEN_INVALID".into())),
            "{what}"
        );
        assert_eq!(rest(&f.server, Some(&token)).await.0, 401, "{what}");
    }
    f.server.stop().await;
}

#[tokio::test]
async fn the_scope_must_be_held_as_a_whole_word() {
    let f = start().await;
    let scoped = |scope: Value| {
        f.rsa.sign(&with("alice@example.com", |c| {
            c.insert("scope".into(), scope);
        }))
    };
    unscoped(&f.server, &scoped(json!("openid email"))).await;
    unscoped(&f.server, &scoped(json!(format!("{SCOPE}X")))).await;
    unscoped(&f.server, &scoped(json!(format!("{SCOPE}.read-only")))).await;
    unscoped(
        &f.server,
        &scoped(json!(SCOPE.trim_end_matches("-platform"))),
    )
    .await;
    let scp = f.rsa.sign(&with("alice@example.com", |c| {
        c.remove("scope");
        c.insert("scp".into(), json!([format!("{SCOPE}.read-only")]));
    }));
    unscoped(&f.server, &scp).await;
    accepted(&f.server, &scoped(json!(format!("openid {SCOPE}")))).await;
    f.server.stop().await;
}

#[tokio::test]
async fn health_stays_open_and_the_rest_needs_a_token() {
    let f = start().await;
    let http = reqwest::Client::new();
    let health = http
        .get(format!("{}/healthz", f.server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let mut grpc_health =
        tonic_health::pb::health_client::HealthClient::new(f.server.channel().await);
    grpc_health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap();
    // The operator page's files are open; its calls carry the token.
    let page = http
        .get(format!("{}/ui/", f.server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    // A CORS preflight carries no credentials.
    let preflight = http
        .request(
            reqwest::Method::OPTIONS,
            format!("{}/v1/{NAME}", f.server.url),
        )
        .header("origin", "https://console.test")
        .header("access-control-request-method", "GET")
        .send()
        .await
        .unwrap();
    assert_ne!(preflight.status(), 401);
    // /metrics on the main port needs a token.
    let metrics = http
        .get(format!("{}/metrics", f.server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(metrics.status(), 401);
    // Reflection too.
    let mut reflection =
        tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(
            f.server.channel().await,
        );
    let request = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            ),
        ),
    };
    let refused = reflection
        .server_reflection_info(tokio_stream::iter([request.clone()]))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    let token = f.rsa.sign(&claims("alice@example.com"));
    let allowed = reflection
        .server_reflection_info(bearer(
            tonic::Request::new(tokio_stream::iter([request])),
            &token,
        ))
        .await;
    assert!(allowed.is_ok());
    // Denials are counted by reason.
    let text = http
        .get(format!("{}/metrics", f.server.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains(r#"opsd_auth_denials_total{reason="CREDENTIALS_MISSING"}"#),
        "{text}"
    );
    f.server.stop().await;
}

#[tokio::test]
async fn open_reflection_and_metrics_on_their_own_listener_need_no_token() {
    let dir = Dir::new("auth-open");
    let key = SigningKey::ec("k");
    let mut config = auth::config(&dir, &[&key], Some(POLICY));
    if let Some(auth) = config.auth.as_mut() {
        auth.open_reflection = true;
    }
    config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let server = opsd::Server::new(config).await.unwrap();
    let metrics = server.metrics_address().unwrap();
    let server = TestServer::serve(server).await;
    let mut reflection =
        tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient::new(
            server.channel().await,
        );
    let request = tonic_reflection::pb::v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            ),
        ),
    };
    let mut answers = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    assert!(answers.message().await.unwrap().is_some());
    // The services themselves still need a token.
    assert_eq!(
        grpc(&server, None).await,
        Err((Code::Unauthenticated, "CREDENTIALS_MISSING".into()))
    );
    // /metrics answers on its own listener, and not on the main port.
    let text = reqwest::get(format!("http://{metrics}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("opsd_auth_denials_total"), "{text}");
    let main = reqwest::Client::new()
        .get(format!("{}/metrics", server.url))
        .bearer_auth(key.sign(&claims("admin")))
        .send()
        .await
        .unwrap();
    assert_eq!(main.status(), 404);
    let other = reqwest::get(format!("http://{metrics}/v1/operations"))
        .await
        .unwrap();
    assert_eq!(other.status(), 404);
    server.stop().await;
}

#[tokio::test]
async fn pages_of_an_allowed_origin_can_read_why_they_were_refused() {
    let dir = Dir::new("auth-cors");
    let key = SigningKey::rsa("rsa-1");
    let mut config = auth::config(&dir, &[&key], Some(POLICY));
    config.cors_allow_origins = vec!["https://console.test".into()];
    let server = TestServer::start_with(config).await;
    let http = reqwest::Client::new();
    let preflight = http
        .request(
            reqwest::Method::OPTIONS,
            format!("{}/v1/{NAME}", server.url),
        )
        .header("origin", "https://console.test")
        .header("access-control-request-method", "GET")
        .header("access-control-request-headers", "authorization")
        .send()
        .await
        .unwrap();
    assert!(preflight.status().is_success(), "{}", preflight.status());
    assert_eq!(
        preflight.headers()["access-control-allow-origin"],
        "https://console.test"
    );
    // Refused before routing, the 401 still carries the origin back.
    let refused = http
        .get(format!("{}/v1/{NAME}", server.url))
        .header("origin", "https://console.test")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    assert_eq!(
        refused.headers()["access-control-allow-origin"],
        "https://console.test"
    );
    let other = http
        .get(format!("{}/v1/{NAME}", server.url))
        .header("origin", "https://evil.test")
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 401);
    assert!(other.headers().get("access-control-allow-origin").is_none());
    server.stop().await;
}
