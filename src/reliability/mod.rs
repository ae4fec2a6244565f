//! Retry with exponential backoff wrapped around a circuit breaker.
//!
//! The composition is the lab's heart: retry wraps the breaker, which wraps
//! the call. A breaker rejection (open, or half-open with its probe out)
//! becomes a *permanent* error, so the retry loop ends at once instead of
//! sleeping out its backoff against a breaker that cannot let it through.
//! (`rejection_permanent: false` turns that off, for the lab to show what it
//! costs.) A retry budget, off by default, is the third pattern: it caps
//! retries at a share of first attempts.

mod breaker;
mod budget;
mod hedge;
mod limit;
mod retry;
mod settings;
mod throttle;

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use breaker::{
    Breaker, BreakerConfig, BreakerError, BreakerObserver, BreakerPolicy, BreakerSnapshot,
    BreakerState, Observers, Permit, RateFigures, Rejection,
};
pub use budget::{BudgetConfig, RetryBudget};
pub use hedge::{HedgeConfig, HedgeDelay, Latencies, HEDGE_MAX_LIMIT};
pub use limit::{ConcurrencyLimit, LimitConfig, LimitKind, LimitPermit, LIMIT_MAX};
pub use retry::{JitterKind, RetryPolicy};
pub use settings::{
    is_window, BreakerSettings, BreakerUpdate, PolicyName, BREAKER_COUNT_LIMIT,
    HALF_OPEN_PROBES_LIMIT,
};
pub use throttle::{Throttle, ThrottleConfig, THROTTLE_K_MAX};

/// How an error of the wrapped call is treated.
pub trait Classify {
    /// Whether the error is a verdict on the downstream (counts towards
    /// opening the breaker). A cancellation is not.
    fn counts_as_failure(&self) -> bool;
    /// Whether another attempt may succeed.
    fn is_retryable(&self) -> bool;
    /// How long the downstream asked to be left alone before the next
    /// attempt (an HTTP `Retry-After`): the next wait is at least that.
    fn retry_after(&self) -> Option<Duration> {
        None
    }
    /// Whether the downstream answered (a success, or a refusal of the
    /// request itself), as opposed to what overload looks like from
    /// outside: a timeout, a busy or unavailable answer, no connection.
    /// The client-side throttle counts these as accepted.
    fn is_answer(&self) -> bool {
        false
    }
}

/// Hears about the retry loop's decisions: logs and metrics live here.
pub trait RetryObserver: Send + Sync {
    /// Called before each wait, with the error that caused it.
    fn retrying(&self, error: &dyn fmt::Display, wait: Duration);
    /// Called when the breaker refused a call and the loop ends without waiting.
    fn gave_up_on_rejection(&self, rejection: Rejection);
    /// Called with each wait as it starts, saying whether the breaker was
    /// open (or half-open) then: time slept against a breaker that cannot
    /// let the next attempt through is wasted.
    fn backoff(&self, _wait: Duration, _breaker_open: bool) {}
    /// Called when a retry was refused by the retry budget; the loop ends.
    fn budget_exhausted(&self) {}
    /// Called when the client-side throttle rejected an attempt locally;
    /// the loop ends.
    fn throttled(&self) {}
    /// Called when a hedge started beside a slow call.
    fn hedged(&self) {}
    /// Called when a hedge answered first with a success.
    fn hedge_won(&self) {}
    /// Called when a hedge was due but the retry budget (or the throttle)
    /// refused it.
    fn hedge_refused(&self) {}
    /// Called when the concurrency limit refused a call; the loop ends.
    fn limited(&self) {}
}

/// Why a wrapped call finally failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError<E> {
    /// The breaker refused the call: the downstream was not called.
    #[error(transparent)]
    Rejected(Rejection),
    /// The downstream failed (on the last attempt, or permanently).
    #[error(transparent)]
    Failed(E),
    /// The client-side throttle rejected the attempt before it was sent:
    /// the downstream has been failing to answer most of what it got.
    #[error("throttled locally: the provider has been failing to answer most calls")]
    Throttled,
    /// The concurrency limit was reached: the call was not sent.
    #[error("not attempted: the concurrency limit on calls in flight is reached")]
    Limited,
}

/// Which of the two patterns are in force; both can be switched at run time
/// so the same traffic can be run with either, both or neither.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct Switches {
    pub retry_enabled: bool,
    pub breaker_enabled: bool,
    /// A breaker rejection ends the retry loop (true, the right thing);
    /// false treats it as one more transient failure, to show the backoff
    /// then slept against an open breaker.
    pub rejection_permanent: bool,
    /// Retries only within the retry budget.
    pub retry_budget_enabled: bool,
    /// How the retry's waits are jittered (`RETRY_JITTER_KIND`).
    pub retry_jitter: JitterKind,
    /// Client-side adaptive throttling (`THROTTLE`): attempts rejected
    /// locally while the downstream answers too few.
    pub throttle_enabled: bool,
    /// Hedged attempts (`HEDGE`): a second call beside a slow one.
    pub hedge_enabled: bool,
    /// The limit on calls in flight (`CONCURRENCY_LIMIT`).
    pub concurrency_limit: LimitKind,
}

impl Default for Switches {
    fn default() -> Self {
        Self {
            retry_enabled: true,
            breaker_enabled: true,
            rejection_permanent: true,
            retry_budget_enabled: false,
            retry_jitter: JitterKind::Proportional,
            throttle_enabled: false,
            hedge_enabled: false,
            concurrency_limit: LimitKind::Off,
        }
    }
}

