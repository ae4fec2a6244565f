//! One repository contract, run against both stores. The Postgres run uses a
//! fresh database per test on a real server.

use std::sync::Arc;

use chrono::Utc;
use reliability_lab::orders::memory::MemoryStore;
use reliability_lab::orders::{
    Amount, Currency, CustomerId, NewOrder, Order, OrderId, OrderRepository, Status, StatusChange,
};

use crate::helpers::TestDb;

fn order() -> Order {
    Order::new(
        OrderId::new_random(),
        NewOrder {
            customer_id: CustomerId::parse("cust-42").unwrap(),
            amount: Amount::parse(1999).unwrap(),
            currency: Currency::parse("usd").unwrap(),
        },
        Utc::now(),
    )
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
    let moved = repo
        .update_status(o.id, &start)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(moved.status, Status::Processing);
    assert!(moved.updated_at >= o.updated_at);
    // The same change again finds the order elsewhere.
    assert_eq!(
        repo.update_status(o.id, &start).await.unwrap(),
        Some(Err(Status::Processing))
    );
    let finish = StatusChange::new(Status::Processing, Status::Failed)
        .with_attempts(3)
        .with_last_error("payment declined (simulated)");
    let done = repo
        .update_status(o.id, &finish)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
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
    let done = repo
        .update_status(
            o.id,
            &StatusChange::new(Status::Processing, Status::Completed).with_attempts(1),
        )
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(done.last_error.as_deref(), Some("interrupted"));
    assert_eq!(done.attempts, 1);
}

async fn updating_an_unknown_id_is_none(repo: Arc<dyn OrderRepository>) {
    let change = StatusChange::new(Status::Pending, Status::Processing);
    assert_eq!(
        repo.update_status(OrderId::new_random(), &change)
            .await
            .unwrap(),
        None
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
        let wins = [a.unwrap().unwrap(), b.unwrap().unwrap()]
            .iter()
            .filter(|r| r.is_ok())
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
);
