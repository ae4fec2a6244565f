//! Experiments with replicas: each variant is `replicas` processes of this
//! binary sharing one Postgres, the traffic split evenly between them (each
//! replica's own generator, started through `PUT /admin/load` once all are
//! listening), and a schedule that may SIGKILL one of them.
//!
//! Processes, not in-process services, because the point is a replica dying
//! with work in hand: its leases stop being renewed, and another replica
//! must take its orders over. The figures therefore come from where the
//! truth is after a crash: the database (orders, the shared payment ledger,
//! leases), counting only the orders created since the variant started; the
//! replicas' timelines (polled over HTTP, up to the kill for the killed one)
//! give the rates, retries and rejections, and the charts.
//!
//! Takeover is watched from the database every 100 ms: an order held at the
//! kill counts as taken over once another replica owns its lease or has
//! leased it. The time is measured on this process's clock, so it is an
//! upper bound by at most one watch period plus a query.

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Row};
use tokio::process::Child;
use tokio::time::Instant;
use uuid::Uuid;

use super::figures::{self, FaultWindow, RunRecord, Takeover};
use super::file::{replica_name, Experiment, FaultMark, Step, Variant};
use super::process::{request, sigterm, start_process};
use super::relay::{upstream_of, Relay};
use super::variant::{check_traffic, VariantResult, DRAIN_LIMIT};
use crate::lab::{LoadOutcomes, Sample};
use crate::observability::latency::{LatencyHistogram, Snapshot};
use crate::observability::metrics::Totals;

/// How often the takeover of a killed replica's orders is looked for.
const WATCH_PERIOD: Duration = Duration::from_millis(100);
/// How often the replicas' timelines are read.
const POLL_PERIOD: Duration = Duration::from_secs(1);
/// How long a replica may take to stop after SIGTERM.
const STOP_LIMIT: Duration = Duration::from_secs(30);

/// One replica process.
struct Replica {
    name: String,
    child: Child,
    addr: SocketAddr,
    /// Its lease owner id, from its log.
    owner: String,
    samples: Vec<Sample>,
    last_seq: u64,
    logs: Arc<Mutex<VecDeque<String>>>,
    alive: bool,
}

