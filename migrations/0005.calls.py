"""Calls accounted for: a key for every call next_job hands out (job.call_key), in-progress calls
of a run that ends under them marked orphaned (library columns orphaned_at, orphan_reason; the
app's status domain unchanged), resolve_call() settling a call exactly once, the setting
call_orphan_timeout after which the sweep and the read path fail an orphan, and the in-progress
jobs of runs that had already ended adopted as orphaned, in short batches.

Online (outbound_heartbeat.upgrade), like 0003 and 0004. Rollback keeps everything: no table,
column or row is ever removed.
"""

import sys
from pathlib import Path

from yoyo import step

try:
    from outbound_heartbeat.upgrade import apply_sql_online
except ImportError:  # `yoyo apply` from a checkout whose package is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from outbound_heartbeat.upgrade import apply_sql_online

__depends__ = {"0004.guarantees-cross"}
__transactional__ = False

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"


def reapply_sql(conn):  # type: ignore[no-untyped-def]
    apply_sql_online(conn, SQL_DIR)


def keep_everything(conn):  # type: ignore[no-untyped-def]
    del conn  # see the docstring: nothing to undo safely


steps = [step(reapply_sql, keep_everything)]
