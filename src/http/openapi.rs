//! The API contract: an OpenAPI 3.1 document generated from the handlers'
//! annotations and the request and response types, served at
//! `GET /openapi.json`. A test checks that every route of the router is in
//! it, and CI fuzzes the running service against it (schemathesis).

use std::sync::OnceLock;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{admin, console, debug, error, handlers, lab};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "reliability-lab",
        description = "An order-processing backend that fails on purpose: orders are charged through retry with exponential backoff around a circuit breaker, against a payment simulator that fails as told. `/admin` and `/debug` need `Authorization: Bearer <ADMIN_TOKEN>` when the service was started with ADMIN_TOKEN.",
    ),
    paths(
        handlers::healthz,
        handlers::readyz,
        handlers::version,
        handlers::metrics,
        document,
        handlers::create_order,
        handlers::get_order,
        admin::get_payment,
        admin::put_payment,
        admin::get_ledger,
        admin::get_provider,
        admin::put_provider_faults,
        admin::get_breaker,
        admin::put_breaker,
        admin::reset_breaker,
        admin::get_reliability,
        admin::put_reliability,
        admin::get_state,
        lab::get_load,
        lab::put_load,
        lab::delete_load,
        lab::get_timeline,
        lab::events,
        console::page,
        console::script,
        console::style,
        debug::index_bare,
        debug::index,
        debug::profile,
        debug::flamegraph,
        debug::heap,
        debug::unknown,
    ),
    components(schemas(
        error::ErrorBody,
        error::ErrorDetail,
        lab::Hello,
        crate::lab::Sample,
        crate::lab::Change,
        lab::Lagged
    )),
    modifiers(&BearerToken),
    tags(
        (name = "orders", description = "Create orders and read them back"),
        (name = "service", description = "Health, readiness, version, metrics, this document"),
        (name = "admin", description = "The lab's controls: failure modes, switches, the breaker, snapshots"),
        (name = "debug", description = "CPU and heap profiles"),
        (name = "console", description = "The live console page and its assets"),
    )
)]
pub struct ApiDoc;

/// The `admin_token` bearer scheme that `/admin` and `/debug` name.
struct BearerToken;

impl Modify for BearerToken {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "admin_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "ADMIN_TOKEN, when the service was started with one; otherwise not needed",
                    ))
                    .build(),
            ),
        );
    }
}

/// The document as JSON, rendered once.
pub fn json() -> &'static str {
    static JSON: OnceLock<String> = OnceLock::new();
    JSON.get_or_init(|| {
        let mut document = serde_json::to_value(ApiDoc::openapi()).expect("the document renders");
        describe_event_stream(&mut document);
        serde_json::to_string_pretty(&document).expect("the document renders")
    })
}

/// `GET /admin/events` answers a stream of events, each a name and a JSON
/// object. OpenAPI 3.1 describes a stream by the schema of one event as a
/// client parses it, `{"event": name, "data": text}`, the text's own schema
/// given by `contentMediaType` and `contentSchema` (JSON Schema 2020-12):
/// one branch per event name. utoipa's schema types have no
/// `contentSchema`, so the branches are written into the rendered document.
fn describe_event_stream(document: &mut serde_json::Value) {
    let branches: Vec<serde_json::Value> = lab::STREAM_EVENTS
        .iter()
        .map(|(name, schema)| {
            serde_json::json!({
                "type": "object",
                "required": ["event", "data"],
                "properties": {
                    "event": { "type": "string", "enum": [name] },
                    "data": {
                        "type": "string",
                        "contentMediaType": "application/json",
                        "contentSchema": { "$ref": format!("#/components/schemas/{schema}") }
                    },
                    "id": { "type": "string" },
                    "retry": { "type": "integer" }
                }
            })
        })
        .collect();
    let stream = document
        .pointer_mut("/paths/~1admin~1events/get/responses/200/content/text~1event-stream")
        .expect("GET /admin/events documents a text/event-stream answer");
    stream["schema"] = serde_json::json!({ "oneOf": branches });
}

#[utoipa::path(get, path = "/openapi.json", tag = "service",
    responses((status = 200, description = "This document", content_type = "application/json", body = Object)))]
pub async fn document() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], json()).into_response()
}
