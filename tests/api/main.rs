//! The integration tests: one binary, one shared harness.

mod binary;
mod contract;
mod crash;
mod durability;
mod helpers;
mod http_api;
mod lab_controls;
mod metrics;
mod pipeline;
mod profiling;
mod shutdown;
