//! The binary: read the configuration, start logging, build the service
//! (`app.rs` holds all the wiring) and run it until SIGINT or SIGTERM.

use std::process::ExitCode;

use reliability_lab::app::App;
use reliability_lab::config::Config;
use reliability_lab::observability::logging;

#[tokio::main]
async fn main() -> ExitCode {
    // `reliability-lab experiment …` runs experiments, `healthcheck` asks a
    // running service whether it is ready, `provider` runs the simulated
    // payment provider as its own service; anything else runs the service.
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).is_some_and(|a| a == "healthcheck") {
        return reliability_lab::healthcheck::main(args[2..].to_vec()).await;
    }
    if args.get(1).is_some_and(|a| a == "provider") {
        return reliability_lab::provider::main(args[1..].to_vec()).await;
    }
    if args.get(1).is_some_and(|a| a == "experiment") {
        let _log_guard = logging::init(logging_format_for_experiments(), "error").ok();
        return reliability_lab::experiment::main(args[1..].to_vec()).await;
    }
    let config = match Config::load() {
        Ok(config) => config,
        Err(line) => {
            eprintln!("reliability-lab: {line}");
            return ExitCode::from(2);
        }
    };
    // Held until exit: dropping it flushes the log lines still buffered.
    let _log_guard = match logging::init(config.log.log_format, &config.log.rust_log) {
        Ok(guard) => guard,
        Err(err) => {
            eprintln!("reliability-lab: cannot start logging: {err}");
            return ExitCode::from(2);
        }
    };
    let result = match App::build(config).await {
        Ok(app) => {
            app.run_until_stopped(reliability_lab::app::shutdown_signal())
                .await
        }
        Err(err) => Err(err),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(
                error = format!("{err:#}"),
                "reliability-lab stopped on an error"
            );
            ExitCode::FAILURE
        }
    }
}

/// Experiments print progress and verdicts on stderr; the services they
/// build log only errors, as readable lines (retries and breaker changes are
/// the experiment's subject, and its report counts them).
fn logging_format_for_experiments() -> reliability_lab::observability::logging::LogFormat {
    reliability_lab::observability::logging::LogFormat::Pretty
}

// jemalloc is the allocator so that `/debug/pprof/heap` has something to read:
// its sampling heap profiler is switched on at startup through the exported
// `malloc_conf` symbol (one sample per 512 KiB allocated on average), and its
// background thread returns freed memory to the system, which keeps the
// resident size from staying at its peak after a profile.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(non_upper_case_globals)]
#[export_name = "malloc_conf"]
pub static malloc_conf: &[u8] =
    b"prof:true,prof_active:true,lg_prof_sample:19,background_thread:true\0";
