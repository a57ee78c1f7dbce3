//! `--max-connections`: at the cap a new client is still served. A
//! connection that has not completed its handshake makes room first, then
//! the one idle the longest (graceful GOAWAY); only when every connection
//! has a call open is a new client closed at once (it never waits in the
//! listen queue).

mod common;

use std::time::Duration;

use common::{
    calls::get,
    eventually,
    wire::{closed_within, H2Options, H2},
    TestServer,
};
use opsd::{
    pb::google::longrunning::{GetOperationRequest, WaitOperationRequest},
    Config,
};
use prost::Message;
use tokio::net::TcpStream;
use tonic::Code;

fn capped(n: usize) -> Config {
    let mut config = Config::for_tests();
    config.limits.max_connections = n;
    config
}

#[tokio::test]
async fn a_flood_of_silent_sockets_cannot_lock_a_client_out() {
    let server = TestServer::start_with(capped(16)).await;
    let mut silent = Vec::new();
    for _ in 0..64 {
        silent.push(TcpStream::connect(server.address()).await.unwrap());
    }
    // A working client connects and is served, again and again.
    for _ in 0..3 {
        let mut ops = server.operations().await;
        let err = ops.get_operation(get("operations/none")).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
    }
    // The oldest silent sockets made room: closed long before their
    // handshake deadline (10 s).
    for stream in silent.iter_mut().take(16) {
        closed_within(stream, Duration::from_secs(2)).await;
    }
    // (A drain waits for the handshake of the connections still silent.)
    drop(silent);
    server.stop().await;
}

#[tokio::test]
async fn the_connection_idle_the_longest_makes_room() {
    let server = TestServer::start_with(capped(3)).await;
    let name = server.registry_op("c").await;
    let message = GetOperationRequest { name }.encode_to_vec();
    let mut idle = Vec::new();
    for _ in 0..3 {
        let mut h2 = H2::connect(&server.address(), H2Options::default()).await;
        let answer = h2
            .call("/google.longrunning.Operations/GetOperation", &message)
            .await;
        assert_eq!(answer.code(), Some(Code::Ok));
        idle.push(h2);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A fourth client: served; the first (idle the longest) got a graceful
    // GOAWAY and its connection ended; the others stay.
    let mut ops = server.operations().await;
    ops.get_operation(get("operations/c")).await.unwrap();
    let first = idle.remove(0);
    tokio::time::timeout(Duration::from_secs(5), first.task)
        .await
        .expect("the idlest connection closes")
        .unwrap()
        .unwrap();
    assert!(first
        .goaways
        .lock()
        .unwrap()
        .iter()
        .all(|(_, code)| *code == 0));
    assert!(!first.goaways.lock().unwrap().is_empty());
    for h2 in &idle {
        assert!(h2.goaways.lock().unwrap().is_empty());
    }
    server.stop().await;
}

#[tokio::test]
async fn when_every_connection_has_a_call_open_a_new_client_is_closed_at_once() {
    let server = TestServer::start_with(capped(2)).await;
    let name = server.registry_op("w").await;
    // Two connections with a Wait open each fill the cap.
    let mut waits = Vec::new();
    for _ in 0..2 {
        let mut ops = server.operations().await;
        let request = WaitOperationRequest {
            name: name.clone(),
            timeout: None,
        };
        waits.push(tokio::spawn(
            async move { ops.wait_operation(request).await },
        ));
    }
    eventually("both Waits are parked", || async {
        server.registry.waiter_count() == 2
    })
    .await;
    let mut extra = TcpStream::connect(server.address()).await.unwrap();
    closed_within(&mut extra, Duration::from_secs(2)).await;
    server.stop().await;
    for wait in waits {
        assert!(!wait.await.unwrap().unwrap().into_inner().done);
    }
}
