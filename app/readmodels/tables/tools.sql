CREATE TABLE tools (
    tenant_id text NOT NULL,
    tool_id text NOT NULL,
    name text NOT NULL,
    description text NOT NULL,
    input_schema jsonb NOT NULL,
    runtime_hints jsonb NOT NULL,
    guardrails jsonb NOT NULL,
    active boolean NOT NULL,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    version integer NOT NULL,
    PRIMARY KEY (tenant_id, tool_id)
);
-- Listing by name. Not unique: the worker keeps names unique per tenant (the
-- context's `unique` hook), and the read model shows what the events say.
CREATE INDEX tools_by_name ON tools (tenant_id, name, tool_id);
