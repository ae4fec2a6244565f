//! Structured logging with tracing-subscriber: one JSON object per line, or
//! human-readable lines for a terminal.
//!
//! Lines are written by a background thread (tracing-appender's non-blocking
//! writer): a profile under load showed the per-request line's write to
//! stdout on the request path. If the output cannot keep up, lines are
//! dropped rather than slowing requests down; the returned guard flushes what
//! is buffered when it is dropped at exit.

use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber. `filter` is an `EnvFilter` directive
/// (`info`, `reliability_lab=debug,tower_http=warn`), already validated.
pub fn init(format: LogFormat, filter: &str) -> anyhow::Result<WorkerGuard> {
    let filter = EnvFilter::try_new(filter)?;
    let (writer, guard) = tracing_appender::non_blocking(std::io::stdout());
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(writer)
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_target(true),
            )
            .try_init()?,
        LogFormat::Pretty => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(writer)
                    .with_target(false),
            )
            .try_init()?,
    }
    Ok(guard)
}
