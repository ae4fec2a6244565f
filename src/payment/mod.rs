//! The simulated payment provider: it fails on purpose, in the ways the lab
//! asks for, and can be reconfigured while traffic flows.
//!
//! Each call draws an outcome and a latency. The failure model:
//! - `failure_rate`: the share of calls declined (nothing charged);
//! - `ambiguous_rate`: the share of calls where the charge **is** made but the
//!   answer is lost, so the caller sees an error and may retry: without
//!   idempotency, that retry charges twice;
//! - a `mode`: `normal`; `outage` (every call fails); `brownout` (failure
//!   rate and latency raised for a while, then back by themselves);
//!   `blackhole` (calls hang until the caller's timeout).
//!
//! The provider keeps a ledger of the charges it made. With idempotency on,
//! a call whose idempotency key already has a charge returns that charge's
//! success and charges nothing new. Declined calls charge nothing and record
//! nothing, so a retry of a decline gets a fresh draw.
//!
//! With a seed, each call's draws are a pure function of the seed, the order
//! id and the attempt number, so racing workers never change an order's draws.
//! Changes apply to the next call: each call reads the settings once, at its
//! start.
//!
//! Capacity: unlimited unless the simulator is given a [`Capacity`]. Then it
//! serves that many calls at once; the others wait for a slot in arrival
//! order (so latency grows with the excess) and fail as overloaded after
//! waiting `queue_timeout`. A call's latency and outcome are drawn when a
//! slot starts serving it. A call runs on the provider's side, in a task of
//! its own, as on a real server: a caller that gives up (its timeout) does
//! not take its call out of the queue or off its slot. Such a call still
//! runs to the end and is counted as wasted work; that is the load a retry
//! storm adds on top of the retries themselves.

pub mod client;
pub mod faults;
mod ledger;
mod settings;

use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use prometheus::{IntCounter, IntGauge};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tokio_util::sync::CancellationToken;

use crate::orders::OrderId;

pub use ledger::{Charge, Ledger, LedgerError, MemoryLedger, PostgresLedger};
pub use settings::{Brownout, Mode, PaymentSettings, PaymentUpdate, SettingsError, SettingsView};

/// Why a charge did not go through, as the caller sees it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PaymentError {
    #[error("payment declined (simulated)")]
    Declined,
    #[error("payment service unavailable (simulated outage)")]
    Outage,
    /// The provider charged, but the answer was lost on the way back.
    #[error("payment outcome unknown: response lost (simulated)")]
    Ambiguous,
    #[error("payment timed out after {0:?}")]
    Timeout(Duration),
    #[error("payment service overloaded: no free slot within {0:?} (simulated)")]
    Overloaded(Duration),
    #[error("payment cancelled: shutting down")]
    Cancelled,
    #[error("payment ledger error: {0}")]
    Ledger(#[from] LedgerError),
    /// No connection to a remote provider could be made (refused, reset
    /// while connecting, connect timeout): the request never left, so
    /// another attempt is safe.
    #[error("payment service unreachable: {0}")]
    Unreachable(String),
    /// The connection to a remote provider failed once the request was on
    /// its way: the charge may or may not have been made (ambiguous).
    #[error("payment outcome unknown: {0}")]
    ConnectionLost(String),
    /// A remote provider asked to be called again later (429, or 503).
    #[error("payment service busy ({status}){}", retry_after_text(*.retry_after))]
    Busy {
        status: u16,
        retry_after: Option<Duration>,
    },
    /// A remote provider refused the request itself (a 4xx): another
    /// attempt would be refused the same way.
    #[error("payment refused by the provider ({status}): {message}")]
    Refused { status: u16, message: String },
    /// A remote provider failed the charge (a 5xx other than 503; the
    /// simulator's drawn declines arrive as 502).
    #[error("payment failed at the provider ({status}): {message}")]
    Failed { status: u16, message: String },
}

fn retry_after_text(retry_after: Option<Duration>) -> String {
    match retry_after {
        Some(wait) => format!(", retry after {}", humantime::format_duration(wait)),
        None => String::new(),
    }
}

/// One charge call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChargeRequest {
    pub order_id: OrderId,
    /// 1 for the first call for this order, 2 for the next, ...
    pub attempt: u32,
    /// Stable across retries of one order; empty for none (a remote
    /// caller that sent no `Idempotency-Key`).
    pub idempotency_key: String,
    pub amount: i64,
    pub currency: String,
}

