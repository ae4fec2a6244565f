//! The shared harness: an in-process lab built from the library's parts the
//! way main.rs builds the service, HTTP helpers, and throwaway Postgres
//! databases.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use reliability_lab::http::{self, AdminToken, AppParts, AppState, LabHandles};
use reliability_lab::observability::profiling::Profiler;
use reliability_lab::observability::Metrics;
use reliability_lab::orders::memory::MemoryStore;
use reliability_lab::orders::postgres::{Lease, PostgresStore, MIGRATOR};
use reliability_lab::orders::{
    Order, OrderId, OrderRepository, ProcessingQueue, QueueError, QueueSlot, Service,
};
use reliability_lab::payment::{MemoryLedger, PaymentSettings, Simulator};
use reliability_lab::reliability::{Breaker, BreakerConfig, Reliability, RetryPolicy};
use reliability_lab::workers::{Dispatcher, Job, OrderProcessor, Reservation, ReserveError};
use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};
use tower::ServiceExt;

// --- the in-process lab --------------------------------------------------------

struct Queue(Arc<Dispatcher>);
struct Slot(Reservation);

impl QueueSlot for Slot {
    fn submit(self: Box<Self>, order_id: OrderId) {
        self.0.send(Job { order_id });
    }
}

impl ProcessingQueue for Queue {
    fn try_reserve(&self) -> Result<Box<dyn QueueSlot>, QueueError> {
        match self.0.try_reserve() {
            Ok(r) => Ok(Box::new(Slot(r))),
            Err(ReserveError::Full) => Err(QueueError::Full),
            Err(ReserveError::Closed) => Err(QueueError::Closed),
        }
    }
}

pub struct LabOptions {
    pub workers: usize,
    pub capacity: usize,
    pub payment: PaymentSettings,
    pub seed: u64,
    pub retry: RetryPolicy,
    pub breaker: BreakerConfig,
    pub repo: Option<Arc<dyn OrderRepository>>,
    pub start_workers: bool,
    pub payment_timeout: Duration,
    pub admin_token: Option<&'static str>,
    pub seeded_ids: bool,
}

impl Default for LabOptions {
    /// Payments that always succeed at once; retry without jitter, so waits
    /// are exact on the paused clock.
    fn default() -> Self {
        Self {
            workers: 1,
            capacity: 100,
            payment: PaymentSettings {
                failure_rate: 0.0,
                latency_min: Duration::ZERO,
                latency_max: Duration::ZERO,
                ..PaymentSettings::default()
            },
            seed: 42,
            retry: RetryPolicy {
                randomization_factor: 0.0,
                ..RetryPolicy::default()
            },
            breaker: BreakerConfig::default(),
            repo: None,
            start_workers: true,
            payment_timeout: Duration::from_secs(1),
            admin_token: None,
            seeded_ids: false,
        }
    }
}

pub struct Lab {
    pub router: Router,
    pub service: Service,
    pub dispatcher: Arc<Dispatcher>,
    pub payment: Arc<Simulator>,
    pub breaker: Breaker,
    pub reliability: Reliability,
    pub metrics: Arc<Metrics>,
    processor: Arc<OrderProcessor>,
    workers: usize,
}

impl Lab {
    pub fn new(options: LabOptions) -> Self {
        let metrics = Arc::new(Metrics::new());
        let repo = options.repo.unwrap_or_else(|| Arc::new(MemoryStore::new()));
        let dispatcher = Arc::new(Dispatcher::new(options.capacity, metrics.clone()));
        let mut service = Service::new(repo, Arc::new(Queue(dispatcher.clone())));
        if options.seeded_ids {
            service = service.with_seeded_ids(options.seed);
        }
        let breaker = Breaker::new(options.breaker, Some(metrics.clone()));
        let reliability = Reliability::new(options.retry, breaker.clone(), metrics.clone());
        let payment = Arc::new(Simulator::new(
            options.payment,
            Some(options.seed),
            Arc::new(MemoryLedger::default()),
            metrics.provider(),
        ));
        let processor = Arc::new(OrderProcessor::new(
            service.clone(),
            payment.clone(),
            reliability.clone(),
            metrics.clone(),
            options.payment_timeout,
        ));
        if options.start_workers {
            dispatcher.start(options.workers, processor.clone());
        }
        let router = http::router(AppState::new(AppParts {
            service: service.clone(),
            metrics: metrics.clone(),
            profiler: Profiler::new(),
            lab: LabHandles {
                payment: payment.clone(),
                reliability: reliability.clone(),
                queue: dispatcher.clone(),
                workers: options.workers,
                started: tokio::time::Instant::now(),
            },
            admin_token: options.admin_token.map(AdminToken::new),
        }));
        Self {
            router,
            service,
            dispatcher,
            payment,
            breaker,
            reliability,
            metrics,
            processor,
            workers: options.workers,
        }
    }

    /// Starts the workers of a lab built with `start_workers: false`.
    pub fn start_workers(&self) {
        self.dispatcher.start(self.workers, self.processor.clone());
    }

