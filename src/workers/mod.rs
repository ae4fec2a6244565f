//! Background processing: a bounded queue drained by a fixed set of workers,
//! the job they run for each order, and the loops that keep leases.

pub mod deferred;
mod dispatcher;
mod job;
pub mod leases;

pub use deferred::{DeferSettings, Deferral};
pub use dispatcher::{Dispatcher, Job, JobHandler, Reservation, ReserveError};
pub use job::OrderProcessor;
