//! Prometheus metrics: one registry, and a narrow handle per area.
//!
//! `Metrics` owns the registry and renders it; each part of the service gets
//! only the handle for its own area (`HttpMetrics`, `WorkerMetrics`,
//! `PaymentCallMetrics`, `ReliabilityMetrics`, `LeaseMetrics`, and the
//! provider's `ProviderMetrics`), so no module reaches into another's series.
//! Handles are cheap clones: prometheus metrics are shared behind an `Arc`.
//!
//! Label values are bounded: `route` is the matched route pattern (or one
//! fixed value for unmatched requests), `method` is one of a fixed set, and
//! every other label takes values from a closed list. Series whose label
//! values are known in advance are created at startup, at 0, so that a
//! dashboard's `rate()` has a series before the first event.

use std::fmt;
use std::time::Duration;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

use super::latency::LatencyHistogram;
use crate::payment::client::ClientMetrics;
use crate::payment::ProviderMetrics;
use crate::reliability::{BreakerObserver, BreakerState, Rejection, RetryObserver};

/// The label value for requests that matched no route.
pub const UNMATCHED_ROUTE: &str = "unmatched";

/// Every state change the breaker can make: the three of its cycle, the
/// failed probe, and an admin's reset from either non-closed state.
pub const BREAKER_TRANSITIONS: [(BreakerState, BreakerState); 5] = [
    (BreakerState::Closed, BreakerState::Open),
    (BreakerState::Open, BreakerState::HalfOpen),
    (BreakerState::HalfOpen, BreakerState::Closed),
    (BreakerState::HalfOpen, BreakerState::Open),
    (BreakerState::Open, BreakerState::Closed),
];

/// The registry, and where every handle comes from.
pub struct Metrics {
    registry: Registry,
    http: HttpMetrics,
    workers: WorkerMetrics,
    payment_calls: PaymentCallMetrics,
    provider: ProviderMetrics,
    payment_client: ClientMetrics,
    reliability: ReliabilityMetrics,
    leases: LeaseMetrics,
    defer: DeferMetrics,
    store: StoreMetrics,
    load: LoadMetrics,
    evictions: IntCounter,
    tokio_workers: IntGauge,
    tokio_alive_tasks: IntGauge,
    tokio_global_queue_depth: IntGauge,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn register<M: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: M) -> M {
    registry
        .register(Box::new(metric.clone()))
        .expect("metric names are unique");
    metric
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(
        registry,
        IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
    )
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    register(registry, IntCounter::new(name, help).expect("valid metric"))
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    register(registry, IntGauge::new(name, help).expect("valid metric"))
}

/// The simulated provider's counters: in the service's registry for the
/// in-process simulator, in its own for `reliability-lab provider`, under
/// the same names.
pub fn provider_metrics(registry: &Registry) -> ProviderMetrics {
    ProviderMetrics {
        calls: counter(
            registry,
            "payment_calls_total",
            "Charge calls the payment provider received (every attempt that reached it; calls per finished order is the retries' amplification).",
        ),
        charges: counter(
            registry,
            "payment_charges_total",
            "Charges the simulated provider made (money moved).",
        ),
        duplicate_charges: counter(
            registry,
            "payment_duplicate_charges_total",
            "Charges made for an order that was already charged.",
        ),
        in_flight: gauge(
            registry,
            "payment_provider_in_flight",
            "Charge calls the provider is serving now (at most PAYMENT_CAPACITY).",
        ),
        queued: gauge(
            registry,
            "payment_provider_queued",
            "Charge calls waiting for a free slot at the provider (PAYMENT_CAPACITY set).",
        ),
        overloaded: counter(
            registry,
            "payment_provider_overloaded_total",
            "Charge calls the provider refused after they waited PAYMENT_QUEUE_TIMEOUT for a slot.",
        ),
        wasted: counter(
            registry,
            "payment_provider_wasted_total",
            "Charge calls the provider finished after their caller had given up (wasted work).",
        ),
    }
}

