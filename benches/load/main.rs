//! `make bench`: the service under load, measured against references that do
//! not move, in the same run with the same client:
//!
//! - `POST /orders` and `GET /orders/{id}` against a minimal axum server
//!   (`reference.rs`), alternating, several rounds, medians;
//! - p99 at half of the measured maximum rate (open loop);
//! - the pipeline: orders per second from POST to completed, against the
//!   admission rate;
//! - `POST /orders` with five console event streams connected, against the
//!   same without;
//! - the retry + breaker wrapper's cost per call, against a bare call;
//! - memory: peak RSS, and bytes per order after many orders in memory;
//! - the payment client: charges a second through the service's client
//!   against `reliability-lab provider` at zero latency, against a minimal
//!   hyper client driving the same provider (`charges.rs`);
//! - with Postgres: `POST /orders` (group commit, and each insert alone)
//!   against Postgres's own single-row INSERT ceiling measured with pgbench
//!   at the same concurrency; p50 and p99 at 100 r/s with and without
//!   batching; p99 at half the maximum rate; the pipeline, POST to completed.
//!
//! Knobs (environment): BENCH_SECONDS (5), BENCH_CONNECTIONS (32),
//! BENCH_ROUNDS (3), BENCH_MEMORY_ORDERS (1000000), BENCH_DATABASE_URL,
//! PGBENCH, BENCH_ONLY=postgres (only the Postgres figures), BENCH_ONLY=client
//! (only the payment client's row). Results: a table on stdout, and JSON in bench/.

mod charges;
mod client;
#[path = "../common/mod.rs"]
mod common;
mod reference;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use client::{Kind, Outcome, Phase};
use common::Never;
use serde_json::json;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn free_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().unwrap()
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A child process that is killed when dropped.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn rss_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

async fn wait_healthy(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("server on {addr} never came up");
}

/// Settings that park the workers after their first job: charges that take
/// a minute, under a timeout longer than that. (With the default 1 s timeout
/// they would time out, open the breaker and then fail the queue as fast as
/// they can.)
const PARKED_WORKERS: [(&str, &str); 3] = [
    ("PAYMENT_LATENCY_MIN", "60s"),
    ("PAYMENT_LATENCY_MAX", "60s"),
    ("PAYMENT_TIMEOUT", "120s"),
];

async fn start_service(extra: &[(&str, &str)]) -> Server {
    let binary = repo_root().join("target/release/reliability-lab");
    assert!(
        binary.exists(),
        "build it first: cargo build --release (make bench does)"
    );
    let addr = free_addr();
    let child = Command::new(binary)
        .env_clear()
        .env("LISTEN_ADDR", addr.to_string())
        .env("PAYMENT_LATENCY_MIN", "0ms")
        .env("PAYMENT_LATENCY_MAX", "0ms")
        .env("PAYMENT_FAILURE_RATE", "0")
        .env("QUEUE_CAPACITY", "2000000")
        .env("MEMORY_MAX_ORDERS", "5000000")
        .envs(extra.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the service");
    wait_healthy(addr).await;
    Server { child, addr }
}

async fn start_reference() -> Server {
    let addr = free_addr();
    let child = Command::new(std::env::current_exe().unwrap())
        .args(["--serve-reference", &addr.to_string()])
        .stdout(Stdio::null())
        .spawn()
        .expect("start the reference server");
    wait_healthy(addr).await;
    Server { child, addr }
}

async fn phase(
    addr: SocketAddr,
    kind: Kind,
    rate: Option<f64>,
    targets: Arc<Vec<String>>,
) -> Outcome {
    client::run(Phase {
        addr,
        kind,
        connections: env_or("BENCH_CONNECTIONS", 32),
        duration: Duration::from_secs(env_or("BENCH_SECONDS", 5)),
        rate,
        targets,
    })
    .await
}

/// Event-stream readers, as open console pages are: each reads
/// `/admin/events` as fast as it comes.
struct Streams {
    readers: Vec<tokio::task::JoinHandle<usize>>,
    stop: Arc<tokio::sync::Notify>,
}

impl Streams {
    /// Ends the readers; returns the bytes they received.
    async fn stop(self) -> usize {
        self.stop.notify_waiters();
        let mut total = 0;
        for reader in self.readers {
            total += reader.await.unwrap_or(0);
        }
        total
    }
}

async fn console_streams(addr: SocketAddr, n: usize) -> Streams {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stop = Arc::new(tokio::sync::Notify::new());
    let mut readers = Vec::new();
    for _ in 0..n {
        let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
        socket
            .write_all(b"GET /admin/events HTTP/1.1\r\nhost: bench\r\n\r\n")
            .await
            .unwrap();
        let stop = stop.clone();
        readers.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            let mut received = 0;
            let stopped = stop.notified();
            tokio::pin!(stopped);
            loop {
                tokio::select! {
                    _ = &mut stopped => return received,
                    read = socket.read(&mut buf) => match read {
                        Ok(0) | Err(_) => return received,
                        Ok(n) => received += n,
                    },
                }
            }
        }));
    }
    Streams { readers, stop }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.partial_cmp(b).unwrap());
    xs[xs.len() / 2]
}

