//! `/admin/load`, `/admin/timeline` and `/admin/events`: the lab's
//! instruments as endpoints. The generator and the recorder live in `lab`;
//! this module only translates.
//!
//! The event stream is Server-Sent Events: first a `hello` event with what a
//! page needs to draw at once (settings, switches, the generator, the last
//! two minutes of samples, the recent changes), then every `sample` and
//! `change` as it happens. A listener that cannot keep up skips ahead and
//! gets a `lagged` event saying how many it missed; nothing waits for it.
//! Streams end when the service stops.

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, Stream, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast::error::RecvError;

use super::error::ErrorBody;
use super::{ApiError, AppState, JsonBody};
use crate::lab::{Change, ChangeKind, ClientBehaviour, LabEvent, LoadPlan, LoadStatus, Sample};
use crate::payment::SettingsView;
use crate::reliability::{BreakerPolicy, BreakerSettings, BreakerSnapshot, Switches};
use crate::units::HumanDuration;

/// How much history the `hello` event carries: what the console charts.
const HELLO_HISTORY: Duration = Duration::from_secs(120);
/// The most samples a `hello` carries.
const HELLO_MAX_SAMPLES: usize = 2000;
/// A comment line this often keeps proxies from closing a quiet stream.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// What `PUT /admin/load` takes. Unknown fields are refused.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoadRequest {
    /// Orders per second, 0.1 to 5000.
    #[schema(minimum = 0.1, maximum = 5000, example = 20)]
    rate: f64,
    /// How long to send; absent: until `DELETE /admin/load`.
    #[serde(default, deserialize_with = "crate::units::de_duration")]
    #[schema(schema_with = crate::units::duration_schema)]
    duration: Option<Duration>,
    /// How the clients behave; fields left out keep the configured
    /// behaviour (`LOAD_RETRIES`, `LOAD_RETRY_AFTER`, `LOAD_RETRY_DELAY`,
    /// `LOAD_TIMEOUT`, `LOAD_IDEMPOTENCY_KEYS`).
    client: Option<ClientRequest>,
}

/// A change to how the generator's clients behave, for one run.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClientRequest {
    /// Times an order is sent again after a 503 or a client timeout, 0 to 10.
    #[schema(minimum = 0, maximum = 10)]
    retries: Option<u32>,
    /// Wait a 503's Retry-After before retrying (false: only retry_delay).
    #[serde(default, deserialize_with = "crate::units::de_switch")]
    #[schema(schema_with = crate::units::switch_schema)]
    retry_after: Option<bool>,
    /// The wait before a retry when there is no Retry-After to honour; at most 60s.
    #[serde(default, deserialize_with = "crate::units::de_duration")]
    #[schema(schema_with = crate::units::duration_schema)]
    retry_delay: Option<Duration>,
    /// How long a client waits for an answer; above zero, at most 60s.
    #[serde(default, deserialize_with = "crate::units::de_duration")]
    #[schema(schema_with = crate::units::duration_schema)]
    timeout: Option<Duration>,
    /// Whether an order's retries carry one Idempotency-Key.
    #[serde(default, deserialize_with = "crate::units::de_switch")]
    #[schema(schema_with = crate::units::switch_schema)]
    idempotency_keys: Option<bool>,
}

impl ClientRequest {
    fn apply_to(&self, current: ClientBehaviour) -> ClientBehaviour {
        ClientBehaviour {
            retries: self.retries.unwrap_or(current.retries),
            retry_after: self.retry_after.unwrap_or(current.retry_after),
            retry_delay: self.retry_delay.map_or(current.retry_delay, HumanDuration),
            timeout: self.timeout.map_or(current.timeout, HumanDuration),
            idempotency_keys: self.idempotency_keys.unwrap_or(current.idempotency_keys),
        }
    }
}

#[utoipa::path(get, path = "/admin/load", tag = "admin", security(("admin_token" = [])),
    responses(
        (status = 200, description = "The traffic generator: the current or last run", body = LoadStatus),
        (status = 401, description = "ADMIN_TOKEN is set and was not sent", body = ErrorBody),
    ))]