/// A partial change of the switches. Unknown fields are refused; a switch
/// takes a boolean or any spelling the environment takes (`"off"`, `"no"`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SwitchesUpdate {
    #[serde(default, deserialize_with = "crate::units::de_switch")]
    #[schema(schema_with = crate::units::switch_schema)]
    pub retry_enabled: Option<bool>,
    #[serde(default, deserialize_with = "crate::units::de_switch")]
    #[schema(schema_with = crate::units::switch_schema)]
    pub breaker_enabled: Option<bool>,
    /// Whether a breaker rejection ends the retry loop (false: the ablation).
    #[serde(default, deserialize_with = "crate::units::de_switch")]
    #[schema(schema_with = crate::units::switch_schema)]
    pub rejection_permanent: Option<bool>,
    #[serde(default, deserialize_with = "crate::units::de_switch")]
    #[schema(schema_with = crate::units::switch_schema)]
    pub retry_budget_enabled: Option<bool>,
    /// How the retry's waits are jittered: proportional (by RETRY_JITTER),
    /// none, full, equal or decorrelated.
    #[serde(default)]
    pub retry_jitter: Option<JitterKind>,
    /// Client-side adaptive throttling (THROTTLE_K, THROTTLE_WINDOW).
    #[serde(default, deserialize_with = "crate::units::de_switch")]
    #[schema(schema_with = crate::units::switch_schema)]
    pub throttle_enabled: Option<bool>,
    /// Hedged attempts (HEDGE_DELAY, HEDGE_MAX).
    #[serde(default, deserialize_with = "crate::units::de_switch")]
    #[schema(schema_with = crate::units::switch_schema)]
    pub hedge_enabled: Option<bool>,
    /// The limit on calls in flight: off, fixed, aimd or vegas (a change
    /// starts it again from CONCURRENCY_LIMIT_INITIAL).
    #[serde(default)]
    pub concurrency_limit: Option<LimitKind>,
}

impl SwitchesUpdate {
    /// `current` with the switches this update names changed.
    pub fn apply_to(&self, current: Switches) -> Switches {
        Switches {
            retry_enabled: self.retry_enabled.unwrap_or(current.retry_enabled),
            breaker_enabled: self.breaker_enabled.unwrap_or(current.breaker_enabled),
            rejection_permanent: self
                .rejection_permanent
                .unwrap_or(current.rejection_permanent),
            retry_budget_enabled: self
                .retry_budget_enabled
                .unwrap_or(current.retry_budget_enabled),
            retry_jitter: self.retry_jitter.unwrap_or(current.retry_jitter),
            throttle_enabled: self.throttle_enabled.unwrap_or(current.throttle_enabled),
            hedge_enabled: self.hedge_enabled.unwrap_or(current.hedge_enabled),
            concurrency_limit: self.concurrency_limit.unwrap_or(current.concurrency_limit),
        }
    }
}

/// Retry around breaker, shared by every worker. Cheap to clone; clones
/// share the breaker and the switches.
#[derive(Clone)]
pub struct Reliability {
    retry: RetryPolicy,
    breaker: Breaker,
    observer: Arc<dyn RetryObserver>,
    budget: Arc<RetryBudget>,
    retry_enabled: Arc<AtomicBool>,
    breaker_enabled: Arc<AtomicBool>,
    rejection_permanent: Arc<AtomicBool>,
    retry_budget_enabled: Arc<AtomicBool>,
    /// The jitter kind, as its index in `JitterKind::ALL`.
    retry_jitter: Arc<AtomicU8>,
    throttle: Arc<Throttle>,
    throttle_enabled: Arc<AtomicBool>,
    hedge: HedgeConfig,
    hedge_enabled: Arc<AtomicBool>,
    /// Every call's latency, for a quantile hedge delay.
    latencies: Arc<Latencies>,
    /// The limit on calls in flight (its kind is the switch).
    limit: Arc<ConcurrencyLimit>,
}

impl Reliability {
    /// Both patterns on, rejections permanent, the budget (with its default
    /// settings) off.
    pub fn new(retry: RetryPolicy, breaker: Breaker, observer: Arc<dyn RetryObserver>) -> Self {
        let defaults = Switches::default();
        Self {
            breaker,
            observer,
            budget: Arc::new(RetryBudget::new(BudgetConfig::default())),
            retry_enabled: Arc::new(AtomicBool::new(defaults.retry_enabled)),
            breaker_enabled: Arc::new(AtomicBool::new(defaults.breaker_enabled)),
            rejection_permanent: Arc::new(AtomicBool::new(defaults.rejection_permanent)),
            retry_budget_enabled: Arc::new(AtomicBool::new(defaults.retry_budget_enabled)),
            retry_jitter: Arc::new(AtomicU8::new(retry.jitter.index())),
            throttle: Arc::new(Throttle::new(ThrottleConfig::default(), None)),
            throttle_enabled: Arc::new(AtomicBool::new(defaults.throttle_enabled)),
            hedge: HedgeConfig::default(),
            hedge_enabled: Arc::new(AtomicBool::new(defaults.hedge_enabled)),
            latencies: Arc::new(Latencies::default()),
            limit: Arc::new(ConcurrencyLimit::new(LimitConfig::default())),
            retry,
        }
    }

    /// Limits the calls in flight so (the kind is a switch).
    pub fn with_limit(mut self, config: LimitConfig) -> Self {
        self.limit = Arc::new(ConcurrencyLimit::new(config));
        self
    }

    pub fn limit(&self) -> &ConcurrencyLimit {
        &self.limit
    }

    /// Hedges attempts so when hedging is on (a switch).
    pub fn with_hedging(mut self, config: HedgeConfig) -> Self {
        self.hedge = config;
        self
    }

    /// The delay a hedge would wait now, if one may start.
    pub fn hedge_delay(&self) -> Option<Duration> {
        self.latencies.delay(self.hedge.delay)
    }

