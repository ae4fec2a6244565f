//! The Postgres store (sqlx, runtime-checked queries: the build never needs a database).
//!
//! Migrations under `migrations/` are embedded in the binary and applied at
//! startup. Status updates are conditional on the expected current status.
//!
//! Leases: every order that is queued or processing carries an owner (this
//! replica's id) and a deadline. This replica stores its new orders under its
//! own lease, renews all its leases on a heartbeat, moves an order to
//! processing only if the lease is its own or has expired (one conditional
//! UPDATE), and completes or fails it only while it still owns it. Postgres's
//! clock (`now()`) is the only clock leases are compared against.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::SubsecRound;
use sqlx::postgres::PgPoolOptions;
use sqlx::{ConnectOptions, Connection, PgPool, Row};
use uuid::Uuid;

use super::{
    Durability, KeyedInsert, Order, OrderId, OrderRepository, Status, StatusChange, StatusCounts,
    StoreError, UpdateOutcome,
};

use super::group_commit::{GroupCommit, Keyed, SingleRowStore, Written};
use super::pg_sql::{map_err, row_to_order, MoveKind, COLUMNS, QUALIFIED};
use crate::observability::metrics::StoreMetrics;

/// The migrations, embedded at build time.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// How long a request waits for a pooled connection before failing with 503.
///
/// sqlx's default is 30 s: while Postgres is down every request would hang
/// that long. A few seconds keeps failures fast.
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

/// Who this replica is and how long its leases last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub owner: String,
    pub duration: Duration,
}

impl Lease {
    /// A lease for a replica with a fresh random id.
    pub fn for_new_replica(duration: Duration) -> Self {
        Self {
            owner: Uuid::new_v4().simple().to_string(),
            duration,
        }
    }
}

#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
    lease: Lease,
    /// New orders go through group commit when set.
    group: Option<Arc<GroupCommit<PostgresStore>>>,
}

impl PostgresStore {
    /// Wraps an existing pool (tests build their own).
    pub fn from_pool(pool: PgPool, lease: Lease) -> Self {
        Self {
            pool,
            lease,
            group: None,
        }
    }

    /// New orders are written in groups of at most `max` (see
    /// `group_commit`); `max` 1 writes each alone, as without it.
    pub fn with_group_commit(mut self, max: usize, metrics: StoreMetrics) -> Self {
        self.group = (max > 1).then(|| GroupCommit::start(self.clone(), max, metrics));
        self
    }

    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// The lease's length in seconds, as the statements take it.
    pub(super) fn lease_secs(&self) -> f64 {
        self.lease.duration.as_secs_f64()
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Connects, retrying for at most `startup_timeout` while the server cannot
    /// be reached, logging the real cause each time (the pool's own timeout
    /// error hides it), then applies the migrations.
    pub async fn connect(
        url: &str,
        max_connections: u32,
        startup_timeout: Duration,
        lease: Lease,
    ) -> anyhow::Result<Self> {
        let options =
            super::pg_tls::connect_options(url)?.log_statements(tracing::log::LevelFilter::Debug);
        let deadline = tokio::time::Instant::now() + startup_timeout;
        let mut wait = Duration::from_millis(250);
        loop {
            match sqlx::PgConnection::connect_with(&options).await {
                Ok(conn) => {
                    let _ = conn.close().await;
                    break;
                }
                Err(err) => {
                    // A certificate that does not verify will not verify
                    // on the next try either.
                    if let Some(why) = super::pg_tls::tls_failure(&err, &options) {
                        anyhow::bail!(why);
                    }
                    let now = tokio::time::Instant::now();
                    if now >= deadline {
                        anyhow::bail!(
                            "database unreachable after {}: {err}",
                            humantime::format_duration(startup_timeout)
                        );
                    }
                    tracing::warn!(error = %err, retry_in = ?wait, "database not reachable yet");
                    tokio::time::sleep(wait.min(deadline - now)).await;
                    wait = (wait * 2).min(Duration::from_secs(2));
                }
            }
        }
        let pool = pool_options(max_connections, PING_IF_IDLE_FOR).connect_lazy_with(options);
        MIGRATOR
            .run(&pool)
            .await
            .map_err(|e| anyhow::anyhow!("applying database migrations failed: {e}"))?;
        Ok(Self::from_pool(pool, lease))
    }
}

/// The pool's settings. sqlx pings every idle connection before handing it
/// out (`test_before_acquire`, on by default; sqlx-core 0.9
/// `pool/inner.rs`, `check_idle_conn`): one more round trip ahead of every
/// statement. Here a connection is pinged only when it sat idle for
/// `ping_if_idle_for` or longer, which is when a server restart or a dropped
/// link may have broken it unseen; one that fails the ping is closed and
/// another opened, so the caller does not see it. A connection in steady use
/// answers for itself with its next statement. (sqlx also pings each
/// connection as it goes back to the pool, off the caller's path; that one
/// cannot be turned off.)
pub fn pool_options(max_connections: u32, ping_if_idle_for: Duration) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .test_before_acquire(false)
        .before_acquire(move |conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= ping_if_idle_for {
                    conn.ping().await?;
                }
                Ok(true)
            })
        })
}

