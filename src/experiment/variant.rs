//! One variant of one cell, run on a fresh in-process service built by the
//! composition root, driven by the built-in traffic generator, with the
//! timeline recorded; with provider processes (`provider = "process"`), the
//! providers started first and the service charging them over HTTP.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use tokio::time::Instant;

use super::figures::{self, FaultWindow, Figures, RunRecord};
use super::file::{Experiment, FaultMark, ProviderKind, Step, Variant};
use super::providers::Chain;
use crate::app::{App, AppHandles};
use crate::lab::{LoadOutcomes, LoadPlan};
use crate::observability::latency::Snapshot;

/// The longest wait for the orders in flight to finish after the traffic.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(60);

/// One variant's outcome, in one cell.
#[derive(Debug, Clone)]
pub struct VariantResult {
    pub name: String,
    /// The cell it ran in (0 without a sweep).
    pub cell: usize,
    pub record: RunRecord,
    pub figures: Figures,
    /// How long the run lasted on its own clock, drain included.
    pub ran_for: Duration,
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
pub fn check_traffic(
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

/// How a run is watched: the real clock's runs say where they are every
/// two seconds; simulated ones are watched from outside, a line per run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    Periodic,
    Quiet,
}

/// Runs one variant of one cell. Built `in_memory`, the service serves
/// over in-memory connections only (what a paused clock needs).
///
/// With provider processes (`provider = "process"`), `binary` is the
/// program they are started from.
#[allow(clippy::too_many_arguments)]
pub async fn run_variant(
    experiment: &Experiment,
    cell: usize,
    variant: &Variant,
    database_url: Option<&str>,
    in_memory: bool,
    binary: Option<&Path>,
    report: Progress,
    progress: &mut (dyn Write + Send),
) -> anyhow::Result<VariantResult> {
    let schedule = &experiment.cells[cell].schedule;
    let mut config = variant.config.clone();
    config.listen_addr = "127.0.0.1:0".parse().expect("an address");
    config.simulator.payment_seed = Some(experiment.seed);
    config.database_url = database_url.map(str::to_owned);
    config.load_rate = None;
    config.load_duration = None;
    // The whole run and its drain stay in the ring.
    config.timeline_retention = experiment.duration + DRAIN_LIMIT + Duration::from_secs(60);
    let chain = match experiment.provider {
        ProviderKind::InProcess => None,
        ProviderKind::Process => {
            let binary =
                binary.context("provider processes need this program's executable to start")?;
            let chain = Chain::start(
                binary,
                experiment.tiers,
                &variant.provider_settings,
                experiment.seed,
            )
            .await
            .with_context(|| format!("variant {}: the providers did not start", variant.name))?;
            config.payment_url = Some(chain.url());
            Some(chain)
        }
    };
    let mut builder = App::builder(config);
    if in_memory {
        builder = builder.in_memory();
    }
    let app = builder
        .build()
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
    let mut steps = schedule.iter().peekable();
    let end = start + experiment.duration;
    loop {
        let due = steps.peek().map_or(end, |s| (start + s.at).min(end));
        let wake = if report == Progress::Periodic {
            due.min(next_report)
        } else {
            due
        };
        tokio::time::sleep_until(wake).await;
        let now = Instant::now();
        if report == Progress::Periodic && now >= next_report {
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
            if let Some(chain) = &chain {
                chain.apply(step).await?;
            }
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

    let tiers = match &chain {
        Some(chain) => chain.readings().await?,
        None => Vec::new(),
    };
    let client = chain.as_ref().map(|_| h.metrics.payment_client().reading());
    let mut totals = h.metrics.totals();
    if let Some(bottom) = tiers.last() {
        // Money moves at the bottom of the chain.
        totals.charges = bottom.charges;
        totals.duplicate_charges = bottom.duplicate_charges;
    }
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
        totals,
        // The calls the provider received: the in-process simulator's, or
        // the top provider's.
        payment_calls: tiers.first().map_or(h.payment.calls(), |t| t.requests),
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
        tiers,
        client,
    };
    let ran_for = start.elapsed();
    let _ = stop.send(());
    server
        .await
        .context("the service task failed")?
        .context("the service stopped on an error")?;
    if let Some(chain) = chain {
        chain.stop(progress).await;
    }
    let figures = figures::compute(&record);
    Ok(VariantResult {
        name: variant.name.clone(),
        cell,
        record,
        figures,
        ran_for,
    })
}