/// The remote payment client's figures (`PAYMENT_URL`): registered whether
/// or not the client is in use, so every series exists at 0 from startup.
pub(crate) fn client_metrics(registry: &Registry) -> ClientMetrics {
    let connect_errors = counter_vec(
        registry,
        "payment_client_connect_errors_total",
        "Connections to the remote payment provider that could not be made, by kind (refused, timeout, other).",
        &["kind"],
    );
    for kind in ClientMetrics::CONNECT_ERROR_KINDS {
        connect_errors.with_label_values(&[kind]);
    }
    let ambiguous = counter_vec(
        registry,
        "payment_client_ambiguous_total",
        "Attempts whose charge may or may not have been made: the connection failed, or the attempt timed out, after the request went out.",
        &["cause"],
    );
    for cause in ClientMetrics::AMBIGUOUS_CAUSES {
        ambiguous.with_label_values(&[cause]);
    }
    let abandoned = counter_vec(
        registry,
        "payment_client_abandoned_total",
        "Attempts that PAYMENT_TIMEOUT ended, by phase (waiting_for_connection, exchange).",
        &["phase"],
    );
    for phase in ClientMetrics::PHASES {
        abandoned.with_label_values(&[phase]);
    }
    let attempt_seconds = register(
        registry,
        HistogramVec::new(
            HistogramOpts::new(
                "payment_client_attempt_duration_seconds",
                "Charge attempts through the remote payment client, by outcome.",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["outcome"],
        )
        .expect("valid histogram"),
    );
    for outcome in ClientMetrics::OUTCOMES {
        attempt_seconds.with_label_values(&[outcome]);
    }
    ClientMetrics {
        open: gauge(
            registry,
            "payment_client_connections_open",
            "Connections to the remote payment provider open now (busy or idle).",
        ),
        busy: gauge(
            registry,
            "payment_client_connections_busy",
            "Connections to the remote payment provider carrying a charge now (at most PAYMENT_MAX_CONNECTIONS).",
        ),
        waits: counter(
            registry,
            "payment_client_connection_waits_total",
            "Attempts that found every connection busy and waited for one.",
        ),
        wait_seconds: register(
            registry,
            prometheus::Histogram::with_opts(
                HistogramOpts::new(
                    "payment_client_connection_wait_seconds",
                    "How long attempts waited for a free connection.",
                )
                .buckets(vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
            )
            .expect("valid histogram"),
        ),
        connect_errors,
        ambiguous,
        abandoned,
        attempt_seconds,
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let http = HttpMetrics::register(&registry);
        let workers = WorkerMetrics::register(&registry);
        let payment_calls = PaymentCallMetrics {
            failures: counter(
                &registry,
                "payment_failures_total",
                "Charge calls to the payment service that failed.",
            ),
            timeouts: counter(
                &registry,
                "payment_timeouts_total",
                "Charge calls that did not answer within PAYMENT_TIMEOUT.",
            ),
        };
        let provider = provider_metrics(&registry);
        let payment_client = client_metrics(&registry);
        let reliability = ReliabilityMetrics::register(&registry);
        let leases = LeaseMetrics {
            recovered: counter(
                &registry,
                "orders_recovered_total",
                "Orders taken over after their lease expired (their replica died or was stopped hard).",
            ),
        };
        let defer = DeferMetrics {
            released: counter(
                &registry,
                "orders_defer_released_total",
                "Deferred orders put back in the queue (the breaker had closed, or one went through as its probe).",
            ),
            expired: counter(
                &registry,
                "orders_defer_expired_total",
                "Deferred orders failed at their deadline (DEFER_MAX after they were placed).",
            ),
            waiting: gauge(
                &registry,
                "orders_deferred",
                "Orders deferred now: their charge met an open breaker and they wait for it to close (BREAKER_DEFER=on).",
            ),
        };
        let store = StoreMetrics {
            insert_batch_size: register(
                &registry,
                prometheus::Histogram::with_opts(
                    HistogramOpts::new(
                        "store_insert_batch_size",
                        "New orders written per statement (group commit, Postgres).",
                    )
                    .buckets(vec![
                        1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1000.0,
                    ]),
                )
                .expect("valid histogram"),
            ),
            insert_batch_fallbacks: counter(
                &registry,
                "store_insert_batch_fallbacks_total",
                "Batches of new orders that failed on a row and were written one by one.",
            ),
        };
        let load = LoadMetrics::register(&registry);
        let evictions = counter(
            &registry,
            "orders_evicted_total",
            "Finished orders the in-memory store forgot to stay within MEMORY_MAX_ORDERS.",
        );
        let tokio_workers = gauge(
            &registry,
            "tokio_runtime_workers",
            "Worker threads of the tokio runtime.",
        );
        let tokio_alive_tasks = gauge(
            &registry,
            "tokio_runtime_alive_tasks",
            "Tasks alive in the tokio runtime.",
        );
        let tokio_global_queue_depth = gauge(
            &registry,
            "tokio_runtime_global_queue_depth",
            "Tasks waiting in the tokio runtime's global queue.",
        );
        #[cfg(target_os = "linux")]
        {
            // Registered by hand: only the default registry gets it automatically.
            let process = prometheus::process_collector::ProcessCollector::for_self();
            registry.register(Box::new(process)).expect("unique metric");
        }
        Self {
            registry,
            http,
            workers,
            payment_calls,
            provider,
            payment_client,
            reliability,
            leases,
            defer,
            store,
            load,
            evictions,
            tokio_workers,
            tokio_alive_tasks,
            tokio_global_queue_depth,
        }
    }

    /// Requests by route, for the HTTP middleware.
    pub fn http(&self) -> HttpMetrics {
        self.http.clone()
    }

    /// The queue and its workers.
    pub fn workers(&self) -> WorkerMetrics {
        self.workers.clone()
    }

    /// Charge calls as the caller sees them: failures and timeouts.
    pub fn payment_calls(&self) -> PaymentCallMetrics {
        self.payment_calls.clone()
    }

    /// The provider's own counters: charges made, duplicates among them.
    pub fn provider(&self) -> ProviderMetrics {
        self.provider.clone()
    }

    /// The remote payment client's pool and failures.
    pub fn payment_client(&self) -> ClientMetrics {
        self.payment_client.clone()
    }

    /// Retry decisions and the breaker's states and rejections.
    pub fn reliability(&self) -> ReliabilityMetrics {
        self.reliability.clone()
    }

    /// Lease recovery.
    pub fn leases(&self) -> LeaseMetrics {
        self.leases.clone()
    }

    /// Deferred orders: deferrals, releases, deadlines, how many wait.
    pub fn defer(&self) -> DeferMetrics {
        self.defer.clone()
    }

    pub fn store(&self) -> StoreMetrics {
        self.store.clone()
    }

    /// The built-in traffic generator's requests by outcome.
    pub fn load(&self) -> LoadMetrics {
        self.load.clone()
    }

    /// The running totals the lab's timeline samples, read straight from
    /// the counters (no rendering, no parsing).
    pub fn totals(&self) -> Totals {
        let w = &self.workers;
        let r = &self.reliability;
        Totals {
            accepted: w.submitted.get(),
            rejected: w.rejected.get(),
            completed: w.completed.get(),
            failed: w.failed.get(),
            payment_failures: self.payment_calls.failures.get(),
            payment_timeouts: self.payment_calls.timeouts.get(),
            charges: self.provider.charges.get(),
            duplicate_charges: self.provider.duplicate_charges.get(),
            retries: r.retried.get(),
            rejected_open: r.rejected_open.get(),
            rejected_half_open: r.rejected_half_open.get(),
            backoff_seconds: r.backoff_closed.get() + r.backoff_open.get(),
            backoff_open_seconds: r.backoff_open.get(),
            budget_exhausted: r.budget_exhausted.get(),
            throttled: r.throttled.get(),
            limit_rejected: r.limited.get(),
            hedges: r.hedged.get(),
            hedge_wins: r.hedge_wins.get(),
            deferred: w.deferred.get(),
            defer_released: self.defer.released.get(),
            defer_expired: self.defer.expired.get(),
            deferred_now: u64::try_from(self.defer.waiting.get()).unwrap_or(0),
            breaker_opened: [BreakerState::Closed, BreakerState::HalfOpen]
                .iter()
                .map(|from| {
                    r.transitions
                        .with_label_values(&[from.as_str(), BreakerState::Open.as_str()])
                        .get()
                })
                .sum(),
        }
    }

    /// Created-to-finished latency of completed orders (cumulative; readers
    /// take snapshots).
    pub fn completed_latency(&self) -> LatencyHistogram {
        self.workers.completed_latency.clone()
    }

    /// Created-to-finished latency of failed orders: the time to fail.
    pub fn failed_latency(&self) -> LatencyHistogram {
        self.workers.failed_latency.clone()
    }

    /// Orders the in-memory store evicted, for the store to count.
    pub fn evictions(&self) -> IntCounter {
        self.evictions.clone()
    }

    /// Reads the breaker's per-call figures (its count, the failure-rate
    /// window, the policy) at every scrape.
    pub fn watch_breaker(&self, breaker: &crate::reliability::Breaker) {
        self.registry
            .register(Box::new(super::breaker_metrics::BreakerCollector::new(
                breaker.clone(),
            )))
            .expect("the breaker's figures are registered once");
    }

    /// Reads the retry's jitter kind at each scrape.
    pub fn watch_jitter(&self, reliability: &crate::reliability::Reliability) {
        self.registry
            .register(Box::new(super::retry_metrics::JitterCollector::new(
                reliability.clone(),
            )))
            .expect("the jitter kind is registered once");
    }

    /// The concurrency limit and the calls in flight, read at scrape time.
    pub fn watch_limit(&self, reliability: &crate::reliability::Reliability) {
        self.registry
            .register(Box::new(super::retry_metrics::LimitCollector::new(
                reliability.clone(),
            )))
            .expect("the concurrency limit is registered once");
    }

    /// The throttle's probability, read at scrape time.
    pub fn watch_throttle(&self, reliability: &crate::reliability::Reliability) {
        self.registry
            .register(Box::new(super::retry_metrics::ThrottleCollector::new(
                reliability.clone(),
            )))
            .expect("the throttle's probability is registered once");
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Renders the registry in the Prometheus text format, refreshing the
    /// gauges that are read rather than pushed.
    pub fn render(&self) -> Result<String, prometheus::Error> {
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let m = handle.metrics();
            self.tokio_workers.set(m.num_workers() as i64);
            self.tokio_alive_tasks.set(m.num_alive_tasks() as i64);
            self.tokio_global_queue_depth
                .set(m.global_queue_depth() as i64);
        }
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf)?;
        String::from_utf8(buf).map_err(|e| prometheus::Error::Msg(e.to_string()))
    }
}

/// `http_requests_total` and `http_request_duration_seconds`.
#[derive(Clone)]
pub struct HttpMetrics {
    requests: IntCounterVec,
    duration: HistogramVec,
    panics: IntCounter,
}

impl HttpMetrics {
    fn register(registry: &Registry) -> Self {
        let requests = counter_vec(
            registry,
            "http_requests_total",
            "HTTP requests by method, matched route pattern and status code.",
            &["method", "route", "status_code"],
        );
        let duration = register(
            registry,
            HistogramVec::new(
                HistogramOpts::new(
                    "http_request_duration_seconds",
                    "HTTP request latency in seconds, by method, route pattern and status code.",
                ),
                &["method", "route", "status_code"],
            )
            .expect("valid metric"),
        );
        let panics = counter(
            registry,
            "http_handler_panics_total",
            "Requests whose handler panicked (answered 500; the service stayed up).",
        );
        Self {
            requests,
            duration,
            panics,
        }
    }

    /// A handler panicked.
    pub fn panicked(&self) {
        self.panics.inc();
    }

    /// Records one finished request.
    pub fn observe(
        &self,
        method: &str,
        route: &str,
        status: axum::http::StatusCode,
        latency: Duration,
    ) {
        // `as_str` is static text: no number formatting per request.
        let labels = [method, route, status.as_str()];
        self.requests.with_label_values(&labels).inc();
        self.duration
            .with_label_values(&labels)
            .observe(latency.as_secs_f64());
    }
}

/// `worker_jobs_total{status}`, the queue depth and the busy workers.
///
/// The four statuses are resolved once: each is counted for every order, and
/// a label lookup hashes and locks each time.
#[derive(Clone)]
pub struct WorkerMetrics {
    submitted: IntCounter,
    completed: IntCounter,
    failed: IntCounter,
    rejected: IntCounter,
    deferred: IntCounter,
    queue_depth: IntGauge,
    busy: IntGauge,
    completed_latency: LatencyHistogram,
    failed_latency: LatencyHistogram,
}

impl WorkerMetrics {
    fn register(registry: &Registry) -> Self {
        let jobs = counter_vec(
            registry,
            "worker_jobs_total",
            "Jobs by outcome: submitted, completed, failed, rejected (queue full), deferred (the breaker was open; BREAKER_DEFER=on).",
            &["status"],
        );
        Self {
            submitted: jobs.with_label_values(&["submitted"]),
            completed: jobs.with_label_values(&["completed"]),
            failed: jobs.with_label_values(&["failed"]),
            rejected: jobs.with_label_values(&["rejected"]),
            deferred: jobs.with_label_values(&["deferred"]),
            queue_depth: gauge(registry, "worker_queue_depth", "Jobs waiting in the queue."),
            busy: gauge(
                registry,
                "worker_busy_workers",
                "Workers currently processing a job.",
            ),
            completed_latency: LatencyHistogram::new(),
            failed_latency: LatencyHistogram::new(),
        }
    }

    pub fn job_submitted(&self) {
        self.submitted.inc();
    }

    pub fn job_completed(&self) {
        self.completed.inc();
    }

    pub fn job_failed(&self) {
        self.failed.inc();
    }

    pub fn job_rejected(&self) {
        self.rejected.inc();
    }

    /// A job ended with its order deferred (the breaker refused its charge).
    pub fn job_deferred(&self) {
        self.deferred.inc();
    }

    /// An order reached completed this long after it was created.
    pub fn completed_after(&self, latency: Duration) {
        self.completed_latency.record(latency);
    }

    /// An order reached failed this long after it was created.
    pub fn failed_after(&self, latency: Duration) {
        self.failed_latency.record(latency);
    }

    pub fn set_queue_depth(&self, depth: usize) {
        self.queue_depth.set(depth as i64);
    }

    pub fn set_busy(&self, busy: usize) {
        self.busy.set(busy as i64);
    }
}

/// Charge calls as the caller counts them.
#[derive(Clone)]
pub struct PaymentCallMetrics {
    failures: IntCounter,
    timeouts: IntCounter,
}

impl PaymentCallMetrics {
    /// A call that failed (a timeout included).
    pub fn failure(&self) {
        self.failures.inc();
    }

    /// A call that did not answer within its timeout.
    pub fn timeout(&self) {
        self.timeouts.inc();
    }
}

/// Running totals of the counters the lab's timeline turns into rates.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Totals {
    /// Orders put on the queue (new orders; with Postgres, recovered ones too).
    pub accepted: u64,
    /// Orders refused with 503 because the queue was full.
    pub rejected: u64,
    pub completed: u64,
    pub failed: u64,
    pub payment_failures: u64,
    pub payment_timeouts: u64,
    pub charges: u64,
    pub duplicate_charges: u64,
    pub retries: u64,
    pub rejected_open: u64,
    pub rejected_half_open: u64,
    /// Backoff seconds the retry loop slept, all of it and the part that
    /// began with the breaker open.
    pub backoff_seconds: f64,
    pub backoff_open_seconds: f64,
    pub budget_exhausted: u64,
    /// Charge attempts the client-side throttle shed.
    pub throttled: u64,
    /// Charge calls the concurrency limit refused.
    pub limit_rejected: u64,
    /// Hedges started, and hedges that answered first with a success.
    pub hedges: u64,
    pub hedge_wins: u64,
    /// Times an order was deferred (its charge met an open breaker), put
    /// back in the queue, and failed at its deadline; and how many wait now.
    pub deferred: u64,
    pub defer_released: u64,
    pub defer_expired: u64,
    pub deferred_now: u64,
    /// Times the breaker opened (from closed, or after a failed probe).
    pub breaker_opened: u64,
}

