//! The lab's controls, driven through the admin API while orders flow, on
//! tokio's paused clock.

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use reliability_lab::orders::{Order, Status};
use reliability_lab::payment::{Capacity, PaymentSettings};
use reliability_lab::reliability::{BreakerConfig, BreakerPolicy, BreakerState, RetryPolicy};
use serde_json::{json, Value};

use crate::helpers::{error_code, get, send, Lab, LabOptions};
use crate::metrics::{samples, scrape, value};

fn put(uri: &str, body: Value) -> Request<Body> {
    Request::put(uri)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

async fn admin(lab: &Lab, request: Request<Body>) -> Value {
    let (status, _, body) = send(&lab.router, request).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

async fn run_orders(lab: &Lab, n: usize) -> Vec<Order> {
    let mut ids = Vec::new();
    for _ in 0..n {
        ids.push(lab.post_order().await.id);
    }
    let mut done = Vec::new();
    for id in ids {
        done.push(lab.settle(id).await);
    }
    done
}

/// The change feed's summaries, newest first, of one kind or of all.
fn change_summaries(lab: &Lab, kind: Option<&str>) -> Vec<String> {
    lab.app
        .handles()
        .instruments
        .feed
        .recent_changes()
        .iter()
        .filter(|c| kind.is_none_or(|k| serde_json::to_value(c.kind).unwrap() == k))
        .map(|c| c.summary.clone())
        .collect()
}

fn quick_payments() -> PaymentSettings {
    PaymentSettings {
        failure_rate: 0.0,
        latency_min: Duration::from_millis(10),
        latency_max: Duration::from_millis(10),
        ..PaymentSettings::default()
    }
}

#[tokio::test(start_paused = true)]
async fn an_outage_trips_the_breaker_and_after_it_one_probe_closes_it() {
    let lab = Lab::new(LabOptions {
        payment: quick_payments(),
        ..LabOptions::default()
    })
    .await;
    assert!(run_orders(&lab, 3)
        .await
        .iter()
        .all(|o| o.status == Status::Completed));

    admin(&lab, put("/admin/payment", json!({"mode": "outage"}))).await;
    let during = run_orders(&lab, 4).await;
    assert_eq!(lab.breaker.state(), BreakerState::Open);
    assert!(during.iter().all(|o| o.status == Status::Failed));
    // Later orders fail fast: no call reached the payment service.
    let calls = lab.payment.calls();
    let late = run_orders(&lab, 3).await;
    assert_eq!(lab.payment.calls(), calls);
    assert!(late
        .iter()
        .all(|o| o.last_error.as_deref() == Some("circuit open") && o.attempts == 0));

    let breaker = admin(&lab, get("/admin/breaker")).await;
    assert_eq!(breaker["state"], "open");
    assert!(breaker["until_half_open"].as_f64().unwrap() > 0.0);

    admin(&lab, put("/admin/payment", json!({"mode": "normal"}))).await;
    tokio::time::advance(Duration::from_secs(30)).await;
    let after = run_orders(&lab, 3).await;
    assert!(
        after.iter().all(|o| o.status == Status::Completed),
        "{after:?}"
    );
    assert_eq!(lab.payment.calls(), calls + 3, "one probe, then closed");
    assert_eq!(lab.breaker.state(), BreakerState::Closed);
    let scrape = scrape(&lab).await;
    for (from, to) in [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ] {
        assert_eq!(
            value(
                &scrape,
                "circuit_breaker_state_changes_total",
                &[("from", from), ("to", to)]
            ),
            1.0
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_brownout_ends_by_itself_after_its_duration() {
    let lab = Lab::new(LabOptions::default()).await;
    let view = admin(
        &lab,
        put(
            "/admin/payment",
            json!({"mode": "brownout", "brownout": {
                "failure_rate": 0.9, "latency_min": "1s", "latency_max": "2s", "duration": "10s"}}),
        ),
    )
    .await;
    assert_eq!(view["mode"], "brownout");
    assert_eq!(view["brownout"]["remaining"], "10s");
    tokio::time::advance(Duration::from_secs(9)).await;
    assert_eq!(admin(&lab, get("/admin/payment")).await["mode"], "brownout");
    tokio::time::advance(Duration::from_secs(1)).await;
    let view = admin(&lab, get("/admin/payment")).await;
    assert_eq!(view["mode"], "normal");
    assert!(view["brownout"].is_null());
}

#[tokio::test(start_paused = true)]
async fn a_blackhole_times_out_each_attempt_and_counts_it_as_a_failure() {
    let lab = Lab::new(LabOptions {
        payment: quick_payments(),
        payment_timeout: Duration::from_millis(300),
        ..LabOptions::default()
    })
    .await;
    admin(&lab, put("/admin/payment", json!({"mode": "blackhole"}))).await;
    let order = run_orders(&lab, 1).await.remove(0);
    assert_eq!(order.status, Status::Failed);
    assert_eq!(order.attempts, 3, "timeouts are retried");
    assert_eq!(
        order.last_error.as_deref(),
        Some("payment timed out after 300ms")
    );
    let scrape = scrape(&lab).await;
    assert_eq!(value(&scrape, "payment_timeouts_total", &[]), 3.0);
    assert_eq!(value(&scrape, "payment_failures_total", &[]), 3.0);
    assert_eq!(lab.breaker.snapshot().consecutive_failures, 3);
}

#[tokio::test(start_paused = true)]
async fn the_failure_rate_policy_shows_its_window_and_opens_on_the_share_of_failures() {
    let lab = Lab::new(LabOptions {
        payment: quick_payments(),
        retry: RetryPolicy {
            max_attempts: 1,
            randomization_factor: 0.0,
            ..RetryPolicy::default()
        },
        breaker: BreakerConfig {
            policy: BreakerPolicy::FailureRate {
                rate: 0.5,
                window: Duration::from_secs(10),
                min_calls: 6,
            },
            ..BreakerConfig::default()
        },
        ..LabOptions::default()
    })
    .await;
    run_orders(&lab, 3).await;
    let breaker = admin(&lab, get("/admin/breaker")).await;
    assert_eq!(breaker["policy"], "failure_rate");
    assert_eq!(breaker["window_calls"], 3);
    assert_eq!(breaker["window_failure_rate"], 0.0);
    // An outage: three failures make it 3 of 6, half: it opens.
    admin(&lab, put("/admin/payment", json!({"mode": "outage"}))).await;
    run_orders(&lab, 3).await;
    let breaker = admin(&lab, get("/admin/breaker")).await;
    assert_eq!(breaker["state"], "open", "{breaker}");
}

#[tokio::test(start_paused = true)]
async fn the_policy_switches_at_run_time_and_the_metrics_and_feed_follow() {
    let lab = Lab::new(LabOptions {
        payment: quick_payments(),
        retry: RetryPolicy {
            max_attempts: 1,
            randomization_factor: 0.0,
            ..RetryPolicy::default()
        },
        ..LabOptions::default()
    })
    .await;
    let breaker = admin(&lab, get("/admin/breaker")).await;
    assert_eq!(breaker["policy"], "consecutive");
    assert_eq!(breaker["settings"]["failure_threshold"], 5);
    assert_eq!(breaker["settings"]["open_duration"], "30s");
    let scraped = scrape(&lab).await;
    assert_eq!(
        value(
            &scraped,
            "circuit_breaker_policy",
            &[("policy", "consecutive")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &scraped,
            "circuit_breaker_policy",
            &[("policy", "failure_rate")]
        ),
        0.0
    );
    assert!(samples(&scraped, "circuit_breaker_window_calls").is_empty());

    // Under the consecutive policy two failures of four calls open nothing.
    let switched = admin(
        &lab,
        put(
            "/admin/breaker",
            json!({"policy": "failure_rate", "failure_rate": 0.5, "min_calls": 4, "window": "10s"}),
        ),
    )
    .await;
    assert_eq!(switched["policy"], "failure_rate");
    assert_eq!(switched["state"], "closed");
    assert_eq!(switched["window_calls"], 0);
    assert_eq!(switched["settings"]["min_calls"], 4);
    assert_eq!(switched["settings"]["window"], "10s");
    run_orders(&lab, 2).await;
    admin(&lab, put("/admin/payment", json!({"mode": "outage"}))).await;
    run_orders(&lab, 1).await;
    let scraped = scrape(&lab).await;
    assert_eq!(value(&scraped, "circuit_breaker_window_calls", &[]), 3.0);
    assert!(
        (value(&scraped, "circuit_breaker_window_failure_ratio", &[]) - 1.0 / 3.0).abs() < 1e-9
    );
    assert_eq!(
        value(
            &scraped,
            "circuit_breaker_policy",
            &[("policy", "failure_rate")]
        ),
        1.0
    );
    assert_eq!(lab.breaker.state(), BreakerState::Closed);
    run_orders(&lab, 1).await; // 2 of 4: half
    assert_eq!(lab.breaker.state(), BreakerState::Open);

    // A refused change names the field and changes nothing.
    let (status, _, body) = send(
        &lab.router,
        put(
            "/admin/breaker",
            json!({"policy": "consecutive", "failure_rate": 2}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(error_code(&body), "invalid_field");
    assert_eq!(body["error"]["field"], "failure_rate", "{body}");
    assert_eq!(lab.breaker.config().policy.name(), "failure_rate");
    let (status, _, body) = send(&lab.router, put("/admin/breaker", json!({"probes": 3}))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");

    // Back to consecutive: the breaker stays open for its period.
    let back = admin(
        &lab,
        put("/admin/breaker", json!({"policy": "consecutive"})),
    )
    .await;
    assert_eq!(back["state"], "open");
    assert_eq!(back["window_calls"], Value::Null);
    assert_eq!(back["settings"]["min_calls"], 4, "kept for next time");

    let changes = change_summaries(&lab, Some("breaker_settings"));
    assert_eq!(
        changes,
        [
            "breaker policy failure_rate: opens at 50% of at least 4 calls in 10s, 1 probe(s)",
            "breaker policy consecutive: opens after 5 failures in a row, 1 probe(s)",
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_provider_at_capacity_keeps_serving_calls_whose_callers_timed_out() {
    // Two slots, 100 ms a call, callers that wait 150 ms and do not retry:
    // five orders at once. Two are served at once; the next two wait 100 ms
    // for a slot, so their callers give up at 150 ms while the provider
    // still serves them (until 200 ms), and the fifth waits longer still.
    let lab = Lab::new(LabOptions {
        workers: 5,
        payment: PaymentSettings {
            failure_rate: 0.0,
            latency_min: Duration::from_millis(100),
            latency_max: Duration::from_millis(100),
            ..PaymentSettings::default()
        },
        retry: RetryPolicy {
            max_attempts: 1,
            randomization_factor: 0.0,
            ..RetryPolicy::default()
        },
        payment_timeout: Duration::from_millis(150),
        provider_capacity: Some(Capacity {
            slots: 2,
            queue_timeout: Duration::from_secs(10),
        }),
        ..LabOptions::default()
    })
    .await;
    let orders = run_orders(&lab, 5).await;
    let completed = orders
        .iter()
        .filter(|o| o.status == Status::Completed)
        .count();
    assert_eq!(completed, 2, "{orders:?}");
    for order in orders.iter().filter(|o| o.status == Status::Failed) {
        assert_eq!(
            order.last_error.as_deref(),
            Some("payment timed out after 150ms")
        );
    }
    // The provider finished the abandoned calls: wasted work, charged all
    // the same (the lab's ledger shows what a real provider would have
    // done).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let scrape = scrape(&lab).await;
    assert_eq!(value(&scrape, "payment_provider_wasted_total", &[]), 3.0);
    assert_eq!(value(&scrape, "payment_timeouts_total", &[]), 3.0);
    assert_eq!(value(&scrape, "payment_charges_total", &[]), 5.0);
    assert_eq!(value(&scrape, "payment_provider_in_flight", &[]), 0.0);
    assert_eq!(value(&scrape, "payment_provider_queued", &[]), 0.0);
    let load = lab.payment.load();
    assert_eq!((load.wasted, load.overloaded), (3, 0));
}

async fn duplicates_with(idempotency: bool, orders: usize) -> (f64, f64) {
    let lab = Lab::new(LabOptions {
        payment: PaymentSettings {
            failure_rate: 0.0,
            ambiguous_rate: 0.5,
            idempotency,
            latency_min: Duration::from_millis(1),
            latency_max: Duration::from_millis(5),
            ..PaymentSettings::default()
        },
        workers: 5,
        capacity: orders,
        // Keep the breaker out of the way: this is about the provider.
        breaker: BreakerConfig {
            failure_threshold: 1000,
            ..BreakerConfig::default()
        },
        ..LabOptions::default()
    })
    .await;
    let done = run_orders(&lab, orders).await;
    assert!(done.iter().all(|o| o.status.is_terminal()));
    // The ledger, order by order, agrees with the provider's counters: every
    // charge is in it, and every charge past an order's first is a duplicate.
    let (mut charges, mut duplicates) = (0usize, 0usize);
    for order in &done {
        let ledger = admin(&lab, get(&format!("/admin/payment/ledger/{}", order.id))).await;
        let n = ledger["charges"].as_array().unwrap().len();
        if idempotency {
            assert!(n <= 1, "{ledger}");
        }
        if order.status == Status::Completed {
            assert!(n >= 1, "a completed order was charged: {ledger}");
        }
        charges += n;
        duplicates += n.saturating_sub(1);
    }
    let scrape = scrape(&lab).await;
    let counted = (
        value(&scrape, "payment_charges_total", &[]),
        value(&scrape, "payment_duplicate_charges_total", &[]),
    );
    assert_eq!(counted, (charges as f64, duplicates as f64));
    counted
}

#[tokio::test(start_paused = true)]
async fn lost_answers_double_charge_without_idempotency_and_never_with_it() {
    let (_, duplicates) = duplicates_with(false, 200).await;
    assert!(duplicates > 0.0, "idempotency off: duplicates appear");
    let (charges, duplicates) = duplicates_with(true, 500).await;
    assert_eq!(duplicates, 0.0, "idempotency on: none across 500 orders");
    assert!(charges > 400.0, "{charges} charges");
}

async fn seeded_run(seed: u64) -> Vec<(String, Status, u32, Option<String>)> {
    let lab = Lab::new(LabOptions {
        payment: PaymentSettings {
            failure_rate: 0.5,
            latency_min: Duration::from_millis(100),
            latency_max: Duration::from_millis(500),
            ..PaymentSettings::default()
        },
        retry: RetryPolicy::default(),
        breaker: BreakerConfig {
            failure_threshold: 5,
            open_duration: Duration::from_secs(2),
            ..BreakerConfig::default()
        },
        seed,
        ..LabOptions::default()
    })
    .await;
    run_orders(&lab, 40)
        .await
        .into_iter()
        .map(|o| (o.id.to_string(), o.status, o.attempts, o.last_error))
        .collect()
}

#[tokio::test(start_paused = true)]
async fn the_same_seed_reproduces_every_order_and_another_seed_does_not() {
    let first = seeded_run(7).await;
    assert_eq!(first, seeded_run(7).await);
    let other = seeded_run(8).await;
    assert_ne!(
        first.iter().map(|o| (&o.1, o.2)).collect::<Vec<_>>(),
        other.iter().map(|o| (&o.1, o.2)).collect::<Vec<_>>()
    );
    assert_ne!(first[0].0, other[0].0, "ids follow the seed too");
}

#[tokio::test(start_paused = true)]
async fn without_the_breaker_every_order_retries_to_the_end() {
    let lab = Lab::new(LabOptions {
        payment: PaymentSettings {
            failure_rate: 1.0,
            ..quick_payments()
        },
        ..LabOptions::default()
    })
    .await;
    let switches = admin(
        &lab,
        put("/admin/reliability", json!({"breaker_enabled": false})),
    )
    .await;
    assert_eq!(
        switches,
        json!({
            "retry_enabled": true,
            "breaker_enabled": false,
            "rejection_permanent": true,
            "retry_budget_enabled": false,
            "retry_jitter": "proportional",
            "throttle_enabled": false,
            "hedge_enabled": false,
            "concurrency_limit": "off"
        })
    );
    let orders = run_orders(&lab, 6).await;
    assert!(orders.iter().all(|o| o.attempts == 3), "a retry storm");
    assert_eq!(lab.payment.calls(), 18);
    assert_eq!(
        lab.breaker.state(),
        BreakerState::Closed,
        "the breaker heard nothing"
    );

    admin(
        &lab,
        put(
            "/admin/reliability",
            json!({"retry_enabled": false, "breaker_enabled": true}),
        ),
    )
    .await;
    let orders = run_orders(&lab, 2).await;
    assert!(orders.iter().all(|o| o.attempts == 1), "no retries");
}

#[tokio::test(start_paused = true)]
async fn the_state_snapshot_shows_the_whole_pipeline() {
    let lab = Lab::new(LabOptions::default()).await;
    run_orders(&lab, 2).await;
    let state = admin(&lab, get("/admin/state")).await;
    assert_eq!(state["queue"]["capacity"], 100);
    assert_eq!(state["queue"]["depth"], 0);
    assert_eq!(state["workers"]["count"], 1);
    assert_eq!(state["workers"]["busy"], 0);
    assert_eq!(state["breaker"]["state"], "closed");
    assert_eq!(state["orders"]["completed"], 2);
    assert_eq!(state["orders"]["pending"], 0);
    assert_eq!(state["payment"]["mode"], "normal");
    assert_eq!(state["reliability"]["retry_enabled"], true);
    assert!(state["uptime_seconds"].as_f64().is_some());

    let reset = send(
        &lab.router,
        Request::post("/admin/breaker/reset")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(reset.0, StatusCode::OK);
    assert_eq!(reset.2["state"], "closed");
}

#[tokio::test(start_paused = true)]
async fn every_admin_input_is_validated_and_a_refusal_changes_nothing() {
    let lab = Lab::new(LabOptions::default()).await;
    let before = admin(&lab, get("/admin/payment")).await;
    for (body, field) in [
        (json!({"failure_rate": 1.5}), "failure_rate"),
        (json!({"failure_rate": -0.5}), "failure_rate"),
        (json!({"ambiguous_rate": 7}), "ambiguous_rate"),
        (json!({"latency_min": "-5ms"}), "latency_min"),
        (
            json!({"latency_min": "3s", "latency_max": "1s"}),
            "latency_min",
        ),
        (json!({"latency_max": 100}), "latency_max"),
        (json!({"mode": "chaos"}), "mode"),
        (json!({"mode": "brownout"}), "brownout"),
        (json!({"failure_rate": 0.1, "colour": "red"}), "colour"),
        (json!({"idempotency": "maybe"}), "idempotency"),
    ] {
        let (status, _, response) = send(&lab.router, put("/admin/payment", body.clone())).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{body}: {response}"
        );
        assert_eq!(error_code(&response), "invalid_field");
        assert_eq!(response["error"]["field"], field, "{body}: {response}");
    }
    assert_eq!(
        admin(&lab, get("/admin/payment")).await,
        before,
        "nothing changed"
    );

    let (status, _, response) = send(
        &lab.router,
        put("/admin/reliability", json!({"retry": false})),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(response["error"]["field"], "retry");
    let (status, _, _) = send(&lab.router, get("/admin/payment/ledger/nope")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn with_a_token_admin_and_debug_need_it() {
    let lab = Lab::new(LabOptions {
        admin_token: Some("lab-token-123"),
        start_workers: false,
        ..LabOptions::default()
    })
    .await;
    for path in [
        "/admin/state",
        "/admin/payment",
        "/admin/breaker",
        "/debug/pprof/",
        "/debug/pprof/heap",
        "/debug/pprof/nothing",
    ] {
        for auth in [
            None,
            Some("Bearer wrong-token"),
            Some("lab-token-123"),
            Some("Basic lab-token-123"),
        ] {
            let mut req = Request::get(path);
            if let Some(auth) = auth {
                req = req.header("authorization", auth);
            }
            let (status, headers, body) = send(&lab.router, req.body(Body::empty()).unwrap()).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{path} with {auth:?}");
            assert_eq!(error_code(&body), "unauthorized");
            assert_eq!(headers["www-authenticate"], "Bearer");
        }
    }
    for path in ["/admin/state", "/admin/payment", "/debug/pprof/"] {
        let req = Request::get(path)
            .header("authorization", "Bearer lab-token-123")
            .body(Body::empty())
            .unwrap();
        let (status, _, _) = send(&lab.router, req).await;
        assert_eq!(status, StatusCode::OK, "{path}");
    }
    // The public API stays public.
    let (status, _, _) = send(&lab.router, get("/healthz")).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = send(&lab.router, get("/metrics")).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn without_a_token_admin_is_open() {
    let lab = Lab::new(LabOptions {
        start_workers: false,
        ..LabOptions::default()
    })
    .await;
    let (status, _, _) = send(&lab.router, get("/admin/state")).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn every_admin_write_needs_the_token_and_a_refused_one_changes_nothing() {
    let lab = Lab::new(LabOptions {
        admin_token: Some("lab-token-123"),
        start_workers: false,
        ..LabOptions::default()
    })
    .await;
    for _ in 0..5 {
        lab.breaker.try_acquire().unwrap().failure();
    }
    assert_eq!(lab.breaker.state(), BreakerState::Open);
    let order = lab.service.get_order(
        lab.service
            .create_order(
                &reliability_lab::orders::CreateOrderRequest {
                    customer_id: "cust-1".into(),
                    amount: 100,
                    currency: "USD".into(),
                },
                None,
            )
            .await
            .unwrap()
            .order()
            .id,
    );
    let order = order.await.unwrap();
    let ledger_path = format!("/admin/payment/ledger/{}", order.id);
    let writes = [
        ("PUT", "/admin/payment", r#"{"failure_rate": 0.9}"#),
        ("PUT", "/admin/reliability", r#"{"retry_enabled": false}"#),
        ("POST", "/admin/breaker/reset", ""),
        ("PUT", "/admin/breaker", r#"{"half_open_probes": 2}"#),
        ("GET", ledger_path.as_str(), ""),
    ];
    let request = |method: &str, path: &str, body: &str, auth: Option<&str>| {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json");
        if let Some(auth) = auth {
            req = req.header("authorization", auth);
        }
        req.body(Body::from(body.to_owned())).unwrap()
    };
    for (method, path, body) in writes {
        for auth in [None, Some("Bearer wrong-token"), Some("lab-token-123")] {
            let (status, _, reply) = send(&lab.router, request(method, path, body, auth)).await;
            assert_eq!(
                status,
                StatusCode::UNAUTHORIZED,
                "{method} {path} with {auth:?}"
            );
            assert_eq!(error_code(&reply), "unauthorized");
        }
    }
    // Nothing changed.
    assert_eq!(lab.payment.view().failure_rate, 0.0);
    assert!(lab.reliability.switches().retry_enabled);
    assert_eq!(lab.breaker.state(), BreakerState::Open);

    // With the token (the scheme in any case), each one goes through.
    for (method, path, body) in writes {
        let (status, _, reply) = send(
            &lab.router,
            request(method, path, body, Some("bearer lab-token-123")),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{method} {path}: {reply}");
    }
    assert_eq!(lab.payment.view().failure_rate, 0.9);
    assert!(!lab.reliability.switches().retry_enabled);
    assert_eq!(lab.breaker.state(), BreakerState::Closed);
}

#[tokio::test]
async fn the_switches_take_the_same_spellings_as_the_environment() {
    let lab = Lab::new(LabOptions {
        start_workers: false,
        ..LabOptions::default()
    })
    .await;
    for (body, retry, breaker) in [
        (
            json!({"retry_enabled": "off", "breaker_enabled": "no"}),
            false,
            false,
        ),
        (
            json!({"retry_enabled": "ON", "breaker_enabled": "1"}),
            true,
            true,
        ),
        (json!({"retry_enabled": "false"}), false, true),
        (
            json!({"retry_enabled": true, "breaker_enabled": "0"}),
            true,
            false,
        ),
    ] {
        let reply = admin(&lab, put("/admin/reliability", body.clone())).await;
        assert_eq!(reply["retry_enabled"], retry, "{body}");
        assert_eq!(reply["breaker_enabled"], breaker, "{body}");
    }
    let (status, _, reply) = send(
        &lab.router,
        put("/admin/reliability", json!({"retry_enabled": "maybe"})),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{reply}");
    assert_eq!(reply["error"]["field"], "retry_enabled");
    assert!(
        !lab.reliability.switches().breaker_enabled,
        "nothing changed"
    );
}

#[tokio::test(start_paused = true)]
async fn with_rejections_retried_the_backoff_slept_against_the_open_breaker_is_counted() {
    let lab = Lab::new(LabOptions {
        breaker: BreakerConfig {
            failure_threshold: 1,
            open_duration: Duration::from_secs(30),
            ..BreakerConfig::default()
        },
        ..LabOptions::default()
    })
    .await;
    admin(&lab, put("/admin/payment", json!({"mode": "outage"}))).await;
    let switches = admin(
        &lab,
        put("/admin/reliability", json!({"rejection_permanent": "off"})),
    )
    .await;
    assert_eq!(switches["rejection_permanent"], false);
    run_orders(&lab, 1).await;
    let m = scrape(&lab).await;
    let slept = |breaker| value(&m, "retry_backoff_seconds_total", &[("breaker", breaker)]);
    // 200 ms then 300 ms (no jitter in the harness), both against the open breaker.
    assert_eq!(slept("open"), 0.5);
    assert_eq!(slept("closed"), 0.0);
    assert_eq!(lab.payment.calls(), 1);

    // Back to the default: the second order sleeps nothing.
    admin(
        &lab,
        put("/admin/reliability", json!({"rejection_permanent": true})),
    )
    .await;
    lab.breaker.reset();
    run_orders(&lab, 1).await;
    let m = scrape(&lab).await;
    assert_eq!(
        value(&m, "retry_backoff_seconds_total", &[("breaker", "open")]),
        0.5
    );
}

#[tokio::test(start_paused = true)]
async fn the_retry_budget_switched_on_at_run_time_refuses_retries_and_counts_them() {
    let lab = Lab::new(LabOptions {
        breaker: BreakerConfig {
            failure_threshold: 1000,
            open_duration: Duration::from_secs(30),
            ..BreakerConfig::default()
        },
        ..LabOptions::default()
    })
    .await;
    admin(&lab, put("/admin/payment", json!({"mode": "outage"}))).await;
    let switches = admin(
        &lab,
        put("/admin/reliability", json!({"retry_budget_enabled": true})),
    )
    .await;
    assert_eq!(switches["retry_budget_enabled"], true);
    // The default budget: 0.2 retries per first attempt plus one a second
    // over 10 s, so 10 retries for 20 orders that all fail.
    let orders = run_orders(&lab, 20).await;
    let calls = lab.payment.calls();
    assert!(orders.iter().all(|o| o.status == Status::Failed));
    let refused = value(&scrape(&lab).await, "retry_budget_exhausted_total", &[]);
    assert!(refused > 0.0);
    let retries = calls - 20;
    assert!(
        retries <= 14,
        "at most 0.2 x 20 orders + 1/s x 10 s retries; without the budget 40: {retries}"
    );
}

/// The jitter kind is switched at run time: with `none` an order's waits
/// are the schedule's exactly (100 + 150 ms between three declined
/// attempts, 10 ms each); the feed says so; an unknown kind is a 422.
#[tokio::test(start_paused = true)]
async fn the_jitter_kind_switches_at_run_time() {
    let lab = Lab::new(LabOptions {
        payment: PaymentSettings {
            failure_rate: 1.0,
            ..quick_payments()
        },
        retry: RetryPolicy {
            max_attempts: 3,
            initial_interval: Duration::from_millis(100),
            max_interval: Duration::from_secs(1),
            randomization_factor: 0.5,
            ..RetryPolicy::default()
        },
        breaker: BreakerConfig {
            failure_threshold: 1000,
            ..BreakerConfig::default()
        },
        ..LabOptions::default()
    })
    .await;
    let took = |lab: &Lab| {
        let router = lab.router.clone();
        let lab_service = lab.service.clone();
        async move {
            let (_, _, body) = send(
                &router,
                crate::helpers::post_json("/orders", crate::helpers::ORDER_BODY),
            )
            .await;
            let id = body["id"].as_str().unwrap().parse().unwrap();
            let started = tokio::time::Instant::now();
            loop {
                let order = lab_service.get_order(id).await.unwrap();
                if order.status.is_terminal() {
                    return started.elapsed();
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    };
    let mut proportional = Vec::new();
    for _ in 0..5 {
        proportional.push(took(&lab).await);
    }
    assert!(
        proportional.iter().any(|t| *t != proportional[0]),
        "proportional jitter varies: {proportional:?}"
    );
    let reply = admin(
        &lab,
        put("/admin/reliability", json!({"retry_jitter": "none"})),
    )
    .await;
    assert_eq!(reply["retry_jitter"], "none");
    for _ in 0..3 {
        let t = took(&lab).await;
        assert!(
            t >= Duration::from_millis(280) && t <= Duration::from_millis(283),
            "3 × 10 ms + 100 + 150 ms exactly: {t:?}"
        );
    }
    // The timeline samples the kind in force.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let samples = lab.app.handles().instruments.timeline.since(0);
    assert_eq!(
        samples.last().unwrap().retry_jitter,
        reliability_lab::reliability::JitterKind::None
    );
    assert!(samples
        .iter()
        .any(|s| s.retry_jitter == reliability_lab::reliability::JitterKind::Proportional));
    let changes = change_summaries(&lab, None);
    assert!(
        changes
            .iter()
            .any(|c| c == "retry on, breaker on, none jitter"),
        "{changes:?}"
    );
    let (status, _, reply) = send(
        &lab.router,
        put("/admin/reliability", json!({"retry_jitter": "sideways"})),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{reply}");
    assert_eq!(reply["error"]["field"], "retry_jitter", "{reply}");
    assert_eq!(
        lab.reliability.switches().retry_jitter,
        reliability_lab::reliability::JitterKind::None
    );
}

/// Client-side throttling switched on at run time: against a provider in
/// an outage (no answer) it sheds most orders' charges before they are
/// sent, counts them, shows its probability in /metrics and the timeline,
/// and says so on the feed; against one that answers, even with declines,
/// it sheds nothing.
#[tokio::test(start_paused = true)]
async fn client_side_throttling_switched_on_at_run_time_sheds_charges_an_outage_would_fail() {
    let lab = Lab::new(LabOptions {
        retry: RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        },
        breaker: BreakerConfig {
            failure_threshold: 1_000_000,
            ..BreakerConfig::default()
        },
        ..LabOptions::default()
    })
    .await;
    let m = scrape(&lab).await;
    assert_eq!(value(&m, "client_throttled_total", &[]), 0.0);
    assert_eq!(value(&m, "client_throttle_probability", &[]), 0.0);
    let switches = admin(
        &lab,
        put("/admin/reliability", json!({"throttle_enabled": "on"})),
    )
    .await;
    assert_eq!(switches["throttle_enabled"], true);
    assert!(
        change_summaries(&lab, None)
            .iter()
            .any(|c| c == "retry on, breaker on, throttling on"),
        "{:?}",
        change_summaries(&lab, None)
    );
    // Declines are answers: nothing is shed.
    admin(&lab, put("/admin/payment", json!({"failure_rate": 1.0}))).await;
    run_orders(&lab, 50).await;
    assert_eq!(lab.payment.calls(), 50);
    assert_eq!(
        value(&scrape(&lab).await, "client_throttled_total", &[]),
        0.0
    );

    // An outage answers nothing: once the window holds more requests than
    // twice its answers, most charges are shed.
    tokio::time::advance(Duration::from_secs(11)).await;
    admin(&lab, put("/admin/payment", json!({"mode": "outage"}))).await;
    let before = lab.payment.calls();
    let orders = run_orders(&lab, 200).await;
    assert!(orders.iter().all(|o| o.status == Status::Failed));
    let sent = lab.payment.calls() - before;
    let m = scrape(&lab).await;
    let shed = value(&m, "client_throttled_total", &[]);
    assert_eq!(shed as u64 + sent, 200, "each order either sent or shed");
    assert!(shed > 150.0, "{shed} of 200 shed");
    assert!(value(&m, "client_throttle_probability", &[]) > 0.9);
    let throttled = orders
        .iter()
        .filter(|o| {
            o.last_error
                .as_deref()
                .unwrap_or("")
                .contains("throttled locally")
        })
        .count();
    assert_eq!(throttled as f64, shed);
    assert!(orders.iter().filter(|o| o.attempts == 0).count() as f64 == shed);
    // The timeline carries it.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let samples = lab.app.handles().instruments.timeline.since(0);
    assert!(samples.iter().any(|s| s.throttled_per_s > 0.0));
    assert!(samples.last().unwrap().throttle_probability > 0.9);
    // A bad value is a 422 naming the switch.
    let (status, _, reply) = send(
        &lab.router,
        put(
            "/admin/reliability",
            json!({"throttle_enabled": "sometimes"}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{reply}");
    assert_eq!(reply["error"]["field"], "throttle_enabled", "{reply}");
}

/// Hedging switched on at run time: every charge slower than the 30 ms
/// delay gets a hedge beside it, under the same key; the first answer wins
/// and nothing is charged twice; /metrics and the feed say so.
#[tokio::test(start_paused = true)]
async fn hedging_switched_on_at_run_time_starts_a_hedge_beside_each_slow_charge() {
    let lab = Lab::new(LabOptions {
        payment: PaymentSettings {
            failure_rate: 0.0,
            latency_min: Duration::from_millis(100),
            latency_max: Duration::from_millis(100),
            ..PaymentSettings::default()
        },
        hedge_delay: Some(reliability_lab::reliability::HedgeDelay::Fixed(
            Duration::from_millis(30),
        )),
        ..LabOptions::default()
    })
    .await;
    run_orders(&lab, 3).await;
    assert_eq!(lab.payment.calls(), 3, "off: one call per order");
    let switches = admin(
        &lab,
        put("/admin/reliability", json!({"hedge_enabled": true})),
    )
    .await;
    assert_eq!(switches["hedge_enabled"], true);
    assert!(change_summaries(&lab, None)
        .iter()
        .any(|c| c == "retry on, breaker on, hedging on"));
    let orders = run_orders(&lab, 5).await;
    assert!(orders.iter().all(|o| o.status == Status::Completed));
    // Each order: its call at 0 ms and a hedge at 30 ms, both 100 ms long;
    // the first answers at 100 ms and the hedge is cancelled.
    assert_eq!(lab.payment.calls(), 3 + 10);
    for o in &orders {
        let took = (o.updated_at - o.created_at).to_std().unwrap();
        assert!(took < Duration::from_millis(110), "{took:?}");
    }
    let m = scrape(&lab).await;
    assert_eq!(value(&m, "hedged_attempts_total", &[]), 5.0);
    assert_eq!(value(&m, "hedge_wins_total", &[]), 0.0);
    assert_eq!(value(&m, "payment_duplicate_charges_total", &[]), 0.0);
    assert_eq!(value(&m, "payment_charges_total", &[]), 8.0);
    let (status, _, reply) = send(
        &lab.router,
        put("/admin/reliability", json!({"hedge_enabled": 3})),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{reply}");
    assert_eq!(reply["error"]["field"], "hedge_enabled", "{reply}");
}

/// A concurrency limit switched on at run time: past it a charge is not
/// sent and its order fails fast; /metrics shows the limit and what it
/// refused, the feed says so, and an unknown kind is a 422.
#[tokio::test(start_paused = true)]
async fn a_concurrency_limit_switched_on_at_run_time_refuses_calls_past_it() {
    let lab = Lab::new(LabOptions {
        workers: 30,
        payment: PaymentSettings {
            failure_rate: 0.0,
            latency_min: Duration::from_millis(100),
            latency_max: Duration::from_millis(100),
            ..PaymentSettings::default()
        },
        ..LabOptions::default()
    })
    .await;
    let m = scrape(&lab).await;
    assert!(
        samples(&m, "concurrency_limit").is_empty(),
        "no limit while off"
    );
    let switches = admin(
        &lab,
        put("/admin/reliability", json!({"concurrency_limit": "fixed"})),
    )
    .await;
    assert_eq!(switches["concurrency_limit"], "fixed");
    assert!(change_summaries(&lab, None)
        .iter()
        .any(|c| c == "retry on, breaker on, fixed concurrency limit"));
    // Thirty orders at once against the default limit of 20.
    let orders = run_orders(&lab, 30).await;
    let refused: Vec<_> = orders
        .iter()
        .filter(|o| o.status == Status::Failed)
        .collect();
    assert_eq!(refused.len(), 10, "{orders:?}");
    assert!(refused.iter().all(|o| o.attempts == 0
        && o.last_error
            .as_deref()
            .unwrap()
            .contains("concurrency limit")));
    assert_eq!(lab.payment.calls(), 20);
    let m = scrape(&lab).await;
    assert_eq!(value(&m, "concurrency_limit", &[]), 20.0);
    assert_eq!(value(&m, "concurrency_limit_rejected_total", &[]), 10.0);
    assert_eq!(value(&m, "concurrency_limit_in_flight", &[]), 0.0);
    // Off again: the limit's series are gone.
    admin(
        &lab,
        put("/admin/reliability", json!({"concurrency_limit": "off"})),
    )
    .await;
    let m = scrape(&lab).await;
    assert!(samples(&m, "concurrency_limit").is_empty());
    assert!(samples(&m, "concurrency_limit_in_flight").is_empty());
    let (status, _, reply) = send(
        &lab.router,
        put("/admin/reliability", json!({"concurrency_limit": "tcp"})),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{reply}");
    assert_eq!(reply["error"]["field"], "concurrency_limit", "{reply}");
}