    pub async fn post_order(&self) -> Order {
        let (status, _, body) = send(
            &self.router,
            post_json(
                "/orders",
                r#"{"customer_id":"cust-42","amount":1999,"currency":"USD"}"#,
            ),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let id: OrderId = body["id"].as_str().unwrap().parse().unwrap();
        self.service.get_order(id).await.unwrap()
    }

    /// Waits (on whatever clock the test runs) until the order is terminal.
    pub async fn settle(&self, id: OrderId) -> Order {
        for _ in 0..100_000 {
            let order = self.service.get_order(id).await.unwrap();
            if order.status.is_terminal() {
                return order;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("order {id} never settled");
    }
}

/// A valid pending order, not yet stored.
pub fn new_order() -> Order {
    use reliability_lab::orders::{Amount, Currency, CustomerId, NewOrder};
    Order::new(
        OrderId::new_random(),
        NewOrder {
            customer_id: CustomerId::parse("cust-42").unwrap(),
            amount: Amount::parse(1999).unwrap(),
            currency: Currency::parse("usd").unwrap(),
        },
        chrono::Utc::now(),
    )
}

// --- HTTP ----------------------------------------------------------------------

pub fn post_json(uri: &str, body: &str) -> Request<Body> {
    Request::post(uri)
        .header("content-type", "application/json")
        .body(Body::from(body.to_owned()))
        .unwrap()
}

pub fn get(uri: &str) -> Request<Body> {
    Request::get(uri).body(Body::empty()).unwrap()
}

/// Sends one request through the router, without a socket.
pub async fn send(router: &Router, request: Request<Body>) -> (StatusCode, HeaderMap, Value) {
    let response = router.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
    };
    (status, headers, body)
}

/// Asserts the JSON error shape and returns its code.
pub fn error_code(body: &Value) -> &str {
    let err = &body["error"];
    assert!(
        err["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    err["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no error code in {body}"))
}

// --- Postgres ------------------------------------------------------------------

/// The admin URL of the test server, or None (with a loud note) when there is
/// none. With CI=true a missing server is a failure, not a skip.
pub fn postgres_url() -> Option<String> {
    match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
            assert!(
                !ci,
                "CI=true but DATABASE_URL is unset: the Postgres tests cannot run (use `make test`)"
            );
            eprintln!(
                "\n!!! SKIPPING a Postgres test: DATABASE_URL is unset. Run `make test` to get a throwaway server.\n"
            );
            None
        }
    }
}

/// Replaces the database name in a Postgres URL.
pub fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let (prefix, _) = base.rsplit_once('/').expect("URL has a path");
    let mut out = format!("{prefix}/{name}");
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// A fresh database for one test, migrated.
pub struct TestDb {
    pub url: String,
    pub pool: PgPool,
    admin_url: String,
    name: String,
}

impl TestDb {
    pub async fn create() -> Option<Self> {
        let admin_url = postgres_url()?;
        let name = format!("rlab_test_{}", uuid::Uuid::new_v4().simple());
        let mut admin = sqlx::PgConnection::connect(&admin_url)
            .await
            .expect("connect to the test server");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .expect("create a test database");
        admin.close().await.ok();
        let url = with_database(&admin_url, &name);
        let options: PgConnectOptions = url.parse().unwrap();
        let pool = PgPoolOptions::new()
            .max_connections(5)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options.disable_statement_logging())
            .await
            .expect("connect to the test database");
        MIGRATOR.run(&pool).await.expect("migrations apply");
        Some(Self {
            url,
            pool,
            admin_url,
            name,
        })
    }

    /// A store acting as one replica with a fresh id.
    pub fn store(&self) -> Arc<dyn OrderRepository> {
        Arc::new(self.replica(Duration::from_secs(30)))
    }

    pub fn replica(&self, lease: Duration) -> PostgresStore {
        PostgresStore::from_pool(self.pool.clone(), Lease::for_new_replica(lease))
    }

    /// Drops the database (a failed test leaves it for inspection).
    pub async fn destroy(self) {
        self.pool.close().await;
        if let Ok(mut admin) = sqlx::PgConnection::connect(&self.admin_url).await {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            )))
            .execute(&mut admin)
            .await;
        }
    }
}

// --- a throwaway PostgreSQL cluster of a test's own ------------------------------

/// The PostgreSQL server binaries, if this machine has them.
pub fn pg_bin() -> Option<std::path::PathBuf> {
    if let Ok(dir) = std::env::var("PG_BIN") {
        let dir = std::path::PathBuf::from(dir);
        if dir.join("initdb").exists() {
            return Some(dir);
        }
    }
    let mut found: Vec<_> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists())
        .collect();
    found.sort();
    found.pop()
}

/// A PostgreSQL server that a test can stop and start (to watch the service
/// lose and regain its database). Runs as the postgres user when the test
/// runs as root, on a port below 32768 (see scripts/test.sh for why).
pub struct PgCluster {
    bin: std::path::PathBuf,
    dir: std::path::PathBuf,
    pub port: u16,
    as_postgres: bool,
}

