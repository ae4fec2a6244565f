//! `/admin`: the lab's controls. Change the failure model while traffic
//! flows, read and reset the breaker, switch retry and breaker on and off,
//! and see one snapshot of the whole pipeline.

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::{ApiError, AppState, JsonBody};
use crate::orders::OrderId;
use crate::payment::PaymentUpdate;
use crate::reliability::Switches;

pub async fn get_payment(State(state): State<AppState>) -> Response {
    Json(state.lab.payment.view()).into_response()
}

pub async fn put_payment(
    State(state): State<AppState>,
    JsonBody(update): JsonBody<PaymentUpdate>,
) -> Result<Response, ApiError> {
    Ok(Json(state.lab.payment.update(update)?).into_response())
}

pub async fn get_ledger(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let order_id: OrderId = id
        .parse()
        .map_err(|_| ApiError::invalid_order_id(&id, "order_id"))?;
    let charges = state.lab.payment.ledger().charges(order_id).await?;
    Ok(Json(json!({ "order_id": order_id, "charges": charges })).into_response())
}

pub async fn get_breaker(State(state): State<AppState>) -> Response {
    Json(state.lab.reliability.breaker().snapshot()).into_response()
}

pub async fn reset_breaker(State(state): State<AppState>) -> Response {
    let breaker = state.lab.reliability.breaker();
    breaker.reset();
    tracing::warn!("circuit breaker reset by the admin API");
    Json(breaker.snapshot()).into_response()
}

/// A partial change of the switches. Unknown fields are refused; a switch
/// takes a boolean or any spelling the environment takes (`"off"`, `"no"`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchesUpdate {
    #[serde(default, deserialize_with = "crate::units::de_switch")]
    retry_enabled: Option<bool>,
    #[serde(default, deserialize_with = "crate::units::de_switch")]
    breaker_enabled: Option<bool>,
}

pub async fn get_reliability(State(state): State<AppState>) -> Response {
    Json(state.lab.reliability.switches()).into_response()
}

pub async fn put_reliability(
    State(state): State<AppState>,
    JsonBody(update): JsonBody<SwitchesUpdate>,
) -> Response {
    let current = state.lab.reliability.switches();
    let next = Switches {
        retry_enabled: update.retry_enabled.unwrap_or(current.retry_enabled),
        breaker_enabled: update.breaker_enabled.unwrap_or(current.breaker_enabled),
    };
    state.lab.reliability.set_switches(next);
    tracing::warn!(?next, "reliability switches changed by the admin API");
    Json(next).into_response()
}

pub async fn get_state(State(state): State<AppState>) -> Result<Response, ApiError> {
    let counts = state.service.count_by_status().await?;
    let orders: serde_json::Map<String, serde_json::Value> = counts
        .into_iter()
        .map(|(status, n)| (status.as_str().to_owned(), json!(n)))
        .collect();
    let lab = &state.lab;
    Ok(Json(json!({
        "queue": {
            "depth": lab.queue.depth(),
            "capacity": lab.queue.capacity(),
        },
        "workers": {
            "count": lab.workers,
            "busy": lab.queue.busy(),
        },
        "breaker": lab.reliability.breaker().snapshot(),
        "reliability": lab.reliability.switches(),
        "orders": orders,
        "payment": lab.payment.view(),
        "uptime_seconds": lab.started.elapsed().as_secs_f64(),
    }))
    .into_response())
}