/// `load_requests_total{outcome}`: what the built-in traffic generator's
/// requests came to.
#[derive(Clone)]
pub struct LoadMetrics {
    outcomes: IntCounterVec,
    retried_503: IntCounter,
    retried_timeout: IntCounter,
}

/// Every outcome a generated request can have, in the order reports list them.
pub const LOAD_OUTCOMES: [&str; 7] = [
    "accepted",
    "rejected",
    "client_error",
    "server_error",
    "transport_error",
    "skipped",
    "timed_out",
];

impl LoadMetrics {
    fn register(registry: &Registry) -> Self {
        let outcomes = counter_vec(
            registry,
            "load_requests_total",
            "Orders of the built-in traffic generator by what came of them (after the clients' retries): accepted (2xx), rejected (503), client_error (other 4xx), server_error (other 5xx), transport_error (the connection failed), skipped (too many in flight), timed_out (no answer within the client's timeout).",
            &["outcome"],
        );
        for outcome in LOAD_OUTCOMES {
            outcomes.with_label_values(&[outcome]);
        }
        let retries = counter_vec(
            registry,
            "load_client_retries_total",
            "Requests the traffic generator's clients sent again, by reason: 503 (the service refused), timeout (the client gave up waiting).",
            &["reason"],
        );
        Self {
            outcomes,
            retried_503: retries.with_label_values(&["503"]),
            retried_timeout: retries.with_label_values(&["timeout"]),
        }
    }

