//! The built-in traffic generator: `POST /orders` to the service's own
//! listener at a fixed rate, so a lab needs nothing but the binary.
//!
//! It is open-loop: request `k` of a run is due `k / rate` seconds after the
//! start whatever happened to the ones before, as with real users who do not
//! wait for each other. A slow service therefore meets more requests in
//! flight, not fewer requests; past `MAX_IN_FLIGHT` a due request is counted
//! as `skipped` instead of being sent late.
//!
//! Its clients are patient and polite by default: a 503 is counted and
//! dropped, and a request gets 30 s. `ClientBehaviour` makes them behave as
//! impatient clients and load balancers do: retry a 503 (honouring its
//! `Retry-After`, or not), give up on a request after a timeout and send it
//! again, with or without an Idempotency-Key, so that a retry storm can also
//! come from outside. Retries of one order share its place among the
//! requests in flight; a stopped run sends no more retries.
//!
//! Requests go over real connections (kept alive, opened as needed), so they
//! pass through the same HTTP stack, logs and metrics as a user's.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, StatusCode};
use bytes::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::events::{ChangeKind, Feed};
use crate::observability::metrics::{LoadMetrics, LOAD_OUTCOMES};
use crate::transport::Target;
use crate::units::HumanDuration;

/// The generator's bounds, in orders per second (LOAD_RATE and
/// `PUT /admin/load` alike).
pub const MIN_RATE: f64 = 0.1;
pub const MAX_RATE: f64 = 5000.0;
/// The longest run: the same bound as every other duration setting.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);
/// Requests in flight at most; a due request beyond it is skipped.
pub const MAX_IN_FLIGHT: usize = 512;
/// How long a client waits for an answer by default.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The most retries a client makes for one order.
pub const MAX_CLIENT_RETRIES: u32 = 10;
/// The longest client timeout and retry delay.
pub const MAX_CLIENT_WAIT: Duration = Duration::from_secs(60);
/// Synthetic customers the orders are spread over.
const CUSTOMERS: u32 = 1000;
const CURRENCIES: [&str; 3] = ["USD", "EUR", "GBP"];

/// A value the generator refuses, with the field it came from.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct LoadError {
    pub field: &'static str,
    pub message: String,
}

/// How the generator's clients treat a refusal or a slow answer.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, utoipa::ToSchema)]
pub struct ClientBehaviour {
    /// Times an order is sent again after a 503 or a client timeout (0: never).
    pub retries: u32,
    /// Before retrying a 503, wait what its `Retry-After` says (false: only
    /// `retry_delay`, as an impatient client does).
    pub retry_after: bool,
    /// The wait before a retry when there is no `Retry-After` to honour.
    #[schema(value_type = String, example = "0ms")]
    pub retry_delay: HumanDuration,
    /// How long a client waits for an answer before giving up on it.
    #[schema(value_type = String, example = "30s")]
    pub timeout: HumanDuration,
    /// Whether an order's retries carry one Idempotency-Key (false: a retry
    /// after a timeout may create a second order).
    pub idempotency_keys: bool,
}

impl Default for ClientBehaviour {
    fn default() -> Self {
        Self {
            retries: 0,
            retry_after: true,
            retry_delay: HumanDuration(Duration::ZERO),
            timeout: HumanDuration(REQUEST_TIMEOUT),
            idempotency_keys: true,
        }
    }
}

impl ClientBehaviour {
    /// Checks the bounds, naming the field as `client.<field>`.
    pub fn checked(self) -> Result<Self, LoadError> {
        let refuse = |field: &'static str, message: String| LoadError { field, message };
        if self.retries > MAX_CLIENT_RETRIES {
            return Err(refuse(
                "client.retries",
                format!(
                    "client.retries must be 0 to {MAX_CLIENT_RETRIES}, got {}",
                    self.retries
                ),
            ));
        }
        if self.timeout.0.is_zero() || self.timeout.0 > MAX_CLIENT_WAIT {
            return Err(refuse(
                "client.timeout",
                format!(
                    "client.timeout must be above zero and at most 60s, got {}",
                    crate::units::format_duration(self.timeout.0)
                ),
            ));
        }
        if self.retry_delay.0 > MAX_CLIENT_WAIT {
            return Err(refuse(
                "client.retry_delay",
                format!(
                    "client.retry_delay must be at most 60s, got {}",
                    crate::units::format_duration(self.retry_delay.0)
                ),
            ));
        }
        Ok(self)
    }
}

/// What to send: `rate` requests per second, for `duration` or until
/// stopped, by clients that behave as `client` says (absent: as the
/// generator was configured, `LOAD_RETRIES` and the rest).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadPlan {
    rate: f64,
    duration: Option<Duration>,
    client: Option<ClientBehaviour>,
}

