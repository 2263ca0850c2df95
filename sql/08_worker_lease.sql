-- The worker's side of the API. A lease is (run_id, worker_id, lease_epoch); every write here
-- is fenced on it, so a worker that was declared dead, cancelled or taken over changes nothing.

-- ALTER FUNCTION ... OWNER TO needs CREATE on the schema for the new owner: held only
-- inside this file's transaction.
GRANT CREATE ON SCHEMA outbound_heartbeat TO outbound_heartbeat_owner;

-- Checks the (run_id, worker_id, lease_epoch) triple every fenced worker call takes.
CREATE OR REPLACE FUNCTION outbound_heartbeat._require_lease(p_run_id bigint, p_worker_id text, p_lease_epoch bigint)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
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
ALTER FUNCTION outbound_heartbeat._require_lease(bigint, text, bigint) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._require_lease(bigint, text, bigint) FROM PUBLIC;

-- True when (worker_id, lease_epoch) still holds the running run and its heartbeat is fresh:
-- the fence every worker write is conditioned on.
CREATE OR REPLACE FUNCTION outbound_heartbeat._holds_lease(
    p_run public.outbound_call_runs, p_worker_id text, p_lease_epoch bigint,
    p_settings outbound_heartbeat.settings)
RETURNS boolean
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN p_run.status = 'running'
       AND p_run.locked_by_worker IS NOT DISTINCT FROM p_worker_id
       AND p_run.lease_epoch = p_lease_epoch
       AND outbound_heartbeat._stale_reason(p_run, p_settings.stale_after, p_settings) IS NULL;
END
$$;
ALTER FUNCTION outbound_heartbeat._holds_lease(public.outbound_call_runs, text, bigint, outbound_heartbeat.settings) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._holds_lease(public.outbound_call_runs, text, bigint, outbound_heartbeat.settings) FROM PUBLIC;

-- True when the run was completed under this very lease (the empty-run rule or its own
-- finish_run() whose answer was lost): success, not a lost lease. The epoch is bumped exactly
-- once by a terminal transition, so epoch + 1 and the last event's worker prove it.
CREATE OR REPLACE FUNCTION outbound_heartbeat._completed_under_lease(
    p_run_id bigint, p_worker_id text, p_lease_epoch bigint)
RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER
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
ALTER FUNCTION outbound_heartbeat._completed_under_lease(bigint, text, bigint) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._completed_under_lease(bigint, text, bigint) FROM PUBLIC;

-- The arrays of a set-based lease call (heartbeat_leases, finish_runs): one dimension, no NULL,
-- as long as run_ids, epochs not negative; OH400 names the array, before anything is written.
CREATE OR REPLACE FUNCTION outbound_heartbeat._require_lease_arrays(
    p_run_ids bigint[], p_worker_ids text[], p_lease_epochs bigint[])
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
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
ALTER FUNCTION outbound_heartbeat._require_lease_arrays(bigint[], text[], bigint[]) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._require_lease_arrays(bigint[], text[], bigint[]) FROM PUBLIC;

-- BEFORE UPDATE OF lease_epoch on the runs table: an epoch never goes down, whoever writes it
-- (a fenced-out worker's epoch must never become valid again).
CREATE OR REPLACE FUNCTION outbound_heartbeat._refuse_lower_epoch()
RETURNS trigger
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = 'OH400', COLUMN = 'lease_epoch',
        MESSAGE = pg_catalog.format('lease_epoch of run %s may not go down (%s -> %s)',
                                    OLD.id, OLD.lease_epoch, NEW.lease_epoch);
END
$$;
ALTER FUNCTION outbound_heartbeat._refuse_lower_epoch() OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._refuse_lower_epoch() FROM PUBLIC;

DO $epoch_trigger$
BEGIN
    -- Fires only when an UPDATE names lease_epoch and lowers it: heartbeats never pay for it.
    -- The operator is qualified: the stored condition never picks one from another schema.
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger AS t
                    WHERE t.tgrelid = 'public.outbound_call_runs'::regclass
                      AND t.tgname = 'outbound_heartbeat_epoch_never_down') THEN
        CREATE TRIGGER outbound_heartbeat_epoch_never_down
            BEFORE UPDATE OF lease_epoch ON public.outbound_call_runs
            FOR EACH ROW WHEN (NEW.lease_epoch OPERATOR(pg_catalog.<) OLD.lease_epoch)
            EXECUTE FUNCTION outbound_heartbeat._refuse_lower_epoch();
    END IF;
END
$epoch_trigger$;

-- What claim_run() hands a worker.
DO $lease$
BEGIN
    IF pg_catalog.to_regtype('outbound_heartbeat.lease') IS NULL THEN
        CREATE TYPE outbound_heartbeat.lease AS (
            run_id bigint, business_id bigint, worker_id text, lease_epoch bigint,
            resumed boolean, stale_after interval);
    END IF;
END
$lease$;

-- A worker's lease: its own stale running run first (crash resume), else the given or oldest
-- pending run; the epoch is bumped. A worker name is not an incarnation: a run another live
-- process of that name heartbeats is never resumed. Rows locked by others are skipped.
CREATE OR REPLACE FUNCTION outbound_heartbeat.claim_run(worker_id text, run_id bigint DEFAULT NULL)
RETURNS SETOF outbound_heartbeat.lease
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET TimeZone = 'UTC'
SET client_min_messages = notice
AS $$
DECLARE
    v_settings outbound_heartbeat.settings := outbound_heartbeat._settings();
    v_run_id bigint;
    v_resumed boolean;
    v_lease outbound_heartbeat.lease;
    v_orphaned bigint;
