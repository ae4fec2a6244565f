//! Structured logging with tracing-subscriber: one JSON object per line, or
//! human-readable lines for a terminal.
//!
//! Lines go through a batching writer (`batched.rs`): a profile under load
//! showed a system call per request line when writing straight to stdout.
//! The returned guard flushes what is buffered when it is dropped at exit.

use super::batched::{BatchedWriter, FlushGuard};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// How log lines look (LOG_FORMAT).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable lines for a terminal.
    Pretty,
}

/// Installs the global subscriber. `filter` is an `EnvFilter` directive
/// (`info`, `reliability_lab=debug,tower_http=warn`), already validated.
pub fn init(format: LogFormat, filter: &str) -> anyhow::Result<FlushGuard> {
    let filter = EnvFilter::try_new(filter)?;
    let (writer, guard) = BatchedWriter::new(std::io::stdout());
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Json => {
            // The request line skips the generic formatter (access_log.rs).
            super::access_log::install(writer.clone());
            registry
                .with(
                    tracing_subscriber::fmt::layer()
                        .with_writer(writer)
                        .json()
                        .flatten_event(true)
                        .with_current_span(true)
                        .with_span_list(false)
                        .with_target(true),
                )
                .try_init()?
        }
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
