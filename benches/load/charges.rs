//! The payment client's row: charges a second through the service's own
//! client (`HttpPayments`: hyper-util's pool behind a semaphore, attempt
//! bookkeeping, the answer read whole and classified) against a running
//! `reliability-lab provider` at zero latency, beside a minimal hyper
//! client (one HTTP/1.1 connection per task, the same requests, the answer
//! read and dropped) driving the same provider in the same run.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use reliability_lab::orders::OrderId;
use reliability_lab::payment::client::{ClientSettings, HttpPayments};
use reliability_lab::payment::ChargeRequest;
use tokio_util::sync::CancellationToken;

/// Charges a second, and the calls that did not answer 200.
pub struct Figures {
    pub rate: f64,
    pub errors: u64,
}

/// `tasks` loops charging through the service's client for `seconds`.
pub async fn through_the_client(addr: SocketAddr, tasks: usize, seconds: u64) -> Figures {
    let metrics = reliability_lab::observability::Metrics::new();
    let client = Arc::new(
        HttpPayments::new(
            &ClientSettings {
                url: format!("http://{addr}"),
                max_connections: tasks as u32,
                connect_timeout: Duration::from_secs(1),
                idle_timeout: Duration::from_secs(30),
                honour_retry_after: true,
                admin_token: None,
            },
            metrics.payment_client(),
        )
        .expect("a valid URL"),
    );
    let cancel = CancellationToken::new();
    run(tasks, seconds, move |done, errors| {
        let client = client.clone();
        let cancel = cancel.clone();
        async move {
            let request = ChargeRequest::for_order(OrderId::new_random(), 1, 1999, "USD");
            match client.charge(&request, &cancel).await {
                Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                Err(_) => errors.fetch_add(1, Ordering::Relaxed),
            };
        }
    })
    .await
}

/// `tasks` loops, each on a connection of its own, posting the same charge
/// requests with hyper's bare HTTP/1.1 connection for `seconds`.
pub async fn with_bare_hyper(addr: SocketAddr, tasks: usize, seconds: u64) -> Figures {
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let (done, errors) = (done.clone(), errors.clone());
        handles.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            stream.set_nodelay(true).unwrap();
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .unwrap();
            tokio::spawn(connection);
            while Instant::now() < deadline {
                let order = OrderId::new_random();
                let body = format!(
                    r#"{{"order_id":"{order}","amount":1999,"currency":"USD","attempt":1}}"#
                );
                let request = hyper::Request::post("/charges")
                    .header("host", "bench")
                    .header("content-type", "application/json")
                    .header("idempotency-key", ChargeRequest::key_for(order))
                    .body(Full::new(Bytes::from(body)))
                    .unwrap();
                match sender.send_request(request).await {
                    Ok(answer) => {
                        let ok = answer.status() == 200;
                        let read = answer.into_body().collect().await.is_ok();
                        if ok && read {
                            done.fetch_add(1, Ordering::Relaxed);
                        } else {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
            }
        }));
    }
    let start = Instant::now();
    for handle in handles {
        let _ = handle.await;
    }
    Figures {
        rate: done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64(),
        errors: errors.load(Ordering::Relaxed),
    }
}

/// Runs `step` in `tasks` loops until `seconds` have passed.
async fn run<F, Fut>(tasks: usize, seconds: u64, step: F) -> Figures
where
    F: Fn(Arc<AtomicU64>, Arc<AtomicU64>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let step = Arc::new(step);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let start = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let (done, errors, step) = (done.clone(), errors.clone(), step.clone());
        handles.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                step(done.clone(), errors.clone()).await;
            }
        }));
    }
    for handle in handles {
        let _ = handle.await;
    }
    Figures {
        rate: done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64(),
        errors: errors.load(Ordering::Relaxed),
    }
}
