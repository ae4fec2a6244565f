//! A bounded tokio mpsc channel drained by `WORKER_COUNT` worker tasks.
//!
//! Shutdown is two-step: `stop()` closes the channel, and workers finish
//! every job already queued before they exit (`wait()` returns then). If that
//! takes too long, `cancel()` fires the workers' own token: the job in hand is
//! interrupted and hands its order back. The token is the dispatcher's, not
//! the signal's, so a shutdown drains first and cancels only after.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::observability::metrics::WorkerMetrics;
use crate::orders::OrderId;

/// One unit of background work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Job {
    pub order_id: OrderId,
}

/// What a worker runs for each job.
#[async_trait]
pub trait JobHandler: Send + Sync + 'static {
    /// Processes one job. `cancel` fires when the dispatcher gives up draining.
    async fn handle(&self, job: Job, cancel: CancellationToken);
}

/// Why no room could be reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReserveError {
    #[error("queue full")]
    Full,
    #[error("queue closed")]
    Closed,
}

/// Room for one job, reserved ahead. Dropping it gives the room back.
pub struct Reservation {
    permit: mpsc::OwnedPermit<Job>,
    shared: Arc<Shared>,
}

impl Reservation {
    /// Queues the job in the reserved room; this cannot fail.
    pub fn send(self, job: Job) {
        self.shared.metrics.job_submitted();
        self.resend(job);
    }

    /// Queues a job that was submitted once before (a deferred order put
    /// back), without counting it as submitted again.
    pub fn resend(self, job: Job) {
        // Count before sending so a fast worker never drives the gauge negative.
        let depth = self.shared.depth.fetch_add(1, Ordering::SeqCst) + 1;
        self.shared.metrics.set_queue_depth(depth);
        self.permit.send(job);
    }
}

struct Shared {
    depth: AtomicUsize,
    busy: AtomicUsize,
    metrics: WorkerMetrics,
}

/// The queue and its workers.
pub struct Dispatcher {
    sender: Mutex<Option<mpsc::Sender<Job>>>,
    receiver: Arc<tokio::sync::Mutex<mpsc::Receiver<Job>>>,
    capacity: usize,
    shared: Arc<Shared>,
    tracker: TaskTracker,
    token: CancellationToken,
}

impl Dispatcher {
    /// A queue with room for `capacity` jobs; no workers run until `start`.
    pub fn new(capacity: usize, metrics: WorkerMetrics) -> Self {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        Self {
            sender: Mutex::new(Some(tx)),
            receiver: Arc::new(tokio::sync::Mutex::new(rx)),
            capacity: capacity.max(1),
            shared: Arc::new(Shared {
                depth: AtomicUsize::new(0),
                busy: AtomicUsize::new(0),
                metrics,
            }),
            tracker: TaskTracker::new(),
            token: CancellationToken::new(),
        }
    }

    /// Spawns `workers` worker tasks running `handler`.
    pub fn start(&self, workers: usize, handler: Arc<dyn JobHandler>) {
        for worker in 0..workers {
            let receiver = self.receiver.clone();
            let token = self.token.clone();
            let shared = self.shared.clone();
            let handler = handler.clone();
            self.tracker.spawn(async move {
                tracing::debug!(worker, "worker started");
                loop {
                    let job = tokio::select! {
                        biased;
                        _ = token.cancelled() => None,
                        job = async { receiver.lock().await.recv().await } => job,
                    };
                    // None: the channel is closed and empty, or we were cancelled.
                    let Some(job) = job else { break };
                    let depth = shared
                        .depth
                        .fetch_sub(1, Ordering::SeqCst)
                        .saturating_sub(1);
                    shared.metrics.set_queue_depth(depth);
                    let busy = shared.busy.fetch_add(1, Ordering::SeqCst) + 1;
                    shared.metrics.set_busy(busy);
                    handler.handle(job, token.clone()).await;
                    let busy = shared.busy.fetch_sub(1, Ordering::SeqCst) - 1;
                    shared.metrics.set_busy(busy);
                }
                tracing::debug!(worker, "worker stopped");
            });
        }
        self.tracker.close();
    }

    /// Reserves room for one job without waiting; a full queue counts as a
    /// refused request.
    pub fn try_reserve(&self) -> Result<Reservation, ReserveError> {
        let reserved = self.try_reserve_uncounted();
        if matches!(reserved, Err(ReserveError::Full)) {
            self.shared.metrics.job_rejected();
        }
        reserved
    }

