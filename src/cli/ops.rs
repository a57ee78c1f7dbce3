//! `opsd ops`: the command line a person reaches for, a gRPC client of a
//! running server.
//!
//! ```text
//! opsd ops [--server ADDR] [--output text|json] list [PARENT] [--filter F] [--page-size N] [--all]
//! opsd ops get NAME | cancel NAME | delete NAME
//! opsd ops wait NAME [--timeout D]      prints progress while it waits
//! opsd ops watch [PARENT] [--filter F]  follows changes live
//! opsd ops health                       GET /healthz: exit 0 when serving
//! ```
//!
//! Text output is a table for lists and a one-line summary per operation
//! (name, state, age, progress); `--output json` prints ProtoJSON as the
//! REST surface writes it. Lists and summaries come from the console API
//! (`opsd.v1.Console`, which adds the times the standard `Operation` lacks);
//! cancel, delete and wait are the standard `google.longrunning` calls.
//!
//! Exit codes: 0 when the call succeeded; 64 + the gRPC code when it failed
//! (as grpcurl does: 69 NOT_FOUND, 78 UNAVAILABLE for a server that cannot
//! be reached); 3 when `wait --timeout` passed before the operation was
//! done; 2 for a usage error.

use std::{
    io::Write,
    process::ExitCode,
    time::{Duration, SystemTime},
};

use clap::{Args, Subcommand, ValueEnum};
use opsd::{
    api::{rest::render_operation, types::base_pool},
    pb::{
        google::longrunning::{
            operations_client::OperationsClient, CancelOperationRequest, DeleteOperationRequest,
            GetOperationRequest, ListOperationsRequest, Operation, WaitOperationRequest,
        },
        opsd::v1::{
            console_client::ConsoleClient, OperationChange, OperationInfo,
            WatchOperationChangesRequest,
        },
    },
};
use prost_reflect::DescriptorPool;
use serde_json::{json, Value};
use tonic::{
    metadata::{Ascii, MetadataValue},
    service::{interceptor::InterceptedService, Interceptor},
    transport::Channel,
    Code, Status,
};

#[derive(Args, Debug)]
pub struct OpsArgs {
    /// The server: `HOST:PORT` or `http://HOST:PORT`.
    #[arg(
        long,
        global = true,
        default_value = "127.0.0.1:50051",
        env = "OPSD_SERVER"
    )]
    server: String,

    /// A bearer token for a server with auth on (sent as `authorization:
    /// Bearer TOKEN` with every call).
    #[arg(long, global = true, env = "OPSD_TOKEN", hide_env_values = true)]
    token: Option<String>,

    /// `text`: a table for lists, a one-line summary per operation. `json`:
    /// ProtoJSON, as the REST surface writes it.
    #[arg(long, global = true, value_enum, default_value_t = Output::Text)]
    output: Output,

    #[command(subcommand)]
    command: OpsCommand,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum OpsCommand {
    /// List operations: under PARENT (`projects/p/locations/l`, `-` for any
    /// id at a level), or every operation when PARENT is left out (`-`).
    List {
        /// The parent or its `operations` collection; `-` (the default) for all.
        #[arg(default_value = "-")]
        parent: String,
        /// An AIP-160 filter, e.g. `done = false` (see the README).
        #[arg(long, default_value = "")]
        filter: String,
        /// Operations per page (the server's default is 50, its cap 1000).
        #[arg(long, default_value_t = 0)]
        page_size: i32,
        /// Resume a listing from a page token printed before.
        #[arg(long, default_value = "")]
        page_token: String,
        /// Walk every page, not only the first.
        #[arg(long)]
        all: bool,
    },
    /// Show one operation.
    Get { name: String },
    /// Cancel an operation (by its cancel policy), then show it.
    Cancel { name: String },
    /// Delete an operation (it is not cancelled).
    Delete { name: String },
    /// Wait until an operation is done, printing its progress meanwhile.
    Wait {
        name: String,
        /// Give up after this long (`30s`, `5m`); the default waits until done.
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<Duration>,
    },
    /// Follow changes live, under PARENT (every operation when left out).
    Watch {
        #[arg(default_value = "-")]
        parent: String,
        /// An AIP-160 filter for the operations to follow.
        #[arg(long, default_value = "")]
        filter: String,
        /// First show every selected operation as it is now.
        #[arg(long)]
        initial: bool,
    },
    /// Check the server's health (`GET /healthz`): print its status and exit
    /// 0 when it serves, 78 (64 + UNAVAILABLE) when it does not or cannot be
    /// reached within 5 s. For container health checks: no curl needed.
    Health,
}