impl Replica {
    fn last_logs(&self) -> String {
        let logs = self.logs.lock().unwrap_or_else(|p| p.into_inner());
        logs.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

/// Starts one replica and waits until it listens.
async fn spawn(binary: &Path, name: String, env: &[(String, String)]) -> anyhow::Result<Replica> {
    let started = start_process(
        binary,
        &[],
        &format!("replica {name}"),
        env,
        "reliability-lab listening",
        true,
    )
    .await?;
    Ok(Replica {
        name,
        child: started.child,
        addr: started.addr,
        owner: started.owner,
        samples: Vec::new(),
        last_seq: 0,
        logs: started.logs,
        alive: true,
    })
}

#[derive(Deserialize)]
struct TimelinePage {
    last_seq: u64,
    samples: Vec<Sample>,
}

/// Reads what is new on a replica's timeline, with `t` put on the run's
/// clock (seconds since `start`).
async fn poll(replica: &mut Replica, start: DateTime<Utc>, token: Option<&str>) {
    let path = format!("/admin/timeline?since={}", replica.last_seq);
    let page = match request(replica.addr, "GET", &path, None, token).await {
        Ok((200, body)) => serde_json::from_slice::<TimelinePage>(&body).ok(),
        _ => None,
    };
    if let Some(page) = page {
        replica.last_seq = page.last_seq.max(replica.last_seq);
        for mut s in page.samples {
            s.t = (s.at - start).num_milliseconds() as f64 / 1000.0;
            if s.t > 0.0 {
                replica.samples.push(s);
            }
        }
    }
}

/// A replica's generator: whether it is done, and what its requests came to.
async fn load_status(r: &Replica, token: Option<&str>) -> Option<(bool, LoadOutcomes)> {
    let (status, body) = request(r.addr, "GET", "/admin/load", None, token)
        .await
        .ok()?;
    if status != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
    let done = v["running"] == false && v["in_flight"] == 0;
    Some((done, serde_json::from_value(v["outcomes"].clone()).ok()?))
}

fn add(total: &mut LoadOutcomes, more: LoadOutcomes) {
    total.accepted += more.accepted;
    total.rejected += more.rejected;
    total.client_error += more.client_error;
    total.server_error += more.server_error;
    total.transport_error += more.transport_error;
    total.skipped += more.skipped;
    total.timed_out += more.timed_out;
}

/// Counts of the orders created since `since`, by status.
async fn counts(pool: &PgPool, since: DateTime<Utc>) -> anyhow::Result<(u64, u64, u64)> {
    let row = sqlx::query(
        "SELECT count(*) AS accepted,
                count(*) FILTER (WHERE status = 'completed') AS completed,
                count(*) FILTER (WHERE status = 'failed') AS failed
           FROM orders WHERE created_at >= $1",
    )
    .bind(since)
    .fetch_one(pool)
    .await?;
    let get = |c: &str| -> u64 { row.try_get::<i64, _>(c).unwrap_or(0).max(0) as u64 };
    Ok((get("accepted"), get("completed"), get("failed")))
}

/// The orders of `watched` another replica than `killed` has taken over.
async fn taken_over(pool: &PgPool, watched: &[Uuid], killed: &str) -> anyhow::Result<Vec<Uuid>> {
    Ok(sqlx::query_scalar(
        "SELECT o.id FROM orders o
          WHERE o.id = ANY($1)
            AND ((o.lease_owner IS NOT NULL AND o.lease_owner <> $2)
                 OR EXISTS (SELECT 1 FROM order_lease_history h
                             WHERE h.order_id = o.id AND h.owner <> $2))",
    )
    .bind(watched)
    .bind(killed)
    .fetch_all(pool)
    .await?)
}

/// A count summed over samples from their rates.
fn summed(replicas: &[Replica], rate: fn(&Sample) -> f64) -> u64 {
    replicas
        .iter()
        .flat_map(|r| &r.samples)
        .map(|s| rate(s) * s.interval)
        .sum::<f64>()
        .round() as u64
}

/// Runs one variant as `experiment.replicas` processes of `binary`: start
/// them, start their traffic, follow the schedule until the orders drain,
/// stop them, and read the figures from the database and their timelines.
pub async fn run_variant(
    experiment: &Experiment,
    variant: &Variant,
    database_url: &str,
    binary: &Path,
    progress: &mut (dyn Write + Send),
) -> anyhow::Result<VariantResult> {
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(crate::orders::pg_tls::connect_options(database_url)?)
        .await
        .context("cannot connect to Postgres (--database-url)")?;
    let token = variant
        .settings
        .iter()
        .find(|(k, _)| k == "ADMIN_TOKEN")
        .map(|(_, v)| v.clone());
    let token = token.as_deref();

    // With a cut in the schedule, each replica reaches Postgres through a
    // relay of its own (the partition), and the provider's ledger directly
    // (PAYMENT_LEDGER_URL): cut off, a replica still reaches the provider.
    let partitioned = experiment.schedule.iter().any(|s| s.cut.is_some());
    let mut relays: Vec<Relay> = Vec::new();
    if partitioned {
        let upstream = upstream_of(database_url)
            .await
            .context("the database's address, for the replicas' relays")?;
        for _ in 0..experiment.replicas {
            relays.push(Relay::start(upstream).await.context("starting a relay")?);
        }
    }
    let mut replicas =
        start_replicas(experiment, variant, database_url, binary, &relays, progress).await?;

    let since: DateTime<Utc> = sqlx::query_scalar("SELECT now()").fetch_one(&pool).await?;
    let start = Instant::now();
    let start_wall = Utc::now();
    start_traffic(experiment, variant, &replicas, token).await?;

    let mut watch = Watch {
        pool: &pool,
        variant,
        start,
        start_wall,
        since,
        token,
        fault_start: None,
        fault_end: None,
        kill: None,
        in_hand: Vec::new(),
        watched: Vec::new(),
        takeover_times: HashMap::new(),
        traffic: LoadOutcomes::default(),
    };
    let drained = watch
        .until_drained(experiment, &mut replicas, &mut relays, progress)
        .await?;
    if !drained {
        let _ = writeln!(
            progress,
            "  {}: orders still open after {DRAIN_LIMIT:?}; figures count what finished",
            variant.name
        );
    }
    // One more sample from each survivor, then stop them as an operator would.
    tokio::time::sleep(variant.config.timeline_interval * 2).await;
    stop_replicas(&mut replicas, start_wall, token, progress).await;

    check_traffic(&variant.name, &watch.traffic, progress)?;
    let record = record(
        &pool,
        since,
        &replicas,
        watch.kill.is_some(),
        &watch.in_hand,
        &watch.takeover_times,
        variant,
    )
    .await?;
    let record = RunRecord {
        fault: watch.fault_start.map(|start| FaultWindow {
            start,
            end: watch.fault_end,
        }),
        ..record
    };
    pool.close().await;
    let figures = figures::compute(&record);
    Ok(VariantResult {
        name: variant.name.clone(),
        cell: 0,
        record,
        figures,
        ran_for: start.elapsed(),
    })
}

/// Starts the replicas one after another (the first creates the tables),
/// each with the variant's settings, its own seed, and its relay to
/// Postgres when there is one.
async fn start_replicas(
    experiment: &Experiment,
    variant: &Variant,
    database_url: &str,
    binary: &Path,
    relays: &[Relay],
    progress: &mut (dyn Write + Send),
) -> anyhow::Result<Vec<Replica>> {
    let retention = experiment.duration + DRAIN_LIMIT + Duration::from_secs(60);
    let mut replicas: Vec<Replica> = Vec::new();
    for i in 0..experiment.replicas {
        let mut env: Vec<(String, String)> = variant
            .settings
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "LOAD_RATE" | "LOAD_DURATION"))
            .cloned()
            .collect();
        match relays.get(i) {
            Some(relay) => {
                env.push(("DATABASE_URL".into(), relay.url_for(database_url)?));
                env.push(("PAYMENT_LEDGER_URL".into(), database_url.into()));
            }
            None => env.push(("DATABASE_URL".into(), database_url.into())),
        }
        env.push((
            "PAYMENT_SEED".into(),
            (experiment.seed + i as u64).to_string(),
        ));
        env.push((
            "TIMELINE_RETENTION".into(),
            format!("{}s", retention.as_secs()),
        ));
        let replica = spawn(binary, replica_name(i), &env).await?;
        let _ = writeln!(
            progress,
            "  {:<24} replica {} listening on {} (lease owner {})",
            variant.name, replica.name, replica.addr, replica.owner
        );
        replicas.push(replica);
    }
    Ok(replicas)
}

