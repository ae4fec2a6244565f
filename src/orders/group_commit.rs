//! Group commit of new orders for the Postgres store.
//!
//! One INSERT per request caps admission at what Postgres does with one
//! single-row transaction per client. Here the requests that arrive while a
//! write is running wait for it to end and then go together: one
//! `INSERT … SELECT … FROM UNNEST(…)` for their orders and, when some have
//! Idempotency-Keys, one for the keys in the same transaction (without keys
//! the one statement is atomic on its own). There is no timer: a request
//! that finds no other new order being written writes its own at once, in
//! its own task, with the same statements as without batching; a batch is
//! only ever what piled up meanwhile, up to `DATABASE_BATCH_MAX` rows.
//! Every request is answered after its own row committed.
//!
//! What each request gets is what it would get alone:
//! - an Idempotency-Key seen before (stored earlier, or by a concurrent
//!   transaction that committed first) gives back the stored order, replay
//!   or conflict by the request's digest; two requests with one key in one
//!   batch store one order, the first's, and the second gets it back (or a
//!   conflict when its body differs), as if it had come just after;
//! - a batch that fails on a row (a constraint, a deadlock with another
//!   replica's keys) is rolled back and its requests are written one by one,
//!   so one bad row fails only itself;
//! - a batch that fails because Postgres cannot be reached fails every
//!   request in it with that error (503), and nothing of it is stored: it
//!   was one transaction, or one statement.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use chrono::{DateTime, SubsecRound, Utc};
use sqlx::Row;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::pg_sql::{map_err, row_to_order, MoveKind, QUALIFIED};
use super::{
    KeyedInsert, Order, OrderId, OrderRepository, StatusChange, StoreError, UpdateOutcome,
};
use crate::observability::metrics::StoreMetrics;

/// What the writer needs of the store it writes for: the store's own
/// single-row statements (the store without group commit: a lone request,
/// and each of a failed batch, are written with them), its pool, and its
/// lease. The Postgres store is the one there is; the writer names it only
/// through this, so neither module imports the other.
pub trait SingleRowStore: OrderRepository + Clone + Send + Sync + 'static {
    fn pool(&self) -> &sqlx::PgPool;
    /// This replica's id, the owner of the leases it takes.
    fn lease_owner(&self) -> &str;
    /// The lease's length in seconds, as the statements take it.
    fn lease_secs(&self) -> f64;
}

/// What a new order's write came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    /// Stored (and its key, if it had one, now names it).
    Stored,
    /// An order with its id already exists; nothing was stored.
    IdTaken,
    /// Its key named an order already: nothing was stored.
    KeyTaken { order: Order, same_request: bool },
}

/// An Idempotency-Key and the digest of the request it came with.
#[derive(Debug, Clone)]
pub struct Keyed {
    pub key: String,
    pub digest: String,
}

struct Pending {
    order: Order,
    key: Option<Keyed>,
    reply: oneshot::Sender<Result<Written, StoreError>>,
}

struct PendingMove {
    id: OrderId,
    change: StatusChange,
    /// When the move was asked for: its `updated_at`.
    at: DateTime<Utc>,
    reply: oneshot::Sender<Result<UpdateOutcome, StoreError>>,
}

/// The writer: requests go in through channels, one task per kind of
/// statement writes them.
pub struct GroupCommit<S> {
    inserts: mpsc::UnboundedSender<Pending>,
    moves: mpsc::UnboundedSender<PendingMove>,
    /// New orders being written or waiting to be, this replica's: a request
    /// that finds none writes its row itself, in its own task, with no hop
    /// through the writer.
    inserts_in_flight: Arc<AtomicUsize>,
    single: S,
    metrics: StoreMetrics,
}

