-- Server-wide settings every replica checks at start (the server secret's fingerprint), and
-- each turn's stop reason (the reply, the webhook and the `done` event carry it; the turn
-- resource reads it from here).
CREATE TABLE settings (
    name   TEXT PRIMARY KEY,
    value  TEXT NOT NULL
);
ALTER TABLE turns ADD COLUMN stop_reason TEXT;