/// Starts every replica's own generator at its share of the variant's rate.
async fn start_traffic(
    experiment: &Experiment,
    variant: &Variant,
    replicas: &[Replica],
    token: Option<&str>,
) -> anyhow::Result<()> {
    let share = variant.rate / experiment.replicas as f64;
    let load = serde_json::json!({
        "rate": share,
        "duration": format!("{}ms", experiment.duration.as_millis()),
    })
    .to_string();
    for r in replicas {
        let (status, body) = request(r.addr, "PUT", "/admin/load", Some(load.clone()), token)
            .await
            .with_context(|| format!("replica {}: starting its traffic", r.name))?;
        if !(200..300).contains(&status) {
            bail!(
                "replica {}: PUT /admin/load answered {status}: {}",
                r.name,
                String::from_utf8_lossy(&body)
            );
        }
    }
    Ok(())
}

/// What the run saw while the replicas ran: the schedule's marks, the
/// replica lost (killed or cut off) and its orders' takeover, and the
/// generators' outcomes.
struct Watch<'a> {
    pool: &'a PgPool,
    variant: &'a Variant,
    start: Instant,
    start_wall: DateTime<Utc>,
    /// Postgres's clock when the variant began: orders since count.
    since: DateTime<Utc>,
    token: Option<&'a str>,
    fault_start: Option<f64>,
    fault_end: Option<f64>,
    /// The lost replica's owner id and when it was lost.
    kill: Option<(String, Instant)>,
    /// The orders it held then, and those not yet taken over.
    in_hand: Vec<Uuid>,
    watched: Vec<Uuid>,
    takeover_times: HashMap<Uuid, f64>,
    /// What the generators' requests came to: the killed replica's up to
    /// its kill, the survivors' at the end.
    traffic: LoadOutcomes,
}

