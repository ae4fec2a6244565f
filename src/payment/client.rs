//! The service's client for a payment provider across the network
//! (`PAYMENT_URL`): `reliability-lab provider`, or anything speaking its
//! API (`POST /charges` with an `Idempotency-Key`).
//!
//! HTTP/1.1 over hyper-util's pooled client. Its pool has no bound on the
//! connections it opens, so a semaphore of `PAYMENT_MAX_CONNECTIONS`
//! permits stands in front of it: an attempt holds a permit for its whole
//! exchange, and with HTTP/1.1 one exchange is one connection, so no more
//! connections are ever busy (or kept) than permits. An attempt that finds
//! none free waits for one; that wait is inside the caller's per-attempt
//! timeout (`PAYMENT_TIMEOUT` covers the wait for a connection, the connect,
//! the request and the whole answer), which is what a caller's deadline
//! means. The experiment `pool-exhaustion` is about what that costs.
//!
//! Every attempt carries the order's idempotency key. Its failures are
//! classified for the retry and the breaker (`workers::job` says how each
//! is treated):
//! - no connection could be made, or the pool's connection was closed
//!   before the request went out: `Unreachable`, safe to retry;
//! - the connection failed once the request was on its way (reset, closed
//!   mid-answer): `ConnectionLost`, ambiguous: the provider may have
//!   charged; retried, because the key makes a retry safe; counted apart
//!   (`payment_client_ambiguous_total{cause="connection"}`), as is an
//!   attempt abandoned by its timeout after the request went out
//!   (`cause="timeout"`);
//! - 429 and 503: `Busy`, retried no sooner than their `Retry-After`;
//! - another 4xx: `Refused`, never retried (the request itself is wrong);
//! - another 5xx: `Failed`, retried (the simulator's drawn declines).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, StatusCode, Uri};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus::{Histogram, IntCounter, IntCounterVec, IntGauge};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::{ChargeRequest, PaymentError};

/// The largest answer read from the provider.
const ANSWER_LIMIT: usize = 64 * 1024;
/// The longest wait for the provider's admin API.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);

/// What the per-attempt timeout (`PAYMENT_TIMEOUT`) bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TimeoutScope {
    /// The wait for a connection, the connect, the request and the whole
    /// answer: what a caller's deadline means (the default).
    Attempt,
    /// The exchange only, from the moment the attempt holds a connection;
    /// the wait for one is unbounded. An attempt then never dies waiting,
    /// but it may wait as long as the pool stays dry.
    Exchange,
}

/// How the client reaches the provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientSettings {
    /// The provider's base URL, `http://host:port` (a path prefix is kept).
    pub url: String,
    /// Connections open at once, at most (1 to 10,000).
    pub max_connections: u32,
    /// Longest wait for a TCP connection to be made.
    pub connect_timeout: Duration,
    /// A pooled connection unused this long is closed.
    pub idle_timeout: Duration,
    /// Whether a busy answer's `Retry-After` is passed on to the retry
    /// (`PAYMENT_RETRY_AFTER`); off, it is read and dropped.
    pub honour_retry_after: bool,
    /// The provider's `ADMIN_TOKEN`, for changing its faults from the
    /// service's admin API (`PAYMENT_ADMIN_TOKEN`).
    pub admin_token: Option<String>,
}

/// The client's own figures.
#[derive(Clone)]
pub struct ClientMetrics {
    /// Connections open now (busy or idle in the pool).
    pub open: IntGauge,
    /// Connections carrying an exchange now.
    pub busy: IntGauge,
    /// Attempts that found every connection busy and waited for one.
    pub waits: IntCounter,
    /// How long those waits took.
    pub wait_seconds: Histogram,
    /// Connections that could not be made, by kind: refused, timeout, other.
    pub connect_errors: IntCounterVec,
    /// Ambiguous failures, by cause: connection (lost after the request
    /// went out) or timeout (abandoned after it went out).
    pub ambiguous: IntCounterVec,
    /// Attempts abandoned by their caller's timeout, by phase: waiting for
    /// a connection, or in the exchange.
    pub abandoned: IntCounterVec,
    /// How long attempts took, by outcome.
    pub attempt_seconds: prometheus::HistogramVec,
}

