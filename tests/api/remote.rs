//! The provider as its own HTTP service (`reliability-lab provider`) and the
//! service's payment client (`PAYMENT_URL`), over real sockets on
//! 127.0.0.1: the pipeline end to end, and every network fault.
//!
//! These run on the real clock (sockets do): latencies are zero or tens of
//! milliseconds, and every wait that matters has a wide margin.

use std::time::Duration;

use reliability_lab::orders::{Order, OrderId, Status};
use reliability_lab::payment::client::{ClientSettings, HttpPayments};
use reliability_lab::payment::{ChargeRequest, PaymentError, PaymentSettings};
use reliability_lab::provider::{Provider, ProviderConfig};
use reliability_lab::reliability::RetryPolicy;
use tokio_util::sync::CancellationToken;

use crate::helpers::{Lab, LabOptions};

/// A provider on a free loopback port, stopped when dropped.
struct RunningProvider {
    url: String,
    stop: CancellationToken,
    http: reqwest::Client,
}

impl Drop for RunningProvider {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl RunningProvider {
    async fn start(configure: impl FnOnce(&mut ProviderConfig)) -> Self {
        let mut config = ProviderConfig::defaults();
        config.listen_addr = "127.0.0.1:0".parse().unwrap();
        config.simulator.payment_failure_rate = 0.0;
        config.simulator.payment_latency_min = Duration::ZERO;
        config.simulator.payment_latency_max = Duration::ZERO;
        config.simulator.payment_seed = Some(7);
        configure(&mut config);
        let provider = Provider::bind(config).await.expect("the provider binds");
        let url = format!("http://{}", provider.local_addr());
        let stop = CancellationToken::new();
        tokio::spawn(provider.run(stop.clone()));
        Self {
            url,
            stop,
            http: reqwest::Client::new(),
        }
    }

    async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    async fn put_faults(&self, body: &str) {
        let answer = self
            .http
            .put(format!("{}/admin/faults", self.url))
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200, "{}", answer.text().await.unwrap());
    }

    /// The charges under an order's key, as the provider's API reports them.
    async fn charge_of(&self, order: OrderId) -> Option<serde_json::Value> {
        let key = ChargeRequest::key_for(order);
        let answer = self
            .http
            .get(format!("{}/charges/{key}", self.url))
            .send()
            .await
            .unwrap();
        match answer.status().as_u16() {
            200 => Some(answer.json().await.unwrap()),
            404 => None,
            other => panic!("GET /charges/{key}: {other}"),
        }
    }
}

/// One series' value in a text exposition (0 when absent).
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            let rest = line.strip_prefix(series)?;
            rest.strip_prefix(' ')?.trim().parse().ok()
        })
        .unwrap_or(0.0)
}

fn lab_options(provider: &RunningProvider, attempts: u32, first_wait: Duration) -> LabOptions {
    LabOptions {
        payment_url: Some(provider.url.clone()),
        retry: RetryPolicy {
            max_attempts: attempts,
            initial_interval: first_wait,
            max_interval: first_wait * 4,
            randomization_factor: 0.0,
            ..RetryPolicy::default()
        },
        breaker: reliability_lab::reliability::BreakerConfig {
            failure_threshold: 1000,
            ..Default::default()
        },
        // The in-process simulator would charge at once: a test that ends
        // charged there instead of across the network shows it here.
        payment: PaymentSettings {
            failure_rate: 1.0,
            latency_min: Duration::ZERO,
            latency_max: Duration::ZERO,
            ..PaymentSettings::default()
        },
        ..LabOptions::default()
    }
}

