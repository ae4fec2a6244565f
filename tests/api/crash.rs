//! Crashes and replicas, with the real binary on a real Postgres: SIGKILL
//! mid-flight, a restart, two replicas on one database with one killed.
//! Leases and recovery run on short durations so the tests take seconds.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row};

use crate::helpers::{post_from_clients, spawn_binary, Running, TestDb, ORDER_BODY};

/// One lease from the history: owner, start, end.
type LeaseSpan = (String, DateTime<Utc>, Option<DateTime<Utc>>);

fn env<'a>(db: &'a TestDb, latency_min: &'a str, latency_max: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("DATABASE_URL", db.url.as_str()),
        ("PAYMENT_LATENCY_MIN", latency_min),
        ("PAYMENT_LATENCY_MAX", latency_max),
        // A fifth of the charges are made but their answer is lost: the retry
        // then finds the charge under the order's key. A ledger that ignored
        // its key would charge those orders twice, and the checks below see it.
        ("PAYMENT_AMBIGUOUS_RATE", "0.2"),
        // Declines and a breaker that opens would end orders at once; these
        // tests need orders in hand when a replica dies.
        ("PAYMENT_FAILURE_RATE", "0"),
        ("BREAKER_FAILURE_THRESHOLD", "1000"),
        ("RETRY_INITIAL_INTERVAL", "20ms"),
        ("RETRY_MAX_INTERVAL", "100ms"),
        ("BREAKER_OPEN_DURATION", "500ms"),
        ("JOB_LEASE", "2s"),
        ("RECOVERY_INTERVAL", "300ms"),
        ("WORKER_COUNT", "20"),
        ("QUEUE_CAPACITY", "1000"),
    ]
}

async fn post_orders(service: &Running, n: usize) -> Vec<String> {
    let client = reqwest::Client::new();
    let mut ids = Vec::new();
    for _ in 0..n {
        let body = service.post_order(&client).await;
        ids.push(body["id"].as_str().unwrap().to_owned());
    }
    ids
}

async fn open_orders(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM orders WHERE status IN ('pending', 'processing')")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Waits until no order is open, or fails after `limit`.
async fn wait_until_settled(pool: &PgPool, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        if open_orders(pool).await == 0 {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "{} orders still open after {limit:?}",
            open_orders(pool).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn assert_no_order_charged_twice(pool: &PgPool) {
    let twice: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT order_id FROM payment_ledger GROUP BY order_id HAVING count(*) > 1) t",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(twice, 0, "orders charged more than once");
}

/// A failed order took no money: a replica that took an order over after its
/// first charge gets that charge's answer back, not a decline.
async fn assert_no_failed_order_charged(pool: &PgPool) {
    let charged: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM orders o WHERE status = 'failed'
            AND EXISTS (SELECT 1 FROM payment_ledger l WHERE l.order_id = o.id)",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(charged, 0, "failed orders with a charge");
}

async fn assert_terminal(pool: &PgPool, expected: usize) {
    let terminal: i64 =
        sqlx::query_scalar("SELECT count(*) FROM orders WHERE status IN ('completed', 'failed')")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(terminal as usize, expected);
}

#[tokio::test]
async fn after_a_sigkill_a_restart_finishes_every_accepted_order_charging_each_at_most_once() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let env = env(&db, "100ms", "300ms");

    let first = spawn_binary(&env).await;
    let ids = post_orders(&first, 100).await;
    first.kill_hard().await;
    assert!(
        open_orders(&db.pool).await > 0,
        "orders were in flight at the kill"
    );

    let second = spawn_binary(&env).await;
    // Bound: JOB_LEASE + RECOVERY_INTERVAL + the processing time.
    let took = wait_until_settled(&db.pool, Duration::from_secs(30)).await;
    assert_terminal(&db.pool, ids.len()).await;
    assert_no_order_charged_twice(&db.pool).await;
    assert_no_failed_order_charged(&db.pool).await;
    let recovered: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT order_id) FROM order_lease_history WHERE outcome = 'lease expired'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    eprintln!("settled {took:?} after the restart; {recovered} orders were mid-charge at the kill");
    assert!(
        recovered > 0,
        "no order was mid-charge at the kill: the test did not test recovery"
    );
    assert!(second.terminate().await.success());
    db.destroy().await;
}

