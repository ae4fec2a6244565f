//! Request logging and HTTP metrics, in one middleware.
//!
//! One log line per request: request id, method, path, matched route,
//! status and latency. Bodies are never logged. The metrics' `route` label is
//! the matched route pattern, or one fixed value for unmatched requests, so
//! the number of series stays bounded whatever clients send.

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use tokio::time::Instant;

use super::AppState;
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

    let response = next.run(request).await;

    let latency = start.elapsed();
    let status = response.status().as_u16();
    let route = route.as_deref().unwrap_or(UNMATCHED_ROUTE);
    state
        .metrics
        .observe_request(method, route, status, latency);
    tracing::info!(
        target: "reliability_lab::http",
        request_id = %request_id,
        method,
        path = %path,
        route,
        status,
        latency_ms = latency.as_secs_f64() * 1000.0,
        "request"
    );
    response
}
