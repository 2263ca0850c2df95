-- Calls: every call next_job hands out has a key, is marked orphaned when its run ends under it
-- (stale stop, force-cancel, sweep, startup cleanup), and is settled exactly once: by the
-- telephony callback (resolve_call), by the worker (finish_job) or, with no callback within
-- call_orphan_timeout, failed by the sweep and the read path that stop stale runs.
-- The app's status domain is not extended: an orphan stays 'in_progress', the library's columns
-- (orphaned_at, orphan_reason: sql/02_tables.sql) say that no live worker holds it.
-- The job type's call_key is declared with the type (08_worker_lease.sql); next_job() writes it.

-- ALTER FUNCTION ... OWNER TO needs CREATE on the schema for the new owner: held only
-- inside this file's transaction.
GRANT CREATE ON SCHEMA outbound_heartbeat TO outbound_heartbeat_owner;

-- resolve_call()'s answer.
DO $call_resolution$
BEGIN
    IF pg_catalog.to_regtype('outbound_heartbeat.call_resolution') IS NULL THEN
        CREATE TYPE outbound_heartbeat.call_resolution AS (
            job_id bigint, run_id bigint, business_id bigint, status text, call_outcome text,
            settled_at timestamptz, answer text);
    END IF;
END
$call_resolution$;

-- The secret behind every call key's random part (HMAC-SHA256 of the attempt's numbers under
-- it), kept as the two padded keys HMAC needs. Readable by the API's owner role only: neither
-- the app role nor an operator's role is granted it. Created once, never rotated by an upgrade.
CREATE TABLE IF NOT EXISTS outbound_heartbeat.call_key_secret (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    inner_pad  bytea NOT NULL CHECK (pg_catalog.length(inner_pad) = 64),
    outer_pad  bytea NOT NULL CHECK (pg_catalog.length(outer_pad) = 64),
    created_at timestamptz NOT NULL DEFAULT now()
);
REVOKE ALL ON outbound_heartbeat.call_key_secret FROM PUBLIC;
GRANT SELECT ON outbound_heartbeat.call_key_secret TO outbound_heartbeat_owner;
COMMENT ON TABLE outbound_heartbeat.call_key_secret IS
    'The secret call keys are derived from (HMAC-SHA256 pads of 64 random bytes); readable by outbound_heartbeat_owner only.';

