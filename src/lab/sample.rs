//! One sample of the pipeline: what it did over one interval, computed from
//! two readings of the service's own counters. The timeline records them;
//! the feed carries them to the pages that follow it.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::observability::latency::Snapshot;
use crate::observability::metrics::Totals;
use crate::payment::{Mode, ProviderLoad};
use crate::reliability::{BreakerSnapshot, BreakerState};

/// One interval of the pipeline. Rates are per second; `*_total` fields and
/// the charges are running totals since the service started.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Sample {
    /// 1 for the first sample, one more for each after.
    pub seq: u64,
    /// Seconds since the service started, at the end of the interval.
    pub t: f64,
    pub at: DateTime<Utc>,
    /// Seconds the interval lasted.
    pub interval: f64,
    /// Orders put on the queue.
    pub accepted_per_s: f64,
    /// Orders refused with 503 (queue full).
    pub rejected_per_s: f64,
    pub completed_per_s: f64,
    pub failed_per_s: f64,
    /// Charge calls that reached the provider.
    pub payment_calls_per_s: f64,
    /// Charge calls that failed, timeouts included.
    pub payment_failures_per_s: f64,
    pub payment_timeouts_per_s: f64,
    /// Waits before another attempt.
    pub retries_per_s: f64,
    /// Calls the breaker refused because it was open.
    pub rejections_open_per_s: f64,
    /// Calls the breaker refused because its half-open probe was in flight.
    pub rejections_half_open_per_s: f64,
    pub breaker: BreakerState,
    pub consecutive_failures: u32,
    /// Under BREAKER_POLICY=failure_rate: calls in the breaker's window and
    /// the share of them that failed.
    #[serde(default)]
    pub breaker_window_calls: Option<u64>,
    #[serde(default)]
    pub breaker_window_failure_rate: Option<f64>,
    /// Seconds until a probe is allowed, while open.
    pub until_half_open: Option<f64>,
    pub queue_depth: usize,
    pub busy_workers: usize,
    /// Orders that finished (completed or failed) in the interval: what the
    /// latency quantiles are over.
    pub finished: u64,
    /// Created-to-finished latency, median, in milliseconds (none finished: null).
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    pub charges: u64,
    pub duplicate_charges: u64,
    pub payment_mode: Mode,
    pub accepted_total: u64,
    pub rejected_total: u64,
    pub completed_total: u64,
    pub failed_total: u64,
    pub payment_calls_total: u64,
    /// The provider's load (with PAYMENT_CAPACITY; 0 when unlimited): calls
    /// it is serving, calls waiting for a slot, calls refused after waiting
    /// and calls finished after their caller left (wasted work), per second.
    #[serde(default)]
    pub provider_in_flight: u64,
    #[serde(default)]
    pub provider_queued: u64,
    #[serde(default)]
    pub provider_overloaded_per_s: f64,
    #[serde(default)]
    pub provider_wasted_per_s: f64,
    #[serde(default)]
    pub provider_overloaded_total: u64,
    #[serde(default)]
    pub provider_wasted_total: u64,
    /// Orders deferred now (BREAKER_DEFER=on), and deferrals per second.
    #[serde(default)]
    pub deferred: u64,
    #[serde(default)]
    pub deferred_per_s: f64,
    /// Charge attempts client-side throttling shed per second, and the
    /// probability it sheds one now (THROTTLE; 0 while it is off).
    #[serde(default)]
    pub throttled_per_s: f64,
    #[serde(default)]
    pub throttle_probability: f64,
    /// Hedges started per second (HEDGE).
    #[serde(default)]
    pub hedges_per_s: f64,
    /// The concurrency limit now (none while off), the calls in flight
    /// under it, and the calls it refused per second.
    #[serde(default)]
    pub concurrency_limit: Option<u32>,
    #[serde(default)]
    pub limit_in_flight: u32,
    #[serde(default)]
    pub limit_rejected_per_s: f64,
    /// The retry's jitter kind in force (a run-time switch).
    #[serde(default)]
    pub retry_jitter: crate::reliability::JitterKind,
}

