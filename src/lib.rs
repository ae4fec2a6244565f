//! reliability-lab: an order-processing backend that fails on purpose.
//!
//! The library holds every part; `main.rs` only composes them. See
//! ARCHITECTURE.md for the flow and who depends on whom.

pub mod app;
pub mod clock;
pub mod config;
pub mod experiment;
pub mod healthcheck;
pub mod http;
pub mod lab;
pub mod observability;
pub mod orders;
pub mod payment;
pub mod provider;
pub mod reliability;
pub mod transport;
pub mod units;
pub mod workers;
