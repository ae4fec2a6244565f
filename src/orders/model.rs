//! The order and its parts, as types that can only hold valid values.
//!
//! Input is parsed once, at the edge, into these newtypes ("parse, don't
//! validate"): once code holds a `CustomerId` or an `Amount`, it is valid.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, SubsecRound, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::OrderError;

/// An order's identifier: a UUID v4.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OrderId(Uuid);

impl OrderId {
    /// A fresh id drawn from the operating system's random source.
    pub fn new_random() -> Self {
        Self(Uuid::new_v4())
    }

    /// An id made from 16 random bytes (version and variant bits set as v4).
    pub fn from_random_bytes(bytes: [u8; 16]) -> Self {
        Self(uuid::Builder::from_random_bytes(bytes).into_uuid())
    }

    pub fn from_uuid(id: Uuid) -> Self {
        Self(id)
    }

    pub fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl fmt::Display for OrderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for OrderId {
    type Err = OrderError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(Self).map_err(|_| {
            OrderError::invalid(
                "id",
                "must be a UUID such as 7f1c2e5a-3b4d-4e6f-8a9b-0c1d2e3f4a5b",
            )
        })
    }
}

/// Who placed the order: 1 to 64 characters of `[A-Za-z0-9_-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct CustomerId(String);

impl CustomerId {
    pub const MAX_LEN: usize = 64;

    pub fn parse(raw: &str) -> Result<Self, OrderError> {
        if raw.is_empty() {
            return Err(OrderError::invalid("customer_id", "must not be empty"));
        }
        if raw.len() > Self::MAX_LEN {
            return Err(OrderError::invalid(
                "customer_id",
                "must be at most 64 characters",
            ));
        }
        if !raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(OrderError::invalid(
                "customer_id",
                "may contain only letters, digits, '_' and '-'",
            ));
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An amount of money in the currency's smallest unit (cents for USD).
///
/// Money is never a float: 19.99 USD is `Amount(1999)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct Amount(i64);

impl Amount {
    pub const MIN: i64 = 1;
    pub const MAX: i64 = 100_000_000;

    pub fn parse(raw: i64) -> Result<Self, OrderError> {
        if (Self::MIN..=Self::MAX).contains(&raw) {
            Ok(Self(raw))
        } else {
            Err(OrderError::invalid(
                "amount",
                "must be an integer from 1 to 100000000 (in the currency's smallest unit)",
            ))
        }
    }

    pub fn value(&self) -> i64 {
        self.0
    }
}

/// A currency code: three ASCII letters, kept upper-case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Currency([u8; 3]);

impl Currency {
    pub fn parse(raw: &str) -> Result<Self, OrderError> {
        let bytes = raw.as_bytes();
        if bytes.len() != 3 || !bytes.iter().all(u8::is_ascii_alphabetic) {
            return Err(OrderError::invalid(
                "currency",
                "must be three ASCII letters such as USD",
            ));
        }
        Ok(Self([
            bytes[0].to_ascii_uppercase(),
            bytes[1].to_ascii_uppercase(),
            bytes[2].to_ascii_uppercase(),
        ]))
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII letters are ever stored, so this cannot fail.
        std::str::from_utf8(&self.0).unwrap_or("???")
    }
}

impl Serialize for Currency {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Where an order is in its life.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pending,
    Processing,
    Completed,
    Failed,
    /// Its charge met an open breaker (with `BREAKER_DEFER=on`): it waits,
    /// charged by nobody, until the breaker has closed or its deadline passes.
    Deferred,
}

impl Status {
    pub const ALL: [Status; 5] = [
        Status::Pending,
        Status::Processing,
        Status::Completed,
        Status::Failed,
        Status::Deferred,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Processing => "processing",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Deferred => "deferred",
        }
    }

    /// The one place that says which moves are legal.
    ///
    /// `processing -> pending` hands interrupted work back (a shutdown cancelled
    /// the charge) so that it is not left `processing` forever.
    /// `processing -> deferred` parks an order whose charge met an open
    /// breaker; `deferred -> pending` puts it back in line once the breaker
    /// has closed, and `deferred -> failed` ends it when its deadline passes.
    pub fn can_move_to(self, next: Status) -> bool {
        use Status::*;
        matches!(
            (self, next),
            (Pending, Processing)
                | (Processing, Completed)
                | (Processing, Failed)
                | (Processing, Pending)
                | (Processing, Deferred)
                | (Deferred, Pending)
                | (Deferred, Failed)
        )
    }

    /// Checks a move, naming both ends when it is illegal.
    pub fn check_move(self, next: Status) -> Result<(), OrderError> {
        if self.can_move_to(next) {
            Ok(())
        } else {
            Err(OrderError::IllegalTransition {
                from: self,
                to: next,
            })
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Status::Completed | Status::Failed)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Status {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Status::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown order status {s:?}"))
    }
}

/// A validated request to create an order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewOrder {
    pub customer_id: CustomerId,
    pub amount: Amount,
    pub currency: Currency,
}

/// An order as stored and as returned by the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Order {
    #[schema(value_type = uuid::Uuid)]
    pub id: OrderId,
    #[schema(value_type = String, min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9_-]+$")]
    pub customer_id: CustomerId,
    /// In the currency's smallest unit (cents for USD).
    #[schema(value_type = i64, minimum = 1, maximum = 100000000)]
    pub amount: Amount,
    /// Upper-case ISO-style code.
    #[schema(value_type = String, pattern = "^[A-Z]{3}$")]
    pub currency: Currency,
    pub status: Status,
    /// Charge calls that reached the payment service.
    pub attempts: u32,
    /// The reason of the last failed charge, in words a person can read.
    pub last_error: Option<String>,
    #[serde(serialize_with = "super::timestamp::serialize")]
    pub created_at: DateTime<Utc>,
    #[serde(serialize_with = "super::timestamp::serialize")]
    pub updated_at: DateTime<Utc>,
}

