-- outbound_heartbeat: the schema, its settings row, the audit trail's table and the role the API
-- runs as. Idempotent: every statement may run again on an installed database and changes nothing.
--
-- The API's functions are owned by outbound_heartbeat_owner, a role that cannot log in, and run
-- with its rights (SECURITY DEFINER): each file says so next to each function. The migrating role
-- must be a superuser, or have CREATEROLE (to create the owner role once and make itself a member
-- of it), or find the role pre-created and granted to it by an administrator:
--     CREATE ROLE outbound_heartbeat_owner NOLOGIN; GRANT outbound_heartbeat_owner TO migrator;

CREATE SCHEMA IF NOT EXISTS outbound_heartbeat;

COMMENT ON SCHEMA outbound_heartbeat IS
    'Heartbeat, stale detection and force-cancel for outbound_call_runs / outbound_call_jobs';

-- Nothing for PUBLIC: the app role gets its rights from grant_app_role() (14_privileges.sql).
REVOKE ALL ON SCHEMA outbound_heartbeat FROM PUBLIC;

DO $owner$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles AS r WHERE r.rolname = 'outbound_heartbeat_owner') THEN
        CREATE ROLE outbound_heartbeat_owner NOLOGIN;
    END IF;
    -- ALTER ... OWNER TO needs the migrating role to be a member of the new owner.
    IF NOT pg_catalog.pg_has_role(CURRENT_USER, 'outbound_heartbeat_owner', 'MEMBER') THEN
        GRANT outbound_heartbeat_owner TO CURRENT_USER;
    END IF;
END
$owner$;

-- OH423 messages name the blocking session's state and transaction start, which
-- pg_stat_activity shows a non-superuser only for its own sessions. Granted when the migrating
-- role may (superuser, or ADMIN on pg_read_all_stats); without it the message names the pid only.
DO $stats$
BEGIN
    IF NOT pg_catalog.pg_has_role('outbound_heartbeat_owner', 'pg_read_all_stats', 'MEMBER') THEN
        GRANT pg_read_all_stats TO outbound_heartbeat_owner;
    END IF;
EXCEPTION WHEN insufficient_privilege THEN
    NULL;  -- a managed server's migrating role may lack ADMIN on it: documented, not required
END
$stats$;

GRANT USAGE ON SCHEMA outbound_heartbeat TO outbound_heartbeat_owner;

-- One row of thresholds a DBA may change with a plain UPDATE; the CHECKs refuse nonsense.
CREATE TABLE IF NOT EXISTS outbound_heartbeat.settings (
    singleton          boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    stale_after        interval NOT NULL DEFAULT '30 seconds' CHECK (stale_after > interval '0'),
    legacy_stale_after interval NOT NULL DEFAULT '5 minutes' CHECK (legacy_stale_after > interval '0'),
    lock_timeout       interval NOT NULL DEFAULT '5 seconds' CHECK (lock_timeout > interval '0'),
    -- NULL means "same as stale_after": how long after a server start, a crash recovery or a
    -- promotion (see _outage_ended_at) nothing is declared stale.
    restart_grace      interval CHECK (restart_grace >= interval '0')
);

INSERT INTO outbound_heartbeat.settings DEFAULT VALUES ON CONFLICT DO NOTHING;

-- Upper bounds, so no threshold can push now() - threshold out of the timestamp range or
-- lock_timeout past what PostgreSQL accepts (added to installs that predate them).
DO $bounds$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_constraint AS c
                    WHERE c.conrelid = 'outbound_heartbeat.settings'::regclass
                      AND c.conname = 'settings_upper_bounds') THEN
        ALTER TABLE outbound_heartbeat.settings ADD CONSTRAINT settings_upper_bounds CHECK (
            stale_after <= interval '100 years' AND legacy_stale_after <= interval '100 years'
            AND lock_timeout <= interval '1 day'
            AND (restart_grace IS NULL OR restart_grace <= interval '100 years'));
    END IF;
END
$bounds$;

-- How long audit events are kept: prune_events() deletes older ones (added to older installs).
ALTER TABLE outbound_heartbeat.settings
    ADD COLUMN IF NOT EXISTS events_retention interval NOT NULL DEFAULT '90 days'
        CONSTRAINT settings_events_retention_check
        CHECK (events_retention > interval '0' AND events_retention <= interval '100 years');

-- How long a call orphaned by its run's end may wait for its callback before the sweep and the
-- read path fail it (sql/15_calls.sql; docs/calls.md says why one hour).
ALTER TABLE outbound_heartbeat.settings
    ADD COLUMN IF NOT EXISTS call_orphan_timeout interval NOT NULL DEFAULT '1 hour'
        CONSTRAINT settings_call_orphan_timeout_check
        CHECK (call_orphan_timeout > interval '0' AND call_orphan_timeout <= interval '100 years');

-- The API reads the thresholds; only a DBA changes them (grant_dba_role()).
GRANT SELECT ON outbound_heartbeat.settings TO outbound_heartbeat_owner;

COMMENT ON TABLE outbound_heartbeat.settings IS
    'One row of thresholds (stale_after, legacy_stale_after, lock_timeout, ...) a DBA may change with UPDATE.';

