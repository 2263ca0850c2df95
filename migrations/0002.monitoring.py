"""Upgrade an installed database to this release's sql/: the DBA monitoring views (stale_runs,
oldest_heartbeats, run_status_counts), the functions count_runs(), list_events() and
metrics(), heartbeat()'s fast path (with _heartbeat_slow()), and the privileges: no EXECUTE
for PUBLIC, grant_app_role() and grant_dba_role().

Every release that changes sql/ adds one such step: it re-applies the idempotent sql/ files
(CREATE OR REPLACE), so an upgraded database ends up equal to a freshly built one. A fresh
install runs 0001 then this, which changes nothing more. Rollback removes what this release
added and leaves the rest, tables and rows included, as they are.
"""

from pathlib import Path

from yoyo import step

__depends__ = {"0001.install-sql"}

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"

ROLLBACK = """
DROP FUNCTION IF EXISTS outbound_heartbeat.grant_dba_role(text);
DROP FUNCTION IF EXISTS outbound_heartbeat.grant_app_role(text);
DROP FUNCTION IF EXISTS outbound_heartbeat.metrics();
DROP FUNCTION IF EXISTS outbound_heartbeat.list_events(bigint, bigint, integer);
DROP VIEW IF EXISTS outbound_heartbeat.run_status_counts;
DROP FUNCTION IF EXISTS outbound_heartbeat.count_runs();
DROP VIEW IF EXISTS outbound_heartbeat.oldest_heartbeats;
DROP VIEW IF EXISTS outbound_heartbeat.stale_runs;
DROP TYPE IF EXISTS outbound_heartbeat.metric;
"""


def reapply_sql(conn):  # type: ignore[no-untyped-def]
    cursor = conn.cursor()
    cursor.execute("SET LOCAL client_min_messages = warning")
    for path in sorted(SQL_DIR.glob("*.sql")):
        cursor.execute(path.read_text(encoding="utf-8"))


def rollback_sql(conn):  # type: ignore[no-untyped-def]
    conn.cursor().execute(ROLLBACK)


steps = [step(reapply_sql, rollback_sql)]