DO $call_key_secret$
DECLARE
    v_key bytea := '';
    v_inner bytea;
    v_outer bytea;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM outbound_heartbeat.call_key_secret) THEN
        -- 64 bytes from four random UUIDs (488 random bits), XORed with HMAC's two pads.
        FOR i IN 1..4 LOOP
            v_key := v_key || pg_catalog.uuid_send(pg_catalog.gen_random_uuid());
        END LOOP;
        v_inner := v_key;
        v_outer := v_key;
        FOR i IN 0..63 LOOP
            v_inner := pg_catalog.set_byte(v_inner, i, pg_catalog.get_byte(v_key, i) # 54);
            v_outer := pg_catalog.set_byte(v_outer, i, pg_catalog.get_byte(v_key, i) # 92);
        END LOOP;
        INSERT INTO outbound_heartbeat.call_key_secret (singleton, inner_pad, outer_pad)
        VALUES (true, v_inner, v_outer) ON CONFLICT DO NOTHING;
    END IF;
END
$call_key_secret$;

-- The random part of an attempt's key: the first 128 bits of HMAC-SHA256('<job>-<epoch>-<attempt>')
-- under call_key_secret, as 32 hex digits. Deterministic, so any attempt's key can be verified
-- later without keeping a record of every key handed out.
CREATE OR REPLACE FUNCTION outbound_heartbeat._call_key_mac(p_job_id bigint, p_lease_epoch bigint, p_attempt bigint)
RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_secret record;
BEGIN
    SELECT s.inner_pad, s.outer_pad INTO v_secret FROM outbound_heartbeat.call_key_secret AS s;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
            MESSAGE = 'outbound_heartbeat.call_key_secret is empty: re-apply the schema (outbound-heartbeat migrate)';
    END IF;
    RETURN pg_catalog.left(pg_catalog.encode(pg_catalog.sha256(v_secret.outer_pad || pg_catalog.sha256(
               v_secret.inner_pad || pg_catalog.convert_to(
                   pg_catalog.format('%s-%s-%s', p_job_id, p_lease_epoch, p_attempt), 'UTF8'))), 'hex'), 32);
END
$$;
ALTER FUNCTION outbound_heartbeat._call_key_mac(bigint, bigint, bigint) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._call_key_mac(bigint, bigint, bigint) FROM PUBLIC;

-- An attempt's key, 'oh1-<job>-<epoch>-<attempt>-<32 hex>': the numbers find and order the
-- attempt, the random part (_call_key_mac) makes it a bearer credential for the status-callback
-- URL, which guessable ids alone could not be. The same numbers always give the same key.
CREATE OR REPLACE FUNCTION outbound_heartbeat._call_key(p_job_id bigint, p_lease_epoch bigint, p_attempt bigint)
RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT pg_catalog.format('oh1-%s-%s-%s-%s', p_job_id, p_lease_epoch, p_attempt,
                             outbound_heartbeat._call_key_mac(p_job_id, p_lease_epoch, p_attempt))
$$;
ALTER FUNCTION outbound_heartbeat._call_key(bigint, bigint, bigint) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._call_key(bigint, bigint, bigint) FROM PUBLIC;

-- The numbers of a call key, or OH400 when it is not one (nothing about the key is echoed:
-- it is a credential).
CREATE OR REPLACE FUNCTION outbound_heartbeat._parse_call_key(p_call_key text)
RETURNS TABLE (job_id bigint, lease_epoch bigint, call_attempt bigint)
LANGUAGE plpgsql IMMUTABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_parts text[];
BEGIN
    v_parts := pg_catalog.regexp_match(p_call_key, '^oh1-([0-9]{1,19})-([0-9]{1,19})-([0-9]{1,19})-[0-9a-f]{32}$');
    IF v_parts IS NULL
       OR v_parts[1]::numeric > 9223372036854775807 OR v_parts[2]::numeric > 9223372036854775807
       OR v_parts[3]::numeric > 9223372036854775807 THEN
        RAISE EXCEPTION USING ERRCODE = 'OH400', COLUMN = 'call_key',
            MESSAGE = 'call_key must be a key next_job() returned (oh1-<job>-<epoch>-<attempt>-<32 hex digits>)';
    END IF;
    job_id := v_parts[1]::bigint;
    lease_epoch := v_parts[2]::bigint;
    call_attempt := v_parts[3]::bigint;
    RETURN NEXT;
END
$$;
ALTER FUNCTION outbound_heartbeat._parse_call_key(text) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._parse_call_key(text) FROM PUBLIC;

-- Marks the in-progress calls of runs _end_runs() just ended (their rows locked) orphaned, with
-- the run's reason; one row per run that had any.
CREATE OR REPLACE FUNCTION outbound_heartbeat._orphan_calls(p_run_ids bigint[], p_reason text)
RETURNS TABLE (run_id bigint, calls_orphaned bigint)
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    WITH marked AS (
        UPDATE public.outbound_call_jobs AS j
           SET orphaned_at = pg_catalog.now(), orphan_reason = p_reason
         WHERE j.run_id OPERATOR(pg_catalog.=) ANY (p_run_ids)
           AND j.status OPERATOR(pg_catalog.=) 'in_progress' AND j.orphaned_at IS NULL
        RETURNING j.run_id
    )
    SELECT m.run_id::bigint, pg_catalog.count(*)::bigint FROM marked AS m GROUP BY m.run_id
$$;
ALTER FUNCTION outbound_heartbeat._orphan_calls(bigint[], text) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._orphan_calls(bigint[], text) FROM PUBLIC;

-- Fails the orphaned calls (of one business, or all: then unmarked ones too) past
-- call_orphan_timeout, each audited ('call_timed_out'); SKIP LOCKED: a call a concurrent
-- resolve_call() holds is settled by that call, never by both. At most p_limit, the oldest first.
CREATE OR REPLACE FUNCTION outbound_heartbeat._expire_orphaned_calls(
    p_business_id bigint, p_settings outbound_heartbeat.settings, p_limit integer DEFAULT 1000)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET TimeZone = 'UTC'
SET client_min_messages = notice
AS $$
DECLARE
    v_call record;
    v_count bigint := 0;
BEGIN
    -- The sweep (every business) first marks any in-progress call of an ended run that no end
    -- marked (belt and braces: every end marks its calls), its timeout counted from the run's end.
    IF p_business_id IS NULL THEN
        PERFORM outbound_heartbeat._adopt_unmarked_calls(
            p_limit, 'run %s without marking the call in progress (adopted by the sweep)');
    END IF;
    FOR v_call IN
        WITH due AS (
            SELECT q.id FROM public.outbound_call_jobs AS q
             WHERE q.orphaned_at IS NOT NULL AND q.status = 'in_progress'
               AND q.orphaned_at <= pg_catalog.statement_timestamp() - p_settings.call_orphan_timeout
               AND (p_business_id IS NULL
                    OR EXISTS (SELECT 1 FROM public.outbound_call_runs AS r
                                WHERE r.id = q.run_id AND r.business_id = p_business_id))
             ORDER BY q.orphaned_at, q.id
             LIMIT p_limit
               FOR UPDATE OF q SKIP LOCKED
        )
        UPDATE public.outbound_call_jobs AS j
           SET status = 'failed', call_outcome = 'timed_out', call_settled_at = pg_catalog.now(),
               updated_at = pg_catalog.now(),
               error_message = pg_catalog.format('call orphaned (%s) and not resolved within %s',
                                                 j.orphan_reason, p_settings.call_orphan_timeout)
          FROM due
         WHERE j.id = due.id AND j.status = 'in_progress'
        RETURNING j.id::bigint AS job_id, j.run_id::bigint AS run_id, j.lease_epoch::bigint AS lease_epoch,
                  j.call_attempt::bigint AS call_attempt, j.orphaned_at::timestamptz AS orphaned_at,
                  j.orphan_reason::text AS orphan_reason
    LOOP
        PERFORM outbound_heartbeat._record_event(
            v_call.run_id, (SELECT r.business_id FROM public.outbound_call_runs AS r WHERE r.id = v_call.run_id),
            'call_timed_out', NULL,
            pg_catalog.jsonb_build_object(
                'job_id', v_call.job_id, 'lease_epoch', v_call.lease_epoch, 'call_attempt', v_call.call_attempt,
                'status', 'failed', 'call_outcome', 'timed_out', 'orphaned_at', v_call.orphaned_at,
                'orphan_reason', v_call.orphan_reason,
                'call_orphan_timeout', p_settings.call_orphan_timeout::text));
        v_count := v_count + 1;
    END LOOP;
    RETURN v_count;
END
$$;
ALTER FUNCTION outbound_heartbeat._expire_orphaned_calls(bigint, outbound_heartbeat.settings, integer) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._expire_orphaned_calls(bigint, outbound_heartbeat.settings, integer) FROM PUBLIC;

-- Runs whose unplaced calls go back to the queue (create_run(..., retry_unplaced => true)):
-- one row per opted-in run, keyed by the app's run id. A library table, so the app's own
-- INSERT into outbound_call_runs is untouched (no row: not opted in).
CREATE TABLE IF NOT EXISTS outbound_heartbeat.run_call_options (
    run_id         bigint PRIMARY KEY,
    retry_unplaced boolean NOT NULL DEFAULT false,
    created_at     timestamptz NOT NULL DEFAULT now()
);
REVOKE ALL ON outbound_heartbeat.run_call_options FROM PUBLIC;
GRANT SELECT, INSERT ON outbound_heartbeat.run_call_options TO outbound_heartbeat_owner;
COMMENT ON TABLE outbound_heartbeat.run_call_options IS
    'Per-run call options set by create_run() (retry_unplaced); no row means the defaults.';

-- True when p_call_key is a key the library issued: the current attempt's stored key, or the key
-- _call_key() gives for its numbers. Both compared as digests, both always computed: the time
-- the check takes says nothing about either key.
CREATE OR REPLACE FUNCTION outbound_heartbeat._call_key_is_genuine(
    p_call_key text, p_stored_key text, p_job_id bigint, p_lease_epoch bigint, p_attempt bigint)
RETURNS boolean
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_given bytea := pg_catalog.sha256(pg_catalog.convert_to(p_call_key, 'UTF8'));
    v_derived bytea := pg_catalog.sha256(pg_catalog.convert_to(
        outbound_heartbeat._call_key(p_job_id, p_lease_epoch, p_attempt), 'UTF8'));
    v_stored bytea := pg_catalog.sha256(pg_catalog.convert_to(COALESCE(p_stored_key, ''), 'UTF8'));
BEGIN
    RETURN (v_given = v_derived) OR (p_stored_key IS NOT NULL AND v_given = v_stored);
END
$$;
ALTER FUNCTION outbound_heartbeat._call_key_is_genuine(text, text, bigint, bigint, bigint) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._call_key_is_genuine(text, text, bigint, bigint, bigint) FROM PUBLIC;

-- Audits a late report that contradicts the call's settlement (p_event 'call_late_callback' or
-- 'call_late_finish'), once per distinct report (job, attempt, source, reported outcome).
-- Never changes the job.
CREATE OR REPLACE FUNCTION outbound_heartbeat._record_late_report(
    p_event text, p_run_id bigint, p_business_id bigint, p_job_id bigint, p_lease_epoch bigint,
    p_attempt bigint, p_source text, p_reported text, p_status text, p_settled_outcome text, p_detail text)
RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET client_min_messages = notice
AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM outbound_heartbeat.run_events AS e
                WHERE e.run_id = p_run_id AND e.event = p_event
                  AND e.detail ->> 'job_id' = p_job_id::text
                  AND e.detail ->> 'call_attempt' IS NOT DISTINCT FROM p_attempt::text
                  AND e.detail ->> 'source' = p_source
                  AND e.detail ->> 'reported' = p_reported) THEN
        RETURN false;
    END IF;
    PERFORM outbound_heartbeat._record_event(
        p_run_id, p_business_id, p_event, NULL,
        pg_catalog.jsonb_build_object(
            'job_id', p_job_id, 'lease_epoch', p_lease_epoch, 'call_attempt', p_attempt,
            'source', p_source, 'reported', p_reported, 'status', p_status,
            'call_outcome', p_settled_outcome, 'detail', p_detail));
    RETURN true;
