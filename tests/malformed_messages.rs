//! A gRPC request that does not decode is the client's mistake:
//! INVALID_ARGUMENT with a `BadRequest` naming the field where it can be
//! known, counted in `opsd_rpc_total` like every call, never INTERNAL. A
//! message over `--max-message-size` is RESOURCE_EXHAUSTED, refused at its
//! length prefix; a body too slow is refused after `--body-read-timeout`.
//! The requests are hand-encoded bytes over the `h2` crate's client.

mod common;

use std::time::Duration;

use common::{
    wire::{grpc_message, read_answer, Answer, H2Options, H2},
    TestServer,
};
use opsd::Config;
use tonic::Code;
use tonic_types::StatusExt;

const OPS: &str = "/google.longrunning.Operations/";
const WORKERS: &str = "/opsd.v1.Workers/";
const CONSOLE: &str = "/opsd.v1.Console/";

/// Field `number` holding the length-delimited `bytes`.
fn field(number: u8, bytes: &[u8]) -> Vec<u8> {
    let mut encoded = vec![number << 3 | 2, bytes.len() as u8];
    encoded.extend_from_slice(bytes);
    encoded
}

/// A string that is not UTF-8.
const NOT_UTF8: &[u8] = b"operations/\xff";

async fn call(h2: &mut H2, path: &str, body: &[u8]) -> Answer {
    let response = h2.start_raw(path, body).await.unwrap();
    read_answer(response, Duration::ZERO).await.unwrap()
}

fn bad_request_field(answer: &Answer) -> Option<String> {
    let status = answer.status().expect("a grpc-status");
    let details = status.get_error_details();
    details
        .bad_request()
        .map(|b| b.field_violations[0].field.clone())
}

#[tokio::test]
async fn malformed_messages_are_invalid_argument_naming_the_field() {
    let server = TestServer::start().await;
    let mut h2 = H2::connect(&server.address(), H2Options::default()).await;
    let mut long_varint = vec![0x10];
    long_varint.extend_from_slice(&[0xff; 10]);
    long_varint.push(0x01);
    let cases: Vec<(String, Vec<u8>, Option<&str>)> = vec![
        (
            format!("{OPS}GetOperation"),
            field(1, NOT_UTF8),
            Some("name"),
        ),
        (
            format!("{OPS}CancelOperation"),
            field(1, NOT_UTF8),
            Some("name"),
        ),
        (
            format!("{OPS}DeleteOperation"),
            field(1, NOT_UTF8),
            Some("name"),
        ),
        (
            format!("{OPS}WaitOperation"),
            field(1, NOT_UTF8),
            Some("name"),
        ),
        (
            format!("{OPS}ListOperations"),
            field(4, NOT_UTF8),
            Some("name"),
        ),
        (
            format!("{OPS}ListOperations"),
            field(1, NOT_UTF8),
            Some("filter"),
        ),
        (
            format!("{OPS}ListOperations"),
            field(3, NOT_UTF8),
            Some("page_token"),
        ),
        (
            format!("{OPS}ListOperations"),
            long_varint.clone(),
            Some("page_size"),
        ),
        // A Duration cut short inside Wait's timeout.
        (
            format!("{OPS}WaitOperation"),
            vec![0x12, 0x02, 0x08, 0xff],
            Some("timeout.seconds"),
        ),
        (
            format!("{WORKERS}CreateOperation"),
            field(1, NOT_UTF8),
            Some("parent"),
        ),
        (
            format!("{WORKERS}CreateOperation"),
            field(2, NOT_UTF8),
            Some("operation_id"),
        ),
        (
            format!("{WORKERS}CreateOperation"),
            field(3, NOT_UTF8),
            Some("request_id"),
        ),
        // metadata claiming 4 GiB.
        (
            format!("{WORKERS}CreateOperation"),
            vec![0x22, 0x80, 0x80, 0x80, 0x80, 0x10],
            Some("metadata"),
        ),
        (
            format!("{WORKERS}UpdateOperation"),
            field(1, NOT_UTF8),
            Some("name"),
        ),
        (
            format!("{WORKERS}UpdateOperation"),
            vec![0x12, 0x80, 0x80, 0x80, 0x80, 0x10],
            Some("metadata"),
        ),
        (
            format!("{WORKERS}CompleteOperation"),
            field(1, NOT_UTF8),
            Some("name"),
        ),
        (
            format!("{WORKERS}GetOperationReport"),
            field(1, NOT_UTF8),
            Some("name"),
        ),
        (
            format!("{WORKERS}WatchOperations"),
            field(1, NOT_UTF8),
            Some("parent"),
        ),
        // Garbage for RegisterTypes: inside the descriptor set, and bare.
        (
            format!("{WORKERS}RegisterTypes"),
            field(1, &[0x0a, 0x05, 0xff, 0xff, 0xff]),
            Some("descriptor_set.file"),
        ),
        (format!("{WORKERS}RegisterTypes"), vec![0xff; 7], None),
        (
            format!("{CONSOLE}GetOperationInfo"),
            field(1, NOT_UTF8),
            Some("name"),
        ),
        (
            format!("{CONSOLE}ListOperationInfos"),
            field(1, NOT_UTF8),
            Some("filter"),
        ),
    ];
    for (path, body, expected) in &cases {
        let answer = call(&mut h2, path, &grpc_message(body)).await;
        let status = answer.status().expect("a grpc-status");
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{path} {body:02x?}: {status:?}"
        );
        let details = status.get_error_details();
        assert_eq!(
            details.error_info().map(|i| i.reason.as_str()),
            Some("MALFORMED_MESSAGE"),
            "{path}"
        );
        let field = bad_request_field(&answer);
        match expected {
            Some(name) => assert_eq!(field.as_deref(), Some(*name), "{path} {body:02x?}"),
            None => assert_eq!(field.as_deref(), Some(""), "{path}"),
        }
    }

    // Counted like every call, under their method, with their code (the
    // recorder is the process's: other tests of this file add to some).
    let text = server.metrics_text().await;
    let count = |method: &str| -> u64 {
        let series = format!(
            "opsd_rpc_total{{method=\"{method}\",transport=\"grpc\",code=\"INVALID_ARGUMENT\"}} "
        );
        text.lines()
            .find_map(|l| l.strip_prefix(&series))
            .map_or(0, |n| n.parse().unwrap())
    };
    assert_eq!(count("ListOperations"), 4, "{text}");
    assert_eq!(count("RegisterTypes"), 2, "{text}");
    assert_eq!(count("GetOperationInfo"), 1, "{text}");
    assert!(count("CreateOperation") >= 4, "{text}");
    assert!(!text.contains("code=\"INTERNAL\""), "{text}");
    server.stop().await;
}