/// A GET of the admin state, as JSON.
async fn admin_state(addr: SocketAddr) -> serde_json::Value {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let request = hyper::Request::get("/admin/state")
        .header("host", "bench")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    serde_json::from_slice(&body).unwrap()
}

fn finished(state: &serde_json::Value) -> u64 {
    state["orders"]["completed"].as_u64().unwrap_or(0)
        + state["orders"]["failed"].as_u64().unwrap_or(0)
}

async fn wait_drained(addr: SocketAddr) {
    loop {
        let state = admin_state(addr).await;
        if state["queue"]["depth"] == 0 && state["workers"]["busy"] == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One row of the table.
struct Row {
    figure: String,
    value: f64,
    unit: &'static str,
    reference: Option<(String, f64)>,
    /// (description, met)
    target: Option<(String, bool)>,
    /// Failed requests (non-2xx answers, transport errors) in the phases
    /// behind the figure, service and reference together; None for figures
    /// that sent no request.
    errors: Option<u64>,
}

/// One load figure over the rounds: a value per round, medians reported.
#[derive(Default)]
struct Series {
    rate: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    errors: u64,
}

impl Series {
    fn add(&mut self, outcome: &Outcome) {
        self.rate.push(outcome.rate());
        self.p50.push(outcome.percentile_ms(50.0));
        self.p99.push(outcome.percentile_ms(99.0));
        self.errors += outcome.errors;
    }

    fn rate(&self) -> f64 {
        median(self.rate.clone())
    }

    fn p50(&self) -> f64 {
        median(self.p50.clone())
    }

    fn p99(&self) -> f64 {
        median(self.p99.clone())
    }
}

impl Row {
    fn ratio(&self) -> Option<f64> {
        self.reference.as_ref().map(|(_, r)| self.value / r)
    }
}

fn print_table(rows: &[Row]) {
    println!();
    println!(
        "{:<44} {:>14} {:>34} {:>8} {:>7}  target",
        "figure", "value", "reference", "ratio", "errors"
    );
    println!("{}", "-".repeat(138));
    for row in rows {
        let reference = row
            .reference
            .as_ref()
            .map(|(name, v)| format!("{name} {v:.1}"))
            .unwrap_or_else(|| "-".into());
        let ratio = row
            .ratio()
            .map(|r| format!("{r:.2}"))
            .unwrap_or_else(|| "-".into());
        let target = row
            .target
            .as_ref()
            .map(|(what, met)| format!("{what}: {}", if *met { "met" } else { "MISSED" }))
            .unwrap_or_default();
        let errors = row
            .errors
            .map(|e| e.to_string())
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<44} {:>10.1} {:<3} {:>34} {:>8} {:>7}  {}",
            row.figure, row.value, row.unit, reference, ratio, errors, target
        );
    }
    println!();
}

