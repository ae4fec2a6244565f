//! Deferred retry (`BREAKER_DEFER`): an order whose charge met the open
//! breaker waits instead of failing, and is charged again once the breaker
//! has closed, at `DEFER_RATE`, until `DEFER_MAX` after it was placed. On a
//! paused clock with the memory store, with dates that follow it
//! (`clock::Simulated`: an order's deadline counts from its `created_at`);
//! the restart runs on a real Postgres and the real clock.

use std::time::Duration;

use reliability_lab::orders::{OrderId, Status};
use reliability_lab::payment::PaymentUpdate;
use reliability_lab::reliability::{BreakerConfig, BreakerState, RetryPolicy};
use reliability_lab::workers::DeferSettings;

use crate::helpers::{Lab, LabOptions, TestDb};

fn mode(lab: &Lab, mode: &str) {
    let update: PaymentUpdate =
        serde_json::from_value(serde_json::json!({ "mode": mode })).unwrap();
    lab.payment.update(update).unwrap();
}

/// A breaker that opens on the first failure and stays open `open`; three
/// attempts 100 ms apart; deferral on.
fn options(open: Duration, defer: Option<DeferSettings>) -> LabOptions {
    LabOptions {
        workers: 20,
        capacity: 1000,
        retry: RetryPolicy {
            max_attempts: 3,
            initial_interval: Duration::from_millis(100),
            max_interval: Duration::from_millis(100),
            randomization_factor: 0.0,
            ..RetryPolicy::default()
        },
        breaker: BreakerConfig {
            failure_threshold: 1,
            open_duration: open,
            ..BreakerConfig::default()
        },
        defer,
        ..LabOptions::default()
    }
}

async fn status(lab: &Lab, id: OrderId) -> Status {
    lab.service.get_order(id).await.unwrap().status
}

#[tokio::test(start_paused = true)]
async fn an_order_the_open_breaker_refuses_waits_and_completes_once_the_breaker_closes() {
    let _dates = reliability_lab::clock::Simulated::start();
    let lab = Lab::new(options(
        Duration::from_secs(2),
        Some(DeferSettings {
            max: Duration::from_secs(60),
            rate: 10,
        }),
    ))
    .await;
    mode(&lab, "outage");
    let order = lab.post_order().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Its first attempt failed and opened the breaker; the second was
    // refused: deferred, not failed.
    let parked = lab.service.get_order(order.id).await.unwrap();
    assert_eq!(parked.status, Status::Deferred);
    assert_eq!(parked.attempts, 1);
    assert!(
        parked
            .last_error
            .as_deref()
            .unwrap()
            .contains("deferred until the breaker closes"),
        "{parked:?}"
    );
    assert_eq!(lab.metrics.totals().deferred, 1);
    assert_eq!(lab.metrics.totals().failed, 0);

    // The provider is back, but the breaker is open: it waits, uncharged.
    mode(&lab, "normal");
    tokio::time::sleep(Duration::from_millis(1800)).await;
    assert_eq!(status(&lab, order.id).await, Status::Deferred);
    assert_eq!(lab.payment.calls(), 1);
    assert_eq!(lab.metrics.totals().deferred_now, 1);

    // The open period ends; with no other traffic the loop lets it through
    // as the probe, which closes the breaker.
    let done = lab.settle(order.id).await;
    assert_eq!(done.status, Status::Completed);
    assert_eq!(done.attempts, 2);
    assert_eq!(lab.payment.calls(), 2);
    assert_eq!(lab.breaker.state(), BreakerState::Closed);
    let t = lab.metrics.totals();
    assert_eq!((t.accepted, t.completed, t.defer_released), (1, 1, 1));
    assert_eq!(t.deferred_now, 0);
}

#[tokio::test(start_paused = true)]
async fn deferred_orders_go_back_at_the_pace_and_only_once_the_breaker_has_closed() {
    let _dates = reliability_lab::clock::Simulated::start();
    let lab = Lab::new(options(
        Duration::from_secs(2),
        Some(DeferSettings {
            max: Duration::from_secs(60),
            rate: 10,
        }),
    ))
    .await;
    mode(&lab, "outage");
    let mut ids = Vec::new();
    for _ in 0..50 {
        ids.push(lab.post_order().await.id);
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        lab.metrics.totals().deferred,
        50,
        "every one met the open breaker"
    );
    assert_eq!(
        lab.payment.calls(),
        1,
        "only the first reached the provider"
    );
    mode(&lab, "normal");

    // Each 100 ms: how many went back, and the breaker's state.
    let mut released = Vec::new();
    let mut states = Vec::new();
    for _ in 0..80 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        released.push(lab.metrics.totals().defer_released);
        states.push(lab.breaker.state());
    }
    // While open (the first ~2 s), nothing went back.
    let closed_at = states
        .iter()
        .position(|s| *s == BreakerState::Closed)
        .expect("the probe closed it");
    assert!(
        closed_at >= 18,
        "closed after its 2 s open period: {closed_at}"
    );
    assert!(released[..17].iter().all(|&n| n == 0), "{released:?}");
    // Then at 10 a second: never more than 11 in any second (10 plus the probe).
    for w in released.windows(11) {
        assert!(w[10] - w[0] <= 11, "{released:?}");
    }
    assert_eq!(
        *released.last().unwrap(),
        50,
        "all back within 8 s: {released:?}"
    );
    for id in ids {
        assert_eq!(lab.settle(id).await.status, Status::Completed);
    }
    let t = lab.metrics.totals();
    assert_eq!((t.accepted, t.completed, t.failed), (50, 50, 0));
    assert_eq!(lab.payment.calls(), 51);
}

