//! The domain model: what an operation is, and its conversions.
//!
//! [`Record`] is everything opsd knows of one operation; [`CancelPolicy`],
//! [`Outcome`] and [`Script`] are its parts. They convert here, and only
//! here, to and from:
//!
//! - the storage schema, [`StoredRecord`] (the store indexes a few of its
//!   fields and keeps the rest as data);
//! - the wire: `opsd.v1` requests ([`CancelPolicy::from_wire`],
//!   [`ScriptSpec::from_wire`]) and the `google.longrunning.Operation`
//!   clients see ([`operation`]).

use std::time::{Duration, SystemTime};

use prost_types::Any;

use crate::{
    error::Error,
    pb::{
        google::{longrunning::Operation, rpc},
        opsd::v1 as wire,
    },
    store::{
        StoreError, StoredOutcome, StoredRecord, StoredResult, StoredScript, StoredStep,
        StoredTrace,
    },
};

/// What a cancellation does to an operation (chosen by the worker at creation).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum CancelPolicy {
    /// Cancel finishes the operation at once with CANCELLED.
    #[default]
    Immediate,
    /// Cancel asks the worker; after a grace period opsd finishes it.
    Cooperative,
    /// Cancel is refused with FAILED_PRECONDITION.
    NotCancellable,
}

impl CancelPolicy {
    /// The policy of an `opsd.v1.CancelPolicy` number (UNSPECIFIED is
    /// IMMEDIATE); `None` for a number the enum does not have. The one
    /// mapping from the enum, for requests, scenario files and the store.
    pub fn from_number(value: i32) -> Option<Self> {
        match wire::CancelPolicy::try_from(value).ok()? {
            wire::CancelPolicy::Unspecified | wire::CancelPolicy::Immediate => {
                Some(CancelPolicy::Immediate)
            }
            wire::CancelPolicy::Cooperative => Some(CancelPolicy::Cooperative),
            wire::CancelPolicy::NotCancellable => Some(CancelPolicy::NotCancellable),
        }
    }

    /// The policy a request asks for; an unknown number is INVALID_ARGUMENT.
    pub fn from_wire(value: i32) -> Result<Self, Error> {
        Self::from_number(value).ok_or_else(|| {
            Error::invalid("cancel_policy", format!("{value} is not a CancelPolicy"))
        })
    }

    /// Its `opsd.v1.CancelPolicy` number (never UNSPECIFIED).
    pub fn number(self) -> i32 {
        let policy = match self {
            CancelPolicy::Immediate => wire::CancelPolicy::Immediate,
            CancelPolicy::Cooperative => wire::CancelPolicy::Cooperative,
            CancelPolicy::NotCancellable => wire::CancelPolicy::NotCancellable,
        };
        policy as i32
    }
}

/// The result of a done operation.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Success, with the worker's response.
    Response(Any),
    /// Failure (including cancellation and lapsed leases).
    Error(rpc::Status),
}

/// Everything opsd keeps about one operation.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    /// The canonical full name, `{parent}/operations/{id}`.
    pub name: String,
    /// Set by the store on every write.
    pub revision: u64,
    /// The latest metadata (progress) the worker reported.
    pub metadata: Option<Any>,
    /// `Some` exactly when the operation is done.
    pub outcome: Option<Outcome>,
    pub cancel_policy: CancelPolicy,
    /// For cooperative cancellation: how long the worker has to finish.
    pub cancel_grace_period: Duration,
    /// When a requested cooperative cancellation is forced (cancel pending).
    pub cancel_deadline: Option<SystemTime>,
    /// The lease the worker holds; renewed by every update.
    pub lease: Option<Duration>,
    /// When the lease lapses unless renewed.
    pub lease_deadline: Option<SystemTime>,
    /// The idempotency key of the create call, unique across the store.
    pub request_id: Option<String>,
    pub create_time: SystemTime,
    pub update_time: SystemTime,
    /// When the operation became done.
    pub done_time: Option<SystemTime>,
    /// When a done operation is deleted by retention.
    pub expire_time: Option<SystemTime>,
    /// For scripted operations: what opsd still has to do to it (boxed:
    /// most operations have none, and the record stays small).
    pub script: Option<Box<Script>>,
    /// The trace the operation was created in, when the creating call
    /// carried a `traceparent`.
    pub trace: Option<TraceLink>,
}

