-- Generations of cached query answers (projections/cache.py). The projector moves
-- a row in the transaction that projects an event changing the query's answers;
-- an answer is cached under the sum of the generations that cover it:
--   (query, '', '')            the whole query (moved when a rebuild swaps tables)
--   (query, tenant, '')        every answer of one tenant
--   (query, tenant, scope)     the answers of one scope (a session, say)
-- A missing row counts 0; a row is only ever moved up, never reset or deleted.
CREATE TABLE eddy_cache_generations (
    query text NOT NULL,
    tenant_id text NOT NULL,
    scope text NOT NULL,
    generation bigint NOT NULL,
    PRIMARY KEY (query, tenant_id, scope)
);
