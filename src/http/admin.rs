//! `/admin`: the lab's controls. Change the failure model while traffic
//! flows, read and reset the breaker, switch retry and breaker on and off,
//! and see one snapshot of the whole pipeline.

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use super::error::ErrorBody;
use super::{ApiError, AppState, JsonBody};
use crate::lab::ChangeKind;
use crate::orders::OrderId;
use crate::payment::faults::{FaultSettings, FaultUpdate, FaultView};
use crate::payment::{Charge, PaymentUpdate, SettingsView};
use crate::reliability::{
    BreakerSettings, BreakerSnapshot, BreakerUpdate, Switches, SwitchesUpdate,
};

/// An order's charges at the simulated provider.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct LedgerView {
    #[schema(value_type = uuid::Uuid)]
    pub order_id: OrderId,
    /// Oldest first; more than one is a duplicate charge.
    pub charges: Vec<Charge>,
}

/// The queue's fill.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct QueueView {
    pub depth: usize,
    pub capacity: usize,
}

/// The workers and how many are busy.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WorkersView {
    pub count: usize,
    pub busy: usize,
}

/// One snapshot of the whole pipeline.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct LabState {
    pub queue: QueueView,
    pub workers: WorkersView,
    pub breaker: BreakerSnapshot,
    pub reliability: Switches,
    /// Orders by status: pending, processing, completed, failed.
    pub orders: std::collections::BTreeMap<&'static str, u64>,
    pub payment: SettingsView,
    pub uptime_seconds: f64,
}

#[utoipa::path(get, path = "/admin/payment", tag = "admin", security(("admin_token" = [])),
    responses(
        (status = 200, description = "The simulator's settings now in force", body = SettingsView),
        (status = 401, description = "ADMIN_TOKEN is set and was not sent", body = ErrorBody),
    ))]
pub async fn get_payment(State(state): State<AppState>) -> Response {
    Json(state.lab.payment.view()).into_response()
}

#[utoipa::path(put, path = "/admin/payment", tag = "admin", security(("admin_token" = [])),
    request_body(content = PaymentUpdate, description = "Any subset of the settings; `mode: brownout` needs `brownout`. Applies to calls that start after it."),
    responses(
        (status = 200, description = "The settings now in force", body = SettingsView),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "ADMIN_TOKEN is set and was not sent", body = ErrorBody),
        (status = 408, description = "The body did not arrive in time", body = ErrorBody),
        (status = 413, description = "The body is over 16 KiB", body = ErrorBody),
        (status = 415, description = "Not application/json", body = ErrorBody),
        (status = 422, description = "A bad value, named; nothing changed. Also what the schema cannot say: latency_min above latency_max, a brownout without its mode or the mode without it, a duration above 24h or a brownout of zero", body = ErrorBody),
    ))]
pub async fn put_payment(
    State(state): State<AppState>,
    JsonBody(update): JsonBody<PaymentUpdate>,
) -> Result<Response, ApiError> {
    let view = state.lab.payment.update(update)?;
    super::lab::payment_changed(&state, &view);
    Ok(Json(view).into_response())
}

#[utoipa::path(get, path = "/admin/payment/ledger/{order_id}", tag = "admin", security(("admin_token" = [])),
    params(("order_id" = uuid::Uuid, Path, description = "The order's id")),
    responses(
        (status = 200, description = "The order's charges (none for an unknown order)", body = LedgerView),
        (status = 400, description = "The id is not a UUID", body = ErrorBody),
        (status = 401, description = "ADMIN_TOKEN is set and was not sent", body = ErrorBody),
        (status = 503, description = "The ledger's store cannot be reached", body = ErrorBody),
    ))]
