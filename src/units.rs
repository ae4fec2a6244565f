//! Value forms that the environment and the admin API share: switches and
//! durations. One parser each, so `PAYMENT_IDEMPOTENCY=off` and
//! `{"idempotency": "off"}` accept exactly the same spellings.
//!
//! A duration is one whole number and one unit (`200ms`, `2s`, `1m`), at most
//! `MAX_DURATION`. humantime's parser was not used: it sums any number of
//! parts (`5s5s`, `1ms 2ms`) and takes years, and a duration of years added to
//! an `Instant` panics.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// The spellings a switch accepts, for error messages.
pub const SWITCH_FORMS: &str = "on or off (also true/false, yes/no, 1/0)";

/// `on`/`off`, `true`/`false`, `yes`/`no` or `1`/`0`, in any case.
pub fn parse_switch(raw: &str) -> Result<bool, String> {
    match raw.trim().to_ascii_lowercase().as_str() {
        "on" | "true" | "1" | "yes" => Ok(true),
        "off" | "false" | "0" | "no" => Ok(false),
        _ => Err(format!("expected {SWITCH_FORMS}")),
    }
}

/// The longest duration any knob or admin field accepts: a day (24h; the
/// error messages say so). Far beyond
/// any sensible setting, and far from overflowing a clock.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 60 * 60);

const DURATION_FORM: &str =
    "expected a duration: one whole number and one unit (ns, us, ms, s, m, h, d), such as 200ms, 2s or 1m";

/// A duration such as `200ms`, `2s` or `1m`: one whole number, one unit
/// (`0` alone is zero), at most `MAX_DURATION`.
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    let text = raw.trim();
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return Err(DURATION_FORM.into());
    }
    let (number, unit) = text.split_at(digits);
    let too_long = || "expected at most 24h".to_owned();
    let n: u64 = number.parse().map_err(|_| too_long())?;
    let nanos_per: u64 = match unit.trim_start() {
        "" if n == 0 => 1,
        "ns" | "nsec" => 1,
        "us" | "µs" | "usec" => 1_000,
        "ms" | "msec" => 1_000_000,
        "s" | "sec" | "secs" | "second" | "seconds" => 1_000_000_000,
        "m" | "min" | "mins" | "minute" | "minutes" => 60_000_000_000,
        "h" | "hr" | "hrs" | "hour" | "hours" => 3_600_000_000_000,
        "d" | "day" | "days" => 86_400_000_000_000,
        _ => return Err(DURATION_FORM.into()),
    };
    let nanos = n.checked_mul(nanos_per).ok_or_else(too_long)?;
    let duration = Duration::from_nanos(nanos);
    if duration > MAX_DURATION {
        return Err(too_long());
    }
    Ok(duration)
}

/// A duration as the API shows it: in the largest unit that divides it
/// evenly (`90s`, `2m`, `1500ms`), so it reads back through `parse_duration`.
/// Whole milliseconds: sub-millisecond noise helps nobody reading it.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0ms".into();
    }
    for (unit, size) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
    ] {
        if ms.is_multiple_of(size) {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

/// A duration as the API shows it (`format_duration`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HumanDuration(pub Duration);

impl serde::Serialize for HumanDuration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_duration(self.0))
    }
}

/// The form of a duration, for the API's schema. The bound (24h) is stated
/// in words: a pattern cannot say it.
pub const DURATION_PATTERN: &str = r"^\s*(0|[0-9]+\s*(ns|nsec|us|µs|usec|ms|msec|s|sec|secs|second|seconds|m|min|mins|minute|minutes|h|hr|hrs|hour|hours|d|day|days))\s*$";

/// The OpenAPI schema of a duration string.
pub fn duration_schema() -> utoipa::openapi::schema::Object {
    use utoipa::openapi::schema::{ObjectBuilder, Type};
    ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some(DURATION_PATTERN))
        .description(Some(
            "A duration: one whole number and one unit (ns, us, ms, s, m, h, d), such as 200ms, 2s or 1m; at most 24h.",
        ))
        .build()
}

/// The OpenAPI schema of a switch: a boolean, or one of the environment's
/// words in any case.
pub fn switch_schema() -> utoipa::openapi::schema::Schema {
    use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Type};
    fn any_case(word: &str) -> String {
        word.chars()
            .map(|c| {
                if c.is_ascii_alphabetic() {
                    format!("[{}{}]", c.to_ascii_lowercase(), c.to_ascii_uppercase())
                } else {
                    c.to_string()
                }
            })
            .collect()
    }
    let words = ["on", "off", "true", "false", "yes", "no", "1", "0"]
        .map(any_case)
        .join("|");
    OneOfBuilder::new()
        .item(ObjectBuilder::new().schema_type(Type::Boolean))
        .item(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some(format!(r"^\s*({words})\s*$"))),
        )
        .description(Some(format!("true or false, or {SWITCH_FORMS}")))
        .build()
        .into()
}

/// A switch in JSON: a boolean, or a string in any of the environment's
/// spellings.
pub fn de_switch<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    let refuse = |got: &str| {
        serde::de::Error::custom(format!(
            "expected true, false or a string: {SWITCH_FORMS}; got {got}"
        ))
    };
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::Bool(b) => Ok(Some(b)),
        serde_json::Value::String(w) => parse_switch(&w)
            .map(Some)
            .map_err(|_| refuse(&format!("{w:?}"))),
        other => Err(refuse(&other.to_string())),
    }
}