    /// Reserves room for one job without waiting, counting nothing (for
    /// the background loops).
    pub fn try_reserve_uncounted(&self) -> Result<Reservation, ReserveError> {
        let sender = self
            .sender
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(ReserveError::Closed)?;
        match sender.try_reserve_owned() {
            Ok(permit) => Ok(Reservation {
                permit,
                shared: self.shared.clone(),
            }),
            Err(mpsc::error::TrySendError::Full(_)) => Err(ReserveError::Full),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(ReserveError::Closed),
        }
    }

    /// Jobs waiting in the queue.
    pub fn depth(&self) -> usize {
        self.shared.depth.load(Ordering::SeqCst)
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Workers currently running a job.
    pub fn busy(&self) -> usize {
        self.shared.busy.load(Ordering::SeqCst)
    }

    /// Closes the queue: no new jobs; workers drain what is queued, then exit.
    /// Reservations already handed out can still be filled.
    pub fn stop(&self) {
        self.sender.lock().unwrap_or_else(|p| p.into_inner()).take();
        // A dispatcher whose workers never started has nothing to wait for.
        self.tracker.close();
    }

    /// Returns once every worker has exited.
    pub async fn wait(&self) {
        self.tracker.wait().await;
    }

    /// Interrupts the workers: each hands its current order back and exits.
    pub fn cancel(&self) {
        self.token.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observability::Metrics;
    use std::time::Duration;

    /// Takes a fixed time per job and records what it saw.
    struct Slow {
        took: Duration,
        done: Mutex<Vec<OrderId>>,
        interrupted: Mutex<Vec<OrderId>>,
    }

    #[async_trait]
    impl JobHandler for Slow {
        async fn handle(&self, job: Job, cancel: CancellationToken) {
            tokio::select! {
                _ = tokio::time::sleep(self.took) => self.done.lock().unwrap().push(job.order_id),
                _ = cancel.cancelled() => self.interrupted.lock().unwrap().push(job.order_id),
            }
        }
    }

    fn slow(ms: u64) -> Arc<Slow> {
        Arc::new(Slow {
            took: Duration::from_millis(ms),
            done: Mutex::default(),
            interrupted: Mutex::default(),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_refuses_and_a_dropped_reservation_gives_room_back() {
        let d = Dispatcher::new(2, Metrics::new().workers());
        let a = d.try_reserve().unwrap();
        let _b = d.try_reserve().unwrap();
        assert_eq!(d.try_reserve().err(), Some(ReserveError::Full));
        drop(a);
        assert!(d.try_reserve().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn stop_drains_every_queued_job_before_the_workers_exit() {
        let d = Dispatcher::new(10, Metrics::new().workers());
        let handler = slow(100);
        let ids: Vec<OrderId> = (0..7).map(|_| OrderId::new_random()).collect();
        for id in &ids {
            d.try_reserve().unwrap().send(Job { order_id: *id });
        }
        assert_eq!(d.depth(), 7);
        d.start(2, handler.clone());
        d.stop();
        assert_eq!(d.try_reserve().err(), Some(ReserveError::Closed));
        d.wait().await;
        let mut done = handler.done.lock().unwrap().clone();
        done.sort();
        let mut expected = ids.clone();
        expected.sort();
        assert_eq!(done, expected);
        assert_eq!(d.depth(), 0);
        assert_eq!(d.busy(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dispatcher_never_started_stops_at_once() {
        let d = Dispatcher::new(10, Metrics::new().workers());
        d.try_reserve().unwrap().send(Job {
            order_id: OrderId::new_random(),
        });
        d.stop();
        tokio::time::timeout(Duration::from_secs(1), d.wait())
            .await
            .expect("nothing to wait for");
        assert_eq!(d.depth(), 1, "the job stays queued (and its order pending)");
    }

    #[tokio::test(start_paused = true)]
    async fn cancel_interrupts_the_jobs_in_hand_and_ends_the_workers() {
        let d = Dispatcher::new(10, Metrics::new().workers());
        let handler = slow(10_000);
        for _ in 0..4 {
            d.try_reserve().unwrap().send(Job {
                order_id: OrderId::new_random(),
            });
        }
        d.start(2, handler.clone());
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(d.busy(), 2);
        d.stop();
        d.cancel();
        d.wait().await;
        assert_eq!(handler.interrupted.lock().unwrap().len(), 2);
        assert!(handler.done.lock().unwrap().is_empty());
        assert_eq!(
            d.depth(),
            2,
            "the two never started stay queued (and pending)"
        );
    }
}
