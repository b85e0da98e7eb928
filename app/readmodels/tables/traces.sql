CREATE TABLE traces (
    tenant_id text NOT NULL,
    trace_id text NOT NULL,
    session_id text,
    status text NOT NULL,
    span_count integer NOT NULL,
    started_at timestamptz NOT NULL,  -- the earliest start of its spans
    finalized_at timestamptz,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    version integer NOT NULL,
    PRIMARY KEY (tenant_id, trace_id)
);
CREATE INDEX traces_by_session ON traces (tenant_id, session_id, created_at DESC, trace_id DESC);
CREATE INDEX traces_by_tenant ON traces (tenant_id, created_at DESC, trace_id DESC);

-- One row per span; `seq` is the version of the event that appended it (append order).
CREATE TABLE trace_spans (
    tenant_id text NOT NULL,
    trace_id text NOT NULL,
    seq integer NOT NULL,
    span_id text NOT NULL,
    parent_span_id text,
    name text NOT NULL,
    started_at timestamptz NOT NULL,
    ended_at timestamptz,
    status text NOT NULL,
    attributes jsonb NOT NULL,
    PRIMARY KEY (tenant_id, trace_id, seq)
);
