//! The figures of one variant's run, from its timeline and the service's
//! own counters.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::lab::Sample;
use crate::observability::latency::Interval;
use crate::observability::metrics::Totals;
use crate::payment::client::ClientReading;

/// Every figure, in the order reports list them.
pub const FIGURES: [&str; 55] = [
    "accepted",
    "completed",
    "failed",
    "open_orders",
    "rejected",
    "success_ratio",
    "payment_calls",
    "amplification",
    "calls_per_completed",
    "retries",
    "peak_retry_calls_per_s",
    "rejections_open",
    "rejections_half_open",
    "time_to_fail_p50_ms",
    "time_to_fail_p99_ms",
    "latency_p50_ms",
    "latency_p99_ms",
    "backoff_seconds",
    "backoff_open_seconds",
    "budget_exhausted",
    "throttled",
    "hedges",
    "hedge_wins",
    "limit_rejected",
    "deferred",
    "defer_released",
    "defer_expired",
    "time_to_recover_s",
    "goodput_before_fault",
    "goodput_after_fault",
    "goodput_after_share",
    "wasted_calls",
    "overloaded_calls",
    "charges",
    "duplicate_charges",
    "payment_timeouts",
    "breaker_opened",
    "breaker_opened_per_minute",
    "half_open_windows",
    "probes",
    "probes_per_half_open_window",
    "in_hand_at_kill",
    "taken_over",
    "takeover_s",
    "takeover_bound_s",
    "peak_busy_workers",
    "calls_tier1",
    "calls_tier2",
    "calls_tier3",
    "bottom_calls_per_order",
    "provider_faults",
    "rate_limited",
    "pool_waits",
    "abandoned_waiting",
    "ambiguous_failures",
];

/// What one provider's `/metrics` said at the end of a run.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TierReading {
    /// Charge calls it received (`provider_requests_total`).
    pub requests: u64,
    /// Charges it recorded, and of those the ones for an order it had
    /// charged already.
    pub charges: u64,
    pub duplicate_charges: u64,
    /// Network faults it staged, all kinds.
    pub faults: u64,
    /// Charge calls it answered 429 (`PROVIDER_RATE_LIMIT`).
    pub rate_limited: u64,
}

/// Where the fault was, on the timeline's clock (seconds since the start).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct FaultWindow {
    pub start: f64,
    pub end: Option<f64>,
}

/// What a variant's run leaves behind for its figures.
#[derive(Debug, Clone)]
pub struct RunRecord {
    pub samples: Vec<Sample>,
    pub totals: Totals,
    pub payment_calls: u64,
    pub probes: u64,
    pub half_open_windows: u64,
    /// Created-to-finished latency of every order, and of the orders that
    /// failed while the fault lasted.
    pub latency: Interval,
    pub failed_in_fault: Option<Interval>,
    pub fault: Option<FaultWindow>,
    /// With replicas: each one's timeline by name (`samples` is then
    /// empty), its `t` on the run's clock.
    pub replicas: Vec<(String, Vec<Sample>)>,
    /// With a replica killed: what happened to the orders it held.
    pub takeover: Option<Takeover>,
    /// With provider processes: each one's figures, top (the one the
    /// service calls) first.
    pub tiers: Vec<TierReading>,
    /// With provider processes: the service's payment client's counters.
    pub client: Option<ClientReading>,
}

impl RunRecord {
    /// The timelines to chart: the service's, or each replica's as
    /// `variant/replica`.
    pub fn timelines<'a>(&'a self, variant: &str) -> Vec<(String, &'a [Sample])> {
        if self.replicas.is_empty() {
            vec![(variant.to_owned(), &self.samples)]
        } else {
            self.replicas
                .iter()
                .map(|(name, samples)| (format!("{variant}/{name}"), samples.as_slice()))
                .collect()
        }
    }
}

/// The orders a killed replica held (leased, pending or processing) and
/// how they were taken over.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Takeover {
    /// Open orders leased to the replica when it was killed.
    pub in_hand: u64,
    /// Of those, the ones another replica took over.
    pub taken_over: u64,
    /// The longest time from the kill to a takeover, in seconds (none
    /// taken over: none).
    pub longest_s: Option<f64>,
    /// What the design promises: the lease, one recovery interval and a
    /// second to spare.
    pub bound_s: f64,
}