END
$$;
ALTER FUNCTION outbound_heartbeat._record_late_report(text, bigint, bigint, bigint, bigint, bigint, text, text, text, text, text) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._record_late_report(text, bigint, bigint, bigint, bigint, bigint, text, text, text, text, text) FROM PUBLIC;

-- The key comes first: an unknown job and a forged key are the same OH404 'no call has this
-- key', before anything about the job (its tenant, its status, its attempts) is answered.
-- Returns the job's run id for a genuine key.
CREATE OR REPLACE FUNCTION outbound_heartbeat._require_call_key(p_call_key text)
RETURNS TABLE (job_id bigint, run_id bigint, lease_epoch bigint, call_attempt bigint)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_key record;
    v_run_id bigint;
    v_stored text;
BEGIN
    SELECT k.* INTO v_key FROM outbound_heartbeat._parse_call_key(p_call_key) AS k;
    SELECT j.run_id::bigint, j.call_key::text INTO v_run_id, v_stored
      FROM public.outbound_call_jobs AS j WHERE j.id = v_key.job_id;
    -- Computed for an unknown job too: both cases take the same path.
    IF NOT outbound_heartbeat._call_key_is_genuine(p_call_key, v_stored, v_key.job_id, v_key.lease_epoch,
                                                   v_key.call_attempt)
       OR v_run_id IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'OH404', COLUMN = 'call_key', MESSAGE = 'no call has this key';
    END IF;
    job_id := v_key.job_id;
    run_id := v_run_id;
    lease_epoch := v_key.lease_epoch;
    call_attempt := v_key.call_attempt;
    RETURN NEXT;