impl Order {
    /// How long the order took from creation to its last update (its final
    /// status, once it has one), by the wall clock its timestamps were read
    /// from; zero if that clock went back.
    pub fn age_at_last_update(&self) -> std::time::Duration {
        (self.updated_at - self.created_at)
            .to_std()
            .unwrap_or_default()
    }

    /// A new pending order. Timestamps are cut to microseconds, the precision
    /// Postgres keeps, so both stores hand back the same value.
    pub fn new(id: OrderId, new: NewOrder, now: DateTime<Utc>) -> Self {
        let now = now.trunc_subsecs(6);
        Self {
            id,
            customer_id: new.customer_id,
            amount: new.amount,
            currency: new.currency,
            status: Status::Pending,
            attempts: 0,
            last_error: None,
            created_at: now,
            updated_at: now,
        }
    }
}

/// A conditional status change: it applies only while the order is still in `from`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusChange {
    pub from: Status,
    pub to: Status,
    /// New value for `attempts`, when the change carries one.
    pub attempts: Option<u32>,
    /// New value for `last_error`, when the change carries one.
    pub last_error: Option<String>,
}

impl StatusChange {
    pub fn new(from: Status, to: Status) -> Self {
        Self {
            from,
            to,
            attempts: None,
            last_error: None,
        }
    }

    pub fn with_attempts(mut self, attempts: u32) -> Self {
        self.attempts = Some(attempts);
        self
    }

    pub fn with_last_error(mut self, reason: impl Into<String>) -> Self {
        self.last_error = Some(reason.into());
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn customer_id_accepts_the_allowed_alphabet_up_to_64_characters() {
        assert!(CustomerId::parse("cust-42").is_ok());
        assert!(CustomerId::parse("A_b-9").is_ok());
        assert!(CustomerId::parse(&"x".repeat(64)).is_ok());
    }

    #[test]
    fn customer_id_refuses_empty_long_and_foreign_characters() {
        for bad in ["", &"x".repeat(65), "cust 42", "cust/42", "é", "a.b"] {
            let err = CustomerId::parse(bad).unwrap_err();
            assert_eq!(err.field(), Some("customer_id"), "{bad:?}");
        }
    }

    #[test]
    fn amount_is_bounded_on_both_sides() {
        assert_eq!(Amount::parse(1).unwrap().value(), 1);
        assert_eq!(Amount::parse(100_000_000).unwrap().value(), 100_000_000);
        for bad in [0, -1, 100_000_001, i64::MAX, i64::MIN] {
            assert_eq!(Amount::parse(bad).unwrap_err().field(), Some("amount"));
        }
    }

    #[test]
    fn currency_is_three_letters_stored_upper_case() {
        assert_eq!(Currency::parse("usd").unwrap().as_str(), "USD");
        assert_eq!(Currency::parse("EuR").unwrap().as_str(), "EUR");
        for bad in ["", "US", "USDD", "U1D", "€UR", "us "] {
            assert_eq!(Currency::parse(bad).unwrap_err().field(), Some("currency"));
        }
    }

    #[test]
    fn order_id_parses_uuids_and_refuses_the_rest() {
        let id = OrderId::new_random();
        assert_eq!(id.to_string().parse::<OrderId>().unwrap(), id);
        assert_eq!("42".parse::<OrderId>().unwrap_err().field(), Some("id"));
    }

    #[test]
    fn new_ids_are_version_4() {
        assert_eq!(OrderId::new_random().as_uuid().get_version_num(), 4);
    }

    #[test]
    fn only_the_seven_legal_moves_are_allowed() {
        use Status::*;
        let legal = [
            (Pending, Processing),
            (Processing, Completed),
            (Processing, Failed),
            (Processing, Pending),
            (Processing, Deferred),
            (Deferred, Pending),
            (Deferred, Failed),
        ];
        for from in Status::ALL {
            for to in Status::ALL {
                let expected = legal.contains(&(from, to));
                assert_eq!(from.can_move_to(to), expected, "{from} -> {to}");
                assert_eq!(from.check_move(to).is_ok(), expected);
            }
        }
    }

    #[test]
    fn status_names_round_trip() {
        for st in Status::ALL {
            assert_eq!(st.as_str().parse::<Status>().unwrap(), st);
            assert_eq!(serde_json::to_value(st).unwrap(), st.as_str());
        }
        assert!("done".parse::<Status>().is_err());
    }

    #[test]
    fn new_orders_start_pending_with_microsecond_timestamps() {
        let new = NewOrder {
            customer_id: CustomerId::parse("c").unwrap(),
            amount: Amount::parse(5).unwrap(),
            currency: Currency::parse("usd").unwrap(),
        };
        let order = Order::new(OrderId::new_random(), new, Utc::now());
        assert_eq!(order.status, Status::Pending);
        assert_eq!(order.attempts, 0);
        assert_eq!(order.created_at.timestamp_subsec_nanos() % 1000, 0);
    }
}
