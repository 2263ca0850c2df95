-- Internal helpers every feature calls (names start with an underscore: not part of the
-- contract, may change): the settings row and lock_timeout, argument checks, the primary check,
-- the audit row of a transition, the tenant check, and who may call each public function
-- (_offer_to(), called next to each one's body). Every function pins search_path (and the
-- ones that read naive legacy columns TimeZone), so neither a caller's objects nor its session
-- settings change what it does.

-- ALTER FUNCTION ... OWNER TO needs CREATE on the schema for the new owner: held only
-- inside this file's transaction.
GRANT CREATE ON SCHEMA outbound_heartbeat TO outbound_heartbeat_owner;

-- The settings row, or the defaults when a DBA has removed it.
CREATE OR REPLACE FUNCTION outbound_heartbeat._settings()
RETURNS outbound_heartbeat.settings
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_settings outbound_heartbeat.settings;
BEGIN
    SELECT s.* INTO v_settings FROM outbound_heartbeat.settings AS s;
    IF NOT FOUND THEN
        v_settings := ROW(true, interval '30 seconds', interval '5 minutes', interval '5 seconds', NULL,
                          interval '90 days', interval '1 hour');
    END IF;
    RETURN v_settings;
END
$$;
ALTER FUNCTION outbound_heartbeat._settings() OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._settings() FROM PUBLIC;

-- The lock_timeout setting as a GUC value (milliseconds).
CREATE OR REPLACE FUNCTION outbound_heartbeat._lock_timeout_value(p_settings outbound_heartbeat.settings)
RETURNS text
LANGUAGE plpgsql IMMUTABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN pg_catalog.ceil(EXTRACT(epoch FROM p_settings.lock_timeout) * 1000)::bigint::text;
END
$$;
ALTER FUNCTION outbound_heartbeat._lock_timeout_value(outbound_heartbeat.settings) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._lock_timeout_value(outbound_heartbeat.settings) FROM PUBLIC;

-- lock_timeout for the rest of an API call, set here and not by a SET clause, which would hide a
-- caller's stricter value from the call; returns the caller's for _restore_lock_timeout() (an
-- error rolls the set_config back with the rest).
CREATE OR REPLACE FUNCTION outbound_heartbeat._apply_lock_timeout(p_settings outbound_heartbeat.settings)
RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
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
ALTER FUNCTION outbound_heartbeat._apply_lock_timeout(outbound_heartbeat.settings) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._apply_lock_timeout(outbound_heartbeat.settings) FROM PUBLIC;

-- Puts the caller's lock_timeout back (see _apply_lock_timeout); returns nothing.
CREATE OR REPLACE FUNCTION outbound_heartbeat._restore_lock_timeout(p_caller text)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF pg_catalog.current_setting('lock_timeout') IS DISTINCT FROM p_caller THEN
        PERFORM pg_catalog.set_config('lock_timeout', p_caller, true);
    END IF;
END
$$;
ALTER FUNCTION outbound_heartbeat._restore_lock_timeout(text) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._restore_lock_timeout(text) FROM PUBLIC;

-- Raises OH400 naming the argument unless p_ok is true. Nothing has been written yet when
-- the API functions call it: validation always comes first.
CREATE OR REPLACE FUNCTION outbound_heartbeat._require(p_ok boolean, p_argument text, p_message text)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_ok IS NOT TRUE THEN
        RAISE EXCEPTION USING ERRCODE = 'OH400', MESSAGE = p_message, COLUMN = p_argument;
    END IF;
END
$$;
ALTER FUNCTION outbound_heartbeat._require(boolean, text, text) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._require(boolean, text, text) FROM PUBLIC;

