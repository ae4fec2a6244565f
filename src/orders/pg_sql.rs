//! What the Postgres store and its group writer (`group_commit`) share:
//! how sqlx's errors map to the domain's, how a row becomes an order, and
//! the statement each kind of status move takes.

use chrono::{DateTime, Utc};
use sqlx::Row;
use uuid::Uuid;

use super::{Amount, Currency, CustomerId, Order, OrderId, Status, StatusChange, StoreError};

/// Maps sqlx errors to the domain's: connection trouble is "unavailable"
/// (503), everything else is a storage error (500).
pub(crate) fn map_err(err: sqlx::Error) -> StoreError {
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

pub(super) fn row_to_order(row: &sqlx::postgres::PgRow) -> Result<Order, StoreError> {
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

pub(super) const COLUMNS: &str =
    "id, customer_id, amount, currency, status, attempts, last_error, created_at, updated_at";
pub(super) const QUALIFIED: &str =
    "o.id, o.customer_id, o.amount, o.currency, o.status, o.attempts, \
     o.last_error, o.created_at, o.updated_at";

/// Which statement a status move takes. Every legal move is a claim
/// (pending -> processing: the lease must be free, expired or ours; it
/// becomes ours and a lease-history row opens) or a release (processing ->
/// anything else: the lease must be ours; it is freed and the history row
/// closes). Each has a statement of its own, with no part that applies to
/// the other. One statement for both, its parts switched on by the
/// statuses, was planned anew at most executions (4-9% of the whole machine
/// under load with the workers running, docs/performance.md); with a
/// statement per kind that share fell to about 2.5%.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum MoveKind {
    Claim,
    Release,
}

impl MoveKind {
    /// The kind of a move; an error for one that is neither (not a legal
    /// move: the service refuses it before it reaches a store).
    pub(super) fn of(change: &StatusChange) -> Result<Self, StoreError> {
        match (change.from, change.to) {
            (from, Status::Processing) if from != Status::Processing => Ok(Self::Claim),
            (Status::Processing, to) if to != Status::Processing => Ok(Self::Release),
            (from, to) => Err(StoreError::Other(format!(
                "no statement moves an order from {from} to {to}"
            ))),
        }
    }

    /// Binds the lease's seconds, the last parameter, which only a claim's
    /// statements (single and batched) take.
    pub(super) fn bind_lease<'q>(
        self,
        query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
        lease_secs: f64,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        match self {
            Self::Claim => query.bind(lease_secs),
            Self::Release => query,
        }
    }

    /// The single move's statement. Parameters: $1 id, $2 from, $3 to,
    /// $4 attempts, $5 last error, $6 updated_at, $7 lease owner and, except
    /// for a release, $8 the lease's seconds.
    pub(super) fn statement(self) -> &'static str {
        static STATEMENTS: std::sync::OnceLock<[String; 2]> = std::sync::OnceLock::new();
        // What every move sets besides the lease.
        const SET: &str = "status = $3, attempts = COALESCE($4, attempts), \
                           last_error = COALESCE($5, last_error), updated_at = $6";
        let all = STATEMENTS.get_or_init(|| {
            [
                format!(
                    "WITH moved AS (
                        UPDATE orders
                           SET {SET},
                               lease_owner = $7,
                               lease_expires_at = now() + make_interval(secs => $8)
                         WHERE id = $1 AND status = $2
                           AND (lease_owner IS NULL OR lease_owner = $7
                                OR lease_expires_at IS NULL OR lease_expires_at < now())
                        RETURNING {COLUMNS}
                     ),
                     opened AS (
                        INSERT INTO order_lease_history (order_id, owner)
                        SELECT id, $7 FROM moved
                     )
                     SELECT {COLUMNS} FROM moved"
                ),
                format!(
                    "WITH moved AS (
                        UPDATE orders
                           SET {SET},
                               lease_owner = NULL,
                               lease_expires_at = NULL
                         WHERE id = $1 AND status = $2 AND lease_owner = $7
                        RETURNING {COLUMNS}
                     ),
                     closed AS (
                        UPDATE order_lease_history SET ended_at = clock_timestamp(), outcome = $3
                         WHERE order_id = $1 AND owner = $7 AND ended_at IS NULL
                           AND EXISTS (SELECT 1 FROM moved)
                     )
                     SELECT {COLUMNS} FROM moved"
                ),
            ]
        });
        match self {
            Self::Claim => &all[0],
            Self::Release => &all[1],
        }
    }
}
