//! The order service: the operations the API and the workers perform.

use std::sync::{Arc, Mutex};

use chrono::Utc;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Deserialize;
use tracing::instrument;

use super::{
    Amount, Currency, CustomerId, NewOrder, Order, OrderError, OrderId, OrderRepository,
    ProcessingQueue, QueueError, StatusChange, StatusCounts,
};

/// The body of `POST /orders`, as the client sent it. Unknown fields are refused.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateOrderRequest {
    pub customer_id: String,
    pub amount: i64,
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
}

impl Service {
    pub fn new(repo: Arc<dyn OrderRepository>, queue: Arc<dyn ProcessingQueue>) -> Self {
        Self {
            repo,
            queue,
            seeded_ids: None,
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
    /// nothing is stored. If storing fails, the dropped slot frees its room.
    #[instrument(skip_all, fields(order_id))]
    pub async fn create_order(&self, request: &CreateOrderRequest) -> Result<Order, OrderError> {
        let new = request.parse()?;
        let slot = self.queue.try_reserve().map_err(|e| match e {
            QueueError::Full => OrderError::QueueFull,
            QueueError::Closed => OrderError::ShuttingDown,
        })?;
        let order = Order::new(self.next_id(), new, Utc::now());
        tracing::Span::current().record("order_id", tracing::field::display(order.id));
        if !self.repo.insert(&order).await? {
            return Err(OrderError::Duplicate(order.id));
        }
        slot.submit(order.id);
        tracing::debug!("order accepted and queued");
        Ok(order)
    }

    pub async fn get_order(&self, id: OrderId) -> Result<Order, OrderError> {
        self.repo.get(id).await?.ok_or(OrderError::NotFound(id))
    }

    /// Moves an order from one status to another, if the move is legal and
    /// the order is still where the caller expects it.
    #[instrument(skip_all, fields(order_id = %id, from = %change.from, to = %change.to))]
    pub async fn update_order(
        &self,
        id: OrderId,
        change: StatusChange,
    ) -> Result<Order, OrderError> {
        change.from.check_move(change.to)?;
        match self.repo.update_status(id, &change).await? {
            None => Err(OrderError::NotFound(id)),
            Some(Ok(order)) => Ok(order),
            Some(Err(actual)) => Err(OrderError::IllegalTransition {
                from: actual,
                to: change.to,
            }),
        }
    }

    pub async fn count_by_status(&self) -> Result<StatusCounts, OrderError> {
        Ok(self.repo.count_by_status().await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::orders::memory::MemoryStore;
    use crate::orders::{QueueSlot, Status};
    use std::sync::Mutex;

    /// A queue that records what it was given and can be set to refuse.
    #[derive(Default)]
    struct RecordingQueue {
        refuse: Option<QueueError>,
        submitted: Arc<Mutex<Vec<OrderId>>>,
    }

    struct Slot(Arc<Mutex<Vec<OrderId>>>);

    impl QueueSlot for Slot {
        fn submit(self: Box<Self>, order_id: OrderId) {
            self.0.lock().unwrap().push(order_id);
        }
    }

    impl ProcessingQueue for RecordingQueue {
        fn try_reserve(&self) -> Result<Box<dyn QueueSlot>, QueueError> {
            match self.refuse {
                Some(e) => Err(e),
                None => Ok(Box::new(Slot(self.submitted.clone()))),
            }
        }
    }

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
        let order = service.create_order(&request()).await.unwrap();
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
                ids.push(service.create_order(&request()).await.unwrap().id);
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
                service.create_order(&request()).await.unwrap_err(),
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
            service.create_order(&bad).await.unwrap_err().field(),
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
        let order = service.create_order(&request()).await.unwrap();
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
}
