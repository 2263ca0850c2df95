-- The worker's side of the API. A lease is (run_id, worker_id, lease_epoch); every write here
-- is fenced on it, so a worker that was declared dead, cancelled or taken over changes nothing.

-- Claims a run for worker_id: its own running run first (crash resume, resumed = true), else the
-- given or oldest pending run. Bumps the epoch. Rows locked by others are skipped: no row.
-- A worker name is not an incarnation: its running run is resumed only once stale (the old
-- incarnation is dead), never while another live process with the same name heartbeats it.
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
                OR (r.status = 'running' AND r.locked_by_worker = claim_run.worker_id
                    AND outbound_heartbeat._stale_reason(r, v_settings.stale_after, v_settings) IS NOT NULL))
           FOR UPDATE SKIP LOCKED;
    ELSE
        SELECT r.id, true INTO v_run_id, v_resumed
          FROM public.outbound_call_runs AS r
         WHERE r.status = 'running' AND r.locked_by_worker = claim_run.worker_id
           AND outbound_heartbeat._stale_reason(r, v_settings.stale_after, v_settings) IS NOT NULL
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

-- The whole liveness rule behind heartbeat(): validates the arguments, waits on the row lock
-- at most lock_timeout (OH423), refreshes a lease that holds, stops one found stale: 'lost';
-- 'completed' when the run was completed under this lease (nothing left: the worker succeeded).
CREATE OR REPLACE FUNCTION outbound_heartbeat._heartbeat_slow(p_run_id bigint, p_worker_id text, p_lease_epoch bigint)
RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
SET TimeZone = 'UTC'
SET client_min_messages = notice
AS $$
DECLARE
    v_settings outbound_heartbeat.settings;
    v_cancel boolean;
    v_caller_lock_timeout text;
BEGIN
    PERFORM outbound_heartbeat._require_lease(p_run_id, p_worker_id, p_lease_epoch);
    PERFORM outbound_heartbeat._require_primary('heartbeat');
    v_settings := outbound_heartbeat._settings();
    v_caller_lock_timeout := outbound_heartbeat._apply_lock_timeout(v_settings);
    UPDATE public.outbound_call_runs AS r
       SET last_heartbeat_at = pg_catalog.now()
     WHERE r.id = p_run_id
       AND outbound_heartbeat._holds_lease(r, p_worker_id, p_lease_epoch, v_settings)
    RETURNING r.cancel_requested_at IS NOT NULL INTO v_cancel;
    IF FOUND THEN
        PERFORM outbound_heartbeat._restore_lock_timeout(v_caller_lock_timeout);
        RETURN CASE WHEN v_cancel THEN 'cancel_requested' ELSE 'ok' END;
    END IF;
    IF outbound_heartbeat._completed_under_lease(p_run_id, p_worker_id, p_lease_epoch) THEN
        PERFORM outbound_heartbeat._restore_lock_timeout(v_caller_lock_timeout);
        RETURN 'completed';
    END IF;
    PERFORM outbound_heartbeat._stop_stale_runs(NULL, p_run_id, v_settings.stale_after, v_settings);
    PERFORM outbound_heartbeat._restore_lock_timeout(v_caller_lock_timeout);
    RETURN 'lost';
EXCEPTION WHEN lock_not_available THEN
    PERFORM outbound_heartbeat._raise_run_locked(p_run_id, NULL);
    RETURN NULL;
END
$$;

