//! Connections that stay without calls are closed: after `--idle-timeout`
//! with no call open, a graceful GOAWAY; a client that PINGs faster than
//! `--min-ping-interval` while the server sends nothing gets GOAWAY
//! ENHANCE_YOUR_CALM `too_many_pings`, as grpc-go and grpc-java answer.

mod common;

use std::time::{Duration, Instant};

use common::{
    wire::{read_answer, Frame, H2Options, Raw, ENHANCE_YOUR_CALM, H2, PING},
    TestServer,
};
use opsd::{
    pb::google::longrunning::{GetOperationRequest, WaitOperationRequest},
    Config,
};
use prost::Message;
use tonic::Code;

const IDLE: Duration = Duration::from_millis(300);

fn config() -> Config {
    let mut config = Config::for_tests();
    config.limits.idle_timeout = IDLE;
    config.limits.min_ping_interval = Duration::from_millis(200);
    config
}

#[tokio::test]
async fn an_idle_connection_gets_a_goaway_and_closes() {
    let server = TestServer::start_with(config()).await;
    let name = server.registry_op("i").await;
    let get = GetOperationRequest { name: name.clone() }.encode_to_vec();

    let mut idle = H2::connect(&server.address(), H2Options::default()).await;
    let answer = idle
        .call("/google.longrunning.Operations/GetOperation", &get)
        .await;
    assert_eq!(answer.code(), Some(Code::Ok));
    let answered = Instant::now();

    // A connection with a Wait open is not idle, however long it waits.
    let mut busy = H2::connect(&server.address(), H2Options::default()).await;
    let wait = WaitOperationRequest {
        name,
        timeout: Some(prost_types::Duration {
            seconds: 1,
            nanos: 0,
        }),
    }
    .encode_to_vec();
    let waiting = busy
        .start("/google.longrunning.Operations/WaitOperation", &wait)
        .await
        .unwrap();

    tokio::time::timeout(IDLE * 10, &mut idle.task)
        .await
        .expect("the idle connection is closed")
        .unwrap()
        .unwrap();
    assert!(answered.elapsed() >= IDLE - Duration::from_millis(50));
    assert_eq!(idle.goaways.lock().unwrap().first().map(|g| g.1), Some(0));

    // The Wait (1 s) outlives several idle timeouts and is answered.
    let answer = read_answer(waiting, Duration::ZERO).await.unwrap();
    assert_eq!(answer.code(), Some(Code::Ok));
    assert!(busy.goaways.lock().unwrap().is_empty(), "closed while busy");
    // Then it is idle too.
    tokio::time::timeout(IDLE * 10, &mut busy.task)
        .await
        .expect("idle after its Wait")
        .unwrap()
        .unwrap();
    server.stop().await;
}

#[tokio::test]
async fn too_many_pings_get_enhance_your_calm() {
    let server = TestServer::start_with(config()).await;
    let mut raw = Raw::handshake(&server.address()).await;
    for i in 0..5u8 {
        raw.send_frame(Frame::new(PING, 0, 0, &[i; 8])).await;
    }
    let frames = raw.until_closed().await;
    let goaway = frames
        .iter()
        .find_map(Frame::goaway)
        .expect("a GOAWAY before the close");
    assert_eq!(goaway.1, ENHANCE_YOUR_CALM);
    assert_eq!(goaway.2, b"too_many_pings");
    let acks = frames.iter().filter(|f| f.kind == PING).count();
    assert!(acks <= 3, "{acks} PINGs answered");
    drop(raw);
    server.stop().await;
}

#[tokio::test]
async fn pings_at_a_sane_rate_are_answered() {
    // (PINGs do not make a connection busy: no idle deadline here.)
    let mut config = config();
    config.limits.idle_timeout = Duration::from_secs(60);
    let server = TestServer::start_with(config).await;
    let mut raw = Raw::handshake(&server.address()).await;
    for i in 0..5u8 {
        raw.send_frame(Frame::new(PING, 0, 0, &[i; 8])).await;
        let frames = raw
            .frames_until(|f| f.kind == PING && f.flags == 1)
            .await
            .expect("the PING is answered");
        assert!(frames.iter().all(|f| f.goaway().is_none()), "{frames:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    drop(raw);
    server.stop().await;
}
