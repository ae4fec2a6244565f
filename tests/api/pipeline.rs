//! The pipeline end to end, in-process on tokio's paused clock: queue,
//! workers, payment simulator, retry around breaker, status updates.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reliability_lab::observability::Metrics;
use reliability_lab::orders::Status;
use reliability_lab::payment::PaymentSettings;
use reliability_lab::reliability::{
    Breaker, BreakerConfig, BreakerState, CallError, Classify, Rejection, Reliability, RetryPolicy,
};
use tokio::time::Instant;

use crate::helpers::{Lab, LabOptions};

fn always_failing(latency: Duration) -> PaymentSettings {
    PaymentSettings {
        failure_rate: 1.0,
        latency_min: latency,
        latency_max: latency,
        ..PaymentSettings::default()
    }
}

#[tokio::test(start_paused = true)]
async fn an_accepted_order_is_charged_and_completed() {
    let lab = Lab::new(LabOptions::default()).await;
    let order = lab.post_order().await;
    let done = lab.settle(order.id).await;
    assert_eq!(done.status, Status::Completed);
    assert_eq!(done.attempts, 1);
    assert_eq!(done.last_error, None);
}

#[tokio::test(start_paused = true)]
async fn second_order_stops_retrying_when_the_breaker_opens_and_later_ones_never_call() {
    // One worker, failure rate 1, three attempts, threshold 5, no jitter.
    let lab = Lab::new(LabOptions {
        payment: always_failing(Duration::ZERO),
        ..LabOptions::default()
    })
    .await;
    let mut results = Vec::new();
    for _ in 0..4 {
        let calls_before = lab.payment.calls();
        let start = Instant::now();
        let order = lab.post_order().await;
        let done = lab.settle(order.id).await;
        results.push((done, lab.payment.calls() - calls_before, start.elapsed()));
    }

    let (first, calls, took) = &results[0];
    assert_eq!(
        (first.status, first.attempts, *calls),
        (Status::Failed, 3, 3)
    );
    assert_eq!(
        first.last_error.as_deref(),
        Some("payment declined (simulated)")
    );
    // Two waits without jitter: 200 ms then 300 ms.
    assert!(
        *took >= Duration::from_millis(500) && *took <= Duration::from_millis(503),
        "{took:?}"
    );

    let (second, calls, took) = &results[1];
    assert_eq!(
        (second.status, second.attempts, *calls),
        (Status::Failed, 2, 2)
    );
    assert_eq!(second.last_error.as_deref(), Some("circuit open"));
    // One 200 ms wait between its two calls, and none after the breaker opened
    // (another wait would have added 300 ms).
    assert!(
        *took >= Duration::from_millis(200) && *took <= Duration::from_millis(203),
        "{took:?}"
    );

    for (later, calls, took) in &results[2..] {
        assert_eq!(
            (later.status, later.attempts, *calls),
            (Status::Failed, 0, 0)
        );
        assert_eq!(later.last_error.as_deref(), Some("circuit open"));
        assert!(*took <= Duration::from_millis(2), "{took:?}");
    }
    assert_eq!(lab.breaker.state(), BreakerState::Open);
}

#[tokio::test(start_paused = true)]
async fn after_the_open_period_a_single_probe_decides() {
    let lab = Lab::new(LabOptions {
        payment: always_failing(Duration::from_millis(100)),
        retry: RetryPolicy {
            max_attempts: 1,
            randomization_factor: 0.0,
            ..RetryPolicy::default()
        },
        breaker: BreakerConfig {
            failure_threshold: 1,
            open_duration: Duration::from_secs(30),
            ..BreakerConfig::default()
        },
        workers: 5,
        ..LabOptions::default()
    })
    .await;
    let first = lab.post_order().await;
    lab.settle(first.id).await;
    assert_eq!(lab.breaker.state(), BreakerState::Open);

    tokio::time::advance(Duration::from_secs(30)).await;
    let calls_before = lab.payment.calls();
    let mut orders = Vec::new();
    for _ in 0..5 {
        orders.push(lab.post_order().await);
    }
    let mut reasons = Vec::new();
    for order in orders {
        reasons.push(lab.settle(order.id).await.last_error.unwrap());
    }
    assert_eq!(
        lab.payment.calls() - calls_before,
        1,
        "exactly one probe: {reasons:?}"
    );
    assert_eq!(
        reasons
            .iter()
            .filter(|r| *r == "payment declined (simulated)")
            .count(),
        1
    );
    assert_eq!(
        reasons
            .iter()
            .filter(|r| *r == "circuit half-open: probe in flight")
            .count(),
        4,
        "{reasons:?}"
    );
    assert_eq!(
        lab.breaker.state(),
        BreakerState::Open,
        "a failed probe reopens it"
    );
}

/// A downstream whose verdict the test sets, counting calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Declined;

impl std::fmt::Display for Declined {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("declined")
    }
}

impl Classify for Declined {
    fn counts_as_failure(&self) -> bool {
        true
    }
    fn is_retryable(&self) -> bool {
        true
    }
}

async fn five_concurrent_callers_in_half_open(
    probe_succeeds: bool,
) -> (u32, BreakerState, Vec<Result<(), CallError<Declined>>>) {
    five_concurrent_callers_with_probes(1, probe_succeeds).await
}

