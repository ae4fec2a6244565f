//! The HTTP server: our own accept loop over hyper's HTTP/1.1 connections,
//! so that no client can hold a connection (and a file descriptor) for ever.
//!
//! `axum::serve` offers no timeouts: a client that sent half its headers, a
//! body that stopped, or nothing at all kept its connection until it hung up,
//! and enough of them exhausted the process's file descriptors. Here:
//!
//! - **header read timeout** (`HTTP_HEADER_READ_TIMEOUT`): a request's
//!   headers must arrive whole within it, counted from the moment the
//!   connection is accepted for the first request and from the first byte
//!   of each later one (give or take a quarter). Ours, not hyper's: hyper's
//!   also runs while a keep-alive connection waits for its next request, so
//!   an idle connection was closed at this timeout instead of the idle one;
//! - **body timeout** (`HTTP_BODY_TIMEOUT`): the rest of the body must arrive
//!   within it, counted from the first time the service waits for it; a
//!   handler reading a late body gets `BodyTimedOut`, which the JSON
//!   extractor answers with 408;
//! - **idle timeout** (`HTTP_IDLE_TIMEOUT`): a keep-alive connection with no
//!   request in flight and no bytes either way for that long (give or take a
//!   quarter) is closed. A response still streaming (a profile, an event
//!   stream) keeps its request in flight, so long answers are never cut.
//!
//! At shutdown every connection is told to finish (hyper's graceful
//! shutdown: no keep-alive, finish the request in hand). Connections with no
//! request in flight, or whose request's body is still arriving, are closed
//! at once: a stalled client must not hold up a stop.

use std::convert::Infallible;
use std::future::Future as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use super::Api;
use crate::transport::{Connection, Listener};
use axum::body::Body;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// How long connections may take at each stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub header_read: Duration,
    pub body: Duration,
    pub idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            header_read: Duration::from_secs(10),
            body: Duration::from_secs(10),
            idle: Duration::from_secs(60),
        }
    }
}

/// In a request's extensions when the server was started with
/// `serve_resettable`: ends the request's connection with a reset (RST),
/// dropping whatever the handler was doing. The provider's network faults
/// use it; the service never does.
#[derive(Clone)]
pub struct ResetConnection(Arc<tokio::sync::Notify>);

impl ResetConnection {
    pub fn reset(&self) {
        self.0.notify_one();
    }
}

/// A request body that did not arrive within the body timeout.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {0:?}")]
pub struct BodyTimedOut(pub Duration);

/// Serves `router` on `listener` until `stop` fires, then lets the
/// connections finish as described in the module doc and returns once they
/// have. Dropping the future closes every connection at once.
pub async fn serve(listener: Listener, router: Api, timeouts: Timeouts, stop: CancellationToken) {
    serve_with(listener, router, timeouts, stop, false).await
}

/// `serve`, with a `ResetConnection` in every request's extensions.
pub async fn serve_resettable(
    listener: Listener,
    router: Api,
    timeouts: Timeouts,
    stop: CancellationToken,
) {
    serve_with(listener, router, timeouts, stop, true).await
}