impl LoadPlan {
    pub fn new(rate: f64, duration: Option<Duration>) -> Result<Self, LoadError> {
        if !(MIN_RATE..=MAX_RATE).contains(&rate) {
            return Err(LoadError {
                field: "rate",
                message: format!(
                    "rate must be a number of requests per second from {MIN_RATE} to {MAX_RATE}, got {rate}"
                ),
            });
        }
        if let Some(d) = duration {
            if d.is_zero() || d > MAX_DURATION {
                return Err(LoadError {
                    field: "duration",
                    message: format!(
                        "duration must be above zero and at most 24h, got {}",
                        crate::units::format_duration(d)
                    ),
                });
            }
        }
        Ok(Self {
            rate,
            duration,
            client: None,
        })
    }

    /// The same plan with clients that behave as `client` says.
    pub fn with_client(self, client: ClientBehaviour) -> Result<Self, LoadError> {
        Ok(Self {
            client: Some(client.checked()?),
            ..self
        })
    }

    pub fn rate(&self) -> f64 {
        self.rate
    }

    pub fn duration(&self) -> Option<Duration> {
        self.duration
    }

    /// The same plan ending after at most `max` (LOAD_MAX_DURATION): a plan
    /// with no end, or a longer one, gets `max` as its duration.
    pub fn bounded_by(self, max: Option<Duration>) -> Self {
        match max {
            Some(max) => Self {
                duration: Some(self.duration.map_or(max, |d| d.min(max))),
                ..self
            },
            None => self,
        }
    }

    /// How many requests the whole run sends, when it has an end.
    fn total(&self) -> Option<u64> {
        self.duration
            .map(|d| (d.as_secs_f64() * self.rate).ceil() as u64)
    }
}

/// Counts of generated requests by outcome.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema,
)]
pub struct LoadOutcomes {
    /// Answered 2xx: an order was taken (or given back for a repeated key).
    pub accepted: u64,
    /// Answered 503 (queue full); dropped, not retried.
    pub rejected: u64,
    /// Any other 4xx.
    pub client_error: u64,
    /// Any other 5xx.
    pub server_error: u64,
    /// No answer: the connection failed.
    pub transport_error: u64,
    /// Not sent: too many requests were already in flight.
    pub skipped: u64,
    /// No answer within the client's timeout (after its retries).
    #[serde(default)]
    pub timed_out: u64,
}

/// The generator as `GET /admin/load` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct LoadStatus {
    pub running: bool,
    /// Requests per second of the current or last run (none: never run).
    pub rate: Option<f64>,
    /// How long the run lasts (none: until stopped).
    pub duration: Option<String>,
    /// Seconds since the run started (until it ended, for a finished run).
    pub elapsed_seconds: f64,
    /// Requests due so far, skipped ones included.
    pub sent: u64,
    /// Requests whose answer (or failure) is still to come.
    pub in_flight: u64,
    /// What came of each order, after its retries.
    pub outcomes: LoadOutcomes,
    /// How the clients behave (the current or last run's; the configured
    /// behaviour before any run).
    pub client: ClientBehaviour,
    /// HTTP requests sent, retries included.
    pub attempts: u64,
    /// Retries sent after a 503, and after a client timeout.
    pub retries_after_503: u64,
    pub retries_after_timeout: u64,
}

/// One run's counters, shared by its generator and its requests.
struct RunCounts {
    sent: AtomicU64,
    outcomes: [AtomicU64; 7],
    attempts: AtomicU64,
    /// Retries after a 503, after a timeout.
    retries: [AtomicU64; 2],
    done: AtomicBool,
    /// When the run ended (stopped, or ran its course).
    ended: Mutex<Option<Instant>>,
}

impl RunCounts {
    /// Marks the run ended now; true only for the call that did it.
    fn finish(&self) -> bool {
        let first = !self.done.swap(true, Ordering::SeqCst);
        if first {
            *self.ended.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        }
        first
    }

    fn outcomes(&self) -> LoadOutcomes {
        let get = |i: usize| self.outcomes[i].load(Ordering::Relaxed);
        LoadOutcomes {
            accepted: get(0),
            rejected: get(1),
            client_error: get(2),
            server_error: get(3),
            transport_error: get(4),
            skipped: get(5),
            timed_out: get(6),
        }
    }
}

struct Run {
    plan: LoadPlan,
    client: ClientBehaviour,
    started: Instant,
    counts: Arc<RunCounts>,
    stop: CancellationToken,
}

/// Keep-alive connections to the service, opened as needed.
struct Connections {
    target: Target,
    idle: Mutex<Vec<SendRequest<Body>>>,
    closed: AtomicBool,
    tasks: TaskTracker,
}

impl Connections {
    async fn take(&self) -> Result<SendRequest<Body>, Box<dyn std::error::Error + Send + Sync>> {
        loop {
            let Some(mut sender) = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop() else {
                break;
            };
            if !sender.is_closed() && sender.ready().await.is_ok() {
                return Ok(sender);
            }
        }
        let stream = self.target.connect().await?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        // The connection runs until its sender is dropped or the server closes it.
        self.tasks.spawn(async move {
            let _ = connection.await;
        });
        Ok(sender)
    }

