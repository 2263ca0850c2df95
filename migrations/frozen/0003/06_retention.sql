-- Retention of the audit trail. run_events is the library's own table; prune_events() is the
-- only place the library deletes an event, and it deletes only events past events_retention.
-- The app's tables (runs, jobs) belong to the app: nothing here touches them.

-- Deletes audit events older than events_retention (a setting, default 90 days), oldest first,
-- in batches of batch_size rows, at most max_batches batches per call, then merges the counter
-- rows (see 03_counters.sql). done = nothing past retention is left. For short transactions,
-- call it repeatedly with a small max_batches (the CLI's `prune` does), e.g. from pg_cron.
CREATE OR REPLACE FUNCTION outbound_heartbeat.prune_events(batch_size integer DEFAULT 10000, max_batches integer DEFAULT 10)
RETURNS outbound_heartbeat.prune_result
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
SET TimeZone = 'UTC'
AS $$
DECLARE
    v_settings outbound_heartbeat.settings := outbound_heartbeat._settings();
    v_cutoff timestamptz;
    v_deleted bigint := 0;
    v_batch bigint;
    v_batches integer := 0;
    v_done boolean := false;
BEGIN
    PERFORM outbound_heartbeat._require(prune_events.batch_size BETWEEN 1 AND 1000000, 'batch_size',
                                        'batch_size must be between 1 and 1000000');
    PERFORM outbound_heartbeat._require(prune_events.max_batches BETWEEN 1 AND 100000, 'max_batches',
                                        'max_batches must be between 1 and 100000');
    v_cutoff := pg_catalog.now() - v_settings.events_retention;
    WHILE v_batches < prune_events.max_batches LOOP
        -- Through run_events_created_idx. No FOR UPDATE: the owner the API runs as may not update
        -- an event (sql/98_security.sql); a row a DBA is editing meanwhile gets a new ctid and is
        -- left for the next batch.
        DELETE FROM outbound_heartbeat.run_events AS e
         WHERE e.ctid = ANY (ARRAY(
                SELECT x.ctid FROM outbound_heartbeat.run_events AS x
                 WHERE x.created_at < v_cutoff
                 ORDER BY x.created_at
                 LIMIT prune_events.batch_size));
        GET DIAGNOSTICS v_batch = ROW_COUNT;
        v_batches := v_batches + 1;
        v_deleted := v_deleted + v_batch;
        IF v_batch < prune_events.batch_size THEN
            v_done := true;
            EXIT;
        END IF;
    END LOOP;
    RETURN ROW(v_cutoff, v_deleted, v_batches, v_done,
               outbound_heartbeat._compact_counters(prune_events.batch_size))::outbound_heartbeat.prune_result;
END
$$;

COMMENT ON FUNCTION outbound_heartbeat.prune_events(integer, integer) IS
    'Deletes audit events older than the events_retention setting, oldest first, in batches; an operator''s call (grant_dba_role), never the app''s. The only rows the library deletes besides its own counter rows.';