/// Why a command stopped early.
enum Failure {
    /// A call failed: exit 64 + its code.
    Call(Status),
    /// `wait --timeout` passed first.
    StillRunning,
    /// Writing the output failed (a closed pipe): exit quietly.
    Output,
}

impl From<Status> for Failure {
    fn from(status: Status) -> Self {
        Failure::Call(status)
    }
}

impl From<std::io::Error> for Failure {
    fn from(_: std::io::Error) -> Self {
        Failure::Output
    }
}

/// The exit code of a failed call, as grpcurl's: 64 + the gRPC code.
fn exit_code(code: Code) -> u8 {
    64 + code as u8
}

pub async fn run(args: OpsArgs) -> ExitCode {
    let result = match args.command {
        OpsCommand::Health => health(&args.server, args.output).await,
        command => {
            async {
                let channel = connect(&args.server).await?;
                let bearer = Bearer::new(args.token.as_deref())?;
                let mut session = Session {
                    console: ConsoleClient::with_interceptor(channel.clone(), bearer.clone()),
                    operations: OperationsClient::with_interceptor(channel, bearer),
                    output: args.output,
                    pool: base_pool(),
                    out: std::io::stdout().lock(),
                };
                session.run(command).await
            }
            .await
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Call(status)) => {
            eprintln!(
                "opsd ops: {}: {}",
                code_name(status.code()),
                status.message()
            );
            ExitCode::from(exit_code(status.code()))
        }
        Err(Failure::StillRunning) => ExitCode::from(3),
        Err(Failure::Output) => ExitCode::SUCCESS,
    }
}

/// `opsd ops health`: plain HTTP, not a gRPC channel (see `cli::health`).
async fn health(server: &str, output: Output) -> Result<(), Failure> {
    let status = super::health::check(server).await?;
    let mut out = std::io::stdout().lock();
    match output {
        Output::Json => writeln!(out, "{}", json!({ "status": status }))?,
        Output::Text => writeln!(out, "{status}")?,
    }
    Ok(())
}

/// A channel to the server; a server that cannot be reached is UNAVAILABLE.
async fn connect(server: &str) -> Result<Channel, Status> {
    let url = if server.contains("://") {
        server.to_owned()
    } else {
        format!("http://{server}")
    };
    let endpoint = Channel::from_shared(url.clone())
        .map_err(|e| Status::invalid_argument(format!("--server {server:?}: {e}")))?
        .connect_timeout(Duration::from_secs(5));
    endpoint
        .connect()
        .await
        .map_err(|e| Status::unavailable(format!("cannot reach {url}: {e}")))
}

/// Adds `--token` to every call.
#[derive(Clone)]
struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    fn new(token: Option<&str>) -> Result<Self, Status> {
        token
            .filter(|t| !t.is_empty())
            .map(|t| {
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| Status::invalid_argument("--token is not ASCII"))
            })
            .transpose()
            .map(Self)
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A channel whose calls carry `--token`.
type Authorized = InterceptedService<Channel, Bearer>;

struct Session {
    console: ConsoleClient<Authorized>,
    operations: OperationsClient<Authorized>,
    output: Output,
    /// Renders `Any`s: the well-known types and opsd's own.
    pool: DescriptorPool,
    out: std::io::StdoutLock<'static>,
}