/// Average cost of one call through retry + breaker, against the bare call.
fn wrapper_cost_ns() -> (f64, f64) {
    use reliability_lab::reliability::{
        Breaker, BreakerConfig, Rejection, Reliability, RetryObserver, RetryPolicy,
    };
    struct Quiet;
    impl RetryObserver for Quiet {
        fn retrying(&self, _: &dyn std::fmt::Display, _: Duration) {}
        fn gave_up_on_rejection(&self, _: Rejection) {}
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let reliability = Reliability::new(
        RetryPolicy::default(),
        Breaker::new(BreakerConfig::default(), None),
        Arc::new(Quiet),
    );
    const N: u32 = 1_000_000;
    runtime.block_on(async {
        let start = Instant::now();
        for i in 0..N {
            let r: Result<u32, Never> = async { Ok(std::hint::black_box(i)) }.await;
            std::hint::black_box(r.ok());
        }
        let bare = start.elapsed().as_nanos() as f64 / f64::from(N);
        let start = Instant::now();
        for i in 0..N {
            let r = reliability
                .call(|| async move { Ok::<u32, Never>(std::hint::black_box(i)) })
                .await;
            std::hint::black_box(r.ok());
        }
        let wrapped = start.elapsed().as_nanos() as f64 / f64::from(N);
        (wrapped, bare)
    })
}

/// pgbench's single-row INSERT into the orders table, `clients` at once for
/// `seconds`: closed loop without a rate, else `rate` transactions a second
/// in all. Its output, or None when it did not run.
fn pgbench_insert(
    pgbench: &str,
    url: &str,
    clients: usize,
    seconds: u64,
    rate: Option<f64>,
    log_prefix: Option<&std::path::Path>,
) -> Option<String> {
    let script = std::env::temp_dir().join("reliability-lab-insert.sql");
    std::fs::write(
        &script,
        "INSERT INTO orders (id, customer_id, amount, currency, status, attempts, created_at, updated_at, lease_owner, lease_expires_at) \
         VALUES (gen_random_uuid(), 'cust-42', 1999, 'USD', 'pending', 0, now(), now(), 'pgbench', now() + interval '30 seconds');\n",
    )
    .ok()?;
    let mut command = Command::new(pgbench);
    command.args([
        "-n",
        "-c",
        &clients.to_string(),
        "-j",
        "2",
        "-T",
        &seconds.to_string(),
    ]);
    if let Some(rate) = rate {
        command.args(["-R", &format!("{rate:.0}")]);
    }
    if let Some(prefix) = log_prefix {
        command
            .arg("--log")
            .arg(format!("--log-prefix={}", prefix.display()));
    }
    let out = command.arg("-f").arg(&script).arg(url).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// pgbench's single-row INSERT tps at `clients` at once.
fn postgres_ceiling(pgbench: &str, url: &str, clients: usize, seconds: u64) -> Option<f64> {
    let text = pgbench_insert(pgbench, url, clients, seconds, None, None)?;
    text.lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|v| v.parse().ok())
}

/// The p99 latency in ms of pgbench's single-row INSERT at `rate` a second,
/// counted as the load client counts it: from each transaction's scheduled
/// start (pgbench's per-transaction log under `-R`, third column, µs).
fn postgres_p99_at(
    pgbench: &str,
    url: &str,
    clients: usize,
    seconds: u64,
    rate: f64,
) -> Option<f64> {
    let dir = std::env::temp_dir().join(format!("reliability-lab-pgbench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).ok()?;
    let ran = pgbench_insert(
        pgbench,
        url,
        clients,
        seconds,
        Some(rate),
        Some(&dir.join("log")),
    );
    let mut latencies: Vec<f64> = Vec::new();
    for entry in std::fs::read_dir(&dir).ok()?.flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        latencies.extend(
            text.lines()
                .filter_map(|l| l.split_whitespace().nth(2)?.parse::<f64>().ok()),
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    ran?;
    if latencies.is_empty() {
        return None;
    }
    latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Some(latencies[client::nearest_rank(latencies.len(), 99.0)] / 1000.0)
}

async fn fresh_database(admin_url: &str, name: &str) -> String {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(admin_url)
        .await
        .expect("connect to Postgres");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name}"
    )))
    .execute(&mut conn)
    .await
    .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .unwrap();
    let (base, _) = admin_url.rsplit_once('/').unwrap();
    format!("{base}/{name}")
}

