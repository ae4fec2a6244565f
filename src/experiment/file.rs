//! The experiment file (TOML, in `experiments/`) and its validation.
//!
//! ```toml
//! title = "An outage under steady traffic"
//! claim = "Retry without a breaker fails slowly and multiplies calls"
//! seed = 7
//! # provider = "process"       # the provider as processes of its own
//! # tiers = 2                  # (`providers`), two of them chained
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
//! A file may also sweep one or two parameters (`[[sweep]]`, see `sweep`):
//! every variant then runs in every cell, hypotheses name cells
//! (`success_ratio[both, rate=500]`), and the report draws `[[charts]]`
//! (a figure against the one parameter) or `[[maps]]` (a figure over two).
//!
//! Every problem is reported with the file's line and the key at fault,
//! and every cell's settings and schedule are checked when the file is
//! loaded, before anything runs.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use super::figures::FIGURES;
use super::hypothesis::{self, Expr};
use super::sweep::{self, Param, ParamKind};
use crate::config::Config;
use crate::payment::PaymentUpdate;
use crate::provider::faults::FaultUpdate;
use crate::provider::ProviderConfig;
use crate::reliability::SwitchesUpdate;
use crate::units::parse_duration;

/// The largest experiment file read, in bytes.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

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
    #[serde(default)]
    sweep: Vec<sweep::RawParam>,
    #[serde(default)]
    charts: Vec<RawChart>,
    #[serde(default)]
    maps: Vec<RawMap>,
    #[serde(default)]
    provider: ProviderKind,
    #[serde(default = "default_tiers")]
    tiers: u32,
}

/// Where an experiment's payment provider runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    /// The service's own simulator, a function call away.
    #[default]
    InProcess,
    /// `reliability-lab provider` processes on free loopback ports (a chain
    /// of `tiers`), charged over HTTP through the service's client.
    Process,
}

fn default_tiers() -> u32 {
    1
}

/// The most providers an experiment chains.
pub const MAX_TIERS: u32 = 3;

/// Settings the runner chooses for each service it starts; an experiment
/// file cannot set them.
const RUNNER_CHOSEN: [&str; 5] = [
    "DATABASE_URL",
    "PAYMENT_LEDGER_URL",
    "PAYMENT_URL",
    "UPSTREAM_URL",
    "LISTEN_ADDR",
];

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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    at: String,
    #[serde(default)]
    fault: Option<FaultMark>,
    #[serde(default)]
    payment: Option<toml::Value>,
    #[serde(default)]
    reliability: Option<toml::Value>,
    #[serde(default)]
    reset_breaker: bool,
    #[serde(default)]
    kill: Option<String>,
    #[serde(default)]
    cut: Option<String>,
    #[serde(default)]
    heal: Option<String>,
    #[serde(default)]
    faults: Option<toml::Value>,
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
    /// Values that replace a swept parameter's in the quick profile.
    #[serde(default)]
    sweep: BTreeMap<String, Vec<toml::Value>>,
}

impl Default for RawQuick {
    fn default() -> Self {
        Self {
            scale: default_scale(),
            settings: BTreeMap::new(),
            sweep: BTreeMap::new(),
        }
    }
}

