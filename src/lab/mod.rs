//! The lab's own instruments: a traffic generator that drives the service
//! through its own listener, and a timeline recorder that samples the
//! pipeline, both publishing on one feed that the console page follows.
//!
//! They read the service only through the handles the composition root
//! gives them (counters, the queue, the breaker, the simulator) and know
//! nothing of HTTP routes; `http` turns them into endpoints and events.

pub mod events;
pub mod sample;
pub mod timeline;
pub mod traffic;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

pub use events::{Change, ChangeKind, Feed, LabEvent};
pub use sample::Sample;
pub use timeline::Timeline;
pub use traffic::{
    ClientBehaviour, LoadError, LoadOutcomes, LoadPlan, LoadStatus, Traffic, MAX_CLIENT_RETRIES,
    MAX_CLIENT_WAIT, MAX_RATE, MIN_RATE,
};

/// The instruments of one running service.
#[derive(Debug, Clone)]
pub struct Instruments {
    pub feed: Arc<Feed>,
    pub timeline: Arc<Timeline>,
    pub traffic: Arc<Traffic>,
    /// Cancelled when the service stops: event streams end, so that a page
    /// left open does not hold up the shutdown.
    pub closing: CancellationToken,
}
