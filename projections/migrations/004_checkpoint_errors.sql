-- The last error of a projection's batch on a shard (`eddy status`, /metrics),
-- written outside the failed batch's transaction and cleared when the shard's
-- checkpoint next advances.
ALTER TABLE eddy_checkpoints
    ADD COLUMN last_error text,
    ADD COLUMN last_error_at timestamptz;
