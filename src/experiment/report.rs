//! The report of a run, in its out directory: `report.md` and
//! `report.html` (the claim, each hypothesis with its measured values and
//! verdict, the figures with the variants side by side, the settings; the
//! HTML adds the charts as inline SVG, with no outside assets),
//! `figures.json`, `timeline.csv` (every sample of every variant), and each
//! chart alone as `chart-<name>.svg`.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;

use super::charts;
use super::figures::FIGURES;
use super::run::Outcome;
use crate::units::format_duration;

fn number(v: Option<f64>) -> String {
    match v {
        None => "–".into(),
        Some(v) if v.fract() == 0.0 && v.abs() < 1e15 => format!("{v:.0}"),
        Some(v) => format!("{v:.3}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_owned(),
    }
}

/// The figures some variant has a value for, and those none has (a fault
/// that never ended has no recovery time; a run without a kill, no
/// takeover).
fn figure_rows(outcome: &Outcome) -> (Vec<&'static str>, Vec<&'static str>) {
    FIGURES.iter().partition(|figure| {
        outcome
            .variants
            .iter()
            .any(|v| v.figures.get(*figure).copied().flatten().is_some())
    })
}

/// The settings section, in Markdown inline code, for both reports.
struct Settings {
    /// Traffic, base settings, the quick profile's settings.
    paragraphs: Vec<String>,
    /// One line per variant: its settings over the base.
    variants: Vec<String>,
    /// One line per scheduled change.
    schedule: Vec<String>,
}

impl Settings {
    fn of(e: &super::Experiment) -> Self {
        let code = |pairs: &[(String, String)]| -> String {
            pairs
                .iter()
                .map(|(k, v)| format!("`{k}={v}`"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut paragraphs = vec![format!(
            "Traffic: {} orders per second for {}{}.",
            e.rate,
            format_duration(e.duration),
            if e.replicas > 1 {
                format!(
                    ", split evenly across {} replica processes sharing one Postgres \
                     (a replica's share stops when it is killed)",
                    e.replicas
                )
            } else {
                String::new()
            }
        )];
        if !e.base.is_empty() {
            paragraphs.push(format!("Base: {}.", code(&e.base)));
        }
        if !e.quick_settings.is_empty() {
            paragraphs.push(format!(
                "Quick profile, over every variant: {}.",
                code(&e.quick_settings)
            ));
        }
        let variants = e
            .variants
            .iter()
            .map(|v| {
                let over = if v.overrides.is_empty() {
                    "the base".to_owned()
                } else {
                    code(&v.overrides)
                };
                if v.rate == e.rate {
                    format!("`{}`: {over}", v.name)
                } else {
                    format!("`{}`: {over}, at {} orders per second", v.name, v.rate)
                }
            })
            .collect();
        let schedule = e
            .schedule
            .iter()
            .map(|step| format!("at {}: {}", format_duration(step.at), step.text))
            .collect();
        Self {
            paragraphs,
            variants,
            schedule,
        }
    }
}

pub fn markdown(outcome: &Outcome) -> String {
    let e = &outcome.experiment;
    let mut md = String::new();
    let _ = writeln!(md, "# {}\n", e.title);
    let _ = writeln!(md, "**Claim**: {}\n", e.claim);
    let verdict = if outcome.passed() {
        "every hypothesis holds"
    } else {
        "a hypothesis FAILED"
    };
    let _ = writeln!(
        md,
        "Experiment `{}`{}, seed {}: {verdict}.\n",
        e.name,
        if e.quick { " (quick profile)" } else { "" },
        e.seed
    );
    let _ = writeln!(md, "## Hypotheses\n");
    let _ = writeln!(md, "| claim | hypothesis | measured | verdict |");
    let _ = writeln!(md, "|---|---|---|---|");
    for v in &outcome.verdicts {
        let values: Vec<String> = v
            .values
            .iter()
            .map(|(name, value)| format!("{name} = {}", number(*value)))
            .collect();
        let _ = writeln!(
            md,
            "| {} | `{}` | {} | {} |",
            v.claim,
            v.expr,
            values.join(", "),
            if v.passed { "pass" } else { "**FAIL**" }
        );
    }
    let _ = writeln!(md, "\n## Figures\n");
    let names: Vec<&str> = outcome.variants.iter().map(|v| v.name.as_str()).collect();
    let _ = writeln!(md, "| figure | {} |", names.join(" | "));
    let _ = writeln!(md, "|---|{}", "---:|".repeat(names.len()));
    let (shown, absent) = figure_rows(outcome);
    for figure in shown {
        let cells: Vec<String> = outcome
            .variants
            .iter()
            .map(|v| number(v.figures.get(figure).copied().flatten()))
            .collect();
        let _ = writeln!(md, "| {figure} | {} |", cells.join(" | "));
    }
    if !absent.is_empty() {
        let _ = writeln!(md, "\nNo variant has a value for: {}.", absent.join(", "));
    }
    let _ = writeln!(md, "\n## Settings\n");
    let settings = Settings::of(e);
    for paragraph in &settings.paragraphs {
        let _ = writeln!(md, "{paragraph}\n");
    }
    for line in &settings.variants {
        let _ = writeln!(md, "- {line}");
    }
    if !settings.schedule.is_empty() {
        let _ = writeln!(md, "\nSchedule:\n");
        for line in &settings.schedule {
            let _ = writeln!(md, "- {line}");
        }
    }
    md
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const STYLE: &str = "body{font:15px/1.45 system-ui,sans-serif;max-width:960px;margin:24px auto;padding:0 16px;color:#1d2330}\
table{border-collapse:collapse;margin:8px 0 20px}td,th{border:1px solid #dde1e7;padding:3px 8px;text-align:left}\
td.n{text-align:right;font-variant-numeric:tabular-nums}.pass{color:#15803d;font-weight:600}.fail{color:#dc2626;font-weight:700}\
figure{margin:12px 0}code{background:#f1f3f5;padding:0 3px;border-radius:3px}";

/// The report as one self-contained page.
pub fn html(outcome: &Outcome) -> String {
    let e = &outcome.experiment;
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title><style>{STYLE}</style></head><body>",
        escape(&e.title)
    );
    let _ = write!(
        h,
        "<h1>{}</h1><p><b>Claim</b>: {}</p>",
        escape(&e.title),
        escape(&e.claim)
    );
    let _ = write!(
        h,
        "<p>Experiment <code>{}</code>{}, seed {}: <span class=\"{}\">{}</span>.</p>",
        escape(&e.name),
        if e.quick { " (quick profile)" } else { "" },
        e.seed,
        if outcome.passed() { "pass" } else { "fail" },
        if outcome.passed() {
            "every hypothesis holds"
        } else {
            "a hypothesis FAILED"
        }
    );
    h.push_str("<h2>Hypotheses</h2><table><tr><th>claim</th><th>hypothesis</th><th>measured</th><th>verdict</th></tr>");
    for v in &outcome.verdicts {
        let values: Vec<String> = v
            .values
            .iter()
            .map(|(name, value)| format!("{} = {}", escape(name), number(*value)))
            .collect();
        let _ = write!(
            h,
            "<tr><td>{}</td><td><code>{}</code></td><td>{}</td><td class=\"{}\">{}</td></tr>",
            escape(&v.claim),
            escape(&v.expr),
            values.join("<br>"),
            if v.passed { "pass" } else { "fail" },
            if v.passed { "pass" } else { "FAIL" }
        );
    }
    h.push_str("</table><h2>Charts</h2><p>The shaded band is the fault window.</p>");
    for (_, svg) in charts::svgs(outcome) {
        let _ = write!(h, "<figure>{svg}</figure>");
    }
    h.push_str("<h2>Figures</h2><table><tr><th>figure</th>");
    for v in &outcome.variants {
        let _ = write!(h, "<th>{}</th>", escape(&v.name));
    }
    h.push_str("</tr>");
    let (shown, absent) = figure_rows(outcome);
    for figure in shown {
        let _ = write!(h, "<tr><td>{figure}</td>");
        for v in &outcome.variants {
            let _ = write!(
                h,
                "<td class=\"n\">{}</td>",
                number(v.figures.get(figure).copied().flatten())
            );
        }
        h.push_str("</tr>");
    }
    h.push_str("</table>");
    if !absent.is_empty() {
        let _ = write!(
            h,
            "<p>No variant has a value for: {}.</p>",
            escape(&absent.join(", "))
        );
    }
    h.push_str("<h2>Settings</h2>");
    // Inline code in the Markdown lines becomes <code> here.
    let html_line = |line: &str| {
        escape(line)
            .split('`')
            .enumerate()
            .map(|(i, part)| {
                if i % 2 == 1 {
                    format!("<code>{part}</code>")
                } else {
                    part.to_owned()
                }
            })
            .collect::<String>()
    };
    let settings = Settings::of(e);
    for paragraph in &settings.paragraphs {
        let _ = write!(h, "<p>{}</p>", html_line(paragraph));
    }
    h.push_str("<ul>");
    for line in &settings.variants {
        let _ = write!(h, "<li>{}</li>", html_line(line));
    }
    h.push_str("</ul>");
    if !settings.schedule.is_empty() {
        h.push_str("<p>Schedule:</p><ul>");
        for line in &settings.schedule {
            let _ = write!(h, "<li>{}</li>", html_line(line));
        }
        h.push_str("</ul>");
    }
    h.push_str("</body></html>\n");
    h
}

fn figures_json(outcome: &Outcome) -> serde_json::Value {
    let variants: serde_json::Map<String, serde_json::Value> = outcome
        .variants
        .iter()
        .map(|v| {
            let figures: serde_json::Map<String, serde_json::Value> = v
                .figures
                .iter()
                .map(|(k, v)| ((*k).to_owned(), serde_json::json!(v)))
                .collect();
            (
                v.name.clone(),
                serde_json::json!({ "figures": figures, "fault": v.record.fault }),
            )
        })
        .collect();
    serde_json::json!({
        "experiment": outcome.experiment.name,
        "title": outcome.experiment.title,
        "claim": outcome.experiment.claim,
        "quick": outcome.experiment.quick,
        "seed": outcome.experiment.seed,
        "passed": outcome.passed(),
        "hypotheses": outcome.verdicts,
        "variants": variants,
    })
}

fn timeline_csv(outcome: &Outcome) -> String {
    let mut csv = String::new();
    let mut header: Option<Vec<String>> = None;
    for (name, samples) in outcome
        .variants
        .iter()
        .flat_map(|v| v.record.timelines(&v.name))
    {
        for sample in samples {
            let serde_json::Value::Object(map) = serde_json::to_value(sample).unwrap_or_default()
            else {
                continue;
            };
            let keys = header.get_or_insert_with(|| {
                let keys: Vec<String> = map.keys().cloned().collect();
                let _ = writeln!(csv, "variant,{}", keys.join(","));
                keys
            });
            let cells: Vec<String> = keys
                .iter()
                .map(|k| match &map[k] {
                    serde_json::Value::Null => String::new(),
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect();
            let _ = writeln!(csv, "{},{}", name, cells.join(","));
        }
    }
    csv
}

/// Writes the report files into `dir` (created if needed).
pub fn write(outcome: &Outcome, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let write = |name: &str, text: String| {
        std::fs::write(dir.join(name), text)
            .with_context(|| format!("cannot write {}", dir.join(name).display()))
    };
    write("report.md", markdown(outcome))?;
    write("report.html", html(outcome))?;
    // Each chart on its own too, for documents that show one.
    for (title, svg) in charts::svgs(outcome) {
        let slug: String = title
            .split(':')
            .next()
            .unwrap_or(title)
            .to_lowercase()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join("-");
        write(&format!("chart-{slug}.svg"), svg)?;
    }
    write(
        "figures.json",
        serde_json::to_string_pretty(&figures_json(outcome))?,
    )?;
    write("timeline.csv", timeline_csv(outcome))?;
    Ok(())
}