/// The W3C trace context (`traceparent`, `tracestate`) of the call that
/// created an operation, kept with it: later calls on the operation link
/// their spans to it, so a trace backend shows a job's whole life from the
/// trace that started it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceLink {
    pub trace_id: [u8; 16],
    /// The caller's span that made the creating call.
    pub span_id: [u8; 8],
    /// The trace flags (bit 0: sampled).
    pub flags: u8,
    /// The `tracestate` header as it came; empty for none.
    pub state: String,
}

/// The rest of a scripted operation's script, with absolute times.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Script {
    /// Metadata steps not applied yet, in time order.
    pub steps: Vec<(SystemTime, Any)>,
    /// How and when it ends; `None`: never by itself.
    pub outcome: Option<(SystemTime, Outcome)>,
    /// For cooperative cancels: after how long, with which result; `None`:
    /// at once, with CANCELLED.
    pub on_cancel: Option<(Duration, Outcome)>,
    /// Operations methods switched off for this operation (`cancel`,
    /// `delete`, `wait`).
    pub disabled_methods: Vec<String>,
}

/// A script as a worker gives it: times count from creation (and, for
/// `on_cancel`, from the cancel).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ScriptSpec {
    pub steps: Vec<(Duration, Any)>,
    pub outcome: Option<(Duration, Outcome)>,
    pub on_cancel: Option<(Duration, Outcome)>,
    pub disabled_methods: Vec<String>,
}

impl Record {
    /// Whether the operation has finished.
    pub fn done(&self) -> bool {
        self.outcome.is_some()
    }

    /// The part of the name before `/operations/{id}`; empty for bare names.
    pub fn parent(&self) -> &str {
        crate::store::parent_of(&self.name)
    }

    /// The record in the storage schema.
    pub fn to_stored(&self) -> StoredRecord {
        let ts = |t: Option<SystemTime>| t.map(prost_types::Timestamp::from);
        StoredRecord {
            name: self.name.clone(),
            revision: self.revision,
            metadata: self.metadata.clone(),
            outcome: self.outcome.as_ref().map(stored_outcome),
            cancel_policy: self.cancel_policy.number(),
            cancel_grace_period: stored_duration(Some(self.cancel_grace_period)),
            cancel_deadline: ts(self.cancel_deadline),
            lease: stored_duration(self.lease),
            lease_deadline: ts(self.lease_deadline),
            request_id: self.request_id.clone(),
            create_time: ts(Some(self.create_time)),
            update_time: ts(Some(self.update_time)),
            done_time: ts(self.done_time),
            expire_time: ts(self.expire_time),
            script: self.script.as_deref().map(stored_script),
            trace: self.trace.as_ref().map(|t| StoredTrace {
                trace_id: t.trace_id.to_vec(),
                span_id: t.span_id.to_vec(),
                flags: t.flags.into(),
                state: t.state.clone(),
            }),
        }
    }

    /// The record a store kept; a value the model cannot hold (a time out
    /// of range, an unknown cancel policy) means the data is corrupt.
    pub fn from_stored(stored: StoredRecord) -> Result<Self, StoreError> {
        let dur = |d: Option<prost_types::Duration>| -> Result<Option<Duration>, StoreError> {
            d.map(|d| Duration::try_from(d).map_err(|_| corrupt("duration")))
                .transpose()
        };
        Ok(Record {
            name: stored.name,
            revision: stored.revision,
            metadata: stored.metadata,
            outcome: stored.outcome.map(outcome_of),
            cancel_policy: CancelPolicy::from_number(stored.cancel_policy)
                .ok_or_else(|| corrupt("cancel policy"))?,
            cancel_grace_period: dur(stored.cancel_grace_period)?.unwrap_or_default(),
            cancel_deadline: time(stored.cancel_deadline)?,
            lease: dur(stored.lease)?,
            lease_deadline: time(stored.lease_deadline)?,
            request_id: stored.request_id,
            create_time: time(stored.create_time)?.ok_or_else(|| corrupt("no create time"))?,
            update_time: time(stored.update_time)?.ok_or_else(|| corrupt("no update time"))?,
            done_time: time(stored.done_time)?,
            expire_time: time(stored.expire_time)?,
            script: stored.script.map(script_of).transpose()?.map(Box::new),
            trace: stored.trace.map(trace_of).transpose()?,
        })
    }
}