END
$$;
ALTER FUNCTION outbound_heartbeat._require_call_key(text) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._require_call_key(text) FROM PUBLIC;

-- The release before took no source: the old signature would make calls ambiguous.
DROP FUNCTION IF EXISTS outbound_heartbeat.resolve_call(text, text, text, bigint);

-- Settles one call exactly once by its key (the status callback, or source 'provider': a
-- reconciliation that asked the provider). Answers: resolved, requeued, already_resolved,
-- superseded; docs/calls.md has the table.
CREATE OR REPLACE FUNCTION outbound_heartbeat.resolve_call(
    call_key text, outcome text, detail text DEFAULT NULL, business_id bigint DEFAULT NULL,
    source text DEFAULT 'callback')
RETURNS outbound_heartbeat.call_resolution
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET TimeZone = 'UTC'
SET client_min_messages = notice
AS $$
DECLARE
    v_settings outbound_heartbeat.settings := outbound_heartbeat._settings();
    v_key record;
    v_job record;
    v_owner bigint;
    v_run_id bigint;
    v_run_status text;
    v_retry boolean;
    v_settled_as text;
    v_caller_lock_timeout text;
BEGIN
    -- Refuses (OH428) to run code on the tables a role outside the trusted set wrote (03_table_guard.sql).
    PERFORM outbound_heartbeat._require_trusted_tables();
    PERFORM outbound_heartbeat._require(resolve_call.outcome IN ('completed', 'failed', 'not_placed'), 'outcome',
                                        'outcome must be ''completed'', ''failed'' or ''not_placed''');
    PERFORM outbound_heartbeat._require(
        resolve_call.detail IS NULL OR pg_catalog.length(resolve_call.detail) <= 2000, 'detail',
        'detail must be NULL or a string of at most 2000 characters');
    PERFORM outbound_heartbeat._require(resolve_call.source IN ('callback', 'provider'), 'source',
                                        'source must be ''callback'' or ''provider''');
    PERFORM outbound_heartbeat._parse_call_key(resolve_call.call_key);
    PERFORM outbound_heartbeat._require_primary('resolve_call');

    -- The key first (OH404, the same for no such job and a forged key), then the tenant
    -- (OH403, naming nothing but the asking business), both before any lock is waited on.
    SELECT k.* INTO v_key FROM outbound_heartbeat._require_call_key(resolve_call.call_key) AS k;
    v_run_id := v_key.run_id;
    PERFORM outbound_heartbeat._require_tenant(v_run_id, resolve_call.business_id, 'this call');
    SELECT r.business_id::bigint, r.status::text INTO v_owner, v_run_status
      FROM public.outbound_call_runs AS r WHERE r.id = v_run_id;
    v_retry := resolve_call.outcome = 'not_placed'
        AND EXISTS (SELECT 1 FROM outbound_heartbeat.run_call_options AS o
                     WHERE o.run_id = v_run_id AND o.retry_unplaced);
    v_caller_lock_timeout := outbound_heartbeat._apply_lock_timeout(v_settings);

    -- A retry-eligible report locks the run first (FOR SHARE, as finish_job: the run's end
    -- waits, or is waited for), so a job never goes back to the queue of an ended run. Then the
    -- job row alone: a stale stop or the timeout sweep racing this call either waits for it or
    -- is waited for, and the loser finds the call settled.
    IF v_retry THEN
        SELECT r.status::text INTO v_run_status FROM public.outbound_call_runs AS r
         WHERE r.id = v_run_id FOR SHARE;
    END IF;
    SELECT j.id::bigint AS id, j.run_id::bigint AS run_id, j.status::text AS status,
           j.call_key::text AS call_key, j.lease_epoch::bigint AS lease_epoch,
           j.call_attempt::bigint AS call_attempt, j.call_outcome::text AS call_outcome,
           j.call_settled_at::timestamptz AS call_settled_at, j.orphaned_at::timestamptz AS orphaned_at
      INTO v_job
      FROM public.outbound_call_jobs AS j
     WHERE j.id = v_key.job_id
       FOR UPDATE;
    PERFORM outbound_heartbeat._restore_lock_timeout(v_caller_lock_timeout);

    IF v_job.call_key IS NULL
       OR pg_catalog.sha256(pg_catalog.convert_to(v_job.call_key, 'UTF8'))
          <> pg_catalog.sha256(pg_catalog.convert_to(resolve_call.call_key, 'UTF8')) THEN
        -- A genuine key that is not the current attempt's: an older attempt's, superseded.
        IF v_job.call_attempt IS NOT NULL
           AND (v_key.lease_epoch, v_key.call_attempt) < (v_job.lease_epoch, v_job.call_attempt) THEN
            RETURN ROW(v_job.id, v_job.run_id, v_owner, v_job.status, NULL, NULL, 'superseded')
                   ::outbound_heartbeat.call_resolution;
        END IF;
        RAISE EXCEPTION USING ERRCODE = 'OH404', COLUMN = 'call_key', MESSAGE = 'no call has this key';
    END IF;

    -- The current attempt's key, its job back in the queue (requeued, or by the app): the next
    -- hand-out is a new attempt with a new key, so this one is superseded.
    IF v_job.status = 'queued' THEN
        RETURN ROW(v_job.id, v_job.run_id, v_owner, v_job.status, NULL, NULL, 'superseded')
               ::outbound_heartbeat.call_resolution;
    END IF;
    IF v_job.status <> 'in_progress' THEN
        -- Settled before (a callback, the provider, the worker or the timeout): nothing changes;
        -- a report that contradicts that settlement is audited (once per distinct report).
        v_settled_as := COALESCE(v_job.call_outcome, v_job.status);
        IF resolve_call.outcome <> v_settled_as THEN
            PERFORM outbound_heartbeat._record_late_report(
                'call_late_callback', v_job.run_id, v_owner, v_job.id, v_job.lease_epoch, v_job.call_attempt,
                resolve_call.source, resolve_call.outcome, v_job.status, v_job.call_outcome, resolve_call.detail);
        END IF;
        RETURN ROW(v_job.id, v_job.run_id, v_owner, v_job.status, v_job.call_outcome, v_job.call_settled_at,
                   'already_resolved')::outbound_heartbeat.call_resolution;
    END IF;

    -- Never placed, on an opted-in run still open: back to the queue for a new attempt.
    IF v_retry AND v_run_status IN ('pending', 'running') THEN
        UPDATE public.outbound_call_jobs AS j
           SET status = 'queued', call_outcome = 'not_placed', call_settled_at = pg_catalog.now(),
               updated_at = pg_catalog.now()
         WHERE j.id = v_job.id;
        PERFORM outbound_heartbeat._record_event(
            v_job.run_id, v_owner, 'call_requeued', NULL,
            pg_catalog.jsonb_build_object(
                'job_id', v_job.id, 'lease_epoch', v_job.lease_epoch, 'call_attempt', v_job.call_attempt,
                'call_outcome', 'not_placed', 'status', 'queued', 'source', resolve_call.source,
                'detail', resolve_call.detail, 'orphaned_at', v_job.orphaned_at,
                'by_business', resolve_call.business_id));
        RETURN ROW(v_job.id, v_job.run_id, v_owner, 'queued', 'not_placed', pg_catalog.now(), 'requeued')
               ::outbound_heartbeat.call_resolution;
    END IF;

    -- Literal statuses, one statement each: an app's enum or domain on status accepts them.
    IF resolve_call.outcome = 'completed' THEN
        UPDATE public.outbound_call_jobs AS j
           SET status = 'completed', call_outcome = resolve_call.outcome,
               call_settled_at = pg_catalog.now(), updated_at = pg_catalog.now()
         WHERE j.id = v_job.id;
    ELSE
        UPDATE public.outbound_call_jobs AS j
           SET status = 'failed', call_outcome = resolve_call.outcome,
               call_settled_at = pg_catalog.now(), updated_at = pg_catalog.now(),
               error_message = COALESCE(resolve_call.detail,
                                        CASE resolve_call.outcome WHEN 'not_placed' THEN 'call never placed'
                                             ELSE 'call failed' END)
         WHERE j.id = v_job.id;
    END IF;
    PERFORM outbound_heartbeat._record_event(
        v_job.run_id, v_owner,
        CASE resolve_call.source WHEN 'provider' THEN 'call_reconciled' ELSE 'call_resolved' END, NULL,
        pg_catalog.jsonb_build_object(
            'job_id', v_job.id, 'lease_epoch', v_job.lease_epoch, 'call_attempt', v_job.call_attempt,
            'call_outcome', resolve_call.outcome,
            'status', CASE resolve_call.outcome WHEN 'completed' THEN 'completed' ELSE 'failed' END,
            'source', resolve_call.source,
            'detail', resolve_call.detail, 'orphaned_at', v_job.orphaned_at,
            'by_business', resolve_call.business_id));
    RETURN ROW(v_job.id, v_job.run_id, v_owner,
               CASE resolve_call.outcome WHEN 'completed' THEN 'completed' ELSE 'failed' END,
               resolve_call.outcome, pg_catalog.now(), 'resolved')::outbound_heartbeat.call_resolution;
