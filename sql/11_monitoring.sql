-- Read-only monitoring for DBAs, the CLI and health endpoints. Nothing here changes a row.

-- ALTER FUNCTION ... OWNER TO needs CREATE on the schema for the new owner: held only
-- inside this file's transaction.
GRANT CREATE ON SCHEMA outbound_heartbeat TO outbound_heartbeat_owner;

-- Every open (pending or running) run with its open job counts, heartbeat age and stale flag.
CREATE OR REPLACE FUNCTION outbound_heartbeat.list_active_runs()
RETURNS SETOF outbound_heartbeat.run_info
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET TimeZone = 'UTC'
AS $$
    SELECT d.* FROM outbound_heartbeat._describe_runs(
        ARRAY(SELECT r.id FROM public.outbound_call_runs AS r
               WHERE r.status IN ('pending', 'running')),
        (SELECT s.stale_after FROM outbound_heartbeat._settings() AS s)) AS d
$$;
ALTER FUNCTION outbound_heartbeat.list_active_runs() OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat.list_active_runs() FROM PUBLIC;
SELECT outbound_heartbeat._offer_to('app', 'outbound_heartbeat.list_active_runs()');
COMMENT ON FUNCTION outbound_heartbeat.list_active_runs() IS
    'Every open run with open job counts, heartbeat age and stale flag. Reads only.';

-- One row of health_check().
DO $health_alert$
BEGIN
    IF pg_catalog.to_regtype('outbound_heartbeat.health_alert') IS NULL THEN
        CREATE TYPE outbound_heartbeat.health_alert AS (
            severity text, check_name text, run_id bigint, detail text);
    END IF;
END
$health_alert$;

-- Alert rows a scrape can afford: stale heartbeats, too many running, locks without a heartbeat,
-- counting triggers and the drift visible from the open runs only. Exact drift over the whole
-- history is verify_counters()'s job.
CREATE OR REPLACE FUNCTION outbound_heartbeat.health_check(
    alert_after interval DEFAULT '2 minutes', max_stuck integer DEFAULT 5)
RETURNS SETOF outbound_heartbeat.health_alert
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET TimeZone = 'UTC'
AS $$
DECLARE
    v_running bigint;