#[tokio::test]
async fn two_replicas_one_killed_every_order_finishes_once_and_never_in_both_at_once() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    // Slow enough charges that the killed replica still holds work, some of
    // it mid-charge, when it dies.
    let env = env(&db, "200ms", "400ms");
    let a = spawn_binary(&env).await;
    let b = spawn_binary(&env).await;

    // 500 orders spread across both, four clients at a time.
    let (to_a, to_b) = (a.url("/orders"), b.url("/orders"));
    post_from_clients(&[to_a.clone(), to_b.clone(), to_a, to_b], 125).await;
    a.kill_hard().await;
    let killed_at: DateTime<Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&db.pool)
        .await
        .unwrap();

    wait_until_settled(&db.pool, Duration::from_secs(30)).await;
    assert_terminal(&db.pool, 500).await;
    assert_no_order_charged_twice(&db.pool).await;
    assert_no_failed_order_charged(&db.pool).await;

    // No order was processing in two replicas at once: per order, each lease
    // ends before the next begins.
    let rows = sqlx::query(
        "SELECT order_id, owner, started_at, ended_at FROM order_lease_history ORDER BY order_id, started_at",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let mut by_order: HashMap<uuid::Uuid, Vec<LeaseSpan>> = HashMap::new();
    for row in rows {
        by_order.entry(row.get("order_id")).or_default().push((
            row.get("owner"),
            row.get("started_at"),
            row.get("ended_at"),
        ));
    }
    let mut handed_over = 0;
    for (order, leases) in &by_order {
        for pair in leases.windows(2) {
            let (ref owner, _, ended) = pair[0];
            let (ref next_owner, next_start, _) = pair[1];
            let ended = ended.unwrap_or_else(|| panic!("{order}: lease of {owner} never closed"));
            assert!(
                ended <= next_start,
                "{order}: {owner} until {ended}, {next_owner} from {next_start}"
            );
            if owner != next_owner {
                handed_over += 1;
                assert!(
                    next_start >= killed_at,
                    "{order}: taken over before the kill"
                );
            }
        }
        assert!(
            leases.last().unwrap().2.is_some(),
            "{order}: last lease open"
        );
    }
    eprintln!("{handed_over} orders moved from the killed replica to the survivor mid-charge");
    assert!(
        handed_over > 0,
        "no order was taken over mid-charge: the test did not test a takeover"
    );
    assert!(b.terminate().await.success());
    db.destroy().await;
}

/// What the clients of the database-crash run saw.
#[derive(Default)]
struct Answers {
    accepted: Vec<String>,
    unavailable: usize,
    /// The longest a 503 took while the database was gone.
    slowest_503: Duration,
}