EXCEPTION WHEN lock_not_available THEN
    PERFORM outbound_heartbeat._raise_run_locked(v_run_id, NULL);
    RETURN NULL;
END
$$;
ALTER FUNCTION outbound_heartbeat.resolve_call(text, text, text, bigint, text) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat.resolve_call(text, text, text, bigint, text) FROM PUBLIC;
SELECT outbound_heartbeat._offer_to('app', 'outbound_heartbeat.resolve_call(text, text, text, bigint, text)');
COMMENT ON FUNCTION outbound_heartbeat.resolve_call(text, text, text, bigint, text) IS
    'Settles a call exactly once by its key (completed, failed or not_placed; source callback or provider): answer resolved, requeued, already_resolved or superseded; OH404 for an unknown or forged key, OH403 for another business''s call.';

-- Records a refused cross-business resolve_call() ([SECURITY] access_denied), which the Python
-- layer calls after its OH403 (the refused call rolled back). The key must be genuine (else
-- OH404, as resolve_call) and the business not its run's owner (else OH400): no forged refusal.
CREATE OR REPLACE FUNCTION outbound_heartbeat.audit_call_access_denied(call_key text, business_id bigint)
RETURNS outbound_heartbeat.run_events
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET client_min_messages = notice
AS $$
DECLARE
    v_key record;
