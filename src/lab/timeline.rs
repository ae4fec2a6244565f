//! The timeline recorder: every `TIMELINE_INTERVAL`, one sample of what the
//! pipeline did since the previous one, kept in a bounded ring and published
//! on the lab's feed.
//!
//! Samples are read from the service's own counters and gauges through
//! their handles (`Metrics::totals`, the queue, the breaker, the simulator),
//! never by rendering and parsing `/metrics`. Rates are per second over the
//! time that actually passed between two reads, so a late tick does not
//! inflate them. Completion latency is the created-to-finished time of the
//! orders finished in the interval: the difference of two snapshots of the
//! workers' cumulative histograms.
//!
//! Memory is bounded: the ring holds `retention / interval` samples (a few
//! hundred bytes each; 3,600 for the default 15 minutes at 250 ms).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::events::{ChangeKind, Feed};
use crate::observability::latency::{LatencyHistogram, Snapshot};
use crate::observability::metrics::Totals;
use crate::observability::Metrics;
use crate::payment::{Mode, ProviderLoad, Simulator};
use crate::reliability::{BreakerSnapshot, BreakerState, Reliability};
use crate::workers::Dispatcher;

/// The most samples a ring may hold, whatever the settings say.
pub const MAX_SAMPLES: usize = 100_000;

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

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// Where the recorder reads from: handles of the running service.
pub struct Sources {
    pub metrics: Arc<Metrics>,
    pub completed_latency: LatencyHistogram,
    pub failed_latency: LatencyHistogram,
    pub queue: Arc<Dispatcher>,
    pub reliability: Reliability,
    pub payment: Arc<Simulator>,
}

impl Sources {
    pub fn new(
        metrics: Arc<Metrics>,
        queue: Arc<Dispatcher>,
        reliability: Reliability,
        payment: Arc<Simulator>,
    ) -> Self {
        Self {
            completed_latency: metrics.completed_latency(),
            failed_latency: metrics.failed_latency(),
            metrics,
            queue,
            reliability,
            payment,
        }
    }

    pub fn read(&self) -> Reading {
        let switches = self.reliability.switches();
        Reading {
            at: Instant::now(),
            totals: self.metrics.totals(),
            // The in-process simulator's calls, or the remote client's
            // attempts (only one of them is used).
            payment_calls: self.payment.calls() + self.metrics.payment_client().reading().attempts,
            breaker: self.reliability.breaker().snapshot(),
            queue_depth: self.queue.depth(),
            busy_workers: self.queue.busy(),
            mode: self.payment.view().mode,
            provider: self.payment.load(),
            throttle_probability: if switches.throttle_enabled {
                self.reliability.throttle().probability()
            } else {
                0.0
            },
            retry_jitter: switches.retry_jitter,
            limit: self.reliability.limit().now(),
            completed_latency: self.completed_latency.snapshot(),
            failed_latency: self.failed_latency.snapshot(),
        }
    }
}

/// The ring of recent samples.
pub struct Timeline {
    interval: Duration,
    capacity: usize,
    ring: Mutex<VecDeque<Arc<Sample>>>,
}