    /// Counts one client retry, after a timeout or after a 503.
    pub fn count_retry(&self, after_timeout: bool) {
        if after_timeout {
            self.retried_timeout.inc();
        } else {
            self.retried_503.inc();
        }
    }

    /// Counts one request; `outcome` is one of `LOAD_OUTCOMES`.
    pub fn count(&self, outcome: &'static str) {
        debug_assert!(LOAD_OUTCOMES.contains(&outcome));
        self.outcomes.with_label_values(&[outcome]).inc();
    }
}

/// The Postgres store's group commit of new orders.
#[derive(Clone)]
pub struct StoreMetrics {
    insert_batch_size: prometheus::Histogram,
    insert_batch_fallbacks: IntCounter,
}

impl StoreMetrics {
    /// Metrics registered nowhere (stores built without a service).
    pub fn unregistered() -> Self {
        Self {
            insert_batch_size: prometheus::Histogram::with_opts(HistogramOpts::new("b", "b"))
                .expect("valid histogram"),
            insert_batch_fallbacks: IntCounter::new("f", "f").expect("valid counter"),
        }
    }

    pub fn batch(&self, rows: usize) {
        self.insert_batch_size.observe(rows as f64);
    }

    pub fn fallback(&self) {
        self.insert_batch_fallbacks.inc();
    }

