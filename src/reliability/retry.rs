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
//! Jitter comes in the kinds of Marc Brooker's "Exponential Backoff And
//! Jitter" (AWS Architecture Blog, 2015, and aws-samples'
//! aws-arch-backoff-simulator), `RETRY_JITTER_KIND`; `w` is the schedule's
//! un-jittered wait (`min(cap, base × multiplier^n)`, the study's
//! `min(cap, base × 2^n)` with this crate's multiplier), `cap` the maximum:
//! - `proportional` (the default, and the only kind before): `w × (1 ± f)`,
//!   `f` = `RETRY_JITTER`, then capped;
//! - `none`: `w`;
//! - `full`: uniform in `[0, w]`;
//! - `equal`: `w/2` plus uniform in `[0, w/2]`;
//! - `decorrelated`: `min(cap, uniform in [base, 3 × previous])`, the
//!   previous starting at `base` (it does not follow the schedule).
//!
//! - The crate's own "retry after" (`Error::Transient { retry_after }`)
//!   bypasses `next_backoff()`, so such a wait is never counted against the
//!   attempt limit. A provider's `Retry-After` is therefore given to
//!   `AttemptLimit` as a floor instead (`RetryAfter`): the next wait is
//!   counted as any other and is at least that long, even past the cap
//!   (the provider said "not sooner"); one longer than `RETRY_AFTER_LIMIT`
//!   ends the loop, since no worker should sit on an order that long.
//!
//! The crate is listed by RustSec as unmaintained (RUSTSEC-2025-0012). Only
//! this module touches it, so it can be swapped without touching callers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use backoff::backoff::Backoff;
use backoff::ExponentialBackoff;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// How a retry's wait is jittered around its schedule's wait `w`:
/// proportional (`w` × (1 ± RETRY_JITTER)), none, full (0 to `w`), equal
/// (`w`/2 to `w`) or decorrelated (the first wait to 3 × the previous).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum JitterKind {
    #[default]
    Proportional,
    None,
    Full,
    Equal,
    Decorrelated,
}

impl JitterKind {
    pub const ALL: [JitterKind; 5] = [
        Self::Proportional,
        Self::None,
        Self::Full,
        Self::Equal,
        Self::Decorrelated,
    ];

    /// Its place in `ALL`.
    pub fn index(self) -> u8 {
        Self::ALL.iter().position(|k| *k == self).unwrap_or(0) as u8
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Proportional => "proportional",
            Self::None => "none",
            Self::Full => "full",
            Self::Equal => "equal",
            Self::Decorrelated => "decorrelated",
        }
    }
}

impl std::str::FromStr for JitterKind {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == raw.trim())
            .ok_or_else(|| {
                "expected one of proportional, none, full, equal, decorrelated".to_owned()
            })
    }
}

/// The longest `Retry-After` a retry waits out; a longer one ends the loop
/// with the failure in hand.
pub const RETRY_AFTER_LIMIT: Duration = Duration::from_secs(30);

/// The shortest next wait one retry loop's failure asked for (a provider's
/// `Retry-After`), shared by the loop, which sets it, and its backoff,
/// which takes it on the next wait. Zero: none.
#[derive(Debug, Clone, Default)]
pub(crate) struct RetryAfter(Arc<AtomicU64>);

impl RetryAfter {
    pub(crate) fn ask(&self, wait: Duration) {
        let nanos = u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX).max(1);
        self.0.fetch_max(nanos, Ordering::SeqCst);
    }

    fn take(&self) -> Option<Duration> {
        match self.0.swap(0, Ordering::SeqCst) {
            0 => None,
            nanos => Some(Duration::from_nanos(nanos)),
        }
    }
}

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
    /// Jitter: a wait is drawn from `base * (1 ± randomization_factor)`
    /// (the proportional kind's `f`).
    pub randomization_factor: f64,
    /// How the jitter is drawn.
    pub jitter: JitterKind,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            initial_interval: Duration::from_millis(200),
            max_interval: Duration::from_secs(2),
            multiplier: 1.5,
            randomization_factor: 0.5,
            jitter: JitterKind::Proportional,
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
            floor: self.initial_interval,
            randomization: self.randomization_factor.clamp(0.0, 1.0),
            kind: self.jitter,
            previous: self.initial_interval,
            seed,
            rng: None,
            retry_after: RetryAfter::default(),
        }
    }
}

/// Stops a backoff after `max_attempts - 1` waits, jitters each wait as
/// `kind` says and caps it at `ceiling`.
#[derive(Debug)]
pub(crate) struct AttemptLimit<B> {
    inner: B,
    max_waits: u32,
    waits: u32,
    ceiling: Duration,
    /// The first wait: decorrelated jitter's lower bound.
    floor: Duration,
    randomization: f64,
    kind: JitterKind,
    /// Decorrelated jitter's previous wait.
    previous: Duration,
    seed: Option<u64>,
    /// Made on the first wait: most calls succeed at once and never need it.
    rng: Option<StdRng>,
    /// The wait the last failure asked for, if it did.
    retry_after: RetryAfter,
}

impl<B: Backoff> Backoff for AttemptLimit<B> {
    fn reset(&mut self) {
        // retry_notify calls this before the first attempt: the count must start here.
        self.waits = 0;
        self.previous = self.floor;
        self.inner.reset();
    }

