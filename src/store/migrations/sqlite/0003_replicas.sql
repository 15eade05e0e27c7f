-- Several replicas: who runs a turn, who owns a sandbox (its process lives on that replica), and
-- which replica is delivering a webhook until when (a lease another replica may take over).
ALTER TABLE turns ADD COLUMN replica TEXT;
ALTER TABLE sandboxes ADD COLUMN owner TEXT;
ALTER TABLE webhook_deliveries ADD COLUMN claimed_by TEXT;
ALTER TABLE webhook_deliveries ADD COLUMN claimed_until TEXT;
-- Each replica's heartbeat: a running turn whose replica stopped beating is ended by another.
CREATE TABLE replicas (
    id           TEXT PRIMARY KEY,
    alive_until  TEXT NOT NULL
);
