//! One error type for every HTTP answer that is not a success.
//!
//! Every conversion from a module's error lives here, so the status code of
//! each failure is chosen in one file. The body is always
//! `{"error": {"code", "message"}}` (plus `field` when one input field is at
//! fault, and at most one extra top-level key that helps the client, such as
//! the list of profiles), and 5xx details stay in the logs, never in the
//! response.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use crate::lab::LoadError;
use crate::observability::profiling::ProfileError;
use crate::orders::{OrderError, StoreError};
use crate::payment::{LedgerError, SettingsError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
    pub retry_after_secs: Option<u32>,
    /// A top-level key beside `error`, for answers that help the client on.
    pub extra: Option<Box<(&'static str, serde_json::Value)>>,
}

/// Every error answer: `{"error": {"code", "message", "field"?}}`, and
/// sometimes one more top-level key that helps (the list of profiles).
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    #[schema(ignore)]
    extra: Option<std::collections::BTreeMap<&'static str, serde_json::Value>>,
}

/// What went wrong.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable, for programs: `invalid_field`, `queue_full`, `unauthorized`, ...
    pub code: &'static str,
    /// For people.
    pub message: String,
    /// The input field at fault, when one is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            field: None,
            retry_after_secs: None,
            extra: None,
        }
    }

    /// Adds one top-level key beside `error`.
    pub fn with_extra(mut self, key: &'static str, value: serde_json::Value) -> Self {
        self.extra = Some(Box::new((key, value)));
        self
    }

    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    pub fn with_retry_after(mut self, secs: u32) -> Self {
        self.retry_after_secs = Some(secs);
        self
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// A path segment that should have been an order id (400, naming `field`).
    /// A path segment that axum could not take (not UTF-8 once
    /// percent-decoded): this JSON error under `code`, not axum's plain
    /// text.
    pub fn bad_path(
        rejection: &axum::extract::rejection::PathRejection,
        code: &'static str,
        field: &'static str,
    ) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            code,
            format!(
                "the path's {field} cannot be read: {}",
                rejection.body_text()
            ),
        )
        .with_field(field)
    }

    pub fn invalid_order_id(raw: &str, field: &'static str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_order_id",
            format!("{raw:?} is not an order id; expected a UUID"),
        )
        .with_field(field)
    }

    /// The body did not arrive in time (408); the connection is closed after.
    pub fn body_timeout() -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            "the request body did not arrive in time; send it whole and promptly",
        )
    }

    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the service logs",
        )
    }
}

impl From<OrderError> for ApiError {
    fn from(err: OrderError) -> Self {
        match &err {
            OrderError::NotFound(id) => Self::not_found(format!("order {id} not found")),
            OrderError::InvalidInput { field, reason } => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_field",
                format!("{field} {reason}"),
            )
            .with_field(*field),
            OrderError::IllegalTransition { .. }
            | OrderError::Duplicate(_)
            | OrderError::LeaseHeldElsewhere(_) => {
                Self::new(StatusCode::CONFLICT, "conflict", err.to_string())
            }
            OrderError::IdempotencyKeyReused => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                "this Idempotency-Key was already used with a different request body",
            )
            .with_field("Idempotency-Key"),
            OrderError::QueueFull => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "queue_full",
                "the processing queue is full; nothing was stored, try again shortly",
            )
            .with_retry_after(1),
            OrderError::ShuttingDown => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "the service is shutting down; nothing was stored",
            )
            .with_retry_after(5),
            OrderError::Storage(store) => store_failure(store, "order store"),
        }
    }
}

/// A store's failure, from wherever it came: connection trouble is 503 with
/// a hint to retry, anything else 500; the cause goes to the log only.
fn store_failure(err: &StoreError, what: &'static str) -> ApiError {
    match err {
        StoreError::Unavailable(cause) => {
            tracing::error!(error = %cause, "{what} unavailable");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "the order store cannot be reached; try again shortly",
            )
            .with_retry_after(2)
        }
        StoreError::Full => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_full",
            "the in-memory store is full of unfinished orders; nothing was stored, try again shortly",
        )
        .with_retry_after(1),
        StoreError::Other(cause) => {
            tracing::error!(error = %cause, "{what} error");
            ApiError::internal()
        }
    }
}

