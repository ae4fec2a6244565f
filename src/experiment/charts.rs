//! The report's charts: inline SVG drawn with plotters, one chart per
//! quantity with the variants overlaid and the fault window shaded, and the
//! breaker's state as one band per variant.

use plotters::coord::Shift;
use plotters::prelude::*;

use super::run::Outcome;
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

/// Figures against the offered rate: drawn when variants differ in their
/// `rate` only (the same settings at three rates or more), one line per set
/// of settings, the rate on a log scale.
pub const RATE_CHARTS: [(&str, &str, &str); 2] = [
    (
        "Completed share against offered rate",
        "completed / finished",
        "success_ratio",
    ),
    (
        "Breaker openings per minute against offered rate",
        "openings/min",
        "breaker_opened_per_minute",
    ),
];

/// An offered rate and the index of the variant that ran at it.
type RatePoint = (f64, usize);
/// A group's name and its points, by rate.
type RateGroup = (String, Vec<RatePoint>);

/// The variants grouped by their settings, each group's (rate, variant
/// index) sorted by rate; only groups with three rates or more. A group is
/// named by its variants' common name before the last `_`.
fn rate_groups(outcome: &Outcome) -> Vec<RateGroup> {
    // Each group with the settings its variants share.
    let mut groups: Vec<(&[(String, String)], RateGroup)> = Vec::new();
    for (i, result) in outcome.variants.iter().enumerate() {
        let Some(variant) = outcome
            .experiment
            .variants
            .iter()
            .find(|v| v.name == result.name)
        else {
            continue;
        };
        let label = variant
            .name
            .rsplit_once('_')
            .map_or(variant.name.as_str(), |(head, _)| head)
            .to_owned();
        match groups
            .iter_mut()
            .find(|(overrides, _)| *overrides == variant.overrides.as_slice())
        {
            Some((_, (_, points))) => points.push((variant.rate, i)),
            None => groups.push((&variant.overrides, (label, vec![(variant.rate, i)]))),
        }
    }
    groups
        .into_iter()
        .filter_map(|(_, (label, mut points))| {
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            points.dedup_by(|a, b| a.0 == b.0);
            (points.len() >= 3).then_some((label, points))
        })
        .collect()
}

fn draw_rate_chart(
    root: &DrawingArea<SVGBackend<'_>, Shift>,
    outcome: &Outcome,
    groups: &[RateGroup],
    (title, unit, figure): (&str, &str, &str),
) -> Result<(), Box<dyn std::error::Error>> {
    root.fill(&WHITE)?;
    let value = |i: usize| outcome.variants[i].figures.get(figure).copied().flatten();
    let rates = groups.iter().flat_map(|(_, p)| p.iter().map(|(r, _)| *r));
    let (lo, hi) = rates.fold((f64::MAX, 0f64), |(lo, hi), r| (lo.min(r), hi.max(r)));
    let y_max = groups
        .iter()
        .flat_map(|(_, p)| p.iter().filter_map(|(_, i)| value(*i)))
        .fold(0f64, f64::max);
    let y_max = if y_max > 0.0 { y_max * 1.1 } else { 1.0 };
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(36)
        .y_label_area_size(60)
        .build_cartesian_2d((lo * 0.8..hi * 1.25).log_scale(), 0f64..y_max)?;
    chart
        .configure_mesh()
        .x_desc("offered rate, orders/s (log scale)")
        .x_label_formatter(&|r| format!("{r:.0}"))
        .y_desc(unit)
        .light_line_style(RGBColor(235, 235, 235))
        .draw()?;
    for (g, (label, points)) in groups.iter().enumerate() {
        let c = colour(g);
        let line: Vec<(f64, f64)> = points
            .iter()
            .filter_map(|(r, i)| value(*i).map(|y| (*r, y)))
            .collect();
        chart
            .draw_series(LineSeries::new(line.clone(), c.stroke_width(2)))?
            .label(label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(3)));
        chart.draw_series(line.into_iter().map(|p| Circle::new(p, 4, c.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::MiddleRight)
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(200, 200, 200))
        .draw()?;
    Ok(())
}

/// Every chart of the report, titled, each an `<svg>` element.
pub fn svgs(outcome: &Outcome) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    let provider: &[(&str, &str, Series)] = if provider_limited(outcome) {
        &PROVIDER_CHARTS
    } else {
        &[]
    };
    for &(title, unit, series) in CHARTS.iter().chain(provider) {
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
            if let Err(err) = draw_line_chart(&root, outcome, title, unit, series) {
                tracing::error!(error = %err, chart = title, "a chart could not be drawn");
            }
            let _ = root.present();
        }
        out.push((title, svg));
    }
    let mut svg = String::new();
    {
        let height = 90 + 40 * timelines(outcome).len() as u32;
        let root = SVGBackend::with_string(&mut svg, (WIDTH, height)).into_drawing_area();
        if let Err(err) = draw_bands(&root, outcome) {
            tracing::error!(error = %err, "the breaker bands could not be drawn");
        }
        let _ = root.present();
    }
    out.push(("Breaker state", svg));
    let groups = rate_groups(outcome);
    if !groups.is_empty() {
        for chart in RATE_CHARTS {
            let mut svg = String::new();
            {
                let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
                if let Err(err) = draw_rate_chart(&root, outcome, &groups, chart) {
                    tracing::error!(error = %err, chart = chart.0, "a chart could not be drawn");
                }
                let _ = root.present();
            }
            out.push((chart.0, svg));
        }
    }
    out
}
