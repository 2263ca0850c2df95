-- Read-only monitoring for DBAs, the CLI and health endpoints. Nothing here changes a row.

-- Every open (pending or running) run with its open job counts, heartbeat age and stale flag.
CREATE OR REPLACE FUNCTION outbound_heartbeat.list_active_runs()
RETURNS SETOF outbound_heartbeat.run_info
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
SET TimeZone = 'UTC'
AS $$
    SELECT d.* FROM outbound_heartbeat._describe_runs(
        ARRAY(SELECT r.id FROM public.outbound_call_runs AS r
               WHERE r.status IN ('pending', 'running')),
        (SELECT s.stale_after FROM outbound_heartbeat._settings() AS s)) AS d
$$;

-- Alerts (severity 'warning' | 'critical'): a running run whose heartbeat is older than
-- alert_after, more than max_stuck runs running, a lock holder that never wrote a heartbeat.
CREATE OR REPLACE FUNCTION outbound_heartbeat.health_check(
    alert_after interval DEFAULT '2 minutes', max_stuck integer DEFAULT 5)
RETURNS SETOF outbound_heartbeat.health_alert
LANGUAGE plpgsql STABLE
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
                             pg_catalog.date_trunc('second', pg_catalog.now() - r.last_heartbeat_at))
      FROM public.outbound_call_runs AS r
     WHERE r.status = 'running' AND r.last_heartbeat_at < pg_catalog.now() - health_check.alert_after
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
END
$$;

-- Open runs with heartbeat age, stale flag and queued / in-progress counts.
CREATE OR REPLACE VIEW outbound_heartbeat.active_runs AS
    SELECT * FROM outbound_heartbeat.list_active_runs();

-- The settings in force (the row, or the defaults when a DBA removed it).
CREATE OR REPLACE FUNCTION outbound_heartbeat.current_settings()
RETURNS outbound_heartbeat.settings
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN outbound_heartbeat._settings();
END
$$;

-- Running runs the liveness rule declares dead and nobody has reclaimed yet (the next reader,
-- worker call or sweep will). Reads only.
CREATE OR REPLACE VIEW outbound_heartbeat.stale_runs AS
    SELECT a.* FROM outbound_heartbeat.active_runs AS a WHERE a.stale;

-- Running runs, the oldest heartbeat first (the original app's "oldest heartbeats" query).
CREATE OR REPLACE VIEW outbound_heartbeat.oldest_heartbeats AS
    SELECT a.id, a.business_id, a.locked_by_worker, a.last_heartbeat_at, a.heartbeat_age,
           a.stale, a.queued_jobs, a.in_progress_jobs
      FROM outbound_heartbeat.active_runs AS a
     WHERE a.status = 'running'
     ORDER BY a.heartbeat_age DESC NULLS FIRST, a.id;

-- Runs by status, every status of the life cycle listed even at zero, plus any status an app
-- wrote itself. Counts the whole table: a scan that grows with history, meant for dashboards.
-- (A function, not a view body, so the text is the same whatever type the app's column has.)
CREATE OR REPLACE FUNCTION outbound_heartbeat.count_runs()
RETURNS TABLE (status text, runs bigint)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN QUERY
    SELECT COALESCE(k.status, c.status), COALESCE(c.runs, 0)
      FROM (VALUES ('pending'), ('running'), ('completed'), ('stopped'), ('cancelled'), ('failed'))
           AS k (status)
      FULL JOIN (SELECT r.status::text AS status, pg_catalog.count(*) AS runs
                   FROM public.outbound_call_runs AS r GROUP BY r.status) AS c
        ON c.status = k.status
     ORDER BY 1;
END
$$;

CREATE OR REPLACE VIEW outbound_heartbeat.run_status_counts AS
    SELECT c.status, c.runs FROM outbound_heartbeat.count_runs() AS c;

-- The audit trail, newest first: all of it, or one run's, or one business's (max_rows at most).
CREATE OR REPLACE FUNCTION outbound_heartbeat.list_events(
    run_id bigint DEFAULT NULL, business_id bigint DEFAULT NULL, max_rows integer DEFAULT 50)
RETURNS SETOF outbound_heartbeat.run_events
LANGUAGE plpgsql STABLE
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

-- Gauges and counters for a Prometheus scrape (the CLI's `metrics` renders them): runs by
-- status, open jobs, stale runs, the oldest heartbeat's age, events by kind.
CREATE OR REPLACE FUNCTION outbound_heartbeat.metrics()
RETURNS SETOF outbound_heartbeat.metric
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
SET TimeZone = 'UTC'
AS $$
BEGIN
    RETURN QUERY
    SELECT 'outbound_heartbeat_runs'::text, 'gauge'::text, 'Runs by status.'::text,
           pg_catalog.jsonb_build_object('status', c.status), c.runs::double precision
      FROM outbound_heartbeat.run_status_counts AS c
     ORDER BY c.status;

    RETURN QUERY
    SELECT 'outbound_heartbeat_open_jobs'::text, 'gauge'::text,
           'Queued and in-progress jobs of open runs.'::text,
           pg_catalog.jsonb_build_object('status', k.status),
           CASE k.status WHEN 'queued' THEN COALESCE(pg_catalog.sum(a.queued_jobs), 0)
                         ELSE COALESCE(pg_catalog.sum(a.in_progress_jobs), 0) END::double precision
      FROM (VALUES ('queued'), ('in_progress')) AS k (status)
      LEFT JOIN outbound_heartbeat.active_runs AS a ON true
     GROUP BY k.status
     ORDER BY k.status;

    RETURN QUERY
    SELECT 'outbound_heartbeat_stale_runs'::text, 'gauge'::text,
           'Running runs whose heartbeat is stale and that nobody has reclaimed yet.'::text,
           '{}'::jsonb, pg_catalog.count(*)::double precision
      FROM outbound_heartbeat.stale_runs;

    RETURN QUERY
    SELECT 'outbound_heartbeat_oldest_heartbeat_age_seconds'::text, 'gauge'::text,
           'Age of the oldest heartbeat among running runs (0 when none runs).'::text,
           '{}'::jsonb,
           COALESCE(pg_catalog.max(pg_catalog.date_part('epoch', a.heartbeat_age)), 0)::double precision
      FROM outbound_heartbeat.active_runs AS a
     WHERE a.status = 'running';

    RETURN QUERY
    SELECT 'outbound_heartbeat_events_total'::text, 'counter'::text,
           'Run transitions recorded in the audit trail, by event.'::text,
           pg_catalog.jsonb_build_object('event', e.event), pg_catalog.count(*)::double precision
      FROM outbound_heartbeat.run_events AS e
     GROUP BY e.event
     ORDER BY e.event;
END
$$;
