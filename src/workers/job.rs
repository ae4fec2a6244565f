//! The job run for each order: pending -> processing, charge the payment
//! service through retry-around-breaker, then completed or failed.
//!
//! Each charge call is bounded by `PAYMENT_TIMEOUT`, inside the breaker's
//! call, so a timeout counts as a failure for the breaker and is retried like
//! any transient failure. If the worker's token fires mid-job (a shutdown
//! that ran out of time), the order is handed back to pending rather than
//! left processing forever. With deferral on (`BREAKER_DEFER`), an order
//! whose charge the breaker refused is deferred instead of failed, while it
//! is within its deadline (see `deferred`).
//!
//! An outcome the store could not take (Postgres down) is written again,
//! with backoff, until it lands, is refused (the order was taken over), or
//! `OUTCOME_PATIENCE` has passed; then the order is let go and, its lease no
//! longer renewed, the recovery loop takes it over. The write is conditional
//! on the status and the lease, so writing again is always safe. A claim
//! whose answer was lost is let go at once the same way: it may have
//! committed, and only the lease's expiry tells.
//!
//! With leases, no charge attempt starts unless it would end (within
//! `PAYMENT_TIMEOUT`) before the order's lease could run out, judged from
//! when the statement that last granted or renewed it was sent, less a
//! tenth of the lease. A replica cut off from its database stops charging
//! the orders it holds that way, before another replica can take them over;
//! the order is handed back (or, if even that cannot be written, left to the
//! lease's expiry).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::observability::access_log;
use crate::observability::metrics::{PaymentCallMetrics, WorkerMetrics};
use crate::observability::Metrics;
use crate::orders::{Order, OrderError, OrderId, Service, Status, StatusChange};
use crate::payment::client::{HttpPayments, TimeoutScope};
use crate::payment::{ChargeRequest, PaymentError, Simulator};
use crate::reliability::{CallError, Classify, Reliability};

use super::deferred::DeferSettings;
use super::{Job, JobHandler};

/// How long a worker goes on writing an outcome the store could not take
/// before it lets the order go to the recovery loop.
pub const OUTCOME_PATIENCE: Duration = Duration::from_secs(60);
/// The first wait before writing an outcome again; it doubles up to
/// `OUTCOME_RETRY_MAX`.
const OUTCOME_RETRY_FIRST: Duration = Duration::from_millis(100);
const OUTCOME_RETRY_MAX: Duration = Duration::from_secs(5);

/// What a job ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Completed,
    Failed(String),
    /// The breaker refused the charge and the order waits for it to close.
    Deferred(String),
    Interrupted,
    /// The lease could not be renewed for long enough that a charge started
    /// now might end after another replica could take the order over.
    LeaseRunningOut,
}

/// How the retry loop treats the provider's errors. It lives here, with the
/// caller, so that the payment module knows nothing of retries or breakers.
impl Classify for PaymentError {
    /// A cancellation says nothing about the provider: it does not count
    /// towards opening the breaker.
    /// A remote provider's refusal of the request itself (a 4xx) says
    /// nothing of its health either, and is not retried: the same request
    /// would be refused again.
    fn counts_as_failure(&self) -> bool {
        !matches!(self, Self::Cancelled | Self::Refused { .. })
    }

    fn is_retryable(&self) -> bool {
        !matches!(self, Self::Cancelled | Self::Refused { .. })
    }

    /// The provider answered: a charge, a drawn decline, a refusal of the
    /// request, a failure it reported. Not an answer: a timeout, an outage,
    /// no free slot, a busy answer, no connection, a lost one.
    fn is_answer(&self) -> bool {
        matches!(
            self,
            Self::Declined | Self::Refused { .. } | Self::Failed { .. }
        )
    }

