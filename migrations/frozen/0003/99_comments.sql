-- What \df+ and \dv+ show a DBA: one line per API function, view and table of the library.
-- Applied last, by name over every signature, so a function's arguments may change without
-- this file changing. tests/test_sql_reference.py checks that nothing public lacks a comment.

DO $comments$
DECLARE
    v_item record;
    v_function regprocedure;
BEGIN
    FOR v_item IN
        SELECT * FROM (VALUES
            ('create_run', 'Creates a pending run for a business with one queued job per element of a JSON array.'),
            ('claim_run', 'Claims a run for a worker (its own dead incarnation''s run, the given run or the oldest pending one) and returns the lease; no row when none is free.'),
            ('heartbeat', 'Proves the lease holder is alive: ''ok'', ''cancel_requested'' or ''lost''; a stale lease is stopped on the spot.'),
            ('next_job', 'Hands the lease holder its next queued job (now in_progress); no row when done or cancelled; OH409 when the lease is lost.'),
            ('finish_job', 'Records a job''s final status (completed or failed) for the lease holder; idempotent; outcome lease_lost writes nothing.'),
            ('finish_run', 'Ends the lease holder''s run (completed, failed or cancelled) and fails its leftover queued jobs; idempotent.'),
            ('finish_runs', 'finish_run() for many leases in one statement (a release storm): one row per lease, in order, with finish_run()''s answer; the held runs ended together, locked in id order.'),
            ('get_active_run', 'The business''s truly active run, or no row; a running run with a stale heartbeat is stopped by this very call.'),
            ('request_cancel', 'Cooperative cancel: the worker sees cancel_requested at its next heartbeat; a pending run is cancelled at once.'),
            ('force_cancel', 'Cancels a run now, worker dead or alive: queued jobs failed, lock cleared, epoch bumped; returns jobs_cancelled; idempotent.'),
            ('cleanup_stuck_runs', 'Reclaims stuck running runs (stale heartbeat, legacy lock_ts, nothing left, and with on_startup this worker''s runs), one row each with its reason.'),
            ('health_check', 'Alert rows (warning or critical): stale heartbeats, too many running runs, locks without a heartbeat. Reads only.'),
            ('list_active_runs', 'Every open run with open job counts, heartbeat age and stale flag. Reads only.'),
            ('current_settings', 'The thresholds in force: the settings row, or the defaults when it was removed.'),
            ('count_runs', 'Runs by status, every life-cycle status listed even at zero. Reads only.'),
            ('list_events', 'The audit trail, newest first: all of it, one run''s or one business''s.'),
            ('metrics', 'Gauges and counters for a Prometheus scrape (name, kind, help, labels, value). Reads only.'),
            ('grant_app_role', 'Lets a role run the whole API (the web app and the workers); run by the schema''s owner.'),
            ('grant_dba_role', 'Lets a role operate the library: the app''s rights, plus changing the settings, any column of the two tables and an event''s content (which verify_events() then reports); run by the schema''s owner.'),
            ('list_runs', 'The console''s runs list: open runs, then runs ended within ended_within, newest first, with job counts and the reason an ended run stopped. Reads only.'),
            ('describe_run', 'One run for the console''s run page, with job counts by status and the event that ended it. Reads only; OH403 for another business''s run.'),
            ('list_jobs', 'A run''s jobs, newest first, optionally of one status. Reads only; OH403 for another business''s run.')
        ) AS c (name, comment)
    LOOP
        FOR v_function IN
            SELECT p.oid::regprocedure FROM pg_catalog.pg_proc AS p
             WHERE p.pronamespace = 'outbound_heartbeat'::regnamespace AND p.proname = v_item.name
        LOOP
            EXECUTE pg_catalog.format('COMMENT ON FUNCTION %s IS %L', v_function, v_item.comment);
        END LOOP;
    END LOOP;
END
$comments$;

COMMENT ON VIEW outbound_heartbeat.active_runs IS
    'Open runs (pending or running) with queued and in-progress counts, heartbeat age and stale flag. Reads only.';
COMMENT ON VIEW outbound_heartbeat.stale_runs IS
    'Running runs the liveness rule declares dead that nobody has reclaimed yet. Reads only.';
COMMENT ON VIEW outbound_heartbeat.oldest_heartbeats IS
    'Running runs, the oldest heartbeat first. Reads only.';
COMMENT ON VIEW outbound_heartbeat.run_status_counts IS
    'Runs by status. Reads only.';
COMMENT ON TABLE outbound_heartbeat.settings IS
    'One row of thresholds (stale_after, legacy_stale_after, lock_timeout, ...) a DBA may change with UPDATE.';
COMMENT ON TABLE outbound_heartbeat.run_events IS
    'The audit trail: one row per run transition, written by the API only.';
