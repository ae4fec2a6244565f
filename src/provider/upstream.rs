//! A provider in the middle of a chain (`--upstream URL`): it charges by
//! calling another provider, through its own retry and breaker, so a chain
//! service → provider → downstream shows how retries multiply across tiers
//! (three attempts at two tiers: up to nine calls at the bottom for one
//! order) and what stops that (retry at one tier only, a budget at each, a
//! breaker).
//!
//! What a tier in the middle does with a charge call:
//! - a key it has already charged is answered with its charge, without a
//!   call down (the tier is idempotent on its own, as a payment gateway is);
//! - otherwise it calls the downstream's `POST /charges` under the same key,
//!   each attempt bounded by `UPSTREAM_TIMEOUT`, retried and broken as the
//!   service's own calls are (`reliability`), and records the charge once
//!   the downstream has made it;
//! - what it could not get through is answered so that its own caller can
//!   classify it: a drawn failure, an ambiguous answer or a timeout below is
//!   a 502 (retryable), a busy downstream a 503 with its `Retry-After`, its
//!   own open breaker a 503 without one.
//!
//! Its own simulator's draws (failure rate, latency, modes) are not used
//! for charges: the tier forwards, and failures come from below it and
//! from the network faults staged at its own socket.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus::Registry;
use tokio_util::sync::CancellationToken;

use crate::config::{
    breaker_count, budget_floor, budget_window, payment_max_connections, positive_duration, rate,
    retry_max_attempts,
};
use crate::observability::metrics::{client_metrics, ReliabilityMetrics};
use crate::payment::client::{ClientSettings, HttpPayments};
use crate::payment::{ChargeRequest, PaymentError};
use crate::reliability::{
    Breaker, BreakerConfig, BudgetConfig, CallError, Reliability, RetryPolicy, Switches,
};
use crate::units::{parse_duration, parse_switch};

/// How a tier in the middle reaches and treats its downstream.
#[derive(Debug, Clone, clap::Args)]
pub struct UpstreamArgs {
    /// The downstream provider this one charges through (http://host:port); unset, this provider charges itself.
    #[arg(long = "upstream", env = "UPSTREAM_URL")]
    pub upstream_url: Option<String>,

    /// Longest wait for one call to the downstream: the wait for a connection and the whole exchange.
    #[arg(long, env = "UPSTREAM_TIMEOUT", default_value = "1s", value_parser = positive_duration)]
    pub upstream_timeout: Duration,

    /// Connections to the downstream open at once, at most (1 to 10000).
    #[arg(long, env = "UPSTREAM_MAX_CONNECTIONS", default_value = "32", value_parser = payment_max_connections)]
    pub upstream_max_connections: u32,

    /// Calls to the downstream per charge call, the first included (1: no retry at this tier).
    #[arg(long, env = "UPSTREAM_RETRY_MAX_ATTEMPTS", default_value = "3", value_parser = retry_max_attempts)]
    pub upstream_retry_max_attempts: u32,

    /// This tier's first wait before calling the downstream again.
    #[arg(long, env = "UPSTREAM_RETRY_INITIAL_INTERVAL", default_value = "200ms", value_parser = parse_duration)]
    pub upstream_retry_initial_interval: Duration,

    /// This tier's longest wait between calls to the downstream.
    #[arg(long, env = "UPSTREAM_RETRY_MAX_INTERVAL", default_value = "2s", value_parser = parse_duration)]
    pub upstream_retry_max_interval: Duration,

    /// Whether this tier's calls go through its own circuit breaker.
    #[arg(long, env = "UPSTREAM_BREAKER_ENABLED", default_value = "true", value_parser = parse_switch, action = clap::ArgAction::Set)]
    pub upstream_breaker_enabled: bool,

    /// Consecutive failed calls to the downstream that open this tier's breaker.
    #[arg(long, env = "UPSTREAM_BREAKER_FAILURE_THRESHOLD", default_value = "5", value_parser = breaker_count)]
    pub upstream_breaker_failure_threshold: u32,

    /// How long this tier's breaker stays open.
    #[arg(long, env = "UPSTREAM_BREAKER_OPEN_DURATION", default_value = "30s", value_parser = positive_duration)]
    pub upstream_breaker_open_duration: Duration,

    /// Whether this tier retries only within a retry budget.
    #[arg(long, env = "UPSTREAM_RETRY_BUDGET", default_value = "off", value_parser = parse_switch, action = clap::ArgAction::Set)]
    pub upstream_retry_budget: bool,

    /// This tier's budget: retries allowed per first call, from 0 to 1.
    #[arg(long, env = "UPSTREAM_RETRY_BUDGET_RATIO", default_value = "0.2", value_parser = rate)]
    pub upstream_retry_budget_ratio: f64,

    /// This tier's budget: retries a second allowed whatever the ratio says.
    #[arg(long, env = "UPSTREAM_RETRY_BUDGET_MIN_PER_SECOND", default_value = "1", value_parser = budget_floor)]
    pub upstream_retry_budget_min_per_second: f64,

