//! The background loops that keep orders owned: taking over orders whose
//! lease expired, renewing this replica's own leases, and forgetting old
//! Idempotency-Keys.
//!
//! Leases exist only in durable stores; with the memory store the recovery
//! and heartbeat loops are not started (one process owns every order). The
//! key purge runs for every store: keys are remembered for
//! `IDEMPOTENCY_KEY_TTL`, not for ever.
//!
//! Every loop waits on `tokio::time`, so tests drive them on a paused clock,
//! and ends when its token is cancelled.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::observability::metrics::LeaseMetrics;
use crate::orders::Service;

/// How often expired Idempotency-Keys are forgotten. Keys are kept a day, so
/// hourly is often enough.
pub const KEY_PURGE_EVERY: Duration = Duration::from_secs(60 * 60);

/// The shortest heartbeat period, whatever the lease.
const MIN_HEARTBEAT: Duration = Duration::from_millis(100);

/// One recovery pass: take over expired leases, as many as the queue has
/// room for (`capacity` at most). Returns how many orders were taken over; a
/// failed pass is logged and counts as none.
pub async fn recover(service: &Service, metrics: &LeaseMetrics, capacity: usize) -> usize {
    match service.recover_expired(capacity).await {
        Ok(n) => {
            metrics.recovered(n);
            n
        }
        Err(err) => {
            tracing::warn!(error = %err, "recovery pass failed; will try again");
            0
        }
    }
}

/// Runs `work` every `period`, the first time one period after the start,
/// until `stop` fires. A slow run delays the next instead of bunching them.
async fn every<F, Fut>(period: Duration, stop: CancellationToken, mut work: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = tick.tick() => work().await,
        }
    }
}

/// Runs a recovery pass every `every` until `stop` fires. The first pass is
/// one period after the start: the composition root runs one itself before
/// the server listens.
pub async fn recovery_loop(
    service: Service,
    metrics: LeaseMetrics,
    every_period: Duration,
    capacity: usize,
    stop: CancellationToken,
) {
    every(every_period, stop, || async {
        recover(&service, &metrics, capacity).await;
    })
    .await;
}

/// Renews the leases of the orders this replica holds (queued or in a
/// worker's hands; see `Service::held`), every `period` (at least 100 ms),
/// until `stop` fires. The first renewal is one period after the start: new
/// leases are granted for a whole `JOB_LEASE`.
pub async fn heartbeat_loop(service: Service, period: Duration, stop: CancellationToken) {
    every(period.max(MIN_HEARTBEAT), stop, || async {
        if let Err(err) = service.renew_leases().await {
            tracing::warn!(error = %err, "renewing leases failed; another replica may take our orders over");
        }
    })
    .await;
}

