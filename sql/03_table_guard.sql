-- The table guard (docs/security.md, "Who owns the tables"). The API runs with the rights of
-- outbound_heartbeat_owner, and every statement it runs on public.outbound_call_runs /
-- outbound_call_jobs also runs the code attached to them: triggers and their WHEN clauses,
-- rules, row-level security policies, column defaults, CHECK constraints, index expressions,
-- domain constraints. Whoever can write that code borrows the owner's rights, so the API runs it
-- only when a trusted role wrote it: a member of outbound_heartbeat_owner (the migrating role)
-- or a superuser, as pg_has_role(..., 'MEMBER') says.

-- True when a stored expression tree (pg_node_tree text) calls a function or operator outside
-- the built-in catalog (oid >= 16384, FirstNormalObjectId) or coerces to a domain, whose
-- constraints may call one. The library's own WHEN clauses use built-in operators only.
CREATE OR REPLACE FUNCTION outbound_heartbeat._calls_user_code(p_node text)
RETURNS boolean
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT p_node IS NOT NULL
       AND (pg_catalog.strpos(p_node, '{COERCETODOMAIN ') OPERATOR(pg_catalog.>) 0
            OR EXISTS (SELECT 1
                         FROM pg_catalog.regexp_matches(
                                  p_node, ':(?:funcid|opfuncid|opno|hashfuncid|negfuncid|aggfnoid|winfnoid) ([0-9]+)',
                                  'g') AS m (id)
                        WHERE m.id[1]::pg_catalog.int8 OPERATOR(pg_catalog.>=) 16384))
$$;

-- The first piece of code on the two tables the API must not run with its owner's rights, as
-- 'table: what', or NULL. Always checked: each enabled trigger's function either runs with its
-- own owner's rights (SECURITY DEFINER: never more than its author has) or belongs to a trusted
-- role (nobody else can replace it). When the table's owner is not trusted (an app role that
-- owns its tables), or p_as_untrusted, also everything that owner could have attached:
-- WHEN clauses, rules, row security, defaults, CHECK and domain constraints, index
-- expressions, and a disabled library trigger (the epoch guard, the counters).
CREATE OR REPLACE FUNCTION outbound_heartbeat._foreign_table_code(p_as_untrusted boolean DEFAULT false)
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_found text;
    v_table record;