    /// This tier's budget's window (whole seconds).
    #[arg(long, env = "UPSTREAM_RETRY_BUDGET_WINDOW", default_value = "10s", value_parser = budget_window)]
    pub upstream_retry_budget_window: Duration,
}

impl UpstreamArgs {
    /// Checks that hold between these knobs: one line naming the knob.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(url) = &self.upstream_url {
            crate::payment::client::charges_uri(url)
                .map_err(|e| e.replace("PAYMENT_URL", "UPSTREAM_URL"))?;
        }
        if self.upstream_retry_initial_interval > self.upstream_retry_max_interval {
            return Err(format!(
                "invalid UPSTREAM_RETRY_INITIAL_INTERVAL: {} is above UPSTREAM_RETRY_MAX_INTERVAL {}; expected initial <= max",
                humantime::format_duration(self.upstream_retry_initial_interval),
                humantime::format_duration(self.upstream_retry_max_interval)
            ));
        }
        Ok(())
    }

    fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.upstream_retry_max_attempts,
            initial_interval: self.upstream_retry_initial_interval,
            max_interval: self.upstream_retry_max_interval,
            ..RetryPolicy::default()
        }
    }

    fn switches(&self) -> Switches {
        Switches {
            breaker_enabled: self.upstream_breaker_enabled,
            retry_budget_enabled: self.upstream_retry_budget,
            ..Switches::default()
        }
    }
}

/// Why a charge could not be made below.
#[derive(Debug)]
pub(crate) enum Unserved {
    /// This tier's breaker refused: the downstream was not called.
    Open(String),
    /// The downstream asked to be left alone (its 429 or 503).
    Busy(Option<Duration>),
    /// Anything else: a failure, an ambiguous answer or a timeout below.
    Failed(String),
}

/// The downstream, reached through this tier's retry and breaker.
pub(crate) struct Upstream {
    client: HttpPayments,
    reliability: Reliability,
    timeout: Duration,
    url: String,
}

impl Upstream {
    /// A client for `args.upstream_url` whose figures go to `registry`
    /// under the names the service gives its own (`payment_client_*`,
    /// `retry_attempts_total`, `circuit_breaker_*`). None without a URL.
    pub fn new(args: &UpstreamArgs, registry: &Registry) -> Result<Option<Self>, String> {
        let Some(url) = &args.upstream_url else {
            return Ok(None);
        };
        let settings = ClientSettings {
            url: url.clone(),
            max_connections: args.upstream_max_connections,
            connect_timeout: args.upstream_timeout,
            idle_timeout: Duration::from_secs(30),
            honour_retry_after: true,
            admin_token: None,
        };
        let client = HttpPayments::new(&settings, client_metrics(registry))
            .map_err(|e| e.replace("PAYMENT_URL", "UPSTREAM_URL"))?;
        let observer = ReliabilityMetrics::register(registry);
        let breaker = Breaker::new(
            BreakerConfig {
                failure_threshold: args.upstream_breaker_failure_threshold,
                open_duration: args.upstream_breaker_open_duration,
                ..BreakerConfig::default()
            },
            Some(Arc::new(observer.clone())),
        );
        let reliability = Reliability::new(args.retry_policy(), breaker, Arc::new(observer))
            .with_budget(BudgetConfig {
                ratio: args.upstream_retry_budget_ratio,
                min_per_second: args.upstream_retry_budget_min_per_second,
                window: args.upstream_retry_budget_window,
            });
        reliability.set_switches(args.switches());
        Ok(Some(Self {
            url: client.url().to_owned(),
            client,
            reliability,
            timeout: args.upstream_timeout,
        }))
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Charges below under the request's key: attempts numbered from the
    /// caller's attempt times the most this tier makes, so the bottom's
    /// seeded draws differ between every call that reaches it.
    pub async fn charge(
        &self,
        request: &ChargeRequest,
        cancel: &CancellationToken,
    ) -> Result<(), Unserved> {
        let made = AtomicU32::new(0);
        // The most calls one charge call makes below.
        let per_call = self.reliability.max_attempts().max(1);
        let first = request.attempt.saturating_sub(1).saturating_mul(per_call);
        let result = self
            .reliability
            .call(|| {
                let n = made.fetch_add(1, Ordering::SeqCst) + 1;
                let below = ChargeRequest {
                    attempt: first.saturating_add(n),
                    ..request.clone()
                };
                async move {
                    match tokio::time::timeout(self.timeout, self.client.charge(&below, cancel))
                        .await
                    {
                        Ok(result) => result,
                        Err(_) => Err(PaymentError::Timeout(self.timeout)),
                    }
                }
            })
            .await;
        match result {
            Ok(()) => Ok(()),
            Err(CallError::Rejected(rejection)) => Err(Unserved::Open(rejection.to_string())),
            Err(err @ (CallError::Throttled | CallError::Limited)) => {
                Err(Unserved::Open(err.to_string()))
            }
            Err(CallError::Failed(PaymentError::Busy { retry_after, .. })) => {
                Err(Unserved::Busy(retry_after))
            }
            Err(CallError::Failed(err)) => Err(Unserved::Failed(err.to_string())),
        }
    }
}
