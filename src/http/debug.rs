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
use serde_json::json;

use super::{ApiError, AppState};
use crate::observability::profiling::{self, PROFILES};

const DEFAULT_SECONDS: u64 = 30;
const MAX_SECONDS: u64 = 120;

fn listing() -> serde_json::Value {
    json!(PROFILES
        .iter()
        .map(|(name, about)| json!({
            "name": name,
            "path": format!("/debug/pprof/{name}"),
            "description": about,
        }))
        .collect::<Vec<_>>())
}

pub async fn index() -> Json<serde_json::Value> {
    Json(json!({ "profiles": listing() }))
}

pub async fn unknown(Path(name): Path<String>) -> ApiError {
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

pub async fn profile(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let duration = seconds(&query)?;
    let bytes = state.profiler.cpu_pprof(duration).await?;
    Ok(attachment(bytes, "profile.pb"))
}

pub async fn flamegraph(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let duration = seconds(&query)?;
    let svg = state.profiler.cpu_flamegraph(duration).await?;
    Ok(([(header::CONTENT_TYPE, "image/svg+xml")], svg).into_response())
}

pub async fn heap() -> Result<Response, ApiError> {
    let bytes = profiling::heap_pprof().await?;
    Ok(attachment(bytes, "heap.pb.gz"))
}
