-- A tamper-evident audit trail: every row of run_events is chained to the previous row of its
-- run in run_event_chain (sha256 of the previous hash and the row's exact content, encoded so no
-- session setting changes it), which only the owner writes; verify_events() reports the first
-- broken link of each run; prune_events() removes a link only with its verified event.

-- ALTER FUNCTION ... OWNER TO needs CREATE on the schema for the new owner: held only
-- inside this file's transaction.
GRANT CREATE ON SCHEMA outbound_heartbeat TO outbound_heartbeat_owner;

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

GRANT SELECT, INSERT, UPDATE, DELETE ON outbound_heartbeat.run_event_chain, outbound_heartbeat.run_event_heads
    TO outbound_heartbeat_owner;
REVOKE ALL ON outbound_heartbeat.run_event_chain, outbound_heartbeat.run_event_heads FROM PUBLIC;

COMMENT ON TABLE outbound_heartbeat.run_event_chain IS
    'The audit hash chain: one link per run_events row (sha256 of the previous link and the row, in format hash_version), written by the API only; a link goes only with its verified event (prune_events).';

COMMENT ON TABLE outbound_heartbeat.run_event_heads IS
    'The newest link of each run''s audit hash chain (orders concurrent writers of one run).';

-- The hash of an audit row chained to its predecessor's (format 2): length-prefixed binary send
-- forms (jsonb as canonical text, UTF-8), so no session setting changes it. _check_links()
-- spells the same formula inline: a call per row would cost more than the hash.
CREATE OR REPLACE FUNCTION outbound_heartbeat._event_hash(
    p_prev bytea, p_id bigint, p_run_id bigint, p_business_id bigint, p_event text,
    p_worker_id text, p_detail jsonb, p_created_at timestamptz)
RETURNS bytea
LANGUAGE sql STABLE SECURITY DEFINER
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
ALTER FUNCTION outbound_heartbeat._event_hash(bytea, bigint, bigint, bigint, text, text, jsonb, timestamp with time zone) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._event_hash(bytea, bigint, bigint, bigint, text, text, jsonb, timestamp with time zone) FROM PUBLIC;

-- The hash of links written before format 2 (hash_version 1), kept so those links still verify.
-- Its text of created_at has no era and no infinity, so any instant the old format could not
-- write gets a different text and never matches.
CREATE OR REPLACE FUNCTION outbound_heartbeat._event_hash_v1(
    p_prev bytea, p_id bigint, p_run_id bigint, p_business_id bigint, p_event text,
    p_worker_id text, p_detail jsonb, p_created_at timestamptz)
RETURNS bytea
LANGUAGE sql STABLE SECURITY DEFINER
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
ALTER FUNCTION outbound_heartbeat._event_hash_v1(bytea, bigint, bigint, bigint, text, text, jsonb, timestamp with time zone) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._event_hash_v1(bytea, bigint, bigint, bigint, text, text, jsonb, timestamp with time zone) FROM PUBLIC;

-- Checks events against their links set-wise (one call per verify or prune batch), each in its
-- link's format. A version 1 genesis link written with standard_conforming_strings off (its empty
-- hash read as the byte 'x') is accepted too: the owner wrote it.
CREATE OR REPLACE FUNCTION outbound_heartbeat._check_links(p_event_ids bigint[])
RETURNS TABLE (event_id bigint, run_id bigint, linked boolean, matches boolean, expected bytea, found bytea)
LANGUAGE sql STABLE SECURITY DEFINER
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
ALTER FUNCTION outbound_heartbeat._check_links(bigint[]) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._check_links(bigint[]) FROM PUBLIC;

-- Appends one event to its run's chain, under the run's head row lock (concurrent writers of
-- one run queue here; different runs never wait on each other).
CREATE OR REPLACE FUNCTION outbound_heartbeat._chain_event(
    p_id bigint, p_run_id bigint, p_business_id bigint, p_event text, p_worker_id text,
    p_detail jsonb, p_created_at timestamptz)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
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
ALTER FUNCTION outbound_heartbeat._chain_event(bigint, bigint, bigint, text, text, jsonb, timestamp with time zone) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._chain_event(bigint, bigint, bigint, text, text, jsonb, timestamp with time zone) FROM PUBLIC;

-- BEFORE INSERT on run_events: every insert path is chained (the row already has its id and
-- created_at; nothing of it is changed).
CREATE OR REPLACE FUNCTION outbound_heartbeat._chain_event_trigger()
RETURNS trigger
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM outbound_heartbeat._chain_event(NEW.id, NEW.run_id, NEW.business_id, NEW.event,
                                            NEW.worker_id, NEW.detail, NEW.created_at);
    RETURN NEW;