pub async fn get_load(State(state): State<AppState>) -> Response {
    Json(state.lab.instruments.traffic.status()).into_response()
}

#[utoipa::path(put, path = "/admin/load", tag = "admin", security(("admin_token" = [])),
    request_body(content = LoadRequest, description = "Start sending POST /orders to this service at `rate` per second; a run in progress is replaced"),
    responses(
        (status = 200, description = "Started; the new run", body = LoadStatus),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "ADMIN_TOKEN is set and was not sent", body = ErrorBody),
        (status = 408, description = "The body did not arrive in time", body = ErrorBody),
        (status = 413, description = "The body is over 16 KiB", body = ErrorBody),
        (status = 415, description = "Not application/json", body = ErrorBody),
        (status = 422, description = "A bad or unknown field, named (rate outside 0.1 to 5000, a duration of zero or above 24h, client.retries above 10, a client wait above 60s); nothing changed", body = ErrorBody),
    ))]
pub async fn put_load(
    State(state): State<AppState>,
    JsonBody(request): JsonBody<LoadRequest>,
) -> Result<Response, ApiError> {
    let traffic = &state.lab.instruments.traffic;
    let mut plan = LoadPlan::new(request.rate, request.duration)?;
    if let Some(client) = &request.client {
        plan = plan.with_client(client.apply_to(traffic.default_client()))?;
    }
    let status = traffic.start(plan)?;
    tracing::warn!(rate = plan.rate(), duration = ?plan.duration(), "traffic started by the admin API");
    Ok(Json(status).into_response())
}

#[utoipa::path(delete, path = "/admin/load", tag = "admin", security(("admin_token" = [])),
    responses(
        (status = 200, description = "Stopped (or was not running); the run as it ended", body = LoadStatus),
        (status = 401, description = "ADMIN_TOKEN is set and was not sent", body = ErrorBody),
    ))]
pub async fn delete_load(State(state): State<AppState>) -> Response {
    Json(state.lab.instruments.traffic.stop()).into_response()
}

/// Samples after a sequence number.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TimelineView {
    /// Seconds between samples.
    pub interval: f64,
    /// How many samples the service keeps.
    pub capacity: usize,
    /// The newest sample's `seq` (0 before the first): pass it as `since`
    /// next time to get only what is new.
    pub last_seq: u64,
    pub samples: Vec<Sample>,
}

#[utoipa::path(get, path = "/admin/timeline", tag = "admin", security(("admin_token" = [])),
    params(("since" = Option<i64>, Query, minimum = 0, description = "Only samples with a greater seq (default 0: all kept)")),
    responses(
        (status = 200, description = "The samples kept, oldest first", body = TimelineView),
        (status = 400, description = "since is not a whole number", body = ErrorBody),
        (status = 401, description = "ADMIN_TOKEN is set and was not sent", body = ErrorBody),
    ))]
pub async fn get_timeline(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let since = match query.get("since") {
        None => 0,
        // Within i64, as the document's int64 says; a seq never gets near it.
        Some(raw) => raw.parse::<i64>().ok().and_then(|n| u64::try_from(n).ok()).ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_since",
                format!("since must be a whole number from 0 to 9223372036854775807 (a sample's seq), got {raw:?}"),
            )
            .with_field("since")
        })?,
    };
    let timeline = &state.lab.instruments.timeline;
    let samples: Vec<Sample> = timeline
        .since(since)
        .iter()
        .map(|s| (**s).clone())
        .collect();
    Ok(Json(TimelineView {
        interval: timeline.interval().as_secs_f64(),
        capacity: timeline.capacity(),
        // Nothing newer: the newest there is, never a `since` from the
        // future (a client that passes it back would wait for ever).
        last_seq: samples
            .last()
            .map_or_else(|| since.min(timeline.last_seq()), |s| s.seq),
        samples,
    })
    .into_response())
}

