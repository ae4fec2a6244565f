//! The report of a run, in its out directory: `report.md` and
//! `report.html` (the claim, each hypothesis with its measured values and
//! verdict, the figures with the variants side by side, the settings; the
//! HTML adds the charts as inline SVG, with no outside assets),
//! `figures.json`, `timeline.csv` (every sample of every variant), and each
//! chart alone as `chart-<name>.svg`. In a sweep, each figure the report
//! draws or a hypothesis reads gets a table of its own, cells by variants,
//! and every figure of every run is in `figures.json`.
//!
//! Nothing in `figures.json` or `timeline.csv` depends on the machine: on
//! the virtual clock, two runs of a file and seed write them byte for byte
//! the same (`write` returns their digests).

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

/// A table of figures, for both reports.
struct Table {
    title: Option<String>,
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

/// The figures a sweep's report tabulates: those it draws, then those its
/// hypotheses read, each once, in the order of `FIGURES`.
fn sweep_figures(e: &super::Experiment) -> Vec<&'static str> {
    let wanted: Vec<&str> = e
        .charts
        .iter()
        .map(|c| c.figure.as_str())
        .chain(e.maps.iter().map(|m| m.figure.as_str()))
        .chain(e.maps.iter().flat_map(|m| {
            m.verdict
                .iter()
                .flat_map(|(_, x)| x.references().into_iter().map(|r| r.figure.as_str()))
        }))
        .chain(
            e.hypotheses
                .iter()
                .flat_map(|h| h.expr.references().into_iter().map(|r| r.figure.as_str())),
        )
        .collect();
    FIGURES
        .iter()
        .copied()
        .filter(|f| wanted.contains(f))
        .collect()
}

