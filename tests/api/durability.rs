//! Leases, recovery and keyed admission against a real Postgres, in process.
//! Expiry is simulated by moving a lease's deadline into the past, so nothing
//! here waits for a lease to run out.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use chrono::Utc;
use reliability_lab::orders::postgres::PostgresStore;
use reliability_lab::orders::{
    Order, OrderId, OrderRepository, Status, StatusChange, UpdateOutcome,
};
use reliability_lab::payment::{ChargeRequest, Ledger, PostgresLedger};
use sqlx::Row;

use crate::helpers::{error_code, send, Lab, LabOptions, TestDb};

fn order() -> Order {
    crate::helpers::new_order()
}

async fn expire(db: &TestDb, id: OrderId) {
    sqlx::query("UPDATE orders SET lease_expires_at = now() - interval '1 second' WHERE id = $1")
        .bind(id.as_uuid())
        .execute(&db.pool)
        .await
        .unwrap();
}

fn start() -> StatusChange {
    StatusChange::new(Status::Pending, Status::Processing)
}

#[tokio::test]
async fn another_replica_cannot_take_a_live_lease_but_takes_an_expired_one() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let a: PostgresStore = db.replica(Duration::from_secs(30));
    let b: PostgresStore = db.replica(Duration::from_secs(30));
    let o = order();
    a.insert(&o).await.unwrap();

    assert_eq!(
        b.update_status(o.id, &start()).await.unwrap(),
        UpdateOutcome::LeaseHeldElsewhere
    );
    assert_eq!(b.count_expired().await.unwrap(), 0);
    assert!(b.take_over_expired(10).await.unwrap().is_empty());

    // A moves it to processing, then dies: its lease runs out.
    assert!(matches!(
        a.update_status(o.id, &start()).await.unwrap(),
        UpdateOutcome::Updated(_)
    ));
    expire(&db, o.id).await;
    assert_eq!(b.count_expired().await.unwrap(), 1);
    assert_eq!(b.take_over_expired(10).await.unwrap(), vec![o.id]);
    let taken = b.get(o.id).await.unwrap().unwrap();
    assert_eq!(
        taken.status,
        Status::Pending,
        "taken over orders go back to pending"
    );
    assert!(matches!(
        b.update_status(o.id, &start()).await.unwrap(),
        UpdateOutcome::Updated(_)
    ));

    // A, back from the dead, can no longer finish it.
    let finish = StatusChange::new(Status::Processing, Status::Completed);
    assert_eq!(
        a.update_status(o.id, &finish).await.unwrap(),
        UpdateOutcome::LeaseHeldElsewhere
    );
    assert!(matches!(
        b.update_status(o.id, &finish).await.unwrap(),
        UpdateOutcome::Updated(_)
    ));

    // The history shows two leases, one after the other.
    let rows = sqlx::query(
        "SELECT owner, started_at, ended_at, outcome FROM order_lease_history
          WHERE order_id = $1 ORDER BY started_at",
    )
    .bind(o.id.as_uuid())
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 2);
    let first_end: chrono::DateTime<Utc> = rows[0].get("ended_at");
    let second_start: chrono::DateTime<Utc> = rows[1].get("started_at");
    assert!(first_end <= second_start);
    assert_eq!(rows[0].get::<String, _>("outcome"), "lease expired");
    assert_eq!(rows[1].get::<String, _>("outcome"), "completed");
    db.destroy().await;
}

#[tokio::test]
async fn renewing_keeps_leases_and_releasing_frees_them_at_once() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let a = db.replica(Duration::from_secs(30));
    let b = db.replica(Duration::from_secs(30));
    let orders: Vec<Order> = (0..4).map(|_| order()).collect();
    for o in &orders {
        a.insert(o).await.unwrap();
    }
    let theirs = order();
    b.insert(&theirs).await.unwrap();
    expire(&db, orders[0].id).await;
    // The fourth is not named: a's heartbeat holds it no more.
    expire(&db, orders[3].id).await;
    let named: Vec<OrderId> = orders[..3]
        .iter()
        .map(|o| o.id)
        .chain([theirs.id])
        .collect();
    let mut renewed = a.renew_leases(&named).await.unwrap();
    renewed.sort();
    let mut mine: Vec<OrderId> = orders[..3].iter().map(|o| o.id).collect();
    mine.sort();
    assert_eq!(
        renewed, mine,
        "renewal covers the named orders a holds, expired-but-unclaimed too, and not b's"
    );
    assert!(a.renew_leases(&[]).await.unwrap().is_empty());
    assert_eq!(
        b.count_expired().await.unwrap(),
        1,
        "the order a did not name ran out"
    );
    assert_eq!(b.take_over_expired(10).await.unwrap(), vec![orders[3].id]);
    assert_eq!(a.release_leases().await.unwrap(), 3);
    let mut taken = b.take_over_expired(2).await.unwrap();
    assert_eq!(taken.len(), 2, "no more than asked for");
    taken.extend(b.take_over_expired(10).await.unwrap());
    taken.sort();
    let mut ids: Vec<OrderId> = orders[..3].iter().map(|o| o.id).collect();
    ids.sort();
    assert_eq!(taken, ids);
    db.destroy().await;
}

