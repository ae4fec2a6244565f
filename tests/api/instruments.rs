//! The lab's instruments: the built-in traffic generator, the timeline and
//! the event stream, through the HTTP API.

use std::time::Duration;

use axum::http::StatusCode;
use http_body_util::BodyExt;
use reliability_lab::http::Api;
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tower::ServiceExt;

use crate::helpers::{error_code, get, post_json, send, spawn_binary, Lab, LabOptions};

fn put_json(uri: &str, body: &str) -> axum::http::Request<axum::body::Body> {
    let mut request = post_json(uri, body);
    *request.method_mut() = axum::http::Method::PUT;
    request
}

/// Serves the lab on its listener until the returned sender fires (or is
/// dropped); the handle yields `run_until_stopped`'s result.
fn serve(
    lab: Lab,
) -> (
    Api,
    oneshot::Sender<()>,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let Lab { app, router, .. } = lab;
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    (router, stop, server)
}

/// Polls `GET /admin/load` (wall clock, generous deadline) until the run
/// is over and nothing is in flight.
async fn finished_run(router: &Api) -> Value {
    for _ in 0..600 {
        let (_, _, load) = send(router, get("/admin/load")).await;
        if load["running"] == false && load["in_flight"] == 0 {
            return load;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the run never finished");
}

#[tokio::test]
async fn generated_orders_go_through_the_http_stack_and_every_one_is_counted() {
    let lab = Lab::new(LabOptions {
        workers: 2,
        ..LabOptions::default()
    })
    .await;
    let metrics = lab.metrics.clone();
    let (router, stop, server) = serve(lab);

    // 50 per second for 200 ms: exactly 10 requests.
    let (status, _, started) = send(
        &router,
        put_json("/admin/load", r#"{"rate": 50, "duration": "200ms"}"#),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{started}");
    assert_eq!(started["running"], true);
    assert_eq!(started["rate"], 50.0);
    assert_eq!(started["duration"], "200ms");

    let load = finished_run(&router).await;
    assert_eq!(load["sent"], 10, "{load}");
    assert_eq!(load["outcomes"]["accepted"], 10, "{load}");
    assert_eq!(load["outcomes"]["transport_error"], 0, "{load}");

    // They were real requests: the HTTP metrics and the generator's own
    // counter saw them.
    let text = metrics.render().unwrap();
    assert!(
        text.lines()
            .any(|l| l
                == r#"http_requests_total{method="POST",route="/orders",status_code="201"} 10"#),
        "{text}"
    );
    assert!(text
        .lines()
        .any(|l| l == r#"load_requests_total{outcome="accepted"} 10"#));

    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_full_queue_is_counted_as_rejected_and_not_retried() {
    let lab = Lab::new(LabOptions {
        capacity: 3,
        start_workers: false,
        ..LabOptions::default()
    })
    .await;
    let (router, stop, server) = serve(lab);
    send(
        &router,
        put_json("/admin/load", r#"{"rate": 100, "duration": "100ms"}"#),
    )
    .await;
    let load = finished_run(&router).await;
    // Ten sent, three fit in the queue, seven 503s dropped.
    assert_eq!(load["sent"], 10, "{load}");
    assert_eq!(load["outcomes"]["accepted"], 3, "{load}");
    assert_eq!(load["outcomes"]["rejected"], 7, "{load}");
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

/// Clients that retry a 503 at once, ignoring Retry-After: the same ten
/// orders against the full queue above become 24 requests, and the 503s
/// the service answers triple.
#[tokio::test]
async fn impatient_clients_retry_the_503s_and_multiply_the_requests() {
    let lab = Lab::new(LabOptions {
        capacity: 3,
        start_workers: false,
        ..LabOptions::default()
    })
    .await;
    let metrics = lab.metrics.clone();
    let (router, stop, server) = serve(lab);
    let (status, _, started) = send(
        &router,
        put_json(
            "/admin/load",
            r#"{"rate": 100, "duration": "100ms", "client": {"retries": 2, "retry_after": false}}"#,
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{started}");
    assert_eq!(started["client"]["retries"], 2, "{started}");
    assert_eq!(started["client"]["retry_after"], false, "{started}");
    assert_eq!(started["client"]["timeout"], "30s", "{started}");
    let load = finished_run(&router).await;
    assert_eq!(load["sent"], 10, "{load}");
    assert_eq!(load["outcomes"]["accepted"], 3, "{load}");
    assert_eq!(load["outcomes"]["rejected"], 7, "{load}");
    assert_eq!(load["attempts"], 24, "{load}");
    assert_eq!(load["retries_after_503"], 14, "{load}");
    let text = metrics.render().unwrap();
    for line in [
        r#"http_requests_total{method="POST",route="/orders",status_code="503"} 21"#,
        r#"load_client_retries_total{reason="503"} 14"#,
        r#"load_client_retries_total{reason="timeout"} 0"#,
        r#"load_requests_total{outcome="rejected"} 7"#,
    ] {
        assert!(text.lines().any(|l| l == line), "no {line}");
    }
    // The next run without a client object goes back to the configured
    // clients (no retries).
    send(
        &router,
        put_json("/admin/load", r#"{"rate": 100, "duration": "30ms"}"#),
    )
    .await;
    let load = finished_run(&router).await;
    assert_eq!(load["client"]["retries"], 0, "{load}");
    assert_eq!(load["attempts"], load["sent"], "{load}");
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn bad_load_values_are_refused_by_name_and_change_nothing() {
    let lab = Lab::new(LabOptions::default()).await;
    let router = lab.router.clone();
    for (body, field) in [
        (r#"{"rate": 0}"#, "rate"),
        (r#"{"rate": 5000.01}"#, "rate"),
        (r#"{"rate": "fast"}"#, "rate"),
        (r#"{"rate": 10, "duration": "0s"}"#, "duration"),
        (r#"{"rate": 10, "duration": "forever"}"#, "duration"),
        (r#"{"rate": 10, "duration": "25h"}"#, "duration"),
        (r#"{"rate": 10, "burst": 3}"#, "burst"),
        (r#"{"duration": "1m"}"#, "rate"),
        (
            r#"{"rate": 10, "client": {"retries": 11}}"#,
            "client.retries",
        ),
        (
            r#"{"rate": 10, "client": {"retries": -1}}"#,
            "client.retries",
        ),
        (
            r#"{"rate": 10, "client": {"timeout": "0s"}}"#,
            "client.timeout",
        ),
        (
            r#"{"rate": 10, "client": {"timeout": "2m"}}"#,
            "client.timeout",
        ),
        (
            r#"{"rate": 10, "client": {"retry_delay": "61s"}}"#,
            "client.retry_delay",
        ),
        (
            r#"{"rate": 10, "client": {"retry_after": "maybe"}}"#,
            "client.retry_after",
        ),
        (
            r#"{"rate": 10, "client": {"patience": 1}}"#,
            "client.patience",
        ),
    ] {
        let (status, _, error) = send(&router, put_json("/admin/load", body)).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {error}");
        assert_eq!(error_code(&error), "invalid_field", "{body}: {error}");
        assert_eq!(error["error"]["field"], field, "{body}: {error}");
        let (_, _, load) = send(&router, get("/admin/load")).await;
        assert_eq!(
            load["running"], false,
            "{body} changed the generator: {load}"
        );
        assert_eq!(
            load["rate"],
            Value::Null,
            "{body} changed the generator: {load}"
        );
    }
}

#[tokio::test]
async fn delete_stops_the_run_and_get_reports_it_as_it_ended() {
    let lab = Lab::new(LabOptions::default()).await;
    let (router, stop, server) = serve(lab);
    let (_, _, started) = send(&router, put_json("/admin/load", r#"{"rate": 20}"#)).await;
    assert_eq!(started["duration"], Value::Null);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, _, stopped) = send(
        &router,
        axum::http::Request::delete("/admin/load")
            .body(axum::body::Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(stopped["running"], false, "{stopped}");
    let sent = stopped["sent"].as_u64().unwrap();
    assert!(sent >= 1, "{stopped}");
    // Nothing more is sent after the stop.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let load = finished_run(&router).await;
    assert_eq!(load["sent"], sent, "{load}");
    assert_eq!(load["outcomes"]["accepted"], sent, "{load}");
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn the_timeline_samples_rates_from_the_services_own_counters() {
    let lab = Lab::new(LabOptions::default()).await;
    for _ in 0..8 {
        lab.post_order().await;
    }
    // The first sample closes 250 ms after the start.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, _, timeline) = send(&lab.router, get("/admin/timeline")).await;
    assert_eq!(status, StatusCode::OK, "{timeline}");
    assert_eq!(timeline["interval"], 0.25);
    assert_eq!(timeline["capacity"], 3600, "15 minutes of 250 ms samples");
    let first = &timeline["samples"][0];
    assert_eq!(first["seq"], 1);
    assert_eq!(first["accepted_per_s"], 32.0, "{first}");
    assert_eq!(first["completed_per_s"], 32.0, "{first}");
    assert_eq!(first["payment_calls_per_s"], 32.0, "{first}");
    assert_eq!(first["completed_total"], 8);
    assert_eq!(first["finished"], 8);
    assert!(first["latency_p50_ms"].is_number(), "{first}");
    assert!(first["latency_p99_ms"].is_number(), "{first}");
    assert_eq!(first["charges"], 8);
    assert_eq!(first["breaker"], "closed");
    assert_eq!(first["payment_mode"], "normal");

    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, _, later) = send(&lab.router, get("/admin/timeline?since=1")).await;
    let seqs: Vec<u64> = later["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [2, 3]);
    assert_eq!(later["last_seq"], 3);
    // Quiet intervals: rates back to zero, no latency.
    assert_eq!(later["samples"][0]["accepted_per_s"], 0.0);
    assert_eq!(later["samples"][0]["latency_p50_ms"], Value::Null);
    // Caught up: the same seq back. Ahead of the newest: the newest, not
    // the future value (passed back, it would hide every sample to come).
    for (since, last) in [("3", 3), ("1000000", 3)] {
        let (_, _, none) = send(&lab.router, get(&format!("/admin/timeline?since={since}"))).await;
        assert_eq!(none["samples"].as_array().unwrap().len(), 0, "{none}");
        assert_eq!(none["last_seq"], last, "since={since}: {none}");
    }

    for bad in ["-1", "x", "9223372036854775808"] {
        let (status, _, error) =
            send(&lab.router, get(&format!("/admin/timeline?since={bad}"))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(error["error"]["field"], "since");
    }
}

#[tokio::test(start_paused = true)]
async fn breaker_rejections_and_the_open_state_appear_in_the_samples() {
    let lab = Lab::new(LabOptions::default()).await;
    send(
        &lab.router,
        put_json("/admin/payment", r#"{"mode": "outage"}"#),
    )
    .await;
    for _ in 0..4 {
        lab.post_order().await;
    }
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (_, _, timeline) = send(&lab.router, get("/admin/timeline")).await;
    let samples = timeline["samples"].as_array().unwrap();
    let last = samples.last().unwrap();
    assert_eq!(last["breaker"], "open", "{last}");
    assert_eq!(last["payment_mode"], "outage");
    assert!(last["until_half_open"].as_f64().unwrap() > 0.0, "{last}");
    let sum = |key: &str| -> f64 {
        samples
            .iter()
            .map(|s| s[key].as_f64().unwrap() * s["interval"].as_f64().unwrap())
            .sum()
    };
    assert!(sum("retries_per_s") > 0.0);
    assert!(sum("rejections_open_per_s") > 0.0);
    assert!(sum("payment_failures_per_s") > 0.0);
    assert_eq!(last["failed_total"], 4);
}

/// Reads SSE events (name, JSON data) off a response body until `count`.
async fn read_events(body: &mut axum::body::Body, count: usize) -> Vec<(String, Value)> {
    let mut text = String::new();
    let mut events = Vec::new();
    while events.len() < count {
        let frame = body.frame().await.expect("the stream goes on").unwrap();
        if let Ok(data) = frame.into_data() {
            text.push_str(std::str::from_utf8(&data).unwrap());
        }
        while let Some(end) = text.find("\n\n") {
            let block: String = text.drain(..end + 2).collect();
            let mut name = String::new();
            let mut data = String::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event: ") {
                    name = v.to_owned();
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data.push_str(v);
                }
            }
            if !name.is_empty() {
                events.push((name, serde_json::from_str(&data).unwrap()));
            }
        }
    }
    events
}

/// The first event of a fresh stream.
async fn hello_of(lab: &Lab) -> Value {
    let response = lab
        .router
        .clone()
        .oneshot(get("/admin/events"))
        .await
        .unwrap();
    let mut body = response.into_body();
    read_events(&mut body, 1).await.remove(0).1
}

#[tokio::test(start_paused = true)]
async fn the_event_stream_names_the_providers_capacity_when_it_has_one() {
    let lab = Lab::new(LabOptions {
        provider_capacity: Some(reliability_lab::payment::Capacity {
            slots: 12,
            queue_timeout: Duration::from_secs(1),
        }),
        ..LabOptions::default()
    })
    .await;
    let hello = hello_of(&lab).await;
    assert_eq!(hello["payment_capacity"], 12);
    assert_eq!(hello["breaker_policy"], "consecutive");
    assert!(hello["breaker_failure_rate"].is_null());
    assert_eq!(hello["breaker_half_open_probes"], 1);
}

#[tokio::test(start_paused = true)]
async fn the_event_stream_describes_a_failure_rate_breaker() {
    let lab = Lab::new(LabOptions {
        breaker: reliability_lab::reliability::BreakerConfig {
            policy: reliability_lab::reliability::BreakerPolicy::FailureRate {
                rate: 0.4,
                window: Duration::from_secs(20),
                min_calls: 30,
            },
            half_open_probes: 3,
            ..Default::default()
        },
        ..LabOptions::default()
    })
    .await;
    let hello = hello_of(&lab).await;
    assert_eq!(hello["breaker_policy"], "failure_rate");
    assert_eq!(hello["breaker_failure_rate"], 0.4);
    assert_eq!(hello["breaker_min_calls"], 30);
    assert_eq!(hello["breaker_window_seconds"], 20.0);
    assert_eq!(hello["breaker_half_open_probes"], 3);
    assert_eq!(hello["breaker"]["window_calls"], 0);
}

#[tokio::test(start_paused = true)]
async fn the_event_stream_opens_with_hello_then_carries_samples_and_changes() {
    let lab = Lab::new(LabOptions {
        capacity: 7,
        ..LabOptions::default()
    })
    .await;
    send(
        &lab.router,
        put_json("/admin/reliability", r#"{"retry_enabled": false}"#),
    )
    .await;
    let response = lab
        .router
        .clone()
        .oneshot(get("/admin/events"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body();
    let hello = read_events(&mut body, 1).await.remove(0);
    assert_eq!(hello.0, "hello");
    let hello = hello.1;
    assert_eq!(hello["queue_capacity"], 7);
    assert!(hello["payment_capacity"].is_null(), "unlimited by default");
    assert_eq!(hello["reliability"]["retry_enabled"], false);
    assert_eq!(hello["load"]["running"], false);
    assert_eq!(hello["changes"][0]["kind"], "reliability");
    assert_eq!(hello["changes"][0]["summary"], "retry off, breaker on");

    // An outage with one order: changes for the mode and the breaker.
    send(
        &lab.router,
        put_json("/admin/reliability", r#"{"retry_enabled": true}"#),
    )
    .await;
    send(
        &lab.router,
        put_json("/admin/payment", r#"{"mode": "outage"}"#),
    )
    .await;
    for _ in 0..2 {
        lab.post_order().await;
    }
    // Until the breaker's own change arrives (it is the feed's second
    // observer, beside the metrics).
    let mut events = Vec::new();
    while !events
        .iter()
        .any(|(name, c): &(String, Value)| name == "change" && c["kind"] == "breaker")
    {
        assert!(
            events.len() < 200,
            "no breaker change in {} events",
            events.len()
        );
        events.extend(read_events(&mut body, 1).await);
    }
    let changes: Vec<&str> = events
        .iter()
        .filter(|(name, _)| name == "change")
        .map(|(_, c)| c["summary"].as_str().unwrap())
        .collect();
    assert!(changes.contains(&"breaker closed → open"), "{changes:?}");
    assert!(changes.contains(&"retry on, breaker on"), "{changes:?}");
    assert!(
        changes
            .iter()
            .any(|c| c.starts_with("payment: mode outage")),
        "{changes:?}"
    );
    let samples = events.iter().filter(|(name, _)| name == "sample").count();
    assert!(samples >= 1, "{events:?}");
}

#[tokio::test]
async fn a_listener_that_never_reads_delays_nothing() {
    use tokio::io::AsyncWriteExt;
    let lab = Lab::new(LabOptions::default()).await;
    let addr = lab.app.local_addr().expect("a TCP listener");
    let (router, stop, server) = serve(lab);
    // A client that asks for the stream and never reads a byte of it.
    let mut stuck = tokio::net::TcpStream::connect(addr).await.unwrap();
    stuck
        .write_all(b"GET /admin/events HTTP/1.1\r\nhost: lab\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Far more events than its socket buffers and the feed hold.
    for i in 0..20_000 {
        let body = json!({ "retry_enabled": i % 2 == 0 }).to_string();
        let (status, _, _) = send(&router, put_json("/admin/reliability", &body)).await;
        assert_eq!(status, StatusCode::OK);
    }
    // The recorder goes on, and a new listener is served at once.
    let (_, _, before) = send(&router, get("/admin/timeline")).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (_, _, after) = send(&router, get("/admin/timeline")).await;
    assert!(after["last_seq"].as_u64() > before["last_seq"].as_u64());
    let client = reqwest::Client::new();
    let mut events = client
        .get(format!("http://{addr}/admin/events"))
        .send()
        .await
        .unwrap();
    let first = events.chunk().await.unwrap().unwrap();
    assert!(first.starts_with(b"event: hello"));
    drop(events);
    drop(stuck);
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_stop_ends_the_traffic_first_and_closes_event_streams() {
    let lab = Lab::new(LabOptions {
        shutdown_timeout: Duration::from_secs(3600),
        ..LabOptions::default()
    })
    .await;
    let addr = lab.app.local_addr().expect("a TCP listener");
    let traffic = lab.app.handles().instruments.traffic.clone();
    let (router, stop, server) = serve(lab);
    send(&router, put_json("/admin/load", r#"{"rate": 200}"#)).await;
    let client = reqwest::Client::new();
    let mut events = client
        .get(format!("http://{addr}/admin/events"))
        .send()
        .await
        .unwrap();
    assert!(events.chunk().await.unwrap().is_some());
    tokio::time::sleep(Duration::from_millis(200)).await;

    stop.send(()).unwrap();
    // With an hour of SHUTDOWN_TIMEOUT, only an ended stream lets the stop
    // finish; the deadline here is for a broken build, not a speed check.
    tokio::time::timeout(Duration::from_secs(60), server)
        .await
        .expect("the stop finishes with a page connected")
        .unwrap()
        .unwrap();
    let status = traffic.status();
    assert!(!status.running);
    assert_eq!(status.in_flight, 0);
    assert_eq!(
        status.sent, status.outcomes.accepted,
        "every generated request was answered before the server stopped: {status:?}"
    );
    // The stream ended cleanly.
    while let Some(_chunk) = events.chunk().await.unwrap() {}
}

#[tokio::test]
async fn load_rate_starts_traffic_at_boot() {
    let running = spawn_binary(&[
        ("LOAD_RATE", "20"),
        ("LOAD_DURATION", "1s"),
        ("PAYMENT_LATENCY_MIN", "0ms"),
        ("PAYMENT_LATENCY_MAX", "0ms"),
    ])
    .await;
    let client = reqwest::Client::new();
    let mut load = Value::Null;
    for _ in 0..300 {
        load = running.get_json(&client, "/admin/load").await;
        if load["running"] == false && load["in_flight"] == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(load["running"], false, "{load}");
    assert_eq!(load["rate"], 20.0);
    assert_eq!(load["sent"], 20, "{load}");
    assert_eq!(load["outcomes"]["accepted"], 20, "{load}");
    let status = running.terminate().await;
    assert!(status.success());
}

#[tokio::test]
async fn each_event_of_the_stream_is_documented_with_the_schema_of_its_data() {
    let lab = Lab::new(LabOptions::default()).await;
    let document: Value = serde_json::from_str(reliability_lab::http::openapi::json()).unwrap();
    let stream = &document["paths"]["/admin/events"]["get"]["responses"]["200"]["content"]
        ["text/event-stream"]["schema"];
    let branches = stream["oneOf"].as_array().expect("one branch per event");
    let mut documented = std::collections::BTreeMap::new();
    for branch in branches {
        let name = branch["properties"]["event"]["enum"][0].as_str().unwrap();
        let data = &branch["properties"]["data"];
        assert_eq!(data["contentMediaType"], "application/json", "{branch}");
        let reference = data["contentSchema"]["$ref"].as_str().unwrap();
        let schema = reference.trim_start_matches("#/components/schemas/");
        assert!(
            document["components"]["schemas"].get(schema).is_some(),
            "{name}'s data names {reference}, which the document lacks"
        );
        documented.insert(name.to_string(), schema.to_string());
    }
    assert_eq!(
        documented.keys().map(String::as_str).collect::<Vec<_>>(),
        ["change", "hello", "lagged", "sample"]
    );
    // The hello a real stream opens with has every field its schema requires.
    let first = hello_of(&lab).await;
    let hello = &document["components"]["schemas"]["Hello"];
    for field in hello["required"].as_array().unwrap() {
        let field = field.as_str().unwrap();
        assert!(first.get(field).is_some(), "the hello lacks {field}");
    }
}
