//! The example Python worker (`examples/python-worker/`) against the real
//! `opsd` binary, driven by a google-api-core client
//! (`tests/python/python_worker.py`): two exports started, their progress
//! watched, one cancelled (the worker stops within 1 s and finishes it
//! itself), the other finished with a typed response that REST renders; then
//! the worker stops cleanly on SIGTERM.
//!
//! The Python interpreter is `$OPSD_PYTHON`, else `target/ci-venv/bin/python`
//! (which `.ci/run` creates), else `python3`; it needs
//! `pip install "google-api-core[grpc]" grpcio-tools`. Without it the test
//! reports itself ignored, and fails under `CI=true` (`tests/common/outside.rs`).

mod common;

use std::{
    io::{BufRead, BufReader, Read},
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode, Stdio},
    sync::{Arc, Mutex},
};

use common::{
    binary::{self, Opsd},
    outside,
};

fn main() -> ExitCode {
    let python = outside::find_python(
        "google.api_core.operations_v1, grpc, grpc_tools.protoc",
        "pip install \"google-api-core[grpc]\" grpcio-tools",
    );
    outside::run(vec![outside::test(
        "python_worker_reports_progress_stops_on_cancel_and_completes",
        &python,
        python_worker_reports_progress_stops_on_cancel_and_completes,
    )])
}

fn repository() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The example worker, started as its README says, on a free port.
struct Worker {
    child: Child,
    address: String,
    /// Its log (stderr), shown when something fails.
    log: Arc<Mutex<String>>,
}

impl Worker {
    fn start(python: &Path, opsd: &str) -> Self {
        let mut child = Command::new(python)
            .arg("worker.py")
            .args(["--opsd", opsd, "--listen", "127.0.0.1:0"])
            // Progress every 0.5 s at 1,000 rows/s; a 2 s lease, renewed
            // every 2/3 s.
            .args(["--report-every", "0.5", "--lease", "2"])
            .current_dir(repository().join("examples/python-worker"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the worker starts");
        let log = Arc::new(Mutex::new(String::new()));
        let mut stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            let mut buffer = [0; 4096];
            while let Ok(n @ 1..) = stderr.read(&mut buffer) {
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buffer[..n]));
            }
        });
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next().and_then(Result::ok).unwrap_or_default();
        let Some(address) = first.strip_prefix("listening on ") else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the worker did not start: {first:?}\n{}",
                log.lock().unwrap()
            );
        };
        Self {
            address: address.to_owned(),
            child,
            log,
        }
    }

    /// SIGTERM, then the exit status (within 10 s).
    fn terminate(&mut self) -> std::process::ExitStatus {
        binary::terminate(&mut self.child).unwrap_or_else(|| {
            panic!(
                "the worker did not exit after SIGTERM\n{}",
                self.log.lock().unwrap()
            )
        })
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn python_worker_reports_progress_stops_on_cancel_and_completes(python: PathBuf) {
    let mut opsd = Opsd::start(&["--store", "memory"]);
    let mut worker = Worker::start(&python, &opsd.address);

    let client = Command::new(&python)
        .arg(repository().join("tests/python/python_worker.py"))
        .args([&worker.address, &opsd.address])
        .output()
        .expect("the client runs");
    let stdout = String::from_utf8_lossy(&client.stdout);
    let stderr = String::from_utf8_lossy(&client.stderr);
    assert!(
        client.status.success() && stdout.trim() == "ok",
        "the client failed:\n{stdout}\n{stderr}\nworker log:\n{}",
        worker.log.lock().unwrap()
    );

    let status = worker.terminate();
    let log = worker.log.lock().unwrap().clone();
    assert!(status.success(), "worker exit {status}\n{log}");
    // The worker's side of the story: the cancel reached it on its stream.
    assert!(log.contains("CANCEL_REQUESTED"), "{log}");
    assert!(log.contains("worker stopped"), "{log}");
    assert!(opsd.terminate().success());
}
