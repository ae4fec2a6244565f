//! `/metrics`, scraped and parsed with a Prometheus text-format parser.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use axum::http::StatusCode;
use openmetrics_parser::prometheus::parse_prometheus;
use openmetrics_parser::PrometheusValue;
use reliability_lab::payment::PaymentSettings;
use reliability_lab::reliability::BreakerConfig;

use crate::helpers::{get, send, Lab, LabOptions};

/// One parsed series.
pub struct Sample {
    pub metric: String,
    pub labels: BTreeMap<String, String>,
    pub value: PrometheusValue,
}

impl Sample {
    fn label(&self, name: &str) -> Option<&str> {
        self.labels.get(name).map(String::as_str)
    }
}

/// Every series of a scrape, parsed by a Prometheus text-format parser.
pub struct Scrape {
    pub samples: Vec<Sample>,
}

pub async fn scrape(lab: &Lab) -> Scrape {
    let (status, headers, body) = send(&lab.router, get("/metrics")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = body.as_str().expect("metrics are text");
    let exposition = parse_prometheus(text).expect("valid exposition format");
    let mut samples = Vec::new();
    for (name, family) in &exposition.families {
        for sample in family.iter_samples() {
            let labels = sample
                .get_labelset()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            samples.push(Sample {
                metric: name.clone(),
                labels,
                value: sample.value.clone(),
            });
        }
    }
    Scrape { samples }
}

pub fn samples<'a>(scrape: &'a Scrape, name: &str) -> Vec<&'a Sample> {
    scrape.samples.iter().filter(|s| s.metric == name).collect()
}

pub fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<f64> = samples(scrape, name)
        .into_iter()
        .filter(|s| labels.iter().all(|(k, v)| s.label(k) == Some(*v)))
        .map(|s| match &s.value {
            PrometheusValue::Counter(c) => c.value.as_f64(),
            PrometheusValue::Gauge(v) | PrometheusValue::Unknown(v) => v.as_f64(),
            _ => panic!("{name} is not a scalar"),
        })
        .collect();
    assert_eq!(found.len(), 1, "{name}{labels:?}: {} series", found.len());
    found[0]
}

#[tokio::test]
async fn all_seven_metrics_are_exported_with_their_labels() {
    let lab = Lab::new(LabOptions::default()).await;
    lab.post_order().await;
    let scrape = scrape(&lab).await;
    for name in [
        "http_requests_total",
        "worker_jobs_total",
        "worker_queue_depth",
        "payment_failures_total",
        "retry_attempts_total",
        "circuit_breaker_state",
        "circuit_breaker_rejections_total",
        "worker_busy_workers",
        "tokio_runtime_workers",
        "tokio_runtime_alive_tasks",
        "tokio_runtime_global_queue_depth",
    ] {
        assert!(!samples(&scrape, name).is_empty(), "{name} missing");
    }
    let hist = samples(&scrape, "http_request_duration_seconds");
    assert!(hist
        .iter()
        .any(|s| matches!(s.value, PrometheusValue::Histogram(_))
            && s.label("route") == Some("/orders")));
    assert_eq!(
        value(
            &scrape,
            "http_requests_total",
            &[
                ("method", "POST"),
                ("route", "/orders"),
                ("status_code", "201")
            ]
        ),
        1.0
    );
    assert_eq!(
        value(&scrape, "worker_jobs_total", &[("status", "submitted")]),
        1.0
    );
    #[cfg(target_os = "linux")]
    assert!(!samples(&scrape, "process_resident_memory_bytes").is_empty());
}

#[tokio::test]
async fn right_after_startup_every_known_series_is_listed_at_zero() {
    let lab = Lab::new(LabOptions {
        start_workers: false,
        ..LabOptions::default()
    })
    .await;
    let scrape = scrape(&lab).await;
    let expected: &[(&str, &[(&str, &str)])] = &[
        (
            "circuit_breaker_state_changes_total",
            &[("from", "closed"), ("to", "open")],
        ),
        (
            "circuit_breaker_state_changes_total",
            &[("from", "open"), ("to", "half_open")],
        ),
        (
            "circuit_breaker_state_changes_total",
            &[("from", "half_open"), ("to", "closed")],
        ),
        (
            "circuit_breaker_state_changes_total",
            &[("from", "half_open"), ("to", "open")],
        ),
        (
            "circuit_breaker_state_changes_total",
            &[("from", "open"), ("to", "closed")],
        ),
        ("circuit_breaker_rejections_total", &[("kind", "open")]),
        ("circuit_breaker_rejections_total", &[("kind", "half_open")]),
        ("worker_jobs_total", &[("status", "submitted")]),
        ("worker_jobs_total", &[("status", "completed")]),
        ("worker_jobs_total", &[("status", "failed")]),
        ("worker_jobs_total", &[("status", "rejected")]),
        ("retry_attempts_total", &[("result", "retried")]),
        ("retry_attempts_total", &[("result", "permanent_failure")]),
        ("payment_calls_total", &[]),
    ];
    for (name, labels) in expected {
        assert_eq!(value(&scrape, name, labels), 0.0, "{name} {labels:?}");
    }
}

