-- Privileges: nothing for PUBLIC; two grant helpers a DBA runs (as the schema's owner) for an
-- app role and a DBA role, so neither needs to own a table. The functions are SECURITY
-- INVOKER: they can never do more than the calling role itself may do.

REVOKE ALL ON SCHEMA outbound_heartbeat FROM PUBLIC;
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA outbound_heartbeat FROM PUBLIC;

-- Lets role_name run the whole API (web app and workers): the schema, every function, and the
-- rows the API reads and writes. No DELETE or TRUNCATE anywhere, no change to settings.
CREATE OR REPLACE FUNCTION outbound_heartbeat.grant_app_role(role_name text)
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_sequence text;
BEGIN
    PERFORM outbound_heartbeat._require(
        grant_app_role.role_name IS NOT NULL
            AND EXISTS (SELECT 1 FROM pg_catalog.pg_roles AS r WHERE r.rolname = grant_app_role.role_name),
        'role_name', pg_catalog.format('role_name must name an existing role, not %L', grant_app_role.role_name));
    EXECUTE pg_catalog.format('GRANT USAGE ON SCHEMA outbound_heartbeat TO %I', grant_app_role.role_name);
    EXECUTE pg_catalog.format('GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA outbound_heartbeat TO %I',
                              grant_app_role.role_name);
    -- Handing out privileges stays the owner's business.
    EXECUTE pg_catalog.format('REVOKE EXECUTE ON FUNCTION outbound_heartbeat.grant_app_role(text),'
                              ' outbound_heartbeat.grant_dba_role(text) FROM %I', grant_app_role.role_name);
    EXECUTE pg_catalog.format(
        'GRANT SELECT, INSERT, UPDATE ON public.outbound_call_runs, public.outbound_call_jobs TO %I',
        grant_app_role.role_name);
    EXECUTE pg_catalog.format('GRANT SELECT ON outbound_heartbeat.settings TO %I', grant_app_role.role_name);
    EXECUTE pg_catalog.format('GRANT SELECT, INSERT ON outbound_heartbeat.run_events TO %I',
                              grant_app_role.role_name);
    EXECUTE pg_catalog.format(
        'GRANT SELECT ON outbound_heartbeat.active_runs, outbound_heartbeat.stale_runs,'
        ' outbound_heartbeat.oldest_heartbeats, outbound_heartbeat.run_status_counts TO %I',
        grant_app_role.role_name);
    -- Adopted legacy tables may number their rows with serial sequences (identity columns need no grant).
    FOR v_sequence IN
        SELECT s FROM (VALUES (pg_catalog.pg_get_serial_sequence('public.outbound_call_runs', 'id')),
                              (pg_catalog.pg_get_serial_sequence('public.outbound_call_jobs', 'id'))) AS q (s)
         WHERE s IS NOT NULL
    LOOP
        EXECUTE pg_catalog.format('GRANT USAGE ON SEQUENCE %s TO %I', v_sequence, grant_app_role.role_name);
    END LOOP;
END
$$;

-- An operator role for the CLI and psql: everything the app role may do, plus changing the
-- settings. Still no DELETE: the library never deletes a row, and neither need its operators.
CREATE OR REPLACE FUNCTION outbound_heartbeat.grant_dba_role(role_name text)
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM outbound_heartbeat.grant_app_role(grant_dba_role.role_name);
    EXECUTE pg_catalog.format('GRANT UPDATE ON outbound_heartbeat.settings TO %I', grant_dba_role.role_name);
END
$$;

REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA outbound_heartbeat FROM PUBLIC;
