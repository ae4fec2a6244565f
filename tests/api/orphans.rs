//! No orphan: an order whose claim or outcome the store could not take is
//! never left unfinished. A real Postgres behind a wrapper that fails on
//! cue (the outage is the wrapper's, so it can fail one kind of write and
//! not another), on the real clock with a one-second lease; the whole crash
//! of the database is `crash::a_database_crash_under_traffic…`.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use reliability_lab::orders::postgres::PostgresStore;
use reliability_lab::orders::{
    Durability, KeyedInsert, Order, OrderId, OrderRepository, Status, StatusChange, StatusCounts,
    StoreError, UpdateOutcome,
};

use crate::helpers::{Lab, LabOptions, TestDb};

/// A store (a Postgres replica, or memory on a paused clock) whose moves
/// fail on cue. It says it is durable either way, so the service keeps
/// leases and its held orders.
struct Flaky<S> {
    inner: S,
    /// Outcomes (moves out of processing) fail without reaching the store.
    outcomes_down: AtomicBool,
    /// This many claims commit, then answer an error (their answer lost).
    claims_to_lose: AtomicU32,
    /// This many outcomes commit, then answer an error.
    outcomes_to_lose: AtomicU32,
    /// Outcome writes that failed, of either kind.
    failed_outcomes: AtomicU32,
    /// Lease renewals fail (the heartbeat cannot reach the store).
    renewals_down: AtomicBool,
    /// How long its leases last: the inner store's, or as told.
    lease: Option<Duration>,
}

impl<S: OrderRepository> Flaky<S> {
    fn new(inner: S) -> Arc<Self> {
        let lease = inner.lease_duration();
        Self::with_lease(inner, lease)
    }

    /// With leases of `lease` (for a memory store, which has none).
    fn with_lease(inner: S, lease: Option<Duration>) -> Arc<Self> {
        Arc::new(Self {
            lease,
            inner,
            outcomes_down: AtomicBool::new(false),
            claims_to_lose: AtomicU32::new(0),
            outcomes_to_lose: AtomicU32::new(0),
            failed_outcomes: AtomicU32::new(0),
            renewals_down: AtomicBool::new(false),
        })
    }
}

fn lost() -> StoreError {
    StoreError::Unavailable("connection reset (the wrapper's)".into())
}

/// Takes one from `n` if it is above zero.
fn take_one(n: &AtomicU32) -> bool {
    n.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1))
        .is_ok()
}

#[async_trait]
impl<S: OrderRepository> OrderRepository for Flaky<S> {
    fn kind(&self) -> &'static str {
        "flaky"
    }
    fn durability(&self) -> Durability {
        Durability::Durable
    }
    fn lease_duration(&self) -> Option<Duration> {
        self.lease
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
    async fn insert(&self, order: &Order) -> Result<bool, StoreError> {
        self.inner.insert(order).await
    }
    async fn insert_with_key(
        &self,
        order: &Order,
        key: &str,
        digest: &str,
    ) -> Result<KeyedInsert, StoreError> {
        self.inner.insert_with_key(order, key, digest).await
    }
    async fn get(&self, id: OrderId) -> Result<Option<Order>, StoreError> {
        self.inner.get(id).await
    }
    async fn update_status(
        &self,
        id: OrderId,
        change: &StatusChange,
    ) -> Result<UpdateOutcome, StoreError> {
        let outcome = change.from == Status::Processing;
        if outcome && self.outcomes_down.load(Ordering::SeqCst) {
            self.failed_outcomes.fetch_add(1, Ordering::SeqCst);
            return Err(lost());
        }
        let moved = self.inner.update_status(id, change).await?;
        let claim = change.from == Status::Pending && change.to == Status::Processing;
        if (claim && take_one(&self.claims_to_lose))
            || (outcome && take_one(&self.outcomes_to_lose))
        {
            if outcome {
                self.failed_outcomes.fetch_add(1, Ordering::SeqCst);
            }
            return Err(lost());
        }
        Ok(moved)
    }
    async fn count_by_status(&self) -> Result<StatusCounts, StoreError> {
        self.inner.count_by_status().await
    }
    async fn renew_leases(&self, ids: &[OrderId]) -> Result<Vec<OrderId>, StoreError> {
        if self.renewals_down.load(Ordering::SeqCst) {
            return Err(lost());
        }
        if self.inner.durability() == Durability::None {
            // The memory store keeps no leases: every held one is renewed.
            return Ok(ids.to_vec());
        }
        self.inner.renew_leases(ids).await
    }
    async fn count_expired(&self) -> Result<u64, StoreError> {
        self.inner.count_expired().await
    }
    async fn take_over_expired(&self, limit: usize) -> Result<Vec<OrderId>, StoreError> {
        self.inner.take_over_expired(limit).await
    }
    async fn release_leases(&self) -> Result<u64, StoreError> {
        self.inner.release_leases().await
    }
    async fn purge_keys_older_than(&self, age: Duration) -> Result<u64, StoreError> {
        self.inner.purge_keys_older_than(age).await
    }
}

