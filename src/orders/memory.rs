//! The in-memory store: the default when `DATABASE_URL` is unset.
//!
//! Nothing survives a restart (`durability: none`). It has no leases: one
//! process owns all.
//!
//! It holds at most `max_orders` orders (`MEMORY_MAX_ORDERS`): past that, a
//! new order evicts the order that finished longest ago, with its
//! Idempotency-Key. A pending or processing order is never evicted; when
//! every stored order is unfinished, a new one is refused with
//! `StoreError::Full` (503, like a full queue) and nothing is stored. An
//! evicted order's charges leave the in-memory ledger with it (`on_evict`).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use prometheus::IntCounter;

use async_trait::async_trait;
use chrono::{DateTime, SubsecRound, Utc};

use super::{
    Durability, KeyedInsert, Order, OrderId, OrderRepository, Status, StatusChange, StatusCounts,
    StoreError, UpdateOutcome,
};

/// Orders live in shards, each behind its own lock. A single map stalled
/// every request while it rehashed on growth: at a million orders the load
/// benchmark saw a p99 of 234 ms. A shard rehashes a sixty-fourth as much.
const SHARDS: usize = 64;

/// Boxed orders: a table grows in powers of two, so its empty slots cost the
/// size of an entry; a box keeps entries small (measured per order).
type Shard = HashMap<OrderId, Box<Order>>;

/// What an idempotency key remembers: the request's digest, its order, when.
type KeyRecord = (String, OrderId, DateTime<Utc>);

/// Idempotency keys both ways: by key, and the key of each keyed order (to
/// forget it with its order). The key text is shared by both maps.
#[derive(Default)]
struct Keys {
    by_key: HashMap<Arc<str>, KeyRecord>,
    by_order: HashMap<OrderId, Arc<str>>,
}

/// The most orders the memory store holds unless told otherwise.
pub const DEFAULT_MAX_ORDERS: usize = 250_000;

pub struct MemoryStore {
    shards: Box<[RwLock<Shard>]>,
    /// Taken before a shard's lock when both are needed.
    keys: RwLock<Keys>,
    /// Orders stored now.
    count: AtomicUsize,
    max_orders: usize,
    /// Finished orders, the earliest finished first: the eviction order.
    finished: Mutex<VecDeque<OrderId>>,
    /// Deferred orders, the earliest created first. An entry may outlive
    /// its order's deferral for a moment (it is added after the move and
    /// checked again when taken), never the other way round.
    deferred: Mutex<BTreeSet<(DateTime<Utc>, OrderId)>>,
    evicted: IntCounter,
    /// Told of each evicted order, to forget what else is kept for it.
    on_evict: Option<Box<dyn Fn(OrderId) + Send + Sync>>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::with_limit(
            DEFAULT_MAX_ORDERS,
            IntCounter::new("orders_evicted_total", "unregistered").expect("valid metric"),
        )
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// A store of at most `max_orders` orders, counting evictions in `evicted`.
    pub fn with_limit(max_orders: usize, evicted: IntCounter) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| RwLock::default()).collect(),
            keys: RwLock::default(),
            count: AtomicUsize::new(0),
            max_orders: max_orders.max(1),
            finished: Mutex::default(),
            deferred: Mutex::default(),
            evicted,
            on_evict: None,
        }
    }

    /// Calls `forget` with each evicted order's id (after the store let go
    /// of it), so that what is kept elsewhere per order (the in-memory
    /// ledger's charges) stays within the same bound.
    pub fn on_evict(mut self, forget: impl Fn(OrderId) + Send + Sync + 'static) -> Self {
        self.on_evict = Some(Box::new(forget));
        self
    }

    /// Takes room for one more order, evicting finished orders as needed.
    /// The caller gives the room back (`count -= 1`) if it stores nothing.
    fn reserve_room(&self) -> Result<(), StoreError> {
        loop {
            let n = self.count.load(Ordering::SeqCst);
            if n < self.max_orders {
                if self
                    .count
                    .compare_exchange(n, n + 1, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
                {
                    return Ok(());
                }
                continue;
            }
            if !self.evict_one()? {
                return Err(StoreError::Full);
            }
        }
    }

    /// Forgets the order that finished longest ago, and its key. False when
    /// no finished order is left.
    fn evict_one(&self) -> Result<bool, StoreError> {
        let Some(id) = self.finished.lock().map_err(|_| poisoned())?.pop_front() else {
            return Ok(false);
        };
        let mut keys = self.keys.write().map_err(|_| poisoned())?;
        if let Some(key) = keys.by_order.remove(&id) {
            keys.by_key.remove(&key);
        }
        let removed = self
            .shard(&id)
            .write()
            .map_err(|_| poisoned())?
            .remove(&id)
            .is_some();
        drop(keys);
        if removed {
            self.count.fetch_sub(1, Ordering::SeqCst);
            self.evicted.inc();
            if let Some(forget) = &self.on_evict {
                forget(id);
            }
        }
        Ok(true)
    }

    fn shard(&self, id: &OrderId) -> &RwLock<Shard> {
        // v4 ids are random: any byte spreads them evenly.
        &self.shards[usize::from(id.as_uuid().as_bytes()[15]) % SHARDS]
    }
}

