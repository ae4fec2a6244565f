//! A partition: replica A is cut off from Postgres (a relay the test
//! controls drops its connections and holds new ones silent) for longer than
//! `JOB_LEASE`, while it still runs and still reaches the payment provider
//! (its ledger, `PAYMENT_LEDGER_URL`, is on another path). Replica B, on the
//! same database, takes A's orders over once their leases run out.
//!
//! What makes that safe is the key alone: every charge of an order carries
//! the key `order-<id>`, the provider makes one charge per key whichever
//! replica asks (and answers a charged key with its charge), and an order's
//! status moves only under its lease. So A may go on charging the orders it
//! had in hand while cut off, and B charges them again: the provider replays
//! the first charge, and A's late outcome is refused once B holds the lease.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row};

use reliability_lab::experiment::relay::{upstream_of, Relay};

use crate::helpers::{post_from_clients, spawn_binary, TestDb};

const LEASE: Duration = Duration::from_secs(2);

fn env<'a>(database_url: &'a str, ledger_url: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("DATABASE_URL", database_url),
        ("PAYMENT_LEDGER_URL", ledger_url),
        ("PAYMENT_LATENCY_MIN", "200ms"),
        ("PAYMENT_LATENCY_MAX", "400ms"),
        ("PAYMENT_FAILURE_RATE", "0.2"),
        // No ambiguous answers: a charge whose last attempt's answer is lost
        // ends failed with money taken, whatever the replicas do (the lab's
        // lesson of its own); here every failed order must have no charge.
        ("BREAKER_FAILURE_THRESHOLD", "1000"),
        ("RETRY_INITIAL_INTERVAL", "20ms"),
        ("RETRY_MAX_INTERVAL", "100ms"),
        ("JOB_LEASE", "2s"),
        ("RECOVERY_INTERVAL", "300ms"),
        ("WORKER_COUNT", "20"),
        ("QUEUE_CAPACITY", "1000"),
    ]
}

