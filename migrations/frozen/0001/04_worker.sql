-- The worker's side of the API. A lease is (run_id, worker_id, lease_epoch); every write here
-- is fenced on it, so a worker that was declared dead, cancelled or taken over changes nothing.

-- Claims a run for worker_id: its own running run first (crash resume, resumed = true), else the
-- given or oldest pending run. Bumps the epoch. Rows locked by others are skipped: no row.
CREATE OR REPLACE FUNCTION outbound_heartbeat.claim_run(worker_id text, run_id bigint DEFAULT NULL)
RETURNS SETOF outbound_heartbeat.lease
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
SET TimeZone = 'UTC'
SET client_min_messages = notice
AS $$
DECLARE
    v_settings outbound_heartbeat.settings := outbound_heartbeat._settings();
    v_run_id bigint;
    v_resumed boolean;
    v_lease outbound_heartbeat.lease;
BEGIN
    PERFORM outbound_heartbeat._require_worker_id(claim_run.worker_id);
    IF claim_run.run_id IS NOT NULL THEN
        PERFORM outbound_heartbeat._require_run(claim_run.run_id);
        SELECT r.id, r.status = 'running' INTO v_run_id, v_resumed
          FROM public.outbound_call_runs AS r
         WHERE r.id = claim_run.run_id
           AND (r.status = 'pending'
                OR (r.status = 'running' AND r.locked_by_worker = claim_run.worker_id))
           FOR UPDATE SKIP LOCKED;
    ELSE
        SELECT r.id, true INTO v_run_id, v_resumed
          FROM public.outbound_call_runs AS r
         WHERE r.status = 'running' AND r.locked_by_worker = claim_run.worker_id
         ORDER BY r.id
         LIMIT 1
           FOR UPDATE SKIP LOCKED;
        IF NOT FOUND THEN
            SELECT r.id, false INTO v_run_id, v_resumed
              FROM public.outbound_call_runs AS r
             WHERE r.status = 'pending'
             ORDER BY r.id
             LIMIT 1
               FOR UPDATE SKIP LOCKED;
        END IF;
    END IF;
    IF v_run_id IS NULL THEN
        RETURN;
    END IF;

    UPDATE public.outbound_call_runs AS r
       SET status = 'running', locked_by_worker = claim_run.worker_id, lock_ts = pg_catalog.now(),
           last_heartbeat_at = pg_catalog.now(), lease_epoch = r.lease_epoch + 1,
           started_at = COALESCE(r.started_at, pg_catalog.now()), updated_at = pg_catalog.now()
     WHERE r.id = v_run_id
    RETURNING r.id::bigint, r.business_id::bigint, claim_run.worker_id, r.lease_epoch::bigint,
              v_resumed, v_settings.stale_after
      INTO v_lease;
    PERFORM outbound_heartbeat._record_event(
        v_lease.run_id, v_lease.business_id,
        CASE WHEN v_resumed THEN 'resumed' ELSE 'claimed' END, claim_run.worker_id,
        pg_catalog.jsonb_build_object('lease_epoch', v_lease.lease_epoch));
    RETURN NEXT v_lease;
END
$$;

-- Proves the lease holder is alive: 'ok', 'cancel_requested' or 'lost' (an answer, not an
-- error). A lease found stale is stopped on the spot, exactly as any other observer would.
CREATE OR REPLACE FUNCTION outbound_heartbeat.heartbeat(run_id bigint, worker_id text, lease_epoch bigint)
RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
SET TimeZone = 'UTC'
SET client_min_messages = notice
AS $$
DECLARE
    v_settings outbound_heartbeat.settings;
    v_cancel boolean;
BEGIN
    IF heartbeat.run_id IS NULL OR heartbeat.worker_id IS NULL OR heartbeat.lease_epoch IS NULL
       OR heartbeat.lease_epoch < 0 OR pg_catalog.btrim(heartbeat.worker_id) = '' THEN
        PERFORM outbound_heartbeat._require_lease(heartbeat.run_id, heartbeat.worker_id, heartbeat.lease_epoch);
    END IF;
    v_settings := outbound_heartbeat._settings();
    PERFORM pg_catalog.set_config('lock_timeout', outbound_heartbeat._lock_timeout_value(v_settings), true);
    -- Hot path: a heartbeat younger than stale_after is fresh under every clause of the
    -- liveness rule, so the common case is one indexed UPDATE. Anything else takes the full rule.
    UPDATE public.outbound_call_runs AS r
       SET last_heartbeat_at = pg_catalog.now()
     WHERE r.id = heartbeat.run_id AND r.status = 'running'
       AND r.locked_by_worker = heartbeat.worker_id AND r.lease_epoch = heartbeat.lease_epoch
       AND r.last_heartbeat_at >= pg_catalog.now() - v_settings.stale_after
    RETURNING r.cancel_requested_at IS NOT NULL INTO v_cancel;
    IF NOT FOUND THEN
        PERFORM outbound_heartbeat._require_worker_id(heartbeat.worker_id);
        UPDATE public.outbound_call_runs AS r
           SET last_heartbeat_at = pg_catalog.now()
         WHERE r.id = heartbeat.run_id
           AND outbound_heartbeat._holds_lease(r, heartbeat.worker_id, heartbeat.lease_epoch, v_settings)
        RETURNING r.cancel_requested_at IS NOT NULL INTO v_cancel;
    END IF;
    IF FOUND THEN
        RETURN CASE WHEN v_cancel THEN 'cancel_requested' ELSE 'ok' END;
    END IF;
    PERFORM outbound_heartbeat._stop_stale_runs(NULL, heartbeat.run_id, v_settings.stale_after, v_settings);
    RETURN 'lost';
