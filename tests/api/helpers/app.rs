//! The in-process lab: a service built by `App`, exactly as the binary
//! builds it, with test-friendly defaults.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use reliability_lab::app::{App, Stores};
use reliability_lab::config::Config;
use reliability_lab::observability::Metrics;
use reliability_lab::orders::{Order, OrderId, OrderRepository, Service};
use reliability_lab::payment::{Capacity, MemoryLedger, Mode, PaymentSettings, Simulator};
use reliability_lab::reliability::{Breaker, BreakerConfig, Reliability, RetryPolicy};
use reliability_lab::workers::Dispatcher;

use super::http::{post_json, send};

pub struct LabOptions {
    pub workers: usize,
    pub capacity: usize,
    pub payment: PaymentSettings,
    pub seed: u64,
    pub retry: RetryPolicy,
    pub breaker: BreakerConfig,
    /// Orders in this store (the ledger stays in memory).
    pub repo: Option<Arc<dyn OrderRepository>>,
    pub start_workers: bool,
    pub payment_timeout: Duration,
    pub admin_token: Option<&'static str>,
    pub shutdown_timeout: Duration,
    pub memory_max_orders: usize,
    /// The provider's capacity (PAYMENT_CAPACITY); None: unlimited.
    pub provider_capacity: Option<Capacity>,
    /// Deferred retry (BREAKER_DEFER with DEFER_MAX and DEFER_RATE); None: off.
    pub defer: Option<reliability_lab::workers::DeferSettings>,
    /// JOB_LEASE and RECOVERY_INTERVAL (for a durable `repo`).
    pub job_lease: Duration,
    pub recovery_interval: Duration,
    /// PAYMENT_URL and PAYMENT_MAX_CONNECTIONS: charge a provider across the network.
    pub payment_url: Option<String>,
    pub payment_max_connections: u32,
    /// PAYMENT_ADMIN_TOKEN: the remote provider's ADMIN_TOKEN.
    pub payment_admin_token: Option<&'static str>,
    /// HEDGE_DELAY (hedging itself is a switch, off by default).
    pub hedge_delay: Option<reliability_lab::reliability::HedgeDelay>,
}

impl Default for LabOptions {
    /// Payments that always succeed at once; retry without jitter, so waits
    /// are exact on the paused clock.
    fn default() -> Self {
        Self {
            workers: 1,
            capacity: 100,
            payment: PaymentSettings {
                failure_rate: 0.0,
                latency_min: Duration::ZERO,
                latency_max: Duration::ZERO,
                ..PaymentSettings::default()
            },
            seed: 42,
            retry: RetryPolicy {
                randomization_factor: 0.0,
                ..RetryPolicy::default()
            },
            breaker: BreakerConfig::default(),
            repo: None,
            start_workers: true,
            payment_timeout: Duration::from_secs(1),
            admin_token: None,
            shutdown_timeout: Duration::from_secs(30),
            memory_max_orders: 250_000,
            provider_capacity: None,
            defer: None,
            job_lease: Config::defaults().job_lease,
            recovery_interval: Config::defaults().recovery_interval,
            payment_url: None,
            payment_max_connections: Config::defaults().payment_max_connections,
            payment_admin_token: None,
            hedge_delay: None,
        }
    }
}

