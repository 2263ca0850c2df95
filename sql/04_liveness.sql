-- The liveness rule, written once: when a running run counts as dead (_stale_reason), with the
-- grace after a server restart (_outage_ended_at), and what follows from it: a run described with
-- its stale flag (_describe_runs), stale runs stopped (_stop_stale_runs) and runs ended in one
-- set-based pass (_end_runs). Every caller (heartbeat, get_active_run, the sweep, monitoring,
-- the console) asks these functions; none repeats the rule.

-- ALTER FUNCTION ... OWNER TO needs CREATE on the schema for the new owner: held only
-- inside this file's transaction.
GRANT CREATE ON SCHEMA outbound_heartbeat TO outbound_heartbeat_owner;

-- When this server last began to accept writes (start, crash recovery or promotion: the WAL
-- writer's backend_start, else the stats reset or postmaster start), so an outage is not taken
-- for a death. SECURITY DEFINER only to read pg_stat_activity; no argument to steer it.
CREATE OR REPLACE FUNCTION outbound_heartbeat._outage_ended_at()
RETURNS timestamptz
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT GREATEST(
        pg_catalog.pg_postmaster_start_time(),
        (SELECT pg_catalog.max(a.backend_start) FROM pg_catalog.pg_stat_get_activity(NULL) AS a
          WHERE a.backend_type = 'walwriter'),
        pg_catalog.pg_stat_get_bgwriter_stat_reset_time())
$$;
ALTER FUNCTION outbound_heartbeat._outage_ended_at() OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._outage_ended_at() FROM PUBLIC;

-- The one liveness rule ('stale_heartbeat', 'legacy_lock_timeout' or NULL), judged on the
-- statement's clock so a long transaction never sees a dead run fresh, and never within
-- restart_grace of an outage (_outage_ended_at(), looked up only when the run looks stale).
CREATE OR REPLACE FUNCTION outbound_heartbeat._stale_reason(
    p_run public.outbound_call_runs, p_stale_after interval, p_settings outbound_heartbeat.settings)
RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET TimeZone = 'UTC'
AS $$
DECLARE
    v_legacy_ts timestamptz;
    v_reason text;
BEGIN
    IF p_run.last_heartbeat_at IS NOT NULL THEN
        IF p_run.last_heartbeat_at < pg_catalog.statement_timestamp() - p_stale_after THEN
            v_reason := 'stale_heartbeat';
        END IF;
    ELSE
        v_legacy_ts := COALESCE(p_run.lock_ts, p_run.updated_at, p_run.started_at, p_run.created_at);
        IF v_legacy_ts IS NULL OR v_legacy_ts < pg_catalog.statement_timestamp() - p_settings.legacy_stale_after THEN
            v_reason := 'legacy_lock_timeout';
        END IF;
    END IF;
    IF v_reason IS NOT NULL
       AND outbound_heartbeat._outage_ended_at()
           > pg_catalog.statement_timestamp() - COALESCE(p_settings.restart_grace, p_stale_after) THEN
        RETURN NULL;
    END IF;
    RETURN v_reason;
END
$$;
ALTER FUNCTION outbound_heartbeat._stale_reason(public.outbound_call_runs, interval, outbound_heartbeat.settings) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._stale_reason(public.outbound_call_runs, interval, outbound_heartbeat.settings) FROM PUBLIC;

-- A run as the API describes it: its row, open job counts, heartbeat age and stale flag.
DO $run_info$
BEGIN
    IF pg_catalog.to_regtype('outbound_heartbeat.run_info') IS NULL THEN
        CREATE TYPE outbound_heartbeat.run_info AS (
            id bigint, business_id bigint, status text, locked_by_worker text,
            lock_ts timestamptz, last_heartbeat_at timestamptz, lease_epoch bigint,
            cancel_requested_at timestamptz, started_at timestamptz, ended_at timestamptz,
            created_at timestamptz, updated_at timestamptz,
            queued_jobs bigint, in_progress_jobs bigint, heartbeat_age interval, stale boolean);
    END IF;
END
$run_info$;

-- A run as callers and views see it, stale flag from _stale_reason() and job counts from
-- job_counts (never counting a run's jobs). PL/pgSQL so its plan is cached: a SQL function with
-- SET clauses is planned on every call.
CREATE OR REPLACE FUNCTION outbound_heartbeat._describe_runs(p_run_ids bigint[], p_stale_after interval)
RETURNS SETOF outbound_heartbeat.run_info
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET TimeZone = 'UTC'
AS $$
BEGIN
    RETURN QUERY
    SELECT r.id::bigint, r.business_id::bigint, r.status::text, r.locked_by_worker::text,
           r.lock_ts::timestamptz, r.last_heartbeat_at::timestamptz, r.lease_epoch::bigint,
           r.cancel_requested_at::timestamptz, r.started_at::timestamptz, r.ended_at::timestamptz,
           r.created_at::timestamptz, r.updated_at::timestamptz, counts.queued, counts.in_progress,
           CASE WHEN r.status = 'running' THEN pg_catalog.statement_timestamp() - COALESCE(
               r.last_heartbeat_at, r.lock_ts, r.updated_at, r.started_at, r.created_at) END,
           r.status = 'running'
               AND outbound_heartbeat._stale_reason(r, p_stale_after, s) IS NOT NULL
      FROM public.outbound_call_runs AS r
     CROSS JOIN outbound_heartbeat._settings() AS s
     CROSS JOIN LATERAL (
        SELECT COALESCE(pg_catalog.sum(c.queued), 0)::bigint AS queued,
               COALESCE(pg_catalog.sum(c.in_progress), 0)::bigint AS in_progress
          FROM outbound_heartbeat.job_counts AS c
         WHERE c.run_id = r.id
     ) AS counts
     WHERE r.id = ANY (p_run_ids)
     ORDER BY r.id;
END
$$;
ALTER FUNCTION outbound_heartbeat._describe_runs(bigint[], interval) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._describe_runs(bigint[], interval) FROM PUBLIC;

-- One run ended by _end_runs().
DO $ended_run$
BEGIN
    IF pg_catalog.to_regtype('outbound_heartbeat.ended_run') IS NULL THEN
        CREATE TYPE outbound_heartbeat.ended_run AS (
            run_id bigint, business_id bigint, previous_status text, worker_id text,
            jobs_failed bigint);
    END IF;
END
$ended_run$;

-- Every terminal transition in one set-based pass (ended_at, lock cleared, epoch bumped, queued
-- jobs failed, in_progress ones marked orphaned: 15_calls.sql), its events in
-- ONE INSERT so a storm of endings costs one counter update, each chained and announced.
CREATE OR REPLACE FUNCTION outbound_heartbeat._end_runs(
    p_run_ids bigint[], p_status text, p_event text, p_reason text, p_detail jsonb DEFAULT '{}')
RETURNS SETOF outbound_heartbeat.ended_run
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET TimeZone = 'UTC'
SET client_min_messages = notice
AS $$
DECLARE
    v_ended outbound_heartbeat.ended_run[];
    v_run outbound_heartbeat.ended_run;
    v_detail jsonb;
    v_orphaned jsonb := '{}';
BEGIN
    WITH previous AS (
        SELECT r.id, r.business_id, r.status, r.locked_by_worker
          FROM public.outbound_call_runs AS r
         WHERE r.id = ANY (p_run_ids) AND r.status IN ('pending', 'running')
         ORDER BY r.id
           FOR UPDATE
    ), ended AS (
        UPDATE public.outbound_call_runs AS r
           SET status = p_status, ended_at = pg_catalog.now(), locked_by_worker = NULL,
               lock_ts = NULL, lease_epoch = r.lease_epoch + 1, updated_at = pg_catalog.now()
          FROM previous
         WHERE r.id = previous.id
     RETURNING r.id
    ), failed AS (
        UPDATE public.outbound_call_jobs AS j
           SET status = 'failed', error_message = p_reason, updated_at = pg_catalog.now()
          FROM ended
         WHERE j.run_id = ended.id AND j.status = 'queued'
     RETURNING j.run_id
    ), failed_per_run AS (
        SELECT failed.run_id, pg_catalog.count(*) AS n FROM failed GROUP BY failed.run_id
    )
    SELECT pg_catalog.array_agg(ROW(previous.id::bigint, previous.business_id::bigint,
                                    previous.status::text, previous.locked_by_worker::text,
                                    COALESCE(failed_per_run.n, 0)::bigint)::outbound_heartbeat.ended_run
                                ORDER BY previous.id)
      INTO v_ended
      FROM previous
      JOIN ended ON ended.id = previous.id
      LEFT JOIN failed_per_run ON failed_per_run.run_id = previous.id;
    IF v_ended IS NULL THEN
        RETURN;
    END IF;
    -- calls (15_calls.sql): the in-progress calls no live worker holds any more, whoever ended
    -- the run (its own worker too: a call still in progress then waits for its callback).
    SELECT COALESCE(pg_catalog.jsonb_object_agg(o.run_id::text,
                        pg_catalog.jsonb_build_object('calls_orphaned', o.calls_orphaned)), '{}')
      INTO v_orphaned
      FROM outbound_heartbeat._orphan_calls(
            ARRAY(SELECT e.run_id FROM pg_catalog.unnest(v_ended) AS e),
            CASE WHEN p_event = 'finished'
                 THEN pg_catalog.format('run finished (%s) by its worker with the call in progress', p_status)
                 ELSE p_reason END) AS o;

    INSERT INTO outbound_heartbeat.run_events (run_id, business_id, event, worker_id, detail)
    SELECT e.run_id, e.business_id, p_event, e.worker_id,
           COALESCE(p_detail, '{}'::jsonb) || pg_catalog.jsonb_build_object(
               'previous_status', e.previous_status, 'status', p_status, 'jobs_failed', e.jobs_failed)
           || COALESCE(v_orphaned -> (e.run_id::text), '{}')
      FROM pg_catalog.unnest(v_ended) WITH ORDINALITY AS e
     ORDER BY e.ordinality;

    FOREACH v_run IN ARRAY v_ended LOOP
        v_detail := COALESCE(p_detail, '{}'::jsonb) || pg_catalog.jsonb_build_object(
            'previous_status', v_run.previous_status, 'status', p_status, 'jobs_failed', v_run.jobs_failed)
            || COALESCE(v_orphaned -> (v_run.run_id::text), '{}');
        PERFORM outbound_heartbeat._notify_event(p_event, v_run.run_id, v_run.business_id);
        RAISE NOTICE USING ERRCODE = 'OH000',
            MESSAGE = pg_catalog.format('outbound_heartbeat: run %s %s', v_run.run_id, p_event),
            DETAIL = (pg_catalog.jsonb_build_object(
                'event', p_event, 'run_id', v_run.run_id, 'business_id', v_run.business_id,
                'worker_id', v_run.worker_id) || v_detail)::text;
        RETURN NEXT v_run;
    END LOOP;
END
$$;
ALTER FUNCTION outbound_heartbeat._end_runs(bigint[], text, text, text, jsonb) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._end_runs(bigint[], text, text, text, jsonb) FROM PUBLIC;

-- Stops the running runs that are stale now (of one business, or one run), each in its own
-- reason group; waits for row locks up to lock_timeout. Returns what it stopped.
CREATE OR REPLACE FUNCTION outbound_heartbeat._stop_stale_runs(
    p_business_id bigint, p_run_id bigint, p_stale_after interval,
    p_settings outbound_heartbeat.settings)
RETURNS SETOF outbound_heartbeat.ended_run
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET TimeZone = 'UTC'
AS $$
DECLARE
    v_group record;
BEGIN
    PERFORM outbound_heartbeat._require_primary('stopping stale runs (get_active_run, heartbeat)');
    FOR v_group IN
        SELECT stale.reason, pg_catalog.array_agg(stale.id ORDER BY stale.id) AS ids
          FROM (
            SELECT r.id, outbound_heartbeat._stale_reason(r, p_stale_after, p_settings) AS reason
              FROM public.outbound_call_runs AS r
             WHERE r.status = 'running'
               AND (p_business_id IS NULL OR r.business_id = p_business_id)
               AND (p_run_id IS NULL OR r.id = p_run_id)
               AND outbound_heartbeat._stale_reason(r, p_stale_after, p_settings) IS NOT NULL
             ORDER BY r.id
               FOR UPDATE
          ) AS stale
         GROUP BY stale.reason
    LOOP
        RETURN QUERY SELECT * FROM outbound_heartbeat._end_runs(
            v_group.ids, 'stopped', 'stale_stopped',
            CASE v_group.reason
                WHEN 'stale_heartbeat' THEN 'run stopped: worker heartbeat stale'
                ELSE 'run stopped: worker lock expired without a heartbeat' END,
            pg_catalog.jsonb_build_object('reason', v_group.reason,
                                          'stale_after', p_stale_after::text));
    END LOOP;
END
$$;
ALTER FUNCTION outbound_heartbeat._stop_stale_runs(bigint, bigint, interval, outbound_heartbeat.settings) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._stop_stale_runs(bigint, bigint, interval, outbound_heartbeat.settings) FROM PUBLIC;

REVOKE CREATE ON SCHEMA outbound_heartbeat FROM outbound_heartbeat_owner;
