//! The integration tests: one binary, one shared harness.

mod binary;
mod connections;
mod console;
mod contract;
mod crash;
mod deferred;
mod durability;
mod experiments;
mod group_commit;
mod hardening;
mod helpers;
mod http_api;
mod image;
mod instruments;
mod lab_controls;
mod metrics;
mod monitoring;
mod openapi;
mod orphans;
mod partition;
mod pipeline;
mod pool;
mod profiling;
mod remote;
mod shutdown;
mod tls;
