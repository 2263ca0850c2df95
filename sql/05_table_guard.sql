-- The table guard (docs/table-guard.md). The API runs with the rights of
-- outbound_heartbeat_owner, and every statement it runs on public.outbound_call_runs /
-- outbound_call_jobs also runs the code attached to them: triggers and their WHEN clauses,
-- rules, row-level security policies, column defaults and generated columns, CHECK constraints,
-- index expressions, the domains of the columns' types. Whoever can write that code borrows the
-- owner's rights, so the API runs it only when a trusted role wrote it: a member of
-- outbound_heartbeat_owner (the migrating role) or a superuser, as pg_has_role(..., 'MEMBER')
-- says. A function is written by its owner (CREATE OR REPLACE), whoever attached it: a SECURITY
-- INVOKER function a role outside the trusted set owns is foreign code wherever it is attached.
-- The heartbeats read the quick test (_unvetted_tables) for the one table they write and call
-- the full check only when it fails.

-- ALTER FUNCTION ... OWNER TO needs CREATE on the schema for the new owner: held only
-- inside this file's transaction.
GRANT CREATE ON SCHEMA outbound_heartbeat TO outbound_heartbeat_owner;

-- Re-applied under beating workers: a beat locks _unvetted_tables, then the views under it; this
-- file replaces those views, so it takes the outer view's lock first, in the beats' order, or a
-- beat holding the outer view and this file holding an inner one would wait on each other until
-- the migration's lock_timeout. A no-op owner change takes that lock and writes no catalog row
-- (LOCK TABLE on a view would lock its catalogs too).
DO $lock_order$
BEGIN
    IF pg_catalog.to_regclass('outbound_heartbeat._unvetted_tables') IS NOT NULL THEN
        ALTER VIEW outbound_heartbeat._unvetted_tables OWNER TO outbound_heartbeat_owner;
    END IF;
END
$lock_order$;

