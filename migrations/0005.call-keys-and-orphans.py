"""Call keys, orphaned calls and their settlement (resolve_call, call_orphan_timeout), legacy
in-progress jobs of ended runs adopted as orphaned; cheaper heartbeats (the table guard's quick
test as one view, FOR NO KEY UPDATE); sql/ laid out one file per feature.

The release being made (not yet released): the live sql/, read by directory listing (every
*.sql file, in name order), so whatever this release adds or renames there is applied. It
upgrades a release-4 database, and on a database without the library (a fresh install, the
adoption of an app's tables; 0001-0004 do nothing there) it installs the newest schema at once.
It is the only migration that reads sql/: when this release is made, sql/ is copied to
frozen/0005/, this file applies that copy through apply_release_online and enters
frozen/SHA256SUMS, and the next release adds 0006 reading sql/ (docs/operations.md,
"Releasing a new migration").

Online (outbound_heartbeat.upgrade): each file in its own short transaction, locks attempted
with a short lock_timeout and retried, missing indexes built CONCURRENTLY afterwards.

No rollback: the step refuses (SQLSTATE 0A000) and changes nothing. Going back would need
release 4's bodies over whatever this release changed; no row is ever removed.
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
__transactional__ = False  # online: see outbound_heartbeat.upgrade

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"

# Raised, not silently skipped: a rollback recorded as done while the schema stayed would make
# the next migrate re-apply this release's SQL over a newer schema.
REFUSE = """
DO $refuse$
BEGIN
    RAISE EXCEPTION USING
        ERRCODE = 'feature_not_supported',
        MESSAGE = '0005.call-keys-and-orphans cannot be rolled back: it re-applied the live sql/ over release 4, whose function bodies no step keeps to put back',
        HINT = 'Restore the backup taken before the upgrade, or stay on this release.';
END
$refuse$;
"""


def apply_sql(conn):  # type: ignore[no-untyped-def]
    apply_sql_online(conn, SQL_DIR)


def refuse_rollback(conn):  # type: ignore[no-untyped-def]
    conn.cursor().execute(REFUSE)


steps = [step(apply_sql, refuse_rollback)]
