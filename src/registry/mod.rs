//! The Operations semantics: names, the state machine, cancel policies,
//! waiters, leases, retention and List queries.
//!
//! [`Registry`] is a cheap handle (cloning it is shallow) over a [`Store`].
//! Every state change is one conditional store write: the registry reads a
//! record, computes the next one and writes it only if the revision it read is
//! still current, retrying on conflict. So a cancel racing a completion ends
//! in exactly one terminal transition, whichever commits first.
//!
//! Background tasks (spawned by [`Registry::new`], so it needs a Tokio
//! runtime) follow the store's change feed: one wakes waiters, one fires lease,
//! cancel-grace and retention deadlines. They stop when the last handle is
//! dropped or [`Registry::shutdown`] is called.

mod deadlines;
pub mod filter;
mod follow;
mod list;
pub mod model;
mod name;
mod report;
pub(crate) mod scenario;
mod wait;
mod watch;

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, SystemTime},
};

use prost::Message;
use prost_types::Any;
use tokio_util::sync::CancellationToken;

use crate::{
    error::{Error, Precondition, ERROR_DOMAIN},
    pb::google::rpc,
    store::{Cause, Store, StoreError},
};

pub use crate::clock::{Clock, ManualClock};
pub use follow::Followed;
pub use list::{ListPage, ListRequest, Visibility};
pub use model::{
    operation, operation_info, CancelPolicy, Outcome, Record, Script, ScriptSpec, TraceLink,
};
pub use name::{check_id, check_parent_name, parse_list_target, NameError, OperationName};
pub use report::{Call, PollingReports, Report};
pub use wait::wait_budget;
pub use watch::{EventKind, WatchFilter, WorkerEvent};

use wait::Waiters;

/// The `google.rpc.Code` of a cancelled operation.
pub const CANCELLED_CODE: i32 = 1;
/// The `google.rpc.Code` of an operation whose worker lease lapsed.
pub const ABORTED_CODE: i32 = 10;

/// Tunables of the semantics; see `opsd serve --help` for each.
#[derive(Clone, Debug)]
pub struct RegistrySettings {
    /// How long done operations are kept.
    pub retention: Duration,
    /// The longest a single Wait blocks.
    pub wait_cap: Duration,
    /// How many Waits may be open at once; more → RESOURCE_EXHAUSTED.
    pub max_waiters: usize,
    /// How long a cooperative worker has to finish a cancelled operation.
    pub cancel_grace_period: Duration,
    /// The longest lease or grace period a worker may ask for.
    pub max_lease: Duration,
    /// The largest encoded List page.
    pub max_page_bytes: usize,
    /// The largest encoded operation (metadata and result together).
    pub max_operation_bytes: usize,
    /// How long a List page token stays valid.
    pub page_token_ttl: Duration,
    /// The page token key; `None` uses the store's own.
    pub page_token_key: Option<[u8; 32]>,
    /// Records one List page may examine before it returns early.
    pub list_scan_budget: usize,
    /// Which operations get polling reports.
    pub polling_reports: PollingReports,
    /// Where every time of the semantics comes from.
    pub clock: Clock,
    /// Whether the errors opsd writes into operations (cancel, grace expiry,
    /// lease expiry) carry an `ErrorInfo` detail (`--operation-error-details`).
    /// Off by default: Google's services send `{code, message}` only, and
    /// some clients cannot decode an `ErrorInfo` inside an operation.
    pub operation_error_details: bool,
}

impl Default for RegistrySettings {
    fn default() -> Self {
        Self {
            retention: Duration::from_secs(30 * 24 * 3600),
            wait_cap: Duration::from_secs(60),
            max_waiters: 100_000,
            cancel_grace_period: Duration::from_secs(30),
            max_lease: Duration::from_secs(7 * 24 * 3600),
            max_page_bytes: 4 * 1024 * 1024 - 64 * 1024,
            max_operation_bytes: 4 * 1024 * 1024 - 64 * 1024,
            page_token_ttl: Duration::from_secs(3 * 24 * 3600),
            page_token_key: None,
            list_scan_budget: 10_000,
            polling_reports: PollingReports::default(),
            clock: Clock::default(),
            operation_error_details: false,
        }
    }
}

