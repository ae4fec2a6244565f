//! Running an experiment: each variant on a fresh in-process service built
//! by the composition root on port 0, driven by the built-in traffic
//! generator, with the timeline recorded; variants one after another with
//! the same seed.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use tokio::time::Instant;

use super::figures::{self, FaultWindow, Figures, RunRecord};
use super::file::{Experiment, FaultMark, Step, Variant};
use crate::app::{App, AppHandles};
use crate::lab::{LoadOutcomes, LoadPlan};
use crate::observability::latency::Snapshot;

/// The longest wait for the orders in flight to finish after the traffic.
pub(super) const DRAIN_LIMIT: Duration = Duration::from_secs(60);

/// One variant's outcome.
#[derive(Debug, Clone)]
pub struct VariantResult {
    pub name: String,
    pub record: RunRecord,
    pub figures: Figures,
}

fn apply(step: &Step, h: &AppHandles) -> anyhow::Result<()> {
    if let Some(update) = &step.payment {
        let view = h
            .payment
            .update(update.clone())
            .map_err(|e| anyhow::anyhow!("schedule at {:?}: {e}", step.at))?;
        h.instruments.feed.payment_mode_set(view.mode);
    }
    if let Some(change) = step.reliability {
        h.reliability
            .set_switches(change.apply_to(h.reliability.switches()));
    }
    if step.reset_breaker {
        h.reliability.breaker().reset();
    }
    Ok(())
}

/// What the generated traffic came to. Orders refused with a 4xx mean the
/// setup is broken (the run measured nothing of what it meant to), so the
/// run fails; 5xx, lost requests and skipped sends are reported.
pub(super) fn check_traffic(
    variant: &str,
    outcomes: &LoadOutcomes,
    progress: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    let sent = outcomes.accepted
        + outcomes.rejected
        + outcomes.client_error
        + outcomes.server_error
        + outcomes.transport_error
        + outcomes.timed_out;
    if outcomes.client_error > 0 {
        anyhow::bail!(
            "variant {variant}: {} of {sent} generated orders were refused with a 4xx, so the run measured nothing it meant to (the service's log says why)",
            outcomes.client_error
        );
    }
    let unanswered = outcomes.transport_error + outcomes.timed_out;
    if outcomes.server_error + unanswered + outcomes.skipped > 0 {
        let _ = writeln!(
            progress,
            "  {variant}: of {sent} generated orders, {} were answered 5xx and {unanswered} got no answer ({} within the client's timeout); {} were not sent (too many in flight)",
            outcomes.server_error, outcomes.timed_out, outcomes.skipped
        );
    }
    Ok(())
}

