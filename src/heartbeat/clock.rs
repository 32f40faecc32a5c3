//! The scheduler's sense of time: the wall clock in production, a clock the test moves by hand in tests.
//!
//! Every time the scheduler reads or waits for goes through [`Clock`], so a test can run a day of schedule in
//! microseconds and know exactly which ticks happened, instead of sleeping and hoping.

use std::sync::Mutex;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

/// Where the scheduler gets "now" and how it waits.
#[async_trait]
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> DateTime<Utc>;
    /// Returns once `now() >= deadline`.
    async fn sleep_until(&self, deadline: DateTime<Utc>);
}

/// The real clock: UTC wall time, waiting on tokio's timer.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

#[async_trait]
impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }

    async fn sleep_until(&self, deadline: DateTime<Utc>) {
        // Re-checked after waking: the wall clock may have been set back while we slept.
        loop {
            let left = deadline - Utc::now();
            match left.to_std() {
                Ok(wait) if !wait.is_zero() => tokio::time::sleep(wait).await,
                _ => return,
            }
        }
    }
}

/// A clock that only moves when told to ([`FakeClock::advance`], [`FakeClock::set`]); sleepers wake when it
/// passes their deadline.
#[derive(Debug)]
pub struct FakeClock {
    now: Mutex<DateTime<Utc>>,
    moved: tokio::sync::watch::Sender<DateTime<Utc>>,
}

impl FakeClock {
    pub fn new(start: DateTime<Utc>) -> FakeClock {
        let (moved, _) = tokio::sync::watch::channel(start);
        FakeClock {
            now: Mutex::new(start),
            moved,
        }
    }

    /// Moves the clock forward by `by` and wakes every sleeper whose deadline has passed.
    pub fn advance(&self, by: std::time::Duration) {
        let by = chrono::Duration::from_std(by).unwrap_or(chrono::Duration::MAX);
        let mut now = self.now.lock().unwrap_or_else(|e| e.into_inner());
        *now += by;
        self.moved.send_replace(*now);
    }

    /// Sets the clock (forward or back).
    pub fn set(&self, to: DateTime<Utc>) {
        let mut now = self.now.lock().unwrap_or_else(|e| e.into_inner());
        *now = to;
        self.moved.send_replace(to);
    }
}

#[async_trait]
impl Clock for FakeClock {
    fn now(&self) -> DateTime<Utc> {
        *self.now.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn sleep_until(&self, deadline: DateTime<Utc>) {
        let mut moved = self.moved.subscribe();
        loop {
            if *moved.borrow_and_update() >= deadline {
                return;
            }
            if moved.changed().await.is_err() {
                // The clock is gone: nothing will ever move it again.
                std::future::pending::<()>().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn fake_clock_wakes_sleepers_only_when_moved_past_their_deadline() {
        let start = Utc::now();
        let clock = Arc::new(FakeClock::new(start));
        let c = clock.clone();
        let sleeper = tokio::spawn(async move {
            c.sleep_until(start + chrono::Duration::seconds(10)).await;
            c.now()
        });
        clock.advance(Duration::from_secs(5));
        tokio::task::yield_now().await;
        assert!(!sleeper.is_finished());
        clock.advance(Duration::from_secs(5));
        let woke_at = tokio::time::timeout(Duration::from_secs(5), sleeper)
            .await
            .expect("woke")
            .expect("join");
        assert_eq!(woke_at, start + chrono::Duration::seconds(10));
    }
}
