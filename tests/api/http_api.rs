//! The HTTP API, driven in-process: every status code the API promises.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use reliability_lab::orders::postgres::{Lease, PostgresStore};
use reliability_lab::orders::OrderRepository;
use sqlx::postgres::PgPoolOptions;
use std::sync::Arc;
use std::time::Duration;

use crate::helpers::{error_code, get, post_json, send, Lab, LabOptions};

const GOOD: &str = r#"{"customer_id":"cust-42","amount":1999,"currency":"usd"}"#;

async fn idle_lab() -> Lab {
    Lab::new(LabOptions {
        start_workers: false,
        ..LabOptions::default()
    })
    .await
}

#[tokio::test]
async fn healthz_answers_ok() {
    let lab = idle_lab().await;
    let (status, _, body) = send(&lab.router, get("/healthz")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, serde_json::json!({"status": "ok"}));
}

#[tokio::test]
async fn readyz_names_the_store_and_its_durability() {
    let lab = idle_lab().await;
    let (status, _, body) = send(&lab.router, get("/readyz")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["store"], "memory");
    assert_eq!(body["durability"], "none");
}

#[tokio::test]
async fn readyz_is_503_with_a_reason_when_postgres_cannot_be_reached() {
    // Port 1 on loopback: nothing listens there, connections are refused.
    let pool = PgPoolOptions::new()
        .acquire_timeout(Duration::from_millis(500))
        .connect_lazy("postgres://nobody@127.0.0.1:1/none")
        .unwrap();
    let repo: Arc<dyn OrderRepository> = Arc::new(PostgresStore::from_pool(
        pool,
        Lease::for_new_replica(Duration::from_secs(30)),
    ));
    let lab = Lab::new(LabOptions {
        repo: Some(repo),
        start_workers: false,
        ..LabOptions::default()
    })
    .await;
    let (status, _, body) = send(&lab.router, get("/readyz")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["store"], "postgres");
    assert_eq!(body["status"], "unavailable");
    // A fixed reason: the driver's text (addresses, errno) stays in the log.
    assert_eq!(body["reason"], "store unreachable", "{body}");
    assert_eq!(body.as_object().unwrap().len(), 4, "{body}");

    // And an order request fails fast with 503 and a JSON error, not a hang.
    let (status, headers, body) = send(&lab.router, post_json("/orders", GOOD)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error_code(&body), "store_unavailable");
    assert!(headers.contains_key("retry-after"));
}

#[tokio::test]
async fn version_gives_name_and_cargo_version() {
    let lab = idle_lab().await;
    let (status, _, body) = send(&lab.router, get("/version")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["name"], "reliability-lab");
    assert_eq!(body["version"], env!("CARGO_PKG_VERSION"));
    // The commit the build script found (a clean clone has one): twelve
    // hex digits, the same the test binary was built with.
    match option_env!("GIT_COMMIT") {
        Some(commit) => {
            assert_eq!(body["commit"], commit);
            if std::env::var("GIT_COMMIT").is_err() {
                assert!(
                    commit.len() == 12 && commit.bytes().all(|b| b.is_ascii_hexdigit()),
                    "{commit}"
                );
            }
        }
        None => assert!(body["commit"].is_null(), "{body}"),
    }
}

