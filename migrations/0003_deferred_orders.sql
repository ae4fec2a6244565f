-- Deferred orders: a charge that met an open breaker waits, leased by
-- nobody, until the breaker has closed (BREAKER_DEFER=on). Any replica may
-- take one back to pending; one whose deadline passed fails.
ALTER TABLE orders DROP CONSTRAINT IF EXISTS orders_status_check;
ALTER TABLE orders ADD CONSTRAINT orders_status_check
    CHECK (status IN ('pending', 'processing', 'completed', 'failed', 'deferred'));
CREATE INDEX IF NOT EXISTS orders_deferred_idx
    ON orders (created_at, id)
    WHERE status = 'deferred';
