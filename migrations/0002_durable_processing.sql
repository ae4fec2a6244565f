-- Leases: an order that is queued or processing belongs to one replica until
-- its lease runs out; a replica that dies stops renewing, and another takes
-- the order over.
ALTER TABLE orders ADD COLUMN IF NOT EXISTS lease_owner TEXT;
ALTER TABLE orders ADD COLUMN IF NOT EXISTS lease_expires_at TIMESTAMPTZ;
CREATE INDEX IF NOT EXISTS orders_open_lease_idx
    ON orders (lease_expires_at)
    WHERE status IN ('pending', 'processing');

-- One row each time a replica moves an order to processing, closed when it
-- moves it on: the record that no order was processed by two at once.
CREATE TABLE IF NOT EXISTS order_lease_history (
    id          BIGSERIAL   PRIMARY KEY,
    order_id    UUID        NOT NULL REFERENCES orders (id),
    owner       TEXT        NOT NULL,
    started_at  TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    ended_at    TIMESTAMPTZ,
    outcome     TEXT
);
CREATE INDEX IF NOT EXISTS order_lease_history_order_idx ON order_lease_history (order_id);

-- The simulated payment provider's ledger, shared by every replica like one
-- external provider. A unique idempotency key makes a repeated charge a no-op.
CREATE TABLE IF NOT EXISTS payment_ledger (
    charge_id        UUID        PRIMARY KEY,
    order_id         UUID        NOT NULL,
    attempt          INTEGER     NOT NULL,
    idempotency_key  TEXT        UNIQUE,
    amount           BIGINT      NOT NULL,
    currency         TEXT        NOT NULL,
    created_at       TIMESTAMPTZ NOT NULL
);
CREATE INDEX IF NOT EXISTS payment_ledger_order_idx ON payment_ledger (order_id);

-- Idempotency-Key of POST /orders: the key, a digest of the request it came
-- with, and the order it created. Kept at least 24 hours.
CREATE TABLE IF NOT EXISTS idempotency_keys (
    key             TEXT        PRIMARY KEY,
    request_digest  TEXT        NOT NULL,
    order_id        UUID        NOT NULL REFERENCES orders (id),
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS idempotency_keys_created_idx ON idempotency_keys (created_at);