fn trace_of(stored: StoredTrace) -> Result<TraceLink, StoreError> {
    Ok(TraceLink {
        trace_id: stored
            .trace_id
            .try_into()
            .map_err(|_| corrupt("trace id"))?,
        span_id: stored.span_id.try_into().map_err(|_| corrupt("span id"))?,
        flags: u8::try_from(stored.flags).map_err(|_| corrupt("trace flags"))?,
        state: stored.state,
    })
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Internal(format!("corrupt operation record: {what}"))
}

fn time(t: Option<prost_types::Timestamp>) -> Result<Option<SystemTime>, StoreError> {
    t.map(|t| SystemTime::try_from(t).map_err(|_| corrupt("timestamp")))
        .transpose()
}

fn stored_duration(d: Option<Duration>) -> Option<prost_types::Duration> {
    d.and_then(|d| prost_types::Duration::try_from(d).ok())
}

fn stored_outcome(outcome: &Outcome) -> StoredOutcome {
    match outcome {
        Outcome::Response(any) => StoredOutcome::Response(any.clone()),
        Outcome::Error(status) => StoredOutcome::Error(status.clone()),
    }
}

fn outcome_of(stored: StoredOutcome) -> Outcome {
    match stored {
        StoredOutcome::Response(any) => Outcome::Response(any),
        StoredOutcome::Error(status) => Outcome::Error(status),
    }
}

fn stored_script(script: &Script) -> StoredScript {
    StoredScript {
        steps: script
            .steps
            .iter()
            .map(|(at, metadata)| StoredStep {
                at: Some((*at).into()),
                metadata: Some(metadata.clone()),
            })
            .collect(),
        // Present exactly when the outcome is: the deadline rule reads it.
        outcome_time: script.outcome.as_ref().map(|(at, _)| (*at).into()),
        outcome: script.outcome.as_ref().map(|(_, o)| stored_outcome(o)),
        on_cancel_after: script
            .on_cancel
            .as_ref()
            .and_then(|(after, _)| stored_duration(Some(*after))),
        on_cancel: script.on_cancel.as_ref().map(|(_, o)| StoredResult {
            outcome: Some(stored_outcome(o)),
        }),
        disabled_methods: script.disabled_methods.clone(),
    }
}

fn script_of(stored: StoredScript) -> Result<Script, StoreError> {
    let at = |t: Option<prost_types::Timestamp>| time(t)?.ok_or_else(|| corrupt("script time"));
    let steps = stored
        .steps
        .into_iter()
        .map(|step| Ok((at(step.at)?, step.metadata.unwrap_or_default())))
        .collect::<Result<_, StoreError>>()?;
    let outcome = match stored.outcome {
        Some(o) => Some((at(stored.outcome_time)?, outcome_of(o))),
        None => None,
    };
    let on_cancel = match stored.on_cancel.and_then(|r| r.outcome) {
        Some(o) => Some((
            stored
                .on_cancel_after
                .and_then(|d| Duration::try_from(d).ok())
                .unwrap_or_default(),
            outcome_of(o),
        )),
        None => None,
    };
    Ok(Script {
        steps,
        outcome,
        on_cancel,
        disabled_methods: stored.disabled_methods,
    })
}

