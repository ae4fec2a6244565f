//! The composition root: every part of the service is built here, adapted to
//! the interfaces the domain defines, started, and stopped in order.
//!
//! `main.rs` reads the configuration, starts logging and runs an `App` until
//! the OS asks it to stop. The in-process test harness, the benchmarks and
//! anything else that needs a service build it through `App` too, so there is
//! one wiring of the parts, not one per caller.
//!
//! Building binds the listener (port 0 works; `local_addr` tells which port)
//! and starts the workers and the background loops, but serves nothing until
//! `run_until_stopped`. The router can also be driven without a socket
//! (`router()`, for `oneshot` tests), and a whole service can be built to
//! serve over in-memory connections instead of a socket (`in_memory`, for
//! simulated runs on a paused clock).

use crate::payment::client::HttpPayments;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::http::{self, AdminToken, AppParts, AppState, LabHandles};
use crate::lab::{timeline, Feed, Instruments, LoadPlan, Timeline, Traffic};
use crate::observability::metrics::StoreMetrics;
use crate::observability::profiling::Profiler;
use crate::observability::Metrics;
use crate::orders::memory::MemoryStore;
use crate::orders::postgres::{Lease, PostgresStore};
use crate::orders::{
    Durability, OrderId, OrderRepository, ProcessingQueue, QueueError, QueueSlot, Service,
};
use crate::payment::{Ledger, MemoryLedger, PostgresLedger, Simulator};
use crate::reliability::{Breaker, Observers, Reliability};
use crate::transport::{self, Listener, Target};
use crate::workers::leases::{self, KEY_PURGE_EVERY};
use crate::workers::{
    deferred, DeferSettings, Deferral, Dispatcher, Job, OrderProcessor, Reservation, ReserveError,
};

/// How long cancelled workers get to hand their orders back before exit.
const CANCEL_GRACE: Duration = Duration::from_secs(5);

/// Adapts the dispatcher to the queue interface the orders module defines.
struct DispatcherQueue(Arc<Dispatcher>);

struct DispatcherSlot(Reservation);

impl QueueSlot for DispatcherSlot {
    fn submit(self: Box<Self>, order_id: OrderId) {
        self.0.send(Job { order_id });
    }

    fn resubmit(self: Box<Self>, order_id: OrderId) {
        self.0.resend(Job { order_id });
    }
}

fn slot(reserved: Result<Reservation, ReserveError>) -> Result<Box<dyn QueueSlot>, QueueError> {
    match reserved {
        Ok(reservation) => Ok(Box::new(DispatcherSlot(reservation))),
        Err(ReserveError::Full) => Err(QueueError::Full),
        Err(ReserveError::Closed) => Err(QueueError::Closed),
    }
}

impl ProcessingQueue for DispatcherQueue {
    fn try_reserve(&self) -> Result<Box<dyn QueueSlot>, QueueError> {
        slot(self.0.try_reserve())
    }

    fn try_reserve_background(&self) -> Result<Box<dyn QueueSlot>, QueueError> {
        slot(self.0.try_reserve_uncounted())
    }
}

/// Where orders and the provider's charges live.
#[derive(Clone)]
pub struct Stores {
    pub orders: Arc<dyn OrderRepository>,
    pub ledger: Arc<dyn Ledger>,
}

impl Stores {
    /// Both in this process's memory, at most `max_orders` orders (the
    /// oldest finished ones are evicted and counted in `evicted`).
    /// The ledger forgets an evicted order's charges, so the bound holds
    /// both.
    pub fn memory(max_orders: usize, evicted: prometheus::IntCounter) -> Self {
        let ledger = Arc::new(MemoryLedger::default());
        let forget = ledger.clone();
        Self {
            orders: Arc::new(
                MemoryStore::with_limit(max_orders, evicted).on_evict(move |id| forget.forget(id)),
            ),
            ledger,
        }
    }

