//! The faults only a network has, as `reliability-lab provider` stages
//! them. They live here, with the payment types, because the service's
//! admin API reads and forwards them too (`/admin/provider/faults`).
//!
//! One fault at a time, drawn for each charge with its probability
//! (`PROVIDER_FAULT`, `PROVIDER_FAULT_RATE`, or `PUT /admin/faults`):
//! - `refuse`: the provider goes down for `refuse_for`: every open
//!   connection is closed and nothing listens, so connections are refused;
//!   the charge that drew it gets no answer;
//! - `reset_before`: the connection is reset (RST) once the request is
//!   read, before anything is charged;
//! - `reset_after`: the charge is made, then the connection is reset:
//!   the ambiguous failure, on a real socket;
//! - `stall`: the request is read and never answered, nothing charged;
//! - `slow_body`: the charge is made and its answer sent `slow_body_chunk`
//!   bytes every `slow_body_interval`.
//!
//! Beside them, a limit rather than a draw: past `rate_limit` charge calls
//! in one second (`PROVIDER_RATE_LIMIT`; 0, none) a call is answered 429
//! with `Retry-After` (the seconds to the next second, so 1).
//!
//! The draws come from one generator, seeded by `PAYMENT_SEED` when it is
//! set, so a run with one caller at a time draws the same faults again.

use std::sync::Mutex;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::payment::SettingsError;
use crate::units::{invalid, HumanDuration};

/// Which fault the provider draws.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    #[default]
    None,
    Refuse,
    ResetBefore,
    ResetAfter,
    Stall,
    SlowBody,
}

impl Fault {
    pub const ALL: [Fault; 6] = [
        Self::None,
        Self::Refuse,
        Self::ResetBefore,
        Self::ResetAfter,
        Self::Stall,
        Self::SlowBody,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Refuse => "refuse",
            Self::ResetBefore => "reset_before",
            Self::ResetAfter => "reset_after",
            Self::Stall => "stall",
            Self::SlowBody => "slow_body",
        }
    }
}

impl std::str::FromStr for Fault {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|f| f.as_str() == raw.trim())
            .ok_or_else(|| {
                "expected one of none, refuse, reset_before, reset_after, stall, slow_body"
                    .to_owned()
            })
    }
}

/// The longest period `refuse` may take the provider down for.
pub const REFUSE_FOR_MAX: Duration = Duration::from_secs(3600);
/// The bounds of `slow_body_chunk`, in bytes.
pub const SLOW_BODY_CHUNK_MAX: u32 = 65_536;
/// The most charge calls a second `rate_limit` may allow.
pub const RATE_LIMIT_MAX: u32 = 1_000_000;

/// The faults in force.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FaultSettings {
    pub fault: Fault,
    /// The share of charge calls that draw the fault, 0 to 1.
    pub rate: f64,
    pub refuse_for: Duration,
    pub slow_body_chunk: u32,
    pub slow_body_interval: Duration,
    /// Charge calls allowed per second; 0, no limit.
    pub rate_limit: u32,
}

impl Default for FaultSettings {
    fn default() -> Self {
        Self {
            fault: Fault::None,
            rate: 0.0,
            refuse_for: Duration::from_secs(2),
            slow_body_chunk: 4,
            slow_body_interval: Duration::from_millis(100),
            rate_limit: 0,
        }
    }
}

/// The faults as `GET /admin/faults` shows them.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct FaultView {
    pub fault: Fault,
    pub rate: f64,
    #[schema(value_type = String, example = "2s")]
    pub refuse_for: HumanDuration,
    pub slow_body_chunk: u32,
    #[schema(value_type = String, example = "100ms")]
    pub slow_body_interval: HumanDuration,
    /// Charge calls allowed per second; 0, no limit.
    pub rate_limit: u32,
}

