-- The schema as it was before device_health: tests/test_migration.py upgrades it.
-- The gateway's whole database. Applied by `gateway db migrate`; every statement is
-- idempotent so the file can be applied again to an existing database.

CREATE TABLE IF NOT EXISTS devices (
    id                   text        PRIMARY KEY,
    -- Monotonic insertion order: list pagination walks it, so devices added while a
    -- caller pages through the list never cause gaps or repeats.
    seq                  bigserial   NOT NULL UNIQUE,
    serial_number        text        NOT NULL UNIQUE,
    device_type          text,
    firmware_version     text,
    end_user_id          text,
    bound_at             timestamptz,
    metadata             jsonb,
    -- Health, from heartbeats. Typed columns, not a JSON bag.
    battery_percent      smallint,
    storage_used_mb      bigint,
    storage_total_mb     bigint,
    signal_strength_dbm  smallint,
    recording_state      jsonb,
    -- Newest device clock (`ts`, ms) applied: the ordering guard for heartbeats.
    last_ts              bigint,
    last_heartbeat_at    timestamptz,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    deleted_at           timestamptz
);
-- Heartbeats rewrite every device row each minute: leave room on each page so the update
-- stays on it (a HOT update that writes no index entry).
ALTER TABLE devices SET (fillfactor = 80);
CREATE INDEX IF NOT EXISTS devices_end_user_idx ON devices (end_user_id) WHERE end_user_id IS NOT NULL;

CREATE TABLE IF NOT EXISTS device_settings (
    device_id        text        PRIMARY KEY REFERENCES devices (id),
    document         json        NOT NULL,  -- json keeps the documented key order
    version          integer     NOT NULL,
    -- The settings version the device last reported as applied (0: none yet).
    applied_version  integer     NOT NULL DEFAULT 0,
    updated_at       timestamptz NOT NULL DEFAULT now()
);

-- Every settings version a device was given, so the gateway can send a merge patch from
-- the version a device reports. Pruned to the newest versions per device.
CREATE TABLE IF NOT EXISTS device_settings_history (
    device_id   text        NOT NULL REFERENCES devices (id),
    version     integer     NOT NULL,
    document    json        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (device_id, version)
);

CREATE TABLE IF NOT EXISTS commands (
    id               text        PRIMARY KEY,
    seq              bigserial   NOT NULL UNIQUE,
    device_id        text        NOT NULL REFERENCES devices (id),
    type             text        NOT NULL,
    params           jsonb       NOT NULL DEFAULT '{}',
    -- pending | delivered | succeeded | failed | rejected | expired | canceled.
    -- An open command past expires_at reads as expired before the sweep persists it.
    status           text        NOT NULL DEFAULT 'pending',
    attempts         integer     NOT NULL DEFAULT 0,
    idempotency_key  text,
    result           jsonb,
    created_at       timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz,
    completed_at     timestamptz,
    expires_at       timestamptz NOT NULL,
    CONSTRAINT commands_status_check CHECK (status IN
        ('pending', 'delivered', 'succeeded', 'failed', 'rejected', 'expired', 'canceled'))
);
CREATE UNIQUE INDEX IF NOT EXISTS commands_idempotency_idx
    ON commands (device_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS commands_open_idx
    ON commands (device_id, seq) WHERE status IN ('pending', 'delivered');
CREATE INDEX IF NOT EXISTS commands_device_idx ON commands (device_id, seq);
-- At most one open factory_reset per device, whatever races the reset route.
CREATE UNIQUE INDEX IF NOT EXISTS commands_one_open_reset_idx
    ON commands (device_id) WHERE type = 'factory_reset' AND status IN ('pending', 'delivered');

CREATE TABLE IF NOT EXISTS api_keys (
    id          text        PRIMARY KEY,
    name        text,
    -- sha256 of the whole key; the key itself is never stored.
    key_hash    bytea       NOT NULL,
    scopes      text[]      NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

-- Per-device broker credentials (Mosquitto dynamic security): only a hash is kept
-- (a 16-byte salt, then sha256(salt || password)). One row per device; issuing again
-- replaces it. revoked_at: when revocation was decided (delete, factory reset);
-- broker_revoked_at: when the broker confirmed it (NULL while it is still to be applied).
CREATE TABLE IF NOT EXISTS device_credentials (
    device_id          text        PRIMARY KEY REFERENCES devices (id),
    password_hash      bytea       NOT NULL,
    created_at         timestamptz NOT NULL DEFAULT now(),
    revoked_at         timestamptz,
    broker_revoked_at  timestamptz
);
ALTER TABLE device_credentials ADD COLUMN IF NOT EXISTS broker_revoked_at timestamptz;
CREATE INDEX IF NOT EXISTS device_credentials_unapplied_idx ON device_credentials (device_id)
    WHERE revoked_at IS NOT NULL AND broker_revoked_at IS NULL;
