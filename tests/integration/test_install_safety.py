"""Installing runs nothing a non-superuser wrote (docs/security.md): the migration pins
search_path and qualifies the operators it stores in the catalog (index predicates, trigger
conditions), so an operator planted in ``public`` is never chosen, never runs as the migrating
superuser and is never built into the library's indexes and triggers; an install that an older
release already poisoned this way is refused, naming the object and the operator."""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from outbound_heartbeat import migrate, schema, service
from outbound_heartbeat.errors import UnsafeInstall
from outbound_heartbeat.testing import Server
from outbound_heartbeat.upgrade import LockPolicy, MigrationBlocked

from ..helpers import install_release, seed_legacy
from ..pgbouncer import start_pgbouncer

#: The planter's operator: =(varchar, varchar) in public, an exact match for a legacy varchar
#: status column, so under the default search_path it wins over pg_catalog's text =. Its
#: function records every call with the rights it ran with, and tries to make its author a
#: superuser (which only works when a superuser runs it).
PLANT = """
CREATE TABLE public.planted_calls (called_as text, superuser boolean, at timestamptz DEFAULT now());
GRANT INSERT, SELECT, DELETE ON public.planted_calls TO PUBLIC;
-- VOLATILE, so it may write; the operator's IMMUTABLE function (an index predicate needs one)
-- calls it.
CREATE FUNCTION public.planted_effect() RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.planted_calls (called_as, superuser)
    SELECT current_user, r.rolsuper FROM pg_catalog.pg_roles AS r WHERE r.rolname = current_user;
    BEGIN
        EXECUTE pg_catalog.format('ALTER ROLE %I SUPERUSER', {planter});
    EXCEPTION WHEN OTHERS THEN NULL;
    END;
END
$$;
CREATE FUNCTION public.planted_eq(varchar, varchar) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    PERFORM public.planted_effect();
    RETURN $1::text OPERATOR(pg_catalog.=) $2::text;
END
$$;
CREATE OPERATOR public.= (LEFTARG = varchar, RIGHTARG = varchar, FUNCTION = public.planted_eq,
                          COMMUTATOR = OPERATOR(public.=));
"""

#: Every library object on the app's tables or in its schema whose catalog entry depends on an
#: operator or function outside pg_catalog and the library's schema.
FOREIGN_DEPENDENCIES = """
SELECT pg_catalog.pg_describe_object(d.classid, d.objid, d.objsubid),
       pg_catalog.pg_describe_object(d.refclassid, d.refobjid, 0)
  FROM pg_catalog.pg_depend AS d
  LEFT JOIN pg_catalog.pg_operator AS o
    ON d.refclassid = 'pg_catalog.pg_operator'::regclass AND o.oid = d.refobjid
  LEFT JOIN pg_catalog.pg_proc AS p
    ON d.refclassid = 'pg_catalog.pg_proc'::regclass AND p.oid = d.refobjid
 WHERE COALESCE(o.oprnamespace, p.pronamespace) NOT IN
       ('pg_catalog'::regnamespace, 'outbound_heartbeat'::regnamespace)
   AND ((d.classid = 'pg_class'::regclass AND d.objid IN (
            SELECT c.oid FROM pg_class AS c
             WHERE c.relnamespace = 'outbound_heartbeat'::regnamespace
                OR c.oid IN (SELECT i.indexrelid FROM pg_index AS i WHERE i.indrelid IN (
                                'public.outbound_call_runs'::regclass, 'public.outbound_call_jobs'::regclass))))
        OR (d.classid = 'pg_trigger'::regclass AND d.objid IN (
            SELECT t.oid FROM pg_trigger AS t JOIN pg_class AS c ON c.oid = t.tgrelid
             WHERE c.relnamespace = 'outbound_heartbeat'::regnamespace
                OR c.oid IN ('public.outbound_call_runs'::regclass, 'public.outbound_call_jobs'::regclass)))
        OR (d.classid = 'pg_proc'::regclass AND d.objid IN (
            SELECT f.oid FROM pg_proc AS f WHERE f.pronamespace = 'outbound_heartbeat'::regnamespace))
        OR (d.classid = 'pg_rewrite'::regclass AND d.objid IN (
            SELECT w.oid FROM pg_rewrite AS w JOIN pg_class AS c ON c.oid = w.ev_class
             WHERE c.relnamespace = 'outbound_heartbeat'::regnamespace)))
"""