/// A figure's value; `None` when it has none (no fault, nothing failed).
pub type Figures = BTreeMap<&'static str, Option<f64>>;

fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0).then(|| a / b)
}

fn round(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// Mean completions per second before the fault (after the first second
/// of traffic), the rate recovery is measured against.
fn goodput_before(samples: &[Sample], fault: FaultWindow) -> Option<f64> {
    mean(
        samples
            .iter()
            .filter(|s| s.t > 1.0 && s.t <= fault.start)
            .map(|s| s.completed_per_s),
    )
}

/// Mean completions per second from the fault's end to the last sample
/// that still took new orders (the traffic's end; the drain after it is
/// left out).
fn goodput_after(samples: &[Sample], fault: FaultWindow) -> Option<f64> {
    let end = fault.end?;
    let last_traffic = samples
        .iter()
        .rev()
        .find(|s| s.accepted_per_s > 0.0 || s.rejected_per_s > 0.0)?
        .t;
    mean(
        samples
            .iter()
            .filter(|s| s.t > end && s.t <= last_traffic)
            .map(|s| s.completed_per_s),
    )
}

fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values.fold((0.0, 0usize), |(sum, n), v| (sum + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

/// Seconds from the fault's end until completions per second, averaged
/// over one second, are back within 10% of their rate before the fault.
fn time_to_recover(samples: &[Sample], fault: FaultWindow) -> Option<f64> {
    let end = fault.end?;
    let normal = goodput_before(samples, fault)?;
    if normal <= 0.0 {
        return None;
    }
    let per_second = samples.first().map_or(4, |s| {
        (1.0 / s.interval.max(0.001)).round().max(1.0) as usize
    });
    let after: Vec<&Sample> = samples.iter().filter(|s| s.t > end).collect();
    for (i, window) in after.windows(per_second).enumerate() {
        let mean = window.iter().map(|s| s.completed_per_s).sum::<f64>() / window.len() as f64;
        if mean >= 0.9 * normal {
            // The window's first sample closes the interval the recovery began in.
            let began = after[i].t - after[i].interval;
            return Some((began - end).max(0.0));
        }
    }
    None
}

pub fn compute(run: &RunRecord) -> Figures {
    let t = &run.totals;
    let finished = (t.completed + t.failed) as f64;
    let mut f: Figures = BTreeMap::new();
    let mut put = |name: &'static str, value: Option<f64>| {
        debug_assert!(FIGURES.contains(&name), "{name}");
        f.insert(name, value.map(round));
    };
    put("accepted", Some(t.accepted as f64));
    put("completed", Some(t.completed as f64));
    put("failed", Some(t.failed as f64));
    put(
        "open_orders",
        Some(t.accepted.saturating_sub(t.completed + t.failed) as f64),
    );
    put("rejected", Some(t.rejected as f64));
    put("success_ratio", ratio(t.completed as f64, finished));
    put("payment_calls", Some(run.payment_calls as f64));
    put("amplification", ratio(run.payment_calls as f64, finished));
    // What a completed order cost the provider: orders failed without a
    // call (the breaker's) lower `amplification` but not this.
    put(
        "calls_per_completed",
        ratio(run.payment_calls as f64, t.completed as f64),
    );
    put("retries", Some(t.retries as f64));
    // The busiest sample's calls that were not first attempts (calls less
    // the orders accepted then, whose first attempt goes out at once while
    // workers are free): the herd jitter is meant to spread. With
    // TIMELINE_INTERVAL=100ms, ten times the most in any 100 ms.
    put(
        "peak_retry_calls_per_s",
        run.samples
            .iter()
            .map(|s| (s.payment_calls_per_s - s.accepted_per_s).max(0.0))
            .reduce(f64::max),
    );
    put("rejections_open", Some(t.rejected_open as f64));
    put("rejections_half_open", Some(t.rejected_half_open as f64));
    let fail = run.failed_in_fault.as_ref();
    put("time_to_fail_p50_ms", fail.and_then(|i| i.quantile_ms(0.5)));
    put(
        "time_to_fail_p99_ms",
        fail.and_then(|i| i.quantile_ms(0.99)),
    );
    put("latency_p50_ms", run.latency.quantile_ms(0.5));
    put("latency_p99_ms", run.latency.quantile_ms(0.99));
    put("backoff_seconds", Some(t.backoff_seconds));
    put("backoff_open_seconds", Some(t.backoff_open_seconds));
    put("budget_exhausted", Some(t.budget_exhausted as f64));
    put("throttled", Some(t.throttled as f64));
    put("hedges", Some(t.hedges as f64));
    put("hedge_wins", Some(t.hedge_wins as f64));
    put("limit_rejected", Some(t.limit_rejected as f64));
    put("deferred", Some(t.deferred as f64));
    put("defer_released", Some(t.defer_released as f64));
    put("defer_expired", Some(t.defer_expired as f64));
    put(
        "time_to_recover_s",
        run.fault.and_then(|w| time_to_recover(&run.samples, w)),
    );
    put(
        "goodput_before_fault",
        run.fault.and_then(|w| goodput_before(&run.samples, w)),
    );
    let after = run.fault.and_then(|w| goodput_after(&run.samples, w));
    put("goodput_after_fault", after);
    // Goodput after the fault as a share of goodput before it: 1 when it
    // came back whole, near 0 when it never did.
    put(
        "goodput_after_share",
        run.fault
            .and_then(|w| goodput_before(&run.samples, w))
            .zip(after)
            .and_then(|(before, after)| ratio(after, before)),
    );
    // The provider's figures exist only where it has a capacity.
    let provider = run.samples.last().filter(|_| {
        run.samples
            .iter()
            .any(|s| s.provider_in_flight > 0 || s.provider_queued > 0)
    });
    put(
        "wasted_calls",
        provider.map(|s| s.provider_wasted_total as f64),
    );
    put(
        "overloaded_calls",
        provider.map(|s| s.provider_overloaded_total as f64),
    );
    put("charges", Some(t.charges as f64));
    put("duplicate_charges", Some(t.duplicate_charges as f64));
    put("payment_timeouts", Some(t.payment_timeouts as f64));
    put("breaker_opened", Some(t.breaker_opened as f64));
    // Per minute of the run, from its first sample to its last.
    put(
        "breaker_opened_per_minute",
        run.samples
            .last()
            .filter(|s| s.t > 0.0)
            .map(|s| t.breaker_opened as f64 * 60.0 / s.t),
    );
    put("half_open_windows", Some(run.half_open_windows as f64));
    put("probes", Some(run.probes as f64));
    put(
        "probes_per_half_open_window",
        ratio(run.probes as f64, run.half_open_windows as f64),
    );
    if !run.replicas.is_empty() {
        // Counters a replica's timeline does not carry: not measured.
        for name in [
            "backoff_seconds",
            "backoff_open_seconds",
            "budget_exhausted",
            "throttled",
            "hedges",
            "hedge_wins",
            "limit_rejected",
            "deferred",
            "defer_released",
            "defer_expired",
            "breaker_opened",
            "half_open_windows",
            "probes",
            "probes_per_half_open_window",
        ] {
            put(name, None);
        }
    }
    let takeover = run.takeover.as_ref();
    put("in_hand_at_kill", takeover.map(|k| k.in_hand as f64));
    put("taken_over", takeover.map(|k| k.taken_over as f64));
    put("takeover_s", takeover.and_then(|k| k.longest_s));
    put("takeover_bound_s", takeover.map(|k| k.bound_s));
    // Workers charging at once, at the busiest sample: what a stalled
    // provider holds.
    put(
        "peak_busy_workers",
        run.samples
            .iter()
            .map(|s| s.busy_workers as f64)
            .reduce(f64::max),
    );
    let tier = |i: usize| run.tiers.get(i).map(|t| t.requests as f64);
    put("calls_tier1", tier(0));
    put("calls_tier2", tier(1));
    put("calls_tier3", tier(2));
    put(
        "bottom_calls_per_order",
        run.tiers
            .last()
            .and_then(|t| ratio(t.requests as f64, finished)),
    );
    let over_tiers = |read: fn(&TierReading) -> u64| {
        (!run.tiers.is_empty()).then(|| run.tiers.iter().map(read).sum::<u64>() as f64)
    };
    put("provider_faults", over_tiers(|t| t.faults));
    put("rate_limited", over_tiers(|t| t.rate_limited));
    let client = run.client.as_ref();
    put("pool_waits", client.map(|c| c.waits as f64));
    put(
        "abandoned_waiting",
        client.map(|c| c.abandoned_waiting as f64),
    );
    put("ambiguous_failures", client.map(|c| c.ambiguous as f64));
    f
}