impl Watch<'_> {
    /// Follows the schedule and the takeover until the traffic is over and
    /// every order finished (true), or the drain's limit passed (false).
    async fn until_drained(
        &mut self,
        experiment: &Experiment,
        replicas: &mut [Replica],
        relays: &mut [Relay],
        progress: &mut (dyn Write + Send),
    ) -> anyhow::Result<bool> {
        let start = self.start;
        let mut steps = experiment.schedule.iter().peekable();
        let end = start + experiment.duration;
        let mut next_poll = start + POLL_PERIOD;
        let mut next_report = start;
        let drain_deadline = end + DRAIN_LIMIT;
        loop {
            tokio::time::sleep(WATCH_PERIOD).await;
            let now = Instant::now();
            while let Some(step) = steps.next_if(|s| start + s.at <= now) {
                self.apply(step, replicas, relays, progress).await?;
            }
            self.see_takeovers().await?;
            if now >= next_poll {
                for r in replicas.iter_mut().filter(|r| r.alive) {
                    poll(r, self.start_wall, self.token).await;
                }
                next_poll = now + POLL_PERIOD;
            }
            let traffic_over = now >= end && steps.peek().is_none();
            // The database is asked only when a progress line or the drain needs it.
            if now < next_report && !traffic_over {
                continue;
            }
            let (accepted, completed, failed) = counts(self.pool, self.since).await?;
            if now >= next_report {
                let t = now.duration_since(start).as_secs_f64();
                let _ = writeln!(
                    progress,
                    "  {:<24} {t:>5.1}s / {:.0}s  {accepted} orders, {completed} completed, {failed} failed",
                    self.variant.name,
                    experiment.duration.as_secs_f64(),
                );
                next_report = now + Duration::from_secs(2);
            }
            if traffic_over {
                let (loads_done, survivors) = self.survivors_traffic(replicas).await;
                if (loads_done && accepted == completed + failed) || now >= drain_deadline {
                    add(&mut self.traffic, survivors);
                    return Ok(loads_done && accepted == completed + failed);
                }
            }
        }
    }

    /// One step of the schedule: a kill, a cut, a heal, a fault's mark.
    async fn apply(
        &mut self,
        step: &Step,
        replicas: &mut [Replica],
        relays: &mut [Relay],
        progress: &mut (dyn Write + Send),
    ) -> anyhow::Result<()> {
        let t = Instant::now().duration_since(self.start).as_secs_f64();
        // The replica whose orders are lost to the others, and how.
        let mut lost: Option<(usize, &str)> = None;
        if let Some(index) = step.kill {
            let r = &mut replicas[index];
            // Its samples and its traffic up to the moment it dies.
            poll(r, self.start_wall, self.token).await;
            if let Some((_, outcomes)) = load_status(r, self.token).await {
                add(&mut self.traffic, outcomes);
            }
            r.child.start_kill().context("SIGKILL")?;
            let _ = r.child.wait().await;
            r.alive = false;
            lost = Some((index, "killed (SIGKILL)"));
        }
        if let Some(index) = step.cut {
            relays[index].cut();
            // Its orders are taken over as a killed replica's are.
            lost = Some((index, "cut off from Postgres"));
        }
        if let Some((index, how)) = lost {
            let r = &replicas[index];
            let at = Instant::now();
            self.in_hand = sqlx::query_scalar(
                "SELECT id FROM orders
                  WHERE lease_owner = $1 AND status IN ('pending', 'processing')",
            )
            .bind(&r.owner)
            .fetch_all(self.pool)
            .await?;
            self.watched = self.in_hand.clone();
            let _ = writeln!(
                progress,
                "  {:<24} {t:>5.1}s  replica {} {how} holding {} orders",
                self.variant.name,
                r.name,
                self.in_hand.len()
            );
            self.kill = Some((r.owner.clone(), at));
        }
        if let Some(index) = step.heal {
            relays[index].heal();
            let _ = writeln!(
                progress,
                "  {:<24} {t:>5.1}s  replica {} reconnected",
                self.variant.name, replicas[index].name
            );
        }
        match step.fault {
            Some(FaultMark::Start) => self.fault_start = Some(t),
            Some(FaultMark::End) => self.fault_end = Some(t),
            None => {}
        }
        Ok(())
    }

    /// Records when each order the lost replica held was taken over.
    async fn see_takeovers(&mut self) -> anyhow::Result<()> {
        let Some((owner, lost_at)) = &self.kill else {
            return Ok(());
        };
        if self.watched.is_empty() {
            return Ok(());
        }
        let seen = Instant::now().duration_since(*lost_at).as_secs_f64();
        for id in taken_over(self.pool, &self.watched, owner).await? {
            self.takeover_times.entry(id).or_insert(seen);
        }
        let taken = &self.takeover_times;
        self.watched.retain(|id| !taken.contains_key(id));
        Ok(())
    }

    /// Whether every surviving generator is done, and what they sent.
    async fn survivors_traffic(&self, replicas: &[Replica]) -> (bool, LoadOutcomes) {
        let mut done = true;
        let mut outcomes = LoadOutcomes::default();
        for r in replicas.iter().filter(|r| r.alive) {
            match load_status(r, self.token).await {
                Some((finished, more)) => {
                    done &= finished;
                    add(&mut outcomes, more);
                }
                None => done = false,
            }
        }
        (done, outcomes)
    }
}