    /// A busy provider's `Retry-After`: the next attempt waits at least that.
    fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Busy { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// Processes orders; one instance is shared by every worker.
pub struct OrderProcessor {
    service: Service,
    payment: Arc<Simulator>,
    /// With `PAYMENT_URL`: charges go there instead of to `payment`.
    remote: Option<Arc<HttpPayments>>,
    /// What `timeout` bounds for a remote charge.
    timeout_scope: TimeoutScope,
    reliability: Reliability,
    jobs: WorkerMetrics,
    calls: PaymentCallMetrics,
    timeout: Duration,
    jitter_seed: Option<u64>,
    defer: Option<DeferSettings>,
}

impl OrderProcessor {
    /// A processor bounding each charge call by `timeout`, with unseeded
    /// retry jitter.
    pub fn new(
        service: Service,
        payment: Arc<Simulator>,
        reliability: Reliability,
        metrics: &Metrics,
        timeout: Duration,
    ) -> Self {
        Self {
            service,
            payment,
            remote: None,
            timeout_scope: TimeoutScope::Attempt,
            reliability,
            jobs: metrics.workers(),
            calls: metrics.payment_calls(),
            timeout,
            jitter_seed: None,
            defer: None,
        }
    }

    /// Defers an order whose charge the breaker refused, instead of failing
    /// it, while it is within `settings.max` of being placed (none: fail).
    pub fn with_deferral(mut self, settings: Option<DeferSettings>) -> Self {
        self.defer = settings;
        self
    }

    /// Charges through a remote provider instead of the in-process
    /// simulator, its timeout covering `scope`.
    pub fn with_remote(mut self, remote: Option<Arc<HttpPayments>>, scope: TimeoutScope) -> Self {
        self.remote = remote;
        self.timeout_scope = scope;
        self
    }

    /// Draws each order's retry jitter from `seed` and the order's id, so a
    /// seeded run waits exactly as another run with the same seed.
    pub fn with_jitter_seed(mut self, seed: Option<u64>) -> Self {
        self.jitter_seed = seed;
        self
    }

    /// One charge call, bounded by the per-attempt timeout.
    async fn charge_once(
        &self,
        order: &Order,
        attempt: u32,
        cancel: &CancellationToken,
    ) -> Result<(), PaymentError> {
        let request = ChargeRequest::for_order(
            order.id,
            attempt,
            order.amount.value(),
            order.currency.as_str(),
        );
        let result = match &self.remote {
            // PAYMENT_TIMEOUT_SCOPE=exchange: the client bounds the exchange
            // itself, once it holds a connection.
            Some(remote) if self.timeout_scope == TimeoutScope::Exchange => {
                remote
                    .charge_within(&request, cancel, Some(self.timeout))
                    .await
            }
            remote => {
                let call = async {
                    match remote {
                        Some(remote) => remote.charge(&request, cancel).await,
                        None => self.payment.charge(&request, cancel).await,
                    }
                };
                tokio::time::timeout(self.timeout, call)
                    .await
                    .unwrap_or(Err(PaymentError::Timeout(self.timeout)))
            }
        };
        if matches!(result, Err(PaymentError::Timeout(_))) {
            self.calls.timeout();
        }
        if let Err(err) = &result {
            if err.counts_as_failure() {
                self.calls.failure();
            }
        }
        result
    }

    async fn process(&self, id: OrderId, cancel: CancellationToken) {
        let order = match self.service.claim(id).await {
            Ok(order) => order,
            Err(err @ (OrderError::NotFound(_) | OrderError::IllegalTransition { .. })) => {
                // Someone else moved it first; it is not ours to process.
                tracing::warn!(error = %err, "skipping job");
                return;
            }
            Err(err) => {
                // The claim may have committed with its answer lost: the
                // order is let go, and its lease's expiry hands it over.
                tracing::error!(error = %err, "could not claim the order; it goes to the recovery loop once its lease runs out");
                return;
            }
        };

        let attempts = AtomicU32::new(order.attempts);
        let jitter_seed = self.jitter_seed.map(|seed| {
            let (hi, lo) = id.as_uuid().as_u64_pair();
            seed ^ hi.rotate_left(17) ^ lo
        });
        let lease_running_out = std::sync::atomic::AtomicBool::new(false);
        let charge = self.reliability.call_seeded(jitter_seed, || {
            let attempts = &attempts;
            let cancel = &cancel;
            let order = &order;
            let lease_running_out = &lease_running_out;
            async move {
                // Runs only when the breaker admitted the call. No attempt
                // starts that could end after the lease may have run out
                // (the heartbeat could not renew it): another replica may
                // have the order by then. Said as a cancellation, which the
                // breaker does not count and the retry does not repeat.
                if !self.service.may_charge(order.id, self.timeout) {
                    lease_running_out.store(true, Ordering::SeqCst);
                    return Err(PaymentError::Cancelled);
                }
                let attempt = attempts.fetch_add(1, Ordering::SeqCst) + 1;
                self.charge_once(order, attempt, cancel).await
            }
        });
        let outcome = tokio::select! {
            biased;
            _ = cancel.cancelled() => Outcome::Interrupted,
            result = charge => match result {
                Ok(()) => Outcome::Completed,
                Err(CallError::Failed(PaymentError::Cancelled))
                    if lease_running_out.load(Ordering::SeqCst) =>
                {
                    Outcome::LeaseRunningOut
                }
                Err(CallError::Failed(PaymentError::Cancelled)) => Outcome::Interrupted,
                Err(CallError::Rejected(rejection))
                    if self.defer.is_some_and(|d| d.within_deadline(&order)) =>
                {
                    Outcome::Deferred(format!("{rejection}: deferred until the breaker closes"))
                }
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
            Outcome::Deferred(reason) => StatusChange {
                to: Status::Deferred,
                ..change
            }
            .with_last_error(reason.clone()),
            Outcome::Interrupted => change.with_last_error("interrupted by shutdown; handed back"),
            Outcome::LeaseRunningOut => {
                change.with_last_error("its lease could not be renewed in time; handed back")
            }
        };
        let Some(updated) = self.write_outcome(id, change, &outcome, &cancel).await else {
            return;
        };
        match &outcome {
            Outcome::Completed => {
                self.jobs.job_completed();
                self.jobs.completed_after(updated.age_at_last_update());
                if !access_log::write_order_completed(&id.as_uuid(), attempts) {
                    tracing::info!(attempts, "order completed");
                }
            }
            Outcome::Failed(reason) => {
                self.jobs.job_failed();
                self.jobs.failed_after(updated.age_at_last_update());
                tracing::warn!(attempts, reason = %reason, "order failed");
            }
            Outcome::Deferred(_) => {
                self.jobs.job_deferred();
                tracing::info!(attempts, "order deferred until the breaker closes");
            }
            Outcome::Interrupted => {
                tracing::warn!(attempts, "order interrupted by shutdown; back to pending");
            }
            Outcome::LeaseRunningOut => {
                tracing::warn!(attempts, "lease not renewed in time: order handed back");
            }
        }
    }

    /// Writes the job's outcome, again with backoff while the store cannot
    /// be reached (see the module's doc). Returns the order as written, or
    /// None when it was not (refused, out of patience, or shutting down).
    async fn write_outcome(
        &self,
        id: OrderId,
        change: StatusChange,
        outcome: &Outcome,
        cancel: &CancellationToken,
    ) -> Option<Order> {
        let give_up_at = tokio::time::Instant::now() + OUTCOME_PATIENCE;
        let mut wait = OUTCOME_RETRY_FIRST;
        let mut failed_before = false;
        loop {
            let err = match self.service.update_order(id, change.clone()).await {
                Ok(updated) => return Some(updated),
                Err(err) => err,
            };
            match err {
                // An earlier try landed but its answer was lost.
                OrderError::IllegalTransition { from, .. }
                    if failed_before && from == change.to =>
                {
                    return self.service.get_order(id).await.ok();
                }
                // A hand-back for a lease running out is tried once: the
                // lease's expiry hands the order over anyway.
                OrderError::Storage(_)
                    if *outcome != Outcome::LeaseRunningOut
                        && tokio::time::Instant::now() + wait < give_up_at =>
                {
                    tracing::warn!(error = %err, ?outcome, retry_in = ?wait, "could not record the outcome; writing it again");
                    failed_before = true;
                    tokio::select! {
                        biased;
                        _ = cancel.cancelled() => {
                            tracing::error!(?outcome, "could not record the outcome before shutdown; the order is handed back with the lease");
                            return None;
                        }
                        _ = tokio::time::sleep(wait) => {}
                    }
                    wait = (wait * 2).min(OUTCOME_RETRY_MAX);
                }
                err => {
                    tracing::error!(error = %err, ?outcome, "could not record the outcome; the order goes to the recovery loop");
                    return None;
                }
            }
        }
    }
}

/// Lets go of an order when dropped.
struct Holding<'a> {
    service: &'a Service,
    id: OrderId,
}

impl Drop for Holding<'_> {
    fn drop(&mut self) {
        self.service.let_go(self.id);
    }
}

#[async_trait]
impl JobHandler for OrderProcessor {
    async fn handle(&self, job: Job, cancel: CancellationToken) {
        let span = tracing::info_span!("job", order_id = %job.order_id);
        // However the job ends (even dropped mid-way), the order is no
        // longer this worker's: its lease is renewed no more.
        let _held = Holding {
            service: &self.service,
            id: job.order_id,
        };
        self.process(job.order_id, cancel).instrument(span).await;
    }
}
