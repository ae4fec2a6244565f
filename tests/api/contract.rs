//! One repository contract, run against both stores. The Postgres run uses a
//! fresh database per test on a real server.

use std::sync::Arc;

use reliability_lab::orders::memory::MemoryStore;
use reliability_lab::orders::{
    KeyedInsert, Order, OrderId, OrderRepository, Status, StatusChange, UpdateOutcome,
};

/// The order a change produced, or a failed test.
fn updated(outcome: UpdateOutcome) -> Order {
    match outcome {
        UpdateOutcome::Updated(order) => order,
        other => panic!("expected the order to move, got {other:?}"),
    }
}

use crate::helpers::TestDb;

fn order() -> Order {
    crate::helpers::new_order()
}

async fn insert_then_get_returns_the_same_order(repo: Arc<dyn OrderRepository>) {
    let o = order();
    assert!(repo.insert(&o).await.unwrap());
    assert_eq!(repo.get(o.id).await.unwrap(), Some(o));
}

async fn inserting_an_existing_id_is_refused(repo: Arc<dyn OrderRepository>) {
    let o = order();
    assert!(repo.insert(&o).await.unwrap());
    assert!(!repo.insert(&o).await.unwrap());
}

async fn an_unknown_id_is_none(repo: Arc<dyn OrderRepository>) {
    assert_eq!(repo.get(OrderId::new_random()).await.unwrap(), None);
}

async fn a_status_change_applies_only_from_the_expected_status(repo: Arc<dyn OrderRepository>) {
    let o = order();
    repo.insert(&o).await.unwrap();
    let start = StatusChange::new(Status::Pending, Status::Processing);
    let moved = updated(repo.update_status(o.id, &start).await.unwrap());
    assert_eq!(moved.status, Status::Processing);
    assert!(moved.updated_at >= o.updated_at);
    // The same change again finds the order elsewhere.
    assert_eq!(
        repo.update_status(o.id, &start).await.unwrap(),
        UpdateOutcome::WrongStatus(Status::Processing)
    );
    let finish = StatusChange::new(Status::Processing, Status::Failed)
        .with_attempts(3)
        .with_last_error("payment declined (simulated)");
    let done = updated(repo.update_status(o.id, &finish).await.unwrap());
    assert_eq!(done.status, Status::Failed);
    assert_eq!(done.attempts, 3);
    assert_eq!(
        done.last_error.as_deref(),
        Some("payment declined (simulated)")
    );
    assert_eq!(repo.get(o.id).await.unwrap(), Some(done));
}

async fn a_change_without_a_reason_keeps_the_last_error(repo: Arc<dyn OrderRepository>) {
    let o = order();
    repo.insert(&o).await.unwrap();
    repo.update_status(
        o.id,
        &StatusChange::new(Status::Pending, Status::Processing),
    )
    .await
    .unwrap();
    repo.update_status(
        o.id,
        &StatusChange::new(Status::Processing, Status::Pending).with_last_error("interrupted"),
    )
    .await
    .unwrap();
    repo.update_status(
        o.id,
        &StatusChange::new(Status::Pending, Status::Processing),
    )
    .await
    .unwrap();
    let UpdateOutcome::Updated(done) = repo
        .update_status(
            o.id,
            &StatusChange::new(Status::Processing, Status::Completed).with_attempts(1),
        )
        .await
        .unwrap()
    else {
        panic!("not moved")
    };
    assert_eq!(done.last_error.as_deref(), Some("interrupted"));
    assert_eq!(done.attempts, 1);
}

async fn updating_an_unknown_id_is_none(repo: Arc<dyn OrderRepository>) {
    let change = StatusChange::new(Status::Pending, Status::Processing);
    assert_eq!(
        repo.update_status(OrderId::new_random(), &change)
            .await
            .unwrap(),
        UpdateOutcome::NotFound
    );
}

