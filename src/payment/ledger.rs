//! The provider's record of the charges it made.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use tokio::sync::{mpsc, oneshot};

use async_trait::async_trait;
use chrono::{DateTime, SubsecRound, Utc};
use serde::Serialize;
use uuid::Uuid;

use super::ChargeRequest;
use crate::orders::group_commit::batch_loop;
use crate::orders::pg_sql::map_err;
use crate::orders::{OrderId, StoreError};

/// Why the ledger could not answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    /// A thread panicked while holding one of the in-memory ledger's locks.
    #[error("ledger lock poisoned")]
    Poisoned,
    /// The database behind the ledger failed or could not be reached.
    #[error("ledger storage: {0}")]
    Store(#[from] StoreError),
}

/// One charge the provider made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Charge {
    pub charge_id: Uuid,
    #[schema(value_type = Uuid)]
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
    async fn record(
        &self,
        request: &ChargeRequest,
        key: Option<&str>,
    ) -> Result<Recorded, LedgerError>;

    /// An order's charges, oldest first.
    async fn charges(&self, order_id: OrderId) -> Result<Vec<Charge>, LedgerError>;

    /// The charge made under an idempotency key, if one was.
    async fn by_key(&self, key: &str) -> Result<Option<Charge>, LedgerError>;
}

fn charge(request: &ChargeRequest, key: Option<&str>) -> Charge {
    Charge {
        // The simulated provider's ids need to be unique, not secret: the
        // thread's generator, not a system call per charge.
        charge_id: uuid::Builder::from_random_bytes(rand::RngExt::random(&mut rand::rng()))
            .into_uuid(),
        order_id: request.order_id,
        attempt: request.attempt,
        idempotency_key: key.map(str::to_owned),
        amount: request.amount,
        currency: request.currency.clone(),
        created_at: crate::clock::now().trunc_subsecs(6),
    }
}

/// The ledger in memory: one process's provider.
///
/// Sharded like the memory store, for the same reason: one map's rehash on
/// growth stalled every charge behind its lock. An order's charges live in
/// the order's shard and a key in the key's shard; when a charge needs both,
/// the two locks are taken in shard order, so nothing can deadlock.
pub struct MemoryLedger {
    shards: Box<[Mutex<LedgerShard>]>,
}

const LEDGER_SHARDS: usize = 64;

#[derive(Default)]
struct LedgerShard {
    by_order: HashMap<OrderId, Vec<Charge>>,
    /// Each key taken, and the order whose charge took it.
    keys: HashMap<String, OrderId>,
}

impl Default for MemoryLedger {
    fn default() -> Self {
        Self {
            shards: (0..LEDGER_SHARDS).map(|_| Mutex::default()).collect(),
        }
    }
}

impl MemoryLedger {
    fn order_shard(id: &OrderId) -> usize {
        usize::from(id.as_uuid().as_bytes()[15]) % LEDGER_SHARDS
    }

    fn key_shard(key: &str) -> usize {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        (BuildHasherDefault::<DefaultHasher>::default().hash_one(key) as usize) % LEDGER_SHARDS
    }

    fn lock(&self, i: usize) -> Result<std::sync::MutexGuard<'_, LedgerShard>, LedgerError> {
        self.shards[i].lock().map_err(|_| LedgerError::Poisoned)
    }

    /// Forgets an order's charges and their keys: the memory store calls it
    /// when it evicts the (finished) order, so the ledger holds no more
    /// orders than the store's bound. One lock at a time, so it can never
    /// deadlock with `record`.
    pub fn forget(&self, order_id: OrderId) {
        let Ok(mut shard) = self.lock(Self::order_shard(&order_id)) else {
            return;
        };
        let Some(charges) = shard.by_order.remove(&order_id) else {
            return;
        };
        drop(shard);
        for key in charges.iter().filter_map(|c| c.idempotency_key.as_deref()) {
            if let Ok(mut shard) = self.lock(Self::key_shard(key)) {
                shard.keys.remove(key);
            }
        }
    }

    /// How many orders have charges here, and how many keys are taken.
    pub fn size(&self) -> (usize, usize) {
        self.shards.iter().fold((0, 0), |(orders, keys), shard| {
            let shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            (orders + shard.by_order.len(), keys + shard.keys.len())
        })
    }
}

