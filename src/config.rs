//! Typed configuration, from environment variables with matching flags.
//!
//! Every knob has an environment variable and a `--flag`; `--help` lists them
//! with their defaults. Values are checked before anything binds or connects:
//! a bad one ends the process with one line naming the variable and the form
//! it accepts.

use std::net::SocketAddr;
use std::time::Duration;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::Parser;

use crate::lab::{MAX_RATE, MIN_RATE};
pub use crate::observability::logging::LogFormat;
use crate::payment::{Capacity, PaymentSettings};
use crate::reliability::{
    is_window, BreakerConfig, BreakerPolicy, JitterKind, RateFigures, RetryPolicy, Switches,
    BREAKER_COUNT_LIMIT, HALF_OPEN_PROBES_LIMIT,
};
use crate::units::{parse_duration, parse_switch};

pub(crate) fn positive_duration(raw: &str) -> Result<Duration, String> {
    match parse_duration(raw)? {
        d if d.is_zero() => Err("expected a duration above zero, such as 200ms, 2s or 1m".into()),
        d => Ok(d),
    }
}

fn jitter_kind(raw: &str) -> Result<JitterKind, String> {
    raw.parse()
}

pub(crate) fn socket_addr(raw: &str) -> Result<SocketAddr, String> {
    raw.trim().parse().map_err(|_| {
        "expected host:port with an IP address, such as 0.0.0.0:8080 or 127.0.0.1:0".into()
    })
}

fn positive_rate(raw: &str) -> Result<f64, String> {
    match raw.trim().parse::<f64>() {
        Ok(r) if r > 0.0 && r <= 1.0 => Ok(r),
        _ => Err("expected a number above 0 and at most 1, such as 0.5".into()),
    }
}

pub(crate) fn rate(raw: &str) -> Result<f64, String> {
    match raw.trim().parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err("expected a number from 0 to 1, such as 0.3".into()),
    }
}

fn load_rate(raw: &str) -> Result<f64, String> {
    match raw.trim().parse::<f64>() {
        Ok(r) if (MIN_RATE..=MAX_RATE).contains(&r) => Ok(r),
        _ => Err(format!(
            "expected orders per second from {MIN_RATE} to {MAX_RATE}, such as 20"
        )),
    }
}

fn timeline_interval(raw: &str) -> Result<Duration, String> {
    match parse_duration(raw)? {
        d if d >= Duration::from_millis(10) && d <= Duration::from_secs(60) => Ok(d),
        _ => Err("expected a duration from 10ms to 1m, such as 250ms".into()),
    }
}

pub(crate) fn budget_window(raw: &str) -> Result<Duration, String> {
    match parse_duration(raw)? {
        d if is_window(d) => Ok(d),
        _ => Err("expected whole seconds from 1s to 1h, such as 10s".into()),
    }
}

/// The largest provider capacity accepted.
pub const PAYMENT_CAPACITY_LIMIT: u32 = 100_000;

/// A whole number from 1 to `max`.
fn one_to<T>(raw: &str, max: T) -> Result<T, String>
where
    T: std::str::FromStr + PartialOrd + From<u8> + std::fmt::Display,
{
    match raw.trim().parse::<T>() {
        Ok(n) if n >= T::from(1) && n <= max => Ok(n),
        _ => Err(format!("expected a whole number from 1 to {max}")),
    }
}

fn defer_rate(raw: &str) -> Result<u32, String> {
    one_to(raw, crate::workers::deferred::DEFER_RATE_LIMIT)
}

fn defer_max(raw: &str) -> Result<Duration, String> {
    match parse_duration(raw)? {
        d if d >= Duration::from_secs(1) && d <= crate::workers::deferred::DEFER_MAX_LIMIT => Ok(d),
        _ => Err("expected a duration from 1s to 24h, such as 5m".into()),
    }
}

pub(crate) fn payment_max_connections(raw: &str) -> Result<u32, String> {
    one_to(raw, 10_000)
}

fn payment_capacity(raw: &str) -> Result<u32, String> {
    one_to(raw, PAYMENT_CAPACITY_LIMIT)
}

fn client_retries(raw: &str) -> Result<u32, String> {
    let max = crate::lab::MAX_CLIENT_RETRIES;
    match raw.trim().parse::<u32>() {
        Ok(n) if n <= max => Ok(n),
        _ => Err(format!("expected a whole number from 0 to {max}")),
    }
}

/// A client's wait: at most a minute (`positive` refuses zero).
fn client_wait(raw: &str, positive: bool) -> Result<Duration, String> {
    match parse_duration(raw)? {
        d if d > crate::lab::MAX_CLIENT_WAIT || (positive && d.is_zero()) => Err(format!(
            "expected a duration {} and at most 60s, such as 2s",
            if positive { "above zero" } else { "from 0ms" }
        )),
        d => Ok(d),
    }
}

fn client_timeout(raw: &str) -> Result<Duration, String> {
    client_wait(raw, true)
}

fn client_retry_delay(raw: &str) -> Result<Duration, String> {
    client_wait(raw, false)
}

pub(crate) fn breaker_count(raw: &str) -> Result<u32, String> {
    one_to(raw, BREAKER_COUNT_LIMIT)
}

fn half_open_probes(raw: &str) -> Result<u32, String> {
    one_to(raw, HALF_OPEN_PROBES_LIMIT)
}

/// The upper bounds of the sizes: what one machine can honour. Workers and
/// queue room are tasks and memory taken at startup or under load (a
/// hundred million workers took 3.5 GiB in seconds; tokio's semaphore
/// panics above 2^61 permits); a stored order takes about 600 bytes.
pub const WORKER_COUNT_LIMIT: usize = 10_000;
pub const QUEUE_CAPACITY_LIMIT: usize = 1_000_000;
pub const MEMORY_MAX_ORDERS_LIMIT: usize = 10_000_000;
pub const DATABASE_MAX_CONNECTIONS_LIMIT: u32 = 1_000;
/// Charge calls per order: past a hundred, a retry loop is a hang.
pub const RETRY_MAX_ATTEMPTS_LIMIT: u32 = 100;
/// The retry budget's floor, in retries per second.
pub const RETRY_BUDGET_FLOOR_LIMIT: f64 = 1_000_000.0;

fn worker_count(raw: &str) -> Result<usize, String> {
    one_to(raw, WORKER_COUNT_LIMIT)
}

fn queue_capacity(raw: &str) -> Result<usize, String> {
    one_to(raw, QUEUE_CAPACITY_LIMIT)
}

fn memory_max_orders(raw: &str) -> Result<usize, String> {
    one_to(raw, MEMORY_MAX_ORDERS_LIMIT)
}

fn database_max_connections(raw: &str) -> Result<u32, String> {
    one_to(raw, DATABASE_MAX_CONNECTIONS_LIMIT)
}

pub(crate) fn retry_max_attempts(raw: &str) -> Result<u32, String> {
    one_to(raw, RETRY_MAX_ATTEMPTS_LIMIT)
}

fn limit_size(raw: &str) -> Result<u32, String> {
    one_to(raw, crate::reliability::LIMIT_MAX)
}