const LEASE: Duration = Duration::from_secs(1);

async fn lab(store: Arc<Flaky<PostgresStore>>) -> Lab {
    Lab::new(LabOptions {
        repo: Some(store),
        job_lease: LEASE,
        payment_timeout: LEASE / 2,
        recovery_interval: Duration::from_millis(200),
        ..LabOptions::default()
    })
    .await
}

/// Waits, on the real clock, until the order is terminal; fails after `limit`.
async fn settled(lab: &Lab, id: OrderId, limit: Duration) -> Order {
    let start = Instant::now();
    loop {
        let order = lab.service.get_order(id).await.unwrap();
        if order.status.is_terminal() {
            return order;
        }
        assert!(
            start.elapsed() < limit,
            "still {} after {limit:?}: {order:?}",
            order.status
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `orders_recovered_total`: orders taken over after their lease ran out.
fn recovered(lab: &Lab) -> u64 {
    let text = lab.metrics.render().unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("orders_recovered_total "))
        .expect("the counter is rendered")
        .parse()
        .unwrap()
}

async fn charges(lab: &Lab, id: OrderId) -> usize {
    lab.payment.ledger().charges(id).await.unwrap().len()
}

#[tokio::test]
async fn an_outcome_the_store_refuses_is_written_again_until_it_lands_with_one_charge() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let store = Flaky::new(db.replica(LEASE));
    store.outcomes_down.store(true, Ordering::SeqCst);
    let lab = lab(store.clone()).await;
    let order = lab.post_order().await;
    // Down for three leases: the order stays this worker's meanwhile (the
    // heartbeat renews what a worker holds), so recovery does not take it.
    tokio::time::sleep(LEASE * 3).await;
    assert_eq!(
        lab.service.get_order(order.id).await.unwrap().status,
        Status::Processing
    );
    let tries = store.failed_outcomes.load(Ordering::SeqCst);
    assert!(
        (4..=12).contains(&tries),
        "written again with backoff (100 ms doubling): {tries} tries in 3 s"
    );
    assert_eq!(recovered(&lab), 0, "not taken over");
    store.outcomes_down.store(false, Ordering::SeqCst);
    let done = settled(&lab, order.id, Duration::from_secs(10)).await;
    assert_eq!(done.status, Status::Completed);
    assert_eq!(charges(&lab, order.id).await, 1);
    assert_eq!(lab.payment.calls(), 1, "charged once: the write landed");
    assert_eq!(lab.metrics.totals().completed, 1);
    db.destroy().await;
}

#[tokio::test]
async fn an_outcome_that_landed_with_its_answer_lost_counts_as_landed() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let store = Flaky::new(db.replica(LEASE));
    store.outcomes_to_lose.store(1, Ordering::SeqCst);
    let lab = lab(store.clone()).await;
    let order = lab.post_order().await;
    let done = settled(&lab, order.id, Duration::from_secs(5)).await;
    assert_eq!(done.status, Status::Completed);
    // The second write found it completed: the first had landed.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(store.failed_outcomes.load(Ordering::SeqCst), 1);
    assert_eq!(lab.metrics.totals().completed, 1, "counted once, as done");
    assert_eq!(lab.payment.calls(), 1);
    db.destroy().await;
}

#[tokio::test]
async fn a_claim_whose_answer_was_lost_is_taken_over_once_its_lease_runs_out() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let store = Flaky::new(db.replica(LEASE));
    store.claims_to_lose.store(1, Ordering::SeqCst);
    let lab = lab(store.clone()).await;
    let order = lab.post_order().await;
    // The claim committed (processing, under our lease) but the worker
    // heard an error and let it go: nobody renews it now.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        lab.service.get_order(order.id).await.unwrap().status,
        Status::Processing
    );
    assert_eq!(lab.payment.calls(), 0);
    assert!(
        lab.service.held().is_empty(),
        "the worker let go of the order"
    );
    // JOB_LEASE, then a recovery pass takes it over and it is charged.
    let done = settled(&lab, order.id, LEASE * 5).await;
    assert_eq!(done.status, Status::Completed);
    assert_eq!(recovered(&lab), 1);
    assert_eq!(charges(&lab, order.id).await, 1);
    assert_eq!(lab.payment.calls(), 1);
    db.destroy().await;
}