@pytest.fixture
def legacy_db(pg_server: Server) -> Iterator[tuple[str, str]]:
    """A database with the app's legacy tables (varchar status) and a non-superuser that owns
    the database (so on PostgreSQL 15 it may create in public) and planted an operator there."""
    dsn = pg_server.create_database()
    dbname = str(psycopg.conninfo.conninfo_to_dict(dsn)["dbname"])
    planter = f"oh_planter_{uuid.uuid4().hex[:8]}"
    seed_legacy(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(planter)))
        conn.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(
            sql.Identifier(dbname), sql.Identifier(planter)))
        # Older servers let everyone create in public; on 15 the database owner may.
        conn.execute(sql.SQL("GRANT CREATE ON SCHEMA public TO {}").format(sql.Identifier(planter)))
    with psycopg.connect(dsn, user=planter, autocommit=True) as conn:
        conn.execute(PLANT.replace("{planter}", sql.Literal(planter).as_string(conn)))
    try:
        yield dsn, planter
    finally:
        with psycopg.connect(pg_server.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("ALTER DATABASE {} OWNER TO CURRENT_USER").format(sql.Identifier(dbname)))
        pg_server.drop_database(dbname)
        with psycopg.connect(pg_server.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(planter)))


def stored_operators(conn: psycopg.Connection[Any]) -> dict[str, set[str]]:
    """The operators in the stored expression (parse tree) of each index predicate and trigger
    condition on the app's tables."""
    found: dict[str, set[str]] = {}
    rows = conn.execute(
        """SELECT 'index ' || i.indexrelid::regclass::text, i.indpred::text FROM pg_index AS i
            WHERE i.indrelid IN ('public.outbound_call_runs'::regclass, 'public.outbound_call_jobs'::regclass)
              AND i.indpred IS NOT NULL
           UNION ALL
           SELECT 'trigger ' || t.tgname, t.tgqual::text FROM pg_trigger AS t
            WHERE t.tgrelid IN ('public.outbound_call_runs'::regclass, 'public.outbound_call_jobs'::regclass)
              AND t.tgqual IS NOT NULL""").fetchall()
    for label, tree in rows:
        operators = [int(n) for n in re.findall(r":opno (\d+)", tree)]
        names = conn.execute(
            "SELECT (pg_identify_object('pg_operator'::regclass, o, 0)).identity"
            "  FROM unnest(%s::oid[]) AS o", (operators,)).fetchall()
        found[label] = {n[0] for n in names}
    return found


def planted_calls(conn: psycopg.Connection[Any]) -> list[Any]:
    return conn.execute("SELECT called_as, superuser FROM public.planted_calls").fetchall()


def is_superuser(conn: psycopg.Connection[Any], role: str) -> bool:
    row = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
    assert row is not None
    return bool(row[0])


def test_an_upgrade_from_an_earlier_release_never_builds_in_a_planted_operator(
        legacy_db: tuple[str, str]) -> None:
    """Release 3's frozen SQL lists the indexes it defers with an unqualified =, and a deferred
    build runs under the migrating session's search_path: its migration builds them from
    statements with the operator qualified, so an upgrade from release 2 on tables with varchar
    columns picks pg_catalog's operator, as a fresh install does."""
    dsn, planter = legacy_db
    install_release(dsn, "0002.monitoring")
    assert migrate(dsn).applied == ["0003.online-upgrade", "0004.guarantees-cross",
                                    "0005.call-keys-and-orphans"]
    assert migrate(dsn).applied == []  # the preflight finds nothing foreign
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert planted_calls(conn) == [] and not is_superuser(conn, planter)
        assert conn.execute(FOREIGN_DEPENDENCIES).fetchall() == []
        assert stored_operators(conn)["index outbound_call_jobs_handed_out_idx"] == {
            "pg_catalog.=(pg_catalog.text,pg_catalog.text)"}


