"""Upgrade an installed database to this release's sql/, online, whatever the release added
(this file re-applies every sql/ file, so it carries the work of everyone who changed sql/):
among it the outage grace keyed on the server's latest start, crash recovery or promotion
(_outage_ended_at), the read-only-server error OH503 (_require_primary), and the catalog
guards that make a re-apply lock none of the app's tables when nothing is missing.

Online (outbound_heartbeat.upgrade): each file in its own short transaction, every lock taken
with a short lock_timeout and retried with bounded backoff (each wait reported), indexes missing
on the app's tables built CONCURRENTLY afterwards; hence a non-transactional yoyo migration.
Rollback keeps everything: the re-applied bodies are this release's and call what it added, and
no table, column or row is ever removed.
"""

import sys
from pathlib import Path

from yoyo import step

try:
    from outbound_heartbeat.upgrade import apply_sql_online
except ImportError:  # `yoyo apply` from a checkout whose package is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from outbound_heartbeat.upgrade import apply_sql_online

__depends__ = {"0002.monitoring"}
__transactional__ = False

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"


def reapply_sql(conn):  # type: ignore[no-untyped-def]
    apply_sql_online(conn, SQL_DIR)


def keep_everything(conn):  # type: ignore[no-untyped-def]
    del conn  # see the docstring: nothing to undo safely


steps = [step(reapply_sql, keep_everything)]