    /// Both in Postgres, as a new replica with its own lease owner id.
    pub async fn postgres(
        url: &str,
        config: &Config,
        metrics: StoreMetrics,
    ) -> anyhow::Result<Self> {
        let lease = Lease::for_new_replica(config.job_lease);
        tracing::info!(replica = %lease.owner, job_lease = ?config.job_lease, "replica id for order leases");
        let store = PostgresStore::connect(
            url,
            config.database_max_connections,
            config.database_startup_timeout,
            lease,
        )
        .await?
        .with_group_commit(config.database_batch_max, metrics);
        // The simulated provider keeps its ledger in a database every
        // replica shares, so they see one provider, as with a real payment
        // API: the orders' own, or PAYMENT_LEDGER_URL's (the provider on
        // its own network path, reachable when the orders' database is not).
        let ledger_pool = match &config.payment_ledger_url {
            None => store.pool().clone(),
            Some(url) => PostgresStore::connect(
                url,
                config.database_max_connections,
                config.database_startup_timeout,
                Lease::for_new_replica(config.job_lease),
            )
            .await
            .map_err(|e| anyhow::anyhow!("PAYMENT_LEDGER_URL: {e:#}"))?
            .pool()
            .clone(),
        };
        let ledger = PostgresLedger::new(ledger_pool).with_group_commit(config.database_batch_max);
        Ok(Self {
            orders: Arc::new(store),
            ledger: Arc::new(ledger),
        })
    }
}

/// Builds an `App`, with the few choices that are not configuration.
pub struct AppBuilder {
    config: Config,
    stores: Option<Stores>,
    start_workers: bool,
    in_memory: bool,
}

impl AppBuilder {
    /// Uses these stores instead of the ones `DATABASE_URL` names.
    pub fn stores(mut self, stores: Stores) -> Self {
        self.stores = Some(stores);
        self
    }

    /// Builds with the workers not yet running: jobs queue up until
    /// `App::start_workers` (tests stage a queue this way).
    pub fn hold_workers(mut self) -> Self {
        self.start_workers = false;
        self
    }

    /// Serves over in-memory connections instead of binding `LISTEN_ADDR`:
    /// the traffic generator reaches the router through them, and nothing
    /// outside the process can. With this (and the memory store), nothing
    /// the service does waits on the operating system, so it can run on a
    /// paused tokio clock.
    pub fn in_memory(mut self) -> Self {
        self.in_memory = true;
        self
    }

