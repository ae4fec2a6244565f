//! The built binary, as a user runs it: configuration errors, graceful
//! shutdown on SIGTERM, and Postgres persistence and readiness. These run on
//! the real clock, briefly.

use std::time::Duration;

use reliability_lab::orders::Status;
use sqlx::Row;

use crate::helpers::{spawn_binary, PgCluster, TestDb};

async fn run_to_exit(env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_reliability-lab"))
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .await
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn a_bad_setting_exits_non_zero_with_one_line_naming_it() {
    for (var, value) in [
        ("LISTEN_ADDR", "nonsense"),
        ("SHUTDOWN_TIMEOUT", "soon"),
        ("PAYMENT_FAILURE_RATE", "2"),
        ("WORKER_COUNT", "0"),
        ("WORKER_COUNT", "100000000"),
        ("QUEUE_CAPACITY", "2305843009213693952"),
        ("MEMORY_MAX_ORDERS", "18446744073709551615"),
        ("BREAKER_HALF_OPEN_PROBES", "0"),
        ("BREAKER_HALF_OPEN_PROBES", "101"),
        ("PAYMENT_CAPACITY", "0"),
        ("BREAKER_POLICY", "sometimes"),
        ("BREAKER_FAILURE_RATE", "0"),
        ("BREAKER_SLOW_CALL_DURATION", "100ms"),
        ("PAYMENT_QUEUE_TIMEOUT", "0s"),
    ] {
        let (code, stdout, stderr) = run_to_exit(&[(var, value)]).await;
        assert_eq!(code, Some(2), "{var}={value}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(var), "{stderr}");
        assert!(stdout.is_empty(), "nothing started: {stdout}");
    }
}

#[tokio::test]
async fn an_unreachable_database_at_startup_is_retried_then_named_and_exits_non_zero() {
    let (code, stdout, _) = run_to_exit(&[
        ("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none"),
        ("DATABASE_STARTUP_TIMEOUT", "1s"),
    ])
    .await;
    assert_eq!(code, Some(1));
    assert!(stdout.contains("database not reachable yet"), "{stdout}");
    assert!(
        stdout.to_lowercase().contains("connection refused"),
        "{stdout}"
    );
    assert!(stdout.contains("database unreachable after 1s"), "{stdout}");
}

#[tokio::test]
async fn sigterm_under_load_finishes_every_accepted_order_before_exit() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let service = spawn_binary(&[
        ("DATABASE_URL", &db.url),
        ("PAYMENT_LATENCY_MIN", "20ms"),
        ("PAYMENT_LATENCY_MAX", "80ms"),
        ("RETRY_INITIAL_INTERVAL", "20ms"),
        ("RETRY_MAX_INTERVAL", "100ms"),
        ("BREAKER_OPEN_DURATION", "1s"),
    ])
    .await;
    let client = reqwest::Client::new();
    let mut accepted = 0;
    for _ in 0..40 {
        service.post_order(&client).await;
        accepted += 1;
    }
    let logs = service.logs.clone();
    let status = service.terminate().await;
    assert!(
        status.success(),
        "exit {status:?}: {:?}",
        logs.lock().unwrap()
    );

    let rows = sqlx::query("SELECT status, COUNT(*) AS n FROM orders GROUP BY status")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    let mut terminal = 0;
    for row in rows {
        let status: String = row.get("status");
        let n: i64 = row.get("n");
        let status: Status = status.parse().unwrap();
        assert!(status.is_terminal(), "{n} orders left {status}");
        terminal += n;
    }
    assert_eq!(terminal, accepted);
    db.destroy().await;
}

#[tokio::test]
async fn sigterm_with_charges_longer_than_the_shutdown_timeout_cancels_them_and_exits_zero() {
    let service = spawn_binary(&[
        ("PAYMENT_FAILURE_RATE", "0"),
        ("PAYMENT_LATENCY_MIN", "60s"),
        ("PAYMENT_LATENCY_MAX", "60s"),
        ("PAYMENT_TIMEOUT", "120s"),
        ("SHUTDOWN_TIMEOUT", "1s"),
    ])
    .await;
    let client = reqwest::Client::new();
    for _ in 0..3 {
        service.post_order(&client).await;
    }
    let logs = service.logs.clone();
    let status = service.terminate().await;
    let logs = logs.lock().unwrap().join("\n");
    assert!(status.success(), "exit {status:?}: {logs}");
    assert!(
        logs.contains("SHUTDOWN_TIMEOUT reached; cancelling workers"),
        "{logs}"
    );
    assert!(
        logs.contains("order interrupted by shutdown; back to pending"),
        "{logs}"
    );
    assert!(!logs.contains("workers did not stop"), "{logs}");
}

#[tokio::test]
async fn orders_outlive_a_restart_and_readyz_follows_postgres_down_and_up() {
    let Some(cluster) = PgCluster::start() else {
        return;
    };
    let url = cluster.url();
    let env = [
        ("DATABASE_URL", url.as_str()),
        ("PAYMENT_LATENCY_MAX", "100ms"),
    ];
    let client = reqwest::Client::new();

    let first = spawn_binary(&env).await;
    let created = first.post_order(&client).await;
    let id = created["id"].as_str().unwrap().to_owned();
    assert!(first.terminate().await.success());

    let second = spawn_binary(&env).await;
    let fetched = client
        .get(second.url(&format!("/orders/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(fetched.status(), 200, "the order survived the restart");
    let ready = client.get(second.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(body["store"], "postgres");

    cluster.down();
    let down = client.get(second.url("/readyz")).send().await.unwrap();
    assert_eq!(down.status(), 503);
    let body: serde_json::Value = down.json().await.unwrap();
    // A fixed reason: the driver's text (addresses, errno) stays in the log.
    assert_eq!(body["reason"], "store unreachable", "{body}");
    assert_eq!(body.as_object().unwrap().len(), 4, "{body}");
    // Requests fail fast with a JSON 503 instead of hanging.
    let started = std::time::Instant::now();
    let get = client
        .get(second.url(&format!("/orders/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(get.status(), 503);
    assert!(started.elapsed() < Duration::from_secs(10));

    cluster.up();
    let mut recovered = false;
    for _ in 0..100 {
        if client
            .get(second.url("/readyz"))
            .send()
            .await
            .unwrap()
            .status()
            == 200
        {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recovered, "readyz came back without a restart");
    assert!(second.terminate().await.success());
}

#[tokio::test]
async fn the_healthcheck_subcommand_exits_zero_on_a_ready_service_and_one_otherwise() {
    let service = spawn_binary(&[]).await;
    let check = |args: Vec<String>, listen: Option<String>| async move {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_reliability-lab"));
        cmd.env_clear().arg("healthcheck").args(args);
        if let Some(listen) = listen {
            cmd.env("LISTEN_ADDR", listen);
        }
        let out = cmd.output().await.unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let port = service.addr.port();
    // As the compose file runs it: no URL, the port from LISTEN_ADDR.
    let (code, stderr) = check(vec![], Some(format!("0.0.0.0:{port}"))).await;
    assert_eq!(code, Some(0), "{stderr}");
    let (code, stderr) = check(vec![format!("http://{}/readyz", service.addr)], None).await;
    assert_eq!(code, Some(0), "{stderr}");
    // A path that answers 404 is not healthy, and says what it got.
    let (code, stderr) = check(vec![format!("http://{}/nowhere", service.addr)], None).await;
    assert_eq!(code, Some(1));
    assert!(stderr.contains("answered 404 Not Found"), "{stderr}");
    // Nothing listening.
    let closed = crate::helpers::free_port_below_32768();
    let (code, stderr) = check(vec![format!("http://127.0.0.1:{closed}/readyz")], None).await;
    assert_eq!(code, Some(1));
    assert!(
        stderr.to_lowercase().contains("connection refused"),
        "{stderr}"
    );
}

/// The two lines the service writes by hand (the request line and "order
/// completed") read as the formatter's would: one JSON object per line, the
/// order's id in the job span.
#[tokio::test]
async fn the_hand_written_lines_are_json_with_the_order_in_the_job_span() {
    let service = spawn_binary(&[
        ("PAYMENT_FAILURE_RATE", "0"),
        ("PAYMENT_LATENCY_MIN", "0ms"),
        ("PAYMENT_LATENCY_MAX", "0ms"),
    ])
    .await;
    let client = reqwest::Client::new();
    let order = service.post_order(&client).await;
    let id = order["id"].as_str().unwrap().to_owned();
    let path = format!("/orders/{id}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while service.get_json(&client, &path).await["status"] != "completed" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "order {id} never completed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let logs = service.logs.clone();
    assert!(service.terminate().await.success());
    let lines: Vec<serde_json::Value> = logs
        .lock()
        .unwrap()
        .iter()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    let completed: Vec<_> = lines
        .iter()
        .filter(|v| v["message"] == "order completed")
        .collect();
    assert_eq!(completed.len(), 1, "{lines:?}");
    let line = completed[0];
    assert_eq!(line["span"]["order_id"], id.as_str());
    assert_eq!(line["span"]["name"], "job");
    assert_eq!(line["attempts"], 1);
    assert_eq!(line["level"], "INFO");
    assert_eq!(line["target"], "reliability_lab::workers::job");
    let created = lines
        .iter()
        .find(|v| v["message"] == "request" && v["method"] == "POST")
        .unwrap_or_else(|| panic!("no request line for the POST: {lines:?}"));
    assert_eq!(created["route"], "/orders");
    assert_eq!(created["status"], 201);
}
