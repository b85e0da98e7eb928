CREATE TABLE chat_sessions (
    tenant_id text NOT NULL,
    session_id text NOT NULL,
    agent_id text NOT NULL,
    status text NOT NULL,
    participants jsonb NOT NULL,
    metadata jsonb NOT NULL,
    routing jsonb NOT NULL,
    close_reason text,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    version integer NOT NULL,
    PRIMARY KEY (tenant_id, session_id)
);
CREATE INDEX chat_sessions_by_agent ON chat_sessions (tenant_id, agent_id, created_at DESC, session_id DESC);
CREATE INDEX chat_sessions_by_tenant ON chat_sessions (tenant_id, created_at DESC, session_id DESC);