/// Posts orders until `stop` fires, accepting only a 201 (kept) or a 503.
async fn post_until(url: String, stop: tokio_util::sync::CancellationToken) -> Answers {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let mut answers = Answers::default();
    while !stop.is_cancelled() {
        let started = Instant::now();
        let response = client
            .post(&url)
            .header("content-type", "application/json")
            .body(ORDER_BODY)
            .send()
            .await
            .expect("an answer, not a dropped connection or a hang");
        match response.status().as_u16() {
            201 => {
                let body: serde_json::Value = response.json().await.unwrap();
                answers
                    .accepted
                    .push(body["id"].as_str().unwrap().to_owned());
            }
            503 => {
                answers.unavailable += 1;
                answers.slowest_503 = answers.slowest_503.max(started.elapsed());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => panic!("answered {other}: {}", response.text().await.unwrap()),
        }
    }
    answers
}

/// Postgres itself crashes (`pg_ctl stop -m immediate`) under traffic and
/// comes back 5 s later on the same port. Every order answered 201 must
/// finish, none charged twice, every completed one charged. An outcome
/// written while the database was gone is written again until it lands; an
/// order whose claim or outcome was lost is let go, and its lease (no longer
/// renewed) hands it to the recovery loop. `scripts/crash-runs.sh` repeats
/// this run.
#[tokio::test]
async fn a_database_crash_under_traffic_leaves_no_order_unfinished_and_none_charged_twice() {
    let Some(cluster) = crate::helpers::PgCluster::start() else {
        return;
    };
    let url = cluster.url();
    let env = [
        ("DATABASE_URL", url.as_str()),
        ("PAYMENT_FAILURE_RATE", "0.2"),
        ("PAYMENT_LATENCY_MIN", "20ms"),
        ("PAYMENT_LATENCY_MAX", "80ms"),
        ("JOB_LEASE", "3s"),
        ("RECOVERY_INTERVAL", "500ms"),
    ];
    let service = spawn_binary(&env).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let clients: Vec<_> = (0..4)
        .map(|_| tokio::spawn(post_until(service.url("/orders"), stop.clone())))
        .collect();
    tokio::time::sleep(Duration::from_secs(4)).await;
    cluster.crash();
    tokio::time::sleep(Duration::from_secs(5)).await;
    cluster.up();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.cancel();
    let mut accepted = Vec::new();
    let (mut unavailable, mut slowest_503) = (0, Duration::ZERO);
    for client in clients {
        let answers = client.await.unwrap();
        accepted.extend(answers.accepted);
        unavailable += answers.unavailable;
        slowest_503 = slowest_503.max(answers.slowest_503);
    }

    let pool = PgPool::connect(&url).await.unwrap();
    // Bound: the worst case is an order let go just before the clients
    // stopped: JOB_LEASE, a recovery pass, and its charge.
    let took = wait_until_settled(&pool, Duration::from_secs(30)).await;
    let ids: Vec<uuid::Uuid> = accepted.iter().map(|id| id.parse().unwrap()).collect();
    let stored: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM orders WHERE id = ANY($1) AND status IN ('completed', 'failed')",
    )
    .bind(&ids)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        stored as usize,
        ids.len(),
        "every order answered 201 is stored and finished"
    );
    assert_no_order_charged_twice(&pool).await;
    // Not asserted here: no failed order charged. The ledger lives in the
    // same database, and a charge that committed as it crashed (its answer
    // lost), then retries that met the database gone, end the order failed
    // with that charge: an ambiguous answer on the last attempt, the
    // double-charge lesson's other half (ARCHITECTURE.md, "Partitions").
    let failed_charged: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM orders o WHERE status = 'failed'
            AND EXISTS (SELECT 1 FROM payment_ledger l WHERE l.order_id = o.id)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let uncharged: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM orders o WHERE status = 'completed'
            AND NOT EXISTS (SELECT 1 FROM payment_ledger l WHERE l.order_id = o.id)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(uncharged, 0, "completed orders without a charge");
    let logs = service.logs.lock().unwrap().clone();
    let count = |needle: &str| logs.iter().filter(|l| l.contains(needle)).count();
    eprintln!(
        "database crash: {} orders accepted, {unavailable} answered 503 (slowest {slowest_503:?}), \
         settled {took:?} after the clients stopped; outcomes written again {}, let go to recovery {}, \
         claims lost {}; failed with a charge (last answer lost) {failed_charged}",
        ids.len(),
        count("writing it again"),
        count("the order goes to the recovery loop"),
        count("could not claim the order"),
    );
    assert!(unavailable > 0, "the crash was never seen by a client");
    assert!(
        slowest_503 < Duration::from_secs(5),
        "a 503 took {slowest_503:?}"
    );
    assert!(service.terminate().await.success());
}