-- Every object attached to the app's tables whose code a write can run (constraint, default,
-- index, trigger, disabled too, policy while row security is on, rule, a column type's domain
-- and its constraints) and each non-built-in function it calls, an operator's too (NULL: none).
CREATE OR REPLACE FUNCTION outbound_heartbeat._table_code()
RETURNS TABLE (table_oid pg_catalog.oid, classid pg_catalog.oid, objid pg_catalog.oid, function_oid pg_catalog.oid)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN QUERY
    WITH RECURSIVE types (table_oid, type_oid) AS (
        -- the columns' types, then a domain's base type and an array's element type, down to
        -- the built-ins: each domain's CHECKs and default run when a value becomes its type
        SELECT a.attrelid, a.atttypid
          FROM pg_catalog.pg_attribute AS a
         WHERE a.attrelid OPERATOR(pg_catalog.=) ANY (ARRAY['public.outbound_call_runs'::pg_catalog.regclass,
                                                           'public.outbound_call_jobs'::pg_catalog.regclass])
           AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped
        UNION
        SELECT ty.table_oid, n.oid
          FROM types AS ty
          JOIN pg_catalog.pg_type AS t ON t.oid OPERATOR(pg_catalog.=) ty.type_oid
         CROSS JOIN LATERAL (VALUES (t.typbasetype), (t.typelem)) AS n (oid)
         WHERE n.oid OPERATOR(pg_catalog.<>) 0::pg_catalog.oid
    ), objects (table_oid, classid, objid) AS (
        SELECT k.conrelid, 'pg_catalog.pg_constraint'::pg_catalog.regclass::pg_catalog.oid, k.oid
          FROM pg_catalog.pg_constraint AS k
         WHERE k.conrelid OPERATOR(pg_catalog.=) ANY (ARRAY['public.outbound_call_runs'::pg_catalog.regclass,
                                                           'public.outbound_call_jobs'::pg_catalog.regclass])
        UNION ALL
        SELECT d.adrelid, 'pg_catalog.pg_attrdef'::pg_catalog.regclass::pg_catalog.oid, d.oid
          FROM pg_catalog.pg_attrdef AS d
         WHERE d.adrelid OPERATOR(pg_catalog.=) ANY (ARRAY['public.outbound_call_runs'::pg_catalog.regclass,
                                                          'public.outbound_call_jobs'::pg_catalog.regclass])
        UNION ALL
        SELECT i.indrelid, 'pg_catalog.pg_class'::pg_catalog.regclass::pg_catalog.oid, i.indexrelid
          FROM pg_catalog.pg_index AS i
         WHERE i.indrelid OPERATOR(pg_catalog.=) ANY (ARRAY['public.outbound_call_runs'::pg_catalog.regclass,
                                                           'public.outbound_call_jobs'::pg_catalog.regclass])
        UNION ALL
        SELECT t.tgrelid, 'pg_catalog.pg_trigger'::pg_catalog.regclass::pg_catalog.oid, t.oid
          FROM pg_catalog.pg_trigger AS t
         WHERE t.tgrelid OPERATOR(pg_catalog.=) ANY (ARRAY['public.outbound_call_runs'::pg_catalog.regclass,
                                                          'public.outbound_call_jobs'::pg_catalog.regclass])
        UNION ALL
        SELECT p.polrelid, 'pg_catalog.pg_policy'::pg_catalog.regclass::pg_catalog.oid, p.oid
          FROM pg_catalog.pg_policy AS p
          JOIN pg_catalog.pg_class AS c ON c.oid OPERATOR(pg_catalog.=) p.polrelid
         WHERE p.polrelid OPERATOR(pg_catalog.=) ANY (ARRAY['public.outbound_call_runs'::pg_catalog.regclass,
                                                           'public.outbound_call_jobs'::pg_catalog.regclass])
           AND c.relrowsecurity
        UNION ALL
        SELECT r.ev_class, 'pg_catalog.pg_rewrite'::pg_catalog.regclass::pg_catalog.oid, r.oid
          FROM pg_catalog.pg_rewrite AS r
         WHERE r.ev_class OPERATOR(pg_catalog.=) ANY (ARRAY['public.outbound_call_runs'::pg_catalog.regclass,
                                                           'public.outbound_call_jobs'::pg_catalog.regclass])
        UNION ALL
        SELECT DISTINCT ty.table_oid, 'pg_catalog.pg_type'::pg_catalog.regclass::pg_catalog.oid, t.oid
          FROM types AS ty
          JOIN pg_catalog.pg_type AS t ON t.oid OPERATOR(pg_catalog.=) ty.type_oid
         WHERE t.typtype OPERATOR(pg_catalog.=) 'd'
        UNION ALL
        SELECT DISTINCT ty.table_oid, 'pg_catalog.pg_constraint'::pg_catalog.regclass::pg_catalog.oid, k.oid
          FROM types AS ty
          JOIN pg_catalog.pg_constraint AS k ON k.contypid OPERATOR(pg_catalog.=) ty.type_oid
    )
    SELECT o.table_oid, o.classid, o.objid, f.oid
      FROM objects AS o
      LEFT JOIN LATERAL (
        SELECT DISTINCT COALESCE(op.oprcode::pg_catalog.oid, x.refobjid)
          FROM pg_catalog.pg_depend AS x
          LEFT JOIN pg_catalog.pg_operator AS op
            ON x.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_operator'::pg_catalog.regclass
           AND op.oid OPERATOR(pg_catalog.=) x.refobjid
         WHERE x.classid OPERATOR(pg_catalog.=) o.classid AND x.objid OPERATOR(pg_catalog.=) o.objid
           AND x.refclassid OPERATOR(pg_catalog.=) ANY (ARRAY['pg_catalog.pg_proc'::pg_catalog.regclass,
                                                              'pg_catalog.pg_operator'::pg_catalog.regclass])
      ) AS f (oid) ON f.oid OPERATOR(pg_catalog.>=) 16384::pg_catalog.oid;  -- built-ins are trusted
END
$$;
ALTER FUNCTION outbound_heartbeat._table_code() OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._table_code() FROM PUBLIC;

