//! The circuit breaker: failsafe's state machine, made to behave like the
//! original lab's breaker.
//!
//! failsafe 1.3's state machine moves between closed, open and half-open on
//! what a failure policy says. Where it differs from the original, the
//! original wins, and this type closes the gap:
//! - **A bounded number of probes in half-open.** failsafe admits every call
//!   while half-open and closes on the first success; here at most
//!   `half_open_probes` calls (1 by default, the original's single probe) are
//!   admitted in one half-open window and the others are rejected with a
//!   distinct kind, `Rejection::HalfOpenBusy`. The breaker closes once every
//!   one of them has succeeded (failsafe is told of the success that
//!   completes the set, and not before) and reopens on the first failure.
//! - **Two rejection kinds**, `Open` and `HalfOpenBusy`; `Rejection::is_open`
//!   is true for both.
//! - **From and to.** failsafe's callbacks name only the new state (and
//!   `on_closed` fires once at construction, which is no change); every change
//!   is reported here with both ends, and the current state can be read.
//! - **Time.** failsafe reads `std::time::Instant`, which tokio's paused clock
//!   does not move. The open period is timed here on `tokio::time::Instant`, and
//!   failsafe is given a zero open delay, so its own check always agrees once
//!   this type decides the period is over.
//! - **Generations.** A result from a call admitted before the last state
//!   change is ignored (failsafe would let a late result flip the state).
//! - **Abandoned calls.** A permit dropped without a verdict (the call was
//!   cancelled at shutdown) gives the probe slot back instead of leaving the
//!   breaker stuck half-open.
//!
//! - **A failure-rate policy.** `BreakerPolicy::FailureRate` opens when the
//!   share of failed calls over the last `window` reaches `rate`, once at
//!   least `min_calls` calls were seen in it; with `slow_call` set, a call
//!   slower than that counts as a failure for the ratio (its result still
//!   goes back to the caller). failsafe's `success_rate_over_time_window`
//!   was not used: its rate is an exponentially weighted average biased to
//!   recent calls, not the ratio over the window, and it trips on nothing
//!   until calls have been seen for a whole window. Here the window is a
//!   ring of one-second buckets on tokio's clock, and failsafe runs a
//!   one-failure policy that this type feeds only the failure that makes the
//!   ratio cross: failsafe still owns the state machine.
//!
//! - **Settings that change while it runs.** failsafe's policies are fixed
//!   when the machine is built; the admin API switches policies, thresholds
//!   and the window at run time (`set_config`). So the policy failsafe runs
//!   is this module's `CountingPolicy`, failsafe's consecutive-failures
//!   count with a threshold that can change (and a readable count).
//!
//! Every call into failsafe happens under this type's own lock, so the events
//! its instrument records are read back without races.

use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use failsafe::{FailurePolicy, Instrument, StateMachine};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// The breaker's state, with the gauge value each one has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    Closed,
    HalfOpen,
    Open,
}

impl BreakerState {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::HalfOpen => "half_open",
            Self::Open => "open",
        }
    }

    /// 0 closed, 1 half-open, 2 open: the `circuit_breaker_state` gauge.
    pub fn gauge_value(&self) -> i64 {
        match self {
            Self::Closed => 0,
            Self::HalfOpen => 1,
            Self::Open => 2,
        }
    }
}

impl fmt::Display for BreakerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why the breaker refused a call. Both kinds mean "the downstream is not
/// being called now": retrying against either is pointless.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Rejection {
    #[error("circuit open")]
    Open,
    #[error("circuit half-open: probe in flight")]
    HalfOpenBusy,
}

impl Rejection {
    /// True for both kinds of rejection. Checking only for `Open` would let
    /// half-open rejections pass as unexpected application errors.
    pub fn is_open(&self) -> bool {
        matches!(self, Self::Open | Self::HalfOpenBusy)
    }

    /// The `kind` label of `circuit_breaker_rejections_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::HalfOpenBusy => "half_open",
        }
    }
}

/// Hears about the breaker's changes and rejections, outside its lock.
pub trait BreakerObserver: Send + Sync {
    fn state_changed(&self, from: BreakerState, to: BreakerState);
    fn rejected(&self, kind: Rejection);
}

/// Several observers, each told of every event, in order: the metrics and
/// the lab's change feed both hear the breaker.
pub struct Observers(pub Vec<Arc<dyn BreakerObserver>>);

impl BreakerObserver for Observers {
    fn state_changed(&self, from: BreakerState, to: BreakerState) {
        for observer in &self.0 {
            observer.state_changed(from, to);
        }
    }

    fn rejected(&self, kind: Rejection) {
        for observer in &self.0 {
            observer.rejected(kind);
        }
    }
}

/// What opens the breaker.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BreakerPolicy {
    /// `failure_threshold` consecutive failures (the original lab's).
    Consecutive,
    /// The share of failures over the last `window` reaches `rate`, once
    /// `min_calls` calls were seen in it.
    FailureRate {
        rate: f64,
        window: Duration,
        min_calls: u32,
    },
}