    fn next_backoff(&mut self) -> Option<Duration> {
        if self.waits >= self.max_waits {
            return None;
        }
        self.waits += 1;
        let base = self.inner.next_backoff()?;
        let wait = match self.kind {
            JitterKind::None => base,
            JitterKind::Proportional if self.randomization == 0.0 => base,
            JitterKind::Proportional => {
                let r = self.randomization;
                base.mul_f64(self.rng().random_range(1.0 - r..=1.0 + r))
            }
            JitterKind::Full => base.mul_f64(self.rng().random_range(0.0..=1.0)),
            JitterKind::Equal => base / 2 + (base / 2).mul_f64(self.rng().random_range(0.0..=1.0)),
            JitterKind::Decorrelated => {
                let low = self.floor.as_secs_f64();
                let high = (self.previous.as_secs_f64() * 3.0).max(low);
                let drawn = Duration::from_secs_f64(self.rng().random_range(low..=high));
                self.previous = drawn.min(self.ceiling);
                drawn
            }
        };
        // Jitter can push a wait past max_interval; cap it.
        let wait = wait.min(self.ceiling);
        match self.retry_after.take() {
            Some(asked) if asked > RETRY_AFTER_LIMIT => None,
            Some(asked) => Some(wait.max(asked)),
            None => Some(wait),
        }
    }
}

impl<B> AttemptLimit<B> {
    /// Where the retry loop says how long its last failure asked it to wait.
    pub(crate) fn retry_after(&self) -> RetryAfter {
        self.retry_after.clone()
    }
}

impl<B> AttemptLimit<B> {
    /// The loop's generator, made on the first draw (most calls succeed at
    /// once and never need one).
    fn rng(&mut self) -> &mut StdRng {
        let seed = self.seed;
        self.rng.get_or_insert_with(|| match seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_rng(&mut rand::rng()),
        })
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

    /// Each kind's waits, for a schedule of 200 ms × 1.5^n capped at 2 s,
    /// over many seeded loops: within the study's bounds, and spread.
    #[test]
    fn each_jitter_kind_draws_within_its_bounds() {
        let schedule = [
            200.0, 300.0, 450.0, 675.0, 1012.5, 1518.75, 2000.0, 2000.0, 2000.0,
        ];
        let loop_of = |kind, seed| {
            let mut b = RetryPolicy {
                max_attempts: 10,
                jitter: kind,
                ..RetryPolicy::default()
            }
            .backoff(Some(seed));
            b.reset();
            std::iter::from_fn(move || b.next_backoff())
                .map(|d| d.as_secs_f64() * 1000.0)
                .collect::<Vec<f64>>()
        };
        assert_eq!(loop_of(JitterKind::None, 1).len(), 9);
        for (w, exact) in schedule.iter().zip(loop_of(JitterKind::None, 1)) {
            assert!((w - exact).abs() < 1.0, "none: {exact} for {w}");
        }
        let (mut full_low, mut equal_spread, mut decorrelated_high) = (0, 0.0_f64, 0);
        let mut decorrelated_near_triple = 0;
        for seed in 0..300 {
            for (w, ms) in schedule.iter().zip(loop_of(JitterKind::Full, seed)) {
                assert!((0.0..=w + 0.001).contains(&ms), "full: {ms} for {w}");
                full_low += usize::from(ms < w / 4.0);
            }
            for (w, ms) in schedule.iter().zip(loop_of(JitterKind::Equal, seed)) {
                assert!(
                    ms >= w / 2.0 - 0.001 && ms <= w + 0.001,
                    "equal: {ms} for {w}"
                );
                equal_spread = equal_spread.max(w - ms);
            }
            let mut previous = 200.0_f64;
            for ms in loop_of(JitterKind::Decorrelated, seed) {
                let high = (previous * 3.0).min(2000.0);
                assert!(
                    ms >= 200.0 - 0.001 && ms <= high + 0.001,
                    "decorrelated: {ms} after {previous}"
                );
                decorrelated_high += usize::from(ms > previous * 1.5);
                decorrelated_near_triple += usize::from(ms > previous * 2.5);
                previous = ms;
            }
        }
        assert!(
            full_low > 300,
            "full jitter reaches down towards zero: {full_low}"
        );
        assert!(
            equal_spread > 900.0,
            "equal jitter spreads over the upper half: {equal_spread}"
        );
        assert!(
            decorrelated_high > 300,
            "decorrelated jitter grows from its previous wait"
        );
        assert!(
            decorrelated_near_triple > 30,
            "up to three times it: {decorrelated_near_triple}"
        );
        // Seeded: the same loop every time, for every kind.
        for kind in JitterKind::ALL {
            assert_eq!(loop_of(kind, 7), loop_of(kind, 7), "{kind:?}");
        }
        // A reset starts decorrelated jitter again from the first wait.
        let mut b = RetryPolicy {
            max_attempts: 10,
            jitter: JitterKind::Decorrelated,
            ..RetryPolicy::default()
        }
        .backoff(Some(3));
        b.reset();
        while b.next_backoff().is_some() {}
        b.reset();
        let first = b.next_backoff().unwrap().as_secs_f64() * 1000.0;
        assert!(first <= 600.0 + 0.001, "after a reset: {first}");
    }

    #[test]
    fn jitter_kinds_are_read_by_name() {
        for kind in JitterKind::ALL {
            assert_eq!(kind.as_str().parse::<JitterKind>(), Ok(kind));
        }
        assert!("sideways"
            .parse::<JitterKind>()
            .unwrap_err()
            .contains("decorrelated"));
    }
}
