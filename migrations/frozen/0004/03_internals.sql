-- Internal helpers (names start with an underscore): not part of the contract, may change.
-- Every function pins search_path and TimeZone, so neither a caller's objects nor its session
-- TimeZone can change what it does (naive legacy columns are read and written as UTC).

-- The settings row, or the defaults when a DBA has removed it.
CREATE OR REPLACE FUNCTION outbound_heartbeat._settings()
RETURNS outbound_heartbeat.settings
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_settings outbound_heartbeat.settings;
BEGIN
    SELECT s.* INTO v_settings FROM outbound_heartbeat.settings AS s;
    IF NOT FOUND THEN
        v_settings := ROW(true, interval '30 seconds', interval '5 minutes', interval '5 seconds', NULL,
                          interval '90 days');
    END IF;
    RETURN v_settings;
END
$$;

-- The lock_timeout setting as a GUC value (milliseconds).
CREATE OR REPLACE FUNCTION outbound_heartbeat._lock_timeout_value(p_settings outbound_heartbeat.settings)
RETURNS text
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN pg_catalog.ceil(EXTRACT(epoch FROM p_settings.lock_timeout) * 1000)::bigint::text;
END
$$;

-- Applies lock_timeout for the rest of an API call and returns the caller's value, which the
-- call puts back (_restore_lock_timeout) before it returns: a function-level SET clause cannot
-- be used, since it would hide the caller's value. An error needs no restore: it rolls the
-- set_config back with the function's exception block, the caller's savepoint or transaction.
-- The stricter wins: a caller's smaller non-zero lock_timeout also bounds the call's waits.
CREATE OR REPLACE FUNCTION outbound_heartbeat._apply_lock_timeout(p_settings outbound_heartbeat.settings)
RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_caller text := pg_catalog.current_setting('lock_timeout');
    v_caller_interval interval := v_caller::interval;
BEGIN
    IF v_caller_interval = interval '0' OR v_caller_interval > p_settings.lock_timeout THEN
        PERFORM pg_catalog.set_config('lock_timeout', outbound_heartbeat._lock_timeout_value(p_settings), true);
    END IF;
    RETURN v_caller;
END
$$;

-- Puts the caller's lock_timeout back (see _apply_lock_timeout); returns nothing.
CREATE OR REPLACE FUNCTION outbound_heartbeat._restore_lock_timeout(p_caller text)
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF pg_catalog.current_setting('lock_timeout') IS DISTINCT FROM p_caller THEN
        PERFORM pg_catalog.set_config('lock_timeout', p_caller, true);
    END IF;
END
$$;

-- Raises OH400 naming the argument unless p_ok is true. Nothing has been written yet when
-- the API functions call it: validation always comes first.
CREATE OR REPLACE FUNCTION outbound_heartbeat._require(p_ok boolean, p_argument text, p_message text)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_ok IS NOT TRUE THEN
        RAISE EXCEPTION USING ERRCODE = 'OH400', MESSAGE = p_message, COLUMN = p_argument;
    END IF;
END
$$;

-- True when nothing visible is left in p_text: Unicode spaces, controls, format characters
-- (zero-width space, joiners, BOM, bidi marks) and blank fillers only. The Python layer's
-- arguments.is_blank() refuses the same before anything is sent.
CREATE OR REPLACE FUNCTION outbound_heartbeat._is_blank(p_text text)
RETURNS boolean
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT p_text OPERATOR(pg_catalog.~) ('^[\u0001-\u0020\u007f-\u00a0\u00ad\u0600-\u0605\u061c\u06dd\u0890\u0891\u08e2'
        '\u070f\u115f\u1160\u1680\u180e\u2000-\u200f\u2028-\u202f\u205f-\u2064\u2066-\u206f\u2800\u3000'
        '\u3164\ufeff\uffa0\ufff9-\ufffb\U000110bd\U000110cd\U00013430-\U0001343f'
        '\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0001\U000e0020-\U000e007f]*$')
$$;