    /// Builds every part, takes over expired leases once (durable stores),
    /// starts the workers and the background loops, and binds the listener.
    pub async fn build(self) -> anyhow::Result<App> {
        let config = self.config;
        let metrics = Arc::new(Metrics::new());
        let stores = match (self.stores, &config.database_url) {
            (Some(stores), _) => stores,
            (None, Some(url)) => Stores::postgres(url, &config, metrics.store()).await?,
            (None, None) => {
                tracing::info!(
                    max_orders = config.memory_max_orders,
                    "DATABASE_URL is unset: orders are kept in memory and lost on restart"
                );
                Stores::memory(config.memory_max_orders, metrics.evictions())
            }
        };
        let durability = stores.orders.durability();
        let store_kind = stores.orders.kind();

        let dispatcher = Arc::new(Dispatcher::new(config.queue_capacity, metrics.workers()));
        let mut service =
            Service::new(stores.orders, Arc::new(DispatcherQueue(dispatcher.clone())));
        // Ids follow the seed only in memory: a database outlives the
        // process, and a second run with the same seed would draw the ids it
        // already holds (every POST refused as a conflict).
        match config.simulator.payment_seed {
            Some(seed) if durability == Durability::None => {
                tracing::warn!(
                    seed,
                    "PAYMENT_SEED is set: runs are reproducible, and order ids are drawn from the seed, so they are predictable"
                );
                service = service.with_seeded_ids(seed);
            }
            Some(seed) => tracing::info!(
                seed,
                "PAYMENT_SEED is set: the provider's draws follow it; order ids stay random with a database"
            ),
            None => {}
        }
        let started = tokio::time::Instant::now();
        let feed = Arc::new(Feed::new(started));
        let reliability_metrics = metrics.reliability();
        let breaker = Breaker::new(
            config.breaker_config(),
            Some(Arc::new(Observers(vec![
                Arc::new(reliability_metrics.clone()),
                feed.clone(),
            ]))),
        );
        metrics.watch_breaker(&breaker);
        let reliability = Reliability::new(
            config.retry_policy(),
            breaker,
            Arc::new(reliability_metrics),
        )
        .with_budget(config.budget_config())
        .with_throttle(config.throttle_config(), config.simulator.payment_seed)
        .with_hedging(config.hedge_config())
        .with_limit(config.limit_config());
        reliability.set_switches(config.switches());
        metrics.watch_jitter(&reliability);
        metrics.watch_throttle(&reliability);
        metrics.watch_limit(&reliability);
        let mut payment = Simulator::new(
            config.payment_settings(),
            config.simulator.payment_seed,
            stores.ledger,
            metrics.provider(),
        );
        if let Some(capacity) = config.payment_capacity() {
            payment = payment.with_capacity(capacity);
        }
        let payment = Arc::new(payment);
        let remote = match config.payment_client() {
            Some(settings) => {
                let client = HttpPayments::new(&settings, metrics.payment_client())
                    .map_err(anyhow::Error::msg)?;
                tracing::info!(
                    url = client.url(),
                    max_connections = settings.max_connections,
                    "charging through the payment provider at PAYMENT_URL"
                );
                Some(Arc::new(client))
            }
            None => None,
        };
        let processor = Arc::new(
            OrderProcessor::new(
                service.clone(),
                payment.clone(),
                reliability.clone(),
                &metrics,
                config.payment_timeout,
            )
            .with_jitter_seed(config.simulator.payment_seed)
            .with_deferral(config.defer_settings())
            .with_remote(remote.clone(), config.payment_timeout_scope),
        );
        if self.start_workers {
            dispatcher.start(config.worker_count, processor.clone());
        }

        // With leases: take over what dead replicas left, once before serving
        // (so /readyz is not ready before it), then on an interval; and keep
        // this replica's own leases alive. Old Idempotency-Keys are forgotten
        // whatever the store.
        let background = TaskTracker::new();
        let stop_recovery = CancellationToken::new();
        let stop_heartbeat = CancellationToken::new();
        if durability == Durability::Durable {
            leases::recover(&service, &metrics.leases(), config.queue_capacity).await;
            background.spawn(leases::recovery_loop(
                service.clone(),
                metrics.leases(),
                config.recovery_interval,
                config.queue_capacity,
                stop_recovery.clone(),
            ));
            background.spawn(leases::heartbeat_loop(
                service.clone(),
                config.job_lease / 3,
                stop_heartbeat.clone(),
            ));
        }
        // Deferred orders go back in line once the breaker has closed. The
        // loop runs even with BREAKER_DEFER off: orders deferred before a
        // restart with it off still finish (or fail at their deadline).
        background.spawn(deferred::deferred_loop(
            Arc::new(Deferral {
                service: service.clone(),
                reliability: reliability.clone(),
                settings: DeferSettings {
                    max: config.defer_max,
                    rate: config.defer_rate,
                },
                metrics: metrics.defer(),
                jobs: metrics.workers(),
            }),
            stop_recovery.clone(),
        ));
        background.spawn(leases::key_purge_loop(
            service.clone(),
            KEY_PURGE_EVERY,
            stop_recovery.clone(),
        ));

        if config.admin_token.is_none() {
            tracing::warn!(
                "ADMIN_TOKEN is unset: /admin and /debug are open to anyone who can reach this port"
            );
        }
        let (listener, target) = if self.in_memory {
            let (connector, listener) = transport::memory();
            (Listener::Memory(listener), Target::Memory(connector))
        } else {
            let listener = TcpListener::bind(config.listen_addr)
                .await
                .with_context(|| format!("cannot listen on {}", config.listen_addr))?;
            let mut addr = listener.local_addr()?;
            // The generator reaches an unspecified address over loopback.
            if addr.ip().is_unspecified() {
                addr.set_ip(match addr {
                    SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                    SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
                });
            }
            (Listener::Tcp(listener), Target::Tcp(addr))
        };
        let local_addr = listener.local_addr();

        // The lab's instruments: the timeline records from now on; the
        // traffic generator sends to this service's own listener.
        let timeline = Arc::new(Timeline::new(
            config.timeline_interval,
            config.timeline_retention,
        ));
        let stop_recorder = CancellationToken::new();
        background.spawn(timeline.clone().record(
            timeline::Sources::new(
                metrics.clone(),
                dispatcher.clone(),
                reliability.clone(),
                payment.clone(),
            ),
            feed.clone(),
            stop_recorder.clone(),
        ));
        background.close();
        let instruments = Instruments {
            traffic: Arc::new(
                Traffic::new(
                    target,
                    metrics.load(),
                    feed.clone(),
                    config.simulator.payment_seed,
                    config.load_client(),
                )
                .with_max_duration(config.load_max_duration),
            ),
            feed,
            timeline,
            closing: CancellationToken::new(),
        };
        let boot_load = match config.load_rate {
            Some(rate) => Some(LoadPlan::new(rate, config.load_duration)?),
            None => None,
        };

        let handles = AppHandles {
            service,
            dispatcher,
            payment,
            remote,
            reliability,
            metrics,
            profiler: Arc::new(Profiler::new().with_longest(config.profile_max_duration)),
            instruments,
        };
        let router = http::router(AppState::new(AppParts {
            service: handles.service.clone(),
            metrics: handles.metrics.clone(),
            http_metrics: handles.metrics.http(),
            profiler: handles.profiler.clone(),
            lab: LabHandles {
                payment: handles.payment.clone(),
                remote: handles.remote.clone(),
                reliability: handles.reliability.clone(),
                queue: handles.dispatcher.clone(),
                workers: config.worker_count,
                started,
                instruments: handles.instruments.clone(),
            },
            admin_token: config.admin_token.as_deref().map(AdminToken::new),
        }));
        tracing::info!(
            addr = %local_addr.map_or_else(|| "in memory".to_owned(), |a| a.to_string()),
            store = store_kind,
            workers = config.worker_count,
            queue_capacity = config.queue_capacity,
            "reliability-lab listening"
        );
        Ok(App {
            handles,
            router,
            listener,
            local_addr,
            processor,
            workers: config.worker_count,
            shutdown_timeout: config.shutdown_timeout,
            http_timeouts: config.http_timeouts(),
            durability,
            background,
            stop_recovery,
            stop_heartbeat,
            stop_recorder,
            boot_load,
        })
    }
}

