"""Release 1 (frozen): install outbound_heartbeat as that release's sql/ did, from its frozen
copy in frozen/0001/: create or adopt the app's tables (as an app's legacy migration did: add
last_heartbeat_at, initialised from COALESCE(lock_ts, updated_at, created_at) for running and
pending runs), then the schema, settings, audit table, functions and view active_runs. The later
migrations bring it, release by release, to the newest schema.

A released migration never changes (frozen/SHA256SUMS, tests/test_frozen_migrations.py): a
new release adds a migration.

Online (outbound_heartbeat.upgrade): each file in its own short transaction, every lock attempted
with a short lock_timeout and retried. That release's files build their two indexes inside their
transaction; on app tables that already exist (adoption) they are built CONCURRENTLY first, so
the files find them and a big legacy table is never locked against writes for a build.

Rollback removes the API (functions, views, types) and keeps every table, column and row. Only
a database at release 1 gets there: every later migration refuses its rollback.
"""

import sys
from pathlib import Path

from yoyo import step

try:
    from outbound_heartbeat.upgrade import apply_sql_online, build_indexes_online
except ImportError:  # `yoyo apply` from a checkout whose package is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from outbound_heartbeat.upgrade import apply_sql_online, build_indexes_online

__depends__: set[str] = set()
__transactional__ = False

FROZEN = Path(__file__).resolve().parent / "frozen" / "0001"

# The two indexes of frozen/0001/02_tables.sql, for app tables that exist before the install.
INDEXES = {
    "public.outbound_call_runs": (
        "outbound_call_runs_active_idx",
        "CREATE INDEX CONCURRENTLY outbound_call_runs_active_idx ON public.outbound_call_runs"
        " (business_id, id) WHERE status OPERATOR(pg_catalog.=) ANY ('{pending,running}')"),
    "public.outbound_call_jobs": (
        "outbound_call_jobs_open_idx",
        "CREATE INDEX CONCURRENTLY outbound_call_jobs_open_idx ON public.outbound_call_jobs"
        " (run_id, id) WHERE status OPERATOR(pg_catalog.=) ANY ('{queued,in_progress}')"),
}

ROLLBACK = """
DO $rollback$
DECLARE
    v_object record;
BEGIN
    FOR v_object IN
        SELECT c.oid::regclass AS name
          FROM pg_catalog.pg_class AS c
         WHERE c.relnamespace = 'outbound_heartbeat'::regnamespace AND c.relkind = 'v'
    LOOP
        EXECUTE format('DROP VIEW IF EXISTS %s CASCADE', v_object.name);
    END LOOP;
    FOR v_object IN
        SELECT p.oid::regprocedure AS signature
          FROM pg_catalog.pg_proc AS p
         WHERE p.pronamespace = 'outbound_heartbeat'::regnamespace
    LOOP
        EXECUTE format('DROP FUNCTION IF EXISTS %s CASCADE', v_object.signature);
    END LOOP;
    FOR v_object IN
        SELECT t.oid::regtype AS name
          FROM pg_catalog.pg_type AS t
         WHERE t.typnamespace = 'outbound_heartbeat'::regnamespace AND t.typtype = 'c'
           AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_class AS c
                            WHERE c.oid = t.typrelid AND c.relkind <> 'c')
    LOOP
        EXECUTE format('DROP TYPE IF EXISTS %s', v_object.name);
    END LOOP;
END
$rollback$;
"""


def apply_sql(conn):  # type: ignore[no-untyped-def]
    existing = conn.execute(
        "SELECT t.name FROM pg_catalog.unnest(%s::pg_catalog.text[]) AS t (name)"
        " WHERE pg_catalog.to_regclass(t.name) IS NOT NULL", (list(INDEXES),)).fetchall()
    build_indexes_online(conn, [INDEXES[name] for (name,) in existing])
    apply_sql_online(conn, FROZEN)


def rollback_sql(conn):  # type: ignore[no-untyped-def]
    conn.cursor().execute(ROLLBACK)


steps = [step(apply_sql, rollback_sql)]