#[tokio::test(start_paused = true)]
async fn a_deferred_order_fails_at_its_deadline_and_one_refused_past_it_fails_at_once() {
    let _dates = reliability_lab::clock::Simulated::start();
    let lab = Lab::new(LabOptions {
        start_workers: false,
        ..options(
            Duration::from_secs(10),
            Some(DeferSettings {
                max: Duration::from_secs(3),
                rate: 10,
            }),
        )
    })
    .await;
    // Placed at 0 s, held in the queue while the breaker opens.
    let late = lab.post_order().await;
    mode(&lab, "outage");
    let first = lab.breaker.try_acquire().unwrap();
    first.failure();
    assert_eq!(lab.breaker.state(), BreakerState::Open);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let deferred = lab.post_order().await;
    lab.start_workers();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Refused 4 s after it was placed, past its 3 s: it fails at once.
    let failed = lab.service.get_order(late.id).await.unwrap();
    assert_eq!(failed.status, Status::Failed);
    assert_eq!(failed.last_error.as_deref(), Some("circuit open"));
    assert_eq!(status(&lab, deferred.id).await, Status::Deferred);

    tokio::time::sleep(Duration::from_millis(2800)).await;
    assert_eq!(
        status(&lab, deferred.id).await,
        Status::Deferred,
        "2.85 s old"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let expired = lab.service.get_order(deferred.id).await.unwrap();
    assert_eq!(expired.status, Status::Failed);
    assert_eq!(
        expired.last_error.as_deref(),
        Some("circuit open: still deferred at DEFER_MAX (3s after it was placed)")
    );
    let t = lab.metrics.totals();
    assert_eq!((t.failed, t.defer_expired, t.deferred_now), (2, 1, 0));
    let failed = lab.metrics.failed_latency().snapshot();
    assert_eq!(
        failed.since(&Default::default()).count(),
        2,
        "both timed as failed"
    );
}

#[tokio::test(start_paused = true)]
async fn without_deferral_the_open_breaker_fails_the_order_as_before() {
    let _dates = reliability_lab::clock::Simulated::start();
    let lab = Lab::new(options(Duration::from_secs(2), None)).await;
    mode(&lab, "outage");
    let a = lab.post_order().await;
    let b = lab.post_order().await;
    for id in [a.id, b.id] {
        let order = lab.settle(id).await;
        assert_eq!(order.status, Status::Failed);
    }
    let t = lab.metrics.totals();
    assert_eq!((t.deferred, t.failed), (0, 2));
}

/// Deferred orders are kept by the store: a service stopped with orders
/// deferred, and another started on the same database, charges them.
#[tokio::test]
async fn deferred_orders_survive_a_restart_on_postgres() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let defer = Some(DeferSettings {
        max: Duration::from_secs(300),
        rate: 100,
    });
    let first = Lab::new(LabOptions {
        repo: Some(db.store()),
        ..options(Duration::from_secs(600), defer)
    })
    .await;
    mode(&first, "outage");
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(first.post_order().await.id);
    }
    for _ in 0..500 {
        if first.metrics.totals().deferred == 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(first.metrics.totals().deferred, 5);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(first.app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    stop.send(()).unwrap();
    running.await.unwrap().unwrap();
    let (deferred,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM orders WHERE status = 'deferred' AND lease_owner IS NULL",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(deferred, 5, "they wait in the database, leased to nobody");

    // The next service starts with a closed breaker and a provider that works.
    let second = Lab::new(LabOptions {
        repo: Some(db.store()),
        ..options(Duration::from_secs(600), defer)
    })
    .await;
    let mut charges = 0;
    for id in ids {
        let order = second.settle(id).await;
        assert_eq!(order.status, Status::Completed, "{order:?}");
        charges += order.attempts;
    }
    assert_eq!(charges, 6, "the first's failed call, then one charge each");
    assert_eq!(second.metrics.totals().defer_released, 5);
    db.destroy().await;
}

#[tokio::test(start_paused = true)]
async fn while_the_probe_is_out_at_most_one_order_a_second_goes_through_and_none_reaches_the_provider(
) {
    let _dates = reliability_lab::clock::Simulated::start();
    let mut opts = options(
        Duration::from_secs(2),
        Some(DeferSettings {
            max: Duration::from_secs(60),
            rate: 10,
        }),
    );
    // A slow provider: the probe is out for 1.5 s.
    opts.payment.latency_min = Duration::from_millis(1500);
    opts.payment.latency_max = Duration::from_millis(1500);
    opts.payment_timeout = Duration::from_secs(5);
    let lab = Lab::new(opts).await;
    mode(&lab, "outage");
    for _ in 0..20 {
        lab.post_order().await;
    }
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert_eq!(lab.metrics.totals().deferred, 20);
    // All twenty were admitted before the first answer opened the breaker.
    let before = lab.payment.calls();
    mode(&lab, "normal");
    // The open period ends 2 s after the failures (at ~1.5 s): the probe
    // goes at about 3.5 s and answers 1.5 s later.
    let mut half_open_seen = false;
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        half_open_seen |= lab.breaker.state() == BreakerState::HalfOpen;
    }
    assert!(half_open_seen);
    let t = lab.metrics.totals();
    // Out while the probe was: at most one more a second, each refused at
    // the breaker and deferred again, none charged.
    assert!(
        t.rejected_half_open <= 2,
        "{} refused while the probe was out",
        t.rejected_half_open
    );
    assert_eq!(lab.payment.calls(), before + 1, "the probe alone");
}
