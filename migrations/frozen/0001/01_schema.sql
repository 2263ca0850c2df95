-- outbound_heartbeat: schema, settings, audit trail and the composite types the API returns.
-- Idempotent: every statement may run again on an installed database and changes nothing.

CREATE SCHEMA IF NOT EXISTS outbound_heartbeat;
COMMENT ON SCHEMA outbound_heartbeat IS
    'Heartbeat, stale detection and force-cancel for outbound_call_runs / outbound_call_jobs';

-- One row of thresholds a DBA may change with a plain UPDATE; the CHECKs refuse nonsense.
CREATE TABLE IF NOT EXISTS outbound_heartbeat.settings (
    singleton          boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    stale_after        interval NOT NULL DEFAULT '30 seconds' CHECK (stale_after > interval '0'),
    legacy_stale_after interval NOT NULL DEFAULT '5 minutes' CHECK (legacy_stale_after > interval '0'),
    lock_timeout       interval NOT NULL DEFAULT '5 seconds' CHECK (lock_timeout > interval '0'),
    -- NULL means "same as stale_after": how long after a server start nothing is declared stale.
    restart_grace      interval CHECK (restart_grace >= interval '0')
);
INSERT INTO outbound_heartbeat.settings DEFAULT VALUES ON CONFLICT DO NOTHING;

-- The audit trail: one row per run transition, never updated or deleted by the library.
CREATE TABLE IF NOT EXISTS outbound_heartbeat.run_events (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id      bigint NOT NULL,
    business_id bigint NOT NULL,
    event       text NOT NULL,
    worker_id   text,
    detail      jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS run_events_run_idx ON outbound_heartbeat.run_events (run_id, id);
CREATE INDEX IF NOT EXISTS run_events_business_idx ON outbound_heartbeat.run_events (business_id, id);

DO $types$
BEGIN
    IF pg_catalog.to_regtype('outbound_heartbeat.run_info') IS NULL THEN
        CREATE TYPE outbound_heartbeat.run_info AS (
            id bigint, business_id bigint, status text, locked_by_worker text,
            lock_ts timestamptz, last_heartbeat_at timestamptz, lease_epoch bigint,
            cancel_requested_at timestamptz, started_at timestamptz, ended_at timestamptz,
            created_at timestamptz, updated_at timestamptz,
            queued_jobs bigint, in_progress_jobs bigint, heartbeat_age interval, stale boolean);
    END IF;
    IF pg_catalog.to_regtype('outbound_heartbeat.lease') IS NULL THEN
        CREATE TYPE outbound_heartbeat.lease AS (
            run_id bigint, business_id bigint, worker_id text, lease_epoch bigint,
            resumed boolean, stale_after interval);
    END IF;
    IF pg_catalog.to_regtype('outbound_heartbeat.job') IS NULL THEN
        CREATE TYPE outbound_heartbeat.job AS (
            id bigint, run_id bigint, business_id bigint, status text, payload jsonb,
            error_message text, created_at timestamptz, updated_at timestamptz);
    END IF;
    IF pg_catalog.to_regtype('outbound_heartbeat.job_outcome') IS NULL THEN
        CREATE TYPE outbound_heartbeat.job_outcome AS (
            job_id bigint, run_id bigint, status text, outcome text);
    END IF;
    IF pg_catalog.to_regtype('outbound_heartbeat.run_outcome') IS NULL THEN
        CREATE TYPE outbound_heartbeat.run_outcome AS (
            run_id bigint, status text, outcome text, jobs_failed bigint);
    END IF;
    IF pg_catalog.to_regtype('outbound_heartbeat.cancel_result') IS NULL THEN
        CREATE TYPE outbound_heartbeat.cancel_result AS (
            run_id bigint, business_id bigint, previous_status text, status text,
            jobs_cancelled bigint);
    END IF;
    IF pg_catalog.to_regtype('outbound_heartbeat.reclaimed_run') IS NULL THEN
        CREATE TYPE outbound_heartbeat.reclaimed_run AS (
            run_id bigint, business_id bigint, worker_id text, reason text, status text,
            jobs_failed bigint);
    END IF;
    IF pg_catalog.to_regtype('outbound_heartbeat.health_alert') IS NULL THEN
        CREATE TYPE outbound_heartbeat.health_alert AS (
            severity text, check_name text, run_id bigint, detail text);
    END IF;
    IF pg_catalog.to_regtype('outbound_heartbeat.ended_run') IS NULL THEN
        CREATE TYPE outbound_heartbeat.ended_run AS (
            run_id bigint, business_id bigint, previous_status text, worker_id text,
            jobs_failed bigint);
    END IF;
END
$types$;
