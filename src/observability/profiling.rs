//! CPU and heap profiles, served on the same router as the API.
//!
//! - CPU: pprof-rs samples the process at 99 Hz for the requested time. Its
//!   default unwinder is not async-signal-safe (pprof-rs issue 36: deadlocks
//!   when the signal lands inside `dl_iterate_phdr` or the allocator), so
//!   frames from libc, libgcc, pthread and the vDSO are blocklisted. One CPU
//!   profile runs at a time; a second request gets 429 instead of a second
//!   sampler (pprof-rs itself refuses a second profiler with `Error::Running`).
//! - Flame graph: the same report folded into stacks and rendered to SVG with
//!   a current inferno. pprof-rs's own `flamegraph` feature is not used: it
//!   pulls quick-xml 0.26, which has two RustSec advisories.
//! - Heap: jemalloc's sampling heap profiler (the binary installs jemalloc as
//!   the global allocator with `prof:true`), dumped in pprof format with
//!   function names resolved in process, so `go tool pprof -top` shows Rust
//!   functions. When the allocator does not profile (another platform, or a
//!   test binary), the endpoint says so instead of answering an empty file.

use std::fmt::Write as _;
use std::time::Duration;

use pprof::protos::Message;
use tokio::sync::Mutex;

/// Profiles `/debug/pprof/` offers, with what each one is.
pub const PROFILES: [(&str, &str); 3] = [
    (
        "profile",
        "CPU profile in pprof protobuf format; ?seconds=N (1 to 120, default 30)",
    ),
    (
        "flamegraph",
        "CPU profile as an SVG flame graph; ?seconds=N (1 to 120, default 30)",
    ),
    (
        "heap",
        "heap profile (jemalloc, sampled) in gzipped pprof protobuf format",
    ),
];

/// Why a profile could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("a CPU profile is already being taken; try again when it ends")]
    Busy,
    #[error("heap profiling is not available: {0}")]
    HeapUnavailable(&'static str),
    #[error("profiling failed: {0}")]
    Failed(String),
}

/// Serialises CPU profiles: one at a time, each for at most `longest`
/// when set (PROFILE_MAX_DURATION).
#[derive(Default)]
pub struct Profiler {
    cpu: Mutex<()>,
    longest: Option<Duration>,
}

impl Profiler {
    pub fn new() -> Self {
        Self::default()
    }

    /// A CPU profile asked for longer than `longest` samples for `longest`.
    pub fn with_longest(mut self, longest: Option<Duration>) -> Self {
        self.longest = longest;
        self
    }

    /// How long a profile asked for `asked` samples.
    fn bounded(&self, asked: Duration) -> Duration {
        self.longest.map_or(asked, |longest| asked.min(longest))
    }

    /// Takes the one CPU profile slot without sampling: while the returned
    /// guard lives, every profile request is refused with `Busy`. A test
    /// takes it to see the refusal without racing two real profiles.
    pub fn hold(&self) -> Result<tokio::sync::MutexGuard<'_, ()>, ProfileError> {
        self.cpu.try_lock().map_err(|_| ProfileError::Busy)
    }

    async fn sample(&self, duration: Duration) -> Result<pprof::Report, ProfileError> {
        let duration = self.bounded(duration);
        let _only_one = self.hold()?;
        let guard = pprof::ProfilerGuardBuilder::default()
            .frequency(99)
            .blocklist(&["libc", "libgcc", "pthread", "vdso"])
            .build()
            .map_err(|e| match e {
                pprof::Error::Running => ProfileError::Busy,
                other => ProfileError::Failed(other.to_string()),
            })?;
        tokio::time::sleep(duration).await;
        let report = guard
            .report()
            .build()
            .map_err(|e| ProfileError::Failed(e.to_string()))?;
        // Dropping the guard stops the sampler before the report is encoded.
        drop(guard);
        Ok(report)
    }

    /// A CPU profile in pprof protobuf format.
    pub async fn cpu_pprof(&self, duration: Duration) -> Result<Vec<u8>, ProfileError> {
        let report = self.sample(duration).await?;
        let profile = report
            .pprof()
            .map_err(|e| ProfileError::Failed(e.to_string()))?;
        Ok(profile.encode_to_vec())
    }

    /// A CPU profile rendered as an SVG flame graph.
    pub async fn cpu_flamegraph(&self, duration: Duration) -> Result<Vec<u8>, ProfileError> {
        let report = self.sample(duration).await?;
        let folded = fold(&report);
        let mut options = inferno::flamegraph::Options::default();
        options.title = format!(
            "reliability-lab CPU, {}",
            crate::units::format_duration(self.bounded(duration))
        );
        let mut svg = Vec::new();
        if folded.is_empty() {
            // inferno refuses empty input; an idle process still gets a valid SVG.
            options
                .title
                .push_str(" (no samples: the process was idle)");
            inferno::flamegraph::from_lines(&mut options, ["idle 1"], &mut svg)
        } else {
            inferno::flamegraph::from_lines(
                &mut options,
                folded.iter().map(String::as_str),
                &mut svg,
            )
        }
        .map_err(|e| ProfileError::Failed(e.to_string()))?;
        Ok(svg)
    }
}

/// Folds a report into `thread;root;...;leaf count` lines, the input flame
/// graph renderers read.
fn fold(report: &pprof::Report) -> Vec<String> {
    report
        .data
        .iter()
        .map(|(frames, count)| {
            let mut line = frames.thread_name_or_id();
            for frame in frames.frames.iter().rev() {
                for symbol in frame.iter().rev() {
                    let _ = write!(line, ";{symbol}");
                }
            }
            let _ = write!(line, " {count}");
            line
        })
        .collect()
}

/// A heap profile in gzipped pprof format, symbolized in process.
pub async fn heap_pprof() -> Result<Vec<u8>, ProfileError> {
    let Some(ctl) = jemalloc_pprof::PROF_CTL.as_ref() else {
        return Err(ProfileError::HeapUnavailable(
            "the allocator is not jemalloc with profiling enabled (prof:true) in this build",
        ));
    };
    let mut ctl = ctl.clone().lock_owned().await;
    if !ctl.activated() {
        return Err(ProfileError::HeapUnavailable(
            "jemalloc heap profiling is switched off (prof_active:false)",
        ));
    }
    // Dumping and symbolizing reads files and takes a while: keep it off the
    // async workers.
    tokio::task::spawn_blocking(move || ctl.dump_pprof())
        .await
        .map_err(|e| ProfileError::Failed(e.to_string()))?
        .map_err(|e| ProfileError::Failed(format!("{e:#}")))
}
