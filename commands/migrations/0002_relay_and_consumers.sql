-- Where the outbox relay has published the log up to, so a new leader resumes there. Only
-- the relay holding the advisory lock writes it (see commands/src/relay.rs).
CREATE TABLE relay_checkpoints (
    name            TEXT        PRIMARY KEY,
    transaction_id  XID8        NOT NULL,
    global_position BIGINT      NOT NULL,
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);

-- The last version of each stream a consumer is done with (handled or dead-lettered), for
-- consumer-side dedupe of at-least-once deliveries.
CREATE TABLE consumer_stream_versions (
    consumer       TEXT   NOT NULL,
    stream_id      TEXT   NOT NULL,
    stream_version BIGINT NOT NULL,
    PRIMARY KEY (consumer, stream_id)
);
