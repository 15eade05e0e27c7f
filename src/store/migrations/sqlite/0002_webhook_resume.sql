-- What a pending webhook delivery needs to be resumed after a restart: its options, the
-- client's token sealed under the server secret (cleared when the delivery ends), and the body.
ALTER TABLE webhook_deliveries ADD COLUMN include_messages INTEGER NOT NULL DEFAULT 0;
ALTER TABLE webhook_deliveries ADD COLUMN sealed_token TEXT;
ALTER TABLE webhook_deliveries ADD COLUMN body TEXT;
CREATE INDEX webhook_deliveries_pending ON webhook_deliveries (status) WHERE status = 'pending';
