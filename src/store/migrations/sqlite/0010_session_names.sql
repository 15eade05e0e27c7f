-- A session id a client picks is a name in its tenant's namespace: the session's id is derived
-- from the tenant and the name (so two tenants may pick the same name, and neither can learn
-- that the other did), and the name is kept here to show it back.
ALTER TABLE sessions ADD COLUMN name TEXT;
