-- Counters kept by triggers, so polls and scrapes read a few rows instead of counting a run's
-- jobs or the whole history: open jobs per run (job_counts) and runs by status and events by
-- kind (totals). Triggers see every writer, the app's own telephony callbacks included.
-- Each statement adds its net change to the current backend's row (backend_pid): a backend
-- runs one transaction at a time, so two transactions never update the same counter row and
-- concurrent job updates neither wait on each other here nor deadlock. The runs row is never
-- touched: heartbeats stay HOT and uncontended (the runs trigger ignores UPDATEs that do not
-- set status, such as every heartbeat). prune_events() merges the rows into backend_pid 0.
-- (A transaction that writes one counter row again adds an overflow row instead: see
-- _add_job_counts.)
--
-- The trigger functions are SECURITY DEFINER (owner's rights) because the app's own roles,
-- which update job status directly, need no privilege on this schema; they run no dynamic SQL
-- and only add the firing statement's own net change to a counter, so a caller steers nothing.

-- Overflow keys for a transaction that writes the same counter row more than once: see below.
CREATE SEQUENCE IF NOT EXISTS outbound_heartbeat.counter_overflow_seq;

-- Adds per-run deltas of open jobs to this backend's job_counts rows. A row this transaction
-- already wrote is not updated again: the delta goes to a fresh overflow row (negative
-- backend_pid) instead, because every further update of one row inside one transaction
-- lengthens a version chain that each later statement walks (quadratic for an app that
-- updates jobs one by one in a long transaction). prune_events() merges the overflow rows.
CREATE OR REPLACE FUNCTION outbound_heartbeat._add_job_counts(
    p_run_ids bigint[], p_queued bigint[], p_in_progress bigint[])
RETURNS void
LANGUAGE plpgsql VOLATILE
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

-- The same for totals: adds per-label deltas to one counter, overflow rows as above.
CREATE OR REPLACE FUNCTION outbound_heartbeat._add_totals(p_counter text, p_labels text[], p_values bigint[])
RETURNS void
LANGUAGE plpgsql VOLATILE
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

-- The runs status trigger, once per changed row: notes the row's change (-1 old status, +1 new)
-- in a transaction-local setting, summed per status, instead of writing a counter row per row;
-- the same statement's _fold_run_statuses() adds the sum once. (A release storm of 250 runs
-- wrote 250 overflow rows.) Rolled back with the (sub)transaction, like the counter rows.
-- A note is tagged with this transaction's id: any other value of the setting (set by hand
-- at session level or as a role's default, or left on a pooled server connection by another
-- client) is not a note, is neither counted nor parsed, and is left as it is.
CREATE OR REPLACE FUNCTION outbound_heartbeat._note_run_status()
RETURNS trigger
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_tag text := pg_catalog.pg_current_xact_id()::text || ':';
    v_setting text := pg_catalog.current_setting('outbound_heartbeat.runs_by_status', true);
    v_noted jsonb := '{}';
BEGIN
    IF pg_catalog.starts_with(v_setting, v_tag) THEN
        v_noted := pg_catalog.substr(v_setting, pg_catalog.length(v_tag) + 1)::jsonb;
    END IF;
    IF OLD.status IS NOT NULL THEN
        v_noted := v_noted || pg_catalog.jsonb_build_object(
            OLD.status::text, COALESCE((v_noted ->> OLD.status::text)::bigint, 0) - 1);
    END IF;
    IF NEW.status IS NOT NULL THEN
        v_noted := v_noted || pg_catalog.jsonb_build_object(
            NEW.status::text, COALESCE((v_noted ->> NEW.status::text)::bigint, 0) + 1);
    END IF;
    PERFORM pg_catalog.set_config('outbound_heartbeat.runs_by_status', v_tag || v_noted::text, true);
    RETURN NULL;
END
$$;

