-- The read-only role EMQX authenticates and authorizes devices with (emqx.conf), allowed
-- to read only the columns its two queries use. Run after `gateway db migrate`, as the
-- database's owner, with the role's password:
--
--   psql "$GATEWAY_DATABASE_URL" -v ON_ERROR_STOP=1 -v emqx_password=... -f grants.sql
--
-- Safe to run again (after each migration, should a table have been recreated).
SELECT format('CREATE ROLE emqx_auth LOGIN PASSWORD %L', :'emqx_password')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'emqx_auth') \gexec
ALTER ROLE emqx_auth PASSWORD :'emqx_password';
-- EMQX's pools hold their connections; a stuck query must not hold one for ever.
ALTER ROLE emqx_auth SET statement_timeout = '5s';

GRANT SELECT (id, serial_number, deleted_at) ON devices TO emqx_auth;
GRANT SELECT (device_id, password_hash, created_at, revoked_at) ON device_credentials TO emqx_auth;
GRANT SELECT (device_id, type, status, expires_at, completed_at) ON commands TO emqx_auth;
