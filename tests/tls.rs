//! TLS on the one port (`--tls-cert`, `--tls-key`): gRPC (tonic) and REST
//! (reqwest, HTTP/1.1 and h2 by ALPN) with real TLS clients; the
//! certificate reloaded on SIGHUP while connections stay open; the TLS
//! handshake inside the handshake deadline; mTLS (`--tls-client-ca`), where
//! a client certificate's SAN stands as the subject for the policy.

mod common;

use std::{sync::Arc, time::Duration};

use common::{
    auth::{self, Dir, SigningKey},
    calls::get,
    op, TestServer,
};
use opsd::{
    config::TlsSettings, pb::google::longrunning::operations_client::OperationsClient, Config,
};
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SanType,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::{
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
    Code,
};

const HOST: &str = "opsd.test";

/// A CA and the certificates it signs, as PEM.
struct Pki {
    ca_pem: String,
    ca_params: CertificateParams,
    ca_key: KeyPair,
}

impl Pki {
    fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate().unwrap();
        let ca_pem = params.self_signed(&ca_key).unwrap().pem();
        Self {
            ca_pem,
            ca_params: params,
            ca_key,
        }
    }

    /// A certificate for `sans` and its key, as PEM.
    fn issue(&self, sans: Vec<SanType>, purpose: ExtendedKeyUsagePurpose) -> (String, String) {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![purpose];
        let key = KeyPair::generate().unwrap();
        let issuer = Issuer::from_params(&self.ca_params, &self.ca_key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn server_cert(&self) -> (String, String) {
        self.issue(
            vec![SanType::DnsName(HOST.try_into().unwrap())],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    fn client_cert(&self, uri: &str) -> (String, String) {
        self.issue(
            vec![SanType::URI(uri.try_into().unwrap())],
            ExtendedKeyUsagePurpose::ClientAuth,
        )
    }
}

/// Writes the server's certificate, key and the CA into `dir`.
fn tls_config(config: &mut Config, dir: &Dir, pki: &Pki, mtls: bool) {
    let (cert, key) = pki.server_cert();
    config.tls = Some(TlsSettings {
        cert: dir.write("cert.pem", &cert),
        key: dir.write("key.pem", &key),
        client_ca: mtls.then(|| dir.write("ca.pem", &pki.ca_pem)),
    });
}

fn https(server: &TestServer) -> String {
    format!(
        "https://{HOST}:{}",
        server.address().rsplit_once(':').unwrap().1
    )
}

async fn grpc_channel(
    server: &TestServer,
    pki: &Pki,
    identity: Option<(String, String)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca_pem))
        .domain_name(HOST);
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Channel::from_shared(format!("https://{}", server.address()))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await
}

fn rest_client(
    server: &TestServer,
    pki: &Pki,
    identity: Option<(String, String)>,
) -> reqwest::Client {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).unwrap())
        .resolve(HOST, server.address().parse().unwrap());
    if let Some((cert, key)) = identity {
        builder = builder
            .identity(reqwest::Identity::from_pem(format!("{cert}{key}").as_bytes()).unwrap());
    }
    builder.build().unwrap()
}

/// The certificate a fresh TLS handshake sees.
async fn served_certificate(server: &TestServer, pki: &Pki) -> Vec<u8> {
    let mut roots = rustls::RootCertStore::empty();
    let ca = rustls::pki_types::CertificateDer::from(pem_der(&pki.ca_pem));
    roots.add(ca).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(server.address())
        .await
        .unwrap();
    let tls = connector
        .connect(HOST.try_into().unwrap(), tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn pem_der(pem: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

/// A TLS server without auth (`mtls`: client certificates of the PKI
/// required) with a running operation: the server, its PKI, its files and
/// the operation's name.
async fn start_tls(test: &str, mtls: bool) -> (TestServer, Pki, Dir, String) {
    let dir = Dir::new(test);
    let pki = Pki::new();
    let mut config = Config::for_tests();
    tls_config(&mut config, &dir, &pki, mtls);
    let server = TestServer::start_with(config).await;
    let name = server.registry_op("x").await;
    (server, pki, dir, name)
}

/// GetOperation over a fresh TLS channel with `identity`: a handshake
/// refused is an error too.
async fn get_with(
    server: &TestServer,
    pki: &Pki,
    identity: Option<(String, String)>,
    name: &str,
) -> Result<(), tonic::Status> {
    let channel = grpc_channel(server, pki, identity)
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    OperationsClient::new(channel)
        .get_operation(get(name))
        .await
        .map(drop)
}

#[tokio::test]
async fn grpc_and_rest_are_served_over_tls_on_one_port() {
    let (server, pki, _dir, name) = start_tls("tls", false).await;

    let mut ops = OperationsClient::new(grpc_channel(&server, &pki, None).await.unwrap());
    assert_eq!(
        ops.get_operation(get(&name))
            .await
            .unwrap()
            .into_inner()
            .name,
        name
    );

    for http2 in [false, true] {
        let client = rest_client(&server, &pki, None);
        let mut request = client.get(format!("{}/v1/{name}", https(&server)));
        request = if http2 {
            request.version(http::Version::HTTP_2)
        } else {
            request.version(http::Version::HTTP_11)
        };
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200);
        let expected = if http2 {
            http::Version::HTTP_2
        } else {
            http::Version::HTTP_11
        };
        // reqwest offers both by ALPN; the server picks h2 when offered.
        if http2 {
            assert_eq!(response.version(), expected);
        }
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["name"], name);
    }
    let http1 = reqwest::Client::builder()
        .use_rustls_tls()
        .http1_only()
        .add_root_certificate(reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).unwrap())
        .resolve(HOST, server.address().parse().unwrap())
        .build()
        .unwrap();
    let response = http1
        .get(format!("{}/healthz", https(&server)))
        .send()
        .await
        .unwrap();
    assert_eq!(
        (response.status().as_u16(), response.version()),
        (200, http::Version::HTTP_11)
    );

    // A plain-text client gets no answer it can read.
    let plain = reqwest::get(format!("http://{}/healthz", server.address())).await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success());
    server.stop().await;
}

