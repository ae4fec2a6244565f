//! Logs and metrics: how every failure mode stays visible.

pub mod access_log;
mod batched;
mod breaker_metrics;
pub mod latency;
pub mod logging;
pub mod metrics;
pub mod profiling;
mod retry_metrics;

pub use metrics::Metrics;
