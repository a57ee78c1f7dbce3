//! `opsd ops`, the command line, against the real binary serving the
//! example scenario: every subcommand, text and JSON output, exit codes.

mod common;

use std::{
    io::{BufRead, BufReader},
    process::{Command, Output, Stdio},
    time::Duration,
};

use common::binary::Opsd;

fn scenario() -> String {
    format!(
        "{}/examples/scenarios/basic.yaml",
        env!("CARGO_MANIFEST_DIR")
    )
}

fn start() -> Opsd {
    Opsd::start(&["--store", "memory", "--scenario", &scenario()])
}

fn ops(server: &Opsd, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_opsd"))
        .args(["ops", "--server", &server.address])
        .args(args)
        .output()
        .unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn ok(output: Output) -> String {
    assert!(
        output.status.success(),
        "{:?}: {}{}",
        output.status,
        stdout(&output),
        String::from_utf8_lossy(&output.stderr)
    );
    stdout(&output)
}

#[test]
fn list_shows_a_table_of_every_operation() {
    let server = start();
    let table = ok(ops(&server, &["list"]));
    let mut lines = table.lines();
    let head: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(head, ["NAME", "STATE", "AGE", "PROGRESS"]);
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split_whitespace().collect()).collect();
    let row = |name: &str| {
        rows.iter()
            .find(|r| r[0] == name)
            .unwrap_or_else(|| panic!("{name} missing from\n{table}"))
    };
    assert_eq!(row("operations/running")[1], "running");
    assert_eq!(row("operations/running")[3], "started");
    assert_eq!(row("operations/succeeded")[1], "succeeded");
    assert_eq!(&row("operations/failed")[1..3], ["failed", "(INTERNAL)"]);
    assert!(
        row("operations/running")[2].ends_with('s'),
        "age in seconds"
    );

    // Filters and pages.
    let done = ok(ops(
        &server,
        &["list", "operations", "--filter", "done = true"],
    ));
    assert!(done.contains("operations/succeeded") && !done.contains("operations/running"));
    let first = ok(ops(&server, &["list", "--page-size", "2"]));
    assert_eq!(first.lines().count(), 1 + 2 + 1, "{first}");
    assert!(first.contains("--page-token"));
    let all = ok(ops(&server, &["list", "--page-size", "2", "--all"]));
    assert_eq!(all.lines().count(), 1 + 5, "{all}");

    // JSON: a ListOperationsResponse-shaped page of ProtoJSON operations.
    let json: serde_json::Value =
        serde_json::from_str(&ok(ops(&server, &["--output", "json", "list"]))).unwrap();
    assert_eq!(json["operations"].as_array().unwrap().len(), 5);
    assert_eq!(json["operations"][0]["name"], "operations/failed");
    assert_eq!(json["operations"][0]["error"]["code"], 13);
}

#[test]
fn get_cancel_delete_and_their_exit_codes() {
    let server = start();
    let line = ok(ops(&server, &["get", "operations/failed"]));
    assert!(
        line.starts_with("operations/failed  failed (INTERNAL)"),
        "{line}"
    );
    assert!(line.contains("error: The scripted job failed."), "{line}");

    let cancelled = ok(ops(&server, &["cancel", "operations/running"]));
    assert!(
        cancelled.starts_with("operations/running  cancelled"),
        "{cancelled}"
    );
    let json: serde_json::Value = serde_json::from_str(&ok(ops(
        &server,
        &["--output", "json", "get", "operations/running"],
    )))
    .unwrap();
    assert_eq!(json["done"], true);
    assert_eq!(json["error"]["code"], 1);

    // A refused cancel: FAILED_PRECONDITION (9) → 73.
    let refused = ops(&server, &["cancel", "operations/stubborn"]);
    assert_eq!(refused.status.code(), Some(64 + 9));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("FAILED_PRECONDITION"));

    assert!(ok(ops(&server, &["delete", "operations/succeeded"])).contains("deleted"));
    // NOT_FOUND (5) → 69, as grpcurl.
    let missing = ops(&server, &["get", "operations/succeeded"]);
    assert_eq!(missing.status.code(), Some(69));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("NOT_FOUND"));
    // An invalid name: INVALID_ARGUMENT (3) → 67.
    assert_eq!(
        ops(&server, &["get", "no/such/shape"]).status.code(),
        Some(67)
    );
}

