-- The shape a delivery's payload takes when its client's platform reads another than the
-- native one (JSON: `{"dialect": "motus", "session_id": …}`); NULL for the native payload.
ALTER TABLE webhook_deliveries ADD COLUMN shape TEXT;
