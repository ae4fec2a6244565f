//! Background processing: a bounded queue drained by a fixed set of workers,
//! and the job they run for each order.

mod dispatcher;
mod job;

pub use dispatcher::{Dispatcher, Job, JobHandler, Reservation, ReserveError};
pub use job::OrderProcessor;