async fn two_racing_writers_cannot_both_move_an_order(repo: Arc<dyn OrderRepository>) {
    for _ in 0..20 {
        let o = order();
        repo.insert(&o).await.unwrap();
        let change = StatusChange::new(Status::Pending, Status::Processing);
        let (a, b) = tokio::join!(
            repo.update_status(o.id, &change),
            repo.update_status(o.id, &change)
        );
        let wins = [a.unwrap(), b.unwrap()]
            .iter()
            .filter(|r| matches!(r, UpdateOutcome::Updated(_)))
            .count();
        assert_eq!(wins, 1);
    }
}

async fn counts_cover_every_status(repo: Arc<dyn OrderRepository>) {
    for _ in 0..3 {
        repo.insert(&order()).await.unwrap();
    }
    let o = order();
    repo.insert(&o).await.unwrap();
    repo.update_status(
        o.id,
        &StatusChange::new(Status::Pending, Status::Processing),
    )
    .await
    .unwrap();
    let counts = repo.count_by_status().await.unwrap();
    assert_eq!(counts[&Status::Pending], 3);
    assert_eq!(counts[&Status::Processing], 1);
    assert_eq!(counts[&Status::Completed], 0);
    assert_eq!(counts[&Status::Failed], 0);
    repo.ping().await.unwrap();
}

async fn a_new_key_creates_and_the_same_key_returns_the_first_order(
    repo: Arc<dyn OrderRepository>,
) {
    let first = order();
    assert_eq!(
        repo.insert_with_key(&first, "key-1", "digest-a")
            .await
            .unwrap(),
        KeyedInsert::Created
    );
    let again = order();
    assert_eq!(
        repo.insert_with_key(&again, "key-1", "digest-a")
            .await
            .unwrap(),
        KeyedInsert::Existing {
            order: first.clone(),
            same_request: true
        }
    );
    assert_eq!(
        repo.insert_with_key(&order(), "key-1", "digest-b")
            .await
            .unwrap(),
        KeyedInsert::Existing {
            order: first.clone(),
            same_request: false
        }
    );
    // Nothing else was stored.
    assert_eq!(repo.get(again.id).await.unwrap(), None);
    // Keys are kept a day: a purge of day-old keys leaves this one.
    repo.purge_keys_older_than(std::time::Duration::from_secs(24 * 3600))
        .await
        .unwrap();
    assert!(matches!(
        repo.insert_with_key(&order(), "key-1", "digest-a")
            .await
            .unwrap(),
        KeyedInsert::Existing { .. }
    ));
    // A key past its age is forgotten: the same key then creates anew.
    let purged = repo
        .purge_keys_older_than(std::time::Duration::ZERO)
        .await
        .unwrap();
    assert!(purged >= 1, "the expired key was purged ({purged})");
    assert_eq!(
        repo.insert_with_key(&order(), "key-1", "digest-b")
            .await
            .unwrap(),
        KeyedInsert::Created
    );
}

async fn two_racing_requests_with_one_key_create_one_order(repo: Arc<dyn OrderRepository>) {
    for round in 0..10 {
        let key = format!("race-{round}");
        let (a, b) = (order(), order());
        let (ra, rb) = tokio::join!(
            repo.insert_with_key(&a, &key, "same"),
            repo.insert_with_key(&b, &key, "same")
        );
        let results = [ra.unwrap(), rb.unwrap()];
        let created = results
            .iter()
            .filter(|r| **r == KeyedInsert::Created)
            .count();
        assert_eq!(created, 1, "{results:?}");
        let winner = if results[0] == KeyedInsert::Created {
            &a
        } else {
            &b
        };
        assert!(results.iter().any(|r| matches!(r,
            KeyedInsert::Existing { order, same_request: true } if order.id == winner.id)));
    }
    let counts = repo.count_by_status().await.unwrap();
    assert_eq!(counts[&Status::Pending], 10);
}

/// An order taken to processing and then deferred.
async fn deferred_order(
    repo: &Arc<dyn OrderRepository>,
    created: chrono::DateTime<chrono::Utc>,
) -> Order {
    let mut o = order();
    o.created_at = chrono::SubsecRound::trunc_subsecs(created, 6);
    o.updated_at = o.created_at;
    repo.insert(&o).await.unwrap();
    updated(
        repo.update_status(
            o.id,
            &StatusChange::new(Status::Pending, Status::Processing),
        )
        .await
        .unwrap(),
    );
    let parked = updated(
        repo.update_status(
            o.id,
            &StatusChange::new(Status::Processing, Status::Deferred)
                .with_attempts(1)
                .with_last_error("circuit open: deferred until the breaker closes"),
        )
        .await
        .unwrap(),
    );
    assert_eq!(parked.status, Status::Deferred);
    parked
}

