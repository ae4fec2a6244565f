//! The report's charts: inline SVG drawn with plotters, one chart per
//! quantity with the variants overlaid and the fault window shaded, and the
//! breaker's state as one band per variant. A sweep draws instead each
//! `[[charts]]` figure against its first parameter (a line per variant) and
//! each `[[maps]]` figure over its two parameters (a grid per variant, the
//! value written in every cell).

use plotters::coord::Shift;
use plotters::prelude::*;

use super::file::{ChartSpec, MapSpec};
use super::hypothesis::Scope;
use super::run::Outcome;
use super::sweep::Param;
use crate::lab::Sample;
use crate::reliability::BreakerState;

const WIDTH: u32 = 860;
const HEIGHT: u32 = 280;
const FAULT: RGBColor = RGBColor(220, 38, 38);

/// A colour per variant, the same in every chart.
fn colour(i: usize) -> RGBColor {
    const COLOURS: [RGBColor; 6] = [
        RGBColor(37, 99, 235),
        RGBColor(234, 88, 12),
        RGBColor(22, 163, 74),
        RGBColor(124, 58, 237),
        RGBColor(8, 145, 178),
        RGBColor(190, 24, 93),
    ];
    COLOURS[i % COLOURS.len()]
}

/// One quantity per sample; `None` leaves a gap.
type Series = fn(&Sample) -> Option<f64>;

/// The charts a report shows, each with its title and unit.
pub const CHARTS: [(&str, &str, Series); 5] = [
    ("Completed orders per second", "orders/s", |s| {
        Some(s.completed_per_s)
    }),
    ("Failed orders per second", "orders/s", |s| {
        Some(s.failed_per_s)
    }),
    (
        "Amplification: payment calls per finished order",
        "calls/order",
        |s| {
            let finished = s.completed_per_s + s.failed_per_s;
            (finished > 0.0).then(|| s.payment_calls_per_s / finished)
        },
    ),
    ("Completion latency p99", "ms", |s| s.latency_p99_ms),
    ("Retries per second", "retries/s", |s| Some(s.retries_per_s)),
];

/// Charts of the provider's load, shown only when it has a capacity
/// (PAYMENT_CAPACITY) in some variant.
pub const PROVIDER_CHARTS: [(&str, &str, Series); 3] = [
    ("Offered load: payment calls per second", "calls/s", |s| {
        Some(s.payment_calls_per_s)
    }),
    ("Provider calls in flight and queued", "calls", |s| {
        Some((s.provider_in_flight + s.provider_queued) as f64)
    }),
    (
        "Wasted calls per second: the caller had gone",
        "calls/s",
        |s| Some(s.provider_wasted_per_s),
    ),
];

/// Every timeline of the outcome, named: one per variant, or one per
/// replica of a variant.
fn timelines(outcome: &Outcome) -> Vec<(String, &[Sample])> {
    outcome
        .variants
        .iter()
        .flat_map(|v| v.record.timelines(&v.name))
        .collect()
}

fn extent(outcome: &Outcome, series: Series) -> (f64, f64) {
    let mut t_max: f64 = 1.0;
    let mut y_max: f64 = 0.0;
    for (_, samples) in timelines(outcome) {
        for s in samples {
            t_max = t_max.max(s.t);
            if let Some(y) = series(s) {
                if y.is_finite() {
                    y_max = y_max.max(y);
                }
            }
        }
    }
    (t_max, if y_max > 0.0 { y_max * 1.1 } else { 1.0 })
}

