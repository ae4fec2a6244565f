//! The storage interface the order service needs.

use std::collections::BTreeMap;

use async_trait::async_trait;

use super::{Order, OrderId, Status, StatusChange, StoreError};

/// How many orders are in each status.
pub type StatusCounts = BTreeMap<Status, u64>;

/// Where orders live. Implemented by the in-memory and the Postgres stores;
/// one contract test suite runs against both.
#[async_trait]
pub trait OrderRepository: Send + Sync {
    /// A short name for logs and `/readyz`: `memory` or `postgres`.
    fn kind(&self) -> &'static str;

    /// Whether orders survive a restart: `none` or `durable`.
    fn durability(&self) -> &'static str;

    /// Answers when the store can serve requests.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Stores a new order. Returns `Ok(false)` if the id is already taken.
    async fn insert(&self, order: &Order) -> Result<bool, StoreError>;

    async fn get(&self, id: OrderId) -> Result<Option<Order>, StoreError>;

    /// Applies `change` only if the order is currently in `change.from`.
    ///
    /// Returns the updated order, `Ok(None)` when no order has this id, and
    /// `Err(actual_status)` inside `Ok(Err(..))` when the order is in another
    /// status, so that two writers can never both move the same order.
    async fn update_status(
        &self,
        id: OrderId,
        change: &StatusChange,
    ) -> Result<Option<Result<Order, Status>>, StoreError>;

    async fn count_by_status(&self) -> Result<StatusCounts, StoreError>;
}
