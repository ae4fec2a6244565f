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

    /// Hands back an order that was queued before (a deferred order put
    /// back): the same as `submit`, but not counted as a new one.
    fn resubmit(self: Box<Self>, order_id: OrderId) {
        self.submit(order_id);
    }
}

/// A bounded queue of orders waiting to be processed.
pub trait ProcessingQueue: Send + Sync {
    /// Reserves room for one job without waiting.
    fn try_reserve(&self) -> Result<Box<dyn QueueSlot>, QueueError>;

    /// Reserves room for a background loop's job: the same as
    /// `try_reserve`, but a full queue is not counted as a refused request.
    fn try_reserve_background(&self) -> Result<Box<dyn QueueSlot>, QueueError> {
        self.try_reserve()
    }
}

/// A queue for unit tests: it records the orders it is given, and refuses
/// with `refuse` when that is set, or once its `room` (when bounded) is used.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::{Arc, Mutex};

    use super::{OrderId, ProcessingQueue, QueueError, QueueSlot};

    #[derive(Default)]
    pub struct RecordingQueue {
        pub refuse: Option<QueueError>,
        pub room: Option<Mutex<usize>>,
        pub submitted: Arc<Mutex<Vec<OrderId>>>,
    }

    impl RecordingQueue {
        /// Room for `n` orders, then `Full`.
        pub fn with_room(n: usize) -> Self {
            Self {
                room: Some(Mutex::new(n)),
                ..Self::default()
            }
        }
    }

    struct Slot(Arc<Mutex<Vec<OrderId>>>);

    impl QueueSlot for Slot {
        fn submit(self: Box<Self>, order_id: OrderId) {
            self.0.lock().unwrap().push(order_id);
        }
    }

    impl ProcessingQueue for RecordingQueue {
        fn try_reserve(&self) -> Result<Box<dyn QueueSlot>, QueueError> {
            if let Some(e) = self.refuse {
                return Err(e);
            }
            if let Some(room) = &self.room {
                let mut room = room.lock().unwrap();
                if *room == 0 {
                    return Err(QueueError::Full);
                }
                *room -= 1;
            }
            Ok(Box::new(Slot(self.submitted.clone())))
        }
    }
}
