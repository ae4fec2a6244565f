//! Sweeps: an experiment run at every value of one or two parameters, so
//! its report can draw a figure against a setting (a curve) or over two of
//! them (a map).
//!
//! ```toml
//! [[sweep]]
//! name = "rate"                      # the traffic rate,
//! values = [10, 100, 1000]
//!
//! [[sweep]]
//! name = "spike"                     # or a parameter the schedule reads as "$spike",
//! range = { from = "100ms", to = "400ms", steps = 4 }
//! # or any setting a variant can set: name = "WORKER_COUNT"
//! ```
//!
//! A range has `from`, `to`, `steps` (2 to 50) and `scale` (`linear`, the
//! default, or `log`); numbers or durations. When both ends are whole
//! numbers the values are whole too. A cell is one value of each parameter;
//! every variant runs in every cell.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::units::{format_duration, parse_duration};

/// The most parameters a sweep may have: a curve needs one, a map two.
pub const MAX_PARAMS: usize = 2;
/// The most values one parameter may take.
pub const MAX_VALUES: usize = 50;
/// The most runs (cells times variants) one experiment may ask for.
pub const MAX_RUNS: usize = 2_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawParam {
    pub name: String,
    #[serde(default)]
    pub values: Option<Vec<toml::Value>>,
    #[serde(default)]
    pub range: Option<RawRange>,
    /// How the report's axis names it (default: the parameter's name).
    #[serde(default)]
    pub label: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRange {
    from: toml::Value,
    to: toml::Value,
    steps: usize,
    #[serde(default)]
    scale: Scale,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Scale {
    #[default]
    Linear,
    Log,
}

/// What a parameter sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    /// The traffic's rate, orders per second, for every variant.
    Rate,
    /// A setting, named as the environment names it, over every variant's.
    Setting,
    /// A value the schedule reads where it says `$name`.
    Schedule,
}

/// One value of a parameter: as written (what settings and the schedule
/// get, and what reports show) and as a number (what axes use: a
/// duration in seconds).
#[derive(Debug, Clone, PartialEq)]
pub struct Value {
    pub text: String,
    pub number: f64,
    /// Whether it was a TOML number (a schedule's `"$name"` then becomes a
    /// number, not a string).
    pub numeric: bool,
}

impl Value {
    /// Whether `text` names this value: the same number, the same
    /// duration, or the same text.
    pub fn matches(&self, text: &str) -> bool {
        let text = text.trim();
        if self.text == text {
            return true;
        }
        if self.numeric {
            return text.parse::<f64>().is_ok_and(|n| n == self.number);
        }
        match (parse_duration(&self.text), parse_duration(text)) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        }
    }
}

/// A swept parameter with its values, in the order they run.
#[derive(Debug, Clone)]
pub struct Param {
    pub name: String,
    pub kind: ParamKind,
    pub values: Vec<Value>,
    pub label: String,
    /// Whether the values are durations (the axis is then in seconds).
    pub durations: bool,
}

impl Param {
    /// The index of the value `text` names.
    pub fn find(&self, text: &str) -> Option<usize> {
        self.values.iter().position(|v| v.matches(text))
    }