async fn bench() {
    let rounds: usize = env_or("BENCH_ROUNDS", 3);
    let connections: usize = env_or("BENCH_CONNECTIONS", 32);
    let seconds: u64 = env_or("BENCH_SECONDS", 5);
    let mut rows = Vec::new();
    if std::env::var("BENCH_ONLY").as_deref() == Ok("postgres") {
        rows.extend(postgres_rows(rounds, connections, seconds).await);
        print_table(&rows);
        return;
    }
    if std::env::var("BENCH_ONLY").as_deref() == Ok("client") {
        rows.push(client_row(rounds, connections, seconds).await);
        print_table(&rows);
        return;
    }

    let service = start_service(&[]).await;
    let reference = start_reference().await;
    let (mut post, mut ref_post) = (Series::default(), Series::default());
    let (mut get, mut ref_get) = (Series::default(), Series::default());
    for round in 1..=rounds {
        eprintln!("round {round}/{rounds}: POST and GET, service then reference");
        let s = phase(service.addr, Kind::Post, None, Arc::default()).await;
        let r = phase(reference.addr, Kind::Post, None, Arc::default()).await;
        post.add(&s);
        ref_post.add(&r);
        let s_get = phase(service.addr, Kind::Get, None, Arc::new(s.locations.clone())).await;
        let r_get = phase(
            reference.addr,
            Kind::Get,
            None,
            Arc::new(r.locations.clone()),
        )
        .await;
        get.add(&s_get);
        ref_get.add(&r_get);
    }
    let (post_rate, ref_post_rate) = (post.rate(), ref_post.rate());
    let (get_rate, ref_get_rate) = (get.rate(), ref_get.rate());
    let post_errors = Some(post.errors + ref_post.errors);
    let get_errors = Some(get.errors + ref_get.errors);
    rows.push(Row {
        figure: "POST /orders throughput".into(),
        value: post_rate,
        unit: "r/s",
        reference: Some(("reference".into(), ref_post_rate)),
        target: Some((">= 0.70".into(), post_rate / ref_post_rate >= 0.70)),
        errors: post_errors,
    });
    rows.push(Row {
        figure: "POST /orders p50 (max rate)".into(),
        value: post.p50(),
        unit: "ms",
        reference: Some(("reference".into(), ref_post.p50())),
        target: None,
        errors: post_errors,
    });
    rows.push(Row {
        figure: "POST /orders p99 (max rate)".into(),
        value: post.p99(),
        unit: "ms",
        reference: Some(("reference".into(), ref_post.p99())),
        target: None,
        errors: post_errors,
    });
    rows.push(Row {
        figure: "GET /orders/{id} throughput".into(),
        value: get_rate,
        unit: "r/s",
        reference: Some(("reference".into(), ref_get_rate)),
        target: Some((">= 0.80".into(), get_rate / ref_get_rate >= 0.80)),
        errors: get_errors,
    });
    rows.push(Row {
        figure: "GET /orders/{id} p50 (max rate)".into(),
        value: get.p50(),
        unit: "ms",
        reference: Some(("reference".into(), ref_get.p50())),
        target: None,
        errors: get_errors,
    });
    rows.push(Row {
        figure: "GET /orders/{id} p99 (max rate)".into(),
        value: get.p99(),
        unit: "ms",
        reference: Some(("reference".into(), ref_get.p99())),
        target: None,
        errors: get_errors,
    });

    // Diagnostics: what the request log line costs (no lines at warn), and
    // what admission costs with the pipeline idle (PARKED_WORKERS).
    eprintln!("diagnostics: request lines off; pipeline idle");
    let quiet = start_service(&[("RUST_LOG", "warn")]).await;
    let quiet_post = phase(quiet.addr, Kind::Post, None, Arc::default()).await;
    let quiet_get = phase(
        quiet.addr,
        Kind::Get,
        None,
        Arc::new(quiet_post.locations.clone()),
    )
    .await;
    drop(quiet);
    let idle = start_service(&PARKED_WORKERS).await;
    let idle_post = phase(idle.addr, Kind::Post, None, Arc::default()).await;
    drop(idle);
    rows.push(Row {
        figure: "  diag: POST, request lines off (warn)".into(),
        value: quiet_post.rate(),
        unit: "r/s",
        reference: Some(("reference".into(), ref_post_rate)),
        target: None,
        errors: Some(quiet_post.errors),
    });
    rows.push(Row {
        figure: "  diag: GET, request lines off (warn)".into(),
        value: quiet_get.rate(),
        unit: "r/s",
        reference: Some(("reference".into(), ref_get_rate)),
        target: None,
        errors: Some(quiet_get.errors),
    });
    rows.push(Row {
        figure: "  diag: POST, pipeline idle".into(),
        value: idle_post.rate(),
        unit: "r/s",
        reference: Some(("reference".into(), ref_post_rate)),
        target: None,
        errors: Some(idle_post.errors),
    });

    // p99 at half of the maximum rate, open loop, from a drained queue: the
    // backlog the maximum-rate phases left would otherwise be measured too.
    eprintln!("p99 at half the maximum rate");
    wait_drained(service.addr).await;
    let half_post = phase(
        service.addr,
        Kind::Post,
        Some(post_rate / 2.0),
        Arc::default(),
    )
    .await;
    rows.push(Row {
        figure: format!("POST p99 at {:.0} r/s (half max)", post_rate / 2.0),
        value: half_post.percentile_ms(99.0),
        unit: "ms",
        reference: None,
        target: Some(("< 10 ms".into(), half_post.percentile_ms(99.0) < 10.0)),
        errors: Some(half_post.errors),
    });
    let half_get = phase(
        service.addr,
        Kind::Get,
        Some(get_rate / 2.0),
        Arc::new(half_post.locations.clone()),
    )
    .await;
    rows.push(Row {
        figure: format!("GET p99 at {:.0} r/s (half max)", get_rate / 2.0),
        value: half_get.percentile_ms(99.0),
        unit: "ms",
        reference: None,
        target: Some(("< 10 ms".into(), half_get.percentile_ms(99.0) < 10.0)),
        errors: Some(half_get.errors),
    });

    // The pipeline: POST to completed, against the admission rate.
    eprintln!("pipeline: POST to completed");
    wait_drained(service.addr).await;
    let before = finished(&admin_state(service.addr).await);
    let start = Instant::now();
    let burst = phase(service.addr, Kind::Post, None, Arc::default()).await;
    let target = before + burst.requests;
    while finished(&admin_state(service.addr).await) < target {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pipeline = burst.requests as f64 / start.elapsed().as_secs_f64();
    rows.push(Row {
        figure: "pipeline: orders/s POST to completed".into(),
        value: pipeline,
        unit: "o/s",
        reference: Some(("POST rate".into(), post_rate)),
        target: None,
        errors: Some(burst.errors),
    });
    // The console's cost: POST at the maximum rate with five pages'
    // event streams connected and read, against the same service without,
    // alternating, from a drained queue each time.
    eprintln!("console: POST with five event streams connected");
    let (mut bare_post, mut watched_post) = (Series::default(), Series::default());
    for round in 1..=rounds {
        eprintln!("  round {round}/{rounds}");
        wait_drained(service.addr).await;
        bare_post.add(&phase(service.addr, Kind::Post, None, Arc::default()).await);
        wait_drained(service.addr).await;
        let streams = console_streams(service.addr, 5).await;
        watched_post.add(&phase(service.addr, Kind::Post, None, Arc::default()).await);
        let received: usize = streams.stop().await;
        assert!(received > 0, "the event streams received nothing");
    }
    rows.push(Row {
        figure: "POST /orders, 5 console streams".into(),
        value: watched_post.rate(),
        unit: "r/s",
        reference: Some(("no streams".into(), bare_post.rate())),
        target: Some((
            ">= 0.95".into(),
            watched_post.rate() / bare_post.rate() >= 0.95,
        )),
        errors: Some(watched_post.errors + bare_post.errors),
    });

    let peak_mib = service.rss_kib("VmHWM") as f64 / 1024.0;
    rows.push(Row {
        figure: "peak RSS during the run".into(),
        value: peak_mib,
        unit: "MiB",
        reference: Some((
            "reference".into(),
            reference.rss_kib("VmHWM") as f64 / 1024.0,
        )),
        target: None,
        errors: None,
    });
    drop(reference);
    drop(service);

    // The wrapper's cost per call.
    let (wrapped, bare) = tokio::task::spawn_blocking(wrapper_cost_ns).await.unwrap();
    rows.push(Row {
        figure: "retry + breaker around a no-op call".into(),
        value: wrapped,
        unit: "ns",
        reference: Some(("bare call".into(), bare)),
        target: Some(("adds < 1 us".into(), wrapped - bare < 1000.0)),
        errors: None,
    });

    rows.push(client_row(rounds, connections, seconds).await);

    // Memory per order: a fresh service, many orders, all processed.
    let orders: u64 = env_or("BENCH_MEMORY_ORDERS", 1_000_000);
    if orders > 0 {
        eprintln!("memory: {orders} orders into a fresh in-memory service");
        let service = start_service(&[("RUST_LOG", "warn")]).await;
        let base = service.rss_kib("VmRSS");
        let mut sent = 0;
        let mut memory_errors = 0;
        while sent < orders {
            let remaining = orders - sent;
            let outcome = client::run(Phase {
                addr: service.addr,
                kind: Kind::Post,
                connections,
                duration: Duration::from_secs(2),
                rate: None,
                targets: Arc::default(),
            })
            .await;
            sent += outcome.requests;
            memory_errors += outcome.errors;
            eprintln!("  {sent} orders ({remaining} were left)");
        }
        wait_drained(service.addr).await;
        let after = service.rss_kib("VmRSS");
        let per_order = (after.saturating_sub(base) as f64 * 1024.0) / sent as f64;
        rows.push(Row {
            figure: format!("memory per order ({sent} orders, store + ledger)"),
            value: per_order,
            unit: "B",
            reference: Some(("1 KiB".into(), 1024.0)),
            target: Some(("< 1 KiB".into(), per_order < 1024.0)),
            errors: Some(memory_errors),
        });
    }

    rows.extend(postgres_rows(rounds, connections, seconds).await);

    print_table(&rows);
    let machine = json!({
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|c| c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())),
        "connections": connections,
        "seconds_per_phase": seconds,
        "rounds": rounds,
    });
    let results = json!({
        "machine": machine,
        "rows": rows.iter().map(|r| json!({
            "figure": r.figure,
            "value": r.value,
            "unit": r.unit,
            "reference": r.reference.as_ref().map(|(n, v)| json!({"name": n, "value": v})),
            "ratio": r.ratio(),
            "target": r.target.as_ref().map(|(t, met)| json!({"target": t, "met": met})),
            "errors": r.errors,
        })).collect::<Vec<_>>(),
    });
    let dir = repo_root().join("bench");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("latest.json");
    std::fs::write(&path, serde_json::to_string_pretty(&results).unwrap()).unwrap();
    println!("wrote {}", path.display());
}

