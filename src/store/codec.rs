//! What the stores keep of an operation: [`StoredRecord`], the storage
//! schema, and its encoding. The redb file keeps the encoding on disk, the
//! memory store keeps it in memory (a few hundred bytes per operation
//! instead of a decoded struct and its allocations), PostgreSQL will keep it
//! beside the columns it indexes. Protobuf, so fields can be added without
//! breaking stored data.
//!
//! The schema is plain data: the registry's domain model
//! (`registry::model::Record`) converts to and from it, and the stores read
//! only what they index: the name, the revision, the request id, whether
//! the operation is done, its next deadline, and the fields a List filter
//! tests.

use std::time::SystemTime;

use prost::Message;

use super::StoreError;
use crate::pb::google::rpc;

/// An operation record as the stores keep it (the tags are the file format).
#[derive(Clone, PartialEq, prost::Message)]
pub struct StoredRecord {
    /// The canonical full name, `{parent}/operations/{id}` (left out of the
    /// encoding by stores that key records by name).
    #[prost(string, tag = "1")]
    pub name: String,
    /// Set by the store on every write: 1 after the insert.
    #[prost(uint64, tag = "2")]
    pub revision: u64,
    #[prost(message, optional, tag = "3")]
    pub metadata: Option<prost_types::Any>,
    /// Set exactly when the operation is done.
    #[prost(oneof = "StoredOutcome", tags = "4, 5")]
    pub outcome: Option<StoredOutcome>,
    /// `opsd.v1.CancelPolicy`'s number.
    #[prost(int32, tag = "6")]
    pub cancel_policy: i32,
    #[prost(message, optional, tag = "7")]
    pub cancel_grace_period: Option<prost_types::Duration>,
    #[prost(message, optional, tag = "8")]
    pub cancel_deadline: Option<prost_types::Timestamp>,
    #[prost(message, optional, tag = "9")]
    pub lease: Option<prost_types::Duration>,
    #[prost(message, optional, tag = "10")]
    pub lease_deadline: Option<prost_types::Timestamp>,
    /// The idempotency key of the create call, unique across the store and
    /// kept by the store for the record's whole life.
    #[prost(string, optional, tag = "11")]
    pub request_id: Option<String>,
    #[prost(message, optional, tag = "12")]
    pub create_time: Option<prost_types::Timestamp>,
    #[prost(message, optional, tag = "13")]
    pub update_time: Option<prost_types::Timestamp>,
    #[prost(message, optional, tag = "14")]
    pub done_time: Option<prost_types::Timestamp>,
    #[prost(message, optional, tag = "15")]
    pub expire_time: Option<prost_types::Timestamp>,
    #[prost(message, optional, tag = "16")]
    pub script: Option<StoredScript>,
    /// The trace the operation was created in (absent in records written
    /// before traces, and in those created without a `traceparent`).
    #[prost(message, optional, tag = "17")]
    pub trace: Option<StoredTrace>,
}

/// A W3C trace context: 16-byte trace id, 8-byte span id, flags, tracestate.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StoredTrace {
    #[prost(bytes = "vec", tag = "1")]
    pub trace_id: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub span_id: Vec<u8>,
    #[prost(uint32, tag = "3")]
    pub flags: u32,
    #[prost(string, tag = "4")]
    pub state: String,
}

/// What a scripted operation still has to do, with absolute times.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StoredScript {
    #[prost(message, repeated, tag = "1")]
    pub steps: Vec<StoredStep>,
    #[prost(message, optional, tag = "2")]
    pub outcome_time: Option<prost_types::Timestamp>,
    #[prost(oneof = "StoredOutcome", tags = "4, 5")]
    pub outcome: Option<StoredOutcome>,
    #[prost(message, optional, tag = "6")]
    pub on_cancel_after: Option<prost_types::Duration>,
    #[prost(message, optional, tag = "7")]
    pub on_cancel: Option<StoredResult>,
    #[prost(string, repeated, tag = "8")]
    pub disabled_methods: Vec<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct StoredStep {
    #[prost(message, optional, tag = "1")]
    pub at: Option<prost_types::Timestamp>,
    #[prost(message, optional, tag = "2")]
    pub metadata: Option<prost_types::Any>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct StoredResult {
    #[prost(oneof = "StoredOutcome", tags = "4, 5")]
    pub outcome: Option<StoredOutcome>,
}

/// How a done operation ended.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum StoredOutcome {
    #[prost(message, tag = "4")]
    Response(prost_types::Any),
    #[prost(message, tag = "5")]
    Error(rpc::Status),
}

/// A stored time; `None` for an absent or out-of-range one.
fn time(t: Option<&prost_types::Timestamp>) -> Option<SystemTime> {
    t.and_then(|t| SystemTime::try_from(*t).ok())
}

impl StoredRecord {
    /// Whether the operation has finished.
    pub fn done(&self) -> bool {
        self.outcome.is_some()
    }