    /// Uses a throttle with these settings, its draws from `seed` when
    /// given (whether it applies is a switch).
    pub fn with_throttle(mut self, config: ThrottleConfig, seed: Option<u64>) -> Self {
        self.throttle = Arc::new(Throttle::new(config, seed));
        self
    }

    pub fn throttle(&self) -> &Throttle {
        &self.throttle
    }

    /// Uses a budget with these settings (whether it applies is a switch).
    pub fn with_budget(mut self, config: BudgetConfig) -> Self {
        self.budget = Arc::new(RetryBudget::new(config));
        self
    }

    pub fn budget(&self) -> &RetryBudget {
        &self.budget
    }

    pub fn switches(&self) -> Switches {
        Switches {
            retry_enabled: self.retry_enabled.load(Ordering::SeqCst),
            breaker_enabled: self.breaker_enabled.load(Ordering::SeqCst),
            rejection_permanent: self.rejection_permanent.load(Ordering::SeqCst),
            retry_budget_enabled: self.retry_budget_enabled.load(Ordering::SeqCst),
            retry_jitter: JitterKind::ALL[usize::from(self.retry_jitter.load(Ordering::SeqCst))],
            throttle_enabled: self.throttle_enabled.load(Ordering::SeqCst),
            hedge_enabled: self.hedge_enabled.load(Ordering::SeqCst),
            concurrency_limit: self.limit.kind(),
        }
    }

    /// Applies to calls that start after it.
    pub fn set_switches(&self, switches: Switches) {
        self.retry_enabled
            .store(switches.retry_enabled, Ordering::SeqCst);
        self.breaker_enabled
            .store(switches.breaker_enabled, Ordering::SeqCst);
        self.rejection_permanent
            .store(switches.rejection_permanent, Ordering::SeqCst);
        self.retry_budget_enabled
            .store(switches.retry_budget_enabled, Ordering::SeqCst);
        self.retry_jitter
            .store(switches.retry_jitter.index(), Ordering::SeqCst);
        self.throttle_enabled
            .store(switches.throttle_enabled, Ordering::SeqCst);
        self.hedge_enabled
            .store(switches.hedge_enabled, Ordering::SeqCst);
        self.limit.set_kind(switches.concurrency_limit);
    }

    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    /// The calls one `call` makes at most, the first included.
    pub fn max_attempts(&self) -> u32 {
        self.retry.max_attempts
    }

    /// Calls `op` through the breaker, retrying transient failures.
    ///
    /// `op` builds a fresh future for each attempt; the future runs only if
    /// the breaker admits it, so work done inside it (counting an attempt)
    /// happens only for calls that reach the downstream.
    pub async fn call<T, E, F, Fut>(&self, op: F) -> Result<T, CallError<E>>
    where
        E: Classify + fmt::Display,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.call_seeded(None, op).await
    }

    /// Like `call`, with the retry jitter drawn from `jitter_seed` when given,
    /// so that a seeded run waits exactly as another run with the same seed.
    pub async fn call_seeded<T, E, F, Fut>(
        &self,
        jitter_seed: Option<u64>,
        op: F,
    ) -> Result<T, CallError<E>>
    where
        E: Classify + fmt::Display,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let switches = self.switches();
        let policy = RetryPolicy {
            max_attempts: if switches.retry_enabled {
                self.retry.max_attempts
            } else {
                1
            },
            jitter: switches.retry_jitter,
            ..self.retry
        };
        let breaker = switches.breaker_enabled.then_some(&self.breaker);
        let observer = &self.observer;
        let budget = switches.retry_budget_enabled.then_some(&*self.budget);
        let throttle = switches.throttle_enabled.then_some(&*self.throttle);
        let hedging = switches.hedge_enabled.then_some(self.hedge);
        let latencies = &*self.latencies;
        let limit = &*self.limit;
        // Shared by every call of every attempt: a hedged attempt builds
        // more than one.
        let op = std::sync::Mutex::new(op);
        let permanent_rejection = switches.rejection_permanent;
        let max_attempts = policy.max_attempts;
        let mut attempts_made = 0u32;
        let backoff = policy.backoff(jitter_seed);
        let retry_after = backoff.retry_after();
        backoff::future::retry_notify(
            backoff,
            || {
                attempts_made += 1;
                if attempts_made == 1 {
                    // Counted whether or not the budget is on, so that
                    // switching it on finds a window that reflects traffic.
                    self.budget.first_attempt();
                }
                let attempts_left = attempts_made < max_attempts;
                let op = &op;
                let retry_after = &retry_after;
                async move {
                    // The throttle sits in front of the breaker: an attempt
                    // it sheds is never sent, and ends the loop as a
                    // breaker rejection does.
                    if throttle.is_some_and(|t| !t.admit()) {
                        observer.throttled();
                        return Err(backoff::Error::permanent(CallError::Throttled));
                    }
                    // The limit, after the throttle: a call either would
                    // shed is not sent, and fails fast.
                    let Some(permit) = limit.try_acquire() else {
                        observer.limited();
                        return Err(backoff::Error::permanent(CallError::Limited));
                    };
                    let result = attempt_group(
                        op,
                        permit,
                        Guards {
                            breaker,
                            throttle,
                            budget,
                            limit,
                        },
                        hedging,
                        latencies,
                        &**observer,
                    )
                    .await;
                    // A retry is about to be scheduled: the budget may refuse it.
                    let over_budget = || {
                        let refused = attempts_left && budget.is_some_and(|b| !b.try_retry());
                        if refused {
                            observer.budget_exhausted();
                        }
                        refused
                    };
                    match result {
                        Ok(value) => Ok(value),
                        Err(BreakerError::Rejected(rejection)) if permanent_rejection => {
                            observer.gave_up_on_rejection(rejection);
                            Err(backoff::Error::permanent(CallError::Rejected(rejection)))
                        }
                        Err(BreakerError::Rejected(rejection)) => {
                            // The ablation: a rejection as one more transient
                            // failure, backoff and all.
                            if over_budget() {
                                return Err(backoff::Error::permanent(CallError::Rejected(
                                    rejection,
                                )));
                            }
                            Err(backoff::Error::transient(CallError::Rejected(rejection)))
                        }
                        Err(BreakerError::Inner(err)) if err.is_retryable() => {
                            if over_budget() {
                                Err(backoff::Error::permanent(CallError::Failed(err)))
                            } else if permanent_rejection
                                && attempts_left
                                && breaker.is_some_and(|b| b.state() != BreakerState::Closed)
                            {
                                // This failure opened the breaker: waiting out a
                                // backoff against it is pointless. Go straight to
                                // the next attempt, which the breaker rejects,
                                // ending the loop.
                                Err(backoff::Error::retry_after(
                                    CallError::Failed(err),
                                    Duration::ZERO,
                                ))
                            } else {
                                if let Some(wait) = err.retry_after() {
                                    retry_after.ask(wait);
                                }
                                Err(backoff::Error::transient(CallError::Failed(err)))
                            }
                        }
                        Err(BreakerError::Inner(err)) => {
                            Err(backoff::Error::permanent(CallError::Failed(err)))
                        }
                    }
                }
            },
            |err: CallError<E>, wait: Duration| {
                observer.retrying(&err, wait);
                let open = breaker.is_some_and(|b| b.state() != BreakerState::Closed);
                observer.backoff(wait, open);
            },
        )
        .await
    }
}