/// `payment_calls_total` of a replica (its provider's calls).
async fn calls(replica: &crate::helpers::Running) -> u64 {
    let text = reqwest::get(replica.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("payment_calls_total "))
        .expect("rendered")
        .parse()
        .unwrap()
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_replica_cut_off_from_postgres_loses_its_orders_to_another_and_none_is_charged_twice() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let relay = Relay::start(upstream_of(&db.url).await.unwrap())
        .await
        .unwrap();
    let a_url = relay.url_for(&db.url).unwrap();
    let a = spawn_binary(&env(&a_url, &db.url)).await;
    let b = spawn_binary(&env(&db.url, &db.url)).await;
    let a_owner: String = {
        // A's lease owner id: the one on the orders A accepted.
        let client = reqwest::Client::new();
        let order = a.post_order(&client).await;
        sqlx::query_scalar("SELECT lease_owner FROM orders WHERE id = $1::uuid")
            .bind(order["id"].as_str().unwrap())
            .fetch_one(&db.pool)
            .await
            .unwrap()
    };

    // 200 orders to A, four clients at a time, then the cut at once: most
    // are still queued or in hand.
    let to_a = a.url("/orders");
    post_from_clients(&[to_a.clone(), to_a.clone(), to_a.clone(), to_a], 50).await;
    let cut_at: DateTime<Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    relay.cut();
    let open_at_cut = count(
        &db.pool,
        "SELECT count(*) FROM orders WHERE status IN ('pending', 'processing')",
    )
    .await;
    // Cut off for three leases: B takes over what A held. A still reaches
    // the provider, but starts no charge once its leases may have run out.
    tokio::time::sleep(LEASE).await;
    let a_calls_at_lease = calls(&a).await;
    tokio::time::sleep(LEASE * 2).await;
    let a_calls_at_heal = calls(&a).await;
    assert_eq!(
        a_calls_at_heal, a_calls_at_lease,
        "A called the provider after its leases could have run out"
    );
    relay.heal();

    let started = Instant::now();
    while count(
        &db.pool,
        "SELECT count(*) FROM orders WHERE status IN ('pending', 'processing')",
    )
    .await
        > 0
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "orders still open 30 s after the heal"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM orders WHERE status IN ('completed', 'failed')"
        )
        .await,
        201,
        "every order finished"
    );
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM (SELECT order_id FROM payment_ledger GROUP BY order_id HAVING count(*) > 1) t").await,
        0,
        "no order charged twice"
    );
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM orders o WHERE status = 'completed' AND NOT EXISTS (SELECT 1 FROM payment_ledger l WHERE l.order_id = o.id)").await,
        0,
        "every completed order charged"
    );
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM orders o WHERE status = 'failed' AND EXISTS (SELECT 1 FROM payment_ledger l WHERE l.order_id = o.id)").await,
        0,
        "no failed order charged"
    );

    // Who finished what, and when B took over.
    let rows = sqlx::query(
        "SELECT order_id, owner, started_at, ended_at, outcome FROM order_lease_history ORDER BY order_id, started_at",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    type Span = (String, DateTime<Utc>, Option<DateTime<Utc>>, Option<String>);
    let mut by_order: HashMap<uuid::Uuid, Vec<Span>> = HashMap::new();
    for row in rows {
        by_order.entry(row.get("order_id")).or_default().push((
            row.get("owner"),
            row.get("started_at"),
            row.get("ended_at"),
            row.get("outcome"),
        ));
    }
    // Every order was accepted by A; B's first lease on one is when it took
    // it over (a queued order has no lease row of A's: its first row is its
    // first claim).
    let mut taken_over = Vec::new();
    let mut in_hand = 0;
    for (order, leases) in &by_order {
        for pair in leases.windows(2) {
            let (owner, _, ended, _) = &pair[0];
            let (_, next_start, _, _) = &pair[1];
            let ended = ended.unwrap_or_else(|| panic!("{order}: lease of {owner} never closed"));
            assert!(ended <= *next_start, "{order}: two replicas at once");
        }
        if let Some((_, started, _, _)) = leases.iter().find(|(owner, ..)| *owner != a_owner) {
            taken_over.push((*started - cut_at).to_std().unwrap_or_default());
            if leases[0].0 == a_owner {
                in_hand += 1;
            }
        }
        // The lease that finished the order is the last one, and no replica
        // finished an order whose lease it had lost.
        let (_, _, ended, outcome) = leases.last().unwrap();
        assert!(ended.is_some(), "{order}: its last lease is closed");
        assert!(
            matches!(outcome.as_deref(), Some("completed" | "failed")),
            "{order}: ended {outcome:?}"
        );
    }
    taken_over.sort();
    assert!(
        !taken_over.is_empty(),
        "B took nothing over: the cut came too late to test a takeover ({open_at_cut} open at the cut)"
    );
    let first = taken_over[0];
    let last = *taken_over.last().unwrap();
    assert!(
        first >= LEASE - Duration::from_millis(700),
        "taken over {first:?} after the cut: before the lease could run out"
    );
    // Orders charged by A and finished by B: the provider replayed A's charge.
    let replayed = count(
        &db.pool,
        &format!(
            "SELECT count(*) FROM payment_ledger l JOIN orders o ON o.id = l.order_id
              WHERE l.created_at > '{cut_at}'::timestamptz - interval '1 second'
                AND EXISTS (SELECT 1 FROM order_lease_history h
                             WHERE h.order_id = o.id AND h.owner <> '{a_owner}')
                AND EXISTS (SELECT 1 FROM order_lease_history h
                             WHERE h.order_id = o.id AND h.owner = '{a_owner}' AND h.outcome = 'lease expired')"
        ),
    )
    .await;
    let logs = a.logs.lock().unwrap().clone();
    let refused = logs
        .iter()
        .filter(|l| l.contains("the order goes to the recovery loop"))
        .count();
    eprintln!(
        "partition: {open_at_cut} orders open at the cut; B took over {} of them ({in_hand} in A's \
         workers' hands, the rest queued at A) and first claimed them {first:?} to {last:?} after the \
         cut (JOB_LEASE {LEASE:?}); A made {a_calls_at_lease} provider calls in all, none after \
         its leases could have run out; {replayed} charged while A held them and finished by B (the \
         provider answered B with the first charge); A's outcomes refused or let go after the \
         heal: {refused}",
        taken_over.len()
    );
    assert!(a.terminate().await.success());
    assert!(b.terminate().await.success());
    drop(relay);
    db.destroy().await;
}
