"""Release 2 (frozen): upgrade a release-1 database to that release's sql/, frozen in
frozen/0002/: the DBA monitoring views (stale_runs, oldest_heartbeats, run_status_counts), the
functions count_runs(), list_events() and metrics(), heartbeat()'s fast path (with
_heartbeat_slow()), and the privileges: no EXECUTE for PUBLIC, grant_app_role(text) and
grant_dba_role(text).

On a database without the library (a fresh install, an adoption) it does nothing: the newest
migration installs the newest schema at once (outbound_heartbeat.upgrade.apply_release_online).

A released migration never changes (frozen/SHA256SUMS, tests/test_frozen_migrations.py): a
new release adds a migration.

Online (outbound_heartbeat.upgrade): each file in its own short transaction, every lock attempted
with a short lock_timeout and retried.

No rollback: the step refuses (SQLSTATE 0A000) and changes nothing. Dropping what this release
added would not give release 1 back: it also replaced release 1's bodies, revoked PUBLIC's rights
on the schema and its functions, and added a check on the settings.
"""

import sys
from pathlib import Path

from yoyo import step

try:
    from outbound_heartbeat.upgrade import apply_release_online
except ImportError:  # `yoyo apply` from a checkout whose package is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from outbound_heartbeat.upgrade import apply_release_online

__depends__ = {"0001.install-sql"}
__transactional__ = False  # online: see outbound_heartbeat.upgrade

FROZEN = Path(__file__).resolve().parent / "frozen" / "0002"

# Raised, not silently skipped: a rollback recorded as done while the schema stayed would make
# the next migrate re-apply this release's SQL over a newer schema.
REFUSE = """
DO $refuse$
BEGIN
    RAISE EXCEPTION USING
        ERRCODE = 'feature_not_supported',
        MESSAGE = '0002.monitoring cannot be rolled back: it replaced release 1''s functions and their grants, which dropping what it added does not restore',
        HINT = 'Restore the backup taken before the upgrade, or stay on this release.';
END
$refuse$;
"""


def apply_sql(conn):  # type: ignore[no-untyped-def]
    apply_release_online(conn, FROZEN)


def refuse_rollback(conn):  # type: ignore[no-untyped-def]
    conn.cursor().execute(REFUSE)


steps = [step(apply_sql, refuse_rollback)]
