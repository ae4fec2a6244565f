//! Group commit of new orders on a real Postgres: what each request of a
//! batch gets is what it would get alone.
//!
//! The tests run on tokio's current-thread runtime and send a batch's
//! requests with `join_all`: its first poll starts every request before the
//! writer task can run. A new order that finds no other being written goes
//! alone at once, so each test first holds one "lead" order mid-write (its
//! Idempotency-Key is taken by an open transaction); the requests after it
//! find it running and the writer finds them all waiting, one batch. (A lead
//! that is not held can finish inside that first poll on a busy machine,
//! Postgres answering between the write and the read, and the next request
//! then goes alone too.) The store's histogram says how they were grouped.

use std::time::Duration;

use chrono::Utc;
use futures_util::future::join_all;
use reliability_lab::observability::metrics::StoreMetrics;
use reliability_lab::orders::postgres::PostgresStore;
use reliability_lab::orders::{
    Amount, Currency, CustomerId, KeyedInsert, NewOrder, Order, OrderId, OrderRepository, Status,
    StatusChange, StoreError, UpdateOutcome,
};

use crate::helpers::TestDb;

fn order(customer: &str, amount: i64) -> Order {
    Order::new(
        OrderId::new_random(),
        NewOrder {
            customer_id: CustomerId::parse(customer).unwrap(),
            amount: Amount::parse(amount).unwrap(),
            currency: Currency::parse("USD").unwrap(),
        },
        Utc::now(),
    )
}

fn grouped(db: &TestDb) -> (PostgresStore, StoreMetrics) {
    let metrics = StoreMetrics::unregistered();
    let store = db
        .replica(Duration::from_secs(30))
        .with_group_commit(256, metrics.clone());
    (store, metrics)
}

/// A new order written alone and held mid-write until `release`: an open
/// transaction holds its Idempotency-Key, so its key INSERT waits.
struct HeldLead {
    blocker: sqlx::Transaction<'static, sqlx::Postgres>,
    write: tokio::task::JoinHandle<Result<KeyedInsert, StoreError>>,
}

impl HeldLead {
    async fn start(db: &TestDb, store: &PostgresStore) -> Self {
        let mut blocker = db.pool.begin().await.unwrap();
        let holder = order("cust-0", 1);
        sqlx::query(
            "INSERT INTO orders (id, customer_id, amount, currency, status, attempts,
                                 created_at, updated_at)
             VALUES ($1, 'cust-0', 1, 'USD', 'pending', 0, now(), now())",
        )
        .bind(holder.id.as_uuid())
        .execute(&mut *blocker)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO idempotency_keys (key, request_digest, order_id)
             VALUES ('lead-key', 'digest-h', $1)",
        )
        .bind(holder.id.as_uuid())
        .execute(&mut *blocker)
        .await
        .unwrap();
        let write = tokio::spawn({
            let store = store.clone();
            async move {
                store
                    .insert_with_key(&order("cust-0", 50), "lead-key", "digest-l")
                    .await
            }
        });
        loop {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE datname = current_database() AND wait_event_type = 'Lock'
                    AND query LIKE 'INSERT INTO idempotency_keys%'",
            )
            .fetch_one(&db.pool)
            .await
            .unwrap();
            if waiting == 1 {
                return Self { blocker, write };
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Lets the lead finish: with the blocker rolled back its key is free.
    async fn release(self) {
        self.blocker.rollback().await.unwrap();
        assert_eq!(
            self.write.await.unwrap(),
            Ok(KeyedInsert::Created),
            "the lead"
        );
    }
}

