//! The in-memory store: the default when `DATABASE_URL` is unset.
//!
//! Nothing survives a restart (`durability: none`); while the process runs it
//! keeps every order it accepted. It has no leases: one process owns all.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, SubsecRound, Utc};

use super::{
    KeyedInsert, Order, OrderId, OrderRepository, Status, StatusChange, StatusCounts, StoreError,
    UpdateOutcome,
};

#[derive(Default)]
pub struct MemoryStore {
    inner: RwLock<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Boxed: the table grows in powers of two, so its empty slots cost the
    /// size of an entry; a box keeps entries small (measured per order).
    orders: HashMap<OrderId, Box<Order>>,
    /// Idempotency key -> (request digest, order, when stored).
    keys: HashMap<String, (String, OrderId, DateTime<Utc>)>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }
}

fn poisoned() -> StoreError {
    StoreError::Other("in-memory store lock poisoned".into())
}

#[async_trait]
impl OrderRepository for MemoryStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn durability(&self) -> &'static str {
        "none"
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.read().map(|_| ()).map_err(|_| poisoned())
    }

    async fn insert(&self, order: &Order) -> Result<bool, StoreError> {
        let mut inner = self.inner.write().map_err(|_| poisoned())?;
        if inner.orders.contains_key(&order.id) {
            return Ok(false);
        }
        inner.orders.insert(order.id, Box::new(order.clone()));
        Ok(true)
    }

    async fn insert_with_key(
        &self,
        order: &Order,
        key: &str,
        request_digest: &str,
    ) -> Result<KeyedInsert, StoreError> {
        let mut inner = self.inner.write().map_err(|_| poisoned())?;
        if let Some((digest, existing, _)) = inner.keys.get(key) {
            let same_request = digest == request_digest;
            let order = inner
                .orders
                .get(existing)
                .map(|o| Order::clone(o))
                .ok_or_else(|| StoreError::Other("idempotency key names a missing order".into()))?;
            return Ok(KeyedInsert::Existing {
                order,
                same_request,
            });
        }
        if inner.orders.contains_key(&order.id) {
            return Err(StoreError::Other(format!(
                "order id {} already taken",
                order.id
            )));
        }
        inner.orders.insert(order.id, Box::new(order.clone()));
        inner.keys.insert(
            key.to_owned(),
            (request_digest.to_owned(), order.id, Utc::now()),
        );
        Ok(KeyedInsert::Created)
    }

    async fn get(&self, id: OrderId) -> Result<Option<Order>, StoreError> {
        Ok(self
            .inner
            .read()
            .map_err(|_| poisoned())?
            .orders
            .get(&id)
            .map(|o| Order::clone(o)))
    }

    async fn update_status(
        &self,
        id: OrderId,
        change: &StatusChange,
    ) -> Result<UpdateOutcome, StoreError> {
        let mut inner = self.inner.write().map_err(|_| poisoned())?;
        let Some(order) = inner.orders.get_mut(&id) else {
            return Ok(UpdateOutcome::NotFound);
        };
        if order.status != change.from {
            return Ok(UpdateOutcome::WrongStatus(order.status));
        }
        order.status = change.to;
        if let Some(attempts) = change.attempts {
            order.attempts = attempts;
        }
        if let Some(reason) = &change.last_error {
            order.last_error = Some(reason.clone());
        }
        order.updated_at = Utc::now().trunc_subsecs(6);
        Ok(UpdateOutcome::Updated(Order::clone(order)))
    }

    async fn count_by_status(&self) -> Result<StatusCounts, StoreError> {
        let inner = self.inner.read().map_err(|_| poisoned())?;
        let mut counts: StatusCounts = Status::ALL.into_iter().map(|s| (s, 0)).collect();
        for order in inner.orders.values() {
            *counts.entry(order.status).or_default() += 1;
        }
        Ok(counts)
    }

    async fn purge_keys_older_than(&self, age: Duration) -> Result<u64, StoreError> {
        let cutoff = Utc::now() - chrono::Duration::from_std(age).unwrap_or(chrono::Duration::MAX);
        let mut inner = self.inner.write().map_err(|_| poisoned())?;
        let before = inner.keys.len();
        inner.keys.retain(|_, (_, _, at)| *at >= cutoff);
        Ok((before - inner.keys.len()) as u64)
    }
}