#[tokio::test]
async fn the_heartbeat_renews_the_orders_in_hand_and_no_other() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let store = Flaky::new(db.replica(LEASE));
    let lab = Lab::new(LabOptions {
        repo: Some(store.clone()),
        job_lease: LEASE,
        payment_timeout: LEASE / 2,
        recovery_interval: Duration::from_secs(3600),
        start_workers: false,
        ..LabOptions::default()
    })
    .await;
    // Queued, waiting for a worker: held, so renewed past its first lease.
    let queued = lab.post_order().await;
    // Stored by this replica but never queued (as when the answer to an
    // insert is lost): not held, so its lease runs out.
    let stray = crate::helpers::new_order();
    store.insert(&stray).await.unwrap();
    assert_eq!(lab.service.held(), vec![queued.id]);
    tokio::time::sleep(LEASE * 2).await;
    assert_eq!(
        store.count_expired().await.unwrap(),
        1,
        "only the stray order ran out"
    );
    assert_eq!(store.take_over_expired(10).await.unwrap(), vec![stray.id]);
    db.destroy().await;
}

#[tokio::test(start_paused = true)]
async fn an_outcome_that_never_lands_is_let_go_after_a_minute() {
    let store = Flaky::new(reliability_lab::orders::memory::MemoryStore::new());
    store.outcomes_down.store(true, Ordering::SeqCst);
    let lab = Lab::new(LabOptions {
        repo: Some(store.clone()),
        ..LabOptions::default()
    })
    .await;
    let order = lab.post_order().await;
    let tries = || store.failed_outcomes.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(30)).await;
    let at_30s = tries();
    assert!(lab.service.held().contains(&order.id));
    tokio::time::sleep(Duration::from_secs(31)).await;
    let at_61s = tries();
    assert!(at_61s > at_30s, "still trying within the minute");
    assert!(lab.service.held().is_empty(), "let go after the minute");
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(tries(), at_61s, "and tried no more");
    // The worker is free for the next order.
    store.outcomes_down.store(false, Ordering::SeqCst);
    let next = lab.post_order().await;
    assert_eq!(lab.settle(next.id).await.status, Status::Completed);
}

/// A worker whose lease the heartbeat cannot renew starts no charge that
/// could end after the lease may have run out (less a tenth): it hands the
/// order back instead. With renewals working, the same retries go on.
#[tokio::test(start_paused = true)]
async fn no_charge_starts_that_could_end_after_an_unrenewed_lease() {
    for renewals_down in [true, false] {
        let store = Flaky::with_lease(
            reliability_lab::orders::memory::MemoryStore::new(),
            Some(Duration::from_secs(3)),
        );
        store.renewals_down.store(renewals_down, Ordering::SeqCst);
        let lab = Lab::new(LabOptions {
            repo: Some(store.clone()),
            job_lease: Duration::from_secs(3),
            payment_timeout: Duration::from_secs(1),
            retry: reliability_lab::reliability::RetryPolicy {
                max_attempts: 10,
                initial_interval: Duration::from_millis(500),
                max_interval: Duration::from_secs(5),
                randomization_factor: 0.0,
                ..Default::default()
            },
            breaker: reliability_lab::reliability::BreakerConfig {
                failure_threshold: 100,
                ..Default::default()
            },
            start_workers: false,
            ..LabOptions::default()
        })
        .await;
        let update: reliability_lab::payment::PaymentUpdate =
            serde_json::from_value(serde_json::json!({"mode": "outage"})).unwrap();
        lab.payment.update(update).unwrap();
        let order = lab.post_order().await;
        // Queued 2 s before a worker claims it: the claim grants a whole
        // lease again.
        tokio::time::sleep(Duration::from_secs(2)).await;
        lab.start_workers();
        tokio::time::sleep(Duration::from_secs(60)).await;
        let now = lab.service.get_order(order.id).await.unwrap();
        if renewals_down {
            // Attempts at 0, 0.5 and 1.5 s after the claim; the next, at
            // 3.5 s, could end past 3 s - 0.3 s: not started.
            assert_eq!(lab.payment.calls(), 3);
            assert_eq!(now.status, Status::Pending, "{now:?}");
            assert!(
                now.last_error
                    .as_deref()
                    .unwrap()
                    .contains("lease could not be renewed"),
                "{now:?}"
            );
        } else {
            assert_eq!(lab.payment.calls(), 10, "renewed: every attempt");
            assert_eq!(now.status, Status::Failed);
        }
    }
}
