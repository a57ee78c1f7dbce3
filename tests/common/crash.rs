//! The crash-consistency harness shared by the redb and PostgreSQL crash
//! tests (`tests/crash_durability.rs`, `tests/crash_postgres.rs`): a model
//! of every acknowledged result, clients that drive real `opsd` binaries
//! and record what was acknowledged, and the check of a restarted (or
//! recovered) server against the model.
//!
//! Checked: 0 acknowledged creates lost, 0 acknowledged completions or
//! cancels lost or changed, 0 deleted operations resurrected, 0 duplicates
//! for a retried `request_id`, no operation in an impossible state (`done`
//! without a result, a result that changed after done).

use std::{
    collections::HashMap,
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use opsd::pb::{
    google::longrunning::{
        operation::Result as OpResult, operations_client::OperationsClient, CancelOperationRequest,
        DeleteOperationRequest, GetOperationRequest, Operation,
    },
    opsd::v1::{
        complete_operation_request, workers_client::WorkersClient, CompleteOperationRequest,
        CreateOperationRequest, UpdateOperationRequest,
    },
};
use tonic::{transport::Channel, Code};

pub const CLIENTS: usize = 8;
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// A small deterministic generator (xorshift64*), seeded per run.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What clients know about one operation.
#[derive(Clone, Debug, Default)]
struct Known {
    request_id: String,
    /// The response payload of an acknowledged CompleteOperation.
    completed: Option<String>,
    /// Payloads of completions sent but not acknowledged (they may have landed).
    attempted: Vec<String>,
    cancel_acked: bool,
    delete_acked: bool,
    /// A delete was sent; it may have landed.
    delete_sent: bool,
    /// The first done state seen; it must never change.
    first_done: Option<Operation>,
    /// The request-id retry was checked.
    retried: bool,
}

#[derive(Default)]
pub struct Model {
    ops: HashMap<String, Known>,
    names: Vec<String>,
    counter: u64,
}

impl Model {
    /// Adds what clients were told to `report`.
    pub fn count_acknowledged(&self, report: &mut Report) {
        report.acked_creates = self.ops.len();
        report.acked_completions = self.ops.values().filter(|k| k.completed.is_some()).count();
        report.acked_cancels = self.ops.values().filter(|k| k.cancel_acked).count();
        report.acked_deletes = self.ops.values().filter(|k| k.delete_acked).count();
    }
}

/// What the harness found.
#[derive(Debug, Default)]
pub struct Report {
    pub cycles: usize,
    pub acked_creates: usize,
    pub acked_completions: usize,
    pub acked_cancels: usize,
    pub acked_deletes: usize,
    pub lost_creates: usize,
    pub lost_or_changed_results: usize,
    pub resurrected: usize,
    pub duplicates: usize,
    pub impossible: usize,
}

impl Report {
    pub fn violations(&self) -> usize {
        self.lost_creates
            + self.lost_or_changed_results
            + self.resurrected
            + self.duplicates
            + self.impossible
    }
}

pub fn payload(any: &prost_types::Any) -> String {
    any.to_msg::<String>().unwrap_or_default()
}

/// Checks every acknowledged fact against the restarted server, 32
/// operations at a time.
pub async fn verify(url: &str, model: &Arc<Mutex<Model>>, report: &mut Report) {
    let channel = Channel::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let names: Vec<String> = model.lock().unwrap().names.clone();
    for chunk in names.chunks(32) {
        let mut checks = tokio::task::JoinSet::new();
        for name in chunk {
            let known = model.lock().unwrap().ops[name].clone();
            checks.spawn(check_one(channel.clone(), name.clone(), known));
        }
        while let Some(checked) = checks.join_next().await {
            let (name, found, retried) = checked.unwrap();
            report.lost_creates += found.lost_creates;
            report.lost_or_changed_results += found.lost_or_changed_results;
            report.resurrected += found.resurrected;
            report.duplicates += found.duplicates;
            report.impossible += found.impossible;
            let mut m = model.lock().unwrap();
            let known = m.ops.get_mut(&name).unwrap();
            known.retried |= retried;
            if let Some(done) = found.first_done {
                known.first_done.get_or_insert(done);
            }
        }
    }
}

/// The violations found on one operation, and its done state if any.
#[derive(Default)]
struct Found {
    lost_creates: usize,
    lost_or_changed_results: usize,
    resurrected: usize,
    duplicates: usize,
    impossible: usize,
    first_done: Option<Operation>,
}

async fn check_one(channel: Channel, name: String, known: Known) -> (String, Found, bool) {
    let mut ops = OperationsClient::new(channel.clone());
    let mut workers = WorkersClient::new(channel);
    let mut found = Found::default();
    // A server that is still reconnecting to its database answers
    // UNAVAILABLE for a moment.
    let give_up = Instant::now() + Duration::from_secs(30);
    let got = loop {
        match ops
            .get_operation(GetOperationRequest { name: name.clone() })
            .await
        {
            Err(status) if status.code() == Code::Unavailable && Instant::now() < give_up => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => break other,
        }
    };
    let op = match got {
        Err(status) if status.code() == Code::NotFound => {
            if !known.delete_sent {
                eprintln!("LOST CREATE: {name}");
                found.lost_creates += 1;
            }
            return (name, found, false);
        }
        Err(status) => panic!("get {name}: {status}"),
        Ok(op) => op.into_inner(),
    };
    if known.delete_acked {
        eprintln!("RESURRECTED: {name}");
        found.resurrected += 1;
        return (name, found, false);
    }
    if op.done != op.result.is_some() {
        eprintln!("IMPOSSIBLE: {name}: {op:?}");
        found.impossible += 1;
    }
    if let Some(first) = &known.first_done {
        if *first != op {
            eprintln!("CHANGED AFTER DONE: {name}: {first:?} → {op:?}");
            found.impossible += 1;
        }
    }
    let result_ok = match (&known.completed, known.cancel_acked, &op.result) {
        (Some(p), _, Some(OpResult::Response(r))) => payload(r) == *p,
        (Some(_), _, _) => false,
        (None, true, Some(OpResult::Error(e))) => e.code == 1,
        (None, true, Some(OpResult::Response(r))) => known.attempted.contains(&payload(r)),
        (None, true, None) => false,
        (None, false, Some(OpResult::Response(r))) => known.attempted.contains(&payload(r)),
        (None, false, _) => true,
    };
    if !result_ok {
        eprintln!("LOST OR CHANGED RESULT: {name}: {known:?} but {op:?}");
        found.lost_or_changed_results += 1;
    }
    if op.done {
        found.first_done = Some(op.clone());
    }
    // A retried create with the same request id returns this operation
    // (checked once per operation, which keeps the harness linear).
    let mut retried = false;
    if !known.delete_sent && !known.retried {
        retried = true;
        let retry = CreateOperationRequest {
            parent: "projects/crash".into(),
            request_id: known.request_id.clone(),
            ..Default::default()
        };
        let again = loop {
            match workers.create_operation(retry.clone()).await {
                Err(status) if status.code() == Code::Unavailable && Instant::now() < give_up => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => break other,
            }
        };
        match again {
            Ok(again) if again.get_ref().name == name => {}
            other => {
                eprintln!("DUPLICATE for request id of {name}: {other:?}");
                found.duplicates += 1;
            }
        }
    }
    (name, found, retried)
}

/// A call's answer within [`CALL_TIMEOUT`]; a call that takes longer is
/// a server that died (`None`: the client stops), or one whose database
/// stalls (with `until`: a failure like any other).
async fn timed<T>(
    call: impl std::future::Future<Output = Result<T, tonic::Status>>,
    until: Option<Instant>,
) -> Option<Result<T, tonic::Status>> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(answer) => Some(answer),
        Err(_) if until.is_none() => None,
        Err(_) => Some(Err(tonic::Status::deadline_exceeded("call timed out"))),
    }
}