    /// The earliest moment at which the deadline task must look at this
    /// record: lease expiry, forced cancel or the script's next event while
    /// running, retention once done.
    pub fn next_deadline(&self) -> Option<SystemTime> {
        let script = self.script.as_ref();
        next_deadline(
            self.done(),
            time(self.expire_time.as_ref()),
            [
                time(self.lease_deadline.as_ref()),
                time(self.cancel_deadline.as_ref()),
                script.and_then(|s| time(s.steps.first().and_then(|s| s.at.as_ref()))),
                script.and_then(|s| time(s.outcome_time.as_ref())),
            ],
        )
    }

    /// The part of the name before `/operations/{id}`; empty for bare names.
    pub fn parent(&self) -> &str {
        super::parent_of(&self.name)
    }

    /// The error of a failed operation.
    pub fn error(&self) -> Option<&rpc::Status> {
        match &self.outcome {
            Some(StoredOutcome::Error(status)) => Some(status),
            _ => None,
        }
    }

    /// The response of a successful operation.
    pub fn response(&self) -> Option<&prost_types::Any> {
        match &self.outcome {
            Some(StoredOutcome::Response(any)) => Some(any),
            _ => None,
        }
    }
}

/// The rule behind [`StoredRecord::next_deadline`], shared with the partial
/// decoding: retention once done; otherwise the earliest of the lease, the
/// forced cancel, the script's next step and its outcome.
fn next_deadline(
    done: bool,
    expire_time: Option<SystemTime>,
    running: [Option<SystemTime>; 4],
) -> Option<SystemTime> {
    if done {
        return expire_time;
    }
    running.into_iter().flatten().min()
}

/// The encoded record, its name left out: a store that keys records by
/// name keeps it once, in the key.
pub(super) fn encode_without_name(record: &mut StoredRecord) -> Vec<u8> {
    let name = std::mem::take(&mut record.name);
    let bytes = record.encode_to_vec();
    record.name = name;
    bytes
}

/// The fields of a [`StoredRecord`] that decide its next deadline. Decoding
/// only these skips the rest (metadata, results) without allocating.
#[derive(Clone, PartialEq, prost::Message)]
struct StoredDeadlines {
    #[prost(message, optional, tag = "4")]
    response: Option<Skipped>,
    #[prost(message, optional, tag = "5")]
    error: Option<Skipped>,
    #[prost(message, optional, tag = "8")]
    cancel_deadline: Option<prost_types::Timestamp>,
    #[prost(message, optional, tag = "10")]
    lease_deadline: Option<prost_types::Timestamp>,
    #[prost(message, optional, tag = "15")]
    expire_time: Option<prost_types::Timestamp>,
    #[prost(message, optional, tag = "16")]
    script: Option<StoredScriptTimes>,
}

/// A message whose content is skipped: only its presence counts.
#[derive(Clone, PartialEq, prost::Message)]
struct Skipped {}

#[derive(Clone, PartialEq, prost::Message)]
struct StoredScriptTimes {
    #[prost(message, repeated, tag = "1")]
    steps: Vec<StoredStepTime>,
    #[prost(message, optional, tag = "2")]
    outcome_time: Option<prost_types::Timestamp>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct StoredStepTime {
    #[prost(message, optional, tag = "1")]
    at: Option<prost_types::Timestamp>,
}

/// An encoded record's next deadline ([`StoredRecord::next_deadline`]) and
/// whether it is done, without decoding the whole record.
pub(super) fn deadline_of(bytes: &[u8]) -> Result<(Option<SystemTime>, bool), StoreError> {
    let corrupt = |what: &str| StoreError::Internal(format!("corrupt operation record: {what}"));
    let stored = StoredDeadlines::decode(bytes).map_err(|e| corrupt(&e.to_string()))?;
    let time = |t: Option<prost_types::Timestamp>| -> Result<Option<SystemTime>, StoreError> {
        t.map(|t| SystemTime::try_from(t).map_err(|_| corrupt("timestamp")))
            .transpose()
    };
    let done = stored.response.is_some() || stored.error.is_some();
    let (first_step, script_outcome) = match stored.script {
        Some(script) => (
            time(script.steps.into_iter().next().and_then(|s| s.at))?,
            time(script.outcome_time)?,
        ),
        None => (None, None),
    };
    let at = next_deadline(
        done,
        time(stored.expire_time)?,
        [
            time(stored.lease_deadline)?,
            time(stored.cancel_deadline)?,
            first_step,
            script_outcome,
        ],
    );
    Ok((at, done))
}

/// Decodes a record; a record encoded without its name gets an empty one.
pub(super) fn decode(bytes: &[u8]) -> Result<StoredRecord, StoreError> {
    StoredRecord::decode(bytes)
        .map_err(|e| StoreError::Internal(format!("corrupt operation record: {e}")))
}

#[cfg(test)]
pub(super) mod tests {
    use std::time::Duration;

    use super::*;

    fn ts(t: SystemTime) -> Option<prost_types::Timestamp> {
        Some(t.into())
    }