async fn stored(db: &TestDb) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_batch_with_a_bad_row_stores_every_other_row_and_fails_only_that_one() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    // A row the database refuses though the service would accept it.
    sqlx::query("ALTER TABLE orders ADD CONSTRAINT no_bad_rows CHECK (customer_id <> 'bad-row')")
        .execute(&db.pool)
        .await
        .unwrap();
    let (store, metrics) = grouped(&db);
    let lead = HeldLead::start(&db, &store).await;
    let orders: Vec<Order> = (0..20)
        .map(|i| order(if i == 7 { "bad-row" } else { "cust-1" }, 100 + i))
        .collect();
    let results = join_all(orders.iter().map(|o| store.insert(o))).await;
    lead.release().await;

    for (i, r) in results.iter().enumerate() {
        if i == 7 {
            let err = r.as_ref().unwrap_err();
            assert!(
                matches!(err, StoreError::Other(m) if m.contains("no_bad_rows")),
                "{err:?}"
            );
        } else {
            assert_eq!(r, &Ok(true), "row {i}");
        }
    }
    assert_eq!(stored(&db).await, 19 + 1, "and the lead");
    for (i, o) in orders.iter().enumerate() {
        let found = store.get(o.id).await.unwrap();
        assert_eq!(found.is_some(), i != 7, "row {i}");
    }
    assert_eq!(
        metrics.batches(),
        (2, 21),
        "the lead alone, then one statement of 20 rows was tried"
    );
    assert_eq!(metrics.fallbacks(), 1);
    db.destroy().await;
}

#[tokio::test]
async fn a_key_repeated_in_one_batch_stores_one_order_and_the_others_get_it_back_or_a_conflict() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let (store, metrics) = grouped(&db);
    // A key stored before the batch, alone.
    let earlier = order("cust-9", 900);
    assert_eq!(
        store.insert_with_key(&earlier, "old-key", "digest-z").await,
        Ok(KeyedInsert::Created)
    );

    // With a lead held mid-write, the four batch.
    let lead = HeldLead::start(&db, &store).await;
    let first = order("cust-1", 100);
    let same = order("cust-1", 100);
    let other_body = order("cust-2", 200);
    let replay_of_earlier = order("cust-9", 900);
    let unkeyed = order("cust-3", 300);
    let results = join_all([
        store.insert_with_key(&first, "new-key", "digest-a"),
        store.insert_with_key(&same, "new-key", "digest-a"),
        store.insert_with_key(&other_body, "new-key", "digest-b"),
        store.insert_with_key(&replay_of_earlier, "old-key", "digest-z"),
    ])
    .await;
    lead.release().await;
    let plain = store.insert(&unkeyed).await;

    assert_eq!(results[0], Ok(KeyedInsert::Created));
    let existing = |r: &Result<KeyedInsert, StoreError>| match r {
        Ok(KeyedInsert::Existing {
            order,
            same_request,
        }) => (order.id, *same_request),
        other => panic!("expected the stored order back, got {other:?}"),
    };
    assert_eq!(existing(&results[1]), (first.id, true), "a replay");
    assert_eq!(existing(&results[2]), (first.id, false), "a conflict (422)");
    assert_eq!(
        existing(&results[3]),
        (earlier.id, true),
        "a replay of the earlier key"
    );
    assert_eq!(plain, Ok(true));
    // Stored: the earlier order, the lead, the first of the batch, the
    // unkeyed one.
    assert_eq!(stored(&db).await, 4);
    assert!(store.get(same.id).await.unwrap().is_none());
    assert!(store.get(other_body.id).await.unwrap().is_none());
    assert!(store.get(replay_of_earlier.id).await.unwrap().is_none());
    let keys: i64 = sqlx::query_scalar("SELECT count(*) FROM idempotency_keys")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(keys, 3);
    // The lone writes went alone; the four went as one statement.
    assert_eq!(metrics.batches(), (4, 7));
    assert_eq!(metrics.fallbacks(), 0);
    db.destroy().await;
}

#[tokio::test]
async fn a_batch_cut_off_by_postgres_fails_every_request_in_it_and_stores_nothing() {
    cut_off(true).await;
}

/// A batch without keys is one statement outside a transaction: cut off,
/// it too stores nothing.
#[tokio::test]
async fn a_batch_without_keys_cut_off_by_postgres_fails_every_request_and_stores_nothing() {
    cut_off(false).await;
}

