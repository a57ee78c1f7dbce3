//! The `opsd` binary as users run it: `--help`, plain logs, host names to
//! listen on, and a clean SIGTERM drain. (grpcurl against it:
//! `tests/grpcurl.rs`; `opsd ops`: `tests/ops_cli.rs`.)

mod common;

use std::{
    process::Command,
    time::{Duration, Instant},
};

use common::binary::Opsd;

#[test]
fn sigterm_drains_open_waits_and_exits_zero() {
    let mut opsd = Opsd::start(&["--drain-timeout", "5s", "--store", "memory"]);
    let url = format!("http://{}", opsd.address);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    use opsd::pb::{
        google::longrunning::{operations_client::OperationsClient, WaitOperationRequest},
        opsd::v1::{workers_client::WorkersClient, CreateOperationRequest},
    };
    let name = runtime.block_on(async {
        let mut workers = WorkersClient::connect(url.clone()).await.unwrap();
        let request = CreateOperationRequest {
            operation_id: "long".into(),
            ..Default::default()
        };
        workers
            .create_operation(request)
            .await
            .unwrap()
            .into_inner()
            .name
    });
    let waiting = runtime.spawn(async move {
        let mut ops = OperationsClient::connect(url).await.unwrap();
        ops.wait_operation(WaitOperationRequest {
            name,
            timeout: None,
        })
        .await
    });
    // The Wait is parked once the server's gauge counts it.
    let metrics = format!("http://{}/metrics", opsd.address);
    runtime.block_on(async {
        let http = reqwest::Client::new();
        let give_up = Instant::now() + Duration::from_secs(10);
        loop {
            let text = http
                .get(&metrics)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            if text.contains("\nopsd_waiters 1\n") {
                break;
            }
            assert!(Instant::now() < give_up, "the Wait never parked");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let started = Instant::now();
    let status = opsd.terminate();
    assert!(status.success(), "opsd exited with {status}");
    let op = runtime
        .block_on(waiting)
        .unwrap()
        .expect("the open Wait returns OK with the latest state")
        .into_inner();
    assert!(!op.done);
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn help_documents_every_serve_flag() {
    let output = Command::new(env!("CARGO_BIN_EXE_opsd"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8(output.stdout).unwrap();
    for flag in [
        "--listen",
        "--store",
        "--retention",
        "--disable-method",
        "--log-format",
        "--wait-cap",
        "--drain-timeout",
        "--rest-routes",
        "--operation-error-details",
        "--header-read-timeout",
        "--body-read-timeout",
        "--idle-timeout",
        "--min-ping-interval",
        "--max-connections",
        "--max-in-flight",
        "--otlp-endpoint",
        "--otlp-queue-size",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
    let bad = Command::new(env!("CARGO_BIN_EXE_opsd"))
        .args(["serve", "--store", "nowhere"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown store"));
}

/// The text log lines of `opsd serve ARGS` up to the one that says it
/// listens, then the server is killed.
fn text_log_until_listening(args: &[&str], env: &[(&str, &str)]) -> String {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(env!("CARGO_BIN_EXE_opsd"))
        .args(["serve", "--store", "memory"])
        .args(args)
        .envs(env.iter().copied())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut log = String::new();
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        log.push_str(&line);
        log.push('\n');
        if line.contains("opsd listening") {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    log
}

#[test]
fn logs_off_a_terminal_carry_no_colour() {
    // stderr is a pipe here: no ANSI escapes, with or without NO_COLOR.
    let log = text_log_until_listening(&["--listen", "127.0.0.1:0"], &[]);
    assert!(log.contains("opsd listening"), "{log}");
    assert!(!log.contains('\u{1b}'), "{log:?}");
    let log = text_log_until_listening(&["--listen", "127.0.0.1:0"], &[("NO_COLOR", "1")]);
    assert!(!log.contains('\u{1b}'), "{log:?}");
    // Start-up says where its REST routes come from.
    assert!(log.contains("REST routes"), "{log}");
}

#[test]
fn listen_takes_a_host_name() {
    let log = text_log_until_listening(&["--listen", "localhost:0"], &[]);
    assert!(log.contains("address=127.0.0.1:"), "{log}");
    let bad = Command::new(env!("CARGO_BIN_EXE_opsd"))
        .args(["serve", "--store", "memory", "--listen", "localhost"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("give an IP address"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}
