//! Client-side adaptive throttling, as Google's SRE book describes it
//! (chapter 21, "Handling Overload", "Client-side throttling"): the client
//! keeps, over the last `window`, how many requests it made and how many
//! the backend accepted, and rejects a new request locally, before it is
//! sent, with probability
//!
//! ```text
//! max(0, (requests − K × accepts) / (requests + 1))
//! ```
//!
//! While the backend accepts everything the probability is 0. Once it
//! rejects more than `1 − 1/K` of what it is sent, the client sheds the
//! excess itself, so the requests that do reach the backend are about `K`
//! times what it accepts: a little more than it can take, enough to notice
//! when it recovers. Requests rejected locally count as requests (that is
//! what makes the probability grow while the backend stays down) and never
//! as accepts. `K` = 2 is the book's suggestion.
//!
//! A request that is sent counts when it ends, with its verdict, not when it
//! starts (as Google's Cloud client libraries count theirs: requests
//! completed, in `google-cloud-gax`'s `AdaptiveThrottler`): counted at the start, the first requests of a healthy run (sent,
//! not yet answered) outnumber `K` × accepts and are shed for nothing (seen:
//! up to 21 orders of a run at 160 a second, before any spike).
//!
//! "Accepted" is the downstream's answer, whatever it said: a charge made
//! or a decline. What is not accepted is what overload looks like from
//! outside: a timeout, a busy or unavailable answer, no connection
//! (`Classify::is_answer` says which is which).
//!
//! The window is a ring of one-second buckets on tokio's clock, as the
//! retry budget's; the draw comes from one generator, seeded for
//! reproducible runs.

use std::sync::Mutex;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tokio::time::Instant;

/// The largest `K` accepted: past 10 the throttle sheds almost nothing.
pub const THROTTLE_K_MAX: f64 = 10.0;

/// How the throttle is set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ThrottleConfig {
    /// Requests allowed per accepted request before any is shed (at least 1).
    pub k: f64,
    /// How far back requests and accepts are counted (whole seconds).
    pub window: Duration,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        Self {
            k: 2.0,
            window: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    /// The second (since the throttle's start) this bucket counts.
    second: u64,
    requests: u64,
    accepts: u64,
}

#[derive(Debug)]
struct State {
    buckets: Vec<Bucket>,
    rng: StdRng,
}

/// The throttle, shared by every caller.
#[derive(Debug)]
pub struct Throttle {
    config: ThrottleConfig,
    started: Instant,
    state: Mutex<State>,
}

impl Throttle {
    /// A throttle drawing from `seed` when given, from the thread's
    /// generator otherwise.
    pub fn new(config: ThrottleConfig, seed: Option<u64>) -> Self {
        let seconds = config.window.as_secs().max(1) as usize;
        let rng = match seed {
            Some(seed) => StdRng::seed_from_u64(seed ^ 0x7468_726f_7474_6c65),
            None => StdRng::from_rng(&mut rand::rng()),
        };
        Self {
            config,
            started: Instant::now(),
            state: Mutex::new(State {
                buckets: vec![Bucket::default(); seconds],
                rng,
            }),
        }
    }

    fn with_state<T>(&self, f: impl FnOnce(&mut State, usize, u64) -> T) -> T {
        let second = self.started.elapsed().as_secs();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let index = (second % state.buckets.len() as u64) as usize;
        let bucket = &mut state.buckets[index];
        if bucket.second != second {
            *bucket = Bucket {
                second,
                ..Bucket::default()
            };
        }
        f(&mut state, index, second)
    }

    /// The window's requests and accepts, at `now` (seconds since start).
    fn totals(buckets: &[Bucket], now: u64) -> (u64, u64) {
        let len = buckets.len() as u64;
        buckets
            .iter()
            .filter(|b| b.second + len > now)
            .fold((0, 0), |(r, a), b| (r + b.requests, a + b.accepts))
    }

    fn probability_of(k: f64, requests: u64, accepts: u64) -> f64 {
        ((requests as f64 - k * accepts as f64) / (requests as f64 + 1.0)).max(0.0)
    }

    /// The probability a request made now is rejected locally.
    pub fn probability(&self) -> f64 {
        let k = self.config.k;
        self.with_state(|state, _, now| {
            let (requests, accepts) = Self::totals(&state.buckets, now);
            Self::probability_of(k, requests, accepts)
        })
    }

