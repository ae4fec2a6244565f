//! Micro-benchmarks of the hot paths: the retry + breaker wrapper around a
//! call that always succeeds, the HTTP metrics middleware's work per request,
//! and the in-memory store's insert and get.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use criterion::{criterion_group, criterion_main, Criterion};
use reliability_lab::observability::Metrics;
use reliability_lab::orders::memory::MemoryStore;
use reliability_lab::orders::{
    Amount, Currency, CustomerId, NewOrder, Order, OrderId, OrderRepository,
};
use reliability_lab::reliability::{Breaker, BreakerConfig, Reliability, RetryPolicy};

mod common;
use common::Never;

fn order() -> Order {
    Order::new(
        OrderId::new_random(),
        NewOrder {
            customer_id: CustomerId::parse("cust-42").unwrap(),
            amount: Amount::parse(1999).unwrap(),
            currency: Currency::parse("USD").unwrap(),
        },
        Utc::now(),
    )
}

fn wrapper(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let observer = Arc::new(Metrics::new().reliability());
    let reliability = Reliability::new(
        RetryPolicy::default(),
        Breaker::new(BreakerConfig::default(), Some(observer.clone())),
        observer,
    );
    c.bench_function("retry+breaker around an always-succeeding call", |b| {
        b.to_async(&runtime).iter(|| async {
            reliability
                .call(|| async { Ok::<u32, Never>(std::hint::black_box(7)) })
                .await
                .ok()
        })
    });
    c.bench_function("the same call, bare", |b| {
        b.to_async(&runtime)
            .iter(|| async { std::hint::black_box(Ok::<u32, Never>(std::hint::black_box(7))).ok() })
    });
}

fn http_metrics(c: &mut Criterion) {
    let metrics = Metrics::new().http();
    c.bench_function("HTTP metrics per request (counter + histogram)", |b| {
        b.iter(|| {
            metrics.observe(
                std::hint::black_box("GET"),
                std::hint::black_box("/orders/{id}"),
                axum::http::StatusCode::OK,
                Duration::from_micros(250),
            )
        })
    });
}

fn memory_store(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // No bound: the benchmark inserts far more unfinished orders than the
    // default MEMORY_MAX_ORDERS.
    let store = MemoryStore::with_limit(
        usize::MAX,
        prometheus::IntCounter::new("evicted", "unregistered").unwrap(),
    );
    let orders: Vec<Order> = (0..100_000).map(|_| order()).collect();
    runtime.block_on(async {
        for o in &orders {
            store.insert(o).await.unwrap();
        }
    });
    let mut i = 0;
    c.bench_function("memory store get (100k orders)", |b| {
        b.to_async(&runtime).iter(|| {
            i = (i + 1) % orders.len();
            let id = orders[i].id;
            let store = &store;
            async move { store.get(id).await.unwrap() }
        })
    });
    c.bench_function("memory store insert", |b| {
        b.to_async(&runtime).iter_batched(
            order,
            |o| {
                let store = &store;
                async move { store.insert(&o).await.unwrap() }
            },
            criterion::BatchSize::SmallInput,
        )
    });
}

criterion_group!(benches, wrapper, http_metrics, memory_store);
criterion_main!(benches);
