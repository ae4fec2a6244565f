//! Request handlers.

use std::time::Duration;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use super::error::ErrorBody;
use super::{ApiError, AppState, JsonBody};
use crate::orders::{CreateOrderRequest, Creation, Order, OrderId};

/// How long `/readyz` waits for the store before calling it unreachable.
const READY_TIMEOUT: Duration = Duration::from_secs(4);

/// `/healthz`: the process answers.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Health {
    #[schema(example = "ok")]
    pub status: &'static str,
}

/// `/readyz`: whether the store answers, and what kind it is.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Readiness {
    /// `ready` or `unavailable`.
    #[schema(example = "ready")]
    pub status: &'static str,
    /// `memory` or `postgres`.
    pub store: &'static str,
    /// `none` or `durable`.
    pub durability: &'static str,
    /// When unavailable: `store unreachable` or `store timeout`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
}

/// `/version`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct VersionInfo {
    pub name: &'static str,
    pub version: &'static str,
    /// The git commit built, when the build knew it.
    pub commit: Option<&'static str>,
}

#[utoipa::path(get, path = "/healthz", tag = "service",
    responses((status = 200, description = "The process is up", body = Health)))]
pub async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

#[utoipa::path(get, path = "/readyz", tag = "service",
    responses(
        (status = 200, description = "The store answers", body = Readiness),
        (status = 503, description = "The store does not answer (reason says how)", body = Readiness),
    ))]
pub async fn readyz(State(state): State<AppState>) -> Response {
    let repo = state.service.repository();
    let store = repo.kind();
    let durability = repo.durability().as_str();
    // Clients get a fixed reason; the store's own message (a driver's text,
    // with host names in it) goes only to the log.
    let reason = match tokio::time::timeout(READY_TIMEOUT, repo.ping()).await {
        Ok(Ok(())) => {
            return Json(Readiness {
                status: "ready",
                store,
                durability,
                reason: None,
            })
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
        Json(Readiness {
            status: "unavailable",
            store,
            durability,
            reason: Some(reason),
        }),
    )
        .into_response()
}

#[utoipa::path(get, path = "/version", tag = "service",
    responses((status = 200, description = "Name, version and commit", body = VersionInfo)))]
pub async fn version() -> Json<VersionInfo> {
    Json(VersionInfo {
        name: env!("CARGO_PKG_NAME"),
        version: env!("CARGO_PKG_VERSION"),
        commit: option_env!("GIT_COMMIT"),
    })
}

#[utoipa::path(get, path = "/metrics", tag = "service",
    responses((status = 200, description = "Prometheus text exposition format",
        content_type = "text/plain; version=0.0.4; charset=utf-8", body = String)))]
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
pub(crate) fn idempotency_key(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
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

#[utoipa::path(post, path = "/orders", tag = "orders",
    request_body = CreateOrderRequest,
    params(("Idempotency-Key" = Option<String>, Header, max_length = 255, min_length = 1,
        pattern = "^[\\x21-\\x7E]+$",
        description = "Makes the request safe to retry: the same key with the same body returns the first order (200); with another body it is refused (422). Kept 24 hours.")),
    responses(
        (status = 201, description = "Stored and queued", body = Order,
            headers(("Location" = String, description = "The order's URL"))),
        (status = 200, description = "The Idempotency-Key was used before with this body: the first order, as it is now", body = Order,
            headers(("Location" = String, description = "The order's URL"))),
        (status = 400, description = "Malformed JSON, or a bad or repeated Idempotency-Key header", body = ErrorBody),
        (status = 408, description = "The body did not arrive in time", body = ErrorBody),
        (status = 413, description = "The body is over 16 KiB", body = ErrorBody),
        (status = 415, description = "Not application/json", body = ErrorBody),
        (status = 422, description = "Not an object, a missing, mistyped, out-of-range or unknown field (named), or an Idempotency-Key used with another body", body = ErrorBody),
        (status = 503, description = "Nothing was stored: the queue or the in-memory store is full, the store cannot be reached, or the service is stopping. Try again after Retry-After seconds.", body = ErrorBody,
            headers(("Retry-After" = u32, description = "Seconds to wait"))),
    ))]
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

#[utoipa::path(get, path = "/orders/{id}", tag = "orders",
    params(("id" = uuid::Uuid, Path, description = "The order's id")),
    responses(
        (status = 200, description = "The order", body = Order),
        (status = 400, description = "The id is not a UUID", body = ErrorBody),
        (status = 404, description = "No such order", body = ErrorBody),
        (status = 503, description = "The store cannot be reached", body = ErrorBody),
    ))]
pub async fn get_order(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(id) = path.map_err(|e| ApiError::bad_path(&e, "invalid_order_id", "id"))?;
    let id: OrderId = id
        .parse()
        .map_err(|_| ApiError::invalid_order_id(&id, "id"))?;
    let order = state.service.get_order(id).await?;
    Ok(Json(order).into_response())
}

/// No route matched. Operator paths first need the token (when one is
/// set), so that a stranger cannot tell a route from no route.
pub async fn not_found(State(state): State<AppState>, request: axum::extract::Request) -> Response {
    match super::auth::refusal(&state, &request) {
        Some(refused) => refused,
        None => ApiError::not_found("no such route").into_response(),
    }
}

/// The route matched but not the method: the same rule as `not_found`.
pub async fn method_not_allowed(
    State(state): State<AppState>,
    request: axum::extract::Request,
) -> Response {
    match super::auth::refusal(&state, &request) {
        Some(refused) => refused,
        None => method_not_allowed_error().into_response(),
    }
}

fn method_not_allowed_error() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not accept that method",
    )
}