-- True when nothing visible is left in p_text: Unicode spaces, controls, format characters
-- (zero-width space, joiners, BOM, bidi marks) and blank fillers only. The Python layer's
-- arguments.is_blank() refuses the same before anything is sent.
CREATE OR REPLACE FUNCTION outbound_heartbeat._is_blank(p_text text)
RETURNS boolean
LANGUAGE sql IMMUTABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT p_text OPERATOR(pg_catalog.~) ('^[\u0001-\u0020\u007f-\u00a0\u00ad\u0600-\u0605\u061c\u06dd\u0890\u0891\u08e2'
        '\u070f\u115f\u1160\u1680\u180e\u2000-\u200f\u2028-\u202f\u205f-\u2064\u2066-\u206f\u2800\u3000'
        '\u3164\ufeff\uffa0\ufff9-\ufffb\U000110bd\U000110cd\U00013430-\U0001343f'
        '\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0001\U000e0020-\U000e007f]*$')
$$;
ALTER FUNCTION outbound_heartbeat._is_blank(text) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._is_blank(text) FROM PUBLIC;

-- The worker id rule, written once: present, not blank, at most 200 characters. Every check of
-- a worker id calls it; the Python layer's pre-check (calls.MAX_WORKER_ID) is tested against it.
CREATE OR REPLACE FUNCTION outbound_heartbeat._is_worker_id(p_worker_id text)
RETURNS boolean
LANGUAGE sql IMMUTABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT p_worker_id IS NOT NULL AND NOT outbound_heartbeat._is_blank(p_worker_id)
           AND pg_catalog.length(p_worker_id) <= 200
$$;
ALTER FUNCTION outbound_heartbeat._is_worker_id(text) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._is_worker_id(text) FROM PUBLIC;

-- OH400 naming worker_id unless _is_worker_id().
CREATE OR REPLACE FUNCTION outbound_heartbeat._require_worker_id(p_worker_id text)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT outbound_heartbeat._is_worker_id(p_worker_id) THEN
        RAISE EXCEPTION USING ERRCODE = 'OH400', COLUMN = 'worker_id',
            MESSAGE = 'worker_id must be a non-empty string of at most 200 characters';
    END IF;
END
$$;
ALTER FUNCTION outbound_heartbeat._require_worker_id(text) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._require_worker_id(text) FROM PUBLIC;

-- Raises OH503 on a hot standby (or in a read-only transaction): p_call stops stale runs or
-- writes, which only the primary (the read-write server) can do. Reads work on a standby.
CREATE OR REPLACE FUNCTION outbound_heartbeat._require_primary(p_call text)
RETURNS void
LANGUAGE plpgsql STABLE SECURITY DEFINER
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
ALTER FUNCTION outbound_heartbeat._require_primary(text) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._require_primary(text) FROM PUBLIC;

-- Sends the NOTIFY of one event, unless the caller marked its open transaction as one that
-- must send none (two-phase commit refuses PREPARE TRANSACTION after a NOTIFY): the mark is the
-- transaction's own id in outbound_heartbeat.skip_notify, so a session-wide value does nothing.
CREATE OR REPLACE FUNCTION outbound_heartbeat._notify_event(
    p_event text, p_run_id bigint, p_business_id bigint)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
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
ALTER FUNCTION outbound_heartbeat._notify_event(text, bigint, bigint) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._notify_event(text, bigint, bigint) FROM PUBLIC;

-- Appends one audit row and announces it: NOTIFY for listeners (sent at commit) and a NOTICE
-- with SQLSTATE OH000 whose DETAIL is the JSON payload, so the caller of this very statement
-- (the Python layer, a psql user) learns what its call did.
CREATE OR REPLACE FUNCTION outbound_heartbeat._record_event(
    p_run_id bigint, p_business_id bigint, p_event text, p_worker_id text, p_detail jsonb)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
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
ALTER FUNCTION outbound_heartbeat._record_event(bigint, bigint, text, text, jsonb) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._record_event(bigint, bigint, text, text, jsonb) FROM PUBLIC;

