//! The Postgres store (sqlx, runtime-checked queries: the build never needs a database).
//!
//! Migrations under `migrations/` are embedded in the binary and applied at
//! startup. Status updates are conditional on the expected current status.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, SubsecRound, Utc};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool, Row};
use uuid::Uuid;

use super::{
    Amount, Currency, CustomerId, Order, OrderId, OrderRepository, Status, StatusChange,
    StatusCounts, StoreError,
};

/// The migrations, embedded at build time.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// How long a request waits for a pooled connection before failing with 503.
///
/// sqlx's default is 30 s: while Postgres is down every request would hang
/// that long. A few seconds keeps failures fast.
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
}

/// Maps sqlx errors to the domain's: connection trouble is "unavailable"
/// (503), everything else is a storage error (500).
pub fn map_err(err: sqlx::Error) -> StoreError {
    match &err {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => StoreError::Unavailable(err.to_string()),
        sqlx::Error::Database(db)
            if db.code().is_some_and(|c| {
                // 57P01 admin_shutdown, 57P03 cannot_connect_now, 08*: connection exceptions
                c.starts_with("08") || c == "57P01" || c == "57P03"
            }) =>
        {
            StoreError::Unavailable(err.to_string())
        }
        _ => StoreError::Other(err.to_string()),
    }
}

impl PostgresStore {
    /// Wraps an existing pool (tests build their own).
    pub fn from_pool(pool: PgPool) -> Self {
        Self { pool }
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
    ) -> anyhow::Result<Self> {
        let options: PgConnectOptions = url
            .parse()
            .map_err(|e| anyhow::anyhow!("DATABASE_URL is not a valid Postgres URL: {e}"))?;
        let options = options.log_statements(tracing::log::LevelFilter::Debug);
        let deadline = tokio::time::Instant::now() + startup_timeout;
        let mut wait = Duration::from_millis(250);
        loop {
            match sqlx::PgConnection::connect_with(&options).await {
                Ok(conn) => {
                    let _ = conn.close().await;
                    break;
                }
                Err(err) => {
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
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_lazy_with(options);
        MIGRATOR
            .run(&pool)
            .await
            .map_err(|e| anyhow::anyhow!("applying database migrations failed: {e}"))?;
        Ok(Self { pool })
    }
}

fn row_to_order(row: &sqlx::postgres::PgRow) -> Result<Order, StoreError> {
    let bad = |what: &str, e: &dyn std::fmt::Display| {
        StoreError::Other(format!("stored order has an invalid {what}: {e}"))
    };
    let id: Uuid = row.try_get("id").map_err(|e| bad("id", &e))?;
    let customer: String = row
        .try_get("customer_id")
        .map_err(|e| bad("customer_id", &e))?;
    let amount: i64 = row.try_get("amount").map_err(|e| bad("amount", &e))?;
    let currency: String = row.try_get("currency").map_err(|e| bad("currency", &e))?;
    let status: String = row.try_get("status").map_err(|e| bad("status", &e))?;
    let attempts: i32 = row.try_get("attempts").map_err(|e| bad("attempts", &e))?;
    let last_error: Option<String> = row
        .try_get("last_error")
        .map_err(|e| bad("last_error", &e))?;
    let created_at: DateTime<Utc> = row
        .try_get("created_at")
        .map_err(|e| bad("created_at", &e))?;
    let updated_at: DateTime<Utc> = row
        .try_get("updated_at")
        .map_err(|e| bad("updated_at", &e))?;
    Ok(Order {
        id: OrderId::from_uuid(id),
        customer_id: CustomerId::parse(&customer).map_err(|e| bad("customer_id", &e))?,
        amount: Amount::parse(amount).map_err(|e| bad("amount", &e))?,
        currency: Currency::parse(&currency).map_err(|e| bad("currency", &e))?,
        status: status.parse().map_err(|e: String| bad("status", &e))?,
        attempts: u32::try_from(attempts).map_err(|e| bad("attempts", &e))?,
        last_error,
        created_at,
        updated_at,
    })
}

const COLUMNS: &str =
    "id, customer_id, amount, currency, status, attempts, last_error, created_at, updated_at";

#[async_trait]
impl OrderRepository for PostgresStore {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn durability(&self) -> &'static str {
        "durable"
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(map_err)
    }

    async fn insert(&self, order: &Order) -> Result<bool, StoreError> {
        let result = sqlx::query(
            "INSERT INTO orders (id, customer_id, amount, currency, status, attempts, last_error, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
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
        .execute(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(result.rows_affected() == 1)
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
    ) -> Result<Option<Result<Order, Status>>, StoreError> {
        // One statement: the WHERE on the expected status makes the move
        // conditional, so two writers cannot both move the order.
        let updated = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE orders
                SET status = $3,
                    attempts = COALESCE($4, attempts),
                    last_error = COALESCE($5, last_error),
                    updated_at = $6
              WHERE id = $1 AND status = $2
          RETURNING {COLUMNS}"
        )))
        .bind(id.as_uuid())
        .bind(change.from.as_str())
        .bind(change.to.as_str())
        .bind(
            change
                .attempts
                .map(|a| i32::try_from(a).unwrap_or(i32::MAX)),
        )
        .bind(change.last_error.as_deref())
        .bind(Utc::now().trunc_subsecs(6))
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?;
        if let Some(row) = updated {
            return Ok(Some(Ok(row_to_order(&row)?)));
        }
        // Nothing moved: tell "no such order" from "it is elsewhere".
        match self.get(id).await? {
            None => Ok(None),
            Some(order) => Ok(Some(Err(order.status))),
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
}