BEGIN
    PERFORM outbound_heartbeat._require(
        health_check.alert_after BETWEEN interval '1 microsecond' AND interval '100 years',
        'alert_after', 'alert_after must be a positive interval of at most 100 years');
    PERFORM outbound_heartbeat._require(health_check.max_stuck >= 0, 'max_stuck',
                                        'max_stuck must be a non-negative integer');
    RETURN QUERY
    SELECT 'critical'::text, 'stale_heartbeat'::text, r.id::bigint,
           pg_catalog.format('run %s (business %s, worker %s): last heartbeat %s ago',
                             r.id, r.business_id, r.locked_by_worker,
                             pg_catalog.date_trunc('second', pg_catalog.statement_timestamp() - r.last_heartbeat_at))
      FROM public.outbound_call_runs AS r
     WHERE r.status = 'running' AND r.last_heartbeat_at < pg_catalog.statement_timestamp() - health_check.alert_after
     ORDER BY r.id;

    SELECT pg_catalog.count(*) INTO v_running FROM public.outbound_call_runs AS r WHERE r.status = 'running';
    IF v_running > health_check.max_stuck THEN
        RETURN NEXT ROW('warning', 'too_many_running', NULL,
                        pg_catalog.format('%s runs are running (more than %s)', v_running, health_check.max_stuck))
                    ::outbound_heartbeat.health_alert;
    END IF;

    RETURN QUERY
    SELECT 'warning'::text, 'lock_without_heartbeat'::text, r.id::bigint,
           pg_catalog.format('run %s (business %s, status %s) is locked by %s but has no heartbeat',
                             r.id, r.business_id, r.status, r.locked_by_worker)
      FROM public.outbound_call_runs AS r
     WHERE r.locked_by_worker IS NOT NULL AND r.last_heartbeat_at IS NULL
       AND r.status IN ('pending', 'running')
     ORDER BY r.id;

    RETURN QUERY
    SELECT 'warning'::text, 'counting_trigger'::text, NULL::bigint,
           pg_catalog.format('trigger %s on %s is %s: writes to that table go uncounted;'
                             ' re-apply the schema (outbound-heartbeat migrate) or enable it, then run'
                             ' outbound-heartbeat recount', p.trigger_name, p.table_name, p.problem)
      FROM outbound_heartbeat._counting_trigger_problems() AS p;

    -- One statement, so one snapshot: a write commits its rows and its counter rows together.
    RETURN QUERY
    WITH open_runs AS MATERIALIZED (
        SELECT r.id::bigint AS id, r.status::text AS status
          FROM public.outbound_call_runs AS r WHERE r.status IN ('pending', 'running')
    ), by_status AS (
        SELECT k.status,
               (SELECT pg_catalog.count(*) FROM open_runs AS o WHERE o.status = k.status) AS actual,
               (SELECT COALESCE(pg_catalog.sum(t.value), 0) FROM outbound_heartbeat.totals AS t
                 WHERE t.counter = 'runs' AND t.label = k.status) AS kept
          FROM (VALUES ('pending'), ('running')) AS k (status)
    ), negative_runs AS (
        SELECT t.label, pg_catalog.sum(t.value) AS kept FROM outbound_heartbeat.totals AS t
         WHERE t.counter = 'runs' GROUP BY t.label HAVING pg_catalog.sum(t.value) < 0
    ), jobs AS (
        SELECT o.id, c.queued, c.in_progress,
               EXISTS (SELECT 1 FROM public.outbound_call_jobs AS j
                        WHERE j.run_id = o.id AND j.status = 'queued') AS has_queued,
               EXISTS (SELECT 1 FROM public.outbound_call_jobs AS j
                        WHERE j.run_id = o.id AND j.status = 'in_progress') AS has_in_progress
          FROM open_runs AS o
         CROSS JOIN LATERAL (
            SELECT COALESCE(pg_catalog.sum(c.queued), 0) AS queued,
                   COALESCE(pg_catalog.sum(c.in_progress), 0) AS in_progress
              FROM outbound_heartbeat.job_counts AS c WHERE c.run_id = o.id) AS c
    ), drift AS (
        SELECT 1 AS n, NULL::bigint AS run_id,
               pg_catalog.format('the counters say %s %s runs, the runs table has %s', b.kept, b.status, b.actual)
                   AS detail
          FROM by_status AS b WHERE b.kept <> b.actual
        UNION ALL
        SELECT 2, NULL, pg_catalog.format('the counters say %s %s runs', g.kept, g.label)
          FROM negative_runs AS g
        UNION ALL
        SELECT 3, j.id, pg_catalog.format('run %s: the counters say %s queued and %s in progress, but it has'
                                          ' %s queued and %s in-progress jobs', j.id, j.queued, j.in_progress,
                                          CASE WHEN j.has_queued THEN 'some' ELSE 'no' END,
                                          CASE WHEN j.has_in_progress THEN 'some' ELSE 'no' END)
          FROM jobs AS j
         WHERE j.queued < 0 OR j.in_progress < 0
            OR (j.queued > 0) <> j.has_queued OR (j.in_progress > 0) <> j.has_in_progress
    )
    SELECT 'warning'::text, 'counter_drift'::text, d.run_id,
           d.detail || '; run outbound-heartbeat recount (recount_counters())'
      FROM drift AS d
     ORDER BY d.n, d.run_id;

    -- calls (15_calls.sql): orphaned calls older than alert_after, or past their timeout.
    RETURN QUERY SELECT * FROM outbound_heartbeat._call_alerts(health_check.alert_after);
END
$$;
ALTER FUNCTION outbound_heartbeat.health_check(interval, integer) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat.health_check(interval, integer) FROM PUBLIC;
SELECT outbound_heartbeat._offer_to('app', 'outbound_heartbeat.health_check(interval, integer)');
COMMENT ON FUNCTION outbound_heartbeat.health_check(interval, integer) IS
    'Alert rows (warning or critical): stale heartbeats, too many running runs, locks without a heartbeat. Reads only.';

-- Open runs with heartbeat age, stale flag and queued / in-progress counts.
CREATE OR REPLACE VIEW outbound_heartbeat.active_runs AS
    SELECT * FROM outbound_heartbeat.list_active_runs();