-- Proves the lease holder is alive: 'ok', 'cancel_requested', 'lost' (an answer, not an
-- error) or 'completed' (the run was completed under this lease, e.g. by the empty-run rule:
-- success). A lease found stale is stopped on the spot, exactly as any other observer would.
-- It is the one call every worker makes every few seconds, so its common case is one UPDATE
-- of a fresh lease whose row nobody else holds (SKIP LOCKED: it never waits), with no
-- exception block and no helper call; everything else (bad arguments, a locked row, an old
-- heartbeat, a lost lease, a hot standby: OH503 rather than 25006) goes to _heartbeat_slow().
CREATE OR REPLACE FUNCTION outbound_heartbeat.heartbeat(run_id bigint, worker_id text, lease_epoch bigint)
RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_cancel boolean;
BEGIN
    IF pg_catalog.pg_is_in_recovery() THEN
        RETURN outbound_heartbeat._heartbeat_slow(heartbeat.run_id, heartbeat.worker_id, heartbeat.lease_epoch);
    END IF;
    UPDATE public.outbound_call_runs AS r
       SET last_heartbeat_at = pg_catalog.now()
      FROM (SELECT l.ctid FROM public.outbound_call_runs AS l
             WHERE l.id = heartbeat.run_id
               FOR UPDATE SKIP LOCKED) AS held
     WHERE r.ctid = held.ctid
       AND r.status = 'running'
       AND r.locked_by_worker = heartbeat.worker_id
       AND r.lease_epoch = heartbeat.lease_epoch
       AND r.last_heartbeat_at >= pg_catalog.now() - (SELECT s.stale_after FROM outbound_heartbeat.settings AS s)
    RETURNING r.cancel_requested_at IS NOT NULL INTO v_cancel;
    IF FOUND THEN
        RETURN CASE WHEN v_cancel THEN 'cancel_requested' ELSE 'ok' END;
    END IF;
    RETURN outbound_heartbeat._heartbeat_slow(heartbeat.run_id, heartbeat.worker_id, heartbeat.lease_epoch);
END
$$;

