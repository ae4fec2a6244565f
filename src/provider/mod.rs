//! `reliability-lab provider`: the simulated payment provider as its own
//! HTTP service, so the lab's failures can cross a real network.
//!
//! The same simulator as the service's in-process one (its draws, modes,
//! capacity and ledger, seeded by `PAYMENT_SEED`), behind an API:
//! `POST /charges` (a charge at most once per `Idempotency-Key`; a
//! repeated key answers the first charge again), `GET /charges/{key}`,
//! `/healthz`, `/metrics`, `/openapi.json`, and the operator's
//! `/admin/payment` and `/admin/faults`. Plus the faults only a network
//! has (`faults`). How the simulator's outcomes arrive over HTTP:
//! - a charge: 200 with the charge;
//! - a drawn decline: 502 (`declined`), which callers retry;
//! - `outage` mode: 503 without `Retry-After`;
//! - a full provider (`PAYMENT_CAPACITY`, no slot within
//!   `PAYMENT_QUEUE_TIMEOUT`): 503 with `Retry-After: 1`;
//! - an ambiguous draw: the charge is made and the connection reset, so
//!   the answer is lost on the wire (as `reset_after`);
//! - `blackhole` mode: no answer (as `stall`).
//!
//! Its ledger is its own: in memory, or in Postgres with
//! `PAYMENT_LEDGER_URL`. With `--upstream URL` it is a tier in the middle
//! of a chain: it charges by calling that provider (`upstream`).

mod api;
pub mod upstream;

/// The network's faults live with the payment types (the service's admin
/// API forwards changes of them to a remote provider).
pub use crate::payment::faults;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{positive_duration, rate, socket_addr, token, LogArgs, SimulatorArgs};
use crate::http::auth::AdminToken;
use crate::http::server::{serve_resettable, Timeouts};
use crate::observability::logging;
use crate::orders::postgres::Lease;
use crate::orders::postgres::PostgresStore;
use crate::payment::{Ledger, MemoryLedger, PostgresLedger, Simulator};
use crate::transport::Listener;

use faults::{Fault, FaultSettings, FaultUpdate, Faults};
use upstream::{Upstream, UpstreamArgs};

fn slow_body_chunk(raw: &str) -> Result<u32, String> {
    match raw.trim().parse::<u32>() {
        Ok(n) if (1..=faults::SLOW_BODY_CHUNK_MAX).contains(&n) => Ok(n),
        _ => Err("expected a whole number of bytes from 1 to 65536".into()),
    }
}

fn rate_limit(raw: &str) -> Result<u32, String> {
    match raw.trim().parse::<u32>() {
        Ok(n) if n <= faults::RATE_LIMIT_MAX => Ok(n),
        _ => Err("expected charge calls per second from 0 (no limit) to 1000000".into()),
    }
}

fn fault_period(raw: &str) -> Result<Duration, String> {
    match positive_duration(raw)? {
        d if d <= faults::REFUSE_FOR_MAX => Ok(d),
        _ => Err("expected a duration above 0, at most 1h".into()),
    }
}

/// reliability-lab provider: the simulated payment provider as its own HTTP service.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "reliability-lab provider",
    version,
    about = "The simulated payment provider as its own HTTP service: POST /charges, its faults, its admin API.",
    long_about = None
)]
pub struct ProviderConfig {
    /// Address the provider listens on.
    #[arg(long, env = "LISTEN_ADDR", default_value = "0.0.0.0:8090", value_parser = socket_addr)]
    pub listen_addr: SocketAddr,

    /// Postgres URL for the provider's ledger; unset, charges are kept in memory.
    #[arg(long, env = "PAYMENT_LEDGER_URL", hide_env_values = true)]
    pub payment_ledger_url: Option<String>,

    /// Bearer token required by /admin; when unset it is open.
    #[arg(long, env = "ADMIN_TOKEN", hide_env_values = true, value_parser = token)]
    pub admin_token: Option<String>,

    #[command(flatten)]
    pub simulator: SimulatorArgs,

    /// The network fault drawn for charge calls: none, refuse, reset_before, reset_after, stall or slow_body.
    #[arg(long, env = "PROVIDER_FAULT", default_value = "none", value_parser = |raw: &str| raw.parse::<Fault>())]
    pub provider_fault: Fault,

    /// Share of charge calls that draw PROVIDER_FAULT, from 0 to 1.
    #[arg(long, env = "PROVIDER_FAULT_RATE", default_value = "0", value_parser = rate)]
    pub provider_fault_rate: f64,