pub async fn get_ledger(
    State(state): State<AppState>,
    path: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Result<Response, ApiError> {
    let Path(id) = path.map_err(|e| ApiError::bad_path(&e, "invalid_order_id", "order_id"))?;
    let order_id: OrderId = id
        .parse()
        .map_err(|_| ApiError::invalid_order_id(&id, "order_id"))?;
    let charges = state.lab.payment.ledger().charges(order_id).await?;
    Ok(Json(LedgerView { order_id, charges }).into_response())
}

/// The breaker: its state and how it trips and recovers.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct BreakerView {
    #[serde(flatten)]
    pub state: BreakerSnapshot,
    pub settings: BreakerSettings,
}

fn breaker_view(state: &AppState) -> BreakerView {
    let breaker = state.lab.reliability.breaker();
    BreakerView {
        state: breaker.snapshot(),
        settings: BreakerSettings::of(&breaker.config()),
    }
}

#[utoipa::path(get, path = "/admin/breaker", tag = "admin", security(("admin_token" = [])),
    responses(
        (status = 200, description = "The breaker's state and settings", body = BreakerView),
        (status = 401, description = "ADMIN_TOKEN is set and was not sent", body = ErrorBody),
    ))]
pub async fn get_breaker(State(state): State<AppState>) -> Response {
    Json(breaker_view(&state)).into_response()
}

#[utoipa::path(put, path = "/admin/breaker", tag = "admin", security(("admin_token" = [])),
    request_body(content = BreakerUpdate, description = "Any of the settings; they apply from the next call. The breaker keeps its state (an open one stays open for the rest of its period); its consecutive count and failure-rate window start empty"),
    responses(
        (status = 200, description = "The breaker's state and settings now", body = BreakerView),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "ADMIN_TOKEN is set and was not sent", body = ErrorBody),
        (status = 408, description = "The body did not arrive in time", body = ErrorBody),
        (status = 413, description = "The body is over 16 KiB", body = ErrorBody),
        (status = 415, description = "Not application/json", body = ErrorBody),
        (status = 422, description = "Not an object, or a bad or unknown field (named); nothing changed", body = ErrorBody),
    ))]
pub async fn put_breaker(
    State(state): State<AppState>,
    JsonBody(update): JsonBody<BreakerUpdate>,
) -> Result<Response, ApiError> {
    let breaker = state.lab.reliability.breaker();
    let next = update.apply_to(breaker.config())?;
    breaker.set_config(next);
    let settings = BreakerSettings::of(&next);
    super::lab::breaker_settings_changed(&state, &settings);
    tracing::warn!(?settings, "breaker settings changed by the admin API");
    Ok(Json(breaker_view(&state)).into_response())
}

#[utoipa::path(post, path = "/admin/breaker/reset", tag = "admin", security(("admin_token" = [])),
    responses(
        (status = 200, description = "Closed; its state and settings after", body = BreakerView),
        (status = 401, description = "ADMIN_TOKEN is set and was not sent", body = ErrorBody),
    ))]
pub async fn reset_breaker(State(state): State<AppState>) -> Response {
    state.lab.reliability.breaker().reset();
    tracing::warn!("circuit breaker reset by the admin API");
    Json(breaker_view(&state)).into_response()
}

#[utoipa::path(get, path = "/admin/reliability", tag = "admin", security(("admin_token" = [])),
    responses(
        (status = 200, description = "Whether retry and the breaker are on", body = Switches),
        (status = 401, description = "ADMIN_TOKEN is set and was not sent", body = ErrorBody),
    ))]
pub async fn get_reliability(State(state): State<AppState>) -> Response {
    Json(state.lab.reliability.switches()).into_response()
}

#[utoipa::path(put, path = "/admin/reliability", tag = "admin", security(("admin_token" = [])),
    request_body(content = SwitchesUpdate, description = "Either or both switches; they apply to orders whose processing starts after it"),
    responses(
        (status = 200, description = "The switches now", body = Switches),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "ADMIN_TOKEN is set and was not sent", body = ErrorBody),
        (status = 408, description = "The body did not arrive in time", body = ErrorBody),
        (status = 413, description = "The body is over 16 KiB", body = ErrorBody),
        (status = 415, description = "Not application/json", body = ErrorBody),
        (status = 422, description = "Not an object, or a bad or unknown field (named); nothing changed", body = ErrorBody),
    ))]