-- Checks a worker id: present, not blank, at most 200 characters.
CREATE OR REPLACE FUNCTION outbound_heartbeat._require_worker_id(p_worker_id text)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_worker_id IS NULL OR outbound_heartbeat._is_blank(p_worker_id)
       OR pg_catalog.length(p_worker_id) > 200 THEN
        RAISE EXCEPTION USING ERRCODE = 'OH400', COLUMN = 'worker_id',
            MESSAGE = 'worker_id must be a non-empty string of at most 200 characters';
    END IF;
END
$$;

-- Checks the (run_id, worker_id, lease_epoch) triple every fenced worker call takes.
CREATE OR REPLACE FUNCTION outbound_heartbeat._require_lease(p_run_id bigint, p_worker_id text, p_lease_epoch bigint)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_run_id IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'OH400', COLUMN = 'run_id', MESSAGE = 'run_id must not be NULL';
    END IF;
    PERFORM outbound_heartbeat._require_worker_id(p_worker_id);
    IF p_lease_epoch IS NULL OR p_lease_epoch < 0 THEN
        RAISE EXCEPTION USING ERRCODE = 'OH400', COLUMN = 'lease_epoch',
            MESSAGE = 'lease_epoch must be a non-negative integer';
    END IF;
END
$$;

-- When this server last began to accept writes, the latest outage PostgreSQL can tell apart:
-- its start, the end of a crash recovery (every process restarted, the postmaster kept) or a
-- promotion of a standby. The WAL writer is started at each of them and only then, so its
-- backend_start marks all three; pg_stat_bgwriter's stats_reset (reset by a crash recovery) and
-- the postmaster start are the markers left when backend_start is hidden (the owner of this
-- function lacks pg_read_all_stats). SECURITY DEFINER for that reason only: it reads one
-- timestamp and takes no argument. On a standby (no WAL writer) it is the standby's own start.
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

-- Why a running run counts as dead now ('stale_heartbeat', 'legacy_lock_timeout'), or NULL when
-- it is alive: the one liveness rule of the worker fence, read path, sweep, view and health check.
-- A run with no heartbeat (a legacy worker) is judged by its newest legacy timestamp against
-- legacy_stale_after. An outage is not a death: nothing is stale until restart_grace has passed
-- since the server last began to accept writes (a start, a crash recovery or a promotion,
-- _outage_ended_at()); that is looked up only for a run that would otherwise be stale.
-- "Now" is the statement's clock (statement_timestamp()), never the transaction's start
-- (now()): a caller inside a long transaction must not judge a dead run fresh.
CREATE OR REPLACE FUNCTION outbound_heartbeat._stale_reason(
    p_run public.outbound_call_runs, p_stale_after interval, p_settings outbound_heartbeat.settings)
RETURNS text
LANGUAGE plpgsql STABLE
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

-- Raises OH503 on a hot standby (or in a read-only transaction): p_call stops stale runs or
-- writes, which only the primary (the read-write server) can do. Reads work on a standby.
CREATE OR REPLACE FUNCTION outbound_heartbeat._require_primary(p_call text)
RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF pg_catalog.pg_is_in_recovery() THEN
        RAISE EXCEPTION USING ERRCODE = 'OH503',
            MESSAGE = pg_catalog.format('read-only server: %s must run on the primary, and this'
                                        ' server is a hot standby', p_call),
            HINT = 'Call the primary (the read-write server, e.g. target_session_attrs=read-write);'
                   ' the read-only views and list_events(), metrics(), health_check() work here.';
    END IF;
    IF pg_catalog.current_setting('transaction_read_only') = 'on' THEN
        RAISE EXCEPTION USING ERRCODE = 'OH503',
            MESSAGE = pg_catalog.format('read-only transaction: %s writes and must run on the'
                                        ' primary in a read-write transaction', p_call),
            HINT = 'Call the primary outside SET TRANSACTION READ ONLY.';
    END IF;
END
$$;

-- True when (worker_id, lease_epoch) still holds the running run and its heartbeat is fresh:
-- the fence every worker write is conditioned on.
CREATE OR REPLACE FUNCTION outbound_heartbeat._holds_lease(
    p_run public.outbound_call_runs, p_worker_id text, p_lease_epoch bigint,
    p_settings outbound_heartbeat.settings)