impl std::fmt::Debug for Timeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Timeline")
            .field("interval", &self.interval)
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl Timeline {
    /// A sample every `interval`, the last `retention` of them kept.
    pub fn new(interval: Duration, retention: Duration) -> Self {
        let capacity = (retention.as_secs_f64() / interval.as_secs_f64()).ceil() as usize;
        let capacity = capacity.clamp(1, MAX_SAMPLES);
        Self {
            interval,
            capacity,
            ring: Mutex::new(VecDeque::with_capacity(capacity.min(4096))),
        }
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// How many samples the ring keeps.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Arc<Sample>>> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, sample: Arc<Sample>) {
        let mut ring = self.lock();
        if ring.len() == self.capacity {
            ring.pop_front();
        }
        ring.push_back(sample);
    }

    /// The newest sample's `seq`, 0 before the first.
    pub fn last_seq(&self) -> u64 {
        self.lock().back().map_or(0, |s| s.seq)
    }

    /// The samples after `seq` that the ring still holds, oldest first.
    pub fn since(&self, seq: u64) -> Vec<Arc<Sample>> {
        let ring = self.lock();
        let Some(first) = ring.front().map(|s| s.seq) else {
            return Vec::new();
        };
        // Sequence numbers are consecutive, so the position is arithmetic.
        let skip = seq.saturating_sub(first - 1).min(ring.len() as u64) as usize;
        ring.iter().skip(skip).cloned().collect()
    }

    /// The last `n` samples, oldest first.
    pub fn last(&self, n: usize) -> Vec<Arc<Sample>> {
        let ring = self.lock();
        ring.iter()
            .skip(ring.len().saturating_sub(n))
            .cloned()
            .collect()
    }

    /// Samples until `stop`: each goes into the ring and onto the feed. A
    /// payment mode that changed with no change published (a brownout that
    /// ended by itself) is published as a change.
    ///
    /// The first reading is taken here, not when the task first runs, so the
    /// first sample counts everything from this call on.
    pub fn record(
        self: Arc<Self>,
        sources: Sources,
        feed: Arc<Feed>,
        stop: CancellationToken,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let first = sources.read();
        feed.payment_mode_seen(first.mode);
        let start = Instant::now();
        self.run(sources, feed, stop, first, start)
    }

    async fn run(
        self: Arc<Self>,
        sources: Sources,
        feed: Arc<Feed>,
        stop: CancellationToken,
        first: Reading,
        start: Instant,
    ) {
        let mut prev = first;
        let mut ticker = tokio::time::interval_at(start + self.interval, self.interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut seq = 0;
        loop {
            tokio::select! {
                // Stop first: the last sample must not depend on tokio's
                // random pick when both are ready at once.
                biased;
                _ = stop.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let now = sources.read();
            seq += 1;
            let sample = Arc::new(Sample::between(seq, feed.clock(), &prev, &now));
            self.push(sample.clone());
            feed.publish_sample(sample);
            if feed.payment_mode_seen(now.mode) {
                let view = sources.payment.view();
                feed.publish(
                    ChangeKind::Payment,
                    format!(
                        "payment mode {} → {} (by itself)",
                        mode_name(prev.mode),
                        mode_name(now.mode)
                    ),
                    serde_json::to_value(view).unwrap_or_default(),
                );
            }
            prev = now;
        }
    }
}

/// The mode as the API spells it.
pub fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Normal => "normal",
        Mode::Outage => "outage",
        Mode::Brownout => "brownout",
        Mode::Blackhole => "blackhole",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(at: Instant, totals: Totals, calls: u64) -> Reading {
        Reading {
            at,
            totals,
            payment_calls: calls,
            breaker: BreakerSnapshot {
                state: BreakerState::Closed,
                consecutive_failures: 0,
                half_open_probes: 1,
                policy: "consecutive",
                window_calls: None,
                window_failure_rate: None,
                until_half_open: None,
            },
            queue_depth: 3,
            busy_workers: 2,
            mode: Mode::Normal,
            provider: ProviderLoad::default(),
            throttle_probability: 0.0,
            retry_jitter: crate::reliability::JitterKind::Full,
            limit: Some((12, 4)),
            completed_latency: Snapshot::default(),
            failed_latency: Snapshot::default(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn rates_are_per_second_over_the_time_that_passed() {
        let start = Instant::now();
        let before = Totals {
            accepted: 100,
            completed: 50,
            failed: 9,
            retries: 7,
            rejected_open: 2,
            ..Totals::default()
        };
        let prev = reading(start, before, 40);
        tokio::time::advance(Duration::from_millis(500)).await;
        let totals = Totals {
            accepted: 110,
            completed: 54,
            failed: 10,
            retries: 10,
            rejected_open: 7,
            ..Totals::default()
        };
        let now = reading(Instant::now(), totals, 47);
        let s = Sample::between(1, 0.5, &prev, &now);
        assert_eq!(s.interval, 0.5);
        assert_eq!(s.accepted_per_s, 20.0);
        assert_eq!(s.completed_per_s, 8.0);
        assert_eq!(s.failed_per_s, 2.0);
        assert_eq!(s.retries_per_s, 6.0);
        assert_eq!(s.rejections_open_per_s, 10.0);
        assert_eq!(s.payment_calls_per_s, 14.0);
        assert_eq!(s.accepted_total, 110);
        assert_eq!(s.payment_calls_total, 47);
        assert_eq!(s.queue_depth, 3);
        assert_eq!(s.latency_p50_ms, None);
        // The jitter kind and the limit are the later reading's.
        assert_eq!(s.retry_jitter, crate::reliability::JitterKind::Full);
        assert_eq!((s.concurrency_limit, s.limit_in_flight), (Some(12), 4));
    }

    fn sample(seq: u64) -> Arc<Sample> {
        let r = reading(Instant::now(), Totals::default(), 0);
        Arc::new(Sample::between(seq, 0.0, &r, &r))
    }

    #[test]
    fn the_ring_keeps_the_newest_samples_and_reads_after_a_sequence_number() {
        let timeline = Timeline::new(Duration::from_millis(250), Duration::from_secs(1));
        assert_eq!(timeline.capacity(), 4);
        assert!(timeline.since(0).is_empty());
        for seq in 1..=6 {
            timeline.push(sample(seq));
        }
        let seqs = |v: Vec<Arc<Sample>>| v.iter().map(|s| s.seq).collect::<Vec<_>>();
        assert_eq!(seqs(timeline.since(0)), [3, 4, 5, 6]);
        assert_eq!(seqs(timeline.since(4)), [5, 6]);
        assert_eq!(seqs(timeline.since(6)), Vec::<u64>::new());
        assert_eq!(seqs(timeline.since(99)), Vec::<u64>::new());
        assert_eq!(seqs(timeline.last(2)), [5, 6]);
        assert_eq!(seqs(timeline.last(10)), [3, 4, 5, 6]);
    }
}
