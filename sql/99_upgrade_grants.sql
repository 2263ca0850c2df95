-- After every other file: what an upgrade owes the roles granted before it.

-- Upgrades: a function this release adds (or re-creates with a new signature) has no grant
-- yet. Every role that may already run the API (EXECUTE on heartbeat) gets EXECUTE on every
-- function of the public API too (helpers stay the owner's), so an upgrade never breaks an app
-- role granted before it. The last file: every function of every file exists by now.
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
            SELECT f FROM outbound_heartbeat._app_api() AS f
             WHERE NOT pg_catalog.has_function_privilege(v_role, f, 'EXECUTE')
        LOOP
            EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO %s', v_function, v_role);
        END LOOP;
    END LOOP;
END
$regrant$;
