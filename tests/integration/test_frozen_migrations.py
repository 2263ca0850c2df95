"""Frozen, versioned migrations.

- A released migration never changes: its file and its frozen copy of that release's sql/
  (migrations/frozen/<number>/) match migrations/frozen/SHA256SUMS; only the newest migration,
  not yet released, reads the live sql/.
- A fresh install runs no earlier release's SQL: it equals what sql/ alone builds.
- Every earlier release, built from the repository alone (no git), with rows in it (runs and
  jobs in several statuses, audit events) and a worker heartbeating through the upgrade,
  upgrades to a catalog equal to a fresh install's: functions with their signatures, bodies,
  owners, ACLs, SECURITY DEFINER and settings; tables, columns, defaults, constraints, indexes,
  triggers; views, types, comments, grants. Every row written before is still there.
- 0001's rollback works (on release 1: the API goes, every table and row stays); every later
  migration refuses its rollback with SQLSTATE 0A000 and changes nothing.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import io
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest

from outbound_heartbeat import cli, migrate, schema, service

from ..helpers import FROZEN_SQL, RELEASES, as_role, build_from_sql, install_release

MIGRATIONS = Path(schema.migrations_dir())
MANIFEST = FROZEN_SQL / "SHA256SUMS"


# -- released migrations are frozen ------------------------------------------------------------


def manifest() -> dict[str, str]:
    """path (relative to migrations/) -> sha256, as checked in."""
    entries: dict[str, str] = {}
    for line in MANIFEST.read_text(encoding="utf-8").splitlines():
        digest, _, path = line.partition("  ")
        entries[path] = digest
    return entries


def migration_ids() -> list[str]:
    return sorted(p.stem for p in MIGRATIONS.glob("*.py"))


def test_released_migrations_are_frozen() -> None:
    listed = manifest()
    *released, newest = migration_ids()
    assert released == RELEASES, "tests/helpers.py RELEASES lists every released migration"
    changed = [path for path, digest in listed.items()
               if not (MIGRATIONS / path).is_file()
               or hashlib.sha256((MIGRATIONS / path).read_bytes()).hexdigest() != digest]
    assert not changed, (
        f"released migration files changed: {changed}. A released migration never changes (a"
        " database that applied it will not apply it again): add a new migration instead, and"
        " leave these files as migrations/frozen/SHA256SUMS records them")
    frozen_files = {p.relative_to(MIGRATIONS).as_posix() for p in FROZEN_SQL.rglob("*.sql")}
    released_files = {f"{m}.py" for m in released}
    assert set(listed) == released_files | frozen_files, (
        "migrations/frozen/SHA256SUMS must list every released migration and every frozen file,"
        f" and nothing else: missing {sorted((released_files | frozen_files) - set(listed))},"
        f" extra {sorted(set(listed) - released_files - frozen_files)}")
    assert f"{newest}.py" not in listed  # the release being made
    # Each released migration applies its own frozen copy; only the newest reads sql/.
    for migration in released:
        number = migration.split(".")[0]
        text = (MIGRATIONS / f"{migration}.py").read_text(encoding="utf-8")
        assert f'"frozen" / "{number}"' in text and 'parent.parent / "sql"' not in text, migration
        assert "apply_release_online(conn, FROZEN" in text, migration
        assert sorted((FROZEN_SQL / number).glob("*.sql")), migration
    assert 'parent.parent / "sql"' in (MIGRATIONS / f"{newest}.py").read_text(encoding="utf-8")


def test_the_frozen_check_fails_on_a_changed_release(tmp_path: Path) -> None:
    """The check above can fail: one byte more in a frozen file is a different digest."""
    path = sorted(FROZEN_SQL.glob("0002/*.sql"))[0]
    copy = tmp_path / path.name
    copy.write_bytes(path.read_bytes() + b"\n")
    key = path.relative_to(MIGRATIONS).as_posix()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == manifest()[key]
    assert hashlib.sha256(copy.read_bytes()).hexdigest() != manifest()[key]


# -- the whole catalog --------------------------------------------------------------------------

# The library's schema and the app's two tables, with everything that hangs off them.
_RELATIONS = """
    SELECT c.oid FROM pg_catalog.pg_class AS c
     WHERE c.relnamespace OPERATOR(pg_catalog.=) 'outbound_heartbeat'::pg_catalog.regnamespace
        OR c.oid OPERATOR(pg_catalog.=) ANY (ARRAY['public.outbound_call_runs'::pg_catalog.regclass,
                                                   'public.outbound_call_jobs'::pg_catalog.regclass])"""

FULL_CATALOG = {
    "schema": """
        SELECT n.nspname, pg_catalog.pg_get_userbyid(n.nspowner),
               ARRAY(SELECT a::pg_catalog.text FROM pg_catalog.unnest(n.nspacl) AS a ORDER BY 1),
               pg_catalog.obj_description(n.oid, 'pg_namespace')
          FROM pg_catalog.pg_namespace AS n WHERE n.nspname OPERATOR(pg_catalog.=) 'outbound_heartbeat'""",
    "functions": """
        SELECT p.oid::pg_catalog.regprocedure::pg_catalog.text, p.prokind,
               CASE WHEN p.prokind OPERATOR(pg_catalog.<>) 'a' THEN pg_catalog.pg_get_functiondef(p.oid) END,
               pg_catalog.pg_get_userbyid(p.proowner), p.prosecdef, p.proconfig,
               ARRAY(SELECT a::pg_catalog.text FROM pg_catalog.unnest(p.proacl) AS a ORDER BY 1),
               pg_catalog.obj_description(p.oid, 'pg_proc')
          FROM pg_catalog.pg_proc AS p
         WHERE p.pronamespace OPERATOR(pg_catalog.=) 'outbound_heartbeat'::pg_catalog.regnamespace
         ORDER BY 1""",
    "relations": """
        SELECT c.oid::pg_catalog.regclass::pg_catalog.text, c.relkind, c.relpersistence,
               pg_catalog.pg_get_userbyid(c.relowner), c.reloptions, c.relrowsecurity,
               ARRAY(SELECT a::pg_catalog.text FROM pg_catalog.unnest(c.relacl) AS a ORDER BY 1),
               CASE WHEN c.relkind OPERATOR(pg_catalog.=) ANY ('{{v,m}}')
                    THEN pg_catalog.pg_get_viewdef(c.oid) END,
               pg_catalog.obj_description(c.oid, 'pg_class')
          FROM pg_catalog.pg_class AS c WHERE c.oid IN ({relations}) ORDER BY 1""",
    "columns": """
        SELECT a.attrelid::pg_catalog.regclass::pg_catalog.text, a.attnum, a.attname,
               pg_catalog.format_type(a.atttypid, a.atttypmod), a.attnotnull,
               pg_catalog.pg_get_expr(d.adbin, d.adrelid), a.attidentity, a.attgenerated,
               a.attcollation::pg_catalog.regcollation::pg_catalog.text,
               ARRAY(SELECT x::pg_catalog.text FROM pg_catalog.unnest(a.attacl) AS x ORDER BY 1),
               pg_catalog.col_description(a.attrelid, a.attnum)
          FROM pg_catalog.pg_attribute AS a
          LEFT JOIN pg_catalog.pg_attrdef AS d
            ON d.adrelid OPERATOR(pg_catalog.=) a.attrelid AND d.adnum OPERATOR(pg_catalog.=) a.attnum
         WHERE a.attrelid IN ({relations}) AND a.attnum OPERATOR(pg_catalog.>) 0
           AND NOT a.attisdropped
         ORDER BY 1, 2""",
    "constraints": """
        SELECT co.conrelid::pg_catalog.regclass::pg_catalog.text, co.contypid::pg_catalog.regtype::pg_catalog.text,
               co.conname, pg_catalog.pg_get_constraintdef(co.oid), co.convalidated,
               pg_catalog.obj_description(co.oid, 'pg_constraint')
          FROM pg_catalog.pg_constraint AS co
         WHERE co.conrelid IN ({relations})
            OR co.connamespace OPERATOR(pg_catalog.=) 'outbound_heartbeat'::pg_catalog.regnamespace
         ORDER BY 1, 2, 3""",
    "indexes": """
        SELECT i.indexrelid::pg_catalog.regclass::pg_catalog.text,
               pg_catalog.pg_get_indexdef(i.indexrelid), i.indisvalid, i.indisready
          FROM pg_catalog.pg_index AS i WHERE i.indrelid IN ({relations}) ORDER BY 1""",
    "triggers": """
        SELECT t.tgrelid::pg_catalog.regclass::pg_catalog.text, t.tgname,
               pg_catalog.pg_get_triggerdef(t.oid), t.tgenabled,
               pg_catalog.obj_description(t.oid, 'pg_trigger')
          FROM pg_catalog.pg_trigger AS t
         WHERE t.tgrelid IN ({relations}) AND NOT t.tgisinternal ORDER BY 1, 2""",
    "rules_and_policies": """
        SELECT r.ev_class::pg_catalog.regclass::pg_catalog.text, r.rulename,
               pg_catalog.pg_get_ruledef(r.oid)
          FROM pg_catalog.pg_rewrite AS r
         WHERE r.ev_class IN ({relations}) AND r.rulename OPERATOR(pg_catalog.<>) '_RETURN'
        UNION ALL
        SELECT p.polrelid::pg_catalog.regclass::pg_catalog.text, p.polname,
               pg_catalog.pg_get_expr(p.polqual, p.polrelid)
          FROM pg_catalog.pg_policy AS p WHERE p.polrelid IN ({relations})
         ORDER BY 1, 2""",
    "types": """
        SELECT t.oid::pg_catalog.regtype::pg_catalog.text, t.typtype,
               pg_catalog.pg_get_userbyid(t.typowner),
               ARRAY(SELECT a.attname OPERATOR(pg_catalog.||) ' '
                            OPERATOR(pg_catalog.||) pg_catalog.format_type(a.atttypid, a.atttypmod)
                       FROM pg_catalog.pg_attribute AS a
                      WHERE a.attrelid OPERATOR(pg_catalog.=) t.typrelid
                        AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped
                      ORDER BY a.attnum),
               ARRAY(SELECT e.enumlabel::pg_catalog.text FROM pg_catalog.pg_enum AS e
                      WHERE e.enumtypid OPERATOR(pg_catalog.=) t.oid ORDER BY e.enumsortorder),
               t.typbasetype::pg_catalog.regtype::pg_catalog.text,
               ARRAY(SELECT a::pg_catalog.text FROM pg_catalog.unnest(t.typacl) AS a ORDER BY 1),
               pg_catalog.obj_description(t.oid, 'pg_type')
          FROM pg_catalog.pg_type AS t
         WHERE t.typnamespace OPERATOR(pg_catalog.=) 'outbound_heartbeat'::pg_catalog.regnamespace
           AND t.typtype OPERATOR(pg_catalog.<>) 'b'
         ORDER BY 1""",
    "default_privileges": """
        SELECT pg_catalog.pg_get_userbyid(d.defaclrole), d.defaclobjtype,
               ARRAY(SELECT a::pg_catalog.text FROM pg_catalog.unnest(d.defaclacl) AS a ORDER BY 1)
          FROM pg_catalog.pg_default_acl AS d
         WHERE d.defaclnamespace OPERATOR(pg_catalog.=) 'outbound_heartbeat'::pg_catalog.regnamespace
         ORDER BY 1, 2""",
    "settings": "SELECT * FROM outbound_heartbeat.settings",
}


def full_catalog(dsn: str) -> dict[str, list[Any]]:
    with psycopg.connect(dsn) as conn:
        return {name: conn.execute(psycopg.sql.SQL(query).format(
                    relations=psycopg.sql.SQL(_RELATIONS))).fetchall()
                for name, query in FULL_CATALOG.items()}


def catalog_difference(got: dict[str, list[Any]], expected: dict[str, list[Any]]) -> str:
    """What differs, by kind of object: entries one side lacks (by name), and a line diff of
    each entry both have but not alike."""
    lines: list[str] = []
    for kind in expected:
        ours = {str(row[:3]) if kind != "functions" else row[0]: row for row in got[kind]}
        theirs = {str(row[:3]) if kind != "functions" else row[0]: row for row in expected[kind]}
        lines += [f"{kind}: only after the upgrade: {key}" for key in ours if key not in theirs]
        lines += [f"{kind}: only in the fresh install: {key}" for key in theirs if key not in ours]
        for key in ours.keys() & theirs.keys():
            if ours[key] != theirs[key]:
                lines.append(f"{kind}: {key} differs (- fresh install, + upgraded):")
                lines += difflib.unified_diff("\n".join(map(str, theirs[key])).splitlines(),
                                              "\n".join(map(str, ours[key])).splitlines(),
                                              lineterm="", n=1)
        if got[kind] != expected[kind] and not lines:
            lines.append(f"{kind}: the same entries in another order")
    return "\n".join(lines)


def test_a_fresh_install_is_the_newest_schema_alone(make_db: Any) -> None:
    """On a database without the library the released migrations do nothing and the newest
    installs sql/: what sql/ alone builds, no earlier release's SQL run (release 1 would have
    left its spelling of the partial indexes' predicates)."""
    migrated, from_sql = make_db(), make_db()
    assert migrate(migrated).applied == migration_ids()
    build_from_sql(from_sql)
    got, expected = full_catalog(migrated), full_catalog(from_sql)
    assert expected["functions"] and expected["triggers"] and expected["types"]
    assert got == expected, catalog_difference(got, expected)