pub async fn put_reliability(
    State(state): State<AppState>,
    JsonBody(update): JsonBody<SwitchesUpdate>,
) -> Response {
    let next = update.apply_to(state.lab.reliability.switches());
    state.lab.reliability.set_switches(next);
    super::lab::switches_changed(&state, next);
    tracing::warn!(?next, "reliability switches changed by the admin API");
    Json(next).into_response()
}

#[utoipa::path(get, path = "/admin/state", tag = "admin", security(("admin_token" = [])),
    responses(
        (status = 200, description = "Queue, workers, breaker, switches, orders by status, payment settings", body = LabState),
        (status = 401, description = "ADMIN_TOKEN is set and was not sent", body = ErrorBody),
        (status = 503, description = "The store cannot be reached", body = ErrorBody),
    ))]
pub async fn get_state(State(state): State<AppState>) -> Result<Response, ApiError> {
    let orders = state
        .service
        .count_by_status()
        .await?
        .into_iter()
        .map(|(status, n)| (status.as_str(), n))
        .collect();
    let lab = &state.lab;
    Ok(Json(LabState {
        queue: QueueView {
            depth: lab.queue.depth(),
            capacity: lab.queue.capacity(),
        },
        workers: WorkersView {
            count: lab.workers,
            busy: lab.queue.busy(),
        },
        breaker: lab.reliability.breaker().snapshot(),
        reliability: lab.reliability.switches(),
        orders,
        payment: lab.payment.view(),
        uptime_seconds: lab.started.elapsed().as_secs_f64(),
    })
    .into_response())
}

/// Where the service charges, and its client's pool when that is across
/// the network.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ProviderView {
    /// True with `PAYMENT_URL`: charges cross the network; false: the
    /// in-process simulator.
    pub remote: bool,
    /// The provider's base URL (null in process).
    pub url: Option<String>,
    /// The pool's bound (`PAYMENT_MAX_CONNECTIONS`), its connections open
    /// and busy now, and the attempts that waited for one so far.
    pub max_connections: Option<u32>,
    pub open: Option<u64>,
    pub busy: Option<u64>,
    pub waits: Option<u64>,
    /// The remote provider's network faults as it reports them (null in
    /// process, or when it could not be asked: then `faults_error` says why).
    #[schema(value_type = Option<Object>)]
    pub faults: Option<serde_json::Value>,
    pub faults_error: Option<String>,
}

#[utoipa::path(get, path = "/admin/provider", tag = "admin", security(("admin_token" = [])),
    responses(
        (status = 200, description = "Where charges go; with a remote provider, the client's pool and the provider's faults", body = ProviderView),
        (status = 401, description = "ADMIN_TOKEN is set and was not sent", body = ErrorBody),
    ))]
pub async fn get_provider(State(state): State<AppState>) -> Response {
    let Some(remote) = &state.lab.remote else {
        return Json(ProviderView {
            remote: false,
            url: None,
            max_connections: None,
            open: None,
            busy: None,
            waits: None,
            faults: None,
            faults_error: None,
        })
        .into_response();
    };
    let (max, open, busy) = remote.pool();
    let (faults, faults_error) = match remote
        .admin(axum::http::Method::GET, "/admin/faults", None)
        .await
    {
        Ok((200, view)) => (Some(view), None),
        Ok((status, answer)) => (None, Some(provider_said(status, &answer))),
        Err(why) => (None, Some(format!("the provider did not answer: {why}"))),
    };
    Json(ProviderView {
        remote: true,
        url: Some(remote.url().to_owned()),
        max_connections: Some(max),
        open: Some(open),
        busy: Some(busy),
        waits: Some(remote.reading().waits),
        faults,
        faults_error,
    })
    .into_response()
}