async fn deferred_orders_are_taken_back_oldest_first_each_by_one_caller(
    repo: Arc<dyn OrderRepository>,
) {
    let now = chrono::Utc::now();
    let mut ids = Vec::new();
    for age in [3, 1, 2] {
        ids.push(
            deferred_order(&repo, now - chrono::Duration::seconds(age))
                .await
                .id,
        );
    }
    assert_eq!(repo.count_deferred().await.unwrap(), 3);
    assert_eq!(repo.count_by_status().await.unwrap()[&Status::Deferred], 3);
    // Oldest first: created 3 s, then 2 s ago.
    let first = repo.take_deferred(2).await.unwrap();
    assert_eq!(first, vec![ids[0], ids[2]]);
    for id in &first {
        let back = repo.get(*id).await.unwrap().unwrap();
        assert_eq!(back.status, Status::Pending);
        assert_eq!(back.attempts, 1, "attempts are kept");
    }
    // Two callers at once take the last one once between them.
    let (a, b) = tokio::join!(repo.take_deferred(5), repo.take_deferred(5));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.len() + b.len(), 1, "{a:?} {b:?}");
    assert_eq!(repo.count_deferred().await.unwrap(), 0);
    assert!(repo.take_deferred(5).await.unwrap().is_empty());
    // A taken order goes on like any pending one.
    updated(
        repo.update_status(
            first[0],
            &StatusChange::new(Status::Pending, Status::Processing),
        )
        .await
        .unwrap(),
    );
}

async fn deferred_orders_past_their_deadline_fail_with_the_reason(repo: Arc<dyn OrderRepository>) {
    let now = chrono::Utc::now();
    let old = deferred_order(&repo, now - chrono::Duration::seconds(600)).await;
    let young = deferred_order(&repo, now - chrono::Duration::seconds(5)).await;
    let cutoff = now - chrono::Duration::seconds(60);
    let failed = repo
        .expire_deferred(cutoff, "past DEFER_MAX")
        .await
        .unwrap();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].id, old.id);
    assert_eq!(failed[0].status, Status::Failed);
    assert_eq!(failed[0].last_error.as_deref(), Some("past DEFER_MAX"));
    assert_eq!(
        repo.get(old.id).await.unwrap().unwrap().status,
        Status::Failed
    );
    assert_eq!(
        repo.get(young.id).await.unwrap().unwrap().status,
        Status::Deferred
    );
    assert_eq!(repo.count_deferred().await.unwrap(), 1);
    // Once failed it is not deferred any more: nothing to take or expire.
    assert!(repo
        .expire_deferred(cutoff, "again")
        .await
        .unwrap()
        .is_empty());
    assert_eq!(repo.take_deferred(5).await.unwrap(), vec![young.id]);
}

macro_rules! contract {
    ($($case:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $case() {
                    super::$case(std::sync::Arc::new(super::MemoryStore::new())).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $case() {
                    let Some(db) = super::TestDb::create().await else { return };
                    super::$case(db.store()).await;
                    db.destroy().await;
                }
            )*
        }
    };
}

contract!(
    insert_then_get_returns_the_same_order,
    inserting_an_existing_id_is_refused,
    an_unknown_id_is_none,
    a_status_change_applies_only_from_the_expected_status,
    a_change_without_a_reason_keeps_the_last_error,
    updating_an_unknown_id_is_none,
    two_racing_writers_cannot_both_move_an_order,
    counts_cover_every_status,
    a_new_key_creates_and_the_same_key_returns_the_first_order,
    two_racing_requests_with_one_key_create_one_order,
    deferred_orders_are_taken_back_oldest_first_each_by_one_caller,
    deferred_orders_past_their_deadline_fail_with_the_reason,
);