def test_a_planted_operator_never_runs_and_is_never_built_in(legacy_db: tuple[str, str]) -> None:
    dsn, planter = legacy_db
    with psycopg.connect(dsn, user=planter, autocommit=True) as conn:
        # The attack is real: under the default search_path the planted operator is chosen
        # (here run by its author, so its ALTER ROLE fails).
        picked = conn.execute("SELECT 'a'::varchar = 'a'::varchar").fetchone()
        assert picked == (True,) and planted_calls(conn) == [(planter, False)]
        assert not is_superuser(conn, planter)
        conn.execute("DELETE FROM public.planted_calls")

    migrate(dsn)

    with psycopg.connect(dsn, autocommit=True) as conn:
        assert planted_calls(conn) == []
        assert not is_superuser(conn, planter)
        assert conn.execute(FOREIGN_DEPENDENCIES).fetchall() == []
        # The library's index predicate and status trigger use pg_catalog's operator.
        assert stored_operators(conn) == {
            "index outbound_call_runs_active_idx": {"pg_catalog.=(pg_catalog.text,pg_catalog.text)"},
            "index outbound_call_jobs_open_idx": {"pg_catalog.=(pg_catalog.text,pg_catalog.text)"},
            "index outbound_call_jobs_handed_out_idx": {"pg_catalog.=(pg_catalog.text,pg_catalog.text)"},
            "index outbound_call_jobs_orphaned_idx": {"pg_catalog.=(pg_catalog.text,pg_catalog.text)"},
            "trigger outbound_heartbeat_count_status": {"pg_catalog.=(pg_catalog.text,pg_catalog.text)"},
            "trigger outbound_heartbeat_epoch_never_down": {"pg_catalog.<(bigint,bigint)"},
        }
        # Transitions write the adopted table through the index and the trigger: still nothing.
        run = service.create_run(conn, 42, [{"n": 1}])
        lease = service.claim_run(conn, "w-1", run.id)
        assert lease is not None
        service.force_cancel(conn, run.id)
        assert planted_calls(conn) == []
    migrate(dsn)  # a re-apply too
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert planted_calls(conn) == [] and not is_superuser(conn, planter)


POISON = """
SET search_path = "$user", public;
DROP INDEX public.outbound_call_runs_active_idx;
CREATE INDEX outbound_call_runs_active_idx ON public.outbound_call_runs (business_id, id)
    WHERE status IN ('pending', 'running');
DROP TRIGGER outbound_heartbeat_count_status ON public.outbound_call_runs;
CREATE TRIGGER outbound_heartbeat_count_status AFTER UPDATE OF status ON public.outbound_call_runs
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION outbound_heartbeat._note_run_status();
RESET search_path;
"""