    /// Asks to send one request: whether it may go (false: rejected
    /// locally, with the probability above, and counted now as a request).
    /// One that may go is counted when it ends (`finished`).
    pub fn admit(&self) -> bool {
        let k = self.config.k;
        self.with_state(|state, index, now| {
            let (requests, accepts) = Self::totals(&state.buckets, now);
            let p = Self::probability_of(k, requests, accepts);
            // No draw while nothing is shed: a healthy run's draws stay
            // as they were without the throttle.
            let shed = p > 0.0 && state.rng.random::<f64>() < p;
            if shed {
                state.buckets[index].requests += 1;
            }
            !shed
        })
    }

    /// A request that `admit` let go has ended: `accepted` when the
    /// backend answered it.
    pub fn finished(&self, accepted: bool) {
        self.with_state(|state, index, _| {
            let bucket = &mut state.buckets[index];
            bucket.requests += 1;
            if accepted {
                bucket.accepts += 1;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throttle(k: f64, window_secs: u64) -> Throttle {
        Throttle::new(
            ThrottleConfig {
                k,
                window: Duration::from_secs(window_secs),
            },
            Some(7),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn requests_still_in_flight_shed_nothing() {
        // A healthy start: many sent, none answered yet.
        let t = throttle(2.0, 10);
        for _ in 0..1000 {
            assert!(t.admit());
        }
        assert_eq!(t.probability(), 0.0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_backend_that_accepts_everything_is_never_throttled() {
        let t = throttle(2.0, 10);
        for _ in 0..10_000 {
            assert!(t.admit());
            t.finished(true);
        }
        assert_eq!(t.probability(), 0.0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_probability_is_the_books_formula_over_the_window() {
        let t = throttle(2.0, 10);
        // 100 requests, 30 accepted: (100 - 60) / 101.
        t.with_state(|s, idx, _| {
            s.buckets[idx].requests = 100;
            s.buckets[idx].accepts = 30;
        });
        let p = t.probability();
        assert!((p - 40.0 / 101.0).abs() < 1e-12, "{p}");
        // A request counts when it ends, an accept with it.
        t.finished(true);
        assert!((t.probability() - 39.0 / 102.0).abs() < 1e-12);
        t.finished(false);
        assert!((t.probability() - 40.0 / 103.0).abs() < 1e-12);
        // K = 3 with the same counts: 100 - 90 over 101.
        let t3 = throttle(3.0, 10);
        t3.with_state(|s, idx, _| {
            s.buckets[idx].requests = 100;
            s.buckets[idx].accepts = 30;
        });
        assert!((t3.probability() - 10.0 / 101.0).abs() < 1e-12);
        // Half accepted with K = 2: nothing shed.
        let t2 = throttle(2.0, 10);
        t2.with_state(|s, idx, _| {
            s.buckets[idx].requests = 100;
            s.buckets[idx].accepts = 50;
        });
        assert_eq!(t2.probability(), 0.0);
    }

    #[tokio::test(start_paused = true)]
    async fn against_a_dead_backend_it_sheds_almost_everything_and_lets_through_about_k_times_its_accepts(
    ) {
        let t = throttle(2.0, 10);
        // The backend accepts one request in ten of those that reach it.
        let (mut sent, mut admitted) = (0u32, 0u32);
        for _ in 0..20_000 {
            sent += 1;
            if t.admit() {
                admitted += 1;
                t.finished(admitted % 10 == 0);
            }
        }
        let accepts = f64::from(admitted / 10);
        // The requests that reached it settle near K × accepts... which is
        // a fifth of what it is sent here; what is shed is the rest.
        let through = f64::from(admitted) / f64::from(sent);
        assert!(through < 0.25, "{through} of requests went through");
        assert!(
            f64::from(admitted) > 1.5 * accepts,
            "{admitted} for {accepts}"
        );
        assert!(t.probability() > 0.7, "{}", t.probability());
    }

    #[tokio::test(start_paused = true)]
    async fn old_seconds_leave_the_window_so_a_recovered_backend_is_sent_everything_again() {
        let t = throttle(2.0, 3);
        for _ in 0..1000 {
            if t.admit() {
                t.finished(false);
            }
        }
        assert!(t.probability() > 0.9);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(t.probability() > 0.9, "still in the window");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(t.probability(), 0.0, "the window has moved past them");
        assert!(t.admit());
    }

    #[tokio::test(start_paused = true)]
    async fn the_same_seed_sheds_the_same_requests() {
        let run = || {
            let t = throttle(2.0, 10);
            (0..500)
                .map(|_| {
                    let go = t.admit();
                    if go {
                        t.finished(false);
                    }
                    go
                })
                .collect::<Vec<_>>()
        };
        let (a, b) = (run(), run());
        assert_eq!(a, b);
        assert!(a.iter().any(|x| !x) && a.iter().filter(|x| **x).count() > 1);
    }
}