    /// Statements written and the rows in them.
    pub fn batches(&self) -> (u64, u64) {
        (
            self.insert_batch_size.get_sample_count(),
            self.insert_batch_size.get_sample_sum() as u64,
        )
    }

    pub fn fallbacks(&self) -> u64 {
        self.insert_batch_fallbacks.get()
    }
}

/// Deferred orders (`BREAKER_DEFER`): the deferral loop's counters and the
/// gauge of orders waiting.
#[derive(Clone)]
pub struct DeferMetrics {
    released: IntCounter,
    expired: IntCounter,
    waiting: IntGauge,
}

impl DeferMetrics {
    pub fn released(&self, orders: usize) {
        self.released.inc_by(orders as u64);
    }

    pub fn expired(&self) {
        self.expired.inc();
    }

    pub fn set_waiting(&self, orders: u64) {
        self.waiting.set(i64::try_from(orders).unwrap_or(i64::MAX));
    }
}

/// Orders taken over from expired leases.
#[derive(Clone)]
pub struct LeaseMetrics {
    recovered: IntCounter,
}

impl LeaseMetrics {
    pub fn recovered(&self, orders: usize) {
        self.recovered.inc_by(orders as u64);
    }
}

/// Retry decisions, breaker state changes, the state gauge and rejections.
/// It is the retry loop's and the breaker's observer: their counters are
/// incremented where the events happen.
#[derive(Clone)]
pub struct ReliabilityMetrics {
    retried: IntCounter,
    permanent_failure: IntCounter,
    backoff_closed: prometheus::Counter,
    backoff_open: prometheus::Counter,
    budget_exhausted: IntCounter,
    throttled: IntCounter,
    hedged: IntCounter,
    hedge_wins: IntCounter,
    hedges_refused: IntCounter,
    limited: IntCounter,
    transitions: IntCounterVec,
    state: IntGauge,
    rejected_open: IntCounter,
    rejected_half_open: IntCounter,
}