-- Raises OH423 for a run (or a business's open runs) whose row lock could not be had within
-- lock_timeout, naming the backends that hold it so an operator can end an idle transaction.
CREATE OR REPLACE FUNCTION outbound_heartbeat._raise_run_locked(p_run_id bigint, p_business_id bigint)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
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
ALTER FUNCTION outbound_heartbeat._raise_run_locked(bigint, bigint) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._raise_run_locked(bigint, bigint) FROM PUBLIC;

-- Raises OH404 for a run id that does not exist.
CREATE OR REPLACE FUNCTION outbound_heartbeat._require_run(p_run_id bigint)
RETURNS void
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM public.outbound_call_runs AS r WHERE r.id = p_run_id) THEN
        RAISE EXCEPTION USING ERRCODE = 'OH404', COLUMN = 'run_id',
            MESSAGE = pg_catalog.format('run %s does not exist', p_run_id);
    END IF;
END
$$;
ALTER FUNCTION outbound_heartbeat._require_run(bigint) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._require_run(bigint) FROM PUBLIC;

-- p_subject is new (resolve_call names the call, not its run): the old signature would be ambiguous.
DROP FUNCTION IF EXISTS outbound_heartbeat._require_tenant(bigint, bigint);

-- The tenant check, written once: OH404 when the run is absent, OH403 when p_business_id is
-- given and another business owns it (a NULL business_id is an operator's call), naming the run,
-- or p_subject instead when given (the caller does not know the run). Reads only.
CREATE OR REPLACE FUNCTION outbound_heartbeat._require_tenant(p_run_id bigint, p_business_id bigint,
                                                             p_subject text DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_owner bigint;
BEGIN
    PERFORM outbound_heartbeat._require_run(p_run_id);
    SELECT r.business_id INTO v_owner FROM public.outbound_call_runs AS r WHERE r.id = p_run_id;
    IF p_business_id IS NOT NULL AND v_owner IS DISTINCT FROM p_business_id THEN
        RAISE EXCEPTION USING ERRCODE = 'OH403', COLUMN = 'business_id',
            MESSAGE = pg_catalog.format('%s does not belong to business %s',
                                        COALESCE(p_subject, pg_catalog.format('run %s', p_run_id)), p_business_id);
    END IF;
END
$$;
ALTER FUNCTION outbound_heartbeat._require_tenant(bigint, bigint, text) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._require_tenant(bigint, bigint, text) FROM PUBLIC;

-- Locks a run for an operator or tenant call, after the tenant check (checked before waiting,
-- so a foreign caller never queues on the lock).
CREATE OR REPLACE FUNCTION outbound_heartbeat._lock_run_for_caller(p_run_id bigint, p_business_id bigint)
RETURNS public.outbound_call_runs
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_run public.outbound_call_runs;
BEGIN
    PERFORM outbound_heartbeat._require_primary('a cancel');
    PERFORM outbound_heartbeat._require_tenant(p_run_id, p_business_id);
    SELECT r.* INTO v_run FROM public.outbound_call_runs AS r WHERE r.id = p_run_id FOR UPDATE;
    RETURN v_run;
END
$$;
ALTER FUNCTION outbound_heartbeat._lock_run_for_caller(bigint, bigint) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._lock_run_for_caller(bigint, bigint) FROM PUBLIC;

-- Declares, next to a public function's body, who may call it: p_audience 'app' (the roles of
-- grant_app_role(), and of grant_dba_role()) or 'dba' (grant_dba_role()'s only); grants it at
-- once to those roles already granted (api_roles), so an upgrade never breaks one.
CREATE OR REPLACE FUNCTION outbound_heartbeat._offer_to(p_audience text, p_function regprocedure)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_role text;
BEGIN
    PERFORM outbound_heartbeat._require(p_audience IN ('app', 'dba'), 'p_audience',
                                        pg_catalog.format('p_audience must be app or dba, not %L', p_audience));
    PERFORM outbound_heartbeat._require(
        EXISTS (SELECT 1 FROM pg_catalog.pg_proc AS p
                 WHERE p.oid OPERATOR(pg_catalog.=) p_function
                   AND p.pronamespace OPERATOR(pg_catalog.=) 'outbound_heartbeat'::pg_catalog.regnamespace
                   AND p.proname OPERATOR(pg_catalog.!~) '^_'),
        'p_function', pg_catalog.format('p_function must be a public function of outbound_heartbeat, not %s', p_function));
    -- Rows of functions since dropped or re-created with another signature.
    DELETE FROM outbound_heartbeat.api_functions AS f WHERE pg_catalog.to_regprocedure(f.signature) IS NULL;
    INSERT INTO outbound_heartbeat.api_functions AS f (signature, audience) VALUES (p_function::text, p_audience)
        ON CONFLICT (signature) DO UPDATE SET audience = EXCLUDED.audience
        WHERE f.audience OPERATOR(pg_catalog.<>) EXCLUDED.audience;
    FOR v_role IN
        SELECT r.role::text FROM outbound_heartbeat.api_roles AS r
          JOIN pg_catalog.pg_roles AS g ON g.oid OPERATOR(pg_catalog.=) r.role
         WHERE p_audience OPERATOR(pg_catalog.=) 'app' OR r.audience OPERATOR(pg_catalog.=) 'dba'
         ORDER BY 1
    LOOP
        EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO %s', p_function, v_role);
    END LOOP;
END
$$;
ALTER FUNCTION outbound_heartbeat._offer_to(text, regprocedure) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._offer_to(text, regprocedure) FROM PUBLIC;

-- The functions declared for p_audience by _offer_to() that exist, each once: what
-- grant_app_role() ('app') and grant_dba_role() ('dba') grant.
CREATE OR REPLACE FUNCTION outbound_heartbeat._offered_to(p_audience text)
RETURNS SETOF pg_catalog.regprocedure
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT p.oid::pg_catalog.regprocedure
      FROM outbound_heartbeat.api_functions AS f
      JOIN pg_catalog.pg_proc AS p ON p.oid OPERATOR(pg_catalog.=) pg_catalog.to_regprocedure(f.signature)
     WHERE f.audience OPERATOR(pg_catalog.=) p_audience
     ORDER BY p.oid
$$;
ALTER FUNCTION outbound_heartbeat._offered_to(text) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._offered_to(text) FROM PUBLIC;

-- Records that grant_app_role() ('app') or grant_dba_role() ('dba') was run for p_role, so
-- _offer_to() grants it what later releases declare; forgets the roles since dropped.
CREATE OR REPLACE FUNCTION outbound_heartbeat._enlist_role(p_role text, p_audience text)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM outbound_heartbeat._require(p_audience IN ('app', 'dba'), 'p_audience',
                                        pg_catalog.format('p_audience must be app or dba, not %L', p_audience));
    PERFORM outbound_heartbeat._require(
        EXISTS (SELECT 1 FROM pg_catalog.pg_roles AS g WHERE g.rolname OPERATOR(pg_catalog.=) p_role), 'p_role',
        pg_catalog.format('p_role must name an existing role, not %L', p_role));
    DELETE FROM outbound_heartbeat.api_roles AS r
     WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles AS g WHERE g.oid OPERATOR(pg_catalog.=) r.role);
    INSERT INTO outbound_heartbeat.api_roles AS r (role, audience)
    SELECT g.oid::pg_catalog.regrole, p_audience FROM pg_catalog.pg_roles AS g
     WHERE g.rolname OPERATOR(pg_catalog.=) p_role
        ON CONFLICT (role) DO UPDATE SET audience = EXCLUDED.audience
        WHERE r.audience OPERATOR(pg_catalog.<>) EXCLUDED.audience;
END
$$;
ALTER FUNCTION outbound_heartbeat._enlist_role(text, text) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._enlist_role(text, text) FROM PUBLIC;

REVOKE CREATE ON SCHEMA outbound_heartbeat FROM outbound_heartbeat_owner;