fn add_charge(shard: &mut LedgerShard, request: &ChargeRequest, key: Option<&str>) -> usize {
    let charges = shard
        .by_order
        .entry(request.order_id)
        // Most orders have one charge; a default Vec would reserve room
        // for four (measured: ~360 bytes per order wasted).
        .or_insert_with(|| Vec::with_capacity(1));
    let earlier = charges.len();
    charges.push(charge(request, key));
    earlier
}

#[async_trait]
impl Ledger for MemoryLedger {
    async fn record(
        &self,
        request: &ChargeRequest,
        key: Option<&str>,
    ) -> Result<Recorded, LedgerError> {
        let oi = Self::order_shard(&request.order_id);
        let Some(key) = key else {
            let earlier = add_charge(&mut *self.lock(oi)?, request, None);
            return Ok(Recorded {
                new_charge: true,
                earlier_charges: earlier,
            });
        };
        let ki = Self::key_shard(key);
        let already = |order_shard: &LedgerShard| Recorded {
            new_charge: false,
            earlier_charges: order_shard
                .by_order
                .get(&request.order_id)
                .map_or(0, Vec::len),
        };
        if ki == oi {
            let mut shard = self.lock(oi)?;
            if shard.keys.contains_key(key) {
                return Ok(already(&shard));
            }
            shard.keys.insert(key.to_owned(), request.order_id);
            let earlier = add_charge(&mut shard, request, Some(key));
            return Ok(Recorded {
                new_charge: true,
                earlier_charges: earlier,
            });
        }
        // Two shards: lock the lower index first.
        let (mut key_shard, mut order_shard) = if ki < oi {
            let k = self.lock(ki)?;
            (k, self.lock(oi)?)
        } else {
            let o = self.lock(oi)?;
            (self.lock(ki)?, o)
        };
        if key_shard.keys.contains_key(key) {
            return Ok(already(&order_shard));
        }
        key_shard.keys.insert(key.to_owned(), request.order_id);
        let earlier = add_charge(&mut order_shard, request, Some(key));
        Ok(Recorded {
            new_charge: true,
            earlier_charges: earlier,
        })
    }

    async fn charges(&self, order_id: OrderId) -> Result<Vec<Charge>, LedgerError> {
        let shard = self.lock(Self::order_shard(&order_id))?;
        Ok(shard.by_order.get(&order_id).cloned().unwrap_or_default())
    }

    async fn by_key(&self, key: &str) -> Result<Option<Charge>, LedgerError> {
        let order = self.lock(Self::key_shard(key))?.keys.get(key).copied();
        let Some(order) = order else {
            return Ok(None);
        };
        Ok(self
            .charges(order)
            .await?
            .into_iter()
            .find(|c| c.idempotency_key.as_deref() == Some(key)))
    }
}

/// The ledger in Postgres: one provider shared by every replica. The unique
/// idempotency key makes "charge unless this key has a charge" one atomic
/// INSERT, whichever replica asks.
pub struct PostgresLedger {
    pool: sqlx::PgPool,
    /// Charges go through group commit when set.
    group: Option<mpsc::UnboundedSender<PendingCharge>>,
}

struct PendingCharge {
    charge: Charge,
    reply: oneshot::Sender<Result<Recorded, LedgerError>>,
}

impl PostgresLedger {
    pub fn new(pool: sqlx::PgPool) -> Self {
        Self { pool, group: None }
    }

    /// Charges made at the same moment are written in one statement, at
    /// most `max` (the orders' group commit, `DATABASE_BATCH_MAX`); 1 writes
    /// each alone.
    pub fn with_group_commit(mut self, max: usize) -> Self {
        if max > 1 {
            let alone = PostgresLedger::new(self.pool.clone());
            let alone = std::sync::Arc::new(alone);
            self.group = Some(batch_loop(max, move |batch| {
                record_batch(alone.clone(), batch)
            }));
        }
        self
    }
}

