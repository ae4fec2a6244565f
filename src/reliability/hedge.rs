//! Hedged attempts: when an attempt has not answered within a delay, a
//! second one starts beside it; the first success wins and the others are
//! dropped (cancelled). The tail of a provider's latency is cut at the
//! price of extra calls. Polly 8's hedging strategy and failsafe-go's hedge
//! policy are the models; "The Tail at Scale" (Dean and Barroso, CACM 2013)
//! is where the idea is argued.
//!
//! Here a hedge only answers slowness: an attempt that fails while another
//! is still running waits for the other; one that fails with nothing else
//! running ends the group with its error, and the retry loop decides what
//! follows (its backoff, its attempts). Each hedge is a call of its own: it
//! goes through the breaker, asks the retry budget (hedges and retries share
//! it: a refused hedge is simply not sent), and carries the order's key.
//!
//! The delay is fixed (`HEDGE_DELAY=150ms`) or a quantile of the latency of
//! recent calls (`HEDGE_DELAY=p95`, the last `WINDOW` calls that ended,
//! none until `MIN_SAMPLES` have): a quantile follows the provider, so
//! about 1 − q of calls are hedged whatever its latency is.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

/// Calls whose latency the quantile is taken over.
pub const WINDOW: usize = 1000;
/// Calls needed before a quantile delay hedges anything.
pub const MIN_SAMPLES: usize = 20;
/// The most hedges one attempt may add.
pub const HEDGE_MAX_LIMIT: u32 = 4;

/// When a hedge starts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum HedgeDelay {
    /// After this long.
    Fixed(Duration),
    /// After this quantile (0 to 1, exclusive) of recent calls' latency.
    Quantile(f64),
}

impl std::str::FromStr for HedgeDelay {
    type Err = String;

    /// `p95`, `p99.9` (a quantile of recent calls), or a duration above zero
    /// and at most 1h (`150ms`).
    fn from_str(raw: &str) -> Result<Self, String> {
        let raw = raw.trim();
        let wrong = || {
            "expected a quantile of recent calls such as p95 (p1 to p99.9) or a duration above zero and at most 1h, such as 150ms".to_owned()
        };
        if let Some(q) = raw.strip_prefix('p') {
            return match q.parse::<f64>() {
                Ok(q) if (1.0..=99.9).contains(&q) => Ok(Self::Quantile(q / 100.0)),
                _ => Err(wrong()),
            };
        }
        match crate::units::parse_duration(raw) {
            Ok(d) if !d.is_zero() && d <= Duration::from_secs(3600) => Ok(Self::Fixed(d)),
            _ => Err(wrong()),
        }
    }
}

impl std::fmt::Display for HedgeDelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Fixed(d) => write!(f, "{}", humantime::format_duration(*d)),
            Self::Quantile(q) => write!(f, "p{}", (q * 1000.0).round() / 10.0),
        }
    }
}

/// How attempts are hedged.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HedgeConfig {
    pub delay: HedgeDelay,
    /// Hedges one attempt may add (1 to `HEDGE_MAX_LIMIT`).
    pub max: u32,
}

impl Default for HedgeConfig {
    fn default() -> Self {
        Self {
            delay: HedgeDelay::Quantile(0.95),
            max: 1,
        }
    }
}

/// The latency of the last `WINDOW` calls that ended while hedging was on
/// (recorded only then: the usual call pays nothing for it; switched on,
/// a quantile delay hedges once `MIN_SAMPLES` calls have ended).
#[derive(Debug, Default)]
pub struct Latencies {
    recent: Mutex<VecDeque<Duration>>,
}

impl Latencies {
    pub fn record(&self, took: Duration) {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() == WINDOW {
            recent.pop_front();
        }
        recent.push_back(took);
    }

    /// The `q` quantile of the recent calls (nearest rank), or None before
    /// `MIN_SAMPLES` have ended.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let mut sorted: Vec<Duration> = {
            let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            if recent.len() < MIN_SAMPLES {
                return None;
            }
            recent.iter().copied().collect()
        };
        sorted.sort_unstable();
        let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
        Some(sorted[rank - 1])
    }

    /// The delay before a hedge under `delay`, if one may start.
    pub fn delay(&self, delay: HedgeDelay) -> Option<Duration> {
        match delay {
            HedgeDelay::Fixed(d) => Some(d),
            HedgeDelay::Quantile(q) => self.quantile(q),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_are_read_as_quantiles_or_durations_and_nothing_else() {
        assert_eq!("p95".parse(), Ok(HedgeDelay::Quantile(0.95)));
        assert_eq!("p99.9".parse::<HedgeDelay>().unwrap().to_string(), "p99.9");
        assert_eq!(
            "150ms".parse(),
            Ok(HedgeDelay::Fixed(Duration::from_millis(150)))
        );
        for bad in ["p0", "p100", "p", "pfast", "0ms", "2h", "soon", ""] {
            assert!(bad.parse::<HedgeDelay>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_quantile_is_the_nearest_rank_of_the_recent_calls_once_there_are_enough() {
        let l = Latencies::default();
        for ms in 1..MIN_SAMPLES as u64 {
            l.record(Duration::from_millis(ms));
        }
        assert_eq!(l.quantile(0.5), None, "too few calls");
        assert_eq!(
            l.delay(HedgeDelay::Fixed(Duration::from_millis(7))),
            Some(Duration::from_millis(7))
        );
        let l = Latencies::default();
        for ms in 1..=100 {
            l.record(Duration::from_millis(ms));
        }
        assert_eq!(l.quantile(0.95), Some(Duration::from_millis(95)));
        assert_eq!(l.quantile(0.5), Some(Duration::from_millis(50)));
        assert_eq!(l.quantile(0.999), Some(Duration::from_millis(100)));
        // Only the last WINDOW calls count.
        for _ in 0..WINDOW {
            l.record(Duration::from_millis(1000));
        }
        assert_eq!(l.quantile(0.01), Some(Duration::from_millis(1000)));
    }
}
