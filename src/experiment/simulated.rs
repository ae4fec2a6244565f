//! Runs on the virtual clock: the service's own code, whole, on a paused
//! tokio clock, so that a file and a seed give the same figures every time
//! and a run costs CPU instead of its duration.
//!
//! Each run (a variant in a cell) gets a thread of its own and, on it, a
//! current-thread tokio runtime started paused, with the timer and nothing
//! else: no I/O driver, so anything in the service that reached for a
//! socket would fail loudly instead of letting the clock jump past its
//! answer. The service is built `in_memory` (the traffic generator reaches
//! the router through in-memory connections, still through hyper on both
//! ends) on the memory store, and `clock::Simulated` makes its dates follow
//! the same clock. The runtime's clock moves only when every task waits, to
//! the next timer; what the runs compute depends on the seed and the file
//! alone, never on the machine's speed or load.
//!
//! Runs share nothing, so several go at once, one per core: the results are
//! put back in run order, so the threads' pace never shows in a report.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::mpsc;

use super::file::Experiment;
use super::variant::{self, Progress, VariantResult};

/// How fast a simulated run went: the time its services lived through
/// against the wall-clock time it took.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Speed {
    pub simulated: Duration,
    pub wall: Duration,
    pub threads: usize,
}

impl Speed {
    /// `simulated 160 s in 3.1 s (52×, 2 threads)`.
    pub fn line(&self) -> String {
        let wall = self.wall.as_secs_f64().max(0.001);
        format!(
            "simulated {:.0} s in {:.1} s ({:.0}×, {} thread{})",
            self.simulated.as_secs_f64(),
            wall,
            self.simulated.as_secs_f64() / wall,
            self.threads,
            if self.threads == 1 { "" } else { "s" }
        )
    }
}

/// One thread per core, as the machine reports them.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

enum Message {
    Line(String),
    /// Boxed: a result is large and lines are many.
    Done(usize, Box<anyhow::Result<VariantResult>>),
}

/// A writer that sends each finished line to the runner.
struct Lines {
    to: mpsc::UnboundedSender<Message>,
    pending: Vec<u8>,
}

impl Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.pending.extend_from_slice(buf);
        while let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            let _ = self
                .to
                .send(Message::Line(String::from_utf8_lossy(&line).into_owned()));
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Runs one variant of one cell on a paused clock of its own; blocks the
/// calling thread until it is done.
pub fn run_one(
    experiment: &Experiment,
    cell: usize,
    variant: usize,
    progress: &mut (dyn Write + Send),
) -> anyhow::Result<VariantResult> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .context("cannot start a runtime for a simulated run")?;
    let variant = &experiment.cells[cell].variants[variant];
    runtime.block_on(async {
        let _dates = crate::clock::Simulated::start();
        variant::run_variant(
            experiment,
            cell,
            variant,
            None,
            true,
            None,
            Progress::Quiet,
            progress,
        )
        .await
    })
}

/// Runs every variant of every cell on `threads` threads (at least one);
/// each run's line goes to `progress` as it finishes. The first failed run
/// ends the whole (runs under way finish, no new one starts).
pub async fn run_all(
    experiment: &Experiment,
    threads: usize,
    progress: &mut (dyn Write + Send),
) -> anyhow::Result<(Vec<VariantResult>, Speed)> {
    let jobs: Vec<(usize, usize)> = experiment
        .cells
        .iter()
        .enumerate()
        .flat_map(|(c, cell)| (0..cell.variants.len()).map(move |v| (c, v)))
        .collect();
    let total = jobs.len();
    let threads = threads.clamp(1, total.max(1));
    let started = std::time::Instant::now();
    let shared = Arc::new((experiment.clone(), jobs));
    let next = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicBool::new(false));
    let (to, mut from) = mpsc::unbounded_channel();
    let mut handles = Vec::with_capacity(threads);
    for t in 0..threads {
        let (shared, next, failed, to) = (shared.clone(), next.clone(), failed.clone(), to.clone());
        let handle = std::thread::Builder::new()
            .name(format!("simulation-{t}"))
            .spawn(move || {
                let (experiment, jobs) = &*shared;
                let mut lines = Lines {
                    to: to.clone(),
                    pending: Vec::new(),
                };
                while !failed.load(Ordering::SeqCst) {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(&(cell, variant)) = jobs.get(i) else {
                        break;
                    };
                    let result = run_one(experiment, cell, variant, &mut lines);
                    if result.is_err() {
                        failed.store(true, Ordering::SeqCst);
                    }
                    let _ = to.send(Message::Done(i, Box::new(result)));
                }
            })
            .context("cannot start a simulation thread")?;
        handles.push(handle);
    }
    drop(to);

    let mut results: Vec<Option<VariantResult>> = (0..total).map(|_| None).collect();
    let mut first_error: Option<anyhow::Error> = None;
    let mut done = 0;
    while let Some(message) = from.recv().await {
        let (i, result) = match message {
            Message::Line(line) => {
                let _ = progress.write_all(line.as_bytes());
                continue;
            }
            Message::Done(i, result) => (i, *result),
        };
        match result {
            Ok(result) => {
                done += 1;
                let (cell, _) = shared.1[i];
                let label = experiment.cell_label(cell);
                let t = &result.record.totals;
                let _ = writeln!(
                    progress,
                    "{}: [{done}/{total}] {}{}: {} orders, {} completed, {} failed (simulated {})",
                    experiment.name,
                    if label.is_empty() {
                        String::new()
                    } else {
                        format!("{label}, ")
                    },
                    result.name,
                    t.accepted,
                    t.completed,
                    t.failed,
                    seconds(result.ran_for)
                );
                results[i] = Some(result);
            }
            Err(err) => {
                let (cell, variant) = shared.1[i];
                let label = experiment.cell_label(cell);
                let err = err.context(format!(
                    "variant {}{}",
                    experiment.cells[cell].variants[variant].name,
                    if label.is_empty() {
                        String::new()
                    } else {
                        format!(" in cell {label}")
                    }
                ));
                first_error.get_or_insert(err);
            }
        }
    }
    for handle in handles {
        if handle.join().is_err() {
            first_error.get_or_insert(anyhow::anyhow!("a simulation thread panicked"));
        }
    }
    if let Some(err) = first_error {
        return Err(err);
    }
    let results: Vec<VariantResult> = results
        .into_iter()
        .collect::<Option<Vec<_>>>()
        .context("a simulated run ended without a result")?;
    let speed = Speed {
        simulated: results.iter().map(|r| r.ran_for).sum(),
        wall: started.elapsed(),
        threads,
    };
    Ok((results, speed))
}

fn seconds(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}
