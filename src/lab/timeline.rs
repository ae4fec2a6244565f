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

use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::events::{ChangeKind, Feed};
use super::sample::{Reading, Sample};
use crate::observability::latency::LatencyHistogram;
use crate::observability::Metrics;
use crate::payment::{Mode, Simulator};
use crate::reliability::Reliability;
use crate::workers::Dispatcher;

/// The most samples a ring may hold, whatever the settings say.
pub const MAX_SAMPLES: usize = 100_000;

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
    use crate::observability::latency::Snapshot;
    use crate::observability::metrics::Totals;
    use crate::payment::ProviderLoad;
    use crate::reliability::{BreakerSnapshot, BreakerState};

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