/// Charges of distinct orders in one statement, with one charge alone's
/// answer each: the order's charges before this statement, and whether this
/// one was made (not when its key already had one). A second charge of an
/// order in the batch goes alone after it.
async fn record_batch(alone: std::sync::Arc<PostgresLedger>, batch: Vec<PendingCharge>) {
    let mut orders = HashSet::new();
    let (firsts, repeats): (Vec<PendingCharge>, Vec<PendingCharge>) = batch
        .into_iter()
        .partition(|p| orders.insert(p.charge.order_id));
    if firsts.len() == 1 {
        for p in firsts {
            let recorded = alone.record_one(&p.charge).await;
            let _ = p.reply.send(recorded);
        }
    } else if !firsts.is_empty() {
        match alone.record_many(&firsts).await {
            Ok(recorded) => {
                for (p, r) in firsts.into_iter().zip(recorded) {
                    let _ = p.reply.send(Ok(r));
                }
            }
            Err(err) => {
                // A failed statement changed nothing: each goes alone.
                tracing::warn!(error = %err, charges = firsts.len(), "a batch of charges failed; recording them one by one");
                for p in firsts {
                    let recorded = alone.record_one(&p.charge).await;
                    let _ = p.reply.send(recorded);
                }
            }
        }
    }
    for p in repeats {
        let recorded = alone.record_one(&p.charge).await;
        let _ = p.reply.send(recorded);
    }
}

impl PostgresLedger {
    async fn record_one(&self, c: &Charge) -> Result<Recorded, LedgerError> {
        use sqlx::Row;
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
        .map_err(map_err)?;
        let earlier: i64 = row.try_get("earlier").map_err(map_err)?;
        let made: i64 = row.try_get("made").map_err(map_err)?;
        Ok(Recorded {
            new_charge: made == 1,
            earlier_charges: usize::try_from(earlier).unwrap_or(0),
        })
    }

    /// `record_one` over charges of distinct orders, in one statement (all
    /// its parts see the ledger as it was before it).
    async fn record_many(&self, batch: &[PendingCharge]) -> Result<Vec<Recorded>, LedgerError> {
        use sqlx::Row;
        let charges: Vec<&Charge> = batch.iter().map(|p| &p.charge).collect();
        let ids: Vec<Uuid> = charges.iter().map(|c| c.charge_id).collect();
        let orders: Vec<Uuid> = charges.iter().map(|c| c.order_id.as_uuid()).collect();
        let attempts: Vec<i32> = charges
            .iter()
            .map(|c| i32::try_from(c.attempt).unwrap_or(i32::MAX))
            .collect();
        let keys: Vec<Option<&str>> = charges
            .iter()
            .map(|c| c.idempotency_key.as_deref())
            .collect();
        let amounts: Vec<i64> = charges.iter().map(|c| c.amount).collect();
        let currencies: Vec<&str> = charges.iter().map(|c| c.currency.as_str()).collect();
        let at: Vec<DateTime<Utc>> = charges.iter().map(|c| c.created_at).collect();
        let rows = sqlx::query(
            "WITH input AS (
                SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::int4[], $4::text[], $5::int8[],
                                     $6::text[], $7::timestamptz[])
                    AS i(charge_id, order_id, attempt, idempotency_key, amount, currency, created_at)
             ),
             made AS (
                INSERT INTO payment_ledger
                   (charge_id, order_id, attempt, idempotency_key, amount, currency, created_at)
                SELECT * FROM input
                ON CONFLICT (idempotency_key) DO NOTHING
                RETURNING charge_id
             )
             SELECT i.charge_id,
                    (SELECT count(*) FROM payment_ledger l WHERE l.order_id = i.order_id) AS earlier,
                    EXISTS (SELECT 1 FROM made m WHERE m.charge_id = i.charge_id) AS made
               FROM input i",
        )
        .bind(&ids)
        .bind(&orders)
        .bind(&attempts)
        .bind(&keys)
        .bind(&amounts)
        .bind(&currencies)
        .bind(&at)
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        let mut by_charge: HashMap<Uuid, Recorded> = HashMap::new();
        for row in rows {
            let id: Uuid = row.try_get("charge_id").map_err(map_err)?;
            let earlier: i64 = row.try_get("earlier").map_err(map_err)?;
            let made: bool = row.try_get("made").map_err(map_err)?;
            by_charge.insert(
                id,
                Recorded {
                    new_charge: made,
                    earlier_charges: usize::try_from(earlier).unwrap_or(0),
                },
            );
        }
        ids.iter()
            .map(|id| {
                by_charge.remove(id).ok_or_else(|| {
                    LedgerError::Store(StoreError::Other(
                        "a charge of the batch went unanswered".into(),
                    ))
                })
            })
            .collect()
    }
}

