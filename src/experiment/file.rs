//! The experiment file (TOML, in `experiments/`) and its validation.
//!
//! ```toml
//! title = "An outage under steady traffic"
//! claim = "Retry without a breaker fails slowly and multiplies calls"
//! seed = 7
//!
//! [base]                       # settings, named as the environment names them
//! PAYMENT_FAILURE_RATE = 0.05
//!
//! [[variants]]
//! name = "retry_only"
//! settings = { BREAKER_ENABLED = false }
//!
//! [traffic]
//! rate = 40                    # orders per second
//! duration = "30s"
//!
//! [[schedule]]                 # changes at given times after the start
//! at = "5s"
//! fault = "start"              # marks where the fault begins ("end": where it ends)
//! payment = { mode = "outage" }
//!
//! [[hypotheses]]
//! claim = "retry alone multiplies calls"
//! expr = "amplification[retry_only] > 2 * amplification[both]"
//!
//! [quick]                      # --quick: durations times `scale`, and these settings
//! scale = 0.25
//! settings = { BREAKER_OPEN_DURATION = "2s" }
//! ```
//!
//! Every problem is reported with the file's line and the key at fault.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use super::figures::FIGURES;
use super::hypothesis::{self, Expr};
use crate::config::Config;
use crate::payment::PaymentUpdate;
use crate::reliability::SwitchesUpdate;
use crate::units::parse_duration;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    title: String,
    claim: String,
    #[serde(default = "default_seed")]
    seed: u64,
    #[serde(default)]
    base: BTreeMap<String, toml::Value>,
    variants: Vec<RawVariant>,
    traffic: RawTraffic,
    #[serde(default)]
    schedule: Vec<RawStep>,
    #[serde(default)]
    hypotheses: Vec<RawHypothesis>,
    #[serde(default)]
    quick: RawQuick,
    #[serde(default = "default_replicas")]
    replicas: u32,
}

fn default_seed() -> u64 {
    1
}

fn default_replicas() -> u32 {
    1
}

/// The most replicas an experiment starts.
pub const MAX_REPLICAS: u32 = 4;