def test_an_install_poisoned_by_an_older_release_is_refused_naming_it(
        legacy_db: tuple[str, str]) -> None:
    dsn, planter = legacy_db
    migrate(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        # What the older release built, by hand: the planted operator captured in both.
        conn.execute(POISON)
        captured = conn.execute(FOREIGN_DEPENDENCIES).fetchall()
        assert {c[0].split(" on ")[0] for c in captured} == {
            "index outbound_call_runs_active_idx", "trigger outbound_heartbeat_count_status"}
        # Building it by hand ran the operator as the superuser, as the older release did.
        assert planted_calls(conn) and is_superuser(conn, planter)
        conn.execute(sql.SQL("ALTER ROLE {} NOSUPERUSER").format(sql.Identifier(planter)))
        conn.execute("TRUNCATE public.planted_calls")

    with pytest.raises(UnsafeInstall) as refused:
        migrate(dsn)
    message = str(refused.value)
    assert refused.value.sqlstate == "OHS01"
    assert "outbound_call_runs_active_idx" in message
    assert "outbound_heartbeat_count_status" in message
    assert "public.=(character varying,character varying)" in message
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert planted_calls(conn) == [] and not is_superuser(conn, planter)
        # Once the DBA drops them as told, migrate rebuilds them clean.
        conn.execute("DROP INDEX public.outbound_call_runs_active_idx")
        conn.execute("DROP TRIGGER outbound_heartbeat_count_status ON public.outbound_call_runs")
    migrate(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute(FOREIGN_DEPENDENCIES).fetchall() == []
        assert planted_calls(conn) == [] and not is_superuser(conn, planter)


def test_migrating_through_pgbouncer_changes_no_server_session(pg_server: Server) -> None:
    """The installer sets nothing at session level: a transaction pooler hands the server
    session a migration used to other clients, which must find it as it was. A pool of one
    server session: between any two statements of the migration (the index builds run
    CONCURRENTLY, outside any transaction) another client, always waiting, gets it and reads its
    settings."""
    dsn = pg_server.create_database()
    dbname = str(psycopg.conninfo.conninfo_to_dict(dsn)["dbname"])
    seed_legacy(dsn)  # adopted tables: their indexes are built concurrently
    bouncer = start_pgbouncer(pg_server.dsn, pool_size=1)
    seen: dict[tuple[str, str], int] = {}
    stop = threading.Event()

    def observe() -> None:
        with psycopg.connect(bouncer.dsn_for(dsn), autocommit=True, prepare_threshold=None) as conn:
            while not stop.is_set():
                row = conn.execute("SELECT current_setting('lock_timeout'),"
                                   " current_setting('search_path')").fetchone()
                assert row is not None
                seen[(row[0], row[1])] = seen.get((row[0], row[1]), 0) + 1

    observer = threading.Thread(target=observe)
    try:
        observer.start()
        for attempt in range(2):  # the indexes built each time
            if attempt:  # the newest step applied again (it re-applies sql/), indexes missing
                with psycopg.connect(dsn, autocommit=True) as conn:
                    conn.execute("DELETE FROM _yoyo_migration WHERE migration_id = %s",
                                 (schema.status(dsn).applied[-1],))
                    conn.execute("DROP INDEX outbound_call_runs_active_idx, outbound_call_jobs_open_idx,"
                                 " outbound_call_jobs_handed_out_idx, outbound_call_jobs_run_idx,"
                                 " outbound_call_jobs_orphaned_idx")
            report = migrate(bouncer.dsn_for(dsn))
            assert report.applied, attempt
        assert observer.is_alive()
        stop.set()
        observer.join(30)
        with psycopg.connect(bouncer.dsn_for(dsn), prepare_threshold=None) as conn:  # and after
            row = conn.execute("SELECT current_setting('lock_timeout'),"
                               " current_setting('search_path')").fetchone()
        assert row is not None
        assert set(seen) | {(row[0], row[1])} == {("0", '"$user", public')}, seen
        assert sum(seen.values()) > 50
        with psycopg.connect(dsn) as conn:  # the migration lock let go, whichever session
            assert conn.execute("SELECT count(*) FROM yoyo_lock").fetchone() == (0,)
    finally:
        stop.set()
        observer.join(30)
        bouncer.stop()
        pg_server.drop_database(dbname)


def test_index_builds_still_give_up_on_a_long_wait_without_a_session_setting(
        pg_server: Server) -> None:
    """With no SET lock_timeout, a concurrent index build that waits on an old transaction is
    still cancelled after index_lock_timeout, reported and retried, and built once it ends."""
    dsn = pg_server.create_database()
    dbname = str(psycopg.conninfo.conninfo_to_dict(dsn)["dbname"])
    seed_legacy(dsn)
    try:
        with psycopg.connect(dsn) as old:
            # A snapshot older than the build: CREATE INDEX CONCURRENTLY waits for it to end.
            old.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            old.execute("SELECT 1 FROM pg_class LIMIT 1")
            started = time.monotonic()
            with pytest.raises(MigrationBlocked) as blocked:
                migrate(dsn, LockPolicy(index_lock_timeout=0.5, attempts=2, first_pause=0.1))
            took = time.monotonic() - started
            assert "(concurrently)" in blocked.value.step
            assert [w.attempt for w in blocked.value.waits] == [1, 2]
            assert all(0.4 < w.waited < 3.0 for w in blocked.value.waits), blocked.value.waits
            assert took < 15, took
            old.rollback()
        report = migrate(dsn)
        assert report.applied == ["0005.call-keys-and-orphans"]  # the released ones: recorded before
        with psycopg.connect(dsn) as conn:
            valid = conn.execute(
                "SELECT count(*) FROM pg_index WHERE indisvalid AND indexrelid IN"
                " ('outbound_call_runs_active_idx'::regclass, 'outbound_call_jobs_open_idx'::regclass,"
                "  'outbound_call_jobs_handed_out_idx'::regclass, 'outbound_call_jobs_run_idx'::regclass,"
                "  'outbound_call_jobs_orphaned_idx'::regclass)"
            ).fetchone()
            assert valid == (5,)
            # Nothing left behind: no watcher, no cancelled build still running.
            left = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE query LIKE"
                                " '/* outbound_heartbeat migration%' AND pid <> pg_backend_pid()"
                                " AND datname = current_database()"  # xdist workers share the server
                                ).fetchone()
            assert left == (0,)
    finally:
        pg_server.drop_database(dbname)


TROJAN_LOCK_TABLE = """
CREATE TABLE public.yoyo_lock (locked int DEFAULT 1, ctime timestamp, pid int NOT NULL,
                               PRIMARY KEY (locked));
CREATE FUNCTION public.trojan() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM public.planted_effect(); RETURN NEW; END $$;
CREATE TRIGGER trojan BEFORE INSERT ON public.yoyo_lock FOR EACH ROW EXECUTE FUNCTION public.trojan();
"""


def test_yoyos_bookkeeping_runs_nothing_a_non_superuser_planted(legacy_db: tuple[str, str]) -> None:
    """yoyo names its tables without a schema: one the database owner made in public before
    the first install, or a schema named like the migrating role (searched first), is refused
    before yoyo writes anything."""
    dsn, planter = legacy_db
    with psycopg.connect(dsn, user=planter, autocommit=True) as conn:
        conn.execute(TROJAN_LOCK_TABLE)
    with pytest.raises(UnsafeInstall) as refused:
        migrate(dsn)
    assert f"table yoyo_lock (owned by {planter})" in str(refused.value)
    assert "trigger trojan on yoyo_lock" in str(refused.value)
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert planted_calls(conn) == [] and not is_superuser(conn, planter)
        conn.execute("DROP TABLE public.yoyo_lock")
        me = conn.execute("SELECT current_user").fetchone()
        assert me is not None
    # "$user": a schema named like the migrating role is searched before public.
    with psycopg.connect(dsn, user=planter, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(me[0])))
    with pytest.raises(UnsafeInstall) as refused:
        migrate(dsn)
    assert f"schema {me[0]} (owned by {planter}, searched before public)" in str(refused.value)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA {}").format(sql.Identifier(me[0])))
    assert migrate(dsn).applied
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert planted_calls(conn) == [] and not is_superuser(conn, planter)