/// The running parts that tests, benchmarks and the lab's own instruments
/// may hold on to. Cheap to clone.
#[derive(Clone)]
pub struct AppHandles {
    pub service: Service,
    pub dispatcher: Arc<Dispatcher>,
    pub payment: Arc<Simulator>,
    /// With `PAYMENT_URL`: the client charges go through.
    pub remote: Option<Arc<HttpPayments>>,
    pub reliability: Reliability,
    pub metrics: Arc<Metrics>,
    pub profiler: Arc<Profiler>,
    pub instruments: Instruments,
}

/// A built service: parts running, listener bound, not yet serving.
pub struct App {
    handles: AppHandles,
    router: http::Api,
    listener: Listener,
    local_addr: Option<SocketAddr>,
    processor: Arc<OrderProcessor>,
    workers: usize,
    shutdown_timeout: Duration,
    http_timeouts: http::server::Timeouts,
    durability: Durability,
    background: TaskTracker,
    stop_recovery: CancellationToken,
    stop_heartbeat: CancellationToken,
    stop_recorder: CancellationToken,
    boot_load: Option<LoadPlan>,
}

impl App {
    /// Builds the service `config` describes.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        Self::builder(config).build().await
    }

    pub fn builder(config: Config) -> AppBuilder {
        AppBuilder {
            config,
            stores: None,
            start_workers: true,
            in_memory: false,
        }
    }

    /// The address the listener is bound to (none when built `in_memory`).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// The router, to drive without a socket.
    pub fn router(&self) -> http::Api {
        self.router.clone()
    }

    pub fn handles(&self) -> &AppHandles {
        &self.handles
    }

    /// Starts the workers of an app built with `hold_workers`.
    pub fn start_workers(&self) {
        self.handles
            .dispatcher
            .start(self.workers, self.processor.clone());
    }

    /// Serves (starting the boot traffic of `LOAD_RATE`, if set) until
    /// `shutdown` resolves, then stops in order under one `SHUTDOWN_TIMEOUT`
    /// deadline:
    ///
    /// 0. the traffic generator stops and its requests in flight finish;
    ///    event streams end;
    /// 1. the server stops accepting and finishes in-flight requests; lease
    ///    recovery and the deferral loop stop taking new work;
    /// 2. the queue closes and the workers drain every queued job;
    /// 3. if the deadline passes first, the workers are cancelled: each hands
    ///    its order back to pending;
    /// 4. the heartbeat stops and this replica's leases are released, so
    ///    another replica takes what is left at once.
    ///
    /// An error means the server failed by itself, before `shutdown`.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> anyhow::Result<()> {
        let stop_accepting = CancellationToken::new();
        let mut server = tokio::spawn(http::server::serve(
            self.listener,
            self.router,
            self.http_timeouts,
            stop_accepting.clone(),
        ));
        let traffic = &self.handles.instruments.traffic;
        if let Some(plan) = self.boot_load {
            tracing::info!(rate = plan.rate(), duration = ?plan.duration(), "LOAD_RATE is set: traffic starts now");
            traffic.start(plan)?;
        }
        tokio::select! {
            biased;
            _ = shutdown => tracing::info!("shutting down: no new connections; finishing in-flight requests"),
            result = &mut server => {
                result.context("HTTP server task failed")?;
                anyhow::bail!("HTTP server stopped by itself");
            }
        }
        let deadline = tokio::time::Instant::now() + self.shutdown_timeout;
        let dispatcher = &self.handles.dispatcher;

        // 0.
        traffic.shutdown(deadline).await;
        self.handles.instruments.closing.cancel();

        // 1.
        self.stop_recovery.cancel();
        stop_accepting.cancel();
        match tokio::time::timeout_at(deadline, &mut server).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::error!(error = %err, "HTTP server task failed while stopping"),
            Err(_) => {
                tracing::warn!("in-flight requests did not finish before SHUTDOWN_TIMEOUT");
                server.abort();
            }
        }

        // 2.
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
            // 3.
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

        // 4.
        self.stop_heartbeat.cancel();
        self.stop_recorder.cancel();
        self.background.wait().await;
        if self.durability == Durability::Durable {
            match self.handles.service.release_leases().await {
                Ok(n) => tracing::info!(released = n, "released this replica's leases"),
                Err(err) => {
                    tracing::warn!(error = %err, "could not release leases; they expire by themselves")
                }
            }
        }
        tracing::info!("shutdown complete");
        Ok(())
    }
}

/// Resolves on SIGINT or SIGTERM, logging which.
pub async fn shutdown_signal() {
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
    let signal = tokio::select! {
        _ = interrupt => "SIGINT",
        _ = terminate => "SIGTERM",
    };
    tracing::info!(signal, "stop requested");
}
