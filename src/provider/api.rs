//! The provider's routes: charges, health, metrics, its contract and the
//! operator's settings.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use prometheus::{Encoder, IntCounter, IntCounterVec, Opts, Registry, TextEncoder};
use serde::Deserialize;
use tower::ServiceExt as _;
use utoipa::OpenApi;

use super::faults::{Fault, FaultUpdate, FaultView, Verdict};
use super::upstream::{Unserved, Upstream};
use super::ProviderState;
use crate::http::error::{ApiError, ErrorBody};
use crate::http::extract::JsonBody;
use crate::http::handlers::idempotency_key;
use crate::http::server::ResetConnection;
use crate::orders::{Amount, Currency, OrderId};
use crate::payment::{
    Charge, ChargeRequest, PaymentError, PaymentUpdate, ProviderMetrics, SettingsView,
};

type Shared = Arc<ProviderState>;

/// The provider's registry: the simulator's counters under the names the
/// service gives them, and what only the provider counts.
pub(crate) struct ProviderServiceMetrics {
    registry: Registry,
    pub provider: ProviderMetrics,
    /// Charge calls answered with a failure (declines, outages, overload).
    pub failures: IntCounter,
    /// Faults staged, by kind.
    pub faults: IntCounterVec,
    /// Charge calls refused by the rate limit.
    pub rate_limited: IntCounter,
    /// Every charge call received, whatever became of it (the calls this
    /// tier saw, in a chain).
    pub requests: IntCounter,
}

impl ProviderServiceMetrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let provider = crate::observability::metrics::provider_metrics(&registry);
        let failures = IntCounter::new(
            "payment_failures_total",
            "Charge calls the provider answered with a failure (a decline, an outage, no free slot).",
        )
        .expect("valid metric");
        registry
            .register(Box::new(failures.clone()))
            .expect("unique metric");
        let faults = IntCounterVec::new(
            Opts::new(
                "provider_faults_total",
                "Network faults the provider staged, by fault.",
            ),
            &["fault"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(faults.clone()))
            .expect("unique metric");
        for fault in Fault::ALL.into_iter().filter(|f| *f != Fault::None) {
            faults.with_label_values(&[fault.as_str()]);
        }
        let rate_limited = IntCounter::new(
            "provider_rate_limited_total",
            "Charge calls answered 429 because PROVIDER_RATE_LIMIT was reached.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(rate_limited.clone()))
            .expect("unique metric");
        let requests = IntCounter::new(
            "provider_requests_total",
            "Charge calls received (POST /charges with a valid body), whatever became of them: faults, rate limit and forwarded calls included.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(requests.clone()))
            .expect("unique metric");
        #[cfg(target_os = "linux")]
        {
            let process = prometheus::process_collector::ProcessCollector::for_self();
            registry.register(Box::new(process)).expect("unique metric");
        }
        Self {
            registry,
            provider,
            failures,
            faults,
            rate_limited,
            requests,
        }
    }

    /// Where the provider's other figures register (an upstream's client).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    fn render(&self) -> Result<String, prometheus::Error> {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        Ok(String::from_utf8(out).unwrap_or_default())
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "reliability-lab provider",
        description = "The simulated payment provider as its own HTTP service: charges at most once per Idempotency-Key, the simulator's failures, and faults only a network has."
    ),
    paths(
        create_charge,
        get_charge,
        healthz,
        metrics,
        get_payment,
        put_payment,
        get_faults,
        put_faults
    ),
    components(schemas(
        ChargeBody,
        Charge,
        ErrorBody,
        SettingsView,
        PaymentUpdate,
        FaultView,
        FaultUpdate,
        Fault
    ))
)]
struct ProviderDoc;

/// The provider's routes.
pub(crate) fn router(state: Shared) -> crate::http::Api {
    let admin = Router::new()
        .route("/admin/payment", get(get_payment).put(put_payment))
        .route("/admin/faults", get(get_faults).put(put_faults))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_token,
        ));
    let router = Router::new()
        .route("/charges", post(create_charge))
        .route("/charges/{key}", get(get_charge))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(document))
        .merge(admin)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(
            crate::http::extract::BODY_LIMIT,
        ))
        .with_state(state);
    let keep: fn(Request) -> Request = |request| request;
    let hide: fn(Response) -> Response = crate::http::auth::hide_routes_from_strangers;
    router.map_request(keep).map_response(hide)
}

async fn require_token(State(state): State<Shared>, request: Request, next: Next) -> Response {
    match crate::http::auth::refusal_for(state.admin_token.as_ref(), &request) {
        Some(refused) => refused,
        None => next.run(request).await,
    }
}

