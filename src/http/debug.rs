//! `/debug/pprof/`: CPU profiles, flame graphs and heap profiles.
//!
//! Every listed profile has its own route, and any other name under
//! `/debug/pprof/` answers 404 with the list, so a named profile can never be
//! silently unreachable.

use std::collections::HashMap;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::error::ErrorBody;
use super::{ApiError, AppState};
use crate::observability::profiling::{self, PROFILES};

const DEFAULT_SECONDS: u64 = 30;
const MAX_SECONDS: u64 = 120;

/// One profile `/debug/pprof/` offers.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ProfileInfo {
    pub name: &'static str,
    pub path: String,
    pub description: &'static str,
}

/// The profiles on offer.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ProfileList {
    pub profiles: Vec<ProfileInfo>,
}

fn profiles() -> Vec<ProfileInfo> {
    PROFILES
        .iter()
        .map(|(name, description)| ProfileInfo {
            name,
            path: format!("/debug/pprof/{name}"),
            description,
        })
        .collect()
}

fn listing() -> serde_json::Value {
    serde_json::to_value(profiles()).unwrap_or_default()
}

#[utoipa::path(get, path = "/debug/pprof/", tag = "debug", security(("admin_token" = [])),
    responses(
        (status = 200, description = "The profiles on offer", body = ProfileList),
        (status = 401, description = "ADMIN_TOKEN is set and was not sent", body = ErrorBody),
    ))]
pub async fn index() -> Json<ProfileList> {
    Json(ProfileList {
        profiles: profiles(),
    })
}

/// The same list without the trailing slash.
#[utoipa::path(get, path = "/debug/pprof", tag = "debug", security(("admin_token" = [])),
    responses(
        (status = 200, description = "The profiles on offer", body = ProfileList),
        (status = 401, description = "ADMIN_TOKEN is set and was not sent", body = ErrorBody),
    ))]
pub async fn index_bare() -> Json<ProfileList> {
    index().await
}

#[utoipa::path(get, path = "/debug/pprof/{name}", tag = "debug", security(("admin_token" = [])),
    params(("name" = String, Path, description = "A profile's name; names with routes of their own (`heap`, `profile`, `flamegraph`) are answered by those routes")),
    responses(
        (status = 200, description = "A name with a route of its own answers as that route does: `heap` the heap profile, `profile` a CPU profile (both pprof protobuf), `flamegraph` an SVG flame graph, each sampling 30 s (or PROFILE_MAX_DURATION)", content((Vec<u8> = "application/octet-stream"), (String = "image/svg+xml"))),
        (status = 400, description = "The name is not UTF-8 once percent-decoded", body = ErrorBody),
        (status = 401, description = "ADMIN_TOKEN is set and was not sent", body = ErrorBody),
        (status = 404, description = "No such profile; the answer lists them under `profiles`", body = ErrorBody),
        (status = 429, description = "`profile` or `flamegraph` while another CPU profile is being taken", body = ErrorBody,
            headers(("Retry-After" = u32, description = "Seconds to wait"))),
        (status = 501, description = "`heap`, where this build's allocator does not profile", body = ErrorBody),
    ))]
pub async fn unknown(
    path: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> ApiError {
    let name = match path {
        Ok(Path(name)) => name,
        Err(rejection) => return ApiError::bad_path(&rejection, "invalid_path", "name"),
    };
    ApiError::new(
        StatusCode::NOT_FOUND,
        "unknown_profile",
        format!("no profile named {name:?}; see the list of available profiles"),
    )
    .with_extra("profiles", listing())
}

/// `?seconds=N`, 1 to 120, 30 when absent.
fn seconds(query: &HashMap<String, String>) -> Result<Duration, ApiError> {
    let Some(raw) = query.get("seconds") else {
        return Ok(Duration::from_secs(DEFAULT_SECONDS));
    };
    match raw.parse::<u64>() {
        Ok(n) if (1..=MAX_SECONDS).contains(&n) => Ok(Duration::from_secs(n)),
        _ => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_seconds",
            format!("seconds must be a whole number from 1 to {MAX_SECONDS}, got {raw:?}"),
        )
        .with_field("seconds")),
    }
}

/// A binary download; `filename` is a plain ASCII name.
fn attachment(bytes: Vec<u8>, filename: &str) -> Response {
    (
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{filename}\""),
            ),
        ],
        bytes,
    )
        .into_response()
}

#[utoipa::path(get, path = "/debug/pprof/profile", tag = "debug", security(("admin_token" = [])),
    params(("seconds" = Option<u64>, Query, minimum = 1, maximum = 120, description = "How long to sample (default 30)")),
    responses(
        (status = 200, description = "A CPU profile, pprof protobuf (read with go tool pprof)", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 400, description = "seconds is not a whole number from 1 to 120", body = ErrorBody),
        (status = 401, description = "ADMIN_TOKEN is set and was not sent", body = ErrorBody),
        (status = 429, description = "Another CPU profile is being taken", body = ErrorBody,
            headers(("Retry-After" = u32, description = "Seconds to wait"))),
    ))]
pub async fn profile(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let duration = seconds(&query)?;
    let bytes = state.profiler.cpu_pprof(duration).await?;
    Ok(attachment(bytes, "profile.pb"))
}

#[utoipa::path(get, path = "/debug/pprof/flamegraph", tag = "debug", security(("admin_token" = [])),
    params(("seconds" = Option<u64>, Query, minimum = 1, maximum = 120, description = "How long to sample (default 30)")),
    responses(
        (status = 200, description = "A CPU profile as an SVG flame graph", content_type = "image/svg+xml", body = String),
        (status = 400, description = "seconds is not a whole number from 1 to 120", body = ErrorBody),
        (status = 401, description = "ADMIN_TOKEN is set and was not sent", body = ErrorBody),
        (status = 429, description = "Another CPU profile is being taken", body = ErrorBody,
            headers(("Retry-After" = u32, description = "Seconds to wait"))),
    ))]
pub async fn flamegraph(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let duration = seconds(&query)?;
    let svg = state.profiler.cpu_flamegraph(duration).await?;
    Ok(([(header::CONTENT_TYPE, "image/svg+xml")], svg).into_response())
}

#[utoipa::path(get, path = "/debug/pprof/heap", tag = "debug", security(("admin_token" = [])),
    responses(
        (status = 200, description = "A heap profile, gzipped pprof protobuf", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 401, description = "ADMIN_TOKEN is set and was not sent", body = ErrorBody),
        (status = 501, description = "This build's allocator does not profile", body = ErrorBody),
    ))]
pub async fn heap() -> Result<Response, ApiError> {
    let bytes = profiling::heap_pprof().await?;
    Ok(attachment(bytes, "heap.pb.gz"))
}
