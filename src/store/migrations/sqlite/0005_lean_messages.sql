-- A message is two B-tree entries, not four: the table (ordered by `seq`) and the per-session
-- index. `AUTOINCREMENT` rewrote the `sqlite_sequence` page on every insert, and the unique index
-- on `id` was never read (ids are UUIDv7s made here). Without `AUTOINCREMENT` a new `seq` is still
-- larger than every stored one, so history keeps its order. About four fewer pages are written to
-- the WAL per turn (of about 23).
CREATE TABLE messages_lean (
    seq         INTEGER PRIMARY KEY,
    id          TEXT NOT NULL,
    session_id  TEXT NOT NULL REFERENCES sessions (id),
    turn_id     TEXT NOT NULL,
    role        TEXT NOT NULL,
    text        TEXT NOT NULL,
    parts       TEXT NOT NULL,
    metadata    TEXT NOT NULL DEFAULT '{}',
    created_at  TEXT NOT NULL
);
INSERT INTO messages_lean (seq, id, session_id, turn_id, role, text, parts, metadata, created_at)
    SELECT seq, id, session_id, turn_id, role, text, parts, metadata, created_at FROM messages;
DROP TABLE messages;
ALTER TABLE messages_lean RENAME TO messages;
CREATE INDEX messages_by_session ON messages (session_id, seq);
DELETE FROM sqlite_sequence WHERE name = 'messages';