impl MemoryStore {
    /// Stores `order` under `key` unless the key names an order already;
    /// the room for it is already reserved.
    fn insert_keyed(
        &self,
        order: &Order,
        key: &str,
        request_digest: &str,
    ) -> Result<KeyedInsert, StoreError> {
        let mut keys = self.keys.write().map_err(|_| poisoned())?;
        if let Some((digest, existing, _)) = keys.by_key.get(key) {
            let same_request = digest == request_digest;
            let order = self
                .shard(existing)
                .read()
                .map_err(|_| poisoned())?
                .get(existing)
                .map(|o| Order::clone(o))
                .ok_or_else(|| StoreError::Other("idempotency key names a missing order".into()))?;
            return Ok(KeyedInsert::Existing {
                order,
                same_request,
            });
        }
        let mut shard = self.shard(&order.id).write().map_err(|_| poisoned())?;
        if shard.contains_key(&order.id) {
            return Err(StoreError::Other(format!(
                "order id {} already taken",
                order.id
            )));
        }
        shard.insert(order.id, Box::new(order.clone()));
        let key: Arc<str> = Arc::from(key);
        keys.by_order.insert(order.id, key.clone());
        keys.by_key.insert(
            key,
            (request_digest.to_owned(), order.id, crate::clock::now()),
        );
        Ok(KeyedInsert::Created)
    }
}

impl MemoryStore {
    /// Moves a deferred order on (its index entry is already gone); none
    /// when it is no longer deferred.
    fn move_deferred(
        &self,
        id: OrderId,
        to: Status,
        reason: Option<&str>,
    ) -> Result<Option<Order>, StoreError> {
        let mut shard = self.shard(&id).write().map_err(|_| poisoned())?;
        let Some(order) = shard.get_mut(&id).filter(|o| o.status == Status::Deferred) else {
            return Ok(None);
        };
        order.status = to;
        if let Some(reason) = reason {
            order.last_error = Some(reason.to_owned());
        }
        order.updated_at = crate::clock::now().trunc_subsecs(6);
        Ok(Some(Order::clone(order)))
    }
}

fn poisoned() -> StoreError {
    StoreError::Other("in-memory store lock poisoned".into())
}

