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
    PERFORM outbound_heartbeat._require(health_check.alert_after > interval '0', 'alert_after',
                                        'alert_after must be a positive interval');
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