fn default_scale() -> f64 {
    0.25
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawChart {
    figure: String,
    #[serde(default)]
    title: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMap {
    figure: String,
    #[serde(default)]
    title: Option<String>,
    #[serde(default)]
    verdict: Option<String>,
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
    /// With provider processes: the settings each of them is started with
    /// (every setting the provider knows, as the environment spells it).
    pub provider_settings: Vec<(String, String)>,
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
    /// The replica (by index) whose connections to Postgres are cut (a
    /// partition: it runs on, and still reaches the provider's ledger).
    pub cut: Option<usize>,
    /// The replica (by index) whose connections are restored.
    pub heal: Option<usize>,
    /// With provider processes: the payment change as the provider's
    /// `PUT /admin/payment` takes it (sent to the bottom of the chain).
    pub payment_json: Option<serde_json::Value>,
    /// With provider processes: a change of the network faults, as
    /// `PUT /admin/faults` takes it (sent to the provider the service calls).
    pub faults: Option<serde_json::Value>,
    /// The step as written, for the report.
    pub text: String,
    /// Its `at` as written, to name its line in an error.
    at_text: String,
}

#[derive(Debug, Clone)]
pub struct Hypothesis {
    pub claim: String,
    pub text: String,
    pub expr: Expr,
}

/// Which clock a run keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Clock {
    /// tokio's paused clock: each variant's whole service runs on one
    /// thread, in memory, and time moves only when every task waits. The
    /// same file and seed give the same figures every time, and a run costs
    /// CPU, not its duration.
    Virtual,
    /// The wall clock, over real sockets: what replicas and Postgres need.
    Real,
}

/// One cell of a sweep (the only one, without a sweep): a value of each
/// swept parameter, and the variants and schedule it runs with.
#[derive(Debug, Clone)]
pub struct Cell {
    /// The index of each parameter's value, in `Experiment::sweep` order.
    pub at: Vec<usize>,
    pub variants: Vec<Variant>,
    pub schedule: Vec<Step>,
}

/// A figure drawn against the first swept parameter.
#[derive(Debug, Clone)]
pub struct ChartSpec {
    pub figure: String,
    pub title: String,
}

/// A figure drawn over two swept parameters, one map per variant.
#[derive(Debug, Clone)]
pub struct MapSpec {
    pub figure: String,
    pub title: String,
    /// Colours each cell by whether it holds (bare figure names).
    pub verdict: Option<(String, Expr)>,
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
    /// The variants as the file gives them (the first cell's, in a sweep).
    pub variants: Vec<Variant>,
    pub rate: f64,
    pub duration: Duration,
    /// The schedule (the first cell's, in a sweep).
    pub schedule: Vec<Step>,
    pub hypotheses: Vec<Hypothesis>,
    pub quick: bool,
    /// 1: each variant is an in-process service. More: each variant is that
    /// many replica processes sharing one Postgres, the traffic split
    /// evenly between them.
    pub replicas: usize,
    /// The swept parameters (none: no sweep).
    pub sweep: Vec<Param>,
    /// Every cell, in run order; one without a sweep.
    pub cells: Vec<Cell>,
    pub charts: Vec<ChartSpec>,
    pub maps: Vec<MapSpec>,
    /// The clock its runs keep: virtual unless it needs replicas or
    /// provider processes.
    pub clock: Clock,
    /// Where the payment provider runs.
    pub provider: ProviderKind,
    /// With provider processes: how many are chained (1: the service
    /// calls the one that charges).
    pub tiers: usize,
}

impl Experiment {
    /// Replicas share their orders through Postgres only.
    pub fn needs_postgres(&self) -> bool {
        self.replicas > 1
    }

    /// Provider processes keep the real clock: their sockets and their
    /// own timers run on it.
    pub fn needs_processes(&self) -> bool {
        self.needs_postgres() || self.provider == ProviderKind::Process
    }

    pub fn is_sweep(&self) -> bool {
        !self.sweep.is_empty()
    }

    /// A cell's parameters and values, as hypotheses name them.
    pub fn cell_coords(&self, cell: usize) -> Vec<(String, String)> {
        self.sweep
            .iter()
            .zip(&self.cells[cell].at)
            .map(|(p, &i)| (p.name.clone(), p.values[i].text.clone()))
            .collect()
    }

    /// A cell as reports and progress lines name it: `rate=500, spike=1s`
    /// (empty without a sweep).
    pub fn cell_label(&self, cell: usize) -> String {
        self.cell_coords(cell)
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The cell whose coordinates are `at` (every parameter named).
    pub fn find_cell(&self, at: &[(String, String)]) -> Option<usize> {
        let wanted: Option<Vec<usize>> = self
            .sweep
            .iter()
            .map(|p| {
                at.iter()
                    .find(|(k, _)| *k == p.name)
                    .and_then(|(_, v)| p.find(v))
            })
            .collect();
        let wanted = wanted?;
        self.cells.iter().position(|c| c.at == wanted)
    }

    /// This experiment run on `clock`; refused where that clock cannot run
    /// it.
    pub fn with_clock(mut self, clock: Clock, database: bool) -> Result<Self, String> {
        if clock == Clock::Virtual && (self.needs_processes() || database) {
            return Err(format!(
                "{}: --clock virtual runs in memory; {} need the real clock",
                self.name,
                if self.needs_postgres() {
                    "replicas (processes sharing Postgres)"
                } else if self.provider == ProviderKind::Process {
                    "provider processes (charged over real sockets)"
                } else {
                    "experiments on Postgres (its pool times out by the wall clock)"
                }
            ));
        }
        self.clock = clock;
        Ok(self)
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

/// A hypothesis's text for an error: quoted, and cut to its first 60
/// characters when longer than 80 (a hostile one can be megabytes).
fn shown(text: &str) -> String {
    if text.chars().count() <= 80 {
        return format!("{text:?}");
    }
    let head: String = text.chars().take(60).collect();
    format!("{head:?}… ({} characters)", text.chars().count())
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

/// Reads and validates an experiment file (at most `MAX_FILE_BYTES`).
pub fn load(path: &Path, quick: bool) -> Result<Experiment, String> {
    let file =
        std::fs::File::open(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(format!(
            "{}: an experiment file is at most {} KiB",
            path.display(),
            MAX_FILE_BYTES / 1024
        ));
    }
    let source = String::from_utf8(bytes)
        .map_err(|_| format!("{}: cannot read: not UTF-8 text", path.display()))?;
    let name = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("experiment")
        .to_owned();
    parse(&name, &source, quick).map_err(|e| format!("{}: {e}", path.display()))
}

/// Where a cell's variants and schedule are read: the file's text (for
/// errors), the cell's swept values and label, and where the provider runs.
#[derive(Clone, Copy)]
struct InCell<'a> {
    source: &'a str,
    swept: &'a [(&'a Param, &'a sweep::Value)],
    cell: &'a str,
    provider: ProviderKind,
}

/// The settings a variant runs with in one cell: base, its own, the quick
/// profile's, then the cell's swept settings.
fn variant_in_cell(
    at: InCell<'_>,
    raw: &RawVariant,
    base: &[(String, String)],
    quick_settings: &[(String, String)],
    default_rate: f64,
) -> Result<Variant, String> {
    let InCell {
        source,
        swept,
        cell,
        provider,
    } = at;
    let overrides = settings(&raw.settings);
    let swept_settings: Vec<(String, String)> = swept
        .iter()
        .filter(|(p, _)| p.kind == ParamKind::Setting)
        .map(|(p, v)| (p.name.clone(), v.text.clone()))
        .collect();
    // Later layers win.
    let merged: BTreeMap<&str, &str> = base
        .iter()
        .chain(&overrides)
        .chain(quick_settings)
        .chain(&swept_settings)
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let all: Vec<(&str, &str)> = merged.into_iter().collect();
    let settings: Vec<(String, String)> = all
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let in_cell = |message: String| {
        if cell.is_empty() {
            format!("variant {}: {message}", raw.name)
        } else {
            format!("variant {} in cell {cell}: {message}", raw.name)
        }
    };
    let at_key = |e: String| {
        let key = e
            .split_whitespace()
            .find(|w| w.chars().all(|c| c.is_ascii_uppercase() || c == '_') && w.len() > 2)
            .unwrap_or("")
            .trim_matches(|c: char| !c.is_ascii_alphanumeric() && c != '_')
            .to_owned();
        at_line(source, &key, in_cell(e))
    };
    // With provider processes each setting goes where it is known: the
    // service, the providers, or both (PAYMENT_IDEMPOTENCY, ADMIN_TOKEN).
    let knows_service = crate::config::knows_setting::<Config>;
    let knows_provider = crate::config::knows_setting::<ProviderConfig>;
    let mut service_side = Vec::new();
    let mut provider_side = Vec::new();
    for (k, v) in all {
        match (knows_service(k), knows_provider(k)) {
            (false, true) if provider == ProviderKind::InProcess => {
                return Err(at_key(format!(
                    "{k} is a setting of the provider process: it needs provider = \"process\""
                )))
            }
            (false, false) => return Err(at_key(format!("unknown setting {k}"))),
            (in_service, in_provider) => {
                if in_service {
                    service_side.push((k, v));
                }
                if in_provider && provider == ProviderKind::Process {
                    provider_side.push((k, v));
                }
            }
        }
    }
    let config = Config::from_settings(service_side).map_err(at_key)?;
    if provider == ProviderKind::Process {
        ProviderConfig::from_settings(provider_side.iter().copied())
            .map_err(|e| at_key(format!("the provider: {e}")))?;
    }
    let provider_settings = provider_side
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let rate = swept
        .iter()
        .find(|(p, _)| p.kind == ParamKind::Rate)
        .map_or(raw.rate.unwrap_or(default_rate), |(_, v)| v.number);
    crate::lab::LoadPlan::new(rate, None)
        .map_err(|e| at_line(source, "rate", in_cell(e.to_string())))?;
    Ok(Variant {
        name: raw.name.clone(),
        overrides,
        settings,
        config,
        rate,
        provider_settings,
    })
}

/// A step's value with the cell's parameters in place, as JSON for the
/// API's own types.
fn step_value(
    value: &toml::Value,
    swept: &[(&Param, &sweep::Value)],
) -> Result<serde_json::Value, String> {
    serde_json::to_value(sweep::substitute(value, swept)).map_err(|e| e.to_string())
}

/// The schedule of one cell, sorted, with its fault marks checked.
fn schedule_in_cell(
    at: InCell<'_>,
    raw: &[RawStep],
    scale: f64,
    duration: Duration,
    replicas: usize,
) -> Result<Vec<Step>, String> {
    let InCell {
        source,
        swept,
        cell,
        provider,
    } = at;
    let in_cell = |message: String| {
        if cell.is_empty() {
            message
        } else {
            format!("in cell {cell}: {message}")
        }
    };
    let mut killed = Vec::new();
    let mut schedule = Vec::new();
    for step in raw {
        let at_text = sweep::substitute_text(&step.at, swept);
        let here =
            |message: String| at_line(source, &format!("at = \"{}\"", step.at), in_cell(message));
        let at =
            parse_duration(&at_text).map_err(|e| here(format!("schedule.at {at_text:?}: {e}")))?;
        let at = scaled(at, scale);
        if at > duration {
            return Err(here(format!(
                "schedule.at {} is after the traffic ends",
                at_text
            )));
        }
        let mut payment_json = None;
        let payment = match &step.payment {
            None => None,
            Some(value) => {
                let json = step_value(value, swept)?;
                let update: PaymentUpdate = serde_json::from_value(json.clone()).map_err(|e| {
                    at_line(source, "payment", in_cell(format!("schedule.payment: {e}")))
                })?;
                if provider == ProviderKind::Process {
                    payment_json = Some(json);
                }
                Some(update)
            }
        };
        let faults = match &step.faults {
            None => None,
            Some(value) => {
                let here = |m: String| at_line(source, "faults", in_cell(m));
                if provider != ProviderKind::Process {
                    return Err(here(
                        "schedule.faults are the provider process's: they need provider = \"process\"".into(),
                    ));
                }
                let json = step_value(value, swept)?;
                let update: FaultUpdate = serde_json::from_value(json.clone())
                    .map_err(|e| here(format!("schedule.faults: {e}")))?;
                ProviderConfig::defaults()
                    .faults()
                    .apply(&update)
                    .map_err(|e| here(format!("schedule.faults {}: {}", e.field, e.reason)))?;
                Some(json)
            }
        };
        let reliability = match &step.reliability {
            None => None,
            Some(value) => {
                let json = step_value(value, swept)?;
                let update: SwitchesUpdate = serde_json::from_value(json).map_err(|e| {
                    at_line(
                        source,
                        "reliability",
                        in_cell(format!("schedule.reliability: {e}")),
                    )
                })?;
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
        let replica_named = |key: &str, name: &String| {
            let here = |message: String| at_line(source, &format!("{key} = \"{name}\""), message);
            if replicas < 2 {
                return Err(here(format!(
                    "schedule.{key} needs replicas = 2 or more (one must take the orders over)"
                )));
            }
            (0..replicas)
                .find(|&i| replica_name(i) == *name)
                .ok_or_else(|| {
                    here(format!(
                        "schedule.{key}: no replica named {name:?}; with {replicas} replicas they are {}",
                        (0..replicas).map(replica_name).collect::<Vec<_>>().join(", ")
                    ))
                })
        };
        let cut = step
            .cut
            .as_ref()
            .map(|n| replica_named("cut", n))
            .transpose()?;
        let heal = step
            .heal
            .as_ref()
            .map(|n| replica_named("heal", n))
            .transpose()?;
        if replicas > 1 && (payment.is_some() || reliability.is_some() || step.reset_breaker) {
            return Err(here(
                "with replicas, the schedule can only kill them, cut them off and heal them (and mark the fault): set payment and reliability in [base] or the variants".into(),
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
            text.push(format!(
                "payment {}",
                sweep::substitute(p, swept).to_string().replace('\n', " ")
            ));
        }
        if let Some(f) = &step.faults {
            text.push(format!(
                "faults {}",
                sweep::substitute(f, swept).to_string().replace('\n', " ")
            ));
        }
        if let Some(r) = &reliability {
            text.push(format!("reliability {r:?}"));
        }
        if step.reset_breaker {
            text.push("breaker reset".into());
        }
        if let Some(i) = kill {
            text.push(format!("replica {} killed (SIGKILL)", replica_name(i)));
        }
        if let Some(i) = cut {
            text.push(format!("replica {} cut off from Postgres", replica_name(i)));
        }
        if let Some(i) = heal {
            text.push(format!("replica {} reconnected", replica_name(i)));
        }
        schedule.push(Step {
            at,
            fault: step.fault,
            payment,
            reliability,
            reset_breaker: step.reset_breaker,
            kill,
            cut,
            heal,
            payment_json,
            faults,
            text: text.join(", "),
            at_text: step.at.clone(),
        });
    }
    schedule.sort_by_key(|s| s.at);
    // Cuts and heals, in time order: a replica is cut at most once, healed
    // only once cut, and one replica is never cut, to take the orders over.
    let mut cut_now: Vec<usize> = Vec::new();
    let mut ever_cut: Vec<usize> = Vec::new();
    for step in &schedule {
        let here =
            |message: String| at_line(source, &format!("at = \"{}\"", step.at_text), message);
        if let Some(i) = step.heal {
            if !cut_now.contains(&i) {
                return Err(here(format!(
                    "schedule.heal: replica {} is not cut off then",
                    replica_name(i)
                )));
            }
            cut_now.retain(|&c| c != i);
        }
        if let Some(i) = step.cut {
            if ever_cut.contains(&i) {
                return Err(here(format!(
                    "schedule.cut: replica {} is cut off twice",
                    replica_name(i)
                )));
            }
            cut_now.push(i);
            ever_cut.push(i);
            if ever_cut.len() == replicas {
                return Err(here(
                    "schedule.cut: every replica would be cut off; one must keep its database to take the orders over".into(),
                ));
            }
        }
    }
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
    if let (Some(start), Some(end)) = (
        schedule.iter().find(|s| s.fault == Some(FaultMark::Start)),
        schedule.iter().find(|s| s.fault == Some(FaultMark::End)),
    ) {
        if end.at < start.at {
            return Err(at_line(
                source,
                "fault",
                in_cell("the fault ends before it starts".into()),
            ));
        }
    }
    Ok(schedule)
}

/// Applies the schedule's payment changes, in order, to the variant's
/// settings, as the run will: a value out of range, or a change that does
/// not fit the settings before it (a minimum latency above the maximum),
/// is refused now, with its step's line, not when its step fires.
fn check_payment_steps(
    source: &str,
    schedule: &[Step],
    variant: &Variant,
    cell: &str,
) -> Result<(), String> {
    let now = tokio::time::Instant::now();
    let mut settings = variant.config.payment_settings();
    for step in schedule {
        let Some(update) = &step.payment else {
            continue;
        };
        settings = settings.apply(update.clone(), now).map_err(|e| {
            let mut message = format!(
                "schedule.payment {}: {}, for variant {}",
                e.field, e.reason, variant.name
            );
            if !cell.is_empty() {
                message = format!("in cell {cell}: {message}");
            }
            at_line(source, &format!("at = \"{}\"", step.at_text), message)
        })?;
    }
    Ok(())
}

/// Every string in a step that the sweep fills in.
fn step_texts(step: &RawStep) -> Vec<String> {
    fn strings(v: &toml::Value, out: &mut Vec<String>) {
        match v {
            toml::Value::String(s) => out.push(s.clone()),
            toml::Value::Array(items) => items.iter().for_each(|i| strings(i, out)),
            toml::Value::Table(t) => t.values().for_each(|i| strings(i, out)),
            _ => {}
        }
    }
    let mut out = vec![step.at.clone()];
    for v in [&step.payment, &step.reliability, &step.faults]
        .into_iter()
        .flatten()
    {
        strings(v, &mut out);
    }
    out
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
    for (key, _) in base.iter().chain(&quick_settings) {
        if RUNNER_CHOSEN.contains(&key.as_str()) {
            return Err(at_line(
                source,
                key,
                format!(
                    "{key} cannot be set in an experiment: the runner chooses it (give --database-url for Postgres)"
                ),
            ));
        }
    }
    for (i, v) in raw.variants.iter().enumerate() {
        if raw.variants[..i].iter().any(|w| w.name == v.name) {
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
        for key in v.settings.keys() {
            if RUNNER_CHOSEN.contains(&key.as_str()) {
                return Err(at_line(
                    source,
                    key,
                    format!(
                        "variant {}: {key} cannot be set in an experiment: the runner chooses it",
                        v.name
                    ),
                ));
            }
        }
    }

    let params = if quick {
        sweep::params(&raw.sweep, &raw.quick.sweep)
    } else {
        sweep::params(&raw.sweep, &BTreeMap::new())
    }
    .map_err(|e| at_line(source, "[[sweep]]", e))?;
    for p in &params {
        let here = |m: String| at_line(source, &format!("name = \"{}\"", p.name), m);
        match p.kind {
            ParamKind::Rate => {
                if let Some(v) = raw.variants.iter().find(|v| v.rate.is_some()) {
                    return Err(here(format!(
                        "sweep rate: variant {} has a rate of its own, and the sweep sets every variant's",
                        v.name
                    )));
                }
            }
            ParamKind::Setting => {
                if let Some(v) = raw
                    .variants
                    .iter()
                    .find(|v| v.settings.contains_key(&p.name))
                {
                    return Err(here(format!(
                        "sweep {}: variant {} sets it too, and the sweep sets every variant's",
                        p.name, v.name
                    )));
                }
            }
            ParamKind::Schedule => {
                let read = raw.schedule.iter().any(|step| {
                    step_texts(step)
                        .iter()
                        .any(|t| sweep::substitute_text(t, &[(p, &p.values[0])]) != *t)
                });
                if !read {
                    return Err(here(format!(
                        "sweep {}: the schedule never reads ${}",
                        p.name, p.name
                    )));
                }
            }
        }
    }
    for step in &raw.schedule {
        for text in step_texts(step) {
            if let Some(unknown) = sweep::unknown_references(&text, &params).first() {
                return Err(at_line(
                    source,
                    &format!("at = \"{}\"", step.at),
                    format!(
                        "the schedule reads {unknown}, which no [[sweep]] defines as a parameter"
                    ),
                ));
            }
        }
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
    if raw.tiers == 0 || raw.tiers > MAX_TIERS {
        return Err(at_line(
            source,
            "tiers",
            format!("tiers must be 1 to {MAX_TIERS}, got {}", raw.tiers),
        ));
    }
    if raw.tiers > 1 && raw.provider != ProviderKind::Process {
        return Err(at_line(
            source,
            "tiers",
            "tiers chain provider processes: they need provider = \"process\"".into(),
        ));
    }
    if replicas > 1 && raw.provider == ProviderKind::Process {
        return Err(at_line(
            source,
            "provider",
            "provider = \"process\" runs with one service; replicas share the provider's ledger in Postgres instead".into(),
        ));
    }
    if replicas > 1 && !params.is_empty() {
        return Err(at_line(
            source,
            "[[sweep]]",
            "a sweep runs in memory; replicas cannot be swept".into(),
        ));
    }

    let grid = sweep::cells(&params);
    let runs = grid.len() * raw.variants.len();
    if runs > sweep::MAX_RUNS {
        return Err(at_line(
            source,
            "[[sweep]]",
            format!(
                "{} cells times {} variants is {runs} runs; at most {} are run",
                grid.len(),
                raw.variants.len(),
                sweep::MAX_RUNS
            ),
        ));
    }
    let mut cells = Vec::with_capacity(grid.len());
    for at in grid {
        let swept: Vec<(&Param, &sweep::Value)> = params
            .iter()
            .zip(&at)
            .map(|(p, &i)| (p, &p.values[i]))
            .collect();
        let label = swept
            .iter()
            .map(|(p, v)| format!("{}={}", p.name, v.text))
            .collect::<Vec<_>>()
            .join(", ");
        let here = InCell {
            source,
            swept: &swept,
            cell: &label,
            provider: raw.provider,
        };
        let variants = raw
            .variants
            .iter()
            .map(|v| variant_in_cell(here, v, &base, &quick_settings, raw.traffic.rate))
            .collect::<Result<Vec<_>, _>>()?;
        let schedule = schedule_in_cell(here, &raw.schedule, scale, duration, replicas)?;
        for variant in &variants {
            check_payment_steps(source, &schedule, variant, &label)?;
        }
        cells.push(Cell {
            at,
            variants,
            schedule,
        });
    }

    let check_figure = |figure: &str, here: &dyn Fn(String) -> String| {
        if FIGURES.contains(&figure) {
            Ok(())
        } else {
            Err(here(format!(
                "no figure named {figure}; the figures are {}",
                FIGURES.join(", ")
            )))
        }
    };
    let mut hypotheses = Vec::new();
    for h in &raw.hypotheses {
        let here = |message: String| at_line(source, &format!("expr = \"{}\"", h.expr), message);
        let expr = hypothesis::parse(&h.expr)
            .map_err(|e| here(format!("hypothesis {}: {e}", shown(&h.expr))))?;
        for r in expr.references() {
            check_figure(&r.figure, &|m| {
                here(format!("hypothesis {}: {m}", shown(&h.expr)))
            })?;
            if !raw.variants.iter().any(|v| v.name == r.variant) {
                return Err(here(format!(
                    "hypothesis {:?}: no variant named {}",
                    h.expr, r.variant
                )));
            }
        }
        expr.check_cells(&params)
            .map_err(|e| here(format!("hypothesis {}: {e}", shown(&h.expr))))?;
        hypotheses.push(Hypothesis {
            claim: h.claim.clone(),
            text: h.expr.clone(),
            expr,
        });
    }

    let mut charts = Vec::new();
    for c in &raw.charts {
        let here = |m: String| at_line(source, &format!("figure = \"{}\"", c.figure), m);
        check_figure(&c.figure, &here)?;
        if params.is_empty() {
            return Err(here(
                "[[charts]] draw a figure against a swept parameter, and nothing is swept".into(),
            ));
        }
        charts.push(ChartSpec {
            title: c
                .title
                .clone()
                .unwrap_or_else(|| format!("{} against {}", c.figure, params[0].name)),
            figure: c.figure.clone(),
        });
    }
    if charts.is_empty() && params.len() == 1 {
        for (figure, title) in [
            ("success_ratio", "Completed share"),
            ("amplification", "Payment calls per finished order"),
        ] {
            charts.push(ChartSpec {
                figure: figure.into(),
                title: format!("{title} against {}", params[0].name),
            });
        }
    }
    let mut maps = Vec::new();
    for m in &raw.maps {
        let here = |msg: String| at_line(source, &format!("figure = \"{}\"", m.figure), msg);
        check_figure(&m.figure, &here)?;
        if params.len() != 2 {
            return Err(here(
                "[[maps]] draw a figure over two swept parameters".into(),
            ));
        }
        let verdict = match &m.verdict {
            None => None,
            Some(text) => {
                let here = |msg: String| at_line(source, &format!("verdict = \"{text}\""), msg);
                let expr = hypothesis::parse_verdict(text)
                    .map_err(|e| here(format!("verdict {text:?}: {e}")))?;
                for r in expr.references() {
                    if !r.variant.is_empty() || !r.at.is_empty() {
                        return Err(here(format!(
                            "verdict {text:?}: a map's verdict is about its own cell: write {} alone",
                            r.figure
                        )));
                    }
                    check_figure(&r.figure, &here)?;
                }
                Some((text.clone(), expr))
            }
        };
        maps.push(MapSpec {
            title: m.title.clone().unwrap_or_else(|| {
                format!(
                    "{} over {} and {}",
                    m.figure, params[0].name, params[1].name
                )
            }),
            figure: m.figure.clone(),
            verdict,
        });
    }
    if maps.is_empty() && params.len() == 2 {
        maps.push(MapSpec {
            figure: "success_ratio".into(),
            title: format!(
                "Completed share over {} and {}",
                params[0].name, params[1].name
            ),
            verdict: None,
        });
    }

    let first = &cells[0];
    Ok(Experiment {
        name: name.to_owned(),
        quick_settings,
        title: raw.title,
        claim: raw.claim,
        seed: raw.seed,
        base,
        variants: first.variants.clone(),
        rate: raw.traffic.rate,
        duration,
        schedule: first.schedule.clone(),
        hypotheses,
        quick,
        replicas,
        clock: if replicas > 1 || raw.provider == ProviderKind::Process {
            Clock::Real
        } else {
            Clock::Virtual
        },
        provider: raw.provider,
        tiers: raw.tiers as usize,
        sweep: params,
        cells,
        charts,
        maps,
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
        assert_eq!(e.variants[1].config.simulator.payment_failure_rate, 0.05);
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

    const SWEEP: &str = r#"
title = "t"
claim = "c"

[[variants]]
name = "a"

[[variants]]
name = "b"
settings = { BREAKER_ENABLED = false }

[traffic]
rate = 10
duration = "20s"

[[sweep]]
name = "rate"
values = [10, 100]

[[sweep]]
name = "spike"
values = ["100ms", "300ms"]

[[schedule]]
at = "5s"
fault = "start"
payment = { latency_min = "$spike", latency_max = "$spike" }

[[schedule]]
at = "8s"
fault = "end"
payment = { latency_min = "1ms", latency_max = "2ms" }

[[hypotheses]]
claim = "h"
expr = "count(success_ratio[b] < 0.5) < count(success_ratio[a] < 0.5)"

[quick]
sweep = { rate = [10] }
"#;

    #[test]
    fn a_sweep_resolves_every_cell_and_the_quick_profile_can_shrink_it() {
        let e = parse("s", SWEEP, false).unwrap();
        assert_eq!(e.cells.len(), 4);
        assert_eq!(e.cell_label(3), "rate=100, spike=300ms");
        let cell = &e.cells[3];
        assert_eq!(cell.variants[1].rate, 100.0);
        assert!(!cell.variants[1].config.breaker_enabled);
        let spike = cell.schedule[0].payment.as_ref().unwrap();
        assert_eq!(spike.latency_min, Some(Duration::from_millis(300)));
        assert!(
            cell.schedule[0].text.contains("300ms"),
            "{}",
            cell.schedule[0].text
        );
        assert_eq!(e.maps.len(), 1, "two parameters draw a map by default");
        assert_eq!(
            e.find_cell(&[
                ("spike".into(), "300ms".into()),
                ("rate".into(), "100".into())
            ]),
            Some(3)
        );
        let quick = parse("s", SWEEP, true).unwrap();
        assert_eq!(quick.cells.len(), 2);
    }

    #[test]
    fn a_sweep_that_cannot_run_is_refused_naming_what_is_wrong() {
        for (from, to, hint) in [
            (
                "name = \"b\"\n",
                "name = \"b\"\nrate = 5\n",
                "variant b has a rate of its own",
            ),
            (
                "name = \"spike\"",
                "name = \"BREAKER_ENABLED\"",
                "variant b sets it too",
            ),
            (
                "latency_min = \"$spike\", latency_max = \"$spike\"",
                "latency_min = \"$spike\", latency_max = \"$spik\"",
                "reads $spik, which no [[sweep]] defines",
            ),
            (
                "latency_min = \"$spike\", latency_max = \"$spike\"",
                "latency_min = \"1ms\", latency_max = \"2ms\"",
                "the schedule never reads $spike",
            ),
            (
                "values = [\"100ms\", \"300ms\"]",
                "values = [\"100ms\", \"hello\"]",
                "in cell rate=10, spike=hello: schedule.payment",
            ),
            (
                "values = [10, 100]",
                "values = [10, 100000]",
                "rate must be",
            ),
            (
                "title = \"t\"",
                "title = \"t\"\nreplicas = 2",
                "replicas cannot be swept",
            ),
            (
                "count(success_ratio[b] < 0.5) < count(success_ratio[a] < 0.5)",
                "success_ratio[a, rate=10] > 0",
                "the sweep varies spike",
            ),
            (
                "sweep = { rate = [10] }",
                "sweep = { speed = [10] }",
                "quick.sweep.speed",
            ),
            (
                "[quick]",
                "[[charts]]\nfigure = \"happiness\"\n[quick]",
                "no figure named happiness",
            ),
            (
                "[quick]",
                "[[maps]]\nfigure = \"success_ratio\"\nverdict = \"success_ratio[a] > 1\"\n[quick]",
                "a map's verdict is about its own cell",
            ),
        ] {
            let text = SWEEP.replace(from, to);
            assert_ne!(text, SWEEP, "{from}");
            // The quick profile's own values only matter to it.
            let quick = hint.starts_with("quick.");
            let err = parse("s", &text, quick).unwrap_err();
            assert!(err.contains(hint), "{to}: {err}");
        }
        // One parameter draws charts, not maps.
        let one = SWEEP
            .replace(
                "[[sweep]]\nname = \"spike\"\nvalues = [\"100ms\", \"300ms\"]\n",
                "",
            )
            .replace("\"$spike\"", "\"5ms\"");
        let e = parse("s", &one, false).unwrap();
        assert!(e.maps.is_empty() && e.charts.len() == 2);
        let map = one.replace("[quick]", "[[maps]]\nfigure = \"success_ratio\"\n[quick]");
        assert!(parse("s", &map, false)
            .unwrap_err()
            .contains("two swept parameters"));
    }

    const PROCESSES: &str = r#"
title = "t"
claim = "c"
provider = "process"
tiers = 2

[base]
PAYMENT_FAILURE_RATE = 1
RETRY_MAX_ATTEMPTS = 3
UPSTREAM_RETRY_MAX_ATTEMPTS = 2

[[variants]]
name = "stall"
settings = { PROVIDER_FAULT = "stall", PROVIDER_FAULT_RATE = 0.5 }

[traffic]
rate = 10
duration = "10s"

[[schedule]]
at = "2s"
faults = { rate_limit = 5 }
payment = { mode = "outage" }
"#;

    #[test]
    fn provider_processes_get_the_settings_they_know_and_the_service_the_rest() {
        let e = parse("x", PROCESSES, false).unwrap();
        assert_eq!(e.provider, ProviderKind::Process);
        assert_eq!(e.tiers, 2);
        assert_eq!(e.clock, Clock::Real, "processes keep the real clock");
        assert!(e.needs_processes() && !e.needs_postgres());
        let v = &e.variants[0];
        let names: Vec<&str> = v
            .provider_settings
            .iter()
            .map(|(k, _)| k.as_str())
            .collect();
        // PAYMENT_FAILURE_RATE is both's; RETRY_MAX_ATTEMPTS the service's
        // alone; the UPSTREAM_* and PROVIDER_* the providers' alone.
        assert_eq!(
            names,
            [
                "PAYMENT_FAILURE_RATE",
                "PROVIDER_FAULT",
                "PROVIDER_FAULT_RATE",
                "UPSTREAM_RETRY_MAX_ATTEMPTS"
            ]
        );
        assert_eq!(v.config.retry_max_attempts, 3);
        assert_eq!(v.config.simulator.payment_failure_rate, 1.0);
        let step = &e.schedule[0];
        assert_eq!(step.faults, Some(serde_json::json!({ "rate_limit": 5 })));
        assert_eq!(
            step.payment_json,
            Some(serde_json::json!({ "mode": "outage" }))
        );
        assert!(step.text.contains("faults"), "{}", step.text);
        assert!(e.with_clock(Clock::Virtual, false).is_err());
    }

    #[test]
    fn what_needs_provider_processes_is_refused_without_them() {
        for (from, to, hint) in [
            (
                "provider = \"process\"\ntiers = 2\n",
                "",
                "PROVIDER_FAULT is a setting of the provider process: it needs provider = \"process\"",
            ),
            ("tiers = 2", "tiers = 4", "line 5: tiers must be 1 to 3, got 4"),
            ("tiers = 2", "tiers = 0", "tiers must be 1 to 3"),
            (
                "UPSTREAM_RETRY_MAX_ATTEMPTS = 2",
                "UPSTREAM_URL = \"http://127.0.0.1:1\"",
                "UPSTREAM_URL cannot be set in an experiment",
            ),
            (
                "UPSTREAM_RETRY_MAX_ATTEMPTS = 2",
                "UPSTREAM_RETRY_MAX_ATTEMPTS = 0",
                "the provider: invalid UPSTREAM_RETRY_MAX_ATTEMPTS (or --upstream-retry-max-attempts) value \"0\"",
            ),
            (
                "PROVIDER_FAULT = \"stall\"",
                "PROVIDER_FAULT = \"melt\"",
                "PROVIDER_FAULT",
            ),
            (
                "faults = { rate_limit = 5 }",
                "faults = { rate_limit = 5000000 }",
                "schedule.faults rate_limit",
            ),
            (
                "faults = { rate_limit = 5 }",
                "faults = { limit = 5 }",
                "schedule.faults: unknown field `limit`",
            ),
            (
                "provider = \"process\"",
                "provider = \"process\"\nreplicas = 2",
                "provider = \"process\" runs with one service",
            ),
            ("provider = \"process\"", "provider = \"remote\"", "unknown variant"),
            (
                "RETRY_MAX_ATTEMPTS = 3",
                "RETRY_ATTEMPTS = 3",
                "unknown setting RETRY_ATTEMPTS",
            ),
        ] {
            let text = PROCESSES.replace(from, to);
            let err = parse("x", &text, false).unwrap_err();
            assert!(err.contains(hint), "{to}: {err}");
        }
        // In process, tiers and faults steps are refused too.
        let in_process = PROCESSES
            .replace("provider = \"process\"\n", "")
            .replace(
                "settings = { PROVIDER_FAULT = \"stall\", PROVIDER_FAULT_RATE = 0.5 }\n",
                "",
            )
            .replace("UPSTREAM_RETRY_MAX_ATTEMPTS = 2\n", "");
        let err = parse("x", &in_process, false).unwrap_err();
        assert!(err.contains("tiers chain provider processes"), "{err}");
        let err = parse("x", &in_process.replace("tiers = 2\n", ""), false).unwrap_err();
        assert!(
            err.contains("schedule.faults are the provider process's"),
            "{err}"
        );
    }

    #[test]
    fn a_file_may_not_choose_the_database_or_the_address() {
        for setting in [
            "DATABASE_URL = \"postgres://x\"",
            "LISTEN_ADDR = \"0.0.0.0:1\"",
        ] {
            let text = GOOD.replace("PAYMENT_FAILURE_RATE = 0.05", setting);
            let err = parse("x", &text, false).unwrap_err();
            assert!(
                err.contains("line 7") && err.contains("cannot be set in an experiment"),
                "{err}"
            );
        }
    }

    #[test]
    fn a_hostile_hypothesis_is_refused_with_its_line_and_a_short_quote() {
        let long = vec!["1"; 5000].join(" + ");
        let text = GOOD.replace(
            "amplification[retry_only] > 2 * amplification[both]",
            &format!("{long} > 0"),
        );
        let err = parse("x", &text, false).unwrap_err();
        assert!(err.starts_with("line 34: hypothesis \"1 + 1"), "{err}");
        assert!(err.contains("… (20001 characters)"), "{err}");
        assert!(err.len() < 300, "{} bytes", err.len());
    }

    #[test]
    fn an_oversized_file_is_refused_before_it_is_read_whole() {
        let dir = std::env::temp_dir().join(format!("rl-big-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("big.toml");
        std::fs::write(&path, "#".repeat(MAX_FILE_BYTES as usize + 1)).unwrap();
        let err = load(&path, false).unwrap_err();
        assert!(err.contains("at most 1024 KiB"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
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
            (
                "PAYMENT_FAILURE_RATE = 0.05",
                "QUEUE_CAPACITY = 2305843009213693952",
                "from 1 to 1000000",
            ),
            (
                "PAYMENT_FAILURE_RATE = 0.05",
                "WORKER_COUNT = 100000000",
                "from 1 to 10000",
            ),
            (
                "settings = { BREAKER_ENABLED = false }",
                "settings = { MEMORY_MAX_ORDERS = 18446744073709551615 }",
                "MEMORY_MAX_ORDERS",
            ),
            (
                "payment = { mode = \"outage\" }",
                "payment = { mode = \"outage\", failure_rate = 5 }",
                "failure_rate",
            ),
            (
                "payment = { mode = \"outage\" }",
                "payment = { mode = \"brownout\", brownout = { failure_rate = 0.5, latency_min = \"1ms\", latency_max = \"2ms\", duration = \"25h\" } }",
                "at most 24h",
            ),
            (
                "payment = { mode = \"outage\" }",
                "payment = { latency_min = \"2s\", latency_max = \"1s\" }",
                "latency",
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