/// The first event of a stream: enough to draw the page at once.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Hello {
    pub queue_capacity: usize,
    pub workers: usize,
    /// Consecutive failures that open the breaker.
    pub breaker_threshold: u32,
    /// Seconds the breaker stays open before a probe.
    pub breaker_open_seconds: f64,
    /// `consecutive` or `failure_rate` (BREAKER_POLICY).
    pub breaker_policy: &'static str,
    /// Under failure_rate: the share that opens it, the calls the window
    /// must hold first, and the window in seconds.
    pub breaker_failure_rate: Option<f64>,
    pub breaker_min_calls: Option<u32>,
    pub breaker_window_seconds: Option<f64>,
    /// Probes a half-open window admits.
    pub breaker_half_open_probes: u32,
    /// Calls the payment provider serves at once (PAYMENT_CAPACITY); null: unlimited.
    pub payment_capacity: Option<u32>,
    pub breaker: BreakerSnapshot,
    pub payment: SettingsView,
    pub reliability: Switches,
    pub load: LoadStatus,
    /// Seconds between samples.
    pub interval: f64,
    /// The last two minutes, oldest first.
    pub samples: Vec<Sample>,
    /// The recent changes, oldest first.
    pub changes: Vec<Change>,
}

/// The `lagged` event: this listener fell behind and skipped `skipped`
/// events.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Lagged {
    pub skipped: u64,
}

/// The events of `GET /admin/events`, each with the schema of its data.
pub const STREAM_EVENTS: [(&str, &str); 4] = [
    ("hello", "Hello"),
    ("sample", "Sample"),
    ("change", "Change"),
    ("lagged", "Lagged"),
];

fn json_event(name: &'static str, value: &impl Serialize) -> Event {
    Event::default()
        .event(name)
        .json_data(value)
        .unwrap_or_else(|_| Event::default().event("error").data("unserializable"))
}

#[utoipa::path(get, path = "/admin/events", tag = "admin", security(("admin_token" = [])),
    responses(
        (status = 200, description = "Server-Sent Events: `hello` (a Hello), then `sample` (a Sample) every TIMELINE_INTERVAL, `change` (a Change) as it happens, `lagged` (a Lagged) when this listener fell behind. Each event's data is one JSON object; the schema describes one event as a client parses it (its name and its data). Ends when the service stops.", content_type = "text/event-stream", body = String),
        (status = 401, description = "ADMIN_TOKEN is set and was not sent", body = ErrorBody),
    ))]
pub async fn events(State(state): State<AppState>) -> Response {
    let lab = &state.lab;
    let instruments = &lab.instruments;
    // Subscribe before the snapshot: an event in between arrives twice
    // rather than never (a page takes the newer sample by seq).
    let receiver = instruments.feed.subscribe();
    let timeline = &instruments.timeline;
    // Two minutes, but never more than HELLO_MAX_SAMPLES (a 10 ms interval
    // would make it 12,000).
    let history = ((HELLO_HISTORY.as_secs_f64() / timeline.interval().as_secs_f64()).ceil()
        as usize)
        .min(HELLO_MAX_SAMPLES);
    let config = lab.reliability.breaker().config();
    let hello = Hello {
        queue_capacity: lab.queue.capacity(),
        workers: lab.workers,
        breaker_threshold: config.failure_threshold,
        breaker_open_seconds: config.open_duration.as_secs_f64(),
        breaker_policy: config.policy.name(),
        breaker_failure_rate: match config.policy {
            BreakerPolicy::FailureRate { rate, .. } => Some(rate),
            BreakerPolicy::Consecutive => None,
        },
        breaker_min_calls: match config.policy {
            BreakerPolicy::FailureRate { min_calls, .. } => Some(min_calls),
            BreakerPolicy::Consecutive => None,
        },
        breaker_window_seconds: match config.policy {
            BreakerPolicy::FailureRate { window, .. } => Some(window.as_secs_f64()),
            BreakerPolicy::Consecutive => None,
        },
        breaker_half_open_probes: config.half_open_probes.max(1),
        payment_capacity: lab.payment.capacity().map(|c| c.slots),
        breaker: lab.reliability.breaker().snapshot(),
        payment: lab.payment.view(),
        reliability: lab.reliability.switches(),
        load: instruments.traffic.status(),
        interval: timeline.interval().as_secs_f64(),
        samples: timeline
            .last(history)
            .iter()
            .map(|s| (**s).clone())
            .collect(),
        changes: instruments
            .feed
            .recent_changes()
            .iter()
            .map(|c| (**c).clone())
            .collect(),
    };
    let first = stream::once(async move { Ok::<_, Infallible>(json_event("hello", &hello)) });
    let live = live_events(receiver, instruments.closing.clone());
    Sse::new(first.chain(live))
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response()
}