fn hedge_max(raw: &str) -> Result<u32, String> {
    one_to(raw, crate::reliability::HEDGE_MAX_LIMIT)
}

fn throttle_k(raw: &str) -> Result<f64, String> {
    let max = crate::reliability::THROTTLE_K_MAX;
    match raw.trim().parse::<f64>() {
        Ok(k) if (1.0..=max).contains(&k) => Ok(k),
        _ => Err(format!("expected a number from 1 to {max}, such as 2")),
    }
}

pub(crate) fn budget_floor(raw: &str) -> Result<f64, String> {
    match raw.trim().parse::<f64>() {
        Ok(r) if (0.0..=RETRY_BUDGET_FLOOR_LIMIT).contains(&r) => Ok(r),
        _ => Err("expected a number from 0 to 1000000, such as 1".into()),
    }
}

/// The largest group commit the store accepts.
pub const DATABASE_BATCH_MAX_LIMIT: usize = 1000;

fn batch_max(raw: &str) -> Result<usize, String> {
    one_to(raw, DATABASE_BATCH_MAX_LIMIT)
}

pub(crate) fn env_filter(raw: &str) -> Result<String, String> {
    tracing_subscriber::EnvFilter::try_new(raw)
        .map(|_| raw.to_owned())
        .map_err(|_| {
            "expected a tracing filter such as info or reliability_lab=debug,tower_http=warn".into()
        })
}

pub(crate) fn token(raw: &str) -> Result<String, String> {
    if raw.len() >= 8 && raw.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(raw.to_owned())
    } else {
        Err("expected at least 8 printable characters without spaces".into())
    }
}

pub(crate) fn seed(raw: &str) -> Result<u64, String> {
    raw.trim()
        .parse()
        .map_err(|_| "expected a whole number from 0 to 18446744073709551615".into())
}

/// How the process logs: the service and `reliability-lab provider` alike.
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log line format.
    #[arg(
        long,
        env = "LOG_FORMAT",
        default_value = "json",
        value_enum,
        ignore_case = true
    )]
    pub log_format: LogFormat,

    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "RUST_LOG", default_value = "info", value_parser = env_filter)]
    pub rust_log: String,
}

/// The simulated provider's settings: the service's in-process simulator
/// and `reliability-lab provider` read the same variables.
#[derive(Debug, Clone, clap::Args)]
pub struct SimulatorArgs {
    /// Share of payment charges that fail, from 0 to 1.
    #[arg(long, env = "PAYMENT_FAILURE_RATE", default_value = "0.3", value_parser = rate)]
    pub payment_failure_rate: f64,

    /// Shortest simulated payment latency.
    #[arg(long, env = "PAYMENT_LATENCY_MIN", default_value = "100ms", value_parser = parse_duration)]
    pub payment_latency_min: Duration,

    /// Longest simulated payment latency.
    #[arg(long, env = "PAYMENT_LATENCY_MAX", default_value = "500ms", value_parser = parse_duration)]
    pub payment_latency_max: Duration,

    /// Share of charges that succeed at the provider but answer with an error (the answer is lost).
    #[arg(long, env = "PAYMENT_AMBIGUOUS_RATE", default_value = "0", value_parser = rate)]
    pub payment_ambiguous_rate: f64,

    /// Share of payment calls that take PAYMENT_TAIL_LATENCY instead of their drawn latency: a latency tail (0 to 1).
    #[arg(long, env = "PAYMENT_TAIL_RATE", default_value = "0", value_parser = rate)]
    pub payment_tail_rate: f64,

    /// The latency of the calls in the tail (PAYMENT_TAIL_RATE).
    #[arg(long, env = "PAYMENT_TAIL_LATENCY", default_value = "2s", value_parser = parse_duration)]
    pub payment_tail_latency: Duration,

    /// Whether the provider honours idempotency keys (on: a retried charge is never charged twice).
    #[arg(long, env = "PAYMENT_IDEMPOTENCY", default_value = "on", value_parser = parse_switch, action = clap::ArgAction::Set)]
    pub payment_idempotency: bool,

    /// Charges the provider serves at once (1 to 100000); more wait for a slot. Unset: unlimited.
    #[arg(long, env = "PAYMENT_CAPACITY", value_parser = payment_capacity)]
    pub payment_capacity: Option<u32>,

    /// How long a charge waits for a free slot at the provider before it fails as overloaded (with PAYMENT_CAPACITY).
    #[arg(long, env = "PAYMENT_QUEUE_TIMEOUT", default_value = "10s", value_parser = positive_duration)]
    pub payment_queue_timeout: Duration,

    /// Seed for reproducible runs: payment draws, retry jitter and, in memory, order ids follow from it.
    #[arg(long, env = "PAYMENT_SEED", value_parser = seed)]
    pub payment_seed: Option<u64>,
}

impl SimulatorArgs {
    /// Checks that hold between these knobs.
    pub fn validate(&self) -> Result<(), String> {
        if self.payment_latency_min > self.payment_latency_max {
            return Err(format!(
                "invalid PAYMENT_LATENCY_MIN: {} is above PAYMENT_LATENCY_MAX {}; expected min <= max",
                humantime::format_duration(self.payment_latency_min),
                humantime::format_duration(self.payment_latency_max)
            ));
        }
        Ok(())
    }

    pub fn payment_settings(&self) -> PaymentSettings {
        PaymentSettings {
            failure_rate: self.payment_failure_rate,
            latency_min: self.payment_latency_min,
            latency_max: self.payment_latency_max,
            ambiguous_rate: self.payment_ambiguous_rate,
            idempotency: self.payment_idempotency,
            tail_rate: self.payment_tail_rate,
            tail_latency: self.payment_tail_latency,
            ..PaymentSettings::default()
        }
    }

    pub fn payment_capacity(&self) -> Option<Capacity> {
        self.payment_capacity.map(|slots| Capacity {
            slots,
            queue_timeout: self.payment_queue_timeout,
        })
    }
}

/// reliability-lab: an order-processing backend that fails on purpose.
#[derive(Debug, Clone, Parser)]
#[command(name = "reliability-lab", version, about, long_about = None)]
pub struct Config {
    /// Address the HTTP server listens on.
    #[arg(long, env = "LISTEN_ADDR", default_value = "0.0.0.0:8080", value_parser = socket_addr)]
    pub listen_addr: SocketAddr,

    /// Postgres URL; when unset, orders are kept in memory (lost on restart).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// With DATABASE_URL: where the simulated provider keeps its ledger, when not in the orders' database (a provider on its own network path).
    #[arg(long, env = "PAYMENT_LEDGER_URL", hide_env_values = true)]
    pub payment_ledger_url: Option<String>,

    /// Most connections in the Postgres pool.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value = "10", value_parser = database_max_connections)]
    pub database_max_connections: u32,

    /// With Postgres: most new orders written in one statement (group commit); 1 writes each alone.
    #[arg(long, env = "DATABASE_BATCH_MAX", default_value = "256", value_parser = batch_max)]
    pub database_batch_max: usize,

