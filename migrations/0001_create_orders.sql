-- Orders, one row each. Money is an integer in the currency's smallest unit.
CREATE TABLE IF NOT EXISTS orders (
    id          UUID PRIMARY KEY,
    customer_id TEXT        NOT NULL CHECK (length(customer_id) BETWEEN 1 AND 64),
    amount      BIGINT      NOT NULL CHECK (amount BETWEEN 1 AND 100000000),
    currency    CHAR(3)     NOT NULL,
    status      TEXT        NOT NULL CHECK (status IN ('pending', 'processing', 'completed', 'failed')),
    attempts    INTEGER     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    last_error  TEXT,
    created_at  TIMESTAMPTZ NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL
);

CREATE INDEX IF NOT EXISTS orders_status_idx ON orders (status);