/// A batch of ten (half with keys when `keyed`) whose statement is ended
/// by the server while it waits on a lock.
async fn cut_off(keyed: bool) {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let (store, metrics) = grouped(&db);
    // Hold the first request's INSERT (alone) and the batch's INSERT at the
    // table lock, then end their connections as a server going away would.
    let mut blocker = db.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE orders IN SHARE MODE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    let orders: Vec<Order> = (0..10).map(|i| order("cust-1", 100 + i)).collect();
    let batch = tokio::spawn({
        let store = store.clone();
        let orders = orders.clone();
        async move {
            let writes = orders.iter().enumerate().map(|(i, o)| {
                let store = store.clone();
                async move {
                    if i % 2 == 0 || !keyed {
                        store.insert(o).await.map(|_| ())
                    } else {
                        let key = format!("key-{i}");
                        store.insert_with_key(o, &key, "digest").await.map(|_| ())
                    }
                }
            });
            join_all(writes).await
        }
    });
    let waiting: Vec<i32> = loop {
        let pids: Vec<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity
              WHERE datname = current_database() AND wait_event_type = 'Lock'
                AND query LIKE 'INSERT INTO orders%'",
        )
        .fetch_all(&db.pool)
        .await
        .unwrap();
        if pids.len() == 2 {
            break pids;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for pid in waiting {
        let _: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
            .bind(pid)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    }
    let results = batch.await.unwrap();
    blocker.rollback().await.unwrap();

    for (i, r) in results.iter().enumerate() {
        assert!(
            matches!(r, Err(StoreError::Unavailable(_))),
            "request {i}: {r:?} (the API answers Unavailable with 503)"
        );
    }
    assert_eq!(stored(&db).await, 0, "nothing of the batch is stored");
    let keys: i64 = sqlx::query_scalar("SELECT count(*) FROM idempotency_keys")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(keys, 0);
    assert_eq!(metrics.batches(), (2, 10), "the first alone, then nine");
    // The next write finds a fresh connection.
    assert_eq!(store.insert(&order("cust-1", 1)).await, Ok(true));
    db.destroy().await;
}

#[tokio::test]
async fn moves_in_one_batch_keep_each_moves_status_and_lease_conditions() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let (ours, _) = grouped(&db);
    let other = db.replica(Duration::from_secs(30));
    let mine: Vec<Order> = (0..3).map(|i| order("cust-1", 10 + i)).collect();
    for o in &mine {
        assert_eq!(ours.insert(o).await, Ok(true));
    }
    let theirs = order("cust-2", 20);
    assert_eq!(other.insert(&theirs).await, Ok(true));

    let claim = StatusChange::new(Status::Pending, Status::Processing);
    let finish = StatusChange::new(Status::Processing, Status::Completed);
    let results = join_all([
        ours.update_status(mine[0].id, &claim),
        ours.update_status(mine[1].id, &claim),
        // Not where the move expects it.
        ours.update_status(mine[2].id, &finish),
        // Leased to a live replica.
        ours.update_status(theirs.id, &claim),
        // The same order twice: the second waits for the first.
        ours.update_status(mine[0].id, &claim),
    ])
    .await;
    let status = |r: &Result<UpdateOutcome, StoreError>| match r {
        Ok(UpdateOutcome::Updated(o)) => format!("moved to {}", o.status),
        Ok(UpdateOutcome::WrongStatus(s)) => format!("is {s}"),
        Ok(UpdateOutcome::LeaseHeldElsewhere) => "leased elsewhere".into(),
        other => format!("{other:?}"),
    };
    let seen: Vec<String> = results.iter().map(status).collect();
    assert_eq!(
        seen,
        [
            "moved to processing",
            "moved to processing",
            "is pending",
            "leased elsewhere",
            "is processing"
        ]
    );
    // Each claim opened one lease history row, under our name.
    let opened: i64 =
        sqlx::query_scalar("SELECT count(*) FROM order_lease_history WHERE ended_at IS NULL")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(opened, 2);

    // The other replica takes its own order.
    assert!(matches!(
        other.update_status(theirs.id, &claim).await,
        Ok(UpdateOutcome::Updated(_))
    ));

    // Finishing ours in one batch closes their rows and frees their leases;
    // finishing theirs in the same batch is refused, and its row stays open.
    let done = join_all([
        ours.update_status(mine[0].id, &finish),
        ours.update_status(mine[1].id, &finish),
        ours.update_status(theirs.id, &finish),
    ])
    .await;
    let seen: Vec<String> = done.iter().map(status).collect();
    assert_eq!(
        seen,
        [
            "moved to completed",
            "moved to completed",
            "leased elsewhere"
        ]
    );
    let (open, freed, still_theirs): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM order_lease_history WHERE ended_at IS NULL),
                (SELECT count(*) FROM orders WHERE status = 'completed' AND lease_owner IS NULL),
                (SELECT count(*) FROM orders WHERE status = 'processing' AND lease_owner = $1)",
    )
    .bind(&other.lease().owner)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((open, freed, still_theirs), (1, 2, 1));
    db.destroy().await;
}

