//! `/admin`: the lab's controls. Change the failure model while traffic
//! flows, read and reset the breaker, switch retry and breaker on and off,
//! and see one snapshot of the whole pipeline.

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use super::error::ErrorBody;
use super::{ApiError, AppState, JsonBody};
use crate::orders::OrderId;
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