BEGIN
    -- Refuses (OH428) to run code on the tables a role outside the trusted set wrote (05_table_guard.sql).
    PERFORM outbound_heartbeat._require_trusted_tables();
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
       SET status = 'running', locked_by_worker = claim_run.worker_id,
           lock_ts = pg_catalog.statement_timestamp(),
           last_heartbeat_at = pg_catalog.statement_timestamp(), lease_epoch = r.lease_epoch + 1,
           started_at = COALESCE(r.started_at, pg_catalog.statement_timestamp()),
           updated_at = pg_catalog.statement_timestamp()
     WHERE r.id = v_run_id
    RETURNING r.id::bigint, r.business_id::bigint, claim_run.worker_id, r.lease_epoch::bigint,
              v_resumed, v_settings.stale_after
      INTO v_lease;
    -- calls (15_calls.sql): a call still in progress was handed out under an earlier epoch, by
    -- an incarnation that is gone: orphaned (never handed out again), settled by its callback
    -- or the timeout, and the run completes without it.
    SELECT COALESCE(pg_catalog.sum(o.calls_orphaned), 0)::bigint INTO v_orphaned
      FROM outbound_heartbeat._orphan_calls(
            ARRAY[v_lease.run_id],
            pg_catalog.format('lease resumed by worker %s under epoch %s: the call was handed out by a previous incarnation',
                              claim_run.worker_id, v_lease.lease_epoch)) AS o;
    PERFORM outbound_heartbeat._record_event(
        v_lease.run_id, v_lease.business_id,
        CASE WHEN v_resumed THEN 'resumed' ELSE 'claimed' END, claim_run.worker_id,
        pg_catalog.jsonb_build_object('lease_epoch', v_lease.lease_epoch)
        || CASE WHEN v_orphaned > 0 THEN pg_catalog.jsonb_build_object('calls_orphaned', v_orphaned)
                ELSE '{}'::jsonb END);
    RETURN NEXT v_lease;
END
$$;
ALTER FUNCTION outbound_heartbeat.claim_run(text, bigint) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat.claim_run(text, bigint) FROM PUBLIC;
SELECT outbound_heartbeat._offer_to('app', 'outbound_heartbeat.claim_run(text, bigint)');
COMMENT ON FUNCTION outbound_heartbeat.claim_run(text, bigint) IS
    'Claims a run for a worker (its own dead incarnation''s run, the given run or the oldest pending one) and returns the lease; no row when none is free.';

-- The whole liveness rule behind heartbeat(): validates the arguments, waits on the row lock
-- at most lock_timeout (OH423), refreshes a lease that holds, stops one found stale: 'lost';
-- 'completed' when the run was completed under this lease (nothing left: the worker succeeded).
CREATE OR REPLACE FUNCTION outbound_heartbeat._heartbeat_slow(p_run_id bigint, p_worker_id text, p_lease_epoch bigint)
RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET TimeZone = 'UTC'
SET client_min_messages = notice
AS $$
DECLARE
    v_settings outbound_heartbeat.settings;
    v_cancel boolean;
    v_caller_lock_timeout text;
BEGIN
    -- Both tables: heartbeat()'s quick test vouched only for the runs table, and a lease found
    -- stale here is stopped, its queued jobs failed.
    PERFORM outbound_heartbeat._require_trusted_tables();
    PERFORM outbound_heartbeat._require_lease(p_run_id, p_worker_id, p_lease_epoch);
    PERFORM outbound_heartbeat._require_primary('heartbeat');
    v_settings := outbound_heartbeat._settings();
    v_caller_lock_timeout := outbound_heartbeat._apply_lock_timeout(v_settings);
    UPDATE public.outbound_call_runs AS r
       SET last_heartbeat_at = GREATEST(LEAST(r.last_heartbeat_at, pg_catalog.clock_timestamp()), pg_catalog.statement_timestamp())
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
ALTER FUNCTION outbound_heartbeat._heartbeat_slow(bigint, text, bigint) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._heartbeat_slow(bigint, text, bigint) FROM PUBLIC;