    /// How long startup keeps retrying an unreachable database before giving up.
    #[arg(long, env = "DATABASE_STARTUP_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub database_startup_timeout: Duration,

    /// With Postgres: how long a replica's claim on a queued or processing order lasts without renewal.
    #[arg(long, env = "JOB_LEASE", default_value = "30s", value_parser = positive_duration)]
    pub job_lease: Duration,

    /// With Postgres: how often to look for orders whose lease expired and take them over.
    #[arg(long, env = "RECOVERY_INTERVAL", default_value = "5s", value_parser = positive_duration)]
    pub recovery_interval: Duration,

    /// Without DATABASE_URL: the most orders kept in memory; past it the oldest finished ones are forgotten.
    #[arg(long, env = "MEMORY_MAX_ORDERS", default_value = "250000", value_parser = memory_max_orders)]
    pub memory_max_orders: usize,

    #[command(flatten)]
    pub log: LogArgs,

    /// Longest wait for a request's headers on a connection (slow or stalled clients are closed).
    #[arg(long, env = "HTTP_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = positive_duration)]
    pub http_header_read_timeout: Duration,

    /// Longest wait for a request's whole body, from its headers; later is 408.
    #[arg(long, env = "HTTP_BODY_TIMEOUT", default_value = "10s", value_parser = positive_duration)]
    pub http_body_timeout: Duration,

    /// A keep-alive connection with no request and no traffic for this long is closed.
    #[arg(long, env = "HTTP_IDLE_TIMEOUT", default_value = "60s", value_parser = positive_duration)]
    pub http_idle_timeout: Duration,

    /// Longest a shutdown may take: requests, then queued jobs, then cancel.
    #[arg(long, env = "SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,

    /// Jobs the processing queue holds; POST /orders answers 503 when it is full.
    #[arg(long, env = "QUEUE_CAPACITY", default_value = "100", value_parser = queue_capacity)]
    pub queue_capacity: usize,

    /// Worker tasks draining the queue.
    #[arg(long, env = "WORKER_COUNT", default_value = "5", value_parser = worker_count)]
    pub worker_count: usize,

    #[command(flatten)]
    pub simulator: SimulatorArgs,

    /// Bound on each charge call; a timeout counts as a failure and is retried.
    #[arg(long, env = "PAYMENT_TIMEOUT", default_value = "1s", value_parser = positive_duration)]
    pub payment_timeout: Duration,

    /// With PAYMENT_URL: the provider's ADMIN_TOKEN, so that the service's /admin/provider/faults (and the console) can change its network faults.
    #[arg(long, env = "PAYMENT_ADMIN_TOKEN", hide_env_values = true, value_parser = token)]
    pub payment_admin_token: Option<String>,