/// Samples each survivor once more, then stops it with SIGTERM, saying
/// which did not stop cleanly.
async fn stop_replicas(
    replicas: &mut [Replica],
    start_wall: DateTime<Utc>,
    token: Option<&str>,
    progress: &mut (dyn Write + Send),
) {
    for r in replicas.iter_mut().filter(|r| r.alive) {
        poll(r, start_wall, token).await;
        sigterm(&r.child);
    }
    for r in replicas.iter_mut().filter(|r| r.alive) {
        match tokio::time::timeout(STOP_LIMIT, r.child.wait()).await {
            Ok(Ok(status)) if status.success() => {}
            Ok(Ok(status)) => {
                let _ = writeln!(
                    progress,
                    "  replica {} stopped with {status}:\n{}",
                    r.name,
                    r.last_logs()
                );
            }
            _ => {
                let _ = r.child.start_kill();
                let _ = writeln!(
                    progress,
                    "  replica {} did not stop within {STOP_LIMIT:?}",
                    r.name
                );
            }
        }
        r.alive = false;
    }
}

/// What the run left behind: the database's counts, the replicas'
/// timelines and the takeover.
async fn record(
    pool: &PgPool,
    since: DateTime<Utc>,
    replicas: &[Replica],
    killed: bool,
    in_hand: &[Uuid],
    takeover_times: &HashMap<Uuid, f64>,
    variant: &Variant,
) -> anyhow::Result<RunRecord> {
    let (accepted, completed, failed) = counts(pool, since).await?;
    // Every charge the shared ledger holds for these orders, and those
    // beyond an order's first.
    let row = sqlx::query(
        "SELECT coalesce(sum(n), 0)::bigint AS charges,
                coalesce(sum(n - 1), 0)::bigint AS duplicates
           FROM (SELECT count(*) AS n FROM payment_ledger
                  WHERE order_id IN (SELECT id FROM orders WHERE created_at >= $1)
                  GROUP BY order_id) per_order",
    )
    .bind(since)
    .fetch_one(pool)
    .await?;
    let charges: i64 = row.try_get("charges")?;
    let duplicates: i64 = row.try_get("duplicates")?;
    let latencies: Vec<f64> = sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM (updated_at - created_at))::float8 FROM orders
          WHERE created_at >= $1 AND status IN ('completed', 'failed')",
    )
    .bind(since)
    .fetch_all(pool)
    .await?;
    let histogram = LatencyHistogram::new();
    for l in latencies {
        histogram.record(Duration::from_secs_f64(l.max(0.0)));
    }
    let totals = Totals {
        accepted,
        completed,
        failed,
        rejected: summed(replicas, |s| s.rejected_per_s),
        payment_failures: summed(replicas, |s| s.payment_failures_per_s),
        payment_timeouts: summed(replicas, |s| s.payment_timeouts_per_s),
        charges: charges.max(0) as u64,
        duplicate_charges: duplicates.max(0) as u64,
        retries: summed(replicas, |s| s.retries_per_s),
        rejected_open: summed(replicas, |s| s.rejections_open_per_s),
        rejected_half_open: summed(replicas, |s| s.rejections_half_open_per_s),
        ..Totals::default()
    };
    let payment_calls = replicas
        .iter()
        .filter_map(|r| r.samples.last().map(|s| s.payment_calls_total))
        .sum();
    let takeover = killed.then(|| Takeover {
        in_hand: in_hand.len() as u64,
        taken_over: takeover_times.len() as u64,
        longest_s: takeover_times
            .values()
            .copied()
            .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v)))),
        bound_s: (variant.config.job_lease + variant.config.recovery_interval).as_secs_f64() + 1.0,
    });
    Ok(RunRecord {
        samples: Vec::new(),
        totals,
        payment_calls,
        probes: 0,
        half_open_windows: 0,
        latency: histogram.snapshot().since(&Snapshot::default()),
        failed_in_fault: None,
        fault: None,
        replicas: replicas
            .iter()
            .map(|r| (r.name.clone(), r.samples.clone()))
            .collect(),
        takeover,
        tiers: Vec::new(),
        client: None,
    })
}