impl Session {
    async fn run(&mut self, command: OpsCommand) -> Result<(), Failure> {
        match command {
            OpsCommand::List {
                parent,
                filter,
                page_size,
                page_token,
                all,
            } => self.list(parent, filter, page_size, page_token, all).await,
            OpsCommand::Get { name } => {
                let info = self.info(&name).await?;
                self.show(&info)
            }
            OpsCommand::Cancel { name } => {
                self.operations
                    .cancel_operation(CancelOperationRequest { name: name.clone() })
                    .await?;
                let info = self.info(&name).await?;
                self.show(&info)
            }
            OpsCommand::Delete { name } => {
                self.operations
                    .delete_operation(DeleteOperationRequest { name: name.clone() })
                    .await?;
                match self.output {
                    Output::Json => writeln!(self.out, "{{}}")?,
                    Output::Text => writeln!(self.out, "{name} deleted")?,
                }
                Ok(())
            }
            OpsCommand::Wait { name, timeout } => self.wait(name, timeout).await,
            OpsCommand::Watch {
                parent,
                filter,
                initial,
            } => self.watch(parent, filter, initial).await,
            // Plain HTTP, answered by `run` before any gRPC session.
            OpsCommand::Health => unreachable!("`opsd ops health` needs no session"),
        }
    }

    async fn info(&mut self, name: &str) -> Result<OperationInfo, Status> {
        Ok(self
            .console
            .get_operation_info(GetOperationRequest {
                name: name.to_owned(),
            })
            .await?
            .into_inner())
    }

    async fn list(
        &mut self,
        parent: String,
        filter: String,
        page_size: i32,
        mut page_token: String,
        all: bool,
    ) -> Result<(), Failure> {
        let mut infos = Vec::new();
        let next = loop {
            let page = self
                .console
                .list_operation_infos(ListOperationsRequest {
                    name: parent.clone(),
                    filter: filter.clone(),
                    page_size,
                    page_token,
                    return_partial_success: false,
                })
                .await?
                .into_inner();
            infos.extend(page.operations);
            if !all || page.next_page_token.is_empty() {
                break page.next_page_token;
            }
            page_token = page.next_page_token;
        };
        match self.output {
            Output::Json => {
                let operations: Vec<Value> = infos
                    .iter()
                    .map(|info| render_operation(&operation_of(info), &self.pool))
                    .collect();
                let mut page = json!({ "operations": operations });
                if !next.is_empty() {
                    page["nextPageToken"] = json!(next);
                }
                self.json(&page)?;
            }
            Output::Text => {
                let now = SystemTime::now();
                let rows: Vec<[String; 4]> = infos
                    .iter()
                    .map(|info| {
                        let op = operation_of(info);
                        [
                            op.name.clone(),
                            state(info),
                            age(info, now),
                            progress(&op, &self.pool),
                        ]
                    })
                    .collect();
                table(&mut self.out, ["NAME", "STATE", "AGE", "PROGRESS"], &rows)?;
                if !next.is_empty() {
                    writeln!(self.out, "(more: --all, or --page-token {next})")?;
                }
            }
        }
        Ok(())
    }

    async fn wait(&mut self, name: String, timeout: Option<Duration>) -> Result<(), Failure> {
        let until = timeout.map(|t| tokio::time::Instant::now() + t);
        let mut shown: Option<String> = None;
        let mut first = true;
        loop {
            // A poll first, so the state shows at once; then short Waits, so
            // progress shows while the operation runs.
            let left = until.map(|u| u.saturating_duration_since(tokio::time::Instant::now()));
            let step = if first {
                Duration::ZERO
            } else {
                left.map_or(Duration::from_secs(1), |l| l.min(Duration::from_secs(1)))
            };
            first = false;
            let op = self
                .operations
                .wait_operation(WaitOperationRequest {
                    name: name.clone(),
                    timeout: Some(prost_types::Duration::try_from(step).unwrap_or_default()),
                })
                .await?
                .into_inner();
            if op.done {
                let info = self.info(&name).await?;
                return self.show(&info);
            }
            if self.output == Output::Text {
                let line = format!("{} running {}", op.name, progress(&op, &self.pool));
                if shown.as_deref() != Some(line.as_str()) {
                    writeln!(self.out, "{line}")?;
                    self.out.flush()?;
                    shown = Some(line);
                }
            }
            if until.is_some_and(|u| tokio::time::Instant::now() >= u) {
                if self.output == Output::Json {
                    self.json(&render_operation(&op, &self.pool))?;
                }
                eprintln!("opsd ops: {name} is still running after the timeout");
                return Err(Failure::StillRunning);
            }
        }
    }

