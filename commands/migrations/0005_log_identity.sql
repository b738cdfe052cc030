-- The log's identity, made once when the log is created: the relay stamps it on every
-- message it mirrors, and a deployment refuses a stream that carries another log's events,
-- so two deployments that share a NATS server by mistake fail fast instead of consuming each
-- other's orders.
CREATE TABLE log_identity (
    only_row   boolean     PRIMARY KEY DEFAULT true CHECK (only_row),
    log_id     text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO log_identity (log_id) VALUES (gen_random_uuid()::text);