/// POST to completed, from a drained pipeline: a burst at the maximum rate,
/// then until every order of it finished. Orders per second.
async fn pipeline_rate(addr: SocketAddr) -> (f64, u64) {
    wait_drained(addr).await;
    let before = finished(&admin_state(addr).await);
    let start = Instant::now();
    let burst = phase(addr, Kind::Post, None, Arc::default()).await;
    let target = before + burst.requests;
    while finished(&admin_state(addr).await) < target {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (
        burst.requests as f64 / start.elapsed().as_secs_f64(),
        burst.errors,
    )
}

/// With Postgres: `POST /orders` (group commit, and each insert alone with
/// `DATABASE_BATCH_MAX=1`) against pgbench's single-row INSERT at the same
/// concurrency, alternating, medians of the rounds; the latency at 100
/// requests per second with and without batching; p99 at half the maximum
/// rate; the pipeline from POST to completed.
async fn postgres_rows(rounds: usize, connections: usize, seconds: u64) -> Vec<Row> {
    let mut rows = Vec::new();
    let Ok(admin_url) = std::env::var("BENCH_DATABASE_URL") else {
        eprintln!("BENCH_DATABASE_URL unset: the Postgres figures are skipped");
        return rows;
    };
    let pgbench = std::env::var("PGBENCH").unwrap_or_else(|_| "pgbench".into());
    let url = fresh_database(&admin_url, "reliability_lab_bench").await;
    let batched = start_service(&[("DATABASE_URL", url.as_str())]).await;
    let single =
        start_service(&[("DATABASE_URL", url.as_str()), ("DATABASE_BATCH_MAX", "1")]).await;
    let (mut grouped, mut alone, mut ceiling) = (Series::default(), Series::default(), Vec::new());
    for round in 1..=rounds {
        eprintln!("Postgres round {round}/{rounds}: POST batched, POST alone, pgbench INSERT");
        wait_drained(batched.addr).await;
        grouped.add(&phase(batched.addr, Kind::Post, None, Arc::default()).await);
        wait_drained(single.addr).await;
        alone.add(&phase(single.addr, Kind::Post, None, Arc::default()).await);
        wait_drained(single.addr).await;
        match postgres_ceiling(&pgbench, &url, connections, seconds) {
            Some(tps) => ceiling.push(tps),
            None => {
                eprintln!("pgbench did not run: the Postgres figures are skipped");
                return rows;
            }
        }
    }
    let ceiling = median(ceiling);
    let pg_rate = grouped.rate();
    rows.push(Row {
        figure: "POST /orders with Postgres".into(),
        value: pg_rate,
        unit: "r/s",
        reference: Some(("pgbench INSERT tps".into(), ceiling)),
        target: Some((">= 1.0".into(), pg_rate / ceiling >= 1.0)),
        errors: Some(grouped.errors),
    });
    rows.push(Row {
        figure: "  diag: the same, DATABASE_BATCH_MAX=1".into(),
        value: alone.rate(),
        unit: "r/s",
        reference: Some(("pgbench INSERT tps".into(), ceiling)),
        target: None,
        errors: Some(alone.errors),
    });

    // Low load must not pay for batching: open loop at 100 r/s, alternating.
    eprintln!("Postgres: POST at 100 r/s, batched and alone");
    let (mut low_grouped, mut low_alone) = (Series::default(), Series::default());
    for _ in 0..rounds {
        wait_drained(batched.addr).await;
        low_grouped.add(&phase(batched.addr, Kind::Post, Some(100.0), Arc::default()).await);
        wait_drained(single.addr).await;
        low_alone.add(&phase(single.addr, Kind::Post, Some(100.0), Arc::default()).await);
    }
    let (p50, p50_alone) = (low_grouped.p50(), low_alone.p50());
    rows.push(Row {
        figure: "POST with Postgres p50 at 100 r/s".into(),
        value: p50,
        unit: "ms",
        reference: Some(("DATABASE_BATCH_MAX=1".into(), p50_alone)),
        target: Some(("<= 1.10".into(), p50 <= 1.10 * p50_alone)),
        errors: Some(low_grouped.errors + low_alone.errors),
    });
    rows.push(Row {
        figure: "POST with Postgres p99 at 100 r/s".into(),
        value: low_grouped.p99(),
        unit: "ms",
        reference: Some(("DATABASE_BATCH_MAX=1".into(), low_alone.p99())),
        target: None,
        errors: Some(low_grouped.errors + low_alone.errors),
    });
    drop(single);

    eprintln!("Postgres: p99 at half the maximum rate");
    wait_drained(batched.addr).await;
    let half = phase(
        batched.addr,
        Kind::Post,
        Some(pg_rate / 2.0),
        Arc::default(),
    )
    .await;
    // Postgres's own p99 at that rate: pgbench's INSERT, open loop, at the
    // same concurrency, once the service's workers have caught up (it has
    // no pipeline writing behind it).
    wait_drained(batched.addr).await;
    let pg_p99 = postgres_p99_at(&pgbench, &url, connections, seconds, pg_rate / 2.0);
    rows.push(Row {
        figure: format!("POST with Postgres p99 at {:.0} r/s (half)", pg_rate / 2.0),
        value: half.percentile_ms(99.0),
        unit: "ms",
        reference: pg_p99.map(|p99| ("pgbench INSERT, same rate".into(), p99)),
        target: Some(("< 10 ms".into(), half.percentile_ms(99.0) < 10.0)),
        errors: Some(half.errors),
    });

    drop(batched);
    // The same rate with the workers parked: what admission alone costs.
    eprintln!("Postgres: p99 at half the maximum rate, workers idle");
    let idle =
        start_service(&[[("DATABASE_URL", url.as_str())].as_slice(), &PARKED_WORKERS].concat())
            .await;
    let half_idle = phase(idle.addr, Kind::Post, Some(pg_rate / 2.0), Arc::default()).await;
    drop(idle);
    rows.push(Row {
        figure: "  diag: the same, workers idle".into(),
        value: half_idle.percentile_ms(99.0),
        unit: "ms",
        reference: None,
        target: None,
        errors: Some(half_idle.errors),
    });

    // Five workers each move one order at a time through three round trips
    // (claim, charge, final move): with Postgres that bounds the pipeline
    // by latency, not by the database. With 64, their moves batch.
    let url_pipeline = fresh_database(&admin_url, "reliability_lab_bench_pipeline").await;
    let pipelined = start_service(&[
        ("DATABASE_URL", url_pipeline.as_str()),
        ("WORKER_COUNT", "64"),
    ])
    .await;
    eprintln!("Postgres: p99 at half the maximum rate, 64 workers");
    let half_64 = phase(
        pipelined.addr,
        Kind::Post,
        Some(pg_rate / 2.0),
        Arc::default(),
    )
    .await;
    rows.push(Row {
        figure: "  diag: the same, 64 workers".into(),
        value: half_64.percentile_ms(99.0),
        unit: "ms",
        reference: None,
        target: None,
        errors: Some(half_64.errors),
    });
    eprintln!("Postgres: the pipeline, POST to completed, 64 workers");
    let (pipeline, errors) = pipeline_rate(pipelined.addr).await;
    rows.push(Row {
        figure: "pipeline with Postgres (64 workers)".into(),
        value: pipeline,
        unit: "o/s",
        reference: Some(("Postgres POST rate".into(), pg_rate)),
        target: Some((">= 0.5".into(), pipeline / pg_rate >= 0.5)),
        errors: Some(errors),
    });
    rows
}

/// The payment client against the provider at zero latency, alternating
/// with a minimal hyper client, `rounds` times each; medians.
async fn client_row(rounds: usize, connections: usize, seconds: u64) -> Row {
    let binary = repo_root().join("target/release/reliability-lab");
    let addr = free_addr();
    let child = Command::new(binary)
        .arg("provider")
        .env_clear()
        .env("LISTEN_ADDR", addr.to_string())
        .env("PAYMENT_LATENCY_MIN", "0ms")
        .env("PAYMENT_LATENCY_MAX", "0ms")
        .env("PAYMENT_FAILURE_RATE", "0")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the provider");
    let provider = Server { child, addr };
    wait_healthy(provider.addr).await;
    let (mut ours, mut bare, mut errors) = (Vec::new(), Vec::new(), 0);
    for round in 1..=rounds {
        eprintln!("payment client: round {round}/{rounds}, the service's client then bare hyper");
        let a = charges::through_the_client(provider.addr, connections, seconds).await;
        let b = charges::with_bare_hyper(provider.addr, connections, seconds).await;
        ours.push(a.rate);
        bare.push(b.rate);
        errors += a.errors + b.errors;
    }
    let (ours, bare) = (median(ours), median(bare));
    Row {
        figure: "charges/s through the payment client".into(),
        value: ours,
        unit: "c/s",
        reference: Some(("bare hyper client".into(), bare)),
        target: Some((">= 0.80".into(), ours / bare >= 0.80)),
        errors: Some(errors),
    }
}

/// `--probe ADDR post|get [RATE]`: one phase against a service already
/// running (BENCH_SECONDS, BENCH_CONNECTIONS apply); prints its figures.
/// Closed loop without a rate, open loop at RATE requests a second with one.
fn probe(args: &[String]) {
    // `cargo bench` adds its own `--bench`.
    let args: Vec<&String> = args.iter().filter(|a| *a != "--bench").collect();
    let usage = "usage: load --probe ADDR post|get [RATE]";
    let addr: SocketAddr = args.first().and_then(|a| a.parse().ok()).expect(usage);
    let kind = match args.get(1).map(|a| a.as_str()) {
        Some("post") => Kind::Post,
        Some("get") => Kind::Get,
        _ => panic!("{usage}"),
    };
    let rate = args.get(2).map(|r| r.parse::<f64>().expect(usage));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let outcome = runtime.block_on(async {
        let targets = if kind == Kind::Get {
            let posted = phase(addr, Kind::Post, Some(200.0), Arc::default()).await;
            Arc::new(posted.locations)
        } else {
            Arc::default()
        };
        phase(addr, kind, rate, targets).await
    });
    println!(
        "{} requests, {} errors, {:.1} r/s; p50 {:.2} ms, p90 {:.2}, p99 {:.2}, p99.9 {:.2}, max {:.2}",
        outcome.requests,
        outcome.errors,
        outcome.rate(),
        outcome.percentile_ms(50.0),
        outcome.percentile_ms(90.0),
        outcome.percentile_ms(99.0),
        outcome.percentile_ms(99.9),
        outcome.percentile_ms(100.0),
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--serve-reference") {
        reference::serve(&args[i + 1]);
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "--probe") {
        probe(&args[i + 1..]);
        return;
    }
    if !args.iter().any(|a| a == "--bench") {
        // Not started by `cargo bench`: nothing to do here.
        eprintln!("the load benchmark runs with `make bench`");
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(bench());
}
