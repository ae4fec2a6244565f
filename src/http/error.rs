//! One error type for every HTTP answer that is not a success.
//!
//! The status code is chosen in one place (`From<OrderError>`), the body is
//! always `{"error": {"code", "message"}}` (plus `field` when one input field
//! is at fault), and 5xx details stay in the logs, never in the response.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use crate::orders::{OrderError, StoreError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
    pub retry_after_secs: Option<u32>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Detail<'a>,
}

#[derive(Serialize)]
struct Detail<'a> {
    code: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            field: None,
            retry_after_secs: None,
        }
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
    pub fn invalid_order_id(raw: &str, field: &'static str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_order_id",
            format!("{raw:?} is not an order id; expected a UUID"),
        )
        .with_field(field)
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
            OrderError::Storage(StoreError::Unavailable(cause)) => {
                tracing::error!(error = %cause, "store unavailable");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    "the order store cannot be reached; try again shortly",
                )
                .with_retry_after(2)
            }
            OrderError::Storage(StoreError::Other(cause)) => {
                tracing::error!(error = %cause, "store error");
                Self::internal()
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Body {
            error: Detail {
                code: self.code,
                message: &self.message,
                field: self.field.as_deref(),
            },
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after_secs {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
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
    fn a_full_queue_says_when_to_retry() {
        let response = ApiError::from(OrderError::QueueFull).into_response();
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
    }
}