-- Proves the lease holder is alive: 'ok', 'cancel_requested', 'lost' (an answer, not an
-- error) or 'completed' (the run was completed under this lease, e.g. by the empty-run rule:
-- success). A lease found stale is stopped on the spot, exactly as any other observer would.
-- It is the one call every worker makes every few seconds, so its common case is one UPDATE
-- of a fresh lease whose row nobody else holds (SKIP LOCKED: it never waits), with no
-- exception block and no helper call; everything else (bad arguments, a locked row, an old
-- heartbeat, a lost lease, a hot standby: OH503 rather than 25006) goes to _heartbeat_slow().
-- Its clock is the statement's (statement_timestamp()), not the transaction's start, and a
-- beat never moves last_heartbeat_at back (GREATEST): a call inside the app's long transaction
-- neither overwrites a newer beat of the lease's own connection nor revives a dead lease. A value
-- ahead of the server's clock (written before the clock was stepped back) is not kept (LEAST):
-- else the lease's death would be seen only once the clock caught up with it.
-- The table guard (05_table_guard.sql) is checked when its UPDATE is planned: see the body.
-- Its settings: search_path pinned, as every function running with the owner's rights (it
-- also qualifies every name and operator). TimeZone is not pinned (a pin is a GUC round per
-- call): the staleness bound is computed in UTC explicitly, (now in UTC - stale_after) read
-- back as UTC, exactly the rule _stale_reason() applies under its pinned UTC, and comparing or
-- taking GREATEST of timestamptz values does not depend on the zone. (A naive timestamp column
-- needs TimeZone for its casts: then it is pinned, see below.)
CREATE OR REPLACE FUNCTION outbound_heartbeat.heartbeat(run_id bigint, worker_id text, lease_epoch bigint)
RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_cancel pg_catalog.bool;
BEGIN
    IF pg_catalog.pg_is_in_recovery() THEN
        RETURN outbound_heartbeat._heartbeat_slow(heartbeat.run_id, heartbeat.worker_id, heartbeat.lease_epoch);
    END IF;
    UPDATE public.outbound_call_runs AS r
       SET last_heartbeat_at = GREATEST(LEAST(r.last_heartbeat_at, pg_catalog.clock_timestamp()), pg_catalog.statement_timestamp())
      FROM (SELECT l.ctid FROM public.outbound_call_runs AS l
             WHERE l.id OPERATOR(pg_catalog.=) heartbeat.run_id
               FOR NO KEY UPDATE SKIP LOCKED) AS held
     WHERE r.ctid OPERATOR(pg_catalog.=) held.ctid
       -- The table guard (05_table_guard.sql), checked when this UPDATE is planned, not on each call:
       -- _vetted_owner_when_planned() is IMMUTABLE with a constant argument, so the planner folds it
       -- once per plan into the table's owner (the quick test vouched, nothing to probe per call: the
       -- plan keeps a one-time test of that owner's membership) or NULL (the plan keeps the quick test,
       -- _unvetted_tables, on each call). Why a cached plan is enough: code attached to the table (a
       -- trigger, rule, policy, CHECK, default, generated column, index, an owner or a column type
       -- changed) is a catalog change that invalidates the table's relcache entry, hence every cached
       -- plan that reads the table; the next beat takes the table's lock (after any such change commits:
       -- they lock the table too), processes the invalidation and plans again. The fold reads the
       -- catalogs through _vetted_owner(), VOLATILE: with a snapshot taken then, after the lock, not the
       -- calling statement's, which may be older (it never vouches outside READ COMMITTED). What changes
       -- with no invalidation of the table is what the accepted code calls (a function's body or owner,
       -- a domain's CHECK): such states list it, and are probed on each call. A plan that is not cached
       -- (plan_cache_mode = force_custom_plan) folds on each call: slower, never less safe.
       -- False sends the beat to _heartbeat_slow(), whose full check refuses (OH428) or accepts.
       AND CASE WHEN outbound_heartbeat._vetted_owner_when_planned('public.outbound_call_runs'::pg_catalog.regclass) IS NULL
                THEN NOT EXISTS (SELECT 1 FROM outbound_heartbeat._unvetted_tables AS u
                                  WHERE u.table_oid OPERATOR(pg_catalog.=) 'public.outbound_call_runs'::pg_catalog.regclass)
                ELSE pg_catalog.pg_has_role(
                         outbound_heartbeat._vetted_owner_when_planned('public.outbound_call_runs'::pg_catalog.regclass),
                         'outbound_heartbeat_owner'::pg_catalog.name, 'MEMBER') END
       AND r.status OPERATOR(pg_catalog.=) 'running'
       AND r.locked_by_worker OPERATOR(pg_catalog.=) heartbeat.worker_id
       AND r.lease_epoch OPERATOR(pg_catalog.=) heartbeat.lease_epoch
       AND r.last_heartbeat_at OPERATOR(pg_catalog.>=)
           ((pg_catalog.statement_timestamp() AT TIME ZONE 'UTC')
            OPERATOR(pg_catalog.-) (SELECT s.stale_after FROM outbound_heartbeat.settings AS s)) AT TIME ZONE 'UTC'
    RETURNING r.cancel_requested_at IS NOT NULL INTO v_cancel;
    IF FOUND THEN
        RETURN CASE WHEN v_cancel THEN 'cancel_requested' ELSE 'ok' END;
    END IF;
    RETURN outbound_heartbeat._heartbeat_slow(heartbeat.run_id, heartbeat.worker_id, heartbeat.lease_epoch);
END
$$;
ALTER FUNCTION outbound_heartbeat.heartbeat(bigint, text, bigint) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat.heartbeat(bigint, text, bigint) FROM PUBLIC;
SELECT outbound_heartbeat._offer_to('app', 'outbound_heartbeat.heartbeat(bigint, text, bigint)');
COMMENT ON FUNCTION outbound_heartbeat.heartbeat(bigint, text, bigint) IS
    'Proves the lease holder is alive: ''ok'', ''cancel_requested'' or ''lost''; a stale lease is stopped on the spot.';

-- The whole of heartbeat_leases(), for a call its lean path did not answer whole (a lease that
-- is not fresh or whose row is locked, bad arrays, a hot standby): each lease is answered
-- exactly as heartbeat() answers it alone, by the same fenced UPDATE for the fresh ones and
-- _heartbeat_slow() for the rest (a lease the lean path beat is beaten again: same answer).
-- 'locked' (instead of heartbeat()'s OH423) when its row stayed locked: the whole call waits
-- on row locks at most 100 ms (or lock_timeout if smaller), well before deadlock_timeout, since
-- it holds the other leases' rows meanwhile; the caller beats that lease again shortly.
CREATE OR REPLACE FUNCTION outbound_heartbeat._heartbeat_leases(
    run_ids bigint[], worker_ids text[], lease_epochs bigint[])
RETURNS TABLE (run_id bigint, status text)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
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
    -- Refuses (OH428) to run code on the tables a role outside the trusted set wrote (03_table_guard.sql).
    PERFORM outbound_heartbeat._require_trusted_tables();
    -- Every argument checked before anything is written. A worker id's own rules are checked
    -- below, only for a lease the fast path did not answer: one that did equals a lease
    -- holder's name, which claim_run() checked (and an error undoes the whole call).
    PERFORM outbound_heartbeat._require_lease_arrays(run_ids, worker_ids, lease_epochs);

    -- The fast path, for all fresh leases at once: heartbeat()'s fenced UPDATE, SKIP LOCKED.
    WITH beat AS (
        UPDATE public.outbound_call_runs AS r
           SET last_heartbeat_at = GREATEST(LEAST(r.last_heartbeat_at, pg_catalog.clock_timestamp()), pg_catalog.statement_timestamp())
          FROM (SELECT l.ctid, a.worker_id, a.lease_epoch
                  FROM ROWS FROM (pg_catalog.unnest(run_ids), pg_catalog.unnest(worker_ids),
                                 pg_catalog.unnest(lease_epochs)) AS a(run_id, worker_id, lease_epoch)
                  JOIN public.outbound_call_runs AS l ON l.id = a.run_id
                   FOR NO KEY UPDATE OF l SKIP LOCKED) AS held
         WHERE r.ctid = held.ctid
           AND r.status = 'running'
           AND r.locked_by_worker = held.worker_id
           AND r.lease_epoch = held.lease_epoch
           AND r.last_heartbeat_at >= pg_catalog.statement_timestamp() - v_settings.stale_after
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
        _heartbeat_leases.run_id := v_lease.run_id;
        _heartbeat_leases.status := v_lease.status;
        IF v_lease.status IS NULL AND pg_catalog.clock_timestamp() >= v_wait_until THEN
            -- The budget is spent: no more waiting at all (SKIP LOCKED), so this call never
            -- sits in a lock queue while holding rows a concurrent release waits for.
            PERFORM 1 FROM public.outbound_call_runs AS l
             WHERE l.id = v_lease.run_id FOR UPDATE SKIP LOCKED;
            IF NOT FOUND AND EXISTS (SELECT 1 FROM public.outbound_call_runs AS l
                                      WHERE l.id = v_lease.run_id) THEN
                _heartbeat_leases.status := 'locked';
            END IF;
        END IF;
        IF _heartbeat_leases.status IS NULL THEN
            IF NOT outbound_heartbeat._is_worker_id(v_lease.worker_id) THEN
                RAISE EXCEPTION USING ERRCODE = 'OH400', COLUMN = 'worker_ids',
                    MESSAGE = 'every worker_ids element must be a non-empty string of at most 200 characters';
            END IF;
            v_left_ms := GREATEST(1, pg_catalog.ceil(EXTRACT(epoch FROM
                             v_wait_until - pg_catalog.clock_timestamp()) * 1000)::bigint);
            -- Stricter wins inside _heartbeat_slow(): this budget bounds its wait.
            PERFORM pg_catalog.set_config('lock_timeout', v_left_ms::text, true);
            BEGIN
                _heartbeat_leases.status := outbound_heartbeat._heartbeat_slow(
                    v_lease.run_id, v_lease.worker_id, v_lease.lease_epoch);
            EXCEPTION WHEN SQLSTATE 'OH423' THEN
                _heartbeat_leases.status := 'locked';
            END;
        END IF;
        RETURN NEXT;
    END LOOP;
    PERFORM outbound_heartbeat._restore_lock_timeout(v_caller_lock_timeout);
END
$$;
ALTER FUNCTION outbound_heartbeat._heartbeat_leases(bigint[], text[], bigint[]) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._heartbeat_leases(bigint[], text[], bigint[]) FROM PUBLIC;

-- heartbeat() for every lease a process holds, in one statement per interval (the process's
-- shared heartbeat connection calls it): one row per lease, in order, with heartbeat()'s answer.
-- 'locked' (instead of heartbeat()'s OH423) when its row stayed locked: the call waits on row
-- locks at most 100 ms (or lock_timeout if smaller), well before deadlock_timeout, since it
-- holds the other leases' rows meanwhile; the caller beats that lease again shortly.
-- Its common case, every lease fresh and its row free, is heartbeat()'s fenced UPDATE (SKIP
-- LOCKED) for all of them in one statement and nothing else: no helper, no per-lease loop, no
-- planning. Anything else is answered by _heartbeat_leases(), whole. Answering every lease
-- here proves the arrays valid (each element matched a lease holder's row, whose worker id
-- claim_run() checked and whose epoch is never negative; one dimension is checked).
-- Its settings: search_path pinned; TimeZone needs no pin, the staleness bound is computed in
-- UTC explicitly as in heartbeat(). Its plan: each lease's row found by its primary key, the
-- row updated reached by its ctid, one lease after the other, whatever the statistics say: a
-- table analyzed while nearly empty (a new install, a benchmark) otherwise gets a plan that
-- scans every running run for every lease (x7 at 1,000 leases, measured), and a custom plan
-- (the default for a function's first calls) is no better and is planned on every call. So the
-- scans and joins that could compare every lease with every run are off (the settings row is
-- still read by a sequential scan, the only way left), and the one generic plan serves any
-- number of leases without planning again.
CREATE OR REPLACE FUNCTION outbound_heartbeat.heartbeat_leases(
    run_ids bigint[], worker_ids text[], lease_epochs bigint[])
RETURNS TABLE (run_id bigint, status text)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
SET enable_bitmapscan = off
SET enable_hashjoin = off
SET enable_mergejoin = off
SET enable_material = off
-- (Disabled plans add a huge cost: without this, the statement would be JIT-compiled, 0.5 s.)
SET jit = off
AS $$
DECLARE
    v_count pg_catalog.int4 := pg_catalog.cardinality(heartbeat_leases.run_ids);
    v_status pg_catalog.text[];
BEGIN
    IF pg_catalog.array_ndims(heartbeat_leases.run_ids) OPERATOR(pg_catalog.=) 1
       AND pg_catalog.array_ndims(heartbeat_leases.worker_ids) OPERATOR(pg_catalog.=) 1
       AND pg_catalog.array_ndims(heartbeat_leases.lease_epochs) OPERATOR(pg_catalog.=) 1
       AND pg_catalog.cardinality(heartbeat_leases.worker_ids) OPERATOR(pg_catalog.=) v_count
       AND pg_catalog.cardinality(heartbeat_leases.lease_epochs) OPERATOR(pg_catalog.=) v_count
       AND NOT pg_catalog.pg_is_in_recovery() THEN
        IF v_count OPERATOR(pg_catalog.<=) 200 THEN
            -- Each lease's row is found by its primary key and locked on its own (LATERAL),
            -- and the row updated is the one locked (ctid), on the one generic plan.
            WITH beat AS (
                UPDATE public.outbound_call_runs AS r
                   SET last_heartbeat_at = GREATEST(LEAST(r.last_heartbeat_at, pg_catalog.clock_timestamp()), pg_catalog.statement_timestamp())
                  FROM ROWS FROM (pg_catalog.unnest(heartbeat_leases.run_ids),
                                  pg_catalog.unnest(heartbeat_leases.worker_ids),
                                  pg_catalog.unnest(heartbeat_leases.lease_epochs)) WITH ORDINALITY
                       AS a(run_id, worker_id, lease_epoch, n)
                 CROSS JOIN LATERAL (
                       SELECT l.ctid FROM public.outbound_call_runs AS l
                        WHERE l.id OPERATOR(pg_catalog.=) a.run_id
                          AND l.status OPERATOR(pg_catalog.=) 'running'
                          AND l.locked_by_worker OPERATOR(pg_catalog.=) a.worker_id
                          AND l.lease_epoch OPERATOR(pg_catalog.=) a.lease_epoch
                          AND l.last_heartbeat_at OPERATOR(pg_catalog.>=)
                              ((pg_catalog.statement_timestamp() AT TIME ZONE 'UTC')
                               OPERATOR(pg_catalog.-) (SELECT s.stale_after FROM outbound_heartbeat.settings AS s))
                              AT TIME ZONE 'UTC'
                          FOR NO KEY UPDATE SKIP LOCKED) AS held
                 WHERE r.ctid OPERATOR(pg_catalog.=) held.ctid
                   -- The table guard, folded into the one generic plan (see heartbeat()).
                   AND CASE WHEN outbound_heartbeat._vetted_owner_when_planned('public.outbound_call_runs'::pg_catalog.regclass) IS NULL
                            THEN NOT EXISTS (SELECT 1 FROM outbound_heartbeat._unvetted_tables AS u
                                              WHERE u.table_oid OPERATOR(pg_catalog.=) 'public.outbound_call_runs'::pg_catalog.regclass)
                            ELSE pg_catalog.pg_has_role(
                                     outbound_heartbeat._vetted_owner_when_planned('public.outbound_call_runs'::pg_catalog.regclass),
                                     'outbound_heartbeat_owner'::pg_catalog.name, 'MEMBER') END
                RETURNING a.n,
                          CASE WHEN r.cancel_requested_at IS NULL THEN 'ok' ELSE 'cancel_requested' END AS answer)
            SELECT pg_catalog.array_agg(b.answer ORDER BY b.n) INTO v_status FROM beat AS b;
        ELSE
            -- Many leases: one pass over the running runs (the partial index) beats a probe
            -- per lease in a primary key that non-HOT updates have bloated (x2 at 1,000,
            -- measured). A plan made for these arrays and this table (EXECUTE: planned on
            -- every call, a cost shared by hundreds of leases) with the planner's joins back.
            -- Planned on every call, it takes the table guard's quick test instead (the full
            -- check, OH428, only when it fails).
            IF EXISTS (SELECT 1 FROM outbound_heartbeat._unvetted_tables AS u
                        WHERE u.table_oid OPERATOR(pg_catalog.=) 'public.outbound_call_runs'::pg_catalog.regclass) THEN
                PERFORM outbound_heartbeat._require_trusted_tables();
            END IF;
            PERFORM pg_catalog.set_config('enable_hashjoin', 'on', true),
                    pg_catalog.set_config('enable_bitmapscan', 'on', true);
            EXECUTE $sql$
                WITH beat AS (
                    UPDATE public.outbound_call_runs AS r
                       SET last_heartbeat_at = GREATEST(LEAST(r.last_heartbeat_at, pg_catalog.clock_timestamp()), pg_catalog.statement_timestamp())
                      FROM (SELECT l.ctid, a.n
                              FROM ROWS FROM (pg_catalog.unnest($1), pg_catalog.unnest($2), pg_catalog.unnest($3))
                                   WITH ORDINALITY AS a(run_id, worker_id, lease_epoch, n)
                              JOIN public.outbound_call_runs AS l ON l.id OPERATOR(pg_catalog.=) a.run_id
                             WHERE l.status OPERATOR(pg_catalog.=) 'running'
                               AND l.locked_by_worker OPERATOR(pg_catalog.=) a.worker_id
                               AND l.lease_epoch OPERATOR(pg_catalog.=) a.lease_epoch
                               AND l.last_heartbeat_at OPERATOR(pg_catalog.>=)
                                   ((pg_catalog.statement_timestamp() AT TIME ZONE 'UTC')
                                    OPERATOR(pg_catalog.-) (SELECT s.stale_after FROM outbound_heartbeat.settings AS s))
                                   AT TIME ZONE 'UTC'
                               FOR NO KEY UPDATE OF l SKIP LOCKED) AS held
                     WHERE r.ctid OPERATOR(pg_catalog.=) held.ctid
                    RETURNING held.n,
                              CASE WHEN r.cancel_requested_at IS NULL THEN 'ok' ELSE 'cancel_requested' END AS answer)
                SELECT pg_catalog.array_agg(b.answer ORDER BY b.n) FROM beat AS b
            $sql$ INTO v_status USING heartbeat_leases.run_ids, heartbeat_leases.worker_ids,
                                      heartbeat_leases.lease_epochs;
        END IF;
        -- One updated row per answered lease: as many answers as leases is every lease, once.
        IF pg_catalog.cardinality(v_status) OPERATOR(pg_catalog.=) v_count THEN
            RETURN QUERY
                SELECT x.run_id, x.answer
                  FROM ROWS FROM (pg_catalog.unnest(heartbeat_leases.run_ids), pg_catalog.unnest(v_status))
                       WITH ORDINALITY AS x(run_id, answer, n)
                 ORDER BY x.n;
            RETURN;
        END IF;
    END IF;
    RETURN QUERY
        SELECT h.run_id, h.status
          FROM outbound_heartbeat._heartbeat_leases(heartbeat_leases.run_ids, heartbeat_leases.worker_ids,
                                                    heartbeat_leases.lease_epochs) AS h;
END
$$;
ALTER FUNCTION outbound_heartbeat.heartbeat_leases(bigint[], text[], bigint[]) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat.heartbeat_leases(bigint[], text[], bigint[]) FROM PUBLIC;
SELECT outbound_heartbeat._offer_to('app', 'outbound_heartbeat.heartbeat_leases(bigint[], text[], bigint[])');
COMMENT ON FUNCTION outbound_heartbeat.heartbeat_leases(bigint[], text[], bigint[]) IS
    'heartbeat() for many leases in one statement (a process''s shared heartbeat connection): one row per lease, in order, with heartbeat()''s answer, or ''locked'' when its row stayed locked.';

-- A naive timestamp heartbeat column (an app's own "migration 114") holds UTC, so for it alone
-- the lean beats pin TimeZone (their casts between timestamp and timestamptz follow it); with
-- the library's timestamptz column they need no time zone setting at all (see heartbeat()).
DO $naive_clock$
BEGIN
    IF (SELECT pg_catalog.format_type(a.atttypid, a.atttypmod) = 'timestamp without time zone'
          FROM pg_catalog.pg_attribute AS a
         WHERE a.attrelid = 'public.outbound_call_runs'::pg_catalog.regclass
           AND a.attname = 'last_heartbeat_at' AND NOT a.attisdropped) THEN
        ALTER FUNCTION outbound_heartbeat.heartbeat(bigint, text, bigint) SET TimeZone = 'UTC';
        ALTER FUNCTION outbound_heartbeat.heartbeat_leases(bigint[], text[], bigint[]) SET TimeZone = 'UTC';
    END IF;
END
$naive_clock$;

-- request_id is new (a retry key): the old three-argument signature would make calls ambiguous.
DROP FUNCTION IF EXISTS outbound_heartbeat.next_job(bigint, text, bigint);

-- A job as next_job() hands it out, with its call's key (15_calls.sql; added to older installs).
DO $job$
BEGIN
    IF pg_catalog.to_regtype('outbound_heartbeat.job') IS NULL THEN
        CREATE TYPE outbound_heartbeat.job AS (
            id bigint, run_id bigint, business_id bigint, status text, payload jsonb,
            error_message text, created_at timestamptz, updated_at timestamptz, call_key text);
    ELSIF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute AS a
                       WHERE a.attrelid = (SELECT t.typrelid FROM pg_catalog.pg_type AS t
                                            WHERE t.oid = 'outbound_heartbeat.job'::pg_catalog.regtype)
                         AND a.attname = 'call_key' AND NOT a.attisdropped) THEN
        ALTER TYPE outbound_heartbeat.job ADD ATTRIBUTE call_key text;
    END IF;
END
$job$;

-- Hands the lease holder its next queued job, now in_progress (also a heartbeat); no row when
-- none is left, a cancel was requested or the run was completed under this lease. A retry with
-- the same request_id (after a lost answer) returns the job the first attempt took, if still
-- in progress. OH409 when the lease is gone, OH404 for no such run.
CREATE OR REPLACE FUNCTION outbound_heartbeat.next_job(
    run_id bigint, worker_id text, lease_epoch bigint, request_id text DEFAULT NULL)
RETURNS SETOF outbound_heartbeat.job
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
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
    -- Refuses (OH428) to run code on the tables a role outside the trusted set wrote (03_table_guard.sql).
    PERFORM outbound_heartbeat._require_trusted_tables();
    PERFORM outbound_heartbeat._require_lease(next_job.run_id, next_job.worker_id, next_job.lease_epoch);
    PERFORM outbound_heartbeat._require(
        next_job.request_id IS NULL
            OR (pg_catalog.length(next_job.request_id) BETWEEN 1 AND 200
                AND NOT outbound_heartbeat._is_blank(next_job.request_id)),
        'request_id', 'request_id must be NULL or a non-blank string of at most 200 characters');
    v_caller_lock_timeout := outbound_heartbeat._apply_lock_timeout(v_settings);
    UPDATE public.outbound_call_runs AS r
       SET last_heartbeat_at = GREATEST(LEAST(r.last_heartbeat_at, pg_catalog.clock_timestamp()), pg_catalog.statement_timestamp())
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
               j.created_at::timestamptz, j.updated_at::timestamptz,
               j.call_key::text  -- calls (15_calls.sql): the same attempt, the same key
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
           lease_epoch = next_job.lease_epoch, lease_request_id = next_job.request_id,
           -- calls (15_calls.sql): each hand-out is a new attempt with a new key, even a job
           -- the app re-queued under the same lease; an earlier attempt's marks are cleared.
           call_attempt = COALESCE(j.call_attempt, 0) + 1,
           call_key = outbound_heartbeat._call_key(j.id, next_job.lease_epoch, COALESCE(j.call_attempt, 0) + 1),
           orphaned_at = NULL, orphan_reason = NULL, call_outcome = NULL, call_settled_at = NULL
     WHERE j.id = (SELECT q.id FROM public.outbound_call_jobs AS q
                    WHERE q.run_id = next_job.run_id AND q.status = 'queued'
                    ORDER BY q.id
                    LIMIT 1
                      FOR UPDATE SKIP LOCKED)
    RETURNING j.id::bigint, j.run_id::bigint, COALESCE(j.business_id, v_business_id)::bigint,
              j.status::text, j.payload::jsonb, j.error_message::text,
              j.created_at::timestamptz, j.updated_at::timestamptz, j.call_key::text;
    PERFORM outbound_heartbeat._restore_lock_timeout(v_caller_lock_timeout);
EXCEPTION WHEN lock_not_available THEN
    PERFORM outbound_heartbeat._raise_run_locked(next_job.run_id, NULL);
WHEN numeric_value_out_of_range THEN
    -- Only a row written around the API (the app is granted no call column) gets here.
    RAISE EXCEPTION USING ERRCODE = 'numeric_value_out_of_range', COLUMN = 'call_attempt',
        MESSAGE = pg_catalog.format(
            'run %s: a queued job (%s) has call_attempt at bigint''s maximum, so next_job() cannot number its next attempt',
            next_job.run_id,
            (SELECT pg_catalog.string_agg(q.id::text, ', ' ORDER BY q.id) FROM public.outbound_call_jobs AS q
              WHERE q.run_id = next_job.run_id AND q.status = 'queued'
                AND q.call_attempt >= 9223372036854775807)),
        HINT = 'Set that job''s call_attempt to a smaller number (as the tables'' owner), or fail it.';
END
$$;
ALTER FUNCTION outbound_heartbeat.next_job(bigint, text, bigint, text) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat.next_job(bigint, text, bigint, text) FROM PUBLIC;
SELECT outbound_heartbeat._offer_to('app', 'outbound_heartbeat.next_job(bigint, text, bigint, text)');
COMMENT ON FUNCTION outbound_heartbeat.next_job(bigint, text, bigint, text) IS
    'Hands the lease holder its next queued job (now in_progress); no row when done or cancelled; OH409 when the lease is lost.';

-- finish_job()'s answer.
DO $job_outcome$
BEGIN
    IF pg_catalog.to_regtype('outbound_heartbeat.job_outcome') IS NULL THEN
        CREATE TYPE outbound_heartbeat.job_outcome AS (
            job_id bigint, run_id bigint, status text, outcome text);
    END IF;
END
$job_outcome$;

-- call_key is new (the attempt being finished): the old five-argument signature would make
-- calls ambiguous.
DROP FUNCTION IF EXISTS outbound_heartbeat.finish_job(bigint, text, bigint, text, text);

-- Records a job's final status for the lease holder, of call_key's attempt: 'finished',
-- 'already_finished' (a retry, also after the lease ended), 'already_settled' (settled otherwise),
-- or, writing nothing, 'superseded', 'orphaned' and 'lease_lost' (docs/calls.md has the table).
CREATE OR REPLACE FUNCTION outbound_heartbeat.finish_job(
    job_id bigint, worker_id text, lease_epoch bigint, status text, error text DEFAULT NULL,
    call_key text DEFAULT NULL)
RETURNS outbound_heartbeat.job_outcome
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET TimeZone = 'UTC'
SET client_min_messages = notice
AS $$
DECLARE
    v_settings outbound_heartbeat.settings := outbound_heartbeat._settings();
    v_key record;
    v_run_id bigint;
    v_job_status text;
    v_job_epoch bigint;
    v_job record;
    v_business_id bigint;
    v_caller_lock_timeout text;
BEGIN
    -- Refuses (OH428) to run code on the tables a role outside the trusted set wrote (05_table_guard.sql).
    PERFORM outbound_heartbeat._require_trusted_tables();
    PERFORM outbound_heartbeat._require(finish_job.job_id IS NOT NULL, 'job_id', 'job_id must not be NULL');
    PERFORM outbound_heartbeat._require_worker_id(finish_job.worker_id);
    PERFORM outbound_heartbeat._require(finish_job.lease_epoch >= 0, 'lease_epoch',
                                        'lease_epoch must be a non-negative integer');
    PERFORM outbound_heartbeat._require(finish_job.status IN ('completed', 'failed'), 'status',
                                        'status must be ''completed'' or ''failed''');
    -- calls (15_calls.sql): a key is checked as resolve_call() checks it (OH400 not a key, OH404
    -- unknown or forged), before anything about the job is answered; it must be this job's.
    IF finish_job.call_key IS NOT NULL THEN
        SELECT k.* INTO v_key FROM outbound_heartbeat._require_call_key(finish_job.call_key) AS k;
        PERFORM outbound_heartbeat._require(v_key.job_id = finish_job.job_id, 'call_key',
                                            pg_catalog.format('call_key is not a key of job %s', finish_job.job_id));
    END IF;
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

    -- The job row locked (as resolve_call() locks it): the attempt checked is the one written.
    SELECT j.status::text AS status, j.call_key::text AS call_key, j.lease_epoch::bigint AS lease_epoch,
           j.call_attempt::bigint AS call_attempt, j.call_outcome::text AS call_outcome,
           j.call_settled_at::timestamptz AS call_settled_at
      INTO v_job
      FROM public.outbound_call_jobs AS j WHERE j.id = finish_job.job_id
       FOR UPDATE;
    PERFORM outbound_heartbeat._restore_lock_timeout(v_caller_lock_timeout);
    IF finish_job.call_key IS NOT NULL THEN
        -- A genuine key that is not the current attempt's, or whose job went back to the queue:
        -- that attempt is over, the job's newer attempt is never touched.
        IF v_job.status = 'queued' OR v_job.call_key IS NULL
           OR pg_catalog.sha256(pg_catalog.convert_to(v_job.call_key, 'UTF8'))
              <> pg_catalog.sha256(pg_catalog.convert_to(finish_job.call_key, 'UTF8')) THEN
            RETURN ROW(finish_job.job_id, v_run_id, v_job.status, 'superseded')::outbound_heartbeat.job_outcome;
        END IF;
    ELSIF v_job.status = 'in_progress' AND v_job.call_attempt > 1
          AND EXISTS (SELECT 1 FROM outbound_heartbeat.run_call_options AS o
                       WHERE o.run_id = v_run_id AND o.retry_unplaced) THEN
        -- Without a key, attempts of a retry_unplaced run cannot be told apart once one was
        -- requeued: this could be the earlier attempt's late finish. Nothing is written.
        RAISE EXCEPTION USING ERRCODE = 'OH400', COLUMN = 'call_key',
            MESSAGE = pg_catalog.format(
                'call_key is required: job %s is on attempt %s of a run created with retry_unplaced,'
                ' and without its key this finish could be an earlier attempt''s', finish_job.job_id,
                v_job.call_attempt),
            HINT = 'Pass the call_key next_job() returned with the job.';
    END IF;
    -- The call in progress was handed out under another lease epoch (an orphan of this worker's
    -- previous incarnation): not this lease's to settle; its key settles it (resolve_call()).
    IF v_job.status = 'in_progress' AND v_job.lease_epoch IS DISTINCT FROM finish_job.lease_epoch THEN
        RETURN ROW(finish_job.job_id, v_run_id, v_job.status, 'orphaned')::outbound_heartbeat.job_outcome;
    END IF;

    IF v_job.status = 'in_progress' THEN
        UPDATE public.outbound_call_jobs AS j
           SET status = finish_job.status,
               error_message = CASE WHEN finish_job.status = 'failed'
                                    THEN COALESCE(finish_job.error, j.error_message)
                                    ELSE j.error_message END,
               updated_at = pg_catalog.now()
         WHERE j.id = finish_job.job_id AND j.status = 'in_progress';
        RETURN ROW(finish_job.job_id, v_run_id, finish_job.status, 'finished')::outbound_heartbeat.job_outcome;
    END IF;
    v_job_status := v_job.status;
    IF v_job_status = finish_job.status THEN
        RETURN ROW(finish_job.job_id, v_run_id, v_job_status, 'already_finished')::outbound_heartbeat.job_outcome;
    END IF;
    -- calls (15_calls.sql): a call settled otherwise (a callback, the provider, the timeout, a
    -- requeue): 'already_settled' with the job's status, the job unchanged, the contradicting
    -- report audited. (The worker contradicting its own finish stays OH400: a bug of its own.)
    IF v_job.call_settled_at IS NOT NULL AND v_job_status <> 'in_progress' THEN
        SELECT r.business_id::bigint INTO v_business_id FROM public.outbound_call_runs AS r WHERE r.id = v_run_id;
        PERFORM outbound_heartbeat._record_late_report(
            'call_late_finish', v_run_id, v_business_id, finish_job.job_id, v_job.lease_epoch, v_job.call_attempt,
            'worker', finish_job.status, v_job_status, v_job.call_outcome, finish_job.error);
        RETURN ROW(finish_job.job_id, v_run_id, v_job_status, 'already_settled')::outbound_heartbeat.job_outcome;
    END IF;
    RAISE EXCEPTION USING ERRCODE = 'OH400', COLUMN = 'job_id',
        MESSAGE = pg_catalog.format('job %s is %s: only an in_progress job can become %s',
                                    finish_job.job_id, v_job_status, finish_job.status);
EXCEPTION WHEN lock_not_available THEN
    PERFORM outbound_heartbeat._raise_run_locked(v_run_id, NULL);
    RETURN NULL;
END
$$;
ALTER FUNCTION outbound_heartbeat.finish_job(bigint, text, bigint, text, text, text) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat.finish_job(bigint, text, bigint, text, text, text) FROM PUBLIC;
SELECT outbound_heartbeat._offer_to('app', 'outbound_heartbeat.finish_job(bigint, text, bigint, text, text, text)');
COMMENT ON FUNCTION outbound_heartbeat.finish_job(bigint, text, bigint, text, text, text) IS
    'Records a job''s final status (completed or failed) for the lease holder, of the attempt call_key names (without it: the job''s current attempt, if handed out under this lease); idempotent; outcomes already_settled (its call was settled otherwise: the job''s status), superseded, orphaned and lease_lost write nothing.';

-- finish_run()'s (and finish_runs()') answer.
DO $run_outcome$
BEGIN
    IF pg_catalog.to_regtype('outbound_heartbeat.run_outcome') IS NULL THEN
        CREATE TYPE outbound_heartbeat.run_outcome AS (
            run_id bigint, status text, outcome text, jobs_failed bigint);
    END IF;
END
$run_outcome$;

-- Ends the lease holder's run ('completed', 'failed' or 'cancelled'); leftover queued jobs are
-- failed. Outcome 'finished', 'already_finished' (it already has that status) or 'lease_lost'.
CREATE OR REPLACE FUNCTION outbound_heartbeat.finish_run(
    run_id bigint, worker_id text, lease_epoch bigint, status text DEFAULT 'completed')
RETURNS outbound_heartbeat.run_outcome
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
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
    -- Refuses (OH428) to run code on the tables a role outside the trusted set wrote (05_table_guard.sql).
    PERFORM outbound_heartbeat._require_trusted_tables();
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
ALTER FUNCTION outbound_heartbeat.finish_run(bigint, text, bigint, text) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat.finish_run(bigint, text, bigint, text) FROM PUBLIC;
SELECT outbound_heartbeat._offer_to('app', 'outbound_heartbeat.finish_run(bigint, text, bigint, text)');
COMMENT ON FUNCTION outbound_heartbeat.finish_run(bigint, text, bigint, text) IS
    'Ends the lease holder''s run (completed, failed or cancelled) and fails its leftover queued jobs; idempotent.';

-- finish_run() for many leases in one statement (a process's release storm), in input order:
-- held runs locked in id order and ended by one _end_runs() per status; the rest share one short
-- lock budget, a row another transaction holds answered 'locked' rather than waited for.
CREATE OR REPLACE FUNCTION outbound_heartbeat.finish_runs(
    run_ids bigint[], worker_ids text[], lease_epochs bigint[], statuses text[])
RETURNS SETOF outbound_heartbeat.run_outcome
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
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
    v_wait_until timestamptz;
    v_left_ms bigint;
BEGIN
    -- Refuses (OH428) to run code on the tables a role outside the trusted set wrote (05_table_guard.sql).
    PERFORM outbound_heartbeat._require_trusted_tables();
    -- Every argument checked before anything is written: same length, one dimension, no NULL,
    -- and finish_run()'s rules for each element, naming the array.
    PERFORM outbound_heartbeat._require_lease_arrays(run_ids, worker_ids, lease_epochs);
    IF EXISTS (SELECT 1 FROM pg_catalog.unnest(worker_ids) AS w(worker_id)
                WHERE NOT outbound_heartbeat._is_worker_id(w.worker_id)) THEN
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
        -- Every row this call may change, locked in id order in this one statement: the runs
        -- some lease appears to hold, and the stale ones (finish_run() stops them). SKIP LOCKED:
        -- a row another transaction holds (an app's open transaction, an overlapping release)
        -- holds up none of the others; its leases are answered below, one by one. A row
        -- neither is not waited on, as alone.
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
                   FOR UPDATE OF r SKIP LOCKED) AS l;

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
        -- after found it ended; a lease of a run not held is finish_run()'s own, its lock waits
        -- bounded by one budget for the whole call (100 ms, or lock_timeout if smaller: it
        -- holds the other leases' rows meanwhile), then not waited on at all: 'locked', with
        -- nothing written for that lease, which its caller sends again.
        v_wait_until := pg_catalog.clock_timestamp()
            + LEAST(pg_catalog.current_setting('lock_timeout')::interval, interval '100 ms');
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
                v_left_ms := GREATEST(1, pg_catalog.ceil(EXTRACT(epoch FROM
                                 v_wait_until - pg_catalog.clock_timestamp()) * 1000)::bigint);
                -- Stricter wins inside finish_run(): this budget bounds its wait.
                PERFORM pg_catalog.set_config('lock_timeout', v_left_ms::text, true);
                BEGIN
                    RETURN NEXT outbound_heartbeat.finish_run(
                        v_lease.run_id, v_lease.worker_id, v_lease.lease_epoch, v_lease.status);
                EXCEPTION WHEN SQLSTATE 'OH423' THEN
                    RETURN NEXT ROW(v_lease.run_id,
                                    (SELECT r.status FROM public.outbound_call_runs AS r
                                      WHERE r.id = v_lease.run_id),
                                    'locked', 0)::outbound_heartbeat.run_outcome;
                END;
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
        -- OH423 for the whole call (nothing of it is kept) when a job row of a held run stayed
        -- locked past lock_timeout, naming a run whose row another transaction holds (the
        -- first by id), or the first run when it was a job row.
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
ALTER FUNCTION outbound_heartbeat.finish_runs(bigint[], text[], bigint[], text[]) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat.finish_runs(bigint[], text[], bigint[], text[]) FROM PUBLIC;
SELECT outbound_heartbeat._offer_to('app', 'outbound_heartbeat.finish_runs(bigint[], text[], bigint[], text[])');
COMMENT ON FUNCTION outbound_heartbeat.finish_runs(bigint[], text[], bigint[], text[]) IS
    'finish_run() for many leases in one statement (a release storm): one row per lease, in order, with finish_run()''s answer; the held runs ended together, locked in id order.';

REVOKE CREATE ON SCHEMA outbound_heartbeat FROM outbound_heartbeat_owner;
