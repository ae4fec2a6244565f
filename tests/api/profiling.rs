//! `/debug/pprof/` on the real binary (jemalloc and the profiler's signal
//! handler live in the binary, not in the test process). Profiles are one
//! second long, on the real clock.

use std::io::Read;
use std::time::Duration;

use pprof::protos::{Message, Profile};

use crate::helpers::{spawn_binary, Running, ORDER_BODY};

/// Keeps the service busy so a CPU profile has samples.
fn load(service: &Running, for_how_long: Duration) -> tokio::task::JoinHandle<()> {
    let url = service.url("/orders");
    tokio::spawn(async move {
        let client = reqwest::Client::new();
        let until = std::time::Instant::now() + for_how_long;
        while std::time::Instant::now() < until {
            let _ = client
                .post(&url)
                .header("content-type", "application/json")
                .body(ORDER_BODY)
                .send()
                .await;
        }
    })
}

fn strings(profile: &Profile) -> Vec<&str> {
    profile
        .function
        .iter()
        .filter_map(|f| profile.string_table.get(f.name as usize))
        .map(String::as_str)
        .collect()
}

async fn lab() -> Running {
    spawn_binary(&[
        ("PAYMENT_LATENCY_MIN", "0ms"),
        ("PAYMENT_LATENCY_MAX", "0ms"),
        ("QUEUE_CAPACITY", "10000"),
    ])
    .await
}

#[tokio::test]
async fn profiles_are_listed_routed_and_decodable() {
    let service = lab().await;
    let client = reqwest::Client::new();

    // The index lists each profile, and each listed name is routed.
    let index: serde_json::Value = client
        .get(service.url("/debug/pprof/"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = index["profiles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["profile", "flamegraph", "heap"]);

    // CPU profile: a pprof protobuf with samples and Rust function names.
    let busy = load(&service, Duration::from_millis(1500));
    let cpu = client
        .get(service.url("/debug/pprof/profile?seconds=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(cpu.status(), 200);
    let profile = Profile::decode(cpu.bytes().await.unwrap()).expect("pprof protobuf");
    busy.await.unwrap();
    assert!(!profile.sample.is_empty(), "the profile has samples");
    assert!(
        strings(&profile)
            .iter()
            .any(|f| f.contains("reliability_lab") || f.contains("axum")),
        "function names are resolved"
    );

    // Flame graph: well-formed SVG.
    let busy = load(&service, Duration::from_millis(1500));
    let svg = client
        .get(service.url("/debug/pprof/flamegraph?seconds=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(svg.status(), 200);
    assert_eq!(svg.headers()["content-type"], "image/svg+xml");
    let text = svg.text().await.unwrap();
    busy.await.unwrap();
    let options = roxmltree::ParsingOptions {
        allow_dtd: true,
        ..Default::default()
    };
    let doc = roxmltree::Document::parse_with_options(&text, options).expect("well-formed XML");
    assert_eq!(doc.root_element().tag_name().name(), "svg");

    // Heap: gzipped pprof with Rust function names.
    let heap = client
        .get(service.url("/debug/pprof/heap"))
        .send()
        .await
        .unwrap();
    assert_eq!(heap.status(), 200);
    let gz = heap.bytes().await.unwrap();
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_end(&mut raw)
        .expect("gzip");
    let profile = Profile::decode(&raw[..]).expect("pprof protobuf");
    assert!(!profile.sample.is_empty());
    assert!(
        strings(&profile)
            .iter()
            .any(|f| f.contains("reliability_lab") || f.contains("tokio")),
        "heap frames are symbolized"
    );

    // An unknown profile: 404 with the list.
    let unknown = client
        .get(service.url("/debug/pprof/goroutine"))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    let body: serde_json::Value = unknown.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unknown_profile");
    assert_eq!(body["profiles"].as_array().unwrap().len(), 3);

    // Bad durations: 400 with a JSON error.
    for bad in ["0", "121", "abc", "-1"] {
        let r = client
            .get(service.url(&format!("/debug/pprof/profile?seconds={bad}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "seconds={bad}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_seconds");
    }
    assert!(service.terminate().await.success());
}

#[tokio::test]
async fn a_second_concurrent_cpu_profile_is_refused_with_429() {
    let service = lab().await;
    let client = reqwest::Client::new();
    let first = tokio::spawn({
        let client = client.clone();
        let url = service.url("/debug/pprof/profile?seconds=2");
        async move { client.get(url).send().await.unwrap().status() }
    });
    // Wait until the first is under way: the second is refused while it runs.
    let mut refused = false;
    for _ in 0..15 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let second = client
            .get(service.url("/debug/pprof/flamegraph?seconds=1"))
            .send()
            .await
            .unwrap();
        if second.status() == 429 {
            let body: serde_json::Value = second.json().await.unwrap();
            assert_eq!(body["error"]["code"], "profile_in_progress");
            refused = true;
            break;
        }
    }
    assert!(refused, "a concurrent profile was refused");
    assert_eq!(first.await.unwrap(), 200);
    assert!(service.terminate().await.success());
}