#[tokio::test]
async fn fifty_distinct_ids_share_one_route_series_and_unknown_paths_one_more() {
    let lab = Lab::new(LabOptions {
        start_workers: false,
        ..LabOptions::default()
    })
    .await;
    for _ in 0..50 {
        send(
            &lab.router,
            get(&format!("/orders/{}", uuid::Uuid::new_v4())),
        )
        .await;
    }
    for i in 0..20 {
        send(
            &lab.router,
            get(&format!("/random/{i}/{}", uuid::Uuid::new_v4())),
        )
        .await;
    }
    let scrape = scrape(&lab).await;
    let routes: BTreeSet<&str> = samples(&scrape, "http_requests_total")
        .iter()
        .filter_map(|s| s.label("route"))
        .collect();
    assert_eq!(routes, BTreeSet::from(["/orders/{id}", "unmatched"]));
    assert_eq!(
        value(
            &scrape,
            "http_requests_total",
            &[("route", "/orders/{id}"), ("status_code", "404")]
        ),
        50.0
    );
    assert_eq!(
        value(&scrape, "http_requests_total", &[("route", "unmatched")]),
        20.0
    );
}

#[tokio::test(start_paused = true)]
async fn a_scripted_failure_run_counts_failures_the_trip_and_permanent_failures() {
    // One worker, failure rate 1, three attempts, threshold 5.
    let lab = Lab::new(LabOptions {
        payment: PaymentSettings {
            failure_rate: 1.0,
            latency_min: Duration::from_millis(10),
            latency_max: Duration::from_millis(10),
            ..PaymentSettings::default()
        },
        breaker: BreakerConfig {
            failure_threshold: 5,
            open_duration: Duration::from_secs(30),
            ..BreakerConfig::default()
        },
        ..LabOptions::default()
    })
    .await;
    for _ in 0..4 {
        let order = lab.post_order().await;
        lab.settle(order.id).await;
    }
    let scrape = scrape(&lab).await;
    assert_eq!(value(&scrape, "payment_failures_total", &[]), 5.0);
    // Five calls reached the provider; what the open breaker refused did not.
    assert_eq!(value(&scrape, "payment_calls_total", &[]), 5.0);
    assert_eq!(
        value(
            &scrape,
            "circuit_breaker_state_changes_total",
            &[("from", "closed"), ("to", "open")]
        ),
        1.0
    );
    // Every known transition has a series from the start; only the trip moved.
    assert_eq!(
        samples(&scrape, "circuit_breaker_state_changes_total").len(),
        5
    );
    for (from, to) in [
        ("open", "half_open"),
        ("half_open", "closed"),
        ("half_open", "open"),
        ("open", "closed"),
    ] {
        assert_eq!(
            value(
                &scrape,
                "circuit_breaker_state_changes_total",
                &[("from", from), ("to", to)]
            ),
            0.0,
            "{from} -> {to}"
        );
    }
    assert_eq!(value(&scrape, "circuit_breaker_state", &[]), 2.0);
    // Orders 2, 3 and 4 ended on the open breaker.
    assert_eq!(
        value(
            &scrape,
            "retry_attempts_total",
            &[("result", "permanent_failure")]
        ),
        3.0
    );
    assert_eq!(
        value(
            &scrape,
            "circuit_breaker_rejections_total",
            &[("kind", "open")]
        ),
        3.0
    );
    assert_eq!(
        value(&scrape, "worker_jobs_total", &[("status", "failed")]),
        4.0
    );
    assert_eq!(value(&scrape, "worker_queue_depth", &[]), 0.0);
}