async fn not_found(State(state): State<Shared>, request: Request) -> Response {
    match crate::http::auth::refusal_for(state.admin_token.as_ref(), &request) {
        Some(refused) => refused,
        None => ApiError::not_found("no such route").into_response(),
    }
}

async fn method_not_allowed(State(state): State<Shared>, request: Request) -> Response {
    match crate::http::auth::refusal_for(state.admin_token.as_ref(), &request) {
        Some(refused) => refused,
        None => ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "this route does not take that method",
        )
        .into_response(),
    }
}

/// The highest attempt number a charge may carry.
const ATTEMPT_MAX: u32 = 1_000_000;

/// A charge to make.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ChargeBody {
    pub order_id: uuid::Uuid,
    /// In minor units (cents), above zero.
    #[schema(minimum = 1, maximum = 100000000, example = 1999)]
    pub amount: i64,
    /// Three letters (ISO 4217), such as USD.
    #[schema(pattern = "^[A-Za-z]{3}$", example = "USD")]
    pub currency: String,
    /// The caller's attempt number, from 1; the simulator's seeded draws
    /// follow it. Without it, each call draws anew.
    #[schema(minimum = 1, maximum = 1000000)]
    pub attempt: Option<u32>,
}

#[utoipa::path(post, path = "/charges", tag = "charges",
    request_body = ChargeBody,
    params(("Idempotency-Key" = Option<String>, Header, max_length = 255, min_length = 1,
        pattern = "^[\\x21-\\x7E]+$", description = "1 to 255 visible ASCII characters: at most one charge is made per key, and a repeated key answers the first charge")),
    responses(
        (status = 200, description = "Charged (or the key's first charge, again)", body = Charge),
        (status = 400, description = "Malformed JSON or header", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not application/json", body = ErrorBody),
        (status = 422, description = "A field is missing or invalid", body = ErrorBody),
        (status = 429, description = "Over PROVIDER_RATE_LIMIT; see Retry-After", body = ErrorBody),
        (status = 502, description = "Declined (simulated); another attempt draws anew. With an upstream: not charged below (a failure, a lost answer or a timeout there)", body = ErrorBody),
        (status = 503, description = "An outage, or no free slot (then with Retry-After). With an upstream: its breaker is open, or the downstream is busy (then with Retry-After)", body = ErrorBody),
    ))]