BEGIN
    SELECT pg_catalog.format('%s: trigger %I runs %s, a SECURITY INVOKER function owned by %I',
                             t.tgrelid::pg_catalog.regclass, t.tgname, t.tgfoid::pg_catalog.regprocedure,
                             pg_catalog.pg_get_userbyid(p.proowner))
      INTO v_found
      FROM pg_catalog.pg_trigger AS t
      JOIN pg_catalog.pg_proc AS p ON p.oid OPERATOR(pg_catalog.=) t.tgfoid
     WHERE t.tgrelid OPERATOR(pg_catalog.=) ANY (ARRAY['public.outbound_call_runs'::pg_catalog.regclass,
                                                       'public.outbound_call_jobs'::pg_catalog.regclass])
       AND NOT t.tgisinternal AND t.tgenabled OPERATOR(pg_catalog.<>) 'D'
       AND NOT p.prosecdef
       AND NOT pg_catalog.pg_has_role(p.proowner, 'outbound_heartbeat_owner', 'MEMBER')
     ORDER BY t.tgrelid, t.tgname
     LIMIT 1;
    IF v_found IS NOT NULL THEN
        RETURN v_found;
    END IF;

    FOR v_table IN
        SELECT c.oid, c.oid::pg_catalog.regclass AS name, c.relhasrules, c.relrowsecurity
          FROM pg_catalog.pg_class AS c
         WHERE c.oid OPERATOR(pg_catalog.=) ANY (ARRAY['public.outbound_call_runs'::pg_catalog.regclass,
                                                      'public.outbound_call_jobs'::pg_catalog.regclass])
           AND (p_as_untrusted OR NOT pg_catalog.pg_has_role(c.relowner, 'outbound_heartbeat_owner', 'MEMBER'))
         ORDER BY c.oid
    LOOP
        IF v_table.relhasrules THEN
            RETURN pg_catalog.format('%s: has a rule', v_table.name);
        END IF;
        IF v_table.relrowsecurity THEN
            RETURN pg_catalog.format('%s: has row-level security enabled', v_table.name);
        END IF;
        SELECT pg_catalog.format('%s: %s', v_table.name, w.what) INTO v_found
          FROM (SELECT pg_catalog.format('trigger %I has a WHEN clause that calls a user function', t.tgname) AS what
                  FROM pg_catalog.pg_trigger AS t
                 WHERE t.tgrelid OPERATOR(pg_catalog.=) v_table.oid AND NOT t.tgisinternal
                   AND t.tgenabled OPERATOR(pg_catalog.<>) 'D'
                   AND outbound_heartbeat._calls_user_code(t.tgqual::text)
                UNION ALL
                SELECT pg_catalog.format('library trigger %I is disabled', t.tgname)
                  FROM pg_catalog.pg_trigger AS t
                  JOIN pg_catalog.pg_proc AS p ON p.oid OPERATOR(pg_catalog.=) t.tgfoid
                 WHERE t.tgrelid OPERATOR(pg_catalog.=) v_table.oid AND NOT t.tgisinternal
                   AND t.tgenabled OPERATOR(pg_catalog.=) 'D'
                   AND p.pronamespace OPERATOR(pg_catalog.=) 'outbound_heartbeat'::pg_catalog.regnamespace
                UNION ALL
                SELECT pg_catalog.format('the default of column %I calls a user function', a.attname)
                  FROM pg_catalog.pg_attrdef AS d
                  JOIN pg_catalog.pg_attribute AS a
                    ON a.attrelid OPERATOR(pg_catalog.=) d.adrelid AND a.attnum OPERATOR(pg_catalog.=) d.adnum
                 WHERE d.adrelid OPERATOR(pg_catalog.=) v_table.oid
                   AND outbound_heartbeat._calls_user_code(d.adbin::text)
                UNION ALL
                SELECT pg_catalog.format('constraint %I calls a user function', k.conname)
                  FROM pg_catalog.pg_constraint AS k
                 WHERE k.conrelid OPERATOR(pg_catalog.=) v_table.oid
                   AND outbound_heartbeat._calls_user_code(k.conbin::text)
                UNION ALL
                SELECT pg_catalog.format('column %I has domain type %s, whose constraint calls a user function',
                                         a.attname, a.atttypid::pg_catalog.regtype)
                  FROM pg_catalog.pg_attribute AS a
                  JOIN pg_catalog.pg_constraint AS k ON k.contypid OPERATOR(pg_catalog.=) a.atttypid
                 WHERE a.attrelid OPERATOR(pg_catalog.=) v_table.oid AND a.attnum OPERATOR(pg_catalog.>) 0
                   AND NOT a.attisdropped
                   AND outbound_heartbeat._calls_user_code(k.conbin::text)
                UNION ALL
                SELECT pg_catalog.format('index %s calls a user function', i.indexrelid::pg_catalog.regclass)
                  FROM pg_catalog.pg_index AS i
                 WHERE i.indrelid OPERATOR(pg_catalog.=) v_table.oid
                   AND (outbound_heartbeat._calls_user_code(i.indexprs::text)
                        OR outbound_heartbeat._calls_user_code(i.indpred::text))) AS w
         LIMIT 1;
        IF v_found IS NOT NULL THEN
            RETURN v_found;
        END IF;
    END LOOP;
    RETURN NULL;
END
$$;

-- Called first by every API function that writes the two tables (the heartbeat too): refuses,
-- OH428 and before anything is written, to run code on them that a role outside the trusted
-- set could have written. The common case costs one indexed read of pg_trigger and two rows of
-- pg_class.
CREATE OR REPLACE FUNCTION outbound_heartbeat._require_trusted_tables()
RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_found text := outbound_heartbeat._foreign_table_code(false);
BEGIN
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
