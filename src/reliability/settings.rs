//! The breaker's settings as the admin API shows and changes them
//! (`GET`/`PUT /admin/breaker`). The environment's rules hold here too: a
//! threshold and min calls from 1 to 1,000,000, a rate above 0 and at most 1, a
//! window of whole seconds from 1 s to 1 h, 1 to 100 probes, and slow calls
//! only under the failure-rate policy. A refused change changes nothing.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

use super::{BreakerConfig, BreakerPolicy, RateFigures};
use crate::units::{invalid, HumanDuration, SettingsError};

/// The largest failure threshold and minimum of calls the breaker takes.
pub const BREAKER_COUNT_LIMIT: u32 = 1_000_000;

/// The most probes a half-open window may admit.
pub const HALF_OPEN_PROBES_LIMIT: u32 = 100;

/// Whether `d` is a window of whole seconds from 1 s to 1 h: the
/// failure-rate breaker's and the retry budget's, from the environment or
/// the admin API alike.
pub fn is_window(d: Duration) -> bool {
    d >= Duration::from_secs(1) && d <= Duration::from_secs(3600) && d.subsec_nanos() == 0
}

/// The breaker's settings now.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, utoipa::ToSchema)]
pub struct BreakerSettings {
    /// `consecutive` or `failure_rate`.
    pub policy: &'static str,
    /// Consecutive failures that open it (the consecutive policy).
    pub failure_threshold: u32,
    #[schema(value_type = String, example = "30s")]
    pub open_duration: HumanDuration,
    pub half_open_probes: u32,
    /// The failure-rate policy's figures: in force under it, used when it is
    /// switched to otherwise.
    pub failure_rate: f64,
    #[schema(value_type = String, example = "10s")]
    pub window: HumanDuration,
    pub min_calls: u32,
    /// Calls slower than this count as failures (failure-rate policy only).
    #[schema(value_type = Option<String>, example = "500ms")]
    pub slow_call_duration: Option<HumanDuration>,
}

impl BreakerSettings {
    pub fn of(config: &BreakerConfig) -> Self {
        let rate = rate_figures(config);
        Self {
            policy: config.policy.name(),
            failure_threshold: config.failure_threshold,
            open_duration: HumanDuration(config.open_duration),
            half_open_probes: config.half_open_probes.max(1),
            failure_rate: rate.rate,
            window: HumanDuration(rate.window),
            min_calls: rate.min_calls,
            slow_call_duration: config.slow_call.map(HumanDuration),
        }
    }
}

/// The failure-rate figures in force, or those kept for it.
fn rate_figures(config: &BreakerConfig) -> RateFigures {
    match config.policy {
        BreakerPolicy::FailureRate {
            rate,
            window,
            min_calls,
        } => RateFigures {
            rate,
            window,
            min_calls,
        },
        BreakerPolicy::Consecutive => config.rate_fallback,
    }
}

/// What opens the breaker, as the API names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PolicyName {
    Consecutive,
    FailureRate,
}

/// A partial change of the breaker's settings. Unknown fields are refused.
/// It applies from the next call: the breaker keeps its state (an open one
/// stays open for the rest of its period), and its count and window start
/// empty.
#[derive(Debug, Clone, Copy, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BreakerUpdate {
    pub policy: Option<PolicyName>,
    #[schema(minimum = 1, maximum = 1000000)]
    pub failure_threshold: Option<u32>,
    #[serde(default, deserialize_with = "crate::units::de_duration")]
    #[schema(schema_with = crate::units::duration_schema)]
    pub open_duration: Option<Duration>,
    #[schema(minimum = 1, maximum = 100)]
    pub half_open_probes: Option<u32>,
    /// Above 0, at most 1.
    #[schema(maximum = 1)]
    pub failure_rate: Option<f64>,
    /// Whole seconds from 1s to 1h.
    #[serde(default, deserialize_with = "crate::units::de_duration")]
    #[schema(schema_with = crate::units::duration_schema)]
    pub window: Option<Duration>,
    #[schema(minimum = 1, maximum = 1000000)]
    pub min_calls: Option<u32>,
    /// A duration, or null to count no call as slow.
    #[serde(default, deserialize_with = "nullable_duration")]
    #[schema(value_type = Option<String>)]
    pub slow_call_duration: Option<Option<Duration>>,
}

