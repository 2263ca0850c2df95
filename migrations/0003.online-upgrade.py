"""Release 3 (frozen): upgrade a release-2 database to that release's sql/, frozen in
frozen/0003/: the outage grace keyed on the server's latest start, crash recovery or promotion
(_outage_ended_at), the read-only-server error OH503 (_require_primary), the lost-answer retry
key (columns of the app's tables), counters kept by triggers, retention (prune_events()), the
audit chain (hash format 1), definer rights (outbound_heartbeat_owner), the console's reads, and
the catalog guards that make a re-apply lock none of the app's tables when nothing is missing.

On a database without the library (a fresh install, an adoption) it does nothing: the newest
migration installs the newest schema at once (outbound_heartbeat.upgrade.apply_release_online).

A released migration never changes (frozen/SHA256SUMS, tests/test_frozen_migrations.py): a
new release adds a migration.

Online (outbound_heartbeat.upgrade): each file in its own short transaction, every lock taken
with a short lock_timeout and retried with bounded backoff (each wait reported), indexes missing
on the app's tables built CONCURRENTLY afterwards (with their operators qualified: see
INDEXES); hence a non-transactional yoyo migration.

No rollback: the step refuses (SQLSTATE 0A000) and changes nothing. This release replaced the
bodies of release 2 and added columns, triggers and counts to the app's tables; taking that back
would need release 2's bodies over tables they do not know, and no row is ever removed.
"""

import sys
from pathlib import Path

from yoyo import step

try:
    from outbound_heartbeat.upgrade import apply_release_online
except ImportError:  # `yoyo apply` from a checkout whose package is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from outbound_heartbeat.upgrade import apply_release_online

__depends__ = {"0002.monitoring"}
__transactional__ = False  # online: see outbound_heartbeat.upgrade

FROZEN = Path(__file__).resolve().parent / "frozen" / "0003"

# The indexes frozen/0003/02_tables.sql defers, as it defines them but with every operator
# qualified: a deferred build runs under the migrating session's search_path, where an
# unqualified = on the app's varchar columns could pick an operator another role planted.
INDEXES = {
    "outbound_call_runs_active_idx":
        "CREATE INDEX CONCURRENTLY outbound_call_runs_active_idx ON public.outbound_call_runs"
        " (business_id, id) WHERE status OPERATOR(pg_catalog.=) ANY ('{pending,running}')",
    "outbound_call_jobs_open_idx":
        "CREATE INDEX CONCURRENTLY outbound_call_jobs_open_idx ON public.outbound_call_jobs"
        " (run_id, id) WHERE status OPERATOR(pg_catalog.=) ANY ('{queued,in_progress}')",
    "outbound_call_jobs_handed_out_idx":
        "CREATE INDEX CONCURRENTLY outbound_call_jobs_handed_out_idx ON public.outbound_call_jobs"
        " (run_id, lease_epoch, lease_request_id) WHERE status OPERATOR(pg_catalog.=) 'in_progress'",
    "outbound_call_jobs_run_idx":
        "CREATE INDEX CONCURRENTLY outbound_call_jobs_run_idx ON public.outbound_call_jobs (run_id)",
}

# Raised, not silently skipped: a rollback recorded as done while the schema stayed would make
# the next migrate re-apply this release's SQL over a newer schema.
REFUSE = """
DO $refuse$
BEGIN
    RAISE EXCEPTION USING
        ERRCODE = 'feature_not_supported',
        MESSAGE = '0003.online-upgrade cannot be rolled back: release 2''s functions do not know the columns, triggers and counts it added to the app''s tables',
        HINT = 'Restore the backup taken before the upgrade, or stay on this release.';
END
$refuse$;
"""


def apply_sql(conn):  # type: ignore[no-untyped-def]
    apply_release_online(conn, FROZEN, index_statements=INDEXES)


def refuse_rollback(conn):  # type: ignore[no-untyped-def]
    conn.cursor().execute(REFUSE)


steps = [step(apply_sql, refuse_rollback)]