-- The first code on the app's tables that the API must not run with its owner's rights ('table:
-- what'), or NULL: whoever wrote it would borrow those rights. What counts as foreign is
-- docs/table-guard.md, "What it refuses".
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
        -- whoever owns a function called from anything attached rewrites it at will; the
        -- trigger's own function is judged just above
        SELECT pg_catalog.format('%s calls %s, a SECURITY INVOKER function owned by %I',
                                 pg_catalog.pg_describe_object(x.classid, x.objid, 0),
                                 pg_catalog.pg_describe_object('pg_catalog.pg_proc'::pg_catalog.regclass, x.function_oid, 0),
                                 pg_catalog.pg_get_userbyid(p.proowner)), 2
          FROM outbound_heartbeat._table_code() AS x
          JOIN pg_catalog.pg_proc AS p ON p.oid OPERATOR(pg_catalog.=) x.function_oid
         WHERE x.table_oid OPERATOR(pg_catalog.=) c.oid AND NOT p.prosecdef
           AND NOT pg_catalog.pg_has_role(p.proowner, 'outbound_heartbeat_owner', 'MEMBER')
        UNION ALL
        -- the API's statements write a child's rows too, running its code: not vetted, refused
        SELECT pg_catalog.format('has an inheritance child or partition, %s, whose rows the API would write',
                                 i.inhrelid::pg_catalog.regclass), 0
          FROM pg_catalog.pg_inherits AS i WHERE i.inhparent OPERATOR(pg_catalog.=) c.oid
        UNION ALL
        SELECT 'has a rule', 3 WHERE c.relhasrules AND u.untrusted
        UNION ALL
        SELECT 'has row-level security enabled', 4 WHERE c.relrowsecurity AND u.untrusted
        UNION ALL
        SELECT pg_catalog.format('library trigger %I is disabled', t.tgname), 5
          FROM pg_catalog.pg_trigger AS t
          JOIN pg_catalog.pg_proc AS p ON p.oid OPERATOR(pg_catalog.=) t.tgfoid
         WHERE u.untrusted AND t.tgrelid OPERATOR(pg_catalog.=) c.oid AND NOT t.tgisinternal
           AND t.tgenabled OPERATOR(pg_catalog.=) 'D'
           AND p.pronamespace OPERATOR(pg_catalog.=) 'outbound_heartbeat'::pg_catalog.regnamespace
        UNION ALL
        SELECT pg_catalog.format('%s calls %s (written by the table''s owner)',
                                 pg_catalog.pg_describe_object(d.classid, d.objid, d.objsubid),
                                 pg_catalog.pg_describe_object(x.refclassid, x.refobjid, 0)), 6
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
                                 pg_catalog.pg_describe_object(e.classid, e.objid, 0), sp.oid::pg_catalog.regprocedure), 7
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

