//! What the order service needs from a background queue.
//!
//! Admission is two-phase so that no accepted order is left without a job and
//! no job without an order: the service first reserves a slot (and refuses the
//! request if there is none), then stores the order, then fills the slot.
//! A slot dropped without being filled gives its room back.

use super::OrderId;

/// Why a slot could not be had.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    #[error("queue full")]
    Full,
    #[error("queue closed")]
    Closed,
}

/// A reserved place in the queue.
pub trait QueueSlot: Send {
    /// Hands the order to the queue. It cannot fail: the room was reserved.
    fn submit(self: Box<Self>, order_id: OrderId);
}

/// A bounded queue of orders waiting to be processed.
pub trait ProcessingQueue: Send + Sync {
    /// Reserves room for one job without waiting.
    fn try_reserve(&self) -> Result<Box<dyn QueueSlot>, QueueError>;
}
