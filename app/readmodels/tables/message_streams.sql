CREATE TABLE message_streams (
    tenant_id text NOT NULL,
    stream_id text NOT NULL,
    session_id text NOT NULL,
    participant_id text NOT NULL,
    status text NOT NULL,
    chunk_count integer NOT NULL,
    text text NOT NULL,
    stop_reason text,
    started_at timestamptz NOT NULL,
    stopped_at timestamptz,
    updated_at timestamptz NOT NULL,
    version integer NOT NULL,
    PRIMARY KEY (tenant_id, stream_id)
);
CREATE INDEX message_streams_by_session ON message_streams (tenant_id, session_id, started_at, stream_id);
CREATE INDEX message_streams_by_status ON message_streams (tenant_id, status, started_at, stream_id);

-- One block per stopped message stream: the session's transcript (read by the
-- chat-sessions projection's GetChatSessionTranscript).
CREATE TABLE chat_transcript_blocks (
    tenant_id text NOT NULL,
    session_id text NOT NULL,
    stream_id text NOT NULL,
    participant_id text NOT NULL,
    text text NOT NULL,
    started_at timestamptz NOT NULL,
    stopped_at timestamptz,
    PRIMARY KEY (tenant_id, session_id, stream_id)
);