impl BreakerPolicy {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Consecutive => "consecutive",
            Self::FailureRate { .. } => "failure_rate",
        }
    }
}

/// How the breaker trips and recovers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker (it opens on this one).
    pub failure_threshold: u32,
    /// How long it stays open before a probe is allowed.
    pub open_duration: Duration,
    /// Probes one half-open window admits; all must succeed to close.
    pub half_open_probes: u32,
    pub policy: BreakerPolicy,
    /// With the failure-rate policy: a call slower than this counts as a
    /// failure for the ratio.
    pub slow_call: Option<Duration>,
    /// The failure-rate policy's figures for when it is switched to at run
    /// time without them (`BREAKER_FAILURE_RATE`, `BREAKER_WINDOW`,
    /// `BREAKER_MIN_CALLS`); the policy in force carries its own.
    pub rate_fallback: RateFigures,
}

/// The failure-rate policy's figures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateFigures {
    pub rate: f64,
    pub window: Duration,
    pub min_calls: u32,
}

impl Default for RateFigures {
    fn default() -> Self {
        Self {
            rate: 0.5,
            window: Duration::from_secs(10),
            min_calls: 20,
        }
    }
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            open_duration: Duration::from_secs(30),
            half_open_probes: 1,
            policy: BreakerPolicy::Consecutive,
            slow_call: None,
            rate_fallback: RateFigures::default(),
        }
    }
}

/// A point-in-time view for dashboards.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, utoipa::ToSchema)]
pub struct BreakerSnapshot {
    pub state: BreakerState,
    pub consecutive_failures: u32,
    /// Probes one half-open window admits (`BREAKER_HALF_OPEN_PROBES`).
    pub half_open_probes: u32,
    /// `consecutive` or `failure_rate` (`BREAKER_POLICY`).
    pub policy: &'static str,
    /// With the failure-rate policy: calls, and the share of them that
    /// failed (slow ones included), in the window now.
    pub window_calls: Option<u64>,
    pub window_failure_rate: Option<f64>,
    /// Seconds left until a probe is allowed, while open.
    #[serde(serialize_with = "serialize_opt_duration")]
    #[schema(value_type = Option<f64>)]
    pub until_half_open: Option<Duration>,
}

fn serialize_opt_duration<S: serde::Serializer>(
    d: &Option<Duration>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_some(&d.as_secs_f64()),
        None => s.serialize_none(),
    }
}

// --- failsafe plumbing -------------------------------------------------------

const EV_NONE: u8 = 0;
const EV_OPEN: u8 = 1;
const EV_HALF_OPEN: u8 = 2;
const EV_CLOSED: u8 = 3;

/// Records the last state failsafe moved to. Read and cleared under our lock.
#[derive(Clone, Default)]
struct LastEvent(Arc<AtomicU8>);

impl LastEvent {
    fn take(&self) -> Option<BreakerState> {
        match self.0.swap(EV_NONE, Ordering::SeqCst) {
            EV_OPEN => Some(BreakerState::Open),
            EV_HALF_OPEN => Some(BreakerState::HalfOpen),
            EV_CLOSED => Some(BreakerState::Closed),
            _ => None,
        }
    }
}

impl Instrument for LastEvent {
    fn on_call_rejected(&self) {}
    fn on_open(&self) {
        self.0.store(EV_OPEN, Ordering::SeqCst);
    }
    fn on_half_open(&self) {
        self.0.store(EV_HALF_OPEN, Ordering::SeqCst);
    }
    fn on_closed(&self) {
        self.0.store(EV_CLOSED, Ordering::SeqCst);
    }
}

/// A consecutive-failures policy for failsafe's state machine, as failsafe's
/// own `consecutive_failures` with a zero open delay, except that its count
/// is readable and its threshold can change while it runs (the admin API
/// switches policies: the failure-rate policy runs it with a threshold of 1).
struct CountingPolicy {
    count: Arc<AtomicU32>,
    threshold: Arc<AtomicU32>,
}

impl FailurePolicy for CountingPolicy {
    fn record_success(&mut self) {
        self.count.store(0, Ordering::SeqCst);
    }
    fn mark_dead_on_failure(&mut self) -> Option<Duration> {
        let count = self.count.fetch_add(1, Ordering::SeqCst) + 1;
        // Zero delay: failsafe's own (real-clock) open period is over at
        // once; `Breaker` times the open period on tokio's clock instead.
        (count >= self.threshold.load(Ordering::SeqCst).max(1)).then_some(Duration::ZERO)
    }
    fn revived(&mut self) {
        self.count.store(0, Ordering::SeqCst);
    }
}

/// The threshold failsafe's machine runs with under `policy`.
fn machine_threshold(config: &BreakerConfig) -> u32 {
    match config.policy {
        BreakerPolicy::Consecutive => config.failure_threshold.max(1),
        // failsafe trips on the one failure `Breaker` passes on when the
        // ratio crosses.
        BreakerPolicy::FailureRate { .. } => 1,
    }
}