async fn create_charge(
    State(state): State<Shared>,
    reset: Option<Extension<ResetConnection>>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<ChargeBody>,
) -> Result<Response, ApiError> {
    let key = idempotency_key(&headers)?.map(str::to_owned);
    let amount = Amount::parse(body.amount)?;
    let currency = Currency::parse(&body.currency)?;
    if body.attempt.is_some_and(|a| a == 0 || a > ATTEMPT_MAX) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            format!("attempt must be from 1 to {ATTEMPT_MAX}"),
        )
        .with_field("attempt"));
    }
    let attempt = body
        .attempt
        .unwrap_or_else(|| state.calls.fetch_add(1, Ordering::Relaxed).wrapping_add(1));
    let request = ChargeRequest {
        order_id: OrderId::from_uuid(body.order_id),
        attempt,
        idempotency_key: key.clone().unwrap_or_default(),
        amount: amount.value(),
        currency: currency.as_str().to_owned(),
    };
    let metrics = &state.metrics;
    metrics.requests.inc();
    let reset = reset.map(|Extension(r)| r);
    let fault = match state.faults.verdict() {
        Verdict::Limited(secs) => {
            metrics.rate_limited.inc();
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "over the provider's rate limit; try again after Retry-After",
            )
            .with_retry_after(u32::try_from(secs).unwrap_or(1)));
        }
        Verdict::Fault(fault) => Some(fault),
        Verdict::Serve => None,
    };
    // Counted when staged: a reset_after or slow_body drawn on a call the
    // simulator declines is answered as the decline.
    let staged = |fault: Fault| metrics.faults.with_label_values(&[fault.as_str()]).inc();
    match fault {
        Some(Fault::Refuse) => {
            staged(Fault::Refuse);
            let period = state.faults.settings().refuse_for;
            let _ = state.go_down.send(period);
            return hang(&state).await;
        }
        Some(Fault::ResetBefore) => {
            staged(Fault::ResetBefore);
            return reset_now(reset.as_ref(), &state).await;
        }
        Some(Fault::Stall) => {
            staged(Fault::Stall);
            return hang(&state).await;
        }
        _ => {}
    }
    match &state.upstream {
        Some(upstream) => forward(&state, upstream, &request, key.as_deref()).await?,
        None => match state.simulator.charge(&request, &state.stop).await {
            Ok(()) => {}
            Err(PaymentError::Ambiguous) => return reset_now(reset.as_ref(), &state).await,
            Err(err) => return Err(failure(&state, err)),
        },
    }
    if fault == Some(Fault::ResetAfter) {
        staged(Fault::ResetAfter);
        return reset_now(reset.as_ref(), &state).await;
    }
    let charge = charge_made(&state, &request, key.as_deref()).await?;
    let body = serde_json::to_vec(&charge).expect("a charge serialises");
    if fault == Some(Fault::SlowBody) {
        staged(Fault::SlowBody);
        let settings = state.faults.settings();
        return Ok(slow_answer(
            body,
            settings.slow_body_chunk as usize,
            settings.slow_body_interval,
        ));
    }
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// A tier in the middle: the key's charge if this tier has one, else a
/// charge made below (through this tier's retry and breaker) and recorded
/// here. What could not be charged below is answered so that the caller
/// can classify it (see `upstream`).
async fn forward(
    state: &ProviderState,
    upstream: &Upstream,
    request: &ChargeRequest,
    key: Option<&str>,
) -> Result<(), ApiError> {
    let ledger = state.simulator.ledger();
    let key = key.filter(|k| state.simulator.view().idempotency && !k.is_empty());
    if let Some(key) = key {
        if ledger.by_key(key).await?.is_some() {
            return Ok(());
        }
    }
    match upstream.charge(request, &state.stop).await {
        Ok(()) => {
            let recorded = ledger.record(request, key).await?;
            if recorded.new_charge {
                state.metrics.provider.charges.inc();
                if recorded.earlier_charges > 0 {
                    state.metrics.provider.duplicate_charges.inc();
                }
            }
            Ok(())
        }
        Err(unserved) => {
            state.metrics.failures.inc();
            Err(match unserved {
                Unserved::Open(reason) => ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "upstream_open",
                    format!(
                        "not charged: {reason} (this tier's breaker, in front of {})",
                        upstream.url()
                    ),
                ),
                Unserved::Busy(wait) => ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "upstream_busy",
                    "not charged: the downstream provider is busy; try again after Retry-After",
                )
                .with_retry_after(
                    wait.map_or(1, |w| u32::try_from(w.as_secs().max(1)).unwrap_or(u32::MAX)),
                ),
                Unserved::Failed(reason) => ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "upstream_failed",
                    format!("not charged below: {reason}"),
                ),
            })
        }
    }
}

/// The charge a successful call made or found.
async fn charge_made(
    state: &ProviderState,
    request: &ChargeRequest,
    key: Option<&str>,
) -> Result<Charge, ApiError> {
    let ledger = state.simulator.ledger();
    let found = match key {
        Some(key) if state.simulator.view().idempotency => ledger.by_key(key).await?,
        _ => ledger.charges(request.order_id).await?.pop(),
    };
    found.ok_or_else(|| {
        tracing::error!(order_id = %request.order_id, "a charge the simulator made is not in the ledger");
        ApiError::internal()
    })
}

/// A failed charge as its answer.
fn failure(state: &ProviderState, err: PaymentError) -> ApiError {
    state.metrics.failures.inc();
    match err {
        PaymentError::Declined => ApiError::new(
            StatusCode::BAD_GATEWAY,
            "declined",
            "payment declined (simulated); another attempt draws anew",
        ),
        PaymentError::Outage => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "outage",
            "payment service unavailable (simulated outage)",
        ),
        PaymentError::Overloaded(waited) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            format!(
                "no free slot within {}; try again after Retry-After",
                humantime::format_duration(waited)
            ),
        )
        .with_retry_after(1),
        PaymentError::Cancelled => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the provider is shutting down",
        ),
        PaymentError::Ledger(err) => err.into(),
        other => {
            tracing::error!(error = %other, "unexpected simulator error");
            ApiError::internal()
        }
    }
}

/// Resets the request's connection; this handler is dropped with it.
async fn reset_now(
    reset: Option<&ResetConnection>,
    state: &ProviderState,
) -> Result<Response, ApiError> {
    match reset {
        Some(reset) => {
            reset.reset();
            hang(state).await
        }
        None => {
            tracing::error!("a reset was drawn on a connection that cannot be reset");
            Err(ApiError::internal())
        }
    }
}

/// Never answers: the caller gives up, the connection is dropped, or the
/// provider stops (then 503).
async fn hang(state: &ProviderState) -> Result<Response, ApiError> {
    state.stop.cancelled().await;
    Err(failure(state, PaymentError::Cancelled))
}