/// One read of the sources.
#[derive(Debug, Clone)]
pub struct Reading {
    pub at: Instant,
    pub totals: Totals,
    pub payment_calls: u64,
    pub breaker: BreakerSnapshot,
    pub queue_depth: usize,
    pub busy_workers: usize,
    pub mode: Mode,
    pub provider: ProviderLoad,
    /// The client-side throttle's probability of shedding now (0 off).
    pub throttle_probability: f64,
    pub retry_jitter: crate::reliability::JitterKind,
    /// The concurrency limit and the calls in flight (none while off).
    pub limit: Option<(u32, u32)>,
    /// Cumulative latency counts of completed and of failed orders.
    pub completed_latency: Snapshot,
    pub failed_latency: Snapshot,
}

impl Sample {
    /// The sample for the interval from `prev` to `now`.
    pub fn between(seq: u64, t: f64, prev: &Reading, now: &Reading) -> Self {
        let secs = now.at.duration_since(prev.at).as_secs_f64();
        let per_s = |a: u64, b: u64| {
            if secs > 0.0 {
                round3(b.saturating_sub(a) as f64 / secs)
            } else {
                0.0
            }
        };
        let (p, n) = (&prev.totals, &now.totals);
        let latency = now
            .completed_latency
            .since(&prev.completed_latency)
            .merge(&now.failed_latency.since(&prev.failed_latency));
        Self {
            seq,
            t: round3(t),
            at: crate::clock::now(),
            interval: round3(secs),
            accepted_per_s: per_s(p.accepted, n.accepted),
            rejected_per_s: per_s(p.rejected, n.rejected),
            completed_per_s: per_s(p.completed, n.completed),
            failed_per_s: per_s(p.failed, n.failed),
            payment_calls_per_s: per_s(prev.payment_calls, now.payment_calls),
            payment_failures_per_s: per_s(p.payment_failures, n.payment_failures),
            payment_timeouts_per_s: per_s(p.payment_timeouts, n.payment_timeouts),
            retries_per_s: per_s(p.retries, n.retries),
            rejections_open_per_s: per_s(p.rejected_open, n.rejected_open),
            rejections_half_open_per_s: per_s(p.rejected_half_open, n.rejected_half_open),
            breaker: now.breaker.state,
            consecutive_failures: now.breaker.consecutive_failures,
            breaker_window_calls: now.breaker.window_calls,
            breaker_window_failure_rate: now.breaker.window_failure_rate.map(round3),
            until_half_open: now.breaker.until_half_open.map(|d| round3(d.as_secs_f64())),
            queue_depth: now.queue_depth,
            busy_workers: now.busy_workers,
            finished: latency.count(),
            latency_p50_ms: latency.quantile_ms(0.5).map(round3),
            latency_p99_ms: latency.quantile_ms(0.99).map(round3),
            charges: n.charges,
            duplicate_charges: n.duplicate_charges,
            payment_mode: now.mode,
            accepted_total: n.accepted,
            rejected_total: n.rejected,
            completed_total: n.completed,
            failed_total: n.failed,
            payment_calls_total: now.payment_calls,
            provider_in_flight: now.provider.in_flight,
            provider_queued: now.provider.queued,
            provider_overloaded_per_s: per_s(prev.provider.overloaded, now.provider.overloaded),
            provider_wasted_per_s: per_s(prev.provider.wasted, now.provider.wasted),
            provider_overloaded_total: now.provider.overloaded,
            provider_wasted_total: now.provider.wasted,
            deferred: n.deferred_now,
            deferred_per_s: per_s(p.deferred, n.deferred),
            throttled_per_s: per_s(p.throttled, n.throttled),
            throttle_probability: round3(now.throttle_probability),
            hedges_per_s: per_s(p.hedges, n.hedges),
            concurrency_limit: now.limit.map(|l| l.0),
            limit_in_flight: now.limit.map_or(0, |l| l.1),
            limit_rejected_per_s: per_s(p.limit_rejected, n.limit_rejected),
            retry_jitter: now.retry_jitter,
        }
    }
}

pub(super) fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}