-- After each statement that sets runs.status (after its row triggers): adds the changes
-- _note_run_status() noted to the 'runs' totals in one call and clears the note. A nested
-- statement (an app trigger's UPDATE) folds what was noted so far; nothing is counted twice.
-- A value without this transaction's tag is no note: ignored and left alone (see above). (No
-- transaction id yet means no row was changed, so nothing was noted: none is assigned here.)
CREATE OR REPLACE FUNCTION outbound_heartbeat._fold_run_statuses()
RETURNS trigger
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_setting text := pg_catalog.current_setting('outbound_heartbeat.runs_by_status', true);
    v_tag text := pg_catalog.pg_current_xact_id_if_assigned()::text || ':';
    v_labels text[];
    v_values bigint[];
BEGIN
    IF v_tag IS NULL OR NOT COALESCE(pg_catalog.starts_with(v_setting, v_tag), false) THEN
        RETURN NULL;
    END IF;
    PERFORM pg_catalog.set_config('outbound_heartbeat.runs_by_status', '', true);
    SELECT pg_catalog.array_agg(d.key), pg_catalog.array_agg(d.value::bigint) INTO v_labels, v_values
      FROM pg_catalog.jsonb_each_text(pg_catalog.substr(v_setting, pg_catalog.length(v_tag) + 1)::jsonb) AS d
     WHERE d.value::bigint <> 0;
    IF v_labels IS NOT NULL THEN
        PERFORM outbound_heartbeat._add_totals('runs', v_labels, v_values);
    END IF;
    RETURN NULL;
END
$$;

-- Adds one run_events statement's new events per kind to this backend's 'events' totals. The
-- counter only grows: pruning old events does not take them back (a Prometheus counter).
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
    RETURN NULL;
END
$$;

-- Recounts open jobs per run and runs per status from the app's tables, under a SHARE lock
-- that holds their writers back until commit, so the counters start exact. Used at install
-- (adopting existing rows) and when a trigger was found missing.
CREATE OR REPLACE FUNCTION outbound_heartbeat._recount()
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    LOCK TABLE public.outbound_call_runs, public.outbound_call_jobs IN SHARE MODE;
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
END
$$;

-- Installs the counting triggers when any is missing (a fresh install, an upgrade, a rollback
-- re-applied) and starts the counters from the rows already there; otherwise changes nothing.
-- CREATE TRIGGER's lock holds writers back until this transaction commits, so no change slips
-- between the recount and the first counted statement.
DO $install$
BEGIN
    IF (SELECT pg_catalog.count(*) FROM pg_catalog.pg_trigger AS t
         WHERE t.tgrelid IN ('public.outbound_call_jobs'::regclass, 'public.outbound_call_runs'::regclass)
           AND t.tgname LIKE 'outbound\_heartbeat\_count\_%'
           AND t.tgname <> 'outbound_heartbeat_count_status_fold') = 8 THEN
        RETURN;
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
    CREATE TRIGGER outbound_heartbeat_count_status AFTER UPDATE OF status ON public.outbound_call_runs
        FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
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
-- recount is needed. A statement trigger found missing beside the noting one (a DBA dropped
-- it: changes went uncounted) is put back with a recount. Does nothing when both are in place.
DO $install_status_fold$
DECLARE
    v_row_function regprocedure;
BEGIN
    SELECT t.tgfoid::regprocedure INTO v_row_function FROM pg_catalog.pg_trigger AS t
     WHERE t.tgrelid = 'public.outbound_call_runs'::regclass AND t.tgname = 'outbound_heartbeat_count_status';
    IF v_row_function = 'outbound_heartbeat._note_run_status()'::regprocedure
       AND EXISTS (SELECT 1 FROM pg_catalog.pg_trigger AS t
                    WHERE t.tgrelid = 'public.outbound_call_runs'::regclass
                      AND t.tgname = 'outbound_heartbeat_count_status_fold') THEN
        RETURN;
    END IF;
    DROP TRIGGER IF EXISTS outbound_heartbeat_count_status ON public.outbound_call_runs;
    DROP TRIGGER IF EXISTS outbound_heartbeat_count_status_fold ON public.outbound_call_runs;
    CREATE TRIGGER outbound_heartbeat_count_status AFTER UPDATE OF status ON public.outbound_call_runs
        FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
        EXECUTE FUNCTION outbound_heartbeat._note_run_status();
    CREATE TRIGGER outbound_heartbeat_count_status_fold AFTER UPDATE OF status ON public.outbound_call_runs
        FOR EACH STATEMENT EXECUTE FUNCTION outbound_heartbeat._fold_run_statuses();
    IF v_row_function IS DISTINCT FROM 'outbound_heartbeat._count_runs()'::regprocedure THEN
        PERFORM outbound_heartbeat._recount();
    END IF;