END
$$;
ALTER FUNCTION outbound_heartbeat._chain_event_trigger() OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._chain_event_trigger() FROM PUBLIC;

DO $chain_trigger$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger AS t
                    WHERE t.tgrelid = 'outbound_heartbeat.run_events'::regclass
                      AND t.tgname = 'run_events_chain') THEN
        CREATE TRIGGER run_events_chain BEFORE INSERT ON outbound_heartbeat.run_events
            FOR EACH ROW EXECUTE FUNCTION outbound_heartbeat._chain_event_trigger();
    END IF;
END
$chain_trigger$;

DO $broken_link$
BEGIN
    IF pg_catalog.to_regtype('outbound_heartbeat.broken_link') IS NULL THEN
        CREATE TYPE outbound_heartbeat.broken_link AS (
            run_id bigint, event_id bigint, problem text, expected text, found text);
    END IF;
END
$broken_link$;

-- The first broken link of each run ('altered', 'deleted', 'unchained', 'relinked'), each link
-- in its own hash format: only prune_events() removes a link, with its event, so anything else
-- missing is reported. No row: intact.
CREATE OR REPLACE FUNCTION outbound_heartbeat.verify_events(run_id bigint DEFAULT NULL)
RETURNS SETOF outbound_heartbeat.broken_link
LANGUAGE sql STABLE SECURITY DEFINER
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
ALTER FUNCTION outbound_heartbeat.verify_events(bigint) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat.verify_events(bigint) FROM PUBLIC;
SELECT outbound_heartbeat._offer_to('app', 'outbound_heartbeat.verify_events(bigint)');
COMMENT ON FUNCTION outbound_heartbeat.verify_events(bigint) IS
    'The first broken link of each run''s audit hash chain (altered, deleted, unchained, relinked); no row when intact.';

-- The refusal's row, written once for every audit_*_access_denied: OH400 unless the business
-- really is not the run's owner (nobody can forge a refusal), then the [SECURITY] event.
CREATE OR REPLACE FUNCTION outbound_heartbeat._audit_refusal(p_run_id bigint, p_business_id bigint, p_detail jsonb)
RETURNS outbound_heartbeat.run_events
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET client_min_messages = notice
AS $$
DECLARE
    v_owner bigint;
    v_event outbound_heartbeat.run_events;
BEGIN
    SELECT r.business_id INTO v_owner FROM public.outbound_call_runs AS r WHERE r.id = p_run_id;
    PERFORM outbound_heartbeat._require(v_owner IS DISTINCT FROM p_business_id, 'business_id',
        pg_catalog.format('run %s belongs to business %s: nothing was refused', p_run_id, p_business_id));
    PERFORM outbound_heartbeat._record_event(
        p_run_id, p_business_id, 'access_denied', NULL,
        p_detail OPERATOR(pg_catalog.||) pg_catalog.jsonb_build_object('owner_business_id', v_owner));
    SELECT e.* INTO v_event FROM outbound_heartbeat.run_events AS e
     WHERE e.run_id = p_run_id AND e.business_id = p_business_id AND e.event = 'access_denied'
     ORDER BY e.id DESC
     LIMIT 1;
    RETURN v_event;
END
$$;
ALTER FUNCTION outbound_heartbeat._audit_refusal(bigint, bigint, jsonb) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat._audit_refusal(bigint, bigint, jsonb) FROM PUBLIC;

-- Records a refused cross-business call ([SECURITY] access_denied), which the Python layer
-- calls after its OH403 because the refused call rolled back; OH400 unless business_id really
-- is not the run's owner, so nobody can forge a refusal.
CREATE OR REPLACE FUNCTION outbound_heartbeat.audit_access_denied(run_id bigint, business_id bigint, action text)
RETURNS outbound_heartbeat.run_events
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET client_min_messages = notice
AS $$
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
    RETURN outbound_heartbeat._audit_refusal(audit_access_denied.run_id, audit_access_denied.business_id,
                                             pg_catalog.jsonb_build_object('action', audit_access_denied.action));
END
$$;
ALTER FUNCTION outbound_heartbeat.audit_access_denied(bigint, bigint, text) OWNER TO outbound_heartbeat_owner;
REVOKE ALL ON FUNCTION outbound_heartbeat.audit_access_denied(bigint, bigint, text) FROM PUBLIC;
SELECT outbound_heartbeat._offer_to('app', 'outbound_heartbeat.audit_access_denied(bigint, bigint, text)');
COMMENT ON FUNCTION outbound_heartbeat.audit_access_denied(bigint, bigint, text) IS
    'Records a refused cross-business call ([SECURITY] access_denied event, asking business and real owner); OH400 unless it was a genuine refusal.';

REVOKE CREATE ON SCHEMA outbound_heartbeat FROM outbound_heartbeat_owner;

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
