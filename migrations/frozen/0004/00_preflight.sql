-- outbound_heartbeat: what must hold before anything is installed. Creates nothing.
--
-- Refuses to install over a library object (an index or trigger on the app's tables, or any
-- index, trigger, default or constraint in the library's schema) that an earlier install
-- built around an operator or function from a schema other than pg_catalog and
-- outbound_heartbeat: such an object runs that code on every write, with the writer's rights
-- (the migrating superuser's, the owner's under the API). Releases before this one resolved
-- the operators of index predicates and trigger conditions through the migrating session's
-- search_path, so an operator a non-superuser planted in public could be captured. The
-- installer never repairs it silently: a DBA reads what it ran, drops the named objects, and
-- migrates again, which rebuilds them with pg_catalog's operators.
DO $preflight$
DECLARE
    v_found text;
BEGIN
    SELECT pg_catalog.string_agg(DISTINCT pg_catalog.format('%s uses %s %s', o.label, r.type,
               r.identity), '; ')
      INTO v_found
      FROM (SELECT 'pg_catalog.pg_class'::pg_catalog.regclass AS classid, c.oid AS objid,
                   pg_catalog.format('index %s', c.oid::pg_catalog.regclass) AS label
              FROM pg_catalog.pg_class AS c
              JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
             WHERE c.relkind = 'i'
               AND (n.nspname = 'outbound_heartbeat'
                    OR (n.nspname = 'public'
                        AND c.relname IN ('outbound_call_runs_active_idx', 'outbound_call_jobs_open_idx',
                                          'outbound_call_jobs_handed_out_idx', 'outbound_call_jobs_run_idx')))
            UNION ALL
            SELECT 'pg_catalog.pg_trigger'::pg_catalog.regclass, t.oid,
                   pg_catalog.format('trigger %I on %s', t.tgname, t.tgrelid::pg_catalog.regclass)
              FROM pg_catalog.pg_trigger AS t
              JOIN pg_catalog.pg_class AS c ON c.oid = t.tgrelid
              JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
             WHERE NOT t.tgisinternal
               AND (n.nspname = 'outbound_heartbeat'
                    OR (n.nspname = 'public' AND c.relname IN ('outbound_call_runs', 'outbound_call_jobs')
                        AND t.tgname LIKE 'outbound\_heartbeat\_%'))
            UNION ALL
            SELECT 'pg_catalog.pg_attrdef'::pg_catalog.regclass, ad.oid,
                   pg_catalog.format('the default of %s.%I', ad.adrelid::pg_catalog.regclass, a.attname)
              FROM pg_catalog.pg_attrdef AS ad
              JOIN pg_catalog.pg_attribute AS a ON a.attrelid = ad.adrelid AND a.attnum = ad.adnum
              JOIN pg_catalog.pg_class AS c ON c.oid = ad.adrelid
              JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
             WHERE n.nspname = 'outbound_heartbeat'
            UNION ALL
            SELECT 'pg_catalog.pg_constraint'::pg_catalog.regclass, k.oid,
                   pg_catalog.format('constraint %I on %s', k.conname, k.conrelid::pg_catalog.regclass)
              FROM pg_catalog.pg_constraint AS k
              JOIN pg_catalog.pg_namespace AS n ON n.oid = k.connamespace
             WHERE n.nspname = 'outbound_heartbeat') AS o
      JOIN pg_catalog.pg_depend AS d ON d.classid = o.classid AND d.objid = o.objid
      LEFT JOIN pg_catalog.pg_operator AS op
        ON d.refclassid = 'pg_catalog.pg_operator'::pg_catalog.regclass AND op.oid = d.refobjid
      LEFT JOIN pg_catalog.pg_proc AS p
        ON d.refclassid = 'pg_catalog.pg_proc'::pg_catalog.regclass AND p.oid = d.refobjid
      JOIN pg_catalog.pg_namespace AS rn ON rn.oid = COALESCE(op.oprnamespace, p.pronamespace)
      CROSS JOIN LATERAL pg_catalog.pg_identify_object(d.refclassid, d.refobjid, 0) AS r
     WHERE rn.nspname NOT IN ('pg_catalog', 'outbound_heartbeat');
    IF v_found IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'OHS01',
            MESSAGE = pg_catalog.format('refusing to install: %s (built by an earlier install'
                ' through a search_path a non-superuser could write; it runs that code on'
                ' every write)', v_found),
            HINT = 'Check what that code did, drop the objects named, and migrate again:'
                ' they are rebuilt with pg_catalog''s operators.';
    END IF;
END
$preflight$;