/// Notes a fact about `name` in the model.
fn note(model: &Mutex<Model>, name: &str, fact: impl FnOnce(&mut Known)) {
    if let Some(known) = model.lock().unwrap().ops.get_mut(name) {
        fact(known);
    }
}

/// One client's work: until the server dies under it (`until` is `None`),
/// or until `until`, carrying on past failed calls (the server lives, its
/// database fails under it).
pub async fn client(url: String, model: Arc<Mutex<Model>>, seed: u64, until: Option<Instant>) {
    let Ok(channel) = Channel::from_shared(url).unwrap().connect().await else {
        return;
    };
    let mut ops = OperationsClient::new(channel.clone());
    let mut workers = WorkersClient::new(channel);
    let mut rng = Rng::new(seed);
    loop {
        if until.is_some_and(|until| Instant::now() >= until) {
            return;
        }
        let (pick, n) = {
            let mut m = model.lock().unwrap();
            m.counter += 1;
            let pick = (!m.names.is_empty())
                .then(|| m.names[rng.below(m.names.len() as u64) as usize].clone());
            (pick, m.counter)
        };
        let action = rng.below(100);
        let answer: Option<Result<(), tonic::Status>> = match (action, pick) {
            (0..=29, _) | (_, None) => {
                let request_id = format!("req-{seed}-{n}");
                let request = CreateOperationRequest {
                    parent: "projects/crash".into(),
                    request_id: request_id.clone(),
                    metadata: Some(prost_types::Any::from_msg(&format!("m{n}")).unwrap()),
                    ..Default::default()
                };
                timed(workers.create_operation(request), until)
                    .await
                    .map(|answer| {
                        let name = answer?.into_inner().name;
                        let mut m = model.lock().unwrap();
                        if !m.ops.contains_key(&name) {
                            m.names.push(name.clone());
                            let known = Known {
                                request_id,
                                ..Default::default()
                            };
                            m.ops.insert(name, known);
                        }
                        Ok(())
                    })
            }
            (30..=44, Some(name)) => {
                let request = UpdateOperationRequest {
                    name,
                    metadata: Some(prost_types::Any::from_msg(&format!("u{n}")).unwrap()),
                };
                timed(workers.update_operation(request), until)
                    .await
                    .map(|answer| answer.map(drop))
            }
            (45..=69, Some(name)) => {
                let p = format!("p{seed}-{n}");
                note(&model, &name, |k| k.attempted.push(p.clone()));
                let request = CompleteOperationRequest {
                    name: name.clone(),
                    result: Some(complete_operation_request::Result::Response(
                        prost_types::Any::from_msg(&p).unwrap(),
                    )),
                    metadata: None,
                };
                timed(workers.complete_operation(request), until)
                    .await
                    .map(|answer| {
                        answer?;
                        note(&model, &name, |k| k.completed = Some(p));
                        Ok(())
                    })
            }
            (70..=89, Some(name)) => {
                let request = CancelOperationRequest { name: name.clone() };
                timed(ops.cancel_operation(request), until)
                    .await
                    .map(|answer| {
                        answer?;
                        note(&model, &name, |k| k.cancel_acked = true);
                        Ok(())
                    })
            }
            (_, Some(name)) => {
                note(&model, &name, |k| k.delete_sent = true);
                let request = DeleteOperationRequest { name: name.clone() };
                timed(ops.delete_operation(request), until)
                    .await
                    .map(|answer| {
                        answer?;
                        note(&model, &name, |k| k.delete_acked = true);
                        Ok(())
                    })
            }
        };
        match answer {
            // The server stalled: it died.
            None => return,
            Some(Ok(())) => {}
            // Expected answers of a busy registry.
            Some(Err(s)) if matches!(s.code(), Code::NotFound | Code::FailedPrecondition) => {}
            // The database failed under a living server: carry on.
            Some(Err(_)) if until.is_some() => tokio::time::sleep(Duration::from_millis(10)).await,
            // The server died: this client's work for the cycle is over.
            Some(Err(_)) => return,
        }
    }
}