    async fn watch(
        &mut self,
        parent: String,
        filter: String,
        initial: bool,
    ) -> Result<(), Failure> {
        let mut stream = self
            .console
            .watch_operation_changes(WatchOperationChangesRequest {
                parent,
                filter,
                send_initial: initial,
            })
            .await?
            .into_inner();
        while let Some(change) = stream.message().await? {
            self.change(&change)?;
        }
        Ok(())
    }

    /// One line per change.
    fn change(&mut self, change: &OperationChange) -> Result<(), Failure> {
        match (self.output, &change.info) {
            (Output::Json, Some(info)) => {
                self.json(&render_operation(&operation_of(info), &self.pool))?
            }
            (Output::Json, None) => self.json(&json!({"name": change.name, "deleted": true}))?,
            (Output::Text, Some(info)) => {
                let line = summary(info, &self.pool);
                writeln!(self.out, "{} {line}", clock_time(change))?;
            }
            (Output::Text, None) => {
                writeln!(self.out, "{} {} deleted", clock_time(change), change.name)?
            }
        }
        self.out.flush()?;
        Ok(())
    }

    fn show(&mut self, info: &OperationInfo) -> Result<(), Failure> {
        match self.output {
            Output::Json => self.json(&render_operation(&operation_of(info), &self.pool))?,
            Output::Text => {
                let line = summary(info, &self.pool);
                writeln!(self.out, "{line}")?;
                // What a one-line summary leaves out: the error's message.
                if let Some(error) = error_of(info) {
                    writeln!(self.out, "  error: {}", error.message)?;
                }
            }
        }
        Ok(())
    }

    fn json(&mut self, value: &Value) -> Result<(), Failure> {
        // One document per line: `jq` and scripts read it either way.
        let text = serde_json::to_string(value).map_err(|_| Failure::Output)?;
        writeln!(self.out, "{text}")?;
        Ok(())
    }
}

fn operation_of(info: &OperationInfo) -> Operation {
    info.operation.clone().unwrap_or_default()
}

fn error_of(info: &OperationInfo) -> Option<&opsd::pb::google::rpc::Status> {
    use opsd::pb::google::longrunning::operation::Result as OpResult;
    match info.operation.as_ref()?.result.as_ref()? {
        OpResult::Error(status) => Some(status),
        OpResult::Response(_) => None,
    }
}

/// `name  state  age  progress` on one line.
fn summary(info: &OperationInfo, pool: &DescriptorPool) -> String {
    let op = operation_of(info);
    format!(
        "{}  {}  {}  {}",
        op.name,
        state(info),
        age(info, SystemTime::now()),
        progress(&op, pool)
    )
}

/// running, cancelling (a cooperative cancel is pending), succeeded,
/// cancelled, or failed with its code's name.
fn state(info: &OperationInfo) -> String {
    let Some(op) = &info.operation else {
        return "unknown".into();
    };
    if !op.done {
        return if info.cancel_requested {
            "cancelling".into()
        } else {
            "running".into()
        };
    }
    match error_of(info) {
        None => "succeeded".into(),
        Some(status) if status.code == Code::Cancelled as i32 => "cancelled".into(),
        Some(status) => format!("failed ({})", code_name(Code::from_i32(status.code))),
    }
}