-- What the full check last accepted, so that a call need not repeat it: per app table, the
-- versions of the catalog rows that attach code to it (_table_fingerprints), the non-built-in
-- functions that code calls, and the domains of its columns' types with their rows' versions
-- (_type_fingerprints).
--
-- Why a matching fingerprint lets the quick test skip the full check (_table_code's search),
-- i.e. why the code a write can run is the code that was accepted:
-- - Every statement that attaches, replaces or detaches code on a table writes a catalog row
--   the fingerprint covers. The table's pg_class row: CHECK constraints (relchecks), row
--   security on or off, columns added or dropped, the owner, a rewrite. pg_depend rows that
--   reference the table: every default, generated column, constraint, index, trigger (its
--   WHEN clause too), policy and rule is recorded there, and replacing one (ALTER POLICY,
--   CREATE OR REPLACE TRIGGER or RULE, SET DEFAULT) records it anew. pg_depend rows of the
--   table itself: a column's type (ALTER COLUMN TYPE need not rewrite the table).
--   ALTER DOMAIN: the domain's pg_type row or its pg_constraint rows (_type_fingerprints).
--   Not covered: ENABLE / DISABLE TRIGGER, so a disabled trigger's code is vetted as if enabled.
-- - A row's version is its (ctid, xmin): the pg_class row's, and the pg_depend rows' as two
--   arrays filled from one scan, the i-th ctid and the i-th xmin one row's. A change deletes a
--   version or adds one. A slot (ctid) is reused only once its old version is vacuumed away,
--   i.e. deleted by a transaction that committed, and the new version carries the xid of the
--   transaction that wrote it: the same (ctid, xmin) again would need the old version's writer
--   to write once more after the delete it could not see (or 2^32 transactions later, an xid
--   come round again, which no role can aim at).
-- - The comparison is exact, not a digest: equal arrays list the same (ctid, xmin) pairs, so
--   the same row versions, whatever order the scan gave them in. (A digest such as a sum of
--   hashes is no cheaper, measured, and a role that adds and drops pg_depend rows naming the
--   table at will, views over it for one, could search the rows it keeps for a sum equal to the
--   stored one; an exact list leaves nothing to search.) The order only decides whether an
--   unchanged set still matches: the one scan (two bitmap index scans ORed, or a sequential
--   scan) returns the rows in ctid order either way, and the storing call and the beats read
--   the same view; an order that differed would cost a full check per call, never skip one.
--   (A sort was an eighth of the quick test's time, measured.)
-- - What those rows do not show is probed on every call: who owns the table (a role's
--   membership in outbound_heartbeat_owner is no catalog row of the table either) and, when the
--   accepted state lists any (_vetted_calls_unchanged), who owns each accepted function and
--   whether it is SECURITY DEFINER (a function's owner replaces its body or flips it to
--   SECURITY INVOKER without touching the table) and its domains' rows. Not probed: functions
--   outbound_heartbeat_owner itself owns (the library's triggers'): only its members, trusted,
--   can give them away.
-- - The fingerprints and the function and domain lists are read in one statement, before the
--   full check reads the catalogs again: if the code changed in between, the stored fingerprint
--   is the older one, which no longer matches, and the next call checks again.
-- - Only the API's owner writes this table; a call never waits for it (a transaction-scoped
--   advisory lock taken with pg_try_, else nothing is stored), and a read-only transaction or
--   a standby stores nothing: it runs the full check until a writable call stores it.
-- Not followed: what a vetted function's body calls (its trusted owner wrote that body), nor
-- code that the statements of attached code run on other tables.
CREATE TABLE IF NOT EXISTS outbound_heartbeat._vetted_tables (
    table_oid          oid PRIMARY KEY,
    class_xmin         xid NOT NULL,
    class_tid          tid NOT NULL,
    depend_tids        tid[] NOT NULL,
    depend_xmins       xid[] NOT NULL,
    functions          oid[] NOT NULL,
    domains            oid[] NOT NULL,
    domain_fingerprint text,
    vetted_at          timestamptz NOT NULL DEFAULT now()
);
GRANT SELECT, INSERT, UPDATE ON outbound_heartbeat._vetted_tables TO outbound_heartbeat_owner;
REVOKE ALL ON outbound_heartbeat._vetted_tables FROM PUBLIC;
COMMENT ON TABLE outbound_heartbeat._vetted_tables IS
    'Internal: the table guard''s last accepted state of each app table (catalog row versions, the functions and domains its attached code calls), written by the API only.';

-- Each app table's owner and the versions (xmin, ctid) of the catalog rows that attach code to
-- it: its pg_class row, the pg_depend rows naming it or it depends on (see _vetted_tables).
CREATE OR REPLACE VIEW outbound_heartbeat._table_fingerprints (table_oid, class_xmin, class_tid, depend_tids, depend_xmins, owner) AS
SELECT c.oid::pg_catalog.regclass, c.xmin, c.ctid, d.tids, d.xmins, c.relowner
  FROM pg_catalog.pg_class AS c
 CROSS JOIN LATERAL (
    -- one scan of pg_depend through both its indexes (a BitmapOr), the two arrays filled from
    -- the same rows in the same order, so that they pair each ctid with its xmin; no sort (see
    -- _vetted_tables for why the order is not part of the guarantee)
    SELECT pg_catalog.array_agg(r.ctid), pg_catalog.array_agg(r.xmin)
      FROM pg_catalog.pg_depend AS r
     WHERE (r.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
            AND r.refobjid OPERATOR(pg_catalog.=) c.oid)
        OR (r.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
            AND r.objid OPERATOR(pg_catalog.=) c.oid)
 ) AS d (tids, xmins)
 WHERE c.oid OPERATOR(pg_catalog.=) ANY ('{public.outbound_call_runs, public.outbound_call_jobs}'::pg_catalog.regclass[]);
REVOKE ALL ON outbound_heartbeat._table_fingerprints FROM PUBLIC;
GRANT SELECT ON outbound_heartbeat._table_fingerprints TO outbound_heartbeat_owner;
COMMENT ON VIEW outbound_heartbeat._table_fingerprints IS
    'Internal: the versions of the catalog rows attaching code to each app table, compared by the table guard''s quick test with what it last accepted.';

-- The same for a type: its pg_type row and its constraints' rows (a domain's CHECKs).
CREATE OR REPLACE VIEW outbound_heartbeat._type_fingerprints (type_oid, fingerprint) AS
SELECT t.oid,
       pg_catalog.concat(
           t.xmin, t.ctid,
           ';', (SELECT pg_catalog.string_agg(k.xmin::text OPERATOR(pg_catalog.||) k.ctid::text, ',' ORDER BY k.ctid)
                   FROM pg_catalog.pg_constraint AS k WHERE k.contypid OPERATOR(pg_catalog.=) t.oid))
  FROM pg_catalog.pg_type AS t;
