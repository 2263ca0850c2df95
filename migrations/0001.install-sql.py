"""Release 1 (frozen): that release's sql/, frozen in frozen/0001/: create or adopt the app's
tables (as an app's legacy migration did: add last_heartbeat_at, initialised from
COALESCE(lock_ts, updated_at, created_at) for running and pending runs), then the schema,
settings, audit table, functions and view active_runs.

Applied only where the library's schema exists (outbound_heartbeat.upgrade.apply_release_online):
after this migration's own rollback, which keeps the schema's tables. On a database without the
library (a fresh install, an adoption) it does nothing, and the newest migration installs the
newest schema at once: no earlier release's SQL, with what later releases fixed, runs there.

A released migration never changes (frozen/SHA256SUMS, tests/test_frozen_migrations.py): a
new release adds a migration.

Rollback removes the API (functions, views, types) and keeps every table, column and row. Only
a database at release 1 gets there: every later migration refuses its rollback.
"""

import sys
from pathlib import Path

from yoyo import step

try:
    from outbound_heartbeat.upgrade import apply_release_online
except ImportError:  # `yoyo apply` from a checkout whose package is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from outbound_heartbeat.upgrade import apply_release_online

__depends__: set[str] = set()
__transactional__ = False  # online: see outbound_heartbeat.upgrade

FROZEN = Path(__file__).resolve().parent / "frozen" / "0001"

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
    apply_release_online(conn, FROZEN)


def rollback_sql(conn):  # type: ignore[no-untyped-def]
    conn.cursor().execute(ROLLBACK)


steps = [step(apply_sql, rollback_sql)]