BEGIN
    PERFORM outbound_heartbeat._require(audit_call_access_denied.business_id IS NOT NULL, 'business_id',
                                        'business_id must not be NULL');
    SELECT k.* INTO v_key FROM outbound_heartbeat._require_call_key(audit_call_access_denied.call_key) AS k;
    RETURN outbound_heartbeat._audit_refusal(
        v_key.run_id, audit_call_access_denied.business_id,
        pg_catalog.jsonb_build_object('action', 'resolve_call', 'job_id', v_key.job_id));
END
$$;
ALTER FUNCTION outbound_heartbeat.audit_call_access_denied(text, bigint) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat.audit_call_access_denied(text, bigint) FROM PUBLIC;
SELECT outbound_heartbeat._offer_to('app', 'outbound_heartbeat.audit_call_access_denied(text, bigint)');
COMMENT ON FUNCTION outbound_heartbeat.audit_call_access_denied(text, bigint) IS
    'Records a refused cross-business resolve_call() ([SECURITY] access_denied); OH404 for a key that is not genuine, OH400 unless it was a genuine refusal.';

-- Orphaned calls not yet settled, with reason, age and timeout. A function under the view (as
-- under active_runs): the view's text is then the same whatever the app's column types.
CREATE OR REPLACE FUNCTION outbound_heartbeat.list_orphaned_calls()
RETURNS TABLE (job_id bigint, run_id bigint, business_id bigint, lease_epoch bigint, call_attempt bigint,
               orphaned_at timestamptz, orphan_reason text, orphan_age interval, times_out_at timestamptz)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET TimeZone = 'UTC'
