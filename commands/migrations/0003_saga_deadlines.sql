-- When the order saga must look at an order again: its payment deadline. Any instance fires
-- a due deadline; a claim keeps two from firing it at once, and a claim that outlives a dead
-- instance expires so another fires it (firing twice has one effect: saga steps are idempotent).
CREATE TABLE saga_deadlines (
    order_id      TEXT        PRIMARY KEY,
    due_at        TIMESTAMPTZ NOT NULL,
    claimed_until TIMESTAMPTZ NOT NULL DEFAULT '-infinity'
);

CREATE INDEX saga_deadlines_due ON saga_deadlines (due_at);
