"""Release 4 (frozen): upgrade a release-3 database to that release's sql/, frozen in
frozen/0004/: installs that resolve nothing through a schema a non-superuser can write (qualified
operators in index predicates and trigger conditions, a preflight that refuses an install which
captured a foreign operator); the audit chain's exact, setting-independent hash (format 2, older
links kept verifying as format 1) and pruning that verifies what it drops; the table guard
(OH428) and hand_over_tables() for an app role that owns its tables, grant_app_role() /
grant_dba_role() with allow_table_owner (their older signatures dropped: functions only, never
data); counters that a TRUNCATE racing a merge or a writer with triggers off cannot leave wrong
(verify_counters(), recount_counters()) and run counts noted in an owner-only table instead of a
custom setting; liveness on the statement clock, with heartbeats that never move backwards;
heartbeat_leases() answering an all-fresh call with one fenced UPDATE.

On a database without the library (a fresh install, an adoption) it does nothing: the newest
migration installs the newest schema at once (outbound_heartbeat.upgrade.apply_release_online).

A released migration never changes (frozen/SHA256SUMS, tests/test_frozen_migrations.py): a
new release adds a migration.

Online (outbound_heartbeat.upgrade), like 0003: each file in its own short transaction, locks
attempted with a short lock_timeout and retried, missing indexes built CONCURRENTLY afterwards.

No rollback: the step refuses (SQLSTATE 0A000) and changes nothing. This release dropped the
older signatures of grant_app_role() and grant_dba_role(), re-keyed the audit chain and moved
the run counts' note into a table; release 3's bodies cannot be put back over that.
"""

import sys
from pathlib import Path

from yoyo import step

try:
    from outbound_heartbeat.upgrade import apply_release_online
except ImportError:  # `yoyo apply` from a checkout whose package is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from outbound_heartbeat.upgrade import apply_release_online

__depends__ = {"0003.online-upgrade"}
__transactional__ = False  # online: see outbound_heartbeat.upgrade

FROZEN = Path(__file__).resolve().parent / "frozen" / "0004"

# Raised, not silently skipped: a rollback recorded as done while the schema stayed would make
# the next migrate re-apply this release's SQL over a newer schema.
REFUSE = """
DO $refuse$
BEGIN
    RAISE EXCEPTION USING
        ERRCODE = 'feature_not_supported',
        MESSAGE = '0004.guarantees-cross cannot be rolled back: it dropped release 3''s signatures of grant_app_role() and grant_dba_role() and re-keyed the audit chain',
        HINT = 'Restore the backup taken before the upgrade, or stay on this release.';
END
$refuse$;
"""


def apply_sql(conn):  # type: ignore[no-untyped-def]
    apply_release_online(conn, FROZEN)


def refuse_rollback(conn):  # type: ignore[no-untyped-def]
    conn.cursor().execute(REFUSE)


steps = [step(apply_sql, refuse_rollback)]
