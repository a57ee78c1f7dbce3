//! The wall clock of the registry and the stores: every time the semantics
//! read (create and update times, lease and grace deadlines, retention,
//! script steps, page token expiry, polling report times, the commit time
//! of each change on the feed) comes from one [`Clock`], and the deadline
//! task sleeps on it. It sits below both layers, so the store that stamps a
//! change and the registry that stamps a record read the same time.
//!
//! [`Clock::System`] is the real clock. [`Clock::Offset`] is the real clock
//! plus an offset that a store keeps in step with another clock: the
//! PostgreSQL store measures the database's `clock_timestamp()` against it,
//! so every replica sharing a database reads the database's time (leases
//! and retention then do not depend on replicas' clocks agreeing).
//! [`Clock::Manual`] moves only when a
//! test tells it to ([`ManualClock::advance`]), so lease, grace, retention
//! and script tests advance time instead of sleeping, and the deadline task
//! wakes the moment the clock passes a deadline. Two waits are not on this
//! clock, because they are not semantics: Wait's budget (the client's RPC
//! deadline, in real time) and the deadline task's retry after a store
//! failure (one real second, so a failing store is retried whatever the
//! clock does).

use std::{
    sync::{
        atomic::{AtomicI64, Ordering},
        Arc,
    },
    time::{Duration, SystemTime},
};

use tokio::sync::watch;

/// Where the registry reads the time. Cloning it is shallow.
#[derive(Clone, Debug, Default)]
pub enum Clock {
    /// `SystemTime::now()`; sleeps on Tokio's timer.
    #[default]
    System,
    /// The system clock plus an offset kept in step with another clock.
    Offset(OffsetClock),
    /// A clock that moves only when told (tests).
    Manual(ManualClock),
}

impl Clock {
    /// The current time.
    pub fn now(&self) -> SystemTime {
        match self {
            Clock::System => SystemTime::now(),
            Clock::Offset(clock) => clock.now(),
            Clock::Manual(clock) => clock.now(),
        }
    }

    /// Resolves once [`Clock::now`] has reached `at`.
    pub async fn sleep_until(&self, at: SystemTime) {
        match self {
            Clock::System | Clock::Offset(_) => {
                // An offset that moves while this sleeps moves the wake-up by
                // as much (milliseconds at most): deadlines are re-read when
                // they fire, so an early wake is harmless.
                let wait = at.duration_since(self.now()).unwrap_or(Duration::ZERO);
                tokio::time::sleep(wait).await;
            }
            Clock::Manual(clock) => {
                let mut now = clock.now.subscribe();
                // The sender lives as long as the clock: an error means the
                // clock is gone, and with it every deadline.
                if now.wait_for(|now| *now >= at).await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        }
    }
}

/// The system clock plus an offset in nanoseconds, which its owner keeps in
/// step with another clock ([`OffsetClock::set_offset`]). Cloning it is
/// shallow: every clone reads the same offset.
#[derive(Clone, Debug, Default)]
pub struct OffsetClock {
    /// Nanoseconds added to the system time (negative: subtracted).
    offset: Arc<AtomicI64>,
}

impl OffsetClock {
    /// The system time plus the offset.
    pub fn now(&self) -> SystemTime {
        let offset = self.offset.load(Ordering::Relaxed);
        let system = SystemTime::now();
        if offset >= 0 {
            system + Duration::from_nanos(offset.unsigned_abs())
        } else {
            system - Duration::from_nanos(offset.unsigned_abs())
        }
    }

    /// The offset in nanoseconds.
    pub fn offset(&self) -> i64 {
        self.offset.load(Ordering::Relaxed)
    }

    /// Sets the offset: from now on [`OffsetClock::now`] reads the system
    /// time plus `nanos`.
    pub fn set_offset(&self, nanos: i64) {
        self.offset.store(nanos, Ordering::Relaxed);
    }
}

impl From<OffsetClock> for Clock {
    fn from(clock: OffsetClock) -> Self {
        Clock::Offset(clock)
    }
}

/// A clock for tests: it starts at the real time of its creation and moves
/// only by [`ManualClock::advance`]. Cloning it is shallow: every clone is
/// the same clock.
#[derive(Clone, Debug)]
pub struct ManualClock {
    /// The current time; sleepers watch it.
    now: Arc<watch::Sender<SystemTime>>,
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl ManualClock {
    /// A clock standing at the current real time.
    pub fn new() -> Self {
        Self::starting_at(SystemTime::now())
    }

    /// A clock standing at `start`.
    pub fn starting_at(start: SystemTime) -> Self {
        Self {
            now: Arc::new(watch::Sender::new(start)),
        }
    }

    /// The time it stands at.
    pub fn now(&self) -> SystemTime {
        *self.now.borrow()
    }

    /// Moves the clock forward by `by`, waking whatever sleeps until then.
    pub fn advance(&self, by: Duration) {
        self.now.send_modify(|now| *now += by);
    }
}

impl From<ManualClock> for Clock {
    fn from(clock: ManualClock) -> Self {
        Clock::Manual(clock)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_manual_clock_wakes_sleepers_when_it_passes_their_time() {
        let manual = ManualClock::new();
        let clock = Clock::from(manual.clone());
        let start = clock.now();
        let sleeper = tokio::spawn({
            let clock = clock.clone();
            async move { clock.sleep_until(start + Duration::from_secs(10)).await }
        });
        manual.advance(Duration::from_secs(9));
        tokio::task::yield_now().await;
        assert!(!sleeper.is_finished());
        manual.advance(Duration::from_secs(1));
        sleeper.await.unwrap();
        assert_eq!(clock.now(), start + Duration::from_secs(10));
        // A time already passed is no wait at all.
        clock.sleep_until(start).await;
    }

    #[test]
    fn an_offset_clock_reads_the_system_time_moved_by_its_offset() {
        let offset = OffsetClock::default();
        let clock = Clock::from(offset.clone());
        offset.set_offset(-3_600_000_000_000);
        let behind = SystemTime::now().duration_since(clock.now());
        assert!(
            behind
                .as_ref()
                .is_ok_and(|d| *d >= Duration::from_secs(3599)),
            "{behind:?}"
        );
        offset.set_offset(7_200_000_000_000);
        assert!(clock.now() > SystemTime::now() + Duration::from_secs(7199));
        assert_eq!(offset.offset(), 7_200_000_000_000);
    }
}
