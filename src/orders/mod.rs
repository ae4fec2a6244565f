//! The order domain: the model, the service, and the interfaces it needs.
//!
//! This module owns the traits it depends on (`OrderRepository` for storage,
//! `ProcessingQueue` for background work) and imports neither the HTTP layer
//! nor the workers. The composition root adapts concrete providers to them.

mod error;
pub(crate) mod group_commit;
pub mod memory;
mod model;
pub(crate) mod pg_sql;
pub mod pg_tls;
pub mod postgres;
mod queue;
mod repository;
mod service;
mod timestamp;

pub use error::{OrderError, StoreError};
pub use model::{Amount, Currency, CustomerId, NewOrder, Order, OrderId, Status, StatusChange};
#[cfg(test)]
pub(crate) use queue::testing;
pub use queue::{ProcessingQueue, QueueError, QueueSlot};
pub use repository::{Durability, KeyedInsert, OrderRepository, StatusCounts, UpdateOutcome};
pub use service::{CreateOrderRequest, Creation, Service, IDEMPOTENCY_KEY_TTL};