AS $$
BEGIN
    RETURN QUERY
    SELECT j.id::bigint, j.run_id::bigint, COALESCE(j.business_id, r.business_id)::bigint,
           j.lease_epoch::bigint, j.call_attempt::bigint, j.orphaned_at::timestamptz,
           j.orphan_reason::text, pg_catalog.statement_timestamp() - j.orphaned_at,
           j.orphaned_at + s.call_orphan_timeout
      FROM public.outbound_call_jobs AS j
      JOIN public.outbound_call_runs AS r ON r.id = j.run_id
     CROSS JOIN outbound_heartbeat._settings() AS s
     WHERE j.orphaned_at IS NOT NULL AND j.status = 'in_progress'
     ORDER BY j.orphaned_at, j.id;
END
$$;
ALTER FUNCTION outbound_heartbeat.list_orphaned_calls() OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat.list_orphaned_calls() FROM PUBLIC;
SELECT outbound_heartbeat._offer_to('app', 'outbound_heartbeat.list_orphaned_calls()');
COMMENT ON FUNCTION outbound_heartbeat.list_orphaned_calls() IS
    'In-progress calls of ended runs no callback has settled yet, with orphan reason, age and timeout (the view orphaned_calls). Reads only.';

CREATE OR REPLACE VIEW outbound_heartbeat.orphaned_calls AS
    SELECT * FROM outbound_heartbeat.list_orphaned_calls();
GRANT SELECT ON outbound_heartbeat.orphaned_calls TO outbound_heartbeat_owner;
COMMENT ON VIEW outbound_heartbeat.orphaned_calls IS
    'In-progress calls of ended runs no callback has settled yet, with orphan reason, age and timeout. Reads only.';

-- Per run with orphaned calls: how many, and the oldest one's age. Reads only. (On the
-- function, not the view: a rollback drops the views one by one, and a view on a view would go
-- with the first.)
CREATE OR REPLACE VIEW outbound_heartbeat.orphaned_runs AS
    SELECT o.run_id, o.business_id, pg_catalog.count(*)::bigint AS orphaned_calls,
           pg_catalog.min(o.orphaned_at) AS oldest_orphaned_at,
           pg_catalog.max(o.orphan_age) AS oldest_orphan_age,
           pg_catalog.min(o.times_out_at) AS next_timeout_at
      FROM outbound_heartbeat.list_orphaned_calls() AS o
     GROUP BY o.run_id, o.business_id;
GRANT SELECT ON outbound_heartbeat.orphaned_runs TO outbound_heartbeat_owner;
COMMENT ON VIEW outbound_heartbeat.orphaned_runs IS
    'Runs with orphaned calls: how many and the oldest one''s age. Reads only.';

-- metrics()'s orphan gauges (settled calls are counted by events_total). Declared as a TABLE,
-- not the metric type: an earlier release's rollback drops that type, nothing here may hold it.
CREATE OR REPLACE FUNCTION outbound_heartbeat._call_metrics()
RETURNS TABLE (name text, kind text, help text, labels jsonb, value double precision)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET TimeZone = 'UTC'
AS $$
    SELECT m.name, 'gauge'::text, m.help, '{}'::jsonb, m.value
      FROM (SELECT 1 AS n, 'outbound_heartbeat_orphaned_calls'::text AS name,
                   'In-progress calls of ended runs that no callback has settled yet.'::text AS help,
                   pg_catalog.count(*)::double precision AS value
              FROM outbound_heartbeat.orphaned_calls AS o
            UNION ALL
            SELECT 2, 'outbound_heartbeat_oldest_orphaned_call_age_seconds',
                   'Age of the oldest orphaned call (0 when there is none).',
                   COALESCE(pg_catalog.max(pg_catalog.date_part('epoch', o.orphan_age)), 0)::double precision
              FROM outbound_heartbeat.orphaned_calls AS o) AS m
     ORDER BY m.n
