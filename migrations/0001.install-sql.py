"""Install outbound_heartbeat from sql/: create or adopt the app's tables (as an app's
legacy migration did: add last_heartbeat_at, initialised from COALESCE(lock_ts, updated_at,
created_at) for running and pending runs), then the schema, settings, audit table, functions
and views.

The bodies are read from sql/ (next to this folder in a checkout, and inside the installed
package), the single source of truth, so `yoyo apply` and outbound_heartbeat.migrate() install
the same thing. Every file is idempotent: applying it to an installed database changes nothing.
Rollback removes the API (functions, views, types) and keeps every table, column and row.

Online (outbound_heartbeat.upgrade): each file in its own transaction, every lock taken with a
short lock_timeout and retried, missing indexes built CONCURRENTLY, hence non-transactional.
"""

import sys
from pathlib import Path

from yoyo import step

try:
    from outbound_heartbeat.upgrade import apply_sql_online
except ImportError:  # `yoyo apply` from a checkout whose package is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from outbound_heartbeat.upgrade import apply_sql_online

__depends__: set[str] = set()
__transactional__ = False

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"

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
    apply_sql_online(conn, SQL_DIR)


def rollback_sql(conn):  # type: ignore[no-untyped-def]
    conn.cursor().execute(ROLLBACK)


steps = [step(apply_sql, rollback_sql)]