GRANT SELECT ON outbound_heartbeat.active_runs TO outbound_heartbeat_owner;
COMMENT ON VIEW outbound_heartbeat.active_runs IS
    'Open runs (pending or running) with queued and in-progress counts, heartbeat age and stale flag. Reads only.';

-- The settings in force (the row, or the defaults when a DBA removed it).
CREATE OR REPLACE FUNCTION outbound_heartbeat.current_settings()
RETURNS outbound_heartbeat.settings
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN outbound_heartbeat._settings();
END
$$;
ALTER FUNCTION outbound_heartbeat.current_settings() OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat.current_settings() FROM PUBLIC;
SELECT outbound_heartbeat._offer_to('app', 'outbound_heartbeat.current_settings()');
COMMENT ON FUNCTION outbound_heartbeat.current_settings() IS
    'The thresholds in force: the settings row, or the defaults when it was removed.';

-- Running runs the liveness rule declares dead and nobody has reclaimed yet (the next reader,
-- worker call or sweep will). Reads only.
CREATE OR REPLACE VIEW outbound_heartbeat.stale_runs AS
    SELECT a.* FROM outbound_heartbeat.active_runs AS a WHERE a.stale;
GRANT SELECT ON outbound_heartbeat.stale_runs TO outbound_heartbeat_owner;
COMMENT ON VIEW outbound_heartbeat.stale_runs IS
    'Running runs the liveness rule declares dead that nobody has reclaimed yet. Reads only.';

