"""testing.Clones: a clone of the template per take(), the next one made ahead, none left."""

from __future__ import annotations

import psycopg
from psycopg.conninfo import conninfo_to_dict

from outbound_heartbeat.testing import Clones, Server


def _databases(server: Server) -> set[str]:
    with psycopg.connect(server.dsn, autocommit=True) as conn:
        return {name for (name,) in conn.execute("SELECT datname FROM pg_catalog.pg_database")}


def _name(dsn: str) -> str:
    return str(conninfo_to_dict(dsn)["dbname"])


def test_each_take_is_a_fresh_clone_and_the_next_one_is_already_made(
    pg_server: Server, template_name: str
) -> None:
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
        made = _databases(pg_server) - before
        # The two taken, and maybe the third already asked for (it shows once its copy commits).
        assert {_name(d) for d in taken} <= made and len(made) <= 3
    finally:
        clones.close()
        for dsn in taken:
            pg_server.drop_database(_name(dsn))
    assert _databases(pg_server) == before  # close() dropped the one made ahead
