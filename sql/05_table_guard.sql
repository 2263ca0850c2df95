-- The table guard (docs/security.md, "Who owns the tables"). The API runs with the rights of
-- outbound_heartbeat_owner, and every statement it runs on public.outbound_call_runs /
-- outbound_call_jobs also runs the code attached to them: triggers and their WHEN clauses,
-- rules, row-level security policies, column defaults, CHECK constraints, index expressions.
-- Whoever can write that code borrows the owner's rights, so the API runs it only when a trusted
-- role wrote it: a member of outbound_heartbeat_owner (the migrating role) or a superuser, as
-- pg_has_role(..., 'MEMBER') says. The heartbeats read the quick test (_unvetted_tables) for the
-- one table they write and call the full check only when it fails.

-- ALTER FUNCTION ... OWNER TO needs CREATE on the schema for the new owner: held only
-- inside this file's transaction.
GRANT CREATE ON SCHEMA outbound_heartbeat TO outbound_heartbeat_owner;

-- The first code on the app's tables that the API must not run with its owner's rights ('table:
-- what'), or NULL: whoever wrote it would borrow those rights. What counts as foreign, and what
-- is not followed (domain constraints), is docs/security.md's "Who owns the tables".
CREATE OR REPLACE FUNCTION outbound_heartbeat._foreign_table_code(p_as_untrusted boolean DEFAULT false)
RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    -- a node tree's call of a built-in that runs a query given as text or reads a table by name
    v_runs_sql text := (
        SELECT ':funcid (' OPERATOR(pg_catalog.||) pg_catalog.string_agg(p.oid::text, '|')
               OPERATOR(pg_catalog.||) ') '
          FROM pg_catalog.pg_proc AS p
         WHERE p.pronamespace OPERATOR(pg_catalog.=) 'pg_catalog'::pg_catalog.regnamespace
           AND p.proname OPERATOR(pg_catalog.=) ANY (ARRAY['query_to_xml', 'query_to_xmlschema',
               'query_to_xml_and_xmlschema', 'table_to_xml', 'table_to_xmlschema', 'table_to_xml_and_xmlschema',
               'schema_to_xml', 'schema_to_xmlschema', 'schema_to_xml_and_xmlschema', 'database_to_xml',
               'database_to_xmlschema', 'database_to_xml_and_xmlschema', 'cursor_to_xml',
               'ts_stat']::pg_catalog.name[]));
BEGIN
    -- plpgsql, not sql: its plan is cached for the session (a sql function with SET is planned per call).
    RETURN (
    SELECT pg_catalog.format('%s: %s', c.oid::pg_catalog.regclass, f.what)
      FROM pg_catalog.pg_class AS c
     CROSS JOIN LATERAL (SELECT p_as_untrusted
                                OR NOT pg_catalog.pg_has_role(c.relowner, 'outbound_heartbeat_owner', 'MEMBER')) AS u (untrusted)
     CROSS JOIN LATERAL (
        SELECT pg_catalog.format('trigger %I runs %s, a SECURITY INVOKER function owned by %I',
                                 t.tgname, t.tgfoid::pg_catalog.regprocedure, pg_catalog.pg_get_userbyid(p.proowner)),
               1
          FROM pg_catalog.pg_trigger AS t
          JOIN pg_catalog.pg_proc AS p ON p.oid OPERATOR(pg_catalog.=) t.tgfoid
         WHERE t.tgrelid OPERATOR(pg_catalog.=) c.oid AND NOT t.tgisinternal
           AND t.tgenabled OPERATOR(pg_catalog.<>) 'D' AND NOT p.prosecdef
           AND NOT pg_catalog.pg_has_role(p.proowner, 'outbound_heartbeat_owner', 'MEMBER')
        UNION ALL
        SELECT 'has a rule', 2 WHERE c.relhasrules AND u.untrusted
        UNION ALL
        SELECT 'has row-level security enabled', 3 WHERE c.relrowsecurity AND u.untrusted
        UNION ALL
        SELECT pg_catalog.format('library trigger %I is disabled', t.tgname), 4
          FROM pg_catalog.pg_trigger AS t
          JOIN pg_catalog.pg_proc AS p ON p.oid OPERATOR(pg_catalog.=) t.tgfoid
         WHERE u.untrusted AND t.tgrelid OPERATOR(pg_catalog.=) c.oid AND NOT t.tgisinternal
           AND t.tgenabled OPERATOR(pg_catalog.=) 'D'
           AND p.pronamespace OPERATOR(pg_catalog.=) 'outbound_heartbeat'::pg_catalog.regnamespace
        UNION ALL
        SELECT pg_catalog.format('%s calls %s (written by the table''s owner)',
                                 pg_catalog.pg_describe_object(d.classid, d.objid, d.objsubid),
                                 pg_catalog.pg_describe_object(x.refclassid, x.refobjid, 0)), 5
          FROM pg_catalog.pg_depend AS d
          JOIN pg_catalog.pg_depend AS x
            ON x.classid OPERATOR(pg_catalog.=) d.classid AND x.objid OPERATOR(pg_catalog.=) d.objid
         WHERE u.untrusted
           AND d.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
           AND d.refobjid OPERATOR(pg_catalog.=) c.oid AND d.deptype OPERATOR(pg_catalog.=) 'a'
           AND x.refclassid OPERATOR(pg_catalog.=) ANY (ARRAY['pg_catalog.pg_proc'::pg_catalog.regclass,
                                                              'pg_catalog.pg_operator'::pg_catalog.regclass])
           AND x.refobjid OPERATOR(pg_catalog.>=) 16384::pg_catalog.oid
           -- a trigger's own function is judged above (a library trigger runs a library function);
           -- a library function called from anything else the owner attached is foreign code
           AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger AS t
                            WHERE d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_trigger'::pg_catalog.regclass
                              AND t.oid OPERATOR(pg_catalog.=) d.objid AND t.tgfoid OPERATOR(pg_catalog.=) x.refobjid)
        UNION ALL
        -- built-ins that run a query or read a table named as text, with the caller's (the owner's)
        -- rights; pg_depend records no use of a built-in, so the stored expression trees are read
        SELECT pg_catalog.format('%s calls %s (written by the table''s owner)',
                                 pg_catalog.pg_describe_object(e.classid, e.objid, 0), sp.oid::pg_catalog.regprocedure), 6
          FROM (SELECT 'pg_catalog.pg_attrdef'::pg_catalog.regclass, a.oid, a.adbin::text
                  FROM pg_catalog.pg_attrdef AS a WHERE a.adrelid OPERATOR(pg_catalog.=) c.oid
                UNION ALL
                SELECT 'pg_catalog.pg_constraint'::pg_catalog.regclass, k.oid, k.conbin::text
                  FROM pg_catalog.pg_constraint AS k WHERE k.conrelid OPERATOR(pg_catalog.=) c.oid
                UNION ALL
                SELECT 'pg_catalog.pg_class'::pg_catalog.regclass, i.indexrelid,
                       COALESCE(i.indexprs::text, '') OPERATOR(pg_catalog.||) COALESCE(i.indpred::text, '')
                  FROM pg_catalog.pg_index AS i WHERE i.indrelid OPERATOR(pg_catalog.=) c.oid
                UNION ALL
                SELECT 'pg_catalog.pg_trigger'::pg_catalog.regclass, t.oid, t.tgqual::text
                  FROM pg_catalog.pg_trigger AS t WHERE t.tgrelid OPERATOR(pg_catalog.=) c.oid) AS e (classid, objid, tree)
         CROSS JOIN LATERAL (SELECT (pg_catalog.regexp_match(e.tree, v_runs_sql))[1]::pg_catalog.oid) AS sp (oid)
         WHERE u.untrusted AND sp.oid IS NOT NULL
     ) AS f (what, rank)
     WHERE c.oid OPERATOR(pg_catalog.=) ANY (ARRAY['public.outbound_call_runs'::pg_catalog.regclass,
                                                  'public.outbound_call_jobs'::pg_catalog.regclass])
     ORDER BY c.oid, f.rank
     LIMIT 1);