#[tokio::test]
async fn creating_an_order_answers_201_with_location_and_the_order() {
    let lab = idle_lab().await;
    let (status, headers, body) = send(&lab.router, post_json("/orders", GOOD)).await;
    assert_eq!(status, StatusCode::CREATED);
    let id = body["id"].as_str().unwrap();
    assert_eq!(headers["location"], format!("/orders/{id}"));
    assert_eq!(body["customer_id"], "cust-42");
    assert_eq!(body["amount"], 1999);
    assert_eq!(body["currency"], "USD");
    assert_eq!(body["status"], "pending");
    assert_eq!(body["attempts"], 0);
    assert!(body["last_error"].is_null());
    for stamp in ["created_at", "updated_at"] {
        chrono::DateTime::parse_from_rfc3339(body[stamp].as_str().unwrap()).unwrap();
    }

    let (status, _, fetched) = send(&lab.router, get(&format!("/orders/{id}"))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(fetched, body);
}

#[tokio::test]
async fn malformed_json_is_400() {
    let lab = idle_lab().await;
    for bad in [r#"{"customer_id":"#, "not json", "{} trailing", ""] {
        let (status, _, body) = send(&lab.router, post_json("/orders", bad)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad:?}");
        assert_eq!(error_code(&body), "malformed_json");
    }
}

#[tokio::test]
async fn a_missing_mistyped_out_of_range_or_unknown_field_is_422_naming_it() {
    let lab = idle_lab().await;
    for (bad, field) in [
        (r#"{"customer_id":"c","amount":1999}"#, "currency"),
        (r#"{"amount":1999,"currency":"USD"}"#, "customer_id"),
        (
            r#"{"customer_id":"c","amount":"1999","currency":"USD"}"#,
            "amount",
        ),
        (
            r#"{"customer_id":"c","amount":19.99,"currency":"USD"}"#,
            "amount",
        ),
        (
            r#"{"customer_id":"c","amount":0,"currency":"USD"}"#,
            "amount",
        ),
        (
            r#"{"customer_id":"c","amount":100000001,"currency":"USD"}"#,
            "amount",
        ),
        (
            r#"{"customer_id":"c","amount":1,"currency":"US"}"#,
            "currency",
        ),
        (
            r#"{"customer_id":"c","amount":1,"currency":"U$D"}"#,
            "currency",
        ),
        (
            r#"{"customer_id":"","amount":1,"currency":"USD"}"#,
            "customer_id",
        ),
        (
            r#"{"customer_id":"a b","amount":1,"currency":"USD"}"#,
            "customer_id",
        ),
        (
            r#"{"customer_id":7,"amount":1,"currency":"USD"}"#,
            "customer_id",
        ),
        (
            r#"{"customer_id":"c","amount":1,"currency":"USD","coupon":"x"}"#,
            "coupon",
        ),
    ] {
        let (status, _, body) = send(&lab.router, post_json("/orders", bad)).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {body}");
        assert_eq!(error_code(&body), "invalid_field");
        assert_eq!(body["error"]["field"], field, "{bad}: {body}");
    }
}

#[tokio::test]
async fn a_body_that_is_not_json_is_415() {
    let lab = idle_lab().await;
    for content_type in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
    ] {
        let mut req = Request::post("/orders");
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        let (status, _, body) = send(&lab.router, req.body(Body::from(GOOD)).unwrap()).await;
        assert_eq!(
            status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "{content_type:?}"
        );
        assert_eq!(error_code(&body), "unsupported_media_type");
    }
}

#[tokio::test]
async fn a_body_over_16_kib_is_413() {
    let lab = idle_lab().await;
    let padding = "x".repeat(16 * 1024);
    let big = format!(r#"{{"customer_id":"{padding}","amount":1,"currency":"USD"}}"#);
    let (status, _, body) = send(&lab.router, post_json("/orders", &big)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(error_code(&body), "payload_too_large");
}

#[tokio::test]
async fn an_id_that_is_not_a_uuid_is_400_and_an_unknown_one_404() {
    let lab = idle_lab().await;
    let (status, _, body) = send(&lab.router, get("/orders/not-a-uuid")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_code(&body), "invalid_order_id");
    // Not UTF-8 once percent-decoded: the same JSON error, not axum's text.
    for (path, code) in [
        ("/orders/%ff%fe", "invalid_order_id"),
        ("/admin/payment/ledger/%ff%fe", "invalid_order_id"),
        ("/debug/pprof/%ff", "invalid_path"),
    ] {
        let (status, _, body) = send(&lab.router, get(path)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {body}");
        assert_eq!(error_code(&body), code, "{path}: {body}");
    }

    let (status, _, body) = send(
        &lab.router,
        get(&format!("/orders/{}", uuid::Uuid::new_v4())),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error_code(&body), "not_found");
}

#[tokio::test]
async fn unknown_routes_are_404_and_wrong_methods_405_with_json_errors() {
    let lab = idle_lab().await;
    let (status, _, body) = send(&lab.router, get("/no/such/route")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error_code(&body), "not_found");

    for req in [
        Request::delete("/orders").body(Body::empty()).unwrap(),
        Request::get("/orders").body(Body::empty()).unwrap(),
        Request::post("/healthz").body(Body::empty()).unwrap(),
        Request::put(format!("/orders/{}", uuid::Uuid::new_v4()))
            .body(Body::empty())
            .unwrap(),
    ] {
        let (status, _, body) = send(&lab.router, req).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(error_code(&body), "method_not_allowed");
    }
}

#[tokio::test]
async fn a_full_queue_answers_503_with_retry_after_and_stores_nothing() {
    let lab = Lab::new(LabOptions {
        capacity: 2,
        start_workers: false,
        ..LabOptions::default()
    })
    .await;
    for _ in 0..2 {
        let (status, _, _) = send(&lab.router, post_json("/orders", GOOD)).await;
        assert_eq!(status, StatusCode::CREATED);
    }
    let (status, headers, body) = send(&lab.router, post_json("/orders", GOOD)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error_code(&body), "queue_full");
    assert_eq!(headers["retry-after"], "1");
    let counts = lab.service.count_by_status().await.unwrap();
    assert_eq!(
        counts.values().sum::<u64>(),
        2,
        "the refused order was not stored"
    );
}

#[tokio::test]
async fn the_request_id_is_echoed_when_given_and_generated_otherwise() {
    let lab = idle_lab().await;
    let req = Request::get("/healthz")
        .header("x-request-id", "trace-me-123")
        .body(Body::empty())
        .unwrap();
    let (_, headers, _) = send(&lab.router, req).await;
    assert_eq!(headers["x-request-id"], "trace-me-123");

    let (_, headers, _) = send(&lab.router, get("/healthz")).await;
    let generated = headers["x-request-id"].to_str().unwrap();
    uuid::Uuid::parse_str(generated).expect("a generated request id is a UUID");

    // Errors carry it too.
    let (_, headers, _) = send(&lab.router, get("/nowhere")).await;
    assert!(headers.contains_key("x-request-id"));
}

#[tokio::test]
async fn the_service_answers_over_a_real_socket() {
    let lab = idle_lab().await;
    let addr = lab.app.local_addr().expect("a TCP listener");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(lab.app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    let client = reqwest::Client::new();
    let created = client
        .post(format!("http://{addr}/orders"))
        .header("content-type", "application/json")
        .body(GOOD)
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let location = created.headers()["location"].to_str().unwrap().to_owned();
    let fetched = client
        .get(format!("http://{addr}{location}"))
        .send()
        .await
        .unwrap();
    assert_eq!(fetched.status(), 200);
    let body: serde_json::Value = fetched.json().await.unwrap();
    assert_eq!(body["status"], "pending");
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}