/// Present and null → `Some(None)`; absent → `None` (through `default`).
fn nullable_duration<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<Duration>>, D::Error> {
    match Option::<String>::deserialize(d)? {
        None => Ok(Some(None)),
        Some(raw) => crate::units::parse_duration(&raw)
            .map(|d| Some(Some(d)))
            .map_err(|reason| serde::de::Error::custom(format!("{reason}, got {raw:?}"))),
    }
}

impl BreakerUpdate {
    /// `current` with what this update names changed, or the first field
    /// that is out of range.
    pub fn apply_to(&self, current: BreakerConfig) -> Result<BreakerConfig, SettingsError> {
        let mut next = current;
        let count = |field: &'static str, n: u32| {
            if (1..=BREAKER_COUNT_LIMIT).contains(&n) {
                Ok(n)
            } else {
                Err(invalid(
                    field,
                    format!("must be from 1 to {BREAKER_COUNT_LIMIT}"),
                ))
            }
        };
        if let Some(n) = self.failure_threshold {
            let n = count("failure_threshold", n)?;
            next.failure_threshold = n;
        }
        if let Some(d) = self.open_duration {
            if d.is_zero() {
                return Err(invalid("open_duration", "must be above zero"));
            }
            next.open_duration = d;
        }
        if let Some(n) = self.half_open_probes {
            if !(1..=HALF_OPEN_PROBES_LIMIT).contains(&n) {
                return Err(invalid(
                    "half_open_probes",
                    format!("must be from 1 to {HALF_OPEN_PROBES_LIMIT}"),
                ));
            }
            next.half_open_probes = n;
        }
        let mut rate = rate_figures(&current);
        if let Some(r) = self.failure_rate {
            if !(r > 0.0 && r <= 1.0) {
                return Err(invalid("failure_rate", "must be above 0 and at most 1"));
            }
            rate.rate = r;
        }
        if let Some(w) = self.window {
            if !is_window(w) {
                return Err(invalid("window", "must be whole seconds from 1s to 1h"));
            }
            rate.window = w;
        }
        if let Some(n) = self.min_calls {
            let n = count("min_calls", n)?;
            rate.min_calls = n;
        }
        if let Some(slow) = self.slow_call_duration {
            if slow.is_some_and(|d| d.is_zero()) {
                return Err(invalid(
                    "slow_call_duration",
                    "must be above zero (null: no call counts as slow)",
                ));
            }
            next.slow_call = slow;
        }
        let by_rate = match self.policy {
            Some(PolicyName::FailureRate) => true,
            Some(PolicyName::Consecutive) => false,
            None => matches!(current.policy, BreakerPolicy::FailureRate { .. }),
        };
        next.rate_fallback = rate;
        next.policy = if by_rate {
            BreakerPolicy::FailureRate {
                rate: rate.rate,
                window: rate.window,
                min_calls: rate.min_calls,
            }
        } else {
            BreakerPolicy::Consecutive
        };
        if !by_rate && next.slow_call.is_some() {
            let field = if self.slow_call_duration.is_some() {
                "slow_call_duration"
            } else {
                "policy"
            };
            return Err(invalid(
                field,
                "slow calls count under the failure_rate policy only; set slow_call_duration to null first or with it",
            ));
        }
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(json: &str) -> Result<BreakerConfig, SettingsError> {
        let update: BreakerUpdate = serde_json::from_str(json).unwrap();
        update.apply_to(BreakerConfig {
            rate_fallback: RateFigures {
                rate: 0.3,
                window: Duration::from_secs(20),
                min_calls: 7,
            },
            ..BreakerConfig::default()
        })
    }

