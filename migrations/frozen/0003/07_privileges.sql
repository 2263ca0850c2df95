-- Privileges: nothing for PUBLIC; two grant helpers a DBA runs (as the schema's owner) for an
-- app role and a DBA role, so neither needs to own a table. The API functions run with the
-- rights of outbound_heartbeat_owner (SECURITY DEFINER, pinned search_path: sql/98_security.sql),
-- so the app role needs EXECUTE on the API and, on the tables, only what the app's own code
-- writes. docs/security.md has the grant table.

REVOKE ALL ON SCHEMA outbound_heartbeat FROM PUBLIC;
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA outbound_heartbeat FROM PUBLIC;

-- The single-argument grant_app_role of earlier releases gives way to the one with `legacy`.
DO $old_signature$
BEGIN
    IF pg_catalog.to_regprocedure('outbound_heartbeat.grant_app_role(text)') IS NOT NULL THEN
        DROP FUNCTION outbound_heartbeat.grant_app_role(text);
    END IF;
END
$old_signature$;

-- Lets role_name run the whole API (web app and workers) and nothing more: EXECUTE on the public
-- API (not the `_` helpers), reading runs, jobs, settings, events and views, creating runs and
-- jobs, updating jobs (telephony callbacks) and the runs' non-lease columns. The lease columns
-- and the audit trail change only through the API. legacy => true also lets a pre-heartbeat
-- worker write locked_by_worker and lock_ts itself during a rolling deploy; calling again without
-- it takes that back. Re-running it moves a role of an earlier release to this model.
CREATE OR REPLACE FUNCTION outbound_heartbeat.grant_app_role(role_name text, legacy boolean DEFAULT false)
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_object text;
    v_columns text;
BEGIN
    PERFORM outbound_heartbeat._require(
        grant_app_role.role_name IS NOT NULL
            AND EXISTS (SELECT 1 FROM pg_catalog.pg_roles AS r WHERE r.rolname = grant_app_role.role_name),
        'role_name', pg_catalog.format('role_name must name an existing role, not %L', grant_app_role.role_name));
    PERFORM outbound_heartbeat._require(grant_app_role.role_name <> 'outbound_heartbeat_owner', 'role_name',
                                        'role_name must not be the API''s owner role');
    PERFORM outbound_heartbeat._require(grant_app_role.legacy IS NOT NULL, 'legacy', 'legacy must be true or false');

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
    -- The public API, whichever release added it; granting privileges stays the owner's business.
    FOR v_object IN
        SELECT p.oid::pg_catalog.regprocedure::text FROM pg_catalog.pg_proc AS p
         WHERE p.pronamespace = 'outbound_heartbeat'::pg_catalog.regnamespace
           AND p.proname !~ '^_' AND p.proname NOT IN ('grant_app_role', 'grant_dba_role', 'prune_events')
    LOOP
        EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO %I', v_object, grant_app_role.role_name);
    END LOOP;

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
       AND a.attname NOT IN ('id', 'run_id', 'business_id', 'created_at', 'lease_epoch', 'lease_request_id');
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

-- An operator role for the CLI and psql: the app's rights, plus fixing anything by hand: every
-- column of runs and jobs, the settings, an event's content (verify_events() reports such an
-- edit) and reading the hash chain. Still no DELETE: the library never deletes an app row.
CREATE OR REPLACE FUNCTION outbound_heartbeat.grant_dba_role(role_name text)
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM outbound_heartbeat.grant_app_role(grant_dba_role.role_name);
    EXECUTE pg_catalog.format('GRANT UPDATE ON public.outbound_call_runs, public.outbound_call_jobs TO %I',
                              grant_dba_role.role_name);
    EXECUTE pg_catalog.format('GRANT INSERT, UPDATE ON outbound_heartbeat.settings TO %I', grant_dba_role.role_name);
    -- Retention is an operator's job, never the app's: prune_events() deletes audit rows.
    EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION outbound_heartbeat.prune_events(integer, integer) TO %I',
                              grant_dba_role.role_name);
    EXECUTE pg_catalog.format(
        'GRANT UPDATE (run_id, business_id, event, worker_id, detail, created_at) ON outbound_heartbeat.run_events TO %I',
        grant_dba_role.role_name);
    IF pg_catalog.to_regclass('outbound_heartbeat.run_event_chain') IS NOT NULL THEN
        EXECUTE pg_catalog.format('GRANT SELECT ON outbound_heartbeat.run_event_chain, outbound_heartbeat.run_event_heads TO %I',
                                  grant_dba_role.role_name);
    END IF;
END
$$;

REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA outbound_heartbeat FROM PUBLIC;

-- Upgrades: a function this release adds (or re-creates with a new signature) has no grant
-- yet. Every role that may already run the API (EXECUTE on heartbeat) gets EXECUTE on every
-- function of the public API too (helpers stay the owner's: sql/98_security.sql), so an
-- upgrade never breaks an app role granted before it.
DO $regrant$
DECLARE
    v_role text;
    v_function regprocedure;
BEGIN
    FOR v_role IN
        SELECT DISTINCT a.grantee::regrole::text
          FROM pg_catalog.pg_proc AS p
         CROSS JOIN LATERAL pg_catalog.aclexplode(p.proacl) AS a
         WHERE p.oid = 'outbound_heartbeat.heartbeat(bigint, text, bigint)'::regprocedure
           AND a.privilege_type = 'EXECUTE' AND a.grantee <> 0 AND a.grantee <> p.proowner
    LOOP
        FOR v_function IN
            SELECT p.oid::regprocedure FROM pg_catalog.pg_proc AS p
             WHERE p.pronamespace = 'outbound_heartbeat'::regnamespace
               AND p.proname NOT IN ('grant_app_role', 'grant_dba_role', 'prune_events')
               AND p.proname NOT LIKE '\_%'
               AND NOT pg_catalog.has_function_privilege(v_role, p.oid, 'EXECUTE')
        LOOP
            EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO %s', v_function, v_role);
        END LOOP;
    END LOOP;
END
$regrant$;