#[tokio::test]
async fn a_move_that_is_neither_a_claim_nor_a_release_is_refused_and_changes_nothing() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let (grouped_store, _) = grouped(&db);
    let single = db.replica(Duration::from_secs(30));
    let o = order("cust-1", 1);
    assert_eq!(single.insert(&o).await, Ok(true));
    // The service refuses such moves before a store sees them; a store
    // asked anyway has no statement for them.
    let skip = StatusChange::new(Status::Pending, Status::Completed);
    for store in [&single, &grouped_store] {
        match store.update_status(o.id, &skip).await {
            Err(StoreError::Other(reason)) => {
                assert!(reason.contains("pending to completed"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }
    let status = single.get(o.id).await.unwrap().unwrap().status;
    assert_eq!(status, Status::Pending);
    db.destroy().await;
}

#[tokio::test]
async fn charges_in_one_batch_answer_as_each_would_alone() {
    use reliability_lab::payment::{ChargeRequest, Ledger, PostgresLedger};
    let Some(db) = TestDb::create().await else {
        return;
    };
    let ledger = PostgresLedger::new(db.pool.clone()).with_group_commit(256);
    let (a, b, c) = (
        OrderId::new_random(),
        OrderId::new_random(),
        OrderId::new_random(),
    );
    let charge = |order, attempt| ChargeRequest::for_order(order, attempt, 500, "USD");
    // A charged before the batch.
    let before = ledger.record(&charge(a, 1), Some("key-a")).await.unwrap();
    assert!(before.new_charge);

    let results = join_all([
        // A again under its key: nothing new, one charge before.
        ledger.record(&charge(a, 2), Some("key-a")),
        // B for the first time.
        ledger.record(&charge(b, 1), Some("key-b")),
        // C without a key, twice in the batch: both charge, the second
        // sees the first.
        ledger.record(&charge(c, 1), None),
        ledger.record(&charge(c, 2), None),
    ])
    .await;
    let seen: Vec<(bool, usize)> = results
        .into_iter()
        .map(|r| {
            let r = r.unwrap();
            (r.new_charge, r.earlier_charges)
        })
        .collect();
    assert_eq!(seen, [(false, 1), (true, 0), (true, 0), (true, 1)]);
    let per_order: Vec<(uuid::Uuid, i64)> =
        sqlx::query_as("SELECT order_id, count(*) FROM payment_ledger GROUP BY order_id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let count = |o: OrderId| {
        per_order
            .iter()
            .find(|(id, _)| *id == o.as_uuid())
            .map_or(0, |(_, n)| *n)
    };
    assert_eq!((count(a), count(b), count(c)), (1, 1, 2));
    db.destroy().await;
}