/// What a worker asks for when it creates an operation.
#[derive(Clone, Debug, Default)]
pub struct CreateParams {
    /// `collection/id` pairs, or empty.
    pub parent: String,
    /// The id; a UUIDv7 when empty.
    pub operation_id: String,
    /// Idempotency key; empty for none.
    pub request_id: String,
    pub metadata: Option<Any>,
    pub cancel_policy: CancelPolicy,
    pub lease: Option<Duration>,
    pub cancel_grace_period: Option<Duration>,
    /// Makes opsd play the worker.
    pub script: Option<ScriptSpec>,
    /// The trace of the creating call (its `traceparent`), kept with the
    /// operation.
    pub trace: Option<TraceLink>,
}

/// The Operations methods a script may switch off, by their flag names.
const SCRIPT_METHODS: [(&str, &str); 3] = [
    ("cancel", "google.longrunning.Operations.CancelOperation"),
    ("delete", "google.longrunning.Operations.DeleteOperation"),
    ("wait", "google.longrunning.Operations.WaitOperation"),
];

/// A handle to the registry. Cloning it is shallow.
#[derive(Clone)]
pub struct Registry {
    shared: Arc<Shared>,
}

struct Shared {
    store: Arc<dyn Store>,
    settings: RegistrySettings,
    waiters: Arc<Waiters>,
    /// Open worker event streams, for stats and leak checks.
    watchers: Arc<AtomicUsize>,
    /// Cancelled on shutdown: open Waits return, event streams end, tasks stop.
    shutdown: CancellationToken,
    page_tokens: list::PageTokens,
    reports: Arc<report::Reports>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Registry {
    /// Creates a registry over `store` and starts its background tasks.
    pub fn new(store: Arc<dyn Store>, settings: RegistrySettings) -> Self {
        let key = settings
            .page_token_key
            .unwrap_or_else(|| store.page_token_key());
        let shared = Arc::new(Shared {
            page_tokens: list::PageTokens::new(key, settings.page_token_ttl),
            reports: Arc::new(report::Reports::default()),
            waiters: Arc::new(Waiters::new(settings.max_waiters)),
            store,
            settings,
            watchers: Arc::new(AtomicUsize::new(0)),
            shutdown: CancellationToken::new(),
        });
        wait::spawn_dispatcher(
            shared.store.subscribe(),
            shared.waiters.clone(),
            shared.reports.clone(),
            shared.shutdown.clone(),
        );
        deadlines::spawn(Arc::downgrade(&shared), shared.shutdown.clone());
        Self { shared }
    }

    /// The settings this registry runs with.
    pub fn settings(&self) -> &RegistrySettings {
        &self.shared.settings
    }

    /// The number of open Waits.
    pub fn waiter_count(&self) -> usize {
        self.shared.waiters.count()
    }

    /// The number of open worker event streams.
    pub fn watcher_count(&self) -> usize {
        self.shared.watchers.load(Ordering::Relaxed)
    }

    /// The number of stored operations, by state.
    pub async fn operation_counts(&self) -> Result<crate::store::Counts, Error> {
        Ok(self.shared.store.counts().await?)
    }

    /// Starts draining: open Waits return their latest state at once, worker
    /// event streams end, background tasks stop.
    pub fn shutdown(&self) {
        self.shared.shutdown.cancel();
    }

    /// Cancelled when the registry shuts down, for tasks that follow it.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shared.shutdown.clone()
    }

    /// Whether [`Registry::shutdown`] was called.
    pub fn is_shutting_down(&self) -> bool {
        self.shared.shutdown.is_cancelled()
    }

    /// The registry's clock's time.
    fn now(&self) -> SystemTime {
        self.shared.settings.clock.now()
    }

    fn store(&self) -> &dyn Store {
        self.shared.store.as_ref()
    }

    /// Reads an operation; a missing or expired one is NOT_FOUND.
    pub async fn get(&self, name: &str) -> Result<Record, Error> {
        let name = OperationName::parse(name)?;
        self.load(&name).await
    }

    async fn load(&self, name: &OperationName) -> Result<Record, Error> {
        match self.store().get(name.as_str()).await? {
            Some(stored) => {
                let record = Record::from_stored(stored)?;
                if expired(&record, self.now()) {
                    return Err(Error::not_found(name.as_str()));
                }
                Ok(record)
            }
            None => Err(Error::not_found(name.as_str())),
        }
    }

