-- The app's, the web's and the operator's side of the API. A NULL business_id is an operator
-- call (DBA, CLI): no tenant check. A non-NULL one must own the run, or OH403.

-- ALTER FUNCTION ... OWNER TO needs CREATE on the schema for the new owner: held only
-- inside this file's transaction.
GRANT CREATE ON SCHEMA outbound_heartbeat TO outbound_heartbeat_owner;

-- retry_unplaced is new: the old two-argument signature would make calls ambiguous.
DROP FUNCTION IF EXISTS outbound_heartbeat.create_run(bigint, jsonb);

-- Creates a pending run for a business with one queued job per element of the JSON array (each
-- the job's payload, in order; empty: no jobs); retry_unplaced: a call reported 'not_placed'
-- while the run is open goes back to the queue (resolve_call, 15_calls.sql).
CREATE OR REPLACE FUNCTION outbound_heartbeat.create_run(
    business_id bigint, jobs jsonb DEFAULT '[]'::jsonb, retry_unplaced boolean DEFAULT false)
RETURNS outbound_heartbeat.run_info
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET TimeZone = 'UTC'
SET client_min_messages = notice
AS $$
DECLARE
    v_settings outbound_heartbeat.settings := outbound_heartbeat._settings();
    v_run_id bigint;
    v_count bigint;
    v_run outbound_heartbeat.run_info;
BEGIN
    -- Refuses (OH428) to run code on the tables a role outside the trusted set wrote (05_table_guard.sql).
    PERFORM outbound_heartbeat._require_trusted_tables();
    PERFORM outbound_heartbeat._require(create_run.business_id IS NOT NULL, 'business_id',
                                        'business_id must not be NULL');
    PERFORM outbound_heartbeat._require(pg_catalog.jsonb_typeof(create_run.jobs) = 'array', 'jobs',
                                        'jobs must be a JSON array');
    PERFORM outbound_heartbeat._require(create_run.retry_unplaced IS NOT NULL, 'retry_unplaced',
                                        'retry_unplaced must be true or false');
    INSERT INTO public.outbound_call_runs (business_id, status, lease_epoch, created_at, updated_at)
    VALUES (create_run.business_id, 'pending', 0, pg_catalog.now(), pg_catalog.now())
    RETURNING id INTO v_run_id;
    INSERT INTO public.outbound_call_jobs (run_id, business_id, status, payload, created_at, updated_at)
    SELECT v_run_id, create_run.business_id, 'queued', e.value, pg_catalog.now(), pg_catalog.now()
      FROM pg_catalog.jsonb_array_elements(create_run.jobs) WITH ORDINALITY AS e (value, n)
     ORDER BY e.n;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    IF create_run.retry_unplaced THEN
        INSERT INTO outbound_heartbeat.run_call_options (run_id, retry_unplaced) VALUES (v_run_id, true);
    END IF;
    PERFORM outbound_heartbeat._record_event(v_run_id, create_run.business_id, 'created', NULL,
                                             pg_catalog.jsonb_build_object('jobs', v_count)
                                             || CASE WHEN create_run.retry_unplaced
                                                     THEN '{"retry_unplaced": true}'::jsonb ELSE '{}'::jsonb END);
    SELECT d.* INTO v_run FROM outbound_heartbeat._describe_runs(ARRAY[v_run_id], v_settings.stale_after) AS d;
    RETURN v_run;
END
$$;
ALTER FUNCTION outbound_heartbeat.create_run(bigint, jsonb, boolean) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat.create_run(bigint, jsonb, boolean) FROM PUBLIC;
SELECT outbound_heartbeat._offer_to('app', 'outbound_heartbeat.create_run(bigint, jsonb, boolean)');
COMMENT ON FUNCTION outbound_heartbeat.create_run(bigint, jsonb, boolean) IS
    'Creates a pending run for a business with one queued job per element of a JSON array; retry_unplaced: unplaced calls of the open run are queued again.';

-- The business's truly active run (running, else the oldest pending), or no row. A running run
-- whose heartbeat is older than the threshold is stopped by this very call, queued jobs failed.
CREATE OR REPLACE FUNCTION outbound_heartbeat.get_active_run(business_id bigint, stale_after interval DEFAULT NULL)
RETURNS SETOF outbound_heartbeat.run_info
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET TimeZone = 'UTC'
SET client_min_messages = notice
AS $$
DECLARE
    v_settings outbound_heartbeat.settings := outbound_heartbeat._settings();
    v_threshold interval;
    v_caller_lock_timeout text;
BEGIN
    -- Refuses (OH428) to run code on the tables a role outside the trusted set wrote (05_table_guard.sql).
    PERFORM outbound_heartbeat._require_trusted_tables();
    PERFORM outbound_heartbeat._require(get_active_run.business_id IS NOT NULL, 'business_id',
                                        'business_id must not be NULL');
    PERFORM outbound_heartbeat._require(
        get_active_run.stale_after IS NULL
            OR get_active_run.stale_after BETWEEN interval '1 microsecond' AND interval '100 years',
        'stale_after', 'stale_after must be a positive interval of at most 100 years');
    v_threshold := COALESCE(get_active_run.stale_after, v_settings.stale_after);
    v_caller_lock_timeout := outbound_heartbeat._apply_lock_timeout(v_settings);
    PERFORM outbound_heartbeat._stop_stale_runs(get_active_run.business_id, NULL, v_threshold, v_settings);
    -- calls (15_calls.sql): the business's orphaned calls past call_orphan_timeout are failed.
    PERFORM outbound_heartbeat._expire_orphaned_calls(get_active_run.business_id, v_settings);
    RETURN QUERY
    SELECT d.* FROM outbound_heartbeat._describe_runs(ARRAY(
        SELECT r.id FROM public.outbound_call_runs AS r
         WHERE r.business_id = get_active_run.business_id AND r.status IN ('pending', 'running')
         ORDER BY r.status = 'running' DESC, r.id
         LIMIT 1), v_threshold) AS d;
    PERFORM outbound_heartbeat._restore_lock_timeout(v_caller_lock_timeout);
EXCEPTION WHEN lock_not_available THEN
    PERFORM outbound_heartbeat._raise_run_locked(NULL, get_active_run.business_id);
END
$$;
ALTER FUNCTION outbound_heartbeat.get_active_run(bigint, interval) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat.get_active_run(bigint, interval) FROM PUBLIC;
SELECT outbound_heartbeat._offer_to('app', 'outbound_heartbeat.get_active_run(bigint, interval)');
COMMENT ON FUNCTION outbound_heartbeat.get_active_run(bigint, interval) IS
    'The business''s truly active run, or no row; a running run with a stale heartbeat is stopped by this very call.';

-- request_cancel()'s and force_cancel()'s answer.
DO $cancel_result$
BEGIN
    IF pg_catalog.to_regtype('outbound_heartbeat.cancel_result') IS NULL THEN
        CREATE TYPE outbound_heartbeat.cancel_result AS (
            run_id bigint, business_id bigint, previous_status text, status text,
            jobs_cancelled bigint);
    END IF;
END
$cancel_result$;

-- Cooperative cancel: a running run is flagged and its worker sees 'cancel_requested' at its
-- next heartbeat; a pending run is cancelled at once (no worker would hear it). Idempotent.
CREATE OR REPLACE FUNCTION outbound_heartbeat.request_cancel(run_id bigint, business_id bigint DEFAULT NULL)
RETURNS outbound_heartbeat.cancel_result
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET TimeZone = 'UTC'
SET client_min_messages = notice
AS $$
DECLARE
    v_settings outbound_heartbeat.settings := outbound_heartbeat._settings();
    v_run public.outbound_call_runs;
    v_ended outbound_heartbeat.ended_run;
    v_caller_lock_timeout text;
BEGIN
    -- Refuses (OH428) to run code on the tables a role outside the trusted set wrote (05_table_guard.sql).
    PERFORM outbound_heartbeat._require_trusted_tables();
    PERFORM outbound_heartbeat._require(request_cancel.run_id IS NOT NULL, 'run_id', 'run_id must not be NULL');
    v_caller_lock_timeout := outbound_heartbeat._apply_lock_timeout(v_settings);
    v_run := outbound_heartbeat._lock_run_for_caller(request_cancel.run_id, request_cancel.business_id);
    IF v_run.status = 'pending' THEN
        SELECT e.* INTO v_ended FROM outbound_heartbeat._end_runs(
            ARRAY[request_cancel.run_id], 'cancelled', 'cancel_requested', 'run cancelled',
            pg_catalog.jsonb_build_object('immediate', true)) AS e;
        PERFORM outbound_heartbeat._restore_lock_timeout(v_caller_lock_timeout);
        RETURN ROW(v_run.id, v_run.business_id, 'pending', 'cancelled', v_ended.jobs_failed)
               ::outbound_heartbeat.cancel_result;
    END IF;
    IF v_run.status = 'running' AND v_run.cancel_requested_at IS NULL THEN
        UPDATE public.outbound_call_runs AS r
           SET cancel_requested_at = pg_catalog.now(), updated_at = pg_catalog.now()
         WHERE r.id = request_cancel.run_id;
        PERFORM outbound_heartbeat._record_event(v_run.id, v_run.business_id, 'cancel_requested',
                                                 v_run.locked_by_worker, '{}'::jsonb);
    END IF;
    PERFORM outbound_heartbeat._restore_lock_timeout(v_caller_lock_timeout);
    RETURN ROW(v_run.id, v_run.business_id, v_run.status, v_run.status, 0)::outbound_heartbeat.cancel_result;
EXCEPTION WHEN lock_not_available THEN
    PERFORM outbound_heartbeat._raise_run_locked(request_cancel.run_id, NULL);
    RETURN NULL;
END
$$;
ALTER FUNCTION outbound_heartbeat.request_cancel(bigint, bigint) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat.request_cancel(bigint, bigint) FROM PUBLIC;
SELECT outbound_heartbeat._offer_to('app', 'outbound_heartbeat.request_cancel(bigint, bigint)');
COMMENT ON FUNCTION outbound_heartbeat.request_cancel(bigint, bigint) IS
    'Cooperative cancel: the worker sees cancel_requested at its next heartbeat; a pending run is cancelled at once.';

-- Cancels a run now, live worker or dead: run 'cancelled', queued jobs failed, lock cleared,
-- epoch bumped. Idempotent: a finished run reports 0 jobs and changes nothing.
CREATE OR REPLACE FUNCTION outbound_heartbeat.force_cancel(run_id bigint, business_id bigint DEFAULT NULL)
RETURNS outbound_heartbeat.cancel_result
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET TimeZone = 'UTC'
SET client_min_messages = notice
AS $$
DECLARE
    v_settings outbound_heartbeat.settings := outbound_heartbeat._settings();
    v_run public.outbound_call_runs;
    v_ended outbound_heartbeat.ended_run;
    v_caller_lock_timeout text;
BEGIN
    -- Refuses (OH428) to run code on the tables a role outside the trusted set wrote (05_table_guard.sql).
    PERFORM outbound_heartbeat._require_trusted_tables();
    PERFORM outbound_heartbeat._require(force_cancel.run_id IS NOT NULL, 'run_id', 'run_id must not be NULL');
    v_caller_lock_timeout := outbound_heartbeat._apply_lock_timeout(v_settings);
    v_run := outbound_heartbeat._lock_run_for_caller(force_cancel.run_id, force_cancel.business_id);
    IF v_run.status NOT IN ('pending', 'running') THEN
        PERFORM outbound_heartbeat._restore_lock_timeout(v_caller_lock_timeout);
        RETURN ROW(v_run.id, v_run.business_id, v_run.status, v_run.status, 0)::outbound_heartbeat.cancel_result;
    END IF;
    SELECT e.* INTO v_ended FROM outbound_heartbeat._end_runs(
        ARRAY[force_cancel.run_id], 'cancelled', 'force_cancelled', 'run force-cancelled',
        pg_catalog.jsonb_build_object('by_business', force_cancel.business_id)) AS e;
    PERFORM outbound_heartbeat._restore_lock_timeout(v_caller_lock_timeout);
    RETURN ROW(v_run.id, v_run.business_id, v_ended.previous_status, 'cancelled', v_ended.jobs_failed)
           ::outbound_heartbeat.cancel_result;
EXCEPTION WHEN lock_not_available THEN
    PERFORM outbound_heartbeat._raise_run_locked(force_cancel.run_id, NULL);
    RETURN NULL;
END
$$;
ALTER FUNCTION outbound_heartbeat.force_cancel(bigint, bigint) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat.force_cancel(bigint, bigint) FROM PUBLIC;
SELECT outbound_heartbeat._offer_to('app', 'outbound_heartbeat.force_cancel(bigint, bigint)');
COMMENT ON FUNCTION outbound_heartbeat.force_cancel(bigint, bigint) IS
    'Cancels a run now, worker dead or alive: queued jobs failed, lock cleared, epoch bumped; returns jobs_cancelled; idempotent.';

REVOKE CREATE ON SCHEMA outbound_heartbeat FROM outbound_heartbeat_owner;