async fn serve_with(
    mut listener: Listener,
    router: Api,
    timeouts: Timeouts,
    stop: CancellationToken,
    resettable: bool,
) {
    let mut connections = JoinSet::new();
    let mut last_accept_error: Option<Instant> = None;
    loop {
        // In a fixed order (tokio picks at random otherwise): a simulated
        // run must take the same branch every time two are ready at once.
        let accepted = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            // Reap finished connections as we go, so the set stays small.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok(stream) => {
                connections.spawn(connection(
                    stream,
                    router.clone(),
                    timeouts,
                    stop.clone(),
                    resettable,
                ));
            }
            Err(err) => {
                // Out of file descriptors, most likely: connections time out
                // and free theirs, so wait a little and accept again. Say so
                // at most once a second.
                if last_accept_error.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                    tracing::warn!(error = %err, "accepting a connection failed; retrying");
                    last_accept_error = Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// What the connection's task knows of its connection.
///
/// Activity is a counter, not a timestamp: reading the clock on every read
/// and write of every connection is a cost on the hot path for a question
/// asked once every few seconds ("did anything move since I last looked?").
#[derive(Default)]
struct ConnState {
    /// Requests whose response has not been fully sent.
    in_flight: AtomicUsize,
    /// A request's body is still arriving.
    body_pending: AtomicBool,
    /// Bumped whenever bytes move either way or a response completes.
    activity: AtomicU64,
    /// A request's head is arriving (or, on a new connection, awaited):
    /// set by the first byte read with no request in hand, cleared when
    /// hyper hands over the request.
    awaiting_head: AtomicBool,
    /// Requests handed over so far: tells one head's wait from the next.
    heads: AtomicU64,
}

/// How many looks an idle period is split into: a connection is closed
/// after `IDLE_LOOKS` quiet looks in a row, that is within a quarter of
/// `idle` after the idle timeout.
const IDLE_LOOKS: u32 = 4;

/// How many looks at most `every` apart cover `timeout` (at least
/// `IDLE_LOOKS`).
fn looks_for(timeout: Duration, every: Duration) -> u32 {
    let n = timeout.as_nanos().div_ceil(every.as_nanos().max(1));
    u32::try_from(n).unwrap_or(u32::MAX).max(IDLE_LOOKS)
}

impl ConnState {
    fn new() -> Self {
        Self {
            awaiting_head: AtomicBool::new(true),
            ..Self::default()
        }
    }

    fn touch(&self) {
        self.activity.fetch_add(1, Ordering::Relaxed);
    }

    /// No request in hand, or one whose body stopped arriving.
    fn idle_or_stalled(&self) -> bool {
        self.in_flight.load(Ordering::SeqCst) == 0 || self.body_pending.load(Ordering::SeqCst)
    }
}

async fn connection(
    stream: Connection,
    router: Api,
    timeouts: Timeouts,
    stop: CancellationToken,
    resettable: bool,
) {
    // A token of its own: every connection waiting on the shared one would
    // take the shared token's lock each time its connection woke.
    let stop = stop.child_token();
    let state = Arc::new(ConnState::new());
    let reset = resettable.then(|| Arc::new(tokio::sync::Notify::new()));
    let fd = stream.raw_fd();
    let io = TokioIo::new(Tracked {
        inner: stream,
        state: state.clone(),
    });
    let service = hyper::service::service_fn({
        let state = state.clone();
        let reset = reset.clone();
        move |request: hyper::Request<Incoming>| {
            let router = router.clone();
            let guard = InFlight::new(state.clone());
            let (mut parts, body) = request.into_parts();
            if let Some(reset) = &reset {
                parts.extensions.insert(ResetConnection(reset.clone()));
            }
            let body = TimedBody::new(body, timeouts.body, state.clone());
            let request = hyper::Request::from_parts(parts, Body::new(body));
            async move {
                let response = router
                    .oneshot(request)
                    .await
                    .unwrap_or_else(|never| match never {});
                let (parts, body) = response.into_parts();
                let body = Body::new(Guarded {
                    inner: body,
                    _guard: guard,
                });
                Ok::<_, Infallible>(hyper::Response::from_parts(parts, body))
            }
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .serve_connection(io, service);
    tokio::pin!(conn);
    let mut stopping = false;
    let look_every =
        (timeouts.idle.min(timeouts.header_read) / IDLE_LOOKS).max(Duration::from_millis(1));
    let idle_looks = looks_for(timeouts.idle, look_every);
    let head_looks = looks_for(timeouts.header_read, look_every);
    let mut looks = tokio::time::interval_at(Instant::now() + look_every, look_every);
    looks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut seen, mut quiet_looks) = (state.activity.load(Ordering::Relaxed), 0u32);
    // The head being waited for (by the requests handed over before it)
    // and how many looks have seen it still awaited. The wait began before
    // the first of them, so more than `head_looks` looks mean at least
    // the whole timeout.
    let (mut head_of, mut head_seen) = (u64::MAX, 0u32);
    loop {
        tokio::select! {
            // The connection first: it is what wakes on every request.
            biased;
            result = conn.as_mut() => {
                if let Err(err) = result {
                    tracing::debug!(error = %err, "connection ended with an error");
                }
                return;
            }
            _ = async { reset.as_ref().expect("guarded").notified().await }, if reset.is_some() => {
                tracing::debug!("resetting a connection, as a fault asked");
                // The stream is still open (hyper holds it): set the linger,
                // then return, which drops and closes it.
                if let Some(fd) = fd {
                    crate::transport::reset_on_close(fd);
                }
                return;
            }
            _ = stop.cancelled(), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
                if state.idle_or_stalled() {
                    return;
                }
            }
            _ = looks.tick() => {
                let heads = state.heads.load(Ordering::SeqCst);
                if !state.awaiting_head.load(Ordering::SeqCst) {
                    head_seen = 0;
                } else if heads != head_of {
                    (head_of, head_seen) = (heads, 1);
                } else {
                    head_seen += 1;
                    if head_seen > head_looks {
                        tracing::debug!("closing a connection whose request headers did not arrive in time");
                        return;
                    }
                }
                let now = state.activity.load(Ordering::Relaxed);
                if now != seen || state.in_flight.load(Ordering::SeqCst) > 0 {
                    // Bytes moved, or a request is in hand (a long answer is
                    // not idleness): start counting again.
                    (seen, quiet_looks) = (now, 0);
                } else {
                    quiet_looks += 1;
                    if quiet_looks >= idle_looks {
                        tracing::debug!("closing an idle connection");
                        return;
                    }
                }
            }
        }
    }
}

/// Counts a request in flight until its response body is done with.
struct InFlight(Arc<ConnState>);

impl InFlight {
    fn new(state: Arc<ConnState>) -> Self {
        state.in_flight.fetch_add(1, Ordering::SeqCst);
        state.heads.fetch_add(1, Ordering::SeqCst);
        state.awaiting_head.store(false, Ordering::SeqCst);
        Self(state)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.0.touch();
    }
}

/// A response body that holds its request's `InFlight` until it is dropped.
struct Guarded {
    inner: Body,
    _guard: InFlight,
}

impl HttpBody for Guarded {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body that must arrive whole within the body timeout, and that
/// tells the connection while it is still arriving.
struct TimedBody {
    inner: Incoming,
    /// Set the first time the body is not ready: a body that is all there
    /// (most are, and every GET's) never starts a timer.
    deadline: Option<Pin<Box<Sleep>>>,
    limit: Duration,
    state: Arc<ConnState>,
    done: bool,
}

impl TimedBody {
    fn new(inner: Incoming, limit: Duration, state: Arc<ConnState>) -> Self {
        let done = inner.is_end_stream();
        if !done {
            state.body_pending.store(true, Ordering::SeqCst);
        }
        Self {
            inner,
            deadline: None,
            limit,
            state,
            done,
        }
    }

    fn finish(&mut self) {
        if !self.done {
            self.done = true;
            self.state.body_pending.store(false, Ordering::SeqCst);
        }
    }
}

impl Drop for TimedBody {
    fn drop(&mut self) {
        // The handler is done with the body, read or not: nothing is pending.
        self.finish();
    }
}

impl HttpBody for TimedBody {
    type Data = axum::body::Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        if self.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(None) => {
                self.finish();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => {
                if self.inner.is_end_stream() {
                    self.finish();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(err))) => {
                self.finish();
                Poll::Ready(Some(Err(err.into())))
            }
            Poll::Pending => {
                let limit = self.limit;
                let deadline = self
                    .deadline
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                match deadline.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        self.finish();
                        Poll::Ready(Some(Err(Box::new(BodyTimedOut(limit)))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The socket, noting when bytes move either way.
struct Tracked {
    inner: Connection,
    state: Arc<ConnState>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.state.touch();
            // The first bytes of a request, with none in hand: its head's
            // wait begins (bytes pipelined behind a request do not start it).
            let state = &self.state;
            if state.in_flight.load(Ordering::Relaxed) == 0
                && !state.awaiting_head.load(Ordering::Relaxed)
            {
                state.awaiting_head.store(true, Ordering::SeqCst);
            }
        }
        result
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.state.touch();
        }
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.state.touch();
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
