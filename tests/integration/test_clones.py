"""testing.Clones: a clone of the template per take(), the next one made ahead, none left; and
Server.drop_database(wait=False): sent, done or raising at the next wait."""

from __future__ import annotations

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from outbound_heartbeat.testing import Clones, Server


def _databases(server: Server) -> set[str]:
    server.wait_for_drops()  # the previous test's database, dropped without waiting (conftest)
    with psycopg.connect(server.dsn, autocommit=True) as conn:
        return {name for (name,) in conn.execute("SELECT datname FROM pg_catalog.pg_database")}


def _name(dsn: str) -> str:
    return str(conninfo_to_dict(dsn)["dbname"])


@pytest.mark.parametrize("in_memory", [False, True], ids=["default-copy", "file-copy"])
def test_each_take_is_a_fresh_clone_and_the_next_one_is_already_made(
    pg_server: Server, template_name: str, in_memory: bool
) -> None:
    # A Server object of its own: the other xdist workers clone and drop on the same server
    # meanwhile (tests/conftest.py), so only the databases made here are compared. Both ways
    # of copying, wherever this server lives (a file copy works on disk too, only slower).
    pg_server = Server(pg_server.dsn, pg_server.kind, in_memory=in_memory)
    before = _databases(pg_server)
    clones = Clones(pg_server, template_name)
    taken: list[str] = []
    try:
        taken.append(clones.take())
        with psycopg.connect(taken[0], autocommit=True) as conn:
            # A clone of the migrated template: the schema is there.
            assert conn.execute(
                "SELECT count(*) FROM pg_catalog.pg_namespace WHERE nspname = 'outbound_heartbeat'"
            ).fetchone() == (1,)
            conn.execute("CREATE TABLE public.left_here ()")
        taken.append(clones.take())
        assert taken[1] != taken[0]
        with psycopg.connect(taken[1], autocommit=True) as conn:
            assert conn.execute("SELECT to_regclass('public.left_here')").fetchone() == (None,)
        ours = set(pg_server._created)  # the two taken and the third asked for ahead
        made = (_databases(pg_server) - before) & ours
        # The two taken, and maybe the third already (it shows once its copy commits).
        assert {_name(d) for d in taken} <= made and len(ours) == 3
    finally:
        clones.close()
        for dsn in taken:
            pg_server.drop_database(_name(dsn))
    assert not _databases(pg_server) & ours  # close() dropped the one made ahead


def test_a_drop_not_waited_for_is_done_by_the_next_wait_and_a_failed_one_raises_there(
    pg_server: Server,
) -> None:
    server = Server(pg_server.dsn, pg_server.kind)  # its own: the suite's drops do not mix in
    first = _name(server.create_database())
    with psycopg.connect(server.dsn_for(first), autocommit=True):
        server.drop_database(first, wait=False)  # returns at once; FORCE ends this session
        server.wait_for_drops()
    assert first not in _databases(server) and first not in server._created

    second = _name(server.create_database())
    with psycopg.connect(server.dsn, autocommit=True) as conn:
        # A template database cannot be dropped: the drop sent fails on the server.
        conn.execute(psycopg.sql.SQL("ALTER DATABASE {} IS_TEMPLATE true").format(
            psycopg.sql.Identifier(second)))
        server.drop_database(second, wait=False)
        with pytest.raises(psycopg.errors.WrongObjectType, match="template"):
            server.wait_for_drops()  # tried once more, waited for: the server's error
        assert second in _databases(server) and second in server._created
        conn.execute(psycopg.sql.SQL("ALTER DATABASE {} IS_TEMPLATE false").format(
            psycopg.sql.Identifier(second)))
    server.drop_database(second)
    assert second not in _databases(server)
    server.close()


def test_a_clone_copies_files_only_on_a_server_in_memory(pg_server: Server, template_name: str) -> None:
    with psycopg.connect(pg_server.dsn, autocommit=True) as conn:
        on_disk = Server(pg_server.dsn, pg_server.kind).creation(conn, "x", template_name)
        in_memory = Server(pg_server.dsn, pg_server.kind, in_memory=True).creation(conn, "x", template_name)
        plain = Server(pg_server.dsn, pg_server.kind, in_memory=True).creation(conn, "x")
        assert on_disk.as_string(conn) == f'CREATE DATABASE "x" TEMPLATE "{template_name}"'
        # STRATEGY exists from PostgreSQL 15 on: an older server gets the plain clone.
        strategy = " STRATEGY FILE_COPY" if conn.info.server_version >= 150000 else ""
        assert in_memory.as_string(conn) == on_disk.as_string(conn) + strategy
        assert plain.as_string(conn) == 'CREATE DATABASE "x"'