def test_adoption_writes_an_app_owned_table_with_its_owners_rights(
        legacy_db: tuple[str, str]) -> None:
    """The one write the install makes to the app's rows (initialising last_heartbeat_at on
    adoption) runs as the table's owner: a trigger the owner put on its table runs with the
    owner's rights, not the migrating superuser's."""
    dsn, planter = legacy_db
    with psycopg.connect(dsn, autocommit=True) as conn:
        for table in ("outbound_call_runs", "outbound_call_jobs"):
            conn.execute(sql.SQL("ALTER TABLE {} OWNER TO {}").format(
                sql.Identifier(table), sql.Identifier(planter)))
    with psycopg.connect(dsn, user=planter, autocommit=True) as conn:
        conn.execute("""
            CREATE FUNCTION public.app_touch() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN PERFORM public.planted_effect(); RETURN NEW; END $$;
            CREATE TRIGGER app_touch BEFORE UPDATE ON public.outbound_call_runs
                FOR EACH ROW EXECUTE FUNCTION public.app_touch();""")
    migrate(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        calls = planted_calls(conn)
        assert calls and set(calls) == {(planter, False)}, calls  # the running and pending runs
        assert not is_superuser(conn, planter)
        initialised = conn.execute("SELECT count(*) FROM outbound_call_runs"
                                   " WHERE last_heartbeat_at IS NOT NULL").fetchone()
        assert initialised == (3,)


def test_an_upgrade_from_a_session_with_standard_conforming_strings_off_regrants(
    conn: psycopg.Connection[Any], dsn: str, roles: dict[str, str]
) -> None:
    # The files match the public API with LIKE '\_%': under standard_conforming_strings = off
    # that pattern read '_%', matched no function, and roles granted before got nothing new.
    from outbound_heartbeat.schema import sql_dir
    from outbound_heartbeat.upgrade import apply_sql_online

    signature = "outbound_heartbeat.next_job(bigint, text, bigint, text)"
    conn.execute(sql.SQL("REVOKE EXECUTE ON FUNCTION {} FROM {}").format(
        sql.SQL(signature), sql.Identifier(roles["app"])))
    with psycopg.connect(dsn, autocommit=True,
                         options="-c standard_conforming_strings=off") as old_style:
        assert old_style.execute("SHOW standard_conforming_strings").fetchone() == ("off",)
        apply_sql_online(old_style, sql_dir())
    row = conn.execute("SELECT has_function_privilege(%s, %s, 'EXECUTE')",
                       (roles["app"], signature)).fetchone()
    assert row == (True,)
