//! A drain (SIGTERM, or the shutdown future of `server::run`) never cuts a
//! call the server accepted: every stream at or below the last stream id of
//! the server's GOAWAY is answered, on every connection, whatever its
//! client is sending meanwhile; HTTP/1.1 finishes the response in progress
//! with `Connection: close`.

mod common;

use std::time::Duration;

use common::{
    any_string, create, op,
    wire::{
        grpc_headers, grpc_message, read_answer, Frame, H2Options, Raw, DATA, END_HEADERS,
        END_STREAM, GOAWAY, H2, HEADERS, NO_ERROR, WINDOW_UPDATE,
    },
    TestServer,
};
use opsd::{
    pb::{
        google::longrunning::{GetOperationRequest, ListOperationsRequest, WaitOperationRequest},
        opsd::v1::{CreateOperationRequest, UpdateOperationRequest},
    },
    Config,
};
use prost::Message;
use tonic::Code;

const GET: &str = "/google.longrunning.Operations/GetOperation";
const LIST: &str = "/google.longrunning.Operations/ListOperations";
const WAIT: &str = "/google.longrunning.Operations/WaitOperation";
const CREATE: &str = "/opsd.v1.Workers/CreateOperation";

fn config() -> Config {
    let mut config = Config::for_tests();
    config.limits.drain_timeout = Duration::from_secs(10);
    // Hundreds of calls in flight at once: none is shed here.
    config.limits.max_in_flight = 0;
    config
}

/// `count` running operations under `projects/drain`, each with about
/// `metadata` bytes of metadata, so answers take many frames.
async fn fill(server: &TestServer, count: usize, metadata: usize) {
    let mut workers = server.workers().await;
    for i in 0..count {
        let name = create(&mut workers, op("projects/drain", &format!("op-{i}")))
            .await
            .name;
        workers
            .update_operation(UpdateOperationRequest {
                name,
                metadata: Some(any_string(&"m".repeat(metadata))),
            })
            .await
            .unwrap();
    }
}

/// How a call on a draining server ended.
#[derive(Debug)]
enum Outcome {
    /// Answered to its end, with this status.
    Answered(Code),
    /// Failed at the client with this error.
    Failed(h2::Error),
}

/// Checks every call of a connection against its GOAWAY: at or below the
/// last stream id, answered OK; above, refused by the GOAWAY (never
/// processed, so a client may retry it). Without a final GOAWAY (the
/// client closed first, once it had no call left) every call counts as
/// accepted.
fn check(connection: &str, last: Option<u32>, calls: &[(u32, Outcome)]) -> usize {
    let last = last.unwrap_or(u32::MAX);
    let mut answered = 0;
    for (id, outcome) in calls {
        match outcome {
            Outcome::Answered(Code::Ok) if *id <= last => answered += 1,
            Outcome::Failed(err) if *id > last && err.is_go_away() => {
                assert_eq!(
                    err.reason(),
                    Some(h2::Reason::NO_ERROR),
                    "{connection}: {err}"
                )
            }
            other => {
                panic!("{connection}: stream {id} (GOAWAY last stream {last}) ended {other:?}")
            }
        }
    }
    answered
}

fn list(page_size: i32) -> Vec<u8> {
    ListOperationsRequest {
        name: "projects/drain".into(),
        page_size,
        ..Default::default()
    }
    .encode_to_vec()
}

fn get(i: usize) -> Vec<u8> {
    GetOperationRequest {
        name: format!("projects/drain/operations/op-{i}"),
    }
    .encode_to_vec()
}

