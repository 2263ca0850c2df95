-- Least privilege, applied after every other file has (re)created its functions (docs/security.md).
-- 1. The API runs with the rights of a dedicated owner role that cannot log in
--    (outbound_heartbeat_owner): every function of the schema, whichever file or release made it,
--    is handed to that role, made SECURITY DEFINER and given a pinned search_path here, by a loop
--    over the catalog. CREATE OR REPLACE resets SECURITY DEFINER and SET clauses, which is why
--    this file re-applies them on every install and upgrade. The `_` helpers are callable by the
--    owner only. grant_app_role() / grant_dba_role() stay SECURITY INVOKER (run by the schema's
--    owner: granting is theirs, not the API's).
-- 2. A tamper-evident audit trail: every row of run_events is chained to the previous row of its
--    run in run_event_chain (sha256 of the previous hash and the row's exact content, encoded so
--    no session setting changes it), which only the owner writes; verify_events() reports the
--    first broken link of each run; prune_events() removes a link only with its verified event.
-- 3. lease_epoch never goes down, whoever writes the row.
-- The migrating role must be a superuser, or have CREATEROLE (to create the owner role once and
-- make itself a member of it), or find the role pre-created and granted to it by an administrator:
--     CREATE ROLE outbound_heartbeat_owner NOLOGIN; GRANT outbound_heartbeat_owner TO migrator;

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

-- CREATE is needed by ALTER FUNCTION ... OWNER TO; it is revoked again at the end of this file.
GRANT USAGE, CREATE ON SCHEMA outbound_heartbeat TO outbound_heartbeat_owner;

-- The hash chain: one link per event, written only by the owner (the trigger below). A link goes
-- only with its event, in the statement of prune_events() that deletes the event after checking
-- that it still matches the link; an event deleted any other way leaves its link behind, which
-- verify_events() reports. hash_version: 1 for the links written before hash format 2 (checked
-- by _event_hash_v1()), 2 for every link written since (_event_hash()).
CREATE TABLE IF NOT EXISTS outbound_heartbeat.run_event_chain (
    event_id     bigint PRIMARY KEY,
    run_id       bigint NOT NULL,
    prev_id      bigint,
    prev_hash    bytea,
    hash         bytea NOT NULL,
    hash_version smallint NOT NULL
);
-- An install older than hash format 2: each of its links keeps its format, version 1 (checked
-- by _event_hash_v1()). Before the functions, whose bodies name the column.
DO $hash_version$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute AS a
                    WHERE a.attrelid = 'outbound_heartbeat.run_event_chain'::pg_catalog.regclass
                      AND a.attname = 'hash_version' AND NOT a.attisdropped) THEN
        ALTER TABLE outbound_heartbeat.run_event_chain ADD COLUMN hash_version smallint NOT NULL DEFAULT 1;
        ALTER TABLE outbound_heartbeat.run_event_chain ALTER COLUMN hash_version DROP DEFAULT;
    END IF;
END
$hash_version$;
CREATE INDEX IF NOT EXISTS run_event_chain_run_idx ON outbound_heartbeat.run_event_chain (run_id, event_id);
-- The newest link of each run: its row lock orders concurrent inserts for one run (and makes a
-- REPEATABLE READ writer fail with 40001 instead of forking the chain). Kept when prune_events()
-- removes every event of the run: a later event of the run chains to it.
CREATE TABLE IF NOT EXISTS outbound_heartbeat.run_event_heads (
    run_id   bigint PRIMARY KEY,
    event_id bigint,
    hash     bytea
);

DO $types$
BEGIN
    IF pg_catalog.to_regtype('outbound_heartbeat.broken_link') IS NULL THEN
        CREATE TYPE outbound_heartbeat.broken_link AS (
            run_id bigint, event_id bigint, problem text, expected text, found text);
    END IF;
END
$types$;