    fn give_back(&self, sender: SendRequest<Body>) {
        if !self.closed.load(Ordering::SeqCst) && !sender.is_closed() {
            self.idle
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(sender);
        }
    }

    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Sends one order once and says what came of it.
    async fn post(&self, body: Bytes, key: Option<&str>, timeout: Duration) -> Answer {
        let attempt = async {
            let mut sender = self.take().await?;
            let mut request = axum::http::Request::post("/orders")
                .header("host", self.target.host())
                .header("content-type", "application/json")
                .header("user-agent", "reliability-lab-load");
            if let Some(key) = key {
                request = request.header("idempotency-key", key);
            }
            let response = sender.send_request(request.body(Body::from(body))?).await?;
            let status = response.status();
            let retry_after = response
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            // Read the answer to the end so the connection can be reused.
            axum::body::to_bytes(Body::new(response.into_body()), 64 * 1024).await?;
            self.give_back(sender);
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((status, retry_after))
        };
        // A request given up on is dropped with its connection; the service
        // may still be working on it.
        match tokio::time::timeout(timeout, attempt).await {
            Ok(Ok((status, retry_after))) => Answer::Status(status, retry_after),
            Ok(Err(_)) => Answer::ConnectionFailed,
            Err(_) => Answer::TimedOut,
        }
    }
}

/// What one request came to.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Answer {
    /// The status, and a 503's `Retry-After` in whole seconds.
    Status(StatusCode, Option<Duration>),
    /// The connection failed.
    ConnectionFailed,
    /// No answer within the client's timeout.
    TimedOut,
}

impl Answer {
    /// An index into `LOAD_OUTCOMES`.
    fn outcome(self) -> usize {
        match self {
            Answer::Status(status, _) if status.is_success() => 0,
            Answer::Status(StatusCode::SERVICE_UNAVAILABLE, _) => 1,
            Answer::Status(status, _) if status.is_client_error() => 2,
            Answer::Status(..) => 3,
            Answer::ConnectionFailed => 4,
            Answer::TimedOut => 6,
        }
    }
}

/// The generator: at most one run at a time.
pub struct Traffic {
    connections: Arc<Connections>,
    /// How clients behave in a run whose plan does not say.
    client: ClientBehaviour,
    metrics: LoadMetrics,
    feed: Arc<Feed>,
    seed: Option<u64>,
    in_flight: Arc<Semaphore>,
    current: Mutex<Option<Run>>,
    tasks: TaskTracker,
    /// The longest a run lasts (LOAD_MAX_DURATION); None: as asked.
    max_duration: Option<Duration>,
}

impl std::fmt::Debug for Traffic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Traffic").finish_non_exhaustive()
    }
}

impl Traffic {
    /// A generator that sends to `target` (the service's own listener, or
    /// its in-memory one). With a seed, the customers and amounts of each
    /// run, and its Idempotency-Keys, are the same every time.
    pub fn new(
        target: Target,
        metrics: LoadMetrics,
        feed: Arc<Feed>,
        seed: Option<u64>,
        client: ClientBehaviour,
    ) -> Self {
        let tasks = TaskTracker::new();
        Self {
            connections: Arc::new(Connections {
                target,
                idle: Mutex::new(Vec::new()),
                closed: AtomicBool::new(false),
                tasks: tasks.clone(),
            }),
            client,
            metrics,
            feed,
            seed,
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            current: Mutex::new(None),
            tasks,
            max_duration: None,
        }
    }

    /// Every run ends after at most `max` (LOAD_MAX_DURATION).
    pub fn with_max_duration(mut self, max: Option<Duration>) -> Self {
        self.max_duration = max;
        self
    }