END
$$;
ALTER FUNCTION outbound_heartbeat._foreign_table_code(boolean) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._foreign_table_code(boolean) FROM PUBLIC;

-- The table guard's quick test, written once: each of the two tables it cannot vouch for, i.e.
-- owned by a role outside the trusted set or with an enabled trigger running a function a role
-- outside it owns (a grant proves nothing: a function's owner may grant the owner role anything,
-- WITH GRANT OPTION too). A view, not a function: the hot paths plan its query into their own
-- (no call per beat) and filter it to the table they write; a listed table is not refused yet,
-- it goes to the full check of _foreign_table_code(), which may accept it. (The role by name:
-- a view cannot store a regrole constant.)
CREATE OR REPLACE VIEW outbound_heartbeat._unvetted_tables (table_oid) AS
SELECT c.oid::pg_catalog.regclass
  FROM pg_catalog.pg_class AS c
 WHERE c.oid OPERATOR(pg_catalog.=) ANY ('{public.outbound_call_runs, public.outbound_call_jobs}'::pg_catalog.regclass[])
   AND NOT pg_catalog.pg_has_role(c.relowner, 'outbound_heartbeat_owner'::pg_catalog.name, 'MEMBER')
UNION ALL
SELECT t.tgrelid::pg_catalog.regclass
  FROM pg_catalog.pg_trigger AS t
 WHERE t.tgrelid OPERATOR(pg_catalog.=) ANY ('{public.outbound_call_runs, public.outbound_call_jobs}'::pg_catalog.regclass[])
   AND NOT t.tgisinternal AND t.tgenabled OPERATOR(pg_catalog.<>) 'D'
   AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_proc AS p
                    WHERE p.oid OPERATOR(pg_catalog.=) t.tgfoid
                      AND pg_catalog.pg_has_role(p.proowner, 'outbound_heartbeat_owner'::pg_catalog.name, 'MEMBER'));