/// One new order counted in `inserts_in_flight` until dropped (also when
/// the request is abandoned mid-write).
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    /// Counts one more; says whether it is the only one.
    fn enter(count: &Arc<AtomicUsize>) -> (Self, bool) {
        let before = count.fetch_add(1, Ordering::AcqRel);
        (Self(count.clone()), before == 0)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How many writes of one kind may run at once. One would serialize every
/// statement of its kind behind the previous one (the five workers' moves
/// measured at a third of their throughput alone); a few let the pool's
/// connections work while a batch still forms behind them.
const WRITES_AT_ONCE: usize = 4;

/// Runs `flush` on whatever piled up, up to `max` at a time and up to
/// `WRITES_AT_ONCE` flushes at once, as long as a sender lives: the first
/// request, then every one already waiting.
pub(crate) fn batch_loop<T, F, Fut>(max: usize, mut flush: F) -> mpsc::UnboundedSender<T>
where
    T: Send + 'static,
    F: FnMut(Vec<T>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (sender, mut receiver) = mpsc::unbounded_channel::<T>();
    let slots = Arc::new(tokio::sync::Semaphore::new(WRITES_AT_ONCE));
    tokio::spawn(async move {
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let Some(first) = receiver.recv().await else {
                return;
            };
            let mut batch = vec![first];
            while batch.len() < max {
                match receiver.try_recv() {
                    Ok(more) => batch.push(more),
                    Err(_) => break,
                }
            }
            let write = flush(batch);
            tokio::spawn(async move {
                write.await;
                drop(slot);
            });
        }
    });
    sender
}

impl<S: SingleRowStore> GroupCommit<S> {
    /// Starts the writing tasks. `single` writes one row alone (the store
    /// without group commit): a lone request, and each of a failed batch.
    /// The tasks end when the last handle is dropped, after the requests
    /// already sent are answered.
    pub fn start(single: S, max: usize, metrics: StoreMetrics) -> Arc<Self> {
        let max = max.max(1);
        let inserts = batch_loop(max, {
            let single = single.clone();
            let metrics = metrics.clone();
            move |batch| write_orders(single.clone(), batch, metrics.clone())
        });
        let moves = batch_loop(max, {
            let single = single.clone();
            move |batch| write_moves(single.clone(), batch)
        });
        Arc::new(Self {
            inserts,
            moves,
            inserts_in_flight: Arc::default(),
            single,
            metrics,
        })
    }