/// Waits on the real clock until the order is terminal (at most 30 s).
async fn settle(lab: &Lab, id: OrderId) -> Order {
    for _ in 0..3000 {
        let order = lab.service.get_order(id).await.unwrap();
        if order.status.is_terminal() {
            return order;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("order {id} never settled");
}

/// Polls `check` on the real clock for up to 10 s.
async fn eventually<F: std::future::Future<Output = bool>>(mut check: impl FnMut() -> F) {
    for _ in 0..2000 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("never happened");
}

fn service_metrics(lab: &Lab) -> String {
    lab.metrics.render().unwrap()
}

#[tokio::test]
async fn the_pipeline_charges_across_the_network_once_per_completed_order() {
    let provider = RunningProvider::start(|c| c.simulator.payment_failure_rate = 0.3).await;
    let lab = Lab::new(LabOptions {
        workers: 4,
        ..lab_options(&provider, 4, Duration::from_millis(5))
    })
    .await;
    let mut ids = Vec::new();
    for _ in 0..40 {
        ids.push(lab.post_order().await.id);
    }
    let (mut completed, mut failed) = (0, 0);
    for id in &ids {
        let order = settle(&lab, *id).await;
        let charge = provider.charge_of(*id).await;
        match order.status {
            Status::Completed => {
                completed += 1;
                let charge = charge.expect("a completed order has its charge");
                assert_eq!(charge["order_id"], id.to_string());
                assert_eq!(charge["amount"], 1999);
            }
            Status::Failed => {
                failed += 1;
                assert!(charge.is_none(), "a failed order was charged: {charge:?}");
                assert!(
                    order.last_error.as_deref().unwrap().contains("502"),
                    "{:?}",
                    order.last_error
                );
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(
        completed > 30 && failed < 5,
        "{completed} completed, {failed} failed"
    );
    let theirs = provider.metrics().await;
    assert_eq!(metric(&theirs, "payment_charges_total"), completed as f64);
    assert_eq!(metric(&theirs, "payment_duplicate_charges_total"), 0.0);
    let ours = service_metrics(&lab);
    assert_eq!(
        metric(
            &ours,
            "payment_client_attempt_duration_seconds_count{outcome=\"ok\"}"
        ),
        completed as f64
    );
    assert!(
        metric(
            &ours,
            "payment_client_attempt_duration_seconds_count{outcome=\"failed\"}"
        ) > 0.0
    );
    assert_eq!(
        metric(&theirs, "payment_calls_total"),
        metric(&theirs, "payment_charges_total") + metric(&theirs, "payment_failures_total")
    );
    // The in-process simulator was never called.
    assert_eq!(lab.payment.calls(), 0);
    assert!(metric(&ours, "payment_client_connections_open") >= 1.0);
    assert!(metric(&ours, "payment_client_connections_open") <= 32.0);
}

/// The ambiguous failure on a real socket: the provider charges, then
/// resets the connection. The client counts it apart; the retry carries
/// the same key, so the provider answers with the first charge.
#[tokio::test]
async fn a_reset_after_the_charge_is_ambiguous_and_the_retry_under_the_key_charges_nothing_more() {
    for idempotency in [true, false] {
        let provider = RunningProvider::start(|c| {
            c.simulator.payment_idempotency = idempotency;
            c.provider_fault = reliability_lab::provider::faults::Fault::ResetAfter;
            c.provider_fault_rate = 1.0;
        })
        .await;
        // A second's wait before the retry: time to lift the fault.
        let lab = Lab::new(lab_options(&provider, 2, Duration::from_secs(1))).await;
        let order = lab.post_order().await;
        eventually(|| async {
            metric(
                &service_metrics(&lab),
                "payment_client_ambiguous_total{cause=\"connection\"}",
            ) == 1.0
        })
        .await;
        assert!(
            provider.charge_of(order.id).await.is_some() || !idempotency,
            "the provider has the charge"
        );
        provider.put_faults(r#"{"fault":"none"}"#).await;
        let order = settle(&lab, order.id).await;
        assert_eq!(order.status, Status::Completed, "{:?}", order.last_error);
        assert_eq!(order.attempts, 2);
        let theirs = provider.metrics().await;
        assert_eq!(
            metric(&theirs, "provider_faults_total{fault=\"reset_after\"}"),
            1.0
        );
        if idempotency {
            assert_eq!(
                metric(&theirs, "payment_charges_total"),
                1.0,
                "charged once"
            );
            assert_eq!(metric(&theirs, "payment_duplicate_charges_total"), 0.0);
        } else {
            // Without keys honoured, the retry charged again.
            assert_eq!(metric(&theirs, "payment_charges_total"), 2.0);
            assert_eq!(metric(&theirs, "payment_duplicate_charges_total"), 1.0);
        }
    }
}

/// A reset before the charge looks the same to the client (it cannot
/// tell), but nothing was charged.
#[tokio::test]
async fn a_reset_before_the_charge_is_ambiguous_to_the_client_and_charges_nothing() {
    let provider = RunningProvider::start(|c| {
        c.provider_fault = reliability_lab::provider::faults::Fault::ResetBefore;
        c.provider_fault_rate = 1.0;
    })
    .await;
    let lab = Lab::new(lab_options(&provider, 2, Duration::from_millis(10))).await;
    let order = settle(&lab, lab.post_order().await.id).await;
    assert_eq!(order.status, Status::Failed);
    assert_eq!(order.attempts, 2);
    assert!(
        order
            .last_error
            .as_deref()
            .unwrap()
            .contains("outcome unknown"),
        "{:?}",
        order.last_error
    );
    assert!(provider.charge_of(order.id).await.is_none());
    let theirs = provider.metrics().await;
    assert_eq!(metric(&theirs, "payment_charges_total"), 0.0);
    assert_eq!(
        metric(&theirs, "provider_faults_total{fault=\"reset_before\"}"),
        2.0
    );
    let ours = service_metrics(&lab);
    assert_eq!(
        metric(
            &ours,
            "payment_client_ambiguous_total{cause=\"connection\"}"
        ),
        2.0
    );
}

/// A provider that reads the request and never answers is abandoned at the
/// per-attempt timeout, counted as ambiguous (the request went out).
#[tokio::test]
async fn a_stalled_provider_is_abandoned_at_the_attempt_timeout() {
    let provider = RunningProvider::start(|c| {
        c.provider_fault = reliability_lab::provider::faults::Fault::Stall;
        c.provider_fault_rate = 1.0;
    })
    .await;
    let lab = Lab::new(LabOptions {
        payment_timeout: Duration::from_millis(200),
        ..lab_options(&provider, 2, Duration::from_millis(10))
    })
    .await;
    let started = std::time::Instant::now();
    let order = settle(&lab, lab.post_order().await.id).await;
    assert_eq!(order.status, Status::Failed);
    assert!(
        order.last_error.as_deref().unwrap().contains("timed out"),
        "{:?}",
        order.last_error
    );
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "two timeouts"
    );
    let ours = service_metrics(&lab);
    assert_eq!(
        metric(&ours, "payment_client_abandoned_total{phase=\"exchange\"}"),
        2.0
    );
    assert_eq!(
        metric(&ours, "payment_client_ambiguous_total{cause=\"timeout\"}"),
        2.0
    );
    assert_eq!(metric(&ours, "payment_timeouts_total"), 2.0);
    assert_eq!(
        metric(&provider.metrics().await, "payment_charges_total"),
        0.0
    );
}

/// A slow answer counts against the attempt's timeout: the whole answer
/// must arrive within it. Charged, the answer too slow: ambiguous.
#[tokio::test]
async fn a_slow_answer_is_read_whole_within_the_timeout_or_abandoned() {
    let provider = RunningProvider::start(|c| {
        c.provider_fault = reliability_lab::provider::faults::Fault::SlowBody;
        c.provider_fault_rate = 1.0;
        c.provider_slow_body_chunk = 8;
        c.provider_slow_body_interval = Duration::from_millis(50);
    })
    .await;
    let lab = Lab::new(LabOptions {
        payment_timeout: Duration::from_millis(300),
        ..lab_options(&provider, 1, Duration::from_millis(10))
    })
    .await;
    let order = settle(&lab, lab.post_order().await.id).await;
    assert_eq!(
        order.status,
        Status::Failed,
        "a 250-byte answer at 8 bytes a 50 ms"
    );
    assert!(
        provider.charge_of(order.id).await.is_some(),
        "it was charged"
    );
    assert_eq!(
        metric(
            &service_metrics(&lab),
            "payment_client_ambiguous_total{cause=\"timeout\"}"
        ),
        1.0
    );
    // Pieces that arrive fast enough make a whole answer.
    provider
        .put_faults(r#"{"slow_body_chunk":64,"slow_body_interval":"1ms"}"#)
        .await;
    let order = settle(&lab, lab.post_order().await.id).await;
    assert_eq!(order.status, Status::Completed, "{:?}", order.last_error);
    assert_eq!(
        metric(
            &provider.metrics().await,
            "provider_faults_total{fault=\"slow_body\"}"
        ),
        2.0
    );
}

/// `refuse`: the connection in hand dies, then nothing listens: the next
/// attempts are refused at connect, which is safe to retry. After the
/// period the provider listens again on the same port.
#[tokio::test]
async fn a_refusing_provider_is_unreachable_for_its_period_and_then_serves_again() {
    let provider = RunningProvider::start(|c| {
        c.provider_fault = reliability_lab::provider::faults::Fault::Refuse;
        c.provider_fault_rate = 1.0;
        c.provider_refuse_for = Duration::from_secs(2);
    })
    .await;
    let lab = Lab::new(lab_options(&provider, 3, Duration::from_millis(50))).await;
    let order = settle(&lab, lab.post_order().await.id).await;
    assert_eq!(order.status, Status::Failed);
    assert_eq!(order.attempts, 3);
    assert!(
        order.last_error.as_deref().unwrap().contains("unreachable"),
        "{:?}",
        order.last_error
    );
    let ours = service_metrics(&lab);
    assert_eq!(
        metric(
            &ours,
            "payment_client_ambiguous_total{cause=\"connection\"}"
        ),
        1.0,
        "the call that drew it lost its connection"
    );
    assert_eq!(
        metric(
            &ours,
            "payment_client_connect_errors_total{kind=\"refused\"}"
        ),
        2.0
    );
    // Back after its period, on the same address.
    let back = reqwest::Client::new();
    eventually(|| async {
        back.get(format!("{}/healthz", provider.url))
            .send()
            .await
            .is_ok()
    })
    .await;
    provider.put_faults(r#"{"fault":"none"}"#).await;
    let order = settle(&lab, lab.post_order().await.id).await;
    assert_eq!(order.status, Status::Completed, "{:?}", order.last_error);
    assert_eq!(
        metric(
            &provider.metrics().await,
            "provider_faults_total{fault=\"refuse\"}"
        ),
        1.0
    );
}

/// Past its rate the provider answers 429 with Retry-After: 1, and the
/// retry waits that second, though its own backoff is 10 ms.
#[tokio::test]
async fn a_rate_limited_charge_is_retried_no_sooner_than_retry_after() {
    let provider = RunningProvider::start(|c| c.provider_rate_limit = 1).await;
    let lab = Lab::new(lab_options(&provider, 3, Duration::from_millis(10))).await;
    let first = lab.post_order().await;
    let second = lab.post_order().await;
    let first = settle(&lab, first.id).await;
    let second = settle(&lab, second.id).await;
    assert_eq!(first.status, Status::Completed, "{:?}", first.last_error);
    assert_eq!(second.status, Status::Completed, "{:?}", second.last_error);
    let waited = (second.updated_at - second.created_at).to_std().unwrap();
    assert!(
        second.attempts >= 2 && waited >= Duration::from_millis(900),
        "{} attempts, done after {waited:?}",
        second.attempts
    );
    let ours = service_metrics(&lab);
    assert!(
        metric(
            &ours,
            "payment_client_attempt_duration_seconds_count{outcome=\"busy\"}"
        ) >= 1.0
    );
    assert!(metric(&provider.metrics().await, "provider_rate_limited_total") >= 1.0);
}

fn client(
    url: &str,
    max_connections: u32,
    lab_metrics: &reliability_lab::observability::Metrics,
) -> HttpPayments {
    HttpPayments::new(
        &ClientSettings {
            url: url.to_owned(),
            max_connections,
            connect_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(30),
            honour_retry_after: true,
            admin_token: None,
        },
        lab_metrics.payment_client(),
    )
    .unwrap()
}

#[tokio::test]
async fn the_client_classifies_refusals_busy_answers_and_unreachable_providers() {
    let provider = RunningProvider::start(|_| {}).await;
    let metrics = reliability_lab::observability::Metrics::new();
    let payments = client(&provider.url, 4, &metrics);
    let cancel = CancellationToken::new();
    let order = OrderId::new_random();
    // The provider refuses the request itself: a 4xx, never retried.
    let bad = ChargeRequest::for_order(order, 1, 0, "USD");
    match payments.charge(&bad, &cancel).await {
        Err(PaymentError::Refused {
            status: 422,
            message,
        }) => {
            assert!(message.contains("amount"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    use reliability_lab::reliability::Classify;
    let refused = PaymentError::Refused {
        status: 422,
        message: String::new(),
    };
    assert!(!refused.is_retryable() && !refused.counts_as_failure());
    // A good one, then its key again: the first charge, nothing new.
    let good = ChargeRequest::for_order(order, 1, 500, "EUR");
    payments.charge(&good, &cancel).await.unwrap();
    payments.charge(&good, &cancel).await.unwrap();
    let theirs = provider.metrics().await;
    assert_eq!(metric(&theirs, "payment_charges_total"), 1.0);
    // Without a key, every call is a charge of its own.
    let http = reqwest::Client::new();
    for _ in 0..2 {
        let answer = http
            .post(format!("{}/charges", provider.url))
            .header("content-type", "application/json")
            .body(format!(
                r#"{{"order_id":"{order}","amount":500,"currency":"EUR"}}"#
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
    }
    let theirs = provider.metrics().await;
    assert_eq!(
        metric(&theirs, "payment_charges_total"),
        3.0,
        "keyless calls charge"
    );
    assert_eq!(metric(&theirs, "payment_duplicate_charges_total"), 2.0);
    // 503 with Retry-After from an outage-free full provider is Busy; an
    // outage is Busy without one.
    let admin = reqwest::Client::new();
    admin
        .put(format!("{}/admin/payment", provider.url))
        .header("content-type", "application/json")
        .body(r#"{"mode":"outage"}"#)
        .send()
        .await
        .unwrap();
    let busy = payments
        .charge(
            &ChargeRequest::for_order(OrderId::new_random(), 1, 500, "EUR"),
            &cancel,
        )
        .await;
    assert_eq!(
        busy,
        Err(PaymentError::Busy {
            status: 503,
            retry_after: None
        })
    );
    // Nothing listens: unreachable, a connect error of kind refused.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let nowhere = client(&url, 4, &metrics);
    match nowhere.charge(&good, &cancel).await {
        Err(PaymentError::Unreachable(why)) => assert!(why.contains("refused"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        metric(
            &metrics.render().unwrap(),
            "payment_client_connect_errors_total{kind=\"refused\"}"
        ),
        1.0
    );
}

/// A provider that answers every charge after `millis`, and a client with
/// one connection to it (the provider stops when the first is dropped).
async fn slow_provider_one_connection(
    millis: u64,
) -> (
    RunningProvider,
    reliability_lab::observability::Metrics,
    std::sync::Arc<HttpPayments>,
) {
    let latency = Duration::from_millis(millis);
    let provider = RunningProvider::start(move |c| {
        c.simulator.payment_latency_min = latency;
        c.simulator.payment_latency_max = latency;
    })
    .await;
    let metrics = reliability_lab::observability::Metrics::new();
    let payments = std::sync::Arc::new(client(&provider.url, 1, &metrics));
    (provider, metrics, payments)
}

/// A pool of one connection and a slow provider: the second attempt
/// waits for the connection, and the per-attempt timeout covers that wait.
#[tokio::test]
async fn an_attempt_waiting_for_a_busy_pool_times_out_inside_its_own_timeout() {
    let (_provider, metrics, payments) = slow_provider_one_connection(600).await;
    let cancel = CancellationToken::new();
    let attempt = |payments: std::sync::Arc<HttpPayments>, timeout: Duration| {
        let cancel = cancel.clone();
        async move {
            let request = ChargeRequest::for_order(OrderId::new_random(), 1, 500, "EUR");
            tokio::time::timeout(timeout, payments.charge(&request, &cancel)).await
        }
    };
    // The first holds the one connection for 600 ms; the second, 50 ms
    // later with 300 ms to live, spends all of them waiting for it.
    let first = tokio::spawn(attempt(payments.clone(), Duration::from_secs(5)));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let second = tokio::spawn(attempt(payments.clone(), Duration::from_millis(300)));
    assert_eq!(first.await.unwrap(), Ok(Ok(())), "the first was served");
    assert!(
        second.await.unwrap().is_err(),
        "the second timed out waiting"
    );
    let text = metrics.render().unwrap();
    assert_eq!(metric(&text, "payment_client_connection_waits_total"), 1.0);
    assert_eq!(
        metric(&text, "payment_client_abandoned_total{phase=\"exchange\"}"),
        0.0
    );
    assert_eq!(
        metric(
            &text,
            "payment_client_abandoned_total{phase=\"waiting_for_connection\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(&text, "payment_client_ambiguous_total{cause=\"timeout\"}"),
        0.0,
        "nothing went out"
    );
    assert_eq!(metric(&text, "payment_client_connections_busy"), 0.0);
    assert_eq!(payments.pool().0, 1);
}

/// Bad input to the provider's API gets what the service's gets: a 4xx
/// with a JSON body naming the problem.
#[tokio::test]
async fn bad_input_to_the_provider_is_a_4xx_naming_the_field() {
    let provider =
        RunningProvider::start(|c| c.admin_token = Some("s3cret-token-value".into())).await;
    let http = reqwest::Client::new();
    let post = |body: &'static str, content_type: &'static str| {
        http.post(format!("{}/charges", provider.url))
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    for (body, content_type, status, field) in [
        (
            r#"{"order_id":"x","amount":5,"currency":"USD"}"#,
            "application/json",
            422,
            Some("order_id"),
        ),
        (
            r#"{"order_id":"1b4e28ba-2fa1-11d2-883f-0016d3cca427","amount":5,"currency":"usd!"}"#,
            "application/json",
            422,
            Some("currency"),
        ),
        (
            r#"{"order_id":"1b4e28ba-2fa1-11d2-883f-0016d3cca427","amount":5,"currency":"USD","tip":1}"#,
            "application/json",
            422,
            Some("tip"),
        ),
        (
            r#"{"order_id":"1b4e28ba-2fa1-11d2-883f-0016d3cca427","amount":5,"currency":"USD","attempt":0}"#,
            "application/json",
            422,
            Some("attempt"),
        ),
        (
            r#"{"order_id":"1b4e28ba-2fa1-11d2-883f-0016d3cca427","amount":5,"currency":"USD","attempt":1000001}"#,
            "application/json",
            422,
            Some("attempt"),
        ),
        (r#"{"order_id":"#, "application/json", 400, None),
        ("amount=5", "text/plain", 415, None),
    ] {
        let answer = post(body, content_type).await.unwrap();
        assert_eq!(answer.status().as_u16(), status, "{body}");
        let json: serde_json::Value = answer.json().await.unwrap();
        assert!(json["error"]["code"].is_string(), "{json}");
        if let Some(field) = field {
            assert_eq!(json["error"]["field"], field, "{json}");
        }
    }
    let key = http
        .get(format!("{}/charges/%ff", provider.url))
        .send()
        .await
        .unwrap();
    assert_eq!(key.status(), 400, "not UTF-8");
    let unknown = http
        .get(format!("{}/charges/no-such-key", provider.url))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    // The admin API wants the token, and names a bad field.
    let faults = format!("{}/admin/faults", provider.url);
    let stranger = http.get(&faults).send().await.unwrap();
    assert_eq!(stranger.status(), 401);
    let bad = http
        .put(&faults)
        .bearer_auth("s3cret-token-value")
        .header("content-type", "application/json")
        .body(r#"{"fault":"stall","rate":2}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 422);
    let json: serde_json::Value = bad.json().await.unwrap();
    assert_eq!(json["error"]["field"], "rate");
    let now: serde_json::Value = http
        .get(&faults)
        .bearer_auth("s3cret-token-value")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(now["fault"], "none", "a refused change changes nothing");
    let doc: serde_json::Value = http
        .get(format!("{}/openapi.json", provider.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for path in [
        "/charges",
        "/charges/{key}",
        "/admin/faults",
        "/admin/payment",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} documented");
    }
}

/// A chain service → provider 1 → provider 2: provider 1 charges by calling
/// provider 2 through its own retry. With the bottom declining everything,
/// three attempts at each tier make nine calls there for one order; once
/// it charges, the charge is made once at the bottom and recorded in the
/// middle, which then answers its key without calling down.
#[tokio::test]
async fn a_chain_multiplies_attempts_at_each_tier_and_charges_once_at_the_bottom() {
    let bottom = RunningProvider::start(|c| c.simulator.payment_failure_rate = 1.0).await;
    let bottom_url = bottom.url.clone();
    let middle = RunningProvider::start(move |c| {
        c.upstream.upstream_url = Some(bottom_url);
        c.upstream.upstream_retry_max_attempts = 3;
        c.upstream.upstream_retry_initial_interval = Duration::from_millis(5);
        c.upstream.upstream_retry_max_interval = Duration::from_millis(20);
        c.upstream.upstream_breaker_enabled = false;
    })
    .await;
    let lab = Lab::new(lab_options(&middle, 3, Duration::from_millis(5))).await;
    let declined = lab.post_order().await;
    let declined = settle(&lab, declined.id).await;
    assert_eq!(declined.status, Status::Failed);
    assert_eq!(declined.attempts, 3);
    assert!(
        declined
            .last_error
            .as_deref()
            .unwrap()
            .contains("(502): not charged below"),
        "{:?}",
        declined.last_error
    );
    let (top, below) = (middle.metrics().await, bottom.metrics().await);
    assert_eq!(metric(&top, "provider_requests_total"), 3.0);
    assert_eq!(metric(&below, "provider_requests_total"), 9.0);
    assert_eq!(
        metric(&top, "retry_attempts_total{result=\"retried\"}"),
        6.0
    );
    assert_eq!(
        metric(
            &top,
            "payment_client_attempt_duration_seconds_count{outcome=\"failed\"}"
        ),
        9.0
    );

    // The bottom recovers: one charge there, recorded in the middle too.
    reqwest::Client::new()
        .put(format!("{}/admin/payment", bottom.url))
        .header("content-type", "application/json")
        .body(r#"{"failure_rate":0}"#)
        .send()
        .await
        .unwrap();
    let paid = lab.post_order().await;
    let paid = settle(&lab, paid.id).await;
    assert_eq!(paid.status, Status::Completed, "{:?}", paid.last_error);
    let at_bottom = bottom
        .charge_of(paid.id)
        .await
        .expect("charged at the bottom");
    let in_middle = middle
        .charge_of(paid.id)
        .await
        .expect("recorded in the middle");
    assert_eq!(in_middle["order_id"], at_bottom["order_id"]);
    assert_eq!(
        metric(&bottom.metrics().await, "payment_charges_total"),
        1.0
    );
    // The key again, straight to the middle: answered there, nothing below.
    let calls_below = metric(&bottom.metrics().await, "provider_requests_total");
    let again = reqwest::Client::new()
        .post(format!("{}/charges", middle.url))
        .header("content-type", "application/json")
        .header("idempotency-key", ChargeRequest::key_for(paid.id))
        .body(format!(
            r#"{{"order_id":"{}","amount":1999,"currency":"USD"}}"#,
            paid.id
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 200);
    assert_eq!(
        metric(&bottom.metrics().await, "provider_requests_total"),
        calls_below
    );
    assert_eq!(
        metric(&middle.metrics().await, "payment_charges_total"),
        1.0
    );
}

/// What a tier in the middle answers when it cannot charge below: its own
/// open breaker is a 503 without Retry-After (the downstream was not
/// called), a busy downstream a 503 with the downstream's Retry-After, a
/// failure below a 502.
#[tokio::test]
async fn a_tier_in_the_middle_answers_so_that_its_caller_can_tell_why() {
    let http = reqwest::Client::new();
    let charge = |url: String| {
        let http = http.clone();
        async move {
            let answer = http
                .post(format!("{url}/charges"))
                .header("content-type", "application/json")
                .header("idempotency-key", format!("k-{}", OrderId::new_random()))
                .body(format!(
                    r#"{{"order_id":"{}","amount":100,"currency":"USD"}}"#,
                    OrderId::new_random()
                ))
                .send()
                .await
                .unwrap();
            let status = answer.status().as_u16();
            let retry_after = answer
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned());
            let body: serde_json::Value = answer.json().await.unwrap();
            (status, retry_after, body["error"]["code"].clone())
        }
    };
    let declining = RunningProvider::start(|c| c.simulator.payment_failure_rate = 1.0).await;
    let url = declining.url.clone();
    let breaking = RunningProvider::start(move |c| {
        c.upstream.upstream_url = Some(url);
        c.upstream.upstream_retry_max_attempts = 1;
        c.upstream.upstream_breaker_failure_threshold = 2;
        c.upstream.upstream_breaker_open_duration = Duration::from_secs(60);
    })
    .await;
    for _ in 0..2 {
        let (status, retry_after, code) = charge(breaking.url.clone()).await;
        assert_eq!((status, retry_after), (502, None));
        assert_eq!(code, "upstream_failed");
    }
    let (status, retry_after, code) = charge(breaking.url.clone()).await;
    assert_eq!((status, retry_after), (503, None));
    assert_eq!(code, "upstream_open");
    assert_eq!(
        metric(&declining.metrics().await, "provider_requests_total"),
        2.0,
        "the open breaker did not call down"
    );
    let text = breaking.metrics().await;
    assert_eq!(
        metric(&text, "circuit_breaker_rejections_total{kind=\"open\"}"),
        1.0,
        "{text}"
    );

    let limited = RunningProvider::start(|c| c.provider_rate_limit = 1).await;
    let url = limited.url.clone();
    let relaying = RunningProvider::start(move |c| {
        c.upstream.upstream_url = Some(url);
        c.upstream.upstream_retry_max_attempts = 1;
    })
    .await;
    let (status, _, _) = charge(relaying.url.clone()).await;
    assert_eq!(status, 200);
    let (status, retry_after, code) = charge(relaying.url.clone()).await;
    assert_eq!((status, retry_after.as_deref()), (503, Some("1")));
    assert_eq!(code, "upstream_busy");
}

/// PAYMENT_RETRY_AFTER=off: a busy answer's Retry-After is read and
/// dropped, so the retry waits its own backoff.
#[tokio::test]
async fn a_client_told_to_ignore_retry_after_drops_it() {
    let provider = RunningProvider::start(|c| c.provider_rate_limit = 1).await;
    let metrics = reliability_lab::observability::Metrics::new();
    let cancel = CancellationToken::new();
    for (honour, expected) in [(true, Some(Duration::from_secs(1))), (false, None)] {
        let payments = HttpPayments::new(
            &ClientSettings {
                url: provider.url.clone(),
                max_connections: 2,
                connect_timeout: Duration::from_secs(1),
                idle_timeout: Duration::from_secs(30),
                honour_retry_after: honour,
                admin_token: None,
            },
            metrics.payment_client(),
        )
        .unwrap();
        // One call a second is allowed: of a few in a row, all but the
        // first in each second are over the limit.
        let mut busy = None;
        for _ in 0..5 {
            let request = ChargeRequest::for_order(OrderId::new_random(), 1, 500, "EUR");
            if let Err(err) = payments.charge(&request, &cancel).await {
                busy = Some(err);
                break;
            }
        }
        assert_eq!(
            busy,
            Some(PaymentError::Busy {
                status: 429,
                retry_after: expected
            })
        );
    }
}

/// PAYMENT_TIMEOUT_SCOPE=exchange: an attempt's timeout starts once it
/// holds a connection, so one that waited longer than the timeout for the
/// pool is still served; an exchange longer than the timeout is abandoned
/// (counted as the caller's timeout would count it).
#[tokio::test]
async fn a_timeout_on_the_exchange_alone_never_ends_an_attempt_waiting_for_the_pool() {
    let (_provider, metrics, payments) = slow_provider_one_connection(400).await;
    let cancel = CancellationToken::new();
    let attempt = |limit: Duration| {
        let (payments, cancel) = (payments.clone(), cancel.clone());
        async move {
            let request = ChargeRequest::for_order(OrderId::new_random(), 1, 500, "EUR");
            payments.charge_within(&request, &cancel, Some(limit)).await
        }
    };
    // One connection, exchanges of 400 ms: the third waits ~700 ms for
    // it, longer than its 500 ms bound, and is served all the same.
    let first = tokio::spawn(attempt(Duration::from_secs(5)));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let second = tokio::spawn(attempt(Duration::from_secs(5)));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let third = tokio::spawn(attempt(Duration::from_millis(500)));
    assert_eq!(first.await.unwrap(), Ok(()));
    assert_eq!(second.await.unwrap(), Ok(()));
    assert_eq!(third.await.unwrap(), Ok(()), "served after waiting");
    // An exchange that outlasts its bound is abandoned, ambiguously.
    let fourth = attempt(Duration::from_millis(100)).await;
    assert_eq!(
        fourth,
        Err(PaymentError::Timeout(Duration::from_millis(100)))
    );
    let text = metrics.render().unwrap();
    assert_eq!(metric(&text, "payment_client_connection_waits_total"), 2.0);
    assert_eq!(
        metric(&text, "payment_client_abandoned_total{phase=\"exchange\"}"),
        1.0
    );
    assert_eq!(
        metric(&text, "payment_client_ambiguous_total{cause=\"timeout\"}"),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "payment_client_abandoned_total{phase=\"waiting_for_connection\"}"
        ),
        0.0
    );
}

fn put_json(uri: &str, body: &str) -> axum::http::Request<axum::body::Body> {
    axum::http::Request::put(uri)
        .header("content-type", "application/json")
        .body(axum::body::Body::from(body.to_owned()))
        .unwrap()
}

/// `/admin/provider`: where charges go and, with a remote provider, the
/// client's pool and the provider's faults, which
/// `/admin/provider/faults` changes there. A bad value is refused here,
/// naming it, before anything is forwarded; in process there is nothing
/// to forward to.
#[tokio::test]
async fn the_admin_api_shows_the_remote_provider_and_forwards_fault_changes_to_it() {
    use crate::helpers::{error_code, get, send};
    use axum::http::StatusCode;

    let in_process = Lab::new(LabOptions::default()).await;
    let (status, _, body) = send(&in_process.router, get("/admin/provider")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["remote"], false);
    assert_eq!(body["url"], serde_json::Value::Null);
    let (status, _, body) = send(
        &in_process.router,
        put_json("/admin/provider/faults", r#"{"fault":"stall"}"#),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(error_code(&body), "no_remote_provider");

    let provider = RunningProvider::start(|c| c.admin_token = Some("provider-secret".into())).await;
    let mut options = lab_options(&provider, 3, Duration::from_millis(5));
    options.payment_max_connections = 6;
    let lab = Lab::new(options).await;
    // Without the provider's token: shown, but its faults cannot be read.
    let (status, _, body) = send(&lab.router, get("/admin/provider")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["remote"], true);
    assert_eq!(body["url"], provider.url.as_str());
    assert_eq!(body["max_connections"], 6);
    assert_eq!(body["faults"], serde_json::Value::Null);
    assert!(
        body["faults_error"]
            .as_str()
            .unwrap()
            .contains("set PAYMENT_ADMIN_TOKEN"),
        "{body}"
    );
    let (status, _, body) = send(
        &lab.router,
        put_json("/admin/provider/faults", r#"{"fault":"stall","rate":0.5}"#),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert_eq!(error_code(&body), "provider_refused");
    // A bad value: 422 naming it, whatever the provider would say.
    for (bad, field) in [
        (r#"{"rate":2}"#, "rate"),
        (r#"{"fault":"melt"}"#, "fault"),
        (r#"{"slow_body_interval":"0ms"}"#, "slow_body_interval"),
    ] {
        let (status, _, body) = send(&lab.router, put_json("/admin/provider/faults", bad)).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {body}");
        assert!(body.to_string().contains(field), "{bad}: {body}");
    }

    // With the token, the change lands at the provider, durations exact.
    let mut options = lab_options(&provider, 3, Duration::from_millis(5));
    options.payment_admin_token = Some("provider-secret");
    let lab = Lab::new(options).await;
    let (status, _, body) = send(
        &lab.router,
        put_json(
            "/admin/provider/faults",
            r#"{"fault":"slow_body","rate":0.25,"slow_body_interval":"1500ms","rate_limit":7}"#,
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["fault"], "slow_body");
    let theirs: serde_json::Value = provider
        .http
        .get(format!("{}/admin/faults", provider.url))
        .bearer_auth("provider-secret")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(theirs["fault"], "slow_body");
    assert_eq!(theirs["rate"], 0.25);
    assert_eq!(theirs["slow_body_interval"], "1500ms");
    assert_eq!(theirs["rate_limit"], 7);
    let (_, _, body) = send(&lab.router, get("/admin/provider")).await;
    assert_eq!(body["faults"]["fault"], "slow_body", "{body}");
    assert_eq!(body["faults_error"], serde_json::Value::Null);
}