#[tokio::test]
async fn broken_framing_is_invalid_argument() {
    let server = TestServer::start().await;
    let mut h2 = H2::connect(&server.address(), H2Options::default()).await;
    let get = format!("{OPS}GetOperation");
    // A compression flag that is neither 0 nor 1.
    let mut flag = grpc_message(&field(1, b"operations/x"));
    flag[0] = 7;
    // A body that ends inside its message.
    let short = &grpc_message(&field(1, b"operations/x"))[..9];
    for body in [&flag[..], short] {
        let answer = call(&mut h2, &get, body).await;
        assert_eq!(answer.code(), Some(Code::InvalidArgument), "{body:02x?}");
    }
    server.stop().await;
}

#[tokio::test]
async fn a_message_one_byte_over_the_limit_is_resource_exhausted() {
    let mut config = Config::for_tests();
    config.set_max_message_size(100_000);
    let server = TestServer::start_with(config).await;
    let mut h2 = H2::connect(&server.address(), H2Options::default()).await;
    let path = format!("{WORKERS}CreateOperation");

    // parent (field 1) padded so the message is exactly the limit, then one
    // byte over it.
    let message = |len: usize| {
        let parent = "p".repeat(len - 4);
        let mut m = vec![0x0a];
        prost::encoding::encode_varint(parent.len() as u64, &mut m);
        m.extend_from_slice(parent.as_bytes());
        assert_eq!(m.len(), len);
        m
    };
    let at_limit = call(&mut h2, &path, &grpc_message(&message(100_000))).await;
    assert_eq!(
        at_limit.code(),
        Some(Code::InvalidArgument),
        "a bad parent, not a size"
    );
    let over = call(&mut h2, &path, &grpc_message(&message(100_001))).await;
    let status = over.status().unwrap();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("100001 bytes"),
        "{}",
        status.message()
    );
    assert!(
        status.message().contains("--max-message-size"),
        "{}",
        status.message()
    );

    // A prefix claiming 4 GiB is refused as soon as it arrives: the rest
    // never comes, and nothing is buffered.
    let (response, mut stream) = h2.open(&path).await.unwrap();
    stream
        .send_data(
            bytes::Bytes::from_static(&[0, 0xff, 0xff, 0xff, 0xff]),
            false,
        )
        .unwrap();
    let answer = tokio::time::timeout(
        Duration::from_secs(5),
        read_answer(response, Duration::ZERO),
    )
    .await
    .expect("answered at once")
    .unwrap();
    assert_eq!(answer.code(), Some(Code::ResourceExhausted));
    server.stop().await;
}

#[tokio::test]
async fn a_slow_body_is_refused_after_the_body_read_timeout() {
    let mut config = Config::for_tests();
    config.rest.body_read_timeout = Duration::from_millis(300);
    let server = TestServer::start_with(config).await;
    let mut h2 = H2::connect(&server.address(), H2Options::default()).await;
    let (response, mut stream) = h2.open(&format!("{OPS}GetOperation")).await.unwrap();
    let message = grpc_message(&field(1, b"operations/x"));
    stream
        .send_data(bytes::Bytes::copy_from_slice(&message[..7]), false)
        .unwrap();
    let started = std::time::Instant::now();
    let answer = tokio::time::timeout(
        Duration::from_secs(5),
        read_answer(response, Duration::ZERO),
    )
    .await
    .expect("refused within the timeout")
    .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(250));
    let status = answer.status().unwrap();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("--body-read-timeout"),
        "{}",
        status.message()
    );
    drop(stream);
    server.stop().await;
}