impl ClientMetrics {
    pub const CONNECT_ERROR_KINDS: [&'static str; 3] = ["refused", "timeout", "other"];
    pub const AMBIGUOUS_CAUSES: [&'static str; 2] = ["connection", "timeout"];
    pub const PHASES: [&'static str; 2] = ["waiting_for_connection", "exchange"];
    pub const OUTCOMES: [&'static str; 7] = [
        "ok",
        "refused",
        "busy",
        "failed",
        "unreachable",
        "connection_lost",
        "abandoned",
    ];
}

/// The client's counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientReading {
    /// Attempts made (ended, whatever their outcome).
    pub attempts: u64,
    /// Attempts that found every connection busy and waited for one.
    pub waits: u64,
    /// Attempts abandoned by their timeout while waiting for a connection,
    /// and once in the exchange.
    pub abandoned_waiting: u64,
    pub abandoned_exchange: u64,
    /// Attempts whose charge may or may not have been made.
    pub ambiguous: u64,
}

impl ClientMetrics {
    pub fn reading(&self) -> ClientReading {
        let count = |vec: &IntCounterVec, label: &str| vec.with_label_values(&[label]).get();
        ClientReading {
            attempts: Self::OUTCOMES
                .iter()
                .map(|o| {
                    self.attempt_seconds
                        .with_label_values(&[o])
                        .get_sample_count()
                })
                .sum(),
            waits: self.waits.get(),
            abandoned_waiting: count(&self.abandoned, "waiting_for_connection"),
            abandoned_exchange: count(&self.abandoned, "exchange"),
            ambiguous: Self::AMBIGUOUS_CAUSES
                .iter()
                .map(|c| count(&self.ambiguous, c))
                .sum(),
        }
    }
}

/// A connection that counts itself in `open` while it lives.
struct Counted {
    inner: TokioIo<TcpStream>,
    open: IntGauge,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.open.dec();
    }
}

impl hyper::rt::Read for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl Connection for Counted {
    fn connected(&self) -> Connected {
        self.inner.connected()
    }
}

/// hyper-util's connector, its connections counted.
#[derive(Clone)]
struct Connector {
    inner: HttpConnector,
    open: IntGauge,
}

impl tower::Service<Uri> for Connector {
    type Response = Counted;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Counted, Self::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.inner.call(uri);
        let open = self.open.clone();
        Box::pin(async move {
            let inner = connecting.await?;
            open.inc();
            Ok(Counted { inner, open })
        })
    }
}

/// The charge's body, as the provider's API takes it.
#[derive(serde::Serialize)]
struct ChargeBody<'a> {
    order_id: uuid::Uuid,
    amount: i64,
    currency: &'a str,
    attempt: u32,
}

/// What the provider says in an error answer.
#[derive(serde::Deserialize)]
struct ErrorAnswer {
    error: ErrorAnswerDetail,
}

#[derive(serde::Deserialize)]
struct ErrorAnswerDetail {
    message: String,
}

/// Where an attempt is, for the metrics of one its caller abandons.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    WaitingForConnection,
    Exchange,
    Done,
}

/// Counts an attempt abandoned (dropped by its caller's timeout) in the
/// phase it had reached.
struct Attempt<'a> {
    metrics: &'a ClientMetrics,
    phase: Phase,
    started: tokio::time::Instant,
}

impl Attempt<'_> {
    fn finish(&mut self, outcome: &str) {
        self.phase = Phase::Done;
        self.metrics
            .attempt_seconds
            .with_label_values(&[outcome])
            .observe(self.started.elapsed().as_secs_f64());
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        let phase = match self.phase {
            Phase::Done => return,
            Phase::WaitingForConnection => "waiting_for_connection",
            Phase::Exchange => {
                self.metrics.ambiguous.with_label_values(&["timeout"]).inc();
                "exchange"
            }
        };
        self.metrics.abandoned.with_label_values(&[phase]).inc();
        self.metrics
            .attempt_seconds
            .with_label_values(&["abandoned"])
            .observe(self.started.elapsed().as_secs_f64());
    }
}