#[test]
fn a_server_that_cannot_be_reached_is_unavailable() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    drop(listener);
    let output = Command::new(env!("CARGO_BIN_EXE_opsd"))
        .args(["ops", "--server", &address, "list"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64 + 14), "UNAVAILABLE");
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot reach"));
}

#[test]
fn wait_prints_progress_until_done_or_its_timeout() {
    let server = start();
    // `slow` reports 0%, 25%, 50%, 75% every 0.5 s and succeeds at 2 s.
    let waited = ok(ops(&server, &["wait", "operations/slow"]));
    let lines: Vec<&str> = waited.lines().collect();
    assert!(
        lines
            .first()
            .unwrap()
            .starts_with("operations/slow running"),
        "{waited}"
    );
    assert!(
        lines
            .last()
            .unwrap()
            .starts_with("operations/slow  succeeded"),
        "{waited}"
    );
    // Still running at the timeout: exit 3, with its progress shown.
    let timed_out = ops(
        &server,
        &["wait", "operations/stubborn", "--timeout", "300ms"],
    );
    assert_eq!(timed_out.status.code(), Some(3));
    assert!(stdout(&timed_out).contains("operations/stubborn running"));
}

#[test]
fn watch_follows_changes_live() {
    let server = start();
    let mut watch = Command::new(env!("CARGO_BIN_EXE_opsd"))
        .args(["ops", "--server", &server.address, "watch", "--initial"])
        .args(["--filter", "done = true"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = watch.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    let next = || rx.recv_timeout(Duration::from_secs(10)).expect("a line");
    // The initial state: the done operations. The stream is open from then on.
    let mut initial = [next(), next()];
    initial.sort();
    assert!(
        initial[0].contains("operations/failed  failed (INTERNAL)"),
        "{initial:?}"
    );
    assert!(
        initial[1].contains("operations/succeeded  succeeded"),
        "{initial:?}"
    );
    // Live: a cancel makes `running` done; a deletion is reported.
    ok(ops(&server, &["cancel", "operations/running"]));
    let line = next();
    assert!(line.contains("operations/running  cancelled"), "{line}");
    ok(ops(&server, &["delete", "operations/failed"]));
    let line = next();
    assert!(line.ends_with("operations/failed deleted"), "{line}");
    // Each line starts with the change's time.
    assert_eq!(line.as_bytes()[2], b':');
    watch.kill().unwrap();
    watch.wait().unwrap();
}

#[test]
fn a_token_goes_with_every_call_to_a_server_with_auth() {
    use common::auth::{claims, jwks, Dir, SigningKey, AUDIENCE, ISSUER};
    let dir = Dir::new("ops-cli-auth");
    let key = SigningKey::ec("k");
    let jwks = dir.write("jwks.json", &jwks(&[&key]));
    let server = Opsd::start(&[
        "--store",
        "memory",
        "--scenario",
        &scenario(),
        "--auth-jwks",
        jwks.to_str().unwrap(),
        "--auth-issuer",
        ISSUER,
        "--auth-audience",
        AUDIENCE,
    ]);
    // UNAUTHENTICATED (16) → 80.
    let refused = ops(&server, &["get", "operations/failed"]);
    assert_eq!(refused.status.code(), Some(64 + 16));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("UNAUTHENTICATED"));
    let token = key.sign(&claims("admin"));
    assert!(ok(ops(
        &server,
        &["--token", &token, "get", "operations/failed"]
    ))
    .starts_with("operations/failed"));
    let from_env = Command::new(env!("CARGO_BIN_EXE_opsd"))
        .args(["ops", "--server", &server.address, "list"])
        .env("OPSD_TOKEN", &token)
        .output()
        .unwrap();
    assert!(ok(from_env).contains("operations/failed"));
    // Health needs none.
    assert!(ok(ops(&server, &["health"])).contains("SERVING"));
}
