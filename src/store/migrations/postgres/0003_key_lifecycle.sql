-- API keys can be revoked (kept, marked), show when they were last used, and say where they
-- came from: `env` (SANDWARDEN_API_KEY, retired when it changes), `generated` (the admin key
-- printed at first start) or `api` (POST /v1/api-keys).
ALTER TABLE api_keys ADD COLUMN revoked_at TEXT;
ALTER TABLE api_keys ADD COLUMN last_used_at TEXT;
ALTER TABLE api_keys ADD COLUMN origin TEXT NOT NULL DEFAULT 'api';
-- Admin keys from before this migration cannot be told apart: count them as the environment's,
-- so that a new SANDWARDEN_API_KEY retires them (docs/api.md, rotating the admin key).
UPDATE api_keys SET origin = 'env' WHERE admin;
