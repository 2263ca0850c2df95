-- Read-only views of runs and jobs for the operator console (outbound_heartbeat.console).
-- Nothing here writes a row, so the console can read through a hot standby; stopping a stale
-- run stays the job of get_active_run / cleanup_stuck_runs on the primary.

-- ALTER FUNCTION ... OWNER TO needs CREATE on the schema for the new owner: held only
-- inside this file's transaction.
GRANT CREATE ON SCHEMA outbound_heartbeat TO outbound_heartbeat_owner;

DO $run_summary$
BEGIN
    IF pg_catalog.to_regtype('outbound_heartbeat.run_summary') IS NULL THEN
        CREATE TYPE outbound_heartbeat.run_summary AS (
            id bigint, business_id bigint, status text, locked_by_worker text,
            lease_epoch bigint, last_heartbeat_at timestamptz, heartbeat_age interval,
            stale_after interval, stale boolean, cancel_requested_at timestamptz,
            started_at timestamptz, ended_at timestamptz, created_at timestamptz,
            queued_jobs bigint, in_progress_jobs bigint, completed_jobs bigint,
            failed_jobs bigint, ended_by text, end_reason text, ended_worker text,
            heartbeat_age_at_end interval);
    END IF;
END
$run_summary$;

-- Runs for the console: liveness from _describe_runs(), job counts by status and, for an ended
-- run, the event that ended it and its heartbeat's age then (the heartbeat column is never
-- written after a run ends: every worker write is fenced).
CREATE OR REPLACE FUNCTION outbound_heartbeat._summarize_runs(p_run_ids bigint[])
RETURNS SETOF outbound_heartbeat.run_summary
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET TimeZone = 'UTC'
AS $$
    SELECT d.id, d.business_id, d.status, d.locked_by_worker, d.lease_epoch,
           d.last_heartbeat_at, d.heartbeat_age, s.stale_after, d.stale,
           d.cancel_requested_at, d.started_at, d.ended_at, d.created_at,
           COALESCE(c.queued, 0), COALESCE(c.in_progress, 0), COALESCE(c.completed, 0),
           COALESCE(c.failed, 0),
           e.event, COALESCE(e.detail ->> 'reason', e.detail ->> 'status'), e.worker_id,
           CASE WHEN e.event IN ('stale_stopped', 'cleaned_up', 'force_cancelled')
                THEN e.created_at - d.last_heartbeat_at END
      FROM outbound_heartbeat._describe_runs(p_run_ids, (SELECT st.stale_after
                                                          FROM outbound_heartbeat._settings() AS st)) AS d
     CROSS JOIN outbound_heartbeat._settings() AS s
      LEFT JOIN LATERAL (
        SELECT pg_catalog.count(*) FILTER (WHERE j.status = 'queued') AS queued,
               pg_catalog.count(*) FILTER (WHERE j.status = 'in_progress') AS in_progress,
               pg_catalog.count(*) FILTER (WHERE j.status = 'completed') AS completed,
               pg_catalog.count(*) FILTER (WHERE j.status = 'failed') AS failed
          FROM public.outbound_call_jobs AS j
         WHERE j.run_id = d.id
      ) AS c ON true
      LEFT JOIN LATERAL (
        SELECT ev.event, ev.detail, ev.worker_id, ev.created_at
          FROM outbound_heartbeat.run_events AS ev
         WHERE ev.run_id = d.id AND d.ended_at IS NOT NULL
           AND ev.event IN ('stale_stopped', 'cleaned_up', 'force_cancelled', 'cancel_requested',
                            'finished')
         ORDER BY ev.id DESC
         LIMIT 1
      ) AS e ON true
     ORDER BY d.id DESC
$$;
ALTER FUNCTION outbound_heartbeat._summarize_runs(bigint[]) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._summarize_runs(bigint[]) FROM PUBLIC;

-- The console's runs list: every open run, then runs ended within ended_within, newest first,
-- at most max_rows; of one business, or of all when business_id is NULL (an operator).
CREATE OR REPLACE FUNCTION outbound_heartbeat.list_runs(
    business_id bigint DEFAULT NULL, ended_within interval DEFAULT '1 day',
    max_rows integer DEFAULT 100)
RETURNS SETOF outbound_heartbeat.run_summary
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET TimeZone = 'UTC'
AS $$
BEGIN
    PERFORM outbound_heartbeat._require(list_runs.max_rows BETWEEN 1 AND 10000, 'max_rows',
                                        'max_rows must be between 1 and 10000');
    PERFORM outbound_heartbeat._require(
        list_runs.ended_within BETWEEN interval '0' AND interval '100 years', 'ended_within',
        'ended_within must be an interval between 0 and 100 years');
    -- Open runs through the partial index on live statuses; ended ones by id from the newest.
    RETURN QUERY
    SELECT s.* FROM outbound_heartbeat._summarize_runs(ARRAY(
        SELECT q.id FROM (
            (SELECT r.id FROM public.outbound_call_runs AS r
              WHERE r.status IN ('pending', 'running')
                AND (list_runs.business_id IS NULL OR r.business_id = list_runs.business_id)
              ORDER BY r.id DESC LIMIT list_runs.max_rows)
            UNION ALL
            (SELECT r.id FROM public.outbound_call_runs AS r
              WHERE r.status NOT IN ('pending', 'running')
                AND r.ended_at >= pg_catalog.statement_timestamp() - list_runs.ended_within
                AND (list_runs.business_id IS NULL OR r.business_id = list_runs.business_id)
              ORDER BY r.id DESC LIMIT list_runs.max_rows)
        ) AS q ORDER BY q.id DESC LIMIT list_runs.max_rows)) AS s
     ORDER BY s.status NOT IN ('pending', 'running'), s.id DESC;