impl ChargeRequest {
    /// One attempt to charge an order, under the order's idempotency key.
    pub fn for_order(order_id: OrderId, attempt: u32, amount: i64, currency: &str) -> Self {
        Self {
            order_id,
            attempt,
            idempotency_key: Self::key_for(order_id),
            amount,
            currency: currency.to_owned(),
        }
    }

    /// The idempotency key of an order's charges: the same on every retry.
    pub fn key_for(order_id: OrderId) -> String {
        format!("order-{order_id}")
    }
}

/// Provider-side counters.
#[derive(Clone)]
pub struct ProviderMetrics {
    /// Charge calls received (each attempt that reached the provider).
    pub calls: IntCounter,
    pub charges: IntCounter,
    pub duplicate_charges: IntCounter,
    /// With a finite capacity: calls holding a slot, calls waiting for
    /// one, calls refused after waiting, and calls that finished after
    /// their caller had left.
    pub in_flight: IntGauge,
    pub queued: IntGauge,
    pub overloaded: IntCounter,
    pub wasted: IntCounter,
}

/// The provider's load at one moment: calls served and waiting now, and
/// the running totals of calls refused after waiting and of wasted calls.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProviderLoad {
    pub in_flight: u64,
    pub queued: u64,
    pub overloaded: u64,
    pub wasted: u64,
}

/// How much the provider serves at once (`PAYMENT_CAPACITY`) and how long a
/// call waits for a slot (`PAYMENT_QUEUE_TIMEOUT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    pub slots: u32,
    pub queue_timeout: Duration,
}

/// A finite provider's slots.
struct Slots {
    capacity: Capacity,
    semaphore: Arc<tokio::sync::Semaphore>,
}

/// Adds one to a gauge for as long as it lives.
struct Held(IntGauge);