/// A protobuf `Duration` as a non-negative `std::time::Duration`; anything
/// else is INVALID_ARGUMENT for `field`.
pub(crate) fn wire_duration(field: &str, value: &prost_types::Duration) -> Result<Duration, Error> {
    let valid_nanos = (0..1_000_000_000).contains(&value.nanos);
    if value.seconds < 0 || !valid_nanos || value.seconds > 315_576_000_000 {
        return Err(Error::invalid(
            field,
            format!(
                "{}s {}ns is not a valid non-negative duration",
                value.seconds, value.nanos
            ),
        ));
    }
    Ok(Duration::new(value.seconds as u64, value.nanos as u32))
}

impl Outcome {
    /// The outcome a script gives: after a delay, a response or an error.
    fn from_wire(field: &str, outcome: &wire::ScriptOutcome) -> Result<(Duration, Self), Error> {
        let after = outcome
            .after
            .as_ref()
            .map(|d| wire_duration(&format!("{field}.after"), d))
            .transpose()?
            .unwrap_or_default();
        let result = match &outcome.result {
            Some(wire::script_outcome::Result::Response(any)) => Outcome::Response(any.clone()),
            Some(wire::script_outcome::Result::Error(status)) => Outcome::Error(status.clone()),
            None => {
                return Err(Error::invalid(
                    field,
                    "set exactly one of `response` and `error`",
                ))
            }
        };
        Ok((after, result))
    }
}

impl ScriptSpec {
    /// A script as a worker (or a scenario file) writes it.
    pub fn from_wire(script: &wire::Script) -> Result<Self, Error> {
        let steps = script
            .steps
            .iter()
            .map(|step| {
                let after = step
                    .after
                    .as_ref()
                    .map(|d| wire_duration("script.steps.after", d))
                    .transpose()?
                    .unwrap_or_default();
                let metadata = step.metadata.clone().ok_or_else(|| {
                    Error::invalid("script.steps.metadata", "every step sets metadata")
                })?;
                Ok((after, metadata))
            })
            .collect::<Result<_, Error>>()?;
        Ok(ScriptSpec {
            steps,
            outcome: script
                .outcome
                .as_ref()
                .map(|o| Outcome::from_wire("script.outcome", o))
                .transpose()?,
            on_cancel: script
                .on_cancel
                .as_ref()
                .map(|o| Outcome::from_wire("script.on_cancel", o))
                .transpose()?,
            disabled_methods: script.disabled_methods.clone(),
        })
    }
}

/// The `google.longrunning.Operation` a client sees for a record.
pub fn operation(record: &Record) -> Operation {
    use crate::pb::google::longrunning::operation::Result as OpResult;
    Operation {
        name: record.name.clone(),
        metadata: record.metadata.clone(),
        done: record.done(),
        result: record.outcome.as_ref().map(|outcome| match outcome {
            Outcome::Response(any) => OpResult::Response(any.clone()),
            Outcome::Error(status) => OpResult::Error(status.clone()),
        }),
    }
}