RETURNS boolean
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN p_run.status = 'running'
       AND p_run.locked_by_worker IS NOT DISTINCT FROM p_worker_id
       AND p_run.lease_epoch = p_lease_epoch
       AND outbound_heartbeat._stale_reason(p_run, p_settings.stale_after, p_settings) IS NULL;
END
$$;

-- True when the run was completed while (worker_id, lease_epoch) held it: by the empty-run rule
-- of cleanup_stuck_runs or by this lease's own finish_run (whose answer may have been lost).
-- Such a worker has nothing left to dial: success, not a lost lease. A terminal transition
-- bumps the epoch exactly once and nothing follows it, so epoch + 1 and the last event's
-- worker prove it happened under this very lease.
CREATE OR REPLACE FUNCTION outbound_heartbeat._completed_under_lease(
    p_run_id bigint, p_worker_id text, p_lease_epoch bigint)
RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT EXISTS (
        SELECT 1 FROM public.outbound_call_runs AS r
         WHERE r.id = p_run_id AND r.status = 'completed'
           AND r.lease_epoch - 1 = p_lease_epoch
           AND (SELECT e.worker_id FROM outbound_heartbeat.run_events AS e
                 WHERE e.run_id = p_run_id
                 ORDER BY e.id DESC
                 LIMIT 1) IS NOT DISTINCT FROM p_worker_id)
$$;

-- Why cleanup_stuck_runs reclaims a running run ('empty', 'on_startup', or a stale reason), or
-- NULL. A run with nothing queued or in progress is finished work: it ends 'completed'. A run of
-- this worker name is 'on_startup' only once stale: a live one is another incarnation's.
CREATE OR REPLACE FUNCTION outbound_heartbeat._reclaim_reason(
    p_run public.outbound_call_runs, p_on_startup boolean, p_worker_id text,
    p_settings outbound_heartbeat.settings)
RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE
        WHEN NOT EXISTS (SELECT 1 FROM public.outbound_call_jobs AS j
                          WHERE j.run_id = p_run.id AND j.status IN ('queued', 'in_progress'))
            THEN 'empty'
        WHEN p_on_startup AND p_run.locked_by_worker = p_worker_id
             AND outbound_heartbeat._stale_reason(p_run, p_settings.stale_after, p_settings) IS NOT NULL
            THEN 'on_startup'
        ELSE outbound_heartbeat._stale_reason(p_run, p_settings.stale_after, p_settings)
    END
$$;

-- The arrays of a set-based lease call (heartbeat_leases, finish_runs): one dimension, no NULL,
-- as long as run_ids, epochs not negative; OH400 names the array, before anything is written.
CREATE OR REPLACE FUNCTION outbound_heartbeat._require_lease_arrays(
    p_run_ids bigint[], p_worker_ids text[], p_lease_epochs bigint[])
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_run_ids IS NULL OR pg_catalog.array_ndims(p_run_ids) > 1
       OR pg_catalog.array_position(p_run_ids, NULL) IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'OH400', COLUMN = 'run_ids',
            MESSAGE = 'run_ids must be a one-dimensional array without NULLs';
    END IF;
    IF p_worker_ids IS NULL OR pg_catalog.array_ndims(p_worker_ids) > 1
       OR pg_catalog.array_position(p_worker_ids, NULL) IS NOT NULL
       OR pg_catalog.cardinality(p_worker_ids) <> pg_catalog.cardinality(p_run_ids) THEN
        RAISE EXCEPTION USING ERRCODE = 'OH400', COLUMN = 'worker_ids',
            MESSAGE = 'worker_ids must be a one-dimensional array without NULLs, as long as run_ids';
    END IF;
    IF p_lease_epochs IS NULL OR pg_catalog.array_ndims(p_lease_epochs) > 1
       OR pg_catalog.array_position(p_lease_epochs, NULL) IS NOT NULL
       OR pg_catalog.cardinality(p_lease_epochs) <> pg_catalog.cardinality(p_run_ids)
       OR EXISTS (SELECT 1 FROM pg_catalog.unnest(p_lease_epochs) AS e(lease_epoch)
                   WHERE e.lease_epoch < 0) THEN
        RAISE EXCEPTION USING ERRCODE = 'OH400', COLUMN = 'lease_epochs',
            MESSAGE = 'lease_epochs must be a one-dimensional array of non-negative integers, as long as run_ids';
    END IF;