impl Held {
    fn new(gauge: &IntGauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// What one call will do, decided at its start.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Draw {
    pub declined: bool,
    pub ambiguous: bool,
    pub latency: Duration,
}

/// Mixes the seed, the order and the attempt into one well-spread number
/// (splitmix64 steps): the per-call generator's seed.
fn mix(seed: u64, order_id: OrderId, attempt: u32) -> u64 {
    fn step(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    let (hi, lo) = order_id.as_uuid().as_u64_pair();
    step(step(step(step(seed) ^ hi) ^ lo) ^ u64::from(attempt))
}

/// The simulator. Shared by every worker and by the admin API.
pub struct Simulator {
    settings: RwLock<PaymentSettings>,
    seed: Option<u64>,
    rng: Mutex<StdRng>,
    ledger: Arc<dyn Ledger>,
    metrics: ProviderMetrics,
    slots: Option<Slots>,
}

impl Simulator {
    pub fn new(
        settings: PaymentSettings,
        seed: Option<u64>,
        ledger: Arc<dyn Ledger>,
        metrics: ProviderMetrics,
    ) -> Self {
        Self {
            settings: RwLock::new(settings),
            seed,
            rng: Mutex::new(StdRng::from_rng(&mut rand::rng())),
            ledger,
            metrics,
            slots: None,
        }
    }

    /// The provider serving at most `capacity.slots` calls at once.
    pub fn with_capacity(mut self, capacity: Capacity) -> Self {
        self.slots = Some(Slots {
            capacity,
            semaphore: Arc::new(tokio::sync::Semaphore::new(capacity.slots as usize)),
        });
        self
    }

    /// Its load now (all zero while its capacity is unlimited).
    pub fn load(&self) -> ProviderLoad {
        let m = &self.metrics;
        ProviderLoad {
            in_flight: m.in_flight.get().max(0) as u64,
            queued: m.queued.get().max(0) as u64,
            overloaded: m.overloaded.get(),
            wasted: m.wasted.get(),
        }
    }

    /// The capacity, when finite.
    pub fn capacity(&self) -> Option<Capacity> {
        self.slots.as_ref().map(|s| s.capacity)
    }

    /// The settings in force now. A brownout whose time is up is ended here,
    /// under the write lock; every other read shares the read lock, so charges
    /// from many workers do not queue behind each other.
    fn current(&self) -> PaymentSettings {
        let now = tokio::time::Instant::now();
        let settings = *self.settings.read().unwrap_or_else(|p| p.into_inner());
        if !settings.is_expired(now) {
            return settings;
        }
        let mut settings = self.settings.write().unwrap_or_else(|p| p.into_inner());
        settings.expire(now);
        *settings
    }

    /// The settings now in force (a brownout that ran out has ended).
    pub fn view(&self) -> SettingsView {
        self.current().view(tokio::time::Instant::now())
    }

    /// Validates and applies a change; on error nothing changes.
    pub fn update(&self, update: PaymentUpdate) -> Result<SettingsView, SettingsError> {
        let now = tokio::time::Instant::now();
        let mut settings = self.settings.write().unwrap_or_else(|p| p.into_inner());
        let next = settings.apply(update, now)?;
        *settings = next;
        tracing::warn!(settings = ?settings.view(now), "payment simulator reconfigured");
        Ok(settings.view(now))
    }

    pub fn ledger(&self) -> &Arc<dyn Ledger> {
        &self.ledger
    }

    /// Charge calls received so far.
    pub fn calls(&self) -> u64 {
        self.metrics.calls.get()
    }

    /// The draws for one call under the given effective rates.
    pub fn draw(&self, order_id: OrderId, attempt: u32, effective: &settings::Effective) -> Draw {
        let mut seeded;
        let mut shared;
        let rng: &mut StdRng = match self.seed {
            Some(seed) => {
                seeded = StdRng::seed_from_u64(mix(seed, order_id, attempt));
                &mut seeded
            }
            None => {
                shared = self.rng.lock().unwrap_or_else(|p| p.into_inner());
                &mut shared
            }
        };
        // Always draw all three, in this order, so each draw stays a pure
        // function of (seed, order, attempt) whatever the settings.
        let declined = rng.random::<f64>() < effective.failure_rate;
        let ambiguous = rng.random::<f64>() < effective.ambiguous_rate;
        let (lo, hi) = (effective.latency_min, effective.latency_max);
        let mut latency = if hi > lo {
            rng.random_range(lo..=hi)
        } else {
            lo
        };
        // Drawn only with a tail, after the three above, so that a run
        // without one draws exactly as before.
        if effective.tail_rate > 0.0 && rng.random::<f64>() < effective.tail_rate {
            latency = effective.tail_latency;
        }
        Draw {
            declined,
            ambiguous,
            latency,
        }
    }

    /// Charges an order. Cancellation-aware: returns `Cancelled` promptly
    /// when `cancel` fires.
    #[tracing::instrument(level = "debug", skip_all, fields(order_id = %request.order_id, attempt = request.attempt))]
    pub async fn charge(
        self: &Arc<Self>,
        request: &ChargeRequest,
        cancel: &CancellationToken,
    ) -> Result<(), PaymentError> {
        self.metrics.calls.inc();
        let Some(slots) = &self.slots else {
            let effective = self.current().effective();
            let draw = self.draw(request.order_id, request.attempt, &effective);
            let (ledger, metrics) = (&self.ledger, &self.metrics);
            return serve(ledger, metrics, request, effective, draw, cancel).await;
        };
        // The provider's side of the call, which outlives a caller that
        // gives up. What it does (its latency, its outcome) is decided when
        // a slot starts serving it, under the settings of that moment: a
        // latency spike slows the calls served during it, not the ones that
        // merely arrived during it.
        let (answer, answered) = tokio::sync::oneshot::channel();
        let simulator = self.clone();
        let semaphore = slots.semaphore.clone();
        let queue_timeout = slots.capacity.queue_timeout;
        let request = request.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let metrics = &simulator.metrics;
            let waiting = Held::new(&metrics.queued);
            let slot = tokio::select! {
                biased;
                _ = cancel.cancelled() => Err(PaymentError::Cancelled),
                slot = tokio::time::timeout(queue_timeout, semaphore.acquire_owned()) => match slot {
                    Ok(Ok(slot)) => Ok(slot),
                    // The semaphore is never closed.
                    Ok(Err(_)) => Err(PaymentError::Cancelled),
                    Err(_) => {
                        metrics.overloaded.inc();
                        Err(PaymentError::Overloaded(queue_timeout))
                    }
                },
            };
            drop(waiting);
            let result = match slot {
                Ok(_slot) => {
                    let _serving = Held::new(&metrics.in_flight);
                    let effective = simulator.current().effective();
                    let draw = simulator.draw(request.order_id, request.attempt, &effective);
                    let ledger = &simulator.ledger;
                    let result = serve(ledger, metrics, &request, effective, draw, &cancel).await;
                    if answer.is_closed() {
                        metrics.wasted.inc();
                    }
                    result
                }
                Err(err) => Err(err),
            };
            let _ = answer.send(result);
        });
        answered.await.unwrap_or(Err(PaymentError::Cancelled))
    }
}