-- The audit trail: one row per run transition, never updated; prune_events() deletes the rows
-- past events_retention (the only rows the library ever deletes, apart from its own counters).
CREATE TABLE IF NOT EXISTS outbound_heartbeat.run_events (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id      bigint NOT NULL,
    business_id bigint NOT NULL,
    event       text NOT NULL,
    worker_id   text,
    detail      jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Indexes built only when missing: CREATE INDEX IF NOT EXISTS would still take a SHARE lock on
-- every re-apply and hold back every transition's audit row behind any open writer.
DO $event_indexes$
BEGIN
    IF pg_catalog.to_regclass('outbound_heartbeat.run_events_run_idx') IS NULL THEN
        CREATE INDEX run_events_run_idx ON outbound_heartbeat.run_events (run_id, id);
    END IF;
    IF pg_catalog.to_regclass('outbound_heartbeat.run_events_business_idx') IS NULL THEN
        CREATE INDEX run_events_business_idx ON outbound_heartbeat.run_events (business_id, id);
    END IF;
    -- prune_events() finds the rows past retention through it, oldest first, in batches.
    IF pg_catalog.to_regclass('outbound_heartbeat.run_events_created_idx') IS NULL THEN
        CREATE INDEX run_events_created_idx ON outbound_heartbeat.run_events (created_at);
    END IF;
END
$event_indexes$;

-- DELETE is for retention (prune_events(), the only rows the library deletes).
GRANT SELECT, INSERT, DELETE ON outbound_heartbeat.run_events TO outbound_heartbeat_owner;

COMMENT ON TABLE outbound_heartbeat.run_events IS
    'The audit trail: one row per run transition, written by the API only.';

-- Who may call which public function, declared next to each function's body by _offer_to()
-- (03_helpers.sql): 'app' for grant_app_role()'s roles (and grant_dba_role()'s, which hold the
-- app's rights too), 'dba' for grant_dba_role()'s only; a function not listed is the owner's.
-- The signature is text (pg_upgrade refuses a regprocedure column): a dropped function's row
-- resolves to nothing (to_regprocedure), is never granted and is removed by the next _offer_to().
CREATE TABLE IF NOT EXISTS outbound_heartbeat.api_functions (
    signature text PRIMARY KEY,
    audience  text NOT NULL CHECK (audience IN ('app', 'dba'))
);

GRANT SELECT, INSERT, UPDATE, DELETE ON outbound_heartbeat.api_functions TO outbound_heartbeat_owner;

COMMENT ON TABLE outbound_heartbeat.api_functions IS
    'The public functions app roles (''app'') or DBA roles only (''dba'') may call, declared next to each body; grant_app_role() and grant_dba_role() grant from it.';

-- The roles grant_app_role() ('app') or grant_dba_role() ('dba') was last run for: what those
-- two record, not guessed from the grants (a role granted one function by hand is no app role,
-- and must not gain the whole API at the next upgrade). _offer_to() grants a function to them
-- as it is declared, so an upgrade that adds one never breaks a role granted before.
DO $api_roles$
BEGIN
    IF pg_catalog.to_regclass('outbound_heartbeat.api_roles') IS NULL THEN
        CREATE TABLE outbound_heartbeat.api_roles (
            role     regrole PRIMARY KEY,
            audience text NOT NULL CHECK (audience IN ('app', 'dba'))
        );
        -- A database from before this table (releases 1-4): its app roles are the ones their
        -- upgrades re-granted, those holding EXECUTE on heartbeat(); its DBA roles also hold it
        -- on prune_events(), which only grant_dba_role() granted.
        INSERT INTO outbound_heartbeat.api_roles (role, audience)
        SELECT DISTINCT a.grantee::pg_catalog.regrole,
               CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_proc AS q, pg_catalog.aclexplode(q.proacl) AS b
                                  WHERE q.oid OPERATOR(pg_catalog.=)
                                        pg_catalog.to_regprocedure('outbound_heartbeat.prune_events(integer, integer)')
                                    AND b.grantee OPERATOR(pg_catalog.=) a.grantee
                                    AND b.privilege_type OPERATOR(pg_catalog.=) 'EXECUTE')
                    THEN 'dba' ELSE 'app' END
          FROM pg_catalog.pg_proc AS p, pg_catalog.aclexplode(p.proacl) AS a
         WHERE p.oid OPERATOR(pg_catalog.=)
               pg_catalog.to_regprocedure('outbound_heartbeat.heartbeat(bigint, text, bigint)')
           AND a.privilege_type OPERATOR(pg_catalog.=) 'EXECUTE'
           AND a.grantee OPERATOR(pg_catalog.<>) 0 AND a.grantee OPERATOR(pg_catalog.<>) p.proowner
           AND a.grantee OPERATOR(pg_catalog.<>) 'outbound_heartbeat_owner'::pg_catalog.regrole;
    END IF;
END
$api_roles$;

GRANT SELECT, INSERT, UPDATE, DELETE ON outbound_heartbeat.api_roles TO outbound_heartbeat_owner;

COMMENT ON TABLE outbound_heartbeat.api_roles IS
    'The roles grant_app_role() (''app'') or grant_dba_role() (''dba'') was last run for: a function declared later is granted to them at once.';
