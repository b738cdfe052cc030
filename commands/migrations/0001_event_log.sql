-- The append-only event log: the source of truth of groupbuy.

CREATE TABLE events (
    -- Insertion order. Unique and increasing, but NOT commit order: a transaction that took
    -- position 10 may commit after one that took 11. Readers of the global log order by
    -- (transaction_id, global_position) and stop at the oldest running transaction instead;
    -- see docs/adr/0002-global-log-order.md.
    global_position BIGSERIAL PRIMARY KEY,
    event_id        UUID        NOT NULL,
    stream_id       TEXT        NOT NULL,
    stream_version  BIGINT      NOT NULL CHECK (stream_version >= 1),
    event_type      TEXT        NOT NULL,
    schema_version  INTEGER     NOT NULL CHECK (schema_version >= 1),
    data            JSONB       NOT NULL,
    metadata        JSONB       NOT NULL,
    recorded_at     TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    transaction_id  XID8        NOT NULL DEFAULT pg_current_xact_id(),
    -- Optimistic concurrency: two decisions on the same stream version cannot both commit.
    CONSTRAINT events_stream_version_key UNIQUE (stream_id, stream_version),
    -- Idempotent appends: the same event sent twice is stored once.
    CONSTRAINT events_event_id_key UNIQUE (event_id)
);

-- The global read order.
CREATE INDEX events_transaction_order ON events (transaction_id, global_position);

-- The latest folded state of long streams, so loading does not replay from version 1.
CREATE TABLE snapshots (
    stream_id      TEXT        PRIMARY KEY,
    stream_version BIGINT      NOT NULL,
    -- Bumped in code when the state's shape changes; a snapshot of another shape is ignored.
    state_version  INTEGER     NOT NULL,
    state          JSONB       NOT NULL,
    taken_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Idempotency-Key records. A claim is taken before the command runs and completed with the
-- response in the same transaction as the append, so a response exists exactly when its
-- events do.
CREATE TABLE idempotency_keys (
    scope            TEXT        NOT NULL,
    key              TEXT        NOT NULL,
    request_sha256   TEXT        NOT NULL,
    -- The claim that currently owns an in-flight key; completing with another claim fails.
    claim_id         UUID        NOT NULL,
    locked_until     TIMESTAMPTZ NOT NULL,
    response_status  SMALLINT,
    response_headers JSONB,
    response_body    BYTEA,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    completed_at     TIMESTAMPTZ,
    PRIMARY KEY (scope, key)
);

CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);
