-- The sweep: reclaiming running runs nobody will finish (stale, legacy lock only, nothing left
-- to do, or this worker's own runs at its start), by the liveness rule of 04_liveness.sql.

-- ALTER FUNCTION ... OWNER TO needs CREATE on the schema for the new owner: held only
-- inside this file's transaction.
GRANT CREATE ON SCHEMA outbound_heartbeat TO outbound_heartbeat_owner;

-- Why cleanup_stuck_runs reclaims a running run ('empty', 'on_startup', or a stale reason), or
-- NULL. A run with nothing queued or in progress (orphaned calls aside) is finished work: it ends
-- 'completed'. A run of this worker name is 'on_startup' only once stale: a live one is another's.
CREATE OR REPLACE FUNCTION outbound_heartbeat._reclaim_reason(
    p_run public.outbound_call_runs, p_on_startup boolean, p_worker_id text,
    p_settings outbound_heartbeat.settings)
RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE
        WHEN NOT EXISTS (SELECT 1 FROM public.outbound_call_jobs AS j
                          WHERE j.run_id = p_run.id AND j.status IN ('queued', 'in_progress')
                            AND (j.status = 'queued' OR j.orphaned_at IS NULL))
            THEN 'empty'
        WHEN p_on_startup AND p_run.locked_by_worker = p_worker_id
             AND outbound_heartbeat._stale_reason(p_run, p_settings.stale_after, p_settings) IS NOT NULL
            THEN 'on_startup'
        ELSE outbound_heartbeat._stale_reason(p_run, p_settings.stale_after, p_settings)
    END
$$;
ALTER FUNCTION outbound_heartbeat._reclaim_reason(public.outbound_call_runs, boolean, text, outbound_heartbeat.settings) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._reclaim_reason(public.outbound_call_runs, boolean, text, outbound_heartbeat.settings) FROM PUBLIC;

-- One run cleanup_stuck_runs() reclaimed, with its reason.
DO $reclaimed_run$
BEGIN
    IF pg_catalog.to_regtype('outbound_heartbeat.reclaimed_run') IS NULL THEN
        CREATE TYPE outbound_heartbeat.reclaimed_run AS (
            run_id bigint, business_id bigint, worker_id text, reason text, status text,
            jobs_failed bigint);
    END IF;
END
$reclaimed_run$;

-- Reclaims stuck running runs, one row each with its reason: stale heartbeat, legacy lock_ts
-- past legacy_stale_after, nothing left queued or in progress ('completed'), and with on_startup
-- the runs still locked by this worker_id. Rows other transactions hold are skipped.
CREATE OR REPLACE FUNCTION outbound_heartbeat.cleanup_stuck_runs(
    on_startup boolean DEFAULT false, worker_id text DEFAULT NULL)
RETURNS SETOF outbound_heartbeat.reclaimed_run
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET TimeZone = 'UTC'
SET client_min_messages = notice
AS $$
DECLARE
    v_settings outbound_heartbeat.settings := outbound_heartbeat._settings();
    v_ids bigint[];
    v_group record;
BEGIN
    -- Refuses (OH428) to run code on the tables a role outside the trusted set wrote (05_table_guard.sql).
    PERFORM outbound_heartbeat._require_trusted_tables();
    PERFORM outbound_heartbeat._require(cleanup_stuck_runs.on_startup IS NOT NULL, 'on_startup',
                                        'on_startup must be true or false');
    IF cleanup_stuck_runs.on_startup THEN
        PERFORM outbound_heartbeat._require_worker_id(cleanup_stuck_runs.worker_id);
    ELSE
        PERFORM outbound_heartbeat._require(cleanup_stuck_runs.worker_id IS NULL, 'worker_id',
                                            'worker_id is only accepted with on_startup => true');
    END IF;
    PERFORM outbound_heartbeat._require_primary('cleanup_stuck_runs');

    -- Lock first (the reason is re-checked on the newest row version), then classify.
    SELECT pg_catalog.array_agg(c.id) INTO v_ids FROM (
        SELECT r.id FROM public.outbound_call_runs AS r
         WHERE r.status = 'running'
           AND outbound_heartbeat._reclaim_reason(r, cleanup_stuck_runs.on_startup,
                                                  cleanup_stuck_runs.worker_id, v_settings) IS NOT NULL
         ORDER BY r.id
           FOR UPDATE SKIP LOCKED) AS c;

    FOR v_group IN
        SELECT x.reason, pg_catalog.array_agg(x.id ORDER BY x.id) AS ids
          FROM (SELECT r.id, outbound_heartbeat._reclaim_reason(
                            r, cleanup_stuck_runs.on_startup, cleanup_stuck_runs.worker_id, v_settings) AS reason
                  FROM public.outbound_call_runs AS r
                 WHERE r.id = ANY (v_ids)) AS x
         WHERE x.reason IS NOT NULL
         GROUP BY x.reason
         ORDER BY x.reason
    LOOP
        RETURN QUERY
        SELECT e.run_id, e.business_id, e.worker_id, v_group.reason,
               CASE WHEN v_group.reason = 'empty' THEN 'completed' ELSE 'stopped' END, e.jobs_failed
          FROM outbound_heartbeat._end_runs(
                v_group.ids,
                CASE WHEN v_group.reason = 'empty' THEN 'completed' ELSE 'stopped' END,
                'cleaned_up',
                CASE v_group.reason
                    WHEN 'on_startup' THEN 'run stopped: its worker restarted'
                    WHEN 'stale_heartbeat' THEN 'run stopped: worker heartbeat stale'
                    WHEN 'legacy_lock_timeout' THEN 'run stopped: worker lock expired without a heartbeat'
                    ELSE 'run completed: nothing left to dial' END,
                pg_catalog.jsonb_build_object('reason', v_group.reason)) AS e;
    END LOOP;
    -- calls (15_calls.sql): orphaned calls past call_orphan_timeout are failed (the pg_cron
    -- recipe's sweep does it too); they are no run's row, so they add none to the answer.
    PERFORM outbound_heartbeat._expire_orphaned_calls(NULL, v_settings);
END
$$;
ALTER FUNCTION outbound_heartbeat.cleanup_stuck_runs(boolean, text) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat.cleanup_stuck_runs(boolean, text) FROM PUBLIC;
SELECT outbound_heartbeat._offer_to('app', 'outbound_heartbeat.cleanup_stuck_runs(boolean, text)');
COMMENT ON FUNCTION outbound_heartbeat.cleanup_stuck_runs(boolean, text) IS
    'Reclaims stuck running runs (stale heartbeat, legacy lock_ts, nothing left, and with on_startup this worker''s runs), one row each with its reason.';

REVOKE CREATE ON SCHEMA outbound_heartbeat FROM outbound_heartbeat_owner;