#[tokio::test]
async fn a_hand_back_at_shutdown_is_free_to_take_at_once() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let a = db.replica(Duration::from_secs(30));
    let b = db.replica(Duration::from_secs(30));
    let o = order();
    a.insert(&o).await.unwrap();
    a.update_status(o.id, &start()).await.unwrap();
    let back = StatusChange::new(Status::Processing, Status::Pending);
    assert!(matches!(
        a.update_status(o.id, &back).await.unwrap(),
        UpdateOutcome::Updated(_)
    ));
    assert_eq!(b.take_over_expired(10).await.unwrap(), vec![o.id]);
    db.destroy().await;
}

#[tokio::test]
async fn the_shared_ledger_charges_a_key_once_whichever_replica_asks() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let a = PostgresLedger::new(db.pool.clone());
    let b = PostgresLedger::new(db.pool.clone());
    let o = order();
    let request = |attempt| ChargeRequest::for_order(o.id, attempt, 1999, "USD");
    let key = ChargeRequest::key_for(o.id);
    let (first, second) = (request(1), request(2));
    let (ra, rb) = tokio::join!(a.record(&first, Some(&key)), b.record(&second, Some(&key)));
    let made = [ra.unwrap(), rb.unwrap()]
        .iter()
        .filter(|r| r.new_charge)
        .count();
    assert_eq!(made, 1);
    assert_eq!(a.charges(o.id).await.unwrap().len(), 1);
    // Without a key every call charges.
    b.record(&request(3), None).await.unwrap();
    let again = b.record(&request(4), None).await.unwrap();
    assert!(again.new_charge);
    assert_eq!(again.earlier_charges, 2);
    db.destroy().await;
}

async fn keyed_post(lab: &Lab, key: &str, body: &str) -> (StatusCode, serde_json::Value) {
    let request = axum::http::Request::post("/orders")
        .header("content-type", "application/json")
        .header("idempotency-key", key)
        .body(axum::body::Body::from(body.to_owned()))
        .unwrap();
    let (status, _, body) = send(&lab.router, request).await;
    (status, body)
}

async fn idempotency_key_behaviour(repo: Option<Arc<dyn OrderRepository>>) {
    let lab = Lab::new(LabOptions {
        repo,
        start_workers: false,
        ..LabOptions::default()
    })
    .await;
    let body = r#"{"customer_id":"cust-42","amount":1999,"currency":"USD"}"#;
    let (status, first) = keyed_post(&lab, "checkout-123", body).await;
    assert_eq!(status, StatusCode::CREATED);

    // A replay (even spelled differently) returns the original order.
    let same = r#"{"currency":"usd","amount":1999,"customer_id":"cust-42"}"#;
    let (status, replay) = keyed_post(&lab, "checkout-123", same).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(replay["id"], first["id"]);

    // The same key with another body is refused.
    let other = r#"{"customer_id":"cust-42","amount":2999,"currency":"USD"}"#;
    let (status, refused) = keyed_post(&lab, "checkout-123", other).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(error_code(&refused), "idempotency_key_reused");

    // Two at once with a new key: one order.
    let (a, b) = tokio::join!(
        keyed_post(&lab, "checkout-456", body),
        keyed_post(&lab, "checkout-456", body)
    );
    let mut statuses = [a.0, b.0];
    statuses.sort();
    assert_eq!(statuses, [StatusCode::OK, StatusCode::CREATED]);
    assert_eq!(a.1["id"], b.1["id"]);

    // A bad key is a 400.
    let (status, bad) = keyed_post(&lab, "", body).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_code(&bad), "invalid_idempotency_key");

    let counts = lab.service.count_by_status().await.unwrap();
    assert_eq!(counts.values().sum::<u64>(), 2, "one order per key");
    assert_eq!(
        lab.dispatcher.depth(),
        2,
        "one job per order, none for replays"
    );
}

#[tokio::test]
async fn idempotency_key_replays_conflicts_and_races_in_memory() {
    idempotency_key_behaviour(None).await;
}

#[tokio::test]
async fn idempotency_key_replays_conflicts_and_races_in_postgres() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    idempotency_key_behaviour(Some(db.store())).await;
    db.destroy().await;
}
