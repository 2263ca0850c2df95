"""Upgrade an installed database to this release's sql/: installs that resolve nothing through a
schema a non-superuser can write (qualified operators in index predicates and trigger
conditions, a preflight that refuses an install which captured a foreign operator); the audit
chain's exact, setting-independent hash (format 2, older links kept verifying as format 1) and
pruning that verifies what it drops; the table guard (OH428) and hand_over_tables() for an app
role that owns its tables, grant_app_role() / grant_dba_role() with allow_table_owner (their
older signatures dropped: functions only, never data); counters that a TRUNCATE racing a merge
or a writer with triggers off cannot leave wrong (verify_counters(), recount_counters()) and run
counts noted in an owner-only table instead of a custom setting; liveness on the statement clock,
with heartbeats that never move backwards.

Online (outbound_heartbeat.upgrade), like 0003: each file in its own short transaction, locks
attempted with a short lock_timeout and retried, missing indexes built CONCURRENTLY afterwards.
Rollback keeps everything: no table, column or row is ever removed.
"""

import sys
from pathlib import Path

from yoyo import step

try:
    from outbound_heartbeat.upgrade import apply_sql_online
except ImportError:  # `yoyo apply` from a checkout whose package is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from outbound_heartbeat.upgrade import apply_sql_online

__depends__ = {"0003.online-upgrade"}
__transactional__ = False

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"


def reapply_sql(conn):  # type: ignore[no-untyped-def]
    apply_sql_online(conn, SQL_DIR)


def keep_everything(conn):  # type: ignore[no-untyped-def]
    del conn  # see the docstring: nothing to undo safely


steps = [step(reapply_sql, keep_everything)]
