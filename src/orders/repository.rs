//! The storage interface the order service needs.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;

use chrono::{DateTime, Utc};

use super::{Order, OrderId, Status, StatusChange, StoreError};

/// Whether a store's orders survive a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// Kept in this process's memory: lost on restart, owned by one process.
    None,
    /// Kept in a database shared by replicas, with leases and recovery.
    Durable,
}

impl Durability {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Durable => "durable",
        }
    }
}

/// How many orders are in each status.
pub type StatusCounts = BTreeMap<Status, u64>;

/// What a conditional status change did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpdateOutcome {
    Updated(Order),
    NotFound,
    /// The order is in another status than the change expected.
    WrongStatus(Status),
    /// The order's lease belongs to another replica (durable stores only).
    LeaseHeldElsewhere,
}

/// What storing an order under an idempotency key did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyedInsert {
    /// The key was new: the order is stored.
    Created,
    /// The key was taken: nothing was stored. `same_request` says whether it
    /// came with the same request (a replay) or another (a conflict).
    Existing { order: Order, same_request: bool },
}

/// Where orders live. Implemented by the in-memory and the Postgres stores;
/// one contract test suite runs against both.
///
/// Durable stores also keep **leases**: an order that is queued or processing
/// belongs to one replica until its lease expires. The lease methods have
/// defaults for stores without leases (one process, nothing to recover).
#[async_trait]
pub trait OrderRepository: Send + Sync {
    /// A short name for logs and `/readyz`: `memory` or `postgres`.
    fn kind(&self) -> &'static str;

    /// Whether orders survive a restart (and leases need keeping).
    fn durability(&self) -> Durability;

    /// How long this store's leases last from a grant or a renewal
    /// (`JOB_LEASE`), when it keeps leases and knows it.
    fn lease_duration(&self) -> Option<Duration> {
        None
    }

    /// Answers when the store can serve requests.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Stores a new order (under this replica's lease, where there are
    /// leases). Returns `Ok(false)` if the id is already taken.
    async fn insert(&self, order: &Order) -> Result<bool, StoreError>;

    /// Stores a new order unless `key` already names one, in one atomic step:
    /// of two racing requests with the same key, exactly one creates.
    async fn insert_with_key(
        &self,
        order: &Order,
        key: &str,
        request_digest: &str,
    ) -> Result<KeyedInsert, StoreError>;

    async fn get(&self, id: OrderId) -> Result<Option<Order>, StoreError>;

    /// Applies `change` only if the order is currently in `change.from` (and,
    /// with leases, only while this replica may hold its lease), so two
    /// writers can never both move one order.
    async fn update_status(
        &self,
        id: OrderId,
        change: &StatusChange,
    ) -> Result<UpdateOutcome, StoreError>;

    async fn count_by_status(&self) -> Result<StatusCounts, StoreError>;

    /// Extends the leases of `ids` that this replica still holds (an order
    /// another replica took over, or that finished, is left alone). Returns
    /// the ones it extended.
    async fn renew_leases(&self, _ids: &[OrderId]) -> Result<Vec<OrderId>, StoreError> {
        Ok(Vec::new())
    }

    /// How many open orders have an expired lease, waiting to be taken over.
    async fn count_expired(&self) -> Result<u64, StoreError> {
        Ok(0)
    }

    /// Takes over at most `limit` open orders whose lease expired, moves them
    /// to pending under this replica, and returns their ids to queue.
    async fn take_over_expired(&self, _limit: usize) -> Result<Vec<OrderId>, StoreError> {
        Ok(Vec::new())
    }

    /// Lets go of this replica's leases at once (clean shutdown), so another
    /// replica can take its unfinished orders without waiting out the lease.
    async fn release_leases(&self) -> Result<u64, StoreError> {
        Ok(0)
    }

    /// Forgets idempotency keys older than `age`.
    async fn purge_keys_older_than(&self, age: Duration) -> Result<u64, StoreError>;

    /// How many orders are deferred now. The deferral methods' defaults
    /// suit a stand-in store that never holds a deferred order; both real
    /// stores implement all three (the contract suite runs them on both).
    async fn count_deferred(&self) -> Result<u64, StoreError> {
        Ok(0)
    }

    /// Moves at most `limit` deferred orders, the earliest created first,
    /// back to pending (under this replica's lease, where there are leases)
    /// and returns their ids to queue. Each order is taken by one caller
    /// only, however many replicas ask at once.
    async fn take_deferred(&self, _limit: usize) -> Result<Vec<OrderId>, StoreError> {
        Ok(Vec::new())
    }

    /// Fails every deferred order created before `created_before` (its
    /// deadline passed), with `reason` as its last error, and returns them.
    async fn expire_deferred(
        &self,
        _created_before: DateTime<Utc>,
        _reason: &str,
    ) -> Result<Vec<Order>, StoreError> {
        Ok(Vec::new())
    }
}
