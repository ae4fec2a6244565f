//! A concurrency limit on the charge calls in flight, fixed or adaptive: a
//! call that finds the limit reached is not sent (the order fails fast, as
//! an Envoy adaptive-concurrency filter answers 503), so a provider past
//! its capacity is offered only what it can serve instead of a queue that
//! times everyone out.
//!
//! The adaptive kinds follow Netflix's concurrency-limits library, whose
//! names they keep:
//! - **AIMD** (`AIMDLimit`, TCP's congestion avoidance): a call that drops
//!   (a timeout, an overload, no answer) multiplies the limit by 0.9; a
//!   call that is answered while at least half the limit is in use adds 1.
//! - **Vegas** (`VegasLimit`, after TCP Vegas, Brakmo and Peterson 1994):
//!   the queue the provider holds is estimated from the latency against the
//!   least latency seen, `queue = limit × (1 − rtt_noload / rtt)`; with
//!   `log = log10(limit)`, a queue at most `log` grows the limit by
//!   `6 log`, under `3 log` by `log`, over `6 log` shrinks it by `log`,
//!   and a drop shrinks it by `log`. The library also re-measures
//!   `rtt_noload` now and then; here it is the least latency since the kind
//!   was chosen.
//!
//! A call dropped by its caller (cancelled: a losing hedge, a shutdown)
//! frees its place and teaches the limit nothing.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Which limit applies.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum LimitKind {
    /// No limit.
    #[default]
    Off,
    /// `CONCURRENCY_LIMIT_INITIAL`, always.
    Fixed,
    Aimd,
    Vegas,
}

impl LimitKind {
    pub const ALL: [LimitKind; 4] = [Self::Off, Self::Fixed, Self::Aimd, Self::Vegas];

    fn index(self) -> u8 {
        Self::ALL.iter().position(|k| *k == self).unwrap_or(0) as u8
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Fixed => "fixed",
            Self::Aimd => "aimd",
            Self::Vegas => "vegas",
        }
    }
}

impl std::str::FromStr for LimitKind {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str().eq_ignore_ascii_case(raw.trim()))
            .ok_or_else(|| "expected off, fixed, aimd or vegas".to_owned())
    }
}

/// The largest limit accepted.
pub const LIMIT_MAX: u32 = 100_000;

/// How the limit is set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LimitConfig {
    pub kind: LimitKind,
    /// The fixed limit, and where the adaptive ones start.
    pub initial: u32,
    /// The adaptive limits never grow past this.
    pub max: u32,
}

impl Default for LimitConfig {
    fn default() -> Self {
        Self {
            kind: LimitKind::Off,
            initial: 20,
            max: 1000,
        }
    }
}

#[derive(Debug)]
struct State {
    limit: f64,
    in_flight: u32,
    rtt_noload: Option<Duration>,
    /// Counts kind changes: a permit from before one counts for nothing.
    generation: u64,
}

/// The limit, shared by every caller. While it is off a call takes no
/// lock and counts nothing: the hot path pays one atomic read.
#[derive(Debug)]
pub struct ConcurrencyLimit {
    config: LimitConfig,
    /// The kind, as its index in `LimitKind::ALL`.
    kind: AtomicU8,
    state: Mutex<State>,
}