fn draw_line_chart(
    root: &DrawingArea<SVGBackend<'_>, Shift>,
    outcome: &Outcome,
    title: &str,
    unit: &str,
    series: Series,
) -> Result<(), Box<dyn std::error::Error>> {
    root.fill(&WHITE)?;
    let (t_max, y_max) = extent(outcome, series);
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(36)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..t_max, 0f64..y_max)?;
    chart
        .configure_mesh()
        .x_desc("seconds since the start")
        .y_desc(unit)
        .light_line_style(RGBColor(235, 235, 235))
        .draw()?;
    // The fault window of the first variant that has one (they share the
    // schedule, so the windows agree to within a sample).
    if let Some(w) = outcome.variants.iter().find_map(|v| v.record.fault) {
        let end = w.end.unwrap_or(t_max);
        chart.draw_series(std::iter::once(Rectangle::new(
            [(w.start, 0.0), (end, y_max)],
            FAULT.mix(0.08).filled(),
        )))?;
    }
    for (i, (name, samples)) in timelines(outcome).into_iter().enumerate() {
        let c = colour(i);
        let mut segments: Vec<Vec<(f64, f64)>> = vec![Vec::new()];
        for s in samples {
            match series(s) {
                Some(y) if y.is_finite() => segments.last_mut().expect("one").push((s.t, y)),
                _ => segments.push(Vec::new()),
            }
        }
        let mut first = true;
        for segment in segments.into_iter().filter(|s| !s.is_empty()) {
            let drawn = chart.draw_series(LineSeries::new(segment, c.stroke_width(2)))?;
            if std::mem::take(&mut first) {
                drawn.label(name.clone()).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(3))
                });
            }
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(200, 200, 200))
        .draw()?;
    Ok(())
}

fn state_colour(state: BreakerState) -> RGBColor {
    match state {
        BreakerState::Closed => RGBColor(31, 157, 85),
        BreakerState::HalfOpen => RGBColor(217, 119, 6),
        BreakerState::Open => RGBColor(220, 38, 38),
    }
}

