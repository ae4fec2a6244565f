//! Experiments: scripted scenarios that test the lab's claims with numbers.
//!
//! `reliability-lab experiment run <file>` reads an experiment file
//! (`file`), runs each variant on a fresh in-process service (`run`),
//! computes its figures (`figures`), judges the hypotheses (`hypothesis`)
//! and writes a report (`report`). It drives services built by `app` and
//! knows nothing of HTTP internals.

pub mod charts;
pub mod figures;
pub mod file;
pub mod hypothesis;
pub mod replicas;
pub mod report;
pub mod run;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub use file::{load, Experiment};
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
        } => {
            let experiment = match load(&file, quick) {
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
            let outcome = match run::run(&experiment, database_url.as_deref(), &mut progress).await
            {
                Ok(o) => o,
                Err(err) => {
                    eprintln!("reliability-lab: {}: {err:#}", experiment.name);
                    return ExitCode::from(2);
                }
            };
            if let Err(err) = report::write(&outcome, &out) {
                eprintln!("reliability-lab: {err:#}");
                return ExitCode::from(2);
            }
            for v in &outcome.verdicts {
                eprintln!(
                    "{} {}: {}",
                    if v.passed { "pass" } else { "FAIL" },
                    v.claim,
                    v.expr
                );
            }
            eprintln!("report: {}", out.join("report.md").display());
            if outcome.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