impl ReliabilityMetrics {
    pub(crate) fn register(registry: &Registry) -> Self {
        let retries = counter_vec(
            registry,
            "retry_attempts_total",
            "Retry decisions: retried (another attempt follows), permanent_failure (the breaker refused; the loop ended).",
            &["result"],
        );
        let transitions = counter_vec(
            registry,
            "circuit_breaker_state_changes_total",
            "Circuit breaker state changes, by from and to state.",
            &["from", "to"],
        );
        for (from, to) in BREAKER_TRANSITIONS {
            transitions.with_label_values(&[from.as_str(), to.as_str()]);
        }
        let rejections = counter_vec(
            registry,
            "circuit_breaker_rejections_total",
            "Calls the breaker refused, by kind: open, half_open (probe in flight).",
            &["kind"],
        );
        let backoff = register(
            registry,
            prometheus::CounterVec::new(
                Opts::new(
                    "retry_backoff_seconds_total",
                    "Seconds of backoff the retry loop started sleeping, by the breaker's state when the wait began: closed, or open (open or half-open: the wait is spent against a breaker that cannot let the next attempt through).",
                ),
                &["breaker"],
            )
            .expect("valid metric"),
        );
        Self {
            retried: retries.with_label_values(&["retried"]),
            permanent_failure: retries.with_label_values(&["permanent_failure"]),
            backoff_closed: backoff.with_label_values(&["closed"]),
            backoff_open: backoff.with_label_values(&["open"]),
            budget_exhausted: counter(
                registry,
                "retry_budget_exhausted_total",
                "Retries the retry budget refused (the order's loop ended there).",
            ),
            limited: counter(
                registry,
                "concurrency_limit_rejected_total",
                "Charge calls the concurrency limit (CONCURRENCY_LIMIT) refused: not sent, the order's loop ended there.",
            ),
            hedged: counter(
                registry,
                "hedged_attempts_total",
                "Hedges started: a second charge call beside one slower than HEDGE_DELAY (HEDGE).",
            ),
            hedge_wins: counter(
                registry,
                "hedge_wins_total",
                "Hedges that answered first with a success (the slow call they stood beside was cancelled).",
            ),
            hedges_refused: counter(
                registry,
                "hedges_refused_total",
                "Hedges that were due but the retry budget (or client-side throttling) refused.",
            ),
            throttled: counter(
                registry,
                "client_throttled_total",
                "Charge attempts client-side throttling (THROTTLE) shed before they were sent (the order's loop ended there).",
            ),
            transitions,
            state: gauge(
                registry,
                "circuit_breaker_state",
                "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
            ),
            rejected_open: rejections.with_label_values(&[Rejection::Open.label()]),
            rejected_half_open: rejections.with_label_values(&[Rejection::HalfOpenBusy.label()]),
        }
    }
}