/// The failure-rate policy's window, empty (none under the consecutive one).
fn empty_window(config: &BreakerConfig) -> Option<OutcomeWindow> {
    match config.policy {
        BreakerPolicy::Consecutive => None,
        BreakerPolicy::FailureRate { window, .. } => Some(OutcomeWindow::new(window)),
    }
}

/// Successes and failures over a sliding window of one-second buckets.
#[derive(Debug)]
struct OutcomeWindow {
    started: Instant,
    /// (second since `started`, successes, failures)
    buckets: Vec<(u64, u64, u64)>,
}

impl OutcomeWindow {
    fn new(window: Duration) -> Self {
        let seconds = window.as_secs().max(1) as usize;
        Self {
            started: Instant::now(),
            buckets: vec![(u64::MAX, 0, 0); seconds],
        }
    }

    fn record(&mut self, failed: bool) {
        let second = self.started.elapsed().as_secs();
        let len = self.buckets.len() as u64;
        let bucket = &mut self.buckets[(second % len) as usize];
        if bucket.0 != second {
            *bucket = (second, 0, 0);
        }
        if failed {
            bucket.2 += 1;
        } else {
            bucket.1 += 1;
        }
    }

    /// Calls and failures in the last window.
    fn totals(&self) -> (u64, u64) {
        let now = self.started.elapsed().as_secs();
        let len = self.buckets.len() as u64;
        self.buckets
            .iter()
            .filter(|b| b.0 != u64::MAX && b.0 + len > now)
            .fold((0, 0), |(calls, failures), b| {
                (calls + b.1 + b.2, failures + b.2)
            })
    }

    fn clear(&mut self) {
        for b in &mut self.buckets {
            *b = (u64::MAX, 0, 0);
        }
    }
}

// --- the breaker ---------------------------------------------------------------

struct Mirror {
    /// How it trips and recovers; the admin API may change it.
    config: BreakerConfig,
    state: BreakerState,
    open_until: Option<Instant>,
    /// Probes admitted in this half-open window and not abandoned (in
    /// flight or succeeded), and how many of them succeeded.
    probes_admitted: u32,
    probes_succeeded: u32,
    /// The failure-rate policy's window (None under the consecutive one).
    window: Option<OutcomeWindow>,
    /// Bumped on every state change; permits from older generations are stale.
    generation: u64,
}

struct Inner {
    machine: StateMachine<CountingPolicy, LastEvent>,
    events: LastEvent,
    failures: Arc<AtomicU32>,
    threshold: Arc<AtomicU32>,
    mirror: Mutex<Mirror>,
    observer: Option<Arc<dyn BreakerObserver>>,
    /// Calls admitted as half-open probes, and half-open windows begun:
    /// the lab's evidence that each window lets exactly one probe through.
    probes: AtomicU64,
    half_open_windows: AtomicU64,
}

/// A circuit breaker. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct Breaker {
    inner: Arc<Inner>,
}

impl fmt::Debug for Breaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Breaker")
            .field("state", &self.state())
            .finish()
    }
}

/// Changes made under the lock, reported after it is released.
#[derive(Default)]
struct Report {
    changes: Vec<(BreakerState, BreakerState)>,
    rejection: Option<Rejection>,
}