/// How long ago the operation was created: `42s`, `5m`, `3h`, `2d`.
fn age(info: &OperationInfo, now: SystemTime) -> String {
    let Some(created) = info.create_time.and_then(|t| SystemTime::try_from(t).ok()) else {
        return "-".into();
    };
    let secs = now.duration_since(created).unwrap_or_default().as_secs();
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// Progress from the metadata where it renders: a `progressPercent` (or
/// `progress_percent`) number, or a string metadata (`"25%"`); `-` otherwise.
fn progress(op: &Operation, pool: &DescriptorPool) -> String {
    let Some(metadata) = &op.metadata else {
        return "-".into();
    };
    let rendered = render_operation(
        &Operation {
            metadata: Some(metadata.clone()),
            ..Default::default()
        },
        pool,
    );
    let value = &rendered["metadata"];
    // A message renders its fields beside `@type`; a well-known type with
    // a JSON form of its own (Struct, StringValue) renders under `value`.
    let inner = &value["value"];
    for fields in [value, inner] {
        for key in ["progressPercent", "progress_percent"] {
            if let Some(number) = fields.get(key).and_then(Value::as_f64) {
                return format!("{number}%");
            }
        }
    }
    match (value["@type"].as_str(), inner) {
        (Some("type.googleapis.com/google.protobuf.StringValue"), Value::String(text)) => {
            text.clone()
        }
        _ => "-".into(),
    }
}

/// The time of a change as `HH:MM:SS` (UTC).
fn clock_time(change: &OperationChange) -> String {
    let secs = change
        .change_time
        .and_then(|t| SystemTime::try_from(t).ok())
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    let day = secs % 86_400;
    format!("{:02}:{:02}:{:02}", day / 3600, day % 3600 / 60, day % 60)
}

/// Left-aligned columns, two spaces apart.
fn table<W: Write>(out: &mut W, head: [&str; 4], rows: &[[String; 4]]) -> std::io::Result<()> {
    let mut widths = head.map(str::len);
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |out: &mut W, cells: [&str; 4]| {
        let mut text = String::new();
        for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<width$}  "));
            }
        }
        writeln!(out, "{}", text.trim_end())
    };
    line(out, head)?;
    for row in rows {
        line(out, [&row[0], &row[1], &row[2], &row[3]])?;
    }
    Ok(())
}

/// `NOT_FOUND`, `UNAVAILABLE`, ...
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_grpcurl() {
        assert_eq!(exit_code(Code::NotFound), 69);
        assert_eq!(exit_code(Code::Unavailable), 78);
        assert_eq!(exit_code(Code::InvalidArgument), 67);
    }

    #[test]
    fn ages_are_short() {
        let created = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let info = OperationInfo {
            create_time: Some(created.into()),
            ..Default::default()
        };
        let at = |secs| age(&info, created + Duration::from_secs(secs));
        assert_eq!(at(5), "5s");
        assert_eq!(at(600), "10m");
        assert_eq!(at(3 * 3600), "3h");
        assert_eq!(at(5 * 86_400), "5d");
        assert_eq!(age(&OperationInfo::default(), created), "-");
    }

    #[test]
    fn progress_reads_percentages_and_strings() {
        let pool = base_pool();
        let op = |metadata: prost_types::Any| Operation {
            metadata: Some(metadata),
            ..Default::default()
        };
        let text = prost_types::Any::from_msg(&"25%".to_owned()).unwrap();
        assert_eq!(progress(&op(text), &pool), "25%");
        let mut fields = std::collections::BTreeMap::new();
        fields.insert(
            "progressPercent".to_owned(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::NumberValue(42.0)),
            },
        );
        let structured = prost_types::Any {
            type_url: "type.googleapis.com/google.protobuf.Struct".into(),
            value: prost::Message::encode_to_vec(&prost_types::Struct { fields }),
        };
        assert_eq!(progress(&op(structured), &pool), "42%");
        let unknown = prost_types::Any {
            type_url: "type.googleapis.com/acme.Unknown".into(),
            value: vec![1, 2, 3],
        };
        assert_eq!(progress(&op(unknown), &pool), "-");
        assert_eq!(progress(&Operation::default(), &pool), "-");
    }

    #[test]
    fn tables_align_their_columns() {
        let mut out = Vec::new();
        let rows = [[
            "operations/a".to_owned(),
            "running".to_owned(),
            "5s".to_owned(),
            "-".to_owned(),
        ]];
        table(&mut out, ["NAME", "STATE", "AGE", "PROGRESS"], &rows).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "NAME          STATE    AGE  PROGRESS\noperations/a  running  5s   -\n"
        );
    }
}