/// A partial change, as `PUT /admin/faults` takes it. Unknown fields are refused.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FaultUpdate {
    pub fault: Option<Fault>,
    /// Share of charge calls that draw the fault, 0 to 1.
    #[schema(minimum = 0, maximum = 1)]
    pub rate: Option<f64>,
    /// How long `refuse` takes the provider down (above zero, at most 1h).
    #[serde(default, deserialize_with = "crate::units::de_duration")]
    #[schema(schema_with = crate::units::duration_schema)]
    pub refuse_for: Option<Duration>,
    /// Bytes `slow_body` sends at a time, 1 to 65536.
    #[schema(minimum = 1, maximum = 65536)]
    pub slow_body_chunk: Option<u32>,
    /// The wait between `slow_body`'s pieces (above zero, at most 1h).
    #[serde(default, deserialize_with = "crate::units::de_duration")]
    #[schema(schema_with = crate::units::duration_schema)]
    pub slow_body_interval: Option<Duration>,
    /// Charge calls allowed per second, 0 (no limit) to 1000000.
    #[schema(minimum = 0, maximum = 1000000)]
    pub rate_limit: Option<u32>,
}

impl FaultSettings {
    /// The settings with `update` applied, or the first field at fault.
    pub fn apply(&self, update: &FaultUpdate) -> Result<Self, SettingsError> {
        let mut next = *self;
        if let Some(fault) = update.fault {
            next.fault = fault;
        }
        if let Some(rate) = update.rate {
            if !(0.0..=1.0).contains(&rate) {
                return Err(invalid("rate", "expected a share from 0 to 1"));
            }
            next.rate = rate;
        }
        if let Some(d) = update.refuse_for {
            if d.is_zero() || d > REFUSE_FOR_MAX {
                return Err(invalid(
                    "refuse_for",
                    "expected a duration above 0, at most 1h",
                ));
            }
            next.refuse_for = d;
        }
        if let Some(n) = update.slow_body_chunk {
            if n == 0 || n > SLOW_BODY_CHUNK_MAX {
                return Err(invalid(
                    "slow_body_chunk",
                    "expected a whole number of bytes from 1 to 65536",
                ));
            }
            next.slow_body_chunk = n;
        }
        if let Some(d) = update.slow_body_interval {
            if d.is_zero() || d > REFUSE_FOR_MAX {
                return Err(invalid(
                    "slow_body_interval",
                    "expected a duration above 0, at most 1h",
                ));
            }
            next.slow_body_interval = d;
        }
        if let Some(n) = update.rate_limit {
            if n > RATE_LIMIT_MAX {
                return Err(invalid(
                    "rate_limit",
                    "expected charge calls per second from 0 (no limit) to 1000000",
                ));
            }
            next.rate_limit = n;
        }
        Ok(next)
    }

    pub fn view(&self) -> FaultView {
        FaultView {
            fault: self.fault,
            rate: self.rate,
            refuse_for: HumanDuration(self.refuse_for),
            slow_body_chunk: self.slow_body_chunk,
            slow_body_interval: HumanDuration(self.slow_body_interval),
            rate_limit: self.rate_limit,
        }
    }
}

/// What one charge call meets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Over the rate limit: 429, retry after this many seconds.
    Limited(u64),
    /// This fault (never `Fault::None`).
    Fault(Fault),
    Serve,
}

/// The faults, their generator and the rate limit's count.
pub struct Faults {
    settings: Mutex<FaultSettings>,
    rng: Mutex<StdRng>,
    /// The second being counted (from the provider's start) and its calls.
    window: Mutex<(u64, u32)>,
    started: tokio::time::Instant,
}

impl Faults {
    pub fn new(settings: FaultSettings, seed: Option<u64>) -> Self {
        let rng = match seed {
            Some(seed) => StdRng::seed_from_u64(seed ^ 0x6661_756c_7473),
            None => StdRng::from_rng(&mut rand::rng()),
        };
        Self {
            settings: Mutex::new(settings),
            rng: Mutex::new(rng),
            window: Mutex::new((0, 0)),
            started: tokio::time::Instant::now(),
        }
    }

