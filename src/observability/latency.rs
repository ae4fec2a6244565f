//! A cumulative latency histogram: any reader takes snapshots, and the
//! difference of two snapshots gives quantiles over the time between them
//! (the timeline's interval, an experiment's fault window).
//!
//! Recording is one atomic add into a fixed bucket (no lock, no allocation),
//! so the workers pay nothing noticeable for it; readers only load. Buckets
//! grow by 1/16 of a power of two from 100 µs to
//! about 100 s, so a quantile is exact to within about 4.5%; anything faster
//! lands in the first bucket, anything slower in the last.
//!
//! Prometheus' histogram would serve a scrape, but not this: its buckets are
//! few and cumulative, and a quantile from the difference of two scrapes is
//! only as fine as the bucket it falls in.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Sub-buckets per power of two.
const STEPS: u32 = 16;
/// The lower edge of the first bucket, in microseconds.
const FLOOR_MICROS: f64 = 100.0;
/// 20 doublings of 100 µs is about 105 s.
const BUCKETS: usize = 20 * STEPS as usize;

/// Shared by the recorders (cheap clone) and the one reader.
#[derive(Clone)]
pub struct LatencyHistogram {
    buckets: Arc<[AtomicU64]>,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for LatencyHistogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LatencyHistogram").finish_non_exhaustive()
    }
}

fn bucket_of(latency: Duration) -> usize {
    let micros = latency.as_secs_f64() * 1e6;
    if micros <= FLOOR_MICROS {
        return 0;
    }
    let index = ((micros / FLOOR_MICROS).log2() * STEPS as f64) as usize;
    index.min(BUCKETS - 1)
}

/// The upper edge of a bucket, in milliseconds: what a quantile reports.
fn upper_edge_ms(index: usize) -> f64 {
    FLOOR_MICROS * 2f64.powf((index + 1) as f64 / STEPS as f64) / 1000.0
}

impl LatencyHistogram {
    pub fn new() -> Self {
        Self {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    pub fn record(&self, latency: Duration) {
        self.buckets[bucket_of(latency)].fetch_add(1, Ordering::Relaxed);
    }

    /// Everything recorded so far.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            counts: self
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
        }
    }
}

/// The counts at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    counts: Vec<u64>,
}

impl Default for Snapshot {
    fn default() -> Self {
        Self {
            counts: vec![0; BUCKETS],
        }
    }
}

impl Snapshot {
    /// What was recorded between `earlier` and this snapshot.
    pub fn since(&self, earlier: &Snapshot) -> Interval {
        Interval {
            counts: self
                .counts
                .iter()
                .zip(&earlier.counts)
                .map(|(now, then)| now.saturating_sub(*then))
                .collect(),
        }
    }
}

/// What was recorded between two snapshots.
#[derive(Debug, Clone)]
pub struct Interval {
    counts: Vec<u64>,
}

impl Interval {
    /// Both intervals' observations together.
    pub fn merge(&self, other: &Interval) -> Interval {
        Interval {
            counts: self
                .counts
                .iter()
                .zip(&other.counts)
                .map(|(a, b)| a + b)
                .collect(),
        }
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The `q` quantile (0 to 1) in milliseconds, as the upper edge of its
    /// bucket; `None` when nothing was recorded.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        // The rank of the quantile, 1-based: the smallest value with at
        // least q of the observations at or below it.
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (index, count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Some(upper_edge_ms(index));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    fn all(h: &LatencyHistogram) -> Interval {
        h.snapshot().since(&Snapshot::default())
    }

    #[test]
    fn an_empty_interval_has_no_quantiles() {
        let h = LatencyHistogram::new();
        assert_eq!(all(&h).quantile_ms(0.5), None);
    }

    #[test]
    fn quantiles_fall_within_a_bucket_of_the_true_value() {
        let h = LatencyHistogram::new();
        // 1..=100 ms: p50 is 50 ms, p99 is 99 ms.
        for v in 1..=100 {
            h.record(ms(v));
        }
        let interval = all(&h);
        assert_eq!(interval.count(), 100);
        let p50 = interval.quantile_ms(0.5).unwrap();
        let p99 = interval.quantile_ms(0.99).unwrap();
        assert!((50.0..=50.0 * 1.05).contains(&p50), "p50 {p50}");
        assert!((99.0..=99.0 * 1.05).contains(&p99), "p99 {p99}");
    }

    #[test]
    fn the_difference_of_two_snapshots_is_what_came_between() {
        let h = LatencyHistogram::new();
        h.record(ms(3));
        let first = h.snapshot();
        h.record(ms(40));
        h.record(ms(50));
        let between = h.snapshot().since(&first);
        assert_eq!(between.count(), 2);
        assert!(between.quantile_ms(0.0).unwrap() >= 40.0);
        assert_eq!(h.snapshot().since(&h.snapshot()).count(), 0);
        let merged = between.merge(&first.since(&Snapshot::default()));
        assert_eq!(merged.count(), 3);
        assert!(merged.quantile_ms(0.01).unwrap() < 4.0);
    }

    #[test]
    fn values_outside_the_range_land_in_the_end_buckets() {
        let h = LatencyHistogram::new();
        h.record(Duration::from_micros(1));
        h.record(Duration::from_secs(10_000));
        let interval = all(&h);
        assert!(interval.quantile_ms(0.5).unwrap() < 0.11);
        assert!(interval.quantile_ms(1.0).unwrap() > 100_000.0);
    }
}
