-- The migration ledger (engine/migrations.py): crmflow.schema_migrations holds each
-- applied migration's version and checksum.

-- name: bootstrap_migrations
CREATE SCHEMA IF NOT EXISTS crmflow;
CREATE TABLE IF NOT EXISTS crmflow.schema_migrations (
    version text PRIMARY KEY,
    checksum text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- name: applied_migrations
SELECT version, checksum, applied_at FROM crmflow.schema_migrations ORDER BY version;

-- name: record_migration
INSERT INTO crmflow.schema_migrations (version, checksum) VALUES (%(version)s, %(checksum)s);

-- name: migration_timeouts
-- Migrations may run long and wait for a concurrent migrate: the engine session's
-- statement and lock timeouts (engine.db.configure) do not apply.
SET LOCAL statement_timeout = 0;
SET LOCAL lock_timeout = 0;

-- name: migration_lock
-- One migrate at a time.
SELECT pg_advisory_xact_lock(%(lock)s);

-- name: ledger_exists
SELECT to_regclass('crmflow.schema_migrations') IS NOT NULL AS x;

-- name: alerts_table_exists
SELECT to_regclass('crmflow.alerts') IS NOT NULL AS x;

-- name: procrastinate_schema
-- procrastinate's SQL names its objects without a schema: point it at ours.
CREATE SCHEMA IF NOT EXISTS {schema};
SET LOCAL search_path TO {schema}, public;

-- name: procrastinate_installed
SELECT to_regclass(format('%%I.procrastinate_jobs', %(schema)s::text)) IS NOT NULL AS x;

-- name: reset_search_path
RESET search_path;