/// The provider's base URL (without a trailing `/`) and its charges'
/// endpoint; anything but `http://host[:port][/prefix]` is one line naming
/// `PAYMENT_URL`.
pub fn charges_uri(url: &str) -> Result<(String, Uri), String> {
    let url = url.trim().trim_end_matches('/');
    let base: Uri = url
        .parse()
        .map_err(|_| format!("invalid PAYMENT_URL: {url:?} is not a URL"))?;
    if base.scheme_str() != Some("http") || base.host().is_none() {
        return Err(format!(
            "invalid PAYMENT_URL: {url:?}; expected http://host:port (the provider speaks plain HTTP/1.1)"
        ));
    }
    if base.query().is_some() {
        return Err(format!(
            "invalid PAYMENT_URL: {url:?} has a query; expected http://host:port"
        ));
    }
    let charges: Uri = format!("{url}/charges")
        .parse()
        .map_err(|_| format!("invalid PAYMENT_URL: {url:?} is not a URL"))?;
    Ok((url.to_owned(), charges))
}

/// Charges through a remote provider.
pub struct HttpPayments {
    client: Client<Connector, Full<Bytes>>,
    charges: Uri,
    url: String,
    permits: Arc<Semaphore>,
    max_connections: u32,
    honour_retry_after: bool,
    admin_token: Option<String>,
    metrics: ClientMetrics,
}