    /// Creates a running operation (worker API).
    pub async fn create(&self, params: CreateParams) -> Result<Record, Error> {
        check_parent_name(&params.parent).map_err(|e| e.for_field("parent"))?;
        let id = if params.operation_id.is_empty() {
            uuid::Uuid::now_v7().to_string()
        } else {
            check_id(&params.operation_id).map_err(|e| e.for_field("operation_id"))?;
            params.operation_id.clone()
        };
        let name =
            OperationName::new(&params.parent, &id).map_err(|e| e.for_field("operation_id"))?;
        if params.request_id.len() > 256 {
            return Err(Error::invalid("request_id", "must be at most 256 bytes"));
        }
        let lease = self.check_duration("lease", params.lease)?;
        let grace = self
            .check_duration("cancel_grace_period", params.cancel_grace_period)?
            .unwrap_or(self.shared.settings.cancel_grace_period);
        let request_id = (!params.request_id.is_empty()).then(|| params.request_id.clone());
        let now = self.now();
        let script = params
            .script
            .as_ref()
            .map(|spec| self.check_script(spec, now).map(Box::new))
            .transpose()?;
        if script.is_some() && lease.is_some() {
            return Err(Error::invalid(
                "lease",
                "a scripted operation has no worker to renew a lease",
            ));
        }
        let record = Record {
            name: name.clone().into_string(),
            revision: 0,
            metadata: params.metadata.clone(),
            outcome: None,
            cancel_policy: params.cancel_policy,
            cancel_grace_period: grace,
            cancel_deadline: None,
            lease,
            lease_deadline: lease.map(|l| now + l),
            request_id: request_id.clone(),
            create_time: now,
            update_time: now,
            done_time: None,
            expire_time: None,
            script,
            trace: params.trace.clone(),
        };
        // What a script does at once (steps and outcomes due at 0s) is
        // part of the creation.
        let (record, _) = settle_script(record, now, self.shared.settings.retention);
        self.check_size(&record, "metadata")?;
        loop {
            let existing = match self.store().insert(record.to_stored()).await {
                Ok(revision) => {
                    tracing::debug!(name = %record.name, "operation created");
                    return Ok(Record { revision, ..record });
                }
                Err(StoreError::Exists(existing)) => Record::from_stored(*existing)?,
                Err(other) => return Err(other.into()),
            };
            if !expired(&existing, now) {
                return Self::duplicate(&params, &name, request_id.as_ref(), existing);
            }
            // Retention has not swept it yet; it is gone all the same.
            match self
                .store()
                .delete(&existing.name, existing.revision, Cause::Expired)
                .await
            {
                Ok(()) | Err(StoreError::Conflict) => {}
                Err(other) => return Err(other.into()),
            }
        }
    }

    /// The answer to a create whose name or request id is taken: the
    /// existing operation for a retry of the same request, ALREADY_EXISTS
    /// otherwise.
    fn duplicate(
        params: &CreateParams,
        name: &OperationName,
        request_id: Option<&String>,
        existing: Record,
    ) -> Result<Record, Error> {
        let same_request = request_id.is_some() && existing.request_id.as_ref() == request_id;
        let same_target = existing.name == name.as_str()
            || (params.operation_id.is_empty() && existing.parent() == params.parent.as_str());
        if same_request && same_target {
            return Ok(existing);
        }
        let message = if existing.name == name.as_str() {
            format!("Operation \"{}\" already exists.", existing.name)
        } else {
            format!(
                "request_id \"{}\" was already used to create operation \"{}\".",
                params.request_id, existing.name
            )
        };
        Err(Error::AlreadyExists {
            name: existing.name,
            message,
        })
    }

    /// Refuses a record whose operation would not fit in a response.
    fn check_size(&self, record: &Record, field: &str) -> Result<(), Error> {
        let size = operation(record).encoded_len();
        let limit = self.shared.settings.max_operation_bytes;
        if size > limit {
            return Err(Error::invalid(
                field,
                format!(
                    "the operation would be {size} bytes; the limit is {limit} bytes \
                     (max(1,024, --max-message-size - 65,536): room for the envelope)"
                ),
            ));
        }
        Ok(())
    }

