//! Tests that need a tool from outside the Rust toolchain (grpcurl,
//! Google's Python and Node client libraries, PostgreSQL, Chromium).
//!
//! Such a test file runs under its own harness (`harness = false` in
//! `Cargo.toml`, libtest-mimic), so a test whose tool is missing is never a
//! silent `ok`: locally it reports itself `ignored` and prints why, and under
//! `CI=true` (where `.ci/run` installs every tool) it fails with that reason.
//!
//! ```ignore
//! fn main() -> std::process::ExitCode {
//!     let python = common::outside::find_python();
//!     common::outside::run(vec![
//!         common::outside::test("lists_gets_cancels", &python, |python| { ... }),
//!     ])
//! }
//! ```

use std::{future::Future, process::ExitCode};

use libtest_mimic::{Arguments, Failed, Trial};

/// A tool a test needs: where it was found, or why it was not.
pub type Tool<T> = Result<T, String>;

/// Whether this run is CI's (`CI=true`), where nothing may be skipped.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// A test that runs `body` with the tool, or is ignored (failed under CI)
/// when the tool is missing.
pub fn test<T, F>(name: &str, tool: &Tool<T>, body: F) -> Trial
where
    T: Clone + Send + 'static,
    F: FnOnce(T) + Send + 'static,
{
    match tool.clone() {
        Ok(found) => Trial::test(name, move || {
            body(found);
            Ok(())
        }),
        Err(reason) if in_ci() => Trial::test(name, move || {
            Err(Failed::from(format!(
                "CI=true and a tool this test needs is missing: {reason}"
            )))
        }),
        Err(reason) => {
            eprintln!("{name}: ignored: {reason}");
            Trial::test(name, || Ok(())).with_ignored_flag(true)
        }
    }
}

/// A test that needs no outside tool, in a file of tests that do.
pub fn plain<F>(name: &str, body: F) -> Trial
where
    F: FnOnce() + Send + 'static,
{
    Trial::test(name, move || {
        body();
        Ok(())
    })
}

/// Runs the trials with the command line's filters (`cargo test -- NAME`).
/// A panicking trial fails (libtest-mimic catches it).
pub fn run(trials: Vec<Trial>) -> ExitCode {
    let args = Arguments::from_args();
    libtest_mimic::run(&args, trials).exit_code()
}

/// [`run`], one trial at a time (for trials that share a fault, such as
/// a database one of them kills).
pub fn run_serially(trials: Vec<Trial>) -> ExitCode {
    let mut args = Arguments::from_args();
    args.test_threads = Some(1);
    libtest_mimic::run(&args, trials).exit_code()
}

/// Runs `future` to completion on a fresh multi-threaded Tokio runtime: the
/// async body of one trial.
pub fn block_on<F: Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a Tokio runtime")
        .block_on(future)
}

/// A command that must run and exit 0 with `args` for the tool to count as
/// found (`grpcurl -version`, `python -c "import ..."`).
pub fn probe(program: &std::ffi::OsStr, args: &[&str]) -> bool {
    std::process::Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A Python that can `import` the modules of `imports` (a comma-separated
/// list, as `import` takes it): `$OPSD_PYTHON`, else the virtualenv
/// `.ci/run` makes (`target/ci-venv`), else `python3`; or why there is none,
/// with `install` as the hint.
pub fn find_python(imports: &str, install: &str) -> Tool<std::path::PathBuf> {
    use std::path::PathBuf;
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/ci-venv/bin/python");
    let probe_code = format!("import {imports}");
    std::env::var_os("OPSD_PYTHON")
        .map(PathBuf::from)
        .into_iter()
        .chain([venv, PathBuf::from("python3")])
        .find(|candidate| probe(candidate.as_os_str(), &["-c", &probe_code]))
        .ok_or_else(|| {
            format!("no Python that can import {imports} ({install}, or set OPSD_PYTHON)")
        })
}

/// A program of the test tools: in the virtualenv `.ci/run` makes
/// (`target/ci-venv/bin`, where pip puts console scripts), else on the
/// `PATH`; found when it runs with `args` and exits 0. Otherwise why not,
/// with `install` as the hint.
pub fn find_program(name: &str, args: &[&str], install: &str) -> Tool<std::path::PathBuf> {
    use std::path::PathBuf;
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target/ci-venv/bin")
        .join(name);
    [venv, PathBuf::from(name)]
        .into_iter()
        .find(|candidate| probe(candidate.as_os_str(), args))
        .ok_or_else(|| format!("no {name} ({install})"))
}

/// The `node_modules` folder where `node` can `require` every module of
/// `requires`: `$OPSD_NODE_MODULES`, else the one `.ci/run` fills
/// (`target/node/node_modules`); or why there is none, with the `npm
/// install` of `packages` as the hint.
pub fn find_node_modules(requires: &[&str], packages: &str) -> Tool<std::path::PathBuf> {
    use std::path::PathBuf;
    let modules = std::env::var_os("OPSD_NODE_MODULES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/node/node_modules")
        });
    let code: String = requires
        .iter()
        .map(|module| format!("require('{module}');"))
        .collect();
    let found = std::process::Command::new("node")
        .args(["-e", &code])
        .env("NODE_PATH", &modules)
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        Ok(modules)
    } else {
        Err(format!(
            "no node with {} in {} (npm install --prefix target/node {packages})",
            requires.join(", "),
            modules.display()
        ))
    }
}