/// The `opsd.v1.OperationInfo` of a record: the operation and the facts
/// opsd keeps about it (the console API).
pub fn operation_info(record: &Record) -> wire::OperationInfo {
    let time = |t: Option<SystemTime>| t.map(prost_types::Timestamp::from);
    wire::OperationInfo {
        operation: Some(operation(record)),
        create_time: time(Some(record.create_time)),
        update_time: time(Some(record.update_time)),
        done_time: time(record.done_time),
        expire_time: time(record.expire_time),
        cancel_policy: record.cancel_policy.number(),
        cancel_requested: !record.done() && record.cancel_deadline.is_some(),
        scripted: record.script.is_some(),
        lease_deadline: time(record.lease_deadline),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A running record with every optional field set.
    pub(crate) fn record(name: &str) -> Record {
        let now = SystemTime::now();
        Record {
            name: name.to_owned(),
            revision: 3,
            metadata: Some(Any::from_msg(&"m".to_owned()).unwrap()),
            outcome: None,
            cancel_policy: CancelPolicy::Cooperative,
            cancel_grace_period: Duration::from_secs(30),
            cancel_deadline: Some(now + Duration::from_secs(5)),
            lease: Some(Duration::from_millis(1500)),
            lease_deadline: Some(now + Duration::from_secs(9)),
            request_id: Some(format!("req-{name}")),
            create_time: now,
            update_time: now,
            done_time: None,
            expire_time: None,
            script: None,
            trace: Some(TraceLink {
                trace_id: [7; 16],
                span_id: [9; 8],
                flags: 1,
                state: "vendor=x".into(),
            }),
        }
    }

    fn round_trip(r: &Record) -> Record {
        Record::from_stored(r.to_stored()).unwrap()
    }

    #[test]
    fn records_round_trip_through_the_storage_schema() {
        let mut r = record("operations/a");
        assert_eq!(round_trip(&r), r);
        r.script = Some(Box::new(Script {
            steps: vec![(SystemTime::now(), Any::from_msg(&"s".to_owned()).unwrap())],
            outcome: Some((SystemTime::now(), Outcome::Response(Any::default()))),
            on_cancel: Some((
                Duration::from_millis(250),
                Outcome::Error(super::super::cancelled_status(true)),
            )),
            disabled_methods: vec!["cancel".into()],
        }));
        assert_eq!(round_trip(&r), r);
        r.outcome = Some(Outcome::Error(super::super::cancelled_status(true)));
        r.done_time = Some(SystemTime::now());
        r.expire_time = Some(SystemTime::now());
        assert_eq!(round_trip(&r), r);
        let mut stored = r.to_stored();
        stored.cancel_policy = 9;
        assert!(Record::from_stored(stored).is_err());
        let mut stored = r.to_stored();
        stored.trace.as_mut().unwrap().span_id.pop();
        assert!(Record::from_stored(stored).is_err());
        r.trace = None;
        assert_eq!(round_trip(&r), r);
    }

    #[test]
    fn the_stored_deadline_follows_the_model() {
        let now = SystemTime::now();
        let s = Duration::from_secs;
        let mut r = record("operations/a");
        let deadline = |r: &Record| r.to_stored().next_deadline();
        assert_eq!(deadline(&r), r.cancel_deadline);
        r.cancel_deadline = None;
        assert_eq!(deadline(&r), r.lease_deadline);
        r.script = Some(Box::new(Script {
            steps: vec![(now + s(2), Any::default())],
            outcome: Some((now + s(1), Outcome::Response(Any::default()))),
            ..Script::default()
        }));
        assert_eq!(deadline(&r), Some(now + s(1)));
        r.script.as_mut().unwrap().outcome = None;
        assert_eq!(deadline(&r), Some(now + s(2)));
        r.outcome = Some(Outcome::Response(Any::default()));
        assert_eq!(deadline(&r), None);
        r.expire_time = Some(now + s(60));
        assert_eq!(deadline(&r), Some(now + s(60)));
    }

    #[test]
    fn one_mapping_from_the_wire_cancel_policy() {
        assert_eq!(CancelPolicy::from_wire(0).unwrap(), CancelPolicy::Immediate);
        assert_eq!(
            CancelPolicy::from_wire(2).unwrap(),
            CancelPolicy::Cooperative
        );
        assert!(CancelPolicy::from_wire(9).is_err());
        for policy in [
            CancelPolicy::Immediate,
            CancelPolicy::Cooperative,
            CancelPolicy::NotCancellable,
        ] {
            assert_eq!(CancelPolicy::from_number(policy.number()), Some(policy));
        }
    }

    /// Bytes written by the store format before the model moved to the
    /// registry (opsd at fd26fda): a file written then reads the same now,
    /// and the same record encodes to the same bytes.
    #[test]
    fn the_storage_encoding_is_unchanged() {
        use prost::Message;
        let unhex = |parts: &[&str]| -> Vec<u8> {
            let hex = parts.concat();
            (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect()
        };
        let t = |s: u64| SystemTime::UNIX_EPOCH + Duration::new(1_800_000_000 + s, 123_456_789);
        let string_value = |value: &[u8]| Any {
            type_url: "type.googleapis.com/google.protobuf.StringValue".into(),
            value: value.to_vec(),
        };
        let running = Record {
            name: "projects/p/operations/golden".into(),
            revision: 7,
            metadata: Some(string_value(&[10, 3, 53, 48, 37])),
            outcome: None,
            cancel_policy: CancelPolicy::Cooperative,
            cancel_grace_period: Duration::from_millis(1500),
            cancel_deadline: Some(t(5)),
            lease: Some(Duration::from_secs(60)),
            lease_deadline: Some(t(60)),
            request_id: Some("req-1".into()),
            create_time: t(0),
            update_time: t(1),
            done_time: None,
            expire_time: None,
            trace: None,
            script: Some(Box::new(Script {
                steps: vec![(t(2), string_value(&[10, 1, 97]))],
                outcome: Some((
                    t(3),
                    Outcome::Response(Any {
                        type_url: "type.googleapis.com/google.protobuf.Empty".into(),
                        value: vec![],
                    }),
                )),
                on_cancel: Some((
                    Duration::from_millis(250),
                    Outcome::Error(rpc::Status {
                        code: 1,
                        message: "stopped".into(),
                        details: vec![],
                    }),
                )),
                disabled_methods: vec!["delete".into()],
            })),
        };
        let done = Record {
            name: "operations/done".into(),
            outcome: Some(Outcome::Error(rpc::Status {
                code: 13,
                message: "boom".into(),
                details: vec![],
            })),
            cancel_policy: CancelPolicy::NotCancellable,
            cancel_deadline: None,
            lease_deadline: None,
            script: None,
            request_id: None,
            done_time: Some(t(9)),
            expire_time: Some(t(99)),
            ..running.clone()
        };
        // As redb keeps it: with its name.
        let with_name = unhex(&[
            "0a1c70726f6a656374732f702f6f7065726174696f6e732f676f6c64656e10071a380a2f74797065",
            "2e676f6f676c65617069732e636f6d2f676f6f676c652e70726f746f6275662e537472696e675661",
            "6c756512050a0335302530023a0808011080cab5ee01420b0885a4a7da0610959aef3a4a02083c52",
            "0b08bca4a7da0610959aef3a5a057265712d31620b0880a4a7da0610959aef3a6a0b0881a4a7da06",
            "10959aef3a82019f010a450a0b0882a4a7da0610959aef3a12360a2f747970652e676f6f676c6561",
            "7069732e636f6d2f676f6f676c652e70726f746f6275662e537472696e6756616c756512030a0161",
            "120b0883a4a7da0610959aef3a222b0a29747970652e676f6f676c65617069732e636f6d2f676f6f",
            "676c652e70726f746f6275662e456d70747932051080e59a773a0d2a0b0801120773746f70706564",
            "420664656c657465",
        ]);
        assert_eq!(running.to_stored().encode_to_vec(), with_name);
        let decoded = StoredRecord::decode(with_name.as_slice()).unwrap();
        assert_eq!(Record::from_stored(decoded).unwrap(), running);
        // As the memory store keeps it: without its name.
        let without_name = unhex(&[
            "10071a380a2f747970652e676f6f676c65617069732e636f6d2f676f6f676c652e70726f746f6275",
            "662e537472696e6756616c756512050a033530252a08080d1204626f6f6d30033a0808011080cab5",
            "ee014a02083c620b0880a4a7da0610959aef3a6a0b0881a4a7da0610959aef3a720b0889a4a7da06",
            "10959aef3a7a0b08e3a4a7da0610959aef3a",
        ]);
        let mut stored = done.to_stored();
        stored.name.clear();
        assert_eq!(stored.encode_to_vec(), without_name);
        let mut decoded = StoredRecord::decode(without_name.as_slice()).unwrap();
        decoded.name = done.name.clone();
        assert_eq!(Record::from_stored(decoded).unwrap(), done);
    }

    #[test]
    fn durations_must_be_valid() {
        let d = |seconds, nanos| prost_types::Duration { seconds, nanos };
        assert_eq!(wire_duration("t", &d(1, 5)).unwrap(), Duration::new(1, 5));
        assert!(wire_duration("t", &d(-1, 0)).is_err());
        assert!(wire_duration("t", &d(0, -1)).is_err());
        assert!(wire_duration("t", &d(0, 1_000_000_000)).is_err());
    }
}