    /// Validates a script and makes its times absolute.
    fn check_script(&self, spec: &ScriptSpec, now: SystemTime) -> Result<Script, Error> {
        let max = self.shared.settings.max_lease;
        let check = |field: &str, d: Duration| {
            if d > max {
                Err(Error::invalid(
                    field,
                    format!("must be at most {}", humantime::format_duration(max)),
                ))
            } else {
                Ok(d)
            }
        };
        let check_outcome = |field: &str, outcome: &Outcome| match outcome {
            Outcome::Error(status) if !(1..=16).contains(&status.code) => Err(Error::invalid(
                field,
                format!(
                    "{} is not a google.rpc.Code of a failure (1 to 16)",
                    status.code
                ),
            )),
            _ => Ok(()),
        };
        let mut steps = Vec::with_capacity(spec.steps.len());
        for (after, metadata) in &spec.steps {
            steps.push((now + check("script.steps.after", *after)?, metadata.clone()));
        }
        steps.sort_by_key(|(at, _)| *at);
        let outcome = match &spec.outcome {
            Some((after, outcome)) => {
                check_outcome("script.outcome.error.code", outcome)?;
                Some((
                    now + check("script.outcome.after", *after)?,
                    outcome.clone(),
                ))
            }
            None => None,
        };
        let on_cancel = match &spec.on_cancel {
            Some((after, outcome)) => {
                check_outcome("script.on_cancel.error.code", outcome)?;
                Some((check("script.on_cancel.after", *after)?, outcome.clone()))
            }
            None => None,
        };
        for method in &spec.disabled_methods {
            if !SCRIPT_METHODS.iter().any(|(flag, _)| flag == method) {
                return Err(Error::invalid(
                    "script.disabled_methods",
                    format!("{method:?} cannot be switched off per operation; use cancel, delete or wait"),
                ));
            }
        }
        Ok(Script {
            steps,
            outcome,
            on_cancel,
            disabled_methods: spec.disabled_methods.clone(),
        })
    }

    /// Refuses a call that the operation's script switched off.
    fn enabled_for(record: &Record, method: &str) -> Result<(), Error> {
        let disabled = record
            .script
            .as_ref()
            .is_some_and(|s| s.disabled_methods.iter().any(|m| m == method));
        match SCRIPT_METHODS.iter().find(|(flag, _)| *flag == method) {
            Some((_, rpc)) if disabled => Err(Error::MethodDisabled {
                method: rpc,
                per_operation: true,
            }),
            _ => Ok(()),
        }
    }

    /// Whether calls on this operation are recorded in a polling report
    /// (`--polling-reports`: scripted operations, all, or none).
    pub fn keeps_report(&self, record: &Record) -> bool {
        match self.shared.settings.polling_reports {
            PollingReports::Off => false,
            PollingReports::Scripted => record.script.is_some(),
            PollingReports::All => true,
        }
    }

    /// Records a call on an operation in its polling report (for an
    /// operation that [`Registry::keeps_report`]).
    pub fn report_call(&self, name: &str, method: &'static str, transport: &'static str) {
        self.shared.reports.record(
            name,
            Call {
                method,
                time: self.now(),
                transport,
            },
        );
    }

    /// The polling report of an existing operation.
    pub async fn report(&self, name: &str) -> Result<(Record, Report), Error> {
        let name = OperationName::parse(name)?;
        let record = self.load(&name).await?;
        let report = self.shared.reports.get(name.as_str());
        Ok((record, report))
    }

    fn check_duration(
        &self,
        field: &str,
        value: Option<Duration>,
    ) -> Result<Option<Duration>, Error> {
        match value {
            Some(d) if d.is_zero() => Err(Error::invalid(field, "must be positive")),
            Some(d) if d > self.shared.settings.max_lease => Err(Error::invalid(
                field,
                format!(
                    "must be at most {}",
                    humantime::format_duration(self.shared.settings.max_lease)
                ),
            )),
            other => Ok(other),
        }
    }