#[async_trait]
impl Ledger for PostgresLedger {
    async fn record(
        &self,
        request: &ChargeRequest,
        key: Option<&str>,
    ) -> Result<Recorded, LedgerError> {
        let charge = charge(request, key);
        match &self.group {
            None => self.record_one(&charge).await,
            Some(group) => {
                let (reply, answer) = oneshot::channel();
                group
                    .send(PendingCharge { charge, reply })
                    .map_err(|_| StoreError::Unavailable("the ledger writer has stopped".into()))?;
                answer.await.map_err(|_| {
                    LedgerError::Store(StoreError::Other(
                        "the ledger writer stopped mid-write".into(),
                    ))
                })?
            }
        }
    }

    async fn charges(&self, order_id: OrderId) -> Result<Vec<Charge>, LedgerError> {
        let rows = sqlx::query(
            "SELECT charge_id, order_id, attempt, idempotency_key, amount, currency, created_at
               FROM payment_ledger WHERE order_id = $1 ORDER BY created_at, charge_id",
        )
        .bind(order_id.as_uuid())
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        rows.iter()
            .map(charge_of)
            .collect::<Result<_, _>>()
            .map_err(|e| map_err(e).into())
    }

    async fn by_key(&self, key: &str) -> Result<Option<Charge>, LedgerError> {
        let row = sqlx::query(
            "SELECT charge_id, order_id, attempt, idempotency_key, amount, currency, created_at
               FROM payment_ledger WHERE idempotency_key = $1",
        )
        .bind(key)
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?;
        row.as_ref()
            .map(charge_of)
            .transpose()
            .map_err(|e| map_err(e).into())
    }
}

fn charge_of(row: &sqlx::postgres::PgRow) -> Result<Charge, sqlx::Error> {
    use sqlx::Row;
    Ok(Charge {
        charge_id: row.try_get("charge_id")?,
        order_id: OrderId::from_uuid(row.try_get("order_id")?),
        attempt: u32::try_from(row.try_get::<i32, _>("attempt")?).unwrap_or(0),
        idempotency_key: row.try_get("idempotency_key")?,
        amount: row.try_get("amount")?,
        currency: row.try_get("currency")?,
        created_at: row.try_get("created_at")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(order_id: OrderId, attempt: u32) -> ChargeRequest {
        ChargeRequest::for_order(order_id, attempt, 100, "USD")
    }

    #[tokio::test]
    async fn a_key_charges_once_and_counts_see_every_charge_of_the_order() {
        let ledger = MemoryLedger::default();
        for _ in 0..200 {
            let order = OrderId::new_random();
            let key = ChargeRequest::key_for(order);
            let first = ledger.record(&request(order, 1), Some(&key)).await.unwrap();
            assert_eq!((first.new_charge, first.earlier_charges), (true, 0));
            let again = ledger.record(&request(order, 2), Some(&key)).await.unwrap();
            assert_eq!((again.new_charge, again.earlier_charges), (false, 1));
            // Idempotency switched off: a charge without the key, seen as the second.
            let unkeyed = ledger.record(&request(order, 3), None).await.unwrap();
            assert_eq!((unkeyed.new_charge, unkeyed.earlier_charges), (true, 1));
            assert_eq!(ledger.charges(order).await.unwrap().len(), 2);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn racing_charges_with_one_key_make_one_charge() {
        let ledger = std::sync::Arc::new(MemoryLedger::default());
        let order = OrderId::new_random();
        let key = ChargeRequest::key_for(order);
        let tasks: Vec<_> = (0..16)
            .map(|attempt| {
                let ledger = ledger.clone();
                let key = key.clone();
                tokio::spawn(async move {
                    ledger
                        .record(&request(order, attempt), Some(&key))
                        .await
                        .unwrap()
                })
            })
            .collect();
        let mut made = 0;
        for task in tasks {
            made += usize::from(task.await.unwrap().new_charge);
        }
        assert_eq!(made, 1);
        assert_eq!(ledger.charges(order).await.unwrap().len(), 1);
    }
}
