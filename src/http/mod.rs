//! The HTTP layer: router, handlers, middleware and the error type.
//!
//! Handlers translate between HTTP and the order service; they hold no
//! business rules. Every answer that is not a success is an `ApiError`.

mod debug;
mod error;
mod extract;
mod handlers;
mod middleware;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};

use crate::observability::profiling::Profiler;
use crate::observability::Metrics;
use crate::orders::Service;

pub use error::ApiError;
pub use extract::{JsonBody, BODY_LIMIT};

/// What every handler can reach. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub service: Service,
    pub metrics: Arc<Metrics>,
    pub profiler: Arc<Profiler>,
}

/// The service's router, with request ids, request logging and metrics.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(handlers::healthz))
        .route("/readyz", get(handlers::readyz))
        .route("/version", get(handlers::version))
        .route("/metrics", get(handlers::metrics))
        .route("/orders", post(handlers::create_order))
        .route("/orders/{id}", get(handlers::get_order))
        .route("/debug/pprof", get(debug::index))
        .route("/debug/pprof/", get(debug::index))
        .route("/debug/pprof/profile", get(debug::profile))
        .route("/debug/pprof/flamegraph", get(debug::flamegraph))
        .route("/debug/pprof/heap", get(debug::heap))
        .route("/debug/pprof/{name}", get(debug::unknown))
        // The fallbacks come before the layers, so that unmatched requests are
        // logged and counted too (under one fixed route label).
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::observe,
        ))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .with_state(state)
}