/// A bad setting from the admin API, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {reason}")]
pub struct SettingsError {
    pub field: &'static str,
    pub reason: String,
}

/// A `SettingsError` for `field`.
pub fn invalid(field: &'static str, reason: impl Into<String>) -> SettingsError {
    SettingsError {
        field,
        reason: reason.into(),
    }
}

/// A duration in JSON: a string such as `"200ms"`.
pub fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    de_duration_required(d).map(Some)
}

/// Like `de_duration`, for a field that must be present.
pub fn de_duration_required<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let raw = String::deserialize(d)?;
    parse_duration(&raw)
        .map_err(|reason| serde::de::Error::custom(format!("{reason}, got {raw:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_switch_takes_every_spelling_in_any_case_and_nothing_else() {
        for on in ["on", "ON", "true", "True", "1", "yes", " on "] {
            assert_eq!(parse_switch(on), Ok(true), "{on}");
        }
        for off in ["off", "Off", "false", "0", "no", "NO"] {
            assert_eq!(parse_switch(off), Ok(false), "{off}");
        }
        for bad in ["", "maybe", "2", "onn", "y"] {
            assert!(parse_switch(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_duration_is_one_number_and_one_unit() {
        for (raw, expected) in [
            ("200ms", Duration::from_millis(200)),
            ("2s", Duration::from_secs(2)),
            (" 1m ", Duration::from_secs(60)),
            ("5 s", Duration::from_secs(5)),
            ("0", Duration::ZERO),
            ("0ms", Duration::ZERO),
            ("1500us", Duration::from_micros(1500)),
            ("24h", MAX_DURATION),
            ("1d", MAX_DURATION),
        ] {
            assert_eq!(parse_duration(raw), Ok(expected), "{raw}");
        }
        for bad in [
            "", "s", "5", "5s5s", "1ms 2ms", "1.5s", "-1s", "5x", "ms5", "1y",
        ] {
            let err = parse_duration(bad).unwrap_err();
            assert!(
                err.contains("one whole number and one unit"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn a_shown_duration_reads_back_as_itself() {
        for (d, shown) in [
            (Duration::from_millis(200), "200ms"),
            (Duration::from_secs(90), "90s"),
            (Duration::from_secs(120), "2m"),
            (Duration::from_secs(3600), "1h"),
            (MAX_DURATION, "1d"),
            (Duration::ZERO, "0ms"),
            (Duration::from_micros(1500), "1ms"),
        ] {
            assert_eq!(format_duration(d), shown);
            let back = parse_duration(shown).unwrap();
            assert_eq!(back, Duration::from_millis(d.as_millis() as u64));
        }
    }

    #[test]
    fn the_schema_patterns_take_what_the_parsers_take() {
        let duration = regex::Regex::new(DURATION_PATTERN).unwrap();
        for raw in ["200ms", "2s", "1m", "0", " 5 s ", "24h", "86400s", "1500us"] {
            assert!(duration.is_match(raw), "{raw}");
            assert!(parse_duration(raw).is_ok(), "{raw}");
        }
        for raw in ["5s5s", "1ms 2ms", "1.5s", "x", "", "1y", "5", "-1s"] {
            assert!(!duration.is_match(raw), "{raw}");
            assert!(parse_duration(raw).is_err(), "{raw}");
        }
        let schema = serde_json::to_value(switch_schema()).unwrap();
        assert_eq!(schema["oneOf"][0]["type"], "boolean", "{schema}");
        let word = regex::Regex::new(schema["oneOf"][1]["pattern"].as_str().unwrap()).unwrap();
        for raw in ["on", "OFF", "True", "yes", "0", " no "] {
            assert!(word.is_match(raw), "{raw}");
            assert!(parse_switch(raw).is_ok(), "{raw}");
        }
        for raw in ["maybe", "2", "onoff", ""] {
            assert!(!word.is_match(raw), "{raw}");
            assert!(parse_switch(raw).is_err(), "{raw}");
        }
    }

    #[test]
    fn a_duration_above_a_day_is_refused_however_large() {
        for raw in [
            "25h",
            "2d",
            "86401s",
            "300000000000h",
            "99999999999999999999999ms",
        ] {
            let err = parse_duration(raw).unwrap_err();
            assert!(err.contains("at most 24h"), "{raw}: {err}");
        }
    }

    #[test]
    fn json_switches_take_booleans_and_the_same_words() {
        #[derive(Deserialize)]
        struct S {
            #[serde(default, deserialize_with = "de_switch")]
            s: Option<bool>,
        }
        let parse = |json: &str| serde_json::from_str::<S>(json).map(|v| v.s);
        assert_eq!(parse(r#"{"s": true}"#).unwrap(), Some(true));
        assert_eq!(parse(r#"{"s": "yes"}"#).unwrap(), Some(true));
        assert_eq!(parse(r#"{"s": "0"}"#).unwrap(), Some(false));
        assert_eq!(parse(r#"{}"#).unwrap(), None);
        assert!(parse(r#"{"s": "maybe"}"#).is_err());
        assert!(parse(r#"{"s": 1}"#).is_err());
    }
}