/// Runs one variant. `progress` gets a line now and then.
pub async fn run_variant(
    experiment: &Experiment,
    variant: &Variant,
    database_url: Option<&str>,
    progress: &mut (dyn Write + Send),
) -> anyhow::Result<VariantResult> {
    let mut config = variant.config.clone();
    config.listen_addr = "127.0.0.1:0".parse().expect("an address");
    config.payment_seed = Some(experiment.seed);
    config.database_url = database_url.map(str::to_owned);
    config.load_rate = None;
    config.load_duration = None;
    // The whole run and its drain stay in the ring.
    config.timeline_retention = experiment.duration + DRAIN_LIMIT + Duration::from_secs(60);
    let app = App::build(config)
        .await
        .with_context(|| format!("variant {}: the service did not build", variant.name))?;
    let h = app.handles().clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));

    let completed = h.metrics.completed_latency();
    let failed = h.metrics.failed_latency();
    let start = Instant::now();
    let plan = LoadPlan::new(variant.rate, Some(experiment.duration))?;
    h.instruments.traffic.start(plan)?;
    let mut fault_start: Option<(f64, Snapshot)> = None;
    let mut fault_end: Option<(f64, Snapshot)> = None;
    let mut next_report = start;
    let mut steps = experiment.schedule.iter().peekable();
    let end = start + experiment.duration;
    loop {
        let due = steps.peek().map_or(end, |s| (start + s.at).min(end));
        let wake = due.min(next_report);
        tokio::time::sleep_until(wake).await;
        let now = Instant::now();
        if now >= next_report {
            let totals = h.metrics.totals();
            let _ = writeln!(
                progress,
                "  {:<24} {:>5.1}s / {:.0}s  {} orders, {} completed, {} failed",
                variant.name,
                now.duration_since(start).as_secs_f64(),
                experiment.duration.as_secs_f64(),
                totals.accepted,
                totals.completed,
                totals.failed
            );
            next_report = now + Duration::from_secs(2);
        }
        while let Some(step) = steps.next_if(|s| start + s.at <= now) {
            apply(step, &h)?;
            let mark = (h.instruments.feed.clock(), failed.snapshot());
            match step.fault {
                Some(FaultMark::Start) => fault_start = Some(mark),
                Some(FaultMark::End) => fault_end = Some(mark),
                None => {}
            }
        }
        if now >= end && steps.peek().is_none() {
            break;
        }
    }

    // Let every accepted order finish.
    let drain_deadline = Instant::now() + DRAIN_LIMIT;
    loop {
        let t = h.metrics.totals();
        let load = h.instruments.traffic.status();
        if !load.running && load.in_flight == 0 && t.accepted == t.completed + t.failed {
            break;
        }
        if Instant::now() >= drain_deadline {
            let _ = writeln!(
                progress,
                "  {}: orders still open after {DRAIN_LIMIT:?}; figures count what finished",
                variant.name
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    check_traffic(
        &variant.name,
        &h.instruments.traffic.status().outcomes,
        progress,
    )?;
    // A fault that never ended is measured to the end of the run.
    let finished = (h.instruments.feed.clock(), failed.snapshot());
    // Wait for one more sample so the timeline covers the drain.
    tokio::time::sleep(h.instruments.timeline.interval() * 2).await;

    let (probes, half_open_windows) = h.reliability.breaker().probe_counts();
    let fault = fault_start.as_ref().map(|(t, _)| FaultWindow {
        start: *t,
        end: fault_end.as_ref().map(|(t, _)| *t),
    });
    // Orders that failed while the fault lasted (to the end of the run
    // when it never ended).
    let failed_in_fault = fault_start.as_ref().map(|(_, at_start)| {
        let (_, until) = fault_end.as_ref().unwrap_or(&finished);
        until.since(at_start)
    });
    let record = RunRecord {
        samples: h
            .instruments
            .timeline
            .since(0)
            .iter()
            .map(|s| (**s).clone())
            .collect(),
        totals: h.metrics.totals(),
        payment_calls: h.payment.calls(),
        probes,
        half_open_windows,
        latency: completed
            .snapshot()
            .since(&Snapshot::default())
            .merge(&failed.snapshot().since(&Snapshot::default())),
        failed_in_fault,
        fault,
        replicas: Vec::new(),
        takeover: None,
    };
    let _ = stop.send(());
    server
        .await
        .context("the service task failed")?
        .context("the service stopped on an error")?;
    let figures = figures::compute(&record);
    Ok(VariantResult {
        name: variant.name.clone(),
        record,
        figures,
    })
}

/// A hypothesis with its measured value.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Verdict {
    pub claim: String,
    pub expr: String,
    /// Each figure the expression reads, as measured.
    pub values: Vec<(String, Option<f64>)>,
    pub passed: bool,
}

/// Every variant's result and every verdict.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub experiment: Experiment,
    pub variants: Vec<VariantResult>,
    pub verdicts: Vec<Verdict>,
}

impl Outcome {
    pub fn passed(&self) -> bool {
        self.verdicts.iter().all(|v| v.passed)
    }
}

/// Runs every variant in turn, then judges the hypotheses. Replicas are
/// processes of this program's own executable.
pub async fn run(
    experiment: &Experiment,
    database_url: Option<&str>,
    progress: &mut (dyn Write + Send),
) -> anyhow::Result<Outcome> {
    let binary = std::env::current_exe().context("cannot find this program's executable")?;
    run_using(experiment, database_url, &binary, progress).await
}

/// `run`, with replicas started from `binary`.
pub async fn run_using(
    experiment: &Experiment,
    database_url: Option<&str>,
    binary: &Path,
    progress: &mut (dyn Write + Send),
) -> anyhow::Result<Outcome> {
    let mut variants = Vec::new();
    for variant in &experiment.variants {
        let _ = writeln!(progress, "{}: variant {}", experiment.name, variant.name);
        let result = if experiment.needs_postgres() {
            let url = database_url.with_context(|| {
                format!(
                    "{} runs {} replicas, which share their orders through Postgres: give --database-url",
                    experiment.name, experiment.replicas
                )
            })?;
            super::replicas::run_variant(experiment, variant, url, binary, progress).await?
        } else {
            run_variant(experiment, variant, database_url, progress).await?
        };
        variants.push(result);
    }
    let lookup = |figure: &str, variant: &str| -> Option<f64> {
        variants
            .iter()
            .find(|v| v.name == variant)
            .and_then(|v| v.figures.get(figure).copied().flatten())
    };
    let verdicts = experiment
        .hypotheses
        .iter()
        .map(|h| Verdict {
            claim: h.claim.clone(),
            expr: h.text.clone(),
            values: h
                .expr
                .references()
                .into_iter()
                .map(|(f, v)| (format!("{f}[{v}]"), lookup(f, v)))
                .collect(),
            passed: h.expr.eval(&lookup) == 1.0,
        })
        .collect();
    Ok(Outcome {
        experiment: experiment.clone(),
        variants,
        verdicts,
    })
}
