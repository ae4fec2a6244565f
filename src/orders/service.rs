//! The order service: the operations the API and the workers perform.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::Deserialize;
use tracing::{instrument, Instrument};

use sha2::{Digest, Sha256};

use super::Durability;
use super::{
    Amount, Currency, CustomerId, KeyedInsert, NewOrder, Order, OrderError, OrderId,
    OrderRepository, ProcessingQueue, QueueError, StatusChange, StatusCounts, StoreError,
    UpdateOutcome,
};

/// How long an Idempotency-Key is remembered, at least.
pub const IDEMPOTENCY_KEY_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// What `create_order` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Creation {
    /// A new order, stored and queued.
    Created(Order),
    /// The idempotency key was seen before with the same request: the
    /// original order, and nothing new stored or queued.
    Replayed(Order),
}

impl Creation {
    pub fn order(&self) -> &Order {
        match self {
            Creation::Created(o) | Creation::Replayed(o) => o,
        }
    }
}

/// A digest of what the request asks for (after parsing, so `usd` and `USD`
/// are the same request).
fn digest(new: &NewOrder) -> String {
    let mut hasher = Sha256::new();
    hasher.update(new.customer_id.as_str().as_bytes());
    hasher.update([0]);
    hasher.update(new.amount.value().to_be_bytes());
    hasher.update(new.currency.as_str().as_bytes());
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The body of `POST /orders`, as the client sent it. Unknown fields are refused.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateOrderRequest {
    /// Who places the order: 1 to 64 letters, digits, `_` or `-`.
    #[schema(
        min_length = 1,
        max_length = 64,
        pattern = "^[A-Za-z0-9_-]+$",
        example = "cust-42"
    )]
    pub customer_id: String,
    /// In the currency's smallest unit (cents for USD), never a fraction.
    #[schema(minimum = 1, maximum = 100000000, example = 1999)]
    pub amount: i64,
    /// Three ASCII letters, any case (stored upper-case).
    #[schema(pattern = "^[A-Za-z]{3}$", example = "USD")]
    pub currency: String,
}

impl CreateOrderRequest {
    /// Parses every field into its domain type, naming the first bad one.
    pub fn parse(&self) -> Result<NewOrder, OrderError> {
        Ok(NewOrder {
            customer_id: CustomerId::parse(&self.customer_id)?,
            amount: Amount::parse(self.amount)?,
            currency: Currency::parse(&self.currency)?,
        })
    }
}

/// Creates, reads and moves orders. Cheap to clone.
#[derive(Clone)]
pub struct Service {
    repo: Arc<dyn OrderRepository>,
    queue: Arc<dyn ProcessingQueue>,
    /// Set for reproducible runs: ids come from a seeded generator.
    seeded_ids: Option<Arc<Mutex<StdRng>>>,
    /// With leases: the orders this replica has queued or in a worker's
    /// hands, the only ones the heartbeat renews.
    held: Option<Arc<Held>>,
}

/// The orders this replica is working on, with how many times each is
/// queued or in hand (recovery may queue an order a second time while the
/// first job still holds it, if its lease ran out meanwhile), and since when
/// its lease surely runs.
///
/// An order is held from the moment it is queued until its worker is done
/// with it, whatever the outcome. An order stored but never queued (its
/// caller's answer was lost), or whose claim or final write failed and was
/// let go, is not held: its lease runs out and the recovery loop, here or on
/// another replica, takes it over. Renewing every lease this replica owns
/// instead would keep such an order ours, and unfinished, for ever.
struct Held {
    orders: Mutex<HashMap<OrderId, Hold>>,
    /// `JOB_LEASE`: how long a lease runs from its grant or renewal, as the
    /// store says (unknown: no charge is held back).
    lease: Option<Duration>,
}

struct Hold {
    count: u32,
    /// When the statement that last granted or renewed the lease was sent:
    /// the database set its expiry at least `lease` after this.
    since: tokio::time::Instant,
}

impl Held {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<OrderId, Hold>> {
        self.orders.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The part of a lease kept back when judging whether a charge can finish
/// within it: covers the time between a statement being sent and the
/// database reading its clock.
const LEASE_MARGIN_DIVISOR: u32 = 10;

impl Service {
    pub fn new(repo: Arc<dyn OrderRepository>, queue: Arc<dyn ProcessingQueue>) -> Self {
        let held = (repo.durability() == Durability::Durable).then(|| {
            Arc::new(Held {
                orders: Mutex::default(),
                lease: repo.lease_duration(),
            })
        });
        Self {
            repo,
            queue,
            seeded_ids: None,
            held,
        }
    }