    /// A running record with every optional field set: the stores' tests
    /// use it too.
    pub(in crate::store) fn record(name: &str) -> StoredRecord {
        let now = SystemTime::now();
        StoredRecord {
            name: name.to_owned(),
            revision: 3,
            metadata: Some(prost_types::Any::from_msg(&"m".to_owned()).unwrap()),
            outcome: None,
            cancel_policy: 2,
            cancel_grace_period: Some(prost_types::Duration {
                seconds: 30,
                nanos: 0,
            }),
            cancel_deadline: ts(now + Duration::from_secs(5)),
            lease: Some(prost_types::Duration {
                seconds: 1,
                nanos: 500_000_000,
            }),
            lease_deadline: ts(now + Duration::from_secs(9)),
            request_id: Some(format!("req-{name}")),
            create_time: ts(now),
            update_time: ts(now),
            done_time: None,
            expire_time: None,
            script: None,
            trace: Some(StoredTrace {
                trace_id: vec![7; 16],
                span_id: vec![9; 8],
                flags: 1,
                state: String::new(),
            }),
        }
    }

    /// A done record (an error), with its retention expiry.
    pub(in crate::store) fn done(mut record: StoredRecord) -> StoredRecord {
        record.outcome = Some(StoredOutcome::Error(rpc::Status {
            code: 1,
            message: "Operation was cancelled.".into(),
            details: vec![],
        }));
        record.lease_deadline = None;
        record.cancel_deadline = None;
        record.done_time = record.update_time;
        record.expire_time = ts(SystemTime::now() + Duration::from_secs(3600));
        record
    }

    #[test]
    fn records_round_trip_through_their_encoding() {
        let mut r = record("operations/a");
        assert_eq!(decode(&r.encode_to_vec()).unwrap(), r);
        r.script = Some(StoredScript {
            steps: vec![StoredStep {
                at: ts(SystemTime::now()),
                metadata: Some(prost_types::Any::from_msg(&"s".to_owned()).unwrap()),
            }],
            outcome_time: ts(SystemTime::now()),
            outcome: Some(StoredOutcome::Response(prost_types::Any::default())),
            on_cancel_after: Some(prost_types::Duration {
                seconds: 0,
                nanos: 250_000_000,
            }),
            on_cancel: Some(StoredResult {
                outcome: Some(StoredOutcome::Response(Default::default())),
            }),
            disabled_methods: vec!["cancel".into()],
        });
        assert_eq!(decode(&r.encode_to_vec()).unwrap(), r);
        let r = done(r);
        assert_eq!(decode(&r.encode_to_vec()).unwrap(), r);
        assert!(decode(b"\xff\x01").is_err());
    }

    #[test]
    fn the_partial_decoding_finds_the_same_deadline() {
        let now = SystemTime::now();
        let s = Duration::from_secs;
        let mut r = record("operations/a");
        let check = |r: &StoredRecord| {
            let mut r = r.clone();
            assert_eq!(
                deadline_of(&encode_without_name(&mut r)).unwrap(),
                (r.next_deadline(), r.done()),
                "{r:?}"
            );
        };
        check(&r);
        r.lease_deadline = None;
        check(&r);
        r.cancel_deadline = None;
        check(&r);
        r.script = Some(StoredScript {
            steps: vec![
                StoredStep {
                    at: ts(now + s(2)),
                    metadata: Some(prost_types::Any::from_msg(&"a".to_owned()).unwrap()),
                },
                StoredStep {
                    at: ts(now + s(4)),
                    metadata: Some(prost_types::Any::from_msg(&"b".to_owned()).unwrap()),
                },
            ],
            outcome_time: ts(now + s(1)),
            outcome: Some(StoredOutcome::Response(Default::default())),
            ..Default::default()
        });
        check(&r);
        assert_eq!(r.next_deadline(), Some(now + s(1)));
        let script = r.script.as_mut().unwrap();
        script.outcome = None;
        script.outcome_time = None;
        check(&r);
        assert_eq!(r.next_deadline(), Some(now + s(2)));
        r.outcome = Some(StoredOutcome::Error(Default::default()));
        check(&r);
        assert_eq!(r.next_deadline(), None);
        r.expire_time = ts(now + s(60));
        check(&r);
        r.outcome = Some(StoredOutcome::Response(Default::default()));
        check(&r);
        assert_eq!(r.next_deadline(), Some(now + s(60)));
        assert!(deadline_of(b"\xff\x01").is_err());
    }

    #[test]
    fn a_record_without_its_name_decodes_with_an_empty_one() {
        let mut r = record("projects/p/operations/a");
        let without = encode_without_name(&mut r);
        assert_eq!(r.name, "projects/p/operations/a");
        let mut decoded = decode(&without).unwrap();
        assert!(decoded.name.is_empty());
        decoded.name = r.name.clone();
        assert_eq!(decoded, r);
        assert!(without.len() + r.name.len() < r.encode_to_vec().len() + 4);
    }
}