/// Forgets expired Idempotency-Keys every `period` until `stop` fires.
pub async fn key_purge_loop(service: Service, period: Duration, stop: CancellationToken) {
    every(period, stop, || async {
        match service.purge_old_keys().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(purged = n, "forgot expired idempotency keys"),
            Err(err) => tracing::warn!(error = %err, "purging old idempotency keys failed"),
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use async_trait::async_trait;

    use crate::observability::Metrics;
    use crate::orders::memory::MemoryStore;
    use crate::orders::testing::RecordingQueue;
    use crate::orders::{
        Durability, KeyedInsert, Order, OrderId, OrderRepository, StatusChange, StatusCounts,
        StoreError, UpdateOutcome,
    };

    /// A store with leases, where `expired` orders wait to be taken over,
    /// counting what the loops ask of it. Everything else is a memory store.
    #[derive(Default)]
    struct Leased {
        inner: MemoryStore,
        expired: AtomicUsize,
        renewals: AtomicU64,
        purges: AtomicU64,
        fail_recovery: std::sync::atomic::AtomicBool,
    }

    #[async_trait]
    impl OrderRepository for Leased {
        fn kind(&self) -> &'static str {
            "leased"
        }
        fn durability(&self) -> Durability {
            Durability::Durable
        }
        fn lease_duration(&self) -> Option<Duration> {
            Some(Duration::from_secs(3))
        }
        async fn ping(&self) -> Result<(), StoreError> {
            Ok(())
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
            self.inner.update_status(id, change).await
        }
        async fn count_by_status(&self) -> Result<StatusCounts, StoreError> {
            self.inner.count_by_status().await
        }
        async fn renew_leases(&self, ids: &[OrderId]) -> Result<Vec<OrderId>, StoreError> {
            self.renewals.fetch_add(1, Ordering::SeqCst);
            Ok(ids.to_vec())
        }
        async fn count_expired(&self) -> Result<u64, StoreError> {
            if self.fail_recovery.load(Ordering::SeqCst) {
                return Err(StoreError::Unavailable("down".into()));
            }
            Ok(self.expired.load(Ordering::SeqCst) as u64)
        }
        async fn take_over_expired(&self, limit: usize) -> Result<Vec<OrderId>, StoreError> {
            let n = self.expired.load(Ordering::SeqCst).min(limit);
            self.expired.fetch_sub(n, Ordering::SeqCst);
            Ok((0..n).map(|_| OrderId::new_random()).collect())
        }
        async fn purge_keys_older_than(&self, _: Duration) -> Result<u64, StoreError> {
            Ok(self.purges.fetch_add(1, Ordering::SeqCst) + 1)
        }
    }

    fn setup(expired: usize, room: usize) -> (Arc<Leased>, Service, Arc<Mutex<Vec<OrderId>>>) {
        let store = Arc::new(Leased::default());
        store.expired.store(expired, Ordering::SeqCst);
        let queue = Arc::new(RecordingQueue::with_room(room));
        let queued = queue.submitted.clone();
        (store.clone(), Service::new(store, queue), queued)
    }

    fn recovered(metrics: &Metrics) -> String {
        metrics
            .render()
            .unwrap()
            .lines()
            .find(|l| l.starts_with("orders_recovered_total "))
            .unwrap()
            .to_owned()
    }

    #[tokio::test]
    async fn a_pass_takes_over_no_more_than_the_queue_has_room_for_and_counts_them() {
        let (store, service, queued) = setup(7, 5);
        let metrics = Metrics::new();
        assert_eq!(recover(&service, &metrics.leases(), 100).await, 5);
        assert_eq!(queued.lock().unwrap().len(), 5);
        assert_eq!(store.expired.load(Ordering::SeqCst), 2, "two wait for room");
        assert_eq!(recovered(&metrics), "orders_recovered_total 5");
    }

    #[tokio::test]
    async fn a_pass_is_bounded_by_the_capacity_and_a_failed_pass_counts_nothing() {
        let (store, service, queued) = setup(7, 100);
        let metrics = Metrics::new();
        assert_eq!(recover(&service, &metrics.leases(), 3).await, 3);
        assert_eq!(queued.lock().unwrap().len(), 3);
        store.fail_recovery.store(true, Ordering::SeqCst);
        assert_eq!(recover(&service, &metrics.leases(), 3).await, 0);
        assert_eq!(recovered(&metrics), "orders_recovered_total 3");
    }

    #[tokio::test(start_paused = true)]
    async fn the_recovery_loop_runs_every_interval_until_stopped() {
        let (store, service, queued) = setup(0, 100);
        let metrics = Metrics::new();
        let stop = CancellationToken::new();
        let every = Duration::from_secs(5);
        let task = tokio::spawn(recovery_loop(
            service,
            metrics.leases(),
            every,
            100,
            stop.clone(),
        ));
        store.expired.store(2, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(4_900)).await;
        assert!(queued.lock().unwrap().is_empty(), "not before one interval");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(queued.lock().unwrap().len(), 2);
        store.expired.store(3, Ordering::SeqCst);
        tokio::time::sleep(every).await;
        assert_eq!(queued.lock().unwrap().len(), 5);
        stop.cancel();
        task.await.unwrap();
        store.expired.store(4, Ordering::SeqCst);
        tokio::time::sleep(every * 3).await;
        assert_eq!(queued.lock().unwrap().len(), 5, "nothing after the stop");
    }

    /// Creates an order, so the service holds one (queued).
    async fn hold_one(service: &Service) -> OrderId {
        let request = crate::orders::CreateOrderRequest {
            customer_id: "c".into(),
            amount: 1,
            currency: "USD".into(),
        };
        service
            .create_order(&request, None)
            .await
            .unwrap()
            .order()
            .id
    }

    #[tokio::test(start_paused = true)]
    async fn with_nothing_held_the_heartbeat_sends_nothing() {
        let (store, service, _) = setup(0, 0);
        let stop = CancellationToken::new();
        let task = tokio::spawn(heartbeat_loop(
            service,
            Duration::from_secs(1),
            stop.clone(),
        ));
        tokio::time::sleep(Duration::from_secs(10)).await;
        stop.cancel();
        task.await.unwrap();
        assert_eq!(store.renewals.load(Ordering::SeqCst), 0);
    }

    /// A charge may start only if it ends before the lease could run out
    /// (less a tenth of it), counted from the last grant or renewal.
    #[tokio::test(start_paused = true)]
    async fn a_charge_may_start_only_while_it_would_end_within_the_lease() {
        // The store's leases last 3 s.
        let (_store, service, _) = setup(0, 1);
        let id = hold_one(&service).await;
        let call = Duration::from_secs(1);
        assert!(service.may_charge(id, call));
        tokio::time::sleep(Duration::from_millis(1_650)).await;
        assert!(service.may_charge(id, call), "1.65 + 1 + 0.3 < 3");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!service.may_charge(id, call), "1.75 + 1 + 0.3 > 3");
        // Renewed: a whole lease again from the renewal's sending.
        assert_eq!(service.renew_leases().await.unwrap(), 1);
        assert!(service.may_charge(id, call));
        assert!(!service.may_charge(OrderId::new_random(), call), "not held");
        service.let_go(id);
        assert!(!service.may_charge(id, call), "let go");
    }

    #[tokio::test(start_paused = true)]
    async fn the_heartbeat_renews_every_period_and_stops_when_told() {
        let (store, service, _) = setup(0, 1);
        hold_one(&service).await;
        let stop = CancellationToken::new();
        let task = tokio::spawn(heartbeat_loop(
            service,
            Duration::from_secs(10),
            stop.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(35_100)).await;
        assert_eq!(store.renewals.load(Ordering::SeqCst), 3);
        stop.cancel();
        task.await.unwrap();
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(store.renewals.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_very_short_lease_still_renews_no_faster_than_every_100_ms() {
        let (store, service, _) = setup(0, 1);
        hold_one(&service).await;
        let stop = CancellationToken::new();
        let task = tokio::spawn(heartbeat_loop(
            service,
            Duration::from_millis(1),
            stop.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(1_050)).await;
        stop.cancel();
        task.await.unwrap();
        assert_eq!(store.renewals.load(Ordering::SeqCst), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn keys_are_purged_every_period() {
        let (store, service, _) = setup(0, 0);
        let stop = CancellationToken::new();
        let task = tokio::spawn(key_purge_loop(service, KEY_PURGE_EVERY, stop.clone()));
        tokio::time::sleep(KEY_PURGE_EVERY * 2 + Duration::from_secs(1)).await;
        assert_eq!(store.purges.load(Ordering::SeqCst), 2);
        stop.cancel();
        task.await.unwrap();
    }
}
