-- Privileges: two grant helpers a DBA runs (as the schema's owner) for an app role and a DBA
-- role, so neither needs to own a table (and a role that owns one is refused), and
-- hand_over_tables() for an app role that does. The API functions run with the rights of
-- outbound_heartbeat_owner, so the app role needs EXECUTE on the API and, on the tables, only
-- what the app's own code writes. Which functions each role may call is declared next to each
-- function's body (_offer_to(), 03_helpers.sql); docs/security.md has the grant table. These
-- three functions stay SECURITY INVOKER and owned by the schema's owner: granting is theirs.

-- Earlier releases' signatures give way to this release's (grant_app_role(text), then
-- grant_app_role(text, boolean) and grant_dba_role(text), before allow_table_owner): an upgraded
-- database has exactly the functions of a fresh one, and no call is ambiguous.
DO $old_signature$
DECLARE
    v_old text;
BEGIN
    FOREACH v_old IN ARRAY ARRAY['outbound_heartbeat.grant_app_role(text)',
                                 'outbound_heartbeat.grant_app_role(text, boolean)',
                                 'outbound_heartbeat.grant_dba_role(text)'] LOOP
        IF pg_catalog.to_regprocedure(v_old) IS NOT NULL THEN
            EXECUTE pg_catalog.format('DROP FUNCTION %s', v_old);
        END IF;
    END LOOP;
END
$old_signature$;

-- A development build between releases 4 and 5 decided app grants by a name rule in this
-- function; the declarations next to each body replaced it.
DROP FUNCTION IF EXISTS outbound_heartbeat._app_api();

-- ALTER FUNCTION ... OWNER TO needs CREATE on the schema for the new owner: held only
-- inside this file's transaction.
GRANT CREATE ON SCHEMA outbound_heartbeat TO outbound_heartbeat_owner;

-- What a role could do as an owner: the first of the app tables, the schema outbound_heartbeat
-- or an object in it that the role owns or can SET ROLE to the owner of (a superuser can to
-- any), as a sentence, or NULL. Such a role holds every right the grants below withhold.
CREATE OR REPLACE FUNCTION outbound_heartbeat._owner_rights_of(p_role text)
RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN o.owner OPERATOR(pg_catalog.=) p_role
                THEN pg_catalog.format('role %I owns %s', p_role, o.object)
                ELSE pg_catalog.format('role %I can SET ROLE to %I, which owns %s', p_role, o.owner, o.object)
           END
      FROM (SELECT c.oid::pg_catalog.regclass::text AS object, pg_catalog.pg_get_userbyid(c.relowner)::text AS owner,
                   1 AS rank, c.oid AS sort
              FROM pg_catalog.pg_class AS c
             WHERE c.oid OPERATOR(pg_catalog.=) ANY (ARRAY['public.outbound_call_runs'::pg_catalog.regclass,
                                                          'public.outbound_call_jobs'::pg_catalog.regclass])
            UNION ALL
            SELECT 'schema outbound_heartbeat', pg_catalog.pg_get_userbyid(n.nspowner)::text, 2, n.oid
              FROM pg_catalog.pg_namespace AS n WHERE n.nspname OPERATOR(pg_catalog.=) 'outbound_heartbeat'
            UNION ALL
            SELECT c.oid::pg_catalog.regclass::text, pg_catalog.pg_get_userbyid(c.relowner)::text, 3, c.oid
              FROM pg_catalog.pg_class AS c
             WHERE c.relnamespace OPERATOR(pg_catalog.=) 'outbound_heartbeat'::pg_catalog.regnamespace
            UNION ALL
            SELECT 'function ' || p.oid::pg_catalog.regprocedure::text, pg_catalog.pg_get_userbyid(p.proowner)::text,
                   4, p.oid
              FROM pg_catalog.pg_proc AS p
             WHERE p.pronamespace OPERATOR(pg_catalog.=) 'outbound_heartbeat'::pg_catalog.regnamespace
            UNION ALL
            SELECT 'type ' || t.oid::pg_catalog.regtype::text, pg_catalog.pg_get_userbyid(t.typowner)::text, 5, t.oid
              FROM pg_catalog.pg_type AS t
             WHERE t.typnamespace OPERATOR(pg_catalog.=) 'outbound_heartbeat'::pg_catalog.regnamespace) AS o
     WHERE pg_catalog.pg_has_role(p_role, o.owner, 'MEMBER')
     ORDER BY o.rank, o.sort
     LIMIT 1
$$;
ALTER FUNCTION outbound_heartbeat._owner_rights_of(text) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._owner_rights_of(text) FROM PUBLIC;

REVOKE CREATE ON SCHEMA outbound_heartbeat FROM outbound_heartbeat_owner;

-- The app's rights and nothing more: the API, reads, new runs and jobs, non-lease columns; the
-- lease columns and the audit trail change only through the API. A role that owns (or can SET
-- ROLE to the owner of) the tables would keep every withheld right: OH400 unless allow_table_owner.
CREATE OR REPLACE FUNCTION outbound_heartbeat.grant_app_role(role_name text, legacy boolean DEFAULT false,
                                                            allow_table_owner boolean DEFAULT false)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_object text;
    v_columns text;
    v_owner_rights text;
BEGIN
    PERFORM outbound_heartbeat._require(
        grant_app_role.role_name IS NOT NULL
            AND EXISTS (SELECT 1 FROM pg_catalog.pg_roles AS r WHERE r.rolname = grant_app_role.role_name),
        'role_name', pg_catalog.format('role_name must name an existing role, not %L', grant_app_role.role_name));
    PERFORM outbound_heartbeat._require(grant_app_role.role_name <> 'outbound_heartbeat_owner', 'role_name',
                                        'role_name must not be the API''s owner role');
    PERFORM outbound_heartbeat._require(grant_app_role.legacy IS NOT NULL, 'legacy', 'legacy must be true or false');
    PERFORM outbound_heartbeat._require(grant_app_role.allow_table_owner IS NOT NULL, 'allow_table_owner',
                                        'allow_table_owner must be true or false');
    v_owner_rights := outbound_heartbeat._owner_rights_of(grant_app_role.role_name);
    IF v_owner_rights IS NOT NULL AND NOT grant_app_role.allow_table_owner THEN
        RAISE EXCEPTION USING ERRCODE = 'OH400', COLUMN = 'role_name',
            MESSAGE = pg_catalog.format(
                '%s: as an owner it can write the lease columns, disable the library''s triggers and run its'
                ' own code with the API''s rights, so these grants would not hold', v_owner_rights),
            HINT = pg_catalog.format('Hand the tables over first: SELECT * FROM outbound_heartbeat.hand_over_tables(%L);'
                                     ' or pass allow_table_owner => true to grant anyway.', grant_app_role.role_name);
    END IF;
    IF v_owner_rights IS NOT NULL THEN
        RAISE WARNING USING
            MESSAGE = pg_catalog.format(
                'UNSAFE grant_app_role(%L, allow_table_owner => true): %s; the library''s promises against'
                ' this role do not hold (docs/security.md, "Who owns the tables")',
                grant_app_role.role_name, v_owner_rights),
            HINT = pg_catalog.format('SELECT * FROM outbound_heartbeat.hand_over_tables(%L);', grant_app_role.role_name);
    END IF;

    -- Start from nothing the library granted (earlier releases: SELECT, INSERT, UPDATE on both
    -- tables, INSERT on run_events, EXECUTE on every function). A table the role owns is its own.
    FOR v_object IN
        SELECT c.oid::pg_catalog.regclass::text FROM pg_catalog.pg_class AS c
         WHERE c.oid IN ('public.outbound_call_runs'::pg_catalog.regclass, 'public.outbound_call_jobs'::pg_catalog.regclass)
           AND c.relowner <> (SELECT r.oid FROM pg_catalog.pg_roles AS r WHERE r.rolname = grant_app_role.role_name)
    LOOP
        EXECUTE pg_catalog.format('REVOKE ALL ON %s FROM %I', v_object, grant_app_role.role_name);
    END LOOP;
    EXECUTE pg_catalog.format('REVOKE ALL ON ALL TABLES IN SCHEMA outbound_heartbeat FROM %I', grant_app_role.role_name);
    EXECUTE pg_catalog.format('REVOKE ALL ON ALL FUNCTIONS IN SCHEMA outbound_heartbeat FROM %I', grant_app_role.role_name);

    EXECUTE pg_catalog.format('GRANT USAGE ON SCHEMA outbound_heartbeat TO %I', grant_app_role.role_name);
    -- The functions declared for app roles next to their bodies (_offer_to('app', ...)); the role
    -- is recorded, so a function a later release declares is granted to it then.
    FOR v_object IN
        SELECT f::text FROM outbound_heartbeat._offered_to('app') AS f
    LOOP
        EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO %I', v_object, grant_app_role.role_name);
    END LOOP;
    PERFORM outbound_heartbeat._enlist_role(grant_app_role.role_name, 'app');

    -- Runs: read, and create and update every column but the id and the lease columns.
    SELECT pg_catalog.string_agg(pg_catalog.quote_ident(a.attname), ', ' ORDER BY a.attnum) INTO v_columns
      FROM pg_catalog.pg_attribute AS a
     WHERE a.attrelid = 'public.outbound_call_runs'::pg_catalog.regclass AND a.attnum > 0 AND NOT a.attisdropped
       AND a.attname NOT IN ('id', 'locked_by_worker', 'lock_ts', 'last_heartbeat_at', 'lease_epoch',
                             'cancel_requested_at');
    EXECUTE pg_catalog.format('GRANT SELECT, INSERT (%2$s), UPDATE (%2$s) ON public.outbound_call_runs TO %1$I',
                              grant_app_role.role_name, v_columns);
    IF grant_app_role.legacy THEN
        EXECUTE pg_catalog.format('GRANT UPDATE (locked_by_worker, lock_ts) ON public.outbound_call_runs TO %I',
                                  grant_app_role.role_name);
    END IF;
    -- Jobs: read and create; update all but their identity (status from telephony callbacks)
    -- and the lease columns next_job writes (the retry fence of docs/worker-lease.md).
    SELECT pg_catalog.string_agg(pg_catalog.quote_ident(a.attname), ', ' ORDER BY a.attnum) INTO v_columns
      FROM pg_catalog.pg_attribute AS a
     WHERE a.attrelid = 'public.outbound_call_jobs'::pg_catalog.regclass AND a.attnum > 0 AND NOT a.attisdropped
       AND a.attname NOT IN ('id', 'run_id', 'business_id', 'created_at', 'lease_epoch', 'lease_request_id',
                             -- the calls' columns (15_calls.sql): the key is a credential,
                             -- the rest resolve_call() and the runs' ends write
                             'call_attempt', 'call_key', 'orphaned_at', 'orphan_reason', 'call_outcome',
                             'call_settled_at');
    EXECUTE pg_catalog.format('GRANT SELECT, INSERT, UPDATE (%2$s) ON public.outbound_call_jobs TO %1$I',
                              grant_app_role.role_name, v_columns);
    -- Read-only: settings, the audit trail and every view of the library.
    FOR v_object IN
        SELECT c.oid::pg_catalog.regclass::text FROM pg_catalog.pg_class AS c
         WHERE c.relnamespace = 'outbound_heartbeat'::pg_catalog.regnamespace
           AND (c.relkind = 'v' OR c.relname IN ('settings', 'run_events'))
    LOOP
        EXECUTE pg_catalog.format('GRANT SELECT ON %s TO %I', v_object, grant_app_role.role_name);
    END LOOP;
    -- Adopted legacy tables may number their rows with serial sequences (identity columns need no grant).
    FOR v_object IN
        SELECT s FROM (VALUES (pg_catalog.pg_get_serial_sequence('public.outbound_call_runs', 'id')),
                              (pg_catalog.pg_get_serial_sequence('public.outbound_call_jobs', 'id'))) AS q (s)
         WHERE s IS NOT NULL
    LOOP
        EXECUTE pg_catalog.format('GRANT USAGE ON SEQUENCE %s TO %I', v_object, grant_app_role.role_name);
    END LOOP;
END
$$;
REVOKE ALL ON FUNCTION outbound_heartbeat.grant_app_role(text, boolean, boolean) FROM PUBLIC;
-- Offered to no role: granting is the schema owner's business.
COMMENT ON FUNCTION outbound_heartbeat.grant_app_role(text, boolean, boolean) IS
    'Lets a role run the whole API (the web app and the workers); refuses (OH400) a role that owns the tables or can SET ROLE to their owner unless allow_table_owner, then warns UNSAFE; run by the schema''s owner.';

-- An operator's rights (CLI, psql): the app's, plus editing any column, the settings and an
-- event's content (verify_events() then reports it), pruning and the counters' checks. Still no
-- DELETE on an app row: the library never deletes one.
CREATE OR REPLACE FUNCTION outbound_heartbeat.grant_dba_role(role_name text, allow_table_owner boolean DEFAULT false)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_function text;
BEGIN
    PERFORM outbound_heartbeat.grant_app_role(grant_dba_role.role_name, false, grant_dba_role.allow_table_owner);
    EXECUTE pg_catalog.format('GRANT UPDATE ON public.outbound_call_runs, public.outbound_call_jobs TO %I',
                              grant_dba_role.role_name);
    EXECUTE pg_catalog.format('GRANT INSERT, UPDATE ON outbound_heartbeat.settings TO %I', grant_dba_role.role_name);
    -- The operator's functions, declared next to their bodies (_offer_to('dba', ...)), each with
    -- its reason; the role is recorded, so one a later release declares is granted to it then.
    FOR v_function IN
        SELECT f::text FROM outbound_heartbeat._offered_to('dba') AS f
    LOOP
        EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO %I', v_function, grant_dba_role.role_name);
    END LOOP;
    PERFORM outbound_heartbeat._enlist_role(grant_dba_role.role_name, 'dba');
    EXECUTE pg_catalog.format(
        'GRANT UPDATE (run_id, business_id, event, worker_id, detail, created_at) ON outbound_heartbeat.run_events TO %I',
        grant_dba_role.role_name);
    IF pg_catalog.to_regclass('outbound_heartbeat.run_event_chain') IS NOT NULL THEN
        EXECUTE pg_catalog.format('GRANT SELECT ON outbound_heartbeat.run_event_chain, outbound_heartbeat.run_event_heads TO %I',
                                  grant_dba_role.role_name);
    END IF;
    -- pg_cron installed in this database (docs/scheduling.md): an operator schedules the sweep and
    -- the prune as itself, which needs USAGE on pg_cron's schema. Only its owner (a superuser)
    -- may grant it: anyone else gets a WARNING naming the statement a superuser must run.
    IF pg_catalog.to_regnamespace('cron') IS NOT NULL THEN
        BEGIN
            EXECUTE pg_catalog.format('GRANT USAGE ON SCHEMA cron TO %I', grant_dba_role.role_name);
        EXCEPTION WHEN insufficient_privilege THEN
            NULL;  -- reported below
        END;
        IF NOT pg_catalog.has_schema_privilege(grant_dba_role.role_name, 'cron', 'USAGE') THEN
            RAISE WARNING USING
                MESSAGE = pg_catalog.format('grant_dba_role(%L): %I may not grant USAGE on schema cron, so %I cannot'
                                            ' schedule jobs with pg_cron', grant_dba_role.role_name, CURRENT_USER,
                                            grant_dba_role.role_name),
                HINT = pg_catalog.format('As a superuser: GRANT USAGE ON SCHEMA cron TO %I;', grant_dba_role.role_name);
        END IF;
    END IF;
END
$$;
REVOKE ALL ON FUNCTION outbound_heartbeat.grant_dba_role(text, boolean) FROM PUBLIC;
-- Offered to no role: granting is the schema owner's business.
COMMENT ON FUNCTION outbound_heartbeat.grant_dba_role(text, boolean) IS
    'Lets a role operate the library: the app''s rights, plus changing the settings, any column of the two tables and an event''s content (which verify_events() then reports); run by the schema''s owner.';

-- ALTER FUNCTION ... OWNER TO needs CREATE on the schema for the new owner: held only
-- inside this file's transaction.
GRANT CREATE ON SCHEMA outbound_heartbeat TO outbound_heartbeat_owner;

-- What hand_over_tables() moves, in order: the app tables, the schema outbound_heartbeat and its
-- objects that p_app_role owns or can SET ROLE to the owner of (indexes, owned sequences and a
-- table's row type follow their table).
CREATE OR REPLACE FUNCTION outbound_heartbeat._handover_objects(p_app_role text, p_owner_role text)
RETURNS TABLE (kind text, name text, owner text)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT o.kind, o.name, o.owner
      FROM (SELECT 1 AS rank, c.oid AS sort, c.relkind::text AS kind, c.oid::pg_catalog.regclass::text AS name,
                   pg_catalog.pg_get_userbyid(c.relowner)::text AS owner
              FROM pg_catalog.pg_class AS c
             WHERE (c.oid = ANY (ARRAY['public.outbound_call_runs'::pg_catalog.regclass,
                                       'public.outbound_call_jobs'::pg_catalog.regclass])
                    OR (c.relnamespace = 'outbound_heartbeat'::pg_catalog.regnamespace
                        AND c.relkind IN ('r', 'p', 'v', 'm', 'c', 'S')))
               AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend AS d
                                WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.objid = c.oid
                                  AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass
                                  AND d.deptype IN ('a', 'i'))
            UNION ALL
            SELECT 2, n.oid, 'schema', pg_catalog.quote_ident(n.nspname), pg_catalog.pg_get_userbyid(n.nspowner)::text
              FROM pg_catalog.pg_namespace AS n WHERE n.nspname = 'outbound_heartbeat'
            UNION ALL
            SELECT 3, p.oid, 'function', p.oid::pg_catalog.regprocedure::text,
                   pg_catalog.pg_get_userbyid(p.proowner)::text
              FROM pg_catalog.pg_proc AS p
             WHERE p.pronamespace = 'outbound_heartbeat'::pg_catalog.regnamespace AND p.prokind IN ('f', 'p')
            UNION ALL
            SELECT 4, t.oid, CASE t.typtype WHEN 'd' THEN 'domain' ELSE 'type' END, t.oid::pg_catalog.regtype::text,
                   pg_catalog.pg_get_userbyid(t.typowner)::text
              FROM pg_catalog.pg_type AS t
             WHERE t.typnamespace = 'outbound_heartbeat'::pg_catalog.regnamespace
               AND t.typrelid = 0 AND t.typelem = 0 AND t.typtype IN ('e', 'd', 'b', 'r')) AS o
     WHERE o.owner <> p_owner_role
       AND pg_catalog.pg_has_role(p_app_role, o.owner, 'MEMBER')
     ORDER BY o.rank, o.sort
$$;
ALTER FUNCTION outbound_heartbeat._handover_objects(text, text) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._handover_objects(text, text) FROM PUBLIC;

REVOKE CREATE ON SCHEMA outbound_heartbeat FROM outbound_heartbeat_owner;

-- Moves the app tables, and whatever of the schema app_role can act as the owner of, to a trusted
-- owner_role and leaves app_role grant_app_role()'s rights (docs/security.md, "Who owns the
-- tables"): online, short lock attempts (OH423 naming holders); idempotent.
CREATE OR REPLACE FUNCTION outbound_heartbeat.hand_over_tables(
    app_role text, owner_role text DEFAULT 'outbound_heartbeat_owner', legacy boolean DEFAULT false,
    lock_timeout interval DEFAULT interval '500 milliseconds', attempts integer DEFAULT 10)
RETURNS TABLE (moved text, from_owner text, to_owner text)
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_caller_lock_timeout text := pg_catalog.current_setting('lock_timeout');
    v_found text;
    v_move record;
    v_tables text;
    v_attempt integer;
    v_locked boolean := false;
    v_pause double precision := 0.05;
BEGIN
    PERFORM outbound_heartbeat._require(
        hand_over_tables.app_role IS NOT NULL
            AND EXISTS (SELECT 1 FROM pg_catalog.pg_roles AS r WHERE r.rolname = hand_over_tables.app_role),
        'app_role', pg_catalog.format('app_role must name an existing role, not %L', hand_over_tables.app_role));
    PERFORM outbound_heartbeat._require(hand_over_tables.app_role <> 'outbound_heartbeat_owner', 'app_role',
                                        'app_role must not be the API''s owner role');
    PERFORM outbound_heartbeat._require(
        NOT (SELECT r.rolsuper FROM pg_catalog.pg_roles AS r WHERE r.rolname = hand_over_tables.app_role),
        'app_role', pg_catalog.format('app_role %I is a superuser: no handover can limit it; give the app a role'
                                      ' of its own', hand_over_tables.app_role));
    PERFORM outbound_heartbeat._require(
        hand_over_tables.owner_role IS NOT NULL
            AND EXISTS (SELECT 1 FROM pg_catalog.pg_roles AS r WHERE r.rolname = hand_over_tables.owner_role),
        'owner_role', pg_catalog.format('owner_role must name an existing role, not %L', hand_over_tables.owner_role));
    PERFORM outbound_heartbeat._require(hand_over_tables.owner_role <> hand_over_tables.app_role, 'owner_role',
                                        'owner_role must not be app_role');
    PERFORM outbound_heartbeat._require(
        pg_catalog.pg_has_role(hand_over_tables.owner_role, 'outbound_heartbeat_owner', 'MEMBER'), 'owner_role',
        pg_catalog.format('owner_role %I must be outbound_heartbeat_owner or a member of it (a role the API trusts)',
                          hand_over_tables.owner_role));
    PERFORM outbound_heartbeat._require(
        pg_catalog.pg_has_role(CURRENT_USER, hand_over_tables.owner_role, 'MEMBER'), 'owner_role',
        pg_catalog.format('%I cannot give objects to %I: run this as a superuser, or as a member of both %I and %I',
                          CURRENT_USER, hand_over_tables.owner_role, hand_over_tables.owner_role,
                          hand_over_tables.app_role));
    PERFORM outbound_heartbeat._require(hand_over_tables.legacy IS NOT NULL, 'legacy', 'legacy must be true or false');
    PERFORM outbound_heartbeat._require(
        hand_over_tables.lock_timeout > interval '0' AND hand_over_tables.lock_timeout <= interval '1 minute',
        'lock_timeout', 'lock_timeout must be between 1 ms and 1 minute');
    PERFORM outbound_heartbeat._require(hand_over_tables.attempts BETWEEN 1 AND 1000, 'attempts',
                                        'attempts must be between 1 and 1000');
    -- Code app_role attached would stay on the tables and run with the API's rights.
    v_found := outbound_heartbeat._foreign_table_code(true);
    PERFORM outbound_heartbeat._require(v_found IS NULL, 'app_role',
        pg_catalog.format('%s: drop it (or make the trigger function SECURITY DEFINER) before the handover', v_found));

    -- Direct memberships that would let app_role become the owner again.
    FOR v_move IN
        SELECT pg_catalog.pg_get_userbyid(m.roleid) AS granted
          FROM pg_catalog.pg_auth_members AS m
         WHERE m.member = (SELECT r.oid FROM pg_catalog.pg_roles AS r WHERE r.rolname = hand_over_tables.app_role)
           AND pg_catalog.pg_get_userbyid(m.roleid) IN (hand_over_tables.owner_role, 'outbound_heartbeat_owner')
    LOOP
        EXECUTE pg_catalog.format('REVOKE %I FROM %I', v_move.granted, hand_over_tables.app_role);
        moved := 'membership in ' || v_move.granted;
        from_owner := hand_over_tables.app_role;
        to_owner := NULL;
        RETURN NEXT;
    END LOOP;

    SELECT pg_catalog.string_agg(m.name, ', ') INTO v_tables
      FROM outbound_heartbeat._handover_objects(hand_over_tables.app_role, hand_over_tables.owner_role) AS m
     WHERE m.kind IN ('r', 'p', 'v', 'm', 'S');
    IF v_tables IS NOT NULL THEN
        FOR v_attempt IN 1 .. hand_over_tables.attempts LOOP
            BEGIN
                PERFORM pg_catalog.set_config('lock_timeout',
                    pg_catalog.ceil(EXTRACT(epoch FROM hand_over_tables.lock_timeout) * 1000)::bigint::text, true);
                EXECUTE 'LOCK TABLE ' || v_tables || ' IN ACCESS EXCLUSIVE MODE';
                v_locked := true;
            EXCEPTION WHEN lock_not_available THEN
                v_locked := false;  -- the attempt's locks went with its subtransaction
            END;
            EXIT WHEN v_locked;
            IF v_attempt < hand_over_tables.attempts THEN
                PERFORM pg_catalog.pg_sleep(v_pause);
                v_pause := LEAST(v_pause * 2, 2.0);
            END IF;
        END LOOP;
        PERFORM pg_catalog.set_config('lock_timeout', v_caller_lock_timeout, true);
        IF NOT v_locked THEN
            RAISE EXCEPTION USING ERRCODE = 'OH423',
                MESSAGE = pg_catalog.format(
                    'hand_over_tables: %s attempts of %s to lock %s timed out; held by %s. Nothing was changed:'
                    ' run it again later', hand_over_tables.attempts, hand_over_tables.lock_timeout, v_tables,
                    COALESCE((SELECT pg_catalog.string_agg(DISTINCT pg_catalog.format('pid %s (%s)', a.pid, a.state), ', ')
                                FROM pg_catalog.pg_locks AS l
                                JOIN pg_catalog.pg_stat_activity AS a ON a.pid = l.pid
                               WHERE l.granted AND l.pid <> pg_catalog.pg_backend_pid()
                                 AND l.relation = ANY (ARRAY['public.outbound_call_runs'::pg_catalog.regclass,
                                                             'public.outbound_call_jobs'::pg_catalog.regclass])),
                             'sessions that have since let go'));
        END IF;
    END IF;
    FOR v_move IN
        SELECT m.* FROM outbound_heartbeat._handover_objects(hand_over_tables.app_role, hand_over_tables.owner_role) AS m
    LOOP
        EXECUTE pg_catalog.format('ALTER %s %s OWNER TO %I',
            CASE v_move.kind WHEN 'r' THEN 'TABLE' WHEN 'p' THEN 'TABLE' WHEN 'v' THEN 'VIEW'
                             WHEN 'm' THEN 'MATERIALIZED VIEW' WHEN 'S' THEN 'SEQUENCE' WHEN 'c' THEN 'TYPE'
                             WHEN 'schema' THEN 'SCHEMA' WHEN 'function' THEN 'ROUTINE'
                             WHEN 'domain' THEN 'DOMAIN' ELSE 'TYPE' END,
            v_move.name, hand_over_tables.owner_role);
        moved := v_move.name;
        from_owner := v_move.owner;
        to_owner := hand_over_tables.owner_role;
        RETURN NEXT;
    END LOOP;

    v_found := outbound_heartbeat._owner_rights_of(hand_over_tables.app_role);
    PERFORM outbound_heartbeat._require(v_found IS NULL, 'app_role',
        pg_catalog.format('%s even after the handover (an indirect membership): revoke it first', v_found));
    PERFORM outbound_heartbeat.grant_app_role(hand_over_tables.app_role, hand_over_tables.legacy);
END
$$;
REVOKE ALL ON FUNCTION outbound_heartbeat.hand_over_tables(text, text, boolean, interval, integer) FROM PUBLIC;
-- Offered to no role: granting is the schema owner's business.
COMMENT ON FUNCTION outbound_heartbeat.hand_over_tables(text, text, boolean, interval, integer) IS
    'Moves the app tables (and whatever of the library''s schema app_role can act as the owner of) to owner_role, online, and leaves app_role exactly grant_app_role''s rights; refuses code app_role attached; idempotent. Run by a superuser.';

-- Upgrades: earlier releases granted EXECUTE on every function, the `_` helpers included, to
-- the app role. The helpers run for the API only: nobody but their owner may call them.
DO $helpers_owner_only$
DECLARE
    v_grant record;
BEGIN
    FOR v_grant IN
        SELECT DISTINCT p.oid::pg_catalog.regprocedure AS signature, a.grantee::pg_catalog.regrole AS grantee
          FROM pg_catalog.pg_proc AS p, pg_catalog.aclexplode(p.proacl) AS a
         WHERE p.pronamespace = 'outbound_heartbeat'::pg_catalog.regnamespace AND p.proname ~ '^_'
           AND a.grantee <> 0 AND a.grantee <> p.proowner
    LOOP
        EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION %s FROM %s', v_grant.signature, v_grant.grantee);
    END LOOP;
END
$helpers_owner_only$;

-- A safety net only: every function above revokes PUBLIC's EXECUTE next to its body, and
-- tests/test_sql_layout.py fails if one does not.
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA outbound_heartbeat FROM PUBLIC;