/// The figures' tables: without a sweep one, figures by variants; in a
/// sweep one per figure, cells by variants.
fn figure_tables(outcome: &Outcome) -> (Vec<Table>, Vec<&'static str>) {
    let e = &outcome.experiment;
    let names: Vec<String> = e.variants.iter().map(|v| v.name.clone()).collect();
    if !e.is_sweep() {
        let (shown, absent) = figure_rows(outcome);
        let rows = shown
            .into_iter()
            .map(|figure| {
                std::iter::once(figure.to_owned())
                    .chain(
                        outcome
                            .variants
                            .iter()
                            .map(|v| number(v.figures.get(figure).copied().flatten())),
                    )
                    .collect()
            })
            .collect();
        let header = std::iter::once("figure".to_owned()).chain(names).collect();
        return (
            vec![Table {
                title: None,
                header,
                rows,
            }],
            absent,
        );
    }
    let tables = sweep_figures(e)
        .into_iter()
        .map(|figure| Table {
            title: Some(figure.to_owned()),
            header: std::iter::once("cell".to_owned())
                .chain(names.iter().cloned())
                .collect(),
            rows: (0..e.cells.len())
                .map(|c| {
                    std::iter::once(e.cell_label(c))
                        .chain(names.iter().map(|n| {
                            number(
                                outcome
                                    .result(n, c)
                                    .and_then(|v| v.figures.get(figure).copied().flatten()),
                            )
                        }))
                        .collect()
                })
                .collect(),
        })
        .collect();
    (tables, Vec::new())
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
        if e.provider == super::file::ProviderKind::Process {
            paragraphs.push(if e.tiers == 1 {
                "The provider: a `reliability-lab provider` process of its own, charged over \
                 HTTP on loopback (the service's `PAYMENT_URL`); the settings it knows go to it."
                    .to_owned()
            } else {
                format!(
                    "The provider: a chain of {} `reliability-lab provider` processes, charged \
                     over HTTP on loopback: the service calls provider 1, and each provider \
                     charges by calling the next (`UPSTREAM_URL`, its own retry and breaker); \
                     the last one charges. Every provider gets the settings it knows.",
                    e.tiers
                )
            });
        }
        if !e.base.is_empty() {
            paragraphs.push(format!("Base: {}.", code(&e.base)));
        }
        if !e.quick_settings.is_empty() {
            paragraphs.push(format!(
                "Quick profile, over every variant: {}.",
                code(&e.quick_settings)
            ));
        }
        if e.is_sweep() {
            let swept: Vec<String> = e
                .sweep
                .iter()
                .map(|p| format!("`{}` over {}", p.name, p.listed()))
                .collect();
            paragraphs.push(format!(
                "Swept: {}; every variant in each of the {} cells ({} runs). The schedule below is the first cell's.",
                swept.join(" and "),
                e.cells.len(),
                e.cells.len() * e.variants.len()
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
    let (tables, absent) = figure_tables(outcome);
    for table in &tables {
        if let Some(title) = &table.title {
            let _ = writeln!(md, "### {title}\n");
        }
        let _ = writeln!(md, "| {} |", table.header.join(" | "));
        let _ = writeln!(md, "|---|{}", "---:|".repeat(table.header.len() - 1));
        for row in &table.rows {
            let _ = writeln!(md, "| {} |", row.join(" | "));
        }
        if table.title.is_some() {
            let _ = writeln!(md);
        }
    }
    if !absent.is_empty() {
        let _ = writeln!(md, "\nNo variant has a value for: {}.", absent.join(", "));
    }
    if outcome.experiment.is_sweep() {
        let _ = writeln!(md, "Every figure of every run is in figures.json.");
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
    h.push_str(if outcome.experiment.is_sweep() {
        "</table><h2>Charts</h2><p>Each point is one run; each map cell is one run of that variant.</p>"
    } else {
        "</table><h2>Charts</h2><p>The shaded band is the fault window.</p>"
    });
    for chart in charts::svgs(outcome) {
        let _ = write!(h, "<figure>{}</figure>", chart.svg);
    }
    h.push_str("<h2>Figures</h2>");
    let (tables, absent) = figure_tables(outcome);
    for table in &tables {
        if let Some(title) = &table.title {
            let _ = write!(h, "<h3>{}</h3>", escape(title));
        }
        h.push_str("<table><tr>");
        for cell in &table.header {
            let _ = write!(h, "<th>{}</th>", escape(cell));
        }
        h.push_str("</tr>");
        for row in &table.rows {
            let _ = write!(h, "<tr><td>{}</td>", escape(&row[0]));
            for cell in &row[1..] {
                let _ = write!(h, "<td class=\"n\">{}</td>", escape(cell));
            }
            h.push_str("</tr>");
        }
        h.push_str("</table>");
    }
    if !absent.is_empty() {
        let _ = write!(
            h,
            "<p>No variant has a value for: {}.</p>",
            escape(&absent.join(", "))
        );
    }
    if outcome.experiment.is_sweep() {
        h.push_str("<p>Every figure of every run is in figures.json.</p>");
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
    let e = &outcome.experiment;
    let variants_of = |cell: usize| -> serde_json::Map<String, serde_json::Value> {
        outcome
            .cell(cell)
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
            .collect()
    };
    let mut json = serde_json::json!({
        "experiment": e.name,
        "title": e.title,
        "claim": e.claim,
        "quick": e.quick,
        "seed": e.seed,
        "passed": outcome.passed(),
        "hypotheses": outcome.verdicts,
    });
    if e.is_sweep() {
        json["sweep"] = e
            .sweep
            .iter()
            .map(|p| {
                serde_json::json!({
                    "name": p.name,
                    "values": p.values.iter().map(|v| v.text.clone()).collect::<Vec<_>>(),
                })
            })
            .collect();
        json["cells"] = (0..e.cells.len())
            .map(|c| {
                let at: serde_json::Map<String, serde_json::Value> = e
                    .cell_coords(c)
                    .into_iter()
                    .map(|(k, v)| (k, serde_json::Value::String(v)))
                    .collect();
                serde_json::json!({ "at": at, "variants": variants_of(c) })
            })
            .collect();
    } else {
        json["variants"] = serde_json::Value::Object(variants_of(0));
    }
    json
}

fn timeline_csv(outcome: &Outcome) -> String {
    let e = &outcome.experiment;
    let params: Vec<&str> = e.sweep.iter().map(|p| p.name.as_str()).collect();
    let mut csv = String::new();
    let mut header: Option<Vec<String>> = None;
    for v in &outcome.variants {
        let coords = e.cell_coords(v.cell);
        for (name, samples) in v.record.timelines(&v.name) {
            for sample in samples {
                let serde_json::Value::Object(map) =
                    serde_json::to_value(sample).unwrap_or_default()
                else {
                    continue;
                };
                let keys = header.get_or_insert_with(|| {
                    let keys: Vec<String> = map.keys().cloned().collect();
                    let lead: Vec<&str> = std::iter::once("variant")
                        .chain(params.iter().copied())
                        .collect();
                    let _ = writeln!(csv, "{},{}", lead.join(","), keys.join(","));
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
                let lead: Vec<&str> = std::iter::once(name.as_str())
                    .chain(coords.iter().map(|(_, value)| value.as_str()))
                    .collect();
                let _ = writeln!(csv, "{},{}", lead.join(","), cells.join(","));
            }
        }
    }
    csv
}

/// The first 16 hex digits of a text's SHA-256: enough to tell two runs
/// apart at a glance, short enough to read out.
pub fn digest(text: &str) -> String {
    use sha2::Digest as _;
    let hash = sha2::Sha256::digest(text.as_bytes());
    hash.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// Writes the report files into `dir` (created if needed) and returns a
/// line with the digests of `figures.json` and `timeline.csv`, for two
/// people to compare their runs.
pub fn write(outcome: &Outcome, dir: &Path) -> anyhow::Result<String> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let write = |name: &str, text: String| {
        std::fs::write(dir.join(name), text)
            .with_context(|| format!("cannot write {}", dir.join(name).display()))
    };
    write("report.md", markdown(outcome))?;
    write("report.html", html(outcome))?;
    // Each chart on its own too, for documents that show one.
    for chart in charts::svgs(outcome) {
        write(&format!("chart-{}.svg", chart.slug), chart.svg)?;
    }
    let figures = serde_json::to_string_pretty(&figures_json(outcome))?;
    let timeline = timeline_csv(outcome);
    let line = format!(
        "digest: figures.json {}, timeline.csv {} (the first 16 hex digits of their SHA-256)",
        digest(&figures),
        digest(&timeline)
    );
    write("figures.json", figures)?;
    write("timeline.csv", timeline)?;
    Ok(line)
}