#[tokio::test]
async fn sighup_reloads_the_certificate_without_dropping_connections() {
    // opsd's SIGHUP handler may not be installed yet when the first signal
    // goes: this one keeps the default action (exit) away.
    let mut _ours = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).unwrap();
    let (server, pki, dir, name) = start_tls("tls-reload", false).await;
    let mut ops = OperationsClient::new(grpc_channel(&server, &pki, None).await.unwrap());
    ops.get_operation(get(&name)).await.unwrap();
    let before = served_certificate(&server, &pki).await;

    let (cert, key) = pki.server_cert();
    dir.write("cert.pem", &cert);
    dir.write("key.pem", &key);
    let fresh = pem_der(&cert);
    let mut reloaded = false;
    for _ in 0..100 {
        std::process::Command::new("kill")
            .args(["-HUP", &std::process::id().to_string()])
            .status()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        if served_certificate(&server, &pki).await == fresh {
            reloaded = true;
            break;
        }
    }
    assert!(reloaded, "the new certificate is served after SIGHUP");
    assert_ne!(before, fresh);
    // The connection opened before the reload still works.
    ops.get_operation(get(&name)).await.unwrap();

    // A reload that fails (a key that does not match) keeps the current one.
    dir.write("key.pem", &KeyPair::generate().unwrap().serialize_pem());
    std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(served_certificate(&server, &pki).await, fresh);
    server.stop().await;
}

#[tokio::test]
async fn a_silent_tls_client_is_closed_at_the_handshake_deadline() {
    let dir = Dir::new("tls-deadline");
    let pki = Pki::new();
    let mut config = Config::for_tests();
    config.limits.header_read_timeout = Duration::from_millis(300);
    tls_config(&mut config, &dir, &pki, false);
    let server = TestServer::start_with(config).await;
    let mut silent = tokio::net::TcpStream::connect(server.address())
        .await
        .unwrap();
    let mut buffer = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buffer))
        .await
        .expect("closed within the deadline");
    assert!(matches!(read, Ok(0) | Err(_)));
    // Garbage instead of a ClientHello: closed at once.
    let mut garbage = tokio::net::TcpStream::connect(server.address())
        .await
        .unwrap();
    garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), garbage.read_to_end(&mut answer)).await;
    assert!(!String::from_utf8_lossy(&answer).contains("HTTP/1.1 200"));
    server.stop().await;
}

const POLICY: &str = r#"
principals:
  - subject: spiffe://opsd.test/worker-a
    grants:
      - names: ["projects/a/**"]
        permissions: ["workers.*", "operations.get"]
"#;

#[tokio::test]
async fn client_certificates_stand_as_the_subject_with_auth() {
    let dir = Dir::new("mtls-auth");
    let pki = Pki::new();
    let key = SigningKey::ec("k");
    let mut config = auth::config(&dir, &[&key], Some(POLICY));
    tls_config(&mut config, &dir, &pki, true);
    let server = TestServer::start_with(config).await;

    let worker = pki.client_cert("spiffe://opsd.test/worker-a");
    let channel = grpc_channel(&server, &pki, Some(worker.clone()))
        .await
        .unwrap();
    let mut workers = opsd::pb::opsd::v1::workers_client::WorkersClient::new(channel.clone());
    let created = workers
        .create_operation(op("projects/a", "w1"))
        .await
        .unwrap()
        .into_inner();
    let denied = workers
        .create_operation(op("projects/b", "w1"))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let mut ops = OperationsClient::new(channel);
    ops.get_operation(get(&created.name)).await.unwrap();
    let denied = ops
        .cancel_operation(common::calls::cancel(&created.name))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);

    // REST with the certificate too.
    let rest = rest_client(&server, &pki, Some(worker));
    let response = rest
        .get(format!("{}/v1/{}", https(&server), created.name))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    // A certificate the policy does not know: authenticated, allowed nothing.
    let stranger = pki.client_cert("spiffe://opsd.test/stranger");
    let mut ops = OperationsClient::new(grpc_channel(&server, &pki, Some(stranger)).await.unwrap());
    assert_eq!(
        ops.get_operation(get(&created.name))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    // Neither a certificate nor a token.
    let mut ops = OperationsClient::new(grpc_channel(&server, &pki, None).await.unwrap());
    assert_eq!(
        ops.get_operation(get(&created.name))
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    // A certificate from another CA does not pass the handshake.
    let other = Pki::new().client_cert("spiffe://opsd.test/worker-a");
    assert!(get_with(&server, &pki, Some(other), &created.name)
        .await
        .is_err());
    server.stop().await;
}

#[tokio::test]
async fn without_auth_mtls_requires_a_client_certificate() {
    let (server, pki, _dir, name) = start_tls("mtls", true).await;
    let identity = pki.client_cert("spiffe://opsd.test/any");
    get_with(&server, &pki, Some(identity), &name)
        .await
        .unwrap();
    assert!(get_with(&server, &pki, None, &name).await.is_err());
    server.stop().await;
}