/// The feed as SSE events, until `closing`.
fn live_events(
    receiver: tokio::sync::broadcast::Receiver<LabEvent>,
    closing: tokio_util::sync::CancellationToken,
) -> impl Stream<Item = Result<Event, Infallible>> {
    stream::unfold((receiver, closing), |(mut receiver, closing)| async move {
        let event = tokio::select! {
            biased;
            _ = closing.cancelled() => return None,
            received = receiver.recv() => match received {
                Ok(LabEvent::Sample(sample)) => json_event("sample", &*sample),
                Ok(LabEvent::Change(change)) => json_event("change", &*change),
                Err(RecvError::Lagged(skipped)) => {
                    json_event("lagged", &Lagged { skipped })
                }
                Err(RecvError::Closed) => return None,
            },
        };
        Some((Ok(event), (receiver, closing)))
    })
}

/// Publishes an admin's change of the payment settings on the lab's feed.
pub(super) fn payment_changed(state: &AppState, view: &SettingsView) {
    let feed = &state.lab.instruments.feed;
    feed.payment_mode_set(view.mode);
    feed.publish(
        ChangeKind::Payment,
        format!(
            "payment: mode {}, failure rate {}, latency {}–{}",
            crate::lab::timeline::mode_name(view.mode),
            view.failure_rate,
            crate::units::format_duration(view.latency_min.0),
            crate::units::format_duration(view.latency_max.0)
        ),
        serde_json::to_value(view).unwrap_or_default(),
    );
}

/// Publishes an admin's change of the switches on the lab's feed.
pub(super) fn switches_changed(state: &AppState, switches: Switches) {
    let on_off = |b: bool| if b { "on" } else { "off" };
    let mut summary = format!(
        "retry {}, breaker {}",
        on_off(switches.retry_enabled),
        on_off(switches.breaker_enabled)
    );
    // The other two only when they are not at their defaults.
    if !switches.rejection_permanent {
        summary.push_str(", rejections retried");
    }
    if switches.retry_budget_enabled {
        summary.push_str(", retry budget on");
    }
    if switches.throttle_enabled {
        summary.push_str(", throttling on");
    }
    if switches.hedge_enabled {
        summary.push_str(", hedging on");
    }
    if switches.concurrency_limit != crate::reliability::LimitKind::Off {
        summary.push_str(&format!(
            ", {} concurrency limit",
            switches.concurrency_limit.as_str()
        ));
    }
    if switches.retry_jitter != crate::reliability::JitterKind::Proportional {
        summary.push_str(&format!(", {} jitter", switches.retry_jitter.as_str()));
    }
    state.lab.instruments.feed.publish(
        ChangeKind::Reliability,
        summary,
        serde_json::to_value(switches).unwrap_or_default(),
    );
}

/// Publishes an admin's change of the breaker's settings on the lab's feed.
pub(super) fn breaker_settings_changed(state: &AppState, settings: &BreakerSettings) {
    let summary = match settings.policy {
        "failure_rate" => format!(
            "breaker policy failure_rate: opens at {}% of at least {} calls in {}, {} probe(s)",
            (settings.failure_rate * 100.0).round(),
            settings.min_calls,
            crate::units::format_duration(settings.window.0),
            settings.half_open_probes
        ),
        _ => format!(
            "breaker policy consecutive: opens after {} failures in a row, {} probe(s)",
            settings.failure_threshold, settings.half_open_probes
        ),
    };
    state.lab.instruments.feed.publish(
        ChangeKind::BreakerSettings,
        summary,
        serde_json::to_value(settings).unwrap_or_default(),
    );
}