/// A replica's name in schedules and reports: `a`, `b`, …
pub fn replica_name(index: usize) -> String {
    char::from(b'a' + index as u8).to_string()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVariant {
    name: String,
    #[serde(default)]
    settings: BTreeMap<String, toml::Value>,
    /// Orders per second for this variant; [traffic]'s rate when absent.
    rate: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTraffic {
    rate: f64,
    duration: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    at: String,
    #[serde(default)]
    fault: Option<FaultMark>,
    #[serde(default)]
    payment: Option<toml::Value>,
    #[serde(default)]
    reliability: Option<SwitchesUpdate>,
    #[serde(default)]
    reset_breaker: bool,
    #[serde(default)]
    kill: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHypothesis {
    claim: String,
    expr: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuick {
    #[serde(default = "default_scale")]
    scale: f64,
    #[serde(default)]
    settings: BTreeMap<String, toml::Value>,
}

impl Default for RawQuick {
    fn default() -> Self {
        Self {
            scale: default_scale(),
            settings: BTreeMap::new(),
        }
    }
}

fn default_scale() -> f64 {
    0.25
}

/// Where a fault begins or ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FaultMark {
    Start,
    End,
}

/// One variant: a name and the configuration it runs with.
#[derive(Debug, Clone)]
pub struct Variant {
    pub name: String,
    /// Its settings over the base, for the report.
    pub overrides: Vec<(String, String)>,
    /// Every setting it runs with (base, its own, the quick profile's), as
    /// the environment spells them: what a replica process is started with.
    pub settings: Vec<(String, String)>,
    pub config: Config,
    /// Its traffic, orders per second: its own `rate`, or [traffic]'s.
    pub rate: f64,
}

/// One change at a given time.
#[derive(Debug, Clone)]
pub struct Step {
    pub at: Duration,
    pub fault: Option<FaultMark>,
    pub payment: Option<PaymentUpdate>,
    pub reliability: Option<SwitchesUpdate>,
    pub reset_breaker: bool,
    /// The replica (by index) to kill with SIGKILL.
    pub kill: Option<usize>,
    /// The step as written, for the report.
    pub text: String,
}

#[derive(Debug, Clone)]
pub struct Hypothesis {
    pub claim: String,
    pub text: String,
    pub expr: Expr,
}

/// A validated experiment, with `--quick` applied when asked.
#[derive(Debug, Clone)]
pub struct Experiment {
    pub name: String,
    /// The settings `--quick` applied over every variant's (empty otherwise).
    pub quick_settings: Vec<(String, String)>,
    pub title: String,
    pub claim: String,
    pub seed: u64,
    pub base: Vec<(String, String)>,
    pub variants: Vec<Variant>,
    pub rate: f64,
    pub duration: Duration,
    pub schedule: Vec<Step>,
    pub hypotheses: Vec<Hypothesis>,
    pub quick: bool,
    /// 1: each variant is an in-process service. More: each variant is that
    /// many replica processes sharing one Postgres, the traffic split
    /// evenly between them.
    pub replicas: usize,
}

impl Experiment {
    /// Replicas share their orders through Postgres only.
    pub fn needs_postgres(&self) -> bool {
        self.replicas > 1
    }
}

/// The line (1-based) where `needle` first appears at the start of a line
/// (after spaces) or after `{`/`,`, for errors about keys and values.
fn line_of(source: &str, needle: &str) -> Option<usize> {
    source
        .lines()
        .position(|line| {
            let t = line.trim_start();
            t.starts_with(needle)
                || t.contains(&format!("{{ {needle}"))
                || t.contains(&format!(", {needle}"))
                || t.contains(&format!("{{{needle}"))
        })
        .map(|i| i + 1)
}

fn at_line(source: &str, needle: &str, message: String) -> String {
    match line_of(source, needle) {
        Some(line) => format!("line {line}: {message}"),
        None => message,
    }
}

/// A TOML value as the environment would spell it.
fn as_setting(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn settings(map: &BTreeMap<String, toml::Value>) -> Vec<(String, String)> {
    map.iter()
        .map(|(k, v)| (k.clone(), as_setting(v)))
        .collect()
}

fn scaled(d: Duration, scale: f64) -> Duration {
    Duration::from_secs_f64(d.as_secs_f64() * scale)
}

/// Reads and validates an experiment file.
pub fn load(path: &Path, quick: bool) -> Result<Experiment, String> {
    let source = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    let name = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("experiment")
        .to_owned();
    parse(&name, &source, quick).map_err(|e| format!("{}: {e}", path.display()))
}

/// Validates an experiment's text (`name` is what reports are filed under).
pub fn parse(name: &str, source: &str, quick: bool) -> Result<Experiment, String> {
    // toml's own errors name the line, the column and the key.
    let raw: RawFile = toml::from_str(source).map_err(|e| e.to_string().trim().to_owned())?;
    if raw.variants.is_empty() {
        return Err(at_line(
            source,
            "variants",
            "at least one [[variants]] is needed".into(),
        ));
    }
    let scale = if quick { raw.quick.scale } else { 1.0 };
    if !(scale > 0.0 && scale <= 1.0) {
        return Err(at_line(
            source,
            "scale",
            format!(
                "quick.scale must be above 0 and at most 1, got {}",
                raw.quick.scale
            ),
        ));
    }
    let base = settings(&raw.base);
    let quick_settings = if quick {
        settings(&raw.quick.settings)
    } else {
        Vec::new()
    };
    let mut variants: Vec<Variant> = Vec::new();
    for v in &raw.variants {
        if variants.iter().any(|w| w.name == v.name) {
            return Err(at_line(
                source,
                "name",
                format!("variant {:?} appears twice", v.name),
            ));
        }
        if v.name.is_empty()
            || !v
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(at_line(
                source,
                "name",
                format!("variant name {:?}: use letters, digits, _ and -", v.name),
            ));
        }
        let overrides = settings(&v.settings);
        // Later layers win: base, then the variant, then --quick's.
        let merged: BTreeMap<&str, &str> = base
            .iter()
            .chain(&overrides)
            .chain(&quick_settings)
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let all: Vec<(&str, &str)> = merged.into_iter().collect();
        let settings: Vec<(String, String)> = all
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let config = Config::from_settings(all).map_err(|e| {
            let key = e
                .split_whitespace()
                .find(|w| w.chars().all(|c| c.is_ascii_uppercase() || c == '_') && w.len() > 2)
                .unwrap_or("")
                .trim_matches(|c: char| !c.is_ascii_alphanumeric() && c != '_')
                .to_owned();
            at_line(source, &key, format!("variant {}: {e}", v.name))
        })?;
        let rate = v.rate.unwrap_or(raw.traffic.rate);
        crate::lab::LoadPlan::new(rate, None)
            .map_err(|e| at_line(source, "rate", format!("variant {}: {e}", v.name)))?;
        variants.push(Variant {
            name: v.name.clone(),
            overrides,
            settings,
            config,
            rate,
        });
    }

    let duration = parse_duration(&raw.traffic.duration)
        .map_err(|e| at_line(source, "duration", format!("traffic.duration: {e}")))?;
    let duration = scaled(duration, scale);
    crate::lab::LoadPlan::new(raw.traffic.rate, Some(duration))
        .map_err(|e| at_line(source, "rate", format!("traffic.{}: {e}", e.field)))?;

    if raw.replicas == 0 || raw.replicas > MAX_REPLICAS {
        return Err(at_line(
            source,
            "replicas",
            format!("replicas must be 1 to {MAX_REPLICAS}, got {}", raw.replicas),
        ));
    }
    let replicas = raw.replicas as usize;
    let mut killed = Vec::new();
    let mut schedule = Vec::new();
    for step in &raw.schedule {
        let at = parse_duration(&step.at).map_err(|e| {
            at_line(
                source,
                &format!("at = \"{}\"", step.at),
                format!("schedule.at: {e}"),
            )
        })?;
        let at = scaled(at, scale);
        if at > duration {
            return Err(at_line(
                source,
                &format!("at = \"{}\"", step.at),
                format!("schedule.at {} is after the traffic ends", step.at),
            ));
        }
        let payment = match &step.payment {
            None => None,
            Some(value) => {
                let json = serde_json::to_value(value).map_err(|e| e.to_string())?;
                let update: PaymentUpdate = serde_json::from_value(json)
                    .map_err(|e| at_line(source, "payment", format!("schedule.payment: {e}")))?;
                Some(update)
            }
        };
        let kill = match &step.kill {
            None => None,
            Some(name) => {
                let here =
                    |message: String| at_line(source, &format!("kill = \"{name}\""), message);
                if replicas < 2 {
                    return Err(here(
                        "schedule.kill needs replicas = 2 or more (one must survive)".into(),
                    ));
                }
                let Some(index) = (0..replicas).find(|&i| replica_name(i) == *name) else {
                    return Err(here(format!(
                        "schedule.kill: no replica named {name:?}; with {replicas} replicas they are {}",
                        (0..replicas).map(replica_name).collect::<Vec<_>>().join(", ")
                    )));
                };
                if killed.contains(&index) {
                    return Err(here(format!(
                        "schedule.kill: replica {name} is killed twice"
                    )));
                }
                killed.push(index);
                if killed.len() == replicas {
                    return Err(here("schedule.kill: every replica would be killed; one must survive to take the orders over".into()));
                }
                Some(index)
            }
        };
        if replicas > 1
            && (step.payment.is_some() || step.reliability.is_some() || step.reset_breaker)
        {
            return Err(at_line(
                source,
                &format!("at = \"{}\"", step.at),
                "with replicas, the schedule can only kill them (and mark the fault): set payment and reliability in [base] or the variants".into(),
            ));
        }
        let mut text = vec![];
        if let Some(f) = step.fault {
            text.push(format!(
                "fault {}",
                if f == FaultMark::Start {
                    "starts"
                } else {
                    "ends"
                }
            ));
        }
        if let Some(p) = &step.payment {
            text.push(format!("payment {}", p.to_string().replace('\n', " ")));
        }
        if let Some(r) = &step.reliability {
            text.push(format!("reliability {r:?}"));
        }
        if step.reset_breaker {
            text.push("breaker reset".into());
        }
        if let Some(i) = kill {
            text.push(format!("replica {} killed (SIGKILL)", replica_name(i)));
        }
        schedule.push(Step {
            at,
            fault: step.fault,
            payment,
            reliability: step.reliability,
            reset_breaker: step.reset_breaker,
            kill,
            text: text.join(", "),
        });
    }
    schedule.sort_by_key(|s| s.at);
    let starts = schedule
        .iter()
        .filter(|s| s.fault == Some(FaultMark::Start))
        .count();
    let ends = schedule
        .iter()
        .filter(|s| s.fault == Some(FaultMark::End))
        .count();
    if starts > 1 || ends > 1 || (ends == 1 && starts == 0) {
        return Err(at_line(
            source,
            "fault",
            "at most one fault: one `fault = \"start\"` and at most one `fault = \"end\"` after it"
                .into(),
        ));
    }

    let mut hypotheses = Vec::new();
    for h in &raw.hypotheses {
        let here = |message: String| at_line(source, &format!("expr = \"{}\"", h.expr), message);
        let expr = hypothesis::parse(&h.expr)
            .map_err(|e| here(format!("hypothesis {:?}: {e}", h.expr)))?;
        for (figure, variant) in expr.references() {
            if !FIGURES.contains(&figure) {
                return Err(here(format!(
                    "hypothesis {:?}: no figure named {figure}; the figures are {}",
                    h.expr,
                    FIGURES.join(", ")
                )));
            }
            if !variants.iter().any(|v| v.name == variant) {
                return Err(here(format!(
                    "hypothesis {:?}: no variant named {variant}",
                    h.expr
                )));
            }
        }
        hypotheses.push(Hypothesis {
            claim: h.claim.clone(),
            text: h.expr.clone(),
            expr,
        });
    }

    Ok(Experiment {
        name: name.to_owned(),
        quick_settings,
        title: raw.title,
        claim: raw.claim,
        seed: raw.seed,
        base,
        variants,
        rate: raw.traffic.rate,
        duration,
        schedule,
        hypotheses,
        quick,
        replicas,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
title = "t"
claim = "c"
seed = 3

[base]
PAYMENT_FAILURE_RATE = 0.05
BREAKER_OPEN_DURATION = "10s"

[[variants]]
name = "retry_only"
settings = { BREAKER_ENABLED = false }

[[variants]]
name = "both"

[traffic]
rate = 40
duration = "40s"

[[schedule]]
at = "30s"
fault = "end"
payment = { mode = "normal" }
reliability = { retry_budget_enabled = "on" }

[[schedule]]
at = "10s"
fault = "start"
payment = { mode = "outage" }

[[hypotheses]]
claim = "amplifies"
expr = "amplification[retry_only] > 2 * amplification[both]"

[quick]
scale = 0.25
settings = { BREAKER_OPEN_DURATION = "2s" }
"#;

    #[test]
    fn a_good_file_gives_configs_a_sorted_schedule_and_parsed_hypotheses() {
        let e = parse("outage", GOOD, false).unwrap();
        assert_eq!(e.seed, 3);
        assert_eq!(e.variants.len(), 2);
        assert!(!e.variants[0].config.breaker_enabled);
        assert!(e.variants[1].config.breaker_enabled);
        assert_eq!(e.variants[1].config.payment_failure_rate, 0.05);
        assert_eq!(
            e.variants[1].config.breaker_open_duration,
            Duration::from_secs(10)
        );
        assert_eq!(e.duration, Duration::from_secs(40));
        assert_eq!(e.schedule[0].at, Duration::from_secs(10));
        assert_eq!(e.schedule[0].fault, Some(FaultMark::Start));
        assert_eq!(e.hypotheses.len(), 1);
        assert_eq!(
            e.schedule[1].reliability,
            Some(SwitchesUpdate {
                retry_budget_enabled: Some(true),
                ..SwitchesUpdate::default()
            })
        );
    }

    #[test]
    fn quick_scales_every_duration_and_applies_its_settings() {
        let e = parse("outage", GOOD, true).unwrap();
        assert_eq!(e.duration, Duration::from_secs(10));
        assert_eq!(e.schedule[0].at, Duration::from_millis(2500));
        assert_eq!(e.schedule[1].at, Duration::from_millis(7500));
        assert_eq!(
            e.variants[0].config.breaker_open_duration,
            Duration::from_secs(2)
        );
    }

    const REPLICAS: &str = r#"
title = "t"
claim = "c"
replicas = 2

[base]
JOB_LEASE = "5s"

[[variants]]
name = "two"

[traffic]
rate = 40
duration = "30s"

[[schedule]]
at = "10s"
fault = "start"
kill = "a"
"#;

    #[test]
    fn replicas_and_a_kill_are_read_and_every_variant_keeps_its_settings_for_the_processes() {
        let e = parse("crash", REPLICAS, false).unwrap();
        assert_eq!(e.replicas, 2);
        assert!(e.needs_postgres());
        assert_eq!(e.schedule[0].kill, Some(0));
        assert!(
            e.schedule[0].text.contains("replica a killed"),
            "{}",
            e.schedule[0].text
        );
        assert_eq!(
            e.variants[0].settings,
            vec![("JOB_LEASE".to_owned(), "5s".to_owned())]
        );
        // Without replicas nothing needs Postgres.
        let one = parse(
            "x",
            &REPLICAS
                .replace("replicas = 2", "replicas = 1")
                .replace("kill = \"a\"\n", ""),
            false,
        )
        .unwrap();
        assert!(!one.needs_postgres());
    }

    #[test]
    fn a_kill_that_cannot_happen_is_refused_naming_the_line() {
        for (from, to, hint) in [
            (
                "replicas = 2",
                "replicas = 1",
                "line 19: schedule.kill needs replicas = 2",
            ),
            (
                "replicas = 2",
                "replicas = 9",
                "line 4: replicas must be 1 to 4, got 9",
            ),
            ("replicas = 2", "replicas = 0", "replicas must be 1 to 4"),
            (
                "kill = \"a\"",
                "kill = \"c\"",
                "no replica named \"c\"; with 2 replicas they are a, b",
            ),
            (
                "kill = \"a\"",
                "kill = \"a\"\n\n[[schedule]]\nat = \"12s\"\nkill = \"b\"",
                "every replica would be killed",
            ),
            (
                "kill = \"a\"",
                "kill = \"a\"\n\n[[schedule]]\nat = \"12s\"\nkill = \"a\"",
                "replica a is killed twice",
            ),
            (
                "kill = \"a\"",
                "payment = { mode = \"outage\" }",
                "with replicas, the schedule can only kill them",
            ),
        ] {
            let text = REPLICAS.replace(from, to);
            let err = parse("x", &text, false).unwrap_err();
            assert!(err.contains(hint), "{to}: {err}");
        }
    }

    #[test]
    fn a_variant_may_run_at_its_own_rate() {
        let file = GOOD.replace("name = \"both\"\n", "name = \"both\"\nrate = 250\n");
        let e = parse("outage", &file, false).unwrap();
        assert_eq!((e.variants[0].rate, e.variants[1].rate), (40.0, 250.0));
        let bad = GOOD.replace("name = \"both\"\n", "name = \"both\"\nrate = 0\n");
        let err = parse("outage", &bad, false).unwrap_err();
        assert!(
            err.contains("line 16") && err.contains("variant both: rate must be"),
            "{err}"
        );
    }

    #[test]
    fn errors_name_the_line_and_the_key() {
        for (from, to, hint) in [
            (
                "PAYMENT_FAILURE_RATE = 0.05",
                "PAYMENT_FAILURE_RATE = 5",
                "line 7",
            ),
            ("PAYMENT_FAILURE_RATE = 0.05", "NO_SUCH_KNOB = 1", "line 7"),
            (
                "settings = { BREAKER_ENABLED = false }",
                "settings = { BREAKER_ENABLED = \"perhaps\" }",
                "line 12",
            ),
            ("duration = \"40s\"", "duration = \"forty\"", "line 19"),
            ("at = \"10s\"", "at = \"50s\"", "after the traffic ends"),
            (
                "expr = \"amplification[retry_only] > 2 * amplification[both]\"",
                "expr = \"amplification[nobody] > 1\"",
                "no variant named nobody",
            ),
            (
                "expr = \"amplification[retry_only] > 2 * amplification[both]\"",
                "expr = \"happiness[both] > 1\"",
                "no figure named happiness",
            ),
            ("seed = 3", "seed = 3\ncolour = \"red\"", "colour"),
            (
                "payment = { mode = \"outage\" }",
                "payment = { mode = \"sideways\" }",
                "schedule.payment",
            ),
        ] {
            let text = GOOD.replace(from, to);
            let err = parse("x", &text, false).unwrap_err();
            assert!(err.contains(hint), "{to}: {err}");
        }
        let err = parse(
            "x",
            &GOOD.replace("PAYMENT_FAILURE_RATE = 0.05", "NO_SUCH_KNOB = 1"),
            false,
        )
        .unwrap_err();
        assert!(err.contains("NO_SUCH_KNOB"), "{err}");
        let err = parse(
            "x",
            &GOOD.replace("PAYMENT_FAILURE_RATE = 0.05", "PAYMENT_FAILURE_RATE = 5"),
            false,
        )
        .unwrap_err();
        assert!(err.contains("PAYMENT_FAILURE_RATE"), "{err}");
    }
}