END
$install_status_fold$;

-- Events: counted from the first install on; the events already there are counted once.
DO $install_events$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_trigger AS t
                WHERE t.tgrelid = 'outbound_heartbeat.run_events'::regclass
                  AND t.tgname = 'outbound_heartbeat_count_events') THEN
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

-- Merges the per-backend counter rows into backend_pid 0 and drops rows that sum to zero, at
-- most p_max_rows rows per call; rows a live transaction holds are skipped (SKIP LOCKED), so it
-- never waits on a writer. Returns how many rows it merged. prune_events() calls it.
CREATE OR REPLACE FUNCTION outbound_heartbeat._compact_counters(p_max_rows integer)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_jobs bigint;
    v_totals bigint;
BEGIN
    WITH taken AS (
        DELETE FROM outbound_heartbeat.job_counts AS c
         WHERE c.ctid = ANY (ARRAY(
                SELECT x.ctid FROM outbound_heartbeat.job_counts AS x
                 WHERE x.backend_pid <> 0
                 LIMIT p_max_rows
                   FOR UPDATE SKIP LOCKED))
        RETURNING c.run_id, c.queued, c.in_progress
    ), merged AS (
        INSERT INTO outbound_heartbeat.job_counts AS c (run_id, backend_pid, queued, in_progress)
        SELECT taken.run_id, 0, pg_catalog.sum(taken.queued), pg_catalog.sum(taken.in_progress)
          FROM taken GROUP BY taken.run_id
        ON CONFLICT (run_id, backend_pid) DO UPDATE
           SET queued = c.queued + EXCLUDED.queued, in_progress = c.in_progress + EXCLUDED.in_progress
        RETURNING 1
    )
    SELECT pg_catalog.count(*) INTO v_jobs FROM taken;
    DELETE FROM outbound_heartbeat.job_counts AS c
     WHERE c.ctid = ANY (ARRAY(
            SELECT x.ctid FROM outbound_heartbeat.job_counts AS x
             WHERE x.backend_pid = 0 AND x.queued = 0 AND x.in_progress = 0
             LIMIT p_max_rows
               FOR UPDATE SKIP LOCKED));

    WITH taken AS (
        DELETE FROM outbound_heartbeat.totals AS t
         WHERE t.ctid = ANY (ARRAY(
                SELECT x.ctid FROM outbound_heartbeat.totals AS x
                 WHERE x.backend_pid <> 0
                 LIMIT p_max_rows
                   FOR UPDATE SKIP LOCKED))
        RETURNING t.counter, t.label, t.value
    ), merged AS (
        INSERT INTO outbound_heartbeat.totals AS t (counter, label, backend_pid, value)
        SELECT taken.counter, taken.label, 0, pg_catalog.sum(taken.value)
          FROM taken GROUP BY taken.counter, taken.label
        ON CONFLICT (counter, label, backend_pid) DO UPDATE SET value = t.value + EXCLUDED.value
        RETURNING 1
    )
    SELECT pg_catalog.count(*) INTO v_totals FROM taken;
    DELETE FROM outbound_heartbeat.totals AS t
     WHERE t.counter = 'runs' AND t.backend_pid = 0 AND t.value = 0;
    RETURN v_jobs + v_totals;
END
$$;

COMMENT ON TABLE outbound_heartbeat.job_counts IS
    'Open jobs (queued, in_progress) per run, kept by triggers on outbound_call_jobs; a run''s count is the sum of its rows. Internal: read through the API.';
COMMENT ON TABLE outbound_heartbeat.totals IS
    'Runs by status and events by kind, kept by triggers, for count_runs() and metrics(); a label''s value is the sum of its rows. Internal.';
