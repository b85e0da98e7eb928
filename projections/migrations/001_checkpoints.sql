-- One row per projection and event-stream shard: the last entry it committed.
CREATE TABLE eddy_checkpoints (
    projection text NOT NULL,
    context text NOT NULL,
    shard integer NOT NULL,
    entry_ms bigint NOT NULL,
    entry_seq bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (projection, context, shard)
);