/// The retry loop's notify callback: log the error and the coming wait, and
/// count it where it happens.
impl RetryObserver for ReliabilityMetrics {
    fn retrying(&self, error: &dyn fmt::Display, wait: Duration) {
        tracing::warn!(error = %error, wait_ms = wait.as_millis() as u64, "retrying payment");
        self.retried.inc();
    }

    fn gave_up_on_rejection(&self, rejection: Rejection) {
        tracing::warn!(reason = %rejection, "payment not attempted: circuit breaker refused; no more retries");
        self.permanent_failure.inc();
    }

    fn backoff(&self, wait: Duration, breaker_open: bool) {
        let counter = if breaker_open {
            &self.backoff_open
        } else {
            &self.backoff_closed
        };
        counter.inc_by(wait.as_secs_f64());
    }

    fn budget_exhausted(&self) {
        tracing::warn!("retry refused: the retry budget is spent; no more retries");
        self.budget_exhausted.inc();
    }

    fn throttled(&self) {
        tracing::warn!("payment not attempted: shed by client-side throttling; no more retries");
        self.throttled.inc();
    }

    fn hedged(&self) {
        tracing::debug!("a charge call is slow: a hedge starts beside it");
        self.hedged.inc();
    }

    fn hedge_won(&self) {
        self.hedge_wins.inc();
    }