/// What may refuse or record a call, besides the operation itself.
#[derive(Clone, Copy)]
struct Guards<'a> {
    breaker: Option<&'a Breaker>,
    throttle: Option<&'a Throttle>,
    budget: Option<&'a RetryBudget>,
    limit: &'a ConcurrencyLimit,
}

/// One attempt of the retry loop: a call through the breaker and, with
/// hedging, more beside it while it is slow (see `hedge`). The first
/// success wins and the others are dropped; a failure waits for the calls
/// still running, and with none left ends the attempt. Every call that ends
/// has its latency recorded and its outcome told to the throttle.
async fn attempt_group<'a, T, E, F, Fut>(
    op: &std::sync::Mutex<F>,
    first: LimitPermit<'a>,
    guards: Guards<'a>,
    hedging: Option<HedgeConfig>,
    latencies: &Latencies,
    observer: &dyn RetryObserver,
) -> Result<T, BreakerError<E>>
where
    E: Classify,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    use futures_util::stream::{FuturesUnordered, StreamExt};
    use tokio::time::Instant;

    let Guards {
        breaker,
        throttle,
        budget,
        limit,
    } = guards;
    let call = |index: u32, permit: LimitPermit<'a>| {
        let attempt = (op.lock().unwrap_or_else(|p| p.into_inner()))();
        async move {
            let started = Instant::now();
            let result = match breaker {
                Some(breaker) => breaker.call(|| attempt, E::counts_as_failure).await,
                None => attempt.await.map_err(BreakerError::Inner),
            };
            // The limit learns from what reached the provider: an answer,
            // or a drop; a breaker rejection only frees the place.
            match &result {
                Ok(_) => permit.finished(false),
                Err(BreakerError::Inner(err)) => permit.finished(!err.is_answer()),
                Err(BreakerError::Rejected(_)) => drop(permit),
            }
            (index, result, started.elapsed())
        }
    };
    let ended = |result: &Result<T, BreakerError<E>>, took: Duration| {
        // A breaker rejection never reached the downstream: no latency.
        // For the throttle it is a request refused locally: counted,
        // never accepted.
        if hedging.is_some() && !matches!(result, Err(BreakerError::Rejected(_))) {
            latencies.record(took);
        }
        if let Some(throttle) = throttle {
            throttle.finished(match result {
                Ok(_) => true,
                Err(BreakerError::Inner(err)) => err.is_answer(),
                Err(BreakerError::Rejected(_)) => false,
            });
        }
    };
    let plan = hedging.and_then(|config| Some((config, latencies.delay(config.delay)?)));
    let Some((config, delay)) = plan else {
        let (_, result, took) = call(0, first).await;
        ended(&result, took);
        return result;
    };
    let mut running = FuturesUnordered::new();
    running.push(call(0, first));
    let mut started = 1u32;
    let mut next_hedge = Some(Instant::now() + delay);
    loop {
        tokio::select! {
            biased;
            Some((index, result, took)) = running.next() => {
                ended(&result, took);
                match result {
                    Ok(value) => {
                        if index > 0 {
                            observer.hedge_won();
                        }
                        return Ok(value);
                    }
                    Err(err) if running.is_empty() => return Err(err),
                    // Another call is still running: its answer decides.
                    Err(_) => {}
                }
            }
            _ = tokio::time::sleep_until(next_hedge.unwrap_or_else(Instant::now)), if next_hedge.is_some() => {
                // A hedge needs a place under the limit, and spends the
                // retry budget as a retry does.
                let permit = limit.try_acquire();
                let allowed = permit.is_some()
                    && budget.is_none_or(|b| b.try_retry())
                    && throttle.is_none_or(|t| t.admit());
                if let (true, Some(permit)) = (allowed, permit) {
                    running.push(call(started, permit));
                    started += 1;
                    observer.hedged();
                } else {
                    observer.hedge_refused();
                }
                next_hedge = (allowed && started <= config.max).then(|| Instant::now() + delay);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Mutex;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Fault {
        Declined,
        Cancelled,
        /// A provider's "come back later": retryable, no sooner than this.
        Busy(Duration),
    }

    impl fmt::Display for Fault {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(match self {
                Fault::Declined => "declined",
                Fault::Cancelled => "cancelled",
                Fault::Busy(_) => "busy",
            })
        }
    }

    impl Classify for Fault {
        fn counts_as_failure(&self) -> bool {
            *self != Fault::Cancelled
        }
        fn is_retryable(&self) -> bool {
            *self != Fault::Cancelled
        }
        fn retry_after(&self) -> Option<Duration> {
            match self {
                Fault::Busy(wait) => Some(*wait),
                _ => None,
            }
        }
        /// A decline is the downstream's answer; busy is overload.
        fn is_answer(&self) -> bool {
            *self == Fault::Declined
        }
    }

    #[derive(Default)]
    struct Waits {
        waits: Mutex<Vec<Duration>>,
        rejections: AtomicU32,
        /// Time of the waits that began with the breaker open.
        slept_open: Mutex<Duration>,
        budget_refusals: AtomicU32,
        throttled: AtomicU32,
        hedged: AtomicU32,
        hedge_wins: AtomicU32,
        hedges_refused: AtomicU32,
    }

    impl RetryObserver for Waits {
        fn retrying(&self, _: &dyn fmt::Display, wait: Duration) {
            self.waits.lock().unwrap().push(wait);
        }
        fn gave_up_on_rejection(&self, _: Rejection) {
            self.rejections.fetch_add(1, Ordering::SeqCst);
        }
        fn backoff(&self, wait: Duration, breaker_open: bool) {
            if breaker_open {
                *self.slept_open.lock().unwrap() += wait;
            }
        }
        fn budget_exhausted(&self) {
            self.budget_refusals.fetch_add(1, Ordering::SeqCst);
        }
        fn throttled(&self) {
            self.throttled.fetch_add(1, Ordering::SeqCst);
        }
        fn hedged(&self) {
            self.hedged.fetch_add(1, Ordering::SeqCst);
        }
        fn hedge_won(&self) {
            self.hedge_wins.fetch_add(1, Ordering::SeqCst);
        }
        fn hedge_refused(&self) {
            self.hedges_refused.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn lab(max_attempts: u32, threshold: u32) -> (Reliability, Arc<Waits>) {
        let waits = Arc::new(Waits::default());
        let breaker = Breaker::new(
            BreakerConfig {
                failure_threshold: threshold,
                open_duration: Duration::from_secs(30),
                ..BreakerConfig::default()
            },
            None,
        );
        let retry = RetryPolicy {
            max_attempts,
            ..RetryPolicy::default()
        };
        (Reliability::new(retry, breaker, waits.clone()), waits)
    }

    async fn always(
        r: &Reliability,
        fault: Fault,
        calls: &AtomicU32,
    ) -> Result<(), CallError<Fault>> {
        r.call(|| async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err::<(), _>(fault)
        })
        .await
    }

    #[tokio::test(start_paused = true)]
    async fn max_attempts_counts_calls_not_retries() {
        for n in [1, 2, 3] {
            let (r, waits) = lab(n, 100);
            let calls = AtomicU32::new(0);
            let start = tokio::time::Instant::now();
            let err = always(&r, Fault::Declined, &calls).await.unwrap_err();
            assert_eq!(err, CallError::Failed(Fault::Declined));
            assert_eq!(calls.load(Ordering::SeqCst), n, "{n} attempts");
            let waits = waits.waits.lock().unwrap().clone();
            assert_eq!(waits.len(), n as usize - 1);
            // The paused clock moved by the waits it was told about (tokio's
            // timer rounds each up to the next millisecond).
            let slept = waits.iter().sum::<Duration>();
            assert!(start.elapsed() >= slept);
            assert!(start.elapsed() <= slept + Duration::from_millis(waits.len() as u64));
            for w in &waits {
                assert!(*w <= Duration::from_secs(2));
            }
        }
    }

    /// A `Retry-After` is a floor under the next wait, past the cap, and
    /// the wait still counts against the attempts (the backoff crate's own
    /// retry-after would not count it); one past the limit ends the loop.
    #[tokio::test(start_paused = true)]
    async fn a_retry_after_floors_the_next_wait_and_still_counts_as_an_attempt() {
        let (r, waits) = lab(3, 100);
        let calls = AtomicU32::new(0);
        let start = tokio::time::Instant::now();
        let err = always(&r, Fault::Busy(Duration::from_secs(5)), &calls)
            .await
            .unwrap_err();
        assert_eq!(err, CallError::Failed(Fault::Busy(Duration::from_secs(5))));
        assert_eq!(calls.load(Ordering::SeqCst), 3, "still three attempts");
        let waits_seen = waits.waits.lock().unwrap().clone();
        assert_eq!(waits_seen, [Duration::from_secs(5), Duration::from_secs(5)]);
        assert!(start.elapsed() >= Duration::from_secs(10));

        // A short one only floors: the schedule's own wait (200 ms ± 50%) wins.
        let (r, waits) = lab(2, 100);
        let calls = AtomicU32::new(0);
        let _ = always(&r, Fault::Busy(Duration::from_millis(1)), &calls).await;
        let first = waits.waits.lock().unwrap()[0];
        assert!(first >= Duration::from_millis(100), "{first:?}");

        // Longer than the limit: no worker waits that out.
        let (r, waits) = lab(3, 100);
        let calls = AtomicU32::new(0);
        let long = retry::RETRY_AFTER_LIMIT + Duration::from_secs(1);
        let err = always(&r, Fault::Busy(long), &calls).await.unwrap_err();
        assert_eq!(err, CallError::Failed(Fault::Busy(long)));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(waits.waits.lock().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_that_opens_the_breaker_on_the_last_attempt_returns_that_failure() {
        let (r, waits) = lab(3, 3);
        let calls = AtomicU32::new(0);
        let err = always(&r, Fault::Declined, &calls).await.unwrap_err();
        assert_eq!(err, CallError::Failed(Fault::Declined));
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(waits.waits.lock().unwrap().len(), 2);
        assert_eq!(waits.rejections.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_after_a_failure_returns_the_value() {
        let (r, waits) = lab(3, 100);
        let calls = AtomicU32::new(0);
        let value = r
            .call(|| async {
                if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                    Err(Fault::Declined)
                } else {
                    Ok(7)
                }
            })
            .await
            .unwrap();
        assert_eq!(value, 7);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(waits.waits.lock().unwrap().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_permanent_error_ends_the_loop_without_waiting() {
        let (r, waits) = lab(3, 100);
        let calls = AtomicU32::new(0);
        let start = tokio::time::Instant::now();
        let err = always(&r, Fault::Cancelled, &calls).await.unwrap_err();
        assert_eq!(err, CallError::Failed(Fault::Cancelled));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(waits.waits.lock().unwrap().is_empty());
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn the_breaker_opening_mid_loop_ends_it_at_once() {
        // Threshold 5, three attempts: the first loop makes 3 calls, the second
        // 2 (the 5th failure opens the breaker, the 3rd attempt is rejected),
        // and later loops make none.
        let (r, waits) = lab(3, 5);
        let calls = AtomicU32::new(0);
        always(&r, Fault::Declined, &calls).await.unwrap_err();
        assert_eq!(calls.swap(0, Ordering::SeqCst), 3);
        assert_eq!(waits.waits.lock().unwrap().len(), 2);

        let before = tokio::time::Instant::now();
        let err = always(&r, Fault::Declined, &calls).await.unwrap_err();
        assert_eq!(err, CallError::Rejected(Rejection::Open));
        assert_eq!(calls.swap(0, Ordering::SeqCst), 2);
        // One wait between the two calls; the failure that opened the breaker
        // is followed at once by the rejected attempt, with no wait.
        let waits_now = waits.waits.lock().unwrap().clone();
        assert_eq!(waits_now.len(), 4);
        assert!(waits_now[2] >= Duration::from_millis(100));
        assert_eq!(waits_now[3], Duration::ZERO);
        let elapsed = before.elapsed();
        assert!(elapsed >= waits_now[2] && elapsed <= waits_now[2] + Duration::from_millis(1));

        let before = tokio::time::Instant::now();
        let err = always(&r, Fault::Declined, &calls).await.unwrap_err();
        assert_eq!(err, CallError::Rejected(Rejection::Open));
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        assert_eq!(before.elapsed(), Duration::ZERO);
        assert_eq!(waits.rejections.load(Ordering::SeqCst), 2);
    }

    fn switches(f: impl FnOnce(&mut Switches)) -> Switches {
        let mut s = Switches::default();
        f(&mut s);
        s
    }

    #[tokio::test(start_paused = true)]
    async fn with_rejections_not_permanent_the_loop_sleeps_its_backoff_against_the_open_breaker() {
        let (r, waits) = lab(3, 1);
        r.set_switches(switches(|s| s.rejection_permanent = false));
        let calls = AtomicU32::new(0);
        let started = tokio::time::Instant::now();
        let err = always(&r, Fault::Declined, &calls).await.unwrap_err();
        // One real call opened the breaker; the two retries were rejected,
        // each after a full backoff wait against the open breaker.
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(err, CallError::Rejected(Rejection::Open));
        let slept: Duration = waits.waits.lock().unwrap().iter().sum();
        assert_eq!(waits.waits.lock().unwrap().len(), 2);
        assert!(
            waits.waits.lock().unwrap().iter().all(|w| !w.is_zero()),
            "no shortcut past the backoff: {:?}",
            waits.waits.lock().unwrap()
        );
        assert_eq!(*waits.slept_open.lock().unwrap(), slept);
        assert_eq!(waits.rejections.load(Ordering::SeqCst), 0);
        assert!(started.elapsed() >= slept);
    }

    #[tokio::test(start_paused = true)]
    async fn with_rejections_permanent_no_backoff_is_slept_against_the_open_breaker() {
        let (r, waits) = lab(3, 1);
        let calls = AtomicU32::new(0);
        let started = tokio::time::Instant::now();
        let err = always(&r, Fault::Declined, &calls).await.unwrap_err();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(err, CallError::Rejected(Rejection::Open));
        assert_eq!(*waits.slept_open.lock().unwrap(), Duration::ZERO);
        assert_eq!(waits.rejections.load(Ordering::SeqCst), 1);
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_spent_budget_ends_the_loop_with_the_failure() {
        let (r, waits) = lab(3, 100);
        let r = r.with_budget(BudgetConfig {
            ratio: 0.0,
            min_per_second: 0.0,
            window: Duration::from_secs(10),
        });
        r.set_switches(switches(|s| s.retry_budget_enabled = true));
        let calls = AtomicU32::new(0);
        let err = always(&r, Fault::Declined, &calls).await.unwrap_err();
        assert_eq!(err, CallError::Failed(Fault::Declined));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(waits.budget_refusals.load(Ordering::SeqCst), 1);
        assert!(waits.waits.lock().unwrap().is_empty());

        // A last attempt asks the budget for nothing.
        let (single, single_waits) = lab(1, 100);
        let single = single.with_budget(BudgetConfig {
            ratio: 0.0,
            min_per_second: 0.0,
            window: Duration::from_secs(10),
        });
        single.set_switches(switches(|s| s.retry_budget_enabled = true));
        always(&single, Fault::Declined, &AtomicU32::new(0))
            .await
            .unwrap_err();
        assert_eq!(single_waits.budget_refusals.load(Ordering::SeqCst), 0);

        // Switched off, the same budget refuses nothing.
        r.set_switches(Switches::default());
        let calls = AtomicU32::new(0);
        always(&r, Fault::Declined, &calls).await.unwrap_err();
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_caps_calls_at_one_plus_its_ratio_per_order() {
        let (r, _) = lab(3, 1000);
        let r = r.with_budget(BudgetConfig {
            ratio: 0.5,
            min_per_second: 0.0,
            window: Duration::from_secs(3600),
        });
        r.set_switches(switches(|s| s.retry_budget_enabled = true));
        let calls = AtomicU32::new(0);
        for _ in 0..10 {
            always(&r, Fault::Declined, &calls).await.unwrap_err();
        }
        // Without the budget: 30 calls. With it: 10 first attempts and at
        // most half as many retries.
        assert_eq!(calls.load(Ordering::SeqCst), 15);
    }

    /// Calls `n` orders, each answering `fault` on every attempt: how many
    /// attempts reached the downstream, and how many orders ended throttled.
    async fn through_throttle(r: &Reliability, n: u32, fault: Fault) -> (u32, u32) {
        let reached = AtomicU32::new(0);
        let mut throttled = 0;
        for _ in 0..n {
            let result: Result<(), CallError<Fault>> = r
                .call(|| {
                    let reached = &reached;
                    // Counted when polled: an attempt the throttle sheds
                    // is built but never run.
                    async move {
                        reached.fetch_add(1, Ordering::SeqCst);
                        Err(fault)
                    }
                })
                .await;
            if result == Err(CallError::Throttled) {
                throttled += 1;
            }
        }
        (reached.load(Ordering::SeqCst), throttled)
    }

    fn throttled_lab(max_attempts: u32) -> (Reliability, Arc<Waits>) {
        let (r, waits) = lab(max_attempts, 1_000_000);
        let r = r.with_throttle(ThrottleConfig::default(), Some(3));
        r.set_switches(Switches {
            throttle_enabled: true,
            ..r.switches()
        });
        (r, waits)
    }

    #[tokio::test(start_paused = true)]
    async fn the_throttle_sheds_attempts_while_the_downstream_answers_nothing() {
        let (r, waits) = throttled_lab(1);
        let (reached, throttled) = through_throttle(&r, 1000, Fault::Busy(Duration::ZERO)).await;
        // Nothing accepted: the probability climbs towards 1, so only the
        // first few and a thin trickle get through.
        assert!(reached < 100, "{reached} of 1000 reached the downstream");
        assert_eq!(reached + throttled, 1000);
        assert_eq!(waits.throttled.load(Ordering::SeqCst), throttled);
        assert!(r.throttle().probability() > 0.9);
    }

    #[tokio::test(start_paused = true)]
    async fn a_downstream_that_answers_even_with_declines_is_never_throttled() {
        let (r, waits) = throttled_lab(1);
        let (reached, throttled) = through_throttle(&r, 1000, Fault::Declined).await;
        assert_eq!((reached, throttled), (1000, 0));
        assert_eq!(waits.throttled.load(Ordering::SeqCst), 0);
        assert_eq!(r.throttle().probability(), 0.0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_throttled_attempt_ends_the_loop_and_the_switch_turns_it_off() {
        let (r, waits) = throttled_lab(3);
        through_throttle(&r, 300, Fault::Busy(Duration::ZERO)).await;
        // Now nearly every order is shed on its first attempt: it never
        // reaches the downstream, and no wait or retry follows.
        let waited_before = waits.waits.lock().unwrap().len() as u32;
        let (reached, throttled) = through_throttle(&r, 100, Fault::Busy(Duration::ZERO)).await;
        let waited = waits.waits.lock().unwrap().len() as u32 - waited_before;
        assert!(throttled > 80, "{throttled} of 100 shed");
        assert!(
            reached <= 3 * (100 - throttled),
            "{reached} attempts for {} orders",
            100 - throttled
        );
        assert!(
            waited <= 2 * (100 - throttled),
            "{waited} waits: a shed attempt was retried"
        );
        // Off: every attempt goes, whatever the window says.
        r.set_switches(Switches {
            throttle_enabled: false,
            ..r.switches()
        });
        let (reached, throttled) = through_throttle(&r, 10, Fault::Busy(Duration::ZERO)).await;
        assert_eq!((reached, throttled), (30, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_recovered_downstream_is_sent_everything_once_the_window_has_moved_on() {
        let (r, _) = throttled_lab(1);
        through_throttle(&r, 500, Fault::Busy(Duration::ZERO)).await;
        assert!(r.throttle().probability() > 0.9);
        tokio::time::advance(ThrottleConfig::default().window + Duration::from_secs(1)).await;
        let (reached, throttled) = through_throttle(&r, 100, Fault::Declined).await;
        assert_eq!((reached, throttled), (100, 0));
    }

    fn hedged_lab(delay: HedgeDelay, max: u32) -> (Reliability, Arc<Waits>) {
        let (r, waits) = lab(1, 1_000_000);
        let r = r.with_hedging(HedgeConfig { delay, max });
        r.set_switches(Switches {
            hedge_enabled: true,
            ..r.switches()
        });
        (r, waits)
    }

    /// One order whose calls, in the order they start, take `plan[i]` and
    /// succeed or decline (the last entry repeats): its result, the calls
    /// started, the calls that finished (not cancelled), and how long it
    /// took.
    async fn hedged_call(
        r: &Reliability,
        plan: &[(u64, bool)],
    ) -> (Result<usize, CallError<Fault>>, u32, u32, Duration) {
        let started = AtomicU32::new(0);
        let finished = AtomicU32::new(0);
        let t0 = tokio::time::Instant::now();
        let result = r
            .call(|| {
                let (started, finished) = (&started, &finished);
                async move {
                    let i = started.fetch_add(1, Ordering::SeqCst) as usize;
                    let (ms, ok) = plan[i.min(plan.len() - 1)];
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    finished.fetch_add(1, Ordering::SeqCst);
                    if ok {
                        Ok(i)
                    } else {
                        Err(Fault::Declined)
                    }
                }
            })
            .await;
        (
            result,
            started.load(Ordering::SeqCst),
            finished.load(Ordering::SeqCst),
            t0.elapsed(),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_call_is_hedged_after_the_delay_and_the_first_success_wins() {
        let (r, waits) = hedged_lab(HedgeDelay::Fixed(Duration::from_millis(100)), 1);
        // The first call takes a second; the hedge, started at 100 ms,
        // takes 10 ms and wins; the first is cancelled.
        let (result, started, finished, took) = hedged_call(&r, &[(1000, true), (10, true)]).await;
        assert_eq!(result, Ok(1));
        assert_eq!((started, finished), (2, 1));
        assert_eq!(took, Duration::from_millis(110));
        assert_eq!(waits.hedged.load(Ordering::SeqCst), 1);
        assert_eq!(waits.hedge_wins.load(Ordering::SeqCst), 1);
        // A call faster than the delay is never hedged.
        let (result, started, _, took) = hedged_call(&r, &[(50, true)]).await;
        assert_eq!(
            (result, started, took),
            (Ok(0), 1, Duration::from_millis(50))
        );
        assert_eq!(waits.hedged.load(Ordering::SeqCst), 1);
        // Off, a slow call is waited for.
        r.set_switches(Switches {
            hedge_enabled: false,
            ..r.switches()
        });
        let (result, started, _, took) = hedged_call(&r, &[(1000, true), (10, true)]).await;
        assert_eq!((result, started, took), (Ok(0), 1, Duration::from_secs(1)));
    }

    #[tokio::test(start_paused = true)]
    async fn the_slow_call_still_wins_if_it_answers_before_its_hedge() {
        let (r, waits) = hedged_lab(HedgeDelay::Fixed(Duration::from_millis(100)), 1);
        let (result, started, _, took) = hedged_call(&r, &[(150, true), (500, true)]).await;
        assert_eq!(
            (result, started, took),
            (Ok(0), 2, Duration::from_millis(150))
        );
        assert_eq!(waits.hedge_wins.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_waits_for_the_hedge_still_running_and_a_lone_failure_ends_the_attempt() {
        let (r, _) = hedged_lab(HedgeDelay::Fixed(Duration::from_millis(100)), 1);
        // The first declines at 300 ms; the hedge, started at 100 ms,
        // succeeds at 400 ms.
        let (result, started, finished, took) = hedged_call(&r, &[(300, false), (300, true)]).await;
        assert_eq!(result, Ok(1));
        assert_eq!(
            (started, finished, took),
            (2, 2, Duration::from_millis(400))
        );
        // Both decline: the attempt fails with the decline (one attempt
        // here, so the loop ends), and no third call starts.
        let (result, started, _, took) = hedged_call(&r, &[(300, false)]).await;
        assert_eq!(result, Err(CallError::Failed(Fault::Declined)));
        assert_eq!((started, took), (2, Duration::from_millis(400)));
        // A failure before the delay with nothing else running ends the
        // attempt at once: hedges answer slowness, not failures.
        let (result, started, _, took) = hedged_call(&r, &[(20, false)]).await;
        assert_eq!(result, Err(CallError::Failed(Fault::Declined)));
        assert_eq!((started, took), (1, Duration::from_millis(20)));
    }

    #[tokio::test(start_paused = true)]
    async fn no_more_than_hedge_max_hedges_start_one_delay_apart() {
        let (r, waits) = hedged_lab(HedgeDelay::Fixed(Duration::from_millis(100)), 2);
        let (result, started, _, took) = hedged_call(&r, &[(1000, true)]).await;
        // Calls at 0, 100 and 200 ms, each taking a second: the first wins.
        assert_eq!((result, started, took), (Ok(0), 3, Duration::from_secs(1)));
        assert_eq!(waits.hedged.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn hedges_spend_the_retry_budget_and_a_spent_one_refuses_them() {
        let (r, waits) = hedged_lab(HedgeDelay::Fixed(Duration::from_millis(100)), 1);
        let r = r.with_budget(BudgetConfig {
            ratio: 0.0,
            min_per_second: 0.0,
            window: Duration::from_secs(10),
        });
        r.set_switches(Switches {
            retry_budget_enabled: true,
            ..r.switches()
        });
        let (result, started, _, took) = hedged_call(&r, &[(1000, true), (10, true)]).await;
        assert_eq!((result, started, took), (Ok(0), 1, Duration::from_secs(1)));
        assert_eq!(waits.hedged.load(Ordering::SeqCst), 0);
        assert_eq!(waits.hedges_refused.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_quantile_delay_waits_for_enough_calls_then_follows_their_latency() {
        let (r, waits) = hedged_lab(HedgeDelay::Quantile(0.9), 1);
        // Before MIN_SAMPLES calls nothing is hedged, however slow.
        for _ in 0..hedge::MIN_SAMPLES - 1 {
            let (result, _, _, _) = hedged_call(&r, &[(80, true)]).await;
            assert_eq!(result, Ok(0));
        }
        let (_, started, _, _) = hedged_call(&r, &[(2000, true), (10, true)]).await;
        assert_eq!(started, 1);
        assert_eq!(r.hedge_delay(), Some(Duration::from_millis(80)));
        // Now the p90 of the calls so far (80 ms) is the delay.
        let (result, started, _, took) = hedged_call(&r, &[(2000, true), (10, true)]).await;
        assert_eq!(
            (result, started, took),
            (Ok(1), 2, Duration::from_millis(90))
        );
        assert_eq!(waits.hedged.load(Ordering::SeqCst), 1);
    }
}
