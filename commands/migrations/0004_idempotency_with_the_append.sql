-- Idempotency-Key records are written whole, in the transaction of the append they answer
-- (or alone, for a request that appended nothing), never claimed ahead of the work: nothing
-- is left half-done when a request dies, and no lease has to run out before a retry.
-- Claims still in flight at the upgrade are dropped; their requests stored nothing.
DELETE FROM idempotency_keys WHERE response_status IS NULL;
ALTER TABLE idempotency_keys
    DROP COLUMN claim_id,
    DROP COLUMN locked_until,
    DROP COLUMN completed_at,
    ALTER COLUMN response_status SET NOT NULL,
    ALTER COLUMN response_headers SET NOT NULL,
    ALTER COLUMN response_body SET NOT NULL;