    fn limited(&self) {
        tracing::debug!("payment not attempted: the concurrency limit is reached");
        self.limited.inc();
    }

    fn hedge_refused(&self) {
        tracing::debug!("a hedge was due and the retry budget refused it");
        self.hedges_refused.inc();
    }
}

impl BreakerObserver for ReliabilityMetrics {
    fn state_changed(&self, from: BreakerState, to: BreakerState) {
        tracing::warn!(from = %from, to = %to, "circuit breaker state changed");
        self.transitions
            .with_label_values(&[from.as_str(), to.as_str()])
            .inc();
        self.state.set(to.gauge_value());
    }

    fn rejected(&self, kind: Rejection) {
        match kind {
            Rejection::Open => self.rejected_open.inc(),
            Rejection::HalfOpenBusy => self.rejected_half_open.inc(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(text: &str, name: &str) -> Vec<String> {
        text.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn known_label_values_exist_at_zero_from_the_start() {
        let text = Metrics::new().render().unwrap();
        let transitions = series(&text, "circuit_breaker_state_changes_total{");
        assert_eq!(transitions.len(), BREAKER_TRANSITIONS.len(), "{text}");
        for (from, to) in BREAKER_TRANSITIONS {
            let line =
                format!("circuit_breaker_state_changes_total{{from=\"{from}\",to=\"{to}\"}} 0");
            assert!(
                transitions.contains(&line),
                "{line} missing from {transitions:?}"
            );
        }
        for line in [
            "circuit_breaker_rejections_total{kind=\"open\"} 0",
            "circuit_breaker_rejections_total{kind=\"half_open\"} 0",
            "retry_attempts_total{result=\"retried\"} 0",
            "retry_attempts_total{result=\"permanent_failure\"} 0",
            "retry_backoff_seconds_total{breaker=\"closed\"} 0",
            "retry_backoff_seconds_total{breaker=\"open\"} 0",
            "retry_budget_exhausted_total 0",
            "worker_jobs_total{status=\"submitted\"} 0",
            "worker_jobs_total{status=\"completed\"} 0",
            "worker_jobs_total{status=\"failed\"} 0",
            "worker_jobs_total{status=\"rejected\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing");
        }
    }

    #[test]
    fn each_handle_counts_into_its_own_series() {
        let metrics = Metrics::new();
        let workers = metrics.workers();
        workers.job_completed();
        workers.job_completed();
        workers.job_failed();
        let reliability = metrics.reliability();
        reliability.rejected(Rejection::HalfOpenBusy);
        reliability.state_changed(BreakerState::HalfOpen, BreakerState::Open);
        metrics.payment_calls().timeout();
        metrics.leases().recovered(3);
        let text = metrics.render().unwrap();
        for line in [
            "worker_jobs_total{status=\"completed\"} 2",
            "worker_jobs_total{status=\"failed\"} 1",
            "circuit_breaker_rejections_total{kind=\"half_open\"} 1",
            "circuit_breaker_rejections_total{kind=\"open\"} 0",
            "circuit_breaker_state_changes_total{from=\"half_open\",to=\"open\"} 1",
            "circuit_breaker_state 2",
            "payment_timeouts_total 1",
            "payment_failures_total 0",
            "orders_recovered_total 3",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from\n{text}"
            );
        }
    }
}