    /// Replaces the metadata of a running operation and renews its lease.
    pub async fn update(&self, name: &str, metadata: Option<Any>) -> Result<Record, Error> {
        let name = OperationName::parse(name)?;
        self.on_deadline(name.as_str()).await?;
        self.modify(&name, |record, now| {
            if record.done() {
                return Err(Error::already_done(&record.name));
            }
            let mut next = record.clone();
            if let Some(metadata) = &metadata {
                next.metadata = Some(metadata.clone());
            }
            next.lease_deadline = record.lease.map(|l| now + l);
            next.update_time = now;
            self.check_size(&next, "metadata")?;
            Ok(Some((next, Cause::Updated)))
        })
        .await
        .map(|(record, _)| record)
    }

    /// Finishes a running operation with the worker's outcome.
    pub async fn complete(
        &self,
        name: &str,
        outcome: Outcome,
        metadata: Option<Any>,
    ) -> Result<Record, Error> {
        let name = OperationName::parse(name)?;
        if let Outcome::Error(status) = &outcome {
            if !(1..=16).contains(&status.code) {
                return Err(Error::invalid(
                    "error.code",
                    format!(
                        "{} is not a google.rpc.Code of a failure (1 to 16)",
                        status.code
                    ),
                ));
            }
        }
        let settings = &self.shared.settings;
        self.on_deadline(name.as_str()).await?;
        let result = self
            .modify(&name, |record, now| {
                if record.done() {
                    return Err(Error::already_done(&record.name));
                }
                let mut next = finish(record, outcome.clone(), now, settings.retention);
                if let Some(metadata) = &metadata {
                    next.metadata = Some(metadata.clone());
                }
                self.check_size(&next, "result")?;
                Ok(Some((next, Cause::Completed)))
            })
            .await?;
        tracing::debug!(name = %name, "operation completed");
        Ok(result.0)
    }

    /// Cancels an operation according to its cancel policy. Done → OK
    /// unchanged. Returns the operation as the cancel left it.
    pub async fn cancel(&self, name: &str) -> Result<Record, Error> {
        let name = OperationName::parse(name)?;
        let settings = &self.shared.settings;
        let (record, changed) = self
            .modify(&name, |record, now| {
                Self::enabled_for(record, "cancel")?;
                if record.done() {
                    return Ok(None);
                }
                match record.cancel_policy {
                    CancelPolicy::NotCancellable => Err(Error::FailedPrecondition {
                        name: record.name.clone(),
                        reason: Precondition::NotCancellable,
                        message: format!("Operation \"{}\" cannot be cancelled.", record.name),
                    }),
                    CancelPolicy::Immediate => Ok(Some((
                        finish(
                            record,
                            Outcome::Error(cancelled_status(settings.operation_error_details)),
                            now,
                            settings.retention,
                        ),
                        Cause::Cancelled,
                    ))),
                    CancelPolicy::Cooperative if record.cancel_deadline.is_some() => Ok(None),
                    CancelPolicy::Cooperative => {
                        let mut next = record.clone();
                        // A script answers after its own delay (at once when it
                        // has none); a real worker gets the grace period.
                        let wait = match &record.script {
                            Some(script) => script
                                .on_cancel
                                .as_ref()
                                .map_or(Duration::ZERO, |(d, _)| *d),
                            None => record.cancel_grace_period,
                        };
                        next.cancel_deadline = Some(now + wait);
                        next.update_time = now;
                        Ok(Some((next, Cause::CancelRequested)))
                    }
                }
            })
            .await?;
        if changed {
            tracing::debug!(name = %name, "operation cancel requested");
        }
        Ok(record)
    }

    /// Deletes an operation, running or done. It is not cancelled; its worker
    /// is told. Returns the operation as it was.
    pub async fn delete(&self, name: &str) -> Result<Record, Error> {
        let name = OperationName::parse(name)?;
        loop {
            let record = self.load(&name).await?;
            Self::enabled_for(&record, "delete")?;
            match self
                .store()
                .delete(&record.name, record.revision, Cause::Deleted)
                .await
            {
                Ok(()) => {
                    tracing::debug!(name = %name, "operation deleted");
                    return Ok(record);
                }
                Err(StoreError::Conflict) => continue,
                Err(other) => return Err(other.into()),
            }
        }
    }

