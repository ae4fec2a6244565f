//! Deferred retry: orders whose charge met an open breaker wait in the store
//! instead of failing, and go back in line once the breaker has closed.
//!
//! The breaker fails fast, and so it fails orders that would have succeeded
//! a few seconds later: retry alone keeps them queued through a short outage
//! and completes more of them, at the price of hammering the provider. With
//! `BREAKER_DEFER=on` a worker whose charge the breaker refused moves the
//! order to `deferred` (not `failed`); this loop then
//!
//! - fails every deferred order older than `DEFER_MAX` (its deadline counts
//!   from when it was placed: a customer's order does not wait for ever);
//! - while the breaker is closed, puts deferred orders back in the queue at
//!   `DEFER_RATE` per second, oldest first, so that the backlog of an outage
//!   does not land on the provider the moment it recovers;
//! - while the breaker is open and its open period is over, or half-open,
//!   lets one order through a second at most: without live traffic nobody
//!   else would ask the breaker for the probe that closes it. A second order
//!   let through while the probe is out is refused again and waits again;
//!   nothing reaches the provider for it.
//!
//! Deferred orders are kept by the store, so on Postgres they survive a
//! restart, and any replica's loop may take one (`take_deferred` hands each
//! to one caller). Everything here waits on `tokio::time`.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::observability::metrics::{DeferMetrics, WorkerMetrics};
use crate::orders::{Order, Service};
use crate::reliability::{BreakerState, Reliability};

/// How often the loop looks.
pub const DEFER_TICK: Duration = Duration::from_millis(100);
/// The most orders a second the loop puts back (`DEFER_RATE`).
pub const DEFER_RATE_LIMIT: u32 = 100_000;
/// The longest deadline (`DEFER_MAX`).
pub const DEFER_MAX_LIMIT: Duration = Duration::from_secs(24 * 3600);
/// While the breaker is not closed, at most one order per this long goes
/// through to serve as its probe.
pub const PROBE_GAP: Duration = Duration::from_secs(1);

/// How deferral behaves (`BREAKER_DEFER`, `DEFER_MAX`, `DEFER_RATE`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeferSettings {
    /// How long after it was placed an order may still wait.
    pub max: Duration,
    /// Orders put back per second once the breaker has closed.
    pub rate: u32,
}

impl Default for DeferSettings {
    fn default() -> Self {
        Self {
            max: Duration::from_secs(300),
            rate: 50,
        }
    }
}

impl DeferSettings {
    /// Whether `order` may still be deferred now.
    pub fn within_deadline(&self, order: &Order) -> bool {
        let deadline = chrono::Duration::from_std(self.max).unwrap_or(chrono::Duration::MAX);
        crate::clock::now() < order.created_at + deadline
    }

    /// The last error of an order that waited past its deadline.
    pub fn expired_reason(&self) -> String {
        format!(
            "circuit open: still deferred at DEFER_MAX ({} after it was placed)",
            crate::units::format_duration(self.max)
        )
    }
}

/// Orders a tick may put back while the breaker is closed: `rate` per
/// second, carried over between ticks, never more than one tick's worth
/// plus one (a long closed spell saves nothing up).
#[derive(Debug, Default)]
struct Pace {
    tokens: f64,
}

impl Pace {
    fn take(&mut self, rate: u32, tick: Duration) -> usize {
        let per_tick = f64::from(rate) * tick.as_secs_f64();
        self.tokens = (self.tokens + per_tick).min(per_tick + 1.0);
        self.tokens.floor() as usize
    }

    fn spend(&mut self, n: usize) {
        self.tokens = (self.tokens - n as f64).max(0.0);
    }

    fn reset(&mut self) {
        self.tokens = 0.0;
    }
}

/// What the loop needs.
pub struct Deferral {
    pub service: Service,
    pub reliability: Reliability,
    pub settings: DeferSettings,
    pub metrics: DeferMetrics,
    pub jobs: WorkerMetrics,
}

impl Deferral {
    /// What the breaker allows now: a paced release, one probe, or nothing.
    fn allowance(&self, pace: &mut Pace, last_probe: &mut Option<Instant>) -> usize {
        let breaker = self.reliability.breaker();
        if !self.reliability.switches().breaker_enabled {
            // No breaker to wait for: release at the pace.
            return pace.take(self.settings.rate, DEFER_TICK);
        }
        let snapshot = breaker.snapshot();
        match snapshot.state {
            BreakerState::Closed => pace.take(self.settings.rate, DEFER_TICK),
            state => {
                pace.reset();
                let due = state == BreakerState::HalfOpen
                    || snapshot.until_half_open == Some(Duration::ZERO);
                let gap_over = last_probe.is_none_or(|at| at.elapsed() >= PROBE_GAP);
                if due && gap_over {
                    *last_probe = Some(Instant::now());
                    1
                } else {
                    0
                }
            }
        }
    }

    /// One look: expire, then release what the breaker allows. Returns how
    /// many were put back. A store error is logged and tried next time.
    async fn tick(&self, pace: &mut Pace, last_probe: &mut Option<Instant>) -> usize {
        match self
            .service
            .expire_deferred(self.settings.max, &self.settings.expired_reason())
            .await
        {
            Ok(expired) => {
                for order in &expired {
                    self.metrics.expired();
                    self.jobs.job_failed();
                    self.jobs.failed_after(order.age_at_last_update());
                    tracing::warn!(order_id = %order.id, "deferred order failed at its deadline");
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, "failing overdue deferred orders failed; will try again")
            }
        }
        let waiting = match self.service.count_deferred().await {
            Ok(n) => n,
            Err(err) => {
                tracing::warn!(error = %err, "counting deferred orders failed; will try again");
                return 0;
            }
        };
        self.metrics.set_waiting(waiting);
        if waiting == 0 {
            pace.reset();
            return 0;
        }
        let allowed = self.allowance(pace, last_probe);
        if allowed == 0 {
            return 0;
        }
        match self.service.release_deferred(allowed).await {
            Ok(n) => {
                pace.spend(n);
                self.metrics.released(n);
                self.metrics.set_waiting(waiting.saturating_sub(n as u64));
                n
            }
            Err(err) => {
                tracing::warn!(error = %err, "putting deferred orders back failed; will try again");
                0
            }
        }
    }
}

/// Runs the deferral loop every `DEFER_TICK` until `stop` fires.
pub async fn deferred_loop(deferral: Arc<Deferral>, stop: CancellationToken) {
    let mut tick = tokio::time::interval_at(Instant::now() + DEFER_TICK, DEFER_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pace = Pace::default();
    let mut last_probe = None;
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = tick.tick() => {
                deferral.tick(&mut pace, &mut last_probe).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pace_releases_the_rate_per_second_without_saving_up() {
        let mut pace = Pace::default();
        // 25 a second over 100 ms ticks: 2.5 a tick, so 2, 3, 2, 3, …
        let mut released = 0;
        for _ in 0..10 {
            let n = pace.take(25, DEFER_TICK);
            pace.spend(n);
            released += n;
        }
        assert_eq!(released, 25);
        // Ticks that release nothing (nothing waiting) save at most one
        // tick's worth plus one.
        for _ in 0..100 {
            pace.take(25, DEFER_TICK);
        }
        assert_eq!(pace.take(25, DEFER_TICK), 3);
        // Below one a tick, it still comes out whole, one every so often.
        let mut slow = Pace::default();
        let got: Vec<usize> = (0..10)
            .map(|_| {
                let n = slow.take(2, DEFER_TICK);
                slow.spend(n);
                n
            })
            .collect();
        assert_eq!(got.iter().sum::<usize>(), 2, "{got:?}");
    }
}
