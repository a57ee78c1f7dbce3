//! The wall clock of the registry and the stores: every time the semantics
//! read (create and update times, lease and grace deadlines, retention,
//! script steps, page token expiry, polling report times, the commit time
//! of each change on the feed) comes from one [`Clock`], and the deadline
//! task sleeps on it. It sits below both layers, so the store that stamps a
//! change and the registry that stamps a record read the same time.
//!
//! [`Clock::System`] is the real clock. [`Clock::Manual`] moves only when a
//! test tells it to ([`ManualClock::advance`]), so lease, grace, retention
//! and script tests advance time instead of sleeping, and the deadline task
//! wakes the moment the clock passes a deadline. Two waits are not on this
//! clock, because they are not semantics: Wait's budget (the client's RPC
//! deadline, in real time) and the deadline task's retry after a store
//! failure (one real second, so a failing store is retried whatever the
//! clock does).

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::sync::watch;

/// Where the registry reads the time. Cloning it is shallow.
#[derive(Clone, Debug, Default)]
pub enum Clock {
    /// `SystemTime::now()`; sleeps on Tokio's timer.
    #[default]
    System,
    /// A clock that moves only when told (tests).
    Manual(ManualClock),
}

impl Clock {
    /// The current time.
    pub fn now(&self) -> SystemTime {
        match self {
            Clock::System => SystemTime::now(),
            Clock::Manual(clock) => clock.now(),
        }
    }

    /// Resolves once [`Clock::now`] has reached `at`.
    pub async fn sleep_until(&self, at: SystemTime) {
        match self {
            Clock::System => {
                let wait = at
                    .duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO);
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
}