    /// The read-compute-conditional-write loop behind every state change.
    /// `step` sees the current record and returns the next one with its
    /// cause, `None` to leave it unchanged, or an error. On a revision
    /// conflict it runs again on the fresh record.
    async fn modify<F>(&self, name: &OperationName, mut step: F) -> Result<(Record, bool), Error>
    where
        F: FnMut(&Record, SystemTime) -> Result<Option<(Record, Cause)>, Error>,
    {
        loop {
            let record = self.load(name).await?;
            let Some((next, cause)) = step(&record, self.now())? else {
                return Ok((record, false));
            };
            match self
                .store()
                .update(next.to_stored(), record.revision, cause)
                .await
            {
                Ok(revision) => return Ok((Record { revision, ..next }, true)),
                Err(StoreError::Conflict) => continue,
                Err(other) => return Err(other.into()),
            }
        }
    }
}

/// Whether retention has already removed this record in all but fact.
fn expired(record: &Record, now: SystemTime) -> bool {
    record.expire_time.is_some_and(|t| t <= now)
}

/// The record of `record` finished with `outcome` at `now`.
fn finish(record: &Record, outcome: Outcome, now: SystemTime, retention: Duration) -> Record {
    let mut next = record.clone();
    next.outcome = Some(outcome);
    next.done_time = Some(now);
    next.update_time = now;
    next.expire_time = Some(now + retention);
    next.lease_deadline = None;
    next.cancel_deadline = None;
    next
}

/// Applies the steps and the outcome of `record`'s script that are due at
/// `now`. Returns the record and the cause of the change, if any.
fn settle_script(
    mut record: Record,
    now: SystemTime,
    retention: Duration,
) -> (Record, Option<Cause>) {
    if record.done() {
        return (record, None);
    }
    let Some(script) = record.script.as_mut() else {
        return (record, None);
    };
    // Steps after the outcome never happen.
    let horizon = match &script.outcome {
        Some((at, _)) => now.min(*at),
        None => now,
    };
    let due = script
        .steps
        .iter()
        .take_while(|(at, _)| *at <= horizon)
        .count();
    let mut cause = None;
    if due > 0 {
        let (_, metadata) = script.steps.drain(..due).next_back().expect("due > 0");
        record.metadata = Some(metadata);
        record.update_time = now;
        cause = Some(Cause::Updated);
    }
    let outcome = match &script.outcome {
        Some((at, outcome)) if *at <= now => Some(outcome.clone()),
        _ => None,
    };
    if let Some(outcome) = outcome {
        if let Some(script) = record.script.as_mut() {
            script.outcome = None;
            // Steps after the outcome never happen.
            script.steps.clear();
        }
        record = finish(&record, outcome, now, retention);
        cause = Some(Cause::Completed);
    }
    (record, cause)
}

/// An `Any` holding `message`.
fn pack<M: prost::Name>(message: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: message.encode_to_vec(),
    }
}

/// An error opsd writes into an operation: `{code, message}` and no
/// details, as Google's services finish a cancelled operation, so every
/// client can decode it (a client's type registry may hold no
/// `google.rpc.ErrorInfo`). With `details` (`--operation-error-details`) it
/// also carries an `ErrorInfo` with the stable `reason`.
fn error_status(code: i32, message: String, reason: &str, details: bool) -> rpc::Status {
    let details = if details {
        vec![pack(&rpc::ErrorInfo {
            reason: reason.to_owned(),
            domain: ERROR_DOMAIN.to_owned(),
            metadata: Default::default(),
        })]
    } else {
        Vec::new()
    };
    rpc::Status {
        code,
        message,
        details,
    }
}

/// The error of a cancelled operation (`ErrorInfo` reason
/// `OPERATION_CANCELLED` with `details`).
pub fn cancelled_status(details: bool) -> rpc::Status {
    error_status(
        CANCELLED_CODE,
        "Operation was cancelled.".to_owned(),
        "OPERATION_CANCELLED",
        details,
    )
}

/// The error of an operation whose worker lease lapsed (`ErrorInfo` reason
/// `WORKER_LEASE_EXPIRED` with `details`).
pub fn lease_expired_status(lease: Option<Duration>, details: bool) -> rpc::Status {
    let message = match lease {
        Some(lease) => format!(
            "The worker's lease expired: no update within {}.",
            humantime::format_duration(lease)
        ),
        None => "The worker's lease expired.".to_owned(),
    };
    error_status(ABORTED_CODE, message, "WORKER_LEASE_EXPIRED", details)
}

#[cfg(test)]
mod tests;