    /// Its values as the report lists them.
    pub fn listed(&self) -> String {
        self.values
            .iter()
            .map(|v| v.text.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn value_of(v: &toml::Value) -> Result<Value, String> {
    match v {
        toml::Value::Integer(i) => Ok(Value {
            text: i.to_string(),
            number: *i as f64,
            numeric: true,
        }),
        toml::Value::Float(f) if f.is_finite() => Ok(Value {
            text: f.to_string(),
            number: *f,
            numeric: true,
        }),
        toml::Value::String(s) => {
            let number = parse_duration(s)
                .map(|d| d.as_secs_f64())
                .unwrap_or(f64::NAN);
            Ok(Value {
                text: s.clone(),
                number,
                numeric: false,
            })
        }
        toml::Value::Boolean(b) => Ok(Value {
            text: b.to_string(),
            number: f64::from(u8::from(*b)),
            numeric: false,
        }),
        other => Err(format!(
            "a swept value is a number, a duration or a word, got {other}"
        )),
    }
}

/// The values of a range: `steps` of them from `from` to `to`.
fn range_values(range: &RawRange) -> Result<Vec<Value>, String> {
    if !(2..=MAX_VALUES).contains(&range.steps) {
        return Err(format!(
            "range.steps must be 2 to {MAX_VALUES}, got {}",
            range.steps
        ));
    }
    let durations = matches!(range.from, toml::Value::String(_));
    let end = |v: &toml::Value| -> Result<f64, String> {
        match v {
            toml::Value::Integer(i) if !durations => Ok(*i as f64),
            toml::Value::Float(f) if !durations && f.is_finite() => Ok(*f),
            toml::Value::String(s) if durations => parse_duration(s)
                .map(|d| d.as_secs_f64() * 1000.0)
                .map_err(|e| format!("range: {s:?}: {e}")),
            other => Err(format!(
                "range.from and range.to are both numbers or both durations, got {other}"
            )),
        }
    };
    let (from, to) = (end(&range.from)?, end(&range.to)?);
    if from >= to {
        return Err(format!(
            "range.from must be below range.to ({from} >= {to})"
        ));
    }
    if range.scale == Scale::Log && from <= 0.0 {
        return Err("a log range must start above zero".into());
    }
    // Durations are whole milliseconds; numbers are whole when both ends are.
    let whole = durations
        || matches!(
            (&range.from, &range.to),
            (toml::Value::Integer(_), toml::Value::Integer(_))
        );
    let mut out: Vec<Value> = Vec::new();
    for i in 0..range.steps {
        let share = i as f64 / (range.steps - 1) as f64;
        let x = match range.scale {
            Scale::Linear => from + (to - from) * share,
            Scale::Log => (from.ln() + (to.ln() - from.ln()) * share).exp(),
        };
        let x = if whole {
            x.round()
        } else {
            (x * 1e6).round() / 1e6
        };
        let value = if durations {
            let d = std::time::Duration::from_millis(x as u64);
            Value {
                text: format_duration(d),
                number: d.as_secs_f64(),
                numeric: false,
            }
        } else {
            Value {
                text: if whole {
                    format!("{x:.0}")
                } else {
                    x.to_string()
                },
                number: x,
                numeric: true,
            }
        };
        if out.last().is_none_or(|last| last.number != value.number) {
            out.push(value);
        }
    }
    Ok(out)
}

/// Whether `name` is spelled as a setting (`WORKER_COUNT`).
pub fn is_setting_name(name: &str) -> bool {
    name.len() > 1
        && name
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

/// Reads the sweep's parameters. `quick` replaces a parameter's values in
/// the quick profile (`[quick.sweep]`).
pub(super) fn params(
    raw: &[RawParam],
    quick: &BTreeMap<String, Vec<toml::Value>>,
) -> Result<Vec<Param>, String> {
    if raw.len() > MAX_PARAMS {
        return Err(format!(
            "a sweep has at most {MAX_PARAMS} parameters (a curve or a map), got {}",
            raw.len()
        ));
    }
    let mut out: Vec<Param> = Vec::new();
    for p in raw {
        let here = |m: String| format!("sweep {}: {m}", p.name);
        if out.iter().any(|q| q.name == p.name) {
            return Err(here("swept twice".into()));
        }
        let kind = if p.name == "rate" {
            ParamKind::Rate
        } else if is_setting_name(&p.name) {
            ParamKind::Setting
        } else if !p.name.is_empty()
            && p.name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            ParamKind::Schedule
        } else {
            return Err(here(
                "a parameter is `rate`, a setting (UPPER_CASE) or a schedule parameter (lower_case)"
                    .into(),
            ));
        };
        let values = match (quick.get(&p.name), &p.values, &p.range) {
            (Some(values), _, _) => values.iter().map(value_of).collect::<Result<Vec<_>, _>>(),
            (None, Some(values), None) => values.iter().map(value_of).collect(),
            (None, None, Some(range)) => range_values(range),
            (None, Some(_), Some(_)) => Err("give values or a range, not both".into()),
            (None, None, None) => {
                Err("give its values = [...] or a range = { from, to, steps }".into())
            }
        }
        .map_err(here)?;
        if values.is_empty() || values.len() > MAX_VALUES {
            return Err(here(format!(
                "a parameter takes 1 to {MAX_VALUES} values, got {}",
                values.len()
            )));
        }
        for (i, v) in values.iter().enumerate() {
            if values[..i].iter().any(|w| w.text == v.text) {
                return Err(here(format!("the value {} appears twice", v.text)));
            }
        }
        if kind == ParamKind::Rate && values.iter().any(|v| !v.numeric) {
            return Err(here("a rate is a number of orders per second".into()));
        }
        let durations = values
            .iter()
            .all(|v| !v.numeric && parse_duration(&v.text).is_ok());
        out.push(Param {
            label: p.label.clone().unwrap_or_else(|| match kind {
                ParamKind::Rate => "offered rate, orders/s".to_owned(),
                _ if durations => format!("{}, s", p.name),
                _ => p.name.clone(),
            }),
            name: p.name.clone(),
            kind,
            values,
            durations,
        });
    }
    for name in quick.keys() {
        if !out.iter().any(|p| &p.name == name) {
            return Err(format!(
                "quick.sweep.{name}: no swept parameter has that name"
            ));
        }
    }
    Ok(out)
}

/// Every cell: one value index per parameter, the first parameter varying
/// slowest. No parameters: one cell.
pub fn cells(params: &[Param]) -> Vec<Vec<usize>> {
    let mut cells = vec![Vec::new()];
    for p in params {
        cells = cells
            .into_iter()
            .flat_map(|cell| {
                (0..p.values.len()).map(move |i| {
                    let mut next = cell.clone();
                    next.push(i);
                    next
                })
            })
            .collect();
    }
    cells
}

/// A TOML value with every `$name` of a schedule parameter replaced by the
/// cell's value: a string that is exactly `"$name"` takes the value itself
/// (a number stays a number); `$name` inside a longer string is replaced in
/// the text.
pub(super) fn substitute(value: &toml::Value, bound: &[(&Param, &Value)]) -> toml::Value {
    match value {
        toml::Value::String(s) => {
            for (p, v) in bound {
                if s.trim() == format!("${}", p.name) {
                    return if v.numeric {
                        v.text
                            .parse::<i64>()
                            .map(toml::Value::Integer)
                            .unwrap_or(toml::Value::Float(v.number))
                    } else {
                        toml::Value::String(v.text.clone())
                    };
                }
            }
            toml::Value::String(substitute_text(s, bound))
        }
        toml::Value::Array(items) => {
            toml::Value::Array(items.iter().map(|i| substitute(i, bound)).collect())
        }
        toml::Value::Table(table) => toml::Value::Table(
            table
                .iter()
                .map(|(k, v)| (k.clone(), substitute(v, bound)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// `text` with each `$name` of a bound parameter replaced by its value. A
/// name runs over letters, digits and `_`, so `$spike_max` is never read as
/// `$spike` followed by `_max`.
pub(super) fn substitute_text(text: &str, bound: &[(&Param, &Value)]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let name = reference_at(&rest[at + 1..]);
        match bound.iter().find(|(p, _)| p.name == name) {
            Some((_, v)) => out.push_str(&v.text),
            None => {
                out.push('$');
                out.push_str(name);
            }
        }
        rest = &rest[at + 1 + name.len()..];
    }
    out.push_str(rest);
    out
}

/// The name a `$` starts, up to the first character that cannot be in one.
fn reference_at(text: &str) -> &str {
    let end = text
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(text.len());
    &text[..end]
}

/// The `$name`s a text mentions that no schedule parameter defines.
pub(super) fn unknown_references(text: &str, params: &[Param]) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        let name = reference_at(&rest[at + 1..]);
        if !params
            .iter()
            .any(|p| p.kind == ParamKind::Schedule && p.name == name)
        {
            out.push(format!("${name}"));
        }
        rest = &rest[at + 1..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(name: &str, values: Option<Vec<toml::Value>>, range: Option<&str>) -> RawParam {
        RawParam {
            name: name.into(),
            values,
            range: range.map(|r| toml::from_str::<RawRange>(r).unwrap()),
            label: None,
        }
    }

    #[test]
    fn a_log_range_of_whole_numbers_runs_from_end_to_end_without_repeats() {
        let p = params(
            &[raw(
                "rate",
                None,
                Some("from = 10\nto = 2000\nsteps = 12\nscale = \"log\""),
            )],
            &BTreeMap::new(),
        )
        .unwrap();
        let numbers: Vec<f64> = p[0].values.iter().map(|v| v.number).collect();
        assert_eq!(numbers.len(), 12);
        assert_eq!((numbers[0], numbers[11]), (10.0, 2000.0));
        assert!(numbers.windows(2).all(|w| w[0] < w[1]), "{numbers:?}");
        assert!(numbers.iter().all(|n| n.fract() == 0.0));
        // Even steps on a log scale: each about 1.6 times the one before.
        assert!((numbers[1] / numbers[0] - 1.62).abs() < 0.1, "{numbers:?}");
        assert_eq!(p[0].kind, ParamKind::Rate);
    }

    #[test]
    fn a_duration_range_gives_durations_and_an_axis_in_seconds() {
        let p = params(
            &[raw(
                "spike",
                None,
                Some("from = \"100ms\"\nto = \"400ms\"\nsteps = 4"),
            )],
            &BTreeMap::new(),
        )
        .unwrap();
        let texts: Vec<&str> = p[0].values.iter().map(|v| v.text.as_str()).collect();
        assert_eq!(texts, ["100ms", "200ms", "300ms", "400ms"]);
        assert_eq!(p[0].values[3].number, 0.4);
        assert!(p[0].durations);
        assert_eq!(p[0].kind, ParamKind::Schedule);
        assert_eq!(
            p[0].find("200000us"),
            Some(1),
            "the same duration, spelled otherwise"
        );
        assert_eq!(p[0].find("250ms"), None);
    }

    #[test]
    fn cells_cover_every_combination_with_the_first_parameter_slowest() {
        let p = params(
            &[
                raw("rate", Some(vec![1.into(), 2.into()]), None),
                raw(
                    "WORKER_COUNT",
                    Some(vec![5.into(), 6.into(), 7.into()]),
                    None,
                ),
            ],
            &BTreeMap::new(),
        )
        .unwrap();
        assert_eq!(p[1].kind, ParamKind::Setting);
        let c = cells(&p);
        assert_eq!(c.len(), 6);
        assert_eq!(c[0], [0, 0]);
        assert_eq!(c[1], [0, 1]);
        assert_eq!(c[3], [1, 0]);
        assert_eq!(cells(&[]), vec![Vec::<usize>::new()]);
    }

    #[test]
    fn bad_sweeps_say_what_is_wrong() {
        for (params_, hint) in [
            (vec![raw("rate", None, None)], "give its values"),
            (
                vec![raw("rate", Some(vec!["fast".into()]), None)],
                "a rate is a number",
            ),
            (
                vec![raw("rate", Some(vec![1.into(), 1.into()]), None)],
                "appears twice",
            ),
            (
                vec![raw("rate", None, Some("from = 5\nto = 1\nsteps = 3"))],
                "must be below",
            ),
            (
                vec![raw("rate", None, Some("from = 1\nto = 5\nsteps = 500"))],
                "steps must be 2 to 50",
            ),
            (
                vec![raw("Mixed-Case", Some(vec![1.into()]), None)],
                "a parameter is",
            ),
            (
                vec![
                    raw("a", Some(vec![1.into()]), None),
                    raw("b", Some(vec![1.into()]), None),
                    raw("c", Some(vec![1.into()]), None),
                ],
                "at most 2",
            ),
        ] {
            let err = params(&params_, &BTreeMap::new()).unwrap_err();
            assert!(err.contains(hint), "{hint}: {err}");
        }
    }

    #[test]
    fn the_schedule_reads_a_parameter_as_a_value_or_inside_a_text() {
        let p = params(
            &[
                raw("spike", Some(vec!["200ms".into()]), None),
                raw("spike_max", Some(vec!["300ms".into()]), None),
            ],
            &BTreeMap::new(),
        )
        .unwrap();
        let bound = [(&p[0], &p[0].values[0]), (&p[1], &p[1].values[0])];
        let step: toml::Value =
            toml::from_str("a = \"$spike\"\nb = \"from $spike to $spike_max\"\nc = 3").unwrap();
        let out = substitute(&step, &bound);
        assert_eq!(out["a"].as_str(), Some("200ms"));
        assert_eq!(out["b"].as_str(), Some("from 200ms to 300ms"));
        assert_eq!(out["c"].as_integer(), Some(3));
        assert_eq!(
            unknown_references("$spike and $nobody and $spikey", &p),
            ["$nobody", "$spikey"]
        );
        let n = params(&[raw("n", Some(vec![4.into()]), None)], &BTreeMap::new()).unwrap();
        let out = substitute(
            &toml::Value::String("$n".into()),
            &[(&n[0], &n[0].values[0])],
        );
        assert_eq!(out.as_integer(), Some(4), "a number stays a number");
    }
}
