//! What outside testing broke, each pinned: arrays taken as objects, invalid
//! UTF-8, Rust type names in messages, loose content types, duplicate
//! headers, operator routes mapped for strangers, oversized request ids,
//! durations that overflowed the clock, panics that dropped the connection,
//! and a memory store without bound.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use reliability_lab::orders::{
    Durability, KeyedInsert, Order, OrderId, OrderRepository, StatusChange, StatusCounts,
    StoreError, UpdateOutcome,
};
use serde_json::json;

use crate::helpers::{error_code, post_json, send, Lab, LabOptions, ORDER_BODY};
use crate::metrics::{scrape, value};

async fn idle_lab() -> Lab {
    Lab::new(LabOptions {
        start_workers: false,
        ..LabOptions::default()
    })
    .await
}

fn put_json(uri: &str, body: &str) -> Request<Body> {
    Request::put(uri)
        .header("content-type", "application/json")
        .body(Body::from(body.to_owned()))
        .unwrap()
}

#[tokio::test]
async fn a_body_that_is_not_a_json_object_is_422_on_every_route() {
    let lab = idle_lab().await;
    for (request, what) in [
        (
            post_json("/orders", r#"["c1",100,"USD"]"#),
            "order as array",
        ),
        (post_json("/orders", "\"c1\""), "order as string"),
        (post_json("/orders", "42"), "order as number"),
        (post_json("/orders", "null"), "order as null"),
        (
            put_json("/admin/reliability", "[true,true]"),
            "switches as array",
        ),
        (
            put_json("/admin/payment", r#"[0.5,"10ms"]"#),
            "payment as array",
        ),
    ] {
        let (status, _, body) = send(&lab.router, request).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{what}: {body}");
        assert_eq!(error_code(&body), "invalid_body", "{what}");
    }
    assert!(lab.reliability.switches().retry_enabled, "nothing changed");
    let counts = lab.service.count_by_status().await.unwrap();
    assert_eq!(counts.values().sum::<u64>(), 0, "nothing stored");
}

#[tokio::test]
async fn invalid_utf8_inside_a_string_is_malformed_json() {
    let lab = idle_lab().await;
    let mut body = br#"{"customer_id":"c"#.to_vec();
    body.extend_from_slice(&[0xff, 0xfe]);
    body.extend_from_slice(br#"","amount":100,"currency":"USD"}"#);
    let request = Request::post("/orders")
        .header("content-type", "application/json")
        .body(Body::from(body))
        .unwrap();
    let (status, _, reply) = send(&lab.router, request).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{reply}");
    assert_eq!(error_code(&reply), "malformed_json");
}

#[tokio::test]
async fn error_messages_name_no_rust_type() {
    let lab = idle_lab().await;
    for (request, field) in [
        (
            post_json(
                "/orders",
                r#"{"customer_id":"c","amount":"many","currency":"USD"}"#,
            ),
            "amount",
        ),
        (
            post_json(
                "/orders",
                r#"{"customer_id":"c","amount":1.5,"currency":"USD"}"#,
            ),
            "amount",
        ),
        (
            put_json("/admin/payment", r#"{"failure_rate":"high"}"#),
            "failure_rate",
        ),
        (
            put_json("/admin/payment", r#"{"mode":"brownout","brownout":[1]}"#),
            "brownout",
        ),
        (
            put_json("/admin/reliability", r#"{"retry_enabled":7}"#),
            "retry_enabled",
        ),
    ] {
        let (status, _, body) = send(&lab.router, request).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(body["error"]["field"], field, "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        for rust in [
            "struct", "enum ", "i64", "u32", "f64", "Request", "Switch", "Brownout", "Option",
        ] {
            assert!(!message.contains(rust), "{message:?} names {rust:?}");
        }
    }
}

#[tokio::test]
async fn only_application_json_with_an_optional_utf8_charset_is_taken() {
    let lab = idle_lab().await;
    for (content_type, expected) in [
        ("application/json", StatusCode::CREATED),
        ("application/json; charset=utf-8", StatusCode::CREATED),
        ("Application/JSON;charset=UTF-8", StatusCode::CREATED),
        (
            "application/merge-patch+json",
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            "application/vnd.api+json",
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            "application/json; charset=latin1",
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            "application/json; foo=bar",
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
    ] {
        let request = Request::post("/orders")
            .header("content-type", content_type)
            .body(Body::from(ORDER_BODY))
            .unwrap();
        let (status, _, body) = send(&lab.router, request).await;
        assert_eq!(status, expected, "{content_type}: {body}");
    }
}

#[tokio::test]
async fn two_authorization_or_two_idempotency_key_headers_are_400() {
    let lab = Lab::new(LabOptions {
        admin_token: Some("lab-token-123"),
        start_workers: false,
        ..LabOptions::default()
    })
    .await;
    let request = Request::get("/admin/state")
        .header("authorization", "Bearer lab-token-123")
        .header("authorization", "Bearer wrong")
        .body(Body::empty())
        .unwrap();
    let (status, _, body) = send(&lab.router, request).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(error_code(&body), "duplicate_header");
    assert_eq!(body["error"]["field"], "Authorization");

    let request = Request::post("/orders")
        .header("content-type", "application/json")
        .header("idempotency-key", "k-1")
        .header("idempotency-key", "k-2")
        .body(Body::from(ORDER_BODY))
        .unwrap();
    let (status, _, body) = send(&lab.router, request).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["field"], "Idempotency-Key");
    let counts = lab.service.count_by_status().await.unwrap();
    assert_eq!(counts.values().sum::<u64>(), 0, "nothing stored");
}

#[tokio::test]
async fn a_stranger_gets_401_on_any_operator_path_whatever_the_method() {
    let lab = Lab::new(LabOptions {
        admin_token: Some("lab-token-123"),
        start_workers: false,
        ..LabOptions::default()
    })
    .await;
    for method in ["OPTIONS", "DELETE", "PATCH", "POST", "PUT", "GET", "HEAD"] {
        for path in [
            "/admin/state",
            "/admin/nothing-here",
            "/admin",
            "/debug/pprof/profile",
            "/debug/x",
        ] {
            let request = Request::builder()
                .method(method)
                .uri(path)
                .body(Body::empty())
                .unwrap();
            let (status, headers, _) = send(&lab.router, request).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path}");
            assert!(
                !headers.contains_key("allow"),
                "{method} {path} maps routes"
            );
        }
    }
}

#[tokio::test]
async fn a_client_request_id_is_echoed_only_when_short_visible_ascii() {
    let lab = idle_lab().await;
    let long = "x".repeat(5000);
    let exactly_128 = "y".repeat(128);
    for (sent, echoed) in [
        ("trace-me-123", true),
        (exactly_128.as_str(), true),
        ("z".repeat(129).as_str(), false),
        (long.as_str(), false),
        ("has space", false),
        ("tab\there", false),
    ] {
        let request = Request::get("/healthz")
            .header("x-request-id", sent)
            .body(Body::empty())
            .unwrap();
        let (_, headers, _) = send(&lab.router, request).await;
        let got = headers["x-request-id"].to_str().unwrap();
        if echoed {
            assert_eq!(got, sent);
        } else {
            uuid::Uuid::parse_str(got)
                .unwrap_or_else(|_| panic!("{sent:?} was replaced by a minted id, not {got:?}"));
        }
    }
    let request = Request::get("/healthz")
        .header("x-request-id", "one")
        .header("x-request-id", "two")
        .body(Body::empty())
        .unwrap();
    let (_, headers, _) = send(&lab.router, request).await;
    uuid::Uuid::parse_str(headers["x-request-id"].to_str().unwrap()).expect("minted for two ids");
}

#[tokio::test(start_paused = true)]
async fn a_huge_duration_is_422_naming_the_field_and_changes_nothing() {
    let lab = idle_lab().await;
    for (body, field) in [
        (
            json!({"mode": "brownout", "brownout": {"failure_rate": 0.5, "latency_min": "1ms", "latency_max": "2ms", "duration": "300000000000y"}}),
            "brownout.duration",
        ),
        (
            json!({"mode": "brownout", "brownout": {"failure_rate": 0.5, "latency_min": "1ms", "latency_max": "2ms", "duration": "300000000000h"}}),
            "brownout.duration",
        ),
        (json!({"latency_max": "25h"}), "latency_max"),
        // A nested object given as an array is not filled by position.
        (
            json!({"mode": "brownout", "brownout": [0.5, "1ms", "2ms", "1m"]}),
            "brownout",
        ),
        (json!({"failure_rate": [0.5]}), "failure_rate"),
        (json!({"latency_min": "5s5s"}), "latency_min"),
        (json!({"latency_min": "1ms 2ms"}), "latency_min"),
    ] {
        let (status, _, reply) =
            send(&lab.router, put_json("/admin/payment", &body.to_string())).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {reply}");
        assert_eq!(reply["error"]["field"], field, "{reply}");
    }
    assert_eq!(
        lab.payment.view().mode,
        reliability_lab::payment::Mode::Normal
    );
    let (status, _, reply) = send(
        &lab.router,
        put_json("/admin/load", r#"{"rate": 5, "client": [3, "on"]}"#),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{reply}");
    assert_eq!(reply["error"]["field"], "client", "{reply}");
    // An array inside a string is only text.
    let (status, _, reply) = send(
        &lab.router,
        post_json(
            "/orders",
            r#"{"customer_id":"[x]","amount":1,"currency":"USD"}"#,
        ),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{reply}");
    assert_eq!(reply["error"]["field"], "customer_id", "{reply}");
    // The longest accepted brownout runs and ends.
    let day = json!({"mode": "brownout", "brownout": {"failure_rate": 0.5, "latency_min": "1ms", "latency_max": "2ms", "duration": "24h"}});
    let (status, _, reply) = send(&lab.router, put_json("/admin/payment", &day.to_string())).await;
    assert_eq!(status, StatusCode::OK, "{reply}");
}

/// A store whose every call panics: the stand-in for a bug in a handler.
struct Panicking;

#[async_trait]
impl OrderRepository for Panicking {
    fn kind(&self) -> &'static str {
        "panicking"
    }
    fn durability(&self) -> Durability {
        Durability::None
    }
    async fn ping(&self) -> Result<(), StoreError> {
        panic!("ping exploded")
    }
    async fn insert(&self, _: &Order) -> Result<bool, StoreError> {
        panic!("insert exploded")
    }
    async fn insert_with_key(
        &self,
        _: &Order,
        _: &str,
        _: &str,
    ) -> Result<KeyedInsert, StoreError> {
        panic!("insert exploded")
    }
    async fn get(&self, _: OrderId) -> Result<Option<Order>, StoreError> {
        panic!("get exploded")
    }
    async fn update_status(
        &self,
        _: OrderId,
        _: &StatusChange,
    ) -> Result<UpdateOutcome, StoreError> {
        panic!("update exploded")
    }
    async fn count_by_status(&self) -> Result<StatusCounts, StoreError> {
        panic!("count exploded")
    }
    async fn purge_keys_older_than(&self, _: Duration) -> Result<u64, StoreError> {
        Ok(0)
    }
}

#[tokio::test]
async fn a_panicking_handler_answers_a_counted_500_with_the_json_body_over_the_socket() {
    let lab = Lab::new(LabOptions {
        repo: Some(Arc::new(Panicking)),
        start_workers: false,
        ..LabOptions::default()
    })
    .await;
    let metrics = lab.metrics.clone();
    let addr = lab.app.local_addr().expect("a TCP listener");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(lab.app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    let client = reqwest::Client::new();
    for _ in 0..2 {
        let response = client
            .post(format!("http://{addr}/orders"))
            .header("content-type", "application/json")
            .body(ORDER_BODY)
            .send()
            .await
            .expect("an answer, not a dropped connection");
        assert_eq!(response.status(), 500);
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(error_code(&body), "internal");
        assert!(!body.to_string().contains("exploded"), "{body}");
    }
    // The same connection pool still works for the next request.
    let healthy = client
        .get(format!("http://{addr}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(healthy.status(), 200);
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
    let text = metrics.render().unwrap();
    assert!(
        text.lines().any(|l| l == "http_handler_panics_total 2"),
        "{text}"
    );
    assert!(
        text.lines().any(|l| l.starts_with(
            "http_requests_total{method=\"POST\",route=\"/orders\",status_code=\"500\"} 2"
        )),
        "{text}"
    );
}

#[tokio::test(start_paused = true)]
async fn the_memory_store_evicts_the_oldest_finished_orders_and_refuses_when_none_are_finished() {
    let lab = Lab::new(LabOptions {
        memory_max_orders: 3,
        start_workers: false,
        ..LabOptions::default()
    })
    .await;
    // Three unfinished orders fill the store: the fourth is refused, stored nowhere.
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(lab.post_order().await.id);
    }
    let (status, headers, body) = send(&lab.router, post_json("/orders", ORDER_BODY)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(error_code(&body), "store_full");
    assert!(headers.contains_key("retry-after"));
    assert_eq!(
        lab.dispatcher.depth(),
        3,
        "the refused order's queue slot was given back"
    );

    // Once they finish, new orders push out the one that finished first.
    lab.start_workers();
    for id in &ids {
        lab.settle(*id).await;
    }
    let newer = lab.post_order().await;
    lab.settle(newer.id).await;
    let stored: Vec<bool> = still_stored(&lab, &ids).await;
    assert_eq!(
        stored.iter().filter(|s| !**s).count(),
        1,
        "one was evicted: {stored:?}"
    );
    assert!(lab.service.get_order(newer.id).await.is_ok());
    let scrape = scrape(&lab).await;
    assert_eq!(value(&scrape, "orders_evicted_total", &[]), 1.0);
    let counts = lab.service.count_by_status().await.unwrap();
    assert_eq!(counts.values().sum::<u64>(), 3, "never more than the bound");
}

/// Whether each order is still in the store.
async fn still_stored(lab: &Lab, ids: &[OrderId]) -> Vec<bool> {
    let mut stored = Vec::new();
    for id in ids {
        stored.push(lab.service.get_order(*id).await.is_ok());
    }
    stored
}

#[tokio::test(start_paused = true)]
async fn an_evicted_orders_idempotency_key_goes_with_it() {
    let lab = Lab::new(LabOptions {
        memory_max_orders: 1,
        ..LabOptions::default()
    })
    .await;
    let keyed = |key: &str| {
        Request::post("/orders")
            .header("content-type", "application/json")
            .header("idempotency-key", key)
            .body(Body::from(ORDER_BODY))
            .unwrap()
    };
    let (status, _, first) = send(&lab.router, keyed("key-a")).await;
    assert_eq!(status, StatusCode::CREATED);
    let first_id: OrderId = first["id"].as_str().unwrap().parse().unwrap();
    lab.settle(first_id).await;
    let (status, _, _) = send(&lab.router, keyed("key-b")).await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "the finished first order made room"
    );
    let (status, _, again) = send(&lab.router, keyed("key-a")).await;
    // key-a's order is gone, and its key with it: the key creates anew
    // (or the store is full of the unfinished second order).
    assert_ne!(status, StatusCode::OK, "{again}");
    assert_ne!(again["id"], first["id"]);
}

#[tokio::test(start_paused = true)]
async fn an_evicted_orders_charges_leave_the_ledger_with_it() {
    let lab = Lab::new(LabOptions {
        memory_max_orders: 10,
        ..LabOptions::default()
    })
    .await;
    let mut ids = Vec::new();
    for _ in 0..50 {
        let id = lab.post_order().await.id;
        lab.settle(id).await;
        ids.push(id);
    }
    let charges = |id: OrderId| {
        let router = lab.router.clone();
        async move {
            let uri = format!("/admin/payment/ledger/{id}");
            let request = Request::get(uri).body(Body::empty()).unwrap();
            let (status, _, body) = send(&router, request).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            body["charges"].as_array().unwrap().len()
        }
    };
    for (i, id) in ids.iter().enumerate() {
        let expected = usize::from(i >= 40);
        assert_eq!(charges(*id).await, expected, "order {i} of 50");
    }
    assert_eq!(lab.metrics.totals().charges, 50, "each was charged once");
}