    /// Marks `id` as this replica's to work on, before it is queued (its
    /// lease was granted by the statement that just returned).
    fn hold(&self, id: OrderId) {
        if let Some(held) = &self.held {
            let now = tokio::time::Instant::now();
            let mut orders = held.lock();
            let hold = orders.entry(id).or_insert(Hold {
                count: 0,
                since: now,
            });
            hold.count += 1;
            hold.since = hold.since.max(now);
        }
    }

    /// Says a worker is done with `id` (its job ended, however): one hold
    /// fewer; with none left its lease is no longer renewed.
    pub fn let_go(&self, id: OrderId) {
        if let Some(held) = &self.held {
            let mut held = held.lock();
            if let Some(hold) = held.get_mut(&id) {
                hold.count -= 1;
                if hold.count == 0 {
                    held.remove(&id);
                }
            }
        }
    }

    /// Notes that the leases of `ids` were renewed by a statement sent at
    /// `sent`.
    fn renewed(&self, ids: &[OrderId], sent: tokio::time::Instant) {
        if let Some(held) = &self.held {
            let mut orders = held.lock();
            for id in ids {
                if let Some(hold) = orders.get_mut(id) {
                    hold.since = hold.since.max(sent);
                }
            }
        }
    }

    /// Claims an order for a worker: pending -> processing, renewing its
    /// lease, noted as renewed from the moment the claim was sent.
    pub async fn claim(&self, id: OrderId) -> Result<Order, OrderError> {
        let sent = tokio::time::Instant::now();
        let order = self
            .update_order(
                id,
                StatusChange::new(super::Status::Pending, super::Status::Processing),
            )
            .await?;
        self.renewed(&[id], sent);
        Ok(order)
    }

    /// Whether a charge call of at most `call` started now would end while
    /// the order's lease is surely still this replica's (always, without
    /// leases). Past that, another replica may take the order over once the
    /// lease runs out, and a charge landing after its own would race it.
    pub fn may_charge(&self, id: OrderId, call: Duration) -> bool {
        let Some(held) = &self.held else {
            return true;
        };
        let orders = held.lock();
        let Some(hold) = orders.get(&id) else {
            return false;
        };
        let Some(lease) = held.lease else {
            return true;
        };
        let margin = lease / LEASE_MARGIN_DIVISOR;
        tokio::time::Instant::now() + call + margin < hold.since + lease
    }

    /// The orders queued or in a worker's hands here (none without leases).
    pub fn held(&self) -> Vec<OrderId> {
        match &self.held {
            Some(held) => held.lock().keys().copied().collect(),
            None => Vec::new(),
        }
    }

    /// Draws order ids from a generator seeded by `seed`, so that the same
    /// requests in the same order get the same ids. Such ids are predictable.
    pub fn with_seeded_ids(mut self, seed: u64) -> Self {
        // A different stream from the payment draws that use the same seed.
        let rng = StdRng::seed_from_u64(seed ^ 0x5EED_0F0D_E21D_5EED);
        self.seeded_ids = Some(Arc::new(Mutex::new(rng)));
        self
    }

    fn next_id(&self) -> OrderId {
        match &self.seeded_ids {
            Some(rng) => {
                let mut rng = rng.lock().unwrap_or_else(|p| p.into_inner());
                OrderId::from_random_bytes(rng.random())
            }
            None => OrderId::new_random(),
        }
    }

    pub fn repository(&self) -> &Arc<dyn OrderRepository> {
        &self.repo
    }

