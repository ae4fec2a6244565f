//! The composition root: read the configuration, build the parts, adapt the
//! providers to the interfaces the domain defines, serve, and shut down in
//! order. Everything else lives in the library.

use std::future::IntoFuture;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use reliability_lab::config::Config;
use reliability_lab::http::{self, AdminToken, AppParts, AppState, LabHandles};
use reliability_lab::observability::profiling::Profiler;
use reliability_lab::observability::{logging, Metrics};
use reliability_lab::orders::memory::MemoryStore;
use reliability_lab::orders::postgres::{Lease, PostgresStore};
use reliability_lab::orders::{
    OrderId, OrderRepository, ProcessingQueue, QueueError, QueueSlot, Service,
};
use reliability_lab::payment::{Ledger, MemoryLedger, PostgresLedger, Simulator};
use reliability_lab::reliability::{Breaker, Reliability};
use reliability_lab::workers::{Dispatcher, Job, OrderProcessor, Reservation, ReserveError};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How often expired Idempotency-Keys are forgotten.
const KEY_PURGE_EVERY: Duration = Duration::from_secs(60 * 60);

/// How long cancelled workers get to hand their orders back before exit.
const CANCEL_GRACE: Duration = Duration::from_secs(5);

/// Adapts the dispatcher to the queue interface the orders module defines.
struct DispatcherQueue(Arc<Dispatcher>);

struct DispatcherSlot(Reservation);

impl QueueSlot for DispatcherSlot {
    fn submit(self: Box<Self>, order_id: OrderId) {
        self.0.send(Job { order_id });
    }
}

impl ProcessingQueue for DispatcherQueue {
    fn try_reserve(&self) -> Result<Box<dyn QueueSlot>, QueueError> {
        match self.0.try_reserve() {
            Ok(reservation) => Ok(Box::new(DispatcherSlot(reservation))),
            Err(ReserveError::Full) => Err(QueueError::Full),
            Err(ReserveError::Closed) => Err(QueueError::Closed),
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let config = match Config::load() {
        Ok(config) => config,
        Err(line) => {
            eprintln!("reliability-lab: {line}");
            return ExitCode::from(2);
        }
    };
    // Held until exit: dropping it flushes the log lines still buffered.
    let _log_guard = match logging::init(config.log_format, &config.rust_log) {
        Ok(guard) => guard,
        Err(err) => {
            eprintln!("reliability-lab: cannot start logging: {err}");
            return ExitCode::from(2);
        }
    };
    match run(config).await {
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

async fn run(config: Config) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());

    let (repo, ledger): (Arc<dyn OrderRepository>, Arc<dyn Ledger>) = match &config.database_url {
        Some(url) => {
            let lease = Lease::for_new_replica(config.job_lease);
            tracing::info!(replica = %lease.owner, job_lease = ?config.job_lease, "replica id for order leases");
            let store = PostgresStore::connect(
                url,
                config.database_max_connections,
                config.database_startup_timeout,
                lease,
            )
            .await?;
            // The simulated provider keeps its ledger in the same database,
            // so every replica sees one provider, as with a real payment API.
            let ledger = PostgresLedger::new(store.pool().clone());
            (Arc::new(store), Arc::new(ledger))
        }
        None => {
            tracing::info!("DATABASE_URL is unset: orders are kept in memory and lost on restart");
            (
                Arc::new(MemoryStore::new()),
                Arc::new(MemoryLedger::default()),
            )
        }
    };
    let durable = repo.durability() == "durable";
    let store = repo.kind();

    let dispatcher = Arc::new(Dispatcher::new(config.queue_capacity, metrics.clone()));
    let mut service = Service::new(repo, Arc::new(DispatcherQueue(dispatcher.clone())));
    if let Some(seed) = config.payment_seed {
        tracing::warn!(
            seed,
            "PAYMENT_SEED is set: runs are reproducible, and order ids are drawn from the seed, so they are predictable"
        );
        service = service.with_seeded_ids(seed);
    }
    let breaker = Breaker::new(config.breaker_config(), Some(metrics.clone()));
    let reliability = Reliability::new(config.retry_policy(), breaker, metrics.clone());
    reliability.set_switches(config.switches());
    let payment = Arc::new(Simulator::new(
        config.payment_settings(),
        config.payment_seed,
        ledger,
        metrics.provider(),
    ));
    dispatcher.start(
        config.worker_count,
        Arc::new(OrderProcessor::new(
            service.clone(),
            payment.clone(),
            reliability.clone(),
            metrics.clone(),
            config.payment_timeout,
        )),
    );

    // With leases: take over what dead replicas left, once before serving
    // (so /readyz is not ready before it), then on an interval; and keep this
    // replica's own leases alive.
    let background = TaskTracker::new();
    let stop_recovery = CancellationToken::new();
    let stop_heartbeat = CancellationToken::new();
    if durable {
        recover(&service, &metrics, config.queue_capacity).await;
        background.spawn(recovery_loop(
            service.clone(),
            metrics.clone(),
            config.recovery_interval,
            config.queue_capacity,
            stop_recovery.clone(),
        ));
        background.spawn(heartbeat_loop(
            service.clone(),
            config.job_lease / 3,
            stop_heartbeat.clone(),
        ));
    }
    background.close();

    if config.admin_token.is_none() {
        tracing::warn!(
            "ADMIN_TOKEN is unset: /admin and /debug are open to anyone who can reach this port"
        );
    }
    let app = http::router(AppState::new(AppParts {
        service: service.clone(),
        metrics,
        profiler: Profiler::new(),
        lab: LabHandles {
            payment,
            reliability,
            queue: dispatcher.clone(),
            workers: config.worker_count,
            started: tokio::time::Instant::now(),
        },
        admin_token: config.admin_token.as_deref().map(AdminToken::new),
    }));
    let listener = tokio::net::TcpListener::bind(config.listen_addr)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen_addr))?;
    tracing::info!(
        addr = %listener.local_addr()?,
        store,
        workers = config.worker_count,
        queue_capacity = config.queue_capacity,
        "reliability-lab listening"
    );

