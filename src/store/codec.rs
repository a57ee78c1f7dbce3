//! The encoded form of a [`Record`], shared by the stores: the redb file
//! keeps it on disk, the memory store keeps it in memory (a few hundred
//! bytes per operation instead of the decoded struct and its allocations).
//! Protobuf, so fields can be added without breaking stored data.

use std::time::{Duration, SystemTime};

use prost::Message;

use super::{CancelPolicy, Outcome, Record, StoreError};
use crate::pb::google::rpc;

/// The encoded form of a [`Record`].
#[derive(Clone, PartialEq, prost::Message)]
struct StoredRecord {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(uint64, tag = "2")]
    revision: u64,
    #[prost(message, optional, tag = "3")]
    metadata: Option<prost_types::Any>,
    #[prost(oneof = "StoredOutcome", tags = "4, 5")]
    outcome: Option<StoredOutcome>,
    #[prost(int32, tag = "6")]
    cancel_policy: i32,
    #[prost(message, optional, tag = "7")]
    cancel_grace_period: Option<prost_types::Duration>,
    #[prost(message, optional, tag = "8")]
    cancel_deadline: Option<prost_types::Timestamp>,
    #[prost(message, optional, tag = "9")]
    lease: Option<prost_types::Duration>,
    #[prost(message, optional, tag = "10")]
    lease_deadline: Option<prost_types::Timestamp>,
    #[prost(string, optional, tag = "11")]
    request_id: Option<String>,
    #[prost(message, optional, tag = "12")]
    create_time: Option<prost_types::Timestamp>,
    #[prost(message, optional, tag = "13")]
    update_time: Option<prost_types::Timestamp>,
    #[prost(message, optional, tag = "14")]
    done_time: Option<prost_types::Timestamp>,
    #[prost(message, optional, tag = "15")]
    expire_time: Option<prost_types::Timestamp>,
    #[prost(message, optional, tag = "16")]
    script: Option<StoredScript>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct StoredScript {
    #[prost(message, repeated, tag = "1")]
    steps: Vec<StoredStep>,
    #[prost(message, optional, tag = "2")]
    outcome_time: Option<prost_types::Timestamp>,
    #[prost(oneof = "StoredOutcome", tags = "4, 5")]
    outcome: Option<StoredOutcome>,
    #[prost(message, optional, tag = "6")]
    on_cancel_after: Option<prost_types::Duration>,
    #[prost(message, optional, tag = "7")]
    on_cancel: Option<StoredResult>,
    #[prost(string, repeated, tag = "8")]
    disabled_methods: Vec<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct StoredStep {
    #[prost(message, optional, tag = "1")]
    at: Option<prost_types::Timestamp>,
    #[prost(message, optional, tag = "2")]
    metadata: Option<prost_types::Any>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct StoredResult {
    #[prost(oneof = "StoredOutcome", tags = "4, 5")]
    outcome: Option<StoredOutcome>,
}

fn stored_outcome(o: &Outcome) -> StoredOutcome {
    match o {
        Outcome::Response(a) => StoredOutcome::Response(a.clone()),
        Outcome::Error(s) => StoredOutcome::Error(s.clone()),
    }
}

fn outcome_of(o: StoredOutcome) -> Outcome {
    match o {
        StoredOutcome::Response(a) => Outcome::Response(a),
        StoredOutcome::Error(s) => Outcome::Error(s),
    }
}

fn encode_script(script: &super::Script) -> StoredScript {
    StoredScript {
        steps: script
            .steps
            .iter()
            .map(|(at, metadata)| StoredStep {
                at: Some((*at).into()),
                metadata: Some(metadata.clone()),
            })
            .collect(),
        outcome_time: script.outcome.as_ref().map(|(at, _)| (*at).into()),
        outcome: script.outcome.as_ref().map(|(_, o)| stored_outcome(o)),
        on_cancel_after: script
            .on_cancel
            .as_ref()
            .and_then(|(after, _)| prost_types::Duration::try_from(*after).ok()),
        on_cancel: script.on_cancel.as_ref().map(|(_, o)| StoredResult {
            outcome: Some(stored_outcome(o)),
        }),
        disabled_methods: script.disabled_methods.clone(),
    }
}

fn decode_script(stored: StoredScript) -> Result<super::Script, StoreError> {
    let corrupt = |what: &str| StoreError::Internal(format!("corrupt script: {what}"));
    let time = |t: Option<prost_types::Timestamp>| {
        t.and_then(|t| SystemTime::try_from(t).ok())
            .ok_or_else(|| corrupt("time"))
    };
    let steps = stored
        .steps
        .into_iter()
        .map(|step| Ok((time(step.at)?, step.metadata.unwrap_or_default())))
        .collect::<Result<_, StoreError>>()?;
    let outcome = match stored.outcome {
        Some(o) => Some((time(stored.outcome_time)?, outcome_of(o))),
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
    Ok(super::Script {
        steps,
        outcome,
        on_cancel,
        disabled_methods: stored.disabled_methods,
    })
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum StoredOutcome {
    #[prost(message, tag = "4")]
    Response(prost_types::Any),
    #[prost(message, tag = "5")]
    Error(rpc::Status),
}

/// The encoded record. Without `with_name` the name is left out (a store
/// that keys records by name keeps it once, in the key).
pub(super) fn encode(record: &Record, with_name: bool) -> Vec<u8> {
    let ts = |t: Option<SystemTime>| t.map(prost_types::Timestamp::from);
    let dur = |d: Option<Duration>| d.and_then(|d| prost_types::Duration::try_from(d).ok());
    StoredRecord {
        name: if with_name {
            record.name.clone()
        } else {
            String::new()
        },
        revision: record.revision,
        metadata: record.metadata.clone(),
        outcome: record.outcome.as_ref().map(|o| match o {
            Outcome::Response(a) => StoredOutcome::Response(a.clone()),
            Outcome::Error(s) => StoredOutcome::Error(s.clone()),
        }),
        cancel_policy: match record.cancel_policy {
            CancelPolicy::Immediate => 1,
            CancelPolicy::Cooperative => 2,
            CancelPolicy::NotCancellable => 3,
        },
        cancel_grace_period: dur(Some(record.cancel_grace_period)),
        cancel_deadline: ts(record.cancel_deadline),
        lease: dur(record.lease),
        lease_deadline: ts(record.lease_deadline),
        request_id: record.request_id.clone(),
        create_time: ts(Some(record.create_time)),
        update_time: ts(Some(record.update_time)),
        done_time: ts(record.done_time),
        expire_time: ts(record.expire_time),
        script: record.script.as_deref().map(encode_script),
    }
    .encode_to_vec()
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

/// An encoded record's next deadline ([`Record::next_deadline`]) and
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
    let at = super::next_deadline(
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
pub(super) fn decode(bytes: &[u8]) -> Result<Record, StoreError> {
    let corrupt = |what: &str| StoreError::Internal(format!("corrupt operation record: {what}"));
    let stored = StoredRecord::decode(bytes).map_err(|e| corrupt(&e.to_string()))?;
    let time = |t: Option<prost_types::Timestamp>| -> Result<Option<SystemTime>, StoreError> {
        t.map(|t| SystemTime::try_from(t).map_err(|_| corrupt("timestamp")))
            .transpose()
    };
    let dur = |d: Option<prost_types::Duration>| -> Result<Option<Duration>, StoreError> {
        d.map(|d| Duration::try_from(d).map_err(|_| corrupt("duration")))
            .transpose()
    };
    Ok(Record {
        name: stored.name,
        revision: stored.revision,
        metadata: stored.metadata,
        outcome: stored.outcome.map(|o| match o {
            StoredOutcome::Response(a) => Outcome::Response(a),
            StoredOutcome::Error(s) => Outcome::Error(s),
        }),
        cancel_policy: match stored.cancel_policy {
            2 => CancelPolicy::Cooperative,
            3 => CancelPolicy::NotCancellable,
            _ => CancelPolicy::Immediate,
        },
        cancel_grace_period: dur(stored.cancel_grace_period)?.unwrap_or_default(),
        cancel_deadline: time(stored.cancel_deadline)?,
        lease: dur(stored.lease)?,
        lease_deadline: time(stored.lease_deadline)?,
        request_id: stored.request_id,
        create_time: time(stored.create_time)?.ok_or_else(|| corrupt("no create time"))?,
        update_time: time(stored.update_time)?.ok_or_else(|| corrupt("no update time"))?,
        done_time: time(stored.done_time)?,
        expire_time: time(stored.expire_time)?,
        script: stored.script.map(decode_script).transpose()?.map(Box::new),
    })
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A running record with every optional field set: the stores' tests
    /// use it too.
    pub(in crate::store) fn record(name: &str) -> Record {
        let now = SystemTime::now();
        Record {
            name: name.to_owned(),
            revision: 3,
            metadata: Some(prost_types::Any::from_msg(&"m".to_owned()).unwrap()),
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
        }
    }

    #[test]
    fn records_round_trip_through_their_encoding() {
        let mut r = record("operations/a");
        assert_eq!(decode(&encode(&r, true)).unwrap(), r);
        r.script = Some(Box::new(crate::store::Script {
            steps: vec![(
                SystemTime::now(),
                prost_types::Any::from_msg(&"s".to_owned()).unwrap(),
            )],
            outcome: Some((
                SystemTime::now(),
                Outcome::Response(prost_types::Any::default()),
            )),
            on_cancel: Some((
                Duration::from_millis(250),
                Outcome::Error(crate::registry::cancelled_status()),
            )),
            disabled_methods: vec!["cancel".into()],
        }));
        assert_eq!(decode(&encode(&r, true)).unwrap(), r);
        r.outcome = Some(Outcome::Error(crate::registry::cancelled_status()));
        r.done_time = Some(SystemTime::now());
        r.expire_time = Some(SystemTime::now());
        assert_eq!(decode(&encode(&r, true)).unwrap(), r);
        assert!(decode(b"\xff\x01").is_err());
    }

    #[test]
    fn the_partial_decoding_finds_the_same_deadline() {
        let now = SystemTime::now();
        let s = Duration::from_secs;
        let mut r = record("operations/a");
        let check = |r: &Record| {
            assert_eq!(
                deadline_of(&encode(r, false)).unwrap(),
                (r.next_deadline(), r.done()),
                "{r:?}"
            );
        };
        check(&r);
        r.lease_deadline = None;
        check(&r);
        r.cancel_deadline = None;
        check(&r);
        r.script = Some(Box::new(crate::store::Script {
            steps: vec![
                (
                    now + s(2),
                    prost_types::Any::from_msg(&"a".to_owned()).unwrap(),
                ),
                (
                    now + s(4),
                    prost_types::Any::from_msg(&"b".to_owned()).unwrap(),
                ),
            ],
            outcome: Some((now + s(1), Outcome::Response(Default::default()))),
            on_cancel: None,
            disabled_methods: vec![],
        }));
        check(&r);
        r.script.as_mut().unwrap().outcome = None;
        check(&r);
        r.outcome = Some(Outcome::Error(crate::registry::cancelled_status()));
        check(&r);
        r.expire_time = Some(now + s(60));
        check(&r);
        r.outcome = Some(Outcome::Response(Default::default()));
        check(&r);
        assert!(deadline_of(b"\xff\x01").is_err());
    }

    #[test]
    fn a_record_without_its_name_decodes_with_an_empty_one() {
        let r = record("projects/p/operations/a");
        let mut decoded = decode(&encode(&r, false)).unwrap();
        assert!(decoded.name.is_empty());
        decoded.name = r.name.clone();
        assert_eq!(decoded, r);
        assert!(encode(&r, false).len() + r.name.len() < encode(&r, true).len() + 4);
    }
}