fn draw_bands(
    root: &DrawingArea<SVGBackend<'_>, Shift>,
    outcome: &Outcome,
) -> Result<(), Box<dyn std::error::Error>> {
    root.fill(&WHITE)?;
    let lines = timelines(outcome);
    let t_max = lines
        .iter()
        .flat_map(|(_, samples)| samples.last().map(|s| s.t))
        .fold(1.0, f64::max);
    let rows = lines.len().max(1) as f64;
    let mut chart = ChartBuilder::on(root)
        .caption(
            "Breaker state (green closed, amber half-open, red open)",
            ("sans-serif", 18),
        )
        .margin(10)
        .x_label_area_size(36)
        .y_label_area_size(140)
        .build_cartesian_2d(0f64..t_max, 0f64..rows)?;
    let names: Vec<String> = lines.iter().map(|(name, _)| name.clone()).collect();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .x_desc("seconds since the start")
        // Ticks every half row; only the middle of a row is named.
        .y_labels(names.len() * 2 + 1)
        .y_label_formatter(&|y| {
            let row = y - 0.5;
            if row >= 0.0 && (row - row.round()).abs() < 1e-6 {
                names.get(row.round() as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .light_line_style(RGBColor(235, 235, 235))
        .draw()?;
    for (i, (_, samples)) in lines.iter().enumerate() {
        chart.draw_series(band(samples, i as f64))?;
    }
    Ok(())
}

fn band(samples: &[Sample], row: f64) -> Vec<Rectangle<(f64, f64)>> {
    // Each sample from where the one before it ended (its own interval for
    // the first), so clock jitter between them leaves no hairline gaps.
    let mut from = samples.first().map_or(0.0, |s| s.t - s.interval);
    samples
        .iter()
        .map(|s| {
            let rect = Rectangle::new(
                [(from, row + 0.2), (s.t, row + 0.8)],
                state_colour(s.breaker).filled(),
            );
            from = s.t;
            rect
        })
        .collect()
}

/// Whether some variant's provider had a finite capacity (calls queued or
/// in flight were counted).
fn provider_limited(outcome: &Outcome) -> bool {
    timelines(outcome).iter().any(|(_, samples)| {
        samples
            .iter()
            .any(|s| s.provider_in_flight > 0 || s.provider_queued > 0)
    })
}

/// A figure's value in a cell, for a variant.
fn value_at(outcome: &Outcome, figure: &str, variant: &str, cell: usize) -> Option<f64> {
    outcome
        .result(variant, cell)
        .and_then(|v| v.figures.get(figure).copied().flatten())
        .filter(|v| v.is_finite())
}

/// The cell whose parameters have these value indices.
fn cell_at(outcome: &Outcome, at: &[usize]) -> Option<usize> {
    outcome.experiment.cells.iter().position(|c| c.at == at)
}

/// Whether an axis over these values reads best on a log scale: positive
/// values spread over a factor of 20 or more.
fn log_axis(param: &Param) -> bool {
    let (lo, hi) = param
        .values
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), v| {
            (lo.min(v.number), hi.max(v.number))
        });
    lo > 0.0 && hi / lo >= 20.0
}

/// One line of a sweep chart: its label and its points.
type SweepLine = (String, Vec<(f64, f64)>);

/// The lines of a sweep chart: one per variant, and with a second
/// parameter one per variant and value of it.
fn sweep_lines(outcome: &Outcome, figure: &str) -> Vec<SweepLine> {
    let e = &outcome.experiment;
    let x = &e.sweep[0];
    let seconds: Vec<usize> = match e.sweep.get(1) {
        Some(p) => (0..p.values.len()).collect(),
        None => vec![0],
    };
    let mut lines = Vec::new();
    for variant in &e.variants {
        for &j in &seconds {
            let label = match e.sweep.get(1) {
                Some(p) => format!("{}, {}={}", variant.name, p.name, p.values[j].text),
                None => variant.name.clone(),
            };
            let points = (0..x.values.len())
                .filter_map(|i| {
                    let at: Vec<usize> = if e.sweep.len() > 1 {
                        vec![i, j]
                    } else {
                        vec![i]
                    };
                    let cell = cell_at(outcome, &at)?;
                    value_at(outcome, figure, &variant.name, cell).map(|y| (x.values[i].number, y))
                })
                .collect();
            lines.push((label, points));
        }
    }
    lines
}

fn draw_sweep_chart(
    root: &DrawingArea<SVGBackend<'_>, Shift>,
    outcome: &Outcome,
    spec: &ChartSpec,
) -> Result<(), Box<dyn std::error::Error>> {
    root.fill(&WHITE)?;
    let x = &outcome.experiment.sweep[0];
    let lines = sweep_lines(outcome, &spec.figure);
    let (lo, hi) = x.values.iter().fold((f64::MAX, f64::MIN), |(lo, hi), v| {
        (lo.min(v.number), hi.max(v.number))
    });
    let y_max = lines
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(_, y)| *y))
        .fold(0f64, f64::max);
    let y_max = if y_max > 0.0 { y_max * 1.1 } else { 1.0 };
    let mut builder = ChartBuilder::on(root);
    builder
        .caption(&spec.title, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(36)
        .y_label_area_size(60);
    macro_rules! plot {
        ($chart:expr, $desc:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc($desc)
                .x_label_formatter(&|v| trim_number(*v))
                .y_desc(&spec.figure)
                .light_line_style(RGBColor(235, 235, 235))
                .draw()?;
            for (i, (label, points)) in lines.iter().enumerate() {
                let c = colour(i);
                chart
                    .draw_series(LineSeries::new(points.clone(), c.stroke_width(2)))?
                    .label(label.clone())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(3))
                    });
                chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, c.filled())))?;
            }
            chart
                .configure_series_labels()
                .position(legend_corner(&lines, x, y_max))
                .background_style(WHITE.mix(0.85))
                .border_style(RGBColor(200, 200, 200))
                .draw()?;
        }};
    }
    if log_axis(x) {
        let chart = builder.build_cartesian_2d((lo * 0.8..hi * 1.25).log_scale(), 0f64..y_max)?;
        plot!(chart, format!("{} (log scale)", x.label));
    } else {
        let pad = ((hi - lo) * 0.05).max(1e-9);
        let chart = builder.build_cartesian_2d(lo - pad..hi + pad, 0f64..y_max)?;
        plot!(chart, x.label.clone());
    }
    Ok(())
}

