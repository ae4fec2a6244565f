//! The HTTP server: our own accept loop over hyper's HTTP/1.1 connections,
//! so that no client can hold a connection (and a file descriptor) for ever.
//!
//! `axum::serve` offers no timeouts: a client that sent half its headers, a
//! body that stopped, or nothing at all kept its connection until it hung up,
//! and enough of them exhausted the process's file descriptors. Here:
//!
//! - **header read timeout** (`HTTP_HEADER_READ_TIMEOUT`): hyper's own; it
//!   bounds the wait for a request's headers, from the moment the connection
//!   is accepted;
//! - **body timeout** (`HTTP_BODY_TIMEOUT`): the whole body must arrive within
//!   it, counted from the headers; a handler reading a late body gets
//!   `BodyTimedOut`, which the JSON extractor answers with 408;
//! - **idle timeout** (`HTTP_IDLE_TIMEOUT`): a keep-alive connection with no
//!   request in flight and no bytes either way for that long is closed. A
//!   response still streaming (a profile, an event stream) keeps its request
//!   in flight, so long answers are never cut.
//!
//! At shutdown every connection is told to finish (hyper's graceful
//! shutdown: no keep-alive, finish the request in hand). Connections with no
//! request in flight, or whose request's body is still arriving, are closed
//! at once: a stalled client must not hold up a stop.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::Router;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
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

/// A request body that did not arrive within the body timeout.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {0:?}")]
pub struct BodyTimedOut(pub Duration);

/// Serves `router` on `listener` until `stop` fires, then lets the
/// connections finish as described in the module doc and returns once they
/// have. Dropping the future closes every connection at once.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    timeouts: Timeouts,
    stop: CancellationToken,
) {
    let mut connections = JoinSet::new();
    let mut last_accept_error: Option<Instant> = None;
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            // Reap finished connections as we go, so the set stays small.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _peer)) => {
                stream.set_nodelay(true).ok();
                connections.spawn(connection(stream, router.clone(), timeouts, stop.clone()));
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
struct ConnState {
    /// Requests whose response has not been fully sent.
    in_flight: AtomicUsize,
    /// A request's body is still arriving.
    body_pending: AtomicBool,
    /// Milliseconds from `epoch` to the last byte read or written.
    last_activity_ms: AtomicU64,
    epoch: Instant,
}

impl ConnState {
    fn touch(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_activity_ms.store(ms, Ordering::Relaxed);
    }

    fn last_activity(&self) -> Instant {
        self.epoch + Duration::from_millis(self.last_activity_ms.load(Ordering::Relaxed))
    }

    /// No request in hand, or one whose body stopped arriving.
    fn idle_or_stalled(&self) -> bool {
        self.in_flight.load(Ordering::SeqCst) == 0 || self.body_pending.load(Ordering::SeqCst)
    }
}

async fn connection(
    stream: TcpStream,
    router: Router,
    timeouts: Timeouts,
    stop: CancellationToken,
) {
    let state = Arc::new(ConnState {
        in_flight: AtomicUsize::new(0),
        body_pending: AtomicBool::new(false),
        last_activity_ms: AtomicU64::new(0),
        epoch: Instant::now(),
    });
    let io = TokioIo::new(Tracked {
        inner: stream,
        state: state.clone(),
    });
    let service = hyper::service::service_fn({
        let state = state.clone();
        move |request: hyper::Request<Incoming>| {
            let router = router.clone();
            let guard = InFlight::new(state.clone());
            let (parts, body) = request.into_parts();
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
        .header_read_timeout(timeouts.header_read)
        .serve_connection(io, service);
    tokio::pin!(conn);
    let mut stopping = false;
    loop {
        let idle_deadline = state.last_activity() + timeouts.idle;
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(err) = result {
                    tracing::debug!(error = %err, "connection ended with an error");
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
            _ = tokio::time::sleep_until(idle_deadline) => {
                if state.in_flight.load(Ordering::SeqCst) == 0
                    && state.last_activity() + timeouts.idle <= Instant::now()
                {
                    tracing::debug!("closing an idle connection");
                    return;
                }
                if state.in_flight.load(Ordering::SeqCst) > 0 {
                    // A request in hand is not idleness: look again later.
                    state.touch();
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
    deadline: Pin<Box<Sleep>>,
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
            deadline: Box::pin(tokio::time::sleep(limit)),
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
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    self.finish();
                    Poll::Ready(Some(Err(Box::new(BodyTimedOut(self.limit)))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

use std::future::Future as _;

/// The socket, noting when bytes move either way.
struct Tracked {
    inner: TcpStream,
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