REVOKE ALL ON outbound_heartbeat._type_fingerprints FROM PUBLIC;
GRANT SELECT ON outbound_heartbeat._type_fingerprints TO outbound_heartbeat_owner;
COMMENT ON VIEW outbound_heartbeat._type_fingerprints IS
    'Internal: the versions of a type''s catalog rows and of its constraints'' (a domain''s CHECKs), for the table guard''s quick test.';

-- Whether what an accepted state's code calls is still as accepted: its domains' catalog rows
-- unchanged (domain_fingerprint), and no function in it a SECURITY INVOKER one that a role
-- outside the trusted set now owns. The quick test calls it only when either list is non-empty.
CREATE OR REPLACE FUNCTION outbound_heartbeat._vetted_calls_unchanged(
    p_functions oid[], p_domains oid[], p_domain_fingerprint text)
RETURNS boolean
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- plpgsql, not sql: its plans are cached for the session (a sql function with SET is planned per call).
    RETURN (pg_catalog.cardinality(p_domains) OPERATOR(pg_catalog.=) 0
            OR p_domain_fingerprint OPERATOR(pg_catalog.=)
               (SELECT pg_catalog.string_agg(y.fingerprint, ',' ORDER BY y.type_oid)
                  FROM outbound_heartbeat._type_fingerprints AS y
                 WHERE y.type_oid OPERATOR(pg_catalog.=) ANY (p_domains)))
       AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_proc AS p
                        WHERE p.oid OPERATOR(pg_catalog.=) ANY (p_functions) AND NOT p.prosecdef
                          AND NOT pg_catalog.pg_has_role(p.proowner, 'outbound_heartbeat_owner', 'MEMBER'));
END
$$;
ALTER FUNCTION outbound_heartbeat._vetted_calls_unchanged(oid[], oid[], text) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._vetted_calls_unchanged(oid[], oid[], text) FROM PUBLIC;

