//! The simulator's settings, their validation, and how they read as JSON.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

pub use crate::units::SettingsError;
use crate::units::{invalid, HumanDuration};

/// How the provider behaves beyond its rates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Normal,
    /// Every call fails.
    Outage,
    /// Failure rate and latency raised for a while, then back by themselves.
    Brownout,
    /// Calls hang until the caller's timeout.
    Blackhole,
}

/// A running brownout.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Brownout {
    pub failure_rate: f64,
    pub latency_min: Duration,
    pub latency_max: Duration,
    pub duration: Duration,
    pub until: Instant,
}

/// Everything that shapes a call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PaymentSettings {
    pub failure_rate: f64,
    pub latency_min: Duration,
    pub latency_max: Duration,
    pub ambiguous_rate: f64,
    pub idempotency: bool,
    pub mode: Mode,
    pub brownout: Option<Brownout>,
    /// A latency tail: this share of calls takes `tail_latency` instead of
    /// their drawn latency (0: no tail).
    pub tail_rate: f64,
    pub tail_latency: Duration,
}

impl Default for PaymentSettings {
    fn default() -> Self {
        Self {
            failure_rate: 0.3,
            latency_min: Duration::from_millis(100),
            latency_max: Duration::from_millis(500),
            ambiguous_rate: 0.0,
            idempotency: true,
            mode: Mode::Normal,
            brownout: None,
            tail_rate: 0.0,
            tail_latency: Duration::from_secs(2),
        }
    }
}

/// What one call runs with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Effective {
    pub mode: Mode,
    pub failure_rate: f64,
    pub latency_min: Duration,
    pub latency_max: Duration,
    pub ambiguous_rate: f64,
    pub idempotency: bool,
    pub tail_rate: f64,
    pub tail_latency: Duration,
}

fn check_rate(field: &'static str, rate: f64) -> Result<f64, SettingsError> {
    if rate.is_finite() && (0.0..=1.0).contains(&rate) {
        Ok(rate)
    } else {
        Err(invalid(field, "must be a number from 0 to 1"))
    }
}

/// A partial change, as `PUT /admin/payment` takes it. Unknown fields are refused.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PaymentUpdate {
    /// Share of calls declined, 0 to 1.
    #[schema(minimum = 0, maximum = 1)]
    pub failure_rate: Option<f64>,
    #[serde(default, deserialize_with = "crate::units::de_duration")]
    #[schema(schema_with = crate::units::duration_schema)]
    pub latency_min: Option<Duration>,
    #[serde(default, deserialize_with = "crate::units::de_duration")]
    #[schema(schema_with = crate::units::duration_schema)]
    pub latency_max: Option<Duration>,
    /// Share of calls charged but answered with an error, 0 to 1.
    #[schema(minimum = 0, maximum = 1)]
    pub ambiguous_rate: Option<f64>,
    #[serde(default, deserialize_with = "crate::units::de_switch")]
    #[schema(schema_with = crate::units::switch_schema)]
    pub idempotency: Option<bool>,
    pub mode: Option<Mode>,
    /// Required with `mode: brownout`.
    pub brownout: Option<BrownoutRequest>,
    /// Share of calls that take `tail_latency` instead, 0 to 1.
    #[schema(minimum = 0, maximum = 1)]
    pub tail_rate: Option<f64>,
    #[serde(default, deserialize_with = "crate::units::de_duration")]
    #[schema(schema_with = crate::units::duration_schema)]
    pub tail_latency: Option<Duration>,
}

/// The brownout's raised values and how long it lasts.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BrownoutRequest {
    #[schema(minimum = 0, maximum = 1)]
    pub failure_rate: f64,
    #[serde(deserialize_with = "crate::units::de_duration_required")]
    #[schema(schema_with = crate::units::duration_schema)]
    pub latency_min: Duration,
    #[serde(deserialize_with = "crate::units::de_duration_required")]
    #[schema(schema_with = crate::units::duration_schema)]
    pub latency_max: Duration,
    /// How long the brownout lasts, above zero.
    #[serde(deserialize_with = "crate::units::de_duration_required")]
    #[schema(schema_with = crate::units::duration_schema)]
    pub duration: Duration,
}

