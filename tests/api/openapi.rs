//! The OpenAPI document against the router: every route pattern the router
//! serves is in the document, with exactly the methods it answers, and the
//! service serves the document it was built with.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::Value;
use tower::ServiceExt;

use crate::helpers::{get, send, Lab, LabOptions};

/// A concrete path for a route pattern.
fn concrete(pattern: &str) -> String {
    pattern
        .replace("{id}", "4b1d8a6e-1f0c-4b8e-9a55-0c2a7f3d9e11")
        .replace("{order_id}", "4b1d8a6e-1f0c-4b8e-9a55-0c2a7f3d9e11")
        .replace("{name}", "nothing-here")
}

#[tokio::test]
async fn every_route_and_method_of_the_router_is_in_the_document() {
    let doc: Value = serde_json::from_str(reliability_lab::http::openapi::json()).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let documented = doc["paths"].as_object().unwrap();
    let lab = Lab::new(LabOptions {
        start_workers: false,
        ..LabOptions::default()
    })
    .await;
    let routes = reliability_lab::http::route_paths();
    assert!(routes.len() >= 19, "{routes:?}");
    for pattern in &routes {
        let operations = documented
            .get(*pattern)
            .unwrap_or_else(|| panic!("{pattern} is served but not in the document"));
        for method in ["GET", "POST", "PUT", "DELETE", "PATCH"] {
            // `seconds=0` makes a profile request fail fast instead of sampling.
            let request = Request::builder()
                .method(method)
                .uri(format!("{}?seconds=0", concrete(pattern)))
                .header("content-type", "application/json")
                .body(Body::from("{}"))
                .unwrap();
            // The status only: an event stream's body never ends.
            let status = lab.router.clone().oneshot(request).await.unwrap().status();
            let answered = status != StatusCode::METHOD_NOT_ALLOWED;
            let in_doc = operations.get(method.to_ascii_lowercase()).is_some();
            assert_eq!(
                answered,
                in_doc,
                "{method} {pattern}: the router {} it, the document {}",
                if answered { "answers" } else { "refuses" },
                if in_doc { "lists it" } else { "does not" }
            );
        }
    }
    // And nothing is documented that the router does not serve.
    for path in documented.keys() {
        assert!(
            routes.contains(&path.as_str()),
            "{path} is documented but not served"
        );
    }
}

#[tokio::test]
async fn the_service_serves_its_document_and_every_error_answer_has_the_error_schema() {
    let lab = Lab::new(LabOptions {
        start_workers: false,
        ..LabOptions::default()
    })
    .await;
    let (status, headers, served) = send(&lab.router, get("/openapi.json")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "application/json");
    let built: Value = serde_json::from_str(reliability_lab::http::openapi::json()).unwrap();
    assert_eq!(served, built);
    let schemes = &built["components"]["securitySchemes"]["admin_token"];
    assert_eq!(schemes["scheme"], "bearer", "{schemes}");
    for (path, operations) in built["paths"].as_object().unwrap() {
        for (method, operation) in operations.as_object().unwrap() {
            let operator = path.starts_with("/admin") || path.starts_with("/debug");
            assert_eq!(
                operation.get("security").is_some(),
                operator,
                "{method} {path}: the bearer scheme is named exactly on operator routes"
            );
            if operator {
                assert!(
                    operation["responses"].get("401").is_some(),
                    "{method} {path} lacks its 401"
                );
            }
            for (code, response) in operation["responses"].as_object().unwrap() {
                if code.starts_with('4') || code.starts_with('5') {
                    let schema = &response["content"]["application/json"]["schema"]["$ref"];
                    let readiness = path == "/readyz";
                    let expected = if readiness {
                        "#/components/schemas/Readiness"
                    } else {
                        "#/components/schemas/ErrorBody"
                    };
                    assert_eq!(schema, expected, "{method} {path} {code}");
                }
            }
        }
    }
}