    /// How clients behave in a run whose plan does not say (the
    /// configuration's `LOAD_RETRIES` and the rest).
    pub fn default_client(&self) -> ClientBehaviour {
        self.client
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Run>> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a run, ending the one in progress first. Refused once the
    /// service is stopping.
    pub fn start(&self, plan: LoadPlan) -> Result<LoadStatus, LoadError> {
        let plan = plan.bounded_by(self.max_duration);
        if self.tasks.is_closed() {
            return Err(LoadError {
                field: "rate",
                message: "the service is stopping; no new traffic".into(),
            });
        }
        let status = {
            let mut current = self.lock();
            if let Some(old) = current.take() {
                end(&old);
            }
            let client = plan.client.unwrap_or(self.client);
            let run = Run {
                plan,
                client,
                started: Instant::now(),
                counts: Arc::new(RunCounts {
                    sent: AtomicU64::new(0),
                    outcomes: Default::default(),
                    attempts: AtomicU64::new(0),
                    retries: Default::default(),
                    done: AtomicBool::new(false),
                    ended: Mutex::new(None),
                }),
                stop: CancellationToken::new(),
            };
            let seed = self.seed.unwrap_or_else(rand::random);
            self.tasks.spawn(generate(
                plan,
                client,
                run.started,
                run.counts.clone(),
                run.stop.clone(),
                Sender {
                    connections: self.connections.clone(),
                    metrics: self.metrics.clone(),
                    in_flight: self.in_flight.clone(),
                    tasks: self.tasks.clone(),
                    feed: self.feed.clone(),
                    client,
                    // Keys unique to the run: a second run must not replay
                    // the first one's orders.
                    key_prefix: rand::random(),
                },
                StdRng::seed_from_u64(seed),
            ));
            let status = status_of(&run, &self.in_flight);
            *current = Some(run);
            status
        };
        self.feed.publish(
            ChangeKind::Load,
            match plan.duration {
                Some(d) => format!(
                    "traffic started: {} orders/s for {}",
                    plan.rate,
                    crate::units::format_duration(d)
                ),
                None => format!("traffic started: {} orders/s", plan.rate),
            },
            serde_json::to_value(&status).unwrap_or_default(),
        );
        Ok(status)
    }

    /// Stops the run in progress (its requests in flight still finish).
    pub fn stop(&self) -> LoadStatus {
        let (status, was_running) = {
            let current = self.lock();
            let Some(run) = current.as_ref() else {
                drop(current);
                return self.status();
            };
            let was_running = !run.counts.done.load(Ordering::SeqCst);
            end(run);
            (status_of(run, &self.in_flight), was_running)
        };
        if was_running {
            self.feed.publish(
                ChangeKind::Load,
                format!("traffic stopped after {} requests", status.sent),
                serde_json::to_value(&status).unwrap_or_default(),
            );
        }
        status
    }

    pub fn status(&self) -> LoadStatus {
        match self.lock().as_ref() {
            Some(run) => status_of(run, &self.in_flight),
            None => LoadStatus {
                running: false,
                rate: None,
                duration: None,
                elapsed_seconds: 0.0,
                sent: 0,
                in_flight: 0,
                outcomes: LoadOutcomes::default(),
                client: self.client,
                attempts: 0,
                retries_after_503: 0,
                retries_after_timeout: 0,
            },
        }
    }

    /// Stops for good: the run ends, no new one starts, and the requests in
    /// flight get until `deadline` to finish.
    pub async fn shutdown(&self, deadline: Instant) {
        if let Some(run) = self.lock().as_ref() {
            end(run);
        }
        self.tasks.close();
        self.connections.close();
        if tokio::time::timeout_at(deadline, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("generated requests still in flight at the shutdown deadline");
        }
    }
}

/// Marks a run as ended now (once).
fn end(run: &Run) {
    run.stop.cancel();
    run.counts.finish();
}

fn status_of(run: &Run, in_flight: &Semaphore) -> LoadStatus {
    status(&run.plan, run.client, run.started, &run.counts, in_flight)
}

fn status(
    plan: &LoadPlan,
    client: ClientBehaviour,
    started: Instant,
    counts: &RunCounts,
    in_flight: &Semaphore,
) -> LoadStatus {
    let ended = *counts.ended.lock().unwrap_or_else(|p| p.into_inner());
    let until = ended.unwrap_or_else(Instant::now);
    LoadStatus {
        running: !counts.done.load(Ordering::SeqCst),
        rate: Some(plan.rate),
        duration: plan.duration.map(crate::units::format_duration),
        elapsed_seconds: (until.duration_since(started).as_secs_f64() * 1000.0).round() / 1000.0,
        sent: counts.sent.load(Ordering::Relaxed),
        in_flight: (MAX_IN_FLIGHT - in_flight.available_permits()) as u64,
        outcomes: counts.outcomes(),
        client,
        attempts: counts.attempts.load(Ordering::Relaxed),
        retries_after_503: counts.retries[0].load(Ordering::Relaxed),
        retries_after_timeout: counts.retries[1].load(Ordering::Relaxed),
    }
}

/// What a run needs to send one request.
struct Sender {
    connections: Arc<Connections>,
    metrics: LoadMetrics,
    in_flight: Arc<Semaphore>,
    tasks: TaskTracker,
    feed: Arc<Feed>,
    client: ClientBehaviour,
    key_prefix: u64,
}

impl Sender {
    /// Sends order `k` of the run, retrying as the clients do.
    fn fire(&self, counts: &Arc<RunCounts>, stop: &CancellationToken, k: u64, body: String) {
        counts.sent.fetch_add(1, Ordering::Relaxed);
        let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
            self.count(counts, 5);
            return;
        };
        let connections = self.connections.clone();
        let metrics = self.metrics.clone();
        let counts = counts.clone();
        let stop = stop.clone();
        let client = self.client;
        let key = (client.retries > 0 && client.idempotency_keys)
            .then(|| format!("load-{:016x}-{k}", self.key_prefix));
        self.tasks.spawn(async move {
            let body = Bytes::from(body);
            let mut retries = 0;
            let outcome = loop {
                counts.attempts.fetch_add(1, Ordering::Relaxed);
                let answer = connections
                    .post(body.clone(), key.as_deref(), client.timeout.0)
                    .await;
                let (reason, wait) = match answer {
                    Answer::Status(StatusCode::SERVICE_UNAVAILABLE, retry_after) => (
                        0,
                        match retry_after {
                            Some(after) if client.retry_after => after.max(client.retry_delay.0),
                            _ => client.retry_delay.0,
                        },
                    ),
                    Answer::TimedOut => (1, client.retry_delay.0),
                    other => break other.outcome(),
                };
                if retries >= client.retries || stop.is_cancelled() {
                    break answer.outcome();
                }
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => break answer.outcome(),
                    _ = tokio::time::sleep(wait) => {}
                }
                retries += 1;
                counts.retries[reason].fetch_add(1, Ordering::Relaxed);
                metrics.count_retry(reason == 1);
            };
            counts.outcomes[outcome].fetch_add(1, Ordering::Relaxed);
            metrics.count(LOAD_OUTCOMES[outcome]);
            drop(permit);
        });
    }

    fn count(&self, counts: &RunCounts, outcome: usize) {
        counts.outcomes[outcome].fetch_add(1, Ordering::Relaxed);
        self.metrics.count(LOAD_OUTCOMES[outcome]);
    }
}