impl From<LedgerError> for ApiError {
    fn from(err: LedgerError) -> Self {
        match &err {
            LedgerError::Store(store) => store_failure(store, "payment ledger"),
            LedgerError::Poisoned => {
                tracing::error!(error = %err, "reading the payment ledger failed");
                Self::internal()
            }
        }
    }
}

impl From<SettingsError> for ApiError {
    fn from(err: SettingsError) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            err.to_string(),
        )
        .with_field(err.field)
    }
}

impl From<LoadError> for ApiError {
    fn from(err: LoadError) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            err.message,
        )
        .with_field(err.field)
    }
}

impl From<ProfileError> for ApiError {
    fn from(err: ProfileError) -> Self {
        match err {
            ProfileError::Busy => Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "profile_in_progress",
                err.to_string(),
            )
            .with_retry_after(5),
            ProfileError::HeapUnavailable(_) => Self::new(
                StatusCode::NOT_IMPLEMENTED,
                "heap_profiling_unavailable",
                err.to_string(),
            ),
            ProfileError::Failed(ref cause) => {
                tracing::error!(error = %cause, "profiling failed");
                Self::internal()
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: self.message,
                field: self.field,
            },
            extra: self.extra.map(|extra| {
                let (key, value) = *extra;
                std::iter::once((key, value)).collect()
            }),
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after_secs {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.status == StatusCode::REQUEST_TIMEOUT {
            // What is left of the late body would be read as the next request.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::orders::{OrderId, Status};

    #[test]
    fn each_domain_error_maps_to_its_status() {
        let id = OrderId::new_random();
        for (err, status) in [
            (OrderError::NotFound(id), StatusCode::NOT_FOUND),
            (
                OrderError::invalid("amount", "bad"),
                StatusCode::UNPROCESSABLE_ENTITY,
            ),
            (
                OrderError::IllegalTransition {
                    from: Status::Failed,
                    to: Status::Pending,
                },
                StatusCode::CONFLICT,
            ),
            (OrderError::QueueFull, StatusCode::SERVICE_UNAVAILABLE),
            (OrderError::ShuttingDown, StatusCode::SERVICE_UNAVAILABLE),
            (
                OrderError::Storage(StoreError::Unavailable("down".into())),
                StatusCode::SERVICE_UNAVAILABLE,
            ),
            (
                OrderError::Storage(StoreError::Other("secret detail".into())),
                StatusCode::INTERNAL_SERVER_ERROR,
            ),
        ] {
            assert_eq!(ApiError::from(err).status, status);
        }
    }

    #[test]
    fn internal_details_never_reach_the_client() {
        let api = ApiError::from(OrderError::Storage(StoreError::Other(
            "password=hunter2".into(),
        )));
        assert!(!api.message.contains("hunter2"));
    }

    #[test]
    fn ledger_failures_hide_their_cause() {
        let api = ApiError::from(LedgerError::Store(StoreError::Unavailable(
            "connection refused to 10.1.2.3".into(),
        )));
        assert_eq!(api.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(!api.message.contains("10.1.2.3"));
        let api = ApiError::from(LedgerError::Store(StoreError::Other("syntax".into())));
        assert_eq!(api.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(
            ApiError::from(LedgerError::Poisoned).status,
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }

    #[tokio::test]
    async fn an_extra_key_sits_beside_the_error() {
        use http_body_util::BodyExt;
        let response = ApiError::not_found("nothing here")
            .with_extra("see", serde_json::json!(["a", "b"]))
            .into_response();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(body["error"]["code"], "not_found");
        assert_eq!(body["see"], serde_json::json!(["a", "b"]));
    }

    #[test]
    fn a_full_queue_says_when_to_retry() {
        let response = ApiError::from(OrderError::QueueFull).into_response();
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
    }
}