impl PaymentSettings {
    /// Whether a brownout's time is up and `expire` has work to do.
    pub fn is_expired(&self, now: Instant) -> bool {
        self.mode == Mode::Brownout && self.brownout.is_none_or(|b| now >= b.until)
    }

    /// Ends a brownout whose time is up.
    pub fn expire(&mut self, now: Instant) {
        if self.is_expired(now) {
            self.mode = Mode::Normal;
            self.brownout = None;
            tracing::warn!("brownout over: payment simulator back to normal");
        }
    }

    pub fn effective(&self) -> Effective {
        let (failure_rate, latency_min, latency_max) = match (self.mode, self.brownout) {
            (Mode::Brownout, Some(b)) => (b.failure_rate, b.latency_min, b.latency_max),
            (Mode::Outage, _) => (1.0, self.latency_min, self.latency_max),
            _ => (self.failure_rate, self.latency_min, self.latency_max),
        };
        Effective {
            mode: self.mode,
            failure_rate,
            latency_min,
            latency_max,
            ambiguous_rate: self.ambiguous_rate,
            idempotency: self.idempotency,
            tail_rate: self.tail_rate,
            tail_latency: self.tail_latency,
        }
    }

    /// The settings after `update`, or the first bad field. `self` is untouched.
    pub fn apply(&self, update: PaymentUpdate, now: Instant) -> Result<Self, SettingsError> {
        let mut next = *self;
        if let Some(rate) = update.failure_rate {
            next.failure_rate = check_rate("failure_rate", rate)?;
        }
        if let Some(rate) = update.ambiguous_rate {
            next.ambiguous_rate = check_rate("ambiguous_rate", rate)?;
        }
        if let Some(d) = update.latency_min {
            next.latency_min = d;
        }
        if let Some(d) = update.latency_max {
            next.latency_max = d;
        }
        if next.latency_min > next.latency_max {
            let field = if update.latency_min.is_some() {
                "latency_min"
            } else {
                "latency_max"
            };
            return Err(invalid(field, "latency_min must not be above latency_max"));
        }
        if let Some(on) = update.idempotency {
            next.idempotency = on;
        }
        if let Some(rate) = update.tail_rate {
            next.tail_rate = check_rate("tail_rate", rate)?;
        }
        if let Some(d) = update.tail_latency {
            next.tail_latency = d;
        }
        match (update.mode, update.brownout) {
            (Some(Mode::Brownout), Some(b)) => {
                let failure_rate = check_rate("brownout.failure_rate", b.failure_rate)?;
                if b.latency_min > b.latency_max {
                    return Err(invalid("brownout.latency_min", "must not be above brownout.latency_max"));
                }
                if b.duration.is_zero() {
                    return Err(invalid("brownout.duration", "must be above zero"));
                }
                next.mode = Mode::Brownout;
                next.brownout = Some(Brownout {
                    failure_rate,
                    latency_min: b.latency_min,
                    latency_max: b.latency_max,
                    duration: b.duration,
                    until: now + b.duration,
                });
            }
            (Some(Mode::Brownout), None) => {
                return Err(invalid(
                    "brownout",
                    "mode brownout needs {\"failure_rate\", \"latency_min\", \"latency_max\", \"duration\"}",
                ))
            }
            (_, Some(_)) => return Err(invalid("brownout", "only goes with \"mode\": \"brownout\"")),
            (Some(mode), None) => {
                next.mode = mode;
                next.brownout = None;
            }
            (None, None) => {}
        }
        Ok(next)
    }

    pub fn view(&self, now: Instant) -> SettingsView {
        SettingsView {
            mode: self.mode,
            failure_rate: self.failure_rate,
            latency_min: HumanDuration(self.latency_min),
            latency_max: HumanDuration(self.latency_max),
            ambiguous_rate: self.ambiguous_rate,
            idempotency: self.idempotency,
            tail_rate: self.tail_rate,
            tail_latency: HumanDuration(self.tail_latency),
            brownout: self.brownout.map(|b| BrownoutView {
                failure_rate: b.failure_rate,
                latency_min: HumanDuration(b.latency_min),
                latency_max: HumanDuration(b.latency_max),
                duration: HumanDuration(b.duration),
                remaining: HumanDuration(b.until.saturating_duration_since(now)),
            }),
        }
    }
}

