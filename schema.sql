-- The gateway's whole database. Applied by `gateway db migrate`; every statement is
-- idempotent so the file can be applied again to an existing database.

CREATE TABLE IF NOT EXISTS devices (
    id                   text        PRIMARY KEY,
    -- Monotonic insertion order: list pagination walks it, so devices added while a
    -- caller pages through the list never cause gaps or repeats.
    seq                  bigserial   NOT NULL UNIQUE,
    serial_number        text        NOT NULL UNIQUE,
    device_type          text,
    end_user_id          text,
    bound_at             timestamptz,
    metadata             jsonb,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    deleted_at           timestamptz
);
CREATE INDEX IF NOT EXISTS devices_end_user_idx ON devices (end_user_id) WHERE end_user_id IS NOT NULL;

CREATE TABLE IF NOT EXISTS device_settings (
    device_id        text        PRIMARY KEY REFERENCES devices (id),
    document         json        NOT NULL,  -- json keeps the documented key order
    version          integer     NOT NULL,
    updated_at       timestamptz NOT NULL DEFAULT now()
);

-- What heartbeats write, one narrow row per device, apart from the registry: every device
-- rewrites its row about once a minute. Narrow rows, half-empty pages and no index on a
-- column that changes keep each rewrite a HOT update on the same page (no index entry
-- written), and a batch touches nothing else unless a device needs an answer. Copies of
-- what the heartbeat path must check without reading the registry: the serial number (how
-- devices are known), whether the device is deleted, and its current settings version.
CREATE TABLE IF NOT EXISTS device_health (
    device_id            text        PRIMARY KEY REFERENCES devices (id),
    serial_number        text        NOT NULL UNIQUE,
    deleted              boolean     NOT NULL DEFAULT false,
    firmware_version     text,
    battery_percent      smallint,
    storage_used_mb      bigint,
    storage_total_mb     bigint,
    signal_strength_dbm  smallint,
    recording_state      jsonb,
    -- Newest device clock (`ts`, ms) applied: the ordering guard for heartbeats.
    last_ts              bigint,
    -- The gateway's receive time of the last heartbeat applied.
    last_heartbeat_at    timestamptz,
    -- device_settings.version, kept in step by every settings write.
    settings_version     integer     NOT NULL DEFAULT 1,
    -- The settings version the device last reported as applied (0: none yet).
    applied_version      integer     NOT NULL DEFAULT 0
) WITH (fillfactor = 50);

-- Databases made before device_health: move the health columns there.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM information_schema.columns
               WHERE table_schema = current_schema() AND table_name = 'devices'
                 AND column_name = 'last_ts') THEN
        INSERT INTO device_health (device_id, serial_number, deleted, firmware_version,
                                   battery_percent, storage_used_mb, storage_total_mb,
                                   signal_strength_dbm, recording_state, last_ts,
                                   last_heartbeat_at, settings_version, applied_version)
        SELECT d.id, d.serial_number, d.deleted_at IS NOT NULL, d.firmware_version,
               d.battery_percent, d.storage_used_mb, d.storage_total_mb,
               d.signal_strength_dbm, d.recording_state, d.last_ts, d.last_heartbeat_at,
               s.version, s.applied_version
        FROM devices d JOIN device_settings s ON s.device_id = d.id
        ON CONFLICT (device_id) DO NOTHING;
        ALTER TABLE devices DROP COLUMN firmware_version, DROP COLUMN battery_percent,
            DROP COLUMN storage_used_mb, DROP COLUMN storage_total_mb,
            DROP COLUMN signal_strength_dbm, DROP COLUMN recording_state,
            DROP COLUMN last_ts, DROP COLUMN last_heartbeat_at;
        ALTER TABLE devices RESET (fillfactor);
    END IF;
    IF EXISTS (SELECT 1 FROM information_schema.columns
               WHERE table_schema = current_schema() AND table_name = 'device_settings'
                 AND column_name = 'applied_version') THEN
        ALTER TABLE device_settings DROP COLUMN applied_version;
    END IF;
END
$$;

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
-- A process changing a device's account at the broker holds a lease on its row instead of
-- a transaction: `lease` names the holder, and a lease past `lease_until` has lapsed.
ALTER TABLE device_credentials ADD COLUMN IF NOT EXISTS lease text;
ALTER TABLE device_credentials ADD COLUMN IF NOT EXISTS lease_until timestamptz;

-- Periodic work (command expiry, revocation passes, history pruning) is claimed here, so
-- that one process runs each period whatever the number of gateway processes.
CREATE TABLE IF NOT EXISTS sweeps (
    name      text        PRIMARY KEY,
    next_run  timestamptz NOT NULL
);

-- The gateway processes serving this database, so that a misconfigured one is refused
-- before it connects to the broker: a client id already in use, or a process without the
-- share group next to others (each would execute every request). A live process holds a
-- session advisory lock on its client id; a row whose lock nobody holds is left over.
CREATE TABLE IF NOT EXISTS gateway_processes (
    client_id     text        PRIMARY KEY,
    host          text        NOT NULL,
    pid           integer     NOT NULL,
    topic_prefix  text        NOT NULL,
    share_group   text,
    started_at    timestamptz NOT NULL DEFAULT now()
);

-- Presence: since when the device is online (NULL: offline, or unknown without any
-- heartbeat), and when it last reported a new applied settings version. Both change
-- rarely; the heartbeat write compares them to tell what happened.
ALTER TABLE device_health ADD COLUMN IF NOT EXISTS online_since timestamptz;
ALTER TABLE device_health ADD COLUMN IF NOT EXISTS applied_at timestamptz;

-- Events (protocol §12). A change's transaction inserts its events into `event_outbox`,
-- under the device's device_health row lock, so one device's `seq` order is its commit
-- order. The relay (one process at a time) moves the oldest outbox rows into `events`,
-- giving them positions (event ids) in `seq` order, publishes them, and then moves
-- `event_relay.published` up to the last position the broker acknowledged. No row is ever
-- updated: an event is inserted twice and deleted once, and only `events` is indexed for
-- reading. Events past `published` are published again after a crash (same ids).
CREATE TABLE IF NOT EXISTS event_outbox (
    seq         bigserial   PRIMARY KEY,
    type        text        NOT NULL,
    device_id   text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    data        json        NOT NULL  -- kept as written: {"object": {...}}
);
CREATE TABLE IF NOT EXISTS events (
    position    bigint      PRIMARY KEY,
    type        text        NOT NULL,
    device_id   text        NOT NULL,
    created_at  timestamptz NOT NULL,
    data        json        NOT NULL
);
CREATE INDEX IF NOT EXISTS events_device_idx ON events (device_id, position);
CREATE INDEX IF NOT EXISTS events_type_idx ON events (type, position);
-- created_at grows with the position, so a block range index serves the retention prune.
CREATE INDEX IF NOT EXISTS events_created_idx ON events USING brin (created_at);
CREATE TABLE IF NOT EXISTS event_relay (
    id          boolean PRIMARY KEY DEFAULT true CHECK (id),
    assigned    bigint  NOT NULL DEFAULT 0,  -- the last position given
    published   bigint  NOT NULL DEFAULT 0   -- every position up to this one is published
);
INSERT INTO event_relay DEFAULT VALUES ON CONFLICT DO NOTHING;
-- What the last run of a sweep found (the presence sweep: the fleet's connectivity counts).
ALTER TABLE sweeps ADD COLUMN IF NOT EXISTS result jsonb;