async fn five_concurrent_callers_with_probes(
    half_open_probes: u32,
    probe_succeeds: bool,
) -> (u32, BreakerState, Vec<Result<(), CallError<Declined>>>) {
    let metrics = Arc::new(Metrics::new().reliability());
    let breaker = Breaker::new(
        BreakerConfig {
            failure_threshold: 1,
            open_duration: Duration::from_secs(30),
            half_open_probes,
            ..BreakerConfig::default()
        },
        Some(metrics.clone()),
    );
    let reliability = Reliability::new(
        RetryPolicy {
            max_attempts: 3,
            ..RetryPolicy::default()
        },
        breaker.clone(),
        metrics,
    );
    breaker.try_acquire().unwrap().failure();
    tokio::time::advance(Duration::from_secs(30)).await;

    let calls = Arc::new(AtomicU32::new(0));
    // Spawned, so all five are in flight together.
    let callers: Vec<_> = (0..5)
        .map(|_| {
            let reliability = reliability.clone();
            let calls = calls.clone();
            tokio::spawn(async move {
                reliability
                    .call(|| {
                        let calls = calls.clone();
                        async move {
                            calls.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            if probe_succeeds {
                                Ok(())
                            } else {
                                Err(Declined)
                            }
                        }
                    })
                    .await
            })
        })
        .collect();
    let mut results = Vec::new();
    for caller in callers {
        results.push(caller.await.unwrap());
    }
    (calls.load(Ordering::SeqCst), breaker.state(), results)
}

#[tokio::test(start_paused = true)]
async fn in_half_open_five_concurrent_callers_send_exactly_one_call_and_a_success_closes() {
    let (calls, state, results) = five_concurrent_callers_in_half_open(true).await;
    assert_eq!(calls, 1);
    assert_eq!(state, BreakerState::Closed);
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1);
    assert_eq!(
        results
            .iter()
            .filter(|r| **r == Err(CallError::Rejected(Rejection::HalfOpenBusy)))
            .count(),
        4
    );
}

#[tokio::test(start_paused = true)]
async fn with_three_half_open_probes_exactly_three_of_five_concurrent_callers_get_through() {
    let (calls, state, results) = five_concurrent_callers_with_probes(3, true).await;
    assert_eq!(calls, 3);
    assert_eq!(state, BreakerState::Closed, "all three succeeded");
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 3);
    assert_eq!(
        results
            .iter()
            .filter(|r| **r == Err(CallError::Rejected(Rejection::HalfOpenBusy)))
            .count(),
        2
    );
    // The same with failing probes: three calls, and the breaker reopens.
    let (calls, state, _) = five_concurrent_callers_with_probes(3, false).await;
    assert_eq!(calls, 3);
    assert_eq!(state, BreakerState::Open);
}

#[tokio::test(start_paused = true)]
async fn in_half_open_a_failed_probe_reopens_the_breaker() {
    let (calls, state, results) = five_concurrent_callers_in_half_open(false).await;
    assert_eq!(calls, 1);
    assert_eq!(state, BreakerState::Open);
    assert!(results.iter().all(|r| r.is_err()));
}

#[tokio::test(start_paused = true)]
async fn stopping_the_dispatcher_drains_every_queued_job() {
    let lab = Lab::new(LabOptions {
        payment: PaymentSettings {
            failure_rate: 0.3,
            latency_min: Duration::from_millis(100),
            latency_max: Duration::from_millis(500),
            ..PaymentSettings::default()
        },
        workers: 5,
        start_workers: false,
        ..LabOptions::default()
    })
    .await;
    let mut ids = Vec::new();
    for _ in 0..40 {
        ids.push(lab.post_order().await.id);
    }
    assert_eq!(lab.dispatcher.depth(), 40);
    lab.start_workers();
    lab.dispatcher.stop();
    lab.dispatcher.wait().await;
    for id in ids {
        let order = lab.service.get_order(id).await.unwrap();
        assert!(order.status.is_terminal(), "{order:?}");
    }
    assert_eq!(lab.dispatcher.depth(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_charge_hands_the_order_back_to_pending() {
    let lab = Lab::new(LabOptions {
        payment: PaymentSettings {
            failure_rate: 0.0,
            latency_min: Duration::from_secs(10),
            latency_max: Duration::from_secs(10),
            ..PaymentSettings::default()
        },
        ..LabOptions::default()
    })
    .await;
    let order = lab.post_order().await;
    // Let the worker pick it up and start the charge.
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(
        lab.service.get_order(order.id).await.unwrap().status,
        Status::Processing
    );
    lab.dispatcher.stop();
    lab.dispatcher.cancel();
    lab.dispatcher.wait().await;
    let after = lab.service.get_order(order.id).await.unwrap();
    assert_eq!(after.status, Status::Pending);
    assert_eq!(after.attempts, 1);
    assert_eq!(
        after.last_error.as_deref(),
        Some("interrupted by shutdown; handed back")
    );
    // The breaker heard no verdict.
    assert_eq!(lab.breaker.snapshot().consecutive_failures, 0);
}
