-- Counters kept by triggers, so polls and scrapes read a few rows instead of counting a run's
-- jobs or the whole history: open jobs per run (job_counts) and runs by status and events by
-- kind (totals). Triggers see every writer, the app's own telephony callbacks included.
-- Each statement adds its net change to the current backend's row (backend_pid): a backend
-- runs one transaction at a time, so two transactions never update the same counter row and
-- concurrent job updates neither wait on each other here nor deadlock. The runs row is never
-- touched: heartbeats stay HOT and uncontended (the runs trigger ignores UPDATEs that do not
-- set status, such as every heartbeat). prune_events() merges each run's (label's) rows into
-- one of them, by UPDATE and DELETE only, so a concurrent DELETE (the TRUNCATE trigger, the
-- install's recount) follows the merged row instead of missing a new one. (A transaction that
-- writes one counter row again adds an overflow row instead: see _add_job_counts.)
-- Writers that fire no ordinary trigger (session_replication_role = replica, a disabled
-- trigger) go uncounted: health_check() reports disabled triggers and the drift it can see
-- cheaply, verify_counters() all of it, recount_counters() corrects it online.
--
-- The trigger functions are SECURITY DEFINER (owner's rights) because the app's own roles,
-- which update job status directly, need no privilege on this schema; they run no dynamic SQL
-- and only add the firing statement's own net change to a counter, so a caller steers nothing.

-- ALTER FUNCTION ... OWNER TO needs CREATE on the schema for the new owner: held only
-- inside this file's transaction.
GRANT CREATE ON SCHEMA outbound_heartbeat TO outbound_heartbeat_owner;

-- Open jobs (queued, in_progress) per run, kept by the triggers below, so a poll
-- reads a few rows instead of counting a run's jobs. One row per (run, backend): a backend runs
-- one transaction at a time, so concurrent job updates never queue on the same counter row.
-- backend_pid 0 holds what prune_events() merged. A run's count is the sum of its rows.
CREATE TABLE IF NOT EXISTS outbound_heartbeat.job_counts (
    run_id      bigint NOT NULL,
    backend_pid integer NOT NULL,
    queued      bigint NOT NULL DEFAULT 0,
    in_progress bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (run_id, backend_pid)
);

GRANT SELECT, INSERT, UPDATE, DELETE ON outbound_heartbeat.job_counts TO outbound_heartbeat_owner;

COMMENT ON TABLE outbound_heartbeat.job_counts IS
    'Open jobs (queued, in_progress) per run, kept by triggers on outbound_call_jobs; a run''s count is the sum of its rows. Internal: read through the API.';

-- History totals for metrics(), kept the same way: counter 'runs' by status (a gauge: runs
-- move between labels), counter 'events' by event (only ever grows, pruning included).
CREATE TABLE IF NOT EXISTS outbound_heartbeat.totals (
    counter     text NOT NULL,
    label       text NOT NULL,
    backend_pid integer NOT NULL,
    value       bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (counter, label, backend_pid)
);

GRANT SELECT, INSERT, UPDATE, DELETE ON outbound_heartbeat.totals TO outbound_heartbeat_owner;

COMMENT ON TABLE outbound_heartbeat.totals IS
    'Runs by status and events by kind, kept by triggers, for count_runs() and metrics(); a label''s value is the sum of its rows. Internal.';

-- Overflow keys for a transaction that writes the same counter row more than once: see below.
CREATE SEQUENCE IF NOT EXISTS outbound_heartbeat.counter_overflow_seq;

GRANT USAGE ON SEQUENCE outbound_heartbeat.counter_overflow_seq TO outbound_heartbeat_owner;

-- The runs status trigger's notes: one row per changed run (old and new status), keyed by the
-- top-level transaction, written and consumed by the owner's triggers within one statement.
-- Only the owner may write it, so no session can forge a note (a custom setting could be set
-- by anyone). Unlogged: a note never outlives its statement, so a crash loses nothing.
CREATE UNLOGGED TABLE IF NOT EXISTS outbound_heartbeat.run_status_notes (
    xact       xid8 NOT NULL,
    old_status text,
    new_status text
);

GRANT SELECT, INSERT, DELETE ON outbound_heartbeat.run_status_notes TO outbound_heartbeat_owner;

COMMENT ON TABLE outbound_heartbeat.run_status_notes IS
    'The runs status trigger''s per-row notes, folded into totals by the same statement. Internal, written by the owner only.';

-- An earlier release kept those notes in the custom setting outbound_heartbeat.runs_by_status.
-- Replacing its functions while a statement is between its row triggers and its fold would
-- lose that statement's note: take the runs table's trigger lock first, which waits for the
-- writers of the moment (briefly, under the migration's lock_timeout) and only this once.
DO $note_upgrade$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_proc AS p
                WHERE p.oid = pg_catalog.to_regprocedure('outbound_heartbeat._note_run_status()')
                  AND pg_catalog.strpos(p.prosrc, 'runs_by_status') > 0) THEN
        LOCK TABLE public.outbound_call_runs IN SHARE ROW EXCLUSIVE MODE;
    END IF;
END
$note_upgrade$;

-- Adds open-job deltas to this backend's rows; a row this transaction already wrote gets a fresh
-- overflow row instead, since each further update of one row lengthens a version chain every
-- later statement walks (quadratic for an app updating jobs one by one in a long transaction).
CREATE OR REPLACE FUNCTION outbound_heartbeat._add_job_counts(
    p_run_ids bigint[], p_queued bigint[], p_in_progress bigint[])
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    WITH d AS (
        SELECT u.run_id, u.queued, u.in_progress
          FROM ROWS FROM (pg_catalog.unnest(p_run_ids), pg_catalog.unnest(p_queued),
                         pg_catalog.unnest(p_in_progress)) AS u (run_id, queued, in_progress)
    ), applied AS (
        INSERT INTO outbound_heartbeat.job_counts AS c (run_id, backend_pid, queued, in_progress)
        SELECT d.run_id, pg_catalog.pg_backend_pid(), d.queued, d.in_progress FROM d
        ON CONFLICT (run_id, backend_pid) DO UPDATE
           SET queued = c.queued + EXCLUDED.queued, in_progress = c.in_progress + EXCLUDED.in_progress
         WHERE c.xmin <> pg_catalog.pg_current_xact_id()::xid
        RETURNING c.run_id
    )
    INSERT INTO outbound_heartbeat.job_counts AS c (run_id, backend_pid, queued, in_progress)
    SELECT d.run_id,
           -(pg_catalog.nextval('outbound_heartbeat.counter_overflow_seq') % 2147483647 + 1)::integer,
           d.queued, d.in_progress
      FROM d
     WHERE NOT EXISTS (SELECT 1 FROM applied WHERE applied.run_id = d.run_id)
    ON CONFLICT (run_id, backend_pid) DO UPDATE
       SET queued = c.queued + EXCLUDED.queued, in_progress = c.in_progress + EXCLUDED.in_progress;
END
$$;
ALTER FUNCTION outbound_heartbeat._add_job_counts(bigint[], bigint[], bigint[]) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._add_job_counts(bigint[], bigint[], bigint[]) FROM PUBLIC;

-- The same for totals: adds per-label deltas to one counter, overflow rows as above.
CREATE OR REPLACE FUNCTION outbound_heartbeat._add_totals(p_counter text, p_labels text[], p_values bigint[])
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    WITH d AS (
        SELECT u.label, pg_catalog.sum(u.value)::bigint AS value
          FROM ROWS FROM (pg_catalog.unnest(p_labels), pg_catalog.unnest(p_values)) AS u (label, value)
         GROUP BY u.label
    ), applied AS (
        INSERT INTO outbound_heartbeat.totals AS t (counter, label, backend_pid, value)
        SELECT p_counter, d.label, pg_catalog.pg_backend_pid(), d.value FROM d
        ON CONFLICT (counter, label, backend_pid) DO UPDATE SET value = t.value + EXCLUDED.value
         WHERE t.xmin <> pg_catalog.pg_current_xact_id()::xid
        RETURNING t.label
    )
    INSERT INTO outbound_heartbeat.totals AS t (counter, label, backend_pid, value)
    SELECT p_counter, d.label,
           -(pg_catalog.nextval('outbound_heartbeat.counter_overflow_seq') % 2147483647 + 1)::integer,
           d.value
      FROM d
     WHERE NOT EXISTS (SELECT 1 FROM applied WHERE applied.label = d.label)
    ON CONFLICT (counter, label, backend_pid) DO UPDATE SET value = t.value + EXCLUDED.value;
END
$$;
ALTER FUNCTION outbound_heartbeat._add_totals(text, text[], bigint[]) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._add_totals(text, text[], bigint[]) FROM PUBLIC;

-- Adds one jobs statement's net change of queued / in-progress jobs per run to this backend's
-- job_counts rows (INSERT, UPDATE, DELETE through transition tables; TRUNCATE empties them).
CREATE OR REPLACE FUNCTION outbound_heartbeat._count_jobs()
RETURNS trigger
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_run_ids bigint[];
    v_queued bigint[];
    v_in_progress bigint[];
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        DELETE FROM outbound_heartbeat.job_counts;
        RETURN NULL;
    ELSIF TG_OP = 'INSERT' THEN
        SELECT pg_catalog.array_agg(d.run_id), pg_catalog.array_agg(d.queued), pg_catalog.array_agg(d.in_progress)
          INTO v_run_ids, v_queued, v_in_progress
          FROM (SELECT n.run_id::bigint AS run_id,
                       pg_catalog.count(*) FILTER (WHERE n.status = 'queued') AS queued,
                       pg_catalog.count(*) FILTER (WHERE n.status = 'in_progress') AS in_progress
                  FROM new_jobs AS n
                 WHERE n.status IN ('queued', 'in_progress') AND n.run_id IS NOT NULL
                 GROUP BY n.run_id) AS d;
    ELSIF TG_OP = 'UPDATE' THEN
        SELECT pg_catalog.array_agg(d.run_id), pg_catalog.array_agg(d.queued), pg_catalog.array_agg(d.in_progress)
          INTO v_run_ids, v_queued, v_in_progress
          FROM (SELECT x.run_id::bigint AS run_id, pg_catalog.sum(x.queued)::bigint AS queued,
                       pg_catalog.sum(x.in_progress)::bigint AS in_progress
                  FROM (SELECT n.run_id, CASE WHEN n.status = 'queued' THEN 1 ELSE 0 END AS queued,
                               CASE WHEN n.status = 'in_progress' THEN 1 ELSE 0 END AS in_progress
                          FROM new_jobs AS n
                         WHERE n.status IN ('queued', 'in_progress')
                        UNION ALL
                        SELECT o.run_id, CASE WHEN o.status = 'queued' THEN -1 ELSE 0 END,
                               CASE WHEN o.status = 'in_progress' THEN -1 ELSE 0 END
                          FROM old_jobs AS o
                         WHERE o.status IN ('queued', 'in_progress')) AS x
                 WHERE x.run_id IS NOT NULL
                 GROUP BY x.run_id
                HAVING pg_catalog.sum(x.queued) <> 0 OR pg_catalog.sum(x.in_progress) <> 0) AS d;
    ELSE
        SELECT pg_catalog.array_agg(d.run_id), pg_catalog.array_agg(d.queued), pg_catalog.array_agg(d.in_progress)
          INTO v_run_ids, v_queued, v_in_progress
          FROM (SELECT o.run_id::bigint AS run_id,
                       -pg_catalog.count(*) FILTER (WHERE o.status = 'queued') AS queued,
                       -pg_catalog.count(*) FILTER (WHERE o.status = 'in_progress') AS in_progress
                  FROM old_jobs AS o
                 WHERE o.status IN ('queued', 'in_progress') AND o.run_id IS NOT NULL
                 GROUP BY o.run_id) AS d;
    END IF;
    IF v_run_ids IS NOT NULL THEN
        PERFORM outbound_heartbeat._add_job_counts(v_run_ids, v_queued, v_in_progress);
    END IF;
    RETURN NULL;
END
$$;
ALTER FUNCTION outbound_heartbeat._count_jobs() OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._count_jobs() FROM PUBLIC;

-- Adds one runs statement's net change of runs per status to this backend's 'runs' totals:
-- INSERT and DELETE per statement (transition tables), TRUNCATE zero. (Its per-row UPDATE
-- branch serves an earlier release's status trigger until the install swaps it, see below.)
CREATE OR REPLACE FUNCTION outbound_heartbeat._count_runs()
RETURNS trigger
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_labels text[];
    v_values bigint[];
BEGIN
    IF TG_OP = 'UPDATE' THEN
        PERFORM outbound_heartbeat._add_totals('runs', ARRAY[OLD.status::text, NEW.status::text],
                                               ARRAY[-1, 1]::bigint[]);
        RETURN NULL;
    ELSIF TG_OP = 'INSERT' THEN
        SELECT pg_catalog.array_agg(d.status), pg_catalog.array_agg(d.n) INTO v_labels, v_values
          FROM (SELECT n.status::text AS status, pg_catalog.count(*) AS n
                  FROM new_runs AS n WHERE n.status IS NOT NULL GROUP BY n.status::text) AS d;
    ELSIF TG_OP = 'DELETE' THEN
        SELECT pg_catalog.array_agg(d.status), pg_catalog.array_agg(d.n) INTO v_labels, v_values
          FROM (SELECT o.status::text AS status, -pg_catalog.count(*) AS n
                  FROM old_runs AS o WHERE o.status IS NOT NULL GROUP BY o.status::text) AS d;
    ELSE
        DELETE FROM outbound_heartbeat.totals AS t WHERE t.counter = 'runs';
        RETURN NULL;
    END IF;
    IF v_labels IS NOT NULL THEN
        PERFORM outbound_heartbeat._add_totals('runs', v_labels, v_values);
    END IF;
    RETURN NULL;
END
$$;
ALTER FUNCTION outbound_heartbeat._count_runs() OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._count_runs() FROM PUBLIC;

-- The runs status trigger per row: a note instead of a counter row per row (a release storm of
-- 250 runs wrote 250 overflow rows); _fold_run_statuses() adds the sum once per statement. Reads
-- only the firing row's OLD and NEW, nothing a session sets.
CREATE OR REPLACE FUNCTION outbound_heartbeat._note_run_status()
RETURNS trigger
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    INSERT INTO outbound_heartbeat.run_status_notes (xact, old_status, new_status)
    VALUES (pg_catalog.pg_current_xact_id(), OLD.status::text, NEW.status::text);
    RETURN NULL;
END
$$;
ALTER FUNCTION outbound_heartbeat._note_run_status() OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._note_run_status() FROM PUBLIC;

-- After each statement that sets runs.status: adds this transaction's notes to the 'runs' totals
-- in one call, so nested statements (an app trigger's UPDATE) never count a note twice, and a
-- statement that changed nothing (no transaction id yet) adds nothing.
CREATE OR REPLACE FUNCTION outbound_heartbeat._fold_run_statuses()
RETURNS trigger
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_xact xid8 := pg_catalog.pg_current_xact_id_if_assigned();
    v_labels text[];
    v_values bigint[];
BEGIN
    IF v_xact IS NULL THEN
        RETURN NULL;
    END IF;
    WITH taken AS (
        DELETE FROM outbound_heartbeat.run_status_notes AS n
         WHERE n.xact OPERATOR(pg_catalog.=) v_xact
        RETURNING n.old_status, n.new_status
    )
    SELECT pg_catalog.array_agg(d.label), pg_catalog.array_agg(d.value) INTO v_labels, v_values
      FROM (SELECT x.label, pg_catalog.sum(x.value)::bigint AS value
              FROM (SELECT t.old_status AS label, -1 AS value FROM taken AS t WHERE t.old_status IS NOT NULL
                    UNION ALL
                    SELECT t.new_status, 1 FROM taken AS t WHERE t.new_status IS NOT NULL) AS x
             GROUP BY x.label
            HAVING pg_catalog.sum(x.value) <> 0) AS d;
    IF v_labels IS NOT NULL THEN
        PERFORM outbound_heartbeat._add_totals('runs', v_labels, v_values);
    END IF;
    RETURN NULL;
END
$$;
ALTER FUNCTION outbound_heartbeat._fold_run_statuses() OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._fold_run_statuses() FROM PUBLIC;

-- Adds one run_events statement's new events per kind to this backend's 'events' totals, and
-- its stale stops' heartbeat ages to the 'detection_latency' histogram. Both only grow: pruning
-- old events does not take them back (Prometheus counters).
CREATE OR REPLACE FUNCTION outbound_heartbeat._count_events()
RETURNS trigger
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_labels text[];
    v_values bigint[];
BEGIN
    SELECT pg_catalog.array_agg(d.event), pg_catalog.array_agg(d.n) INTO v_labels, v_values
      FROM (SELECT n.event, pg_catalog.count(*) AS n FROM new_events AS n GROUP BY n.event) AS d;
    IF v_labels IS NOT NULL THEN
        PERFORM outbound_heartbeat._add_totals('events', v_labels, v_values);
    END IF;
    -- Detection latency: a stop for a stale heartbeat (stale_stopped, or cleaned_up for
    -- staleness) adds one to each cumulative bucket at or above its heartbeat's age (label: the
    -- upper bound in seconds, '+Inf' the count) and the age to 'sum_ms'. Kept where the stop is
    -- recorded because the audit trail is pruned and a scrape must not scan it; the run's
    -- heartbeat is never written after it ends (every worker write is fenced), so the join
    -- reads the age as it was at the stop.
    IF EXISTS (SELECT 1 FROM new_events AS n WHERE n.event IN ('stale_stopped', 'cleaned_up')) THEN
        WITH lat AS (
            SELECT pg_catalog.date_part('epoch', n.created_at - COALESCE(
                       r.last_heartbeat_at::timestamptz, r.lock_ts::timestamptz,
                       r.started_at::timestamptz, r.created_at::timestamptz)) AS seconds
              FROM new_events AS n
              JOIN public.outbound_call_runs AS r ON r.id = n.run_id
             WHERE n.event = 'stale_stopped'
                OR (n.event = 'cleaned_up'
                    AND n.detail ->> 'reason' IN ('stale_heartbeat', 'legacy_lock_timeout'))
        ), hist AS (
            SELECT b.le, pg_catalog.count(*) FILTER (WHERE b.bound IS NULL OR lat.seconds <= b.bound) AS n
              FROM lat
             CROSS JOIN (VALUES ('15', 15), ('30', 30), ('45', 45), ('60', 60), ('90', 90),
                                ('120', 120), ('300', 300), ('600', 600), ('1800', 1800),
                                ('3600', 3600), ('+Inf', NULL)) AS b (le, bound)
             GROUP BY b.le
            UNION ALL
            SELECT 'sum_ms', COALESCE(pg_catalog.sum(pg_catalog.round(GREATEST(lat.seconds, 0) * 1000)), 0)::bigint
              FROM lat
        )
        SELECT pg_catalog.array_agg(h.le), pg_catalog.array_agg(h.n) INTO v_labels, v_values
          FROM hist AS h WHERE h.n > 0;
        IF v_labels IS NOT NULL THEN
            PERFORM outbound_heartbeat._add_totals('detection_latency', v_labels, v_values);
        END IF;
    END IF;
    RETURN NULL;
END
$$;
ALTER FUNCTION outbound_heartbeat._count_events() OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._count_events() FROM PUBLIC;

-- Counts from the app's tables under a SHARE lock (writers wait until commit), so counters start
-- exact at install or after a counting trigger was found missing; notes a fold never took are
-- stale then (their change is in the rows). Online, recount_counters() does it without a lock.
CREATE OR REPLACE FUNCTION outbound_heartbeat._recount()
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    LOCK TABLE public.outbound_call_runs, public.outbound_call_jobs IN SHARE MODE;
    LOCK TABLE outbound_heartbeat.totals IN SHARE UPDATE EXCLUSIVE MODE;  -- see recount_counters()
    DELETE FROM outbound_heartbeat.job_counts;
    INSERT INTO outbound_heartbeat.job_counts (run_id, backend_pid, queued, in_progress)
    SELECT j.run_id, 0, pg_catalog.count(*) FILTER (WHERE j.status = 'queued'),
           pg_catalog.count(*) FILTER (WHERE j.status = 'in_progress')
      FROM public.outbound_call_jobs AS j
     WHERE j.status IN ('queued', 'in_progress') AND j.run_id IS NOT NULL
     GROUP BY j.run_id;
    DELETE FROM outbound_heartbeat.totals AS t WHERE t.counter = 'runs';
    INSERT INTO outbound_heartbeat.totals (counter, label, backend_pid, value)
    SELECT 'runs', r.status::text, 0, pg_catalog.count(*)
      FROM public.outbound_call_runs AS r WHERE r.status IS NOT NULL GROUP BY r.status::text;
    DELETE FROM outbound_heartbeat.run_status_notes;
END
$$;
ALTER FUNCTION outbound_heartbeat._recount() OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._recount() FROM PUBLIC;

-- The counting triggers not as installed (missing, disabled, replica-only, another function): a
-- catalog read of nine rows, cheap enough for health_check() on every check and for the install
-- before it decides to recount. ENABLE ALWAYS counts every writer and is fine.
CREATE OR REPLACE FUNCTION outbound_heartbeat._counting_trigger_problems()
RETURNS TABLE (table_name text, trigger_name text, problem text)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- PL/pgSQL for its cached plan (a SQL function with SET clauses is planned on every call).
    RETURN QUERY
    SELECT e.relation, e.name,
           CASE WHEN t.oid IS NULL THEN 'missing'
                WHEN t.tgenabled OPERATOR(pg_catalog.=) 'D' THEN 'disabled'
                WHEN t.tgenabled OPERATOR(pg_catalog.=) 'R' THEN 'enabled for replication only (ENABLE REPLICA)'
                ELSE pg_catalog.format('calling %s instead of %s', t.tgfoid::pg_catalog.regprocedure,
                                       e.functions[1]) END
      FROM (VALUES
            (1, 'public.outbound_call_jobs', 'outbound_heartbeat_count_insert', ARRAY['outbound_heartbeat._count_jobs()']),
            (2, 'public.outbound_call_jobs', 'outbound_heartbeat_count_update', ARRAY['outbound_heartbeat._count_jobs()']),
            (3, 'public.outbound_call_jobs', 'outbound_heartbeat_count_delete', ARRAY['outbound_heartbeat._count_jobs()']),
            (4, 'public.outbound_call_jobs', 'outbound_heartbeat_count_truncate', ARRAY['outbound_heartbeat._count_jobs()']),
            (5, 'public.outbound_call_runs', 'outbound_heartbeat_count_insert', ARRAY['outbound_heartbeat._count_runs()']),
            (6, 'public.outbound_call_runs', 'outbound_heartbeat_count_status',
                ARRAY['outbound_heartbeat._note_run_status()', 'outbound_heartbeat._count_runs()']),
            (7, 'public.outbound_call_runs', 'outbound_heartbeat_count_status_fold', ARRAY['outbound_heartbeat._fold_run_statuses()']),
            (8, 'public.outbound_call_runs', 'outbound_heartbeat_count_delete', ARRAY['outbound_heartbeat._count_runs()']),
            (9, 'public.outbound_call_runs', 'outbound_heartbeat_count_truncate', ARRAY['outbound_heartbeat._count_runs()']),
            (10, 'outbound_heartbeat.run_events', 'outbound_heartbeat_count_events', ARRAY['outbound_heartbeat._count_events()']))
           AS e (n, relation, name, functions)
      LEFT JOIN pg_catalog.pg_trigger AS t
        ON t.tgrelid OPERATOR(pg_catalog.=) pg_catalog.to_regclass(e.relation)
       AND t.tgname OPERATOR(pg_catalog.=) e.name::name
     WHERE t.oid IS NULL OR t.tgenabled NOT IN ('O', 'A')
        OR NOT (t.tgfoid OPERATOR(pg_catalog.=) ANY (ARRAY(
                SELECT pg_catalog.to_regprocedure(f)::pg_catalog.oid FROM pg_catalog.unnest(e.functions) AS f)))
     ORDER BY e.n;
END
$$;
ALTER FUNCTION outbound_heartbeat._counting_trigger_problems() OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._counting_trigger_problems() FROM PUBLIC;

-- Installs the counting triggers when any is missing, disabled or changed (a fresh install, an
-- upgrade, a rollback re-applied, a DBA's DISABLE TRIGGER) and starts the counters from the
-- rows already there, saying so (a WARNING, which migrate() reports); otherwise changes
-- nothing. CREATE TRIGGER's lock holds writers back until this transaction commits, so no
-- change slips between the recount and the first counted statement.
DO $install$
DECLARE
    v_problems text;
BEGIN
    SELECT pg_catalog.string_agg(pg_catalog.format('%s on %s %s', p.trigger_name, p.table_name, p.problem), '; ')
      INTO v_problems
      FROM outbound_heartbeat._counting_trigger_problems() AS p
     WHERE p.table_name <> 'outbound_heartbeat.run_events'
       AND p.trigger_name <> 'outbound_heartbeat_count_status_fold';
    IF v_problems IS NULL THEN
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_trigger AS t
                WHERE t.tgrelid IN ('public.outbound_call_jobs'::regclass, 'public.outbound_call_runs'::regclass)
                  AND t.tgname LIKE 'outbound\_heartbeat\_count\_%') THEN
        RAISE WARNING USING ERRCODE = 'OH001',
            MESSAGE = pg_catalog.format('outbound_heartbeat counters: %s; writes meanwhile went uncounted:'
                                        ' triggers re-installed and counters recounted', v_problems);
    END IF;
    DROP TRIGGER IF EXISTS outbound_heartbeat_count_insert ON public.outbound_call_jobs;
    DROP TRIGGER IF EXISTS outbound_heartbeat_count_update ON public.outbound_call_jobs;
    DROP TRIGGER IF EXISTS outbound_heartbeat_count_delete ON public.outbound_call_jobs;
    DROP TRIGGER IF EXISTS outbound_heartbeat_count_truncate ON public.outbound_call_jobs;
    DROP TRIGGER IF EXISTS outbound_heartbeat_count_insert ON public.outbound_call_runs;
    DROP TRIGGER IF EXISTS outbound_heartbeat_count_status ON public.outbound_call_runs;
    DROP TRIGGER IF EXISTS outbound_heartbeat_count_status_fold ON public.outbound_call_runs;
    DROP TRIGGER IF EXISTS outbound_heartbeat_count_delete ON public.outbound_call_runs;
    DROP TRIGGER IF EXISTS outbound_heartbeat_count_truncate ON public.outbound_call_runs;
    CREATE TRIGGER outbound_heartbeat_count_insert AFTER INSERT ON public.outbound_call_jobs
        REFERENCING NEW TABLE AS new_jobs
        FOR EACH STATEMENT EXECUTE FUNCTION outbound_heartbeat._count_jobs();
    CREATE TRIGGER outbound_heartbeat_count_update AFTER UPDATE ON public.outbound_call_jobs
        REFERENCING OLD TABLE AS old_jobs NEW TABLE AS new_jobs
        FOR EACH STATEMENT EXECUTE FUNCTION outbound_heartbeat._count_jobs();
    CREATE TRIGGER outbound_heartbeat_count_delete AFTER DELETE ON public.outbound_call_jobs
        REFERENCING OLD TABLE AS old_jobs
        FOR EACH STATEMENT EXECUTE FUNCTION outbound_heartbeat._count_jobs();
    CREATE TRIGGER outbound_heartbeat_count_truncate AFTER TRUNCATE ON public.outbound_call_jobs
        FOR EACH STATEMENT EXECUTE FUNCTION outbound_heartbeat._count_jobs();
    CREATE TRIGGER outbound_heartbeat_count_insert AFTER INSERT ON public.outbound_call_runs
        REFERENCING NEW TABLE AS new_runs
        FOR EACH STATEMENT EXECUTE FUNCTION outbound_heartbeat._count_runs();
    -- Fire only for statements that set status (never for a heartbeat): the row trigger notes
    -- each changed row, then the statement trigger adds the statement's sum.
    -- Compared as pg_catalog.text: the stored condition keeps pg_catalog's operator, whatever
    -- the (adopted) column's type and whatever operators another schema holds.
    CREATE TRIGGER outbound_heartbeat_count_status AFTER UPDATE OF status ON public.outbound_call_runs
        FOR EACH ROW WHEN (OLD.status::pg_catalog.text IS DISTINCT FROM NEW.status::pg_catalog.text)
        EXECUTE FUNCTION outbound_heartbeat._note_run_status();
    CREATE TRIGGER outbound_heartbeat_count_status_fold AFTER UPDATE OF status ON public.outbound_call_runs
        FOR EACH STATEMENT EXECUTE FUNCTION outbound_heartbeat._fold_run_statuses();
    CREATE TRIGGER outbound_heartbeat_count_delete AFTER DELETE ON public.outbound_call_runs
        REFERENCING OLD TABLE AS old_runs
        FOR EACH STATEMENT EXECUTE FUNCTION outbound_heartbeat._count_runs();
    CREATE TRIGGER outbound_heartbeat_count_truncate AFTER TRUNCATE ON public.outbound_call_runs
        FOR EACH STATEMENT EXECUTE FUNCTION outbound_heartbeat._count_runs();
    PERFORM outbound_heartbeat._recount();
END
$install$;

-- An install of an earlier release counts status changes row by row (_count_runs() per row):
-- its row trigger is swapped for the noting one and the statement trigger added, in one
-- transaction under the trigger's lock, so no change goes uncounted or counted twice and no
-- recount is needed. A statement trigger found missing or disabled beside the noting one (a
-- DBA dropped or disabled it: changes went uncounted) is put back with a recount, saying so.
-- Does nothing when both are in place.
DO $install_status_fold$
DECLARE
    v_row_function regprocedure;
    v_problem text;
BEGIN
    SELECT t.tgfoid::regprocedure INTO v_row_function FROM pg_catalog.pg_trigger AS t
     WHERE t.tgrelid = 'public.outbound_call_runs'::regclass AND t.tgname = 'outbound_heartbeat_count_status';
    SELECT p.problem INTO v_problem FROM outbound_heartbeat._counting_trigger_problems() AS p
     WHERE p.trigger_name = 'outbound_heartbeat_count_status_fold';
    IF v_row_function = 'outbound_heartbeat._note_run_status()'::regprocedure AND v_problem IS NULL THEN
        RETURN;
    END IF;
    IF v_row_function = 'outbound_heartbeat._note_run_status()'::regprocedure THEN
        RAISE WARNING USING ERRCODE = 'OH001',
            MESSAGE = pg_catalog.format('outbound_heartbeat counters: outbound_heartbeat_count_status_fold on'
                                        ' public.outbound_call_runs %s; run status changes meanwhile went'
                                        ' uncounted: trigger re-installed and counters recounted', v_problem);
    END IF;
    DROP TRIGGER IF EXISTS outbound_heartbeat_count_status ON public.outbound_call_runs;
    DROP TRIGGER IF EXISTS outbound_heartbeat_count_status_fold ON public.outbound_call_runs;
    -- Compared as pg_catalog.text: the stored condition keeps pg_catalog's operator, whatever
    -- the (adopted) column's type and whatever operators another schema holds.
    CREATE TRIGGER outbound_heartbeat_count_status AFTER UPDATE OF status ON public.outbound_call_runs
        FOR EACH ROW WHEN (OLD.status::pg_catalog.text IS DISTINCT FROM NEW.status::pg_catalog.text)
        EXECUTE FUNCTION outbound_heartbeat._note_run_status();
    CREATE TRIGGER outbound_heartbeat_count_status_fold AFTER UPDATE OF status ON public.outbound_call_runs
        FOR EACH STATEMENT EXECUTE FUNCTION outbound_heartbeat._fold_run_statuses();
    IF v_row_function IS DISTINCT FROM 'outbound_heartbeat._count_runs()'::regprocedure THEN
        PERFORM outbound_heartbeat._recount();
    END IF;
END
$install_status_fold$;

-- Events: counted from the first install on; the events already there are counted once. The
-- counter only grows, past pruning, so it cannot be recounted later: a trigger found disabled
-- is enabled again, saying that the events written meanwhile went uncounted.
DO $install_events$
DECLARE
    v_problem text;
BEGIN
    SELECT p.problem INTO v_problem FROM outbound_heartbeat._counting_trigger_problems() AS p
     WHERE p.trigger_name = 'outbound_heartbeat_count_events';
    IF v_problem IS NULL THEN
        RETURN;
    ELSIF v_problem <> 'missing' THEN
        RAISE WARNING USING ERRCODE = 'OH001',
            MESSAGE = pg_catalog.format('outbound_heartbeat counters: outbound_heartbeat_count_events on'
                                        ' outbound_heartbeat.run_events %s; events written meanwhile went'
                                        ' uncounted in outbound_heartbeat_events_total: trigger re-installed',
                                        v_problem);
        DROP TRIGGER outbound_heartbeat_count_events ON outbound_heartbeat.run_events;
        CREATE TRIGGER outbound_heartbeat_count_events AFTER INSERT ON outbound_heartbeat.run_events
            REFERENCING NEW TABLE AS new_events
            FOR EACH STATEMENT EXECUTE FUNCTION outbound_heartbeat._count_events();
        RETURN;
    END IF;
    CREATE TRIGGER outbound_heartbeat_count_events AFTER INSERT ON outbound_heartbeat.run_events
        REFERENCING NEW TABLE AS new_events
        FOR EACH STATEMENT EXECUTE FUNCTION outbound_heartbeat._count_events();
    DELETE FROM outbound_heartbeat.totals AS t WHERE t.counter = 'events';
    INSERT INTO outbound_heartbeat.totals (counter, label, backend_pid, value)
    SELECT 'events', e.event, 0, pg_catalog.count(*)
      FROM outbound_heartbeat.run_events AS e GROUP BY e.event;
END
$install_events$;

-- Merges each run's (label's) counter rows into one, at most p_max_rows, skipping rows a writer
-- holds. UPDATE and DELETE only, never INSERT: a concurrent DELETE of the counters follows the
-- merged row, where a new row would survive a TRUNCATE as a phantom count.
CREATE OR REPLACE FUNCTION outbound_heartbeat._compact_counters(p_max_rows integer)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_rows tid[];
    v_jobs bigint;
    v_totals bigint;
BEGIN
    -- First lock the rows; then (a new statement, so a snapshot that sees the locked versions)
    -- read, update and delete exactly those: nobody changes them meanwhile.
    v_rows := ARRAY(
        SELECT x.ctid FROM outbound_heartbeat.job_counts AS x
         WHERE x.run_id IN (SELECT y.run_id FROM outbound_heartbeat.job_counts AS y
                             GROUP BY y.run_id
                            HAVING pg_catalog.count(*) > 1
                                OR (pg_catalog.sum(y.queued) = 0 AND pg_catalog.sum(y.in_progress) = 0))
         LIMIT p_max_rows
           FOR UPDATE OF x SKIP LOCKED);
    WITH picked AS MATERIALIZED (
        SELECT x.ctid AS row_id, x.run_id, x.backend_pid, x.queued, x.in_progress
          FROM outbound_heartbeat.job_counts AS x WHERE x.ctid = ANY (v_rows)
    ), ranked AS MATERIALIZED (
        SELECT p.row_id,
               pg_catalog.row_number() OVER w AS n,
               pg_catalog.sum(p.queued) OVER w AS queued,
               pg_catalog.sum(p.in_progress) OVER w AS in_progress
          FROM picked AS p
        WINDOW w AS (PARTITION BY p.run_id ORDER BY p.backend_pid <> 0, p.backend_pid
                     ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING)
    ), merged AS (
        UPDATE outbound_heartbeat.job_counts AS c
           SET queued = r.queued, in_progress = r.in_progress
          FROM ranked AS r
         WHERE c.ctid = r.row_id AND r.n = 1 AND (r.queued <> 0 OR r.in_progress <> 0)
        RETURNING 1
    ), removed AS (
        DELETE FROM outbound_heartbeat.job_counts AS c
         USING ranked AS r
         WHERE c.ctid = r.row_id AND (r.n > 1 OR (r.queued = 0 AND r.in_progress = 0))
        RETURNING 1
    )
    SELECT pg_catalog.count(*) INTO v_jobs FROM removed;

    v_rows := ARRAY(
        SELECT x.ctid FROM outbound_heartbeat.totals AS x
         WHERE (x.counter, x.label) IN (SELECT y.counter, y.label FROM outbound_heartbeat.totals AS y
                                         GROUP BY y.counter, y.label
                                        HAVING pg_catalog.count(*) > 1 OR pg_catalog.sum(y.value) = 0)
         LIMIT p_max_rows
           FOR UPDATE OF x SKIP LOCKED);
    WITH picked AS MATERIALIZED (
        SELECT x.ctid AS row_id, x.counter, x.label, x.backend_pid, x.value
          FROM outbound_heartbeat.totals AS x WHERE x.ctid = ANY (v_rows)
    ), ranked AS MATERIALIZED (
        SELECT p.row_id,
               pg_catalog.row_number() OVER w AS n,
               pg_catalog.sum(p.value) OVER w AS value
          FROM picked AS p
        WINDOW w AS (PARTITION BY p.counter, p.label ORDER BY p.backend_pid <> 0, p.backend_pid
                     ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING)
    ), merged AS (
        UPDATE outbound_heartbeat.totals AS t
           SET value = r.value
          FROM ranked AS r
         WHERE t.ctid = r.row_id AND r.n = 1 AND r.value <> 0
        RETURNING 1
    ), removed AS (
        DELETE FROM outbound_heartbeat.totals AS t
         USING ranked AS r
         WHERE t.ctid = r.row_id AND (r.n > 1 OR r.value = 0)
        RETURNING 1
    )
    SELECT pg_catalog.count(*) INTO v_totals FROM removed;

    -- Notes whose statement never folded them (a fold trigger dropped or disabled meanwhile):
    -- their transactions are over, their change is in the rows; health_check() reports the
    -- trigger and recount_counters() the drift. Only the visible (ended) ones are removed.
    DELETE FROM outbound_heartbeat.run_status_notes AS n
     WHERE n.ctid = ANY (ARRAY(SELECT x.ctid FROM outbound_heartbeat.run_status_notes AS x LIMIT p_max_rows));
    RETURN v_jobs + v_totals;
END
$$;
ALTER FUNCTION outbound_heartbeat._compact_counters(integer) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._compact_counters(integer) FROM PUBLIC;

-- The counters against the tables, in one snapshot: a statement's rows and counter rows commit
-- together, so a difference is drift an uncounted writer left, never a write in flight. Reads
-- every open job and run: an operator's call, not a scrape's.
CREATE OR REPLACE FUNCTION outbound_heartbeat._counter_drift()
RETURNS TABLE (counter text, run_id bigint, status text, kept bigint, actual bigint)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    WITH jobs_actual AS (
        SELECT j.run_id::bigint AS run_id,
               pg_catalog.count(*) FILTER (WHERE j.status = 'queued') AS queued,
               pg_catalog.count(*) FILTER (WHERE j.status = 'in_progress') AS in_progress
          FROM public.outbound_call_jobs AS j
         WHERE j.status IN ('queued', 'in_progress') AND j.run_id IS NOT NULL
         GROUP BY j.run_id
    ), jobs_kept AS (
        SELECT c.run_id, pg_catalog.sum(c.queued)::bigint AS queued,
               pg_catalog.sum(c.in_progress)::bigint AS in_progress
          FROM outbound_heartbeat.job_counts AS c
         GROUP BY c.run_id
    ), jobs AS (
        SELECT COALESCE(a.run_id, k.run_id) AS run_id,
               COALESCE(k.queued, 0) AS kept_queued, COALESCE(a.queued, 0) AS queued,
               COALESCE(k.in_progress, 0) AS kept_in_progress, COALESCE(a.in_progress, 0) AS in_progress
          FROM jobs_actual AS a FULL JOIN jobs_kept AS k ON k.run_id = a.run_id
    ), runs_actual AS (
        SELECT r.status::text AS status, pg_catalog.count(*) AS n
          FROM public.outbound_call_runs AS r WHERE r.status IS NOT NULL GROUP BY r.status::text
    ), runs_kept AS (
        SELECT t.label AS status, pg_catalog.sum(t.value)::bigint AS n
          FROM outbound_heartbeat.totals AS t WHERE t.counter = 'runs' GROUP BY t.label
    )
    SELECT 'jobs', j.run_id, 'queued', j.kept_queued, j.queued FROM jobs AS j
     WHERE j.kept_queued <> j.queued
    UNION ALL
    SELECT 'jobs', j.run_id, 'in_progress', j.kept_in_progress, j.in_progress FROM jobs AS j
     WHERE j.kept_in_progress <> j.in_progress
    UNION ALL
    SELECT 'runs', NULL, COALESCE(a.status, k.status), COALESCE(k.n, 0), COALESCE(a.n, 0)
      FROM runs_actual AS a FULL JOIN runs_kept AS k ON k.status = a.status
     WHERE COALESCE(k.n, 0) <> COALESCE(a.n, 0)
     ORDER BY 1, 2, 3
$$;
ALTER FUNCTION outbound_heartbeat._counter_drift() OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._counter_drift() FROM PUBLIC;

-- Every count the counters get wrong (empty: exact). Read-only, but it reads every open job
-- and every run: run it when a number looks wrong, after a writer that bypassed the triggers,
-- or from a nightly job; health_check() does the cheap part on every check.
CREATE OR REPLACE FUNCTION outbound_heartbeat.verify_counters()
RETURNS TABLE (counter text, run_id bigint, status text, kept bigint, actual bigint)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN QUERY SELECT d.counter, d.run_id, d.status, d.kept, d.actual FROM outbound_heartbeat._counter_drift() AS d;
END
$$;
ALTER FUNCTION outbound_heartbeat.verify_counters() OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat.verify_counters() FROM PUBLIC;
-- Checking the counters reads every open job and run: an operator's call, never the app's.
SELECT outbound_heartbeat._offer_to('dba', 'outbound_heartbeat.verify_counters()');
COMMENT ON FUNCTION outbound_heartbeat.verify_counters() IS
    'Every count the trigger-kept counters get wrong against the tables (empty when exact): jobs per run and status, runs per status. Reads every open job and run: an operator''s call (grant_dba_role).';

-- Corrects exactly the drift verify_counters() sees, in its snapshot, with overflow rows: no lock
-- a writer waits for. Two recounts take turns on a lock no writer takes, READ COMMITTED only: an
-- older snapshot would miss the previous correction and add the same drift twice.
CREATE OR REPLACE FUNCTION outbound_heartbeat.recount_counters()
RETURNS TABLE (counter text, run_id bigint, status text, kept bigint, actual bigint)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    PERFORM outbound_heartbeat._require(
        pg_catalog.current_setting('transaction_isolation') = 'read committed', 'transaction_isolation',
        'recount_counters() needs a READ COMMITTED transaction (its snapshot must follow its lock)');
    LOCK TABLE outbound_heartbeat.totals IN SHARE UPDATE EXCLUSIVE MODE;
    RETURN QUERY
    WITH drift AS MATERIALIZED (
        SELECT d.* FROM outbound_heartbeat._counter_drift() AS d
    ), jobs AS (
        INSERT INTO outbound_heartbeat.job_counts AS c (run_id, backend_pid, queued, in_progress)
        SELECT x.run_id,
               -(pg_catalog.nextval('outbound_heartbeat.counter_overflow_seq') % 2147483647 + 1)::integer,
               x.queued, x.in_progress
          FROM (SELECT d.run_id,
                       COALESCE(pg_catalog.sum(d.actual - d.kept) FILTER (WHERE d.status = 'queued'), 0) AS queued,
                       COALESCE(pg_catalog.sum(d.actual - d.kept) FILTER (WHERE d.status = 'in_progress'), 0)
                           AS in_progress
                  FROM drift AS d WHERE d.counter = 'jobs' GROUP BY d.run_id) AS x
        ON CONFLICT (run_id, backend_pid) DO UPDATE
           SET queued = c.queued + EXCLUDED.queued, in_progress = c.in_progress + EXCLUDED.in_progress
        RETURNING 1
    ), runs AS (
        INSERT INTO outbound_heartbeat.totals AS t (counter, label, backend_pid, value)
        SELECT 'runs', d.status,
               -(pg_catalog.nextval('outbound_heartbeat.counter_overflow_seq') % 2147483647 + 1)::integer,
               d.actual - d.kept
          FROM drift AS d WHERE d.counter = 'runs'
        ON CONFLICT (counter, label, backend_pid) DO UPDATE SET value = t.value + EXCLUDED.value
        RETURNING 1
    )
    SELECT d.counter, d.run_id, d.status, d.kept, d.actual FROM drift AS d ORDER BY 1, 2, 3;
END
$$;
ALTER FUNCTION outbound_heartbeat.recount_counters() OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat.recount_counters() FROM PUBLIC;
-- Correcting the counters reads every open job and run too: an operator's call, never the app's.
SELECT outbound_heartbeat._offer_to('dba', 'outbound_heartbeat.recount_counters()');
COMMENT ON FUNCTION outbound_heartbeat.recount_counters() IS
    'Corrects the counters online by what verify_counters() reports, waiting for no writer; returns what it corrected. An operator''s call (grant_dba_role), e.g. after writes made with session_replication_role = replica or a trigger disabled.';

REVOKE CREATE ON SCHEMA outbound_heartbeat FROM outbound_heartbeat_owner;