    /// How long a drawn refuse takes the provider down (connections closed, new ones refused).
    #[arg(long, env = "PROVIDER_REFUSE_FOR", default_value = "2s", value_parser = fault_period)]
    pub provider_refuse_for: Duration,

    /// Bytes slow_body sends at a time (1 to 65536).
    #[arg(long, env = "PROVIDER_SLOW_BODY_CHUNK", default_value = "4", value_parser = slow_body_chunk)]
    pub provider_slow_body_chunk: u32,

    /// The wait between slow_body's pieces.
    #[arg(long, env = "PROVIDER_SLOW_BODY_INTERVAL", default_value = "100ms", value_parser = fault_period)]
    pub provider_slow_body_interval: Duration,

    /// Charge calls allowed per second; past it, 429 with Retry-After. 0: no limit.
    #[arg(long, env = "PROVIDER_RATE_LIMIT", default_value = "0", value_parser = rate_limit)]
    pub provider_rate_limit: u32,

    #[command(flatten)]
    pub upstream: UpstreamArgs,

    #[command(flatten)]
    pub log: LogArgs,
}

impl ProviderConfig {
    /// Every knob at its default, whatever the environment holds: for
    /// providers built in-process (tests).
    pub fn defaults() -> Self {
        use clap::{CommandFactory, FromArgMatches};
        let matches = Self::command()
            .mut_args(|arg| arg.env(None))
            .try_get_matches_from(["reliability-lab provider"])
            .expect("the defaults parse");
        Self::from_arg_matches(&matches).expect("the defaults parse")
    }

    /// The defaults with `settings` applied, each named by its environment
    /// variable (for an experiment's provider processes): an unknown name
    /// or a bad value is one line naming it.
    pub fn from_settings<'a>(
        settings: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, String> {
        let config: Self = crate::config::parse_settings("reliability-lab provider", settings)?;
        config.simulator.validate()?;
        config.upstream.validate()?;
        Ok(config)
    }

    pub fn faults(&self) -> FaultSettings {
        FaultSettings {
            fault: self.provider_fault,
            rate: self.provider_fault_rate,
            refuse_for: self.provider_refuse_for,
            slow_body_chunk: self.provider_slow_body_chunk,
            slow_body_interval: self.provider_slow_body_interval,
            rate_limit: self.provider_rate_limit,
        }
    }
}

/// `reliability-lab provider …`: parse, log, run until SIGINT or SIGTERM.
pub async fn main(args: Vec<String>) -> ExitCode {
    let args =
        std::iter::once("reliability-lab provider".to_owned()).chain(args.into_iter().skip(1));
    let config = match ProviderConfig::try_parse_from(args) {
        Ok(config) => config,
        Err(err)
            if matches!(
                err.kind(),
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
            ) =>
        {
            err.exit()
        }
        Err(err) => {
            eprintln!(
                "reliability-lab provider: {}",
                crate::config::one_line(&err)
            );
            return ExitCode::from(2);
        }
    };
    if let Err(line) = config
        .simulator
        .validate()
        .and_then(|()| config.upstream.validate())
    {
        eprintln!("reliability-lab provider: {line}");
        return ExitCode::from(2);
    }
    let _log_guard = match logging::init(config.log.log_format, &config.log.rust_log) {
        Ok(guard) => guard,
        Err(err) => {
            eprintln!("reliability-lab provider: cannot start logging: {err}");
            return ExitCode::from(2);
        }
    };
    let stop = CancellationToken::new();
    let result = match Provider::bind(config).await {
        Ok(provider) => {
            tracing::info!(addr = %provider.local_addr(), "payment provider listening");
            let stopping = stop.clone();
            tokio::spawn(async move {
                crate::app::shutdown_signal().await;
                stopping.cancel();
            });
            provider.run(stop).await;
            Ok(())
        }
        Err(err) => Err(err),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(
                error = format!("{err:#}"),
                "the provider stopped on an error"
            );
            ExitCode::FAILURE
        }
    }
}

/// What the handlers share.
pub(crate) struct ProviderState {
    pub simulator: Arc<Simulator>,
    pub faults: Faults,
    pub metrics: api::ProviderServiceMetrics,
    pub admin_token: Option<AdminToken>,
    /// A drawn `refuse` asks the serving loop to go down for this long.
    pub go_down: mpsc::UnboundedSender<Duration>,
    /// Fires at shutdown: calls in progress end.
    pub stop: CancellationToken,
    /// Numbers the calls that name no attempt, so each draws anew.
    pub calls: std::sync::atomic::AtomicU32,
    /// With `--upstream`: where charges are made instead of here.
    pub upstream: Option<Upstream>,
}