    let stop_accepting = CancellationToken::new();
    let mut server = tokio::spawn(
        axum::serve(listener, app)
            .with_graceful_shutdown(stop_accepting.clone().cancelled_owned())
            .into_future(),
    );

    tokio::select! {
        signal = shutdown_signal() => tracing::info!(signal, "shutting down: no new connections; finishing in-flight requests"),
        result = &mut server => {
            result.context("HTTP server task failed")?.context("HTTP server failed")?;
            anyhow::bail!("HTTP server stopped by itself");
        }
    }
    let deadline = tokio::time::Instant::now() + config.shutdown_timeout;

    // 1. The HTTP server stops accepting and finishes in-flight requests;
    //    recovery stops taking new work.
    stop_recovery.cancel();
    stop_accepting.cancel();
    match tokio::time::timeout_at(deadline, &mut server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(err))) => tracing::error!(error = %err, "HTTP server failed while stopping"),
        Ok(Err(err)) => tracing::error!(error = %err, "HTTP server task failed while stopping"),
        Err(_) => {
            tracing::warn!("in-flight requests did not finish before SHUTDOWN_TIMEOUT");
            server.abort();
        }
    }

    // 2. The queue closes; workers finish the jobs already queued.
    dispatcher.stop();
    tracing::info!(
        queued = dispatcher.depth(),
        busy = dispatcher.busy(),
        "draining the job queue"
    );
    if tokio::time::timeout_at(deadline, dispatcher.wait())
        .await
        .is_err()
    {
        // 3. Out of time: cancel the workers; each hands its order back to pending.
        tracing::warn!(
            queued = dispatcher.depth(),
            busy = dispatcher.busy(),
            "SHUTDOWN_TIMEOUT reached; cancelling workers (their orders go back to pending)"
        );
        dispatcher.cancel();
        if tokio::time::timeout(CANCEL_GRACE, dispatcher.wait())
            .await
            .is_err()
        {
            tracing::error!("workers did not stop after cancellation");
        }
    }
    // 4. Leases: stop renewing, and let go of what is left (orders queued but
    //    never started, orders handed back) so another replica takes them at
    //    once instead of waiting out the lease.
    stop_heartbeat.cancel();
    background.wait().await;
    if durable {
        match service.release_leases().await {
            Ok(n) => tracing::info!(released = n, "released this replica's leases"),
            Err(err) => {
                tracing::warn!(error = %err, "could not release leases; they expire by themselves")
            }
        }
    }
    tracing::info!("shutdown complete");
    Ok(())
}

/// One recovery pass: take over expired leases, as many as the queue has room for.
async fn recover(service: &Service, metrics: &Metrics, capacity: usize) {
    match service.recover_expired(capacity).await {
        Ok(n) => metrics.orders_recovered_total.inc_by(n as u64),
        Err(err) => tracing::warn!(error = %err, "recovery pass failed; will try again"),
    }
}

async fn recovery_loop(
    service: Service,
    metrics: Arc<Metrics>,
    every: Duration,
    capacity: usize,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Keys are kept a day: forgetting them hourly is often enough.
    let mut purge = tokio::time::interval(KEY_PURGE_EVERY);
    purge.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => recover(&service, &metrics, capacity).await,
            _ = purge.tick() => {
                if let Err(err) = service.purge_old_keys().await {
                    tracing::warn!(error = %err, "purging old idempotency keys failed");
                }
            }
        }
    }
}

async fn heartbeat_loop(service: Service, every: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(err) = service.renew_leases().await {
            tracing::warn!(error = %err, "renewing leases failed; another replica may take our orders over");
        }
    }
}

/// Resolves on SIGINT or SIGTERM, naming which.
async fn shutdown_signal() -> &'static str {
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => "SIGINT",
        _ = terminate => "SIGTERM",
    }
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