    /// Writes one new order (with its key): alone and at once when no other
    /// is being written, else in whatever batch it joins. The lone request
    /// thus takes exactly the path it would take without group commit, in
    /// its own task; the ones arriving while it runs pile up for the writer.
    pub async fn write(&self, order: &Order, key: Option<Keyed>) -> Result<Written, StoreError> {
        let (_counted, alone_now) = InFlight::enter(&self.inserts_in_flight);
        if alone_now {
            self.metrics.batch(1);
            return alone(&self.single, order, key.as_ref()).await;
        }
        let (reply, answer) = oneshot::channel();
        self.inserts
            .send(Pending {
                order: order.clone(),
                key,
                reply,
            })
            .map_err(|_| StoreError::Unavailable("the order writer has stopped".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Other("the order writer stopped mid-write".into()))?
    }

    /// Moves one order's status, in whatever batch the move joins.
    pub async fn move_status(
        &self,
        id: OrderId,
        change: &StatusChange,
    ) -> Result<UpdateOutcome, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.moves
            .send(PendingMove {
                id,
                change: change.clone(),
                at: crate::clock::now().trunc_subsecs(6),
                reply,
            })
            .map_err(|_| StoreError::Unavailable("the order writer has stopped".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Other("the order writer stopped mid-write".into()))?
    }
}

async fn write_orders<S: SingleRowStore>(
    single: S,
    mut batch: Vec<Pending>,
    metrics: StoreMetrics,
) {
    metrics.batch(batch.len());
    if batch.len() == 1 {
        let p = batch.pop().expect("one");
        let written = alone(&single, &p.order, p.key.as_ref()).await;
        let _ = p.reply.send(written);
        return;
    }
    match together(&single, &batch).await {
        Ok(written) => {
            for (p, w) in batch.into_iter().zip(written) {
                let _ = p.reply.send(w);
            }
        }
        Err(err @ StoreError::Unavailable(_)) => {
            for p in batch {
                let _ = p.reply.send(Err(err.clone()));
            }
        }
        Err(err) => {
            metrics.fallback();
            tracing::warn!(error = %err, rows = batch.len(), "a batch of new orders failed; writing them one by one");
            let writes = batch
                .iter()
                .map(|p| alone(&single, &p.order, p.key.as_ref()));
            let written = futures_util::future::join_all(writes).await;
            for (p, w) in batch.into_iter().zip(written) {
                let _ = p.reply.send(w);
            }
        }
    }
}

/// One order, with the store's own single-row statements.
async fn alone<S: SingleRowStore>(
    single: &S,
    order: &Order,
    key: Option<&Keyed>,
) -> Result<Written, StoreError> {
    match key {
        None => Ok(if single.insert(order).await? {
            Written::Stored
        } else {
            Written::IdTaken
        }),
        Some(k) => Ok(
            match single.insert_with_key(order, &k.key, &k.digest).await? {
                KeyedInsert::Created => Written::Stored,
                KeyedInsert::Existing {
                    order,
                    same_request,
                } => Written::KeyTaken {
                    order,
                    same_request,
                },
            },
        ),
    }
}

/// A batch in one transaction (one statement when it has no keys). The
/// outer error is the write's (nothing was stored); after the commit each
/// request has its own answer, in order.
async fn together<S: SingleRowStore>(
    single: &S,
    batch: &[Pending],
) -> Result<Vec<Result<Written, StoreError>>, StoreError> {
    // Who stores an order: every request without a key, and the first of
    // each key. The others with that key get what the first left.
    let mut first_with_key: HashMap<&str, usize> = HashMap::new();
    let mut writers: Vec<usize> = Vec::new();
    for (i, p) in batch.iter().enumerate() {
        match &p.key {
            None => writers.push(i),
            Some(k) => {
                if !first_with_key.contains_key(k.key.as_str()) {
                    first_with_key.insert(k.key.as_str(), i);
                    writers.push(i);
                }
            }
        }
    }

    let orders: Vec<&Order> = writers.iter().map(|&i| &batch[i].order).collect();
    let ids: Vec<Uuid> = orders.iter().map(|o| o.id.as_uuid()).collect();
    let customers: Vec<&str> = orders.iter().map(|o| o.customer_id.as_str()).collect();
    let amounts: Vec<i64> = orders.iter().map(|o| o.amount.value()).collect();
    let currencies: Vec<&str> = orders.iter().map(|o| o.currency.as_str()).collect();
    let statuses: Vec<&str> = orders.iter().map(|o| o.status.as_str()).collect();
    let attempts: Vec<i32> = orders
        .iter()
        .map(|o| i32::try_from(o.attempts).unwrap_or(i32::MAX))
        .collect();
    let errors: Vec<Option<&str>> = orders.iter().map(|o| o.last_error.as_deref()).collect();
    let created: Vec<DateTime<Utc>> = orders.iter().map(|o| o.created_at).collect();
    let updated: Vec<DateTime<Utc>> = orders.iter().map(|o| o.updated_at).collect();

    let insert = sqlx::query_scalar(
        "INSERT INTO orders (id, customer_id, amount, currency, status, attempts, last_error,
                             created_at, updated_at, lease_owner, lease_expires_at)
         SELECT n.id, n.customer_id, n.amount, n.currency, n.status, n.attempts, n.last_error,
                n.created_at, n.updated_at, $10, now() + make_interval(secs => $11)
           FROM UNNEST($1::uuid[], $2::text[], $3::int8[], $4::text[], $5::text[], $6::int4[],
                       $7::text[], $8::timestamptz[], $9::timestamptz[])
                AS n(id, customer_id, amount, currency, status, attempts, last_error,
                     created_at, updated_at)
         ON CONFLICT (id) DO NOTHING
         RETURNING id",
    )
    .bind(&ids)
    .bind(&customers)
    .bind(&amounts)
    .bind(&currencies)
    .bind(&statuses)
    .bind(&attempts)
    .bind(&errors)
    .bind(&created)
    .bind(&updated)
    .bind(single.lease_owner())
    .bind(single.lease_secs());
    if first_with_key.is_empty() {
        // No keys: the one statement is the whole write, atomic on its own,
        // so no BEGIN and COMMIT round trips around it.
        let stored: HashSet<Uuid> = insert
            .fetch_all(single.pool())
            .await
            .map_err(map_err)?
            .into_iter()
            .collect();
        return Ok(batch
            .iter()
            .map(|p| {
                Ok(if stored.contains(&p.order.id.as_uuid()) {
                    Written::Stored
                } else {
                    Written::IdTaken
                })
            })
            .collect());
    }
    let mut tx = single.pool().begin().await.map_err(map_err)?;
    let stored: Vec<Uuid> = insert.fetch_all(&mut *tx).await.map_err(map_err)?;
    let stored: HashSet<Uuid> = stored.into_iter().collect();

