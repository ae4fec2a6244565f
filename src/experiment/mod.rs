//! Experiments: scripted scenarios that test the lab's claims with numbers.
//!
//! `reliability-lab experiment run <file>` reads an experiment file
//! (`file`, with `sweep` for the parameters it may sweep), runs each
//! variant on a fresh in-process service (`run`; on the virtual clock,
//! `simulated`), computes its figures (`figures`), judges the hypotheses
//! (`hypothesis`) and writes a report (`report`, `charts`). It drives
//! services built by `app` and knows nothing of HTTP internals.

pub mod charts;
pub mod figures;
pub mod file;
pub mod hypothesis;
pub mod process;
pub mod providers;
pub mod relay;
pub mod replicas;
pub mod report;
pub mod run;
pub mod simulated;
pub mod sweep;
pub mod variant;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub use file::{load, Clock, Experiment};
pub use run::Outcome;

/// `reliability-lab experiment …`
#[derive(Debug, Parser)]
#[command(
    name = "reliability-lab experiment",
    about = "Run the lab's experiments"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one experiment file and write its report.
    Run {
        /// The experiment file (TOML), e.g. experiments/outage.toml.
        file: PathBuf,
        /// Where the report goes (default: reports/<name>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Every duration scaled down (the file's [quick] section).
        #[arg(long)]
        quick: bool,
        /// Run against Postgres instead of the in-memory store. Experiments
        /// with replicas need it (DATABASE_URL is read for them when this
        /// is absent); without either they are skipped.
        #[arg(long)]
        database_url: Option<String>,
        /// The clock the services keep. virtual (the default in memory):
        /// a paused clock that moves only when every task waits, the same
        /// figures for every run of a seed, at the speed of the CPU. real:
        /// the wall clock over loopback sockets, what replicas and Postgres
        /// need (and their default).
        #[arg(long, value_enum)]
        clock: Option<Clock>,
        /// Simulated runs at once (default: one per core).
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
        jobs: Option<u16>,
    },
    /// List the experiments in a directory.
    List {
        #[arg(default_value = "experiments")]
        dir: PathBuf,
    },
}

/// The experiment files in `dir`, sorted.
pub fn files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    Ok(files)
}

/// Runs `reliability-lab experiment <args>`: 0 when every hypothesis held,
/// 1 when one failed, 2 on a bad file or a failed run.
pub async fn main(args: Vec<String>) -> ExitCode {
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(err) => {
            let _ = err.print();
            return ExitCode::from(if err.use_stderr() { 2 } else { 0 });
        }
    };
    match cli.command {
        Command::List { dir } => match files(&dir) {
            Ok(files) => {
                for path in files {
                    match load(&path, false) {
                        Ok(e) => println!("{:<20} {}", e.name, e.title),
                        Err(err) => println!("{:<20} (invalid) {err}", path.display()),
                    }
                }
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("reliability-lab: cannot list {}: {err}", dir.display());
                ExitCode::from(2)
            }
        },
        Command::Run {
            file,
            out,
            quick,
            database_url,
            clock,
            jobs,
        } => {
            let experiment = match load(&file, quick) {
                Ok(e) => e,
                Err(err) => {
                    eprintln!("reliability-lab: {err}");
                    return ExitCode::from(2);
                }
            };
            let experiment = match clock {
                None if database_url.is_some() && !experiment.needs_postgres() => {
                    experiment.with_clock(Clock::Real, true)
                }
                None => Ok(experiment),
                Some(clock) => experiment.with_clock(clock, database_url.is_some()),
            };
            let experiment = match experiment {
                Ok(e) => e,
                Err(err) => {
                    eprintln!("reliability-lab: {err}");
                    return ExitCode::from(2);
                }
            };
            let database_url = match database_url {
                Some(url) => Some(url),
                None if experiment.needs_postgres() => {
                    match std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty()) {
                        Some(url) => Some(url),
                        None => {
                            eprintln!(
                                "{}: skipped: its {} replicas share their orders through Postgres; \
                                 give --database-url URL (or set DATABASE_URL)",
                                experiment.name, experiment.replicas
                            );
                            return ExitCode::SUCCESS;
                        }
                    }
                }
                None => None,
            };
            let out = out.unwrap_or_else(|| Path::new("reports").join(&experiment.name));
            let mut progress = std::io::stderr();
            let threads = jobs.map_or_else(simulated::default_threads, usize::from);
            let outcome =
                match run::run_with(&experiment, database_url.as_deref(), threads, &mut progress)
                    .await
                {
                    Ok(o) => o,
                    Err(err) => {
                        eprintln!("reliability-lab: {}: {err:#}", experiment.name);
                        return ExitCode::from(2);
                    }
                };
            let digest = match report::write(&outcome, &out) {
                Ok(digest) => digest,
                Err(err) => {
                    eprintln!("reliability-lab: {err:#}");
                    return ExitCode::from(2);
                }
            };
            for v in &outcome.verdicts {
                eprintln!(
                    "{} {}: {}",
                    if v.passed { "pass" } else { "FAIL" },
                    v.claim,
                    v.expr
                );
            }
            eprintln!("report: {}", out.join("report.md").display());
            if let Some(speed) = outcome.speed {
                eprintln!("{}", speed.line());
            }
            eprintln!("{digest}");
            if outcome.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