ARRAY_LITERAL = re.compile(r"ARRAY\[((?:'[a-z_]+'::text(?:, )?)+)\]")


def same_predicates(snapshot: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """Releases 1 and 2 built the two partial indexes with status IN (...), which PostgreSQL
    keeps as ARRAY['a'::text, ...]; sql/ builds an index only when it is missing, so an upgraded
    database keeps that spelling of the same predicate ('{a,...}'::text[] when sql/ builds it)."""
    def spelled(match: re.Match[str]) -> str:
        return "'{" + ",".join(re.findall(r"'([a-z_]+)'::text", match.group(1))) + "}'::text[]"

    return {**snapshot, "indexes": [(name, ARRAY_LITERAL.sub(spelled, definition), *rest)
                                    for name, definition, *rest in snapshot["indexes"]]}


# -- every earlier release upgrades to head, with rows and a live lease -------------------------


def one(conn: psycopg.Connection[Any], query: str, *params: Any) -> Any:
    row = conn.execute(query.encode(), params).fetchone()
    assert row is not None
    return row[0] if len(row) == 1 else row


def write_rows(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    """Through the SQL API every release has: runs running, pending, completed, cancelled and
    stopped; jobs queued, in progress, completed and failed; their audit events."""
    def create(business: int, jobs: int) -> int:
        return int(one(conn, "SELECT (outbound_heartbeat.create_run(%s, %s::jsonb)).id",
                       business, psycopg.types.json.Jsonb([{"n": i} for i in range(jobs)])))

    def claim(worker: str, run_id: int) -> int:
        return int(one(conn, "SELECT (outbound_heartbeat.claim_run(%s, %s)).lease_epoch", worker, run_id))

    def next_job(run_id: int, worker: str, epoch: int) -> int:
        return int(one(conn, "SELECT (outbound_heartbeat.next_job(%s, %s, %s)).id", run_id, worker, epoch))

    def finish_job(job_id: int, worker: str, epoch: int, status: str) -> None:
        one(conn, "SELECT (outbound_heartbeat.finish_job(%s, %s, %s, %s)).outcome", job_id, worker, epoch, status)

    live = create(1, 3)
    live_epoch = claim("w-live", live)
    finish_job(next_job(live, "w-live", live_epoch), "w-live", live_epoch, "completed")
    next_job(live, "w-live", live_epoch)  # in progress while the upgrade runs

    done = create(2, 2)
    epoch = claim("w-done", done)
    finish_job(next_job(done, "w-done", epoch), "w-done", epoch, "completed")
    finish_job(next_job(done, "w-done", epoch), "w-done", epoch, "failed")
    one(conn, "SELECT (outbound_heartbeat.finish_run(%s, %s, %s, 'completed')).outcome", done, "w-done", epoch)

    create(3, 2)  # pending, jobs queued
    cancelled = create(4, 2)
    one(conn, "SELECT (outbound_heartbeat.force_cancel(%s)).status", cancelled)

    dead = create(5, 2)
    epoch = claim("w-dead", dead)
    next_job(dead, "w-dead", epoch)
    conn.execute("UPDATE public.outbound_call_runs SET last_heartbeat_at = now() - interval '1 hour',"
                 " lock_ts = now() - interval '1 hour'"
                 " WHERE id = %s", (dead,))
    # Judged dead now, not after the server's restart grace (then the setting as it was).
    grace = one(conn, "SELECT restart_grace FROM outbound_heartbeat.settings")
    conn.execute("UPDATE outbound_heartbeat.settings SET restart_grace = interval '0'")
    conn.execute("SELECT * FROM outbound_heartbeat.get_active_run(5)")  # stops it
    conn.execute("UPDATE outbound_heartbeat.settings SET restart_grace = %s", (grace,))
    statuses = dict(conn.execute("SELECT id, status FROM public.outbound_call_runs").fetchall())
    assert sorted(statuses.values()) == ["cancelled", "completed", "pending", "running", "stopped"]
    jobs = {s for (s,) in conn.execute("SELECT DISTINCT status FROM public.outbound_call_jobs")}
    assert {"queued", "in_progress", "completed", "failed"} <= jobs
    return {"run": live, "epoch": live_epoch}


# What a live lease's beats change; everything else written before the upgrade must stay.
_MOVING = ("last_heartbeat_at", "lock_ts", "updated_at")


def rows(conn: psycopg.Connection[Any], columns: dict[str, list[str]] | None = None
         ) -> tuple[dict[str, list[str]], dict[str, list[Any]]]:
    """The app's rows and the audit events, by table (only ``columns`` when given)."""
    tables = ("public.outbound_call_runs", "public.outbound_call_jobs", "outbound_heartbeat.run_events")
    if columns is None:
        columns = {t: [c for (c,) in conn.execute(
            "SELECT a.attname FROM pg_catalog.pg_attribute AS a WHERE a.attrelid = %s::pg_catalog.regclass"
            " AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum", (t,))
            if c not in _MOVING] for t in tables}
    found = {}
    for table in tables:
        query = psycopg.sql.SQL("SELECT {} FROM {} ORDER BY id").format(
            psycopg.sql.SQL(", ").join(map(psycopg.sql.Identifier, columns[table])),
            psycopg.sql.Identifier(*table.split(".")))
        found[table] = conn.execute(query).fetchall()
    return columns, found


class Heartbeats:
    """A worker beating its lease every 50 ms on its own connection, answers recorded."""

    def __init__(self, dsn: str, run_id: int, epoch: int) -> None:
        self.answers: list[str] = []
        self.sent: list[float] = []  # when each answered beat was sent (monotonic)
        self.errors: list[BaseException] = []
        self.longest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(dsn, run_id, epoch), daemon=True)

    def _loop(self, dsn: str, run_id: int, epoch: int) -> None:
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                while not self._stop.is_set():
                    started = time.monotonic()
                    self.answers.append(str(one(conn, "SELECT outbound_heartbeat.heartbeat(%s, 'w-live', %s)",
                                                run_id, epoch)))
                    self.longest = max(self.longest, time.monotonic() - started)
                    self.sent.append(started)
                    time.sleep(0.05)
        except BaseException as exc:  # reported by the test
            self.errors.append(exc)

    def __enter__(self) -> Heartbeats:
        self._thread.start()
        time.sleep(0.2)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


@pytest.mark.parametrize("release", RELEASES)
def test_each_release_upgrades_to_what_a_fresh_install_builds(make_db: Any, release: str) -> None:
    dsn, fresh = make_db(), make_db()
    assert install_release(dsn, release) == RELEASES[: RELEASES.index(release) + 1]
    with psycopg.connect(dsn, autocommit=True) as conn:
        lease = write_rows(conn)
        columns, before = rows(conn)
    with Heartbeats(dsn, lease["run"], lease["epoch"]) as beats:
        started = time.monotonic()
        report = migrate(dsn)
        took = time.monotonic() - started
        time.sleep(0.2)
    assert report.applied == [m for m in migration_ids() if m > release]
    assert not beats.errors, beats.errors
    assert set(beats.answers) == {"ok"}, beats.answers
    during = [t for t in beats.sent if started <= t <= started + took]
    assert len(during) >= 2, (len(during), took)  # beating while the upgrade ran
    assert beats.longest < 2.0, (beats.longest, took)

    migrate(fresh)
    got, expected = same_predicates(full_catalog(dsn)), full_catalog(fresh)
    assert got == expected, f"upgraded from {release}:\n" + catalog_difference(got, expected)

    with psycopg.connect(dsn, autocommit=True) as conn:
        assert rows(conn, columns)[1] == before  # no row lost or rewritten
        # The lease carried across: the newest API goes on with it, the audit chain verifies.
        run, epoch = lease["run"], lease["epoch"]
        assert service.heartbeat(conn, run, "w-live", epoch) == "ok"
        job = service.next_job(conn, run, "w-live", epoch)
        assert job is not None
        service.finish_job(conn, job.id, "w-live", epoch, "completed")
        service.finish_job(conn, one(conn, "SELECT id FROM public.outbound_call_jobs WHERE run_id = %s"
                                     " AND status = 'in_progress'", run), "w-live", epoch, "completed")
        assert service.finish_run(conn, run, "w-live", epoch).outcome == "finished"
        assert service.verify_events(conn) == []
        assert service.verify_counters(conn) == []



def _executable(conn: psycopg.Connection[Any], role: str) -> set[str]:
    return {r[0] for r in conn.execute(
        "SELECT p.oid::pg_catalog.regprocedure::text FROM pg_catalog.pg_proc AS p"
        " WHERE p.pronamespace = 'outbound_heartbeat'::pg_catalog.regnamespace"
        "   AND pg_catalog.has_function_privilege(%s, p.oid, 'EXECUTE')", (role,)).fetchall()}


@pytest.mark.parametrize("release", RELEASES[2:])
def test_roles_granted_before_the_upgrade_call_every_function_after_it(make_db: Any, release: str) -> None:
    """Roles an earlier release's grant_app_role() and grant_dba_role() made call every function
    of the newest API after the upgrade, those it added included, with no grant run again; the
    upgrade records them, so what later releases declare reaches them too."""
    dsn = make_db()
    install_release(dsn, release)
    suffix = uuid.uuid4().hex[:8]
    app, dba = f"oh_app_{suffix}", f"oh_dba_{suffix}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        for role in (app, dba):
            conn.execute(psycopg.sql.SQL("CREATE ROLE {}").format(psycopg.sql.Identifier(role)))
        conn.execute("SELECT outbound_heartbeat.grant_app_role(%s)", (app,))
        conn.execute("SELECT outbound_heartbeat.grant_dba_role(%s)", (dba,))
        granted_before = _executable(conn, app) | _executable(conn, dba)
    try:
        migrate(dsn)
        with psycopg.connect(dsn, autocommit=True) as conn:
            app_api, dba_api = ({r[0] for r in conn.execute(
                "SELECT f::text FROM outbound_heartbeat._offered_to(%s) AS f", (audience,)).fetchall()}
                for audience in ("app", "dba"))
            added = (app_api | dba_api) - granted_before
            assert "outbound_heartbeat.list_orphaned_calls()" in added, sorted(added)
            assert _executable(conn, app) == app_api
            assert _executable(conn, dba) == app_api | dba_api
            assert sorted(conn.execute("SELECT role::text, audience FROM outbound_heartbeat.api_roles").fetchall()) == [
                (app, "app"), (dba, "dba")]
            with as_role(dsn, app) as caller:
                caller.execute("SELECT * FROM outbound_heartbeat.list_orphaned_calls()").fetchall()
            with as_role(dsn, dba) as caller:
                assert caller.execute("SELECT * FROM outbound_heartbeat.verify_counters()").fetchall() == []
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            for role in (app, dba):
                conn.execute(psycopg.sql.SQL("DROP OWNED BY {0}; DROP ROLE {0}").format(psycopg.sql.Identifier(role)))


# -- rollbacks ---------------------------------------------------------------------------------


def api_objects(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        return int(one(conn, "SELECT (SELECT count(*) FROM pg_catalog.pg_proc WHERE pronamespace ="
                             " 'outbound_heartbeat'::pg_catalog.regnamespace)"
                             " + (SELECT count(*) FROM pg_catalog.pg_class WHERE relkind = 'v'"
                             " AND relnamespace = 'outbound_heartbeat'::pg_catalog.regnamespace)"))


def test_release_1_rolls_back_to_its_tables_and_rows(make_db: Any) -> None:
    dsn = make_db()
    install_release(dsn, "0001.install-sql")
    with psycopg.connect(dsn, autocommit=True) as conn:
        write_rows(conn)
        columns, before = rows(conn)
    assert schema.rollback(dsn).rolled_back == ["0001.install-sql"]
    assert api_objects(dsn) == 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert rows(conn, columns)[1] == before
    assert migrate(dsn).applied == migration_ids()  # and back, to the newest release


@pytest.mark.parametrize("release", [*RELEASES[1:], "newest"])
def test_later_releases_refuse_their_rollback_and_change_nothing(make_db: Any, release: str) -> None:
    dsn = make_db()
    ids = migration_ids()
    last = ids[-1] if release == "newest" else release
    if release == "newest":
        migrate(dsn)
    else:
        install_release(dsn, last)
    with psycopg.connect(dsn, autocommit=True) as conn:
        write_rows(conn)
    catalog_before = full_catalog(dsn)
    with pytest.raises(psycopg.errors.FeatureNotSupported) as refused:
        schema.rollback(dsn)
    assert refused.value.sqlstate == "0A000"
    assert f"{last} cannot be rolled back" in str(refused.value)
    assert refused.value.diag.message_hint and "backup" in refused.value.diag.message_hint
    assert full_catalog(dsn) == catalog_before
    assert schema.status(dsn).applied == ids[: ids.index(last) + 1]
    assert not schema.status(dsn).pending or release != "newest"
    # The CLI says so in one line and exits 1; the lock is left free for the next migrate.
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert cli.main(["migrate", "rollback", "--dsn", dsn], out=io.StringIO()) == 1
    assert f"error: {last} cannot be rolled back" in err.getvalue()
    assert migrate(dsn).applied == ids[ids.index(last) + 1:]


def test_the_comparison_shows_a_leftover_and_a_changed_body(make_db: Any) -> None:
    """The catalog comparison above can fail, and says what differs: an older signature left
    behind and a function whose body or settings changed."""
    dsn = make_db()
    migrate(dsn)
    expected = full_catalog(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE FUNCTION outbound_heartbeat.grant_app_role(role_name text) RETURNS void"
                     " LANGUAGE sql AS 'SELECT NULL'")
        conn.execute("ALTER FUNCTION outbound_heartbeat.current_settings() SET work_mem = '8MB'")
    got = full_catalog(dsn)
    difference = catalog_difference(got, expected)
    assert got != expected
    assert "functions: only after the upgrade: outbound_heartbeat.grant_app_role(text)" in difference
    assert "functions: outbound_heartbeat.current_settings() differs" in difference
    assert "+ SET work_mem TO '8MB'" in difference, difference


def job_columns(conn: psycopg.Connection[Any]) -> set[str]:
    """The columns next_job() returns (its row type's attributes)."""
    return {r[0] for r in conn.execute(
        "SELECT a.attname FROM pg_catalog.pg_attribute AS a"
        " WHERE a.attrelid = (SELECT t.typrelid FROM pg_catalog.pg_type AS t"
        "                      WHERE t.oid = 'outbound_heartbeat.job'::pg_catalog.regtype)"
        "   AND a.attnum > 0 AND NOT a.attisdropped").fetchall()}


def test_the_new_code_runs_on_the_previous_release_so_it_is_deployed_before_migrating(make_db: Any) -> None:
    """Upgrading from release 4, the code goes first (docs/operations.md, Deploying): release
    4's worker builds its Job from every column next_job() returns, and this release's next_job()
    returns one more (call_key), so a release-4 worker fails right after next_job() took a job
    once the schema is migrated. This release's code runs the whole worker path on release 4's
    schema, then across the migration on the same lease."""
    dsn = make_db()
    install_release(dsn, RELEASES[-1])
    release_4_job = {"id", "run_id", "business_id", "status", "payload", "error_message",
                     "created_at", "updated_at"}
    with psycopg.connect(dsn, autocommit=True) as conn:
        run = service.create_run(conn, 1, [{"n": n} for n in range(3)])
        claim = service.claim_run(conn, "w-new", run.id)
        assert claim is not None
        lease = (claim.run_id, claim.worker_id, claim.lease_epoch)
        assert service.heartbeat(conn, *lease) == "ok"
        assert job_columns(conn) == release_4_job
        job = service.next_job(conn, *lease)
        assert job is not None and job.call_key is None  # release 4 issues no key
        assert service.finish_job(conn, job.id, *lease[1:], "completed").outcome == "finished"
        migrate(dsn)
        assert job_columns(conn) - release_4_job == {"call_key"}
        job = service.next_job(conn, *lease)
        assert job is not None and job.call_key is not None
        for row in conn.execute("SELECT id FROM public.outbound_call_jobs WHERE status = 'in_progress'"
                                ).fetchall():
            assert service.finish_job(conn, row[0], *lease[1:], "completed").outcome == "finished"
        assert service.finish_run(conn, *lease).outcome == "finished"