impl PgCluster {
    /// None (with a loud note; a failure with CI=true) when no server binaries exist.
    pub fn start() -> Option<Self> {
        let Some(bin) = pg_bin() else {
            let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
            assert!(!ci, "CI=true but no PostgreSQL server binaries were found");
            eprintln!("\n!!! SKIPPING a Postgres test: no PostgreSQL server binaries found.\n");
            return None;
        };
        let dir = std::env::temp_dir().join(format!("rlab-pg-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let as_postgres = unsafe_is_root();
        if as_postgres {
            run(std::process::Command::new("chown")
                .arg("postgres:")
                .arg(&dir));
        }
        let port = free_port_below_32768();
        let cluster = Self {
            bin,
            dir,
            port,
            as_postgres,
        };
        cluster.pg(&[
            "initdb",
            "-D",
            "data",
            "-U",
            "postgres",
            "-A",
            "trust",
            "--no-sync",
        ]);
        cluster.up();
        Some(cluster)
    }

    fn pg(&self, args: &[&str]) {
        let program = self.bin.join(args[0]);
        let mut cmd = if self.as_postgres {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            std::process::Command::new(program)
        };
        cmd.args(&args[1..]).current_dir(&self.dir);
        run(&mut cmd);
    }

    pub fn up(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.display()
        );
        self.pg(&[
            "pg_ctl",
            "-D",
            "data",
            "-l",
            "server.log",
            "-w",
            "-o",
            &opts,
            "start",
        ]);
    }

    pub fn down(&self) {
        self.pg(&["pg_ctl", "-D", "data", "-m", "fast", "-w", "stop"]);
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let program = self.bin.join("pg_ctl");
        let mut cmd = if self.as_postgres {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            std::process::Command::new(program)
        };
        let _ = cmd
            .args(["-D", "data", "-m", "immediate", "-w", "stop"])
            .current_dir(&self.dir)
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn run(cmd: &mut std::process::Command) {
    let out = cmd.output().expect("command runs");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn unsafe_is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A loopback port below the kernel's ephemeral range that nothing listens on.
pub fn free_port_below_32768() -> u16 {
    for _ in 0..200 {
        let port = 20_000 + (uuid::Uuid::new_v4().as_u128() % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port found");
}

// --- the binary ------------------------------------------------------------------

/// The service binary running as a child process, with its log lines.
pub struct Running {
    pub child: tokio::process::Child,
    pub addr: std::net::SocketAddr,
    pub logs: Arc<std::sync::Mutex<Vec<String>>>,
}

/// Starts the binary with a clean environment plus `env`, listening on a
/// free loopback port, and waits until it says it listens.
pub async fn spawn_binary(env: &[(&str, &str)]) -> Running {
    use tokio::io::AsyncBufReadExt;
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_reliability-lab"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("LISTEN_ADDR", "127.0.0.1:0")
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("the binary starts");
    let logs = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (addr_tx, mut addr_rx) = tokio::sync::mpsc::unbounded_channel();
    let stdout = tokio::io::BufReader::new(child.stdout.take().unwrap());
    let sink = logs.clone();
    tokio::spawn(async move {
        let mut lines = stdout.lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                if v["message"] == "reliability-lab listening" {
                    let _ = addr_tx.send(v["addr"].as_str().unwrap_or("").to_owned());
                }
            }
            sink.lock().unwrap().push(line);
        }
    });
    let stderr = tokio::io::BufReader::new(child.stderr.take().unwrap());
    let sink = logs.clone();
    tokio::spawn(async move {
        let mut lines = stderr.lines();
        while let Ok(Some(line)) = lines.next_line().await {
            sink.lock().unwrap().push(line);
        }
    });
    let addr = tokio::time::timeout(Duration::from_secs(30), addr_rx.recv())
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("the binary never listened: {:?}", logs.lock().unwrap()));
    Running {
        child,
        addr: addr.parse().unwrap(),
        logs,
    }
}

/// A valid `POST /orders` body.
pub const ORDER_BODY: &str = r#"{"customer_id":"cust-42","amount":1999,"currency":"USD"}"#;

impl Running {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Creates an order over HTTP, asserting 201, and returns its JSON.
    pub async fn post_order(&self, client: &reqwest::Client) -> Value {
        let response = client
            .post(self.url("/orders"))
            .header("content-type", "application/json")
            .body(ORDER_BODY)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        response.json().await.unwrap()
    }

    /// SIGKILL: the process dies at whatever instruction it was on.
    pub async fn kill_hard(mut self) {
        self.child.kill().await.expect("SIGKILL delivered");
    }

    /// Sends SIGTERM and waits for the exit status.
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("still running");
        run(std::process::Command::new("kill").args(["-TERM", &pid.to_string()]));
        tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .expect("exits after SIGTERM")
            .unwrap()
    }
}