/// The corner of a sweep chart with the fewest points in it, for the
/// legend: a legend over the points hides what the chart is for.
fn legend_corner(lines: &[SweepLine], x: &Param, y_max: f64) -> SeriesLabelPosition {
    let log = log_axis(x);
    let scale = |v: f64| if log { v.ln() } else { v };
    let (lo, hi) = x.values.iter().fold((f64::MAX, f64::MIN), |(lo, hi), v| {
        (lo.min(scale(v.number)), hi.max(scale(v.number)))
    });
    let span = (hi - lo).max(1e-9);
    let points: Vec<(f64, f64)> = lines
        .iter()
        .flat_map(|(_, p)| {
            p.iter()
                .map(|&(px, py)| ((scale(px) - lo) / span, py / y_max))
        })
        .collect();
    let corners = [
        (SeriesLabelPosition::UpperRight, true, true),
        (SeriesLabelPosition::LowerLeft, false, false),
        (SeriesLabelPosition::LowerRight, true, false),
        (SeriesLabelPosition::UpperLeft, false, true),
    ];
    let crowd = |right: bool, upper: bool| {
        points
            .iter()
            .filter(|(px, py)| {
                (if right { *px > 0.55 } else { *px < 0.45 })
                    && (if upper { *py > 0.55 } else { *py < 0.45 })
            })
            .count()
    };
    let mut best = (SeriesLabelPosition::UpperRight, usize::MAX);
    for (corner, right, upper) in corners {
        let n = crowd(right, upper);
        if n < best.1 {
            best = (corner, n);
        }
    }
    best.0
}

/// A number as an axis or a cell shows it: at most three decimals, no
/// trailing zeros.
fn trim_number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e12 {
        return format!("{v:.0}");
    }
    let text = if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    };
    if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        text
    }
}

/// A cell of a map: its value and, with a verdict, whether it holds.
struct MapCell {
    value: Option<f64>,
    holds: Option<bool>,
}

/// A map's verdict reads the figures of its own variant and cell.
struct CellScope<'a> {
    outcome: &'a Outcome,
    variant: &'a str,
    cell: usize,
}

impl Scope for CellScope<'_> {
    fn params(&self) -> &[Param] {
        &[]
    }

    fn figure(&self, figure: &str, _variant: &str, _at: &[(String, String)]) -> Option<f64> {
        value_at(self.outcome, figure, self.variant, self.cell)
    }
}

fn map_cells(outcome: &Outcome, spec: &MapSpec, variant: &str) -> Vec<Vec<MapCell>> {
    let e = &outcome.experiment;
    let (xs, ys) = (e.sweep[0].values.len(), e.sweep[1].values.len());
    (0..ys)
        .map(|j| {
            (0..xs)
                .map(|i| {
                    let Some(cell) = cell_at(outcome, &[i, j]) else {
                        return MapCell {
                            value: None,
                            holds: None,
                        };
                    };
                    let holds = spec.verdict.as_ref().map(|(_, expr)| {
                        expr.eval(&CellScope {
                            outcome,
                            variant,
                            cell,
                        }) == 1.0
                    });
                    MapCell {
                        value: value_at(outcome, &spec.figure, variant, cell),
                        holds,
                    }
                })
                .collect()
        })
        .collect()
}

/// A value's colour on a blue scale from the smallest value to the largest.
fn shade(value: f64, lo: f64, hi: f64) -> RGBColor {
    let share = if hi > lo {
        ((value - lo) / (hi - lo)).clamp(0.0, 1.0)
    } else {
        0.5
    };
    let mix = |a: u8, b: u8| (a as f64 + (b as f64 - a as f64) * share).round() as u8;
    RGBColor(mix(239, 30), mix(246, 64), mix(255, 175))
}