impl Breaker {
    pub fn new(config: BreakerConfig, observer: Option<Arc<dyn BreakerObserver>>) -> Self {
        let failures = Arc::new(AtomicU32::new(0));
        let threshold = Arc::new(AtomicU32::new(machine_threshold(&config)));
        let events = LastEvent::default();
        let policy = CountingPolicy {
            count: failures.clone(),
            threshold: threshold.clone(),
        };
        let machine = StateMachine::new(policy, events.clone());
        // failsafe fires on_closed at construction: that is no state change.
        let _ = events.take();
        Self {
            inner: Arc::new(Inner {
                machine,
                events,
                failures,
                threshold,
                mirror: Mutex::new(Mirror {
                    state: BreakerState::Closed,
                    open_until: None,
                    probes_admitted: 0,
                    probes_succeeded: 0,
                    window: empty_window(&config),
                    config,
                    generation: 0,
                }),
                observer,
                probes: AtomicU64::new(0),
                half_open_windows: AtomicU64::new(0),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Mirror> {
        // A panic while holding the lock cannot leave the mirror half-written
        // in a way that matters more than stopping the breaker would.
        self.inner.mirror.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Probes admitted and half-open windows begun, since it was built.
    pub fn probe_counts(&self) -> (u64, u64) {
        (
            self.inner.probes.load(Ordering::SeqCst),
            self.inner.half_open_windows.load(Ordering::SeqCst),
        )
    }

    /// How it trips and recovers now.
    pub fn config(&self) -> BreakerConfig {
        self.lock().config
    }

    /// Changes how it trips and recovers, keeping its state: an open breaker
    /// stays open for the rest of its period (a reset closes it), probes in
    /// flight finish. The consecutive count and the failure-rate window start
    /// empty, as on every state change: figures gathered under one policy
    /// say nothing to the other.
    pub fn set_config(&self, config: BreakerConfig) {
        let mut mirror = self.lock();
        mirror.config = config;
        mirror.window = empty_window(&config);
        self.inner
            .threshold
            .store(machine_threshold(&config), Ordering::SeqCst);
        self.inner.failures.store(0, Ordering::SeqCst);
    }

    /// The current state. While open, it stays `Open` until the next call
    /// asks for permission after the open period (the move is lazy).
    pub fn state(&self) -> BreakerState {
        self.lock().state
    }

    pub fn snapshot(&self) -> BreakerSnapshot {
        let mirror = self.lock();
        // The window is summed once for both of its figures.
        let window = mirror.window.as_ref().map(OutcomeWindow::totals);
        BreakerSnapshot {
            state: mirror.state,
            consecutive_failures: self.inner.failures.load(Ordering::SeqCst),
            half_open_probes: mirror.config.half_open_probes.max(1),
            policy: mirror.config.policy.name(),
            window_calls: window.map(|(calls, _)| calls),
            window_failure_rate: window
                .and_then(|(calls, failures)| (calls > 0).then(|| failures as f64 / calls as f64)),
            until_half_open: match (mirror.state, mirror.open_until) {
                (BreakerState::Open, Some(until)) => {
                    Some(until.saturating_duration_since(Instant::now()))
                }
                _ => None,
            },
        }
    }

    /// Applies what failsafe just did to the mirror, noting the change.
    fn follow(&self, mirror: &mut Mirror, report: &mut Report) {
        if let Some(to) = self.inner.events.take() {
            let from = mirror.state;
            if from != to {
                if to == BreakerState::HalfOpen {
                    self.inner.half_open_windows.fetch_add(1, Ordering::SeqCst);
                }
                mirror.state = to;
                mirror.generation += 1;
                mirror.probes_admitted = 0;
                mirror.probes_succeeded = 0;
                // A new state starts a new count.
                if let Some(window) = mirror.window.as_mut() {
                    window.clear();
                }
                mirror.open_until = (to == BreakerState::Open)
                    .then(|| Instant::now() + mirror.config.open_duration);
                report.changes.push((from, to));
            }
        }
    }

    fn publish(&self, report: Report) {
        let Some(observer) = &self.inner.observer else {
            return;
        };
        for (from, to) in report.changes {
            observer.state_changed(from, to);
        }
        if let Some(kind) = report.rejection {
            observer.rejected(kind);
        }
    }

    /// Asks permission for one call.
    pub fn try_acquire(&self) -> Result<Permit, Rejection> {
        let mut report = Report::default();
        let result = {
            let mut mirror = self.lock();
            if mirror.state == BreakerState::Open {
                let elapsed = mirror
                    .open_until
                    .is_none_or(|until| Instant::now() >= until);
                if elapsed {
                    // failsafe's open delay is zero, so its strict `now > until`
                    // holds as soon as its real clock has ticked once.
                    let mut spins = 0;
                    while !self.inner.machine.is_call_permitted() && spins < 100_000 {
                        std::hint::spin_loop();
                        spins += 1;
                    }
                    self.follow(&mut mirror, &mut report);
                }
            }
            match mirror.state {
                // failsafe permits every call while closed, with no side
                // effect: nothing to ask it.
                BreakerState::Closed => Ok((mirror.generation, false)),
                BreakerState::HalfOpen
                    if mirror.probes_admitted < mirror.config.half_open_probes.max(1) =>
                {
                    mirror.probes_admitted += 1;
                    self.inner.probes.fetch_add(1, Ordering::SeqCst);
                    Ok((mirror.generation, true))
                }
                BreakerState::HalfOpen => Err(Rejection::HalfOpenBusy),
                BreakerState::Open => Err(Rejection::Open),
            }
        };
        if let Err(kind) = result {
            report.rejection = Some(kind);
        }
        self.publish(report);
        result.map(|(generation, probe)| Permit {
            breaker: Some(self.clone()),
            generation,
            probe,
            admitted: Instant::now(),
        })
    }

    fn record(&self, generation: u64, probe: bool, verdict: Option<bool>, took: Duration) {
        let mut report = Report::default();
        {
            let mut mirror = self.lock();
            if mirror.generation != generation {
                // Admitted before the last state change: its result is stale.
                return;
            }
            // Under the failure-rate policy a slow success is a failure for
            // the breaker (the caller still gets its result).
            let slow = mirror.config.slow_call.is_some_and(|limit| took >= limit);
            let verdict = match (verdict, &mirror.config.policy) {
                (Some(true), BreakerPolicy::FailureRate { .. }) if slow => Some(false),
                (v, _) => v,
            };
            if let (
                Some(success),
                false,
                BreakerPolicy::FailureRate {
                    rate, min_calls, ..
                },
            ) = (verdict, probe, mirror.config.policy)
            {
                if let Some(window) = mirror.window.as_mut() {
                    window.record(!success);
                    let (calls, failures) = window.totals();
                    let crossed = calls >= u64::from(min_calls.max(1))
                        && failures as f64 >= rate * calls as f64;
                    if !success && crossed {
                        // failsafe's one-failure policy trips on this.
                        self.inner.machine.on_error();
                    }
                }
                self.follow(&mut mirror, &mut report);
                drop(mirror);
                self.publish(report);
                return;
            }
            match (verdict, probe) {
                (Some(true), true) => {
                    // failsafe closes on one success: tell it only of the
                    // one that completes the window's set of probes.
                    mirror.probes_succeeded += 1;
                    if mirror.probes_succeeded >= mirror.config.half_open_probes.max(1) {
                        self.inner.machine.on_success();
                    }
                }
                (Some(true), false) => self.inner.machine.on_success(),
                (Some(false), _) => self.inner.machine.on_error(),
                // No verdict: an abandoned probe gives its slot back.
                (None, true) => mirror.probes_admitted = mirror.probes_admitted.saturating_sub(1),
                (None, false) => {}
            }
            self.follow(&mut mirror, &mut report);
        }
        self.publish(report);
    }

    /// Forces the breaker closed (the admin's reset).
    pub fn reset(&self) {
        let mut report = Report::default();
        {
            let mut mirror = self.lock();
            self.inner.machine.reset();
            // Leaving open or half-open "revives" failsafe's policy, which
            // zeroes the count; a closed breaker keeps its count.
            self.follow(&mut mirror, &mut report);
        }
        self.publish(report);
    }

    /// Runs `call` if the breaker allows it. `counts_as_failure` decides which
    /// errors are a verdict on the downstream; other errors (a cancellation)
    /// give the permit back without one.
    pub async fn call<T, E, Fut>(
        &self,
        call: impl FnOnce() -> Fut,
        counts_as_failure: impl Fn(&E) -> bool,
    ) -> Result<T, BreakerError<E>>
    where
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        let permit = self.try_acquire().map_err(BreakerError::Rejected)?;
        match call().await {
            Ok(value) => {
                permit.success();
                Ok(value)
            }
            Err(err) => {
                if counts_as_failure(&err) {
                    permit.failure();
                }
                Err(BreakerError::Inner(err))
            }
        }
    }
}

/// The outcome of a call through the breaker.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BreakerError<E> {
    #[error(transparent)]
    Rejected(Rejection),
    #[error(transparent)]
    Inner(E),
}

/// Permission for one call. Report its verdict with `success` or `failure`;
/// dropping it without one (the call was cancelled) records nothing and
/// frees the half-open probe slot.
#[must_use]
#[derive(Debug)]
pub struct Permit {
    breaker: Option<Breaker>,
    generation: u64,
    probe: bool,
    admitted: Instant,
}

impl Permit {
    pub fn success(mut self) {
        if let Some(b) = self.breaker.take() {
            b.record(
                self.generation,
                self.probe,
                Some(true),
                self.admitted.elapsed(),
            );
        }
    }

    pub fn failure(mut self) {
        if let Some(b) = self.breaker.take() {
            b.record(
                self.generation,
                self.probe,
                Some(false),
                self.admitted.elapsed(),
            );
        }
    }

    /// Whether this call is one of the half-open window's probes.
    pub fn is_probe(&self) -> bool {
        self.probe
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(b) = self.breaker.take() {
            b.record(self.generation, self.probe, None, self.admitted.elapsed());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex as StdMutex;

    #[derive(Default)]
    struct Recorder {
        changes: StdMutex<Vec<(BreakerState, BreakerState)>>,
        rejections: StdMutex<Vec<Rejection>>,
    }

    impl BreakerObserver for Recorder {
        fn state_changed(&self, from: BreakerState, to: BreakerState) {
            self.changes.lock().unwrap().push((from, to));
        }
        fn rejected(&self, kind: Rejection) {
            self.rejections.lock().unwrap().push(kind);
        }
    }

    fn breaker(threshold: u32) -> (Breaker, Arc<Recorder>) {
        let recorder = Arc::new(Recorder::default());
        let b = Breaker::new(
            BreakerConfig {
                failure_threshold: threshold,
                open_duration: Duration::from_secs(30),
                half_open_probes: 1,
                ..BreakerConfig::default()
            },
            Some(recorder.clone()),
        );
        (b, recorder)
    }

    fn fail(b: &Breaker, n: u32) {
        for _ in 0..n {
            b.try_acquire().unwrap().failure();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn construction_reports_no_change_and_starts_closed() {
        let (b, rec) = breaker(5);
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(rec.changes.lock().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn it_opens_on_the_threshold_th_consecutive_failure() {
        let (b, rec) = breaker(5);
        fail(&b, 4);
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.snapshot().consecutive_failures, 4);
        fail(&b, 1);
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(
            *rec.changes.lock().unwrap(),
            vec![(BreakerState::Closed, BreakerState::Open)]
        );
        assert_eq!(b.try_acquire().unwrap_err(), Rejection::Open);
        assert_eq!(*rec.rejections.lock().unwrap(), vec![Rejection::Open]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_resets_the_consecutive_count() {
        let (b, _) = breaker(3);
        fail(&b, 2);
        b.try_acquire().unwrap().success();
        fail(&b, 2);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn it_stays_open_for_the_open_duration_on_tokio_time() {
        let (b, _) = breaker(1);
        fail(&b, 1);
        tokio::time::advance(Duration::from_secs(29)).await;
        assert_eq!(b.try_acquire().unwrap_err(), Rejection::Open);
        let left = b.snapshot().until_half_open.unwrap();
        assert_eq!(left, Duration::from_secs(1));
        tokio::time::advance(Duration::from_secs(1)).await;
        let probe = b.try_acquire().unwrap();
        assert!(probe.is_probe());
        assert_eq!(b.state(), BreakerState::HalfOpen);
        drop(probe);
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_admits_exactly_one_probe_and_rejects_the_rest_distinctly() {
        let (b, rec) = breaker(1);
        fail(&b, 1);
        tokio::time::advance(Duration::from_secs(30)).await;
        let probe = b.try_acquire().unwrap();
        for _ in 0..4 {
            let err = b.try_acquire().unwrap_err();
            assert_eq!(err, Rejection::HalfOpenBusy);
            assert!(err.is_open());
        }
        assert_eq!(b.probe_counts(), (1, 1), "one window, one probe");
        probe.success();
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.try_acquire().map(|p| p.is_probe()), Ok(false));
        assert_eq!(b.probe_counts(), (1, 1), "calls while closed are no probes");
        assert_eq!(
            *rec.changes.lock().unwrap(),
            vec![
                (BreakerState::Closed, BreakerState::Open),
                (BreakerState::Open, BreakerState::HalfOpen),
                (BreakerState::HalfOpen, BreakerState::Closed),
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_reopens_for_another_full_period() {
        let (b, rec) = breaker(2);
        fail(&b, 2);
        tokio::time::advance(Duration::from_secs(30)).await;
        b.try_acquire().unwrap().failure();
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(
            rec.changes.lock().unwrap().last(),
            Some(&(BreakerState::HalfOpen, BreakerState::Open))
        );
        tokio::time::advance(Duration::from_secs(29)).await;
        assert_eq!(b.try_acquire().unwrap_err(), Rejection::Open);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(b.try_acquire().unwrap().is_probe());
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_probe_frees_the_slot_for_the_next_caller() {
        let (b, _) = breaker(1);
        fail(&b, 1);
        tokio::time::advance(Duration::from_secs(30)).await;
        let probe = b.try_acquire().unwrap();
        drop(probe); // cancelled: no verdict
        assert_eq!(b.state(), BreakerState::HalfOpen);
        let next = b.try_acquire().expect("the slot was given back");
        assert!(next.is_probe());
        next.success();
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_result_from_before_the_trip_is_ignored() {
        let (b, _) = breaker(1);
        let early = b.try_acquire().unwrap();
        fail(&b, 1);
        tokio::time::advance(Duration::from_secs(30)).await;
        let probe = b.try_acquire().unwrap();
        early.success(); // stale: must not close the breaker
        assert_eq!(b.state(), BreakerState::HalfOpen);
        probe.failure();
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn reset_closes_and_reports_the_change() {
        let (b, rec) = breaker(1);
        fail(&b, 1);
        b.reset();
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.snapshot().consecutive_failures, 0);
        assert_eq!(
            rec.changes.lock().unwrap().last(),
            Some(&(BreakerState::Open, BreakerState::Closed))
        );
        assert!(b.try_acquire().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn errors_that_are_no_verdict_leave_the_count_alone() {
        let (b, _) = breaker(1);
        let r: Result<(), BreakerError<&str>> =
            b.call(|| async { Err("cancelled") }, |_| false).await;
        assert_eq!(r.unwrap_err(), BreakerError::Inner("cancelled"));
        assert_eq!(b.state(), BreakerState::Closed);
        let r: Result<(), BreakerError<&str>> =
            b.call(|| async { Err("declined") }, |_| true).await;
        assert!(r.is_err());
        assert_eq!(b.state(), BreakerState::Open);
    }

    fn breaker_with_probes(probes: u32) -> (Breaker, Arc<Recorder>) {
        let recorder = Arc::new(Recorder::default());
        let b = Breaker::new(
            BreakerConfig {
                failure_threshold: 1,
                open_duration: Duration::from_secs(30),
                half_open_probes: probes,
                ..BreakerConfig::default()
            },
            Some(recorder.clone()),
        );
        (b, recorder)
    }

    #[tokio::test(start_paused = true)]
    async fn three_probes_are_admitted_at_once_and_the_fourth_is_refused() {
        let (b, _) = breaker_with_probes(3);
        fail(&b, 1);
        tokio::time::advance(Duration::from_secs(30)).await;
        let probes: Vec<Permit> = (0..3).map(|_| b.try_acquire().unwrap()).collect();
        assert!(probes.iter().all(Permit::is_probe));
        assert_eq!(b.try_acquire().unwrap_err(), Rejection::HalfOpenBusy);
        assert_eq!(b.probe_counts(), (3, 1), "one window, three probes");
        // Two successes are not enough: it stays half-open, and the slots
        // they used stay used (a window admits three probes in all).
        let mut probes = probes.into_iter();
        probes.next().unwrap().success();
        probes.next().unwrap().success();
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(b.try_acquire().unwrap_err(), Rejection::HalfOpenBusy);
        probes.next().unwrap().success();
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_failed_probe_of_several_reopens_and_late_ones_are_ignored() {
        let (b, rec) = breaker_with_probes(3);
        fail(&b, 1);
        tokio::time::advance(Duration::from_secs(30)).await;
        let first = b.try_acquire().unwrap();
        let second = b.try_acquire().unwrap();
        let third = b.try_acquire().unwrap();
        first.success();
        second.failure();
        assert_eq!(b.state(), BreakerState::Open);
        third.success(); // from the window that ended: no verdict now
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(
            rec.changes.lock().unwrap().last(),
            Some(&(BreakerState::HalfOpen, BreakerState::Open))
        );
        // The next window admits three again.
        tokio::time::advance(Duration::from_secs(30)).await;
        let again: Vec<Permit> = (0..3).map(|_| b.try_acquire().unwrap()).collect();
        assert_eq!(b.try_acquire().unwrap_err(), Rejection::HalfOpenBusy);
        assert_eq!(b.probe_counts(), (6, 2));
        drop(again);
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_probe_of_several_gives_its_slot_back() {
        let (b, _) = breaker_with_probes(2);
        fail(&b, 1);
        tokio::time::advance(Duration::from_secs(30)).await;
        let kept = b.try_acquire().unwrap();
        drop(b.try_acquire().unwrap()); // cancelled
        let replacement = b.try_acquire().expect("the slot came back");
        assert_eq!(b.try_acquire().unwrap_err(), Rejection::HalfOpenBusy);
        kept.success();
        assert_eq!(b.state(), BreakerState::HalfOpen);
        replacement.success();
        assert_eq!(b.state(), BreakerState::Closed);
    }

    fn rate_breaker(rate: f64, min_calls: u32, slow_call: Option<Duration>) -> Breaker {
        Breaker::new(
            BreakerConfig {
                policy: BreakerPolicy::FailureRate {
                    rate,
                    window: Duration::from_secs(10),
                    min_calls,
                },
                slow_call,
                ..BreakerConfig::default()
            },
            None,
        )
    }

    fn succeed(b: &Breaker, n: u32) {
        for _ in 0..n {
            b.try_acquire().unwrap().success();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_policy_opens_when_the_window_share_reaches_the_rate_after_min_calls() {
        let b = rate_breaker(0.5, 10, None);
        succeed(&b, 5);
        fail(&b, 4);
        assert_eq!(
            b.state(),
            BreakerState::Closed,
            "nine calls: under min_calls"
        );
        let snap = b.snapshot();
        assert_eq!(snap.policy, "failure_rate");
        assert_eq!(snap.window_calls, Some(9));
        fail(&b, 1);
        assert_eq!(b.state(), BreakerState::Open, "ten calls, half failed");
        assert_eq!(b.try_acquire().unwrap_err(), Rejection::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_policy_ignores_a_run_of_failures_in_a_healthy_stream() {
        // Five failures in a row would open the consecutive policy.
        let b = rate_breaker(0.5, 10, None);
        for _ in 0..20 {
            succeed(&b, 7);
            fail(&b, 3);
        }
        fail(&b, 6);
        assert_eq!(b.state(), BreakerState::Closed);
        let rate = b.snapshot().window_failure_rate.unwrap();
        assert!(rate < 0.5, "{rate}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_state_change_empties_the_window_even_while_its_calls_are_young() {
        let b = Breaker::new(
            BreakerConfig {
                policy: BreakerPolicy::FailureRate {
                    rate: 0.5,
                    window: Duration::from_secs(10),
                    min_calls: 4,
                },
                open_duration: Duration::from_secs(1),
                ..BreakerConfig::default()
            },
            None,
        );
        succeed(&b, 4);
        fail(&b, 4);
        assert_eq!(b.state(), BreakerState::Open, "4 of 8 failed");
        // Well inside the 10 s window, the probe closes it.
        tokio::time::advance(Duration::from_millis(1100)).await;
        b.try_acquire().unwrap().success();
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(
            b.snapshot().window_calls,
            Some(0),
            "a new state, a new count"
        );
        // With the old calls still counted, one failure would make 5 of 9.
        fail(&b, 1);
        assert_eq!(b.state(), BreakerState::Closed, "one call: under min_calls");
    }

    #[tokio::test(start_paused = true)]
    async fn calls_older_than_the_window_no_longer_count() {
        let b = rate_breaker(0.5, 10, None);
        fail(&b, 9);
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(b.snapshot().window_calls, Some(0));
        fail(&b, 1);
        succeed(&b, 8);
        fail(&b, 1);
        assert_eq!(b.state(), BreakerState::Closed, "2 of 10 in the window");
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_success_counts_as_a_failure_but_its_result_reaches_the_caller() {
        let b = rate_breaker(0.5, 4, Some(Duration::from_millis(100)));
        for _ in 0..4 {
            let r: Result<u32, BreakerError<&str>> = b
                .call(
                    || async {
                        tokio::time::sleep(Duration::from_millis(150)).await;
                        Ok(7)
                    },
                    |_| true,
                )
                .await;
            assert_eq!(r, Ok(7), "the caller gets its answer");
        }
        assert_eq!(b.state(), BreakerState::Open, "four slow calls of four");
        // Fast successes are successes.
        let b = rate_breaker(0.5, 4, Some(Duration::from_millis(100)));
        for _ in 0..4 {
            let r: Result<u32, BreakerError<&str>> = b
                .call(
                    || async {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok(7)
                    },
                    |_| true,
                )
                .await;
            assert_eq!(r, Ok(7));
        }
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_probe_closes_it_the_window_starts_empty() {
        let b = rate_breaker(0.5, 4, None);
        fail(&b, 4);
        assert_eq!(b.state(), BreakerState::Open);
        tokio::time::advance(Duration::from_secs(30)).await;
        b.try_acquire().unwrap().success();
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.snapshot().window_calls, Some(0));
        fail(&b, 1);
        assert_eq!(b.state(), BreakerState::Closed, "one call: under min_calls");
    }

    // --- settings changed while it runs -------------------------------------

    fn rate_config(rate: f64, min_calls: u32) -> BreakerConfig {
        BreakerConfig {
            policy: BreakerPolicy::FailureRate {
                rate,
                window: Duration::from_secs(10),
                min_calls,
            },
            ..BreakerConfig::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn switching_to_the_failure_rate_starts_an_empty_window_and_trips_on_the_share() {
        let (b, rec) = breaker(5);
        fail(&b, 4);
        b.set_config(rate_config(0.5, 4));
        let snap = b.snapshot();
        assert_eq!(snap.policy, "failure_rate");
        assert_eq!(snap.consecutive_failures, 0, "the count starts afresh");
        assert_eq!(snap.window_calls, Some(0));
        // Under the old threshold the fifth failure would open it; under the
        // share, one failure of one call is below min_calls.
        fail(&b, 1);
        assert_eq!(b.state(), BreakerState::Closed);
        succeed(&b, 2);
        fail(&b, 1); // 2 of 4 failed: 50%
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(
            *rec.changes.lock().unwrap(),
            vec![(BreakerState::Closed, BreakerState::Open)]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn switching_back_to_consecutive_trips_on_the_new_threshold_not_on_one_failure() {
        let b = Breaker::new(rate_config(0.5, 100), None);
        b.set_config(BreakerConfig {
            failure_threshold: 3,
            ..BreakerConfig::default()
        });
        assert_eq!(b.snapshot().window_calls, None);
        fail(&b, 2);
        assert_eq!(
            b.state(),
            BreakerState::Closed,
            "failsafe ran with threshold 1 before"
        );
        fail(&b, 1);
        assert_eq!(b.state(), BreakerState::Open);
        // And a lower threshold set while counting applies from the next failure.
        let (b, _) = breaker(5);
        b.set_config(BreakerConfig {
            failure_threshold: 2,
            ..BreakerConfig::default()
        });
        fail(&b, 2);
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_breaker_stays_open_for_its_period_and_the_new_one_applies_next_time() {
        let (b, rec) = breaker(1);
        fail(&b, 1);
        b.set_config(BreakerConfig {
            failure_threshold: 1,
            open_duration: Duration::from_secs(5),
            half_open_probes: 2,
            ..BreakerConfig::default()
        });
        assert_eq!(b.state(), BreakerState::Open);
        tokio::time::advance(Duration::from_secs(29)).await;
        assert_eq!(b.try_acquire().unwrap_err(), Rejection::Open);
        tokio::time::advance(Duration::from_secs(1)).await;
        // Two probes now.
        let first = b.try_acquire().unwrap();
        let second = b.try_acquire().unwrap();
        assert_eq!(b.try_acquire().unwrap_err(), Rejection::HalfOpenBusy);
        first.success();
        second.failure();
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(
            b.snapshot().until_half_open,
            Some(Duration::from_secs(5)),
            "the new open period"
        );
        assert_eq!(rec.changes.lock().unwrap().len(), 3);
    }
}