/// Issue 19: three connections whose clients read slowly (an 8 KiB receive
/// buffer; `h2` returns flow-control credit with WINDOW_UPDATE as it
/// reads), about 100 Get and List calls in flight on each, and an open Wait
/// on another connection; the drain starts while the answers are still
/// being written. Closing such a socket while its WINDOW_UPDATEs sit unread
/// makes the kernel reset it, and the client's kernel then throws away
/// answers it had received: the lingering close must prevent that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_readers_get_every_accepted_answer() {
    const ROUNDS: usize = 8;
    const CALLS: usize = 100;
    for round in 0..ROUNDS {
        let mut server = TestServer::start_with(config()).await;
        fill(&server, 40, 1024).await;
        let running = create(&mut server.workers().await, op("projects/wait", "w"))
            .await
            .name;
        let mut ops = server.operations().await;
        let wait = tokio::spawn(async move {
            ops.wait_operation(WaitOperationRequest {
                name: running,
                timeout: None,
            })
            .await
        });

        let mut clients = Vec::new();
        for _ in 0..3 {
            let options = H2Options {
                recv_buffer: Some(8 * 1024),
                window: 65_535,
            };
            let mut h2 = H2::connect(&server.address(), options).await;
            let mut calls = Vec::new();
            for i in 0..CALLS {
                let (path, message) = if i % 2 == 0 {
                    (LIST, list(20))
                } else {
                    (GET, get(i % 40))
                };
                let response = h2.start(path, &message).await.unwrap();
                let id = u32::from(response.stream_id());
                calls.push(tokio::spawn(async move {
                    let outcome = match read_answer(response, Duration::from_millis(1)).await {
                        Ok(answer) => Outcome::Answered(answer.code().unwrap_or(Code::Unknown)),
                        Err(err) => Outcome::Failed(err),
                    };
                    (id, outcome)
                }));
            }
            clients.push((h2, calls));
        }
        // Mid-way: some answers read, most still being written.
        tokio::time::sleep(Duration::from_millis(20 + 10 * round as u64)).await;
        server.begin_stop();

        for (n, (h2, calls)) in clients.into_iter().enumerate() {
            let mut outcomes = Vec::new();
            for call in calls {
                outcomes.push(call.await.unwrap());
            }
            let answered = check(
                &format!("round {round}, connection {n}"),
                h2.last_stream(),
                &outcomes,
            );
            assert!(
                answered > 0,
                "round {round}, connection {n}: nothing answered"
            );
        }
        let waited = wait.await.unwrap().expect("the open Wait returns OK");
        assert!(!waited.into_inner().done);
        server.stop().await;
    }
}

/// Issue 14: calls of every kind on several connections, the drain at a
/// different moment each round; every accepted call ends OK, open Waits
/// with the latest state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_under_load_are_answered_through_the_drain() {
    const ROUNDS: u64 = 12;
    for round in 0..ROUNDS {
        let mut server = TestServer::start_with(config()).await;
        fill(&server, 10, 64).await;
        let mut clients = Vec::new();
        for c in 0..4 {
            let mut h2 = H2::connect(&server.address(), H2Options::default()).await;
            clients.push(tokio::spawn(async move {
                let mut calls = Vec::new();
                for i in 0.. {
                    let (path, message) = match i % 4 {
                        0 => (GET, get(i % 10)),
                        1 => (LIST, list(5)),
                        2 => (
                            CREATE,
                            CreateOperationRequest {
                                parent: format!("projects/load-{c}"),
                                ..Default::default()
                            }
                            .encode_to_vec(),
                        ),
                        _ => (
                            WAIT,
                            WaitOperationRequest {
                                name: format!("projects/drain/operations/op-{}", i % 10),
                                timeout: Some(prost_types::Duration {
                                    seconds: 30,
                                    nanos: 0,
                                }),
                            }
                            .encode_to_vec(),
                        ),
                    };
                    let Ok(response) = h2.start(path, &message).await else {
                        break; // the GOAWAY arrived: no new calls
                    };
                    let id = u32::from(response.stream_id());
                    calls.push(tokio::spawn(async move {
                        let outcome = match read_answer(response, Duration::ZERO).await {
                            Ok(answer) => Outcome::Answered(answer.code().unwrap_or(Code::Unknown)),
                            Err(err) => Outcome::Failed(err),
                        };
                        (id, outcome)
                    }));
                    if i % 8 == 7 {
                        tokio::task::yield_now().await;
                    }
                }
                let mut outcomes = Vec::new();
                for call in calls {
                    outcomes.push(call.await.unwrap());
                }
                (h2.last_stream(), outcomes)
            }));
        }
        tokio::time::sleep(Duration::from_millis(30 + 7 * round)).await;
        server.begin_stop();
        for (n, client) in clients.into_iter().enumerate() {
            let (last, outcomes) = client.await.unwrap();
            let answered = check(&format!("round {round}, connection {n}"), last, &outcomes);
            assert!(
                answered > 0,
                "round {round}, connection {n}: nothing answered"
            );
        }
        server.stop().await;
    }
}

