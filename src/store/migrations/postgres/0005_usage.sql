-- What each tenant's turns used, per session and day (UTC): tokens the agents reported, turns
-- and turn time. Written in the commit that ends each turn; budgets are checked against it and
-- GET /v1/usage reads it.
CREATE TABLE usage_daily (
    tenant         TEXT NOT NULL,
    session_id     TEXT NOT NULL,
    day            TEXT NOT NULL,
    input_tokens   BIGINT NOT NULL DEFAULT 0,
    output_tokens  BIGINT NOT NULL DEFAULT 0,
    turns          BIGINT NOT NULL DEFAULT 0,
    turn_ms        BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, session_id, day)
);
