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
        charge_id: Uuid::new_v4(),
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
            .or_default()
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
