//! The built-in traffic generator: `POST /orders` to the service's own
//! listener at a fixed rate, so a lab needs nothing but the binary.
//!
//! It is open-loop: request `k` of a run is due `k / rate` seconds after the
//! start whatever happened to the ones before, as with real users who do not
//! wait for each other. A slow service therefore meets more requests in
//! flight, not fewer requests; past `MAX_IN_FLIGHT` a due request is counted
//! as `skipped` instead of being sent late. Nothing is retried: a 503 is
//! counted and dropped.
//!
//! Requests go over real connections (kept alive, opened as needed), so they
//! pass through the same HTTP stack, logs and metrics as a user's.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
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

pub use crate::config::{LOAD_RATE_MAX as MAX_RATE, LOAD_RATE_MIN as MIN_RATE};
/// The longest run: the same bound as every other duration setting.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);
/// Requests in flight at most; a due request beyond it is skipped.
pub const MAX_IN_FLIGHT: usize = 512;
/// A request with no answer in this long counts as a transport error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
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

/// What to send: `rate` requests per second, for `duration` or until stopped.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadPlan {
    rate: f64,
    duration: Option<Duration>,
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
        Ok(Self { rate, duration })
    }

    pub fn rate(&self) -> f64 {
        self.rate
    }

    pub fn duration(&self) -> Option<Duration> {
        self.duration
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
    /// No answer: the connection failed or the request timed out.
    pub transport_error: u64,
    /// Not sent: too many requests were already in flight.
    pub skipped: u64,
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
    pub outcomes: LoadOutcomes,
}

/// One run's counters, shared by its generator and its requests.
struct RunCounts {
    sent: AtomicU64,
    outcomes: [AtomicU64; 6],
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
        }
    }
}

struct Run {
    plan: LoadPlan,
    started: Instant,
    counts: Arc<RunCounts>,
    stop: CancellationToken,
}

/// Keep-alive connections to the service, opened as needed.
struct Connections {
    target: SocketAddr,
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
        let stream = tokio::net::TcpStream::connect(self.target).await?;
        stream.set_nodelay(true)?;
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

    /// Sends one order and says what came of it (an index into `LOAD_OUTCOMES`).
    async fn post(&self, body: String) -> usize {
        let attempt = async {
            let mut sender = self.take().await?;
            let request = axum::http::Request::post("/orders")
                .header("host", self.target.to_string())
                .header("content-type", "application/json")
                .header("user-agent", "reliability-lab-load")
                .body(Body::from(body))?;
            let response = sender.send_request(request).await?;
            let status = response.status();
            // Read the answer to the end so the connection can be reused.
            axum::body::to_bytes(Body::new(response.into_body()), 64 * 1024).await?;
            self.give_back(sender);
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(status)
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, attempt).await {
            Ok(Ok(status)) if status.is_success() => 0,
            Ok(Ok(status)) if status == axum::http::StatusCode::SERVICE_UNAVAILABLE => 1,
            Ok(Ok(status)) if status.is_client_error() => 2,
            Ok(Ok(_)) => 3,
            Ok(Err(_)) | Err(_) => 4,
        }
    }
}

/// The generator: at most one run at a time.
pub struct Traffic {
    connections: Arc<Connections>,
    metrics: LoadMetrics,
    feed: Arc<Feed>,
    seed: Option<u64>,
    in_flight: Arc<Semaphore>,
    current: Mutex<Option<Run>>,
    tasks: TaskTracker,
}

impl std::fmt::Debug for Traffic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Traffic").finish_non_exhaustive()
    }
}

impl Traffic {
    /// A generator that sends to `target` (the service's own listener; an
    /// unspecified address is reached over loopback). With a seed, the
    /// customers and amounts of each run are the same every time.
    pub fn new(
        target: SocketAddr,
        metrics: LoadMetrics,
        feed: Arc<Feed>,
        seed: Option<u64>,
    ) -> Self {
        let mut target = target;
        if target.ip().is_unspecified() {
            target.set_ip(match target {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        let tasks = TaskTracker::new();
        Self {
            connections: Arc::new(Connections {
                target,
                idle: Mutex::new(Vec::new()),
                closed: AtomicBool::new(false),
                tasks: tasks.clone(),
            }),
            metrics,
            feed,
            seed,
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            current: Mutex::new(None),
            tasks,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Run>> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a run, ending the one in progress first. Refused once the
    /// service is stopping.
    pub fn start(&self, plan: LoadPlan) -> Result<LoadStatus, LoadError> {
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
            let run = Run {
                plan,
                started: Instant::now(),
                counts: Arc::new(RunCounts {
                    sent: AtomicU64::new(0),
                    outcomes: Default::default(),
                    done: AtomicBool::new(false),
                    ended: Mutex::new(None),
                }),
                stop: CancellationToken::new(),
            };
            let seed = self.seed.unwrap_or_else(rand::random);
            self.tasks.spawn(generate(
                plan,
                run.started,
                run.counts.clone(),
                run.stop.clone(),
                Sender {
                    connections: self.connections.clone(),
                    metrics: self.metrics.clone(),
                    in_flight: self.in_flight.clone(),
                    tasks: self.tasks.clone(),
                    feed: self.feed.clone(),
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
    status(&run.plan, run.started, &run.counts, in_flight)
}

fn status(
    plan: &LoadPlan,
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
    }
}

/// What a run needs to send one request.
struct Sender {
    connections: Arc<Connections>,
    metrics: LoadMetrics,
    in_flight: Arc<Semaphore>,
    tasks: TaskTracker,
    feed: Arc<Feed>,
}

impl Sender {
    fn fire(&self, counts: &Arc<RunCounts>, body: String) {
        counts.sent.fetch_add(1, Ordering::Relaxed);
        let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
            self.count(counts, 5);
            return;
        };
        let connections = self.connections.clone();
        let metrics = self.metrics.clone();
        let counts = counts.clone();
        self.tasks.spawn(async move {
            let outcome = connections.post(body).await;
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
        let elapsed = Instant::now().duration_since(started).as_secs_f64();
        let mut due = (elapsed * plan.rate).floor() as u64 + 1;
        if let Some(t) = total {
            due = due.min(t);
        }
        while sent < due {
            sender.fire(&counts, order_body(&mut rng));
            sent += 1;
        }
    }
    // Ran its course.
    if counts.finish() {
        let status = status(&plan, started, &counts, &sender.in_flight);
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

    /// A generator aimed at a port nothing listens on: every request is a
    /// transport error at once, which leaves the schedule to look at.
    fn unanswered() -> Traffic {
        let metrics = crate::observability::Metrics::new();
        let feed = Arc::new(Feed::new(Instant::now()));
        Traffic::new(
            "127.0.0.1:1".parse().unwrap(),
            metrics.load(),
            feed,
            Some(1),
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
}