/// How long the service's pooled connections may sit idle and still be
/// handed out without a ping first.
pub const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);

impl SingleRowStore for PostgresStore {
    fn pool(&self) -> &PgPool {
        &self.pool
    }

    fn lease_owner(&self) -> &str {
        &self.lease.owner
    }

    fn lease_secs(&self) -> f64 {
        self.lease.duration.as_secs_f64()
    }
}

#[async_trait]
impl OrderRepository for PostgresStore {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn durability(&self) -> Durability {
        Durability::Durable
    }

    fn lease_duration(&self) -> Option<Duration> {
        Some(self.lease.duration)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(map_err)
    }

    async fn insert(&self, order: &Order) -> Result<bool, StoreError> {
        if let Some(group) = &self.group {
            return Ok(group.write(order, None).await? == Written::Stored);
        }
        let result = insert_order(order, &self.lease.owner, self.lease_secs())
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(result.rows_affected() == 1)
    }

    async fn insert_with_key(
        &self,
        order: &Order,
        key: &str,
        request_digest: &str,
    ) -> Result<KeyedInsert, StoreError> {
        if let Some(group) = &self.group {
            let key = Keyed {
                key: key.to_owned(),
                digest: request_digest.to_owned(),
            };
            return match group.write(order, Some(key)).await? {
                Written::Stored => Ok(KeyedInsert::Created),
                Written::KeyTaken {
                    order,
                    same_request,
                } => Ok(KeyedInsert::Existing {
                    order,
                    same_request,
                }),
                // As alone: the order's id was taken; the key is not claimed.
                Written::IdTaken => Err(StoreError::Other(format!(
                    "an order with id {} already exists",
                    order.id
                ))),
            };
        }
        // One transaction: the order, then the key. Of two racing requests
        // with one key, the second waits on the unique index until the first
        // commits, then finds the key taken and rolls its order back.
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        insert_order(order, &self.lease.owner, self.lease_secs())
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        let claimed = sqlx::query(
            "INSERT INTO idempotency_keys (key, request_digest, order_id)
             VALUES ($1, $2, $3)
             ON CONFLICT (key) DO NOTHING",
        )
        .bind(key)
        .bind(request_digest)
        .bind(order.id.as_uuid())
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        if claimed.rows_affected() == 1 {
            tx.commit().await.map_err(map_err)?;
            return Ok(KeyedInsert::Created);
        }
        tx.rollback().await.map_err(map_err)?;
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT k.request_digest, {QUALIFIED}
               FROM idempotency_keys k JOIN orders o ON o.id = k.order_id
              WHERE k.key = $1"
        )))
        .bind(key)
        .fetch_one(&self.pool)
        .await
        .map_err(map_err)?;
        let digest: String = row.try_get("request_digest").map_err(map_err)?;
        Ok(KeyedInsert::Existing {
            order: row_to_order(&row)?,
            same_request: digest == request_digest,
        })
    }

    async fn get(&self, id: OrderId) -> Result<Option<Order>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM orders WHERE id = $1"
        )))
        .bind(id.as_uuid())
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?;
        row.as_ref().map(row_to_order).transpose()
    }

    async fn update_status(
        &self,
        id: OrderId,
        change: &StatusChange,
    ) -> Result<UpdateOutcome, StoreError> {
        if let Some(group) = &self.group {
            return group.move_status(id, change).await;
        }
        // One statement moves the order, if it is in the expected status and
        // the lease allows it, and keeps the lease history in step. A
        // statement per kind of move (see `MoveKind`).
        let at = crate::clock::now().trunc_subsecs(6);
        let attempts = change
            .attempts
            .map(|a| i32::try_from(a).unwrap_or(i32::MAX));
        let kind = MoveKind::of(change)?;
        let query = sqlx::query(sqlx::AssertSqlSafe(kind.statement()))
            .bind(id.as_uuid())
            .bind(change.from.as_str())
            .bind(change.to.as_str())
            .bind(attempts)
            .bind(change.last_error.as_deref())
            .bind(at)
            .bind(&self.lease.owner);
        let moved = kind
            .bind_lease(query, self.lease_secs())
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?;
        if let Some(row) = moved {
            return Ok(UpdateOutcome::Updated(row_to_order(&row)?));
        }
        // Nothing moved: say why.
        match self.get(id).await? {
            None => Ok(UpdateOutcome::NotFound),
            Some(order) if order.status != change.from => {
                Ok(UpdateOutcome::WrongStatus(order.status))
            }
            Some(_) => Ok(UpdateOutcome::LeaseHeldElsewhere),
        }
    }

    async fn count_by_status(&self) -> Result<StatusCounts, StoreError> {
        let rows = sqlx::query("SELECT status, COUNT(*) AS n FROM orders GROUP BY status")
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        let mut counts: StatusCounts = Status::ALL.into_iter().map(|s| (s, 0)).collect();
        for row in rows {
            let status: String = row.try_get("status").map_err(map_err)?;
            let n: i64 = row.try_get("n").map_err(map_err)?;
            if let Ok(status) = status.parse::<Status>() {
                counts.insert(status, u64::try_from(n).unwrap_or(0));
            }
        }
        Ok(counts)
    }

    async fn renew_leases(&self, ids: &[OrderId]) -> Result<Vec<OrderId>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<Uuid> = ids.iter().map(|id| id.as_uuid()).collect();
        let rows: Vec<Uuid> = sqlx::query_scalar(
            "UPDATE orders SET lease_expires_at = now() + make_interval(secs => $2)
              WHERE id = ANY($3) AND lease_owner = $1 AND status IN ('pending', 'processing')
          RETURNING id",
        )
        .bind(&self.lease.owner)
        .bind(self.lease_secs())
        .bind(ids)
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(rows.into_iter().map(OrderId::from_uuid).collect())
    }

    async fn count_expired(&self) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM orders
              WHERE status IN ('pending', 'processing')
                AND (lease_expires_at IS NULL OR lease_expires_at < now())",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    async fn take_over_expired(&self, limit: usize) -> Result<Vec<OrderId>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        // SKIP LOCKED: replicas recovering at the same moment split the work
        // instead of waiting on each other's rows.
        let rows = sqlx::query(
            "WITH expired AS (
                SELECT id FROM orders
                 WHERE status IN ('pending', 'processing')
                   AND (lease_expires_at IS NULL OR lease_expires_at < now())
                 ORDER BY created_at
                 LIMIT $1
                   FOR UPDATE SKIP LOCKED
             ),
             closed AS (
                UPDATE order_lease_history h
                   SET ended_at = clock_timestamp(), outcome = 'lease expired'
                  FROM expired
                 WHERE h.order_id = expired.id AND h.ended_at IS NULL
             )
             UPDATE orders o
                SET status = 'pending',
                    lease_owner = $2,
                    lease_expires_at = now() + make_interval(secs => $3),
                    updated_at = now()
               FROM expired
              WHERE o.id = expired.id
          RETURNING o.id",
        )
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .bind(&self.lease.owner)
        .bind(self.lease_secs())
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        rows.iter()
            .map(|row| {
                row.try_get::<Uuid, _>("id")
                    .map(OrderId::from_uuid)
                    .map_err(map_err)
            })
            .collect()
    }

    async fn release_leases(&self) -> Result<u64, StoreError> {
        let result = sqlx::query(
            "UPDATE orders SET lease_expires_at = now()
              WHERE lease_owner = $1 AND status IN ('pending', 'processing')",
        )
        .bind(&self.lease.owner)
        .execute(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(result.rows_affected())
    }

    async fn purge_keys_older_than(&self, age: Duration) -> Result<u64, StoreError> {
        let result = sqlx::query(
            "DELETE FROM idempotency_keys WHERE created_at <= now() - make_interval(secs => $1)",
        )
        .bind(age.as_secs_f64())
        .execute(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(result.rows_affected())
    }

    async fn count_deferred(&self) -> Result<u64, StoreError> {
        let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM orders WHERE status = 'deferred'")
            .fetch_one(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    async fn take_deferred(&self, limit: usize) -> Result<Vec<OrderId>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        // SKIP LOCKED: replicas releasing at the same moment split the
        // orders; a deferred order has no lease, so the one that takes it
        // leases it as a new order is leased.
        let rows = sqlx::query(
            "WITH picked AS (
                SELECT id FROM orders
                 WHERE status = 'deferred'
                 ORDER BY created_at, id
                 LIMIT $1
                   FOR UPDATE SKIP LOCKED
             )
             UPDATE orders o
                SET status = 'pending',
                    lease_owner = $2,
                    lease_expires_at = now() + make_interval(secs => $3),
                    updated_at = $4
               FROM picked
              WHERE o.id = picked.id
          RETURNING o.id, o.created_at",
        )
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .bind(&self.lease.owner)
        .bind(self.lease_secs())
        .bind(crate::clock::now().trunc_subsecs(6))
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        let mut taken: Vec<(chrono::DateTime<chrono::Utc>, Uuid)> = rows
            .iter()
            .map(|row| Ok((row.try_get("created_at")?, row.try_get("id")?)))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(map_err)?;
        taken.sort();
        Ok(taken
            .into_iter()
            .map(|(_, id)| OrderId::from_uuid(id))
            .collect())
    }

    async fn expire_deferred(
        &self,
        created_before: chrono::DateTime<chrono::Utc>,
        reason: &str,
    ) -> Result<Vec<Order>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE orders
                SET status = 'failed', last_error = $2, updated_at = $3
              WHERE status = 'deferred' AND created_at < $1
          RETURNING {COLUMNS}"
        )))
        .bind(created_before)
        .bind(reason)
        .bind(crate::clock::now().trunc_subsecs(6))
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        rows.iter().map(row_to_order).collect()
    }
}

/// The INSERT of a new order under `owner`'s lease.
fn insert_order<'q>(
    order: &'q Order,
    owner: &'q str,
    lease_secs: f64,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    sqlx::query(
        "INSERT INTO orders (id, customer_id, amount, currency, status, attempts, last_error,
                             created_at, updated_at, lease_owner, lease_expires_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, now() + make_interval(secs => $11))
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(order.id.as_uuid())
    .bind(order.customer_id.as_str())
    .bind(order.amount.value())
    .bind(order.currency.as_str())
    .bind(order.status.as_str())
    .bind(i32::try_from(order.attempts).unwrap_or(i32::MAX))
    .bind(order.last_error.as_deref())
    .bind(order.created_at)
    .bind(order.updated_at)
    .bind(owner)
    .bind(lease_secs)
}