EXCEPTION WHEN lock_not_available THEN
    PERFORM outbound_heartbeat._raise_run_locked(heartbeat.run_id, NULL);
    RETURN NULL;
END
$$;

-- Hands the lease holder its next queued job, now in_progress (also a heartbeat); no row when
-- none is left or a cancel was requested. OH409 when the lease is gone, OH404 for no such run.
CREATE OR REPLACE FUNCTION outbound_heartbeat.next_job(run_id bigint, worker_id text, lease_epoch bigint)
RETURNS SETOF outbound_heartbeat.job
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
SET TimeZone = 'UTC'
SET client_min_messages = notice
AS $$
DECLARE
    v_settings outbound_heartbeat.settings := outbound_heartbeat._settings();
    v_cancel boolean;
    v_business_id bigint;
    v_status text;
BEGIN
    PERFORM outbound_heartbeat._require_lease(next_job.run_id, next_job.worker_id, next_job.lease_epoch);
    PERFORM pg_catalog.set_config('lock_timeout', outbound_heartbeat._lock_timeout_value(v_settings), true);
    UPDATE public.outbound_call_runs AS r
       SET last_heartbeat_at = pg_catalog.now()
     WHERE r.id = next_job.run_id
       AND outbound_heartbeat._holds_lease(r, next_job.worker_id, next_job.lease_epoch, v_settings)
    RETURNING r.cancel_requested_at IS NOT NULL, r.business_id INTO v_cancel, v_business_id;
    IF NOT FOUND THEN
        PERFORM outbound_heartbeat._require_run(next_job.run_id);
        SELECT r.status INTO v_status FROM public.outbound_call_runs AS r WHERE r.id = next_job.run_id;
        RAISE EXCEPTION USING ERRCODE = 'OH409', COLUMN = 'lease_epoch',
            MESSAGE = pg_catalog.format('lease on run %s (worker %s, epoch %s) is lost: run is %s%s',
                next_job.run_id, next_job.worker_id, next_job.lease_epoch, v_status,
                CASE WHEN v_status = 'running' THEN ' under another lease or stale' ELSE '' END);
    END IF;
    IF v_cancel THEN
        RETURN;
    END IF;
    RETURN QUERY
    UPDATE public.outbound_call_jobs AS j
       SET status = 'in_progress', updated_at = pg_catalog.now()
     WHERE j.id = (SELECT q.id FROM public.outbound_call_jobs AS q
                    WHERE q.run_id = next_job.run_id AND q.status = 'queued'
                    ORDER BY q.id
                    LIMIT 1
                      FOR UPDATE SKIP LOCKED)
    RETURNING j.id::bigint, j.run_id::bigint, COALESCE(j.business_id, v_business_id)::bigint,
              j.status::text, j.payload::jsonb, j.error_message::text,
              j.created_at::timestamptz, j.updated_at::timestamptz;
EXCEPTION WHEN lock_not_available THEN
    PERFORM outbound_heartbeat._raise_run_locked(next_job.run_id, NULL);
END
$$;

-- Records a job's final status ('completed' or 'failed', with an optional error) for the lease
-- holder. Outcome 'finished', 'already_finished' (same status again: no-op) or 'lease_lost'.
CREATE OR REPLACE FUNCTION outbound_heartbeat.finish_job(
    job_id bigint, worker_id text, lease_epoch bigint, status text, error text DEFAULT NULL)
RETURNS outbound_heartbeat.job_outcome
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
SET TimeZone = 'UTC'
SET client_min_messages = notice
AS $$
DECLARE
    v_settings outbound_heartbeat.settings := outbound_heartbeat._settings();
    v_run_id bigint;
    v_job_status text;