    /// With PAYMENT_URL: what PAYMENT_TIMEOUT bounds. attempt: the wait for a connection and the whole exchange; exchange: the exchange only, from the moment a connection is held (the wait for one is then unbounded).
    #[arg(
        long,
        env = "PAYMENT_TIMEOUT_SCOPE",
        default_value = "attempt",
        value_enum,
        ignore_case = true
    )]
    pub payment_timeout_scope: crate::payment::client::TimeoutScope,

    /// A payment provider across the network (http://host:port, such as `reliability-lab provider`); unset, charges go to the in-process simulator.
    #[arg(long, env = "PAYMENT_URL")]
    pub payment_url: Option<String>,

    /// With PAYMENT_URL: connections to the provider open at once, at most (1 to 10000); more attempts wait for one, within PAYMENT_TIMEOUT.
    #[arg(long, env = "PAYMENT_MAX_CONNECTIONS", default_value = "32", value_parser = payment_max_connections)]
    pub payment_max_connections: u32,

    /// With PAYMENT_URL: longest wait for a TCP connection to the provider.
    #[arg(long, env = "PAYMENT_CONNECT_TIMEOUT", default_value = "1s", value_parser = positive_duration)]
    pub payment_connect_timeout: Duration,

    /// With PAYMENT_URL: a pooled connection unused this long is closed.
    #[arg(long, env = "PAYMENT_IDLE_TIMEOUT", default_value = "30s", value_parser = positive_duration)]
    pub payment_idle_timeout: Duration,

    /// With PAYMENT_URL: whether a busy provider's Retry-After (its 429 or 503) sets the earliest next attempt; off ignores it, to show what that costs.
    #[arg(long, env = "PAYMENT_RETRY_AFTER", default_value = "on", value_parser = parse_switch, action = clap::ArgAction::Set)]
    pub payment_retry_after: bool,

    /// Charge calls per order, the first included (attempts, not retries).
    #[arg(long, env = "RETRY_MAX_ATTEMPTS", default_value = "3", value_parser = retry_max_attempts)]
    pub retry_max_attempts: u32,

    /// First wait between attempts (before jitter).
    #[arg(long, env = "RETRY_INITIAL_INTERVAL", default_value = "200ms", value_parser = parse_duration)]
    pub retry_initial_interval: Duration,

    /// Jitter: each wait is drawn from its base times 1 ± this (0 for exact waits).
    #[arg(long, env = "RETRY_JITTER", default_value = "0.5", value_parser = rate)]
    pub retry_jitter: f64,

    /// How each wait is jittered: proportional (by RETRY_JITTER), none, full, equal or decorrelated (AWS's backoff-and-jitter study).
    #[arg(long, env = "RETRY_JITTER_KIND", default_value = "proportional", value_parser = jitter_kind)]
    pub retry_jitter_kind: JitterKind,

    /// Longest wait between attempts (jitter included).
    #[arg(long, env = "RETRY_MAX_INTERVAL", default_value = "2s", value_parser = parse_duration)]
    pub retry_max_interval: Duration,

    /// Whether failed charges are retried (also switchable at run time: PUT /admin/reliability).
    #[arg(long, env = "RETRY_ENABLED", default_value = "true", value_parser = parse_switch, action = clap::ArgAction::Set)]
    pub retry_enabled: bool,

    /// Whether the circuit breaker guards the payment service (also switchable at run time).
    #[arg(long, env = "BREAKER_ENABLED", default_value = "true", value_parser = parse_switch, action = clap::ArgAction::Set)]
    pub breaker_enabled: bool,

    /// Whether a breaker rejection ends the retry loop; off, it is retried with backoff like any failure (for the lab to show the cost; also switchable at run time).
    #[arg(long, env = "BREAKER_REJECTION_PERMANENT", default_value = "true", value_parser = parse_switch, action = clap::ArgAction::Set)]
    pub breaker_rejection_permanent: bool,

    /// Whether retries are limited by the retry budget (also switchable at run time).
    #[arg(long, env = "RETRY_BUDGET", default_value = "off", value_parser = parse_switch, action = clap::ArgAction::Set)]
    pub retry_budget: bool,

    /// The retry budget: retries allowed per first attempt over the window, 0 to 1.
    #[arg(long, env = "RETRY_BUDGET_RATIO", default_value = "0.2", value_parser = rate)]
    pub retry_budget_ratio: f64,

    /// The retry budget's floor: retries allowed per second whatever the traffic.
    #[arg(long, env = "RETRY_BUDGET_MIN_PER_SECOND", default_value = "1", value_parser = budget_floor)]
    pub retry_budget_min_per_second: f64,

    /// How far back the retry budget counts first attempts and retries (whole seconds, 1s to 1h).
    #[arg(long, env = "RETRY_BUDGET_WINDOW", default_value = "10s", value_parser = budget_window)]
    pub retry_budget_window: Duration,

    /// Client-side adaptive throttling (the SRE book's): charge attempts rejected locally, with probability max(0, (requests - K x accepts) / (requests + 1)) over THROTTLE_WINDOW, while the provider answers too few.
    #[arg(long, env = "THROTTLE", default_value = "off", value_parser = parse_switch, action = clap::ArgAction::Set)]
    pub throttle: bool,

    /// Client-side throttling's K: requests allowed per accepted one before any is shed (1 to 10; the SRE book's 2).
    #[arg(long, env = "THROTTLE_K", default_value = "2", value_parser = throttle_k)]
    pub throttle_k: f64,

    /// How far back client-side throttling counts requests and accepts (whole seconds, 1s to 1h).
    #[arg(long, env = "THROTTLE_WINDOW", default_value = "10s", value_parser = budget_window)]
    pub throttle_window: Duration,

    /// Hedged attempts: when a charge call has not answered within HEDGE_DELAY, another starts beside it (same key); the first success wins and the other is cancelled.
    #[arg(long, env = "HEDGE", default_value = "off", value_parser = parse_switch, action = clap::ArgAction::Set)]
    pub hedge: bool,

    /// When a hedge starts: a quantile of recent calls' latency (p95; p1 to p99.9) or a duration (150ms; at most 1h).
    #[arg(long, env = "HEDGE_DELAY", default_value = "p95", value_parser = |raw: &str| raw.parse::<crate::reliability::HedgeDelay>())]
    pub hedge_delay: crate::reliability::HedgeDelay,

    /// Hedges one attempt may add (1 to 4).
    #[arg(long, env = "HEDGE_MAX", default_value = "1", value_parser = hedge_max)]
    pub hedge_max: u32,

    /// A limit on the charge calls in flight: off, fixed (CONCURRENCY_LIMIT_INITIAL always), aimd or vegas (adaptive, after Netflix's concurrency-limits); a call past it is not sent and its order fails fast.
    #[arg(long, env = "CONCURRENCY_LIMIT", default_value = "off", value_parser = |raw: &str| raw.parse::<crate::reliability::LimitKind>())]
    pub concurrency_limit: crate::reliability::LimitKind,

    /// The fixed limit, and where the adaptive ones start (1 to 100000).
    #[arg(long, env = "CONCURRENCY_LIMIT_INITIAL", default_value = "20", value_parser = limit_size)]
    pub concurrency_limit_initial: u32,

    /// The adaptive limits never grow past this (1 to 100000).
    #[arg(long, env = "CONCURRENCY_LIMIT_MAX", default_value = "1000", value_parser = limit_size)]
    pub concurrency_limit_max: u32,

    /// Consecutive payment failures that open the circuit breaker (1 to 1000000).
    #[arg(long, env = "BREAKER_FAILURE_THRESHOLD", default_value = "5", value_parser = breaker_count)]
    pub breaker_failure_threshold: u32,

    /// How long the breaker stays open before it lets probes through.
    #[arg(long, env = "BREAKER_OPEN_DURATION", default_value = "30s", value_parser = positive_duration)]
    pub breaker_open_duration: Duration,

    /// What opens the breaker: consecutive (BREAKER_FAILURE_THRESHOLD failures in a row) or failure_rate (the share of failures over BREAKER_WINDOW).
    #[arg(long, env = "BREAKER_POLICY", default_value = "consecutive", value_parser = ["consecutive", "failure_rate"])]
    pub breaker_policy: String,

    /// With BREAKER_POLICY=failure_rate: the share of failed calls in the window that opens it (above 0, at most 1).
    #[arg(long, env = "BREAKER_FAILURE_RATE", default_value = "0.5", value_parser = positive_rate)]
    pub breaker_failure_rate: f64,

    /// With BREAKER_POLICY=failure_rate: how far back calls are counted (whole seconds, 1s to 1h).
    #[arg(long, env = "BREAKER_WINDOW", default_value = "10s", value_parser = budget_window)]
    pub breaker_window: Duration,

    /// With BREAKER_POLICY=failure_rate: calls the window must hold before the rate can open it (1 to 1000000).
    #[arg(long, env = "BREAKER_MIN_CALLS", default_value = "20", value_parser = breaker_count)]
    pub breaker_min_calls: u32,

    /// With BREAKER_POLICY=failure_rate: a call slower than this counts as a failure for the rate (its result still reaches the caller). Unset: none.
    #[arg(long, env = "BREAKER_SLOW_CALL_DURATION", value_parser = positive_duration)]
    pub breaker_slow_call_duration: Option<Duration>,

    /// Probes a half-open breaker admits at once (1 to 100); all must succeed to close it.
    #[arg(long, env = "BREAKER_HALF_OPEN_PROBES", default_value = "1", value_parser = half_open_probes)]
    pub breaker_half_open_probes: u32,

    /// Deferred retry: an order whose charge the open breaker refused waits (status deferred) instead of failing, and is charged again once the breaker has closed.
    #[arg(long, env = "BREAKER_DEFER", default_value = "off", value_parser = parse_switch, action = clap::ArgAction::Set)]
    pub breaker_defer: bool,

    /// How long after it was placed a deferred order may still wait; then it fails as without deferral (1s to 24h).
    #[arg(long, env = "DEFER_MAX", default_value = "5m", value_parser = defer_max)]
    pub defer_max: Duration,

    /// Deferred orders put back in the queue per second once the breaker has closed (1 to 100000).
    #[arg(long, env = "DEFER_RATE", default_value = "50", value_parser = defer_rate)]
    pub defer_rate: u32,

    /// Built-in traffic at boot, in orders per second (0.1 to 5000); unset: none until PUT /admin/load.
    #[arg(long, env = "LOAD_RATE", value_parser = load_rate)]
    pub load_rate: Option<f64>,

    /// How long the boot traffic of LOAD_RATE lasts; unset: until stopped.
    #[arg(long, env = "LOAD_DURATION", value_parser = positive_duration)]
    pub load_duration: Option<Duration>,

    /// The longest any run of the built-in traffic lasts, whatever LOAD_DURATION or PUT /admin/load asks: a run asked for longer, or for no end, stops after it. Unset: no bound.
    #[arg(long, env = "LOAD_MAX_DURATION", value_parser = positive_duration)]
    pub load_max_duration: Option<Duration>,

    /// The built-in traffic's clients: how many times an order is sent again after a 503 or a client timeout (0 to 10).
    #[arg(long, env = "LOAD_RETRIES", default_value = "0", value_parser = client_retries)]
    pub load_retries: u32,

    /// Whether the built-in traffic's clients wait a 503's Retry-After before retrying (off: only LOAD_RETRY_DELAY).
    #[arg(long, env = "LOAD_RETRY_AFTER", default_value = "on", value_parser = parse_switch, action = clap::ArgAction::Set)]
    pub load_retry_after: bool,

    /// The built-in traffic's clients: the wait before a retry when there is no Retry-After to honour (0ms to 60s).
    #[arg(long, env = "LOAD_RETRY_DELAY", default_value = "0ms", value_parser = client_retry_delay)]
    pub load_retry_delay: Duration,

    /// How long the built-in traffic's clients wait for an answer before giving up (and retrying, with LOAD_RETRIES).
    #[arg(long, env = "LOAD_TIMEOUT", default_value = "30s", value_parser = client_timeout)]
    pub load_timeout: Duration,

    /// Whether an order's retries from the built-in traffic carry one Idempotency-Key (off: a retry after a timeout may create a second order).
    #[arg(long, env = "LOAD_IDEMPOTENCY_KEYS", default_value = "on", value_parser = parse_switch, action = clap::ArgAction::Set)]
    pub load_idempotency_keys: bool,

    /// How often the timeline records a sample of the pipeline.
    #[arg(long, env = "TIMELINE_INTERVAL", default_value = "250ms", value_parser = timeline_interval)]
    pub timeline_interval: Duration,

    /// The longest a CPU profile or flame graph samples, whatever its `seconds` asks (a profile asked for longer, or for the default 30 s, samples this long). Unset: as asked.
    #[arg(long, env = "PROFILE_MAX_DURATION", value_parser = positive_duration)]
    pub profile_max_duration: Option<Duration>,

    /// How much of the timeline is kept (at most 100,000 samples).
    #[arg(long, env = "TIMELINE_RETENTION", default_value = "15m", value_parser = positive_duration)]
    pub timeline_retention: Duration,

    /// Bearer token required by /admin and /debug; when unset they are open.
    #[arg(long, env = "ADMIN_TOKEN", hide_env_values = true, value_parser = token)]
    pub admin_token: Option<String>,
}