REVOKE ALL ON outbound_heartbeat._unvetted_tables FROM PUBLIC;
-- The hot paths read it with the owner's rights.
GRANT SELECT ON outbound_heartbeat._unvetted_tables TO outbound_heartbeat_owner;
COMMENT ON VIEW outbound_heartbeat._unvetted_tables IS
    'Internal: the table guard''s quick test; a listed app table goes to the full check (OH428 if foreign code is found).';

-- OH428, before anything is written, when code a role outside the trusted set could have
-- written is attached to the tables: the quick test (_unvetted_tables) first, and the full
-- search of _foreign_table_code() only when it fails (it may still accept the table).
CREATE OR REPLACE FUNCTION outbound_heartbeat._require_trusted_tables()
RETURNS void
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_found text;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM outbound_heartbeat._unvetted_tables) THEN
        RETURN;
    END IF;
    v_found := outbound_heartbeat._foreign_table_code(false);
    IF v_found IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'OH428',
            MESSAGE = pg_catalog.format('refusing to run with the rights of outbound_heartbeat_owner: %s', v_found),
            HINT = 'Code on the tables that a role outside outbound_heartbeat_owner could have written would run'
                   ' with that role''s rights: make trigger functions SECURITY DEFINER, drop what the app role'
                   ' attached, or hand the tables over (outbound_heartbeat.hand_over_tables(app_role);'
                   ' docs/security.md).';
    END IF;
END
$$;
ALTER FUNCTION outbound_heartbeat._require_trusted_tables() OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._require_trusted_tables() FROM PUBLIC;

REVOKE CREATE ON SCHEMA outbound_heartbeat FROM outbound_heartbeat_owner;