/// The settings as the admin API shows them.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct SettingsView {
    pub mode: Mode,
    pub failure_rate: f64,
    #[schema(value_type = String, example = "100ms")]
    pub latency_min: HumanDuration,
    #[schema(value_type = String, example = "500ms")]
    pub latency_max: HumanDuration,
    pub ambiguous_rate: f64,
    pub idempotency: bool,
    /// The latency tail: this share of calls takes `tail_latency`.
    pub tail_rate: f64,
    #[schema(value_type = String, example = "2s")]
    pub tail_latency: HumanDuration,
    pub brownout: Option<BrownoutView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct BrownoutView {
    pub failure_rate: f64,
    #[schema(value_type = String)]
    pub latency_min: HumanDuration,
    #[schema(value_type = String)]
    pub latency_max: HumanDuration,
    #[schema(value_type = String)]
    pub duration: HumanDuration,
    #[schema(value_type = String)]
    pub remaining: HumanDuration,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(json: &str) -> PaymentUpdate {
        serde_json::from_str(json).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_bad_value_names_its_field_and_changes_nothing() {
        let now = Instant::now();
        let base = PaymentSettings::default();
        for (json, field) in [
            (r#"{"failure_rate": 1.5}"#, "failure_rate"),
            (r#"{"failure_rate": -0.1}"#, "failure_rate"),
            (r#"{"ambiguous_rate": 2}"#, "ambiguous_rate"),
            (
                r#"{"latency_min": "2s", "latency_max": "1s"}"#,
                "latency_min",
            ),
            (r#"{"latency_max": "50ms"}"#, "latency_max"),
            (r#"{"mode": "brownout"}"#, "brownout"),
            (
                r#"{"brownout": {"failure_rate": 0.5, "latency_min": "1s", "latency_max": "2s", "duration": "1m"}}"#,
                "brownout",
            ),
            (
                r#"{"mode": "brownout", "brownout": {"failure_rate": 5, "latency_min": "1s", "latency_max": "2s", "duration": "1m"}}"#,
                "brownout.failure_rate",
            ),
            (
                r#"{"mode": "brownout", "brownout": {"failure_rate": 0.5, "latency_min": "1s", "latency_max": "2s", "duration": "0s"}}"#,
                "brownout.duration",
            ),
        ] {
            let err = base.apply(update(json), now).unwrap_err();
            assert_eq!(err.field, field, "{json}");
        }
    }

    #[test]
    fn malformed_updates_are_refused_by_the_parser() {
        for json in [
            r#"{"mode": "chaos"}"#,
            r#"{"latency_min": "-5ms"}"#,
            r#"{"latency_min": 100}"#,
            r#"{"idempotency": "maybe"}"#,
            r#"{"colour": "red"}"#,
        ] {
            assert!(
                serde_json::from_str::<PaymentUpdate>(json).is_err(),
                "{json}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_brownout_raises_the_rates_then_ends_by_itself() {
        let now = Instant::now();
        let mut s = PaymentSettings::default()
            .apply(
                update(r#"{"mode": "brownout", "brownout": {"failure_rate": 0.9, "latency_min": "1s", "latency_max": "2s", "duration": "1m"}}"#),
                now,
            )
            .unwrap();
        assert_eq!(s.effective().failure_rate, 0.9);
        assert_eq!(s.effective().latency_min, Duration::from_secs(1));
        tokio::time::advance(Duration::from_secs(59)).await;
        s.expire(Instant::now());
        assert_eq!(s.mode, Mode::Brownout);
        assert_eq!(
            s.view(Instant::now()).brownout.unwrap().remaining,
            HumanDuration(Duration::from_secs(1))
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        s.expire(Instant::now());
        assert_eq!(s.mode, Mode::Normal);
        assert_eq!(s.effective().failure_rate, 0.3);
        assert_eq!(s.effective().latency_max, Duration::from_millis(500));
    }

    #[test]
    fn idempotency_takes_on_off_or_booleans() {
        assert_eq!(update(r#"{"idempotency": "off"}"#).idempotency, Some(false));
        assert_eq!(update(r#"{"idempotency": true}"#).idempotency, Some(true));
    }
}