/// A provider bound to its address, ready to run.
pub struct Provider {
    state: Arc<ProviderState>,
    listener: TcpListener,
    /// Where it is bound (to listen again after a refuse) and where to reach it.
    bound: SocketAddr,
    addr: SocketAddr,
    down: mpsc::UnboundedReceiver<Duration>,
}

impl Provider {
    /// Builds the simulator and its ledger and binds the listener (port 0
    /// works; `local_addr` says which).
    pub async fn bind(config: ProviderConfig) -> anyhow::Result<Self> {
        let ledger: Arc<dyn Ledger> = match &config.payment_ledger_url {
            None => Arc::new(MemoryLedger::default()),
            Some(url) => {
                let store = PostgresStore::connect(
                    url,
                    10,
                    Duration::from_secs(30),
                    Lease::for_new_replica(Duration::from_secs(30)),
                )
                .await
                .map_err(|e| anyhow::anyhow!("PAYMENT_LEDGER_URL: {e:#}"))?;
                Arc::new(PostgresLedger::new(store.pool().clone()))
            }
        };
        let metrics = api::ProviderServiceMetrics::new();
        let mut simulator = Simulator::new(
            config.simulator.payment_settings(),
            config.simulator.payment_seed,
            ledger,
            metrics.provider.clone(),
        );
        if let Some(capacity) = config.simulator.payment_capacity() {
            simulator = simulator.with_capacity(capacity);
        }
        let listener = TcpListener::bind(config.listen_addr)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen_addr))?;
        let bound = listener.local_addr()?;
        let mut addr = bound;
        if addr.ip().is_unspecified() {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        let upstream =
            Upstream::new(&config.upstream, metrics.registry()).map_err(anyhow::Error::msg)?;
        if let Some(upstream) = &upstream {
            tracing::info!(
                url = upstream.url(),
                "charging through the upstream provider"
            );
        }
        let (go_down, down) = mpsc::unbounded_channel();
        let state = Arc::new(ProviderState {
            simulator: Arc::new(simulator),
            faults: Faults::new(config.faults(), config.simulator.payment_seed),
            metrics,
            admin_token: config.admin_token.as_deref().map(AdminToken::new),
            go_down,
            stop: CancellationToken::new(),
            calls: std::sync::atomic::AtomicU32::new(0),
            upstream,
        });
        if state.admin_token.is_none() {
            tracing::warn!(
                "ADMIN_TOKEN is unset: /admin is open to anyone who can reach this port"
            );
        }
        Ok(Self {
            state,
            listener,
            bound,
            addr,
            down,
        })
    }

    /// Where it listens (an unspecified address given as loopback).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Changes the faults, as `PUT /admin/faults` does.
    pub fn set_faults(&self, update: &FaultUpdate) -> Result<(), crate::payment::SettingsError> {
        self.state.faults.update(update).map(|_| ())
    }

    /// Serves until `stop` fires. A drawn `refuse` drops the listener and
    /// every connection, waits its period, and listens again on the same
    /// address.
    pub async fn run(self, stop: CancellationToken) {
        let Self {
            state,
            listener,
            bound,
            mut down,
            ..
        } = self;
        let router = api::router(state.clone());
        let mut listener = Some(listener);
        loop {
            let current = match listener.take() {
                Some(l) => l,
                None => match rebind(bound, &stop).await {
                    Some(l) => l,
                    None => break,
                },
            };
            let serving = serve_resettable(
                Listener::Tcp(current),
                router.clone(),
                Timeouts::default(),
                stop.clone(),
            );
            tokio::select! {
                _ = serving => break,
                Some(period) = down.recv() => {
                    // Dropping `serving` closed the listener and every
                    // connection (the call that drew the fault among them).
                    tracing::warn!(period = ?period, "refuse: the provider is down; connections are refused");
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(period) => {}
                    }
                    // Refusals asked for while down are spent.
                    while down.try_recv().is_ok() {}
                    tracing::warn!("refuse: the provider listens again");
                }
            }
        }
        state.stop.cancel();
    }
}

/// Listens on `addr` again, retrying for a few seconds while the port is
/// still held; None if it cannot, or if `stop` fires.
async fn rebind(addr: SocketAddr, stop: &CancellationToken) -> Option<TcpListener> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match TcpListener::bind(addr).await {
            Ok(listener) => return Some(listener),
            Err(err) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(error = %err, "cannot listen again yet");
                tokio::select! {
                    _ = stop.cancelled() => return None,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
            Err(err) => {
                tracing::error!(error = %err, %addr, "cannot listen again after a refuse; stopping");
                return None;
            }
        }
    }
}