/// A synthetic order: one of `CUSTOMERS` customers, 1.00 to 500.00.
fn order_body(rng: &mut StdRng) -> String {
    let customer = rng.random_range(0..CUSTOMERS);
    let amount: i64 = rng.random_range(100..=50_000);
    let currency = CURRENCIES[rng.random_range(0..CURRENCIES.len())];
    format!(r#"{{"customer_id":"load-{customer:04}","amount":{amount},"currency":"{currency}"}}"#)
}

/// One run: request `k` is due at `started + k / rate`.
async fn generate(
    plan: LoadPlan,
    client: ClientBehaviour,
    started: Instant,
    counts: Arc<RunCounts>,
    stop: CancellationToken,
    sender: Sender,
    mut rng: StdRng,
) {
    let total = plan.total();
    let mut sent: u64 = 0;
    loop {
        if total.is_some_and(|t| sent >= t) {
            break;
        }
        let next_due = started + Duration::from_secs_f64(sent as f64 / plan.rate);
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep_until(next_due) => {}
        }
        // Everything due by now goes at once: timers tick in milliseconds,
        // and at high rates several requests share a tick.
        // The request slept for is due whatever the rounding says: at
        // exactly its time (a paused clock wakes there), `elapsed * rate`
        // can come out a hair below `sent`, and without the `max` the loop
        // would wake at once, send nothing and never let the clock move.
        let elapsed = Instant::now().duration_since(started).as_secs_f64();
        let mut due = ((elapsed * plan.rate).floor() as u64 + 1).max(sent + 1);
        if let Some(t) = total {
            due = due.min(t);
        }
        while sent < due {
            sender.fire(&counts, &stop, sent, order_body(&mut rng));
            sent += 1;
        }
    }
    // Ran its course.
    if counts.finish() {
        let status = status(&plan, client, started, &counts, &sender.in_flight);
        sender.feed.publish(
            ChangeKind::Load,
            format!("traffic finished: {sent} requests sent"),
            serde_json::to_value(&status).unwrap_or_default(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    #[test]
    fn rates_and_durations_outside_the_bounds_are_refused_by_name() {
        assert_eq!(LoadPlan::new(0.05, None).unwrap_err().field, "rate");
        assert_eq!(LoadPlan::new(5000.5, None).unwrap_err().field, "rate");
        assert_eq!(LoadPlan::new(f64::NAN, None).unwrap_err().field, "rate");
        let zero = LoadPlan::new(1.0, Some(Duration::ZERO)).unwrap_err();
        assert_eq!(zero.field, "duration");
        assert!(LoadPlan::new(0.1, Some(MAX_DURATION)).is_ok());
        assert!(LoadPlan::new(5000.0, None).is_ok());
        assert_eq!(
            LoadPlan::new(2.0, Some(Duration::from_millis(1500)))
                .unwrap()
                .total(),
            Some(3)
        );
    }

    #[test]
    fn a_maximum_duration_bounds_runs_without_an_end_and_longer_ones() {
        let max = Some(Duration::from_secs(2));
        let endless = LoadPlan::new(5.0, None).unwrap();
        assert_eq!(endless.bounded_by(max).duration(), max);
        assert_eq!(endless.bounded_by(None).duration(), None);
        let long = LoadPlan::new(5.0, Some(Duration::from_secs(60))).unwrap();
        assert_eq!(long.bounded_by(max).duration(), max);
        let short = LoadPlan::new(5.0, Some(Duration::from_secs(1))).unwrap();
        assert_eq!(
            short.bounded_by(max).duration(),
            Some(Duration::from_secs(1))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_generator_with_a_maximum_stops_an_endless_run_there() {
        let traffic = unanswered().with_max_duration(Some(Duration::from_millis(500)));
        let started = traffic.start(LoadPlan::new(10.0, None).unwrap()).unwrap();
        assert_eq!(started.duration.as_deref(), Some("500ms"));
        tokio::time::sleep(Duration::from_secs(2)).await;
        let status = traffic.status();
        assert!(!status.running, "{status:?}");
        assert_eq!(status.sent, 5, "{status:?}");
    }

    /// A generator aimed at a port nothing listens on: every request is a
    /// transport error at once, which leaves the schedule to look at.
    fn unanswered() -> Traffic {
        let metrics = crate::observability::Metrics::new();
        let feed = Arc::new(Feed::new(Instant::now()));
        Traffic::new(
            Target::Tcp("127.0.0.1:1".parse().unwrap()),
            metrics.load(),
            feed,
            Some(1),
            ClientBehaviour::default(),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn request_k_goes_at_k_over_rate_whatever_happened_to_the_others() {
        let traffic = unanswered();
        traffic.start(LoadPlan::new(10.0, None).unwrap()).unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
        // The first at once, then one every 100 ms.
        assert_eq!(traffic.status().sent, 1);
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(traffic.status().sent, 3);
        tokio::time::sleep(Duration::from_millis(750)).await;
        let status = traffic.status();
        assert_eq!(status.sent, 11);
        assert!(status.running);
        let stopped = traffic.stop();
        assert!(!stopped.running);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = traffic.status();
        assert_eq!(after.sent, 11, "nothing is sent after a stop");
        assert_eq!(after.outcomes.transport_error, 11);
    }

    /// On a paused clock the generator wakes exactly at a request's due
    /// time, where `elapsed * rate` may round to just below it. It must
    /// still send that request and go on: were it to wake and send nothing,
    /// it would never wait again and the clock would never move. The run
    /// goes on a thread of its own so that a hang fails the test (after a
    /// generous wall-clock wait) instead of hanging the suite.
    #[test]
    fn on_a_paused_clock_every_rate_sends_its_requests_and_lets_time_move() {
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap();
            let sent: Vec<u64> = runtime.block_on(async {
                let mut sent = Vec::new();
                for rate in [3.0, 7.0, 30.0, 40.0, 50.0, 300.0] {
                    let traffic = unanswered_in_memory();
                    let plan = LoadPlan::new(rate, Some(Duration::from_secs(2))).unwrap();
                    traffic.start(plan).unwrap();
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    sent.push(traffic.status().sent);
                }
                sent
            });
            let _ = done.send(sent);
        });
        let sent = finished
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("the generator spun without letting the paused clock move");
        assert_eq!(sent, [6, 14, 60, 80, 100, 600]);
    }

    /// A client timeout on the paused clock, over in-memory connections: the
    /// first request hangs, and the retry goes exactly one timeout (plus
    /// the retry delay) after it was sent, with the same key.
    #[tokio::test(start_paused = true)]
    async fn a_retry_after_a_hung_request_goes_one_timeout_after_it() {
        use hyper::service::service_fn;
        let (connector, listener) = crate::transport::memory();
        type Arrivals = Arc<Mutex<Vec<(Instant, Option<String>)>>>;
        let seen: Arrivals = Arc::default();
        let log = seen.clone();
        tokio::spawn(async move {
            let mut listener = crate::transport::Listener::Memory(listener);
            while let Ok(conn) = listener.accept().await {
                let log = log.clone();
                tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(
                    TokioIo::new(conn),
                    service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                        let key = request
                            .headers()
                            .get("idempotency-key")
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned);
                        let first = {
                            let mut log = log.lock().unwrap();
                            log.push((Instant::now(), key));
                            log.len() == 1
                        };
                        async move {
                            if first {
                                std::future::pending::<()>().await;
                            }
                            Ok::<_, std::convert::Infallible>(
                                hyper::Response::builder()
                                    .status(201)
                                    .body(http_body_util::Empty::<Bytes>::new())
                                    .unwrap(),
                            )
                        }
                    }),
                ));
            }
        });
        let metrics = crate::observability::Metrics::new();
        let feed = Arc::new(Feed::new(Instant::now()));
        let behaviour = ClientBehaviour {
            retry_delay: HumanDuration(Duration::from_millis(300)),
            ..client(1, true, Duration::from_secs(2))
        };
        let traffic = Traffic::new(
            Target::Memory(connector),
            metrics.load(),
            feed,
            Some(1),
            behaviour,
        );
        traffic
            .start(LoadPlan::new(1.0, Some(Duration::from_millis(500))).unwrap())
            .unwrap();
        tokio::time::sleep(Duration::from_secs(10)).await;
        let status = traffic.status();
        assert_eq!(status.outcomes.accepted, 1, "{status:?}");
        assert_eq!((status.attempts, status.retries_after_timeout), (2, 1));
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[1].0 - seen[0].0, Duration::from_millis(2300));
        assert!(seen[0].1.is_some() && seen[0].1 == seen[1].1, "{seen:?}");
    }

    /// A generator whose target refuses every connection at once, without
    /// a socket (a paused clock must not wait on one).
    fn unanswered_in_memory() -> Traffic {
        let metrics = crate::observability::Metrics::new();
        let feed = Arc::new(Feed::new(Instant::now()));
        let (connector, listener) = crate::transport::memory();
        drop(listener);
        Traffic::new(
            Target::Memory(connector),
            metrics.load(),
            feed,
            Some(1),
            ClientBehaviour::default(),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_run_with_a_duration_sends_rate_times_duration_and_ends_by_itself() {
        let traffic = unanswered();
        let plan = LoadPlan::new(4.0, Some(Duration::from_secs(2))).unwrap();
        traffic.start(plan).unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
        let status = traffic.status();
        assert!(!status.running);
        assert_eq!(status.sent, 8);
        // Ended when the last request went, at 7/4 s.
        assert_eq!(status.elapsed_seconds, 1.75);
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_run_replaces_the_one_in_progress_and_nothing_starts_after_shutdown() {
        let traffic = unanswered();
        traffic.start(LoadPlan::new(10.0, None).unwrap()).unwrap();
        tokio::time::sleep(Duration::from_millis(450)).await;
        traffic.start(LoadPlan::new(1.0, None).unwrap()).unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let status = traffic.status();
        assert_eq!(status.rate, Some(1.0));
        assert_eq!(status.sent, 2, "the new run counts from zero");
        traffic
            .shutdown(Instant::now() + Duration::from_secs(1))
            .await;
        assert!(!traffic.status().running);
        let refused = traffic
            .start(LoadPlan::new(1.0, None).unwrap())
            .unwrap_err();
        assert!(refused.message.contains("stopping"), "{refused}");
    }

    #[test]
    fn synthetic_orders_are_valid_requests_and_follow_the_seed() {
        let mut a = StdRng::seed_from_u64(7);
        let mut b = StdRng::seed_from_u64(7);
        for _ in 0..100 {
            let body = order_body(&mut a);
            assert_eq!(body, order_body(&mut b));
            let request: crate::orders::CreateOrderRequest = serde_json::from_str(&body).unwrap();
            request.parse().unwrap();
        }
    }

    // --- the clients' behaviour, against a scripted server (real clock) ----

    #[derive(Clone, Copy, Debug)]
    enum Reply {
        Created,
        /// 503 with `Retry-After` of that many seconds.
        Busy(u64),
        /// Reads the request and never answers.
        Hang,
    }

    /// A server on 127.0.0.1 that answers request `i` with `script[i]` (the
    /// last entry for the rest) and records each request's arrival and
    /// Idempotency-Key.
    async fn scripted(
        script: Vec<Reply>,
    ) -> (
        SocketAddr,
        Arc<Mutex<Vec<(std::time::Instant, Option<String>)>>>,
    ) {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (script, log) = (script.clone(), log.clone());
                tokio::spawn(async move {
                    let (read, mut write) = stream.into_split();
                    let mut read = BufReader::new(read);
                    loop {
                        let (mut key, mut length) = (None, 0usize);
                        loop {
                            let mut line = String::new();
                            if read.read_line(&mut line).await.unwrap_or(0) == 0 {
                                return;
                            }
                            let line = line.trim_end();
                            if line.is_empty() {
                                break;
                            }
                            let lower = line.to_ascii_lowercase();
                            if let Some(v) = lower.strip_prefix("idempotency-key:") {
                                key = Some(v.trim().to_owned());
                            }
                            if let Some(v) = lower.strip_prefix("content-length:") {
                                length = v.trim().parse().unwrap();
                            }
                        }
                        let mut body = vec![0; length];
                        read.read_exact(&mut body).await.unwrap();
                        let i = {
                            let mut log = log.lock().unwrap();
                            log.push((std::time::Instant::now(), key));
                            log.len() - 1
                        };
                        let reply = script[i.min(script.len() - 1)];
                        let text = match reply {
                            Reply::Created => "HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\n{}".to_owned(),
                            Reply::Busy(secs) => format!("HTTP/1.1 503 Service Unavailable\r\nretry-after: {secs}\r\ncontent-length: 2\r\n\r\n{{}}"),
                            Reply::Hang => {
                                std::future::pending::<()>().await;
                                unreachable!()
                            }
                        };
                        if write.write_all(text.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (addr, seen)
    }

    fn client(retries: u32, retry_after: bool, timeout: Duration) -> ClientBehaviour {
        ClientBehaviour {
            retries,
            retry_after,
            timeout: HumanDuration(timeout),
            ..ClientBehaviour::default()
        }
    }

    /// One order through a generator aimed at `addr`; its status once done.
    async fn one_order(addr: SocketAddr, client: ClientBehaviour) -> LoadStatus {
        let metrics = crate::observability::Metrics::new();
        let feed = Arc::new(Feed::new(Instant::now()));
        let traffic = Traffic::new(Target::Tcp(addr), metrics.load(), feed, Some(1), client);
        traffic
            .start(LoadPlan::new(1.0, Some(Duration::from_millis(500))).unwrap())
            .unwrap();
        for _ in 0..400 {
            let status = traffic.status();
            if !status.running && status.in_flight == 0 {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the order never finished: {:?}", traffic.status());
    }

    #[tokio::test]
    async fn an_impatient_client_retries_a_503_at_once_with_the_same_key() {
        // Retry-After says 30 s: a client that waited would not finish
        // within one_order's few seconds.
        let (addr, seen) = scripted(vec![Reply::Busy(30), Reply::Busy(30), Reply::Created]).await;
        let status = one_order(addr, client(3, false, REQUEST_TIMEOUT)).await;
        assert_eq!(status.outcomes.accepted, 1, "{status:?}");
        assert_eq!((status.attempts, status.retries_after_503), (3, 2));
        let seen = seen.lock().unwrap();
        let keys: Vec<_> = seen.iter().map(|(_, k)| k.clone().unwrap()).collect();
        assert_eq!(keys.len(), 3);
        assert!(keys.iter().all(|k| *k == keys[0]), "{keys:?}");
    }

    #[tokio::test]
    async fn a_polite_client_waits_retry_after_and_gives_up_after_its_retries() {
        let (addr, seen) = scripted(vec![Reply::Busy(1)]).await;
        let status = one_order(addr, client(1, true, REQUEST_TIMEOUT)).await;
        assert_eq!(status.outcomes.rejected, 1, "{status:?}");
        assert_eq!((status.attempts, status.retries_after_503), (2, 1));
        let seen = seen.lock().unwrap();
        assert!(
            seen[1].0 - seen[0].0 >= Duration::from_secs(1),
            "waited Retry-After"
        );
    }

    #[tokio::test]
    async fn a_client_that_times_out_sends_again_and_without_keys_sends_none() {
        let (addr, seen) = scripted(vec![Reply::Hang, Reply::Created]).await;
        let status = one_order(addr, client(2, true, Duration::from_millis(200))).await;
        assert_eq!(status.outcomes.accepted, 1, "{status:?}");
        assert_eq!((status.attempts, status.retries_after_timeout), (2, 1));
        {
            let seen = seen.lock().unwrap();
            assert!(seen[0].1.is_some() && seen[0].1 == seen[1].1, "{seen:?}");
        }

        let (addr, seen) = scripted(vec![Reply::Hang]).await;
        let status = one_order(
            addr,
            ClientBehaviour {
                idempotency_keys: false,
                ..client(1, true, Duration::from_millis(100))
            },
        )
        .await;
        assert_eq!(status.outcomes.timed_out, 1, "{status:?}");
        assert_eq!(status.attempts, 2);
        assert!(seen.lock().unwrap().iter().all(|(_, k)| k.is_none()));
    }

    #[tokio::test]
    async fn a_stopped_run_sends_no_more_retries() {
        let (addr, seen) = scripted(vec![Reply::Busy(1)]).await;
        let metrics = crate::observability::Metrics::new();
        let feed = Arc::new(Feed::new(Instant::now()));
        let slow = ClientBehaviour {
            retry_delay: HumanDuration(Duration::from_secs(30)),
            ..client(5, false, REQUEST_TIMEOUT)
        };
        let traffic = Traffic::new(Target::Tcp(addr), metrics.load(), feed, Some(1), slow);
        traffic.start(LoadPlan::new(1.0, None).unwrap()).unwrap();
        while seen.lock().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        traffic.stop();
        for _ in 0..200 {
            if traffic.status().in_flight == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let status = traffic.status();
        assert_eq!(status.in_flight, 0, "the waiting retry ended with the run");
        assert_eq!((status.attempts, status.outcomes.rejected), (1, 1));
    }

    #[test]
    fn client_bounds_are_checked_by_name() {
        let plan = LoadPlan::new(1.0, None).unwrap();
        let over = |c: ClientBehaviour| plan.with_client(c).unwrap_err().field;
        assert_eq!(over(client(11, true, REQUEST_TIMEOUT)), "client.retries");
        assert_eq!(over(client(1, true, Duration::ZERO)), "client.timeout");
        assert_eq!(
            over(client(1, true, Duration::from_secs(61))),
            "client.timeout"
        );
        let slow = ClientBehaviour {
            retry_delay: HumanDuration(Duration::from_secs(61)),
            ..ClientBehaviour::default()
        };
        assert_eq!(over(slow), "client.retry_delay");
        assert!(plan.with_client(client(10, false, MAX_CLIENT_WAIT)).is_ok());
    }
}
