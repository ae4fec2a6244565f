//! A retry budget: retries are allowed only while they stay under a share
//! of first attempts over a sliding window, plus a small floor per second.
//!
//! Retry alone multiplies load exactly when the downstream is weakest: at a
//! 60% failure rate, three attempts per order nearly doubles the calls. A
//! budget caps that amplification at about `1 + ratio` whatever the failure
//! rate, while still retrying the occasional failure of a healthy
//! downstream. The scheme is Envoy's retry budget and gRPC's retry
//! throttling in their simplest common form: count first attempts and
//! retries over the last `window`, and allow a retry while
//! `retries < ratio × first attempts + floor × window seconds`.
//!
//! The window is a ring of one-second buckets on tokio's clock (so tests run
//! on a paused clock); counting is a lock held for a few instructions.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// How the budget is set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BudgetConfig {
    /// Retries allowed per first attempt in the window (0.2: one retry per
    /// five orders).
    pub ratio: f64,
    /// Retries allowed per second of window whatever the traffic, so a
    /// quiet service still retries now and then.
    pub min_per_second: f64,
    /// How far back first attempts and retries are counted (whole seconds).
    pub window: Duration,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self {
            ratio: 0.2,
            min_per_second: 1.0,
            window: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    /// The second (since the budget's start) this bucket counts.
    second: u64,
    firsts: u64,
    retries: u64,
}

#[derive(Debug)]
struct Window {
    buckets: Vec<Bucket>,
}

/// The budget, shared by every caller.
#[derive(Debug)]
pub struct RetryBudget {
    config: BudgetConfig,
    started: Instant,
    window: Mutex<Window>,
}

impl RetryBudget {
    pub fn new(config: BudgetConfig) -> Self {
        let seconds = config.window.as_secs().max(1) as usize;
        Self {
            config,
            started: Instant::now(),
            window: Mutex::new(Window {
                buckets: vec![Bucket::default(); seconds],
            }),
        }
    }

    pub fn config(&self) -> BudgetConfig {
        self.config
    }

    /// The current bucket, emptied if it last counted an older second.
    fn with_bucket<T>(&self, f: impl FnOnce(&mut Window, usize) -> T) -> T {
        let second = self.started.elapsed().as_secs();
        let mut window = self.window.lock().unwrap_or_else(|p| p.into_inner());
        let index = (second % window.buckets.len() as u64) as usize;
        let bucket = &mut window.buckets[index];
        if bucket.second != second {
            *bucket = Bucket {
                second,
                ..Bucket::default()
            };
        }
        f(&mut window, index)
    }

    /// A first attempt was made.
    pub fn first_attempt(&self) {
        self.with_bucket(|w, i| w.buckets[i].firsts += 1);
    }

    /// Asks for one retry: counts it and says yes while the window's retries
    /// stay within the budget, says no (and counts nothing) otherwise.
    pub fn try_retry(&self) -> bool {
        let now = self.started.elapsed().as_secs();
        let config = self.config;
        self.with_bucket(|w, i| {
            let len = w.buckets.len() as u64;
            let (mut firsts, mut retries) = (0, 0);
            for b in &w.buckets {
                // Only buckets of the last `len` seconds count.
                if b.second + len > now {
                    firsts += b.firsts;
                    retries += b.retries;
                }
            }
            let allowed = config.ratio * firsts as f64 + config.min_per_second * len as f64;
            if (retries + 1) as f64 <= allowed {
                w.buckets[i].retries += 1;
                true
            } else {
                false
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(ratio: f64, floor: f64, window_secs: u64) -> RetryBudget {
        RetryBudget::new(BudgetConfig {
            ratio,
            min_per_second: floor,
            window: Duration::from_secs(window_secs),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn retries_stay_under_the_ratio_of_first_attempts_plus_the_floor() {
        let b = budget(0.2, 0.0, 10);
        for _ in 0..100 {
            b.first_attempt();
        }
        let granted = (0..100).filter(|_| b.try_retry()).count();
        assert_eq!(granted, 20);
    }

    #[tokio::test(start_paused = true)]
    async fn the_floor_allows_retries_with_no_traffic() {
        let b = budget(0.2, 1.0, 10);
        let granted = (0..100).filter(|_| b.try_retry()).count();
        assert_eq!(granted, 10, "one per second of a 10 s window");
    }

    #[tokio::test(start_paused = true)]
    async fn old_seconds_leave_the_window() {
        let b = budget(0.5, 0.0, 2);
        for _ in 0..10 {
            b.first_attempt();
        }
        assert_eq!((0..10).filter(|_| b.try_retry()).count(), 5);
        tokio::time::advance(Duration::from_secs(1)).await;
        // Still within the window: first attempts and retries both count.
        assert!(!b.try_retry());
        tokio::time::advance(Duration::from_secs(1)).await;
        // Both have left the window: nothing is allowed without new traffic.
        assert!(!b.try_retry());
        for _ in 0..4 {
            b.first_attempt();
        }
        assert_eq!((0..10).filter(|_| b.try_retry()).count(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn first_attempts_older_than_the_window_count_for_nothing_even_in_an_unused_bucket() {
        let b = budget(0.5, 0.0, 10);
        // Second 0, bucket 0.
        for _ in 0..10 {
            b.first_attempt();
        }
        // Second 15 falls in bucket 5: bucket 0 still holds second 0's counts.
        tokio::time::advance(Duration::from_secs(15)).await;
        assert!(
            !b.try_retry(),
            "second 0's first attempts left the window at second 10"
        );
        b.first_attempt();
        b.first_attempt();
        assert_eq!((0..10).filter(|_| b.try_retry()).count(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_retry_is_not_counted() {
        let b = budget(0.5, 0.0, 10);
        b.first_attempt();
        b.first_attempt();
        assert!(b.try_retry());
        assert!(!b.try_retry());
        assert!(!b.try_retry());
        b.first_attempt();
        b.first_attempt();
        // Two more first attempts: one more retry, not zero.
        assert!(b.try_retry());
    }
}