-- A naive timestamp heartbeat column (an app's own "migration 114") holds UTC, so for it alone
-- heartbeat() pins TimeZone (about 15 % of the fast path's cost, measured side by side); with
-- the library's timestamptz column now() needs no time zone at all.
DO $naive_clock$
BEGIN
    IF (SELECT pg_catalog.format_type(a.atttypid, a.atttypmod) = 'timestamp without time zone'
          FROM pg_catalog.pg_attribute AS a
         WHERE a.attrelid = 'public.outbound_call_runs'::pg_catalog.regclass
           AND a.attname = 'last_heartbeat_at' AND NOT a.attisdropped) THEN
        ALTER FUNCTION outbound_heartbeat.heartbeat(bigint, text, bigint) SET TimeZone = 'UTC';
    END IF;
END
$naive_clock$;

-- heartbeat() for every lease a process holds, in one statement per interval (the process's
-- shared heartbeat connection calls it): each lease is answered exactly as heartbeat() answers
-- it alone, by the same fenced UPDATE for the fresh ones and _heartbeat_slow() for the rest.
-- 'locked' (instead of heartbeat()'s OH423) when its row stayed locked: the whole call waits
-- on row locks at most 100 ms (or lock_timeout if smaller), well before deadlock_timeout, since
-- it holds the other leases' rows meanwhile; the caller beats that lease again shortly.
CREATE OR REPLACE FUNCTION outbound_heartbeat.heartbeat_leases(
    run_ids bigint[], worker_ids text[], lease_epochs bigint[])
RETURNS TABLE (run_id bigint, status text)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
SET TimeZone = 'UTC'
SET client_min_messages = notice
-- A generic plan cannot see how many leases the arrays hold (x40 slower at 200 leases).
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    v_settings outbound_heartbeat.settings := outbound_heartbeat._settings();
    v_caller_lock_timeout text := pg_catalog.current_setting('lock_timeout');
    v_wait_until timestamptz;
    v_left_ms bigint;
    v_fresh_ids bigint[];
    v_fresh_workers text[];
    v_fresh_epochs bigint[];
    v_fresh_status text[];
    v_lease record;
BEGIN
    -- Every argument checked before anything is written. A worker id's own rules are checked
    -- below, only for a lease the fast path did not answer: one that did equals a lease
    -- holder's name, which claim_run() checked (and an error undoes the whole call).
    PERFORM outbound_heartbeat._require_lease_arrays(run_ids, worker_ids, lease_epochs);

    -- The fast path, for all fresh leases at once: heartbeat()'s fenced UPDATE, SKIP LOCKED.
    WITH beat AS (
        UPDATE public.outbound_call_runs AS r
           SET last_heartbeat_at = pg_catalog.now()
          FROM (SELECT l.ctid, a.worker_id, a.lease_epoch
                  FROM ROWS FROM (pg_catalog.unnest(run_ids), pg_catalog.unnest(worker_ids),
                                 pg_catalog.unnest(lease_epochs)) AS a(run_id, worker_id, lease_epoch)
                  JOIN public.outbound_call_runs AS l ON l.id = a.run_id
                   FOR UPDATE OF l SKIP LOCKED) AS held
         WHERE r.ctid = held.ctid
           AND r.status = 'running'
           AND r.locked_by_worker = held.worker_id
           AND r.lease_epoch = held.lease_epoch
           AND r.last_heartbeat_at >= pg_catalog.now() - v_settings.stale_after
        RETURNING r.id, r.locked_by_worker, r.lease_epoch,
                  CASE WHEN r.cancel_requested_at IS NULL THEN 'ok' ELSE 'cancel_requested' END AS status)
    SELECT pg_catalog.array_agg(b.id), pg_catalog.array_agg(b.locked_by_worker),
           pg_catalog.array_agg(b.lease_epoch), pg_catalog.array_agg(b.status)
      INTO v_fresh_ids, v_fresh_workers, v_fresh_epochs, v_fresh_status
      FROM beat AS b;

    -- The rest, one by one, by heartbeat()'s own slow path; their lock waits share one budget.
    v_wait_until := pg_catalog.clock_timestamp() + LEAST(v_settings.lock_timeout, interval '100 ms');
    FOR v_lease IN
        SELECT a.run_id, a.worker_id, a.lease_epoch, f.status
          FROM ROWS FROM (pg_catalog.unnest(run_ids), pg_catalog.unnest(worker_ids),
                         pg_catalog.unnest(lease_epochs)) WITH ORDINALITY
               AS a(run_id, worker_id, lease_epoch, n)
          LEFT JOIN ROWS FROM (pg_catalog.unnest(v_fresh_ids), pg_catalog.unnest(v_fresh_workers),
                         pg_catalog.unnest(v_fresh_epochs), pg_catalog.unnest(v_fresh_status))
               AS f(run_id, worker_id, lease_epoch, status)
            ON f.run_id = a.run_id AND f.worker_id = a.worker_id AND f.lease_epoch = a.lease_epoch
         ORDER BY a.n
    LOOP
        heartbeat_leases.run_id := v_lease.run_id;
        heartbeat_leases.status := v_lease.status;
        IF v_lease.status IS NULL AND pg_catalog.clock_timestamp() >= v_wait_until THEN
            -- The budget is spent: no more waiting at all (SKIP LOCKED), so this call never
            -- sits in a lock queue while holding rows a concurrent release waits for.
            PERFORM 1 FROM public.outbound_call_runs AS l
             WHERE l.id = v_lease.run_id FOR UPDATE SKIP LOCKED;
            IF NOT FOUND AND EXISTS (SELECT 1 FROM public.outbound_call_runs AS l
                                      WHERE l.id = v_lease.run_id) THEN
                heartbeat_leases.status := 'locked';
            END IF;
        END IF;
        IF heartbeat_leases.status IS NULL THEN
            IF outbound_heartbeat._is_blank(v_lease.worker_id) OR pg_catalog.length(v_lease.worker_id) > 200 THEN
                RAISE EXCEPTION USING ERRCODE = 'OH400', COLUMN = 'worker_ids',
                    MESSAGE = 'every worker_ids element must be a non-empty string of at most 200 characters';
            END IF;
            v_left_ms := GREATEST(1, pg_catalog.ceil(EXTRACT(epoch FROM
                             v_wait_until - pg_catalog.clock_timestamp()) * 1000)::bigint);
            -- Stricter wins inside _heartbeat_slow(): this budget bounds its wait.
            PERFORM pg_catalog.set_config('lock_timeout', v_left_ms::text, true);
            BEGIN
                heartbeat_leases.status := outbound_heartbeat._heartbeat_slow(
                    v_lease.run_id, v_lease.worker_id, v_lease.lease_epoch);
            EXCEPTION WHEN SQLSTATE 'OH423' THEN
                heartbeat_leases.status := 'locked';
            END;
        END IF;
        RETURN NEXT;
    END LOOP;
    PERFORM outbound_heartbeat._restore_lock_timeout(v_caller_lock_timeout);
END
$$;

COMMENT ON FUNCTION outbound_heartbeat.heartbeat_leases(bigint[], text[], bigint[]) IS
    'heartbeat() for many leases in one statement (a process''s shared heartbeat connection): one row per lease, in order, with heartbeat()''s answer, or ''locked'' when its row stayed locked.';

-- request_id is new (a retry key): the old three-argument signature would make calls ambiguous.
DROP FUNCTION IF EXISTS outbound_heartbeat.next_job(bigint, text, bigint);

-- Hands the lease holder its next queued job, now in_progress (also a heartbeat); no row when
-- none is left, a cancel was requested or the run was completed under this lease. A retry with
-- the same request_id (after a lost answer) returns the job the first attempt took, if still
-- in progress. OH409 when the lease is gone, OH404 for no such run.
CREATE OR REPLACE FUNCTION outbound_heartbeat.next_job(
    run_id bigint, worker_id text, lease_epoch bigint, request_id text DEFAULT NULL)
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
    v_job outbound_heartbeat.job;
    v_caller_lock_timeout text;
BEGIN
    PERFORM outbound_heartbeat._require_lease(next_job.run_id, next_job.worker_id, next_job.lease_epoch);
    PERFORM outbound_heartbeat._require(
        next_job.request_id IS NULL
            OR (pg_catalog.length(next_job.request_id) BETWEEN 1 AND 200
                AND NOT outbound_heartbeat._is_blank(next_job.request_id)),
        'request_id', 'request_id must be NULL or a non-blank string of at most 200 characters');
    v_caller_lock_timeout := outbound_heartbeat._apply_lock_timeout(v_settings);
    UPDATE public.outbound_call_runs AS r
       SET last_heartbeat_at = pg_catalog.now()
     WHERE r.id = next_job.run_id
       AND outbound_heartbeat._holds_lease(r, next_job.worker_id, next_job.lease_epoch, v_settings)
    RETURNING r.cancel_requested_at IS NOT NULL, r.business_id INTO v_cancel, v_business_id;
    IF NOT FOUND THEN
        PERFORM outbound_heartbeat._require_run(next_job.run_id);
        IF outbound_heartbeat._completed_under_lease(next_job.run_id, next_job.worker_id, next_job.lease_epoch) THEN
            PERFORM outbound_heartbeat._restore_lock_timeout(v_caller_lock_timeout);
            RETURN;  -- completed while this lease held it (empty-run rule): nothing left, success
        END IF;
        SELECT r.status INTO v_status FROM public.outbound_call_runs AS r WHERE r.id = next_job.run_id;
        RAISE EXCEPTION USING ERRCODE = 'OH409', COLUMN = 'lease_epoch',
            MESSAGE = pg_catalog.format('lease on run %s (worker %s, epoch %s) is lost: run is %s%s',
                next_job.run_id, next_job.worker_id, next_job.lease_epoch, v_status,
                CASE WHEN v_status = 'running' THEN ' under another lease or stale' ELSE '' END);
    END IF;
    -- A retry: the job the lost attempt took, even after a cancel request (it must be seen).
    IF next_job.request_id IS NOT NULL THEN
        SELECT j.id::bigint, j.run_id::bigint, COALESCE(j.business_id, v_business_id)::bigint,
               j.status::text, j.payload::jsonb, j.error_message::text,
               j.created_at::timestamptz, j.updated_at::timestamptz
          INTO v_job
          FROM public.outbound_call_jobs AS j
         WHERE j.run_id = next_job.run_id AND j.status = 'in_progress'
           AND j.lease_epoch = next_job.lease_epoch AND j.lease_request_id = next_job.request_id
         ORDER BY j.id
         LIMIT 1;
        IF FOUND THEN
            PERFORM outbound_heartbeat._restore_lock_timeout(v_caller_lock_timeout);
            RETURN NEXT v_job;
            RETURN;
        END IF;
    END IF;
    IF v_cancel THEN
        PERFORM outbound_heartbeat._restore_lock_timeout(v_caller_lock_timeout);
        RETURN;
    END IF;
    RETURN QUERY
    UPDATE public.outbound_call_jobs AS j
       SET status = 'in_progress', updated_at = pg_catalog.now(),
           lease_epoch = next_job.lease_epoch, lease_request_id = next_job.request_id
     WHERE j.id = (SELECT q.id FROM public.outbound_call_jobs AS q
                    WHERE q.run_id = next_job.run_id AND q.status = 'queued'
                    ORDER BY q.id
                    LIMIT 1
                      FOR UPDATE SKIP LOCKED)
    RETURNING j.id::bigint, j.run_id::bigint, COALESCE(j.business_id, v_business_id)::bigint,
              j.status::text, j.payload::jsonb, j.error_message::text,
              j.created_at::timestamptz, j.updated_at::timestamptz;
    PERFORM outbound_heartbeat._restore_lock_timeout(v_caller_lock_timeout);
EXCEPTION WHEN lock_not_available THEN
    PERFORM outbound_heartbeat._raise_run_locked(next_job.run_id, NULL);
END
$$;

-- Records a job's final status ('completed' or 'failed', with an optional error) for the lease
-- holder. Outcome 'finished', 'already_finished' (same status again: no-op, also for a retry
-- of this lease's own finish after the lease ended) or 'lease_lost'.
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
    v_job_epoch bigint;
    v_caller_lock_timeout text;
BEGIN
    PERFORM outbound_heartbeat._require(finish_job.job_id IS NOT NULL, 'job_id', 'job_id must not be NULL');
    PERFORM outbound_heartbeat._require_worker_id(finish_job.worker_id);
    PERFORM outbound_heartbeat._require(finish_job.lease_epoch >= 0, 'lease_epoch',
                                        'lease_epoch must be a non-negative integer');
    PERFORM outbound_heartbeat._require(finish_job.status IN ('completed', 'failed'), 'status',
                                        'status must be ''completed'' or ''failed''');
    v_caller_lock_timeout := outbound_heartbeat._apply_lock_timeout(v_settings);

    SELECT j.run_id, j.status, j.lease_epoch INTO v_run_id, v_job_status, v_job_epoch
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
        PERFORM outbound_heartbeat._restore_lock_timeout(v_caller_lock_timeout);
        -- A retry whose first attempt committed before the lease ended: the same answer again.
        IF v_job_status = finish_job.status AND v_job_epoch = finish_job.lease_epoch THEN
            RETURN ROW(finish_job.job_id, v_run_id, v_job_status, 'already_finished')::outbound_heartbeat.job_outcome;
        END IF;
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
        PERFORM outbound_heartbeat._restore_lock_timeout(v_caller_lock_timeout);
        RETURN ROW(finish_job.job_id, v_run_id, finish_job.status, 'finished')::outbound_heartbeat.job_outcome;
    END IF;
    PERFORM outbound_heartbeat._restore_lock_timeout(v_caller_lock_timeout);
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
    v_caller_lock_timeout text;
BEGIN
    PERFORM outbound_heartbeat._require_lease(finish_run.run_id, finish_run.worker_id, finish_run.lease_epoch);
    PERFORM outbound_heartbeat._require(finish_run.status IN ('completed', 'failed', 'cancelled'), 'status',
                                        'status must be ''completed'', ''failed'' or ''cancelled''');
    PERFORM outbound_heartbeat._require_run(finish_run.run_id);
    v_caller_lock_timeout := outbound_heartbeat._apply_lock_timeout(v_settings);

    PERFORM 1 FROM public.outbound_call_runs AS r
     WHERE r.id = finish_run.run_id
       AND outbound_heartbeat._holds_lease(r, finish_run.worker_id, finish_run.lease_epoch, v_settings)
       FOR UPDATE;
    IF FOUND THEN
        SELECT e.jobs_failed INTO v_jobs_failed
          FROM outbound_heartbeat._end_runs(
                ARRAY[finish_run.run_id], finish_run.status, 'finished',
                pg_catalog.format('run finished (%s) before this job was dialed', finish_run.status)) AS e;
        PERFORM outbound_heartbeat._restore_lock_timeout(v_caller_lock_timeout);
        RETURN ROW(finish_run.run_id, finish_run.status, 'finished', v_jobs_failed)::outbound_heartbeat.run_outcome;
    END IF;

    PERFORM outbound_heartbeat._stop_stale_runs(NULL, finish_run.run_id, v_settings.stale_after, v_settings);
    SELECT r.status INTO v_status FROM public.outbound_call_runs AS r WHERE r.id = finish_run.run_id;
    PERFORM outbound_heartbeat._restore_lock_timeout(v_caller_lock_timeout);
    RETURN ROW(finish_run.run_id, v_status,
               CASE WHEN v_status = finish_run.status THEN 'already_finished' ELSE 'lease_lost' END,
               0)::outbound_heartbeat.run_outcome;
EXCEPTION WHEN lock_not_available THEN
    PERFORM outbound_heartbeat._raise_run_locked(finish_run.run_id, NULL);
    RETURN NULL;
END
$$;

-- finish_run() for many leases in one statement (a process's release storm): one row per lease,
-- in input order, with finish_run()'s answer. The held runs are locked in id order and ended by
-- one _end_runs() per status; only the leases not held go through finish_run() one by one.
CREATE OR REPLACE FUNCTION outbound_heartbeat.finish_runs(
    run_ids bigint[], worker_ids text[], lease_epochs bigint[], statuses text[])
RETURNS SETOF outbound_heartbeat.run_outcome
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
SET TimeZone = 'UTC'
SET client_min_messages = notice
-- A generic plan cannot see how many leases the arrays hold (as for heartbeat_leases).
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    v_settings outbound_heartbeat.settings := outbound_heartbeat._settings();
    v_caller_lock_timeout text;
    v_missing bigint;
    v_locked bigint[];
    v_win_ids bigint[];
    v_win_ns bigint[];
    v_win_statuses text[];
    v_done_ids bigint[] := '{}';
    v_done_failed bigint[] := '{}';
    v_group record;
    v_lease record;
    v_locked_run bigint;
BEGIN
    -- Every argument checked before anything is written: same length, one dimension, no NULL,
    -- and finish_run()'s rules for each element, naming the array.
    PERFORM outbound_heartbeat._require_lease_arrays(run_ids, worker_ids, lease_epochs);
    IF EXISTS (SELECT 1 FROM pg_catalog.unnest(worker_ids) AS w(worker_id)
                WHERE outbound_heartbeat._is_blank(w.worker_id) OR pg_catalog.length(w.worker_id) > 200) THEN
        RAISE EXCEPTION USING ERRCODE = 'OH400', COLUMN = 'worker_ids',
            MESSAGE = 'every worker_ids element must be a non-empty string of at most 200 characters';
    END IF;
    IF statuses IS NULL OR pg_catalog.array_ndims(statuses) > 1
       OR pg_catalog.array_position(statuses, NULL) IS NOT NULL
       OR pg_catalog.cardinality(statuses) <> pg_catalog.cardinality(run_ids)
       OR EXISTS (SELECT 1 FROM pg_catalog.unnest(statuses) AS s(status)
                   WHERE s.status NOT IN ('completed', 'failed', 'cancelled')) THEN
        RAISE EXCEPTION USING ERRCODE = 'OH400', COLUMN = 'statuses',
            MESSAGE = 'statuses must be an array of ''completed'', ''failed'' or ''cancelled'', as long as run_ids';
    END IF;
    SELECT a.run_id INTO v_missing
      FROM pg_catalog.unnest(run_ids) WITH ORDINALITY AS a(run_id, n)
     WHERE NOT EXISTS (SELECT 1 FROM public.outbound_call_runs AS r WHERE r.id = a.run_id)
     ORDER BY a.n
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'OH404', COLUMN = 'run_ids',
            MESSAGE = pg_catalog.format('run %s does not exist', v_missing);
    END IF;
    v_caller_lock_timeout := outbound_heartbeat._apply_lock_timeout(v_settings);

    BEGIN
        -- Every row this call may change, locked in id order in this one statement (two
        -- overlapping calls cannot deadlock): the runs some lease appears to hold, and the
        -- stale ones (finish_run() stops them). A row neither is not waited on, as alone.
        SELECT pg_catalog.array_agg(l.id) INTO v_locked
          FROM (SELECT r.id
                  FROM public.outbound_call_runs AS r
                 WHERE r.id = ANY (run_ids) AND r.status = 'running'
                   AND ((r.id::bigint, r.locked_by_worker::text, r.lease_epoch::bigint) IN (
                            SELECT a.run_id, a.worker_id, a.lease_epoch
                              FROM ROWS FROM (pg_catalog.unnest(run_ids), pg_catalog.unnest(worker_ids),
                                             pg_catalog.unnest(lease_epochs)) AS a(run_id, worker_id, lease_epoch))
                        OR outbound_heartbeat._stale_reason(r, v_settings.stale_after, v_settings) IS NOT NULL)
                 ORDER BY r.id
                   FOR UPDATE OF r) AS l;

        -- Each locked run's first lease (in input order) that holds it: the one that ends it.
        SELECT pg_catalog.array_agg(w.run_id), pg_catalog.array_agg(w.n), pg_catalog.array_agg(w.status)
          INTO v_win_ids, v_win_ns, v_win_statuses
          FROM (SELECT DISTINCT ON (a.run_id) a.run_id, a.n, a.status
                  FROM ROWS FROM (pg_catalog.unnest(run_ids), pg_catalog.unnest(worker_ids),
                                 pg_catalog.unnest(lease_epochs), pg_catalog.unnest(statuses)) WITH ORDINALITY
                       AS a(run_id, worker_id, lease_epoch, status, n)
                  JOIN public.outbound_call_runs AS r ON r.id = a.run_id
                 WHERE r.id = ANY (v_locked)
                   AND outbound_heartbeat._holds_lease(r, a.worker_id, a.lease_epoch, v_settings)
                 ORDER BY a.run_id, a.n) AS w;

        -- One _end_runs() per status: one UPDATE, one INSERT of events, one count of each.
        FOR v_group IN
            SELECT w.status, pg_catalog.array_agg(w.run_id ORDER BY w.run_id) AS ids
              FROM ROWS FROM (pg_catalog.unnest(v_win_ids), pg_catalog.unnest(v_win_statuses)) AS w(run_id, status)
             WHERE w.run_id IS NOT NULL
             GROUP BY w.status
             ORDER BY w.status
        LOOP
            SELECT v_done_ids || pg_catalog.array_agg(e.run_id), v_done_failed || pg_catalog.array_agg(e.jobs_failed)
              INTO v_done_ids, v_done_failed
              FROM outbound_heartbeat._end_runs(
                    v_group.ids, v_group.status, 'finished',
                    pg_catalog.format('run finished (%s) before this job was dialed', v_group.status)) AS e;
        END LOOP;

        -- The answers, in input order, as finish_run() one after the other would give them: a
        -- lease before the one that ended its run found it running under another lease, one
        -- after found it ended; a lease of a run not held is finish_run()'s own.
        FOR v_lease IN
            SELECT a.run_id, a.worker_id, a.lease_epoch, a.status, a.n,
                   w.n AS win_n, w.status AS win_status, d.jobs_failed
              FROM ROWS FROM (pg_catalog.unnest(run_ids), pg_catalog.unnest(worker_ids),
                             pg_catalog.unnest(lease_epochs), pg_catalog.unnest(statuses)) WITH ORDINALITY
                   AS a(run_id, worker_id, lease_epoch, status, n)
              LEFT JOIN ROWS FROM (pg_catalog.unnest(v_win_ids), pg_catalog.unnest(v_win_ns),
                                  pg_catalog.unnest(v_win_statuses)) AS w(run_id, n, status)
                ON w.run_id = a.run_id
              LEFT JOIN ROWS FROM (pg_catalog.unnest(v_done_ids), pg_catalog.unnest(v_done_failed))
                   AS d(run_id, jobs_failed)
                ON d.run_id = a.run_id
             ORDER BY a.n
        LOOP
            IF v_lease.win_n IS NULL THEN
                RETURN NEXT outbound_heartbeat.finish_run(
                    v_lease.run_id, v_lease.worker_id, v_lease.lease_epoch, v_lease.status);
            ELSIF v_lease.n < v_lease.win_n THEN
                RETURN NEXT ROW(v_lease.run_id, 'running', 'lease_lost', 0)::outbound_heartbeat.run_outcome;
            ELSIF v_lease.n = v_lease.win_n THEN
                RETURN NEXT ROW(v_lease.run_id, v_lease.win_status, 'finished',
                                v_lease.jobs_failed)::outbound_heartbeat.run_outcome;
            ELSE
                RETURN NEXT ROW(v_lease.run_id, v_lease.win_status,
                                CASE WHEN v_lease.status = v_lease.win_status THEN 'already_finished'
                                     ELSE 'lease_lost' END,
                                0)::outbound_heartbeat.run_outcome;
            END IF;
        END LOOP;
    EXCEPTION WHEN lock_not_available THEN
        -- OH423 for the whole call (nothing of it is kept), naming a run whose row another
        -- transaction holds (the first by id), or the first run when it was a job row.
        SELECT c.id INTO v_locked_run
          FROM (SELECT DISTINCT a.run_id AS id FROM pg_catalog.unnest(run_ids) AS a(run_id)) AS c
         WHERE NOT EXISTS (SELECT 1 FROM public.outbound_call_runs AS l
                            WHERE l.id = c.id FOR UPDATE SKIP LOCKED)
         ORDER BY c.id
         LIMIT 1;
        IF v_locked_run IS NULL THEN
            SELECT a.run_id INTO v_locked_run FROM pg_catalog.unnest(run_ids) AS a(run_id) LIMIT 1;
        END IF;
        PERFORM outbound_heartbeat._raise_run_locked(v_locked_run, NULL);
    END;
    PERFORM outbound_heartbeat._restore_lock_timeout(v_caller_lock_timeout);
END
$$;