    // The keys of the first requests whose order went in, sorted so that
    // two replicas' batches lock the key index in the same order.
    let mut claims: Vec<(&str, &str, Uuid)> = first_with_key
        .values()
        .map(|&i| &batch[i])
        .filter(|p| stored.contains(&p.order.id.as_uuid()))
        .map(|p| {
            let k = p.key.as_ref().expect("keyed");
            (k.key.as_str(), k.digest.as_str(), p.order.id.as_uuid())
        })
        .collect();
    claims.sort_unstable();
    let claimed: HashSet<String> = if claims.is_empty() {
        HashSet::new()
    } else {
        let keys: Vec<&str> = claims.iter().map(|c| c.0).collect();
        let digests: Vec<&str> = claims.iter().map(|c| c.1).collect();
        let ids: Vec<Uuid> = claims.iter().map(|c| c.2).collect();
        let claimed: Vec<String> = sqlx::query_scalar(
            "INSERT INTO idempotency_keys (key, request_digest, order_id)
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::uuid[])
             ON CONFLICT (key) DO NOTHING
             RETURNING key",
        )
        .bind(&keys)
        .bind(&digests)
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await
        .map_err(map_err)?;
        claimed.into_iter().collect()
    };
    // Orders whose key was taken meanwhile go again, inside the transaction.
    let unclaimed: Vec<Uuid> = claims
        .iter()
        .filter(|c| !claimed.contains(c.0))
        .map(|c| c.2)
        .collect();
    if !unclaimed.is_empty() {
        sqlx::query("DELETE FROM orders WHERE id = ANY($1)")
            .bind(&unclaimed)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
    }
    tx.commit().await.map_err(map_err)?;

    // From here the batch is committed: a failure fails only the requests
    // it concerns, and never sends the batch round again.
    let claimed_by = |i: usize, k: &Keyed| {
        first_with_key.get(k.key.as_str()) == Some(&i) && claimed.contains(&k.key)
    };
    // Requests whose key names another order: read what it names.
    let to_read: Vec<&str> = batch
        .iter()
        .enumerate()
        .filter_map(|(i, p)| p.key.as_ref().filter(|k| !claimed_by(i, k)))
        .map(|k| k.key.as_str())
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let existing = read_keys(single, &to_read).await;

    Ok(batch
        .iter()
        .enumerate()
        .map(|(i, p)| match &p.key {
            None => Ok(if stored.contains(&p.order.id.as_uuid()) {
                Written::Stored
            } else {
                Written::IdTaken
            }),
            Some(k) if claimed_by(i, k) => Ok(Written::Stored),
            Some(k)
                if first_with_key.get(k.key.as_str()) == Some(&i)
                    && !stored.contains(&p.order.id.as_uuid()) =>
            {
                Ok(Written::IdTaken)
            }
            Some(k) => match &existing {
                Err(err) => Err(err.clone()),
                Ok(existing) => match existing.get(&k.key) {
                    Some((digest, order)) => Ok(Written::KeyTaken {
                        order: order.clone(),
                        same_request: *digest == k.digest,
                    }),
                    None => Err(StoreError::Other(format!(
                        "Idempotency-Key {:?} was taken but names no order",
                        k.key
                    ))),
                },
            },
        })
        .collect())
}

