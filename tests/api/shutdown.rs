//! Stopping in order, in process, through the composition root's own
//! `run_until_stopped`: queued orders drain; when SHUTDOWN_TIMEOUT runs out
//! the workers are cancelled and hand their orders back; leases are released
//! so another replica takes the orders at once.

use std::time::Duration;

use reliability_lab::orders::{OrderId, Status};
use reliability_lab::payment::PaymentSettings;

use crate::helpers::{Lab, LabOptions, TestDb};

fn slow_payments(latency: Duration) -> PaymentSettings {
    PaymentSettings {
        failure_rate: 0.0,
        latency_min: latency,
        latency_max: latency,
        ..PaymentSettings::default()
    }
}

#[tokio::test(start_paused = true)]
async fn a_clean_stop_drains_every_queued_order_with_the_memory_store() {
    let lab = Lab::new(LabOptions {
        workers: 1,
        payment: slow_payments(Duration::from_millis(100)),
        ..LabOptions::default()
    })
    .await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(lab.post_order().await.id);
    }
    let Lab { app, service, .. } = lab;
    let started = tokio::time::Instant::now();
    app.run_until_stopped(async {}).await.unwrap();
    // One worker, 100 ms per charge: the stop waited for all five.
    assert!(started.elapsed() >= Duration::from_millis(500));
    for id in ids {
        assert_eq!(
            service.get_order(id).await.unwrap().status,
            Status::Completed
        );
    }
}

#[tokio::test(start_paused = true)]
async fn when_the_shutdown_timeout_runs_out_workers_are_cancelled_and_orders_go_back_to_pending() {
    let lab = Lab::new(LabOptions {
        workers: 2,
        payment: slow_payments(Duration::from_secs(60)),
        payment_timeout: Duration::from_secs(120),
        shutdown_timeout: Duration::from_secs(1),
        ..LabOptions::default()
    })
    .await;
    let mut ids: Vec<OrderId> = Vec::new();
    for _ in 0..3 {
        ids.push(lab.post_order().await.id);
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(lab.dispatcher.busy(), 2, "two charges are under way");
    let Lab {
        app,
        service,
        dispatcher,
        ..
    } = lab;
    let started = tokio::time::Instant::now();
    app.run_until_stopped(async {}).await.unwrap();
    let took = started.elapsed();
    // The deadline, then the cancellation at once (not the 60 s charges).
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(2),
        "{took:?}"
    );
    assert_eq!(dispatcher.busy(), 0);
    let mut handed_back = 0;
    for id in ids {
        let order = service.get_order(id).await.unwrap();
        assert_eq!(order.status, Status::Pending, "{order:?}");
        if order.last_error.as_deref() == Some("interrupted by shutdown; handed back") {
            handed_back += 1;
        }
    }
    assert_eq!(handed_back, 2, "the two in hand were handed back");
}

#[tokio::test]
async fn leases_are_released_at_a_clean_stop_so_another_replica_takes_the_orders_at_once() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let lab = Lab::new(LabOptions {
        repo: Some(db.store()),
        start_workers: false,
        ..LabOptions::default()
    })
    .await;
    for _ in 0..3 {
        lab.post_order().await;
    }
    let other = db.replica(Duration::from_secs(30));
    use reliability_lab::orders::OrderRepository;
    assert_eq!(
        other.count_expired().await.unwrap(),
        0,
        "leased to the first replica"
    );
    lab.app.run_until_stopped(async {}).await.unwrap();
    // The leases were 30 s long: only a release frees them this soon.
    assert_eq!(other.count_expired().await.unwrap(), 3);
    assert_eq!(other.take_over_expired(10).await.unwrap().len(), 3);
    db.destroy().await;
}