    #[test]
    fn switching_to_the_failure_rate_takes_the_configured_figures_unless_given() {
        let next = update(r#"{"policy":"failure_rate"}"#).unwrap();
        assert_eq!(
            next.policy,
            BreakerPolicy::FailureRate {
                rate: 0.3,
                window: Duration::from_secs(20),
                min_calls: 7
            }
        );
        let next = update(r#"{"policy":"failure_rate","failure_rate":0.6,"window":"5s"}"#).unwrap();
        assert_eq!(
            next.policy,
            BreakerPolicy::FailureRate {
                rate: 0.6,
                window: Duration::from_secs(5),
                min_calls: 7
            }
        );
        // Figures given under the consecutive policy are kept for later.
        let next = update(r#"{"min_calls":50}"#).unwrap();
        assert_eq!(next.policy, BreakerPolicy::Consecutive);
        assert_eq!(next.rate_fallback.min_calls, 50);
        let back = BreakerUpdate {
            policy: Some(PolicyName::FailureRate),
            ..BreakerUpdate::default()
        }
        .apply_to(next)
        .unwrap();
        assert!(matches!(
            back.policy,
            BreakerPolicy::FailureRate { min_calls: 50, .. }
        ));
        // And the figures in force are what the view shows.
        let view = BreakerSettings::of(&back);
        assert_eq!(
            (view.policy, view.min_calls, view.failure_rate),
            ("failure_rate", 50, 0.3)
        );
    }

    #[test]
    fn out_of_range_values_are_refused_naming_the_field() {
        for (json, field) in [
            (r#"{"failure_threshold":0}"#, "failure_threshold"),
            (r#"{"open_duration":"0s"}"#, "open_duration"),
            (r#"{"half_open_probes":0}"#, "half_open_probes"),
            (r#"{"half_open_probes":101}"#, "half_open_probes"),
            (r#"{"failure_rate":0}"#, "failure_rate"),
            (r#"{"failure_rate":1.5}"#, "failure_rate"),
            (r#"{"window":"1500ms"}"#, "window"),
            (r#"{"window":"2h"}"#, "window"),
            (r#"{"min_calls":0}"#, "min_calls"),
            (r#"{"min_calls":1000001}"#, "min_calls"),
            (r#"{"min_calls":2147483648}"#, "min_calls"),
            (r#"{"failure_threshold":1000001}"#, "failure_threshold"),
            (
                r#"{"slow_call_duration":"0s","policy":"failure_rate"}"#,
                "slow_call_duration",
            ),
            (r#"{"slow_call_duration":"500ms"}"#, "slow_call_duration"),
        ] {
            let err = update(json).unwrap_err();
            assert_eq!(err.field, field, "{json}: {err}");
        }
        // NaN cannot come from JSON, but the check holds for it too.
        let nan = BreakerUpdate {
            failure_rate: Some(f64::NAN),
            ..BreakerUpdate::default()
        };
        assert_eq!(
            nan.apply_to(BreakerConfig::default()).unwrap_err().field,
            "failure_rate"
        );
    }

    #[test]
    fn slow_calls_go_with_the_failure_rate_and_null_clears_them() {
        let slow = update(r#"{"policy":"failure_rate","slow_call_duration":"400ms"}"#).unwrap();
        assert_eq!(slow.slow_call, Some(Duration::from_millis(400)));
        let refused = BreakerUpdate {
            policy: Some(PolicyName::Consecutive),
            ..BreakerUpdate::default()
        }
        .apply_to(slow)
        .unwrap_err();
        assert_eq!(refused.field, "policy");
        let cleared: BreakerUpdate =
            serde_json::from_str(r#"{"policy":"consecutive","slow_call_duration":null}"#).unwrap();
        let next = cleared.apply_to(slow).unwrap();
        assert_eq!(
            (next.policy, next.slow_call),
            (BreakerPolicy::Consecutive, None)
        );
    }

    #[test]
    fn unknown_fields_and_policies_are_refused() {
        assert!(serde_json::from_str::<BreakerUpdate>(r#"{"threshold":3}"#).is_err());
        assert!(serde_json::from_str::<BreakerUpdate>(r#"{"policy":"count"}"#).is_err());
        assert!(serde_json::from_str::<BreakerUpdate>(r#"{"window":"soon"}"#).is_err());
    }
}
