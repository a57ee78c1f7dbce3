//! The `opsd` binary, started as users start it.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// A running `opsd serve` on a free port.
pub struct Opsd {
    pub child: Child,
    pub address: String,
}

impl Opsd {
    pub fn start(extra: &[&str]) -> Self {
        Self::start_on("127.0.0.1:0", extra)
    }

    /// Starts `opsd serve` listening on `address`.
    pub fn start_on(address: &str, extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_opsd"))
            .args(["serve", "--listen", address, "--log-format", "json"])
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

    pub fn terminate(&mut self) -> std::process::ExitStatus {
        terminate(&mut self.child).expect("opsd exits within 10 s of SIGTERM")
    }
}

/// Sends `child` SIGTERM and waits (10 s at most) for its exit status;
/// `None` when it is still running then.
pub fn terminate(child: &mut Child) -> Option<std::process::ExitStatus> {
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Opsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