/// A running `opsd serve` binary.
pub struct Server {
    child: Child,
    pub url: String,
}

impl Server {
    /// Starts `opsd serve --store STORE EXTRA...`; with `negative_control`,
    /// the failpoint that acknowledges writes before they are durable.
    pub fn start(store: &str, extra: &[&str], negative_control: bool) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_opsd"));
        command
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--log-format",
                "json",
                "--store",
                store,
            ])
            .args(extra)
            .env("RUST_LOG", "warn,opsd::server=info")
            .stderr(Stdio::piped());
        if negative_control {
            command.env("OPSD_FAILPOINT_NON_DURABLE_ACK", "1");
        } else {
            command.env_remove("OPSD_FAILPOINT_NON_DURABLE_ACK");
        }
        let mut child = command.spawn().expect("opsd starts");
        let stderr = child.stderr.take().unwrap();
        let mut lines = BufReader::new(stderr).lines();
        let address = loop {
            let Some(line) = lines.next() else {
                let status = child.wait().unwrap();
                panic!("opsd exited before listening: {status}");
            };
            let line = line.unwrap();
            if let Some(rest) = line.split("\"address\":\"").nth(1) {
                break rest.split('"').next().unwrap().to_owned();
            }
        };
        std::thread::spawn(move || for _ in lines {});
        Self {
            child,
            url: format!("http://{address}"),
        }
    }

    /// `kill -9`, and waits for the process to be gone.
    pub fn kill(mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }
}