BEGIN
    PERFORM outbound_heartbeat._require(finish_job.job_id IS NOT NULL, 'job_id', 'job_id must not be NULL');
    PERFORM outbound_heartbeat._require_worker_id(finish_job.worker_id);
    PERFORM outbound_heartbeat._require(finish_job.lease_epoch >= 0, 'lease_epoch',
                                        'lease_epoch must be a non-negative integer');
    PERFORM outbound_heartbeat._require(finish_job.status IN ('completed', 'failed'), 'status',
                                        'status must be ''completed'' or ''failed''');
    PERFORM pg_catalog.set_config('lock_timeout', outbound_heartbeat._lock_timeout_value(v_settings), true);

    SELECT j.run_id, j.status INTO v_run_id, v_job_status
      FROM public.outbound_call_jobs AS j WHERE j.id = finish_job.job_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'OH404', COLUMN = 'job_id',
            MESSAGE = pg_catalog.format('job %s does not exist', finish_job.job_id);
    END IF;

    -- FOR SHARE: a concurrent force-cancel or stale stop waits for this write, or this waits for it.
    PERFORM 1 FROM public.outbound_call_runs AS r
     WHERE r.id = v_run_id
       AND outbound_heartbeat._holds_lease(r, finish_job.worker_id, finish_job.lease_epoch, v_settings)
       FOR SHARE;
    IF NOT FOUND THEN
        PERFORM outbound_heartbeat._stop_stale_runs(NULL, v_run_id, v_settings.stale_after, v_settings);
        RETURN ROW(finish_job.job_id, v_run_id, v_job_status, 'lease_lost')::outbound_heartbeat.job_outcome;
    END IF;

    UPDATE public.outbound_call_jobs AS j
       SET status = finish_job.status,
           error_message = CASE WHEN finish_job.status = 'failed'
                                THEN COALESCE(finish_job.error, j.error_message)
                                ELSE j.error_message END,
           updated_at = pg_catalog.now()
     WHERE j.id = finish_job.job_id AND j.status = 'in_progress';
    IF FOUND THEN
        RETURN ROW(finish_job.job_id, v_run_id, finish_job.status, 'finished')::outbound_heartbeat.job_outcome;
    END IF;
    IF v_job_status = finish_job.status THEN
        RETURN ROW(finish_job.job_id, v_run_id, v_job_status, 'already_finished')::outbound_heartbeat.job_outcome;
    END IF;
    RAISE EXCEPTION USING ERRCODE = 'OH400', COLUMN = 'job_id',
        MESSAGE = pg_catalog.format('job %s is %s: only an in_progress job can become %s',
                                    finish_job.job_id, v_job_status, finish_job.status);
EXCEPTION WHEN lock_not_available THEN
    PERFORM outbound_heartbeat._raise_run_locked(v_run_id, NULL);
    RETURN NULL;
END
$$;

-- Ends the lease holder's run ('completed', 'failed' or 'cancelled'); leftover queued jobs are
-- failed. Outcome 'finished', 'already_finished' (it already has that status) or 'lease_lost'.
CREATE OR REPLACE FUNCTION outbound_heartbeat.finish_run(
    run_id bigint, worker_id text, lease_epoch bigint, status text DEFAULT 'completed')
RETURNS outbound_heartbeat.run_outcome
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
SET TimeZone = 'UTC'
SET client_min_messages = notice
AS $$
DECLARE
    v_settings outbound_heartbeat.settings := outbound_heartbeat._settings();
    v_jobs_failed bigint;
    v_status text;
BEGIN
    PERFORM outbound_heartbeat._require_lease(finish_run.run_id, finish_run.worker_id, finish_run.lease_epoch);
    PERFORM outbound_heartbeat._require(finish_run.status IN ('completed', 'failed', 'cancelled'), 'status',
                                        'status must be ''completed'', ''failed'' or ''cancelled''');
    PERFORM pg_catalog.set_config('lock_timeout', outbound_heartbeat._lock_timeout_value(v_settings), true);
    PERFORM outbound_heartbeat._require_run(finish_run.run_id);

    PERFORM 1 FROM public.outbound_call_runs AS r
     WHERE r.id = finish_run.run_id
       AND outbound_heartbeat._holds_lease(r, finish_run.worker_id, finish_run.lease_epoch, v_settings)
       FOR UPDATE;
    IF FOUND THEN
        SELECT e.jobs_failed INTO v_jobs_failed
          FROM outbound_heartbeat._end_runs(
                ARRAY[finish_run.run_id], finish_run.status, 'finished',
                pg_catalog.format('run finished (%s) before this job was dialed', finish_run.status)) AS e;
        RETURN ROW(finish_run.run_id, finish_run.status, 'finished', v_jobs_failed)::outbound_heartbeat.run_outcome;
    END IF;

    PERFORM outbound_heartbeat._stop_stale_runs(NULL, finish_run.run_id, v_settings.stale_after, v_settings);
    SELECT r.status INTO v_status FROM public.outbound_call_runs AS r WHERE r.id = finish_run.run_id;
    RETURN ROW(finish_run.run_id, v_status,
               CASE WHEN v_status = finish_run.status THEN 'already_finished' ELSE 'lease_lost' END,
               0)::outbound_heartbeat.run_outcome;
EXCEPTION WHEN lock_not_available THEN
    PERFORM outbound_heartbeat._raise_run_locked(finish_run.run_id, NULL);
    RETURN NULL;
END
$$;
