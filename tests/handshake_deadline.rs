//! A connection that does not complete its handshake within
//! `--header-read-timeout` (the HTTP/2 preface and SETTINGS, or its first
//! HTTP/1 request head) is closed: silent sockets, a dribbled preface, a
//! preface without SETTINGS and a head that never ends.

mod common;

use std::time::{Duration, Instant};

use common::{
    calls::get,
    wire::{closed_within, Frame, PREFACE, SETTINGS},
    TestServer,
};
use opsd::Config;
use tokio::{io::AsyncWriteExt, net::TcpStream};
use tonic::Code;

const DEADLINE: Duration = Duration::from_millis(400);

async fn server() -> TestServer {
    let mut config = Config::for_tests();
    config.limits.header_read_timeout = DEADLINE;
    TestServer::start_with(config).await
}

/// Sends `bytes` in pieces (`pause` apart), then waits: the server must
/// close the connection after the deadline, within a margin.
async fn closed_after_deadline(address: &str, bytes: &[u8], pieces: usize, pause: Duration) {
    let mut stream = TcpStream::connect(address).await.unwrap();
    let started = Instant::now();
    for piece in bytes.chunks(bytes.len().div_ceil(pieces.max(1)).max(1)) {
        stream.write_all(piece).await.unwrap();
        tokio::time::sleep(pause).await;
    }
    closed_within(&mut stream, DEADLINE + Duration::from_secs(3)).await;
    let elapsed = started.elapsed();
    assert!(
        elapsed >= DEADLINE - Duration::from_millis(50),
        "closed after {elapsed:?}"
    );
}

#[tokio::test]
async fn silent_and_dribbling_connections_are_closed_at_the_deadline() {
    let server = server().await;
    let mut preface_settings = PREFACE.to_vec();
    preface_settings.extend(Frame::new(SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 100]).encode());
    let cases: Vec<(&str, Vec<u8>, usize)> = vec![
        ("silent", vec![], 1),
        ("a few bytes of the preface", PREFACE[..5].to_vec(), 1),
        ("the preface dribbled", PREFACE[..20].to_vec(), 10),
        ("the preface without SETTINGS", PREFACE.to_vec(), 1),
        ("SETTINGS cut short", preface_settings[..30].to_vec(), 1),
        (
            "an HTTP/1 head that never ends",
            b"GET /v1/operations HTTP/1.1\r\nHost: x\r\n".to_vec(),
            1,
        ),
    ];
    let mut running = Vec::new();
    for (what, bytes, pieces) in cases {
        let address = server.address();
        running.push(tokio::spawn(async move {
            closed_after_deadline(&address, &bytes, pieces, Duration::from_millis(20)).await;
            what
        }));
    }
    for case in running {
        case.await.unwrap();
    }

    // A client that completes its handshake is served, and stays.
    let mut ops = server.operations().await;
    tokio::time::sleep(DEADLINE * 2).await;
    let err = ops.get_operation(get("operations/none")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    server.stop().await;
}
