-- The materialized views installed in this schema (projections/views.py): the
-- checksum of the definition each was created from, and its refreshes.
CREATE TABLE eddy_views (
    name text PRIMARY KEY,
    checksum text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    refreshed_at timestamptz,
    refreshes bigint NOT NULL DEFAULT 0,
    refresh_ms double precision  -- how long the last refresh took
);

-- Per view, feeding projection and event-stream shard: the projection's checkpoint
-- read just before the view's last refresh (or its creation). The view reflects
-- at least every event up to it.
CREATE TABLE eddy_view_positions (
    view_name text NOT NULL,
    projection text NOT NULL,
    context text NOT NULL,
    shard integer NOT NULL,
    entry_ms bigint NOT NULL,
    entry_seq bigint NOT NULL,
    PRIMARY KEY (view_name, projection, context, shard)
);

-- The last entry a projection committed (in the same transaction as its rows)
-- whose event makes the view stale. Nothing after it needs a refresh to be
-- reflected. A table apart from the positions, so a projector's batch never
-- waits for a refresh's row locks.
CREATE TABLE eddy_view_changes (
    view_name text NOT NULL,
    projection text NOT NULL,
    context text NOT NULL,
    shard integer NOT NULL,
    entry_ms bigint NOT NULL,
    entry_seq bigint NOT NULL,
    PRIMARY KEY (view_name, projection, context, shard)
);
