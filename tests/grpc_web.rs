//! Browsers as clients: gRPC-Web on the same port, with a real gRPC-Web
//! client from the npm registry (`tests/node/grpc_web_client.js`, Connect
//! for Node in gRPC-Web mode), and CORS preflights for the REST surface
//! (`--cors-allow-origin`).
//!
//! The gRPC-Web client needs `node` with `@connectrpc/connect-node` and
//! `@bufbuild/protobuf` (`.ci/run` installs them into
//! `target/node/node_modules`); without them that test reports itself
//! ignored, and fails under `CI=true`.

mod common;

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use common::{
    create, op,
    outside::{self, Tool},
    TestServer,
};
use opsd::Config;

fn main() -> ExitCode {
    let modules = find_connect();
    outside::run(vec![
        outside::test(
            "a_grpc_web_client_calls_operations_and_follows_changes",
            &modules,
            |modules| {
                outside::block_on(a_grpc_web_client_calls_operations_and_follows_changes(
                    modules,
                ))
            },
        ),
        outside::plain(
            "cors_preflights_and_answers_for_allowed_origins_only",
            || outside::block_on(cors_preflights_and_answers_for_allowed_origins_only()),
        ),
    ])
}

fn find_connect() -> Tool<PathBuf> {
    outside::find_node_modules(
        &["@connectrpc/connect-node", "@bufbuild/protobuf"],
        "@connectrpc/connect-node@2 @bufbuild/protobuf@2",
    )
}

async fn a_grpc_web_client_calls_operations_and_follows_changes(modules: PathBuf) {
    let server = TestServer::start().await;
    let mut workers = server.workers().await;
    create(&mut workers, op("projects/web", "a")).await;
    create(&mut workers, op("projects/web", "b")).await;
    let descriptors =
        std::env::temp_dir().join(format!("opsd-descriptors-{}.bin", std::process::id()));
    std::fs::write(&descriptors, opsd::pb::FILE_DESCRIPTOR_SET).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/node/grpc_web_client.js");
    let output = tokio::process::Command::new("node")
        .arg(&script)
        .arg(&server.url)
        .arg(&descriptors)
        .env("NODE_PATH", &modules)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "node failed:\n{stdout}\n{stderr}");
    assert_eq!(stdout.trim(), "ok", "{stderr}");
    std::fs::remove_file(&descriptors).ok();
    server.stop().await;
}

async fn cors_preflights_and_answers_for_allowed_origins_only() {
    let mut config = Config::for_tests();
    config.cors_allow_origins = vec!["https://console.example.com".into()];
    let server = TestServer::start_with(config).await;
    let mut workers = server.workers().await;
    let name = create(&mut workers, op("projects/p", "x")).await.name;
    let http = reqwest::Client::new();

    // A preflight from an allowed origin, asking for the auth header.
    let preflight = http
        .request(
            reqwest::Method::OPTIONS,
            format!("{}/v1/{name}:cancel", server.url),
        )
        .header("Origin", "https://console.example.com")
        .header("Access-Control-Request-Method", "POST")
        .header(
            "Access-Control-Request-Headers",
            "authorization, content-type",
        )
        .send()
        .await
        .unwrap();
    assert!(preflight.status().is_success(), "{}", preflight.status());
    let headers = preflight.headers();
    assert_eq!(
        headers["access-control-allow-origin"],
        "https://console.example.com"
    );
    let allowed = headers["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(allowed.contains("authorization"), "{allowed}");
    assert!(headers["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .contains("POST"));

    // The call itself carries the origin back.
    let got = http
        .get(format!("{}/v1/{name}", server.url))
        .header("Origin", "https://console.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(
        got.headers()["access-control-allow-origin"],
        "https://console.example.com"
    );

    // Another origin gets no CORS headers: the browser refuses the answer.
    let other = http
        .get(format!("{}/v1/{name}", server.url))
        .header("Origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());
    server.stop().await;

    // Off by default: no CORS headers at all.
    let server = TestServer::start().await;
    let plain = http
        .get(format!("{}/healthz", server.url))
        .header("Origin", "https://console.example.com")
        .send()
        .await
        .unwrap();
    assert!(plain.headers().get("access-control-allow-origin").is_none());
    server.stop().await;
}