-- The hash of one audit row chained to its predecessor's (format 2): sha256 of a fixed tag, then
-- each field as a 4-byte length (-1: NULL) and its bytes: the previous hash; id, run_id and
-- business_id (int8send); event, worker_id and detail (jsonb's canonical text) in UTF-8;
-- created_at's exact microsecond count (timestamptz_send: era and infinities included). Binary
-- send functions, convert_to() and no backslash in a literal: no session setting changes it.
-- _check_links() spells the same formula inline (a call per row would cost more than the hash).
CREATE OR REPLACE FUNCTION outbound_heartbeat._event_hash(
    p_prev bytea, p_id bigint, p_run_id bigint, p_business_id bigint, p_event text,
    p_worker_id text, p_detail jsonb, p_created_at timestamptz)
RETURNS bytea
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT pg_catalog.sha256(
        pg_catalog.convert_to('outbound_heartbeat.run_events hash 2', 'UTF8')
        || COALESCE(pg_catalog.int4send(pg_catalog.length(p_prev)) || p_prev, pg_catalog.int4send(-1))
        || COALESCE(pg_catalog.int4send(8) || pg_catalog.int8send(p_id), pg_catalog.int4send(-1))
        || COALESCE(pg_catalog.int4send(8) || pg_catalog.int8send(p_run_id), pg_catalog.int4send(-1))
        || COALESCE(pg_catalog.int4send(8) || pg_catalog.int8send(p_business_id), pg_catalog.int4send(-1))
        || COALESCE(pg_catalog.int4send(pg_catalog.length(pg_catalog.convert_to(p_event, 'UTF8')))
                    || pg_catalog.convert_to(p_event, 'UTF8'), pg_catalog.int4send(-1))
        || COALESCE(pg_catalog.int4send(pg_catalog.length(pg_catalog.convert_to(p_worker_id, 'UTF8')))
                    || pg_catalog.convert_to(p_worker_id, 'UTF8'), pg_catalog.int4send(-1))
        || COALESCE(pg_catalog.int4send(pg_catalog.length(pg_catalog.convert_to(p_detail::text, 'UTF8')))
                    || pg_catalog.convert_to(p_detail::text, 'UTF8'), pg_catalog.int4send(-1))
        || COALESCE(pg_catalog.int4send(8) || pg_catalog.timestamptz_send(p_created_at), pg_catalog.int4send(-1)))
$$;

-- The hash of links written before format 2 (hash_version 1): sha256(previous hash || the JSON
-- array of the row's columns, created_at as UTC text to the microsecond). That text has no era
-- and no infinity, so only an AD, finite created_at gets it; any other instant gets a text the
-- old format never wrote (it ends in its era, or is the exact binary value), so it never matches.
CREATE OR REPLACE FUNCTION outbound_heartbeat._event_hash_v1(
    p_prev bytea, p_id bigint, p_run_id bigint, p_business_id bigint, p_event text,
    p_worker_id text, p_detail jsonb, p_created_at timestamptz)
RETURNS bytea
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT pg_catalog.sha256(COALESCE(p_prev, ''::bytea) || pg_catalog.convert_to(
        pg_catalog.jsonb_build_array(
            p_id, p_run_id, p_business_id, p_event, p_worker_id, p_detail,
            CASE WHEN NOT pg_catalog.isfinite(p_created_at)
                 THEN pg_catalog.encode(pg_catalog.timestamptz_send(p_created_at), 'hex')
                 WHEN pg_catalog.date_part('year', p_created_at AT TIME ZONE 'UTC') < 1
                 THEN pg_catalog.to_char(p_created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z "BC')
                 ELSE pg_catalog.to_char(p_created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
            END)::text,
        'UTF8'))
$$;

-- Checks events against their links, set-wise (one call for verify_events() or a prune batch):
-- whether the row still hashes to its link in the link's format, and the hash it has now (an
-- event without a link: not linked, no match). A version 1 genesis link written by a session with
-- standard_conforming_strings off (the old format's empty-hash literal then read as the byte
-- 'x') is accepted in that spelling too: the owner wrote it. The format 2 hash is _event_hash()'s.
CREATE OR REPLACE FUNCTION outbound_heartbeat._check_links(p_event_ids bigint[])
RETURNS TABLE (event_id bigint, run_id bigint, linked boolean, matches boolean, expected bytea, found bytea)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT e.id, COALESCE(l.run_id, e.run_id), l.event_id IS NOT NULL,
           COALESCE(l.hash = h.found
                    OR (l.hash_version = 1 AND l.prev_hash IS NULL AND l.hash = outbound_heartbeat._event_hash_v1(
                            pg_catalog.convert_to('x', 'UTF8'), e.id, e.run_id, e.business_id, e.event,
                            e.worker_id, e.detail, e.created_at)),
                    false),
           l.hash, h.found
      FROM outbound_heartbeat.run_events AS e
      LEFT JOIN outbound_heartbeat.run_event_chain AS l ON l.event_id = e.id
     CROSS JOIN LATERAL (
        SELECT CASE WHEN l.hash_version = 1
            THEN outbound_heartbeat._event_hash_v1(
                l.prev_hash, e.id, e.run_id, e.business_id, e.event, e.worker_id, e.detail, e.created_at)
            ELSE pg_catalog.sha256(
                pg_catalog.convert_to('outbound_heartbeat.run_events hash 2', 'UTF8')
                || COALESCE(pg_catalog.int4send(pg_catalog.length(l.prev_hash)) || l.prev_hash, pg_catalog.int4send(-1))
                || COALESCE(pg_catalog.int4send(8) || pg_catalog.int8send(e.id), pg_catalog.int4send(-1))
                || COALESCE(pg_catalog.int4send(8) || pg_catalog.int8send(e.run_id), pg_catalog.int4send(-1))
                || COALESCE(pg_catalog.int4send(8) || pg_catalog.int8send(e.business_id), pg_catalog.int4send(-1))
                || COALESCE(pg_catalog.int4send(pg_catalog.length(pg_catalog.convert_to(e.event, 'UTF8')))
                            || pg_catalog.convert_to(e.event, 'UTF8'), pg_catalog.int4send(-1))
                || COALESCE(pg_catalog.int4send(pg_catalog.length(pg_catalog.convert_to(e.worker_id, 'UTF8')))
                            || pg_catalog.convert_to(e.worker_id, 'UTF8'), pg_catalog.int4send(-1))
                || COALESCE(pg_catalog.int4send(pg_catalog.length(pg_catalog.convert_to(e.detail::text, 'UTF8')))
                            || pg_catalog.convert_to(e.detail::text, 'UTF8'), pg_catalog.int4send(-1))
                || COALESCE(pg_catalog.int4send(8) || pg_catalog.timestamptz_send(e.created_at), pg_catalog.int4send(-1)))
            END AS found) AS h
     WHERE e.id = ANY (p_event_ids)
$$;

-- Appends one event to its run's chain, under the run's head row lock (concurrent writers of
-- one run queue here; different runs never wait on each other).
CREATE OR REPLACE FUNCTION outbound_heartbeat._chain_event(
    p_id bigint, p_run_id bigint, p_business_id bigint, p_event text, p_worker_id text,
    p_detail jsonb, p_created_at timestamptz)
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_head_id bigint;
    v_head_hash bytea;
    v_hash bytea;
BEGIN
    INSERT INTO outbound_heartbeat.run_event_heads (run_id) VALUES (p_run_id) ON CONFLICT (run_id) DO NOTHING;
    SELECT h.event_id, h.hash INTO v_head_id, v_head_hash
      FROM outbound_heartbeat.run_event_heads AS h WHERE h.run_id = p_run_id FOR UPDATE;
    v_hash := outbound_heartbeat._event_hash(v_head_hash, p_id, p_run_id, p_business_id, p_event,
                                             p_worker_id, p_detail, p_created_at);
    INSERT INTO outbound_heartbeat.run_event_chain (event_id, run_id, prev_id, prev_hash, hash, hash_version)
    VALUES (p_id, p_run_id, v_head_id, v_head_hash, v_hash, 2);
    UPDATE outbound_heartbeat.run_event_heads AS h SET event_id = p_id, hash = v_hash
     WHERE h.run_id = p_run_id;
END
$$;

-- BEFORE INSERT on run_events: every insert path is chained (the row already has its id and
-- created_at; nothing of it is changed).
CREATE OR REPLACE FUNCTION outbound_heartbeat._chain_event_trigger()
RETURNS trigger
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM outbound_heartbeat._chain_event(NEW.id, NEW.run_id, NEW.business_id, NEW.event,
                                            NEW.worker_id, NEW.detail, NEW.created_at);
    RETURN NEW;
END
$$;

-- BEFORE UPDATE OF lease_epoch on the runs table: an epoch never goes down, whoever writes it
-- (a fenced-out worker's epoch must never become valid again).
CREATE OR REPLACE FUNCTION outbound_heartbeat._refuse_lower_epoch()
RETURNS trigger
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = 'OH400', COLUMN = 'lease_epoch',
        MESSAGE = pg_catalog.format('lease_epoch of run %s may not go down (%s -> %s)',
                                    OLD.id, OLD.lease_epoch, NEW.lease_epoch);
END
$$;

DO $triggers$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger AS t
                    WHERE t.tgrelid = 'outbound_heartbeat.run_events'::regclass
                      AND t.tgname = 'run_events_chain') THEN
        CREATE TRIGGER run_events_chain BEFORE INSERT ON outbound_heartbeat.run_events
            FOR EACH ROW EXECUTE FUNCTION outbound_heartbeat._chain_event_trigger();
    END IF;
    -- Fires only when an UPDATE names lease_epoch and lowers it: heartbeats never pay for it.
    -- The operator is qualified: the stored condition never picks one from another schema.
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger AS t
                    WHERE t.tgrelid = 'public.outbound_call_runs'::regclass
                      AND t.tgname = 'outbound_heartbeat_epoch_never_down') THEN
        CREATE TRIGGER outbound_heartbeat_epoch_never_down
            BEFORE UPDATE OF lease_epoch ON public.outbound_call_runs
            FOR EACH ROW WHEN (NEW.lease_epoch OPERATOR(pg_catalog.<) OLD.lease_epoch)
            EXECUTE FUNCTION outbound_heartbeat._refuse_lower_epoch();
    END IF;
END
$triggers$;

-- The first broken link of each run (or of one run): 'altered' (the row no longer matches its
-- link), 'deleted' (a linked event is gone: only prune_events() removes a link, with its event),
-- 'unchained' (an event with no link), 'relinked' (a link does not point at its predecessor's
-- hash). No row: intact. Each link is checked in its own hash format (hash_version).
CREATE OR REPLACE FUNCTION outbound_heartbeat.verify_events(run_id bigint DEFAULT NULL)
RETURNS SETOF outbound_heartbeat.broken_link
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    WITH links AS (
        SELECT c.* FROM outbound_heartbeat.run_event_chain AS c
         WHERE verify_events.run_id IS NULL OR c.run_id = verify_events.run_id
    ), events AS (
        SELECT e.id FROM outbound_heartbeat.run_events AS e
         WHERE verify_events.run_id IS NULL OR e.run_id = verify_events.run_id
            OR e.id IN (SELECT l.event_id FROM links AS l)
    ), problems AS (
        SELECT c.run_id, c.event_id, CASE WHEN c.linked THEN 'altered' ELSE 'unchained' END AS problem,
               pg_catalog.encode(c.expected, 'hex') AS expected, pg_catalog.encode(c.found, 'hex') AS found
          FROM outbound_heartbeat._check_links(ARRAY(SELECT e.id FROM events AS e)) AS c
         WHERE NOT c.matches
        UNION ALL
        SELECT l.run_id, l.event_id, 'deleted', pg_catalog.encode(l.hash, 'hex'), NULL
          FROM links AS l
         WHERE NOT EXISTS (SELECT 1 FROM outbound_heartbeat.run_events AS e WHERE e.id = l.event_id)
        UNION ALL
        SELECT l.run_id, l.event_id, 'relinked', pg_catalog.encode(p.hash, 'hex'),
               pg_catalog.encode(l.prev_hash, 'hex')
          FROM links AS l
          JOIN outbound_heartbeat.run_event_chain AS p ON p.event_id = l.prev_id
         WHERE p.hash IS DISTINCT FROM l.prev_hash
    )
    SELECT DISTINCT ON (p.run_id) p.run_id, p.event_id, p.problem, p.expected, p.found
      FROM problems AS p
     ORDER BY p.run_id, p.event_id
$$;

-- Audits a refused cross-business call ([SECURITY]): an 'access_denied' event of the run, with
-- the business that asked and the run's real owner. The refused call itself rolled back, so the
-- Python layer calls this right after its OH403. Only a genuine refusal can be recorded: OH400
-- when business_id owns the run. Returns the event.
CREATE OR REPLACE FUNCTION outbound_heartbeat.audit_access_denied(run_id bigint, business_id bigint, action text)
RETURNS outbound_heartbeat.run_events
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
SET client_min_messages = notice
AS $$
DECLARE
    v_owner bigint;
    v_event outbound_heartbeat.run_events;
BEGIN
    PERFORM outbound_heartbeat._require(audit_access_denied.run_id IS NOT NULL, 'run_id', 'run_id must not be NULL');
    PERFORM outbound_heartbeat._require(audit_access_denied.business_id IS NOT NULL, 'business_id',
                                        'business_id must not be NULL');
    PERFORM outbound_heartbeat._require(
        EXISTS (SELECT 1 FROM pg_catalog.pg_proc AS p
                 WHERE p.pronamespace = 'outbound_heartbeat'::pg_catalog.regnamespace
                   AND p.proname = audit_access_denied.action AND p.proname !~ '^_'),
        'action', 'action must name a function of the API');
    PERFORM outbound_heartbeat._require_run(audit_access_denied.run_id);
    SELECT r.business_id INTO v_owner FROM public.outbound_call_runs AS r WHERE r.id = audit_access_denied.run_id;
    PERFORM outbound_heartbeat._require(v_owner IS DISTINCT FROM audit_access_denied.business_id, 'business_id',
        pg_catalog.format('run %s belongs to business %s: nothing was refused',
                          audit_access_denied.run_id, audit_access_denied.business_id));
    PERFORM outbound_heartbeat._record_event(
        audit_access_denied.run_id, audit_access_denied.business_id, 'access_denied', NULL,
        pg_catalog.jsonb_build_object('action', audit_access_denied.action, 'owner_business_id', v_owner));
    SELECT e.* INTO v_event FROM outbound_heartbeat.run_events AS e
     WHERE e.run_id = audit_access_denied.run_id AND e.business_id = audit_access_denied.business_id
       AND e.event = 'access_denied'
     ORDER BY e.id DESC
     LIMIT 1;
    RETURN v_event;
END
$$;

-- What the owner needs to run the API: the rows the functions read and write, nothing more.
-- DELETE on run_events is for retention (the only rows the library deletes).
GRANT SELECT, INSERT, UPDATE ON public.outbound_call_runs, public.outbound_call_jobs TO outbound_heartbeat_owner;
GRANT SELECT ON outbound_heartbeat.settings TO outbound_heartbeat_owner;
GRANT SELECT, INSERT, DELETE ON outbound_heartbeat.run_events TO outbound_heartbeat_owner;
GRANT SELECT, INSERT, UPDATE, DELETE ON outbound_heartbeat.run_event_chain, outbound_heartbeat.run_event_heads
    TO outbound_heartbeat_owner;
-- The counters of sql/03_counters.sql: kept by the owner's triggers, merged by prune_events().
GRANT SELECT, INSERT, UPDATE, DELETE ON outbound_heartbeat.job_counts, outbound_heartbeat.totals
    TO outbound_heartbeat_owner;
GRANT USAGE ON SEQUENCE outbound_heartbeat.counter_overflow_seq TO outbound_heartbeat_owner;
GRANT SELECT, INSERT, DELETE ON outbound_heartbeat.run_status_notes TO outbound_heartbeat_owner;
REVOKE ALL ON outbound_heartbeat.run_event_chain, outbound_heartbeat.run_event_heads FROM PUBLIC;

DO $owner_rights$
DECLARE
    v_sequence text;
    v_view text;
    v_function record;
    v_grantee text;
BEGIN
    -- Adopted legacy tables may number their rows with serial sequences.
    FOR v_sequence IN
        SELECT s FROM (VALUES (pg_catalog.pg_get_serial_sequence('public.outbound_call_runs', 'id')),
                              (pg_catalog.pg_get_serial_sequence('public.outbound_call_jobs', 'id'))) AS q (s)
         WHERE s IS NOT NULL
    LOOP
        EXECUTE pg_catalog.format('GRANT USAGE ON SEQUENCE %s TO outbound_heartbeat_owner', v_sequence);
    END LOOP;

    -- The API reads the library's views too (metrics() reads run_status_counts, ...).
    FOR v_view IN
        SELECT c.oid::pg_catalog.regclass::text FROM pg_catalog.pg_class AS c
         WHERE c.relnamespace = 'outbound_heartbeat'::pg_catalog.regnamespace AND c.relkind IN ('v', 'm')
    LOOP
        EXECUTE pg_catalog.format('GRANT SELECT ON %s TO outbound_heartbeat_owner', v_view);
    END LOOP;

    FOR v_function IN
        SELECT p.oid::pg_catalog.regprocedure AS signature, p.proname, p.prosecdef, p.proconfig,
               pg_catalog.pg_get_userbyid(p.proowner) AS owner
          FROM pg_catalog.pg_proc AS p
         WHERE p.pronamespace = 'outbound_heartbeat'::pg_catalog.regnamespace AND p.prokind IN ('f', 'p')
         ORDER BY p.oid
    LOOP
        EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', v_function.signature);
        -- Handing out privileges stays with the schema's owner, who runs these.
        CONTINUE WHEN v_function.proname IN ('grant_app_role', 'grant_dba_role', 'hand_over_tables');
        IF v_function.owner <> 'outbound_heartbeat_owner' THEN
            EXECUTE pg_catalog.format('ALTER FUNCTION %s OWNER TO outbound_heartbeat_owner', v_function.signature);
        END IF;
        IF NOT v_function.prosecdef THEN
            EXECUTE pg_catalog.format('ALTER FUNCTION %s SECURITY DEFINER', v_function.signature);
        END IF;
        IF NOT COALESCE('search_path=pg_catalog, pg_temp' = ANY (v_function.proconfig), false) THEN
            EXECUTE pg_catalog.format('ALTER FUNCTION %s SET search_path = pg_catalog, pg_temp',
                                      v_function.signature);
        END IF;
        -- Helpers run for the API only: nobody but the owner may call them.
        IF v_function.proname ~ '^_' THEN
            FOR v_grantee IN
                SELECT DISTINCT pg_catalog.pg_get_userbyid(a.grantee)
                  FROM pg_catalog.pg_proc AS p, pg_catalog.aclexplode(p.proacl) AS a
                 WHERE p.oid = v_function.signature AND a.grantee <> 0 AND a.grantee <> p.proowner
            LOOP
                EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION %s FROM %I', v_function.signature, v_grantee);
            END LOOP;
        END IF;
    END LOOP;
END
$owner_rights$;

REVOKE CREATE ON SCHEMA outbound_heartbeat FROM outbound_heartbeat_owner;

COMMENT ON FUNCTION outbound_heartbeat.verify_events(bigint) IS
    'The first broken link of each run''s audit hash chain (altered, deleted, unchained, relinked); no row when intact.';
COMMENT ON FUNCTION outbound_heartbeat.audit_access_denied(bigint, bigint, text) IS
    'Records a refused cross-business call ([SECURITY] access_denied event, asking business and real owner); OH400 unless it was a genuine refusal.';
COMMENT ON TABLE outbound_heartbeat.run_event_chain IS
    'The audit hash chain: one link per run_events row (sha256 of the previous link and the row, in format hash_version), written by the API only; a link goes only with its verified event (prune_events).';
COMMENT ON TABLE outbound_heartbeat.run_event_heads IS
    'The newest link of each run''s audit hash chain (orders concurrent writers of one run).';

-- An install older than hash format 2 loses the DELETE trigger of format 1. Last in this file:
-- the lock this takes on run_events (every event insert waits for it) is held only until commit.
DO $format_2$
BEGIN
    -- Before format 2 a DELETE trigger removed the links of any deleted prefix of a run, whoever
    -- deleted it (a whole run deleted by hand vanished from verify_events()): prune_events()
    -- removes the links of what it deletes itself now.
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_trigger AS t
                WHERE t.tgrelid = 'outbound_heartbeat.run_events'::pg_catalog.regclass
                  AND t.tgname = 'run_events_unchain_pruned') THEN
        DROP TRIGGER run_events_unchain_pruned ON outbound_heartbeat.run_events;
    END IF;
    DROP FUNCTION IF EXISTS outbound_heartbeat._unchain_pruned_events();
END
$format_2$;

-- Chains the events written before the chain existed, per run in id order: a one-time pass over
-- the history at the upgrade that introduces the chain (no link was ever written). Never later:
-- an event inserted while the trigger was disabled stays unchained, and reported.
DO $backfill$
DECLARE
    v_event record;
BEGIN
    IF EXISTS (SELECT 1 FROM outbound_heartbeat.run_event_heads) THEN
        RETURN;
    END IF;
    FOR v_event IN
        SELECT e.* FROM outbound_heartbeat.run_events AS e
         WHERE NOT EXISTS (SELECT 1 FROM outbound_heartbeat.run_event_chain AS c WHERE c.event_id = e.id)
         ORDER BY e.run_id, e.id
    LOOP
        PERFORM outbound_heartbeat._chain_event(v_event.id, v_event.run_id, v_event.business_id,
                                                v_event.event, v_event.worker_id, v_event.detail,
                                                v_event.created_at);
    END LOOP;
END
$backfill$;