impl LabOptions {
    /// The configuration these options stand for: the documented defaults,
    /// never the test process's environment, on a free loopback port.
    pub fn config(&self) -> Config {
        let mut c = Config::defaults();
        c.listen_addr = "127.0.0.1:0".parse().unwrap();
        c.worker_count = self.workers;
        c.queue_capacity = self.capacity;
        let p = &self.payment;
        assert!(
            p.mode == Mode::Normal && p.brownout.is_none(),
            "start a lab in normal mode; change the mode through the admin API"
        );
        c.simulator.payment_failure_rate = p.failure_rate;
        c.simulator.payment_latency_min = p.latency_min;
        c.simulator.payment_latency_max = p.latency_max;
        c.simulator.payment_ambiguous_rate = p.ambiguous_rate;
        c.simulator.payment_idempotency = p.idempotency;
        c.simulator.payment_seed = Some(self.seed);
        assert_eq!(
            self.retry.multiplier,
            RetryPolicy::default().multiplier,
            "the multiplier is not configurable"
        );
        c.retry_max_attempts = self.retry.max_attempts;
        c.retry_initial_interval = self.retry.initial_interval;
        c.retry_max_interval = self.retry.max_interval;
        c.retry_jitter = self.retry.randomization_factor;
        c.breaker_failure_threshold = self.breaker.failure_threshold;
        c.breaker_open_duration = self.breaker.open_duration;
        c.breaker_half_open_probes = self.breaker.half_open_probes;
        c.breaker_slow_call_duration = self.breaker.slow_call;
        if let reliability_lab::reliability::BreakerPolicy::FailureRate {
            rate,
            window,
            min_calls,
        } = self.breaker.policy
        {
            c.breaker_policy = "failure_rate".into();
            c.breaker_failure_rate = rate;
            c.breaker_window = window;
            c.breaker_min_calls = min_calls;
        }
        c.simulator.payment_capacity = self.provider_capacity.map(|p| p.slots);
        if let Some(p) = self.provider_capacity {
            c.simulator.payment_queue_timeout = p.queue_timeout;
        }
        c.payment_timeout = self.payment_timeout;
        c.admin_token = self.admin_token.map(str::to_owned);
        c.shutdown_timeout = self.shutdown_timeout;
        c.memory_max_orders = self.memory_max_orders;
        c.job_lease = self.job_lease;
        c.recovery_interval = self.recovery_interval;
        c.payment_url = self.payment_url.clone();
        c.payment_max_connections = self.payment_max_connections;
        c.payment_admin_token = self.payment_admin_token.map(str::to_owned);
        if let Some(delay) = self.hedge_delay {
            c.hedge_delay = delay;
        }
        if let Some(defer) = self.defer {
            c.breaker_defer = true;
            c.defer_max = defer.max;
            c.defer_rate = defer.rate;
        }
        c
    }
}

pub struct Lab {
    pub app: App,
    pub router: reliability_lab::http::Api,
    pub service: Service,
    pub dispatcher: Arc<Dispatcher>,
    pub payment: Arc<Simulator>,
    pub breaker: Breaker,
    pub reliability: Reliability,
    pub metrics: Arc<Metrics>,
}

impl Lab {
    pub async fn new(options: LabOptions) -> Self {
        let mut builder = App::builder(options.config());
        if let Some(repo) = options.repo.clone() {
            builder = builder.stores(Stores {
                orders: repo,
                ledger: Arc::new(MemoryLedger::default()),
            });
        }
        if !options.start_workers {
            builder = builder.hold_workers();
        }
        let app = builder.build().await.expect("the lab builds");
        let handles = app.handles().clone();
        Self {
            router: app.router(),
            service: handles.service,
            dispatcher: handles.dispatcher,
            payment: handles.payment,
            breaker: handles.reliability.breaker().clone(),
            reliability: handles.reliability,
            metrics: handles.metrics,
            app,
        }
    }

    /// Starts the workers of a lab built with `start_workers: false`.
    pub fn start_workers(&self) {
        self.app.start_workers();
    }

    pub async fn post_order(&self) -> Order {
        let (status, _, body) = send(
            &self.router,
            post_json(
                "/orders",
                r#"{"customer_id":"cust-42","amount":1999,"currency":"USD"}"#,
            ),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let id: OrderId = body["id"].as_str().unwrap().parse().unwrap();
        self.service.get_order(id).await.unwrap()
    }

    /// Waits (on whatever clock the test runs) until the order is terminal.
    pub async fn settle(&self, id: OrderId) -> Order {
        for _ in 0..100_000 {
            let order = self.service.get_order(id).await.unwrap();
            if order.status.is_terminal() {
                return order;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("order {id} never settled");
    }
}

/// A valid pending order, not yet stored.
pub fn new_order() -> Order {
    use reliability_lab::orders::{Amount, Currency, CustomerId, NewOrder};
    Order::new(
        OrderId::new_random(),
        NewOrder {
            customer_id: CustomerId::parse("cust-42").unwrap(),
            amount: Amount::parse(1999).unwrap(),
            currency: Currency::parse("usd").unwrap(),
        },
        chrono::Utc::now(),
    )
}
