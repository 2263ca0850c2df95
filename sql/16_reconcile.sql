-- Reconciling orphaned calls: the app's provider hook (outbound_heartbeat/reconciliation.py)
-- asks the telephony provider what became of each orphaned call and settles it with
-- resolve_call(..., source => 'provider'); this file hands it the calls to ask about, with the
-- keys the provider knows them by. Settling stays resolve_call()'s job (exactly once).

-- ALTER FUNCTION ... OWNER TO needs CREATE on the schema for the new owner: held only
-- inside this file's transaction.
GRANT CREATE ON SCHEMA outbound_heartbeat TO outbound_heartbeat_owner;

-- list_orphaned_call_keys()'s rows.
DO $orphaned_call_key$
BEGIN
    IF pg_catalog.to_regtype('outbound_heartbeat.orphaned_call_key') IS NULL THEN
        CREATE TYPE outbound_heartbeat.orphaned_call_key AS (
            job_id bigint, run_id bigint, business_id bigint, call_key text, call_attempt bigint,
            orphaned_at timestamptz, orphan_reason text, times_out_at timestamptz);
    END IF;
END
$orphaned_call_key$;

-- The unsettled orphaned calls (of one business, or all) with their keys, oldest first, at most
-- max_calls: what to ask the provider about. Calls with no key (adopted from before keys
-- existed) are left to call_orphan_timeout. Reads only.
CREATE OR REPLACE FUNCTION outbound_heartbeat.list_orphaned_call_keys(
    business_id bigint DEFAULT NULL, max_calls integer DEFAULT 100)
RETURNS SETOF outbound_heartbeat.orphaned_call_key
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET TimeZone = 'UTC'
AS $$
BEGIN
    PERFORM outbound_heartbeat._require(list_orphaned_call_keys.max_calls BETWEEN 1 AND 100000, 'max_calls',
                                        'max_calls must be between 1 and 100000');
    -- The orphan index (orphaned_at, id) gives the order; the run gives the business (the one
    -- resolve_call() checks).
    RETURN QUERY
    SELECT j.id::bigint, j.run_id::bigint, r.business_id::bigint, j.call_key::text, j.call_attempt::bigint,
           j.orphaned_at::timestamptz, j.orphan_reason::text, j.orphaned_at + s.call_orphan_timeout
      FROM public.outbound_call_jobs AS j
      JOIN public.outbound_call_runs AS r ON r.id OPERATOR(pg_catalog.=) j.run_id
     CROSS JOIN outbound_heartbeat._settings() AS s
     WHERE j.orphaned_at IS NOT NULL AND j.status OPERATOR(pg_catalog.=) 'in_progress'
       AND j.call_key IS NOT NULL
       AND (list_orphaned_call_keys.business_id IS NULL
            OR r.business_id OPERATOR(pg_catalog.=) list_orphaned_call_keys.business_id)
     ORDER BY j.orphaned_at, j.id
     LIMIT list_orphaned_call_keys.max_calls;
END
$$;
ALTER FUNCTION outbound_heartbeat.list_orphaned_call_keys(bigint, integer) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat.list_orphaned_call_keys(bigint, integer) FROM PUBLIC;
SELECT outbound_heartbeat._offer_to('app', 'outbound_heartbeat.list_orphaned_call_keys(bigint, integer)');
COMMENT ON FUNCTION outbound_heartbeat.list_orphaned_call_keys(bigint, integer) IS
    'Unsettled orphaned calls with their keys (of one business, or all), oldest first, at most max_calls: what a provider reconcile asks about. Reads only.';

REVOKE CREATE ON SCHEMA outbound_heartbeat FROM outbound_heartbeat_owner;