/// The race behind issue 14's PROTOCOL_ERROR GOAWAY: a client's HEADERS
/// cross the server's final GOAWAY (the server ignores that stream, as it
/// should), then the client returns flow-control credit on it. The `h2`
/// crate answered that WINDOW_UPDATE with GOAWAY(PROTOCOL_ERROR), which
/// reset every stream still being answered; opsd drops it instead, and the
/// accepted call is answered.
#[tokio::test]
async fn credit_for_a_stream_past_the_goaway_cuts_nothing() {
    let mut server = TestServer::start_with(config()).await;
    fill(&server, 1, 10).await;
    let mut raw = Raw::handshake(&server.address()).await;
    // Stream 1: accepted, its request body still to come.
    raw.send_frame(Frame::new(HEADERS, END_HEADERS, 1, &grpc_headers(GET)))
        .await;
    raw.frames_until(|f| f.kind == common::wire::SETTINGS)
        .await
        .unwrap();

    server.begin_stop();
    // The first GOAWAY (last stream 2^31-1) comes with a PING; before the
    // client acknowledges it, stream 3's HEADERS are sent, but they reach
    // the server after the acknowledgement, as a client that queues
    // HEADERS behind control frames sends them.
    let frames = raw
        .frames_until(|f| f.kind == common::wire::PING && f.flags == 0)
        .await
        .unwrap();
    assert!(frames
        .iter()
        .any(|f| f.goaway() == Some((0x7fff_ffff, NO_ERROR, vec![]))));
    let ping = frames.last().unwrap().payload.clone();
    raw.send_frame(Frame::new(common::wire::PING, common::wire::ACK, 0, &ping))
        .await;
    let frames = raw
        .frames_until(|f| f.goaway().is_some_and(|(last, _, _)| last < 0x7fff_ffff))
        .await
        .unwrap();
    assert_eq!(frames.last().unwrap().goaway(), Some((1, NO_ERROR, vec![])));
    raw.send_frame(Frame::new(
        HEADERS,
        END_HEADERS | END_STREAM,
        3,
        &grpc_headers(GET),
    ))
    .await;
    raw.send_frame(Frame::new(WINDOW_UPDATE, 0, 3, &1024u32.to_be_bytes()))
        .await;
    // Stream 1's body arrives: it must be answered.
    let body = grpc_message(&get(0));
    raw.send_frame(Frame::new(DATA, END_STREAM, 1, &body)).await;
    let rest = raw.until_closed().await;
    for frame in &rest {
        if let Some((_, code, debug)) = frame.goaway() {
            assert_eq!(
                code,
                NO_ERROR,
                "GOAWAY {:?}",
                String::from_utf8_lossy(&debug)
            );
        }
        assert_ne!(frame.kind, common::wire::RST_STREAM, "{frame:?}");
    }
    let answer: Vec<_> = rest.iter().filter(|f| f.stream == 1).collect();
    assert!(answer.iter().any(|f| f.kind == DATA), "{rest:?}");
    assert!(
        answer
            .last()
            .is_some_and(|f| f.kind == HEADERS && f.flags & END_STREAM != 0),
        "{rest:?}"
    );
    assert!(
        rest.iter().all(|f| f.stream != 3),
        "stream 3 was never accepted"
    );
    server.stop().await;
}

/// A connection accepted just before the drain, whose request had not been
/// read yet, is still served (the server waits for its handshake, bounded
/// by the handshake deadline, before it shuts it down).
#[tokio::test]
async fn a_connection_accepted_just_before_the_drain_is_served() {
    let mut server = TestServer::start_with(config()).await;
    fill(&server, 1, 10).await;
    let mut raw = Raw::connect(&server.address()).await;
    // Accepted (the server has its socket), nothing sent yet.
    common::eventually("the connection is accepted", || async {
        server
            .metrics_text()
            .await
            .contains("\nopsd_connections 2\n")
    })
    .await;
    server.begin_stop();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut hello = common::wire::PREFACE.to_vec();
    hello.extend(Frame::new(common::wire::SETTINGS, 0, 0, &[]).encode());
    hello.extend(Frame::new(HEADERS, END_HEADERS, 1, &grpc_headers(GET)).encode());
    hello.extend(Frame::new(DATA, END_STREAM, 1, &grpc_message(&get(0))).encode());
    raw.send(&hello).await;
    let frames = raw
        .frames_until(|f| f.stream == 1 && f.flags & END_STREAM != 0 && f.kind == HEADERS)
        .await;
    let frames = frames.expect("the call is answered");
    assert!(frames.iter().any(|f| f.stream == 1 && f.kind == DATA));
    let rest = raw.until_closed().await;
    assert!(rest.iter().chain(&frames).any(|f| f.kind == GOAWAY));
    server.stop().await;
}

/// HTTP/1.1 keep-alive: the response in progress when the drain starts is
/// finished, with `Connection: close`, and the connection closes after it.
#[tokio::test]
async fn http1_finishes_the_response_in_progress_then_closes() {
    let mut server = TestServer::start_with(config()).await;
    let name = create(&mut server.workers().await, op("", "h1")).await.name;
    let http = reqwest::Client::builder().http1_only().build().unwrap();
    // A REST Wait: in progress when the drain starts, answered with the
    // latest state once it does.
    let waiting = tokio::spawn({
        let url = format!("{}/v1/{name}:wait", server.url);
        let http = http.clone();
        async move { http.post(url).body("{}").send().await }
    });
    common::eventually("the Wait is parked", || async {
        server.registry.waiter_count() == 1
    })
    .await;
    server.begin_stop();
    let response = waiting.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["connection"], "close");
    let op: serde_json::Value = response.json().await.unwrap();
    assert_eq!(op["name"], name.as_str());
    server.stop().await;
}