    /// Validates, reserves a queue slot, stores the order, then queues it.
    ///
    /// The slot comes first: when the queue is full the request is refused and
    /// nothing is stored. If storing fails, or the idempotency key names an
    /// earlier order, the dropped slot frees its room.
    // Debug-level spans: at the default `info` they cost nothing, where an
    // info span formats its fields for every order (seen in a profile).
    #[instrument(level = "debug", skip_all, fields(order_id))]
    pub async fn create_order(
        &self,
        request: &CreateOrderRequest,
        idempotency_key: Option<&str>,
    ) -> Result<Creation, OrderError> {
        let new = request.parse()?;
        let slot = self.queue.try_reserve().map_err(|e| match e {
            QueueError::Full => OrderError::QueueFull,
            QueueError::Closed => OrderError::ShuttingDown,
        })?;
        let request_digest = idempotency_key.map(|_| digest(&new));
        let order = Order::new(self.next_id(), new, crate::clock::now());
        tracing::Span::current().record("order_id", tracing::field::display(order.id));
        // Stored and queued in a task of its own, so that a caller who goes
        // away mid-write (a closed connection drops the request's future)
        // cannot leave an order stored but never queued: nothing would
        // process it, and with Postgres its own live replica keeps renewing
        // its lease, so no other would take it over either.
        let this = self.clone();
        let key = idempotency_key.map(str::to_owned);
        let write = tokio::spawn(
            async move {
                this.store_and_queue(order, key.zip(request_digest), slot)
                    .await
            }
            .instrument(tracing::Span::current()),
        );
        match write.await {
            Ok(created) => created,
            Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
            Err(_) => Err(OrderError::ShuttingDown),
        }
    }

    async fn store_and_queue(
        &self,
        order: Order,
        key: Option<(String, String)>,
        slot: Box<dyn super::QueueSlot>,
    ) -> Result<Creation, OrderError> {
        match key {
            Some((key, request_digest)) => {
                match self
                    .repo
                    .insert_with_key(&order, &key, &request_digest)
                    .await?
                {
                    KeyedInsert::Created => {}
                    KeyedInsert::Existing {
                        order,
                        same_request: true,
                    } => return Ok(Creation::Replayed(order)),
                    KeyedInsert::Existing { .. } => return Err(OrderError::IdempotencyKeyReused),
                }
            }
            None => {
                if !self.repo.insert(&order).await? {
                    return Err(OrderError::Duplicate(order.id));
                }
            }
        }
        self.hold(order.id);
        slot.submit(order.id);
        tracing::debug!("order accepted and queued");
        Ok(Creation::Created(order))
    }

    pub async fn get_order(&self, id: OrderId) -> Result<Order, OrderError> {
        self.repo.get(id).await?.ok_or(OrderError::NotFound(id))
    }

    /// Moves an order from one status to another, if the move is legal and
    /// the order is still where the caller expects it.
    #[instrument(level = "debug", skip_all, fields(order_id = %id, from = %change.from, to = %change.to))]
    pub async fn update_order(
        &self,
        id: OrderId,
        change: StatusChange,
    ) -> Result<Order, OrderError> {
        change.from.check_move(change.to)?;
        match self.repo.update_status(id, &change).await? {
            UpdateOutcome::Updated(order) => Ok(order),
            UpdateOutcome::NotFound => Err(OrderError::NotFound(id)),
            UpdateOutcome::WrongStatus(actual) => Err(OrderError::IllegalTransition {
                from: actual,
                to: change.to,
            }),
            UpdateOutcome::LeaseHeldElsewhere => Err(OrderError::LeaseHeldElsewhere(id)),
        }
    }

    /// Takes over orders whose lease expired (their replica died or was
    /// stopped hard) and queues them, taking no more than the queue has room
    /// for. Returns how many.
    pub async fn recover_expired(&self, max: usize) -> Result<usize, OrderError> {
        // Reserve only as much room as there is work, so that recovery never
        // holds the queue's room away from new orders for nothing.
        let waiting = usize::try_from(self.repo.count_expired().await?).unwrap_or(usize::MAX);
        let wanted = waiting.min(max);
        let mut slots = Vec::new();
        while slots.len() < wanted {
            match self.queue.try_reserve() {
                Ok(slot) => slots.push(slot),
                Err(_) => break,
            }
        }
        if slots.is_empty() {
            return Ok(0);
        }
        let ids = self.repo.take_over_expired(slots.len()).await?;
        for (slot, id) in slots.into_iter().zip(&ids) {
            self.hold(*id);
            slot.submit(*id);
        }
        if !ids.is_empty() {
            tracing::warn!(
                recovered = ids.len(),
                "took over orders whose lease expired"
            );
        }
        Ok(ids.len())
    }

