//! The HTTP layer: router, handlers, middleware and the error type.
//!
//! Handlers translate between HTTP and the order service; they hold no
//! business rules. Every answer that is not a success is an `ApiError`.

mod admin;
pub(crate) mod auth;
mod console;
mod debug;
pub(crate) mod error;
pub(crate) mod extract;
pub(crate) mod handlers;
mod lab;
mod middleware;
pub mod openapi;
pub mod server;

use std::sync::Arc;

use tokio::time::Instant;

use axum::extract::DefaultBodyLimit;
use axum::extract::Request;
use axum::response::Response;
use axum::routing::{get, post, MethodRouter};
use axum::Router;
use tower::util::{MapRequest, MapResponse};
use tower::ServiceExt;
use tower_http::request_id::{PropagateRequestIdLayer, SetRequestIdLayer};

use crate::lab::Instruments;
use crate::observability::metrics::HttpMetrics;
use crate::observability::profiling::Profiler;
use crate::observability::Metrics;
use crate::orders::Service;
use crate::payment::Simulator;
use crate::reliability::Reliability;
use crate::workers::Dispatcher;

pub use auth::AdminToken;
pub use error::ApiError;
pub use extract::{JsonBody, BODY_LIMIT};

/// What every handler can reach: one `Arc`, because axum clones the state
/// for every request (a profile under load showed cloning and dropping a
/// wider state at 13% of the CPU).
#[derive(Clone)]
pub struct AppState(Arc<AppParts>);

impl AppState {
    pub fn new(parts: AppParts) -> Self {
        Self(Arc::new(parts))
    }
}

impl std::ops::Deref for AppState {
    type Target = AppParts;

    fn deref(&self) -> &AppParts {
        &self.0
    }
}

/// The parts behind `AppState`.
pub struct AppParts {
    pub service: Service,
    /// The registry, rendered by `/metrics`.
    pub metrics: Arc<Metrics>,
    /// The request counters the middleware records into.
    pub http_metrics: HttpMetrics,
    pub profiler: Arc<Profiler>,
    pub lab: LabHandles,
    /// When set, `/admin` and `/debug` need it as a bearer token.
    pub admin_token: Option<AdminToken>,
}

/// The running lab's moving parts, for the admin API.
pub struct LabHandles {
    pub payment: Arc<Simulator>,
    /// With `PAYMENT_URL`: the client charges go through.
    pub remote: Option<Arc<crate::payment::client::HttpPayments>>,
    pub reliability: Reliability,
    pub queue: Arc<Dispatcher>,
    pub workers: usize,
    pub started: Instant,
    /// The traffic generator, the timeline and their feed.
    pub instruments: Instruments,
}

/// The routes, each noted as it is added so that the OpenAPI test can
/// check that every one is documented.
struct Routes {
    router: Router<AppState>,
    paths: Vec<&'static str>,
}

impl Routes {
    fn new() -> Self {
        Self {
            router: Router::new(),
            paths: Vec::new(),
        }
    }

    fn route(mut self, path: &'static str, method_router: MethodRouter<AppState>) -> Self {
        self.paths.push(path);
        self.router = self.router.route(path, method_router);
        self
    }
}

/// The public routes.
fn public_routes() -> Routes {
    Routes::new()
        .route("/healthz", get(handlers::healthz))
        .route("/readyz", get(handlers::readyz))
        .route("/version", get(handlers::version))
        .route("/metrics", get(handlers::metrics))
        .route("/openapi.json", get(openapi::document))
        .route("/orders", post(handlers::create_order))
        .route("/orders/{id}", get(handlers::get_order))
        .route("/", get(console::page))
        .route("/console.js", get(console::script))
        .route("/console.css", get(console::style))
}

/// Everything the lab's operator uses, behind the admin token when one is set.
fn operator_routes() -> Routes {
    Routes::new()
        .route(
            "/admin/payment",
            get(admin::get_payment).put(admin::put_payment),
        )
        .route("/admin/payment/ledger/{order_id}", get(admin::get_ledger))
        .route("/admin/provider", get(admin::get_provider))
        .route(
            "/admin/provider/faults",
            axum::routing::put(admin::put_provider_faults),
        )
        .route(
            "/admin/breaker",
            get(admin::get_breaker).put(admin::put_breaker),
        )
        .route("/admin/breaker/reset", post(admin::reset_breaker))
        .route(
            "/admin/reliability",
            get(admin::get_reliability).put(admin::put_reliability),
        )
        .route("/admin/state", get(admin::get_state))
        .route(
            "/admin/load",
            get(lab::get_load)
                .put(lab::put_load)
                .delete(lab::delete_load),
        )
        .route("/admin/timeline", get(lab::get_timeline))
        .route("/admin/events", get(lab::events))
        .route("/debug/pprof", get(debug::index_bare))
        .route("/debug/pprof/", get(debug::index))
        .route("/debug/pprof/profile", get(debug::profile))
        .route("/debug/pprof/flamegraph", get(debug::flamegraph))
        .route("/debug/pprof/heap", get(debug::heap))
        .route("/debug/pprof/{name}", get(debug::unknown))
}

/// Every route pattern the router serves.
pub fn route_paths() -> Vec<&'static str> {
    let mut paths = public_routes().paths;
    paths.extend(operator_routes().paths);
    paths
}

/// The service: the router, with a client's unusable `X-Request-Id` dropped
/// before it and a refused request's `Allow` header taken off after it.
/// Plain function wrappers, not middleware: no boxing, nothing cloned per
/// request.
pub type Api = MapResponse<MapRequest<Router, fn(Request) -> Request>, fn(Response) -> Response>;

/// The service's router, with request ids, request logging and metrics.
pub fn router(state: AppState) -> Api {
    let operator = operator_routes()
        .router
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ));
    let router = public_routes()
        .router
        .merge(operator)
        // The fallbacks come before the layers, so that unmatched requests are
        // logged and counted too (under one fixed route label). They also
        // refuse strangers on operator paths, like the route layer above.
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::observe,
        ))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(
            middleware::MakeRequestUuidFast,
        ))
        .with_state(state);
    let drop_id: fn(Request) -> Request = middleware::drop_unusable_request_id;
    let hide: fn(Response) -> Response = auth::hide_routes_from_strangers;
    router.map_request(drop_id).map_response(hide)
}
