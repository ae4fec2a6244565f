//! Retry with exponential backoff, on the `backoff` crate.
//!
//! Two of the crate's semantics differ from what the lab needs, and this file
//! closes both gaps:
//! - The crate has no attempt limit. `RETRY_MAX_ATTEMPTS` counts *attempts*,
//!   not retries: 3 means exactly three calls, so at most two waits.
//!   `AttemptLimit` counts the waits it hands out and resets the count in
//!   `reset()`, which `retry_notify` calls before the first attempt.
//! - Its default elapsed-time limit reads the real clock, which tests on a
//!   paused tokio clock cannot move; it is switched off (`None`).
//!
//! - Its jitter draws from `rand::random`, which cannot be seeded. The
//!   crate computes the un-jittered schedule and `AttemptLimit` applies the
//!   jitter with a generator it is given, so a seeded run waits the same.
//!
//! The crate is listed by RustSec as unmaintained (RUSTSEC-2025-0012). Only
//! this module touches it, so it can be swapped without touching callers.

use std::time::Duration;

use backoff::backoff::Backoff;
use backoff::ExponentialBackoff;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// How the retry loop waits between attempts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Total calls, the first included. At least 1.
    pub max_attempts: u32,
    /// The first wait, before jitter.
    pub initial_interval: Duration,
    /// No wait is ever longer than this, jitter included.
    pub max_interval: Duration,
    /// Each wait's base is the previous one's times this.
    pub multiplier: f64,
    /// Jitter: a wait is drawn from `base * (1 ± randomization_factor)`.
    pub randomization_factor: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            initial_interval: Duration::from_millis(200),
            max_interval: Duration::from_secs(2),
            multiplier: 1.5,
            randomization_factor: 0.5,
        }
    }
}

impl RetryPolicy {
    /// The backoff schedule for one retry loop. `seed` makes its jitter
    /// reproducible; without one the jitter comes from the thread's generator.
    pub(crate) fn backoff(&self, seed: Option<u64>) -> AttemptLimit<ExponentialBackoff> {
        let inner = ExponentialBackoff {
            current_interval: self.initial_interval,
            initial_interval: self.initial_interval,
            // Jitter is applied by AttemptLimit, from a generator it owns.
            randomization_factor: 0.0,
            multiplier: self.multiplier,
            max_interval: self.max_interval,
            // The crate's default (15 min) reads the real clock: no elapsed limit.
            max_elapsed_time: None,
            ..ExponentialBackoff::default()
        };
        AttemptLimit {
            inner,
            max_waits: self.max_attempts.saturating_sub(1),
            waits: 0,
            ceiling: self.max_interval,
            randomization: self.randomization_factor.clamp(0.0, 1.0),
            seed,
            rng: None,
        }
    }
}

/// Stops a backoff after `max_attempts - 1` waits, jitters each wait by
/// `± randomization` and caps it at `ceiling`.
#[derive(Debug)]
pub(crate) struct AttemptLimit<B> {
    inner: B,
    max_waits: u32,
    waits: u32,
    ceiling: Duration,
    randomization: f64,
    seed: Option<u64>,
    /// Made on the first wait: most calls succeed at once and never need it.
    rng: Option<StdRng>,
}

impl<B: Backoff> Backoff for AttemptLimit<B> {
    fn reset(&mut self) {
        // retry_notify calls this before the first attempt: the count must start here.
        self.waits = 0;
        self.inner.reset();
    }

    fn next_backoff(&mut self) -> Option<Duration> {
        if self.waits >= self.max_waits {
            return None;
        }
        self.waits += 1;
        let base = self.inner.next_backoff()?;
        let factor = if self.randomization > 0.0 {
            let seed = self.seed;
            let rng = self.rng.get_or_insert_with(|| match seed {
                Some(seed) => StdRng::seed_from_u64(seed),
                None => StdRng::from_rng(&mut rand::rng()),
            });
            rng.random_range(1.0 - self.randomization..=1.0 + self.randomization)
        } else {
            1.0
        };
        // Jitter can push a wait past max_interval; cap it.
        Some(base.mul_f64(factor).min(self.ceiling))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_attempts_give_exactly_two_waits_and_reset_restarts_the_count() {
        let mut b = RetryPolicy::default().backoff(None);
        b.reset();
        assert!(b.next_backoff().is_some());
        assert!(b.next_backoff().is_some());
        assert_eq!(b.next_backoff(), None);
        b.reset();
        assert!(b.next_backoff().is_some());
    }

    #[test]
    fn one_attempt_never_waits() {
        let mut b = RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        }
        .backoff(None);
        b.reset();
        assert_eq!(b.next_backoff(), None);
    }

    #[test]
    fn without_jitter_the_waits_grow_by_the_multiplier_up_to_the_maximum() {
        let mut b = RetryPolicy {
            max_attempts: 10,
            randomization_factor: 0.0,
            ..RetryPolicy::default()
        }
        .backoff(None);
        b.reset();
        let waits: Vec<u128> = std::iter::from_fn(|| b.next_backoff())
            .map(|d| d.as_millis())
            .collect();
        assert_eq!(waits, [200, 300, 450, 675, 1012, 1518, 2000, 2000, 2000]);
    }

    #[test]
    fn the_same_seed_gives_the_same_jitter() {
        let policy = RetryPolicy {
            max_attempts: 6,
            ..RetryPolicy::default()
        };
        let waits = |seed| {
            let mut b = policy.backoff(Some(seed));
            b.reset();
            std::iter::from_fn(move || b.next_backoff()).collect::<Vec<_>>()
        };
        assert_eq!(waits(3), waits(3));
        assert_ne!(waits(3), waits(4));
    }

    #[test]
    fn jittered_waits_stay_within_their_band_and_under_the_maximum() {
        for _ in 0..200 {
            let mut b = RetryPolicy {
                max_attempts: 12,
                ..RetryPolicy::default()
            }
            .backoff(None);
            b.reset();
            let mut base = 200.0_f64;
            while let Some(wait) = b.next_backoff() {
                let ms = wait.as_secs_f64() * 1000.0;
                assert!(ms >= (base * 0.5).min(2000.0) - 1.0, "{ms} vs base {base}");
                assert!(ms <= 2000.0, "{ms} over the maximum");
                base = (base * 1.5).min(2000.0);
            }
        }
    }
}