END
$$;
ALTER FUNCTION outbound_heartbeat.list_runs(bigint, interval, integer) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat.list_runs(bigint, interval, integer) FROM PUBLIC;
SELECT outbound_heartbeat._offer_to('app', 'outbound_heartbeat.list_runs(bigint, interval, integer)');
COMMENT ON FUNCTION outbound_heartbeat.list_runs(bigint, interval, integer) IS
    'The console''s runs list: open runs, then runs ended within ended_within, newest first, with job counts and the reason an ended run stopped. Reads only.';

-- One run for the console's run page: OH404 when absent, OH403 when business_id is given and
-- the run is another business's. Reads only (works on a standby), so a refusal is not audited
-- here: the caller logs it.
CREATE OR REPLACE FUNCTION outbound_heartbeat.describe_run(run_id bigint, business_id bigint DEFAULT NULL)
RETURNS outbound_heartbeat.run_summary
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET TimeZone = 'UTC'
AS $$
DECLARE
    v_run outbound_heartbeat.run_summary;
BEGIN
    PERFORM outbound_heartbeat._require(describe_run.run_id IS NOT NULL, 'run_id',
                                        'run_id must not be NULL');
    PERFORM outbound_heartbeat._require_tenant(describe_run.run_id, describe_run.business_id);
    SELECT s.* INTO v_run FROM outbound_heartbeat._summarize_runs(ARRAY[describe_run.run_id]) AS s;
    RETURN v_run;
END
$$;
ALTER FUNCTION outbound_heartbeat.describe_run(bigint, bigint) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat.describe_run(bigint, bigint) FROM PUBLIC;
SELECT outbound_heartbeat._offer_to('app', 'outbound_heartbeat.describe_run(bigint, bigint)');
COMMENT ON FUNCTION outbound_heartbeat.describe_run(bigint, bigint) IS
    'One run for the console''s run page, with job counts by status and the event that ended it. Reads only; OH403 for another business''s run.';

-- A run's jobs, newest first, optionally of one status, at most max_rows (the run page's
-- "jobs by status"); the same OH403 / OH404 checks as describe_run.
CREATE OR REPLACE FUNCTION outbound_heartbeat.list_jobs(
    run_id bigint, business_id bigint DEFAULT NULL, status text DEFAULT NULL,
    max_rows integer DEFAULT 100)
RETURNS SETOF outbound_heartbeat.job
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET TimeZone = 'UTC'
AS $$
BEGIN
    PERFORM outbound_heartbeat._require(list_jobs.max_rows BETWEEN 1 AND 10000, 'max_rows',
                                        'max_rows must be between 1 and 10000');
    PERFORM outbound_heartbeat._require(
        list_jobs.status IS NULL OR list_jobs.status IN ('queued', 'in_progress', 'completed', 'failed'),
        'status', 'status must be one of queued, in_progress, completed, failed');
    PERFORM outbound_heartbeat.describe_run(list_jobs.run_id, list_jobs.business_id);
    RETURN QUERY
    SELECT j.id::bigint, j.run_id::bigint, j.business_id::bigint, j.status::text,
           j.payload::jsonb, j.error_message::text, j.created_at::timestamptz,
           j.updated_at::timestamptz,
           NULL::text  -- call_key (15_calls.sql): a credential, never shown to a viewer
      FROM public.outbound_call_jobs AS j
     WHERE j.run_id = list_jobs.run_id
       AND (list_jobs.status IS NULL OR j.status = list_jobs.status)
     ORDER BY j.id DESC
     LIMIT list_jobs.max_rows;
END
$$;
ALTER FUNCTION outbound_heartbeat.list_jobs(bigint, bigint, text, integer) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat.list_jobs(bigint, bigint, text, integer) FROM PUBLIC;
SELECT outbound_heartbeat._offer_to('app', 'outbound_heartbeat.list_jobs(bigint, bigint, text, integer)');
COMMENT ON FUNCTION outbound_heartbeat.list_jobs(bigint, bigint, text, integer) IS
    'A run''s jobs, newest first, optionally of one status. Reads only; OH403 for another business''s run.';

REVOKE CREATE ON SCHEMA outbound_heartbeat FROM outbound_heartbeat_owner;