/// One call's work at the provider: its latency, then its outcome, with
/// the charge recorded in the ledger.
async fn serve(
    ledger: &Arc<dyn Ledger>,
    metrics: &ProviderMetrics,
    request: &ChargeRequest,
    effective: settings::Effective,
    draw: Draw,
    cancel: &CancellationToken,
) -> Result<(), PaymentError> {
    let wait = async {
        match effective.mode {
            // Hangs until the caller gives up.
            Mode::Blackhole => std::future::pending::<()>().await,
            // A zero sleep would still wait for the timer's next tick
            // (a millisecond): the benchmark's pipeline ran at a fifth
            // of its speed on that alone.
            _ if draw.latency.is_zero() => tokio::task::yield_now().await,
            _ => tokio::time::sleep(draw.latency).await,
        }
    };
    tokio::select! {
        biased;
        _ = cancel.cancelled() => return Err(PaymentError::Cancelled),
        _ = wait => {}
    }
    if effective.mode == Mode::Outage {
        return Err(PaymentError::Outage);
    }
    // An empty key is none: a caller of the remote provider that sent no
    // Idempotency-Key.
    let key = effective
        .idempotency
        .then_some(request.idempotency_key.as_str())
        .filter(|key| !key.is_empty());
    if draw.declined {
        // A key that already has a charge gets that charge's answer, as a
        // real provider replays a key's first response: a replica that took
        // an order over (its first charge made, its outcome never written)
        // must not be told "declined" and fail a charged order. Read only
        // on a decline, so the usual call costs no extra round trip.
        if let Some(key) = key {
            let charges = ledger
                .charges(request.order_id)
                .await
                .map_err(PaymentError::Ledger)?;
            if charges
                .iter()
                .any(|c| c.idempotency_key.as_deref() == Some(key))
            {
                return Ok(());
            }
        }
        return Err(PaymentError::Declined);
    }
    let recorded = ledger
        .record(request, key)
        .await
        .map_err(PaymentError::Ledger)?;
    if recorded.new_charge {
        metrics.charges.inc();
        if recorded.earlier_charges > 0 {
            metrics.duplicate_charges.inc();
            tracing::warn!(
                earlier = recorded.earlier_charges,
                "order charged again: duplicate charge"
            );
        }
    }
    if draw.ambiguous && recorded.new_charge {
        return Err(PaymentError::Ambiguous);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> ProviderMetrics {
        ProviderMetrics {
            calls: IntCounter::new("n", "n").unwrap(),
            charges: IntCounter::new("c", "c").unwrap(),
            duplicate_charges: IntCounter::new("d", "d").unwrap(),
            in_flight: IntGauge::new("f", "f").unwrap(),
            queued: IntGauge::new("q", "q").unwrap(),
            overloaded: IntCounter::new("o", "o").unwrap(),
            wasted: IntCounter::new("w", "w").unwrap(),
        }
    }

    fn sim(update: PaymentUpdate, seed: Option<u64>) -> Arc<Simulator> {
        Arc::new(sim_unshared(update, seed))
    }

    fn sim_unshared(update: PaymentUpdate, seed: Option<u64>) -> Simulator {
        let s = Simulator::new(
            PaymentSettings::default(),
            seed,
            Arc::new(MemoryLedger::default()),
            metrics(),
        );
        s.update(update).unwrap();
        s
    }

    /// Order ids drawn from a seeded generator: with a seeded simulator, every
    /// draw of these tests is the same on every run.
    fn ids() -> impl FnMut() -> OrderId {
        let mut rng = StdRng::seed_from_u64(0x0bad_5eed);
        move || OrderId::from_random_bytes(rng.random())
    }

    fn request(order_id: OrderId, attempt: u32) -> ChargeRequest {
        ChargeRequest::for_order(order_id, attempt, 100, "USD")
    }

    #[tokio::test(start_paused = true)]
    async fn latency_is_within_bounds_on_the_paused_clock() {
        let mut next_id = ids();
        let s = sim(
            PaymentUpdate {
                failure_rate: Some(0.0),
                ..Default::default()
            },
            Some(1),
        );
        let token = CancellationToken::new();
        for attempt in 1..=50 {
            let start = tokio::time::Instant::now();
            s.charge(&request(next_id(), attempt), &token)
                .await
                .unwrap();
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
        let mut next_id = ids();
        let token = CancellationToken::new();
        for (rate, lo, hi) in [(0.0, 0, 0), (1.0, 1000, 1000), (0.3, 240, 360)] {
            let s = sim(
                PaymentUpdate {
                    failure_rate: Some(rate),
                    latency_min: Some(Duration::ZERO),
                    latency_max: Some(Duration::ZERO),
                    ..Default::default()
                },
                Some(7),
            );
            let mut failed = 0;
            for _ in 0..1000 {
                if s.charge(&request(next_id(), 1), &token).await.is_err() {
                    failed += 1;
                }
            }
            assert!(
                (lo..=hi).contains(&failed),
                "rate {rate}: {failed} failures"
            );
        }
    }

    #[test]
    fn a_latency_tail_changes_only_the_latency_of_its_share_of_calls() {
        let mut next_id = ids();
        let plain = sim(PaymentUpdate::default(), Some(9));
        let tailed = sim(
            PaymentUpdate {
                tail_rate: Some(0.1),
                tail_latency: Some(Duration::from_secs(3)),
                ..Default::default()
            },
            Some(9),
        );
        let (a, b) = (
            plain.settings.read().unwrap().effective(),
            tailed.settings.read().unwrap().effective(),
        );
        let mut in_tail = 0;
        for _ in 0..2000 {
            let order = next_id();
            let (p, t) = (plain.draw(order, 1, &a), tailed.draw(order, 1, &b));
            // The declines and lost answers are drawn as without a tail.
            assert_eq!((p.declined, p.ambiguous), (t.declined, t.ambiguous));
            if t.latency == Duration::from_secs(3) {
                in_tail += 1;
            } else {
                assert_eq!(p.latency, t.latency);
            }
        }
        assert!(
            (150..=250).contains(&in_tail),
            "{in_tail} of 2000 in the tail"
        );
        // A bad share is refused, naming it.
        let err = plain
            .update(PaymentUpdate {
                tail_rate: Some(1.5),
                ..Default::default()
            })
            .unwrap_err();
        assert_eq!(err.field, "tail_rate");
    }

    #[test]
    fn a_seeded_draw_depends_only_on_seed_order_and_attempt() {
        let mut next_id = ids();
        let s = sim(
            PaymentUpdate {
                failure_rate: Some(0.5),
                ..Default::default()
            },
            Some(9),
        );
        let effective = s.settings.read().unwrap().effective();
        let orders: Vec<OrderId> = (0..50).map(|_| next_id()).collect();
        let forward: Vec<Draw> = orders.iter().map(|o| s.draw(*o, 1, &effective)).collect();
        // Drawn again in reverse order, interleaved with other draws.
        let mut backward: Vec<Draw> = orders
            .iter()
            .rev()
            .map(|o| {
                let _ = s.draw(next_id(), 2, &effective);
                s.draw(*o, 1, &effective)
            })
            .collect();
        backward.reverse();
        assert_eq!(forward, backward);
        assert_ne!(
            s.draw(orders[0], 1, &effective),
            s.draw(orders[0], 2, &effective)
        );
        let other = sim(
            PaymentUpdate {
                failure_rate: Some(0.5),
                ..Default::default()
            },
            Some(10),
        );
        let theirs: Vec<Draw> = orders
            .iter()
            .map(|o| other.draw(*o, 1, &effective))
            .collect();
        assert_ne!(forward, theirs);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_charge_returns_promptly_with_a_cancellation_error() {
        let mut next_id = ids();
        let s = sim(PaymentUpdate::default(), Some(1));
        let token = CancellationToken::new();
        let start = tokio::time::Instant::now();
        let req = request(next_id(), 1);
        let charge = s.charge(&req, &token);
        token.cancel();
        assert_eq!(charge.await, Err(PaymentError::Cancelled));
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn an_ambiguous_failure_charges_and_with_idempotency_a_retry_charges_nothing_new() {
        let mut next_id = ids();
        for (idempotency, charges_after_retry) in [(true, 1), (false, 2)] {
            let s = sim(
                PaymentUpdate {
                    failure_rate: Some(0.0),
                    ambiguous_rate: Some(1.0),
                    idempotency: Some(idempotency),
                    ..Default::default()
                },
                Some(3),
            );
            let token = CancellationToken::new();
            let order = next_id();
            assert_eq!(
                s.charge(&request(order, 1), &token).await,
                Err(PaymentError::Ambiguous)
            );
            assert_eq!(s.ledger.charges(order).await.unwrap().len(), 1);
            let retry = s.charge(&request(order, 2), &token).await;
            assert_eq!(
                s.ledger.charges(order).await.unwrap().len(),
                charges_after_retry
            );
            if idempotency {
                assert_eq!(retry, Ok(()), "the first result comes back");
                assert_eq!(s.metrics.duplicate_charges.get(), 0);
            } else {
                assert_eq!(s.metrics.duplicate_charges.get(), 1);
            }
        }
    }

    /// A key that has a charge gets its answer back even when the call's
    /// draw is a decline: an order taken over after its first charge must
    /// not end failed with money taken. Without keys, a decline is a decline.
    #[tokio::test(start_paused = true)]
    async fn a_charged_key_is_answered_with_its_charge_even_when_the_draw_declines() {
        let mut next_id = ids();
        for idempotency in [true, false] {
            let s = sim(
                PaymentUpdate {
                    failure_rate: Some(0.0),
                    idempotency: Some(idempotency),
                    ..Default::default()
                },
                Some(3),
            );
            let token = CancellationToken::new();
            let order = next_id();
            assert_eq!(s.charge(&request(order, 1), &token).await, Ok(()));
            s.update(PaymentUpdate {
                failure_rate: Some(1.0),
                ..Default::default()
            })
            .unwrap();
            let again = s.charge(&request(order, 1), &token).await;
            let fresh = next_id();
            let other = s.charge(&request(fresh, 1), &token).await;
            assert_eq!(other, Err(PaymentError::Declined), "an uncharged key");
            if idempotency {
                assert_eq!(again, Ok(()), "the first answer comes back");
            } else {
                assert_eq!(again, Err(PaymentError::Declined));
            }
            assert_eq!(s.ledger.charges(order).await.unwrap().len(), 1);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn outage_fails_every_call_and_blackhole_hangs() {
        let mut next_id = ids();
        let token = CancellationToken::new();
        let s = sim(
            PaymentUpdate {
                mode: Some(Mode::Outage),
                failure_rate: Some(0.0),
                ..Default::default()
            },
            Some(7),
        );
        for attempt in 1..=20 {
            assert_eq!(
                s.charge(&request(next_id(), attempt), &token).await,
                Err(PaymentError::Outage)
            );
        }
        let s = sim(
            PaymentUpdate {
                mode: Some(Mode::Blackhole),
                ..Default::default()
            },
            Some(7),
        );
        let req = request(next_id(), 1);
        let hung = tokio::time::timeout(Duration::from_secs(3600), s.charge(&req, &token)).await;
        assert!(hung.is_err(), "a blackholed call never answers");
    }

    /// A provider with `slots` slots, every call taking exactly `latency`
    /// and succeeding.
    fn finite(slots: u32, queue_timeout: Duration, latency: Duration) -> Arc<Simulator> {
        Arc::new(
            sim_unshared(
                PaymentUpdate {
                    failure_rate: Some(0.0),
                    latency_min: Some(latency),
                    latency_max: Some(latency),
                    ..Default::default()
                },
                Some(1),
            )
            .with_capacity(Capacity {
                slots,
                queue_timeout,
            }),
        )
    }

    /// Starts a charge in a task of its own, returning when it finished.
    fn start(
        s: &Arc<Simulator>,
        order: OrderId,
    ) -> tokio::task::JoinHandle<(Result<(), PaymentError>, Duration)> {
        let s = s.clone();
        tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            let result = s
                .charge(&request(order, 1), &CancellationToken::new())
                .await;
            (result, start.elapsed())
        })
    }

    #[tokio::test(start_paused = true)]
    async fn calls_beyond_the_capacity_wait_their_turn_so_latency_grows_with_the_excess() {
        let mut next_id = ids();
        let s = finite(2, Duration::from_secs(10), Duration::from_millis(100));
        let calls: Vec<_> = (0..5).map(|_| start(&s, next_id())).collect();
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(s.metrics.in_flight.get(), 2);
        assert_eq!(s.metrics.queued.get(), 3);
        let mut took = Vec::new();
        for call in calls {
            let (result, elapsed) = call.await.unwrap();
            result.unwrap();
            took.push(elapsed.as_millis());
        }
        // Two at a time, in arrival order: 100, 100, 200, 200, 300 ms.
        assert_eq!(took, [100, 100, 200, 200, 300]);
        assert_eq!(s.metrics.in_flight.get(), 0);
        assert_eq!(s.metrics.queued.get(), 0);
        assert_eq!(s.metrics.wasted.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_that_waits_longer_than_the_queue_timeout_fails_as_overloaded() {
        let mut next_id = ids();
        let s = finite(1, Duration::from_millis(250), Duration::from_millis(100));
        let calls: Vec<_> = (0..4).map(|_| start(&s, next_id())).collect();
        let mut outcomes = Vec::new();
        for call in calls {
            let (result, elapsed) = call.await.unwrap();
            outcomes.push((result, elapsed.as_millis()));
        }
        // Slots free at 100 and 200 ms; the fourth call is still waiting at
        // 250 ms and gives up there, having charged nothing.
        assert_eq!(
            outcomes,
            [
                (Ok(()), 100),
                (Ok(()), 200),
                (Ok(()), 300),
                (
                    Err(PaymentError::Overloaded(Duration::from_millis(250))),
                    250
                ),
            ]
        );
        assert_eq!(s.metrics.overloaded.get(), 1);
        assert_eq!(s.metrics.charges.get(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn work_whose_caller_gave_up_still_holds_the_slot_and_is_counted_as_wasted() {
        let mut next_id = ids();
        let s = finite(1, Duration::from_secs(10), Duration::from_millis(500));
        let abandoned = next_id();
        // The caller's own timeout: it leaves after 100 ms.
        let left = tokio::time::timeout(
            Duration::from_millis(100),
            s.charge(&request(abandoned, 1), &CancellationToken::new()),
        )
        .await;
        assert!(left.is_err(), "the caller gave up");
        assert_eq!(s.metrics.in_flight.get(), 1, "the provider is still at it");
        // The next call queues behind the abandoned one.
        let (result, elapsed) = start(&s, next_id()).await.unwrap();
        result.unwrap();
        assert_eq!(elapsed, Duration::from_millis(400 + 500));
        // The abandoned call ran to the end: charged, and wasted.
        assert_eq!(s.metrics.wasted.get(), 1);
        assert_eq!(s.metrics.charges.get(), 2);
        assert_eq!(s.ledger().charges(abandoned).await.unwrap().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_cancels_queued_and_running_calls_at_a_finite_provider() {
        let mut next_id = ids();
        let s = finite(1, Duration::from_secs(10), Duration::from_secs(5));
        let token = CancellationToken::new();
        let calls: Vec<_> = (0..3)
            .map(|_| {
                let s = s.clone();
                let token = token.clone();
                let order = next_id();
                tokio::spawn(async move { s.charge(&request(order, 1), &token).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(10)).await;
        token.cancel();
        for call in calls {
            assert_eq!(call.await.unwrap(), Err(PaymentError::Cancelled));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!((s.metrics.in_flight.get(), s.metrics.queued.get()), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_queued_call_is_served_at_the_latency_of_the_moment_its_slot_frees() {
        let mut next_id = ids();
        let s = finite(1, Duration::from_secs(10), Duration::from_millis(100));
        // A spike: 1 s a call, for half a second.
        s.update(PaymentUpdate {
            mode: Some(Mode::Brownout),
            brownout: Some(settings::BrownoutRequest {
                failure_rate: 0.0,
                latency_min: Duration::from_secs(1),
                latency_max: Duration::from_secs(1),
                duration: Duration::from_millis(500),
            }),
            ..Default::default()
        })
        .unwrap();
        let first = start(&s, next_id());
        let queued = start(&s, next_id());
        let (result, took) = first.await.unwrap();
        result.unwrap();
        assert_eq!(took, Duration::from_secs(1), "served during the spike");
        // The second arrived during the spike but is served after it.
        let (result, took) = queued.await.unwrap();
        result.unwrap();
        assert_eq!(took, Duration::from_millis(1100));
    }
}
