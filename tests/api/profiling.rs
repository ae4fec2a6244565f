//! `/debug/pprof/`: routing, formats and the heap profile on the real binary
//! (jemalloc lives in the binary, not in the test process); what a CPU
//! profile contains and the one-at-a-time rule in process, where the test
//! controls what runs. Profiles are one second long, on the real clock.

use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::http::StatusCode;
use pprof::protos::{Message, Profile};

use crate::helpers::{get, send, spawn_binary, Lab, LabOptions, Running};

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
    let index = service.get_json(&client, "/debug/pprof/").await;
    let names: Vec<&str> = index["profiles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["profile", "flamegraph", "heap"]);

    // CPU profile: a pprof protobuf. What it holds is checked in process
    // (`a_cpu_profile_shows_the_function_that_burned_the_cpu`), where the
    // test decides what runs while it samples.
    let cpu = client
        .get(service.url("/debug/pprof/profile?seconds=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(cpu.status(), 200);
    Profile::decode(cpu.bytes().await.unwrap()).expect("pprof protobuf");

    // Flame graph: well-formed SVG, samples or not.
    let svg = client
        .get(service.url("/debug/pprof/flamegraph?seconds=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(svg.status(), 200);
    assert_eq!(svg.headers()["content-type"], "image/svg+xml");
    let text = svg.text().await.unwrap();
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
async fn profile_max_duration_bounds_what_a_profile_samples() {
    let service = spawn_binary(&[("PROFILE_MAX_DURATION", "1s")]).await;
    let client = reqwest::Client::new();
    // Asked for the default 30 s and for 60 s, each samples one second:
    // the flame graph's title says how long it sampled.
    for path in [
        "/debug/pprof/flamegraph",
        "/debug/pprof/flamegraph?seconds=60",
    ] {
        let svg = client.get(service.url(path)).send().await.unwrap();
        assert_eq!(svg.status(), 200, "{path}");
        let text = svg.text().await.unwrap();
        assert!(
            text.contains("reliability-lab CPU, 1s"),
            "{path}: {}",
            &text[..text.len().min(2000)]
        );
    }
    // The same through the named route.
    let cpu = client
        .get(service.url("/debug/pprof/profile"))
        .send()
        .await
        .unwrap();
    assert_eq!(cpu.status(), 200);
    let profile = Profile::decode(cpu.bytes().await.unwrap()).expect("pprof protobuf");
    // pprof-rs records how long it sampled: about the one second.
    assert!(
        (500_000_000..5_000_000_000).contains(&profile.duration_nanos),
        "sampled {} ns",
        profile.duration_nanos
    );
    assert!(service.terminate().await.success());
}

/// Spins until told to stop: the one function sure to be on the CPU while
/// the profile samples. Not inlined, so it has a frame of its own.
#[inline(never)]
fn burn_cpu_for_the_profile(stop: &AtomicBool) -> u64 {
    let mut x = 0u64;
    while !stop.load(Ordering::Relaxed) {
        for i in 0..10_000u64 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(i));
        }
    }
    x
}

/// The only test in this binary that runs the CPU profiler in process
/// (pprof allows one profiler per process). A thread burns CPU in a known
/// function for the whole of the profile, so samples are certain: the
/// profiler samples on CPU time, and that thread is the one using it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cpu_profile_shows_the_function_that_burned_the_cpu_and_only_one_runs_at_once() {
    let lab = Lab::new(LabOptions {
        start_workers: false,
        ..LabOptions::default()
    })
    .await;
    let profiler = lab.app.handles().profiler.clone();

    // While a profile holds the slot, both kinds of CPU profile are refused.
    let slot = profiler.hold().unwrap();
    for path in [
        "/debug/pprof/profile?seconds=1",
        "/debug/pprof/flamegraph?seconds=1",
    ] {
        let (status, headers, body) = send(&lab.router, get(path)).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{path}: {body}");
        assert_eq!(body["error"]["code"], "profile_in_progress");
        assert!(headers.contains_key("retry-after"));
    }
    drop(slot);

    // Once free, a profile runs, and it shows what burned the CPU.
    let stop = Arc::new(AtomicBool::new(false));
    let burner = std::thread::spawn({
        let stop = stop.clone();
        move || burn_cpu_for_the_profile(&stop)
    });
    let response =
        tower::ServiceExt::oneshot(lab.router.clone(), get("/debug/pprof/profile?seconds=1"))
            .await
            .unwrap();
    stop.store(true, Ordering::Relaxed);
    burner.join().unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let bytes = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    let profile = Profile::decode(bytes).expect("pprof protobuf");
    assert!(!profile.sample.is_empty(), "the profile has samples");
    assert!(
        strings(&profile)
            .iter()
            .any(|f| f.contains("burn_cpu_for_the_profile")),
        "the burning function is named: {:?}",
        strings(&profile)
    );
    // And the slot is free again afterwards.
    assert!(profiler.hold().is_ok());
}
