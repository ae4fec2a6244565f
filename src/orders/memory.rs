//! The in-memory store: the default when `DATABASE_URL` is unset.
//!
//! Nothing survives a restart (`durability: none`); while the process runs it
//! keeps every order it accepted.

use std::collections::HashMap;
use std::sync::RwLock;

use async_trait::async_trait;
use chrono::{SubsecRound, Utc};

use super::{Order, OrderId, OrderRepository, Status, StatusChange, StatusCounts, StoreError};

#[derive(Default)]
pub struct MemoryStore {
    orders: RwLock<HashMap<OrderId, Order>>,
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
        self.orders.read().map(|_| ()).map_err(|_| poisoned())
    }

    async fn insert(&self, order: &Order) -> Result<bool, StoreError> {
        let mut orders = self.orders.write().map_err(|_| poisoned())?;
        if orders.contains_key(&order.id) {
            return Ok(false);
        }
        orders.insert(order.id, order.clone());
        Ok(true)
    }

    async fn get(&self, id: OrderId) -> Result<Option<Order>, StoreError> {
        Ok(self
            .orders
            .read()
            .map_err(|_| poisoned())?
            .get(&id)
            .cloned())
    }

    async fn update_status(
        &self,
        id: OrderId,
        change: &StatusChange,
    ) -> Result<Option<Result<Order, Status>>, StoreError> {
        let mut orders = self.orders.write().map_err(|_| poisoned())?;
        let Some(order) = orders.get_mut(&id) else {
            return Ok(None);
        };
        if order.status != change.from {
            return Ok(Some(Err(order.status)));
        }
        order.status = change.to;
        if let Some(attempts) = change.attempts {
            order.attempts = attempts;
        }
        if let Some(reason) = &change.last_error {
            order.last_error = Some(reason.clone());
        }
        order.updated_at = Utc::now().trunc_subsecs(6);
        Ok(Some(Ok(order.clone())))
    }

    async fn count_by_status(&self) -> Result<StatusCounts, StoreError> {
        let orders = self.orders.read().map_err(|_| poisoned())?;
        let mut counts: StatusCounts = Status::ALL.into_iter().map(|s| (s, 0)).collect();
        for order in orders.values() {
            *counts.entry(order.status).or_default() += 1;
        }
        Ok(counts)
    }
}