const MAP_CELL_HEIGHT: i32 = 34;
const MAP_TOP: i32 = 44;
const MAP_LEFT: i32 = 110;
const MAP_BOTTOM: i32 = 56;

/// The height of one variant's map.
fn map_height(outcome: &Outcome) -> u32 {
    let rows = outcome.experiment.sweep[1].values.len() as i32;
    (MAP_TOP + rows * MAP_CELL_HEIGHT + MAP_BOTTOM) as u32
}

fn draw_map(
    root: &DrawingArea<SVGBackend<'_>, Shift>,
    outcome: &Outcome,
    spec: &MapSpec,
    variant: &str,
    range: (f64, f64),
) -> Result<(), Box<dyn std::error::Error>> {
    root.fill(&WHITE)?;
    let e = &outcome.experiment;
    let (xp, yp) = (&e.sweep[0], &e.sweep[1]);
    let cells = map_cells(outcome, spec, variant);
    let caption = match &spec.verdict {
        Some((text, _)) => format!(
            "{}: {variant} (green: {text}; red: not; grey: no value)",
            spec.title
        ),
        None => format!("{}: {variant}", spec.title),
    };
    root.draw(&Text::new(
        caption,
        (10, 10),
        ("sans-serif", 17).into_font().color(&BLACK),
    ))?;
    let width = WIDTH as i32 - MAP_LEFT - 20;
    let cell_w = width / xp.values.len().max(1) as i32;
    let label = ("sans-serif", 13).into_font().color(&RGBColor(60, 60, 60));
    let centred = |font: TextStyle<'static>| {
        font.pos(plotters::style::text_anchor::Pos::new(
            plotters::style::text_anchor::HPos::Center,
            plotters::style::text_anchor::VPos::Center,
        ))
    };
    // Rows from the top: the second parameter's largest value first.
    let rows = yp.values.len() as i32;
    for (j, row) in cells.iter().enumerate().rev() {
        let top = MAP_TOP + (rows - 1 - j as i32) * MAP_CELL_HEIGHT;
        root.draw(&Text::new(
            yp.values[j].text.clone(),
            (MAP_LEFT - 8, top + MAP_CELL_HEIGHT / 2),
            label.clone().pos(plotters::style::text_anchor::Pos::new(
                plotters::style::text_anchor::HPos::Right,
                plotters::style::text_anchor::VPos::Center,
            )),
        ))?;
        for (i, cell) in row.iter().enumerate() {
            let left = MAP_LEFT + i as i32 * cell_w;
            let fill = match (cell.holds, cell.value) {
                (Some(true), _) => RGBColor(187, 247, 208),
                (Some(false), _) => RGBColor(254, 202, 202),
                (None, Some(v)) => shade(v, range.0, range.1),
                (None, None) => RGBColor(229, 231, 235),
            };
            root.draw(&Rectangle::new(
                [(left, top), (left + cell_w - 2, top + MAP_CELL_HEIGHT - 2)],
                fill.filled(),
            ))?;
            let dark = cell.holds.is_none()
                && cell.value.is_some_and(|v| {
                    range.1 > range.0 && (v - range.0) / (range.1 - range.0) > 0.55
                });
            let text = cell.value.map_or_else(|| "–".to_owned(), trim_number);
            root.draw(&Text::new(
                text,
                (left + cell_w / 2, top + MAP_CELL_HEIGHT / 2),
                centred(
                    ("sans-serif", 14)
                        .into_font()
                        .color(if dark { &WHITE } else { &BLACK }),
                ),
            ))?;
        }
    }
    let axis_y = MAP_TOP + rows * MAP_CELL_HEIGHT;
    for (i, v) in xp.values.iter().enumerate() {
        root.draw(&Text::new(
            v.text.clone(),
            (MAP_LEFT + i as i32 * cell_w + cell_w / 2, axis_y + 12),
            centred(label.clone()),
        ))?;
    }
    root.draw(&Text::new(
        xp.label.clone(),
        (MAP_LEFT + width / 2, axis_y + 34),
        centred(label.clone()),
    ))?;
    root.draw(&Text::new(yp.label.clone(), (10, MAP_TOP - 14), label))?;
    Ok(())
}

