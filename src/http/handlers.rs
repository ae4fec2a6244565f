//! Request handlers.

use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::{ApiError, AppState, JsonBody};
use crate::orders::{CreateOrderRequest, Creation, OrderId};

/// How long `/readyz` waits for the store before calling it unreachable.
const READY_TIMEOUT: Duration = Duration::from_secs(4);

pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

pub async fn readyz(State(state): State<AppState>) -> Response {
    let repo = state.service.repository();
    let store = repo.kind();
    let durability = repo.durability().as_str();
    // Clients get a fixed reason; the store's own message (a driver's text,
    // with host names in it) goes only to the log.
    let reason = match tokio::time::timeout(READY_TIMEOUT, repo.ping()).await {
        Ok(Ok(())) => {
            return Json(json!({ "status": "ready", "store": store, "durability": durability }))
                .into_response()
        }
        Ok(Err(err)) => {
            tracing::warn!(error = %err, "readiness check: the store failed");
            "store unreachable"
        }
        Err(_) => {
            tracing::warn!(
                timeout_secs = READY_TIMEOUT.as_secs(),
                "readiness check: the store did not answer in time"
            );
            "store timeout"
        }
    };
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({
            "status": "unavailable",
            "store": store,
            "durability": durability,
            "reason": reason,
        })),
    )
        .into_response()
}

pub async fn version() -> Json<serde_json::Value> {
    Json(json!({
        "name": env!("CARGO_PKG_NAME"),
        "version": env!("CARGO_PKG_VERSION"),
        "commit": option_env!("GIT_COMMIT"),
    }))
}

pub async fn metrics(State(state): State<AppState>) -> Response {
    match state.metrics.render() {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(err) => {
            tracing::error!(error = %err, "rendering metrics failed");
            ApiError::internal().into_response()
        }
    }
}

/// The longest Idempotency-Key accepted.
const MAX_KEY_LEN: usize = 255;

/// The `Idempotency-Key` header, if sent: 1 to 255 visible ASCII characters.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    let mut values = headers.get_all("idempotency-key").iter();
    let Some(raw) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "duplicate_header",
            "send one Idempotency-Key header, not several",
        )
        .with_field("Idempotency-Key"));
    }
    match raw.to_str() {
        Ok(key)
            if !key.is_empty()
                && key.len() <= MAX_KEY_LEN
                && key.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            Ok(Some(key))
        }
        _ => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_idempotency_key",
            "Idempotency-Key must be 1 to 255 visible ASCII characters",
        )
        .with_field("Idempotency-Key")),
    }
}

pub async fn create_order(
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(request): JsonBody<CreateOrderRequest>,
) -> Result<Response, ApiError> {
    let key = idempotency_key(&headers)?;
    let (status, order) = match state.service.create_order(&request, key).await? {
        Creation::Created(order) => (StatusCode::CREATED, order),
        // The same key with the same request: the original order, as it is now.
        Creation::Replayed(order) => (StatusCode::OK, order),
    };
    let location = format!("/orders/{}", order.id);
    Ok((status, [(header::LOCATION, location)], Json(order)).into_response())
}

pub async fn get_order(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id: OrderId = id
        .parse()
        .map_err(|_| ApiError::invalid_order_id(&id, "id"))?;
    let order = state.service.get_order(id).await?;
    Ok(Json(order).into_response())
}

pub async fn not_found() -> ApiError {
    ApiError::not_found("no such route")
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not accept that method",
    )
}
