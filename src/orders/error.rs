//! The domain's errors: what went wrong, in terms a caller can act on.

use super::{OrderId, Status};

/// What a storage backend can report.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    /// The store cannot be reached right now (Postgres down, pool exhausted).
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store holds as many orders as it may, none of them finished.
    #[error("store full: every stored order is still unfinished")]
    Full,
    /// Any other storage failure.
    #[error("store error: {0}")]
    Other(String),
}

/// Errors of the order service.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum OrderError {
    #[error("order {0} not found")]
    NotFound(OrderId),

    #[error("invalid {field}: {reason}")]
    InvalidInput {
        field: &'static str,
        reason: &'static str,
    },

    /// The move is not one of the legal ones, or the order is no longer in
    /// the status the change expected (another writer moved it first).
    #[error("illegal transition from {from} to {to}")]
    IllegalTransition { from: Status, to: Status },

    #[error("an order with id {0} already exists")]
    Duplicate(OrderId),

    /// Another replica holds the order's lease: it is not ours to move.
    #[error("order {0} is leased to another replica")]
    LeaseHeldElsewhere(OrderId),

    /// The idempotency key was used before with a different request.
    #[error("this Idempotency-Key was already used with a different request")]
    IdempotencyKeyReused,

    /// The processing queue has no room; nothing was stored.
    #[error("the processing queue is full")]
    QueueFull,

    /// The service is shutting down and takes no new work; nothing was stored.
    #[error("the service is shutting down")]
    ShuttingDown,

    #[error(transparent)]
    Storage(#[from] StoreError),
}

impl OrderError {
    pub fn invalid(field: &'static str, reason: &'static str) -> Self {
        Self::InvalidInput { field, reason }
    }

    /// The input field an `InvalidInput` names.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            Self::InvalidInput { field, .. } => Some(field),
            _ => None,
        }
    }
}
