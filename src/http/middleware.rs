//! Request logging and HTTP metrics, in one middleware.
//!
//! One log line per request: request id, method, path, matched route,
//! status and latency. Bodies are never logged. The metrics' `route` label is
//! the matched route pattern, or one fixed value for unmatched requests, so
//! the number of series stays bounded whatever clients send.

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, Method};
use axum::middleware::Next;
use axum::response::Response;
use rand::RngExt;
use tokio::time::Instant;
use tower_http::request_id::{MakeRequestId, RequestId};

use std::panic::AssertUnwindSafe;

use futures_util::FutureExt;

use super::AppState;
use crate::observability::access_log;
use crate::observability::metrics::UNMATCHED_ROUTE;

/// Methods outside the common set share one label value.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

pub async fn observe(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = method_label(request.method());
    let path = request.uri().path().to_owned();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned());
    let request_id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();

    // A panic in a handler becomes a 500 with the JSON error body, logged
    // and counted here like any request; the connection stays up. (Caught
    // here rather than by a layer of its own: tower-http's catch-panic layer
    // boxes every response body.)
    let response = match AssertUnwindSafe(next.run(request)).catch_unwind().await {
        Ok(response) => response,
        Err(panic) => {
            state.http_metrics.panicked();
            panic_response(panic)
        }
    };

    let latency = start.elapsed();
    let status = response.status();
    let route = route.as_deref().unwrap_or(UNMATCHED_ROUTE);
    state.http_metrics.observe(method, route, status, latency);
    let line = access_log::RequestLine {
        request_id: &request_id,
        method,
        path: &path,
        route,
        status: status.as_u16(),
        latency_us: u64::try_from(latency.as_micros()).unwrap_or(u64::MAX),
    };
    if !access_log::write(&line) {
        tracing::info!(
            target: "reliability_lab::http",
            request_id = request_id.as_str(),
            method,
            path = path.as_str(),
            route,
            status = status.as_u16(),
            latency_ms = round_ms(latency),
            "request"
        );
    }
    response
}

/// The longest client-sent X-Request-Id that is echoed.
pub const MAX_REQUEST_ID: usize = 128;

/// Removes a client's X-Request-Id unless there is exactly one and it is 1 to
/// 128 visible ASCII characters; the next layer then mints one. An id is
/// echoed in the response and written to the log, so it must stay small and
/// printable.
pub fn drop_unusable_request_id(mut request: Request) -> Request {
    let headers = request.headers_mut();
    let mut values = headers.get_all("x-request-id").iter();
    let usable = match (values.next(), values.next()) {
        (Some(value), None) => {
            let bytes = value.as_bytes();
            !bytes.is_empty()
                && bytes.len() <= MAX_REQUEST_ID
                && bytes.iter().all(u8::is_ascii_graphic)
        }
        (None, _) => true,
        (Some(_), Some(_)) => false,
    };
    if !usable {
        headers.remove("x-request-id");
    }
    request
}

/// The answer to a request whose handler panicked: the panic is logged, the
/// client gets the JSON 500 (no details).
fn panic_response(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let message = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("(no message)");
    tracing::error!(panic = message, "a request handler panicked");
    axum::response::IntoResponse::into_response(super::ApiError::internal())
}

/// Milliseconds to the microsecond: `0.076`, not `0.07643399999999999`.
fn round_ms(latency: std::time::Duration) -> f64 {
    (latency.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

/// Request ids for requests that come without one: UUID-shaped, from the
/// thread's fast generator rather than a system call per request (the ids
/// only need to be unique, not secret).
#[derive(Clone, Copy, Default)]
pub struct MakeRequestUuidFast;

impl MakeRequestId for MakeRequestUuidFast {
    fn make_request_id<B>(&mut self, _: &axum::http::Request<B>) -> Option<RequestId> {
        let id = uuid::Builder::from_random_bytes(rand::rng().random()).into_uuid();
        let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
        let text = id.hyphenated().encode_lower(&mut buf);
        HeaderValue::from_str(text).ok().map(RequestId::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn latency_is_logged_to_the_microsecond() {
        assert_eq!(round_ms(Duration::from_nanos(76_434)), 0.076);
        assert_eq!(round_ms(Duration::from_nanos(1_234_567)), 1.235);
        assert_eq!(round_ms(Duration::from_secs(2)), 2000.0);
        assert_eq!(round_ms(Duration::ZERO), 0.0);
    }
}