impl Config {
    /// Parses the process's environment and arguments. `--help` and
    /// `--version` print and exit here; any other problem is one line.
    pub fn load() -> Result<Self, String> {
        Self::load_from(std::env::args_os())
    }

    /// Every knob at its documented default, whatever the environment holds:
    /// for services built in-process (tests, benchmarks, experiments).
    pub fn defaults() -> Self {
        use clap::{CommandFactory, FromArgMatches};
        let matches = Self::command()
            .mut_args(|arg| arg.env(None))
            .try_get_matches_from(["reliability-lab"])
            .expect("the defaults parse");
        Self::from_arg_matches(&matches).expect("the defaults parse")
    }

    /// The documented defaults with `settings` applied, each named by its
    /// environment variable (`("PAYMENT_FAILURE_RATE", "0.5")`), never
    /// reading the environment: for experiments. An unknown name or a bad
    /// value is one line naming it.
    pub fn from_settings<'a>(
        settings: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, String> {
        let config: Self = parse_settings("reliability-lab", settings)?;
        config.validate()?;
        Ok(config)
    }

    pub fn load_from<I, T>(args: I) -> Result<Self, String>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let config = match Self::try_parse_from(args) {
            Ok(config) => config,
            Err(err)
                if matches!(
                    err.kind(),
                    ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
                ) =>
            {
                err.exit()
            }
            Err(err) => return Err(one_line(&err)),
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks that hold between knobs.
    pub fn validate(&self) -> Result<(), String> {
        self.simulator.validate()?;
        if let Some(url) = &self.payment_url {
            crate::payment::client::charges_uri(url)?;
        }
        if self.retry_initial_interval > self.retry_max_interval {
            return Err(format!(
                "invalid RETRY_INITIAL_INTERVAL: {} is above RETRY_MAX_INTERVAL {}; expected initial <= max",
                humantime::format_duration(self.retry_initial_interval),
                humantime::format_duration(self.retry_max_interval)
            ));
        }
        if self.database_url.is_some() && self.payment_timeout * 2 > self.job_lease {
            return Err(format!(
                "invalid JOB_LEASE: {} is less than twice PAYMENT_TIMEOUT {}; a worker starts a \
                 charge only if it can end well within the lease, so no charge would ever start",
                humantime::format_duration(self.job_lease),
                humantime::format_duration(self.payment_timeout)
            ));
        }
        if self.database_url.is_some()
            && self.payment_timeout_scope == crate::payment::client::TimeoutScope::Exchange
        {
            return Err(
                "invalid PAYMENT_TIMEOUT_SCOPE: exchange leaves the wait for a connection unbounded, so with DATABASE_URL a charge could outlast its lease; use attempt"
                    .into(),
            );
        }
        if self.payment_ledger_url.is_some() && self.database_url.is_none() {
            return Err(
                "invalid PAYMENT_LEDGER_URL: the ledger leaves memory only with the orders; set DATABASE_URL too, or unset PAYMENT_LEDGER_URL"
                    .into(),
            );
        }
        if self.concurrency_limit_initial > self.concurrency_limit_max {
            return Err(format!(
                "invalid CONCURRENCY_LIMIT_INITIAL: {} is above CONCURRENCY_LIMIT_MAX {}; expected initial <= max",
                self.concurrency_limit_initial, self.concurrency_limit_max
            ));
        }
        if self.load_duration.is_some() && self.load_rate.is_none() {
            return Err("invalid LOAD_DURATION: set LOAD_RATE too, or unset LOAD_DURATION".into());
        }
        if self.breaker_slow_call_duration.is_some() && self.breaker_policy != "failure_rate" {
            return Err(
                "invalid BREAKER_SLOW_CALL_DURATION: slow calls count towards BREAKER_POLICY=failure_rate only; set it, or unset BREAKER_SLOW_CALL_DURATION"
                    .into(),
            );
        }
        Ok(())
    }

    pub fn payment_settings(&self) -> PaymentSettings {
        self.simulator.payment_settings()
    }

    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.retry_max_attempts,
            initial_interval: self.retry_initial_interval,
            max_interval: self.retry_max_interval,
            randomization_factor: self.retry_jitter,
            jitter: self.retry_jitter_kind,
            ..RetryPolicy::default()
        }
    }

    pub fn http_timeouts(&self) -> crate::http::server::Timeouts {
        crate::http::server::Timeouts {
            header_read: self.http_header_read_timeout,
            body: self.http_body_timeout,
            idle: self.http_idle_timeout,
        }
    }

    /// How the built-in traffic's clients behave unless a run says otherwise.
    pub fn load_client(&self) -> crate::lab::ClientBehaviour {
        crate::lab::ClientBehaviour {
            retries: self.load_retries,
            retry_after: self.load_retry_after,
            retry_delay: crate::units::HumanDuration(self.load_retry_delay),
            timeout: crate::units::HumanDuration(self.load_timeout),
            idempotency_keys: self.load_idempotency_keys,
        }
    }

    pub fn switches(&self) -> Switches {
        Switches {
            retry_enabled: self.retry_enabled,
            breaker_enabled: self.breaker_enabled,
            rejection_permanent: self.breaker_rejection_permanent,
            retry_budget_enabled: self.retry_budget,
            retry_jitter: self.retry_jitter_kind,
            throttle_enabled: self.throttle,
            hedge_enabled: self.hedge,
            concurrency_limit: self.concurrency_limit,
        }
    }

    /// Deferral's settings, when `BREAKER_DEFER` is on.
    pub fn defer_settings(&self) -> Option<crate::workers::DeferSettings> {
        self.breaker_defer.then_some(crate::workers::DeferSettings {
            max: self.defer_max,
            rate: self.defer_rate,
        })
    }

    pub fn limit_config(&self) -> crate::reliability::LimitConfig {
        crate::reliability::LimitConfig {
            kind: self.concurrency_limit,
            initial: self.concurrency_limit_initial,
            max: self.concurrency_limit_max,
        }
    }

    pub fn hedge_config(&self) -> crate::reliability::HedgeConfig {
        crate::reliability::HedgeConfig {
            delay: self.hedge_delay,
            max: self.hedge_max,
        }
    }

    pub fn throttle_config(&self) -> crate::reliability::ThrottleConfig {
        crate::reliability::ThrottleConfig {
            k: self.throttle_k,
            window: self.throttle_window,
        }
    }

    pub fn budget_config(&self) -> crate::reliability::BudgetConfig {
        crate::reliability::BudgetConfig {
            ratio: self.retry_budget_ratio,
            min_per_second: self.retry_budget_min_per_second,
            window: self.retry_budget_window,
        }
    }

    /// The provider's capacity, when PAYMENT_CAPACITY is set.
    pub fn payment_capacity(&self) -> Option<Capacity> {
        self.simulator.payment_capacity()
    }

    /// With `PAYMENT_URL`: how the payment client reaches the provider.
    pub fn payment_client(&self) -> Option<crate::payment::client::ClientSettings> {
        self.payment_url
            .as_ref()
            .map(|url| crate::payment::client::ClientSettings {
                url: url.clone(),
                max_connections: self.payment_max_connections,
                connect_timeout: self.payment_connect_timeout,
                idle_timeout: self.payment_idle_timeout,
                honour_retry_after: self.payment_retry_after,
                admin_token: self.payment_admin_token.clone(),
            })
    }

    pub fn breaker_config(&self) -> BreakerConfig {
        BreakerConfig {
            failure_threshold: self.breaker_failure_threshold,
            open_duration: self.breaker_open_duration,
            half_open_probes: self.breaker_half_open_probes,
            policy: match self.breaker_policy.as_str() {
                "failure_rate" => BreakerPolicy::FailureRate {
                    rate: self.breaker_failure_rate,
                    window: self.breaker_window,
                    min_calls: self.breaker_min_calls,
                },
                _ => BreakerPolicy::Consecutive,
            },
            slow_call: self.breaker_slow_call_duration,
            rate_fallback: RateFigures {
                rate: self.breaker_failure_rate,
                window: self.breaker_window,
                min_calls: self.breaker_min_calls,
            },
        }
    }
}