    /// Puts at most `max` deferred orders back in the queue, as much as it
    /// has room for (a full queue leaves them deferred, and is not counted
    /// as a refused request). They were accepted once: they are not counted
    /// as accepted again. Returns how many went back.
    pub async fn release_deferred(&self, max: usize) -> Result<usize, OrderError> {
        let waiting = usize::try_from(self.repo.count_deferred().await?).unwrap_or(usize::MAX);
        let wanted = waiting.min(max);
        let mut slots = Vec::new();
        while slots.len() < wanted {
            match self.queue.try_reserve_background() {
                Ok(slot) => slots.push(slot),
                Err(_) => break,
            }
        }
        if slots.is_empty() {
            return Ok(0);
        }
        let ids = self.repo.take_deferred(slots.len()).await?;
        for (slot, id) in slots.into_iter().zip(&ids) {
            self.hold(*id);
            slot.resubmit(*id);
        }
        Ok(ids.len())
    }

    /// Fails the deferred orders placed more than `max` ago, with `reason`,
    /// and returns them.
    pub async fn expire_deferred(
        &self,
        max: std::time::Duration,
        reason: &str,
    ) -> Result<Vec<Order>, OrderError> {
        let cutoff =
            crate::clock::now() - chrono::Duration::from_std(max).unwrap_or(chrono::Duration::MAX);
        Ok(self.repo.expire_deferred(cutoff, reason).await?)
    }

    /// How many orders are deferred now.
    pub async fn count_deferred(&self) -> Result<u64, OrderError> {
        Ok(self.repo.count_deferred().await?)
    }

    /// Extends the leases of the orders this replica holds (queued or in a
    /// worker's hands), and of no other.
    pub async fn renew_leases(&self) -> Result<u64, StoreError> {
        let held = self.held();
        if held.is_empty() {
            return Ok(0);
        }
        let sent = tokio::time::Instant::now();
        let renewed = self.repo.renew_leases(&held).await?;
        self.renewed(&renewed, sent);
        Ok(renewed.len() as u64)
    }

    /// Lets go of this replica's leases (clean shutdown).
    pub async fn release_leases(&self) -> Result<u64, StoreError> {
        self.repo.release_leases().await
    }

    /// Forgets idempotency keys past their time.
    pub async fn purge_old_keys(&self) -> Result<u64, StoreError> {
        self.repo.purge_keys_older_than(IDEMPOTENCY_KEY_TTL).await
    }

