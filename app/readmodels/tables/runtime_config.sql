-- The current config of each module (filled by the runtime-config projection).
CREATE TABLE runtime_configs (
    tenant_id text NOT NULL,
    module text NOT NULL,
    settings jsonb NOT NULL,
    flags jsonb NOT NULL,
    version integer NOT NULL,
    updated_at timestamptz NOT NULL,
    updated_by text NOT NULL,
    PRIMARY KEY (tenant_id, module)
);

-- One row per flag of a configured module; the key orders both flag lists.
CREATE TABLE runtime_flags (
    tenant_id text NOT NULL,
    module text NOT NULL,
    flag text NOT NULL,
    enabled boolean NOT NULL,
    version integer NOT NULL,
    updated_at timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, module, flag)
);

-- One row per event: the config after it, who caused it, and what changed.
CREATE TABLE runtime_config_history (
    tenant_id text NOT NULL,
    module text NOT NULL,
    version integer NOT NULL,
    event_type text NOT NULL,
    settings jsonb NOT NULL,
    flags jsonb NOT NULL,
    actor text NOT NULL,
    at timestamptz NOT NULL,
    change jsonb NOT NULL,
    PRIMARY KEY (tenant_id, module, version)
);
