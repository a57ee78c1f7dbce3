//! Auth with the JWKS at a URL (a loopback server in the test): keys are
//! fetched at start-up, a rotated-in key is fetched when a token names its
//! `kid`, and a flood of tokens with unknown `kid`s does not become a
//! flood of fetches.

mod common;

use std::{
    convert::Infallible,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
};

use bytes::Bytes;
use common::{
    auth::{bearer, claims, jwks, SigningKey, AUDIENCE, ISSUER},
    calls::get,
    TestServer,
};
use http_body_util::Full;
use opsd::{config::AuthSettings, Config};
use tonic::Code;

/// A JWKS endpoint: the document it serves, and how often it was fetched.
#[derive(Clone, Default)]
struct Endpoint {
    document: Arc<Mutex<String>>,
    fetches: Arc<AtomicUsize>,
}

impl Endpoint {
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
        let endpoint = self.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let endpoint = endpoint.clone();
                let service = hyper::service::service_fn(move |_request| {
                    endpoint.fetches.fetch_add(1, Ordering::SeqCst);
                    let body = endpoint.document.lock().unwrap().clone();
                    async move { Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(body)))) }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
                );
            }
        });
        url
    }

    fn serve(&self, document: String) {
        *self.document.lock().unwrap() = document;
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

/// The test configuration with auth on, its keys at `url`.
fn config(url: String) -> Config {
    let mut config = Config::for_tests();
    config.auth = Some(AuthSettings {
        jwks: url,
        issuer: ISSUER.into(),
        audiences: vec![AUDIENCE.into()],
        ..Default::default()
    });
    config
}

#[tokio::test]
async fn rotated_keys_are_fetched_and_unknown_kids_are_rate_limited() {
    let old = SigningKey::ec("old");
    let new = SigningKey::ed25519("new");
    let endpoint = Endpoint::default();
    endpoint.serve(jwks(&[&old]));
    let server = TestServer::start_with(config(endpoint.start().await)).await;
    assert_eq!(endpoint.fetches(), 1, "fetched at start-up");
    let name = server.registry_op("x").await;
    let mut ops = server.operations().await;
    let call = |token: String| bearer(tonic::Request::new(get(&name)), &token);

    ops.get_operation(call(old.sign(&claims("admin"))))
        .await
        .unwrap();
    assert_eq!(endpoint.fetches(), 1);

    // The issuer rotates a key in; the first token that names it makes
    // opsd fetch the set again, and passes.
    endpoint.serve(jwks(&[&old, &new]));
    ops.get_operation(call(new.sign(&claims("admin"))))
        .await
        .unwrap();
    assert_eq!(endpoint.fetches(), 2);

    // Unknown kids right after: refused, without a fetch each.
    for i in 0..50 {
        let stranger = SigningKey::ec(&format!("random-{i}"));
        let refused = ops
            .get_operation(call(stranger.sign(&claims("admin"))))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated);
    }
    assert!(endpoint.fetches() <= 3, "{} fetches", endpoint.fetches());
    // Keys already known still pass.
    ops.get_operation(call(new.sign(&claims("admin"))))
        .await
        .unwrap();
    ops.get_operation(call(old.sign(&claims("admin"))))
        .await
        .unwrap();
    server.stop().await;
}

#[tokio::test]
async fn a_jwks_url_that_cannot_be_read_stops_start_up() {
    let endpoint = Endpoint::default();
    endpoint.serve("not json".into());
    let err = opsd::Server::new(config(endpoint.start().await))
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("JWKS"), "{err}");
}