    pub async fn count_by_status(&self) -> Result<StatusCounts, OrderError> {
        Ok(self.repo.count_by_status().await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::orders::memory::MemoryStore;
    use crate::orders::testing::RecordingQueue;
    use crate::orders::Status;

    fn request() -> CreateOrderRequest {
        CreateOrderRequest {
            customer_id: "cust-42".into(),
            amount: 1999,
            currency: "usd".into(),
        }
    }

    #[tokio::test]
    async fn a_created_order_is_stored_pending_and_queued() {
        let queue = Arc::new(RecordingQueue::default());
        let service = Service::new(Arc::new(MemoryStore::new()), queue.clone());
        let order = service
            .create_order(&request(), None)
            .await
            .unwrap()
            .order()
            .clone();
        assert_eq!(order.status, Status::Pending);
        assert_eq!(order.currency.as_str(), "USD");
        assert_eq!(service.get_order(order.id).await.unwrap(), order);
        assert_eq!(*queue.submitted.lock().unwrap(), vec![order.id]);
    }

    #[tokio::test]
    async fn seeded_ids_repeat_for_the_same_seed_and_are_version_4() {
        let ids = |seed| async move {
            let service = Service::new(
                Arc::new(MemoryStore::new()),
                Arc::new(RecordingQueue::default()),
            )
            .with_seeded_ids(seed);
            let mut ids = Vec::new();
            for _ in 0..5 {
                ids.push(
                    service
                        .create_order(&request(), None)
                        .await
                        .unwrap()
                        .order()
                        .clone()
                        .id,
                );
            }
            ids
        };
        let first = ids(1).await;
        assert_eq!(first, ids(1).await);
        assert_ne!(first, ids(2).await);
        assert!(first.iter().all(|id| id.as_uuid().get_version_num() == 4));
    }

    #[tokio::test]
    async fn a_full_queue_refuses_the_order_and_stores_nothing() {
        for (refusal, expected) in [
            (QueueError::Full, OrderError::QueueFull),
            (QueueError::Closed, OrderError::ShuttingDown),
        ] {
            let store = Arc::new(MemoryStore::new());
            let queue = Arc::new(RecordingQueue {
                refuse: Some(refusal),
                ..Default::default()
            });
            let service = Service::new(store.clone(), queue);
            assert_eq!(
                service.create_order(&request(), None).await.unwrap_err(),
                expected
            );
            assert!(store
                .count_by_status()
                .await
                .unwrap()
                .values()
                .all(|&n| n == 0));
        }
    }

    #[tokio::test]
    async fn invalid_input_names_the_field_and_reserves_nothing() {
        let queue = Arc::new(RecordingQueue::default());
        let service = Service::new(Arc::new(MemoryStore::new()), queue.clone());
        let mut bad = request();
        bad.amount = 0;
        assert_eq!(
            service.create_order(&bad, None).await.unwrap_err().field(),
            Some("amount")
        );
        assert!(queue.submitted.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn update_refuses_illegal_moves_and_stale_expectations() {
        let service = Service::new(
            Arc::new(MemoryStore::new()),
            Arc::new(RecordingQueue::default()),
        );
        let order = service
            .create_order(&request(), None)
            .await
            .unwrap()
            .order()
            .clone();
        let err = service
            .update_order(
                order.id,
                StatusChange::new(Status::Pending, Status::Completed),
            )
            .await
            .unwrap_err();
        assert_eq!(
            err,
            OrderError::IllegalTransition {
                from: Status::Pending,
                to: Status::Completed
            }
        );
        service
            .update_order(
                order.id,
                StatusChange::new(Status::Pending, Status::Processing),
            )
            .await
            .unwrap();
        // A second writer that still believes the order is pending loses.
        let err = service
            .update_order(
                order.id,
                StatusChange::new(Status::Pending, Status::Processing),
            )
            .await
            .unwrap_err();
        assert_eq!(
            err,
            OrderError::IllegalTransition {
                from: Status::Processing,
                to: Status::Processing
            }
        );
        let missing = OrderId::new_random();
        assert_eq!(
            service
                .update_order(
                    missing,
                    StatusChange::new(Status::Pending, Status::Processing)
                )
                .await
                .unwrap_err(),
            OrderError::NotFound(missing)
        );
    }

    /// The memory store, with `insert` held until the gate opens.
    struct Gated {
        inner: MemoryStore,
        gate: tokio::sync::Semaphore,
    }

    #[async_trait::async_trait]
    impl OrderRepository for Gated {
        fn kind(&self) -> &'static str {
            "gated"
        }
        fn durability(&self) -> super::super::Durability {
            self.inner.durability()
        }
        async fn ping(&self) -> Result<(), StoreError> {
            Ok(())
        }
        async fn insert(&self, order: &Order) -> Result<bool, StoreError> {
            let _open = self.gate.acquire().await.expect("the gate stays");
            self.inner.insert(order).await
        }
        async fn insert_with_key(
            &self,
            order: &Order,
            key: &str,
            digest: &str,
        ) -> Result<super::super::KeyedInsert, StoreError> {
            self.inner.insert_with_key(order, key, digest).await
        }
        async fn get(&self, id: OrderId) -> Result<Option<Order>, StoreError> {
            self.inner.get(id).await
        }
        async fn update_status(
            &self,
            id: OrderId,
            change: &StatusChange,
        ) -> Result<super::super::UpdateOutcome, StoreError> {
            self.inner.update_status(id, change).await
        }
        async fn count_by_status(&self) -> Result<super::super::StatusCounts, StoreError> {
            self.inner.count_by_status().await
        }
        async fn purge_keys_older_than(&self, age: Duration) -> Result<u64, StoreError> {
            self.inner.purge_keys_older_than(age).await
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_who_leaves_mid_write_still_gets_the_order_stored_and_queued() {
        let queue = Arc::new(RecordingQueue::default());
        let store = Arc::new(Gated {
            inner: MemoryStore::new(),
            gate: tokio::sync::Semaphore::new(0),
        });
        let service = Service::new(store.clone(), queue.clone());
        // The caller gives up while the store is still writing (its future
        // is dropped, as hyper drops a request's when the client hangs up).
        let gave_up = tokio::time::timeout(
            Duration::from_secs(1),
            service.create_order(&request(), None),
        )
        .await;
        assert!(gave_up.is_err(), "the write was held");
        assert!(queue.submitted.lock().unwrap().is_empty());
        store.gate.add_permits(1);
        tokio::time::sleep(Duration::from_millis(1)).await;
        let queued = queue.submitted.lock().unwrap().clone();
        assert_eq!(queued.len(), 1, "the write went on without its caller");
        let stored = service.get_order(queued[0]).await.unwrap();
        assert_eq!(stored.status, Status::Pending);
    }
}