impl ConcurrencyLimit {
    pub fn new(config: LimitConfig) -> Self {
        Self {
            config,
            kind: AtomicU8::new(config.kind.index()),
            state: Mutex::new(State {
                limit: f64::from(config.initial),
                in_flight: 0,
                rtt_noload: None,
                generation: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn kind(&self) -> LimitKind {
        LimitKind::ALL[usize::from(self.kind.load(Ordering::Acquire))]
    }

    /// Switches the kind; a change starts the limit again from `initial`
    /// with no call counted in flight (calls already sent under the old
    /// kind end without teaching the new one anything).
    pub fn set_kind(&self, kind: LimitKind) {
        let mut state = self.lock();
        if self.kind() != kind {
            state.limit = f64::from(self.config.initial);
            state.rtt_noload = None;
            state.in_flight = 0;
            state.generation += 1;
            self.kind.store(kind.index(), Ordering::Release);
        }
    }

    /// The limit and the calls in flight under it; none while off.
    pub fn now(&self) -> Option<(u32, u32)> {
        let state = self.lock();
        (self.kind() != LimitKind::Off).then(|| (state.limit.floor() as u32, state.in_flight))
    }

    /// A place for one call, or None when the limit is reached.
    pub fn try_acquire(&self) -> Option<LimitPermit<'_>> {
        if self.kind() == LimitKind::Off {
            return Some(LimitPermit {
                limit: self,
                started: None,
                generation: 0,
                done: false,
            });
        }
        let mut state = self.lock();
        if f64::from(state.in_flight) >= state.limit.floor() {
            return None;
        }
        state.in_flight += 1;
        Some(LimitPermit {
            limit: self,
            started: Some(Instant::now()),
            generation: state.generation,
            done: false,
        })
    }

    fn sample(&self, rtt: Duration, dropped: bool, generation: u64) {
        let max = f64::from(self.config.max);
        let mut state = self.lock();
        if state.generation != generation {
            return;
        }
        let in_flight = f64::from(state.in_flight);
        state.in_flight = state.in_flight.saturating_sub(1);
        let limit = state.limit;
        let next = match self.kind() {
            LimitKind::Off | LimitKind::Fixed => limit,
            LimitKind::Aimd => {
                if dropped {
                    limit * 0.9
                } else if in_flight * 2.0 >= limit {
                    limit + 1.0
                } else {
                    limit
                }
            }
            LimitKind::Vegas => {
                let noload = match state.rtt_noload {
                    Some(least) if least <= rtt => least,
                    _ if dropped => state.rtt_noload.unwrap_or(rtt),
                    _ => {
                        state.rtt_noload = Some(rtt);
                        rtt
                    }
                };
                let log = limit.log10().max(1.0);
                let queue = (limit * (1.0 - noload.as_secs_f64() / rtt.as_secs_f64().max(1e-9)))
                    .ceil()
                    .max(0.0);
                if dropped {
                    limit - log
                } else if in_flight * 2.0 < limit {
                    // Not using the limit it has: nothing to learn.
                    limit
                } else if queue <= log {
                    limit + 6.0 * log
                } else if queue < 3.0 * log {
                    limit + log
                } else if queue > 6.0 * log {
                    limit - log
                } else {
                    limit
                }
            }
        };
        state.limit = next.clamp(1.0, max);
    }
}

/// A call's place under the limit. `finished` says how it ended; dropped
/// without it (the call was cancelled), it only frees the place.
#[derive(Debug)]
pub struct LimitPermit<'a> {
    limit: &'a ConcurrencyLimit,
    /// When the call started; none while the limit was off (nothing
    /// counted, nothing to give back).
    started: Option<Instant>,
    generation: u64,
    done: bool,
}

impl LimitPermit<'_> {
    /// The call ended: `dropped` when it got no answer (a timeout, an
    /// overload, no connection).
    pub fn finished(mut self, dropped: bool) {
        self.done = true;
        if let Some(started) = self.started {
            self.limit
                .sample(started.elapsed(), dropped, self.generation);
        }
    }
}

impl Drop for LimitPermit<'_> {
    fn drop(&mut self) {
        if !self.done && self.started.is_some() {
            let mut state = self.limit.lock();
            if state.generation == self.generation {
                state.in_flight = state.in_flight.saturating_sub(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(kind: LimitKind, initial: u32) -> ConcurrencyLimit {
        ConcurrencyLimit::new(LimitConfig {
            kind,
            initial,
            max: 100,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_fixed_limit_refuses_past_it_and_a_finished_or_dropped_call_frees_its_place() {
        let l = limit(LimitKind::Fixed, 2);
        let a = l.try_acquire().unwrap();
        let b = l.try_acquire().unwrap();
        assert!(l.try_acquire().is_none());
        assert_eq!(l.now(), Some((2, 2)));
        a.finished(true);
        assert_eq!(l.now(), Some((2, 1)), "fixed: a drop changes nothing");
        let c = l.try_acquire().unwrap();
        drop(b);
        drop(c);
        assert_eq!(l.now(), Some((2, 0)));
        // Off: no limit at all, and nothing counted.
        let off = limit(LimitKind::Off, 1);
        let held: Vec<_> = (0..50).map(|_| off.try_acquire().unwrap()).collect();
        assert_eq!(off.now(), None);
        // Switched on with those in flight: they count for nothing.
        off.set_kind(LimitKind::Fixed);
        assert_eq!(off.now(), Some((1, 0)));
        drop(held);
        assert_eq!(off.now(), Some((1, 0)));
    }

    #[tokio::test(start_paused = true)]
    async fn aimd_adds_one_while_busy_and_answered_and_takes_a_tenth_on_a_drop() {
        let l = limit(LimitKind::Aimd, 10);
        // Five in flight of ten: busy enough; an answer adds 1.
        let held: Vec<_> = (0..5).map(|_| l.try_acquire().unwrap()).collect();
        let mut held = held.into_iter();
        held.next().unwrap().finished(false);
        assert_eq!(l.now().map(|n| n.0), Some(11));
        // A drop: 11 × 0.9.
        held.next().unwrap().finished(true);
        assert_eq!(l.now().map(|n| n.0), Some(9));
        // Idle (one in flight of nine): an answer teaches nothing.
        drop(held);
        l.try_acquire().unwrap().finished(false);
        assert_eq!(l.now().map(|n| n.0), Some(9));
        // It never falls below 1.
        for _ in 0..100 {
            l.try_acquire().unwrap().finished(true);
        }
        assert_eq!(l.now().map(|n| n.0), Some(1));
    }

    #[tokio::test(start_paused = true)]
    async fn vegas_grows_while_latency_stays_at_its_least_and_shrinks_as_a_queue_builds() {
        let l = limit(LimitKind::Vegas, 10);
        // Keep the limit in use: ten calls in flight, one finishes after
        // `rtt_ms`.
        async fn busy(l: &ConcurrencyLimit, rtt_ms: u64) {
            let permits: Vec<_> = (0..10).filter_map(|_| l.try_acquire()).collect();
            let mut permits = permits.into_iter();
            let first = permits.next().unwrap();
            tokio::time::advance(Duration::from_millis(rtt_ms)).await;
            first.finished(false);
            drop(permits);
        }
        busy(&l, 50).await;
        let grown = l.now().map(|n| n.0).unwrap();
        assert!(grown > 10, "no queue: it grows ({grown})");
        // Latency four times the least: a queue of 3/4 of the limit.
        for _ in 0..20 {
            busy(&l, 200).await;
        }
        let shrunk = l.now().map(|n| n.0).unwrap();
        assert!(shrunk < grown, "a queue: it shrinks ({grown} -> {shrunk})");
        // A drop shrinks it too.
        let before = l.now().map(|n| n.0).unwrap();
        l.try_acquire().unwrap().finished(true);
        assert!(l.now().map(|n| n.0).unwrap() < before);
    }

    #[tokio::test(start_paused = true)]
    async fn switching_the_kind_starts_again_from_the_initial_limit() {
        let l = limit(LimitKind::Aimd, 10);
        for _ in 0..5 {
            l.try_acquire().unwrap().finished(true);
        }
        assert!(l.now().map(|n| n.0).unwrap() < 10);
        l.set_kind(LimitKind::Vegas);
        assert_eq!(l.now().map(|n| n.0), Some(10));
        l.set_kind(LimitKind::Off);
        assert_eq!(l.now(), None);
        assert_eq!("AIMD".parse(), Ok(LimitKind::Aimd));
        assert!("tcp".parse::<LimitKind>().is_err());
    }
}
