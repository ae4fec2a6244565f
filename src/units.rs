//! Value forms that the environment and the admin API share: switches and
//! durations. One parser each, so `PAYMENT_IDEMPOTENCY=off` and
//! `{"idempotency": "off"}` accept exactly the same spellings.

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

/// A duration such as `200ms`, `2s` or `1m`.
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    humantime::parse_duration(raw.trim())
        .map_err(|_| "expected a duration such as 200ms, 2s or 1m".to_owned())
}

/// A switch in JSON: a boolean, or a string in any of the environment's
/// spellings.
pub fn de_switch<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Switch {
        Bool(bool),
        Word(String),
    }
    match Switch::deserialize(d)? {
        Switch::Bool(b) => Ok(Some(b)),
        Switch::Word(w) => parse_switch(&w).map(Some).map_err(|_| {
            serde::de::Error::custom(format!("expected true, false or {SWITCH_FORMS}, got {w:?}"))
        }),
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
