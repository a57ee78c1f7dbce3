//! The README's auth worked example, run as written (with the built `opsd`
//! on a free port): a key made with openssl, its JWKS, a policy, RS256
//! tokens minted in the shell, calls with grpcurl and curl. Needs bash,
//! openssl, xxd, curl and grpcurl (`.ci/run` installs them); without one
//! the test reports itself ignored, and fails under `CI=true`.

mod common;

use std::process::{Command, ExitCode};

use common::outside;

fn main() -> ExitCode {
    let tools = ["bash", "openssl", "xxd", "curl", "grpcurl"]
        .into_iter()
        .find(|tool| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map_or(Ok(()), |missing| {
            Err(format!("{missing} is not on the PATH"))
        });
    outside::run(vec![outside::test(
        "the_readme_auth_example_runs_as_written",
        &tools,
        |()| the_readme_auth_example_runs_as_written(),
    )])
}

/// The shell block under "### A worked example".
fn example() -> String {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme
        .split_once("### A worked example")
        .expect("the README has the worked example")
        .1;
    let block = section.split_once("```sh\n").unwrap().1;
    block.split_once("```").unwrap().0.to_owned()
}

fn the_readme_auth_example_runs_as_written() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut script = String::from("set -euo pipefail\n");
    for line in example().lines() {
        if let Some(rest) = line.strip_prefix("opsd serve ") {
            script.push_str(&format!(
                "\"$OPSD\" serve --listen 127.0.0.1:{port} {rest}\n"
            ));
            continue;
        }
        let line = line.replace("127.0.0.1:50051", &format!("127.0.0.1:{port}"));
        script.push_str(&line);
        script.push('\n');
        if line.trim_end().ends_with('&') {
            // The server started: stop it at the end, and wait for its port.
            script.push_str(&format!(
                "server=$!\ntrap 'kill $server' EXIT\n\
                 for _ in $(seq 1 200); do curl -sf http://127.0.0.1:{port}/healthz >/dev/null && break; sleep 0.05; done\n"
            ));
        }
    }
    let dir = std::env::temp_dir().join(format!("opsd-auth-readme-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let output = Command::new("bash")
        .args(["-c", &script])
        .current_dir(&dir)
        .env("OPSD", env!("CARGO_BIN_EXE_opsd"))
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).ok();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{script}\n{stdout}\n{stderr}");
    // Created by the worker, read by alice over gRPC and REST.
    assert_eq!(
        stdout
            .matches(r#""name": "projects/a/operations/job-1""#)
            .count(),
        3,
        "{stdout}"
    );
    for expected in [
        "Permission 'operations.get' denied on resource 'projects/b/operations/job-1' (or it may not exist).",
        "Permission 'operations.cancel' denied",
        "401 Unauthorized",
        r#"error="invalid_token""#,
    ] {
        assert!(stdout.contains(expected), "{expected} not in\n{stdout}");
    }
}
