//! Prometheus metrics, in one registry owned by the application state.
//!
//! Label values are bounded: `route` is the matched route pattern (or one
//! fixed value for unmatched requests), `method` is one of a fixed set, and
//! every other label takes values from a closed list.

use std::fmt;
use std::time::Duration;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

use crate::reliability::{BreakerObserver, BreakerState, Rejection, RetryObserver};

/// The label value for requests that matched no route.
pub const UNMATCHED_ROUTE: &str = "unmatched";

/// Every metric the service exports.
pub struct Metrics {
    registry: Registry,
    pub http_requests_total: IntCounterVec,
    pub http_request_duration_seconds: HistogramVec,
    pub worker_jobs_total: IntCounterVec,
    /// `worker_jobs_total` by status, resolved once: these are counted for
    /// every order, and a label lookup hashes and locks each time.
    pub jobs_submitted: IntCounter,
    pub jobs_completed: IntCounter,
    pub jobs_failed: IntCounter,
    pub jobs_rejected: IntCounter,
    pub worker_queue_depth: IntGauge,
    pub payment_failures_total: IntCounter,
    pub payment_timeouts_total: IntCounter,
    pub payment_charges_total: IntCounter,
    pub payment_duplicate_charges_total: IntCounter,
    pub retry_attempts_total: IntCounterVec,
    pub circuit_breaker_state_changes_total: IntCounterVec,
    pub circuit_breaker_state: IntGauge,
    pub circuit_breaker_rejections_total: IntCounterVec,
    pub workers_busy: IntGauge,
    pub orders_recovered_total: IntCounter,
    tokio_workers: IntGauge,
    tokio_alive_tasks: IntGauge,
    tokio_global_queue_depth: IntGauge,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
    metric
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let metric = IntCounter::new(name, help).expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
    metric
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let metric = IntGauge::new(name, help).expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
    metric
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let http_requests_total = counter_vec(
            &registry,
            "http_requests_total",
            "HTTP requests by method, matched route pattern and status code.",
            &["method", "route", "status_code"],
        );
        let http_request_duration_seconds = HistogramVec::new(
            HistogramOpts::new(
                "http_request_duration_seconds",
                "HTTP request latency in seconds, by method, route pattern and status code.",
            ),
            &["method", "route", "status_code"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(http_request_duration_seconds.clone()))
            .expect("unique metric");
        let worker_jobs_total = counter_vec(
            &registry,
            "worker_jobs_total",
            "Jobs by outcome: submitted, completed, failed, rejected (queue full).",
            &["status"],
        );
        let jobs_submitted = worker_jobs_total.with_label_values(&["submitted"]);
        let jobs_completed = worker_jobs_total.with_label_values(&["completed"]);
        let jobs_failed = worker_jobs_total.with_label_values(&["failed"]);
        let jobs_rejected = worker_jobs_total.with_label_values(&["rejected"]);
        let worker_queue_depth = gauge(
            &registry,
            "worker_queue_depth",
            "Jobs waiting in the queue.",
        );
        let payment_failures_total = counter(
            &registry,
            "payment_failures_total",
            "Charge calls to the payment service that failed.",
        );
        let payment_timeouts_total = counter(
            &registry,
            "payment_timeouts_total",
            "Charge calls that did not answer within PAYMENT_TIMEOUT.",
        );
        let payment_charges_total = counter(
            &registry,
            "payment_charges_total",
            "Charges the simulated provider made (money moved).",
        );
        let payment_duplicate_charges_total = counter(
            &registry,
            "payment_duplicate_charges_total",
            "Charges made for an order that was already charged.",
        );
        let retry_attempts_total = counter_vec(
            &registry,
            "retry_attempts_total",
            "Retry decisions: retried (another attempt follows), permanent_failure (the breaker refused; the loop ended).",
            &["result"],
        );
        for result in ["retried", "permanent_failure"] {
            retry_attempts_total.with_label_values(&[result]);
        }
        let circuit_breaker_state_changes_total = counter_vec(
            &registry,
            "circuit_breaker_state_changes_total",
            "Circuit breaker state changes, by from and to state.",
            &["from", "to"],
        );
        let circuit_breaker_state = gauge(
            &registry,
            "circuit_breaker_state",
            "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
        );
        let circuit_breaker_rejections_total = counter_vec(
            &registry,
            "circuit_breaker_rejections_total",
            "Calls the breaker refused, by kind: open, half_open (probe in flight).",
            &["kind"],
        );
        for kind in ["open", "half_open"] {
            circuit_breaker_rejections_total.with_label_values(&[kind]);
        }
        let workers_busy = gauge(
            &registry,
            "worker_busy_workers",
            "Workers currently processing a job.",
        );
        let orders_recovered_total = counter(
            &registry,
            "orders_recovered_total",
            "Orders taken over after their lease expired (their replica died or was stopped hard).",
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
            http_requests_total,
            http_request_duration_seconds,
            worker_jobs_total,
            jobs_submitted,
            jobs_completed,
            jobs_failed,
            jobs_rejected,
            worker_queue_depth,
            payment_failures_total,
            payment_timeouts_total,
            payment_charges_total,
            payment_duplicate_charges_total,
            retry_attempts_total,
            circuit_breaker_state_changes_total,
            circuit_breaker_state,
            circuit_breaker_rejections_total,
            workers_busy,
            orders_recovered_total,
            tokio_workers,
            tokio_alive_tasks,
            tokio_global_queue_depth,
        }
    }

    /// The provider-side counters the payment simulator increments.
    pub fn provider(&self) -> crate::payment::ProviderMetrics {
        crate::payment::ProviderMetrics {
            charges: self.payment_charges_total.clone(),
            duplicate_charges: self.payment_duplicate_charges_total.clone(),
        }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Records one finished HTTP request.
    pub fn observe_request(
        &self,
        method: &str,
        route: &str,
        status: axum::http::StatusCode,
        latency: Duration,
    ) {
        // `as_str` is static text: no number formatting per request.
        let labels = [method, route, status.as_str()];
        self.http_requests_total.with_label_values(&labels).inc();
        self.http_request_duration_seconds
            .with_label_values(&labels)
            .observe(latency.as_secs_f64());
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

/// The retry loop's notify callback: log the error and the coming wait, and
/// count it where it happens.
impl RetryObserver for Metrics {
    fn retrying(&self, error: &dyn fmt::Display, wait: Duration) {
        tracing::warn!(error = %error, wait_ms = wait.as_millis() as u64, "retrying payment");
        self.retry_attempts_total
            .with_label_values(&["retried"])
            .inc();
    }

    fn gave_up_on_rejection(&self, rejection: Rejection) {
        tracing::warn!(reason = %rejection, "payment not attempted: circuit breaker refused; no more retries");
        self.retry_attempts_total
            .with_label_values(&["permanent_failure"])
            .inc();
    }
}

impl BreakerObserver for Metrics {
    fn state_changed(&self, from: BreakerState, to: BreakerState) {
        tracing::warn!(from = %from, to = %to, "circuit breaker state changed");
        self.circuit_breaker_state_changes_total
            .with_label_values(&[from.as_str(), to.as_str()])
            .inc();
        self.circuit_breaker_state.set(to.gauge_value());
    }

    fn rejected(&self, kind: Rejection) {
        self.circuit_breaker_rejections_total
            .with_label_values(&[kind.label()])
            .inc();
    }
}