/// A rolling restart of the binary on one redb file and one port, under
/// load: the old process drains on SIGTERM and exits 0, a new one starts on
/// the same file and port. Every call the old one accepted was answered
/// OK, every operation it acknowledged is in the new one, and the clients
/// go on with the new one.
#[test]
fn rolling_restart_of_the_binary_loses_no_accepted_call() {
    use common::binary::Opsd;
    let dir = std::env::temp_dir().join(format!("opsd-rolling-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let store = format!("redb:{}", dir.join("opsd.redb").display());
    let flags = ["--store", store.as_str(), "--drain-timeout", "10s"];
    let runtime = tokio::runtime::Runtime::new().unwrap();

    let mut old = Opsd::start(&flags);
    let address = old.address.clone();
    let get_message = runtime.block_on(async {
        let url = format!("http://{address}");
        let mut workers = opsd::pb::opsd::v1::workers_client::WorkersClient::connect(url)
            .await
            .unwrap();
        let name = create(&mut workers, op("projects/r", "seed")).await.name;
        GetOperationRequest { name }.encode_to_vec()
    });
    let clients: Vec<_> = (0..3)
        .map(|c| {
            let (address, get_message) = (address.clone(), get_message.clone());
            runtime.spawn(async move {
                let mut h2 = H2::connect(&address, H2Options::default()).await;
                let mut calls = Vec::new();
                for i in 0.. {
                    let (path, message) = if i % 2 == 0 {
                        (GET, get_message.clone())
                    } else {
                        let create = CreateOperationRequest {
                            parent: format!("projects/r{c}"),
                            ..Default::default()
                        };
                        (CREATE, create.encode_to_vec())
                    };
                    let Ok(response) = h2.start(path, &message).await else {
                        break;
                    };
                    let id = u32::from(response.stream_id());
                    calls.push((id, read_answer(response, Duration::ZERO).await));
                }
                (h2.last_stream(), calls)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let status = old.terminate();
    assert!(status.success(), "the old opsd exited with {status}");

    let mut acknowledged = Vec::new();
    for (n, client) in clients.into_iter().enumerate() {
        let (last, calls) = runtime.block_on(client).unwrap();
        let mut outcomes = Vec::new();
        for (id, answer) in calls {
            match answer {
                Ok(answer) => {
                    let code = answer.code().unwrap_or(Code::Unknown);
                    if code == Code::Ok && answer.data.len() > 5 {
                        let op =
                            opsd::pb::google::longrunning::Operation::decode(&answer.data[5..])
                                .unwrap();
                        acknowledged.push(op.name);
                    }
                    outcomes.push((id, Outcome::Answered(code)));
                }
                Err(err) => outcomes.push((id, Outcome::Failed(err))),
            }
        }
        let answered = check(&format!("connection {n}"), last, &outcomes);
        assert!(answered > 0, "connection {n}: nothing answered");
    }

    let new = Opsd::start_on(&address, &flags);
    runtime.block_on(async {
        let mut ops = opsd::pb::google::longrunning::operations_client::OperationsClient::connect(
            format!("http://{}", new.address),
        )
        .await
        .unwrap();
        for name in &acknowledged {
            ops.get_operation(GetOperationRequest { name: name.clone() })
                .await
                .unwrap_or_else(|e| panic!("{name} was acknowledged, then lost: {e}"));
        }
    });
    drop(new);
    std::fs::remove_dir_all(&dir).ok();
}

/// A call still unanswered when `--drain-timeout` passes (here: its body
/// never comes) is cut, and counted; the server stops on time.
#[tokio::test]
async fn calls_still_open_at_the_drain_timeout_are_cut_and_counted() {
    let mut config = config();
    config.limits.drain_timeout = Duration::from_millis(300);
    let mut server = TestServer::start_with(config).await;
    let mut h2 = H2::connect(&server.address(), H2Options::default()).await;
    let (response, mut body) = h2.open(GET).await.unwrap();
    body.send_data(bytes::Bytes::from_static(&[0, 0, 0]), false)
        .unwrap();
    common::eventually("the call is open", || async {
        server
            .metrics_text()
            .await
            .contains("\nopsd_connections 2\n")
    })
    .await;
    let started = std::time::Instant::now();
    server.begin_stop();
    let cut = read_answer(response, Duration::ZERO).await;
    assert!(cut.is_err(), "{cut:?}");
    server.stop().await;
    assert!(started.elapsed() < Duration::from_secs(3));

    // The recorder is the process's: another server shows the count.
    let other = TestServer::start().await;
    let text = other.metrics_text().await;
    assert!(
        text.lines()
            .any(|l| l.starts_with("opsd_drain_cut_calls_total ") && !l.ends_with(" 0")),
        "{text}"
    );
    other.stop().await;
}
