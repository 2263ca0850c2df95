"""Upgrade an installed database to this release's sql/: the DBA monitoring views (stale_runs,
oldest_heartbeats, run_status_counts), the functions count_runs(), list_events() and
metrics(), heartbeat()'s fast path (with _heartbeat_slow()), and the privileges: no EXECUTE
for PUBLIC, grant_app_role() and grant_dba_role().

Every release that changes sql/ adds one such step: it re-applies the idempotent sql/ files
(CREATE OR REPLACE), so an upgraded database ends up equal to a freshly built one. A fresh
install runs 0001 then this, which changes nothing more. Rollback removes what this release
added and leaves the rest, tables and rows included, as they are.
"""

import sys
from pathlib import Path

from yoyo import step

try:
    from outbound_heartbeat.upgrade import apply_sql_online
except ImportError:  # `yoyo apply` from a checkout whose package is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from outbound_heartbeat.upgrade import apply_sql_online

__depends__ = {"0001.install-sql"}
__transactional__ = False  # online: see outbound_heartbeat.upgrade

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
    apply_sql_online(conn, SQL_DIR)


def rollback_sql(conn):  # type: ignore[no-untyped-def]
    conn.cursor().execute(ROLLBACK)


steps = [step(reapply_sql, rollback_sql)]