-- Running runs, the oldest heartbeat first (the DBA's "oldest heartbeats" query).
CREATE OR REPLACE VIEW outbound_heartbeat.oldest_heartbeats AS
    SELECT a.id, a.business_id, a.locked_by_worker, a.last_heartbeat_at, a.heartbeat_age,
           a.stale, a.queued_jobs, a.in_progress_jobs
      FROM outbound_heartbeat.active_runs AS a
     WHERE a.status = 'running'
     ORDER BY a.heartbeat_age DESC NULLS FIRST, a.id;
GRANT SELECT ON outbound_heartbeat.oldest_heartbeats TO outbound_heartbeat_owner;
COMMENT ON VIEW outbound_heartbeat.oldest_heartbeats IS
    'Running runs, the oldest heartbeat first. Reads only.';

-- Runs by status, every life-cycle status even at zero, read from the trigger-kept counters (a
-- few rows whatever the history). A function, not a view body, so its text does not depend on
-- the type of the app's column.
CREATE OR REPLACE FUNCTION outbound_heartbeat.count_runs()
RETURNS TABLE (status text, runs bigint)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN QUERY
    SELECT COALESCE(k.status, c.status), COALESCE(c.runs, 0)::bigint
      FROM (VALUES ('pending'), ('running'), ('completed'), ('stopped'), ('cancelled'), ('failed'))
           AS k (status)
      FULL JOIN (SELECT t.label AS status, pg_catalog.sum(t.value) AS runs
                   FROM outbound_heartbeat.totals AS t
                  WHERE t.counter = 'runs'
                  GROUP BY t.label
                 HAVING pg_catalog.sum(t.value) <> 0) AS c
        ON c.status = k.status
     ORDER BY 1;
END
$$;
ALTER FUNCTION outbound_heartbeat.count_runs() OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat.count_runs() FROM PUBLIC;
SELECT outbound_heartbeat._offer_to('app', 'outbound_heartbeat.count_runs()');
COMMENT ON FUNCTION outbound_heartbeat.count_runs() IS
    'Runs by status, every life-cycle status listed even at zero. Reads only.';

CREATE OR REPLACE VIEW outbound_heartbeat.run_status_counts AS
    SELECT c.status, c.runs FROM outbound_heartbeat.count_runs() AS c;
GRANT SELECT ON outbound_heartbeat.run_status_counts TO outbound_heartbeat_owner;
COMMENT ON VIEW outbound_heartbeat.run_status_counts IS
    'Runs by status. Reads only.';

-- The audit trail, newest first: all of it, or one run's, or one business's (max_rows at most).
CREATE OR REPLACE FUNCTION outbound_heartbeat.list_events(
    run_id bigint DEFAULT NULL, business_id bigint DEFAULT NULL, max_rows integer DEFAULT 50)
RETURNS SETOF outbound_heartbeat.run_events
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET TimeZone = 'UTC'
AS $$
BEGIN
    PERFORM outbound_heartbeat._require(list_events.max_rows BETWEEN 1 AND 100000, 'max_rows',
                                        'max_rows must be between 1 and 100000');
    -- One statement per filter so each uses its own index (run_id, id) / (business_id, id).
    IF list_events.run_id IS NOT NULL THEN
        RETURN QUERY SELECT e.* FROM outbound_heartbeat.run_events AS e
         WHERE e.run_id = list_events.run_id
           AND (list_events.business_id IS NULL OR e.business_id = list_events.business_id)
         ORDER BY e.id DESC LIMIT list_events.max_rows;
    ELSIF list_events.business_id IS NOT NULL THEN
        RETURN QUERY SELECT e.* FROM outbound_heartbeat.run_events AS e
         WHERE e.business_id = list_events.business_id
         ORDER BY e.id DESC LIMIT list_events.max_rows;
    ELSE
        RETURN QUERY SELECT e.* FROM outbound_heartbeat.run_events AS e
         ORDER BY e.id DESC LIMIT list_events.max_rows;
    END IF;
END
$$;
ALTER FUNCTION outbound_heartbeat.list_events(bigint, bigint, integer) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat.list_events(bigint, bigint, integer) FROM PUBLIC;
SELECT outbound_heartbeat._offer_to('app', 'outbound_heartbeat.list_events(bigint, bigint, integer)');
COMMENT ON FUNCTION outbound_heartbeat.list_events(bigint, bigint, integer) IS
    'The audit trail, newest first: all of it, one run''s or one business''s.';

-- One sample of metrics().
DO $metric$
BEGIN
    IF pg_catalog.to_regtype('outbound_heartbeat.metric') IS NULL THEN
        CREATE TYPE outbound_heartbeat.metric AS (
            name text, kind text, help text, labels jsonb, value double precision);
    END IF;
END
$metric$;

-- Gauges, counters and a histogram for a Prometheus scrape (the CLI's `metrics` renders them).
-- Its cost follows the open runs: totals come from the trigger-kept counters, the open runs
-- are read once.
CREATE OR REPLACE FUNCTION outbound_heartbeat.metrics()
RETURNS SETOF outbound_heartbeat.metric
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET TimeZone = 'UTC'
AS $$
BEGIN
    RETURN QUERY
    SELECT 'outbound_heartbeat_runs'::text, 'gauge'::text, 'Runs by status.'::text,
           pg_catalog.jsonb_build_object('status', c.status), c.runs::double precision
      FROM outbound_heartbeat.count_runs() AS c
     ORDER BY c.status;

    RETURN QUERY
    WITH a AS MATERIALIZED (SELECT * FROM outbound_heartbeat.list_active_runs())
    SELECT m.name, 'gauge'::text, m.help, m.labels, m.value
      FROM (
        SELECT 1 AS n, 'outbound_heartbeat_open_jobs'::text AS name,
               'Queued and in-progress jobs of open runs.'::text AS help,
               '{"status": "in_progress"}'::jsonb AS labels,
               COALESCE(pg_catalog.sum(a.in_progress_jobs), 0)::double precision AS value
          FROM a
        UNION ALL
        SELECT 2, 'outbound_heartbeat_open_jobs', 'Queued and in-progress jobs of open runs.',
               '{"status": "queued"}'::jsonb, COALESCE(pg_catalog.sum(a.queued_jobs), 0)::double precision
          FROM a
        UNION ALL
        SELECT 3, 'outbound_heartbeat_stale_runs',
               'Running runs whose heartbeat is stale and that nobody has reclaimed yet.',
               '{}'::jsonb, (pg_catalog.count(*) FILTER (WHERE a.stale))::double precision
          FROM a
        UNION ALL
        SELECT 4, 'outbound_heartbeat_oldest_heartbeat_age_seconds',
               'Age of the oldest heartbeat among running runs (0 when none runs).',
               '{}'::jsonb,
               COALESCE(pg_catalog.max(pg_catalog.date_part('epoch', a.heartbeat_age))
                        FILTER (WHERE a.status = 'running'), 0)::double precision
          FROM a
      ) AS m
     ORDER BY m.n;

    RETURN QUERY
    SELECT 'outbound_heartbeat_events_total'::text, 'counter'::text,
           'Run transitions recorded in the audit trail, by event.'::text,
           pg_catalog.jsonb_build_object('event', t.label), pg_catalog.sum(t.value)::double precision
      FROM outbound_heartbeat.totals AS t
     WHERE t.counter = 'events'
     GROUP BY t.label
     ORDER BY t.label;

    -- Detection latency (kept by _count_events()): kind 'histogram', one row per cumulative
    -- bucket (name _bucket, label le, '+Inf' the count) and one _sum row; render() makes one
    -- Prometheus histogram of them. Every bucket is shown, zeros included, as a histogram needs.
    RETURN QUERY
    SELECT h.name, 'histogram'::text,
           'Heartbeat age of runs when they were stopped as stale (stale_stopped, or cleaned_up for staleness).'::text,
           h.labels, h.value
      FROM (
        SELECT b.n, 'outbound_heartbeat_detection_latency_seconds_bucket'::text AS name,
               pg_catalog.jsonb_build_object('le', b.le) AS labels,
               COALESCE((SELECT pg_catalog.sum(t.value) FROM outbound_heartbeat.totals AS t
                          WHERE t.counter = 'detection_latency' AND t.label = b.le), 0)::double precision AS value
          FROM (VALUES (1, '15'), (2, '30'), (3, '45'), (4, '60'), (5, '90'), (6, '120'), (7, '300'),
                       (8, '600'), (9, '1800'), (10, '3600'), (11, '+Inf')) AS b (n, le)
        UNION ALL
        SELECT 12, 'outbound_heartbeat_detection_latency_seconds_sum', '{}'::jsonb,
               COALESCE((SELECT pg_catalog.sum(t.value) FROM outbound_heartbeat.totals AS t
                          WHERE t.counter = 'detection_latency' AND t.label = 'sum_ms'), 0)::double precision / 1000
      ) AS h
     ORDER BY h.n;

    -- Calls settled, from the same event counters: by resolve_call() from the status callback,
    -- by resolve_call(source => 'provider') (a reconciliation that asked the provider) and by
    -- call_orphan_timeout (the sweep or the read path). A worker's finish_job() is not counted.
    RETURN QUERY
    SELECT 'outbound_heartbeat_calls_settled_total'::text, 'counter'::text,
           'Calls settled: by resolve_call() (callback), by resolve_call(source => provider) (provider) or failed after call_orphan_timeout (timeout).'::text,
           pg_catalog.jsonb_build_object('by', b.settled_by),
           COALESCE((SELECT pg_catalog.sum(t.value) FROM outbound_heartbeat.totals AS t
                      WHERE t.counter = 'events' AND t.label = b.event), 0)::double precision
      FROM (VALUES (1, 'callback', 'call_resolved'), (2, 'provider', 'call_reconciled'),
                   (3, 'timeout', 'call_timed_out')) AS b (n, settled_by, event)
     ORDER BY b.n;

    -- The thresholds in force, so alerting rules compare against them, not against defaults.
    RETURN QUERY
    SELECT g.name, 'gauge'::text, g.help, '{}'::jsonb, g.value
      FROM outbound_heartbeat._settings() AS s
     CROSS JOIN LATERAL (VALUES
        (1, 'outbound_heartbeat_stale_after_seconds'::text,
         'The stale_after setting: a running run whose heartbeat is older is dead.'::text,
         pg_catalog.date_part('epoch', s.stale_after)::double precision),
        (2, 'outbound_heartbeat_call_orphan_timeout_seconds',
         'The call_orphan_timeout setting: an orphaned call without a callback is failed after it.',
         pg_catalog.date_part('epoch', s.call_orphan_timeout)::double precision)) AS g (n, name, help, value)
     ORDER BY g.n;

    -- calls (15_calls.sql): orphaned calls and the oldest one's age.
    RETURN QUERY SELECT * FROM outbound_heartbeat._call_metrics();
END
$$;
ALTER FUNCTION outbound_heartbeat.metrics() OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat.metrics() FROM PUBLIC;
SELECT outbound_heartbeat._offer_to('app', 'outbound_heartbeat.metrics()');
COMMENT ON FUNCTION outbound_heartbeat.metrics() IS
    'Gauges and counters for a Prometheus scrape (name, kind, help, labels, value). Reads only.';

REVOKE CREATE ON SCHEMA outbound_heartbeat FROM outbound_heartbeat_owner;
