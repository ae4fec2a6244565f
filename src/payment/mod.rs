//! The simulated payment service: it fails on purpose.
//!
//! Each charge takes a latency drawn uniformly between the configured bounds
//! and fails with the configured probability. It is cancellation-aware: when
//! the token fires mid-charge it returns `Cancelled` at once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;

use crate::orders::OrderId;
use crate::reliability::Classify;

/// What the simulator does on each call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PaymentSettings {
    /// Share of calls that fail, 0 to 1.
    pub failure_rate: f64,
    pub latency_min: Duration,
    pub latency_max: Duration,
}

impl Default for PaymentSettings {
    fn default() -> Self {
        Self {
            failure_rate: 0.3,
            latency_min: Duration::from_millis(100),
            latency_max: Duration::from_millis(500),
        }
    }
}

/// Why a charge did not go through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PaymentError {
    #[error("payment declined (simulated)")]
    Declined,
    #[error("payment cancelled: shutting down")]
    Cancelled,
}

impl Classify for PaymentError {
    fn counts_as_failure(&self) -> bool {
        matches!(self, Self::Declined)
    }

    fn is_retryable(&self) -> bool {
        matches!(self, Self::Declined)
    }
}

/// The simulator. Shared by every worker.
pub struct Simulator {
    settings: PaymentSettings,
    rng: Mutex<StdRng>,
    calls: AtomicU64,
    failures: AtomicU64,
}

impl Simulator {
    /// A simulator whose draws come from `seed` when given (reproducible
    /// runs), from the operating system otherwise.
    pub fn new(settings: PaymentSettings, seed: Option<u64>) -> Self {
        let rng = match seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Self {
            settings,
            rng: Mutex::new(rng),
            calls: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        }
    }

    pub fn settings(&self) -> PaymentSettings {
        self.settings
    }

    /// Charge calls received so far.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    /// Charge calls that failed so far.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::SeqCst)
    }

    fn draw(&self) -> (bool, Duration) {
        let mut rng = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        let fails = rng.random_bool(self.settings.failure_rate.clamp(0.0, 1.0));
        let (lo, hi) = (self.settings.latency_min, self.settings.latency_max);
        let latency = if hi > lo {
            rng.random_range(lo..=hi)
        } else {
            lo
        };
        (fails, latency)
    }

    /// Charges the order: waits the drawn latency, then succeeds or fails.
    #[tracing::instrument(skip_all, fields(order_id = %order_id))]
    pub async fn charge(
        &self,
        order_id: OrderId,
        cancel: &CancellationToken,
    ) -> Result<(), PaymentError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let (fails, latency) = self.draw();
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return Err(PaymentError::Cancelled),
            _ = tokio::time::sleep(latency) => {}
        }
        if fails {
            self.failures.fetch_add(1, Ordering::SeqCst);
            tracing::debug!(latency_ms = latency.as_millis() as u64, "charge declined");
            Err(PaymentError::Declined)
        } else {
            tracing::debug!(latency_ms = latency.as_millis() as u64, "charge accepted");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sim(rate: f64, seed: u64) -> Simulator {
        Simulator::new(
            PaymentSettings {
                failure_rate: rate,
                ..PaymentSettings::default()
            },
            Some(seed),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn latency_is_within_bounds_on_the_paused_clock() {
        let s = sim(0.0, 1);
        let token = CancellationToken::new();
        for _ in 0..50 {
            let start = tokio::time::Instant::now();
            s.charge(OrderId::new_random(), &token).await.unwrap();
            let took = start.elapsed();
            assert!(
                took >= Duration::from_millis(100) && took <= Duration::from_millis(501),
                "{took:?}"
            );
        }
        assert_eq!(s.calls(), 50);
    }

    #[tokio::test(start_paused = true)]
    async fn the_failure_rate_is_honoured_roughly_and_exactly_at_the_ends() {
        let token = CancellationToken::new();
        for (rate, lo, hi) in [(0.0, 0, 0), (1.0, 1000, 1000), (0.3, 240, 360)] {
            let s = sim(rate, 7);
            for _ in 0..1000 {
                let _ = s.charge(OrderId::new_random(), &token).await;
            }
            let failed = s.failures();
            assert!(
                (lo..=hi).contains(&failed),
                "rate {rate}: {failed} failures"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_same_seed_gives_the_same_outcomes() {
        let token = CancellationToken::new();
        let mut runs = Vec::new();
        for seed in [5, 5, 6] {
            let s = sim(0.5, seed);
            let mut outcomes = Vec::new();
            for _ in 0..64 {
                outcomes.push(s.charge(OrderId::new_random(), &token).await.is_ok());
            }
            runs.push(outcomes);
        }
        assert_eq!(runs[0], runs[1]);
        assert_ne!(runs[0], runs[2]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_charge_returns_promptly_with_a_cancellation_error() {
        let s = sim(0.0, 1);
        let token = CancellationToken::new();
        let start = tokio::time::Instant::now();
        let charge = s.charge(OrderId::new_random(), &token);
        token.cancel();
        assert_eq!(charge.await, Err(PaymentError::Cancelled));
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert!(!PaymentError::Cancelled.counts_as_failure());
    }
}