END
$$;

-- Sends the NOTIFY of one event, unless the caller marked its open transaction as one that
-- must send none (two-phase commit refuses PREPARE TRANSACTION after a NOTIFY): the mark is the
-- transaction's own id in outbound_heartbeat.skip_notify, so a session-wide value does nothing.
CREATE OR REPLACE FUNCTION outbound_heartbeat._notify_event(
    p_event text, p_run_id bigint, p_business_id bigint)
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF COALESCE(pg_catalog.current_setting('outbound_heartbeat.skip_notify', true), '')
       OPERATOR(pg_catalog.=) COALESCE(pg_catalog.pg_current_xact_id_if_assigned()::text, '-') THEN
        RETURN;
    END IF;
    PERFORM pg_catalog.pg_notify('outbound_heartbeat', pg_catalog.jsonb_build_object(
        'event', p_event, 'run_id', p_run_id, 'business_id', p_business_id)::text);
END
$$;

-- Appends one audit row and announces it: NOTIFY for listeners (sent at commit) and a NOTICE
-- with SQLSTATE OH000 whose DETAIL is the JSON payload, so the caller of this very statement
-- (the Python layer, a psql user) learns what its call did.
CREATE OR REPLACE FUNCTION outbound_heartbeat._record_event(
    p_run_id bigint, p_business_id bigint, p_event text, p_worker_id text, p_detail jsonb)
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
SET client_min_messages = notice
AS $$
DECLARE
    v_payload jsonb := pg_catalog.jsonb_build_object(
        'event', p_event, 'run_id', p_run_id, 'business_id', p_business_id,
        'worker_id', p_worker_id) || COALESCE(p_detail, '{}'::jsonb);
BEGIN
    INSERT INTO outbound_heartbeat.run_events (run_id, business_id, event, worker_id, detail)
    VALUES (p_run_id, p_business_id, p_event, p_worker_id, COALESCE(p_detail, '{}'::jsonb));
    PERFORM outbound_heartbeat._notify_event(p_event, p_run_id, p_business_id);
    RAISE NOTICE USING ERRCODE = 'OH000',
        MESSAGE = pg_catalog.format('outbound_heartbeat: run %s %s', p_run_id, p_event),
        DETAIL = v_payload::text;
END
$$;

-- Raises OH423 for a run (or a business's open runs) whose row lock could not be had within
-- lock_timeout, naming the backends that hold it so an operator can end an idle transaction.
CREATE OR REPLACE FUNCTION outbound_heartbeat._raise_run_locked(p_run_id bigint, p_business_id bigint)
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_holders text;
BEGIN
    SELECT pg_catalog.string_agg(DISTINCT pg_catalog.format('pid %s (%s since %s)', a.pid, a.state,
                                 a.xact_start), ', ')
      INTO v_holders
      FROM pg_catalog.pg_locks AS l
      JOIN pg_catalog.pg_stat_activity AS a ON a.pid = l.pid
     WHERE l.locktype = 'transactionid' AND l.granted AND l.mode = 'ExclusiveLock'
       AND l.pid <> pg_catalog.pg_backend_pid()
       AND l.transactionid IN (
            SELECT r.xmax FROM public.outbound_call_runs AS r
             WHERE r.id = p_run_id
                OR (p_run_id IS NULL AND r.business_id = p_business_id
                    AND r.status IN ('pending', 'running')));
    RAISE EXCEPTION USING ERRCODE = 'OH423',
        MESSAGE = pg_catalog.format('%s is locked by another transaction: %s',
            CASE WHEN p_run_id IS NULL THEN pg_catalog.format('an open run of business %s', p_business_id)
                 ELSE pg_catalog.format('run %s', p_run_id) END,
            COALESCE(v_holders, 'holder unknown')),
        HINT = 'Find the session in pg_stat_activity; pg_terminate_backend(pid) ends it.';
END
$$;

-- Raises OH404 for a run id that does not exist.
CREATE OR REPLACE FUNCTION outbound_heartbeat._require_run(p_run_id bigint)
RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM public.outbound_call_runs AS r WHERE r.id = p_run_id) THEN
        RAISE EXCEPTION USING ERRCODE = 'OH404', COLUMN = 'run_id',
            MESSAGE = pg_catalog.format('run %s does not exist', p_run_id);
    END IF;
