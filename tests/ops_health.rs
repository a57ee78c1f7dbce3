//! `opsd ops health`, the container health check: exit 0 and `SERVING`
//! from a serving opsd, 78 (64 + UNAVAILABLE) from anything else.

mod common;

use std::{
    io::{Read, Write},
    net::TcpListener,
    process::{Command, Output},
};

use common::binary::Opsd;

fn health(server: &str, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_opsd"))
        .args(["ops", "--server", server])
        .args(extra)
        .arg("health")
        .output()
        .unwrap()
}

#[test]
fn a_serving_server_is_healthy() {
    let mut opsd = Opsd::start(&["--store", "memory"]);
    let text = health(&opsd.address, &[]);
    assert!(text.status.success(), "{text:?}");
    assert_eq!(String::from_utf8_lossy(&text.stdout).trim(), "SERVING");
    let json = health(&format!("http://{}", opsd.address), &["--output", "json"]);
    assert!(json.status.success(), "{json:?}");
    assert_eq!(
        String::from_utf8_lossy(&json.stdout).trim(),
        r#"{"status":"SERVING"}"#
    );
    assert!(opsd.terminate().success());
}

#[test]
fn an_unreachable_server_is_unavailable() {
    // A port that was free a moment ago: nothing listens there now.
    let address = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let output = health(&address, &[]);
    assert_eq!(output.status.code(), Some(78), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("UNAVAILABLE"));
}

#[test]
fn a_server_that_answers_503_is_unavailable() {
    // What opsd answers while it drains, from a stand-in that answers once.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut request = [0; 1024];
        let _ = stream.read(&mut request).unwrap();
        let body = r#"{"status": "NOT_SERVING"}"#;
        write!(
            stream,
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        String::from_utf8_lossy(&request).into_owned()
    });
    let output = health(&address, &[]);
    let request = server.join().unwrap();
    assert!(
        request.starts_with("GET /healthz HTTP/1.1\r\n"),
        "{request}"
    );
    assert_eq!(output.status.code(), Some(78), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("503") && stderr.contains("NOT_SERVING"),
        "{stderr}"
    );
}

#[test]
fn health_checks_speak_plain_http_only() {
    let output = health("https://127.0.0.1:1", &[]);
    assert_eq!(output.status.code(), Some(64 + 3), "{output:?}");
}