impl HttpPayments {
    /// A client for the provider at `settings.url`; a URL that is not
    /// `http://host[:port][/prefix]` is refused, naming it.
    pub fn new(settings: &ClientSettings, metrics: ClientMetrics) -> Result<Self, String> {
        let (url, charges) = charges_uri(&settings.url)?;
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(settings.connect_timeout));
        http.set_nodelay(true);
        let connector = Connector {
            inner: http,
            open: metrics.open.clone(),
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(settings.idle_timeout)
            .pool_max_idle_per_host(settings.max_connections as usize)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);
        Ok(Self {
            client,
            charges,
            url,
            permits: Arc::new(Semaphore::new(settings.max_connections as usize)),
            max_connections: settings.max_connections,
            honour_retry_after: settings.honour_retry_after,
            admin_token: settings.admin_token.clone(),
            metrics,
        })
    }

    /// The provider's base URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The client's counters now.
    pub fn reading(&self) -> ClientReading {
        self.metrics.reading()
    }

    /// An operator's call to the provider's admin API (`GET` or `PUT`
    /// `/admin/faults`), outside the pool's bound: its status and JSON
    /// answer, or why there was none.
    pub async fn admin(
        &self,
        method: hyper::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(u16, serde_json::Value), String> {
        let uri: Uri = format!("{}{path}", self.url)
            .parse()
            .map_err(|_| format!("{}{path} is not a URL", self.url))?;
        let mut request = Request::builder().method(method).uri(uri);
        if let Some(token) = &self.admin_token {
            request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        if body.is_some() {
            request = request.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| e.to_string())?;
        let exchange = async {
            let answer = self.client.request(request).await.map_err(|e| chain(&e))?;
            let status = answer.status().as_u16();
            let body = Limited::new(answer.into_body(), ANSWER_LIMIT)
                .collect()
                .await
                .map_err(|e| format!("the answer was cut off: {e}"))?
                .to_bytes();
            let json = serde_json::from_slice(&body)
                .map_err(|_| format!("the answer ({status}) is not JSON"))?;
            Ok((status, json))
        };
        tokio::time::timeout(ADMIN_TIMEOUT, exchange)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {ADMIN_TIMEOUT:?}")))
    }

    /// The pool's bound and its connections now: (max, open, busy).
    pub fn pool(&self) -> (u32, u64, u64) {
        (
            self.max_connections,
            self.metrics.open.get().max(0) as u64,
            self.metrics.busy.get().max(0) as u64,
        )
    }

    /// One attempt: a connection from the pool (waiting for one if all
    /// are busy), then `POST /charges` under the order's key, then the
    /// answer, read whole. The caller bounds it with its timeout.
    pub async fn charge(
        &self,
        request: &ChargeRequest,
        cancel: &CancellationToken,
    ) -> Result<(), PaymentError> {
        self.charge_within(request, cancel, None).await
    }

    /// `charge`, with the exchange (not the wait for a connection) bounded
    /// by `exchange_timeout` when given: past it the attempt is abandoned
    /// as a caller's timeout would abandon it, and answers `Timeout`.
    pub async fn charge_within(
        &self,
        request: &ChargeRequest,
        cancel: &CancellationToken,
        exchange_timeout: Option<Duration>,
    ) -> Result<(), PaymentError> {
        let metrics = &self.metrics;
        let mut attempt = Attempt {
            metrics,
            phase: Phase::WaitingForConnection,
            started: tokio::time::Instant::now(),
        };
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                metrics.waits.inc();
                let waited = tokio::time::Instant::now();
                let permit = tokio::select! {
                    biased;
                    _ = cancel.cancelled() => {
                        attempt.phase = Phase::Done;
                        return Err(PaymentError::Cancelled);
                    }
                    permit = self.permits.clone().acquire_owned() => permit,
                };
                metrics.wait_seconds.observe(waited.elapsed().as_secs_f64());
                // The semaphore is never closed.
                permit.map_err(|_| PaymentError::Cancelled)?
            }
        };
        metrics.busy.inc();
        let _busy = scopeguard(metrics.busy.clone(), permit);
        attempt.phase = Phase::Exchange;
        let body = serde_json::to_vec(&ChargeBody {
            order_id: request.order_id.as_uuid(),
            amount: request.amount,
            currency: &request.currency,
            attempt: request.attempt,
        })
        .expect("a charge serialises");
        let http_request = Request::post(self.charges.clone())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header("idempotency-key", &request.idempotency_key)
            .body(Full::new(Bytes::from(body)))
            .expect("a valid request");
        let exchange = async {
            let answer = self.client.request(http_request).await;
            match answer {
                Ok(answer) => read_answer(answer).await,
                Err(err) => Err(classify_send_error(&err, metrics)),
            }
        };
        let exchange = async {
            match exchange_timeout {
                None => exchange.await,
                // Left unfinished, `attempt` counts itself abandoned in the
                // exchange when it is dropped, as a caller's timeout would.
                Some(limit) => match tokio::time::timeout(limit, exchange).await {
                    Ok(result) => result,
                    Err(_) => Err(PaymentError::Timeout(limit)),
                },
            }
        };
        let mut result = tokio::select! {
            biased;
            _ = cancel.cancelled() => {
                attempt.phase = Phase::Done;
                return Err(PaymentError::Cancelled);
            }
            result = exchange => result,
        };
        if matches!(result, Err(PaymentError::Timeout(_))) {
            // The exchange ran out of time: `attempt`, dropped unfinished,
            // counts it abandoned (and ambiguous: the request went out).
            return result;
        }
        if !self.honour_retry_after {
            if let Err(PaymentError::Busy { retry_after, .. }) = &mut result {
                *retry_after = None;
            }
        }
        let outcome = match &result {
            Ok(()) => "ok",
            Err(PaymentError::Refused { .. }) => "refused",
            Err(PaymentError::Busy { .. }) => "busy",
            Err(PaymentError::Failed { .. }) => "failed",
            Err(PaymentError::Unreachable(_)) => "unreachable",
            Err(PaymentError::ConnectionLost(_)) => {
                metrics.ambiguous.with_label_values(&["connection"]).inc();
                "connection_lost"
            }
            Err(_) => "failed",
        };
        attempt.finish(outcome);
        result
    }
}

