-- The archive of finished generations (broker.pg_archive). One row per generation, one per
-- event; what Redis held, byte for byte, so every read path answers the same from here.

CREATE TABLE streambroker_generations (
    -- COLLATE "C": ids compare as bytes, as Redis orders a listing's ties.
    id              text COLLATE "C" PRIMARY KEY,
    -- '' when auth is off, as in Redis.
    tenant          text NOT NULL,
    status          text NOT NULL,
    created_at_ms   bigint NOT NULL,
    last_seq        integer NOT NULL,
    -- The meta hash as Redis held it: a JSON object of strings, in Redis's field order (a
    -- json, not jsonb, column: it keeps the order), less the store-local fields.
    meta            json NOT NULL,
    -- Event connections opened on it, and resumes among them: they go on counting here.
    connections     bigint NOT NULL DEFAULT 0,
    resumes         bigint NOT NULL DEFAULT 0,
    -- The answer's text, as the text key held it (UTF-8 bytes).
    text            bytea NOT NULL,
    archived_at     timestamptz NOT NULL DEFAULT now()
);

-- Listings: newest first, ties by id; per tenant with auth on.
CREATE INDEX streambroker_generations_listing
    ON streambroker_generations (created_at_ms DESC, id DESC);
CREATE INDEX streambroker_generations_tenant_listing
    ON streambroker_generations (tenant, created_at_ms DESC, id DESC);
-- Archive retention deletes the oldest first.
CREATE INDEX streambroker_generations_archived_at
    ON streambroker_generations (archived_at);

CREATE TABLE streambroker_events (
    stream_id       text COLLATE "C" NOT NULL
                    REFERENCES streambroker_generations (id) ON DELETE CASCADE,
    seq             integer NOT NULL,
    -- The event exactly as the Redis stream entry held it (msgpack: type, t, data).
    payload         bytea NOT NULL,
    PRIMARY KEY (stream_id, seq)
);
