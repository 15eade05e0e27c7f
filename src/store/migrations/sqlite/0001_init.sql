-- Sessions, turns, messages, events, webhook deliveries, sandboxes and API keys.
-- Per-session env and files are never stored.

CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY,
    tenant      TEXT NOT NULL,
    key_hash    TEXT NOT NULL UNIQUE,
    admin       INTEGER NOT NULL DEFAULT 0,
    created_at  TEXT NOT NULL
);

CREATE TABLE sessions (
    id              TEXT PRIMARY KEY,
    tenant          TEXT NOT NULL,
    harness         TEXT NOT NULL,
    kind            TEXT NOT NULL,
    status          TEXT NOT NULL,
    phase           TEXT,
    failure_reason  TEXT,
    title           TEXT,
    metadata        TEXT NOT NULL DEFAULT '{}',
    sandbox_id      TEXT,
    endpoint        TEXT,
    idle_timeout_s  INTEGER NOT NULL,
    idempotency_key TEXT,
    request_hash    TEXT,
    created_at      TEXT NOT NULL,
    updated_at      TEXT NOT NULL,
    last_active_at  TEXT NOT NULL
);
CREATE UNIQUE INDEX sessions_idempotency ON sessions (tenant, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX sessions_by_tenant ON sessions (tenant, created_at, id);
CREATE INDEX sessions_by_status ON sessions (status);

CREATE TABLE turns (
    id           TEXT PRIMARY KEY,
    session_id   TEXT NOT NULL REFERENCES sessions (id),
    status       TEXT NOT NULL,
    mode         TEXT NOT NULL,
    options      TEXT NOT NULL DEFAULT '{}',
    text         TEXT,
    usage        TEXT,
    error        TEXT,
    created_at   TEXT NOT NULL,
    finished_at  TEXT
);
CREATE INDEX turns_by_session ON turns (session_id, created_at);
CREATE INDEX turns_running ON turns (status);

CREATE TABLE messages (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    id          TEXT NOT NULL UNIQUE,
    session_id  TEXT NOT NULL REFERENCES sessions (id),
    turn_id     TEXT NOT NULL,
    role        TEXT NOT NULL,
    text        TEXT NOT NULL,
    parts       TEXT NOT NULL,
    metadata    TEXT NOT NULL DEFAULT '{}',
    created_at  TEXT NOT NULL
);
CREATE INDEX messages_by_session ON messages (session_id, seq);

CREATE TABLE events (
    session_id  TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    turn_id     TEXT,
    type        TEXT NOT NULL,
    ts          TEXT NOT NULL,
    data        TEXT NOT NULL,
    PRIMARY KEY (session_id, seq)
) WITHOUT ROWID;

CREATE TABLE webhook_deliveries (
    id           TEXT PRIMARY KEY,
    turn_id      TEXT NOT NULL,
    session_id   TEXT NOT NULL,
    url          TEXT NOT NULL,
    status       TEXT NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    last_status  INTEGER,
    last_error   TEXT,
    created_at   TEXT NOT NULL,
    updated_at   TEXT NOT NULL
);
CREATE INDEX webhook_deliveries_by_turn ON webhook_deliveries (turn_id);

CREATE TABLE sandboxes (
    id          TEXT PRIMARY KEY,
    template    TEXT NOT NULL,
    endpoint    TEXT NOT NULL,
    pid         INTEGER,
    session_id  TEXT,
    created_at  TEXT NOT NULL
);