    pub fn settings(&self) -> FaultSettings {
        *self.settings.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Validates and applies a change; on error nothing changes.
    pub fn update(&self, update: &FaultUpdate) -> Result<FaultSettings, SettingsError> {
        let mut settings = self.settings.lock().unwrap_or_else(|p| p.into_inner());
        let next = settings.apply(update)?;
        *settings = next;
        tracing::warn!(settings = ?next, "provider faults changed");
        Ok(next)
    }

    /// What the next charge call meets: the rate limit first (a call it
    /// refuses draws nothing), then the fault's draw.
    pub fn verdict(&self) -> Verdict {
        let settings = self.settings();
        if settings.rate_limit > 0 {
            let second = self.started.elapsed().as_secs();
            let mut window = self.window.lock().unwrap_or_else(|p| p.into_inner());
            if window.0 != second {
                *window = (second, 0);
            }
            if window.1 >= settings.rate_limit {
                return Verdict::Limited(1);
            }
            window.1 += 1;
        }
        if settings.fault == Fault::None || settings.rate <= 0.0 {
            return Verdict::Serve;
        }
        let draw = self
            .rng
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .random::<f64>();
        if draw < settings.rate {
            Verdict::Fault(settings.fault)
        } else {
            Verdict::Serve
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(update: FaultUpdate) -> Faults {
        let settings = FaultSettings::default().apply(&update).unwrap();
        Faults::new(settings, Some(1))
    }

    #[test]
    fn a_fault_is_drawn_at_its_rate_and_never_at_zero() {
        for (rate, lo, hi) in [(0.0, 0, 0), (1.0, 1000, 1000), (0.25, 200, 300)] {
            let faults = with(FaultUpdate {
                fault: Some(Fault::ResetAfter),
                rate: Some(rate),
                ..Default::default()
            });
            let hits = (0..1000)
                .filter(|_| faults.verdict() == Verdict::Fault(Fault::ResetAfter))
                .count();
            assert!((lo..=hi).contains(&hits), "rate {rate}: {hits}");
        }
        let none = with(FaultUpdate {
            rate: Some(1.0),
            ..Default::default()
        });
        assert_eq!(none.verdict(), Verdict::Serve, "fault none draws nothing");
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_limit_refuses_past_its_count_and_opens_again_next_second() {
        let faults = with(FaultUpdate {
            rate_limit: Some(3),
            ..Default::default()
        });
        let first: Vec<Verdict> = (0..5).map(|_| faults.verdict()).collect();
        assert_eq!(
            first,
            [
                Verdict::Serve,
                Verdict::Serve,
                Verdict::Serve,
                Verdict::Limited(1),
                Verdict::Limited(1)
            ]
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(faults.verdict(), Verdict::Serve);
    }

    #[test]
    fn a_bad_change_names_its_field_and_changes_nothing() {
        let faults = with(FaultUpdate::default());
        for (update, field) in [
            (
                FaultUpdate {
                    rate: Some(1.5),
                    ..Default::default()
                },
                "rate",
            ),
            (
                FaultUpdate {
                    slow_body_chunk: Some(0),
                    ..Default::default()
                },
                "slow_body_chunk",
            ),
            (
                FaultUpdate {
                    refuse_for: Some(Duration::ZERO),
                    ..Default::default()
                },
                "refuse_for",
            ),
            (
                FaultUpdate {
                    rate_limit: Some(RATE_LIMIT_MAX + 1),
                    ..Default::default()
                },
                "rate_limit",
            ),
        ] {
            let err = faults
                .update(&FaultUpdate {
                    fault: Some(Fault::Stall),
                    ..update
                })
                .unwrap_err();
            assert_eq!(err.field, field);
            assert_eq!(faults.settings(), FaultSettings::default());
        }
        assert_eq!("slow_body".parse::<Fault>(), Ok(Fault::SlowBody));
        assert!("reset".parse::<Fault>().is_err());
    }
}
