//! The job run for each order: pending -> processing, charge the payment
//! service through retry-around-breaker, then completed or failed.
//!
//! If the worker's token fires mid-job (a shutdown that ran out of time), the
//! order is handed back to pending rather than left processing forever.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::observability::Metrics;
use crate::orders::{OrderError, OrderId, Service, Status, StatusChange};
use crate::payment::{PaymentError, Simulator};
use crate::reliability::{CallError, Classify, Reliability};

use super::{Job, JobHandler};

/// What a job ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Completed,
    Failed(String),
    Interrupted,
}

/// Processes orders; one instance is shared by every worker.
pub struct OrderProcessor {
    service: Service,
    payment: Arc<Simulator>,
    reliability: Reliability,
    metrics: Arc<Metrics>,
}

impl OrderProcessor {
    pub fn new(
        service: Service,
        payment: Arc<Simulator>,
        reliability: Reliability,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            service,
            payment,
            reliability,
            metrics,
        }
    }

    async fn process(&self, id: OrderId, cancel: CancellationToken) {
        match self
            .service
            .update_order(id, StatusChange::new(Status::Pending, Status::Processing))
            .await
        {
            Ok(_) => {}
            Err(err @ (OrderError::NotFound(_) | OrderError::IllegalTransition { .. })) => {
                // Someone else moved it first; it is not ours to process.
                tracing::warn!(error = %err, "skipping job");
                return;
            }
            Err(err) => {
                tracing::error!(error = %err, "could not start processing; order stays pending");
                return;
            }
        }

        let attempts = AtomicU32::new(0);
        let charge = self.reliability.call(|| {
            let attempts = &attempts;
            let cancel = &cancel;
            async move {
                // Runs only when the breaker admitted the call.
                attempts.fetch_add(1, Ordering::SeqCst);
                let result = self.payment.charge(id, cancel).await;
                if let Err(err) = &result {
                    if err.counts_as_failure() {
                        self.metrics.payment_failures_total.inc();
                    }
                }
                result
            }
        });
        let outcome = tokio::select! {
            biased;
            _ = cancel.cancelled() => Outcome::Interrupted,
            result = charge => match result {
                Ok(()) => Outcome::Completed,
                Err(CallError::Failed(PaymentError::Cancelled)) => Outcome::Interrupted,
                Err(err) => Outcome::Failed(err.to_string()),
            },
        };
        let attempts = attempts.load(Ordering::SeqCst);

        let change = StatusChange::new(Status::Processing, Status::Pending).with_attempts(attempts);
        let change = match &outcome {
            Outcome::Completed => StatusChange {
                to: Status::Completed,
                ..change
            },
            Outcome::Failed(reason) => StatusChange {
                to: Status::Failed,
                ..change
            }
            .with_last_error(reason.clone()),
            Outcome::Interrupted => change.with_last_error("interrupted by shutdown; handed back"),
        };
        match self.service.update_order(id, change).await {
            Ok(order) => {
                match &outcome {
                    Outcome::Completed => {
                        self.metrics
                            .worker_jobs_total
                            .with_label_values(&["completed"])
                            .inc();
                        tracing::info!(attempts, "order completed");
                    }
                    Outcome::Failed(reason) => {
                        self.metrics
                            .worker_jobs_total
                            .with_label_values(&["failed"])
                            .inc();
                        tracing::warn!(attempts, reason = %reason, "order failed");
                    }
                    Outcome::Interrupted => {
                        tracing::warn!(attempts, "order interrupted by shutdown; back to pending");
                    }
                }
                debug_assert_eq!(order.attempts, attempts);
            }
            Err(err) => {
                tracing::error!(error = %err, ?outcome, "could not record the outcome");
            }
        }
    }
}

#[async_trait]
impl JobHandler for OrderProcessor {
    async fn handle(&self, job: Job, cancel: CancellationToken) {
        let span = tracing::info_span!("job", order_id = %job.order_id);
        self.process(job.order_id, cancel).instrument(span).await;
    }
}
