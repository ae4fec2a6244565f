//! Running an experiment: every variant in every cell (`variant` runs one
//! in process; `simulated` runs them on the virtual clock, a thread each;
//! `replicas` runs one as processes on Postgres), then every hypothesis
//! judged against the figures; every run with the same seed.

use std::io::Write;
use std::path::Path;

use anyhow::Context;

use super::file::{Clock, Experiment};
use super::hypothesis::Scope;
pub use super::simulated::Speed;
use super::sweep::Param;
pub use super::variant::VariantResult;
use super::variant::{run_variant, Progress};

/// A hypothesis with its measured value.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Verdict {
    pub claim: String,
    pub expr: String,
    /// Each figure the expression reads (and each function's result), as
    /// measured.
    pub values: Vec<(String, Option<f64>)>,
    pub passed: bool,
}

/// Every run's result and every verdict.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub experiment: Experiment,
    /// Every run: each cell's variants in turn, cells in run order.
    pub variants: Vec<VariantResult>,
    pub verdicts: Vec<Verdict>,
    /// On the virtual clock, how fast it went.
    pub speed: Option<Speed>,
}

impl Outcome {
    pub fn passed(&self) -> bool {
        self.verdicts.iter().all(|v| v.passed)
    }

    /// A variant's result in a cell.
    pub fn result(&self, variant: &str, cell: usize) -> Option<&VariantResult> {
        self.variants
            .iter()
            .find(|v| v.cell == cell && v.name == variant)
    }

    /// The results of one cell, in the file's order of variants.
    pub fn cell(&self, cell: usize) -> impl Iterator<Item = &VariantResult> {
        self.variants.iter().filter(move |v| v.cell == cell)
    }
}

/// Figures as hypotheses read them.
struct Measured<'a> {
    experiment: &'a Experiment,
    variants: &'a [VariantResult],
}

impl Scope for Measured<'_> {
    fn params(&self) -> &[Param] {
        &self.experiment.sweep
    }

    fn figure(&self, figure: &str, variant: &str, at: &[(String, String)]) -> Option<f64> {
        let cell = self.experiment.find_cell(at)?;
        self.variants
            .iter()
            .find(|v| v.cell == cell && v.name == variant)
            .and_then(|v| v.figures.get(figure).copied().flatten())
    }
}

/// Judges every hypothesis against the runs' figures.
pub fn judge(experiment: &Experiment, variants: &[VariantResult]) -> Vec<Verdict> {
    let scope = Measured {
        experiment,
        variants,
    };
    experiment
        .hypotheses
        .iter()
        .map(|h| Verdict {
            claim: h.claim.clone(),
            expr: h.text.clone(),
            values: h.expr.readings(&scope),
            passed: h.expr.eval(&scope) == 1.0,
        })
        .collect()
}

/// Runs every variant in every cell, then judges the hypotheses. Replicas
/// are processes of this program's own executable.
pub async fn run(
    experiment: &Experiment,
    database_url: Option<&str>,
    progress: &mut (dyn Write + Send),
) -> anyhow::Result<Outcome> {
    run_with(
        experiment,
        database_url,
        super::simulated::default_threads(),
        progress,
    )
    .await
}

/// `run`, with `threads` simulated runs at once (virtual clock).
pub async fn run_with(
    experiment: &Experiment,
    database_url: Option<&str>,
    threads: usize,
    progress: &mut (dyn Write + Send),
) -> anyhow::Result<Outcome> {
    let binary = std::env::current_exe().context("cannot find this program's executable")?;
    run_using(experiment, database_url, &binary, threads, progress).await
}

/// `run`, with replicas started from `binary` and `threads` simulated runs
/// at once.
pub async fn run_using(
    experiment: &Experiment,
    database_url: Option<&str>,
    binary: &Path,
    threads: usize,
    progress: &mut (dyn Write + Send),
) -> anyhow::Result<Outcome> {
    // The virtual clock is for the memory store: Postgres's pool times out
    // by the wall clock, and replicas and providers are processes.
    if experiment.clock == Clock::Virtual && database_url.is_none() && !experiment.needs_processes()
    {
        let (variants, speed) = super::simulated::run_all(experiment, threads, progress).await?;
        let verdicts = judge(experiment, &variants);
        return Ok(Outcome {
            experiment: experiment.clone(),
            variants,
            verdicts,
            speed: Some(speed),
        });
    }
    let mut variants = Vec::new();
    for (c, cell) in experiment.cells.iter().enumerate() {
        for variant in &cell.variants {
            let label = experiment.cell_label(c);
            let _ = writeln!(
                progress,
                "{}: variant {}{}",
                experiment.name,
                variant.name,
                if label.is_empty() {
                    String::new()
                } else {
                    format!(" ({label})")
                }
            );
            let result = if experiment.needs_postgres() {
                let url = database_url.with_context(|| {
                    format!(
                        "{} runs {} replicas, which share their orders through Postgres: give --database-url",
                        experiment.name, experiment.replicas
                    )
                })?;
                super::replicas::run_variant(experiment, variant, url, binary, progress).await?
            } else {
                run_variant(
                    experiment,
                    c,
                    variant,
                    database_url,
                    false,
                    Some(binary),
                    Progress::Periodic,
                    progress,
                )
                .await?
            };
            variants.push(result);
        }
    }
    let verdicts = judge(experiment, &variants);
    Ok(Outcome {
        experiment: experiment.clone(),
        variants,
        verdicts,
        speed: None,
    })
}
