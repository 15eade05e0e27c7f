-- A tenant's quotas, set on its key (JSON, e.g. {"live_sessions": 20}); unset ones take the
-- server's defaults.
ALTER TABLE api_keys ADD COLUMN limits TEXT NOT NULL DEFAULT '{}';
