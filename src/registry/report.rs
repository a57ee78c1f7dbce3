//! Polling reports: which Operations calls each operation received, and when.
//!
//! Client-library tests read them (`Workers.GetOperationReport`, or REST
//! `GET /v1/{name}:report`) to check their polling back-off. Reports are
//! kept for scripted operations (or for all with `--polling-reports all`),
//! at most [`MAX_CALLS`] calls each, in a map behind a `std::sync::Mutex`
//! (one short critical section per call, nothing awaited under it). The
//! change feed drops an operation's report when it is deleted or expires.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{Mutex, MutexGuard},
    time::SystemTime,
};

/// Calls kept per operation (the counts cover all of them).
pub const MAX_CALLS: usize = 1000;

/// Which operations get reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PollingReports {
    Off,
    /// Scripted operations only.
    #[default]
    Scripted,
    All,
}

/// One call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Call {
    /// `GetOperation`, `WaitOperation`, `ListOperations`, `CancelOperation`
    /// or `DeleteOperation`.
    pub method: &'static str,
    pub time: SystemTime,
    /// `grpc` or `rest`.
    pub transport: &'static str,
}

/// The report of one operation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub calls: VecDeque<Call>,
    pub counts: BTreeMap<&'static str, i64>,
}

#[derive(Default)]
pub(super) struct Reports {
    map: Mutex<HashMap<String, Report>>,
}

impl Reports {
    fn map(&self) -> MutexGuard<'_, HashMap<String, Report>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn record(&self, name: &str, call: Call) {
        let mut map = self.map();
        let report = map.entry(name.to_owned()).or_default();
        *report.counts.entry(call.method).or_default() += 1;
        if report.calls.len() == MAX_CALLS {
            report.calls.pop_front();
        }
        report.calls.push_back(call);
    }

    pub(super) fn get(&self, name: &str) -> Report {
        self.map().get(name).cloned().unwrap_or_default()
    }

    pub(super) fn forget(&self, name: &str) {
        self.map().remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_keep_the_last_calls_and_count_all() {
        let reports = Reports::default();
        for _ in 0..MAX_CALLS + 5 {
            reports.record(
                "operations/a",
                Call {
                    method: "GetOperation",
                    time: SystemTime::now(),
                    transport: "grpc",
                },
            );
        }
        let report = reports.get("operations/a");
        assert_eq!(report.calls.len(), MAX_CALLS);
        assert_eq!(report.counts["GetOperation"], (MAX_CALLS + 5) as i64);
        reports.forget("operations/a");
        assert_eq!(reports.get("operations/a"), Report::default());
    }
}