#[async_trait]
impl OrderRepository for MemoryStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn durability(&self) -> Durability {
        Durability::None
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.keys.read().map(|_| ()).map_err(|_| poisoned())
    }

    async fn insert(&self, order: &Order) -> Result<bool, StoreError> {
        self.reserve_room()?;
        let mut shard = self.shard(&order.id).write().map_err(|_| poisoned())?;
        if shard.contains_key(&order.id) {
            self.count.fetch_sub(1, Ordering::SeqCst);
            return Ok(false);
        }
        shard.insert(order.id, Box::new(order.clone()));
        Ok(true)
    }

    async fn insert_with_key(
        &self,
        order: &Order,
        key: &str,
        request_digest: &str,
    ) -> Result<KeyedInsert, StoreError> {
        self.reserve_room()?;
        let stored = self.insert_keyed(order, key, request_digest);
        if !matches!(stored, Ok(KeyedInsert::Created)) {
            self.count.fetch_sub(1, Ordering::SeqCst);
        }
        stored
    }

    async fn get(&self, id: OrderId) -> Result<Option<Order>, StoreError> {
        let shard = self.shard(&id).read().map_err(|_| poisoned())?;
        Ok(shard.get(&id).map(|o| Order::clone(o)))
    }

    async fn update_status(
        &self,
        id: OrderId,
        change: &StatusChange,
    ) -> Result<UpdateOutcome, StoreError> {
        let mut shard = self.shard(&id).write().map_err(|_| poisoned())?;
        let Some(order) = shard.get_mut(&id) else {
            return Ok(UpdateOutcome::NotFound);
        };
        if order.status != change.from {
            return Ok(UpdateOutcome::WrongStatus(order.status));
        }
        order.status = change.to;
        if let Some(attempts) = change.attempts {
            order.attempts = attempts;
        }
        if let Some(reason) = &change.last_error {
            order.last_error = Some(reason.clone());
        }
        order.updated_at = crate::clock::now().trunc_subsecs(6);
        let updated = Order::clone(order);
        drop(shard);
        if updated.status.is_terminal() {
            // Finished: from now on it may be evicted, oldest first.
            self.finished.lock().map_err(|_| poisoned())?.push_back(id);
        }
        if updated.status == Status::Deferred {
            self.deferred
                .lock()
                .map_err(|_| poisoned())?
                .insert((updated.created_at, id));
        }
        Ok(UpdateOutcome::Updated(updated))
    }

    async fn count_by_status(&self) -> Result<StatusCounts, StoreError> {
        let mut counts: StatusCounts = Status::ALL.into_iter().map(|s| (s, 0)).collect();
        for shard in self.shards.iter() {
            let shard = shard.read().map_err(|_| poisoned())?;
            for order in shard.values() {
                *counts.entry(order.status).or_default() += 1;
            }
        }
        Ok(counts)
    }

    async fn count_deferred(&self) -> Result<u64, StoreError> {
        Ok(self.deferred.lock().map_err(|_| poisoned())?.len() as u64)
    }

    async fn take_deferred(&self, limit: usize) -> Result<Vec<OrderId>, StoreError> {
        let mut taken = Vec::new();
        while taken.len() < limit {
            let Some((_, id)) = self.deferred.lock().map_err(|_| poisoned())?.pop_first() else {
                break;
            };
            if self.move_deferred(id, Status::Pending, None)?.is_some() {
                taken.push(id);
            }
        }
        Ok(taken)
    }

    async fn expire_deferred(
        &self,
        created_before: DateTime<Utc>,
        reason: &str,
    ) -> Result<Vec<Order>, StoreError> {
        let due: Vec<(DateTime<Utc>, OrderId)> = {
            let mut deferred = self.deferred.lock().map_err(|_| poisoned())?;
            let rest = deferred.split_off(&(created_before, OrderId::from_uuid(uuid::Uuid::nil())));
            std::mem::replace(&mut *deferred, rest)
                .into_iter()
                .collect()
        };
        let mut failed = Vec::new();
        for (_, id) in due {
            if let Some(order) = self.move_deferred(id, Status::Failed, Some(reason))? {
                self.finished.lock().map_err(|_| poisoned())?.push_back(id);
                failed.push(order);
            }
        }
        Ok(failed)
    }

    async fn purge_keys_older_than(&self, age: Duration) -> Result<u64, StoreError> {
        let cutoff =
            crate::clock::now() - chrono::Duration::from_std(age).unwrap_or(chrono::Duration::MAX);
        let mut keys = self.keys.write().map_err(|_| poisoned())?;
        let Keys { by_key, by_order } = &mut *keys;
        let before = by_key.len();
        // A key exactly `age` old is past its time: an age of zero forgets all.
        by_key.retain(|_, (_, order, at)| {
            let keep = *at > cutoff;
            if !keep {
                by_order.remove(order);
            }
            keep
        });
        Ok((before - by_key.len()) as u64)
    }
}