/// An answer sent `chunk` bytes every `every`.
fn slow_answer(body: Vec<u8>, chunk: usize, every: Duration) -> Response {
    let length = body.len();
    let pieces: Vec<Vec<u8>> = body.chunks(chunk.max(1)).map(<[u8]>::to_vec).collect();
    let stream = futures_util::stream::unfold(
        (pieces.into_iter(), true),
        move |(mut rest, first)| async move {
            let piece = rest.next()?;
            if !first {
                tokio::time::sleep(every).await;
            }
            Some((
                Ok::<_, std::convert::Infallible>(bytes::Bytes::from(piece)),
                (rest, false),
            ))
        },
    );
    (
        [
            (header::CONTENT_TYPE, "application/json".to_owned()),
            (header::CONTENT_LENGTH, length.to_string()),
        ],
        axum::body::Body::from_stream(stream),
    )
        .into_response()
}

#[utoipa::path(get, path = "/charges/{key}", tag = "charges",
    params(("key" = String, Path, min_length = 1, max_length = 255, pattern = "^[\\x21-\\x7E]+$", description = "The Idempotency-Key the charge was made under")),
    responses(
        (status = 200, description = "The charge made under the key", body = Charge),
        (status = 400, description = "The path is not UTF-8", body = ErrorBody),
        (status = 404, description = "No charge under this key", body = ErrorBody),
    ))]
async fn get_charge(
    State(state): State<Shared>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    // Any text is looked up: a key no charge was made under is a 404,
    // whatever its form.
    let Path(key) = path.map_err(|e| ApiError::bad_path(&e, "invalid_key", "key"))?;
    match state.simulator.ledger().by_key(&key).await? {
        Some(charge) => Ok(Json(charge).into_response()),
        None => Err(ApiError::not_found(format!("no charge under key {key:?}"))),
    }
}

#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "The provider is up", content_type = "text/plain", body = String)))]
async fn healthz() -> &'static str {
    "ok"
}

#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text exposition", content_type = "text/plain", body = String)))]
async fn metrics(State(state): State<Shared>) -> Response {
    match state.metrics.render() {
        Ok(text) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response(),
        Err(err) => {
            tracing::error!(error = %err, "rendering metrics failed");
            ApiError::internal().into_response()
        }
    }
}

async fn document() -> Response {
    static DOC: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let json = DOC.get_or_init(|| {
        ProviderDoc::openapi()
            .to_pretty_json()
            .expect("the document serialises")
    });
    ([(header::CONTENT_TYPE, "application/json")], json.as_str()).into_response()
}

#[utoipa::path(get, path = "/admin/payment", tag = "admin",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The simulator's settings now", body = SettingsView),
        (status = 401, description = "ADMIN_TOKEN is set and was not presented", body = ErrorBody),
    ))]
async fn get_payment(State(state): State<Shared>) -> Response {
    Json(state.simulator.view()).into_response()
}

#[utoipa::path(put, path = "/admin/payment", tag = "admin",
    security(("bearer" = [])),
    request_body = PaymentUpdate,
    responses(
        (status = 200, description = "The settings after the change", body = SettingsView),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "ADMIN_TOKEN is set and was not presented", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not application/json", body = ErrorBody),
        (status = 422, description = "A field is invalid; nothing changed", body = ErrorBody),
    ))]
async fn put_payment(
    State(state): State<Shared>,
    JsonBody(update): JsonBody<PaymentUpdate>,
) -> Result<Response, ApiError> {
    Ok(Json(state.simulator.update(update)?).into_response())
}

#[utoipa::path(get, path = "/admin/faults", tag = "admin",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The network faults now", body = FaultView),
        (status = 401, description = "ADMIN_TOKEN is set and was not presented", body = ErrorBody),
    ))]
async fn get_faults(State(state): State<Shared>) -> Response {
    Json(state.faults.settings().view()).into_response()
}

#[utoipa::path(put, path = "/admin/faults", tag = "admin",
    security(("bearer" = [])),
    request_body = FaultUpdate,
    responses(
        (status = 200, description = "The faults after the change", body = FaultView),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "ADMIN_TOKEN is set and was not presented", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not application/json", body = ErrorBody),
        (status = 422, description = "A field is invalid; nothing changed", body = ErrorBody),
    ))]
async fn put_faults(
    State(state): State<Shared>,
    JsonBody(update): JsonBody<FaultUpdate>,
) -> Result<Response, ApiError> {
    Ok(Json(state.faults.update(&update)?.view()).into_response())
}