/// The digest and the order each of `keys` names.
async fn read_keys<S: SingleRowStore>(
    single: &S,
    keys: &[&str],
) -> Result<HashMap<String, (String, Order)>, StoreError> {
    let mut existing = HashMap::new();
    if keys.is_empty() {
        return Ok(existing);
    }
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT k.key, k.request_digest, {QUALIFIED}
           FROM idempotency_keys k JOIN orders o ON o.id = k.order_id
          WHERE k.key = ANY($1)"
    )))
    .bind(keys)
    .fetch_all(single.pool())
    .await
    .map_err(map_err)?;
    for row in rows {
        let key: String = row.try_get("key").map_err(map_err)?;
        let digest: String = row.try_get("request_digest").map_err(map_err)?;
        existing.insert(key, (digest, row_to_order(&row)?));
    }
    Ok(existing)
}

/// Status moves, as many as piled up, in one statement with the same
/// conditions as one move alone (the expected status, the lease). A move
/// of an order already moved in this batch waits for the next one.
async fn write_moves<S: SingleRowStore>(single: S, batch: Vec<PendingMove>) {
    let mut seen = HashSet::new();
    let (firsts, repeats): (Vec<PendingMove>, Vec<PendingMove>) =
        batch.into_iter().partition(|m| seen.insert(m.id));
    // One statement per kind of move (`MoveKind`): claims, then releases.
    let mut kinds: Vec<(MoveKind, Vec<PendingMove>)> = Vec::new();
    for m in firsts {
        let kind = match MoveKind::of(&m.change) {
            Ok(kind) => kind,
            Err(err) => {
                let _ = m.reply.send(Err(err));
                continue;
            }
        };
        match kinds.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, moves)) => moves.push(m),
            None => kinds.push((kind, vec![m])),
        }
    }
    for (kind, moves) in kinds {
        if moves.len() == 1 {
            move_alone(&single, moves).await;
        } else {
            moves_in_one(&single, kind, moves).await;
        }
    }
    move_alone(&single, repeats).await;
}

/// Each move with the single statement, one after another.
async fn move_alone<S: SingleRowStore>(single: &S, moves: Vec<PendingMove>) {
    for m in moves {
        let moved = single.update_status(m.id, &m.change).await;
        let _ = m.reply.send(moved);
    }
}

async fn moves_in_one<S: SingleRowStore>(single: &S, kind: MoveKind, batch: Vec<PendingMove>) {
    match moves_together(single, kind, &batch).await {
        Ok(moved) => {
            for (m, outcome) in batch.into_iter().zip(moved) {
                let outcome = match outcome {
                    Some(order) => Ok(UpdateOutcome::Updated(order)),
                    // Nothing moved: the single statement says why.
                    None => single.update_status(m.id, &m.change).await,
                };
                let _ = m.reply.send(outcome);
            }
        }
        Err(err @ StoreError::Unavailable(_)) => {
            for m in batch {
                let _ = m.reply.send(Err(err.clone()));
            }
        }
        Err(err) => {
            tracing::warn!(error = %err, moves = batch.len(), "a batch of status moves failed; moving them one by one");
            move_alone(single, batch).await;
        }
    }
}