-- The table guard's quick test, written once: each of the two tables it cannot vouch for, i.e.
-- owned by a role outside the trusted set, or changed since the full check last accepted it
-- (its fingerprint or its domains' differ from _vetted_tables', or nothing is stored), or whose
-- accepted code calls a SECURITY INVOKER function that a role outside the trusted set now owns
-- (a grant proves nothing: a function's owner may grant the owner role anything). A view, not a
-- function: the hot paths plan its query into their own (no call per beat) and filter it to the
-- table they write; a listed table is not refused yet, it goes to the full check
-- (_require_trusted_tables), which may accept it and store it. Its plan is kept small (executor
-- start-up is paid per beat): the stored row joined by its key, the rarely non-empty lists'
-- probe a function call, every comparison NULL-safe (unknown counts as changed). (The role by
-- name: a view cannot store a regrole constant.)
CREATE OR REPLACE VIEW outbound_heartbeat._unvetted_tables (table_oid) AS
SELECT f.table_oid
  FROM outbound_heartbeat._table_fingerprints AS f
  LEFT JOIN outbound_heartbeat._vetted_tables AS v
    ON v.table_oid OPERATOR(pg_catalog.=) f.table_oid::pg_catalog.oid
 WHERE NOT COALESCE(
        pg_catalog.pg_has_role(f.owner, 'outbound_heartbeat_owner'::pg_catalog.name, 'MEMBER')
        AND v.class_xmin OPERATOR(pg_catalog.=) f.class_xmin AND v.class_tid OPERATOR(pg_catalog.=) f.class_tid
        AND v.depend_tids OPERATOR(pg_catalog.=) f.depend_tids AND v.depend_xmins OPERATOR(pg_catalog.=) f.depend_xmins
        AND (pg_catalog.cardinality(v.functions) OPERATOR(pg_catalog.+) pg_catalog.cardinality(v.domains)
                 OPERATOR(pg_catalog.=) 0
             OR outbound_heartbeat._vetted_calls_unchanged(v.functions, v.domains, v.domain_fingerprint)),
        false);
REVOKE ALL ON outbound_heartbeat._unvetted_tables FROM PUBLIC;
-- The hot paths read it with the owner's rights.
GRANT SELECT ON outbound_heartbeat._unvetted_tables TO outbound_heartbeat_owner;
COMMENT ON VIEW outbound_heartbeat._unvetted_tables IS
    'Internal: the table guard''s quick test; a listed app table goes to the full check (OH428 if foreign code is found).';

-- OH428, before anything is written, when code a role outside the trusted set could have
-- written is attached to the tables: the quick test (_unvetted_tables) first, then the full
-- search of _foreign_table_code(), whose acceptance is stored (_vetted_tables).
CREATE OR REPLACE FUNCTION outbound_heartbeat._require_trusted_tables()
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_found text;
    v_seen outbound_heartbeat._vetted_tables[];
    v_caller_lock_timeout text;
BEGIN
    -- The tables' lock first, the one the call's writes take: attaching code locks the table
    -- too, so code committed while this call waits is seen by the test below (a statement after
    -- the lock, with a snapshot of its own), instead of running, unseen, at the call's first
    -- write. Waited for as long as a row (lock_timeout, then OH423).
    v_caller_lock_timeout := outbound_heartbeat._apply_lock_timeout(outbound_heartbeat._settings());
    BEGIN
        LOCK TABLE public.outbound_call_runs, public.outbound_call_jobs IN ROW EXCLUSIVE MODE;
    EXCEPTION WHEN lock_not_available THEN
        RAISE EXCEPTION USING ERRCODE = 'OH423',
            MESSAGE = 'the app tables are locked by another transaction (a schema change?): try again';
    END;
    PERFORM outbound_heartbeat._restore_lock_timeout(v_caller_lock_timeout);
    IF NOT EXISTS (SELECT 1 FROM outbound_heartbeat._unvetted_tables) THEN
        RETURN;
    END IF;
    -- What is stored is read first, in one statement: see the argument over _vetted_tables.
    SELECT pg_catalog.array_agg(ROW(f.table_oid::pg_catalog.oid, f.class_xmin, f.class_tid, f.depend_tids,
                                     f.depend_xmins, s.functions, s.domains,
                                     (SELECT pg_catalog.string_agg(y.fingerprint, ',' ORDER BY y.type_oid)
                                        FROM outbound_heartbeat._type_fingerprints AS y
                                       WHERE y.type_oid OPERATOR(pg_catalog.=) ANY (s.domains)),
                                     pg_catalog.now())::outbound_heartbeat._vetted_tables)
      INTO v_seen
      FROM outbound_heartbeat._table_fingerprints AS f
     CROSS JOIN LATERAL (
        SELECT COALESCE(pg_catalog.array_agg(DISTINCT x.function_oid)
                            FILTER (WHERE p.proowner OPERATOR(pg_catalog.<>) 'outbound_heartbeat_owner'::pg_catalog.regrole), '{}'),
               COALESCE(pg_catalog.array_agg(DISTINCT x.objid)
                            FILTER (WHERE x.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_type'::pg_catalog.regclass), '{}')
          FROM outbound_heartbeat._table_code() AS x
          LEFT JOIN pg_catalog.pg_proc AS p ON p.oid OPERATOR(pg_catalog.=) x.function_oid
         WHERE x.table_oid OPERATOR(pg_catalog.=) f.table_oid::pg_catalog.oid) AS s (functions, domains);
    v_found := outbound_heartbeat._foreign_table_code(false);
    IF v_found IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'OH428',
            MESSAGE = pg_catalog.format('refusing to run with the rights of outbound_heartbeat_owner: %s', v_found),
            HINT = 'Code on the tables that a role outside outbound_heartbeat_owner could have written would run'
                   ' with that role''s rights: make its functions SECURITY DEFINER or owned by a trusted role, drop'
                   ' what the app role attached, or hand the tables over'
                   ' (outbound_heartbeat.hand_over_tables(app_role); docs/security.md).';
    END IF;
    -- Stored when it changed, and only where a beat need not wait for it: a writable
    -- transaction that gets the lock at once (two calls storing at the same moment store the same).
    IF NOT pg_catalog.current_setting('transaction_read_only')::boolean
       AND EXISTS (SELECT 1 FROM pg_catalog.unnest(v_seen) AS n
                     LEFT JOIN outbound_heartbeat._vetted_tables AS v
                       ON v.table_oid OPERATOR(pg_catalog.=) n.table_oid
                    WHERE v.table_oid IS NULL OR v.class_xmin OPERATOR(pg_catalog.<>) n.class_xmin
                       OR (v.class_tid, v.depend_tids::text, v.depend_xmins::text, v.functions, v.domains,
                           v.domain_fingerprint)
                          IS DISTINCT FROM (n.class_tid, n.depend_tids::text, n.depend_xmins::text, n.functions,
                                            n.domains, n.domain_fingerprint))
       AND pg_catalog.pg_try_advisory_xact_lock(pg_catalog.hashtext('outbound_heartbeat._vetted_tables')) THEN
        BEGIN
            INSERT INTO outbound_heartbeat._vetted_tables AS v
            SELECT * FROM pg_catalog.unnest(v_seen)
            ON CONFLICT (table_oid) DO UPDATE
               SET class_xmin = excluded.class_xmin, class_tid = excluded.class_tid,
                   depend_tids = excluded.depend_tids, depend_xmins = excluded.depend_xmins,
                   functions = excluded.functions, domains = excluded.domains,
                   domain_fingerprint = excluded.domain_fingerprint, vetted_at = excluded.vetted_at;
        EXCEPTION WHEN serialization_failure THEN
            NULL;  -- a REPEATABLE READ snapshot older than the stored row: a later call stores it
        END;
    END IF;
END
$$;
ALTER FUNCTION outbound_heartbeat._require_trusted_tables() OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._require_trusted_tables() FROM PUBLIC;

-- The beats' table guard, read now: the owner of the table when the quick test vouches for it
-- and its accepted state lists nothing to probe per call; NULL otherwise, and outside READ
-- COMMITTED (a transaction's snapshot may predate a committed change).
CREATE OR REPLACE FUNCTION outbound_heartbeat._vetted_owner(p_table regclass)
RETURNS oid
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF pg_catalog.current_setting('transaction_isolation') OPERATOR(pg_catalog.<>) 'read committed' THEN
        RETURN NULL;
    END IF;
    -- VOLATILE: this statement takes a snapshot of its own, after the planner locked the table.
    -- One statement: the fingerprint, the stored state and the owner read together.
    RETURN (SELECT c.relowner
              FROM pg_catalog.pg_class AS c
             WHERE c.oid OPERATOR(pg_catalog.=) p_table
               AND NOT EXISTS (SELECT 1 FROM outbound_heartbeat._unvetted_tables AS u
                                WHERE u.table_oid OPERATOR(pg_catalog.=) p_table)
               AND EXISTS (SELECT 1 FROM outbound_heartbeat._vetted_tables AS v
                            WHERE v.table_oid OPERATOR(pg_catalog.=) p_table::pg_catalog.oid
                              AND pg_catalog.cardinality(v.functions) OPERATOR(pg_catalog.=) 0
                              AND pg_catalog.cardinality(v.domains) OPERATOR(pg_catalog.=) 0));
END
$$;
ALTER FUNCTION outbound_heartbeat._vetted_owner(regclass) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._vetted_owner(regclass) FROM PUBLIC;

-- _vetted_owner() when a statement is planned: IMMUTABLE, so that the planner folds it once
-- per plan. It reads nothing itself: it would read under the calling statement's snapshot,
-- which may predate the lock wait after which the plan is made again (see heartbeat()).
CREATE OR REPLACE FUNCTION outbound_heartbeat._vetted_owner_when_planned(p_table regclass)
RETURNS oid
LANGUAGE plpgsql IMMUTABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN outbound_heartbeat._vetted_owner(p_table);
END
$$;
ALTER FUNCTION outbound_heartbeat._vetted_owner_when_planned(regclass) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._vetted_owner_when_planned(regclass) FROM PUBLIC;

REVOKE CREATE ON SCHEMA outbound_heartbeat FROM outbound_heartbeat_owner;
