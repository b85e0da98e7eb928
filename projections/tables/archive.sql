-- Every event of every context, as it was appended: history, not a read model.
-- Append-only; the primary key is the stream position, so rows sort in replay
-- order per shard and an event archived twice fails loudly.
CREATE TABLE event_archive (
    context text NOT NULL,
    shard integer NOT NULL,
    entry_ms bigint NOT NULL,
    entry_seq bigint NOT NULL,
    event_id text NOT NULL,
    type text NOT NULL,
    schema_version integer NOT NULL,
    tenant_id text NOT NULL,
    aggregate_id text NOT NULL,
    aggregate_version integer NOT NULL,
    occurred_at timestamptz NOT NULL,
    payload jsonb NOT NULL,
    metadata jsonb NOT NULL,
    archived_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (context, shard, entry_ms, entry_seq)
);
-- One aggregate's history, in version order.
CREATE INDEX event_archive_by_aggregate
    ON event_archive (tenant_id, context, aggregate_id, aggregate_version);