/// Turns clap's multi-line error into one line naming the variable.
/// Whether a command of `C` reads the environment variable `name`.
pub fn knows_setting<C: clap::CommandFactory>(name: &str) -> bool {
    C::command()
        .get_arguments()
        .any(|a| a.get_env().is_some_and(|e| e == name))
}

/// `C`'s documented defaults with `settings` applied, each named by its
/// environment variable, never reading the environment. An unknown name or
/// a bad value is one line naming it.
pub fn parse_settings<'a, C: clap::Parser>(
    bin: &str,
    settings: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<C, String> {
    let command = C::command();
    let mut args = vec![bin.to_owned()];
    for (name, value) in settings {
        let arg = command
            .get_arguments()
            .find(|a| a.get_env().is_some_and(|e| e == name))
            .ok_or_else(|| format!("unknown setting {name}"))?;
        let long = arg.get_long().expect("every knob has a long flag");
        args.push(format!("--{long}={value}"));
    }
    let matches = command
        .mut_args(|arg| arg.env(None))
        .try_get_matches_from(args)
        .map_err(|e| one_line(&e))?;
    C::from_arg_matches(&matches).map_err(|e| one_line(&e))
}

pub(crate) fn one_line(err: &clap::Error) -> String {
    let arg = match err.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(s)) => Some(s.clone()),
        _ => None,
    };
    let value = match err.get(ContextKind::InvalidValue) {
        Some(ContextValue::String(s)) => Some(s.clone()),
        _ => None,
    };
    let reason = std::error::Error::source(err)
        .map(|s| s.to_string())
        .or_else(|| match err.get(ContextKind::ValidValue) {
            Some(ContextValue::Strings(v)) => Some(format!("expected one of: {}", v.join(", "))),
            _ => None,
        });
    match (arg, value, reason) {
        (Some(arg), Some(value), Some(reason)) => {
            // "--listen-addr <LISTEN_ADDR>": the value name is the variable's name.
            let (flag, var) = match arg.split_once(" <") {
                Some((flag, rest)) => (flag.to_owned(), rest.trim_end_matches('>').to_owned()),
                None => (arg.clone(), arg.clone()),
            };
            if matches!(
                var.as_str(),
                "ADMIN_TOKEN" | "DATABASE_URL" | "PAYMENT_LEDGER_URL"
            ) {
                // Secrets stay out of the terminal and the logs.
                format!("invalid {var} (or {flag}): {reason}")
            } else {
                format!("invalid {var} (or {flag}) value {value:?}: {reason}")
            }
        }
        _ => err
            .render()
            .to_string()
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("invalid configuration")
            .trim_start_matches("error: ")
            .to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        Config::load_from(std::iter::once("reliability-lab").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_match_the_documented_values() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.listen_addr, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(c.database_max_connections, 10);
        assert_eq!(c.database_batch_max, 256);
        assert_eq!(c.log.log_format, LogFormat::Json);
        assert_eq!(c.shutdown_timeout, Duration::from_secs(30));
        assert_eq!(c.queue_capacity, 100);
        assert_eq!(c.worker_count, 5);
        assert_eq!(c.simulator.payment_failure_rate, 0.3);
        assert_eq!(c.simulator.payment_latency_min, Duration::from_millis(100));
        assert_eq!(c.simulator.payment_latency_max, Duration::from_millis(500));
        assert_eq!(c.retry_max_attempts, 3);
        assert_eq!(c.retry_initial_interval, Duration::from_millis(200));
        assert_eq!(c.retry_max_interval, Duration::from_secs(2));
        assert_eq!(c.breaker_failure_threshold, 5);
        assert_eq!(c.breaker_open_duration, Duration::from_secs(30));
        assert_eq!(c.payment_timeout, Duration::from_secs(1));
        assert_eq!(c.simulator.payment_ambiguous_rate, 0.0);
        assert!(c.simulator.payment_idempotency);
        assert!(c.retry_enabled && c.breaker_enabled);
        assert_eq!(c.retry_jitter, 0.5);
        assert!(!c.breaker_defer, "deferral is off unless asked for");
        assert_eq!(c.defer_settings(), None);
        assert_eq!(c.defer_max, Duration::from_secs(300));
        assert_eq!(c.defer_rate, 50);
    }

    #[test]
    fn defaults_ignore_the_environment() {
        // The process environment may hold DATABASE_URL (make test sets it);
        // the in-process defaults never read it.
        let d = Config::defaults();
        assert_eq!(d.database_url, None);
        assert_eq!(d.admin_token, None);
        assert_eq!(d.log.rust_log, "info");
        let parsed = parse(&[]).unwrap();
        assert_eq!(d.worker_count, parsed.worker_count);
        assert_eq!(d.queue_capacity, parsed.queue_capacity);
        assert_eq!(d.retry_policy(), parsed.retry_policy());
        assert_eq!(d.breaker_config(), parsed.breaker_config());
        assert_eq!(d.payment_settings(), parsed.payment_settings());
    }

    #[test]
    fn switches_take_on_off_and_booleans() {
        let c = parse(&["--payment-idempotency", "off", "--breaker-enabled", "false"]).unwrap();
        assert!(!c.simulator.payment_idempotency);
        assert!(!c.breaker_enabled);
        let err = parse(&["--retry-enabled", "maybe"]).unwrap_err();
        assert!(err.contains("RETRY_ENABLED"), "{err}");
        let err = parse(&["--admin-token", "short"]).unwrap_err();
        assert!(
            err.contains("ADMIN_TOKEN") && !err.contains("short\""),
            "{err}"
        );
    }

    #[test]
    fn durations_take_a_number_and_a_unit() {
        let c = parse(&[
            "--shutdown-timeout",
            "1m",
            "--retry-initial-interval",
            "50ms",
        ])
        .unwrap();
        assert_eq!(c.shutdown_timeout, Duration::from_secs(60));
        assert_eq!(c.retry_initial_interval, Duration::from_millis(50));
    }

    #[test]
    fn a_bad_value_is_one_line_naming_the_variable_and_the_form() {
        for (args, var, hint) in [
            (
                &["--listen-addr", "nonsense"][..],
                "LISTEN_ADDR",
                "host:port",
            ),
            (
                &["--shutdown-timeout", "soon"][..],
                "SHUTDOWN_TIMEOUT",
                "duration",
            ),
            (
                &["--shutdown-timeout", "5s5s"][..],
                "SHUTDOWN_TIMEOUT",
                "one whole number and one unit",
            ),
            (
                &["--payment-latency-max", "300000000000h"][..],
                "PAYMENT_LATENCY_MAX",
                "at most 24h",
            ),
            (
                &["--breaker-open-duration", "2d"][..],
                "BREAKER_OPEN_DURATION",
                "at most 24h",
            ),
            (
                &["--payment-failure-rate", "1.5"][..],
                "PAYMENT_FAILURE_RATE",
                "0 to 1",
            ),
            (
                &["--worker-count", "0"][..],
                "WORKER_COUNT",
                "from 1 to 10000",
            ),
            (
                &["--worker-count", "100000000"][..],
                "WORKER_COUNT",
                "from 1 to 10000",
            ),
            (
                &["--queue-capacity", "2305843009213693952"][..],
                "QUEUE_CAPACITY",
                "from 1 to 1000000",
            ),
            (
                &["--memory-max-orders", "10000001"][..],
                "MEMORY_MAX_ORDERS",
                "from 1 to 10000000",
            ),
            (
                &["--database-max-connections", "1001"][..],
                "DATABASE_MAX_CONNECTIONS",
                "from 1 to 1000",
            ),
            (
                &["--retry-max-attempts", "0"][..],
                "RETRY_MAX_ATTEMPTS",
                "from 1 to 100",
            ),
            (
                &["--retry-max-attempts", "101"][..],
                "RETRY_MAX_ATTEMPTS",
                "from 1 to 100",
            ),
            (
                &["--retry-budget-min-per-second", "1e300"][..],
                "RETRY_BUDGET_MIN_PER_SECOND",
                "from 0 to 1000000",
            ),
            (&["--log-format", "xml"][..], "LOG_FORMAT", "json"),
            (
                &["--retry-jitter-kind", "sideways"][..],
                "RETRY_JITTER_KIND",
                "decorrelated",
            ),
            (&["--load-rate", "0"][..], "LOAD_RATE", "0.1 to 5000"),
            (
                &["--retry-budget-window", "1500ms"][..],
                "RETRY_BUDGET_WINDOW",
                "whole seconds",
            ),
            (
                &["--retry-budget-min-per-second=-1"][..],
                "RETRY_BUDGET_MIN_PER_SECOND",
                "from 0 to 1000000",
            ),
            (&["--load-rate", "5001"][..], "LOAD_RATE", "0.1 to 5000"),
            (&["--defer-rate", "0"][..], "DEFER_RATE", "from 1 to 100000"),
            (
                &["--defer-rate", "100001"][..],
                "DEFER_RATE",
                "from 1 to 100000",
            ),
            (&["--hedge-delay", "p100"][..], "HEDGE_DELAY", "such as p95"),
            (&["--hedge-delay", "0ms"][..], "HEDGE_DELAY", "above zero"),
            (&["--hedge-max", "5"][..], "HEDGE_MAX", "from 1 to 4"),
            (
                &["--concurrency-limit", "tcp"][..],
                "CONCURRENCY_LIMIT",
                "off, fixed, aimd or vegas",
            ),
            (
                &["--concurrency-limit-initial", "0"][..],
                "CONCURRENCY_LIMIT_INITIAL",
                "from 1 to 100000",
            ),
            (&["--throttle-k", "0.5"][..], "THROTTLE_K", "from 1 to 10"),
            (
                &["--throttle-window", "1500ms"][..],
                "THROTTLE_WINDOW",
                "whole seconds",
            ),
            (
                &["--payment-tail-rate", "2"][..],
                "PAYMENT_TAIL_RATE",
                "from 0 to 1",
            ),
            (
                &["--payment-timeout-scope", "wait"][..],
                "PAYMENT_TIMEOUT_SCOPE",
                "attempt, exchange",
            ),
            (&["--defer-max", "500ms"][..], "DEFER_MAX", "from 1s to 24h"),
            (&["--defer-max", "25h"][..], "DEFER_MAX", "at most 24h"),
            (&["--breaker-defer", "perhaps"][..], "BREAKER_DEFER", "on"),
            (
                &["--breaker-min-calls", "2147483648"][..],
                "BREAKER_MIN_CALLS",
                "from 1 to 1000000",
            ),
            (
                &["--breaker-failure-threshold", "0"][..],
                "BREAKER_FAILURE_THRESHOLD",
                "from 1 to 1000000",
            ),
            (
                &["--load-retries", "11"][..],
                "LOAD_RETRIES",
                "from 0 to 10",
            ),
            (&["--load-timeout", "0s"][..], "LOAD_TIMEOUT", "above zero"),
            (
                &["--load-retry-delay", "2m"][..],
                "LOAD_RETRY_DELAY",
                "at most 60s",
            ),
            (
                &["--timeline-interval", "1ms"][..],
                "TIMELINE_INTERVAL",
                "10ms to 1m",
            ),
            (
                &["--timeline-retention", "0s"][..],
                "TIMELINE_RETENTION",
                "above zero",
            ),
            (
                &["--load-max-duration", "0s"][..],
                "LOAD_MAX_DURATION",
                "above zero",
            ),
            (
                &["--profile-max-duration", "0ms"][..],
                "PROFILE_MAX_DURATION",
                "above zero",
            ),
            (&["--rust-log", "=[bad"][..], "RUST_LOG", "filter"),
        ] {
            let err = parse(args).unwrap_err();
            assert!(!err.contains('\n'), "{err}");
            assert!(err.contains(var), "{err} should name {var}");
            assert!(err.contains(hint), "{err} should say {hint}");
        }
    }

    #[test]
    fn settings_by_environment_name_apply_over_the_defaults() {
        let c = Config::from_settings([("PAYMENT_FAILURE_RATE", "0.5"), ("RETRY_BUDGET", "on")])
            .unwrap();
        assert_eq!(c.simulator.payment_failure_rate, 0.5);
        assert!(c.retry_budget);
        assert_eq!(c.worker_count, 5);
        let err = Config::from_settings([("NO_SUCH_KNOB", "1")]).unwrap_err();
        assert!(err.contains("NO_SUCH_KNOB"), "{err}");
        let err = Config::from_settings([("WORKER_COUNT", "0")]).unwrap_err();
        assert!(err.contains("WORKER_COUNT"), "{err}");
    }

    #[test]
    fn with_a_database_the_lease_must_hold_two_charge_timeouts() {
        let err = parse(&[
            "--database-url",
            "postgres://x@localhost/db",
            "--job-lease",
            "1s",
            "--payment-timeout",
            "600ms",
        ])
        .unwrap_err();
        assert!(
            err.contains("JOB_LEASE") && err.contains("PAYMENT_TIMEOUT"),
            "{err}"
        );
        parse(&[
            "--database-url",
            "postgres://x@localhost/db",
            "--job-lease",
            "1s",
            "--payment-timeout",
            "500ms",
        ])
        .unwrap();
        // In memory there are no leases.
        parse(&["--job-lease", "1s", "--payment-timeout", "900ms"]).unwrap();
    }

    #[test]
    fn a_load_duration_without_a_rate_is_refused() {
        let err = parse(&["--load-duration", "5m"]).unwrap_err();
        assert!(err.contains("LOAD_DURATION"), "{err}");
        let ok = parse(&["--load-rate", "20", "--load-duration", "5m"]).unwrap();
        assert_eq!(ok.load_rate, Some(20.0));
        assert_eq!(ok.load_duration, Some(Duration::from_secs(300)));
    }

    #[test]
    fn knobs_that_do_not_fit_together_are_refused_naming_one() {
        let err = parse(&[
            "--concurrency-limit-initial",
            "50",
            "--concurrency-limit-max",
            "10",
        ])
        .unwrap_err();
        assert!(err.contains("CONCURRENCY_LIMIT_INITIAL"), "{err}");
        // An exchange-only timeout leaves the wait for a connection
        // unbounded: with leases a charge could outlast its lease.
        let err = parse(&[
            "--database-url",
            "postgres://x/y",
            "--payment-timeout-scope",
            "exchange",
        ])
        .unwrap_err();
        assert!(err.contains("PAYMENT_TIMEOUT_SCOPE"), "{err}");
        let ok = parse(&["--payment-timeout-scope", "exchange"]).unwrap();
        assert_eq!(
            ok.payment_timeout_scope,
            crate::payment::client::TimeoutScope::Exchange
        );
    }

    #[test]
    fn min_latency_above_max_is_refused() {
        let err =
            parse(&["--payment-latency-min", "2s", "--payment-latency-max", "1s"]).unwrap_err();
        assert!(err.contains("PAYMENT_LATENCY_MIN"), "{err}");
    }

    #[test]
    fn help_lists_every_knob_with_its_default() {
        let help = <Config as clap::CommandFactory>::command()
            .render_long_help()
            .to_string();
        for var in [
            "LISTEN_ADDR",
            "DATABASE_URL",
            "PAYMENT_LEDGER_URL",
            "DATABASE_MAX_CONNECTIONS",
            "DATABASE_BATCH_MAX",
            "LOG_FORMAT",
            "RUST_LOG",
            "SHUTDOWN_TIMEOUT",
            "QUEUE_CAPACITY",
            "WORKER_COUNT",
            "PAYMENT_FAILURE_RATE",
            "PAYMENT_LATENCY_MIN",
            "PAYMENT_LATENCY_MAX",
            "PAYMENT_SEED",
            "RETRY_MAX_ATTEMPTS",
            "RETRY_JITTER_KIND",
            "RETRY_INITIAL_INTERVAL",
            "RETRY_MAX_INTERVAL",
            "RETRY_JITTER",
            "BREAKER_FAILURE_THRESHOLD",
            "BREAKER_OPEN_DURATION",
            "PAYMENT_TIMEOUT",
            "PAYMENT_AMBIGUOUS_RATE",
            "PAYMENT_IDEMPOTENCY",
            "RETRY_ENABLED",
            "BREAKER_ENABLED",
            "BREAKER_REJECTION_PERMANENT",
            "RETRY_BUDGET",
            "RETRY_BUDGET_RATIO",
            "RETRY_BUDGET_MIN_PER_SECOND",
            "RETRY_BUDGET_WINDOW",
            "ADMIN_TOKEN",
            "LOAD_RATE",
            "LOAD_DURATION",
            "LOAD_MAX_DURATION",
            "PROFILE_MAX_DURATION",
            "LOAD_RETRIES",
            "LOAD_RETRY_AFTER",
            "LOAD_RETRY_DELAY",
            "LOAD_TIMEOUT",
            "LOAD_IDEMPOTENCY_KEYS",
            "TIMELINE_INTERVAL",
            "TIMELINE_RETENTION",
            "JOB_LEASE",
            "RECOVERY_INTERVAL",
            "HTTP_HEADER_READ_TIMEOUT",
            "HTTP_BODY_TIMEOUT",
            "HTTP_IDLE_TIMEOUT",
            "MEMORY_MAX_ORDERS",
            "HEDGE",
            "HEDGE_DELAY",
            "HEDGE_MAX",
            "CONCURRENCY_LIMIT",
            "CONCURRENCY_LIMIT_INITIAL",
            "CONCURRENCY_LIMIT_MAX",
            "THROTTLE",
            "THROTTLE_K",
            "THROTTLE_WINDOW",
            "PAYMENT_TAIL_RATE",
            "PAYMENT_TAIL_LATENCY",
            "PAYMENT_RETRY_AFTER",
            "PAYMENT_TIMEOUT_SCOPE",
            "PAYMENT_ADMIN_TOKEN",
        ] {
            assert!(help.contains(&format!("env: {var}")), "--help lacks {var}");
        }
        assert!(help.contains("[default: 0.0.0.0:8080]"));
        assert!(help.contains("[default: 30s]"));
    }
}