END
$$;

-- Locks a run for an operator or tenant call: OH404 when absent, OH403 when it belongs to
-- another business (checked before waiting, so a foreign caller never queues on the lock).
CREATE OR REPLACE FUNCTION outbound_heartbeat._lock_run_for_caller(p_run_id bigint, p_business_id bigint)
RETURNS public.outbound_call_runs
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_owner bigint;
    v_run public.outbound_call_runs;
BEGIN
    PERFORM outbound_heartbeat._require_primary('a cancel');
    PERFORM outbound_heartbeat._require_run(p_run_id);
    SELECT r.business_id INTO v_owner FROM public.outbound_call_runs AS r WHERE r.id = p_run_id;
    IF p_business_id IS NOT NULL AND v_owner IS DISTINCT FROM p_business_id THEN
        RAISE EXCEPTION USING ERRCODE = 'OH403', COLUMN = 'business_id',
            MESSAGE = pg_catalog.format('run %s does not belong to business %s', p_run_id, p_business_id);
    END IF;
    SELECT r.* INTO v_run FROM public.outbound_call_runs AS r WHERE r.id = p_run_id FOR UPDATE;
    RETURN v_run;
END
$$;

-- Ends open runs (pending or running) in one set-based pass: terminal status, ended_at, lock
-- cleared, epoch bumped, queued jobs failed with p_reason; in_progress jobs are left alone.
-- Locks the runs itself (callers usually hold them already) and writes one event per run, all
-- in ONE INSERT (the chain trigger still links each row; the events counter is added once),
-- then announces each as _record_event() does: NOTIFY (sent at commit) and NOTICE OH000.
CREATE OR REPLACE FUNCTION outbound_heartbeat._end_runs(
    p_run_ids bigint[], p_status text, p_event text, p_reason text, p_detail jsonb DEFAULT '{}')
RETURNS SETOF outbound_heartbeat.ended_run
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
SET TimeZone = 'UTC'
SET client_min_messages = notice
AS $$
DECLARE
    v_ended outbound_heartbeat.ended_run[];
    v_run outbound_heartbeat.ended_run;
    v_detail jsonb;
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

    INSERT INTO outbound_heartbeat.run_events (run_id, business_id, event, worker_id, detail)
    SELECT e.run_id, e.business_id, p_event, e.worker_id,
           COALESCE(p_detail, '{}'::jsonb) || pg_catalog.jsonb_build_object(
               'previous_status', e.previous_status, 'status', p_status, 'jobs_failed', e.jobs_failed)
      FROM pg_catalog.unnest(v_ended) WITH ORDINALITY AS e
     ORDER BY e.ordinality;

    FOREACH v_run IN ARRAY v_ended LOOP
        v_detail := COALESCE(p_detail, '{}'::jsonb) || pg_catalog.jsonb_build_object(
            'previous_status', v_run.previous_status, 'status', p_status, 'jobs_failed', v_run.jobs_failed);
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

-- Stops the running runs that are stale now (of one business, or one run), each in its own
-- reason group; waits for row locks up to lock_timeout. Returns what it stopped.
CREATE OR REPLACE FUNCTION outbound_heartbeat._stop_stale_runs(
    p_business_id bigint, p_run_id bigint, p_stale_after interval,
    p_settings outbound_heartbeat.settings)
RETURNS SETOF outbound_heartbeat.ended_run
LANGUAGE plpgsql VOLATILE
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

-- Describes runs for callers and views: the row, its open job counts, heartbeat age, stale flag.
-- The counts come from job_counts (a few rows per run), never from counting the run's jobs.
-- PL/pgSQL, not SQL: its plan is cached, where a SQL function with SET clauses is planned on
-- every call (most of a poll's cost).
CREATE OR REPLACE FUNCTION outbound_heartbeat._describe_runs(p_run_ids bigint[], p_stale_after interval)
RETURNS SETOF outbound_heartbeat.run_info
LANGUAGE plpgsql STABLE
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
