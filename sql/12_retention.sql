-- Retention of the audit trail. run_events is the library's own table; prune_events() is the
-- only place the library deletes an event, and it deletes only events past events_retention.
-- The app's tables (runs, jobs) belong to the app: nothing here touches them.

-- ALTER FUNCTION ... OWNER TO needs CREATE on the schema for the new owner: held only
-- inside this file's transaction.
GRANT CREATE ON SCHEMA outbound_heartbeat TO outbound_heartbeat_owner;

-- prune_events()'s answer.
DO $prune_result$
BEGIN
    IF pg_catalog.to_regtype('outbound_heartbeat.prune_result') IS NULL THEN
        CREATE TYPE outbound_heartbeat.prune_result AS (
            cutoff timestamptz, events_deleted bigint, batches integer, done boolean,
            counter_rows_merged bigint);
    END IF;
END
$prune_result$;

-- The only delete of audit events: those past events_retention that still match their links,
-- with the links, in bounded batches (call it repeatedly for short transactions, as the CLI and
-- pg_cron do), then the counter rows merged. done: only rows failing verification are left.
CREATE OR REPLACE FUNCTION outbound_heartbeat.prune_events(batch_size integer DEFAULT 10000, max_batches integer DEFAULT 10)
RETURNS outbound_heartbeat.prune_result
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
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
    v_want bigint;
    v_seen bigint;
    v_gone bigint;
    v_after_at timestamptz := '-infinity';  -- the last row a window read (none yet)
    v_after_id bigint;
BEGIN
    PERFORM outbound_heartbeat._require(prune_events.batch_size BETWEEN 1 AND 1000000, 'batch_size',
                                        'batch_size must be between 1 and 1000000');
    PERFORM outbound_heartbeat._require(prune_events.max_batches BETWEEN 1 AND 100000, 'max_batches',
                                        'max_batches must be between 1 and 100000');
    v_cutoff := pg_catalog.now() - v_settings.events_retention;
    WHILE v_batches < prune_events.max_batches AND NOT v_done LOOP
        v_batch := 0;
        -- One batch deletes batch_size events, reading them oldest first (run_events_created_idx)
        -- in windows: only a row that still matches its audit link is deleted, with that link,
        -- in the statement that checked it (07_audit_chain.sql, _check_links). An altered or
        -- unchained row stays, and verify_events() keeps reporting it; the next window starts
        -- after it. Nothing else ever removes a link. No FOR UPDATE: the owner the API runs as
        -- may not update an event; a row a DBA edits meanwhile gets a new ctid and stays.
        LOOP
            v_want := prune_events.batch_size - v_batch;
            WITH candidates AS (
                SELECT x.ctid AS tid, x.id, x.created_at
                  FROM outbound_heartbeat.run_events AS x
                 WHERE x.created_at < v_cutoff AND x.created_at >= v_after_at
                   AND (v_after_id IS NULL OR x.created_at > v_after_at OR x.id > v_after_id)
                 ORDER BY x.created_at, x.id
                 LIMIT v_want
            ), pruned AS (
                DELETE FROM outbound_heartbeat.run_events AS e
                 WHERE e.ctid = ANY (ARRAY(
                        SELECT w.tid FROM candidates AS w
                          JOIN outbound_heartbeat._check_links(ARRAY(SELECT w2.id FROM candidates AS w2)) AS c
                            ON c.event_id = w.id
                         WHERE c.matches))
                RETURNING e.id
            ), unlinked AS (
                DELETE FROM outbound_heartbeat.run_event_chain AS l
                 USING pruned AS p
                 WHERE l.event_id = p.id
                RETURNING l.event_id
            )
            SELECT (SELECT pg_catalog.count(*) FROM candidates), (SELECT pg_catalog.count(*) FROM unlinked),
                   (SELECT w.created_at FROM candidates AS w ORDER BY w.created_at DESC, w.id DESC LIMIT 1),
                   (SELECT w.id FROM candidates AS w ORDER BY w.created_at DESC, w.id DESC LIMIT 1)
              INTO v_seen, v_gone, v_after_at, v_after_id;
            v_batch := v_batch + v_gone;
            IF v_seen < v_want THEN
                v_done := true;  -- nothing past retention is left after this window
                EXIT;
            END IF;
            EXIT WHEN v_batch >= prune_events.batch_size;
        END LOOP;
        v_batches := v_batches + 1;
        v_deleted := v_deleted + v_batch;
    END LOOP;
    RETURN ROW(v_cutoff, v_deleted, v_batches, v_done,
               outbound_heartbeat._compact_counters(prune_events.batch_size))::outbound_heartbeat.prune_result;
END
$$;
ALTER FUNCTION outbound_heartbeat.prune_events(integer, integer) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat.prune_events(integer, integer) FROM PUBLIC;
-- Retention is an operator's job, never the app's: it deletes audit rows.
SELECT outbound_heartbeat._offer_to('dba', 'outbound_heartbeat.prune_events(integer, integer)');
COMMENT ON FUNCTION outbound_heartbeat.prune_events(integer, integer) IS
    'Deletes audit events older than the events_retention setting that still match their audit links (with those links; an edited one is kept), oldest first, in batches; an operator''s call (grant_dba_role), never the app''s. The only rows the library deletes besides its own counter rows.';

REVOKE CREATE ON SCHEMA outbound_heartbeat FROM outbound_heartbeat_owner;
