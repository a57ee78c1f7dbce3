//! `--max-connections`: a client beyond the cap is closed at once (it never
//! waits in the listen queue), and a freed place serves the next client.

mod common;

use std::time::Duration;

use common::{calls::get, eventually, TestServer};
use opsd::Config;
use tokio::{io::AsyncReadExt, net::TcpStream};
use tonic::Code;

#[tokio::test]
async fn a_client_beyond_the_cap_is_closed_at_once() {
    let mut config = Config::for_tests();
    config.limits.max_connections = 1;
    let server = TestServer::start_with(config).await;
    let address = server.url.trim_start_matches("http://").to_owned();

    // The one place is taken by a working client.
    let mut ops = server.operations().await;
    let err = ops.get_operation(get("operations/none")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // The next connection is accepted and closed: its read ends at once
    // (end of file or a reset), it is not left waiting.
    let mut extra = TcpStream::connect(&address).await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), extra.read(&mut buf))
        .await
        .expect("the server closes an over-the-cap connection at once");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");

    // The working client is still served.
    let err = ops.get_operation(get("operations/none")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // Once it leaves, its place serves a new client.
    drop(ops);
    eventually("a freed place serves a new client", || async {
        let Ok(channel) = tonic::transport::Endpoint::from_shared(server.url.clone())
            .unwrap()
            .connect()
            .await
        else {
            return false;
        };
        let mut ops =
            opsd::pb::google::longrunning::operations_client::OperationsClient::new(channel);
        matches!(ops.get_operation(get("operations/none")).await, Err(e) if e.code() == Code::NotFound)
    })
    .await;
    server.stop().await;
}
