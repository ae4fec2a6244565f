//! The date and time of day as the service reads them: the system's clock,
//! or in a simulated run a fixed date that moves with tokio's clock.
//!
//! Waiting and measuring go through `tokio::time` everywhere, so a paused
//! runtime controls them. Dates are the one thing tokio has no clock for:
//! an order's `created_at`, a key's age, a timeline sample's `at`. They are
//! read here, and nowhere else, so that a simulated run (see
//! `experiment::simulated`) gets the same dates every time: while a
//! `Simulated` guard is alive on a thread, `now()` on that thread is
//! `SIMULATED_EPOCH` plus the tokio time passed since the guard was made.
//! A simulated service runs on one current-thread runtime, so every one of
//! its tasks reads the guard of the thread it was made on.

use std::cell::Cell;

use chrono::{DateTime, TimeZone, Utc};
use tokio::time::Instant;

/// Where a simulated run's dates begin: midnight UTC, 1 January 2030.
pub const SIMULATED_EPOCH_SECS: i64 = 1_893_456_000;

thread_local! {
    /// The tokio instant that stands for the epoch, while simulated.
    static ANCHOR: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Now, by the system clock, or by the simulated one on a thread that holds
/// a `Simulated` guard.
pub fn now() -> DateTime<Utc> {
    match ANCHOR.with(Cell::get) {
        None => Utc::now(),
        Some(anchor) => {
            let elapsed = Instant::now().saturating_duration_since(anchor);
            epoch() + chrono::Duration::from_std(elapsed).unwrap_or(chrono::Duration::MAX)
        }
    }
}

fn epoch() -> DateTime<Utc> {
    Utc.timestamp_opt(SIMULATED_EPOCH_SECS, 0)
        .single()
        .expect("a valid timestamp")
}

/// Dates on this thread follow tokio's clock from `SIMULATED_EPOCH_SECS`
/// until the guard is dropped. Make it inside the runtime whose clock it
/// follows (a paused one).
pub struct Simulated {
    previous: Option<Instant>,
}

impl Simulated {
    pub fn start() -> Self {
        let previous = ANCHOR.with(|a| a.replace(Some(Instant::now())));
        Self { previous }
    }
}

impl Drop for Simulated {
    fn drop(&mut self) {
        ANCHOR.with(|a| a.set(self.previous));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_simulated_date_starts_at_the_epoch_and_moves_with_tokio_time() {
        let before = now();
        assert!(before.timestamp() > 1_600_000_000, "the system's clock");
        {
            let _sim = Simulated::start();
            assert_eq!(now(), epoch());
            tokio::time::sleep(Duration::from_millis(1500)).await;
            assert_eq!(now(), epoch() + chrono::Duration::milliseconds(1500));
        }
        let after = now();
        assert!(after >= before && after.timestamp() < SIMULATED_EPOCH_SECS);
    }
}