/// Gives the busy count back and the permit with it, however the attempt ends.
fn scopeguard(busy: IntGauge, permit: tokio::sync::OwnedSemaphorePermit) -> impl Drop {
    struct Guard(
        IntGauge,
        #[allow(dead_code)] tokio::sync::OwnedSemaphorePermit,
    );
    impl Drop for Guard {
        fn drop(&mut self) {
            self.0.dec();
        }
    }
    Guard(busy, permit)
}

/// An answer, read whole: a success, or the error its status says.
async fn read_answer(answer: hyper::Response<Incoming>) -> Result<(), PaymentError> {
    let status = answer.status();
    let retry_after = answer
        .headers()
        .get(hyper::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_retry_after);
    let body = match Limited::new(answer.into_body(), ANSWER_LIMIT)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        // The status arrived, then the connection failed mid-body: for a
        // success, the charge was made and the answer is lost.
        Err(err) => {
            return Err(PaymentError::ConnectionLost(format!(
                "the answer ({}) was cut off: {err}",
                status.as_u16()
            )))
        }
    };
    if status.is_success() {
        return Ok(());
    }
    let message = serde_json::from_slice::<ErrorAnswer>(&body)
        .map(|a| a.error.message)
        .unwrap_or_else(|_| {
            status
                .canonical_reason()
                .unwrap_or("no reason given")
                .to_owned()
        });
    let code = status.as_u16();
    Err(match status {
        StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => PaymentError::Busy {
            status: code,
            retry_after,
        },
        s if s.is_client_error() => PaymentError::Refused {
            status: code,
            message,
        },
        _ => PaymentError::Failed {
            status: code,
            message,
        },
    })
}

/// `Retry-After` as delta-seconds (RFC 9110, 10.2.3). The HTTP-date form
/// is not read: the provider never sends it, and a date would need clocks
/// that agree.
fn parse_retry_after(raw: &str) -> Option<Duration> {
    let raw = raw.trim();
    if raw.is_empty() || !raw.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    raw.parse::<u64>().ok().map(Duration::from_secs)
}

/// A request that got no answer: before it went out (safe) or after.
fn classify_send_error(
    err: &hyper_util::client::legacy::Error,
    metrics: &ClientMetrics,
) -> PaymentError {
    use std::error::Error as _;
    if err.is_connect() {
        let kind = connect_error_kind(err);
        metrics.connect_errors.with_label_values(&[kind]).inc();
        return PaymentError::Unreachable(format!("cannot connect ({kind}): {}", chain(err)));
    }
    // hyper says "canceled" for a request its connection dropped before
    // writing it (a pooled connection the provider had closed).
    let not_sent = err
        .source()
        .and_then(|s| s.downcast_ref::<hyper::Error>())
        .is_some_and(hyper::Error::is_canceled);
    if not_sent {
        return PaymentError::Unreachable(format!(
            "the connection closed before the request went out: {}",
            chain(err)
        ));
    }
    PaymentError::ConnectionLost(format!("the connection failed: {}", chain(err)))
}

fn connect_error_kind(err: &(dyn std::error::Error + 'static)) -> &'static str {
    let mut source = Some(err);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                std::io::ErrorKind::ConnectionRefused => "refused",
                std::io::ErrorKind::TimedOut => "timeout",
                _ => "other",
            };
        }
        source = e.source();
    }
    // HttpConnector's own connect timeout carries no io::Error.
    if chain(err).contains("timed out") || chain(err).contains("timeout") {
        "timeout"
    } else {
        "other"
    }
}

/// An error and its causes, in one line.
fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        let next = e.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_read_as_whole_seconds_only() {
        assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after(" 0 "), Some(Duration::ZERO));
        for bad in [
            "",
            "-1",
            "1.5",
            "Wed, 21 Oct 2015 07:28:00 GMT",
            "9".repeat(30).as_str(),
        ] {
            assert_eq!(parse_retry_after(bad), None, "{bad:?}");
        }
    }
}