/// A fault update as the provider's `PUT /admin/faults` takes it: the
/// fields given, durations in nanoseconds (exact, and a form it reads).
fn update_json(update: &FaultUpdate) -> serde_json::Value {
    let mut body = serde_json::Map::new();
    let nanos = |d: std::time::Duration| serde_json::json!(format!("{}ns", d.as_nanos()));
    if let Some(fault) = update.fault {
        body.insert("fault".into(), serde_json::json!(fault));
    }
    if let Some(rate) = update.rate {
        body.insert("rate".into(), serde_json::json!(rate));
    }
    if let Some(d) = update.refuse_for {
        body.insert("refuse_for".into(), nanos(d));
    }
    if let Some(chunk) = update.slow_body_chunk {
        body.insert("slow_body_chunk".into(), serde_json::json!(chunk));
    }
    if let Some(d) = update.slow_body_interval {
        body.insert("slow_body_interval".into(), nanos(d));
    }
    if let Some(limit) = update.rate_limit {
        body.insert("rate_limit".into(), serde_json::json!(limit));
    }
    serde_json::Value::Object(body)
}

/// A provider's error answer in one line.
fn provider_said(status: u16, answer: &serde_json::Value) -> String {
    let message = answer["error"]["message"].as_str().unwrap_or("no message");
    if status == 401 {
        format!("the provider refused (401): {message}; set PAYMENT_ADMIN_TOKEN to its ADMIN_TOKEN")
    } else {
        format!("the provider answered {status}: {message}")
    }
}

#[utoipa::path(put, path = "/admin/provider/faults", tag = "admin", security(("admin_token" = [])),
    request_body(content = FaultUpdate, description = "Any subset of the remote provider's network faults, as its own PUT /admin/faults takes them; checked here first"),
    responses(
        (status = 200, description = "The remote provider's faults after the change", body = FaultView),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "ADMIN_TOKEN is set and was not sent", body = ErrorBody),
        (status = 408, description = "The body did not arrive in time", body = ErrorBody),
        (status = 409, description = "The provider is in process (PAYMENT_URL unset): it has no network", body = ErrorBody),
        (status = 413, description = "The body is over 16 KiB", body = ErrorBody),
        (status = 415, description = "Not application/json", body = ErrorBody),
        (status = 422, description = "A bad value, named; nothing changed", body = ErrorBody),
        (status = 502, description = "The remote provider did not answer, or refused the change (its answer is quoted)", body = ErrorBody),
    ))]
pub async fn put_provider_faults(
    State(state): State<AppState>,
    JsonBody(update): JsonBody<FaultUpdate>,
) -> Result<Response, ApiError> {
    // Checked here as the provider checks it, so a bad value is a 422
    // naming its field whether or not a provider is there to ask.
    FaultSettings::default().apply(&update)?;
    let Some(remote) = &state.lab.remote else {
        return Err(ApiError::new(
            axum::http::StatusCode::CONFLICT,
            "no_remote_provider",
            "charges go to the in-process simulator (PAYMENT_URL is unset): it has no network faults",
        ));
    };
    let body = serde_json::to_vec(&update_json(&update)).expect("an update serialises");
    match remote
        .admin(axum::http::Method::PUT, "/admin/faults", Some(body))
        .await
    {
        Ok((200, view)) => {
            let fault = view["fault"].as_str().unwrap_or("?").to_owned();
            let rate = view["rate"].as_f64().unwrap_or(0.0);
            state.lab.instruments.feed.publish(
                ChangeKind::Payment,
                format!("provider faults: {fault} at {rate}"),
                view.clone(),
            );
            Ok(Json(view).into_response())
        }
        Ok((status, answer)) => Err(ApiError::new(
            axum::http::StatusCode::BAD_GATEWAY,
            "provider_refused",
            provider_said(status, &answer),
        )),
        Err(why) => Err(ApiError::new(
            axum::http::StatusCode::BAD_GATEWAY,
            "provider_unreachable",
            format!("the provider did not answer: {why}"),
        )),
    }
}