fn svg_of(
    size: (u32, u32),
    name: &str,
    draw: impl FnOnce(&DrawingArea<SVGBackend<'_>, Shift>) -> Result<(), Box<dyn std::error::Error>>,
) -> String {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        if let Err(err) = draw(&root) {
            tracing::error!(error = %err, chart = name, "a chart could not be drawn");
        }
        let _ = root.present();
    }
    svg
}

/// A sweep's charts: each `[[charts]]` figure against the first parameter,
/// then each `[[maps]]` figure as one map per variant (a shared colour
/// scale for the maps of one figure).
fn sweep_svgs(outcome: &Outcome) -> Vec<Chart> {
    let e = &outcome.experiment;
    let mut out = Vec::new();
    for spec in &e.charts {
        let svg = svg_of((WIDTH, HEIGHT + 40), &spec.title, |root| {
            draw_sweep_chart(root, outcome, spec)
        });
        out.push(Chart {
            title: spec.title.clone(),
            slug: format!("sweep-{}", slug(&spec.figure)),
            svg,
        });
    }
    for spec in &e.maps {
        let values: Vec<f64> = outcome
            .variants
            .iter()
            .filter_map(|v| v.figures.get(spec.figure.as_str()).copied().flatten())
            .filter(|v| v.is_finite())
            .collect();
        let range = values
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
        for variant in &e.variants {
            let title = format!("{}: {}", spec.title, variant.name);
            let svg = svg_of((WIDTH, map_height(outcome)), &title, |root| {
                draw_map(root, outcome, spec, &variant.name, range)
            });
            out.push(Chart {
                title,
                slug: format!("map-{}-{}", slug(&spec.figure), slug(&variant.name)),
                svg,
            });
        }
    }
    out
}

/// One chart of a report.
#[derive(Debug, Clone)]
pub struct Chart {
    pub title: String,
    /// What its own file is called: `chart-<slug>.svg`.
    pub slug: String,
    /// An `<svg>` element.
    pub svg: String,
}

/// A file name's part from a title's words: lower case, joined by `-`.
fn slug(words: &str) -> String {
    words
        .to_lowercase()
        .split(|c: char| !c.is_ascii_alphanumeric() && c != '_')
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join("-")
}

/// Every chart of the report. A timeline chart's slug is its title up to
/// the first colon (`chart-amplification.svg`); a sweep's chart is named
/// by its figure, and a map by its figure and variant
/// (`chart-map-success_ratio-plain_retry.svg`).
pub fn svgs(outcome: &Outcome) -> Vec<Chart> {
    if outcome.experiment.is_sweep() {
        return sweep_svgs(outcome);
    }
    let mut out = Vec::new();
    let provider: &[(&str, &str, Series)] = if provider_limited(outcome) {
        &PROVIDER_CHARTS
    } else {
        &[]
    };
    for &(title, unit, series) in CHARTS.iter().chain(provider) {
        let svg = svg_of((WIDTH, HEIGHT), title, |root| {
            draw_line_chart(root, outcome, title, unit, series)
        });
        out.push(Chart {
            title: title.to_owned(),
            slug: slug(title.split(':').next().unwrap_or(title)),
            svg,
        });
    }
    let height = 90 + 40 * timelines(outcome).len() as u32;
    let svg = svg_of((WIDTH, height), "Breaker state", |root| {
        draw_bands(root, outcome)
    });
    out.push(Chart {
        title: "Breaker state".to_owned(),
        slug: "breaker-state".to_owned(),
        svg,
    });
    out
}