/// The moves of a batch (distinct orders, one kind) in one statement: per
/// move, the order as moved, or none where its conditions did not hold.
async fn moves_together<S: SingleRowStore>(
    single: &S,
    kind: MoveKind,
    batch: &[PendingMove],
) -> Result<Vec<Option<Order>>, StoreError> {
    let ids: Vec<Uuid> = batch.iter().map(|m| m.id.as_uuid()).collect();
    let from: Vec<&str> = batch.iter().map(|m| m.change.from.as_str()).collect();
    let to: Vec<&str> = batch.iter().map(|m| m.change.to.as_str()).collect();
    let attempts: Vec<Option<i32>> = batch
        .iter()
        .map(|m| {
            m.change
                .attempts
                .map(|a| i32::try_from(a).unwrap_or(i32::MAX))
        })
        .collect();
    let errors: Vec<Option<&str>> = batch
        .iter()
        .map(|m| m.change.last_error.as_deref())
        .collect();
    let at: Vec<DateTime<Utc>> = batch.iter().map(|m| m.at).collect();
    let query = sqlx::query(sqlx::AssertSqlSafe(batch_statement(kind)))
        .bind(&ids)
        .bind(&from)
        .bind(&to)
        .bind(&attempts)
        .bind(&errors)
        .bind(&at)
        .bind(single.lease_owner());
    let rows = kind
        .bind_lease(query, single.lease_secs())
        .fetch_all(single.pool())
        .await
        .map_err(map_err)?;
    let mut moved: HashMap<Uuid, Order> = HashMap::new();
    for row in rows {
        let order = row_to_order(&row)?;
        moved.insert(order.id.as_uuid(), order);
    }
    Ok(ids.iter().map(|id| moved.remove(id)).collect())
}

/// The single move's statement (`MoveKind::statement`) over a set: the same
/// status and lease conditions per row. Parameters: arrays $1 ids, $2 from,
/// $3 to, $4 attempts, $5 last errors, $6 updated_at; $7 the lease owner
/// and, except for releases, $8 the lease's seconds.
fn batch_statement(kind: MoveKind) -> &'static str {
    static STATEMENTS: std::sync::OnceLock<[String; 2]> = std::sync::OnceLock::new();
    let all = STATEMENTS.get_or_init(|| {
        // What every move sets besides the lease.
        let set = "status = i.to_status, attempts = COALESCE(i.attempts, o.attempts), \
                   last_error = COALESCE(i.last_error, o.last_error), updated_at = i.at";
        let input = "input AS (
            SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::int4[], $5::text[],
                                 $6::timestamptz[])
                AS i(id, from_status, to_status, attempts, last_error, at)
         )";
        [
            format!(
                "WITH {input},
                 moved AS (
                    UPDATE orders o
                       SET {set},
                           lease_owner = $7,
                           lease_expires_at = now() + make_interval(secs => $8)
                      FROM input i
                     WHERE o.id = i.id AND o.status = i.from_status
                       AND (o.lease_owner IS NULL OR o.lease_owner = $7
                            OR o.lease_expires_at IS NULL OR o.lease_expires_at < now())
                    RETURNING {QUALIFIED}
                 ),
                 opened AS (
                    INSERT INTO order_lease_history (order_id, owner)
                    SELECT id, $7 FROM moved
                 )
                 SELECT * FROM moved"
            ),
            format!(
                "WITH {input},
                 moved AS (
                    UPDATE orders o
                       SET {set},
                           lease_owner = NULL,
                           lease_expires_at = NULL
                      FROM input i
                     WHERE o.id = i.id AND o.status = i.from_status AND o.lease_owner = $7
                    RETURNING {QUALIFIED}, i.to_status
                 ),
                 closed AS (
                    UPDATE order_lease_history h SET ended_at = clock_timestamp(), outcome = m.to_status
                      FROM moved m
                     WHERE h.order_id = m.id AND h.owner = $7 AND h.ended_at IS NULL
                 )
                 SELECT * FROM moved"
            ),
        ]
    });
    match kind {
        MoveKind::Claim => &all[0],
        MoveKind::Release => &all[1],
    }
}