$$;
ALTER FUNCTION outbound_heartbeat._call_metrics() OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._call_metrics() FROM PUBLIC;

-- health_check()'s orphan alerts: a run's oldest orphan older than alert_after ('warning'), or
-- past call_orphan_timeout ('critical': neither the sweep nor the read path has run since).
CREATE OR REPLACE FUNCTION outbound_heartbeat._call_alerts(p_alert_after interval)
RETURNS TABLE (severity text, check_name text, run_id bigint, detail text)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET TimeZone = 'UTC'
AS $$
    SELECT CASE WHEN o.next_timeout_at <= pg_catalog.statement_timestamp() THEN 'critical' ELSE 'warning' END,
           CASE WHEN o.next_timeout_at <= pg_catalog.statement_timestamp() THEN 'orphan_timeout_overdue'
                ELSE 'orphaned_calls' END,
           o.run_id,
           pg_catalog.format('run %s (business %s): %s orphaned call(s) without a callback, the oldest for %s%s',
                             o.run_id, o.business_id, o.orphaned_calls,
                             pg_catalog.date_trunc('second', o.oldest_orphan_age),
                             CASE WHEN o.next_timeout_at <= pg_catalog.statement_timestamp()
                                  THEN '; past call_orphan_timeout: run the sweep (cleanup_stuck_runs())'
                                  ELSE '' END)
      FROM outbound_heartbeat.orphaned_runs AS o
     WHERE o.oldest_orphan_age > p_alert_after
     ORDER BY o.run_id
$$;
ALTER FUNCTION outbound_heartbeat._call_alerts(interval) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._call_alerts(interval) FROM PUBLIC;

-- In-progress jobs of ended runs that carry no orphan mark, marked orphaned as of the run's end
-- with p_reason_format's reason (%s: the run's status); p_batch_size per call, held rows
-- skipped. The upgrade adopts legacy rows with it, the sweep whatever else slipped through.
CREATE OR REPLACE FUNCTION outbound_heartbeat._adopt_unmarked_calls(p_batch_size integer, p_reason_format text)
RETURNS bigint
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET TimeZone = 'UTC'
AS $$
    WITH due AS (
        SELECT q.id, r.status::text AS run_status,
               COALESCE(r.ended_at::timestamptz, r.updated_at::timestamptz) AS ended_at
          FROM public.outbound_call_jobs AS q
          JOIN public.outbound_call_runs AS r ON r.id OPERATOR(pg_catalog.=) q.run_id
         WHERE q.status OPERATOR(pg_catalog.=) 'in_progress' AND q.orphaned_at IS NULL
           AND r.status OPERATOR(pg_catalog.<>) ALL ('{pending,running}')
         ORDER BY q.id
         LIMIT p_batch_size
           FOR UPDATE OF q SKIP LOCKED
    ), adopted AS (
        UPDATE public.outbound_call_jobs AS j
           SET orphaned_at = LEAST(COALESCE(due.ended_at, pg_catalog.now()), pg_catalog.now()),
               orphan_reason = pg_catalog.format(p_reason_format, due.run_status)
          FROM due
         WHERE j.id OPERATOR(pg_catalog.=) due.id
        RETURNING j.id
    )
    SELECT pg_catalog.count(*)::bigint FROM adopted
$$;
ALTER FUNCTION outbound_heartbeat._adopt_unmarked_calls(integer, text) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._adopt_unmarked_calls(integer, text) FROM PUBLIC;

-- Legacy rows: in-progress jobs of runs ended before calls were tracked, orphaned as of the
-- run's end; p_batch_size per call, held rows skipped (upgrade.py loops, one transaction each).
CREATE OR REPLACE FUNCTION outbound_heartbeat._adopt_orphaned_calls(p_batch_size integer DEFAULT 1000)
RETURNS bigint
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET TimeZone = 'UTC'
AS $$
    SELECT outbound_heartbeat._adopt_unmarked_calls(
        p_batch_size, 'run %s before calls were tracked (adopted by the upgrade)')
$$;
ALTER FUNCTION outbound_heartbeat._adopt_orphaned_calls(integer) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._adopt_orphaned_calls(integer) FROM PUBLIC;

REVOKE CREATE ON SCHEMA outbound_heartbeat FROM outbound_heartbeat_owner;
