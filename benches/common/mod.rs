//! What both benchmarks need: an error type for calls that never fail.

use reliability_lab::reliability::Classify;

/// The error of a call that always succeeds.
#[derive(Debug)]
pub struct Never;

impl std::fmt::Display for Never {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("never")
    }
}

impl Classify for Never {
    fn counts_as_failure(&self) -> bool {
        true
    }
    fn is_retryable(&self) -> bool {
        true
    }
}
